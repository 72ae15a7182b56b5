"""``workers: N``: N processes on one port (SO_REUSEPORT), all answering, all stopped together."""

from __future__ import annotations

import os
import re
import signal
import socket
import struct
import time
from pathlib import Path

from conftest import EXAMPLE_CATALOG, MeshdnsProcess, wait_for


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
