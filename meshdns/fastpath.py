"""A fast path for the commonest cache miss: ``<service>.service.<domain>`` asked for A or AAAA.

The general path (names.parse -> resolve -> wire.encode) builds a Query, an Answer and a writer
for every miss; for a plain service lookup in the local datacenter whose healthy instances all
have an address of the asked family, the reply is just the question and one fixed-size record
per distinct address, so this module writes those bytes directly. Anything else returns None and
takes the general path: tags, localities, failover, hostnames, other families, alt_domain.

The contract, checked by tests/test_fastpath.py: for the same answer order, the bytes are
exactly those the general path produces.
"""

from __future__ import annotations

import struct

from .catalog.snapshot import Snapshot
from .resolve import AAAA, A, Settings
from .wire import Limits, Question, edns_opt

_HEADER = struct.Struct("!HHHHHH")
_TTL_LEN = struct.Struct("!IH")
# a compression pointer to the question name, then the type and class IN
_RECORD_HEAD = {A: b"\xc0\x0c\x00\x01\x00\x01", AAAA: b"\xc0\x0c\x00\x1c\x00\x01"}
_RECORD_SIZE = {A: 16, AAAA: 28}
_PACKED_SIZE = {A: 4, AAAA: 16}


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
    qtype = question.qtype
    if order is not None:
        addresses = [addresses[i] for i in order]
    if max_answers and len(addresses) > max_answers:
        addresses = addresses[:max_answers]
    total = len(addresses)
    opt = edns_opt(question.edns, 0) or b""
    count = min(total, limits.max_answers) if limits.max_answers else total
    record_size = _RECORD_SIZE[qtype]
    room = (limits.max_bytes - 12 - len(question.raw) - len(opt)) // record_size
    count = max(1, min(count, room))
    if count < total and limits.truncate:
        flags |= 0x0200
    head = _RECORD_HEAD[qtype] + _TTL_LEN.pack(ttl, len(addresses[0]))
    body = b"".join(head + rdata for rdata in addresses[:count])
    header = _HEADER.pack(0, flags, 1, count, 0, 1 if opt else 0)
    return header + question.raw + body + opt


__all__ = ["address_reply", "service_addresses"]
