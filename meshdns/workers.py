"""``workers: N``: N processes share each listening port through SO_REUSEPORT.

The first process (the supervisor, worker 0) checks that no one else serves the ports, binds
them (so port 0 resolves to one concrete port), serves like a single-process server (admin
endpoint included), and starts N-1 copies of itself bound to the same ports; the kernel spreads
packets across the sockets. Each worker follows the catalog on its own, so a change reaches all
of them without coordination. The guarantees:

- **One instance per port.** ``SO_REUSEPORT`` would let a second meshdns (same user) join the
  port silently and split the answers between two catalogs; so the supervisor first binds each
  address *without* it, and refuses to start when that fails, then holds a lock file per address
  (two supervisors starting at the same moment both find the port free; one gets the lock).
- **Workers die with their supervisor.** Each worker asks the kernel for SIGTERM when its parent
  dies (``PR_SET_PDEATHSIG``) and also checks its parent every second, so a SIGKILLed
  supervisor leaves nothing serving.
- **Restarts back off.** A worker that exits is restarted after 0.5 s, doubling with every
  quick exit in a row up to 30 s, and logged with the delay.
- **A restarted worker serves the last good catalog.** After each catalog it accepts, the
  supervisor keeps a private copy of that file version; a worker that finds the catalog file
  broken at start serves that copy (and keeps watching the file) instead of exiting.

SIGHUP and SIGTERM are passed on. The cost: N copies of the snapshot in memory, and /metrics
counts only the supervisor's traffic.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .catalog.file import FileSource, file_signature
from .catalog.snapshot import Snapshot
from .catalog.source import CatalogSource
from .config import Config
from .server import DnsServer, bind_tcp_udp, install_uvloop, run

log = logging.getLogger("meshdns")

WORKER_ENV = "MESHDNS_WORKER"  # the worker's number (1..N-1); unset in the supervisor
SUPERVISOR_ENV = "MESHDNS_SUPERVISOR_PID"
LAST_GOOD_ENV = "MESHDNS_LAST_GOOD_CATALOG"  # the supervisor's copy of its last good catalog

RESTART_FIRST = 0.5  # seconds before restarting a worker that exited
RESTART_MAX = 30.0
STABLE_AFTER = 10.0  # a worker that ran this long before exiting starts the back-off afresh
WATCH_EVERY = 0.1  # seconds between two looks at the workers and the catalog
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def is_worker() -> bool:
    return bool(os.environ.get(WORKER_ENV))


def worker_number(config: Config) -> int | None:
    """This process's number among the workers (0: the supervisor); None with one worker."""
    if is_worker():
        return int(os.environ[WORKER_ENV])
    return 0 if config.workers > 1 else None


# --- the port check -----------------------------------------------------------------------


_held_locks: list[int] = []  # one open lock file per claimed address, for the process's life


def port_lock_path(host: str, port: int) -> Path:
    name = f"meshdns-{os.getuid()}-{host.replace(':', '_')}-{port}.lock"
    return Path(tempfile.gettempdir()) / name


