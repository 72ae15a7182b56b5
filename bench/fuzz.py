"""Hostile inputs against a running meshdns, over UDP and TCP, every reply parsed by dnspython.

    python bench/fuzz.py --count 1000000            # starts its own server on 127.0.0.1
    python bench/fuzz.py --server 127.0.0.1:8600 --pid 1234 --count 200000

Inputs (seeded, reproducible): random bytes of every length, mutations of valid queries (bit
flips, truncation, insertion, byte swaps), compression-pointer loops and forward pointers in the
question, names at and past 255 bytes and labels past 63, odd EDNS (sizes 0-65535, versions,
DO, many and huge options, padding, client-subnet variants, two OPTs), many questions, every
opcode, flags, classes and types (AXFR, ANY, OPT), answer/authority records in a query, TSIG.
A fifth of them go over TCP, pipelined on a few connections (plus empty and junk frames).

Findings: a reply dnspython cannot parse (strictly), one without QR or with several questions, a
traceback or
"internal error" in the server log, the server gone, TCP connections closed under well-formed
framing. RSS (VmRSS of the server) is sampled every ``--rss-every`` seconds and printed as a
curve at the end; ``--json`` writes everything. Loopback only; bounded by --count and --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dns.exception
import dns.message
import dns.query

ROOT = Path(__file__).resolve().parent.parent
CATALOG = """\
nodes:
""" + "".join(f"  - {{name: n{i}, address: 10.0.0.{i + 1}, meta: {{rack: r{i % 4}}}}}\n"
              for i in range(60)) + """\
services:
""" + "".join(f"  - {{name: web, id: web-{i}, node: n{i}, port: 8080, tags: [v{i % 3}]}}\n"
              for i in range(40)) + """\
  - {name: db, id: db-1, node: n1, address: 2001:db8::1, port: 5432}
  - {name: alias, id: alias-1, node: n2, address: web.service.consul, port: 80}
  - {name: api, id: api-1, node: n3, port: 80}
  - {name: api-sidecar-proxy, id: api-1-proxy, node: n3, port: 21000, kind: connect-proxy,
     destination: api}
prepared_queries:
  - {name: pq-web, service: web}
