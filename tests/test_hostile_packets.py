"""Malformed and hostile packets against a real ``meshdns serve`` ("Wire behaviour", names.md).

Malformed packets get FORMERR when a header can be read and are dropped otherwise; opcodes other
than QUERY get NOTIMP; a packet with QR set is dropped; zero or several questions get FORMERR.
Each case below is sent over UDP and TCP and must get exactly that; then the server must still
answer, be alive, and have logged no traceback. ``CASES`` also drives ``test_wire_unit.py``,
which checks the same packets against ``meshdns.wire`` and ``Responder`` without sockets.

Silence is checked without waiting for a timeout: a good "sentinel" query follows the packet on
the same socket or connection, and the server answers in order, so the first reply must be the
sentinel's.
"""

from __future__ import annotations

import random
import resource
import select
import socket
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
import yaml
from conftest import EXAMPLE_CATALOG, MeshdnsProcess

from meshdns.wire import Drop, Reject, parse_query

# rcodes as dnspython reports them (BADVERS combines the OPT's extended bits)
NOERROR, FORMERR, NXDOMAIN, NOTIMP, REFUSED, BADVERS = 0, 1, 3, 4, 5, 16
A, NS, TXT, SRV, OPT, IXFR, AXFR, MAILB, MAILA, ANY = 1, 2, 16, 33, 41, 251, 252, 253, 254, 255
IN, CH, NONE = 1, 3, 254
RD, QR = 0x0100, 0x8000
QID = 0xBEEF
BIG = 100  # instances of big.service.consul, more than fit in 512 bytes


# --- packet builders -----------------------------------------------------------------------


