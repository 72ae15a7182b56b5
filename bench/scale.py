"""Catalog scale: load, RSS, reload under traffic, and how fast a catalog change is answered.

    python3 bench/scale.py [--services 100000] [--instances 3] [--rate 2000] [--changes 100]

1. Writes a JSON catalog of N services x M instances (3,000 nodes).
2. Starts ``meshdns serve`` on it (pinned to CPU 0) and times spawn -> first answer; reads RSS.
3. Sends queries at a fixed rate from CPU 1 while the catalog file is rewritten (one service
   moved to a new address): reports the reload time from meshdns's log, queries lost, and
   latency p50/p99/max over the reload window vs. before it.
4. On the example-sized catalog: rewrites the file ``--changes`` times with a new address and
   polls until the answer changes; reports the median and p90 change -> answered time.
Everything is on 127.0.0.1 and bounded in time; every server started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from servers import project_python  # noqa: E402 - the checkout's .venv, as run.py uses


def query_packet(ident: int, name: str, qtype: int = 1) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH",
                                                                                     qtype, 1)


def answer_ips(reply: bytes) -> list[str]:
    """A records of a reply (enough of a parser for this benchmark's own questions)."""
    count = struct.unpack_from("!H", reply, 6)[0]
    pos = 12
    while reply[pos]:
        pos += reply[pos] + 1
    pos += 5
    out = []
    for _ in range(count):
        pos += 2 if reply[pos] & 0xC0 == 0xC0 else 0  # owner: always the pointer here
        rtype, _, _, rdlen = struct.unpack_from("!HHIH", reply, pos)
        pos += 10
        if rtype == 1:
            out.append(socket.inet_ntoa(reply[pos:pos + 4]))
        pos += rdlen
    return out


def write_catalog(path: Path, services: int, instances: int, moved: str | None = None,
                  node_count: int = 3000, tags: int = 1) -> None:
    nodes = [{"name": f"node-{i}", "address": f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}",
              "meta": {"rack": f"r{i % 10}"}} for i in range(node_count)]
    entries = []
    for s in range(services):
        for k in range(instances):
            entry = {"name": f"svc-{s}", "id": f"svc-{s}-{k}",
                     "node": f"node-{(s * 3 + k) % node_count}",
                     "port": 8000 + k}
            if tags:  # one tag an instance by default: the shape issue 12 measures
                entry["tags"] = [f"t{(s + k + j) % 50}" for j in range(tags)]
            if s == 0 and k == 0 and moved:
                entry["address"] = moved
            entries.append(entry)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"nodes": nodes, "services": entries}))
    os.replace(tmp, path)  # atomic, as a ConfigMap update or a careful deploy does


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Server:
    def __init__(self, catalog: Path, workdir: Path, cpu: str) -> None:
        self.log_path = workdir / f"meshdns-{time.monotonic_ns()}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115
        config = workdir / "scale-config.yaml"  # catalogs past the default catalog.max_size
        config.write_text("catalog: {max_size: 1GiB}\n")
        cmd = ["taskset", "-c", cpu, project_python(), "-m", "meshdns", "serve", "--config",
               str(config), "--catalog", str(catalog), "--listen", "127.0.0.1:0", "--admin", "off"]
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.port = 0
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not self.port:
            m = re.search(r"serving DNS on 127\.0\.0\.1:(\d+)", self.log_path.read_text())
            if m:
                self.port = int(m.group(1))
            elif self.proc.poll() is not None:
                raise SystemExit(f"meshdns exited:\n{self.log_path.read_text()}")
            else:
                time.sleep(0.01)

    def ask(self, name: str, timeout: float = 1.0) -> bytes | None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(query_packet(0x4242, name), ("127.0.0.1", self.port))
            try:
                return s.recv(4096)
            except TimeoutError:
                return None

    def reload_times_ms(self) -> list[float]:
        return [float(x) for x in re.findall(r"catalog reloaded .* in (\d+) ms",
                                             self.log_path.read_text())]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def probe(port: int, names: list[str], rate: float, seconds: float,
                on_tick=None) -> list[tuple[float, float | None]]:
    """Send at a fixed rate; (send time, latency or None) per query."""
    loop = asyncio.get_running_loop()
    sent: dict[int, float] = {}
    results: dict[int, float] = {}

    class Client(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: tuple) -> None:
            ident = struct.unpack_from("!H", data)[0]
            if ident in sent and ident not in results:
                results[ident] = time.perf_counter() - sent[ident]

    transport, _ = await loop.create_datagram_endpoint(Client,
                                                       remote_addr=("127.0.0.1", port))
    start = time.perf_counter()
    order: list[tuple[int, float]] = []
    i = 0
    while (now := time.perf_counter()) - start < seconds:
        due = int((now - start) * rate)
        while i < due:
            ident = i % 65536
            if ident in sent:  # the ID wrapped: forget the old one
                del sent[ident]
                results.pop(ident, None)
            sent[ident] = time.perf_counter()
            order.append((ident, sent[ident] - start))
            transport.sendto(query_packet(ident, names[i % len(names)]))
            i += 1
        if on_tick:
            on_tick(now - start)
        await asyncio.sleep(0.0005)
    await asyncio.sleep(1.0)  # late replies
    transport.close()
    return [(t, results.get(ident)) for ident, t in order]


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def scale(args: argparse.Namespace, workdir: Path) -> dict:
    catalog = workdir / "big.json"
    t = time.perf_counter()
    write_catalog(catalog, args.services, args.instances, tags=args.tags)
    size_mb = catalog.stat().st_size / 1e6
    print(f"catalog: {args.services:,} services x {args.instances} instances, {size_mb:.1f} MB "
          f"(written in {time.perf_counter() - t:.1f} s)")
    server = Server(catalog, workdir, args.server_cpu)
    try:
        while server.ask("svc-1.service.consul", 0.2) is None:
            time.sleep(0.01)
        serving_s = time.perf_counter() - server.started
        rss = rss_mb(server.proc.pid)
        print(f"loaded and serving: {serving_s:.2f} s after spawn; RSS {rss:.0f} MB")
        names = [f"svc-{i * 7919 % args.services}.service.consul" for i in range(2000)]
        rewrite_at = 2.0
        state = {"rewritten": None}
        # written beforehand: serializing 22 MB here would stall this (Python) prober itself
        staged = workdir / "big-next.json"
        write_catalog(staged, args.services, args.instances, "10.99.0.1", tags=args.tags)
        peak = {"rss": 0.0}

        def tick(elapsed: float) -> None:
            if state["rewritten"] is None and elapsed >= rewrite_at:
                state["rewritten"] = elapsed
                os.replace(staged, catalog)  # atomic, as a deploy or a ConfigMap update does
            if state["rewritten"] is not None:  # RSS while both snapshots may exist
                peak["rss"] = max(peak["rss"], rss_mb(server.proc.pid))

        seconds = rewrite_at + args.reload_window
        samples = asyncio.run(probe(server.port, names, args.rate, seconds, tick))
        reloads = server.reload_times_ms()
        moved = answer_ips(server.ask("svc-0.service.consul") or b"\0" * 12)
        rss_after = rss_mb(server.proc.pid)
    finally:
        server.stop()
    before = [lat * 1000 for t, lat in samples if t < rewrite_at and lat is not None]
    during = [lat * 1000 for t, lat in samples if t >= rewrite_at and lat is not None]
    lost = sum(1 for _, lat in samples if lat is None)
    result = {
        "services": args.services, "instances": args.services * args.instances,
        "catalog_mb": round(size_mb, 1), "serving_s": round(serving_s, 2),
        "rss_mb": round(rss), "rss_after_reload_mb": round(rss_after),
        "rss_peak_reload_mb": round(peak["rss"]),
        "reload_rss_ratio": round(peak["rss"] / rss, 2) if rss else None,
        "reload_ms": reloads, "queries": len(samples), "lost": lost,
        "p50_before_ms": round(percentile(before, 50), 3),
        "p99_before_ms": round(percentile(before, 99), 3),
        "p50_during_ms": round(percentile(during, 50), 3),
        "p99_during_ms": round(percentile(during, 99), 3),
        "max_during_ms": round(max(during, default=float("nan")), 3),
        "reload_visible": "10.99.0.1" in moved,
    }
    print(f"reload under {args.rate:.0f} q/s: reload took {reloads} ms; {lost} of {len(samples)} "
          f"queries lost; p50/p99 before {result['p50_before_ms']}/{result['p99_before_ms']} ms, "
          f"during {result['p50_during_ms']}/{result['p99_during_ms']} ms "
          f"(max {result['max_during_ms']} ms); new answer served: {result['reload_visible']}; "
          f"RSS after reload {rss_after:.0f} MB; peak during reload {peak['rss']:.0f} MB "
          f"({result['reload_rss_ratio']}x the steady {rss:.0f} MB)")
    return result


