"""bench/consul.py: meshdns following a (fake) Consul cluster of 10,000 services.

Starts ``tests/fake_consul.py`` as its own process with a catalog of ``--services`` services in
two admin partitions and one cluster peer importing ``--peer-services`` more, starts ``meshdns
serve`` in Consul mode against it, and reports:

- time to first ready (process start to ``/ready`` 200) and RSS once ready;
- change-to-answer latency over ``--changes`` changes (a service's only instance turns
  critical; the time until its name answers NXDOMAIN over UDP), median and p99;
- the most concurrent HTTP requests the fake saw, and requests and response bytes per change;
- hot-path qps (``dnsperf`` when installed, else a Python UDP load) with ``--churn`` changes/s
  against none.

Everything is on 127.0.0.1, every phase has a time limit, and both processes are stopped by
PID (SIGTERM, then SIGKILL) whatever happens. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT / "tests"))
from fake_consul import RemoteFake  # noqa: E402
from servers import _status_kb, meshdns_command, process_tree, project_python  # noqa: E402

PEER = "cluster-02"
PARTITIONS = ("default", "part-2")


def stop(proc: subprocess.Popen[Any] | None) -> None:
    """SIGTERM the process by PID, SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what}: not within {timeout:.0f}s")


# --- the catalog -------------------------------------------------------------------------------


def service_name(i: int) -> str:
    return f"svc-{i}"


