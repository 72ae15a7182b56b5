"""Packet in, packet out: the whole DNS pipeline and its response cache, without sockets.

``Responder.respond`` is what the server calls for every UDP datagram and TCP message. A reply
is cached under the query's bytes after the ID (so the flags, the exact case of the name and the
EDNS options are all part of the key) and only the ID is patched in on a hit. A cached answer
with several records is kept in several orders and the orders are served in turn, so clients
still see answers shuffled; the cache is emptied whenever a new catalog snapshot is swapped in.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any

from .catalog.snapshot import Snapshot
from .catalog.source import EVERYTHING, Change
from .config import Config
from .fastpath import address_reply, service_addresses
from .metrics import Metrics
from .names import Query, parse, parse_reverse, split_domain
from .resolve import NOERROR, NXDOMAIN, REFUSED, SERVFAIL, Answer, Settings, nxdomain, resolve
from .topnames import TopNames
from .wire import (
    CLASS_ANY,
    CLASS_IN,
    Drop,
    Question,
    Reject,
    encode,
    error_reply,
    limits_for,
    parse_query,
    plain_reply,
    reply_flags,
)

if TYPE_CHECKING:
    from .trace import Trace

MAX_ORDERS = 16  # distinct answer orders kept per cached reply
REBUILD_AFTER = 4096  # hits before a cached reply is rebuilt with fresh random orders


@dataclass(frozen=True, slots=True)
class Forward:
    """A query for the recursors (the server does the I/O)."""

    question: Question
    data: bytes


@dataclass(frozen=True, slots=True)
class Execute:
    """A prepared query to execute in Consul first (the server does the I/O, then answers the
    packet again from the held result)."""

    question: Question
    data: bytes
    name: str
    datacenter: str


class Responder:
    """Answers packets from the current snapshot; swap a new one in with ``swap``."""

    def __init__(self, config: Config, snapshot: Snapshot, metrics: Metrics | None = None) -> None:
        self.config = config
        self.settings = Settings.from_config(config)
        self.snapshot = snapshot
        self.metrics = metrics or Metrics()
        domains = [config.domain] + ([config.alt_domain] if config.alt_domain else [])
        domains.sort(key=lambda d: -d.count("."))
        self.domain_names = tuple(domains)
        self.domain_labels = tuple(tuple(d.split(".")) for d in domains)
        self.primary_labels = tuple(config.domain.split("."))
        self.recursion = bool(config.dns.recursors)
        self.cache_enabled = config.cache.enabled
        self.cache_size = config.cache.size
        # False while the source has nothing to serve (no data yet, or too stale): questions in
        # the domain get SERVFAIL, never cached, so the first good snapshot answers at once
        self.serving = True
        # Consul mode: prepared queries are executed by Consul and held here (catalog/consul/
        # queries.py); None: answered from the snapshot's own definitions (the file source)
        self.prepared: Any = None
        self.udp_cache: dict[bytes, Cached] = {}
        self.tcp_cache: dict[bytes, Cached] = {}
        self._random = random.Random()
        # the most asked NXDOMAIN names (the status page): fed on the miss path only
        self.nxdomains = TopNames()

    def swap(self, snapshot: Snapshot, change: Change = EVERYTHING) -> None:
        """Serve ``snapshot`` from now on (one assignment; cached replies are dropped).

        ``change`` says what changed; every cached reply is dropped whatever it says, for now.
        The cache dicts are emptied in place: the UDP fast path holds a reference to them."""
        self.snapshot = snapshot
        for cache in (self.udp_cache, self.tcp_cache):
            for entry in cache.values():
                self._fold(entry)
            cache.clear()

    def respond(self, data: bytes, tcp: bool = False) -> bytes | Forward | None:
        """The reply to one query packet, a ``Forward`` for the recursors, or None (drop)."""
        cache = self.tcp_cache if tcp else self.udp_cache
        key = data[2:]
        entry = cache.get(key)
        if entry is not None:
            return data[:2] + self.cached_reply(entry, cache, key)
        return self._respond_uncached(data, tcp, cache, key)

    def respond_uncached(self, data: bytes, tcp: bool, key: bytes) -> bytes | Forward | None:
        """``respond`` for a query the caller already looked up in vain (``key``: data[2:])."""
        return self._respond_uncached(data, tcp, self.tcp_cache if tcp else self.udp_cache, key)

    def cached_reply(self, entry: Cached, cache: dict[bytes, Cached], key: bytes) -> bytes:
        """The next order of a cached reply (without its ID)."""
        if entry.pending:  # asked again: now it pays to have every order ready
            entry.replies = self._all_orders(entry.pending, cache is self.tcp_cache)
            entry.pending = None
        turn = entry.turn
        entry.turn = turn + 1
        if turn - entry.start >= REBUILD_AFTER:  # fresh random orders now and then
            self._fold(cache.pop(key))
        return entry.replies[turn % len(entry.replies)]

    def _fold(self, entry: Cached) -> None:
        """Move an entry's hit count into the metrics (hits are counted by its turn)."""
        hits = entry.turn - entry.start
        entry.start = entry.turn
        if hits:
            self.metrics.queries[entry.counter_key] += hits
            if entry.truncated:
                self.metrics.truncated += hits

    def query_counts(self) -> Counter[tuple[str, str, str]]:
        """Queries by (kind, rcode, transport), cache hits included."""
        counts = Counter(self.metrics.queries)
        for cache in (self.udp_cache, self.tcp_cache):
            for entry in list(cache.values()):
                hits = entry.turn - entry.start
                if hits:
                    counts[entry.counter_key] += hits
        return counts

    def truncated_count(self) -> int:
        return self.metrics.truncated + sum(
            entry.turn - entry.start for cache in (self.udp_cache, self.tcp_cache)
            for entry in list(cache.values()) if entry.truncated)

    def _respond_uncached(self, data: bytes, tcp: bool, cache: dict[bytes, Cached],
                          key: bytes) -> bytes | Forward | None:
        transport = "tcp" if tcp else "udp"
        metrics = self.metrics
        try:
            question = parse_query(data)
        except Drop:
            metrics.dropped += 1
            return None
        except Reject as reject:
            metrics.queries[("malformed", _RCODE_NAMES.get(reject.rcode, str(reject.rcode)),
                             transport)] += 1
            return error_reply(reject, self.recursion)
        if not self.serving and split_domain(question.labels, self.domain_labels) >= 0:
            metrics.queries[("unavailable", "SERVFAIL", transport)] += 1
            return plain_reply(question, SERVFAIL, self.recursion)
        addresses = service_addresses(question, self.snapshot, self.settings,
                                      self.primary_labels)
        if addresses is not None:
            return self._respond_with_addresses(question, addresses, data, tcp, cache, key)
        answer, forward = self.answer(question)
        if isinstance(answer, Execute):
            return Execute(question, data, answer.name, answer.datacenter)
        if forward:
            metrics.queries[("recursor", "forwarded", transport)] += 1
            return Forward(question, data)
        if answer is None:  # refused: not our domain and no recursors
            metrics.queries[("outside", "REFUSED", transport)] += 1
            reply = plain_reply(question, REFUSED, self.recursion)
            self._store(cache, key, (reply[2:],), ("outside", "REFUSED", transport))
            return reply
        counter_key = (answer.kind, _RCODE_NAMES.get(answer.rcode, str(answer.rcode)),
                       transport)
        metrics.queries[counter_key] += 1
        count = len(answer.answers)
        # a random rotation: cheap (random.sample alone costs a fifth of a miss), and every
        # record gets its turn first; the full shuffle comes with the other orders
        turn = int(self._random.random() * count)
        order = list(range(turn, count)) + list(range(turn)) if count > 1 else None
        reply = self._render(question, answer, tcp, [order])[0]
        if reply[2] & 0x02:
            metrics.truncated += 1
        # One order now; the others only if the question comes again (the cold path pays once).
        # Only the query's bytes are kept for that: objects here would be walked by every
        # garbage collection while they sit in the cache. (Results Consul executed are held
        # for their own TTL by ``prepared``, not here.)
        if answer.kind != "query" or self.prepared is None:
            self._store(cache, key, (reply[2:],), counter_key, data if count > 1 else None)
        if answer.rcode == NXDOMAIN:
            self.nxdomains.seen(question.name, cache, key)
        return data[:2] + reply[2:]

    def _respond_with_addresses(self, question: Question, addresses: list[bytes], data: bytes,
                                tcp: bool, cache: dict[bytes, Cached], key: bytes) -> bytes:
        """The fast path's reply (fastpath.py): what the general path would send, written
        directly. Its other answer orders come from the general path on a second ask."""
        count = len(addresses)
        turn = int(self._random.random() * count)
        order = list(range(turn, count)) + list(range(turn)) if count > 1 else None
        limits = limits_for(question, tcp, self.config.dns.udp_answer_limit,
                            self.config.dns.enable_truncate)
        flags = reply_flags(question.flags, NOERROR, True, self.recursion)
        settings = self.settings
        reply = address_reply(question, addresses, order, settings.service_ttl(question.labels[0]),
                              settings.a_record_limit, limits, flags)
        counter_key = ("service", "NOERROR", "tcp" if tcp else "udp")
        self.metrics.queries[counter_key] += 1
        if reply[2] & 0x02:
            self.metrics.truncated += 1
        self._store(cache, key, (reply[2:],), counter_key, data if count > 1 else None)
        return data[:2] + reply[2:]

    def answer(self, question: Question,
               trace: Trace | None = None) -> tuple[Answer | Execute | None, bool]:
        """Resolve a parsed question: (answer, False), (None, True) to forward, (Execute, False)
        for a prepared query Consul must execute first, or (None, False) when it is not ours
        to answer. ``trace``: record why (explain.py; None on the packet path)."""
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            return None, False
        labels = question.labels
        index = split_domain(labels, self.domain_labels)
        if index < 0:
            if labels[-1:] == ("arpa",):
                return self._reverse(question, trace)
            return None, self.recursion
        domain = self.domain_names[index]
        query = parse(labels[: len(labels) - len(self.domain_labels[index])], domain, trace)
        if query.kind == "query" and self.prepared is not None:
            held = self.prepared.answer(query, question.qtype, self.snapshot, self.settings)
            if held is None:
                return Execute(question, b"", *self.prepared.key(query, self.settings)), False
            return held, False
        return resolve(query, question.qtype, self.snapshot, self.settings, trace), False

    def _reverse(self, question: Question,
                 trace: Trace | None = None) -> tuple[Answer | None, bool]:
        ip = parse_reverse(question.labels)
        snap = self.snapshot
        if ip is not None and ip in snap.ptr:
            query = Query("ptr", self.config.domain, ip)
            return resolve(query, question.qtype, snap, self.settings, trace), False
        if self.recursion:
            return None, True
        if trace is not None:
            trace.note("not a reverse name of an IP address" if ip is None else
                       f"{ip} is not a node, service or virtual IP address in the catalog")
        return nxdomain(self.settings, snap, self.config.domain, "ptr"), False

    def _all_orders(self, data: bytes, tcp: bool) -> tuple[bytes, ...]:
        """The reply in up to MAX_ORDERS answer orders: rotations of one random order, so
        every record takes its turn first (what round-robin clients rely on)."""
        question = parse_query(data)
        answer, _ = self.answer(question)
        assert answer is not None  # it was answered a moment ago from the same snapshot
        count = len(answer.answers)
        base = list(range(count))
        self._random.shuffle(base)
        n = min(count, MAX_ORDERS)
        orders = [base[i * count // n:] + base[: i * count // n] for i in range(n)]
        return tuple(reply[2:] for reply in self._render(question, answer, tcp, orders))

    def render(self, question: Question, answer: Answer, tcp: bool) -> bytes:
        """The reply (ID 0) the server sends for ``answer``, records in resolution order: what
        ``meshdns explain`` shows (the packet path only reorders the same records)."""
        return self._render(question, answer, tcp, [None])[0]

    def _render(self, question: Question, answer: Answer, tcp: bool,
                orders: list[list[int] | None]) -> list[bytes]:
        """The reply (ID 0) for each answer order, within the transport's limits."""
        limits = limits_for(question, tcp, self.config.dns.udp_answer_limit,
                            self.config.dns.enable_truncate)
        flags = reply_flags(question.flags, answer.rcode, answer.authoritative, self.recursion)
        return [encode(question, answer, order, limits, flags) for order in orders]

    def _store(self, cache: dict[bytes, Cached], key: bytes, replies: tuple[bytes, ...],
               counter_key: tuple[str, str, str], pending: bytes | None = None) -> None:
        if not self.cache_enabled:
            return
        if len(cache) >= self.cache_size:  # drop the oldest tenth (dicts keep insertion order)
            for old in list(islice(cache, max(1, self.cache_size // 10))):
                self._fold(cache.pop(old))
        cache[key] = Cached(replies, int(self._random.random() * MAX_ORDERS), counter_key,
                            pending)


class Cached:
    """A cached reply: its encodings (one per answer order, without the ID) and its use.

    ``turn`` advances on every hit and picks the order; hits since ``start`` are the queries
    answered from it that the metrics have not counted yet (counting them one by one would be
    the most expensive thing on the hot path)."""

    __slots__ = ("replies", "turn", "start", "counter_key", "pending", "truncated")

    def __init__(self, replies: tuple[bytes, ...], turn: int,
                 counter_key: tuple[str, str, str], pending: bytes | None) -> None:
        self.replies = replies
        self.turn = turn
        self.start = turn
        self.counter_key = counter_key
        self.pending = pending  # the query, to encode the other orders on a second ask
        self.truncated = bool(replies[0][0] & 0x02)


_RCODE_NAMES = {NOERROR: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
                5: "REFUSED", 16: "BADVERS"}

__all__ = ["Cached", "Execute", "Forward", "Responder"]