def wname(*labels: bytes) -> bytes:
    """A name in wire form, uncompressed, ending with the root label."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"


WEB = wname(b"web", b"service", b"consul")
BIG_NAME = wname(b"big", b"service", b"consul")


def header(*, ident: int = QID, flags: int = RD, qd: int = 1, an: int = 0, ns: int = 0,
           ar: int = 0) -> bytes:
    return struct.pack("!6H", ident, flags, qd, an, ns, ar)


def question(qname: bytes = WEB, qtype: int = A, qclass: int = IN) -> bytes:
    return qname + struct.pack("!HH", qtype, qclass)


def rr(owner: bytes, rtype: int, rclass: int, ttl: int, rdata: bytes) -> bytes:
    return owner + struct.pack("!HHIH", rtype, rclass, ttl, len(rdata)) + rdata


def opt(*, size: int = 1232, version: int = 0, ext_rcode: int = 0, do: bool = False,
        options: bytes = b"", owner: bytes = b"\x00") -> bytes:
    ttl = ext_rcode << 24 | version << 16 | (0x8000 if do else 0)
    return rr(owner, OPT, size, ttl, options)


def option(code: int, body: bytes) -> bytes:
    return struct.pack("!HH", code, len(body)) + body


def ecs(family: int, source: int, address: bytes, scope: int = 0) -> bytes:
    return option(8, struct.pack("!HBB", family, source, scope) + address)


def query(qname: bytes = WEB, qtype: int = A, qclass: int = IN, *, ident: int = QID,
          flags: int = RD, answer: tuple[bytes, ...] = (), authority: tuple[bytes, ...] = (),
          additional: tuple[bytes, ...] = (), **counts: int) -> bytes:
    """A query; the header counts follow the sections unless given (``ar=5``: a lie)."""
    sizes = {"qd": 1, "an": len(answer), "ns": len(authority), "ar": len(additional), **counts}
    return (header(ident=ident, flags=flags, **sizes) + question(qname, qtype, qclass)
            + b"".join(answer) + b"".join(authority) + b"".join(additional))


def frame(packet: bytes) -> bytes:
    return struct.pack("!H", len(packet)) + packet


VALID = query()
QUESTION = question()
AR_AT = 12 + len(QUESTION)  # where the first record after the question starts
TXT_FIXED = struct.pack("!HHIH", TXT, IN, 0, 0)  # type..rdlength of an empty TXT record


# --- the cases -----------------------------------------------------------------------------


Check = Callable[[bytes, dns.message.Message, bool], None]


@dataclass(frozen=True)
class Case:
    """One hostile packet and exactly what it must get.

    ``rcode`` None: dropped, no reply at all. Otherwise the reply's rcode as dnspython reports
    it. ``answered``: the packet is a well-formed query (``parse_query`` returns a Question and
    the rcode comes from resolution); otherwise ``parse_query`` raises ``Reject(rcode)``.
    ``echo``: the exact question section the reply carries (b"": none); None: not checked.
    ``edns``: whether the reply carries an OPT; None: not checked.
    """

    id: str
    packet: bytes
    rcode: int | None
    answered: bool = False
    echo: bytes | None = None
    edns: bool | None = None
    check: Check | None = None


def drop(id: str, packet: bytes) -> Case:
    return Case(id, packet, None)


def formerr(id: str, packet: bytes, echo: bytes = b"", **kw) -> Case:
    return Case(id, packet, FORMERR, echo=echo, **kw)


def answered(id: str, packet: bytes, rcode: int, **kw) -> Case:
    kw.setdefault("echo", packet[12:12 + len(_question_of(packet))])
    return Case(id, packet, rcode, answered=True, **kw)


def _question_of(packet: bytes) -> bytes:
    pos = 12
    while packet[pos]:
        pos += 1 + packet[pos]
    return packet[12:pos + 5]


def _has_answers(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
    assert msg.answer and msg.flags & dns.flags.AA


def _no_answers(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
    assert not msg.answer and not msg.additional


def _opcode_echoed(opcode: int) -> Check:
    def check(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
        assert msg.opcode() == opcode
    return check


def _badvers(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
    assert reply[3] & 0xF == 0  # the low bits in the header: 0 ...
    ttl = struct.unpack("!I", reply[-6:-2])[0]  # the OPT is the last record, no options
    assert reply[-11:-8] == b"\x00\x00\x29" and ttl >> 24 == 1  # ... the high bits: 1
    assert msg.edns == 0  # the server's own version


def _payload(size: int) -> Check:
    def check(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
        assert msg.payload == size
    return check


def _small_reply(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
    """EDNS size 1 is treated as 512: the big answer is trimmed to 512 bytes over UDP."""
    assert msg.payload == 512
    count = sum(len(rrset) for rrset in msg.answer)
    if tcp:
        assert count == BIG
    else:
        assert len(reply) <= 512 and 0 < count < BIG


def _huge_reply(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
    """EDNS size 65535: over UDP no more than dns.max_udp_size (1232) and TC, so the client
    retries over TCP, where it gets everything."""
    assert msg.payload == 65535
    count = sum(len(rrset) for rrset in msg.answer)
    if tcp:
        assert count == BIG
    else:
        assert len(reply) <= 1232 and 0 < count < BIG
        assert msg.flags & dns.flags.TC


def _ecs_echoed(family: int, source: int, address: str) -> Check:
    def check(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
        found = [o for o in msg.options if o.otype == dns.edns.ECS]
        assert len(found) == 1
        assert (found[0].family, found[0].srclen, found[0].scopelen) == (family, source, 0)
        assert found[0].address == address
    return check


def _no_ecs(reply: bytes, msg: dns.message.Message, tcp: bool) -> None:
    assert not msg.options


def _cases() -> list[Case]:
    cases = [drop("empty-datagram", b"")]
    cases += [drop(f"header-{n}-bytes", VALID[:n]) for n in range(1, 12)]
    cases += [
        drop("qr-set", query(flags=QR | RD)),
        drop("qr-set-answer-shaped", query(flags=QR | 0x0400 | RD,
                                           answer=(rr(b"\xc0\x0c", A, IN, 0, bytes(4)),))),
        drop("qr-set-opcode-update", header(flags=QR | 5 << 11, qd=0)),
        drop("qr-set-garbage", header(flags=0xFFFF, qd=0xFFFF) + b"\xff" * 40),
        drop("qr-set-formerr-shaped", header(flags=QR | 1, qd=0)),
        formerr("header-only-qdcount-1", header()),
        formerr("qdcount-0", header(qd=0)),
        formerr("qdcount-0-question-present", header(qd=0) + QUESTION),
        formerr("qdcount-2", header(qd=2) + QUESTION + question(wname(b"consul"))),
        formerr("qdcount-65535", header(qd=65535) + QUESTION),
    ]
    for opcode, name in [(1, "iquery"), (2, "status"), (3, "unassigned-3"), (4, "notify"),
                         (5, "update"), (15, "opcode-15")]:
        cases.append(Case(f"opcode-{name}", query(flags=opcode << 11 | RD), NOTIMP, echo=b"",
                          check=_opcode_echoed(opcode)))
    fixed = struct.pack("!HH", A, IN)
    cases += [
        # compression pointers in the question: never allowed, loops or not
        formerr("question-ptr-to-itself", header() + b"\xc0\x0c" + fixed),
        formerr("question-label-then-ptr-to-12", header() + b"\x03web\xc0\x0c" + fixed),
        formerr("question-ptr-into-header", header() + b"\x03web\xc0\x02" + fixed),
        formerr("question-ptr-forward", header() + b"\xc0\x12" + fixed + b"\x03web\x00"),
        formerr("question-ptr-after-labels", header() + b"\x03web\x07service\xc0\x0c" + fixed),
        # pointer loops in an additional record's owner
        formerr("additional-ptr-to-itself", query(
            additional=(struct.pack("!H", 0xC000 | AR_AT) + TXT_FIXED,)), echo=QUESTION),
        formerr("additional-label-then-ptr-back", query(  # abc.abc.abc... for ever
            additional=(b"\x03abc" + struct.pack("!H", 0xC000 | AR_AT) + TXT_FIXED,)),
            echo=QUESTION),
        formerr("additional-ptr-forward", query(
            additional=(struct.pack("!H", 0xC000 | (AR_AT + 20)) + TXT_FIXED,)),
            echo=QUESTION),
        formerr("additional-ptr-loop-via-rdata", query(additional=(  # A -> B -> A
            rr(b"\x00", TXT, IN, 0, struct.pack("!H", 0xC000 | (AR_AT + 13))),
            struct.pack("!H", 0xC000 | (AR_AT + 11)) + TXT_FIXED)), echo=QUESTION),
        answered("additional-ptr-to-question", query(
            additional=(b"\xc0\x0c" + TXT_FIXED,)), NOERROR, check=_has_answers),
    ]
    for length in (0x40, 0x7F, 0x80, 0xBF):
        cases.append(formerr(f"label-length-{length:#04x}",
                             header() + bytes([length]) + b"a" * length + b"\x00" + fixed))
    n255 = wname(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 61)
    n256 = wname(b"a" * 63, b"b" * 63, b"c" * 63, b"d" * 62)
    assert (len(n255), len(n256)) == (255, 256)
    cases += [
        answered("name-255-octets", query(n255), REFUSED, edns=False),
        formerr("name-256-octets", query(n256)),
        formerr("name-300-octets", query(wname(*[b"x" * 59] * 5))),
        formerr("label-beyond-end", header() + b"\x10web"),
        formerr("label-beyond-end-by-one", header() + b"\x03we"),
        formerr("name-without-root-label", header() + WEB[:-1]),
        formerr("question-without-type-class", header() + WEB),
        formerr("question-without-class", header() + WEB + b"\x00\x01"),
        formerr("question-class-one-byte", header() + WEB + b"\x00\x01\x00"),
        # classes: IN and ANY are answered, the rest are not ours
        answered("class-5", query(qclass=5), REFUSED, edns=False, check=_no_answers),
        answered("chaos-version-bind", query(wname(b"version", b"bind"), TXT, CH), REFUSED,
                 edns=False, check=_no_answers),
        answered("chaos-consul-name", query(qclass=CH), REFUSED, check=_no_answers),
        answered("class-none", query(qclass=NONE), REFUSED, check=_no_answers),
        answered("class-any", query(qclass=ANY), NOERROR, check=_has_answers),
        answered("class-in", VALID, NOERROR, edns=False, check=_has_answers),
        # types that are not questions
        formerr("qtype-opt", query(qtype=OPT), echo=question(qtype=OPT)),
    ]
    for qtype, name in [(AXFR, "axfr"), (IXFR, "ixfr"), (MAILB, "mailb"), (MAILA, "maila")]:
        cases.append(Case(f"qtype-{name}", query(qtype=qtype), NOTIMP,
                          echo=question(qtype=qtype), check=_opcode_echoed(0)))
    cases += [
        # OPT where it may not be
        formerr("two-opt", query(additional=(opt(), opt())), echo=QUESTION),
        formerr("opt-in-answer", query(answer=(opt(),)), echo=QUESTION),
        formerr("opt-in-authority", query(authority=(opt(),)), echo=QUESTION),
        formerr("opt-owner-not-root", query(additional=(opt(owner=wname(b"a")),)),
                echo=QUESTION),
        formerr("opt-owner-pointer", query(additional=(opt(owner=b"\xc0\x0c"),)),
                echo=QUESTION),
        Case("edns-version-1", query(additional=(opt(version=1),)), BADVERS, echo=QUESTION,
             edns=True, check=_badvers),
        Case("edns-version-255", query(additional=(opt(version=255),)), BADVERS,
             echo=QUESTION, edns=True, check=_badvers),
        answered("edns-size-65535", query(BIG_NAME, SRV, additional=(opt(size=65535),)),
                 NOERROR, edns=True, check=_huge_reply),
        answered("edns-size-1", query(BIG_NAME, additional=(opt(size=1),)), NOERROR,
                 edns=True, check=_small_reply),
        answered("edns-size-0", query(additional=(opt(size=0),)), NOERROR, edns=True,
                 check=_payload(512)),
        answered("edns-do-bit", query(additional=(opt(do=True),)), NOERROR, edns=True,
                 check=_has_answers),
        # EDNS client subnet (RFC 7871 6: a malformed option is FORMERR)
        formerr("ecs-option-2-bytes", query(additional=(opt(options=option(8, b"\x00\x01")),)),
                echo=QUESTION),
        formerr("ecs-family-3", query(additional=(opt(options=ecs(3, 0, b"")),)),
                echo=QUESTION),
        formerr("ecs-v4-prefix-33", query(additional=(opt(options=ecs(1, 33, bytes(5))),)),
                echo=QUESTION),
        formerr("ecs-v6-prefix-129", query(additional=(opt(options=ecs(2, 129, bytes(17))),)),
                echo=QUESTION),
        formerr("ecs-address-too-long", query(
            additional=(opt(options=ecs(1, 24, b"\x0a\x01\x02\x00")),)), echo=QUESTION),
        formerr("ecs-address-too-short", query(
            additional=(opt(options=ecs(1, 24, b"\x0a\x01")),)), echo=QUESTION),
        formerr("ecs-bits-beyond-prefix", query(
            additional=(opt(options=ecs(1, 23, b"\x0a\x01\x03")),)), echo=QUESTION),
        answered("ecs-v4-valid", query(additional=(opt(options=ecs(1, 24, b"\x0a\x01\x02")),)),
                 NOERROR, edns=True, check=_ecs_echoed(1, 24, "10.1.2.0")),
        answered("ecs-v6-valid", query(additional=(opt(options=ecs(
            2, 56, bytes.fromhex("20010db8000001"))),)), NOERROR, edns=True,
            check=_ecs_echoed(2, 56, "2001:db8:0:100::")),
        answered("ecs-source-0", query(additional=(opt(options=ecs(1, 0, b"")),)), NOERROR,
                 edns=True, check=_ecs_echoed(1, 0, "0.0.0.0")),
        answered("edns-unknown-option", query(additional=(opt(options=option(65001, b"xy")),)),
                 NOERROR, edns=True, check=_no_ecs),
        formerr("option-length-beyond-rdata", query(
            additional=(opt(options=struct.pack("!HH", 10, 20) + b"abcd"),)), echo=QUESTION),
        formerr("option-header-cut", query(additional=(opt(options=b"\x00\x0a"),)),
                echo=QUESTION),
        formerr("opt-rdlength-beyond-packet", query(
            additional=(b"\x00" + struct.pack("!HHIH", OPT, 1232, 0, 100) + b"abcd",)),
            echo=QUESTION),
        # counts and bytes that do not add up
        formerr("trailing-garbage", VALID + b"\xde\xad\xbe\xef", echo=QUESTION),
        formerr("trailing-zero-byte", VALID + b"\x00", echo=QUESTION),
        formerr("arcount-5-none-present", query(ar=5), echo=QUESTION),
        formerr("ancount-1-none-present", query(an=1), echo=QUESTION),
        formerr("nscount-65535-one-present", query(authority=(rr(b"\x00", NS, IN, 0, b"\x00"),),
                                                   ns=65535), echo=QUESTION),
        formerr("record-cut-in-fixed-part", query(additional=(b"\x00\x00\x10\x00",)),
                echo=QUESTION),
        formerr("record-rdlength-beyond-end", query(
            additional=(b"\x00" + struct.pack("!HHIH", TXT, IN, 0, 9) + b"abc",)),
            echo=QUESTION),
        formerr("udp-65000-bytes", VALID + bytes(65000 - len(VALID)), echo=QUESTION),
        # binary labels: never matched, echoed byte for byte
        answered("binary-label-under-domain",
                 query(wname(b"\xff\x00\xfe", b"service", b"consul")), NXDOMAIN),
        answered("latin1-label-uppercase",
                 query(wname(b"W\xc9B", b"service", b"consul")), NXDOMAIN),
        answered("nul-bytes-label", query(wname(b"\x00\x00\x00", b"consul")), NXDOMAIN),
        answered("binary-name-outside", query(wname(b"\x00\x01\x80\xff", b"\xc0")), REFUSED),
        answered("binary-label-srv", query(wname(b"\x7f\x80", b"service", b"consul"), SRV,
                                            additional=(opt(),)), NXDOMAIN, edns=True),
        # a "." byte inside a label is part of that label, not a separator
        answered("dot-byte-web-service-dc1", query(wname(b"web.service.dc1", b"consul"), SRV),
                 NXDOMAIN, check=_no_answers),
        answered("dot-byte-node", query(wname(b"node-1.node", b"consul")), NXDOMAIN,
                 check=_no_answers),
        answered("dot-byte-last-label", query(wname(b"x.consul")), REFUSED),
        answered("dot-byte-reverse", query(wname(b"1.1.0.10", b"in-addr", b"arpa"), 12),
                 NXDOMAIN, check=_no_answers),
        # names the grammar must refuse without crashing
        answered("reverse-superscript-digit", query(
            wname(b"\xb2", b"1", b"0", b"10", b"in-addr", b"arpa"), 12), NXDOMAIN),
        answered("addr-hex-with-spaces", query(wname(b"0a 00 01", b"addr", b"consul")),
                 NXDOMAIN),
        answered("root-name", query(b"\x00", NS), REFUSED),
    ]
    return cases


CASES = _cases()


# --- checking a reply ----------------------------------------------------------------------


def check_reply(case: Case, reply: bytes | None, tcp: bool = False) -> dns.message.Message:
    """Everything a reply to ``case`` must be; the parsed message."""
    assert case.rcode is not None
    assert reply is not None, f"{case.id}: no reply, expected rcode {case.rcode}"
    assert len(reply) >= 12
    assert reply[:2] == case.packet[:2], "the ID is echoed"
    flags = struct.unpack("!H", reply[2:4])[0]
    qflags = struct.unpack("!H", case.packet[2:4])[0]
    assert flags & QR, "QR is set"
    assert flags & RD == qflags & RD, "RD is copied"
    msg = dns.message.from_wire(reply, ignore_trailing=False)
    assert msg.id == struct.unpack("!H", case.packet[:2])[0]
    assert msg.rcode() == case.rcode, (case.id, dns.rcode.to_text(msg.rcode()))
    if not case.answered:  # an error reply: header, question when readable, OPT
        assert msg.opcode() == (qflags >> 11) & 0xF, "the opcode is echoed"
        assert reply[6:10] == b"\x00\x00\x00\x00", "no answer, no authority"
        assert not flags & 0x0400, "no AA on an error"
    if case.echo is not None:
        assert struct.unpack("!H", reply[4:6])[0] == (1 if case.echo else 0)
        assert reply[12:12 + len(case.echo)] == case.echo, "the question is echoed exactly"
    if case.edns is not None:
        assert (msg.edns >= 0) == case.edns, "OPT in the reply"
    if not tcp and msg.edns < 0:
        assert len(reply) <= 512
    if case.check is not None:
        case.check(reply, msg, tcp)
    return msg


# --- the server ----------------------------------------------------------------------------


def hostile_catalog(path: Path) -> Path:
    """The example catalog plus ``big``: BIG instances, more than 512 bytes of answers."""
    data = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    data["nodes"] += [{"name": f"bulk-{i:03d}", "address": f"10.77.{i // 200}.{i % 200 + 1}"}
                      for i in range(BIG)]
    data["services"] += [{"name": "big", "id": f"big-{i}", "node": f"bulk-{i:03d}",
                          "port": 9000} for i in range(BIG)]
    path.write_text(yaml.safe_dump(data))
    return path


def raise_fd_limit(want: int = 4096) -> None:
    """Room for 1,100 TCP connections here and in the server (which inherits the limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    raise_fd_limit()
    root = tmp_path_factory.mktemp("hostile")
    proc = MeshdnsProcess(root, hostile_catalog(root / "catalog.yaml"), None,
                          ["--admin", "off"])
    yield proc
    assert proc.stop() == 0


_sentinel_ids = iter(range(0x1000, 0x10000))


def sentinel(avoid: bytes = b"") -> bytes:
    """A good query whose ID differs from ``avoid``'s."""
    while True:
        ident = next(_sentinel_ids)
        if struct.pack("!H", ident) != avoid[:2]:
            return query(ident=ident)


def recv_frame(s: socket.socket) -> bytes:
    head = recv_exact(s, 2)
    return recv_exact(s, struct.unpack("!H", head)[0])


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def udp_exchange(server: MeshdnsProcess, packet: bytes, timeout: float = 3.0) -> bytes | None:
    """The reply to ``packet`` over UDP, or None when the server stays silent."""
    good = sentinel(packet)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, server.address)
        s.sendto(good, server.address)
        first = s.recv(65535)
        if first[:2] == good[:2]:
            return None
        assert s.recv(65535)[:2] == good[:2], "the sentinel is answered after the packet"
        return first