"""
NAMES = ["web.service.consul", "_web._tcp.service.consul", "v1.web.service.consul",
         "db.service.consul", "alias.service.consul", "api.connect.consul",
         "web.virtual.consul", "n1.node.consul", "n1.node.dc1.consul", "pq-web.query.consul",
         "0a000001.addr.dc1.consul", "consul", "missing.service.consul",
         "1.0.0.10.in-addr.arpa", "example.org", "WEB.Service.CONSUL"]
TYPES = [1, 28, 33, 16, 255, 6, 2, 12, 5, 0, 41, 251, 252, 65535, 99]


def name_wire(name: str) -> bytes:
    out = b""
    for label in name.strip(".").split("."):
        if label:
            out += bytes([len(label)]) + label.encode()
    return out + b"\0"


def opt(size: int = 1232, version: int = 0, do: bool = False, options: bytes = b"",
        rcode_hi: int = 0) -> bytes:
    ttl = (rcode_hi << 24) | (version << 16) | (0x8000 if do else 0)
    return b"\0" + struct.pack("!HHIH", 41, size, ttl, len(options)) + options


def option(code: int, body: bytes) -> bytes:
    return struct.pack("!HH", code, len(body)) + body


def valid(rng: random.Random) -> bytes:
    """A well-formed query (sometimes with EDNS)."""
    qid = rng.randrange(65536)
    name = rng.choice(NAMES)
    qtype = rng.choice(TYPES[:9])
    edns = rng.random() < 0.5
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 1 if edns else 0)
    body = name_wire(name) + struct.pack("!HH", qtype, 1)
    return header + body + (opt(rng.choice([512, 1232, 4096, 65535])) if edns else b"")


def hostile(rng: random.Random) -> bytes:
    """One hostile input."""
    kind = rng.randrange(12)
    qid = rng.randrange(65536)
    if kind == 0:  # random bytes, any length
        return os.urandom(rng.choice([0, 1, 2, 11, 12, 13, rng.randrange(512),
                                      rng.randrange(4096)]))
    if kind in (1, 2, 3):  # mutations of a valid query
        data = bytearray(valid(rng))
        for _ in range(rng.randrange(1, 6)):
            op = rng.randrange(4)
            if op == 0 and data:
                i = rng.randrange(len(data))
                data[i] ^= 1 << rng.randrange(8)
            elif op == 1 and data:
                del data[rng.randrange(len(data)):]
            elif op == 2:
                i = rng.randrange(len(data) + 1)
                data[i:i] = os.urandom(rng.randrange(1, 8))
            elif len(data) > 2:
                i, j = rng.randrange(len(data)), rng.randrange(len(data))
                data[i], data[j] = data[j], data[i]
        return bytes(data)
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    if kind == 4:  # compression pointers in the question: loops, forward, to the header
        target = rng.choice([12, 13, 0, 2, 14, 0x3FFF])
        qname = rng.choice([b"", b"\x03web"]) + struct.pack("!H", 0xC000 | target)
        return header + qname + struct.pack("!HH", 1, 1)
    if kind == 5:  # long names and long labels
        label = rng.choice([63, 64, 100, 255])
        count = rng.randrange(1, 10)
        qname = (bytes([min(label, 255)]) + b"a" * label) * count + b"\0"
        return header + qname + struct.pack("!HH", 1, 1)
    if kind == 6:  # odd EDNS
        size = rng.choice([0, 1, 511, 512, 513, 1232, 4096, 65000, 65535])
        opts = b""
        for _ in range(rng.randrange(4)):
            code = rng.choice([8, 10, 12, 3, 15, 65001, 0])
            body = os.urandom(rng.choice([0, 1, 4, 8, 16, 40, 400]))
            if code == 8 and rng.random() < 0.5:
                body = b"\x00\x01" + bytes([rng.randrange(40), rng.randrange(40)]) + body[:4]
            opts += option(code, body)
        if rng.random() < 0.2:
            opts += option(12, b"\0" * rng.choice([1000, 60000]))  # padding
        records = opt(size, rng.choice([0, 0, 0, 1, 255]), rng.random() < 0.5, opts[:65000])
        count = 1
        if rng.random() < 0.1:
            records += opt()
            count = 2
        h = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, count)
        return h + name_wire(rng.choice(NAMES)) + struct.pack("!HH", rng.choice(TYPES), 1) \
            + records
    if kind == 7:  # many questions
        n = rng.choice([0, 2, 3, 100, 3000])
        h = struct.pack("!HHHHHH", qid, 0x0100, n, 0, 0, 0)
        return h + (name_wire("web.service.consul") + struct.pack("!HH", 1, 1)) * min(n, 3000)
    if kind == 8:  # opcodes, flags, classes, types
        flags = rng.randrange(65536) & ~0x8000 if rng.random() < 0.9 else rng.randrange(65536)
        h = struct.pack("!HHHHHH", qid, flags, 1, 0, 0, 0)
        return h + name_wire(rng.choice(NAMES)) + struct.pack(
            "!HH", rng.choice(TYPES), rng.choice([1, 3, 4, 254, 255, 0, 65535]))
    if kind == 9:  # records in answer/authority, TSIG in additional
        rr = name_wire("web.service.consul") + struct.pack("!HHIH", rng.choice([1, 250, 6]),
                                                           rng.choice([1, 255]), 0, 4) + b"\0" * 4
        an, ns, ar = rng.randrange(3), rng.randrange(3), rng.randrange(3)
        h = struct.pack("!HHHHHH", qid, 0x0100, 1, an, ns, ar)
        return h + name_wire("web.service.consul") + struct.pack("!HH", 1, 1) \
            + rr * (an + ns + ar)
    if kind == 10:  # counts that lie
        h = struct.pack("!HHHHHH", qid, 0x0100, rng.randrange(65536), rng.randrange(65536),
                        rng.randrange(65536), rng.randrange(65536))
        return h + name_wire(rng.choice(NAMES)) + struct.pack("!HH", 1, 1)
    return valid(rng)  # some valid traffic keeps the cache paths busy


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


class Findings:
    def __init__(self) -> None:
        self.items: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def add(self, what: str, example: bytes | str = b"") -> None:
        self.items[what] = self.items.get(what, 0) + 1
        if what not in self.examples:
            self.examples[what] = example.hex() if isinstance(example, bytes) else example


def check_reply(reply: bytes, query: bytes | None, findings: Findings) -> None:
    """The reply must parse with dnspython, strictly (no trailing bytes), and be a response
    to a question the client could have asked (QR set, at most one question)."""
    try:
        msg = dns.message.from_wire(reply, ignore_trailing=False)
    except dns.exception.DNSException as exc:
        findings.add(f"reply not parseable: {type(exc).__name__}", reply[:200])
        return
    if not msg.flags & 0x8000:
        findings.add("reply without QR", reply[:40])
    if len(msg.question) > 1:
        findings.add("reply with several questions", reply[:40])
    if query is not None and len(query) >= 12 and reply[:2] != query[:2]:
        findings.add("reply ID differs from the query's", reply[:40])


def fuzz_udp(host: str, port: int, inputs: int, rng: random.Random, findings: Findings,
             tick) -> tuple[int, int]:
    """Send ``inputs`` datagrams with at most WINDOW unanswered; every reply is checked."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.connect((host, port))
    sock.setblocking(False)
    sent = replies = 0
    window = 256
    while sent < inputs:
        for _ in range(min(window, inputs - sent)):
            packet = hostile(rng)
            if len(packet) > 65507:
                packet = packet[:65507]
            try:
                sock.send(packet)
            except OSError:
                continue
            sent += 1
        # read until the replies stop coming (many inputs are rightly dropped unanswered)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if not select.select([sock], [], [], 0.003)[0]:
                break
            while True:
                try:
                    reply = sock.recv(65535)
                except BlockingIOError:
                    break
                replies += 1
                check_reply(reply, None, findings)
        tick(sent)
    sock.close()
    return sent, replies


