"""``workers: N``: N processes on one port (SO_REUSEPORT), all answering, all stopped together."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

from conftest import EXAMPLE_CATALOG, MESHDNS, MeshdnsProcess, wait_for


def worker_pids(server: MeshdnsProcess) -> set[int]:
    text = server.log_path.read_text()
    pattern = r"serving DNS on 127\.0\.0\.1:\d+ \(udp, tcp\), pid (\d+)"
    return {int(pid) for pid in re.findall(pattern, text)}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def ask_from_many_sockets(port: int, count: int, timeout: float = 2.0) -> int:
    """Queries from `count` different source ports (SO_REUSEPORT hashes on them): how many
    were answered, each with the right record."""
    query = struct.pack("!HHHHHH", 7, 0x0100, 1, 0, 0, 0) + b"\x03web\x07virtual\x06consul\x00" \
        + struct.pack("!HH", 1, 1)
    answered = 0
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(query, ("127.0.0.1", port))
            try:
                reply = s.recv(512)
            except TimeoutError:
                continue
            assert reply[:2] == b"\x00\x07" and reply[-4:] == socket.inet_aton("240.0.0.10")
            answered += 1
    return answered


def test_two_workers_share_the_port_and_stop_together(tmp_path: Path) -> None:
    server = MeshdnsProcess(tmp_path, EXAMPLE_CATALOG, config={"workers": 2})
    try:
        assert wait_for(lambda: len(worker_pids(server)) == 2, timeout=20), \
            server.log_path.read_text()
        pids = worker_pids(server)
        assert server.proc.pid in pids
        assert ask_from_many_sockets(server.port, 200) == 200
        # the kernel spreads source ports across the workers' sockets: with the first process
        # frozen, the queries hashed to the other worker are still answered, the rest are not
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            frozen = ask_from_many_sockets(server.port, 40, timeout=0.2)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert 0 < frozen < 40
        # a worker that dies is replaced
        child = next(pid for pid in pids if pid != server.proc.pid)
        os.kill(child, signal.SIGKILL)
        assert wait_for(lambda: len(worker_pids(server)) == 3, timeout=20), \
            server.log_path.read_text()
        assert ask_from_many_sockets(server.port, 50) == 50
    finally:
        code = server.stop()
    assert code == 0
    time.sleep(0.2)
    assert not any(alive(pid) for pid in worker_pids(server) if pid != child)


# --- issue 8 point 7, issue 10 point 7: one instance per port, no orphans, back-off, last good


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's zombie waits for whoever adopted it to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def port_is_free(port: int) -> bool:
    """Both UDP and TCP bind without SO_REUSEPORT: nobody serves the port any more."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            t.bind(("127.0.0.1", port))
            u.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def start_workers(tmp_path: Path, workers: int, catalog: Path = EXAMPLE_CATALOG,
                  config: dict | None = None) -> MeshdnsProcess:
    server = MeshdnsProcess(tmp_path, catalog, config={"workers": workers, **(config or {})})
    assert wait_for(lambda: len(worker_pids(server)) == workers, timeout=30), \
        server.log_path.read_text()
    return server


def test_a_second_instance_on_the_port_is_refused(tmp_path: Path) -> None:
    first = start_workers(tmp_path, 2)
    try:
        for workers in (2, 1):
            config = tmp_path / f"second-{workers}.yaml"
            config.write_text(f"workers: {workers}\nadmin: {{listen: null}}\n")
            second = subprocess.run(
                [*MESHDNS, "serve", "--config", str(config), "--example", "--listen",
                 f"127.0.0.1:{first.port}"], capture_output=True, text=True, timeout=30)
            assert second.returncode == 1, second.stderr
            errors = [json.loads(line) for line in second.stderr.splitlines()]
            assert errors[-1]["level"] == "error"
            assert errors[-1]["msg"].startswith(f"cannot listen on 127.0.0.1:{first.port}: ")
            assert "in use" in errors[-1]["msg"]
            assert "serving DNS" not in second.stderr
        # nobody joined: every query still reaches one of the first instance's two workers
        assert ask_from_many_sockets(first.port, 100) == 100
    finally:
        assert first.stop() == 0


