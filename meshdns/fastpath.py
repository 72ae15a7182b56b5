"""A fast path for the commonest cache miss: ``<service>.service.<domain>`` asked for A or AAAA.

The general path (names.parse -> resolve -> wire.encode) builds a Query, an Answer and a writer
for every miss; for a plain service lookup in the local datacenter whose healthy instances all
have an address of the asked family, the reply is just the question and one fixed-size record
per distinct address, so this module writes those bytes directly. Anything else returns None and
takes the general path: tags, localities, failover, hostnames, other families, alt_domain.

``plain_service_question`` goes one step further for the cold path (every answer built): it
reads such a question straight from the packet's bytes, without building a ``Question``, when
the packet is nothing but the header, that one question and at most a bare OPT record. Anything
else (other shapes, odd bytes, options, what parse_query would refuse) returns None and is
parsed by ``wire.parse_query`` as before.

The contract, checked by tests/test_fastpath.py: for the same answer order, the bytes are
exactly those the general path produces.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .catalog.snapshot import Snapshot
from .resolve import AAAA, A, Settings
from .wire import Limits, Question, edns_opt

_HEADER = struct.Struct("!HHHHHH")
_TTL_LEN = struct.Struct("!IH")
# a compression pointer to the question name, then the type and class IN
_RECORD_HEAD = {A: b"\xc0\x0c\x00\x01\x00\x01", AAAA: b"\xc0\x0c\x00\x1c\x00\x01"}
_RECORD_SIZE = {A: 16, AAAA: 28}
_PACKED_SIZE = {A: 4, AAAA: 16}
_OPT_HEAD = b"\x00\x00\x29"  # the root owner, type OPT
_OPT_TAIL = struct.Struct("!HIH")  # UDP size, TTL (extended rcode, version, DO), rdlength


def service_addresses(question: Question, snap: Snapshot, s: Settings,
                      domain_labels: tuple[str, ...]) -> list[bytes] | None:
    """The distinct packed addresses answering a plain service A/AAAA question, in catalog
    order, or None when the general path must answer it."""
    qtype = question.qtype
    if (qtype != A and qtype != AAAA) or question.qclass != 1:
        return None
    labels = question.labels
    if len(labels) != 2 + len(domain_labels) or labels[1] != "service" \
            or labels[2:] != domain_labels:
        return None
    name = labels[0]
    if not name or name[0] == "_":
        return None
    return addresses_of(snap, s, name, qtype)


class PlainQuestion(NamedTuple):
    """What a reply to a plain ``<name>.service.<domain>`` A/AAAA query needs."""

    name: str  # the service, lowercase
    qtype: int
    flags: int  # the query's header flags
    raw: bytes  # the question section as sent
    edns_size: int  # the OPT's UDP size as sent; -1: no OPT
    do: bool  # the OPT's DO bit


def service_suffix(domain_labels: tuple[str, ...]) -> bytes:
    """``service.<domain>.`` in wire form, lowercase: what follows the service's label."""
    return b"".join(bytes([len(label)]) + label.encode("ascii")
                    for label in ("service", *domain_labels)) + b"\0"