def fuzz_tcp(host: str, port: int, inputs: int, rng: random.Random, findings: Findings,
             tick) -> tuple[int, int]:
    """Pipelined frames on a connection, replies read as they come; every 1,000 inputs a fresh
    connection, and now and then empty, junk or half frames on throwaway connections."""
    sent = replies = 0
    while sent < inputs:
        batch = min(1000, inputs - sent)
        try:
            conn = socket.create_connection((host, port), timeout=5)
        except OSError as exc:
            findings.add(f"TCP connect failed: {exc.strerror}")
            time.sleep(0.1)
            continue
        buf = b""
        expected = 0
        closed = False
        for i in range(batch):
            packet = hostile(rng)[:65535]
            if rng.random() < 0.02:  # an empty frame: no reply
                frame = b"\0\0"
            else:
                frame = struct.pack("!H", len(packet)) + packet
                if len(packet) >= 12 and not (packet[2] & 0x80):
                    expected += 1  # may be dropped (short, QR set): counted loosely
            try:
                conn.sendall(frame)
            except OSError:
                closed = True
                break
            sent += 1
            if i % 50 == 49 or i == batch - 1:
                conn.settimeout(0.5 if i == batch - 1 else 0.001)
                while True:
                    try:
                        chunk = conn.recv(1 << 20)
                    except (TimeoutError, BlockingIOError):
                        break
                    except OSError:
                        closed = True
                        break
                    if not chunk:
                        closed = True
                        break
                    buf += chunk
                    while len(buf) >= 2 and len(buf) >= 2 + struct.unpack_from("!H", buf)[0]:
                        size = struct.unpack_from("!H", buf)[0]
                        reply, buf = buf[2:2 + size], buf[2 + size:]
                        replies += 1
                        check_reply(reply, None, findings)
                if closed:
                    break
        if closed:
            findings.add("TCP connection closed by the server mid-stream")
        conn.close()
        if rng.random() < 0.3:  # half a frame, then gone
            try:
                with socket.create_connection((host, port), timeout=2) as junk:
                    junk.sendall(struct.pack("!H", 300) + os.urandom(rng.randrange(300)))
            except OSError:
                pass
        tick(sent)
    return sent, replies


