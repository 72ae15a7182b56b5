"""The servers under test: how to configure, start, probe, measure and stop each one.

Every server is started pinned to one CPU with `taskset`, in its own session (so it and any
workers it forks form one process group we can signal), and its PID is appended to a PID file
that run.sh's exit trap reads, so nothing outlives the bench even if run.py is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zone as zonemod
from dnsmsg import udp_ask

BENCH_DIR = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(("127.0.0.1", 0))
            port = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port on 127.0.0.1")


def project_python() -> str:
    """The checkout's own interpreter (``.venv``, as scripts/venv makes it), else this one:
    meshdns is installed there, and the bench must run what the README's commands install."""
    venv = BENCH_DIR.parent / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def meshdns_command() -> list[str]:
    return [project_python(), "-m", "meshdns"]


def meshdns_available() -> bool:
    probe = subprocess.run(
        [project_python(), "-c", "import meshdns.cli"],
        check=False, capture_output=True, timeout=60, cwd="/",
    )
    return probe.returncode == 0


@dataclass
class ZoneFiles:
    """One zone rendered for every server, under `root`."""

    root: Path
    zone: zonemod.Zone

    @property
    def catalog(self) -> Path:
        return self.root / "catalog.json"

    @property
    def dnsmasq(self) -> Path:
        return self.root / "dnsmasq.conf"

    @property
    def unbound_records(self) -> Path:
        return self.root / "unbound-records.conf"

    @property
    def nsd_zone(self) -> Path:
        return self.root / "consul.zone"

    @property
    def dnslib(self) -> Path:
        return self.root / "dnslib-records.json"

    def write(self, servers: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if any(s.startswith("meshdns") for s in servers):
            zonemod.write_meshdns_catalog(self.zone, self.catalog)
        if "dnsmasq" in servers:
            zonemod.write_dnsmasq_conf(self.zone, self.dnsmasq)
        if "unbound" in servers:
            zonemod.write_unbound_records(self.zone, self.unbound_records)
        if "nsd" in servers:
            zonemod.write_nsd_zone(self.zone, self.nsd_zone)
        if "dnslib" in servers:
            zonemod.write_dnslib_records(self.zone, self.dnslib)


@dataclass
class Options:
    server_cpu: str = "0"
    start_timeout: float = 120.0
    pidfile: Path | None = None
    meshdns_workers: int = 0
    meshdns_cache: bool = False
    meshdns_config: Path | None = None


def _unbound_conf(run_dir: Path, files: ZoneFiles, port: int) -> Path:
    conf = run_dir / "unbound.conf"
    conf.write_text(
        "\n".join(
            [
                "server:",
                "    verbosity: 0",
                "    num-threads: 1",
                "    do-daemonize: no",
                "    interface: 127.0.0.1",
                f"    port: {port}",
                "    do-ip6: no",
                '    chroot: ""',
                '    username: ""',
                f'    directory: "{run_dir}"',
                f'    pidfile: "{run_dir / "unbound.pid"}"',
                "    use-syslog: no",
                '    logfile: ""',
                '    module-config: "iterator"',
                "    access-control: 127.0.0.0/8 allow",
                f'    include: "{files.unbound_records}"',
                "remote-control:",
                "    control-enable: no",
                "",
            ]
        )
    )
    check = subprocess.run(
        ["unbound-checkconf", str(conf)], check=False, capture_output=True, text=True, timeout=300
    )
    if check.returncode != 0:
        raise RuntimeError(f"unbound-checkconf {conf}: {check.stdout}{check.stderr}".strip())
    return conf


def _nsd_conf(run_dir: Path, files: ZoneFiles, port: int) -> Path:
    """One server process, no database file, no remote control, everything in run_dir."""
    conf = run_dir / "nsd.conf"
    conf.write_text(
        "\n".join(
            [
                "server:",
                "    server-count: 1",
                "    ip-address: 127.0.0.1",
                f"    port: {port}",
                "    do-ip6: no",
                "    verbosity: 0",
                '    username: ""',
                '    chroot: ""',
                f'    zonesdir: "{run_dir}"',
                '    database: ""',
                f'    zonelistfile: "{run_dir / "zone.list"}"',
                f'    xfrdfile: "{run_dir / "xfrd.state"}"',
                f'    xfrdir: "{run_dir}"',
                f'    pidfile: "{run_dir / "nsd.pid"}"',
                f'    logfile: "{run_dir / "nsd-internal.log"}"',
                "    hide-version: yes",
                # response rate limiting (on in Debian's build) would drop a benchmark's
                # traffic: every query comes from 127.0.0.1
                "    rrl-ratelimit: 0",
                "    rrl-whitelist-ratelimit: 0",
                "remote-control:",
                "    control-enable: no",
                "zone:",
                f"    name: {zonemod.DOMAIN}",
                f'    zonefile: "{files.nsd_zone}"',
                "",
            ]
        )
    )
    for check in (["nsd-checkconf", str(conf)],
                  ["nsd-checkzone", zonemod.DOMAIN, str(files.nsd_zone)]):
        done = subprocess.run(check, check=False, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(check)}: {done.stdout}{done.stderr}".strip())
    return conf


def _meshdns_conf(run_dir: Path, opts: Options) -> Path:
    """A config per catalog.md: datacenter, a private admin port, optional workers and cache."""
    config: dict[str, object] = {}
    if opts.meshdns_config:
        import yaml  # only needed when the user hands us a config to extend

        config = yaml.safe_load(opts.meshdns_config.read_text()) or {}
    config.setdefault("datacenter", zonemod.DC)
    # the large-edns workload and the answer checks ask with EDNS 4096 for full answers; the
    # default dns.max_udp_size (1232) would answer them TC
    config.setdefault("dns", {}).setdefault("max_udp_size", 4096)
    config.setdefault("catalog", {}).setdefault("max_size", "1GiB")  # large generated catalogs
    config["admin"] = {"listen": f"127.0.0.1:{free_port()}"}
    if opts.meshdns_workers:
        config["workers"] = opts.meshdns_workers
    if opts.meshdns_cache:
        config["cache"] = {"enabled": True, "size": 100000}
    path = run_dir / "meshdns.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
    return path


def server_command(name: str, files: ZoneFiles, port: int, run_dir: Path, opts: Options):
    listen = f"127.0.0.1:{port}"
    if name == "meshdns":
        return [
            *meshdns_command(),
            "serve",
            "--config",
            str(_meshdns_conf(run_dir, opts)),
            "--catalog",
            str(files.catalog),
            "--listen",
            listen,
        ]
    if name == "dnsmasq":
        return [
            "dnsmasq",
            "-k",
            f"--conf-file={files.dnsmasq}",
            "--no-resolv",
            "--no-hosts",
            f"--port={port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--cache-size=10000",
            "--local=/consul/",
            "--pid-file=",
        ]
    if name == "unbound":
        return ["unbound", "-d", "-c", str(_unbound_conf(run_dir, files, port))]
    if name == "nsd":
        return ["nsd", "-d", "-c", str(_nsd_conf(run_dir, files, port))]
    if name == "dnslib":
        return [
            sys.executable,
            str(BENCH_DIR / "dnslib_baseline.py"),
            "--records",
            str(files.dnslib),
            "--listen",
            listen,
        ]
    raise ValueError(f"unknown server {name!r}")


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (meshdns workers, dnsmasq's TCP children)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _status_kb(pid: int, field_name: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_ticks(pid: int, first: int) -> float:
    """Seconds of /proc/PID/stat's CPU fields from ``first`` (of utime, stime, cutime, cstime:
    0 for all four, 2 for the reaped children's only) summed over the process tree."""
    total = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            total += sum(int(v) for v in fields[11 + first:15])
        except (OSError, IndexError, ValueError):
            continue
    return total / CLK_TCK


def cpu_seconds(pid: int) -> float:
    """User + system time of the tree, reaped children included (dnsmasq forks per TCP
    client), in whole ticks."""
    return _tree_ticks(pid, 0)


def reaped_cpu_seconds(pid: int) -> float:
    """The CPU time of the tree's reaped children (cutime + cstime), in whole ticks."""
    return _tree_ticks(pid, 2)


def system_busy_seconds() -> float:
    """CPU time spent busy by the whole machine (all CPUs, steal included), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class Running:
    name: str
    proc: subprocess.Popen
    port: int
    log: Path
    started: float
    ready_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rss_mb(self) -> tuple[float, float]:
        """(VmRSS, VmHWM) summed over the process tree, in MiB."""
        pids = process_tree(self.pid)
        rss = sum(_status_kb(p, "VmRSS") for p in pids)
        hwm = sum(_status_kb(p, "VmHWM") for p in pids)
        return rss / 1024, hwm / 1024

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> int | None:
        """SIGTERM the process group, SIGKILL after `grace`; the exit code (None if killed)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                return self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.notes.append(f"did not exit {grace:.0f}s after SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
                return None
        # The leader is gone; make sure no worker of its group lingers.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        return self.proc.returncode


def start(name: str, files: ZoneFiles, run_dir: Path, opts: Options, ready_probe) -> Running:
    """Start `name` pinned to opts.server_cpu and wait until `ready_probe` is answered."""
    run_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = ["taskset", "-c", opts.server_cpu, *server_command(name, files, port, run_dir, opts)]
    log = run_dir / f"{name}.log"
    with open(log, "wb") as fh:
        fh.write((" ".join(command) + "\n").encode())
        fh.flush()
        proc = subprocess.Popen(
            command,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=run_dir,
        )
    if opts.pidfile:
        with open(opts.pidfile, "a") as fh:
            fh.write(f"{proc.pid}\n")
    running = Running(name=name, proc=proc, port=port, log=log, started=time.monotonic())
    deadline = time.monotonic() + opts.start_timeout
    last = "no reply"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode} before answering; log {log}:\n"
                + running.log_tail()
            )
        reply = udp_ask(
            "127.0.0.1", port, ready_probe.name, ready_probe.qtype, timeout=0.2, edns_size=4096
        )
        if reply is not None:
            last = f"{reply.rcode}, {reply.answers} answers"
            if reply.rcode == ready_probe.rcode and reply.answers >= ready_probe.min_answers:
                running.ready_s = time.monotonic() - running.started
                settle(running, deadline)
                return running
        time.sleep(0.1)
    running.stop()
    raise RuntimeError(
        f"{name} not ready after {opts.start_timeout:.0f}s (last: {last}); log {log}:\n"
        + running.log_tail()
    )


def settle(running: Running, deadline: float, idle_share: float = 0.05) -> None:
    """Wait until the server's process tree is idle: what answered first may not be all of it
    (meshdns's `workers` start one after another, each loading the catalog)."""
    quiet = 0
    before = cpu_seconds(running.pid)
    while quiet < 2 and time.monotonic() < deadline:
        time.sleep(0.25)
        after = cpu_seconds(running.pid)
        quiet = quiet + 1 if after - before < idle_share * 0.25 else 0
        before = after


def check_answers(running: Running, probes: list[zonemod.Probe]) -> list[str]:
    """Mismatches between what the server answers and what the zone says (EDNS 4096, UDP)."""
    problems = []
    for probe in probes:
        reply = udp_ask(
            "127.0.0.1", running.port, probe.name, probe.qtype, timeout=1.0, edns_size=4096
        )
        if reply is None:
            problems.append(f"{probe.name} {probe.qtype}: no reply")
        elif reply.rcode != probe.rcode or reply.answers < probe.min_answers:
            problems.append(
                f"{probe.name} {probe.qtype}: {reply.rcode} with {reply.answers} answers"
                f" (want {probe.rcode}, >= {probe.min_answers})"
            )
    return problems