def plain_service_question(data: bytes, suffix: bytes) -> PlainQuestion | None:
    """The question of a query that holds only ``<name>.<suffix>`` A or AAAA class IN and at
    most an OPT record without options (EDNS version 0), or None: then parse_query decides.

    Reading exactly what ``wire.parse_query`` reads for such a packet: the same name (ASCII
    only, so lowercasing bytes and text agree), the same EDNS fields."""
    size = len(data)
    if size < 17 or data[2] & 0xF8 or data[4:10] != b"\x00\x01\x00\x00\x00\x00":
        return None  # a response, another opcode, or not one bare question
    arcount = data[10:12]
    if arcount != b"\x00\x00" and arcount != b"\x00\x01":
        return None
    length = data[12]
    if not 0 < length < 64:
        return None
    end = 13 + length
    label = data[13:end]
    tail = end + len(suffix)
    if data[end:tail].lower() != suffix or not label.isascii() or b"." in label:
        return None
    if size < tail + 4 or data[tail + 2:tail + 4] != b"\x00\x01":
        return None  # class IN only
    qtype = data[tail] << 8 | data[tail + 1]
    if qtype != A and qtype != AAAA:
        return None
    qend = tail + 4
    name = label.decode("ascii").lower()
    if name[0] == "_":
        return None
    flags = data[2] << 8 | data[3]
    if arcount[1] == 0:
        if size != qend:
            return None
        return PlainQuestion(name, qtype, flags, data[12:qend], -1, False)
    # one OPT owned by the root, version 0, no options: 11 bytes
    if size != qend + 11 or data[qend:qend + 3] != _OPT_HEAD or data[qend + 6] \
            or data[qend + 9:qend + 11] != b"\x00\x00":
        return None
    return PlainQuestion(name, qtype, flags, data[12:qend], data[qend + 3] << 8 | data[qend + 4],
                         bool(data[qend + 7] & 0x80))


def addresses_of(snap: Snapshot, s: Settings, name: str, qtype: int) -> list[bytes] | None:
    """The distinct packed addresses of local service ``name`` for A/AAAA ``qtype``, in
    catalog order, or None when the general path must answer (see service_addresses)."""
    group = snap.services.get(("", s.local_dc, s.partition, "default", name))
    if group is None:
        return None
    found = group.passing if s.only_passing else group.usable
    if not found:
        return None  # failover, or NXDOMAIN: the general path knows
    size = _PACKED_SIZE[qtype]
    records: dict[bytes, None] = {}
    for inst in found:
        packed = inst.packed
        if len(packed) != size:
            return None  # a hostname or another family: tagged addresses, CNAMEs
        records[packed] = None
    return list(records)


def address_reply(question: Question, addresses: list[bytes], order: list[int] | None,
                  ttl: int, max_answers: int, limits: Limits, flags: int) -> bytes:
    """The reply (ID 0) carrying ``addresses`` in ``order``, within the limits, as
    wire.encode would write it."""
    return records_reply(question.qtype, question.raw, edns_opt(question.edns, 0) or b"",
                         addresses, order, ttl, max_answers, limits.max_bytes,
                         limits.max_answers, limits.truncate, flags)


def plain_opt(edns_size: int, do: bool) -> bytes:
    """The OPT echoed to a plain question's OPT (wire.edns_opt for NOERROR, no options)."""
    return _OPT_HEAD + _OPT_TAIL.pack(min(max(edns_size, 512), 65535), 0x8000 if do else 0, 0)


def records_reply(qtype: int, raw: bytes, opt: bytes, addresses: list[bytes],
                  order: list[int] | None, ttl: int, max_answers: int, max_bytes: int,
                  limit_answers: int, truncate: bool, flags: int) -> bytes:
    """``address_reply`` from its parts: the question section ``raw``, the OPT to echo (or
    b""), and the transport's limits (bytes, answers, whether trimming sets TC)."""
    if order is not None:
        addresses = [addresses[i] for i in order]
    if max_answers and len(addresses) > max_answers:
        addresses = addresses[:max_answers]
    total = len(addresses)
    count = min(total, limit_answers) if limit_answers else total
    room = (max_bytes - 12 - len(raw) - len(opt)) // _RECORD_SIZE[qtype]
    count = max(1, min(count, room))
    if count < total and truncate:
        flags |= 0x0200
    head = _RECORD_HEAD[qtype] + _TTL_LEN.pack(ttl, len(addresses[0]))
    body = b"".join(head + rdata for rdata in addresses[:count])
    header = _HEADER.pack(0, flags, 1, count, 0, 1 if opt else 0)
    return header + raw + body + opt


__all__ = ["PlainQuestion", "address_reply", "addresses_of", "plain_opt",
           "plain_service_question", "records_reply", "service_addresses", "service_suffix"]
