"""Just enough DNS wire format for the bench: build a query, read a reply's header.

Kept dependency-free so the readiness probe and the latency prober run anywhere.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass

QTYPES = {"A": 1, "NS": 2, "SOA": 6, "TXT": 16, "AAAA": 28, "SRV": 33, "ANY": 255}
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}


def build_query(name: str, qtype: str, qid: int, edns_size: int = 0) -> bytes:
    """A standard query with RD set; an OPT record advertising `edns_size` when it is non-zero."""
    header = struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 1 if edns_size else 0)
    qname = b"".join(
        bytes([len(label)]) + label.encode("ascii")
        for label in name.rstrip(".").split(".")
        if label
    )
    question = qname + b"\x00" + struct.pack("!HH", QTYPES[qtype.upper()], 1)
    opt = b"\x00" + struct.pack("!HHIH", 41, edns_size, 0, 0) if edns_size else b""
    return header + question + opt


@dataclass(frozen=True)
class ReplyHeader:
    qid: int
    rcode: str
    truncated: bool
    authoritative: bool
    answers: int
    authority: int
    additional: int
    size: int


def parse_header(packet: bytes) -> ReplyHeader | None:
    """The reply's header, or None when the packet is too short or not a response."""
    if len(packet) < 12:
        return None
    qid, flags, _qd, an, ns, ar = struct.unpack("!HHHHHH", packet[:12])
    if not flags & 0x8000:
        return None
    return ReplyHeader(
        qid=qid,
        rcode=RCODES.get(flags & 0xF, str(flags & 0xF)),
        truncated=bool(flags & 0x0200),
        authoritative=bool(flags & 0x0400),
        answers=an,
        authority=ns,
        additional=ar,
        size=len(packet),
    )


def udp_ask(
    host: str, port: int, name: str, qtype: str, timeout: float = 1.0, edns_size: int = 0
) -> ReplyHeader | None:
    """One UDP question; None on timeout or garbage."""
    qid = int(time.monotonic_ns() & 0xFFFF)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(build_query(name, qtype, qid, edns_size), (host, port))
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                data, _ = sock.recvfrom(65535)
                reply = parse_header(data)
                if reply is not None and reply.qid == qid:
                    return reply
        except OSError:
            return None
    return None
