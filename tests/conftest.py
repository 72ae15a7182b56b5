"""Shared fixtures: a real ``meshdns serve`` process on a free port, and ways to ask it.

``MeshdnsProcess`` starts the console script exactly as a user would, reads the bound port from
its log, and offers ``query`` (dnspython, UDP or TCP), ``raw`` (bytes in, bytes out) and ``dig``
(the real binary). Every server is stopped with SIGTERM at the end of its test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_CATALOG = ROOT / "meshdns" / "examples" / "catalog.yaml"
MESHDNS = [sys.executable, "-m", "meshdns"]


def free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind(("127.0.0.1", 0))
            port = t.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port")


class MeshdnsProcess:
    """A running ``meshdns serve``."""

    def __init__(self, workdir: Path, catalog: Path | None = None,
                 config: dict | None = None, args: list[str] | None = None,
                 prefix: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.catalog = catalog
        self.log_path = workdir / f"meshdns-{time.monotonic_ns()}.log"
        # prefix: run it through another command (setpriv, to run as another user)
        cmd = [*(prefix or []), *MESHDNS, "serve", "--listen", "127.0.0.1:0", "--admin",
               "127.0.0.1:0"]
        if config is not None:
            self.config_path = workdir / "config.yaml"
            self.config_path.write_text(yaml.safe_dump(config))
            cmd += ["--config", str(self.config_path)]
        if catalog is not None:
            cmd += ["--catalog", str(catalog)]
        cmd += args or []
        self.log = open(self.log_path, "w+")  # noqa: SIM115 - closed in stop()
        # env: set for this server (MESHDNS_PURE_PYTHON=1: the pure-Python packet path)
        self.env = {**os.environ, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=workdir, env=self.env)
        self.port = 0
        self.admin_port = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            text = self.log_path.read_text()
            m = re.search(r"serving DNS on 127\.0\.0\.1:(\d+)", text)
            a = re.search(r"admin endpoint on http://127\.0\.0\.1:(\d+)", text)
            if m:
                self.port = int(m.group(1))
                self.admin_port = int(a.group(1)) if a else 0
                self.packet_path = check_packet_path(text, self.env)
                break
            if self.proc.poll() is not None:
                raise RuntimeError(f"meshdns exited {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        else:
            self.stop()
            raise RuntimeError(f"meshdns did not start:\n{self.log_path.read_text()}")

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def logs(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                out.append({"level": "raw", "msg": line})
        return out

    def query(self, name: str, rdtype: str | int = "A", *, tcp: bool = False,
              edns: int | None = None, payload: int = 1232, want_dnssec: bool = False,
              timeout: float = 2.0, rd: bool = True) -> dns.message.Message:
        if edns is None and not want_dnssec:  # a payload alone would turn EDNS on
            msg = dns.message.make_query(name, rdtype)
        else:
            msg = dns.message.make_query(name, rdtype, use_edns=edns or 0, payload=payload,
                                         want_dnssec=want_dnssec)
        if not rd:
            msg.flags &= ~dns.flags.RD
        if tcp:
            return dns.query.tcp(msg, "127.0.0.1", port=self.port, timeout=timeout)
        return dns.query.udp(msg, "127.0.0.1", port=self.port, timeout=timeout,
                             ignore_trailing=False, raise_on_truncation=False)

    def raw(self, packet: bytes, timeout: float = 1.0) -> bytes | None:
        """Send bytes over UDP; the reply bytes, or None when the server stays silent."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(packet, self.address)
            try:
                return s.recv(65535)
            except TimeoutError:
                return None

    def raw_tcp(self, packet: bytes, timeout: float = 2.0) -> bytes | None:
        with socket.create_connection(self.address, timeout=timeout) as s:
            s.sendall(struct.pack("!H", len(packet)) + packet)
            try:
                head = recv_exact(s, 2)
                return recv_exact(s, struct.unpack("!H", head)[0])
            except (TimeoutError, ConnectionError):
                return None

    def dig(self, *args: str) -> str:
        """Run the real dig against this server; its stdout."""
        cmd = ["dig", "@127.0.0.1", "-p", str(self.port), "+time=2", "+tries=1", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15,
                              check=True).stdout

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        stop_process(self.proc, 10)
        self.log.close()
        return self.proc.returncode


