"""Does an open status page cost the packet path anything? Hot-workload qps with and without a
client reloading the admin endpoint's status page every second.

    python3 bench/status_page.py [--seconds 8] [--repeats 3] [--refresh 1.0]

One meshdns process on the bench zone (bench/zone.py, the `hot` mix: 40% service A, 15% SRV,
20% virtual A, 20% node A, 5% NXDOMAIN), pinned to CPU 0; dnsperf and the page reloader on
CPU 1. Runs alternate (off, on, off, on, ...) so drift on a shared machine hits both alike; the
spread of each is printed. The page's own cost is measured first, free of that noise: the
server's CPU time per page load (from /proc), with no DNS load. "on" fetches
`/?name=svc-1.service.consul` (the page with an explain form result) every `--refresh` seconds
for the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers as srv  # noqa: E402
import zone as zonemod  # noqa: E402


def dnsperf(port: int, queries: Path, seconds: float) -> float:
    out = subprocess.run(
        ["taskset", "-c", "1", "dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(queries),
         "-c", "4", "-q", "100", "-l", str(seconds), "-t", "2"],
        capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    return float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))


def reload_page(url: str, every: float, stop: threading.Event, counts: list[int]) -> None:
    while not stop.is_set():
        started = time.monotonic()
        with urllib.request.urlopen(url, timeout=5) as response:
            response.read()
        counts.append(1)
        stop.wait(max(0.0, every - (time.monotonic() - started)))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--refresh", type=float, default=1.0)
    args = p.parse_args()
    os.sched_setaffinity(0, {1})  # this process reloads the page: keep it off the server's CPU
    tmp = Path(tempfile.mkdtemp(prefix="meshdns-status-bench-"))
    sizes = zonemod.Sizes()
    catalog = tmp / "catalog.json"
    zonemod.write_meshdns_catalog(zonemod.build_zone(sizes), catalog)
    queries = tmp / "hot.txt"
    zonemod.write_queries(zonemod.hot_queries(sizes, 100_000, random.Random(42)), queries)
    port, admin = srv.free_port(), srv.free_port()
    config = tmp / "meshdns.json"
    config.write_text(json.dumps({"datacenter": zonemod.DC,
                                  "admin": {"listen": f"127.0.0.1:{admin}"}}))
    server = subprocess.Popen(
        ["taskset", "-c", "0", *srv.meshdns_command(), "serve", "--config", str(config),
         "--catalog", str(catalog), "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{admin}/?name=svc-1.service.consul&type=A"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("meshdns did not start") from None
                time.sleep(0.2)
        dnsperf(port, queries, 2)  # warm the response cache
        # the page's own cost, free of the machine's noise: server CPU per load, server idle
        loads = 40
        before = srv.cpu_seconds(server.pid)
        for _ in range(loads):
            urllib.request.urlopen(url, timeout=5).read()
        per_load = (srv.cpu_seconds(server.pid) - before) / loads
        print(f"server CPU per page load: {per_load * 1000:.2f} ms (over {loads} loads), i.e. "
              f"{per_load / args.refresh * 100:.2f}% of one core at one load every "
              f"{args.refresh:g} s", flush=True)
        results: dict[str, list[float]] = {"off": [], "on": []}
        fetched = 0
        for _ in range(args.repeats):
            for mode in ("off", "on"):
                stop = threading.Event()
                counts: list[int] = []
                reloader = threading.Thread(target=reload_page,
                                            args=(url, args.refresh, stop, counts))
                if mode == "on":
                    reloader.start()
                qps = dnsperf(port, queries, args.seconds)
                stop.set()
                if mode == "on":
                    reloader.join()
                    fetched += len(counts)
                results[mode].append(qps)
                print(f"{mode:>3}: {qps:,.0f} qps", flush=True)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(10)
    off, on = statistics.median(results["off"]), statistics.median(results["on"])
    spread = {k: (max(v) - min(v)) / statistics.median(v) * 100 for k, v in results.items()}
    print(f"page closed: median {off:,.0f} qps (spread {spread['off']:.1f}%); "
          f"page reloaded every {args.refresh:g} s ({fetched} loads): median {on:,.0f} qps "
          f"(spread {spread['on']:.1f}%); difference {(on / off - 1) * 100:+.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
