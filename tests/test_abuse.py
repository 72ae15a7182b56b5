"""Issue 8, held under abuse: one test per defect, over real sockets on loopback, each bounded
in time, with RSS and file-descriptor figures read from /proc where memory is the point.

Each test names the issue's point it shows; before the fix each of them failed (the figures
the issue measured are quoted next to the bound)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import urllib.request
from pathlib import Path

import conftest
import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import MeshdnsProcess, recv_exact, wait_for, write_catalog


@pytest.fixture(autouse=True, scope="module")
def _many_files() -> None:
    """Some tests open thousands of sockets: the soft open-file limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def metric(server: MeshdnsProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def catalog(tmp_path: Path, instances: int = 40) -> Path:
    nodes = "".join(f"  - {{name: n{i}, address: 10.1.{i // 200}.{i % 200 + 1}}}\n"
                    for i in range(instances))
    big = "".join(f"  - {{name: big, id: big-{i}, node: n{i}, port: {1000 + i}}}\n"
                  for i in range(instances))
    return write_catalog(tmp_path / "catalog.yaml",
                         "nodes:\n" + nodes + "services:\n"
                         "  - {name: web, id: web-1, node: n0, port: 80}\n" + big)


def frame(msg: dns.message.Message | bytes) -> bytes:
    wire = msg if isinstance(msg, bytes) else msg.to_wire()
    return struct.pack("!H", len(wire)) + wire


def read_reply(sock: socket.socket) -> dns.message.Message:
    size = struct.unpack("!H", recv_exact(sock, 2))[0]
    return dns.message.from_wire(recv_exact(sock, size))


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """True once the server closes ``sock`` (EOF or reset) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if not sock.recv(65536):
                return True
    except (ConnectionError, OSError) as exc:
        return not isinstance(exc, TimeoutError)
    return False


def tcp_answer(port: int, name: str = "web.service.consul", source: str = "127.0.0.1",
               timeout: float = 3.0) -> dns.message.Message:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0)) as s:
        s.sendall(frame(dns.message.make_query(name, "A")))
        return read_reply(s)


# --- point 1: a TCP client that never reads its replies ----------------------------------------


def test_tcp_client_that_never_reads_is_bounded_then_cut(start_server, tmp_path: Path) -> None:
    """Issue: 52 MB -> 1 GB in 10 s from pipelined queries whose replies were never read, still
    held after the client stopped. Now reading stops past 256 KiB of unread replies, RSS stays
    flat, and the connection is cut after dns.tcp_idle_timeout."""
    server = start_server(catalog=catalog(tmp_path), config={"dns": {"tcp_idle_timeout": "2s"}})
    pid = server.proc.pid
    before = rss_mb(pid)
    query = frame(dns.message.make_query("big.service.consul", "SRV"))  # ~2.5 KB replies
    sock = socket.create_connection(server.address, timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    sent = 0
    blocked_since = None
    deadline = time.monotonic() + 8
    chunk = query * 2000  # 70 KB of queries: 5 MB of replies
    while time.monotonic() < deadline:
        try:
            sent += sock.send(chunk)
            blocked_since = None
        except BlockingIOError:
            blocked_since = blocked_since or time.monotonic()
            if time.monotonic() - blocked_since > 1.0:
                break  # the server stopped reading: back-pressure reached the client
            select.select([], [sock], [], 0.05)
    peak = rss_mb(pid)
    assert blocked_since is not None, f"the server kept reading: {sent} bytes sent"
    # unbounded, ~{sent / len(query)} replies of ~2.5 KB would be held (the issue: +950 MB)
    assert sent < 20 << 20
    assert peak - before < 40, (before, peak, sent)
    # nobody reads: cut after the idle timeout, and the memory goes with it
    sock.setblocking(True)
    assert wait_for(lambda: metric(server, "meshdns_tcp_stalled_total") == 1, timeout=10)
    assert closed_by_server(sock, 5)
    sock.close()
    assert rss_mb(pid) - before < 40
    assert tcp_answer(server.port).answer


# --- point 2: the response cache in bytes ------------------------------------------------------


def test_padded_queries_are_answered_not_cached(start_server, tmp_path: Path) -> None:
    """Issue: 10,000 UDP queries with 60 KB of EDNS padding took RSS 52 -> 643 MB (they were all
    cached). Now they are answered and never stored; RSS stays flat."""
    server = start_server(catalog=catalog(tmp_path))
    pid = server.proc.pid
    before = rss_mb(pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    sock.settimeout(5)
    answered = 0
    rng = random.Random(2)
    for i in range(10_000):
        padding = dns.edns.GenericOption(12, rng.randbytes(60_000))
        msg = dns.message.make_query("web.service.consul", "A", use_edns=0, payload=1232,
                                     options=[padding])
        sock.sendto(msg.to_wire(max_size=65535), server.address)
        reply = dns.message.from_wire(sock.recv(65535))
        answered += bool(reply.answer)
        if i % 2500 == 0:
            assert rss_mb(pid) - before < 30
    sock.close()
    assert answered == 10_000
    assert rss_mb(pid) - before < 30  # the issue: +591 MB
    assert metric(server, "meshdns_cache_entries") < 10


def test_distinct_names_fill_the_cache_to_its_byte_budget(start_server, tmp_path: Path) -> None:
    """The byte budget holds for plain queries too: 40,000 distinct names with cache.max_bytes
    2 MiB leave at most 2 MiB charged per transport, and RSS follows."""
    budget = 2 << 20
    server = start_server(catalog=catalog(tmp_path), config={"cache": {"max_bytes": budget}})
    pid = server.proc.pid
    before = rss_mb(pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    for i in range(40_000):
        name = f"n{i:06d}-{'x' * 50}.service.consul"
        sock.sendto(dns.message.make_query(name, "A").to_wire(), server.address)
        if i % 64 == 63:
            for _ in range(64):
                sock.recv(4096)
    sock.close()
    assert 0 < metric(server, "meshdns_cache_bytes") <= budget
    entries = metric(server, "meshdns_cache_entries")
    assert 1000 < entries < 40_000
    assert rss_mb(pid) - before < 25


# --- point 5: TCP lock-out -------------------------------------------------------------------


def test_one_address_cannot_lock_others_out(start_server, tmp_path: Path) -> None:
    """Issue: 1,100 connections from one address held new TCP queries at 0 answered for 30 s.
    Now one address gets dns.tcp_max_connections_per_client (64); the rest are closed on
    accept, and clients elsewhere are answered."""
    # (a long idle timeout: the held connections must outlive opening the 1,100)
    server = start_server(catalog=catalog(tmp_path), config={"dns": {"tcp_idle_timeout": "60s"}})
    held = []
    try:
        for _ in range(1100):
            held.append(socket.create_connection(server.address, timeout=5))
        assert wait_for(lambda: metric(server, "meshdns_tcp_refused_total") == 1100 - 64,
                        timeout=10)
        assert metric(server, "meshdns_tcp_connections") == 64
        for other in ("127.0.0.2", "127.0.0.3"):
            assert [rr.address for rr in tcp_answer(server.port, source=other).answer[0]]
        assert server.query("web.service.consul").answer  # and UDP, of course
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: metric(server, "meshdns_tcp_connections") == 0, timeout=5)
    assert tcp_answer(server.port).answer  # the address is welcome again


def test_at_the_global_cap_reloads_still_work(start_server, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue: at the connection cap, reloads failed with EMFILE. The global cap is lowered to
    leave descriptors for reloads and the admin port: here under an open-file limit of 400,
    with 1,200 connections from 20 addresses, a catalog edit is still read and /metrics
    still answers."""
    wrapper = ("import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, "
               "(400, 400)); sys.argv[0] = 'meshdns'; runpy.run_module('meshdns', "
               "run_name='__main__')")
    monkeypatch.setattr(conftest, "MESHDNS", [sys.executable, "-c", wrapper])
    path = catalog(tmp_path)
    server = start_server(catalog=path)
    limit = [entry for entry in server.logs() if "open-file limit" in entry["msg"]]
    assert limit, "the cap was not lowered to fit the open-file limit"
    held = []
    try:
        for i in range(1200):
            source = f"127.0.0.{2 + i % 20}"
            held.append(socket.create_connection(server.address, timeout=5,
                                                 source_address=(source, 0)))
        assert wait_for(lambda: metric(server, "meshdns_tcp_refused_total") > 0, timeout=10)
        assert fds(server.proc.pid) < 400
        path.write_text(path.read_text().replace("{name: web, id: web-1, node: n0",
                                                 "{name: web, id: web-1, node: n1"))
        assert wait_for(lambda: [rr.address for rr in server.query("web.service.consul")
                                 .answer[0]] == ["10.1.0.2"], timeout=10), server.logs()[-5:]
    finally:
        for s in held:
            s.close()


def test_empty_frames_do_not_keep_a_connection_open(start_server, tmp_path: Path) -> None:
    """Issue: empty 2-byte frames re-armed the idle timer, so a connection could be held
    forever. Now only a complete, answerable query counts as activity."""
    server = start_server(catalog=catalog(tmp_path), config={"dns": {"tcp_idle_timeout": "1s"}})
    empty = socket.create_connection(server.address, timeout=5)
    junk = socket.create_connection(server.address, timeout=5)
    busy = socket.create_connection(server.address, timeout=5)
    query = frame(dns.message.make_query("web.service.consul", "A"))
    started = time.monotonic()
    empty_closed = junk_closed = None
    try:
        while time.monotonic() - started < 3.0:
            for sock, kind in ((empty, "empty"), (junk, "junk")):
                try:
                    sock.sendall(b"\0\0" if kind == "empty" else frame(b"\xff" * 12))
                except OSError:
                    if kind == "empty" and empty_closed is None:
                        empty_closed = time.monotonic() - started
                    if kind == "junk" and junk_closed is None:
                        junk_closed = time.monotonic() - started
            busy.sendall(query)
            assert read_reply(busy).answer  # a real query every 0.2 s: stays open
            time.sleep(0.2)
        for sock in (empty, junk):
            assert closed_by_server(sock, 0.5)
        assert empty_closed is None or empty_closed < 2.5
        assert junk_closed is None or junk_closed < 2.5
        busy.sendall(query)
        assert read_reply(busy).answer
    finally:
        for sock in (empty, junk, busy):
            sock.close()


# --- point 8: the client's EDNS size ---------------------------------------------------------


def test_edns_65000_gets_at_most_1232_bytes_and_tc(start_server, tmp_path: Path) -> None:
    """Issue: a 45-byte SRV query for a 300-instance service got a 34,025-byte UDP reply."""
    server = start_server(catalog=catalog(tmp_path, 300))
    for rtype in ("SRV", "A"):
        for _ in range(3):
            msg = dns.message.make_query("big.service.consul", rtype, use_edns=0,
                                         payload=65000)
            raw = server.raw(msg.to_wire(), timeout=3)
            assert raw is not None and len(raw) <= 1232
            reply = dns.message.from_wire(raw)
            assert reply.flags & dns.flags.TC and reply.answer
        full = server.query("big.service.consul", rtype, tcp=True)
        assert sum(len(rrset) for rrset in full.answer) == 300


# --- point 9: SIGTERM drains TCP -------------------------------------------------------------


class SlowRecursor:
    """A TCP recursor on loopback that answers every query after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            try:
                query = dns.message.from_wire(recv_exact(conn, struct.unpack(
                    "!H", recv_exact(conn, 2))[0]))
                time.sleep(self.delay)
                reply = dns.message.make_response(query)
                reply.answer.append(dns.rrset.from_text(query.question[0].name, 60, "IN", "A",
                                                        "192.0.2.1"))
                conn.sendall(frame(reply))
            except (OSError, ConnectionError):
                pass

    def close(self) -> None:
        self.listener.close()


def test_sigterm_answers_in_flight_tcp_queries(start_server, tmp_path: Path) -> None:
    """Issue: SIGTERM reset every in-flight TCP query (20 of 20 lost). Now the listeners stop
    accepting, what was received is answered (forwards to a recursor taking 1 s included),
    and the process exits 0 within the 5 s drain bound."""
    import dns.rrset  # noqa: F401 - SlowRecursor uses it

    recursor = SlowRecursor(1.0)
    server = start_server(catalog=catalog(tmp_path), config={
        "dns": {"recursors": [f"127.0.0.1:{recursor.port}"], "recursor_timeout": "4s"}})
    clients = [socket.create_connection(server.address, timeout=8) for _ in range(20)]
    try:
        for i, sock in enumerate(clients):
            sock.sendall(frame(dns.message.make_query(f"host{i}.example.org", "A"))
                         + frame(dns.message.make_query("web.service.consul", "A")))
        time.sleep(0.2)  # the forwards are under way
        started = time.monotonic()
        server.signal(signal.SIGTERM)
        answered = 0
        for sock in clients:
            replies = [read_reply(sock), read_reply(sock)]
            answered += sum(1 for r in replies if r.rcode() == dns.rcode.NOERROR and r.answer)
            assert closed_by_server(sock, 6)
        assert answered == 40
        assert server.proc.wait(10) == 0
        assert time.monotonic() - started < 6
        # no new connection once draining
        with pytest.raises(OSError):
            socket.create_connection(server.address, timeout=1).recv(1)
    finally:
        for sock in clients:
            sock.close()
        recursor.close()


# --- point 10: recursors ---------------------------------------------------------------------


def test_silent_recursor_flood_is_bounded(start_server, tmp_path: Path) -> None:
    """Issue: each forward to a silent recursor held a socket for the whole timeout with no
    limit (~1,000 fds at 1,000 forwards/s). Now at most dns.recursor_max_pending wait; past it
    SERVFAIL at once; their sockets are closed at the timeout."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never answers
    try:
        server = start_server(catalog=catalog(tmp_path), config={"dns": {
            "recursors": [f"127.0.0.1:{silent.getsockname()[1]}"], "recursor_timeout": "2s",
            "recursor_max_pending": 50}})
        pid = server.proc.pid
        before = fds(pid)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        servfail = 0

        def receive() -> int:
            got = 0
            while True:
                try:
                    reply = dns.message.from_wire(sock.recv(4096))
                except BlockingIOError:
                    return got
                got += reply.rcode() == dns.rcode.SERVFAIL

        started = time.monotonic()
        peak = 0
        for i in range(1000):
            sock.sendto(dns.message.make_query(f"h{i}.example.org", "A").to_wire(),
                        server.address)
            if i % 20 == 19:
                time.sleep(0.002)
                servfail += receive()
                peak = max(peak, fds(pid))
        while time.monotonic() - started < 1.5:  # well before the 2 s timeout
            select.select([sock], [], [], 0.1)
            servfail += receive()
        assert servfail >= 900, servfail  # 950 past the cap, at once
        assert peak - before <= 50 + 5
        assert wait_for(lambda: fds(pid) <= before + 2, timeout=6)  # closed at the timeout
        assert metric(server, "meshdns_recursor_rejected_total") >= 900
        assert metric(server, "meshdns_recursor_timeouts_total") >= 40
        assert metric(server, "meshdns_recursor_pending") == 0
        sock.close()
    finally:
        silent.close()


# --- point 6: the admin endpoint -------------------------------------------------------------


def test_admin_idle_connections_are_capped_and_timed_out(start_server, tmp_path: Path) -> None:
    """Issue: 3,000 idle connections to the admin port were all held, with no header timeout.
    Now at most admin.max_connections are held, and idle or slow ones go after
    admin.idle_timeout."""
    server = start_server(catalog=catalog(tmp_path), config={"admin": {"idle_timeout": "1s"}})
    pid = server.proc.pid
    before = fds(pid)
    held = []
    try:
        for _ in range(3000):
            held.append(socket.create_connection(("127.0.0.1", server.admin_port), timeout=5))
        assert fds(pid) - before <= 64 + 4
        assert wait_for(lambda: fds(pid) <= before + 2, timeout=10)  # all timed out
        for s in held:
            s.close()
        held.clear()

        def healthy() -> bool:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/health",
                                              timeout=3).read() == b"ok\n"
            except OSError:
                return False

        # the 3,000 just closed (some still in the accept backlog) are gone before the next
        # part: a slow-loris counted against them would be shut at once, not timed out
        assert wait_for(lambda: fds(pid) <= before + 2, timeout=10)
        assert wait_for(healthy, timeout=5)
        # a slow-loris: one header byte at a time is not a request
        slow = socket.create_connection(("127.0.0.1", server.admin_port), timeout=5)
        held.append(slow)
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        started = time.monotonic()
        try:
            while time.monotonic() - started < 4:
                slow.sendall(b"X")
                time.sleep(0.2)
        except OSError:
            pass
        assert 0.5 < time.monotonic() - started < 3
        assert wait_for(healthy, timeout=5)
    finally:
        for s in held:
            s.close()