def tcp_exchange(server: MeshdnsProcess, packet: bytes, timeout: float = 3.0) -> bytes | None:
    """The reply to ``packet`` over TCP, or None when the server stays silent."""
    good = sentinel(packet)
    with socket.create_connection(server.address, timeout=timeout) as s:
        s.sendall(frame(packet) + frame(good))
        first = recv_frame(s)
        if first[:2] == good[:2]:
            return None
        assert recv_frame(s)[:2] == good[:2], "the sentinel is answered after the packet"
        return first


def assert_answers(server: MeshdnsProcess) -> None:
    """The server is alive and answers a normal query over UDP and TCP."""
    assert server.proc.poll() is None, "the server died"
    for tcp in (False, True):
        msg = server.query("web.service.consul", "A", tcp=tcp, timeout=3)
        assert msg.rcode() == NOERROR and len(msg.answer[0]) == 3


def expected_for(packet: bytes) -> tuple[str, int | None]:
    """What ``meshdns.wire`` says about ``packet``: ("drop", None), ("reject", rcode) or
    ("answer", None)."""
    try:
        parse_query(packet)
    except Drop:
        return "drop", None
    except Reject as reject:
        return "reject", reject.rcode
    return "answer", None


def check_fuzz_reply(packet: bytes, reply: bytes | None) -> None:
    """A fuzzed packet gets silence or a well-formed reply with its ID, as the parser says."""
    kind, rcode = expected_for(packet)
    if kind == "drop":
        assert reply is None, f"reply to a packet that must be dropped: {packet.hex()}"
        return
    assert reply is not None, f"no reply to {packet.hex()} ({kind})"
    try:
        msg = dns.message.from_wire(reply, ignore_trailing=False)
    except Exception as exc:  # dnspython's many error types: report the packet
        raise AssertionError(f"{packet.hex()} -> malformed reply {reply.hex()}: {exc}") from exc
    assert reply[:2] == packet[:2] and reply[2] & 0x80
    assert len(reply) <= 65507
    if rcode is not None:
        assert msg.rcode() == rcode, packet.hex()


