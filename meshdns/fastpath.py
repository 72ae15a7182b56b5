"""A fast path for the commonest cache miss: ``<service>.service.<domain>`` asked for A or AAAA.

The general path (names.parse -> resolve -> wire.encode) builds a Query, an Answer and a writer
for every miss; for a plain service lookup in the local datacenter whose healthy instances all
have an address of the asked family, the reply is just the question and one fixed-size record
per distinct address, so this module writes those bytes directly. Anything else returns None and
takes the general path: tags, localities, failover, hostnames, other families, alt_domain.

``PlainPath`` goes further for the cold path (every answer built): it reads such a question
straight from the packet's bytes, without building a ``Question``, when the packet is nothing
but the header, that one question and at most a bare OPT record, and does the whole miss (reply,
cache entry, count) in one function. It also answers the NXDOMAIN of such a name whose service
does not exist, when there is nowhere else to look (no failover for the service, no default
sameness group for the partition) and the suffix is in lowercase (the general path echoes the
asked case into the SOA's owner otherwise). Anything else (other shapes, odd bytes, options,
what parse_query would refuse) returns None and is parsed by ``wire.parse_query`` as before.

The contract, checked by tests/test_fastpath.py: for the same answer order, the bytes are
exactly those the general path produces.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from .cache import MAX_ORDERS, ResponseCache
from .catalog.snapshot import Snapshot
from .metrics import Metrics
from .resolve import AAAA, A, Settings
from .topnames import TopNames
from .wire import MAX_TCP, NO_EDNS_MAX_ANSWERS, Limits, Question, edns_opt

_HEADER = struct.Struct("!HHHHHH")
_TTL_LEN = struct.Struct("!IH")
# a compression pointer to the question name, then the type and class IN
_RECORD_HEAD = {A: b"\xc0\x0c\x00\x01\x00\x01", AAAA: b"\xc0\x0c\x00\x1c\x00\x01"}
_RECORD_SIZE = {A: 16, AAAA: 28}
_PACKED_SIZE = {A: 4, AAAA: 16}
_OPT_HEAD = b"\x00\x00\x29"  # the root owner, type OPT
_OPT_TAIL = struct.Struct("!HIH")  # UDP size, TTL (extended rcode, version, DO), rdlength
_BODY_HEAD = struct.Struct("!HHHHH")  # a header after its ID
_ONE_QUESTION = b"\x00\x01\x00\x00\x00\x00"  # QDCOUNT 1, no answer or authority records
_U32 = struct.Struct("!I")
_SOA_TIMES = struct.Struct("!IIII")  # refresh, retry, expire, minimum


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


def service_suffix(domain_labels: tuple[str, ...]) -> bytes:
    """``service.<domain>.`` in wire form, lowercase: what follows the service's label."""
    return b"".join(bytes([len(label)]) + label.encode("ascii")
                    for label in ("service", *domain_labels)) + b"\0"