_started: list[subprocess.Popen] = []  # the server this run started, stopped on any exit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="hostile inputs in all")
    ap.add_argument("--tcp-share", type=float, default=0.2)
    ap.add_argument("--server", help="HOST:PORT of a running meshdns (default: start one)")
    ap.add_argument("--pid", type=int, help="its pid, for RSS (with --server)")
    ap.add_argument("--seed", type=int, default=8)
    ap.add_argument("--rss-every", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up after (seconds)")
    ap.add_argument("--cache-max-bytes", default="32MiB",
                    help="cache.max_bytes of the server started here (per transport)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    proc = None
    log_path = None
    workdir = Path(tempfile.mkdtemp(prefix="meshdns-fuzz-"))
    if args.server:
        host, _, port_text = args.server.rpartition(":")
        port, pid = int(port_text), args.pid or -1
    else:
        (workdir / "catalog.yaml").write_text(CATALOG)
        (workdir / "config.yaml").write_text(
            f"dns:\n  recursors: []\ncache:\n  max_bytes: {args.cache_max_bytes}\n")
        log_path = workdir / "meshdns.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "meshdns", "serve", "--config", str(workdir / "config.yaml"),
             "--catalog", str(workdir / "catalog.yaml"), "--listen", "127.0.0.1:0",
             "--admin", "off"], stdout=open(log_path, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
            cwd=ROOT, start_new_session=True)
        _started.append(proc)
        deadline = time.monotonic() + 30
        port = 0
        while time.monotonic() < deadline and not port:
            found = re.search(r"serving DNS on 127\.0\.0\.1:(\d+)", log_path.read_text())
            port = int(found.group(1)) if found else 0
            if proc.poll() is not None:
                print(log_path.read_text(), file=sys.stderr)
                return 2
            time.sleep(0.05)
        host, pid = "127.0.0.1", proc.pid
    findings = Findings()
    started = time.monotonic()
    curve: list[tuple[float, int, int]] = [(0.0, 0, rss_kb(pid))]
    done = [0]
    last_sample = [started]

    def tick(progress_in_phase: int) -> None:
        now = time.monotonic()
        if now - last_sample[0] >= args.rss_every:
            last_sample[0] = now
            curve.append((round(now - started, 1), done[0] + progress_in_phase, rss_kb(pid)))
            print(f"fuzz: {curve[-1][1]:,} inputs, {now - started:.0f} s, RSS "
                  f"{curve[-1][2] / 1024:.1f} MB", flush=True)
        if now - started > args.timeout:
            raise TimeoutError

    tcp_inputs = int(args.count * args.tcp_share)
    udp_inputs = args.count - tcp_inputs
    totals = {"udp_sent": 0, "udp_replies": 0, "tcp_sent": 0, "tcp_replies": 0}
    try:
        # interleaved in rounds, so the RSS curve covers both transports throughout
        rounds = max(1, args.count // 50_000)
        for r in range(rounds):
            u = udp_inputs // rounds + (udp_inputs % rounds if r == rounds - 1 else 0)
            t = tcp_inputs // rounds + (tcp_inputs % rounds if r == rounds - 1 else 0)
            s, n = fuzz_udp(host, port, u, rng, findings, tick)
            totals["udp_sent"] += s
            totals["udp_replies"] += n
            done[0] += s
            s, n = fuzz_tcp(host, port, t, rng, findings, tick)
            totals["tcp_sent"] += s
            totals["tcp_replies"] += n
            done[0] += s
            if proc is not None and proc.poll() is not None:
                findings.add("server exited", str(proc.returncode))
                break
    except TimeoutError:
        findings.add("stopped at --timeout")
    elapsed = time.monotonic() - started
    curve.append((round(elapsed, 1), done[0], rss_kb(pid)))
    # still answering?
    probe = dns.message.make_query("web.service.consul", "A")
    try:
        dns.query.udp(probe, host, port=port, timeout=3)
    except Exception as exc:  # noqa: BLE001 - any failure is a finding
        findings.add(f"server does not answer after the run: {type(exc).__name__}")
    exit_code = None
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        try:
            exit_code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            exit_code = proc.wait()
            findings.add("server did not exit within 15 s of SIGTERM")
        if exit_code != 0:
            findings.add(f"server exit code {exit_code}")
        text = log_path.read_text() if log_path else ""
        for marker in ("Traceback", "internal error"):
            if marker in text:
                findings.add(f"server log has '{marker}'", text[text.index(marker):][:600])
    result = {"inputs": done[0], **totals, "seconds": round(elapsed, 1), "seed": args.seed,
              "findings": findings.items, "examples": findings.examples,
              "rss_curve": [{"t": t, "inputs": n, "rss_mb": round(kb / 1024, 1)}
                            for t, n, kb in curve], "exit_code": exit_code}
    print(f"fuzz: {done[0]:,} inputs ({totals['udp_sent']:,} UDP, {totals['tcp_sent']:,} TCP) "
          f"in {elapsed:.0f} s; {totals['udp_replies']:,} UDP and {totals['tcp_replies']:,} "
          f"TCP replies, all parsed; findings: {findings.items or 'none'}")
    print("fuzz: RSS MB over time: " + ", ".join(
        f"{p['t']:.0f}s {p['rss_mb']}" for p in result["rss_curve"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if findings.items else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        for started in _started:
            if started.poll() is None:
                started.kill()
                started.wait()
