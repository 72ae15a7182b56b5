"""DNS messages: parse a query, encode an answer. Pure functions over bytes.

The query parser reads only what a query may hold (header, one question, optional records with
at most one OPT) and refuses anything else precisely: ``Drop`` for what cannot be answered,
``Reject(rcode)`` for what gets an error reply. The encoder writes the records ``resolve``
produces, with name compression, and trims UDP replies to the client's size the way Consul
does: answers go first, the additional records that belong to them go with them.

Why not dnslib here: parsing a query with dnslib and packing a reply costs ~60 µs, which caps a
server at ~15,000 queries/s; this module does the same work in a few µs. dnslib and dnspython
remain the independent decoders the tests check these bytes with.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .resolve import (
    AAAA,
    CNAME,
    FORMERR,
    NOTIMP,
    NS,
    OPT,
    PTR,
    SOA,
    SRV,
    TXT,
    Answer,
    Record,
)

_HEADER = struct.Struct("!HHHHHH")
_RR_FIXED = struct.Struct("!HHIH")
_HH = struct.Struct("!HH")
_HHH = struct.Struct("!HHH")
_QNAME_POINTER = b"\xc0\x0c"  # a compression pointer to the question name, at offset 12
_SOA_INTS = struct.Struct("!IIIII")

MAX_UDP_REPLY = 1232  # dns.max_udp_size's default (DNS flag day 2020: no IP fragmentation)
MAX_TCP = 65535
NO_EDNS_MAX_ANSWERS = 8  # Consul's hard cap for UDP replies without EDNS
ZONE_TRANSFER_AND_MAIL = frozenset({251, 252, 253, 254})  # IXFR AXFR MAILB MAILA
CLASS_IN, CLASS_ANY = 1, 255
BADVERS = 16


class Drop(Exception):
    """A packet that gets no reply (too short to answer, or a response)."""


class Reject(Exception):
    """A packet that gets an error reply with this rcode (header and, if readable, question)."""

    def __init__(self, rcode: int, query: bytes, question: bytes = b"",
                 edns: Edns | None = None) -> None:
        super().__init__(rcode)
        self.rcode = rcode
        self.query = query
        self.question = question
        self.edns = edns


class Edns(NamedTuple):  # a NamedTuple: built per query, 5x cheaper than a frozen dataclass
    udp_size: int  # as the client advertised it
    version: int
    do: bool
    ecs: bytes | None  # the client-subnet option, echoed with scope 0


class Question(NamedTuple):  # a NamedTuple: built per query, 5x cheaper than a frozen dataclass
    """A parsed query: everything a reply needs to echo and everything resolution needs."""

    id: int
    flags: int
    labels: tuple[str, ...]  # lowercase, for matching
    name: str  # as asked (case kept), dotted, no trailing dot
    qtype: int
    qclass: int
    raw: bytes  # the question section exactly as sent, echoed in the reply
    edns: Edns | None


def parse_query(data: bytes) -> Question:
    """Parse a query packet. Raises ``Drop`` or ``Reject``."""
    size = len(data)
    if size < 12:
        raise Drop("shorter than a DNS header")
    ident, flags, qdcount, ancount, nscount, arcount = _HEADER.unpack_from(data)
    if flags & 0x8000:
        raise Drop("a response, not a query")
    if (flags >> 11) & 0xF != 0:
        raise Reject(NOTIMP, data)
    if qdcount != 1:
        raise Reject(FORMERR, data)
    pos = 12
    labels: list[bytes] = []
    while True:
        if pos >= size:
            raise Reject(FORMERR, data)
        length = data[pos]
        if length == 0:
            pos += 1
            break
        if length > 63:  # a compression pointer or a reserved label type: never in a question
            raise Reject(FORMERR, data)
        end = pos + 1 + length
        if end > size or end - 12 > 254:  # 255 octets at most, with the root's zero byte
            raise Reject(FORMERR, data)
        labels.append(data[pos + 1:end])
        pos = end
    if pos + 4 > size:
        raise Reject(FORMERR, data)
    qtype, qclass = _HH.unpack_from(data, pos)
    pos += 4
    raw = data[12:pos]
    edns = None
    if ancount or nscount or arcount:
        edns, pos = _parse_records(data, pos, ancount, nscount, arcount, raw)
    if pos != size:
        raise Reject(FORMERR, data, raw, edns)  # trailing bytes after the last record
    if edns is not None and edns.version != 0:
        raise Reject(BADVERS, data, raw, edns)
    if qtype == OPT:
        raise Reject(FORMERR, data, raw, edns)
    if qtype in ZONE_TRANSFER_AND_MAIL:
        raise Reject(NOTIMP, data, raw, edns)
    name = b".".join(labels)
    try:
        text = name.decode("ascii")
    except UnicodeDecodeError:
        text = name.decode("latin-1")  # matches nothing; still echoed byte for byte
    parts = tuple(text.lower().split(".")) if labels else ()
    if len(parts) != len(labels):  # a label holds a "." byte: it stays one label (matches nothing)
        parts = tuple(label.decode("latin-1").lower() for label in labels)
    return Question(ident, flags, parts, text, qtype, qclass, raw, edns)


def _skip_name(data: bytes, pos: int) -> int:
    size = len(data)
    end = 0  # where the name ends in the record, once a pointer was met
    limit = pos  # each pointer goes before the previous target: no loops (as dnspython)
    while True:
        if pos >= size:
            raise ValueError
        length = data[pos]
        if length == 0:
            return end or pos + 1
        if length & 0xC0 == 0xC0:
            if pos + 2 > size:
                raise ValueError
            target = (length & 0x3F) << 8 | data[pos + 1]
            if target >= limit:
                raise ValueError
            end = end or pos + 2
            limit = pos = target
            continue
        if length > 63:
            raise ValueError
        pos += 1 + length


def _parse_records(data: bytes, pos: int, an: int, ns: int, ar: int,
                   raw: bytes) -> tuple[Edns | None, int]:
    """Walk the records after the question; return the OPT (if any) and the end position."""
    edns: Edns | None = None
    size = len(data)
    for index in range(an + ns + ar):
        try:
            name_start = pos
            pos = _skip_name(data, pos)
        except ValueError:
            raise Reject(FORMERR, data, raw) from None
        if pos + 10 > size:
            raise Reject(FORMERR, data, raw)
        rtype, rclass, ttl, rdlen = _RR_FIXED.unpack_from(data, pos)
        pos += 10
        end = pos + rdlen
        if end > size:
            raise Reject(FORMERR, data, raw)
        if rtype == OPT:
            if edns is not None or index < an + ns or data[name_start] != 0:
                raise Reject(FORMERR, data, raw)  # one OPT, in additional, owned by the root
            edns = Edns(rclass, (ttl >> 16) & 0xFF, bool(ttl & 0x8000),
                        _find_ecs(data, pos, end, raw))
        pos = end
    return edns, pos


def _find_ecs(data: bytes, pos: int, end: int, raw: bytes) -> bytes | None:
    ecs = None
    while pos < end:
        if pos + 4 > end:
            raise Reject(FORMERR, data, raw)
        code, length = _HH.unpack_from(data, pos)
        if pos + 4 + length > end:
            raise Reject(FORMERR, data, raw)
        if code == 8:  # client subnet: family(2) source(1) scope(1) address
            body = data[pos + 4:pos + 4 + length]
            if length < 4 or body[0:2] not in (b"\x00\x01", b"\x00\x02"):
                raise Reject(FORMERR, data, raw)
            source = body[2]
            if (source > (32 if body[1] == 1 else 128) or length - 4 != (source + 7) // 8
                    or (source % 8 and body[-1] & (0xFF >> source % 8))):
                raise Reject(FORMERR, data, raw)  # RFC 7871 6: the address is the prefix
            ecs = body[:3] + b"\x00" + body[4:]  # scope 0: the answer is the same for all
        pos += 4 + length
    return ecs


# --- encoding ------------------------------------------------------------------------------


class _Writer:
    __slots__ = ("buf", "names", "qname")

    def __init__(self, header: bytes, question: bytes, qname: str) -> None:
        self.buf = bytearray(header)
        self.buf += question
        self.qname = qname
        self.names: dict[str, int] | None = None  # built on the first name (A replies have none)

    def _question_suffixes(self) -> dict[str, int]:
        names: dict[str, int] = {}
        if self.qname:  # the question's suffixes, for exact-case compression
            offset = 12
            labels = self.qname.split(".")
            for i, label in enumerate(labels):
                names.setdefault(".".join(labels[i:]), offset)
                offset += 1 + len(label.encode("latin-1"))
        self.names = names
        return names

    def name(self, name: str, compress: bool = True) -> None:
        buf = self.buf
        if not name:
            buf.append(0)
            return
        labels = name.split(".")
        names = self.names if self.names is not None else self._question_suffixes()
        for i in range(len(labels)):
            suffix = ".".join(labels[i:]) if i else name
            offset = names.get(suffix)
            if offset is not None and compress:
                buf += (0xC000 | offset).to_bytes(2, "big")
                return
            if len(buf) < 0x3FFF and suffix not in names:
                names[suffix] = len(buf)
            label = labels[i].encode("ascii", "replace")
            buf.append(len(label))
            buf += label
        buf.append(0)

    def record(self, rec: Record) -> None:
        owner, rtype, ttl, rdata = rec
        buf = self.buf
        if owner is None and (rtype == 1 or rtype == AAAA):  # most answers: no names at all
            buf += _QNAME_POINTER + _RR_FIXED.pack(rtype, 1, ttl, len(rdata)) + rdata
            return
        if owner is None:
            buf += b"\xc0\x0c"  # the question name, as asked
        else:
            self.name(owner)
        start = len(buf)
        buf += _RR_FIXED.pack(rtype, 1, ttl, 0)
        if rtype == 1 or rtype == AAAA:
            buf += rdata
        elif rtype == SRV:
            buf += _HHH.pack(rdata[0], rdata[1], rdata[2])
            self.name(rdata[3], compress=False)  # RFC 2782: no compression in SRV targets
        elif rtype in (CNAME, NS, PTR):
            self.name(rdata)
        elif rtype == TXT:
            for chunk in rdata:
                buf.append(len(chunk))
                buf += chunk
        elif rtype == SOA:
            self.name(rdata[0])
            self.name(rdata[1])
            buf += _SOA_INTS.pack(*rdata[2:])
        else:
            buf += rdata
        rdlen = len(buf) - start - 10
        buf[start + 8:start + 10] = rdlen.to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class Limits:
    """What a reply may hold on its transport."""

    max_bytes: int
    max_answers: int  # 0: no count limit
    truncate: bool  # set TC when something was left out


def limits_for(question: Question, tcp: bool, udp_answer_limit: int,
               enable_truncate: bool, max_udp_size: int = MAX_UDP_REPLY) -> Limits:
    """What a reply to ``question`` may hold. Over UDP: 512 bytes and ``udp_answer_limit``
    answers without EDNS; with EDNS the client's size, but never more than ``max_udp_size``
    (dns.max_udp_size). A reply trimmed to the client's own size has TC only with
    ``enable_truncate`` (as Consul); one trimmed to our smaller cap always has TC, since the
    client asked for more and must learn to retry over TCP."""
    if tcp:
        return Limits(MAX_TCP, 0, False)
    edns = question.edns
    if edns is None:
        return Limits(512, min(udp_answer_limit, NO_EDNS_MAX_ANSWERS), enable_truncate)
    size = max(512, edns.udp_size)
    if size > max_udp_size:
        return Limits(max_udp_size, 0, True)
    return Limits(size, 0, enable_truncate)


def udp_limit(question: Question, max_udp_size: int) -> int:
    """The largest UDP reply ``question`` may get: 512 without EDNS, else the client's size
    within [512, max_udp_size]."""
    if question.edns is None:
        return 512
    return min(max(512, question.edns.udp_size), max_udp_size)


def truncated_reply(question: Question, reply: bytes) -> bytes:
    """``reply`` (too big for its transport) as an empty one with TC: its header's rcode and
    RA, the question, the OPT to an EDNS query. The client retries over TCP."""
    flags = (_HH.unpack_from(reply)[1] if len(reply) >= 4 else 0x8000) | 0x0200
    opt = edns_opt(question.edns, flags & 0xF)
    header = _HEADER.pack(question.id, flags, 1, 0, 0, opt is not None)
    return header + question.raw + (opt or b"")


def reply_flags(question_flags: int, rcode: int, authoritative: bool,
                recursion_available: bool) -> int:
    """QR, RD and CD copied from the query, AA, RA, and the low bits of the rcode."""
    flags = 0x8000 | (question_flags & 0x0100) | (question_flags & 0x0010)  # QR, RD, CD
    if authoritative:
        flags |= 0x0400
    if recursion_available:
        flags |= 0x0080
    return flags | (rcode & 0xF)


def encode(question: Question, answer: Answer, order: Sequence[int] | None, limits: Limits,
           flags: int) -> bytes:
    """The reply bytes (ID 0: the caller patches the query's ID in), trimmed to ``limits``."""
    answers = answer.answers
    if order is not None:
        answers = [answers[i] for i in order]
    if answer.max_answers and len(answers) > answer.max_answers:
        answers = answers[:answer.max_answers]  # a policy cap, not a truncation: no TC
    total = len(answers)
    count = min(total, limits.max_answers) if limits.max_answers else total
    message = _encode(question, answer, answers[:count], flags, True)
    if len(message) <= limits.max_bytes:
        return _truncated(message) if count < total and limits.truncate else message
    # Too big: the largest number of answers that fits, at least one (as Consul).
    low, high = 1, count - 1
    best = None
    while low <= high:
        mid = (low + high) // 2
        candidate = _encode(question, answer, answers[:mid], flags, True)
        if len(candidate) <= limits.max_bytes:
            best, low = candidate, mid + 1
        else:
            high = mid - 1
    if best is None:
        best = _encode(question, answer, answers[:1], flags, False)
        if len(best) > limits.max_bytes:  # one record is too big: say so, the client retries
            best = _encode(question, answer, [], flags, False)
            return _truncated(best)
    return _truncated(best) if limits.truncate else best


def _truncated(message: bytes) -> bytes:
    return message[:2] + bytes([message[2] | 0x02]) + message[3:]


def _encode(question: Question, answer: Answer, answers: Sequence[tuple[Record, tuple]],
            flags: int, with_additional: bool) -> bytes:
    extras: list[Record] = []
    if with_additional:
        seen: set[tuple] = set()
        for _, linked in answers:
            for rec in linked:  # SRV targets' addresses: empty for A/AAAA answers
                key = (rec[0], rec[1], rec[3])
                if key not in seen:
                    seen.add(key)
                    extras.append(rec)
        if answer.additional:
            extras.extend(answer.additional)
    opt = edns_opt(question.edns, answer.rcode)
    header = _HEADER.pack(0, flags, 1, len(answers), len(answer.authority),
                          len(extras) + (opt is not None))
    qname = question.name
    if qname.count(".") + 1 != len(question.labels):  # a label holds a "." byte: offsets
        qname = ""  # computed from the text would be wrong, so compress nothing against it
    writer = _Writer(header, question.raw, qname)
    record = writer.record
    for rec, _ in answers:
        record(rec)
    for rec in answer.authority:
        record(rec)
    for rec in extras:
        record(rec)
    if opt is not None:
        writer.buf += opt
    return bytes(writer.buf)


def edns_opt(edns: Edns | None, rcode: int) -> bytes | None:
    """The OPT record echoed to an EDNS query (None without EDNS): the client's size, DO,
    the client-subnet option with scope 0, and the upper bits of an extended rcode."""
    if edns is None:
        return None
    options = b"" if edns.ecs is None else _HH.pack(8, len(edns.ecs)) + edns.ecs
    ttl = ((rcode >> 4) << 24) | (0x8000 if edns.do else 0)
    return b"\x00" + _RR_FIXED.pack(OPT, min(max(edns.udp_size, 512), 65535), ttl,
                                    len(options)) + options


def error_reply(reject: Reject, recursion_available: bool = False) -> bytes:
    """FORMERR / NOTIMP / BADVERS reply: the header, the question when readable, the OPT."""
    query = reject.query
    ident, qflags = _HH.unpack_from(query)
    flags = 0x8000 | (qflags & 0x7800) | (qflags & 0x0100) | (reject.rcode & 0xF)
    if recursion_available:
        flags |= 0x0080
    opt = edns_opt(reject.edns, reject.rcode)
    header = _HEADER.pack(ident, flags, 1 if reject.question else 0, 0, 0, opt is not None)
    return header + reject.question + (opt or b"")


def plain_reply(question: Question, rcode: int, recursion_available: bool = False) -> bytes:
    """An answerless reply (REFUSED, SERVFAIL): no AA; the OPT echoed to an EDNS query
    (names.md: every reply to an EDNS query carries one; Consul omits it on REFUSED)."""
    flags = 0x8000 | (question.flags & 0x0110) | rcode
    if recursion_available:
        flags |= 0x0080
    opt = edns_opt(question.edns, rcode)
    header = _HEADER.pack(question.id, flags, 1, 0, 0, opt is not None)
    return header + question.raw + (opt or b"")