def udp_burst(server: MeshdnsProcess, packets: list[bytes]) -> list[bytes | None]:
    """Send each packet from its own socket, followed by a sentinel; the replies (or None)."""
    socks: list[tuple[socket.socket, bytes]] = []
    try:
        for packet in packets:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            good = sentinel(packet)
            socks.append((s, good[:2]))
            s.settimeout(3)
            s.sendto(packet, server.address)
            s.sendto(good, server.address)
        out: list[bytes | None] = []
        for s, good_id in socks:
            first = s.recv(65535)
            if first[:2] == good_id:
                out.append(None)
            else:
                assert s.recv(65535)[:2] == good_id, "the sentinel is answered after it"
                out.append(first)
        return out
    finally:
        for s, _ in socks:
            s.close()


def fuzz_over_udp(server: MeshdnsProcess, packets: list[bytes], burst: int = 100) -> None:
    for start in range(0, len(packets), burst):
        chunk = packets[start:start + burst]
        for packet, reply in zip(chunk, udp_burst(server, chunk)):
            check_fuzz_reply(packet, reply)


# --- the tests -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_udp(server: MeshdnsProcess, case: Case) -> None:
    reply = udp_exchange(server, case.packet)
    if case.rcode is None:
        assert reply is None, f"{case.id}: must be dropped, got {reply!r}"
    else:
        check_reply(case, reply)
    assert server.proc.poll() is None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tcp(server: MeshdnsProcess, case: Case) -> None:
    reply = tcp_exchange(server, case.packet)
    if case.rcode is None:
        assert reply is None, f"{case.id}: must be dropped, got {reply!r}"
    else:
        check_reply(case, reply, tcp=True)
    assert server.proc.poll() is None


