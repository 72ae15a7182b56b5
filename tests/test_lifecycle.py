"""The ``meshdns serve`` process: defaults, reloads (SIGHUP, the file watcher, a ConfigMap
symlink flip), a broken edit, several listen addresses, SIGTERM with connections open."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import dns.message
import dns.query
import pytest
from conftest import MeshdnsProcess, recv_exact, wait_for, write_catalog

CATALOG = """\
nodes:
  - {name: node-1, address: 10.0.0.1}
services:
  - {name: web, node: node-1, port: 80}
"""
# the same size as CATALOG, one address changed
EDITED = CATALOG.replace("10.0.0.1", "10.0.0.7")
# a third version, another size: line 4 is where the broken edit below breaks it
GROWN = """\
nodes:
  - {name: node-1, address: 10.0.0.1}
services:
  - {name: web, node: node-1, port: 80, address: 10.0.9.9}
"""
BROKEN = """\
nodes:
  - {name: node-1, address: 10.0.0.1}
services:
  - {name: web, node: node-1, port: eighty}
"""
FIXED = """\
nodes:
  - {name: node-1, address: 10.0.0.1}
services:
  - {name: web, node: node-1, port: 80, address: 10.0.8.8}
"""


def addresses(port: int, name: str = "web.service.consul", tcp: bool = False) -> list[str]:
    query = dns.message.make_query(name, "A")
    send = dns.query.tcp if tcp else dns.query.udp
    reply = send(query, "127.0.0.1", port=port, timeout=3)
    return sorted(rd.address for rrset in reply.answer for rd in rrset)


def soa_serial(port: int) -> int:
    reply = dns.query.udp(dns.message.make_query("consul", "SOA"), "127.0.0.1", port=port,
                          timeout=3)
    return reply.answer[0][0].serial


def messages(server: MeshdnsProcess) -> list[str]:
    return [entry["msg"] for entry in server.logs()]


def reloads(server: MeshdnsProcess) -> list[str]:
    return [m for m in messages(server) if m.startswith("catalog reloaded")]


def signature(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def start(start_server, catalog: Path, *args: str) -> MeshdnsProcess:
    return start_server(catalog=catalog, args=["--admin", "off", *args])


# --- defaults ------------------------------------------------------------------------------


def _busy(port: int) -> str | None:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError as exc:
                return f"127.0.0.1:{port} ({'tcp' if kind == socket.SOCK_STREAM else 'udp'}) " \
                       f"is busy: {exc.strerror}"
    return None


def meshdns_command() -> list[str]:
    """The console script a user runs, installed next to this interpreter."""
    script = Path(sys.executable).parent / "meshdns"
    if script.exists():
        return [str(script)]
    found = shutil.which("meshdns")
    return [found] if found else [sys.executable, "-m", "meshdns"]


def test_serve_with_no_options_serves_the_example_catalog_on_8600(tmp_path: Path) -> None:
    busy = _busy(8600)
    if busy:
        pytest.skip(f"cannot check the default listen address: {busy}")
    if _busy(8601):  # the default admin address: meshdns would fail on it, not on DNS
        pytest.skip(f"cannot run with every default: {_busy(8601)}")
    empty = tmp_path / "empty"
    empty.mkdir()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([*meshdns_command(), "serve"], cwd=empty, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: "serving DNS on 127.0.0.1:8600" in log_path.read_text()
                        or proc.poll() is not None, timeout=20), log_path.read_text()
        assert proc.poll() is None, log_path.read_text()
        text = log_path.read_text()
        assert re.search(r"catalog \S+/meshdns/examples/catalog\.yaml: 17 nodes", text), text
        # web-1 (node-1), web-2 (own address), web-3 (warning); web-4's node is in maintenance
        assert addresses(8600) == ["10.0.1.1", "10.0.1.20", "10.0.1.3"]
        assert addresses(8600, tcp=True) == ["10.0.1.1", "10.0.1.20", "10.0.1.3"]
        assert addresses(8600, "web.virtual.consul") == ["240.0.0.10"]
        assert list(empty.iterdir()) == []  # nothing written to the working directory
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0


# --- reloads -------------------------------------------------------------------------------


def test_sighup_reloads_an_edit_the_watcher_cannot_see(start_server, tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    server = start(start_server, catalog)
    assert addresses(server.port) == ["10.0.0.1"]
    serial = soa_serial(server.port)
    before = signature(catalog)
    # rewrite in place with the same size, then put the old mtime back: the file's identity
    # (inode, mtime, size) is unchanged, so only SIGHUP can make the server read it
    st = os.stat(catalog)
    with open(catalog, "r+") as f:
        f.write(EDITED)
    os.utime(catalog, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert signature(catalog) == before
    server.signal(signal.SIGHUP)
    assert wait_for(lambda: addresses(server.port) == ["10.0.0.7"], timeout=10), server.logs()
    assert addresses(server.port, tcp=True) == ["10.0.0.7"]
    assert [m.split(":")[0] for m in reloads(server)] == ["catalog reloaded (SIGHUP)"]
    assert soa_serial(server.port) > serial


def test_file_watcher_reloads_a_broken_edit_is_kept_out(start_server, tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    server = start(start_server, catalog)
    serial = soa_serial(server.port)

    # an edit alone (no signal) is picked up by the watcher
    write_catalog(catalog, GROWN)
    assert wait_for(lambda: addresses(server.port) == ["10.0.9.9"], timeout=10), server.logs()
    assert [m.split(":")[0] for m in reloads(server)] == ["catalog reloaded (file changed)"]
    grown_serial = soa_serial(server.port)
    assert grown_serial > serial

    # a broken edit: an error naming file:line, the last good catalog keeps answering
    write_catalog(catalog, BROKEN)
    where = f"{catalog}:4: services[0].port"

    def error_logged() -> list[dict]:
        return [e for e in server.logs() if e["level"] == "error" and where in e["msg"]]

    assert wait_for(lambda: error_logged(), timeout=10), server.logs()
    [entry] = error_logged()
    assert entry["msg"].startswith("catalog reload refused, still serving generation 2: ")
    assert "valid integer" in entry["msg"]
    assert server.proc.poll() is None
    assert addresses(server.port) == ["10.0.9.9"]
    assert addresses(server.port, tcp=True) == ["10.0.9.9"]
    assert soa_serial(server.port) == grown_serial
    assert len(reloads(server)) == 1

    # fixing it reloads again
    write_catalog(catalog, FIXED)
    assert wait_for(lambda: addresses(server.port) == ["10.0.8.8"], timeout=10), server.logs()
    assert len(reloads(server)) == 2
    assert soa_serial(server.port) > grown_serial
    assert len(error_logged()) == 1


def test_configmap_symlink_flip_is_picked_up(start_server, tmp_path: Path) -> None:
    """Kubernetes mounts a ConfigMap as ``catalog.yaml -> ..data/catalog.yaml`` with
    ``..data -> ..<timestamp>``; an update writes a new timestamped directory and renames a
    new ``..data`` link over the old one, then deletes the old directory."""
    mount = tmp_path / "mount"
    first = mount / "..2024_01_01_00_00_00.000000001"
    first.mkdir(parents=True)
    write_catalog(first / "catalog.yaml", CATALOG)
    os.symlink(first.name, mount / "..data")
    os.symlink("..data/catalog.yaml", mount / "catalog.yaml")
    server = start(start_server, mount / "catalog.yaml")
    assert addresses(server.port) == ["10.0.0.1"]

    # the new version has the same size and the same mtime: only the inode tells
    second = mount / "..2024_01_01_00_05_00.000000002"
    second.mkdir()
    write_catalog(second / "catalog.yaml", EDITED)
    old = os.stat(first / "catalog.yaml")
    os.utime(second / "catalog.yaml", ns=(old.st_atime_ns, old.st_mtime_ns))
    os.symlink(second.name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(first)
    assert wait_for(lambda: addresses(server.port) == ["10.0.0.7"], timeout=10), server.logs()
    assert [m.split(":")[0] for m in reloads(server)] == ["catalog reloaded (file changed)"]

    # and once more, back to a bigger file
    third = mount / "..2024_01_01_00_10_00.000000003"
    third.mkdir()
    write_catalog(third / "catalog.yaml", GROWN)
    os.symlink(third.name, mount / "..data_tmp")
    os.replace(mount / "..data_tmp", mount / "..data")
    shutil.rmtree(second)
    assert wait_for(lambda: addresses(server.port) == ["10.0.9.9"], timeout=10), server.logs()
    assert len(reloads(server)) == 2


# --- listen addresses, SIGTERM -------------------------------------------------------------


def test_two_listen_addresses_then_sigterm_with_tcp_open(start_server,
                                                         tmp_path: Path) -> None:
    catalog = write_catalog(tmp_path / "catalog.yaml", CATALOG)
    # conftest passes one --listen 127.0.0.1:0; this is the second
    server = start(start_server, catalog, "--listen", "127.0.0.1:0")
    ports = [int(p) for p in re.findall(r"serving DNS on 127\.0\.0\.1:(\d+)",
                                        "\n".join(messages(server)))]
    assert len(ports) == 2 and len(set(ports)) == 2 and server.port in ports
    for port in ports:
        assert addresses(port) == ["10.0.0.1"]
        assert addresses(port, tcp=True) == ["10.0.0.1"]

    # one connection that has had an answer and stays open, one with half a query in it
    query = dns.message.make_query("web.service.consul", "A").to_wire()
    idle = socket.create_connection(("127.0.0.1", ports[0]), timeout=5)
    partial = socket.create_connection(("127.0.0.1", ports[1]), timeout=5)
    try:
        idle.sendall(struct.pack("!H", len(query)) + query)
        size = struct.unpack("!H", recv_exact(idle, 2))[0]
        reply = dns.message.from_wire(recv_exact(idle, size))
        assert [rd.address for rd in reply.answer[0]] == ["10.0.0.1"]
        partial.sendall(struct.pack("!H", len(query)) + query[:5])

        server.signal(signal.SIGTERM)
        assert server.proc.wait(10) == 0
        # the server closed both connections on its way out
        assert idle.recv(1) == b""
        assert partial.recv(1) == b""
    finally:
        idle.close()
        partial.close()
    assert messages(server)[-2:] == ["stopping: draining TCP connections", "stopped"]


def test_a_file_rewritten_in_place_is_read_once_complete(start_server, tmp_path: Path) -> None:
    """Editors and ``cat >`` truncate the file and write it in pieces: the watcher must not
    swap in the half-written (or empty, hence valid and empty) catalog it may see meanwhile."""
    def text(address: str, nodes: int = 1000) -> str:
        lines = ["nodes:"] + [f"  - {{name: n{i:04d}, address: 10.1.{i // 250}.{i % 250 + 1}}}"
                              for i in range(nodes)]
        lines += ["services:", f"  - {{name: web, node: n0000, port: 80, address: {address}}}"]
        return "\n".join(lines) + "\n"

    catalog = write_catalog(tmp_path / "catalog.yaml", text("10.0.0.1"))
    server = start(start_server, catalog)
    for k in range(2, 5):
        new = text(f"10.0.0.{k}")
        with open(catalog, "w") as f:  # truncates: the file is empty until the first write
            for i in range(0, len(new), 2048):
                time.sleep(0.005)
                f.write(new[i:i + 2048])
                f.flush()
        assert wait_for(lambda k=k: addresses(server.port) == [f"10.0.0.{k}"], timeout=10), \
            server.logs()
    counts = [re.search(r"(\d+) nodes", m).group(1) for m in reloads(server)]
    assert counts and set(counts) == {"1000"}, reloads(server)
    assert [e for e in server.logs() if e["level"] == "error"] == []