def test_malformed_requests_log_one_json_line_rate_limited(start_server,
                                                           tmp_path: Path) -> None:
    """Issue: each malformed request logged a multi-line traceback (1 MB of log per 48 KB
    sent). Now: one JSON line at most a second, counting the ones left out."""
    server = start_server(catalog=catalog(tmp_path))
    lines_before = len(server.log_path.read_text().splitlines())
    bad = [b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
           b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n",
           b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\n\r\n",
           b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(64)]
    sent = 0
    for i in range(200):
        with socket.create_connection(("127.0.0.1", server.admin_port), timeout=5) as s:
            s.sendall(bad[i % len(bad)])
            sent += len(bad[i % len(bad)])
            with contextlib.suppress(OSError):
                s.recv(4096)
    assert urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/health",
                                  timeout=3).read() == b"ok\n"
    text = server.log_path.read_text()
    new = text.splitlines()[lines_before:]
    assert "Traceback" not in text
    for line in new:
        json.loads(line)  # every line is one JSON object
    admin_lines = [line for line in new if "admin:" in line]
    assert 1 <= len(admin_lines) <= 10, new
    assert len("\n".join(new)) < sent / 10


def test_catalog_endpoint_on_a_large_catalog_does_not_stall_dns(start_server,
                                                                tmp_path: Path) -> None:
    """Issue: /v1/catalog sorted every service on the event loop (~250 ms a request at 200k
    services); two looping clients raised the DNS median to 253 ms. Now the summary is made
    once per snapshot, in a worker thread."""
    services = 100_000
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({
        "nodes": [{"name": f"n{i}", "address": f"10.2.{i // 250}.{i % 250 + 1}"}
                  for i in range(1000)],
        "services": [{"name": f"svc-{i}", "id": f"svc-{i}", "node": f"n{i % 1000}",
                      "port": 80} for i in range(services)]}))
    server = start_server(catalog=path, config={"catalog": {"max_size": "64MiB"}})
    url = f"http://127.0.0.1:{server.admin_port}/v1/catalog"
    stop = threading.Event()
    requests = [0]

    def loop() -> None:
        while not stop.is_set():
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
            assert body["counts"]["services"] == services and len(body["services"]) == 1000
            requests[0] += 1

    clients = [threading.Thread(target=loop, daemon=True) for _ in range(2)]
    for thread in clients:
        thread.start()
    latencies = []
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.settimeout(5)
    try:
        deadline = time.monotonic() + 4
        i = 0
        while time.monotonic() < deadline:
            msg = dns.message.make_query(f"svc-{i % services}.service.consul", "A")
            i += 7919
            started = time.monotonic()
            sock.sendto(msg.to_wire(), server.address)
            sock.recv(4096)
            latencies.append(time.monotonic() - started)
            time.sleep(0.01)
    finally:
        stop.set()
        for thread in clients:
            thread.join(30)
        sock.close()
    latencies.sort()
    median = latencies[len(latencies) // 2]
    assert requests[0] >= 10
    assert median < 0.05, (median, requests[0])  # the issue: 253 ms