def test_tcp_length_prefix_announces_65535_then_closes(server: MeshdnsProcess) -> None:
    for sent in (b"", VALID, bytes(30000)):
        with socket.create_connection(server.address, timeout=3) as s:
            s.sendall(b"\xff\xff" + sent)
    with socket.create_connection(server.address, timeout=3) as s:  # half-close, then wait
        s.sendall(b"\xff\xff" + VALID)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(3)
        assert s.recv(10) == b"", "nothing comes back for a message that never completed"
    assert_answers(server)


def test_tcp_length_prefix_0(server: MeshdnsProcess) -> None:
    """An empty message is shorter than a header: dropped; the connection goes on."""
    good = sentinel()
    with socket.create_connection(server.address, timeout=3) as s:
        s.sendall(b"\x00\x00" + b"\x00\x00" + frame(good))
        assert recv_frame(s)[:2] == good[:2]


def test_tcp_two_queries_pipelined_in_one_write(server: MeshdnsProcess) -> None:
    first = query(ident=0x0101)
    second = query(wname(b"node-1", b"node", b"consul"), ident=0x0202)
    with socket.create_connection(server.address, timeout=3) as s:
        s.sendall(frame(first) + frame(second))
        one, two = recv_frame(s), recv_frame(s)
    assert one[:2] == b"\x01\x01" and two[:2] == b"\x02\x02", "answered in order"
    assert one[12:12 + len(QUESTION)] == QUESTION
    msg = dns.message.from_wire(two, ignore_trailing=False)
    assert [rd.address for rrset in msg.answer for rd in rrset] == ["10.0.1.1"]