def lock_port(host: str, port: int, shown: str) -> None:
    """Close the gap between the probe and the workers' binds: two supervisors starting at once
    both find the port free, but only one gets this lock (held until the process exits)."""
    fd = os.open(port_lock_path(host, port), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise OSError(errno.EADDRINUSE, f"cannot listen on {shown}: another meshdns is starting "
                      f"on it (lock {port_lock_path(host, port)})") from None
    _held_locks.append(fd)


def claim_ports(config: Config) -> Config:
    """The config with every listen port made concrete, after checking that nothing else
    serves it: each address is bound once without SO_REUSEPORT (TCP with SO_REUSEADDR, as the
    server binds it, so connections in TIME_WAIT do not count), locked, then released for the
    workers' SO_REUSEPORT sockets. Raises ``OSError`` naming the address otherwise."""
    listen = []
    for host, port in config.listen_addresses():
        for _ in range(20):  # port 0: a port free for TCP may be taken for UDP; pick again
            try:
                tcp, udp = bind_tcp_udp(host, port)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE and port == 0:
                    continue
                shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                reason = exc.strerror or str(exc)
                if exc.errno == errno.EADDRINUSE:
                    reason += (" (another process serves it: workers share a port only "
                               "with their own supervisor)")
                raise OSError(exc.errno, f"cannot listen on {shown}: {reason}") from None
            with tcp, udp:
                concrete = tcp.getsockname()[1]
            break
        else:
            raise OSError(errno.EADDRINUSE, f"cannot listen on {host}:0: no free port")
        shown = f"[{host}]:{concrete}" if ":" in host else f"{host}:{concrete}"
        lock_port(host, concrete, shown)
        listen.append(shown)
    return config.model_copy(update={"listen": listen})


# --- the worker's side ----------------------------------------------------------------------


def die_with_supervisor() -> None:
    """In a worker: get SIGTERM when the supervisor dies (Linux), and exit at once if it is
    already gone. Set here, after exec, because the kernel clears the setting on exec of a
    binary with file capabilities (the image's python has cap_net_bind_service)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: watch_supervisor remains
        pass
    if os.getppid() != supervisor_pid():
        log.error("supervisor pid %s is gone; worker exiting", supervisor_pid())
        sys.exit(1)


def supervisor_pid() -> int:
    return int(os.environ.get(SUPERVISOR_ENV, "0"))


async def watch_supervisor(interval: float = 1.0) -> None:
    """The fallback for PR_SET_PDEATHSIG: once the parent is no longer the supervisor (it died
    and the worker was re-parented), stop as on SIGTERM."""
    while os.getppid() == supervisor_pid():
        await asyncio.sleep(interval)
    log.error("supervisor pid %d is gone; worker stopping", supervisor_pid())
    os.kill(os.getpid(), signal.SIGTERM)


def last_good_catalog() -> Path | None:
    """The supervisor's copy of its last good catalog, for a worker whose file is broken."""
    value = os.environ.get(LAST_GOOD_ENV)
    return Path(value) if value and Path(value).is_file() else None


def load_for_worker(source: FileSource, problems: list[str]) -> Snapshot | None:
    """A worker whose catalog file does not load: serve the supervisor's last good copy, and
    keep watching the file (it is read again when it changes). None when there is no copy."""
    copy = last_good_catalog()
    if copy is None:
        return None
    snapshot = FileSource(source.config, copy).load()
    source.adopt(snapshot, problems)
    log.warning("worker serving the supervisor's last good catalog (generation %d of %s, "
                "%d instances) until %s loads", snapshot.generation, source.path,
                snapshot.counts["instances"], source.path)
    return snapshot


# --- the supervisor ---------------------------------------------------------------------------


@dataclass
class Worker:
    number: int
    process: subprocess.Popen | None = None
    started: float = 0.0  # monotonic
    quick_exits: int = 0  # exits in a row, each within STABLE_AFTER of its start
    restart_at: float | None = None  # monotonic


def restart_delay(quick_exits: int) -> float:
    """0.5 s after the first quick exit, doubling with each one in a row, at most 30 s."""
    return min(RESTART_FIRST * 2 ** max(quick_exits - 1, 0), RESTART_MAX)


class Supervisor:
    def __init__(self, config: Config, source: CatalogSource, config_file: str | None) -> None:
        self.config = config
        self.source = source
        self.catalog: Path | None = getattr(source, "path", None)
        self.config_file = config_file
        self.workers = [Worker(n) for n in range(1, config.workers)]
        self.stopping = False
        self.command: list[str] = []
        self.spool = Path(tempfile.mkdtemp(prefix="meshdns-workers-"))
        self.last_good: Path | None = None
        self._saved: Snapshot | None = None
        self._watcher: asyncio.Future[None] | None = None

    @property
    def children(self) -> list[subprocess.Popen]:
        return [w.process for w in self.workers if w.process is not None]

    def start(self, server: DnsServer) -> None:
        listen = [arg for host, port in server.bound
                  for arg in ("--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")]
        self.command = [sys.executable, "-m", "meshdns", "serve", "--admin", "off", *listen]
        if self.catalog is not None:
            self.command += ["--catalog", str(self.catalog)]
        if self.config_file:
            self.command += ["--config", self.config_file]
        self.save_last_good()
        for worker in self.workers:
            self._spawn(worker)
        log.info("started %d worker processes sharing the port (SO_REUSEPORT): pids %s",
                 len(self.workers), ", ".join(str(p.pid) for p in self.children))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._hup, server)
        self._watcher = asyncio.ensure_future(self._watch())

    def _spawn(self, worker: Worker) -> None:
        env = dict(os.environ, **{WORKER_ENV: str(worker.number),
                                  SUPERVISOR_ENV: str(os.getpid())})
        if self.last_good is not None:
            env[LAST_GOOD_ENV] = str(self.last_good)
        worker.process = subprocess.Popen(self.command, env=env)
        worker.started = time.monotonic()
        worker.restart_at = None

    def save_last_good(self) -> None:
        """Copy the catalog file when the source has accepted a new version of it, and only if
        the file is still that version (before and after the copy): the copy is then exactly
        what was parsed, never a later edit that may be broken."""
        if not isinstance(self.source, FileSource) or self.source.snapshot is self._saved:
            return
        snapshot, accepted = self.source.snapshot, self.source.accepted
        if snapshot is None or accepted is None or self.catalog is None:
            return
        if file_signature(self.catalog) != accepted:
            return  # changed since: the next reload will tell whether it is good
        target = self.spool / f"catalog{self.catalog.suffix}"
        partial = target.with_name(target.name + ".partial")
        try:
            shutil.copy2(self.catalog, partial)  # copy2: the mtime, hence the SOA serial, too
        except OSError as exc:
            log.warning("cannot keep a copy of the catalog for restarted workers: %s", exc)
            return
        if file_signature(self.catalog) != accepted:
            partial.unlink(missing_ok=True)
            return
        os.replace(partial, target)
        self.last_good, self._saved = target, snapshot

    def _hup(self, server: DnsServer) -> None:
        server._keep(asyncio.ensure_future(server.hangup()))  # held until done
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGHUP)

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(WATCH_EVERY)
            try:
                self.save_last_good()
                self._tend()
            except Exception:  # the supervisor must outlive any bug of its own
                log.exception("worker supervisor: unexpected error (still supervising)")

    def _tend(self) -> None:
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if self.stopping:
                return
            if worker.restart_at is not None:
                if now >= worker.restart_at:
                    self._spawn(worker)
                    log.info("worker %d restarted: pid %d", worker.number,
                             worker.process.pid)  # type: ignore[union-attr]
                continue
            if process is None or process.poll() is None:
                continue
            lived = now - worker.started
            worker.quick_exits = worker.quick_exits + 1 if lived < STABLE_AFTER else 1
            delay = restart_delay(worker.quick_exits)
            worker.restart_at = now + delay
            log.error("worker %d (pid %d) exited with code %s after %.1f s; restarting it in "
                      "%.1f s (quick exit %d in a row)", worker.number, process.pid,
                      process.returncode, lived, delay, worker.quick_exits)

    def stop(self) -> None:
        self.stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        shutil.rmtree(self.spool, ignore_errors=True)


def serve_workers(config: Config, source: CatalogSource, config_file: str | None = None,
                  reload_config: Callable[[], Config] | None = None) -> int:
    """Run the first worker here (on the source already loaded) and supervise the others."""
    config = claim_ports(config)
    install_uvloop()
    supervisor = Supervisor(config, source, config_file)
    try:
        return asyncio.run(run(config, source, ready=supervisor.start, reuse_port=True,
                               reload_config=reload_config))
    finally:
        supervisor.stop()


def serve_worker(config: Config, source: CatalogSource,
                 reload_config: Callable[[], Config] | None = None) -> int:
    """Run one worker started by a supervisor: on the shared port, dying with its parent."""
    install_uvloop()

    def ready(server: DnsServer) -> None:
        server._keep(asyncio.ensure_future(watch_supervisor()))

    return asyncio.run(run(config, source, ready=ready, reuse_port=True, admin=False,
                           reload_config=reload_config))


__all__ = ["claim_ports", "is_worker", "serve_worker", "serve_workers", "worker_number"]
