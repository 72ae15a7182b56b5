"""meshdns vs unbound, NSD and dnsmasq (and a dnslib baseline): one command, one table.

    bash bench/run.sh [--quick] [--servers meshdns,unbound,nsd,dnsmasq,dnslib]
                         [--workloads hot,cold,large,large-edns,tcp] [--seconds 10] ...

See bench/README.md. Everything runs on 127.0.0.1: each server pinned to one CPU, dnsperf (and
the latency pass) pinned to the other, one server at a time, a fresh server process for each
workload. Writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers as srv
import zone as zonemod

BENCH_DIR = Path(__file__).resolve().parent
ALL_SERVERS = ["meshdns", "unbound", "nsd", "dnsmasq", "dnslib"]
PEERS = ("unbound", "nsd")  # the servers the targets compare meshdns with (unbound first)
ALL_WORKLOADS = ["hot", "a-only", "cold", "large", "large-edns", "tcp"]


@dataclass(frozen=True)
class Workload:
    name: str
    queries: str  # query file key
    zone: str  # "small" or "cold"
    dnsperf_args: tuple[str, ...] = ()
    once: bool = False  # one pass through the file: every query different
    tcp: bool = False
    edns: int = 0
    about: str = ""
    cpu_rate: int = 40_000  # offered q/s of the fixed-rate CPU pass (cold: 10,000)


WORKLOADS = {
    "hot": Workload(
        "hot",
        "hot",
        "small",
        about="40% svc A, 15% SRV, 20% virtual A, 20% node A, 5% NXDOMAIN; UDP",
    ),
    "a-only": Workload(
        "a-only",
        "a-only",
        "a-only",
        about="1,000 node A names + 5% NXDOMAIN, no SRV in the zone (dnsmasq's best case); UDP",
    ),
    "cold": Workload(
        "cold",
        "cold",
        "cold",
        ("-n", "1"),
        once=True,
        about="each of N distinct services asked once (A); UDP",
        cpu_rate=10_000,
    ),
    "large": Workload(
        "large", "large", "small", about="SRV of 20-instance services, no EDNS (512-byte UDP)"
    ),
    "large-edns": Workload(
        "large-edns",
        "large",
        "small",
        ("-e",),
        edns=4096,
        about="SRV of 20-instance services, EDNS0",
    ),
    "tcp": Workload(
        "tcp", "hot", "small", ("-m", "tcp"), tcp=True, about="the hot mix over TCP (4 connections)"
    ),
}


@dataclass
class Row:
    workload: str
    server: str
    error: str = ""
    qps: float | None = None
    sent: int | None = None
    completed: int | None = None
    lost: int | None = None
    mean_ms: float | None = None
    stddev_ms: float | None = None
    max_ms: float | None = None
    resp_bytes: int | None = None
    rcodes: dict[str, float] = field(default_factory=dict)
    server_cpu_pct: float | None = None
    client_cpu_pct: float | None = None
    qps_per_core: float | None = None  # qps / the share of a core the server got: steadier
    bg_cpu_pct: float | None = None  # CPU used by everything else on the machine meanwhile
    p99_bg_cpu_pct: float | None = None
    repeats: list[dict] = field(default_factory=list)
    rss_mb: float | None = None
    hwm_mb: float | None = None
    ready_s: float | None = None
    p99_ms: float | None = None
    p50_ms: float | None = None
    p99_mean_ms: float | None = None
    p99_rate: int | None = None
    p99_lost: int | None = None
    p99_tool: str = ""
    exit_code: int | None = None
    check_problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meshdns_qps_ratio: float | None = None
    meshdns_p99_ratio: float | None = None
    meshdns_qps_per_core_ratio: float | None = None
    # the fixed-rate pass: server CPU (user + system, /proc) per answered query
    cpu_us: float | None = None
    cpu_rate: int | None = None
    cpu_completed: int | None = None
    cpu_lost: int | None = None
    cpu_bg_pct: float | None = None
    cpu_repeats: list[float] = field(default_factory=list)
    meshdns_cpu_ratio: float | None = None


# --- dnsperf ------------------------------------------------------------------------------------

_STATS = {
    "sent": r"Queries sent:\s+(\d+)",
    "completed": r"Queries completed:\s+(\d+)",
    "lost": r"Queries lost:\s+(\d+)",
    "qps": r"Queries per second:\s+([\d.]+)",
    "mean_s": r"Average Latency \(s\):\s+([\d.]+)",
    "max_s": r"Average Latency \(s\):\s+[\d.]+ \(min [\d.]+, max ([\d.]+)\)",
    "stddev_s": r"Latency StdDev \(s\):\s+([\d.]+)",
    "resp_bytes": r"Average packet size:\s+request \d+, response (\d+)",
    "run_s": r"Run time \(s\):\s+([\d.]+)",
    "reconnections": r"Reconnections:\s+(\d+)",
}


def parse_dnsperf(text: str) -> dict:
    out: dict = {}
    for key, pattern in _STATS.items():
        match = re.search(pattern, text)
        if match:
            out[key] = float(match.group(1))
    match = re.search(r"Response codes:\s+(.*)", text)
    if match:
        out["rcodes"] = {
            code: float(pct) for code, pct in re.findall(r"(\w+) \d+ \(([\d.]+)%\)", match.group(1))
        }
    per_query = re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", text, re.MULTILINE)
    out["latencies"] = [float(m) for m in per_query]
    return out


def percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, round(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def dnsperf(
    args,
    port: int,
    qfile: Path,
    wl: Workload,
    seconds: float,
    out: Path,
    rate: int = 0,
    verbose: bool = False,
) -> dict:
    command = [
        "taskset",
        "-c",
        args.client_cpu,
        "dnsperf",
        "-s",
        "127.0.0.1",
        "-p",
        str(port),
        "-d",
        str(qfile),
        "-c",
        str(args.clients),
        "-q",
        str(args.outstanding),
        "-l",
        f"{seconds:g}",
        "-t",
        f"{args.query_timeout:g}",
        *wl.dnsperf_args,
    ]
    if rate:
        command += ["-Q", str(rate)]
    if verbose:
        command.append("-v")
    with open(out, "wb") as fh:
        fh.write((" ".join(command) + "\n").encode())
        fh.flush()
        done = subprocess.run(
            command,
            check=False,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=seconds + args.query_timeout + 60,
        )
    text = out.read_text(errors="replace")
    if done.returncode != 0:
        raise RuntimeError(f"dnsperf exited {done.returncode}: {text[-600:]}")
    stats = parse_dnsperf(text)
    if "qps" not in stats:
        raise RuntimeError(f"could not parse dnsperf output {out}")
    return stats


def latency_pass(
    args, running: srv.Running, qfile: Path, wl: Workload, rate: int, out: Path
) -> dict:
    """p50/p99/mean at a fixed rate: dnsperf -v (default) or bench/latency.py."""
    if args.p99_tool == "dnsperf":
        stats = dnsperf(
            args, running.port, qfile, wl, args.latency_seconds, out, rate=rate, verbose=True
        )
        lat = sorted(stats["latencies"])
        return {
            "p50_ms": _ms(percentile(lat, 50)),
            "p99_ms": _ms(percentile(lat, 99)),
            "mean_ms": _ms(sum(lat) / len(lat)) if lat else None,
            "lost": int(stats.get("lost", 0)),
        }
    command = [
        "taskset",
        "-c",
        args.client_cpu,
        sys.executable,
        str(BENCH_DIR / "latency.py"),
        "--server",
        f"127.0.0.1:{running.port}",
        "--file",
        str(qfile),
        "--rate",
        str(rate),
        "--seconds",
        f"{args.latency_seconds:g}",
        "--timeout",
        f"{args.query_timeout:g}",
    ]
    if wl.once:
        with open(qfile) as fh:
            command += ["--count", str(sum(1 for _ in fh))]
    if wl.tcp:
        command.append("--tcp")
    if wl.edns:
        command += ["--edns", str(wl.edns)]
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=args.latency_seconds + args.query_timeout + 60,
    )
    out.write_text(" ".join(command) + "\n" + done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"latency.py exited {done.returncode}: {done.stderr[-600:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {k: result[k] for k in ("p50_ms", "p99_ms", "mean_ms", "lost")}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _cpu_snapshot(pid: int) -> tuple[float, float, float, float]:
    return (time.monotonic(), srv.cpu_seconds(pid), _children_cpu(), srv.system_busy_seconds())


def _cpu_since(before: tuple[float, float, float, float], pid: int) -> tuple[float, ...]:
    """(server, client, background) CPU% since `before`; background is everything else that
    ran on the machine meanwhile (other users' work, steal): when it is high, the run is noisy."""
    t1, server1, client1, busy1 = _cpu_snapshot(pid)
    t0, server0, client0, busy0 = before
    wall = max(t1 - t0, 1e-6)
    server, client = server1 - server0, client1 - client0
    background = max(0.0, (busy1 - busy0) - server - client)
    return tuple(round(100 * v / wall, 1) for v in (server, client, background))


def server_cpu(pid: int) -> float:
    """CPU seconds of the server's process tree: the scheduler's nanoseconds for the live
    tasks (``tree_runtime``) plus the reaped children's ticks (dnsmasq forks per TCP client).
    A 10 ms tick is ~2% of a cold pass's 0.5 s, enough to tip a ratio over a target;
    ``cpu_pass`` falls back to the ticks where this reads less than they do."""
    return tree_runtime(pid) + srv.reaped_cpu_seconds(pid)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


# --- one measurement ----------------------------------------------------------------------------


def cpu_pass(args, running: srv.Running, qfile: Path, wl: Workload, out: Path) -> dict:
    """Server CPU per answered query at a fixed offered rate (wl.cpu_rate, or --cpu-rate):
    the CPU time of the server's process tree (``server_cpu``), over dnsperf's run. At equal
    load this does not depend on the client's own ceiling, so it compares servers fairly."""
    rate = wl.cpu_rate if wl.once else args.cpu_rate
    seconds = args.cpu_seconds
    if wl.once:  # every name once: the file's length sets the duration
        with open(qfile) as fh:
            seconds = sum(1 for _ in fh) / rate + args.query_timeout + 1
    settle(running.pid)
    before = _cpu_snapshot(running.pid)
    used = server_cpu(running.pid)
    stats = dnsperf(args, running.port, qfile, wl, seconds, out, rate=rate)
    used = server_cpu(running.pid) - used
    ticks = srv.cpu_seconds(running.pid) - before[1]
    if used < ticks - 2 / srv.CLK_TCK:  # no schedstat, or a thread that ended took its own
        used = ticks
    background = _cpu_since(before, running.pid)[2]
    completed = int(stats.get("completed", 0))
    return {
        "cpu_us": round(used / completed * 1e6, 2) if completed else None,
        "cpu_rate": rate,
        "cpu_completed": completed,
        "cpu_lost": int(stats.get("lost", 0)),
        "cpu_bg_pct": background,
    }



def tree_runtime(pid: int) -> float:
    """CPU seconds the scheduler ran `pid`'s live process tree, to the nanosecond
    (/proc/PID/task/*/schedstat)."""
    total = 0
    for p in srv.process_tree(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{p}/task/{task}/schedstat") as fh:
                    total += int(fh.read().split()[0])
            except (OSError, IndexError, ValueError):
                continue
    return total / 1e9


def settle(pid: int, quiet: float = 0.002, window: float = 0.25, limit: float = 10.0) -> None:
    """Wait until the server's process tree is idle (under `quiet` CPU seconds in `window`),
    at most `limit` seconds: whatever a server still does after its first answer (the end of
    its start-up) is no query's work. (Scheduler time: whole 10 ms ticks are too coarse.)"""
    deadline = time.monotonic() + limit
    last = tree_runtime(pid)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = tree_runtime(pid)
        if now - last < quiet:
            return
        last = now


def _rounds(rounds: int, names: list[str], wl: Workload, files: srv.ZoneFiles,
            probes: list[zonemod.Probe], opts: srv.Options, workdir: Path, label: str,
            one: Callable[[str, srv.Running, Path], float | None]) -> dict[str, list]:
    """``one(name, server, run_dir)`` on a fresh server of each of ``names``, back to back,
    ``rounds`` times (in reverse order every other round): each server's figures, None where
    a pass failed."""
    ready = probes[-1] if wl.zone == "cold" else probes[0]
    figures: dict[str, list[float | None]] = {n: [] for n in names}
    for round_no in range(rounds):
        # every other round the other way round: no server always goes first
        for name in names if round_no % 2 == 0 else names[::-1]:
            run_dir = workdir / label.replace(" ", "-") / f"{name}-{wl.name}-{round_no}"
            running = None
            try:
                running = srv.start(name, files, run_dir, opts, ready)
                figures[name].append(one(name, running, run_dir))
            except Exception as exc:  # noqa: BLE001 - a failed pass (or start) leaves a gap
                print(f"bench: {label} {name} {wl.name} round {round_no}: {exc}", flush=True)
                figures[name].append(None)
            finally:
                if running is not None:
                    running.stop()
    return figures


def _medians(figures: dict[str, list], digits: int) -> tuple[dict, dict]:
    """The median of each server's figures, and of the rounds' ratios meshdns / each peer."""
    medians, ratios = {}, {}
    for name, values in figures.items():
        got = [v for v in values if v is not None]
        if got:
            medians[name] = round(statistics.median(got), digits)
    mesh = figures.get("meshdns", [])
    for peer, values in figures.items():
        if peer == "meshdns":
            continue
        pairs = [m / o for m, o in zip(mesh, values) if m is not None and o]
        if pairs:
            ratios[peer] = round(statistics.median(pairs), 3)
    return medians, ratios


def paired_cpu(args, names: list[str], wl: Workload, files: srv.ZoneFiles, qfile: Path,
               probes: list[zonemod.Probe], opts: srv.Options, workdir: Path) -> dict:
    """``cpu_pass`` again, meshdns and each peer back to back in every round, a fresh server
    each time (hot: one pass to warm it, then the one measured): the machine's speed drifts
    over minutes (a VM's neighbours), and a ratio from two passes seconds apart is far
    steadier than one from passes minutes apart. The median over rounds of each server's
    µs/query and of each ratio meshdns / peer."""

    def one(name: str, running: srv.Running, run_dir: Path) -> float | None:
        if not wl.once:  # a hot pass measures a warm cache
            dnsperf(args, running.port, qfile, wl, min(args.cpu_seconds, 2.0),
                    run_dir / "warm.txt", rate=args.cpu_rate)
        return cpu_pass(args, running, qfile, wl, run_dir / "cpu.txt")["cpu_us"]

    figures = _rounds(args.paired, names, wl, files, probes, opts, workdir, "paired", one)
    medians, ratios = _medians(figures, 2)
    return {"rounds": args.paired, "us_per_query": figures, "median_us": medians,
            "ratio_median": ratios}


def paired_p99(args, names: list[str], wl: Workload, files: srv.ZoneFiles, qfile: Path,
               probes: list[zonemod.Probe], opts: srv.Options, workdir: Path,
               rates: dict[str, int]) -> dict:
    """The latency pass again, meshdns and each peer back to back in every round, a fresh
    server each time (warmed for 2 s at its rate unless the workload asks each name once),
    each at its own rate from the main run (half its saturating qps): one 5 s pass's p99
    moves by tens of percent between runs, more than the gap between two servers, so one
    pass each cannot say which is lower. The median over rounds of each server's p99 and of
    each round's ratio meshdns / peer."""

    def one(name: str, running: srv.Running, run_dir: Path) -> float | None:
        if not wl.once:
            dnsperf(args, running.port, qfile, wl, 2.0, run_dir / "warm.txt", rate=rates[name])
        settle(running.pid)
        return latency_pass(args, running, qfile, wl, rates[name], run_dir / "latency.txt")[
            "p99_ms"]

    figures = _rounds(args.paired_p99, names, wl, files, probes, opts, workdir, "paired p99",
                      one)
    medians, ratios = _medians(figures, 3)
    return {"rounds": args.paired_p99, "rates": {n: rates[n] for n in names},
            "p99_ms": figures, "median_ms": medians, "ratio_median": ratios}


def measure(
    args,
    name: str,
    wl: Workload,
    files: srv.ZoneFiles,
    qfile: Path,
    probes: list[zonemod.Probe],
    opts: srv.Options,
    workdir: Path,
    cpu_qfile: Path | None = None,
) -> Row:
    row = Row(workload=wl.name, server=name, p99_tool=args.p99_tool)
    if name == "meshdns" and args.meshdns_error:
        row.error = args.meshdns_error
        return row
    run_dir = workdir / "runs" / f"{name}-{wl.name}"
    ready = probes[-1] if wl.zone == "cold" else probes[0]
    running = None
    try:
        running = srv.start(name, files, run_dir, opts, ready)
        row.ready_s = round(running.ready_s, 2)
        row.check_problems = srv.check_answers(running, probes)
        if args.cpu_seconds > 0:
            cpu_file = cpu_qfile if cpu_qfile is not None else qfile
            tries = []
            for n in range(args.cpu_repeat):
                if n and wl.once:  # a warm server would not be cold any more: afresh
                    running = _restart(running, row, name, files, run_dir, opts, ready, wl)
                tries.append(cpu_pass(args, running, cpu_file, wl,
                                      run_dir / f"dnsperf-cpu-{n}.txt"))
            good = sorted((t for t in tries if t["cpu_us"] is not None),
                          key=lambda t: t["cpu_us"])
            best = good[(len(good) - 1) // 2] if good else tries[0]  # the median
            for key, value in best.items():
                setattr(row, key, value)
            row.cpu_repeats = [t["cpu_us"] for t in tries]
            if wl.once:
                running = _restart(running, row, name, files, run_dir, opts, ready, wl)
        before = _cpu_snapshot(running.pid)
        stats = dnsperf(args, running.port, qfile, wl, args.seconds, run_dir / "dnsperf.txt")
        server, client, background = _cpu_since(before, running.pid)
        row.server_cpu_pct, row.client_cpu_pct, row.bg_cpu_pct = server, client, background
        row.rss_mb, row.hwm_mb = (round(v, 1) for v in running.rss_mb())
        row.qps = round(stats["qps"], 1)
        if row.server_cpu_pct and row.server_cpu_pct >= 5:
            row.qps_per_core = round(row.qps / (row.server_cpu_pct / 100), 1)
        row.sent, row.completed, row.lost = (
            int(stats.get(k, 0)) for k in ("sent", "completed", "lost")
        )
        row.mean_ms = _ms(stats.get("mean_s"))
        row.stddev_ms = _ms(stats.get("stddev_s"))
        row.max_ms = _ms(stats.get("max_s"))
        row.resp_bytes = int(stats.get("resp_bytes", 0))
        row.rcodes = stats.get("rcodes", {})
        if stats.get("reconnections"):
            row.notes.append(
                f"server closed TCP connections: dnsperf reconnected "
                f"{int(stats['reconnections'])} times (queries in flight are lost)"
            )
        if row.completed == 0:
            raise RuntimeError("no query completed")
        if wl.once:  # a warm server would not be cold any more: start it afresh
            running = _restart(running, row, name, files, run_dir, opts, ready, wl)
        row.p99_rate = max(50, int(row.qps * args.latency_fraction))
        settle(running.pid)
        before = _cpu_snapshot(running.pid)
        lat = latency_pass(args, running, qfile, wl, row.p99_rate, run_dir / "latency.txt")
        row.p99_bg_cpu_pct = _cpu_since(before, running.pid)[2]
        row.p50_ms, row.p99_ms, row.p99_mean_ms, row.p99_lost = (
            lat["p50_ms"],
            lat["p99_ms"],
            lat["mean_ms"],
            lat["lost"],
        )
    except Exception as exc:  # noqa: BLE001 - one failure must not end the whole bench
        row.error = str(exc).strip()
    finally:
        if running is not None:
            code = running.stop()
            row.exit_code = code if row.exit_code in (None, 0) else row.exit_code
            row.notes += [n for n in running.notes if n not in row.notes]
    return row


def _restart(running: srv.Running, row: Row, name: str, files: srv.ZoneFiles, run_dir: Path,
             opts: srv.Options, ready, wl: Workload) -> srv.Running:
    """Stop the server and start a fresh one (a cold workload needs an empty cache)."""
    code = running.stop()
    if row.exit_code in (None, 0):
        row.exit_code = code
    row.notes += [n for n in running.notes if n not in row.notes]
    return srv.start(name, files, run_dir, opts, ready)


def pick_median(tries: list[Row]) -> Row:
    """The run with the median qps (the lower middle one for an even count); all are kept."""
    good = sorted((r for r in tries if not r.error), key=lambda r: r.qps or 0)
    if not good:
        return tries[0]
    row = good[(len(good) - 1) // 2]
    if len(tries) > 1:
        row.repeats = [
            {"qps": r.qps, "p99_ms": r.p99_ms, "bg_cpu_pct": r.bg_cpu_pct, "error": r.error}
            for r in tries
        ]
    return row


# --- report -------------------------------------------------------------------------------------


def add_ratios(rows: list[Row]) -> None:
    for wl in {r.workload for r in rows}:
        mesh = next(
            (r for r in rows if r.workload == wl and r.server == "meshdns" and not r.error), None
        )
        if mesh is None:
            continue
        for r in rows:
            if r.workload != wl or r.server == "meshdns" or r.error:
                continue
            if mesh.qps and r.qps:
                r.meshdns_qps_ratio = round(mesh.qps / r.qps, 2)
            if mesh.p99_ms and r.p99_ms:
                r.meshdns_p99_ratio = round(mesh.p99_ms / r.p99_ms, 2)
            if mesh.qps_per_core and r.qps_per_core:
                r.meshdns_qps_per_core_ratio = round(mesh.qps_per_core / r.qps_per_core, 2)
            if mesh.cpu_us and r.cpu_us:
                r.meshdns_cpu_ratio = round(mesh.cpu_us / r.cpu_us, 2)


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Row]) -> str:
    head = [
        "workload",
        "server",
        "qps",
        "mean ms",
        "p99@½ ms",
        "lost",
        "resp B",
        "srv CPU%",
        "qps/core",
        "bg CPU%",
        "RSS MB",
        "µs/q",
        "at q/s",
        "mesh÷ µs/q",
        "mesh÷ qps",
        "mesh÷ qps/core",
        "mesh÷ p99",
    ]
    body = []
    for r in rows:
        if r.error:
            continue
        peer = r.server != "meshdns"
        body.append(
            [
                r.workload,
                r.server + (" !" if r.check_problems else ""),
                _f(r.qps, ",.0f"),
                _f(r.mean_ms, ".2f"),
                _f(r.p99_ms, ".2f"),
                f"{r.lost}" + (f"+{r.p99_lost}" if r.p99_lost else ""),
                _f(r.resp_bytes, "d"),
                _f(r.server_cpu_pct, ".0f"),
                _f(r.qps_per_core, ",.0f"),
                _f(max(r.bg_cpu_pct or 0, r.p99_bg_cpu_pct or 0), ".0f"),
                _f(r.rss_mb, ".1f"),
                _f(r.cpu_us, ".1f"),
                _f(r.cpu_rate, ",d"),
                _f(r.meshdns_cpu_ratio, ".2f") if peer else "",
                _f(r.meshdns_qps_ratio, ".2f") if peer else "",
                _f(r.meshdns_qps_per_core_ratio, ".2f") if peer else "",
                _f(r.meshdns_p99_ratio, ".2f") if peer else "",
            ]
        )
    widths = [max(len(cell) for cell in column) for column in zip(head, *body, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            f"{c:<{w}}" if j < 2 else f"{c:>{w}}"
            for j, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [line(head), "-" * len(line(head))]
    rows_by_key = iter(body)
    for r in rows:
        if r.error:
            first = r.error.splitlines()[0][:90]
            lines.append(f"{r.workload:<{widths[0]}}  {r.server:<{widths[1]}}  FAILED: {first}")
        else:
            lines.append(line(next(rows_by_key)))
    return "\n".join(lines)


def print_paired(title: str, results: dict[str, dict], values: str, median: str, unit: str,
                 fmt: str, width: int) -> None:
    """A paired pass's figures by workload: each server's median and rounds (and its rate,
    where the pass had one per server), then the median ratio to each peer."""
    if not results:
        return
    print("\n" + title)
    for wl_name, got in results.items():
        per, rates = got[values], got.get("rates", {})
        print(f"  {wl_name:{width}} " + "; ".join(
            f"{n} {got[median].get(n, '-')} {unit}"
            + (f" at {rates[n]:,}/s" if n in rates else "")
            + f" ({', '.join('-' if v is None else format(v, fmt) for v in per[n])})"
            for n in per))
        for peer, ratio in got["ratio_median"].items():
            print(f"  {'':{width}} meshdns / {peer}: median of the rounds' ratios {ratio:.3f}")


def _row(rows: list[Row], server: str, workload: str) -> Row | None:
    return next((r for r in rows if r.server == server and r.workload == workload
                 and not r.error), None)


def targets(rows: list[Row], paired: dict[str, dict] | None = None,
            paired_lat: dict[str, dict] | None = None) -> list[str]:
    """Issue 12's targets, each with the figures of this run: meshdns against each peer
    (the CPU and p99 ones also from the paired passes, the steadier figures)."""
    out = []
    paired = paired or {}
    paired_lat = paired_lat or {}
    udp = [w for w in dict.fromkeys(r.workload for r in rows) if not WORKLOADS[w].tcp]

    def check(label: str, workload: str, peer: str, attr: str, limit: float,
              at_most: bool) -> None:
        mesh, other = _row(rows, "meshdns", workload), _row(rows, peer, workload)
        if mesh is None or other is None:
            return
        a, b = getattr(mesh, attr), getattr(other, attr)
        if not a or not b:
            out.append(f"  ?    {label} vs {peer}: no figure")
            return
        ratio = a / b
        ok = ratio <= limit if at_most else ratio >= limit
        out.append(f"  {'met ' if ok else 'MISS'} {label} vs {peer}: {a:,.2f} / {b:,.2f} = "
                   f"{ratio:.2f} ({'<=' if at_most else '>='} {limit:g})")

    def check_paired(label: str, workload: str, peer: str, limit: float,
                     results: dict[str, dict] = paired, median: str = "median_us",
                     unit: str = "µs") -> None:
        got = results.get(workload, {})
        ratio = got.get("ratio_median", {}).get(peer)
        if ratio is None:
            return
        mesh, other = got[median].get("meshdns"), got[median].get(peer)
        out.append(f"  {'met ' if ratio <= limit else 'MISS'} {label} vs {peer}, paired "
                   f"({got['rounds']} rounds; medians {mesh} / {other} {unit}): median ratio "
                   f"{ratio:.2f} (<= {limit:g})")

    for peer in PEERS:
        check("hot CPU µs/query at 40k q/s", "hot", peer, "cpu_us", 1.0, True)
        check_paired("hot CPU µs/query at 40k q/s", "hot", peer, 1.0)
        check("cold CPU µs/query at 10k q/s", "cold", peer, "cpu_us", 1.3, True)
        check_paired("cold CPU µs/query at 10k q/s", "cold", peer, 1.3)
        check("cold saturating qps", "cold", peer, "qps", 0.6, False)
        check("hot saturating qps", "hot", peer, "qps", 0.95, False)
        for w in udp:
            check(f"{w} p99 at half rate (ms)", w, peer, "p99_ms", 1.0, True)
            check_paired(f"{w} p99 at half rate", w, peer, 1.0, paired_lat, "median_ms", "ms")
    return out


def versions(names: list[str]) -> dict[str, str]:
    out = {}

    def first_line(cmd: list[str]) -> str:
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=30)
            return (done.stdout or done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"

    out["dnsperf"] = _dnsperf_version()
    if "dnsmasq" in names:
        out["dnsmasq"] = first_line(["dnsmasq", "--version"])
    if "unbound" in names:
        out["unbound"] = next(
            (
                ln
                for ln in subprocess.run(
                    ["unbound", "-V"], check=False, capture_output=True, text=True, timeout=30
                ).stdout.splitlines()
                if ln.startswith("Version")
            ),
            "?",
        )
    if "nsd" in names:
        out["nsd"] = first_line(["nsd", "-v"])
    if "meshdns" in names:
        try:
            from importlib.metadata import version

            out["meshdns"] = version("meshdns")
        except Exception:  # noqa: BLE001
            out["meshdns"] = "?"
        # which UDP packet path the servers run (the compiled one, or the pure-Python fallback)
        out["meshdns packet path"] = first_line(
            [srv.project_python(), "-c",
             "from meshdns.packets import compiled_module; print(compiled_module()[1])"])
    if "dnslib" in names:
        import dnslib

        out["dnslib"] = getattr(dnslib, "version", "?")
    out["python"] = platform.python_version()
    return out


def _dnsperf_version() -> str:
    done = subprocess.run(
        ["dnsperf", "-h"], check=False, capture_output=True, text=True, timeout=30
    )
    match = re.search(r"Version ([\w.]+)", done.stdout + done.stderr)
    return match.group(1) if match else "?"


# --- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="meshdns benchmark against unbound, NSD, dnsmasq")
    p.add_argument(
        "--servers",
        default=",".join(ALL_SERVERS),
        help=f"comma-separated, from {','.join(ALL_SERVERS)} (default: all)",
    )
    p.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help=f"comma-separated, from {','.join(ALL_WORKLOADS)} (default: all)",
    )
    p.add_argument(
        "--quick", action="store_true", help="3 s runs, 2 s latency passes, 20,000 cold names"
    )
    p.add_argument("--seconds", type=float, help="dnsperf time per run (default 10; quick 3)")
    p.add_argument(
        "--latency-seconds",
        type=float,
        help="length of the fixed-rate latency pass (default 5; quick 2)",
    )
    p.add_argument(
        "--latency-fraction",
        type=float,
        default=0.5,
        help="latency pass rate as a fraction of the measured qps (default 0.5)",
    )
    p.add_argument(
        "--p99-tool",
        choices=["dnsperf", "prober"],
        default="dnsperf",
        help="dnsperf -v per-query latencies (default) or bench/latency.py",
    )
    p.add_argument(
        "--cold-size",
        type=int,
        help="distinct names in the cold workload (default 100000; quick 20000)",
    )
    p.add_argument(
        "--cpu-seconds",
        type=float,
        help="length of the fixed-rate CPU pass (default 5; quick 3; 0 skips it)",
    )
    p.add_argument(
        "--cpu-rate",
        type=int,
        default=40_000,
        help="offered q/s of the CPU pass (default 40,000; cold: 10,000 over --cold-cpu-names)",
    )
    p.add_argument(
        "--cold-cpu-names",
        type=int,
        default=20_000,
        help="distinct names in the cold CPU pass, each asked once (default 20,000)",
    )
    p.add_argument(
        "--cpu-repeat",
        type=int,
        default=3,
        help="CPU passes per server x workload; the median is reported (default 3)",
    )
    p.add_argument(
        "--paired",
        type=int,
        help="rounds of the paired CPU pass: meshdns and each peer, back to back, per round "
        "(hot and cold; default 5, quick 2; 0 skips it)",
    )
    p.add_argument(
        "--paired-p99",
        type=int,
        help="rounds of the paired latency pass: meshdns and each peer, back to back, per "
        "round, each at its own half rate (every UDP workload; default 3, quick 1; 0 skips it)",
    )
    p.add_argument("--clients", type=int, default=4, help="dnsperf -c (default 4)")
    p.add_argument("--outstanding", type=int, default=100, help="dnsperf -q (default 100)")
    p.add_argument(
        "--query-timeout",
        type=float,
        default=2.0,
        help="dnsperf -t: a query unanswered this long is lost (default 2)",
    )
    p.add_argument("--server-cpu", default="0", help="taskset CPU list for servers (default 0)")
    p.add_argument("--client-cpu", default="1", help="taskset CPU list for clients (default 1)")
    p.add_argument(
        "--start-timeout",
        type=float,
        default=120.0,
        help="seconds a server may take to answer its first query (default 120)",
    )
    p.add_argument(
        "--meshdns-workers",
        type=int,
        default=0,
        help="write `workers: N` in meshdns's config (default: leave unset)",
    )
    p.add_argument(
        "--meshdns-cache",
        action="store_true",
        help="write `cache: {enabled: true, size: 100000}` in meshdns's config",
    )
    p.add_argument(
        "--meshdns-config",
        type=Path,
        help="a meshdns config YAML to start from (admin.listen is overridden)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each server x workload N times, report the median-qps run",
    )
    p.add_argument("--seed", type=int, default=42, help="query mix seed (default 42)")
    p.add_argument("--output", type=Path, default=BENCH_DIR / "results" / "latest.json")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.latency_seconds = args.latency_seconds or (2.0 if args.quick else 5.0)
    args.cold_size = args.cold_size or (20_000 if args.quick else 100_000)
    if args.cpu_seconds is None:
        args.cpu_seconds = 3.0 if args.quick else 5.0
    if args.paired is None:
        args.paired = 2 if args.quick else 5
    if args.paired < 0:
        p.error("--paired: 0 or more")
    if args.paired_p99 is None:
        args.paired_p99 = 1 if args.quick else 3
    if args.paired_p99 < 0:
        p.error("--paired-p99: 0 or more")
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.workload_list = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for s in args.server_list:
        if s not in ALL_SERVERS:
            p.error(f"--servers: unknown server {s!r} (known: {', '.join(ALL_SERVERS)})")
    for w in args.workload_list:
        if w not in WORKLOADS:
            p.error(f"--workloads: unknown workload {w!r} (known: {', '.join(ALL_WORKLOADS)})")
    if args.repeat < 1:
        p.error("--repeat: at least 1")
    if args.cpu_repeat < 1:
        p.error("--cpu-repeat: at least 1")
    if not 1 <= args.cold_size <= 1_000_000:
        p.error("--cold-size: between 1 and 1,000,000")
    return args


def preflight(args) -> None:
    needed = {"taskset", "dnsperf"}
    needed |= {"dnsmasq"} & set(args.server_list)
    if "unbound" in args.server_list:
        needed |= {"unbound", "unbound-checkconf"}
    if "nsd" in args.server_list:
        needed |= {"nsd", "nsd-checkconf", "nsd-checkzone"}
    missing = sorted(t for t in needed if shutil.which(t) is None)
    if missing:
        sys.exit(f"missing tools: {', '.join(missing)} (bash bench/run.sh installs them)")
    args.meshdns_error = ""
    if "meshdns" in args.server_list and not srv.meshdns_available():
        args.meshdns_error = (
            "meshdns is not importable (`import meshdns.cli` failed): "
            "pip install -e . (bash bench/run.sh does it)"
        )
        print(f"warning: {args.meshdns_error}; its rows will read FAILED", file=sys.stderr)
    if "dnslib" in args.server_list:
        try:
            import dnslib  # noqa: F401
        except ImportError:
            sys.exit("dnslib is not installed: pip install dnslib")
    if len(os.sched_getaffinity(0)) < 2:
        print(
            "warning: fewer than 2 CPUs available; server and client will share one",
            file=sys.stderr,
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    preflight(args)
    workdir = Path(tempfile.mkdtemp(prefix="meshdns-bench-"))
    pidfile = Path(os.environ.get("BENCH_PIDFILE") or workdir / "pids")
    opts = srv.Options(
        server_cpu=args.server_cpu,
        start_timeout=args.start_timeout,
        pidfile=pidfile,
        meshdns_workers=args.meshdns_workers,
        meshdns_cache=args.meshdns_cache,
        meshdns_config=args.meshdns_config,
    )
    if not args.keep:
        atexit.register(shutil.rmtree, workdir, True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs atexit / finally blocks

    t_start = time.monotonic()
    small = zonemod.Sizes()
    need_cold = "cold" in args.workload_list
    sizes = {"small": small}
    if need_cold:
        sizes["cold"] = zonemod.Sizes(cold=args.cold_size)
    if "a-only" in args.workload_list:
        sizes["a-only"] = zonemod.A_ONLY
    print(
        f"bench: work dir {workdir}; servers {','.join(args.server_list)}; workloads "
        f"{','.join(args.workload_list)}; {args.seconds:g}s runs",
        flush=True,
    )
    files = {}
    for key, size in sizes.items():
        files[key] = srv.ZoneFiles(workdir / f"zone-{key}", zonemod.build_zone(size))
        files[key].write(args.server_list)
    rng = random.Random(args.seed)
    qdir = workdir / "queries"
    qdir.mkdir()
    qfiles = {"hot": qdir / "hot.txt", "large": qdir / "large.txt", "cold": qdir / "cold.txt",
              "a-only": qdir / "a-only.txt"}
    zonemod.write_queries(zonemod.a_only_queries(zonemod.A_ONLY, 100_000, random.Random(args.seed)),
                          qfiles["a-only"])
    zonemod.write_queries(zonemod.hot_queries(small, 100_000, rng), qfiles["hot"])
    zonemod.write_queries(zonemod.large_queries(small, 10_000, rng), qfiles["large"])
    if need_cold:
        cold = zonemod.cold_queries(sizes["cold"], rng)
        zonemod.write_queries(cold, qfiles["cold"])
        qfiles["cold-cpu"] = qdir / "cold-cpu.txt"
        zonemod.write_queries(cold[: args.cold_cpu_names], qfiles["cold-cpu"])
    print(f"bench: zones and query files written in {time.monotonic() - t_start:.1f}s", flush=True)

    rows: list[Row] = []
    for name in args.server_list:
        for wl_name in args.workload_list:
            wl = WORKLOADS[wl_name]
            zone_files = files[wl.zone]
            print(f"bench: {name:8} {wl.name:10} ...", end=" ", flush=True)
            tries = [
                measure(
                    args,
                    name,
                    wl,
                    zone_files,
                    qfiles[wl.queries],
                    zonemod.probes(sizes[wl.zone]),
                    opts,
                    workdir,
                    qfiles.get(f"{wl.queries}-cpu"),
                )
                for _ in range(args.repeat)
            ]
            row = pick_median(tries)
            rows.append(row)
            if row.error:
                print("FAILED: " + row.error.splitlines()[0], flush=True)
            else:
                print(
                    f"{row.qps:,.0f} qps, p99 {_f(row.p99_ms, '.3f')} ms at {row.p99_rate:,}/s, "
                    f"{_f(row.cpu_us, '.1f')} µs CPU/query at {_f(row.cpu_rate, ',d')}/s"
                    + (f"; check: {'; '.join(row.check_problems)}" if row.check_problems else ""),
                    flush=True,
                )

    paired: dict[str, dict] = {}
    peers = [p for p in PEERS if p in args.server_list]
    if args.paired and "meshdns" in args.server_list and peers and not args.meshdns_error:
        for wl_name in ("hot", "cold"):
            if wl_name not in args.workload_list:
                continue
            wl = WORKLOADS[wl_name]
            print(f"bench: paired CPU pass, {wl_name}: {args.paired} rounds of "
                  f"{', '.join(['meshdns', *peers])} ...", end=" ", flush=True)
            paired[wl_name] = paired_cpu(
                args, ["meshdns", *peers], wl, files[wl.zone],
                qfiles.get(f"{wl.queries}-cpu") or qfiles[wl.queries],
                zonemod.probes(sizes[wl.zone]), opts, workdir)
            print(", ".join(f"{n} {v} µs/q" for n, v in paired[wl_name]["median_us"].items()),
                  flush=True)

    paired_lat: dict[str, dict] = {}
    if args.paired_p99 and "meshdns" in args.server_list and peers and not args.meshdns_error:
        for wl_name in args.workload_list:
            wl = WORKLOADS[wl_name]
            if wl.tcp:
                continue
            rates = {r.server: r.p99_rate for r in rows
                     if r.workload == wl_name and not r.error and r.p99_rate}
            names = [n for n in ("meshdns", *peers) if n in rates]
            if "meshdns" not in names or len(names) < 2:
                continue
            print(f"bench: paired p99 pass, {wl_name}: {args.paired_p99} rounds of "
                  f"{', '.join(names)} ...", end=" ", flush=True)
            paired_lat[wl_name] = paired_p99(
                args, names, wl, files[wl.zone], qfiles[wl.queries],
                zonemod.probes(sizes[wl.zone]), opts, workdir, rates)
            print(", ".join(f"{n} p99 {v} ms" for n, v in paired_lat[wl_name]["median_ms"].items()),
                  flush=True)

    add_ratios(rows)
    print()
    print(table(rows))
    print_paired("paired CPU pass (a fresh server each, meshdns and the peers back to back in "
                 "each round; medians):", paired, "us_per_query", "median_us", "µs/q", "g", 5)
    print_paired("paired p99 pass (a fresh server each, back to back in each round, each at its "
                 "own half rate; medians):", paired_lat, "p99_ms", "median_ms", "ms", ".3f", 10)
    notes = []
    for r in rows:
        for problem in r.check_problems:
            notes.append(f"! {r.server} {r.workload}: {problem}")
        for note in r.notes:
            notes.append(f"  {r.server} {r.workload}: {note}")
        bg = max(r.bg_cpu_pct or 0, r.p99_bg_cpu_pct or 0)
        if bg > 15:
            notes.append(
                f"  {r.server} {r.workload}: {bg:.0f}% CPU used by other processes "
                "during the run: figures are noisy"
            )
        if r.server == "meshdns" and r.exit_code not in (0, None) and not r.error:
            notes.append(f"  meshdns {r.workload}: exit code {r.exit_code} after SIGTERM")
        if r.error and "\n" in r.error:
            notes.append(
                f"  {r.server} {r.workload} failed:\n      " + r.error.replace("\n", "\n      ")
            )
    if notes:
        print("\n" + "\n".join(notes))
    goals = targets(rows, paired, paired_lat)
    if goals:
        print("\ntargets (issue 12), this run:\n" + "\n".join(goals))
    found = versions(args.server_list)
    if "meshdns packet path" in found:
        print(f"\nmeshdns UDP packet path: {found['meshdns packet path']}")
    result = {
        "meta": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "versions": found,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "workloads": {w: WORKLOADS[w].about for w in args.workload_list},
            "elapsed_s": round(time.monotonic() - t_start, 1),
        },
        "targets": goals,
        "paired_cpu": paired,
        "paired_p99": paired_lat,
        "results": [r.__dict__ for r in rows],
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nbench: {len(rows)} runs in {time.monotonic() - t_start:.0f}s; "
        f"results in {args.output}" + (f"; files kept in {workdir}" if args.keep else "")
    )
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