def test_tcp_one_byte_at_a_time(server: MeshdnsProcess) -> None:
    with socket.create_connection(server.address, timeout=3) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in frame(VALID):
            s.send(bytes([byte]))
            time.sleep(0.001)
        reply = recv_frame(s)
    check_reply(answered("one-byte-at-a-time", VALID, NOERROR), reply, tcp=True)


def test_slow_loris_does_not_block_others(server: MeshdnsProcess) -> None:
    """Connections that send a byte (or half a message) and stall hold nobody up."""
    stalled = []
    try:
        for data in (b"\x00", frame(VALID)[:10], b"\xff\xff" + bytes(100)):
            s = socket.create_connection(server.address, timeout=3)
            s.sendall(data)
            stalled.append(s)
        started = time.monotonic()
        for i in range(20):
            assert_reply_within(server, i % 2 == 1, 1.0)
        assert time.monotonic() - started < 5
        for s in stalled:  # still open, still waiting: nothing was sent back
            s.setblocking(False)
            with pytest.raises(BlockingIOError):
                s.recv(1)
    finally:
        for s in stalled:
            s.close()


def assert_reply_within(server: MeshdnsProcess, tcp: bool, seconds: float) -> None:
    started = time.monotonic()
    msg = server.query("web.service.consul", "A", tcp=tcp, timeout=seconds)
    assert msg.rcode() == NOERROR
    assert time.monotonic() - started < seconds


