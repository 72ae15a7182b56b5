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
import resource
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
from servers import (  # noqa: E402
    _status_kb,
    cpu_seconds,
    meshdns_command,
    process_tree,
    project_python,
    system_busy_seconds,
)

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


class Shape:
    """The catalog: ``services`` services of ``instances`` instances on ``nodes`` nodes, the
    nodes alternating over ``partitions``. One instance a service (the default): its own
    address, id = name, node ``i % nodes``. More (issue 12's shape, as bench/scale.py writes
    it): id ``svc-i-k`` on node ``(3i + k) % nodes``, the node's address, port 8000 + k."""

    def __init__(self, services: int, instances: int = 1, nodes: int | None = None,
                 tags: int = 0, partitions: int = 2) -> None:
        self.services = services
        self.instances = instances
        self.nodes = nodes or max(1, services // 10)
        self.tags = tags
        self.partitions = PARTITIONS[:partitions]

    def node_partition(self, n: int) -> str:
        return self.partitions[n % len(self.partitions)]

    def placements(self, i: int) -> list[tuple[str, int]]:
        """(service id, node number) of each instance of service ``i``."""
        if self.instances == 1:
            return [(service_name(i), i % self.nodes)]
        return [(f"{service_name(i)}-{k}", (3 * i + k) % self.nodes)
                for k in range(self.instances)]

    def partition_of(self, i: int) -> str:
        return self.node_partition(self.placements(i)[0][1])


def populate(fake: RemoteFake, shape: Shape, peer_services: int, chunk: int = 2000) -> None:
    """Register ``shape``'s catalog, and ``peer_services`` imported from one peer."""
    if "part-2" in shape.partitions:
        fake.add_partition("part-2")
    if peer_services:
        fake.add_peer(PEER, remote_datacenter="dc-remote")
    calls: list[list[Any]] = []
    for n in range(shape.nodes):
        calls.append(["register_node", [f"node-{n}", f"10.{n >> 16 & 255}.{n >> 8 & 255}."
                                        f"{n & 255}"], {"partition": shape.node_partition(n)}])
    for i in range(shape.services):
        for k, (sid, n) in enumerate(shape.placements(i)):
            kw: dict[str, Any] = {"id": sid, "partition": shape.node_partition(n)}
            if shape.instances == 1:
                kw.update(address=f"10.{128 + (i >> 16 & 63)}.{i >> 8 & 255}.{i & 255}",
                          port=8080)
            else:
                kw["port"] = 8000 + k
            if shape.tags:
                kw["tags"] = [f"t{(i + k + j) % 50}" for j in range(shape.tags)]
            calls.append(["register_service", [service_name(i), f"node-{n}"], kw])
    peer_nodes = max(1, peer_services // 10)
    for n in range(peer_nodes):
        calls.append(["register_node", [f"peer-node-{n}", f"10.250.{n >> 8 & 255}.{n & 255}"],
                      {"peer": PEER, "serf": False}])
    for i in range(peer_services):
        calls.append(["register_service", [f"imported-{i}", f"peer-node-{i % peer_nodes}"],
                      {"peer": PEER, "port": 8080}])
    for start in range(0, len(calls), chunk):
        fake.batch(calls[start:start + chunk])


def default_partition_services(shape: Shape) -> list[int]:
    """Services whose nodes are in the default partition (plain ``svc-N.service.consul``)."""
    return [i for i in range(shape.services) if shape.partition_of(i) == "default"]


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


def start_meshdns(workdir: Path, fake_url: str, max_requests: int, partitions: list[str]
                  ) -> tuple[subprocess.Popen[bytes], int, int, float]:
    config = {"catalog": {"consul": {"address": fake_url, "partitions": partitions,
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


def change_latencies(fake: RemoteFake, asker: Asker, shape: Shape, candidates: list[int],
                     changes: int, timeout: float) -> list[float]:
    """Turn ``changes`` services critical one by one (every instance, in one batch); seconds
    until each answers NXDOMAIN."""
    out = []
    for i in random.sample(candidates, changes):
        name = f"{service_name(i)}.service.consul"
        if asker.rcode(name) != "NOERROR":
            raise RuntimeError(f"{name} does not answer before its change")
        calls = [["set_service_health", [sid, f"node-{n}", "critical"], {}]
                 for sid, n in shape.placements(i)]
        t0 = time.monotonic()
        fake.batch(calls)
        wait_for(lambda name=name: asker.rcode(name) == "NXDOMAIN", timeout,
                 f"{name} after its change", interval=0.001)
        out.append(time.monotonic() - t0)
        time.sleep(0.02)
    return out


def imported_latencies(fake: RemoteFake, asker: Asker, peer_services: int, changes: int,
                       timeout: float) -> list[float]:
    """Imported services (one instance each) asked first, so each has its own watch (Consul's
    /v1/health/state has no peer parameter), then turned critical one by one: seconds until
    each answers NXDOMAIN."""
    picks = random.sample(range(peer_services), min(changes, peer_services))
    names = {i: f"imported-{i}.service.{PEER}.peer.consul" for i in picks}
    for name in names.values():
        if asker.rcode(name) != "NOERROR":
            raise RuntimeError(f"{name} does not answer before its change")
    time.sleep(2.5)  # the asked services get their watches within a second
    peer_nodes = max(1, peer_services // 10)
    out = []
    for i in picks:
        t0 = time.monotonic()
        fake.batch([["set_service_health", [f"imported-{i}", f"peer-node-{i % peer_nodes}",
                                            "critical"], {"peer": PEER}]])
        wait_for(lambda name=names[i]: asker.rcode(name) == "NXDOMAIN", timeout,
                 f"{names[i]} after its change", interval=0.001)
        out.append(time.monotonic() - t0)
        time.sleep(0.02)
    return out


def churn_calls(shape: Shape, candidates: list[int], count: int) -> list[list[Any]]:
    """Health flips of one instance (passing <-> warning: answers unchanged, the fetch still
    happens)."""
    picks = random.sample(candidates, min(count, len(candidates)))
    out = []
    for status in ("warning", "passing"):
        for i in picks:
            sid, n = shape.placements(i)[0]
            out.append(["set_service_health", [sid, f"node-{n}", status], {}])
    return out


class CpuMeter:
    """CPU time (user + system) of meshdns, the fake and reaped children (dnsperf) over a
    pass, and of the whole machine, as cores (seconds of CPU a second)."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.t0 = time.monotonic()
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        out = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["dnsperf"] = ru.ru_utime + ru.ru_stime  # the only children reaped meanwhile
        out["machine"] = system_busy_seconds()
        return out

    def cores(self) -> dict[str, float]:
        end = self._read()
        wall = time.monotonic() - self.t0
        out = {k: round((end[k] - self.start[k]) / wall, 2) for k in end}
        out["others"] = round(out["machine"] - sum(v for k, v in out.items()
                                                   if k != "machine"), 2)
        return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=1, help="instances a service")
    parser.add_argument("--nodes", type=int, default=0, help="nodes (0: services / 10)")
    parser.add_argument("--tags", type=int, default=0, help="tags an instance")
    parser.add_argument("--partitions", type=int, choices=(1, 2), default=2)
    parser.add_argument("--peer-services", type=int, default=1_000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--churn", type=float, default=10.0, help="changes/s in the qps pass")
    parser.add_argument("--seconds", type=float, default=10.0, help="each qps pass")
    parser.add_argument("--max-requests", type=int, default=64)
    parser.add_argument("--change-timeout", type=float, default=30.0)
    parser.add_argument("--consul-latency", type=float, default=0.0, metavar="MS",
                        help="added to each /v1/health/service reply until ready (a Consul "
                        "across a network: then requests in flight bound time to ready)")
    parser.add_argument("--startup-only", action="store_true",
                        help="stop after time to ready and RSS (the catalog-scale figures)")
    parser.add_argument("--load", choices=["auto", "dnsperf", "python"], default="auto")
    parser.add_argument("--json", type=Path, default=BENCH / "results" / "consul.json")
    args = parser.parse_args(argv)
    shape = Shape(args.services, args.instances, args.nodes or None, args.tags,
                  args.partitions)
    load = args.load if args.load != "auto" else ("dnsperf" if shutil.which("dnsperf")
                                                  else "python")
    workdir = Path(tempfile.mkdtemp(prefix="meshdns-bench-consul-"))
    fake_proc = meshdns = None
    result: dict[str, Any] = {"services": args.services, "instances": args.instances,
                              "nodes": shape.nodes, "tags": args.tags,
                              "peer_services": args.peer_services,
                              "partitions": list(shape.partitions),
                              "max_requests": args.max_requests,
                              "loadavg_start": os.getloadavg()[0]}
    targets: list[tuple[str, bool]] = []
    try:
        fake_proc, fake = start_fake(workdir)
        t0 = time.monotonic()
        populate(fake, shape, args.peer_services)
        result["catalog_load_s"] = round(time.monotonic() - t0, 2)
        fake.reset_log()
        slow = None
        if args.consul_latency:
            slow = fake.add_fault(r"^/v1/health/service/", "delay",
                                  delay=args.consul_latency / 1000)
            result["consul_latency_ms"] = args.consul_latency
        fake_cpu = cpu_seconds(fake_proc.pid)
        meshdns, port, _admin, ready_s = start_meshdns(workdir, fake.url, args.max_requests,
                                                      list(shape.partitions))
        result["time_to_ready_s"] = round(ready_s, 2)
        # CPU seconds each side spent from meshdns's start to ready (what bounds ready)
        result["startup_cpu_s"] = {"meshdns": round(cpu_seconds(meshdns.pid), 2),
                                   "fake": round(cpu_seconds(fake_proc.pid) - fake_cpu, 2)}
        result["rss_mb"] = round(rss_mb(meshdns.pid), 1)
        if slow is not None:
            fake.clear_faults(slow)
        startup = fake.stats()
        result["startup_requests"] = startup["requests"]
        result["startup_mb"] = round(startup["bytes"] / 1e6, 1)
        result["startup_max_concurrent"] = startup["max_in_flight"]
        candidates = default_partition_services(shape)
        asker = Asker(port)
        # a first check that the catalog is all there
        checks = [f"{service_name(candidates[-1])}.service.consul"]
        if "part-2" in shape.partitions:
            other = next(i for i in range(shape.services) if shape.partition_of(i) != "default")
            checks.append(f"{service_name(other)}.service.part-2.ap.consul")
        if args.peer_services:
            checks.append(f"imported-{args.peer_services - 1}.service.{PEER}.peer.consul")
        for name in checks:
            if asker.rcode(name) != "NOERROR":
                raise RuntimeError(f"{name} does not answer NOERROR once ready")
        result["max_concurrent_requests"] = startup["max_in_flight"]
        targets.append(("concurrent requests <= max_requests",
                        result["max_concurrent_requests"] <= args.max_requests))
        if args.startup_only:
            asker.close()
            return _report(args, result, targets, workdir)
        fake.reset_log()
        lat = change_latencies(fake, asker, shape, candidates,
                               min(args.changes, len(candidates)), args.change_timeout)
        changed = fake.stats()
        result["change_to_answer_ms"] = {"median": round(statistics.median(lat) * 1000, 1),
                                         "p99": round(percentile(lat, 99) * 1000, 1),
                                         "max": round(max(lat) * 1000, 1), "n": len(lat)}
        result["requests_per_change"] = round(changed["requests"] / len(lat), 1)
        result["kb_per_change"] = round(changed["bytes"] / len(lat) / 1024, 1)
        if args.peer_services:
            lat = imported_latencies(fake, asker, args.peer_services, 20, args.change_timeout)
            result["imported_change_to_answer_ms"] = {
                "median": round(statistics.median(lat) * 1000, 1),
                "p99": round(percentile(lat, 99) * 1000, 1), "n": len(lat)}
        names = [f"{service_name(i)}.service.consul" for i in candidates[:1000]]
        pids = {"meshdns": meshdns.pid, "fake": fake_proc.pid}

        def qps_pass() -> tuple[float, dict[str, float]]:
            meter = CpuMeter(pids)
            if load == "dnsperf":
                qps = dnsperf_load(port, names, args.seconds, workdir)
            else:
                qps = python_load(port, names, args.seconds)
            return qps, meter.cores()

        # CPU a change costs each side, with no DNS load (the figure that does not depend on
        # what else shares the machine): churn alone for the same time
        meter = CpuMeter(pids)
        fake.start_churn(churn_calls(shape, candidates, 500), args.churn, args.seconds)
        time.sleep(args.seconds + 0.5)
        alone = meter.cores()
        n = max(1, fake.churn_count())
        result["cpu_ms_per_change"] = {
            k: round(alone[k] * (args.seconds + 0.5) / n * 1000, 2) for k in ("meshdns", "fake")}
        qps_quiet, cpu_quiet = qps_pass()
        fake.reset_log()
        fake.start_churn(churn_calls(shape, candidates, 500), args.churn, args.seconds + 1)
        qps_churn, cpu_churn = qps_pass()
        done = [fake.churn_count()]
        churned = fake.stats()
        result["qps"] = {"tool": load, "no_churn": round(qps_quiet),
                         "churn": round(qps_churn), "churn_changes": done[0],
                         "churn_rate_achieved": round(done[0] / args.seconds, 1),
                         "ratio": round(qps_churn / qps_quiet, 3) if qps_quiet else None,
                         "churn_kb_per_change": round(churned["bytes"] / max(1, done[0])
                                                      / 1024, 1),
                         "churn_requests_per_change": round(churned["requests"] /
                                                            max(1, done[0]), 1)}
        # cores (CPU seconds a second) of each process during each pass: on 2 shared cores
        # this says who took the CPU the DNS path lost under churn
        result["cpu_cores"] = {"no_churn": cpu_quiet, "churn": cpu_churn}
        result["max_concurrent_requests"] = max(startup["max_in_flight"],
                                                changed["max_in_flight"],
                                                churned["max_in_flight"])
        result["rss_mb_end"] = round(rss_mb(meshdns.pid), 1)
        asker.close()
        targets = [
            ("concurrent requests <= max_requests",
             result["max_concurrent_requests"] <= args.max_requests),
            ("p99 change-to-answer < 1 s", result["change_to_answer_ms"]["p99"] < 1000),
            ("qps under churn >= 80% of quiet", (result["qps"]["ratio"] or 0) >= 0.8),
        ]
        return _report(args, result, targets, workdir)
    finally:
        stop(meshdns)
        stop(fake_proc)


def _report(args: argparse.Namespace, result: dict[str, Any], targets: list[tuple[str, bool]],
            workdir: Path) -> int:
    result["loadavg_end"] = os.getloadavg()[0]
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    for what, ok in targets:
        print(f"{'ok  ' if ok else 'MISS'} {what}")
    print(f"logs and config in {workdir}")
    return 0 if all(ok for _, ok in targets) else 1


if __name__ == "__main__":
    sys.exit(main())