def test_workers_exit_when_their_supervisor_is_killed(tmp_path: Path) -> None:
    server = start_workers(tmp_path, 3)
    workers = worker_pids(server) - {server.proc.pid}
    assert len(workers) == 2 and all(running(pid) for pid in workers)
    assert ask_from_many_sockets(server.port, 20) == 20
    os.kill(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert wait_for(lambda: not any(running(pid) for pid in workers), timeout=10), \
        f"workers {[p for p in workers if running(p)]} outlived their supervisor"
    assert wait_for(lambda: port_is_free(server.port), timeout=5)
    server.stop()


GOOD = """\
nodes:
  - {name: n1, address: 10.0.0.1}
services:
  - {name: web, node: n1, port: 80}
"""


def ask_web(port: int, count: int, timeout: float) -> list[bytes]:
    """web.service.consul A from ``count`` source ports: the answers' addresses."""
    query = struct.pack("!HHHHHH", 9, 0x0100, 1, 0, 0, 0) + b"\x03web\x07service\x06consul\x00" \
        + struct.pack("!HH", 1, 1)
    out = []
    for _ in range(count):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(query, ("127.0.0.1", port))
            try:
                reply = s.recv(512)
            except TimeoutError:
                continue
            out.append(reply[-4:] if reply[3] & 0xF == 0 else b"rcode %d" % (reply[3] & 0xF))
    return out


def test_restarted_worker_serves_the_last_good_catalog_and_backs_off(tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(GOOD)
    server = start_workers(tmp_path, 2, catalog)
    try:
        (worker,) = worker_pids(server) - {server.proc.pid}
        good = socket.inet_aton("10.0.0.1")
        assert set(ask_web(server.port, 30, 2.0)) == {good}
        # the catalog breaks (an atomic replace, as a ConfigMap update): both keep serving
        broken = tmp_path / "catalog.new"
        broken.write_text(GOOD.replace("address: 10.0.0.1", "adress: 10.0.0.1"))
        os.replace(broken, catalog)
        assert wait_for(lambda: sum("catalog reload refused" in e["msg"]
                                    for e in server.logs()) >= 2, timeout=10)
        # a worker dying now comes back on the supervisor's last good catalog; each quick
        # death in a row doubles the wait before the next restart
        delays = []
        for attempt in range(1, 4):
            os.kill(worker, signal.SIGKILL)
            assert wait_for(lambda n=attempt: len(worker_pids(server)) == 2 + n, timeout=20), \
                server.log_path.read_text()
            exits = [e["msg"] for e in server.logs() if "exited with code" in e["msg"]]
            assert len(exits) == attempt
            assert f"worker 1 (pid {worker}) exited with code -9" in exits[-1]
            assert f"(quick exit {attempt} in a row)" in exits[-1]
            delays.append(float(re.search(r"restarting it in ([\d.]+) s", exits[-1]).group(1)))
            (worker,) = worker_pids(server) - {server.proc.pid} - set(dead_workers(server))
        assert delays == [0.5, 1.0, 2.0]
        adopted = [e for e in server.logs()
                   if "serving the supervisor's last good catalog" in e["msg"]]
        assert len(adopted) == 3 and adopted[-1]["pid"] == worker and adopted[-1]["worker"] == 1
        # the restarted worker alone (the supervisor frozen) answers with the good data
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            frozen = ask_web(server.port, 40, 0.3)
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert frozen and set(frozen) == {good}, frozen
        assert set(ask_web(server.port, 30, 2.0)) == {good}
        # a fixed file reaches the restarted worker too
        catalog.write_text(GOOD.replace("10.0.0.1", "10.0.0.2"))
        assert wait_for(lambda: set(ask_web(server.port, 20, 2.0))
                        == {socket.inet_aton("10.0.0.2")}, timeout=10)
    finally:
        assert server.stop() == 0


def dead_workers(server: MeshdnsProcess) -> list[int]:
    return [int(m) for m in re.findall(r"worker \d+ \(pid (\d+)\) exited",
                                       server.log_path.read_text())]


def test_log_lines_name_the_worker(tmp_path: Path) -> None:
    server = start_workers(tmp_path, 2)
    try:
        (worker,) = worker_pids(server) - {server.proc.pid}
        serving = {e["pid"]: e["worker"] for e in server.logs()
                   if e["msg"].startswith("serving DNS on")}
        assert serving == {server.proc.pid: 0, worker: 1}
        assert all("worker" in e and "pid" in e for e in server.logs())
    finally:
        assert server.stop() == 0


def test_a_supervisor_starting_at_the_same_moment_is_refused(tmp_path: Path) -> None:
    """Two supervisors started together both find the port free; the lock lets one through.
    Here the other one's lock is held by this test."""
    import fcntl

    from conftest import free_port

    from meshdns.workers import port_lock_path

    port = free_port()
    with open(port_lock_path("127.0.0.1", port), "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        config = tmp_path / "config.yaml"
        config.write_text("workers: 2\nadmin: {listen: null}\n")
        second = subprocess.run([*MESHDNS, "serve", "--config", str(config), "--example",
                                 "--listen", f"127.0.0.1:{port}"],
                                capture_output=True, text=True, timeout=30)
    assert second.returncode == 1, second.stderr
    last = json.loads(second.stderr.splitlines()[-1])
    assert last["msg"].startswith(f"cannot listen on 127.0.0.1:{port}: another meshdns is "
                                  "starting on it")
    assert port_is_free(port)
