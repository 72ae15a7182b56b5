"""``workers: N``: N processes share each listening port through SO_REUSEPORT.

The first process binds (so port 0 resolves to one concrete port), serves like a single-process
server (admin endpoint included), and starts N-1 copies of itself bound to the same ports; the
kernel spreads packets across the sockets. Each worker loads and watches the catalog on its own,
so a change reaches all of them without coordination. Workers that die are restarted; SIGHUP and
SIGTERM are passed on. The cost: N copies of the snapshot in memory, and /metrics counts only
the first process's traffic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from .catalog.source import CatalogSource
from .config import Config
from .server import DnsServer, install_uvloop, run

log = logging.getLogger("meshdns")

WORKER_ENV = "MESHDNS_WORKER"


def is_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


class Supervisor:
    def __init__(self, config: Config, catalog: Path, config_file: str | None) -> None:
        self.config = config
        self.catalog = catalog
        self.config_file = config_file
        self.children: list[subprocess.Popen] = []
        self.stopping = False
        self.command: list[str] = []

    def start(self, server: DnsServer) -> None:
        listen = [arg for host, port in server.bound
                  for arg in ("--listen", f"[{host}]:{port}" if ":" in host else f"{host}:{port}")]
        self.command = [sys.executable, "-m", "meshdns", "serve", "--catalog", str(self.catalog),
                        "--admin", "off", *listen]
        if self.config_file:
            self.command += ["--config", self.config_file]
        for _ in range(self.config.workers - 1):
            self.children.append(self._spawn())
        log.info("started %d worker processes sharing the port (SO_REUSEPORT)",
                 len(self.children))
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self._hup, server)
        asyncio.ensure_future(self._watch())

    def _spawn(self) -> subprocess.Popen:
        env = dict(os.environ, **{WORKER_ENV: "1"})
        return subprocess.Popen(self.command, env=env)

    def _hup(self, server: DnsServer) -> None:
        asyncio.ensure_future(server.hangup())
        for child in self.children:
            child.send_signal(signal.SIGHUP)

    async def _watch(self) -> None:
        while not self.stopping:
            await asyncio.sleep(0.5)
            for i, child in enumerate(self.children):
                if child.poll() is not None and not self.stopping:
                    log.error("worker pid %d exited with %s; restarting", child.pid,
                              child.returncode)
                    self.children[i] = self._spawn()

    def stop(self) -> None:
        self.stopping = True
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()


def serve_workers(config: Config, source: CatalogSource,
                  config_file: str | None = None) -> int:
    """Run the first worker here (on the source already loaded) and supervise the others."""
    install_uvloop()
    catalog: Path = source.path  # type: ignore[attr-defined]  # file sources only, for now
    supervisor = Supervisor(config, catalog, config_file)
    try:
        return asyncio.run(run(config, source, ready=supervisor.start, reuse_port=True))
    finally:
        supervisor.stop()