def change_latency(args: argparse.Namespace, workdir: Path) -> dict:
    catalog = workdir / "small.json"
    # the size of the example catalog's world, a few times over: 60 nodes, 200 instances
    write_catalog(catalog, 100, 2, "10.200.0.0", node_count=60)
    server = Server(catalog, workdir, args.server_cpu)
    times = []
    try:
        for n in range(1, args.changes + 1):
            ip = f"10.200.{n // 256}.{n % 256}"
            time.sleep(0.03)  # let mtimes differ and the watcher settle
            start = time.perf_counter()
            write_catalog(catalog, 100, 2, ip, node_count=60)
            deadline = start + 5
            while time.perf_counter() < deadline:
                reply = server.ask("svc-0.service.consul", 0.5)
                if reply and ip in answer_ips(reply):
                    times.append((time.perf_counter() - start) * 1000)
                    break
                time.sleep(0.001)
    finally:
        server.stop()
    result = {"changes": args.changes, "answered": len(times),
              "median_ms": round(statistics.median(times), 1) if times else None,
              "p90_ms": round(percentile(times, 90), 1) if times else None,
              "max_ms": round(max(times), 1) if times else None}
    print(f"catalog change -> new answer: median {result['median_ms']} ms, p90 "
          f"{result['p90_ms']} ms, max {result['max_ms']} ms over {len(times)}/{args.changes}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=100_000)
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--tags", type=int, default=1, help="tags per instance")
    parser.add_argument("--rate", type=float, default=2000.0, help="queries/s during reload")
    parser.add_argument("--reload-window", type=float, default=8.0,
                        help="seconds of traffic after the rewrite")
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--server-cpu", default="0")
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--skip-scale", action="store_true")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.client_cpu})  # the prober off the server's core
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="meshdns-scale-") as tmp:
        workdir = Path(tmp)
        if not args.skip_scale:
            out["scale"] = scale(args, workdir)
        out["change"] = change_latency(args, workdir)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    (results / "scale.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