class PlainPath:
    """The whole cache miss of a plain query, packet to packet: the question read from the
    bytes (a shape ``wire.parse_query`` reads the same way), the addresses found, the reply
    written and cached, the query counted; or None before any of that, and the general path
    decides. One per responder configuration and transport.

    One function on purpose: the cold path (every name asked once) spends its time here, and
    each call or intermediate object was a measurable share of a miss (bench: cold)."""

    __slots__ = ("suffix", "suffix_len", "dc", "partition", "only_passing", "ttl_of",
                 "fixed_heads", "ra", "tcp", "max_udp_size", "limit_answers", "truncate",
                 "a_record_limit", "counter_key", "random", "metrics", "suffix_text",
                 "soa_ttl", "soa_times", "nx_counter_key", "nxdomains")

    def __init__(self, domain_labels: tuple[str, ...], s: Settings, tcp: bool,
                 udp_answer_limit: int, enable_truncate: bool, max_udp_size: int,
                 recursion: bool, draw: Callable[[], float], metrics: Metrics,
                 nxdomains: TopNames) -> None:
        self.suffix = service_suffix(domain_labels)
        self.suffix_len = len(self.suffix)
        self.suffix_text = ".service." + ".".join(domain_labels)  # (as the suffix, dotted)
        self.dc, self.partition, self.only_passing = s.local_dc, s.partition, s.only_passing
        self.ttl_of = s.service_ttl
        # one TTL for every service (no dns.service_ttl rules, or only "*"): the record heads
        # are constants
        ttls = {ttl for _, ttl in s.ttl_prefixes}
        if s.ttl_prefixes and s.ttl_prefixes[-1][0] == "":
            ttl: int | None = ttls.pop() if len(ttls) == 1 and not s.service_ttls else None
        else:
            ttl = None if s.service_ttls or s.ttl_prefixes else 0
        self.fixed_heads = None if ttl is None else {
            qtype: _RECORD_HEAD[qtype] + _TTL_LEN.pack(ttl, _PACKED_SIZE[qtype])
            for qtype in (A, AAAA)}
        self.ra = 0x0080 if recursion else 0
        self.tcp = tcp
        self.max_udp_size = max_udp_size
        self.limit_answers = min(udp_answer_limit, NO_EDNS_MAX_ANSWERS)
        self.truncate = enable_truncate
        self.a_record_limit = s.a_record_limit
        self.counter_key = ("service", "NOERROR", "tcp" if tcp else "udp")
        # a missing service's NXDOMAIN: the SOA's TTL, and its rdata after the serial
        self.soa_ttl = _U32.pack(s.soa_min_ttl)
        self.soa_times = _SOA_TIMES.pack(s.soa_refresh, s.soa_retry, s.soa_expire,
                                         s.soa_min_ttl)
        self.nx_counter_key = ("service", "NXDOMAIN", "tcp" if tcp else "udp")
        self.nxdomains = nxdomains
        self.random = draw
        self.metrics = metrics

    def respond(self, data: bytes, key: bytes, snap: Snapshot,
                cache: ResponseCache) -> bytes | None:
        """The reply to ``data`` (``key``: data[2:]) when it holds only ``<name>.service.
        <domain>`` A or AAAA class IN (ASCII, so lowercasing bytes and text agree) and at most
        an OPT record without options (EDNS version 0), and that service's healthy local
        instances all have an address of that family; else None."""
        size = len(data)
        if size < 17 or data[2] & 0xF8 or data[4:10] != _ONE_QUESTION or data[10] \
                or data[11] > 1:
            return None  # a response, another opcode, not one bare question (and an OPT)
        length = data[12]
        if not 0 < length < 64:
            return None
        end = 13 + length
        suffix = self.suffix
        tail = end + self.suffix_len
        if not data.startswith(suffix, end) and data[end:tail].lower() != suffix:
            return None
        try:
            name = data[13:end].decode("ascii")
        except UnicodeDecodeError:
            return None
        if "." in name or name[0] == "_":  # a dot inside the label; RFC 2782's names
            return None
        qend = tail + 4
        if size < qend or data[tail + 2:qend] != b"\x00\x01" or data[tail]:
            return None  # class IN only
        qtype = data[tail + 1]
        if qtype == A:
            psize = 4
        elif qtype == AAAA:
            psize = 16
        else:
            return None
        if data[11]:  # one OPT owned by the root, version 0, no options: 11 bytes
            if size != qend + 11 or data[qend:qend + 3] != _OPT_HEAD or data[qend + 6] \
                    or data[qend + 9:qend + 11] != b"\x00\x00":
                return None
            edns_size = data[qend + 3] << 8 | data[qend + 4]
        elif size != qend:
            return None
        else:
            edns_size = -1
        lowered = name.lower()
        where = ("", self.dc, self.partition, "default", lowered)
        group = snap.services.get(where)
        if group is None:
            return self._missing(data, key, snap, cache, name, lowered, where, end, qend,
                                 edns_size)
        name = lowered
        found = group.passing if self.only_passing else group.usable
        if not found:
            return None  # failover, or NXDOMAIN: the general path knows
        if len(found) == 1:
            packed = found[0].packed
            if len(packed) != psize:
                return None  # a hostname or another family: tagged addresses, CNAMEs
            addresses = [packed]
        else:
            records: dict[bytes, None] = {}
            for inst in found:
                packed = inst.packed
                if len(packed) != psize:
                    return None
                records[packed] = None
            addresses = list(records)
        # wire.limits_for, for this question
        if edns_size < 0:
            opt = b""
            if self.tcp:
                max_bytes, limit_answers, truncate = MAX_TCP, 0, False
            else:
                max_bytes, limit_answers, truncate = 512, self.limit_answers, self.truncate
        else:
            opt = _OPT_HEAD + _OPT_TAIL.pack(min(max(edns_size, 512), 65535),
                                             0x8000 if data[qend + 7] & 0x80 else 0, 0)
            if self.tcp:
                max_bytes, limit_answers, truncate = MAX_TCP, 0, False
            else:
                max_bytes, limit_answers, truncate = max(512, edns_size), 0, self.truncate
                if max_bytes > self.max_udp_size:
                    max_bytes, truncate = self.max_udp_size, True
        flags = 0x8400 | (data[2] & 0x01) << 8 | (data[3] & 0x10) | self.ra  # wire.reply_flags
        heads = self.fixed_heads
        head = heads[qtype] if heads is not None else \
            _RECORD_HEAD[qtype] + _TTL_LEN.pack(self.ttl_of(name), psize)
        total = len(addresses)
        if total == 1:  # no order to draw, nothing to trim: one record always goes
            body = b"".join((_BODY_HEAD.pack(flags, 1, 1, 0, 1 if opt else 0), data[12:qend],
                             head, packed, opt))
            pending = None
        else:  # records_reply, inlined
            turn = int(self.random() * total)  # a random rotation (Responder._rotation)
            addresses = addresses[turn:] + addresses[:turn]
            cap = self.a_record_limit
            if cap and total > cap:
                addresses = addresses[:cap]
                total = cap
            count = min(total, limit_answers) if limit_answers else total
            room = (max_bytes - qend - len(opt)) // (psize + 12)  # qend: header + question
            count = max(1, min(count, room))
            if count < total and truncate:
                flags |= 0x0200
            body = _BODY_HEAD.pack(flags, 1, count, 0, 1 if opt else 0) + data[12:qend] \
                + b"".join([head + rdata for rdata in addresses[:count]]) + opt
            pending = data  # to encode the other orders if it is asked again
        metrics = self.metrics
        metrics.queries[self.counter_key] += 1
        if flags & 0x0200:
            metrics.truncated += 1
        if cache.enabled:  # a plain question is always a plain query (cache.plain_query)
            cache.store(key, (body,), 0 if pending is None else int(self.random() * MAX_ORDERS),
                        self.counter_key, name, pending)
        return data[:2] + body

    def _missing(self, data: bytes, key: bytes, snap: Snapshot, cache: ResponseCache,
                 asked: str, name: str, where: tuple[str, str, str, str, str], end: int,
                 qend: int, edns_size: int) -> bytes | None:
        """NXDOMAIN for a service the catalog does not have, where nothing else is tried
        (no failover for it, no default sameness group in the partition) and the suffix is
        written in lowercase (the SOA's names then point into the question, as wire.encode
        compresses them: exact case only); else None."""
        if not data.startswith(self.suffix, end) or snap.failover.get(where) \
                or snap.default_sameness.get(self.partition) is not None \
                or not 0 <= snap.serial <= 0xFFFFFFFF:
            return None
        domain = (0xC000 | (end + 8)).to_bytes(2, "big")  # the domain, after "service"
        if edns_size < 0:
            opt = b""
        else:
            opt = _OPT_HEAD + _OPT_TAIL.pack(min(max(edns_size, 512), 65535),
                                             0x8000 if data[qend + 7] & 0x80 else 0, 0)
        flags = 0x8403 | (data[2] & 0x01) << 8 | (data[3] & 0x10) | self.ra
        body = b"".join((_BODY_HEAD.pack(flags, 1, 0, 1, 1 if opt else 0), data[12:qend],
                         domain, b"\x00\x06\x00\x01", self.soa_ttl, b"\x00\x26\x02ns", domain,
                         b"\x0ahostmaster", domain, _U32.pack(snap.serial), self.soa_times,
                         opt))
        counter_key = self.nx_counter_key
        self.metrics.queries[counter_key] += 1
        if cache.enabled:
            cache.store(key, (body,), 0, counter_key, name, None)
        self.nxdomains.seen(asked + self.suffix_text, cache.entries, key)
        return data[:2] + body


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


__all__ = ["PlainPath", "address_reply", "addresses_of", "records_reply", "service_addresses",
           "service_suffix"]