def test_1100_concurrent_tcp_connections(server: MeshdnsProcess) -> None:
    """More connections than the server keeps (1,024): UDP is answered all along, and TCP
    again once they are gone."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files ({hard}) is below 1,100 connections")
    conns: list[socket.socket] = []
    deadline = time.monotonic() + 10
    try:
        for _ in range(1100):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(server.address)
            conns.append(s)
        poller = select.poll()  # not select(): these descriptors go past FD_SETSIZE
        pending = {s.fileno(): s for s in conns}
        for fd in pending:
            poller.register(fd, select.POLLOUT)
        while pending and time.monotonic() < deadline - 4:
            for fd, _ in poller.poll(500):
                poller.unregister(fd)
                del pending[fd]
        assert len(pending) < 100, f"{len(pending)} connections never completed"
        for _ in range(10):
            assert_reply_within(server, False, 1.0)
        for s in conns[:10]:  # the first ones were accepted and are kept: they get answers
            s.setblocking(True)
            s.settimeout(2)
            s.sendall(frame(VALID))
        assert any(_frame_or_none(s) is not None for s in conns[:10])
    finally:
        for s in conns:
            s.close()
    assert time.monotonic() < deadline
    for _ in range(50):  # the server notices the closes
        try:
            if server.raw_tcp(VALID, timeout=1) is not None:
                break
        except OSError:
            pass
        time.sleep(0.05)
    assert_answers(server)


def _frame_or_none(s: socket.socket) -> bytes | None:
    try:
        return recv_frame(s)
    except OSError:
        return None


def test_random_datagrams(server: MeshdnsProcess) -> None:
    """1,000 random packets (0-600 bytes); every second one made to look like a query (QR and
    opcode clear, one question) so that it reaches the question parser."""
    rng = random.Random(0x5EED)
    packets = []
    for i in range(1000):
        packet = bytearray(rng.randbytes(rng.randint(0, 600)))
        if i % 2 and len(packet) >= 6:
            packet[2] &= 0x07
            packet[4:6] = b"\x00\x01"
        packets.append(bytes(packet))
    fuzz_over_udp(server, packets)
    assert server.proc.poll() is None


MUTATED_BASE = query(wname(b"Web", b"service", b"consul"), SRV,
                     additional=(opt(size=4096, options=ecs(1, 24, b"\x0a\x01\x02")),))


def mutations(base: bytes, values: Callable[[int], list[int]]) -> list[bytes]:
    out = []
    for i, byte in enumerate(base):
        for value in values(byte):
            if value != byte:
                out.append(base[:i] + bytes([value]) + base[i + 1:])
    return out


def test_one_byte_mutations_udp(server: MeshdnsProcess) -> None:
    """Every byte of a valid EDNS query flipped in several ways."""
    packets = mutations(MUTATED_BASE, lambda b: [b ^ 0x01, b ^ 0x20, b ^ 0x80, b ^ 0xFF, 0x00,
                                                 0x3F, 0xC0])
    assert len(packets) > 300
    fuzz_over_udp(server, packets)


def test_one_byte_mutations_tcp(server: MeshdnsProcess) -> None:
    packets = mutations(MUTATED_BASE, lambda b: [b ^ 0x80, b ^ 0xFF, 0x00])
    for packet in packets:
        check_fuzz_reply(packet, tcp_exchange(server, packet))


def test_refused_reply_to_an_edns_query_echoes_opt(server: MeshdnsProcess) -> None:
    reply = udp_exchange(server, query(wname(b"www", b"example", b"com"),
                                       additional=(opt(),)))
    assert reply is not None
    msg = dns.message.from_wire(reply)
    assert msg.rcode() == REFUSED
    assert msg.edns == 0


def test_zz_server_survived(server: MeshdnsProcess) -> None:
    """After all of the above (this runs last in the module): alive, answering, no traceback."""
    assert_answers(server)
    for entry in server.logs():
        assert entry.get("level") not in ("error", "critical"), entry
        assert "error" not in entry, entry  # the formatter's traceback field
        assert "Traceback" not in entry.get("msg", ""), entry