def check_packet_path(log: str, env: dict[str, str]) -> str:
    """The UDP packet path a server logged it uses, checked against the one it must use: the
    compiled one unless MESHDNS_PURE_PYTHON=1, so that no test run (CI's included) passes on
    the fallback alone because the extension failed to build (tests/test_packet_path.py)."""
    m = re.search(r'UDP packet path: (compiled|pure Python)[^"]*', log)
    assert m, f"meshdns did not say which UDP packet path it uses:\n{log}"
    expected = "pure Python" if env.get("MESHDNS_PURE_PYTHON") == "1" else "compiled"
    assert m.group(1) == expected, (
        f"expected the {expected} packet path: {m.group(0)} (a venv made before the extension "
        "existed: run ./scripts/venv test, whose pip install -e . builds it)")
    return m.group(0)


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds; waits for the exit."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def addresses(msg: dns.message.Message) -> list[str]:
    """The A/AAAA addresses of a reply's answer section, sorted."""
    return sorted(rr.address for rrset in msg.answer for rr in rrset
                  if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA))


def srv(msg: dns.message.Message) -> list[tuple[int, str]]:
    """(port, target) of a reply's SRV answers, sorted."""
    return sorted((rr.port, rr.target.to_text()) for rrset in msg.answer for rr in rrset
                  if rrset.rdtype == dns.rdatatype.SRV)


def glue(msg: dns.message.Message) -> dict[str, list[str]]:
    """Additional A/AAAA records: owner -> sorted addresses."""
    out: dict[str, list[str]] = {}
    for rrset in msg.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.setdefault(rrset.name.to_text(), []).extend(rr.address for rr in rrset)
    return {k: sorted(v) for k, v in out.items()}


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from a stream socket (ConnectionError if it closes first)."""
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_catalog(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator:
    """``start_server(catalog=..., config=..., args=...)`` -> MeshdnsProcess (stopped after)."""
    started: list[MeshdnsProcess] = []

    def start(catalog: Path | None = None, config: dict | None = None,
              args: list[str] | None = None) -> MeshdnsProcess:
        server = MeshdnsProcess(tmp_path, catalog, config, args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="module")
def example_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    """One server on the shipped example catalog, shared by a module's read-only tests."""
    server = MeshdnsProcess(tmp_path_factory.mktemp("example"), EXAMPLE_CATALOG)
    yield server
    server.stop()


def require_binary(name: str) -> str:
    """The path of a tool the project's CI installs; a clear failure when it is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)
    if path is None:
        pytest.fail(f"{name} is not installed: run .ci/run (it installs the Debian packages)")
    return path


# --- the Kubernetes manifests, as `kubectl apply -k configs/kubernetes` creates them ----------


def kustomization(directory: Path) -> dict:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


def generator_inputs(directory: Path) -> set[Path]:
    """Files that configMapGenerator turns into ConfigMaps (not manifests themselves)."""
    return {directory / file.partition("=")[2] if "=" in file else directory / file
            for generator in kustomization(directory).get("configMapGenerator", [])
            for file in generator.get("files", [])}


def generated_configmaps(directory: Path) -> list[dict]:
    """The ConfigMaps configMapGenerator makes, named as the manifests reference them (kustomize
    appends a hash of the content to the name and rewrites those references; the kubectl test
    in test_deploy_files checks that it does)."""
    out = []
    for generator in kustomization(directory).get("configMapGenerator", []):
        data = {}
        for file in generator.get("files", []):
            key, _, path = file.rpartition("=") if "=" in file else ("", "", file)
            data[key or Path(path).name] = (directory / path).read_text()
        metadata = {"name": generator["name"]}
        if generator.get("namespace"):
            metadata["namespace"] = generator["namespace"]
        labels = generator.get("options", {}).get("labels")
        if labels:
            metadata["labels"] = labels
        out.append({"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data})
    return out