def populate(fake: RemoteFake, services: int, peer_services: int, chunk: int = 2000) -> None:
    """``services`` services (one instance each, own address) split over two partitions on
    one node per 10 services; ``peer_services`` imported from one peer."""
    fake.add_partition("part-2")
    fake.add_peer(PEER, remote_datacenter="dc-remote")
    calls: list[list[Any]] = []
    nodes = max(1, services // 10)
    for n in range(nodes):
        ap = PARTITIONS[n % 2]
        calls.append(["register_node", [f"node-{n}", f"10.{n >> 16 & 255}.{n >> 8 & 255}."
                                        f"{n & 255}"], {"partition": ap}])
    for i in range(services):
        n = i % nodes
        calls.append(["register_service", [service_name(i), f"node-{n}"],
                      {"address": f"10.{128 + (i >> 16 & 63)}.{i >> 8 & 255}.{i & 255}",
                       "port": 8080, "partition": PARTITIONS[n % 2]}])
    peer_nodes = max(1, peer_services // 10)
    for n in range(peer_nodes):
        calls.append(["register_node", [f"peer-node-{n}", f"10.250.{n >> 8 & 255}.{n & 255}"],
                      {"peer": PEER, "serf": False}])
    for i in range(peer_services):
        calls.append(["register_service", [f"imported-{i}", f"peer-node-{i % peer_nodes}"],
                      {"peer": PEER, "port": 8080}])
    for start in range(0, len(calls), chunk):
        fake.batch(calls[start:start + chunk])


def default_partition_services(services: int) -> list[int]:
    """Services whose node is in the default partition (plain ``svc-N.service.consul``)."""
    nodes = max(1, services // 10)
    return [i for i in range(services) if (i % nodes) % 2 == 0]


# --- DNS ---------------------------------------------------------------------------------------


class Asker:
    """One UDP socket asking one question at a time (for latency polling)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(1.0)

    def rcode(self, name: str) -> str:
        q = dns.message.make_query(name, "A")
        self.sock.send(q.to_wire())
        while True:
            try:
                reply = dns.message.from_wire(self.sock.recv(4096))
            except TimeoutError:
                return "TIMEOUT"
            if reply.id == q.id:
                return dns.rcode.to_text(reply.rcode())

    def close(self) -> None:
        self.sock.close()


def python_load(port: int, names: list[str], seconds: float, window: int = 64) -> float:
    """Replies per second from a simple UDP client keeping ``window`` queries outstanding."""
    wires = [dns.message.make_query(n, "A").to_wire() for n in names]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    sock.settimeout(0.5)
    answered = 0
    outstanding = 0
    i = 0
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            while outstanding < window:
                sock.send(wires[i % len(wires)])
                i += 1
                outstanding += 1
            try:
                sock.recv(4096)
                answered += 1
                outstanding -= 1
            except TimeoutError:
                outstanding = 0  # lost ones: start a new window
    finally:
        sock.close()
    return answered / seconds


def dnsperf_load(port: int, names: list[str], seconds: float, workdir: Path) -> float:
    qfile = workdir / "queries.txt"
    qfile.write_text("".join(f"{n} A\n" for n in names))
    done = subprocess.run(["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile),
                           "-l", str(seconds), "-c", "4", "-q", "100", "-t", "2"],
                          capture_output=True, text=True, timeout=seconds + 30, check=False)
    m = re.search(r"Queries per second:\s+([\d.]+)", done.stdout)
    if done.returncode != 0 or not m:
        raise RuntimeError(f"dnsperf failed: {done.stdout[-400:]} {done.stderr[-400:]}")
    return float(m.group(1))


# --- the run -----------------------------------------------------------------------------------


def start_fake(workdir: Path) -> tuple[subprocess.Popen[str], RemoteFake]:
    proc = subprocess.Popen([project_python(), str(ROOT / "tests" / "fake_consul.py"),
                             "--unix", str(workdir / "consul.sock")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.search(r"(http://127\.0\.0\.1:\d+)", line)
    if not m:
        stop(proc)
        raise RuntimeError(f"the fake did not start: {line}")
    # keep reading its output so a full pipe never blocks it
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, RemoteFake(m.group(1))


def start_meshdns(workdir: Path, fake_url: str, max_requests: int
                  ) -> tuple[subprocess.Popen[bytes], int, int, float]:
    config = {"catalog": {"consul": {"address": fake_url, "partitions": list(PARTITIONS),
                                     "max_requests": max_requests}},
              "log_level": "info"}
    (workdir / "config.json").write_text(json.dumps(config))
    log = open(workdir / "meshdns.log", "w+b")  # noqa: SIM115 - lives as long as the process
    t0 = time.monotonic()
    proc = subprocess.Popen([*meshdns_command(), "serve", "--config",
                             str(workdir / "config.json"), "--listen", "127.0.0.1:0",
                             "--admin", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)

    def ports() -> tuple[int, int] | None:
        text = (workdir / "meshdns.log").read_text(errors="replace")
        dns_port = re.search(r"serving DNS on 127\.0\.0\.1:(\d+)", text)
        admin = re.search(r"admin endpoint on http://127\.0\.0\.1:(\d+)", text)
        if proc.poll() is not None:
            raise RuntimeError(f"meshdns exited {proc.returncode}: {text[-800:]}")
        return (int(dns_port.group(1)), int(admin.group(1))) if dns_port and admin else None

    try:
        port, admin = wait_for(ports, 60, "meshdns listening")

        def ready() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=2) as r:
                    return r.status == 200
            except OSError:
                return False

        wait_for(ready, 600, "meshdns ready", interval=0.02)
    except BaseException:
        stop(proc)
        raise
    return proc, port, admin, time.monotonic() - t0


def rss_mb(pid: int) -> float:
    return sum(_status_kb(p, "VmRSS") for p in process_tree(pid)) / 1024


def change_latencies(fake: RemoteFake, asker: Asker, candidates: list[int], changes: int,
                     timeout: float) -> list[float]:
    """Turn ``changes`` services critical one by one; seconds until each answers NXDOMAIN."""
    out = []
    for i in random.sample(candidates, changes):
        name = f"{service_name(i)}.service.consul"
        if asker.rcode(name) != "NOERROR":
            raise RuntimeError(f"{name} does not answer before its change")
        node = f"node-{i % NODES[0]}"
        t0 = time.monotonic()
        fake.set_service_health(service_name(i), node, "critical")
        wait_for(lambda name=name: asker.rcode(name) == "NXDOMAIN", timeout,
                 f"{name} after its change", interval=0.001)
        out.append(time.monotonic() - t0)
        time.sleep(0.02)
    return out


NODES = [1]  # node count of the populated catalog (set in main)


def churn_calls(candidates: list[int], count: int) -> list[list[Any]]:
    """Health flips (passing <-> warning: answers unchanged, the fetch still happens)."""
    picks = random.sample(candidates, min(count, len(candidates)))
    return [["set_service_health", [service_name(i), f"node-{i % NODES[0]}", status], {}]
            for status in ("warning", "passing") for i in picks]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--peer-services", type=int, default=1_000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--churn", type=float, default=10.0, help="changes/s in the qps pass")
    parser.add_argument("--seconds", type=float, default=10.0, help="each qps pass")
    parser.add_argument("--max-requests", type=int, default=64)
    parser.add_argument("--change-timeout", type=float, default=30.0)
    parser.add_argument("--load", choices=["auto", "dnsperf", "python"], default="auto")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "consul.json")
    args = parser.parse_args(argv)
    NODES[0] = max(1, args.services // 10)
    load = args.load if args.load != "auto" else ("dnsperf" if shutil.which("dnsperf")
                                                  else "python")
    workdir = Path(tempfile.mkdtemp(prefix="meshdns-bench-consul-"))
    fake_proc = meshdns = None
    result: dict[str, Any] = {"services": args.services, "peer_services": args.peer_services,
                              "partitions": list(PARTITIONS), "max_requests": args.max_requests}
    try:
        fake_proc, fake = start_fake(workdir)
        t0 = time.monotonic()
        populate(fake, args.services, args.peer_services)
        result["catalog_load_s"] = round(time.monotonic() - t0, 2)
        fake.reset_log()
        meshdns, port, _admin, ready_s = start_meshdns(workdir, fake.url, args.max_requests)
        result["time_to_ready_s"] = round(ready_s, 2)
        result["rss_mb"] = round(rss_mb(meshdns.pid), 1)
        startup = fake.stats()
        result["startup_requests"] = startup["requests"]
        result["startup_mb"] = round(startup["bytes"] / 1e6, 1)
        candidates = default_partition_services(args.services)
        asker = Asker(port)
        # a first check that the catalog is all there
        for name in (f"{service_name(candidates[-1])}.service.consul",
                     f"{service_name(1 if args.services > 1 else 0)}.service.part-2.ap.consul",
                     f"imported-{args.peer_services - 1}.service.{PEER}.peer.consul"):
            if asker.rcode(name) != "NOERROR":
                raise RuntimeError(f"{name} does not answer NOERROR once ready")
        fake.reset_log()
        lat = change_latencies(fake, asker, candidates, min(args.changes, len(candidates)),
                               args.change_timeout)
        changed = fake.stats()
        result["change_to_answer_ms"] = {"median": round(statistics.median(lat) * 1000, 1),
                                         "p99": round(percentile(lat, 99) * 1000, 1),
                                         "max": round(max(lat) * 1000, 1), "n": len(lat)}
        result["requests_per_change"] = round(changed["requests"] / len(lat), 1)
        result["kb_per_change"] = round(changed["bytes"] / len(lat) / 1024, 1)
        names = [f"{service_name(i)}.service.consul" for i in candidates[:1000]]
        if load == "dnsperf":
            qps_quiet = dnsperf_load(port, names, args.seconds, workdir)
        else:
            qps_quiet = python_load(port, names, args.seconds)
        fake.start_churn(churn_calls(candidates, 500), args.churn, args.seconds + 1)
        if load == "dnsperf":
            qps_churn = dnsperf_load(port, names, args.seconds, workdir)
        else:
            qps_churn = python_load(port, names, args.seconds)
        done = [fake.churn_count()]
        result["qps"] = {"tool": load, "no_churn": round(qps_quiet),
                         "churn": round(qps_churn), "churn_changes": done[0],
                         "churn_rate_achieved": round(done[0] / args.seconds, 1),
                         "ratio": round(qps_churn / qps_quiet, 3) if qps_quiet else None}
        result["max_concurrent_requests"] = max(startup["max_in_flight"],
                                                changed["max_in_flight"],
                                                fake.stats()["max_in_flight"])
        result["rss_mb_end"] = round(rss_mb(meshdns.pid), 1)
        asker.close()
    finally:
        stop(meshdns)
        stop(fake_proc)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    targets = [
        ("concurrent requests <= max_requests",
         result["max_concurrent_requests"] <= args.max_requests),
        ("p99 change-to-answer < 1 s", result["change_to_answer_ms"]["p99"] < 1000),
        ("qps under churn >= 80% of quiet", (result["qps"]["ratio"] or 0) >= 0.8),
    ]
    for what, ok in targets:
        print(f"{'ok  ' if ok else 'MISS'} {what}")
    print(f"logs and config in {workdir}")
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
