"""Packet in, packet out: the whole DNS pipeline, without sockets.

``Responder.respond`` is what the server calls for every UDP datagram and TCP message. Replies
are kept in a ``cache.ResponseCache`` per transport (bounded in bytes, tagged by the service an
answer depends on); ``swap`` serves a new snapshot and drops the cached replies its ``Change``
may have made wrong.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cachetools import TTLCache

from .cache import MAX_ORDERS, Cached, ResponseCache, plain_query
from .catalog.snapshot import Snapshot
from .catalog.source import EVERYTHING, Change
from .config import Config
from .fastpath import PlainPath, address_reply, service_addresses
from .metrics import Metrics
from .names import Query, parse, parse_reverse, split_domain
from .resolve import (
    CNAME,
    NOERROR,
    NXDOMAIN,
    REFUSED,
    SERVFAIL,
    SRV,
    Answer,
    Settings,
    nxdomain,
    resolve,
)
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

log = logging.getLogger("meshdns")

REBUILD_AFTER = 4096  # hits before a cached reply is rebuilt with fresh random orders
# ... and no sooner than this after its last rebuild: a rebuild is up to 16 orders made between
# packets, ~125 us each for a 20-record SRV reply with its additional records, and a name asked
# 1,500 times a second reached 4,096 hits every 3 s: 50 such names kept the loop in those steps
# 4% of the time, and the queries arriving meanwhile waited (large-edns p99 0.41-0.44 ms with,
# 0.18-0.26 ms without). Every record still takes its turn first in every order set.
REBUILD_SECONDS = 30.0
REBUILT_KEPT = 4096  # entries whose last rebuild is remembered (a name needs 136 q/s to count)
# lookups whose answer is computed from one service's instances (their dependency tag)
SERVICE_KINDS = frozenset({"service", "connect", "ingress", "virtual"})
# labels that make a name under our domain a service-like lookup (see _leads_elsewhere)
_SERVICE_WORDS = frozenset({"service", "connect", "ingress", "virtual", "query"})


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
        self.snapshot = snapshot
        self.metrics = metrics or Metrics()
        # False while the source has nothing to serve (no data yet, or too stale): questions in
        # the domain get SERVFAIL, never cached, so the first good snapshot answers at once
        self.serving = True
        # Consul mode: prepared queries are executed by Consul and held here (catalog/consul/
        # queries.py); None: answered from the snapshot's own definitions (the file source)
        self.prepared: Any = None
        c = config.cache
        self.udp_cache = ResponseCache(self.metrics, c.size, c.max_bytes, c.enabled)
        self.tcp_cache = ResponseCache(self.metrics, c.size, c.max_bytes, c.enabled)
        self._random = random.Random()
        # the most asked NXDOMAIN names (the status page): fed on the miss path only
        self.nxdomains = TopNames()
        # answer orders to make (see cached_reply): (tcp, key) -> the entry they are for, and
        # what to call when the queue stops being empty (None: make them at once instead)
        self._refresh: dict[tuple[bool, bytes], Cached] = {}
        self.defer: Callable[[], None] | None = None
        self.refreshing = False  # a walk of refresh_steps is under way (or asked for)
        # (tcp, key) of the entries rebuilt in the last REBUILD_SECONDS (see cached_reply)
        self._rebuilt: TTLCache[tuple[bool, bytes], bool] = TTLCache(
            REBUILT_KEPT, REBUILD_SECONDS, timer=time.monotonic)
        self.reconfigure(config)

    @property
    def _random(self) -> random.Random:
        """The answers' orders come from this (tests put a seeded one here)."""
        return self._rng

    @_random.setter
    def _random(self, rng: random.Random) -> None:
        self._rng = rng
        for plain in (getattr(self, "udp_plain", None), getattr(self, "tcp_plain", None)):
            if plain is not None:  # (its own reference, for the cold path's sake)
                plain.random = rng.random

    def reconfigure(self, config: Config) -> None:
        """Answer by ``config`` from now on (TTLs, limits, SOA, domains, recursors, cache);
        cached replies, built under the old one, are dropped."""
        self.config = config
        self.settings = Settings.from_config(config)
        domains = [config.domain] + ([config.alt_domain] if config.alt_domain else [])
        domains.sort(key=lambda d: -d.count("."))
        self.domain_names = tuple(domains)
        self.domain_labels = tuple(tuple(d.split(".")) for d in domains)
        self.primary_labels = tuple(config.domain.split("."))
        self.recursion = bool(config.dns.recursors)
        self.max_udp_size = config.dns.max_udp_size
        dns = config.dns
        self.udp_plain, self.tcp_plain = (
            PlainPath(self.primary_labels, self.settings, tcp, dns.udp_answer_limit,
                      dns.enable_truncate, self.max_udp_size, self.recursion,
                      self._random.random, self.metrics, self.nxdomains)
            for tcp in (False, True))
        c = config.cache
        for cache in (self.udp_cache, self.tcp_cache):  # resized in place: the UDP path holds it
            cache.resize(c.size, c.max_bytes, c.enabled)

    def cached_services(self) -> Container[str | None]:
        """The service names (lowercased) some cached answer depends on, either transport."""
        return _Both(self.udp_cache.tags(), self.tcp_cache.tags())

    def swap(self, snapshot: Snapshot, change: Change = EVERYTHING) -> None:
        """Serve ``snapshot`` from now on (one assignment), dropping the cached replies that
        ``change`` may have made wrong (all of them by default)."""
        self.snapshot = snapshot
        self.udp_cache.invalidate(change)
        self.tcp_cache.invalidate(change)

    def respond(self, data: bytes, tcp: bool = False) -> bytes | Forward | None:
        """The reply to one query packet, a ``Forward`` for the recursors, or None (drop)."""
        cache = self.tcp_cache if tcp else self.udp_cache
        key = data[2:]
        entry = cache.entries.get(key)
        if entry is not None:
            return data[:2] + self.cached_reply(entry, cache, key)
        return self._respond_uncached(data, tcp, cache, key)

    def respond_uncached(self, data: bytes, tcp: bool, key: bytes) -> bytes | Forward | None:
        """``respond`` for a query the caller already looked up in vain (``key``: data[2:])."""
        cache = self.tcp_cache if tcp else self.udp_cache
        if self.serving:  # _respond_uncached's first step, inlined: the cold path is this
            reply = (self.tcp_plain if tcp else self.udp_plain).respond(data, key,
                                                                         self.snapshot, cache)
            if reply is not None:
                return reply
        return self._respond_general(data, tcp, cache, key)

    def cached_reply(self, entry: Cached, cache: ResponseCache, key: bytes) -> bytes:
        """The next order of a cached reply (without its ID). A reply asked a second time
        gets its other answer orders, and one hit REBUILD_AFTER times fresh random ones (not
        within REBUILD_SECONDS of its last rebuild: then its count starts again): at once
        when no one runs ``refresh_steps`` (``defer`` None), else queued for it, the orders
        made so far served meanwhile (16 orders of a 20-record SRV reply take ~2 ms to
        encode: in one go that stalls every query behind them)."""
        turn = entry.turn
        if entry.pending:  # asked again: now it pays to have every order ready
            if self.defer is None:
                cache.expand(key, entry, self._all_orders(entry.pending, cache is self.tcp_cache,
                                                          cache.room_for(len(entry.replies[0]))))
            else:
                self._queue_refresh((cache is self.tcp_cache, key), entry)
        elif turn - entry.start >= REBUILD_AFTER:  # fresh random orders now and then
            job = (cache is self.tcp_cache, key)
            if len(entry.replies) == 1 or job in self._rebuilt:  # one order; rebuilt lately
                entry.start = turn
            else:
                self._rebuilt[job] = True
                if self.defer is None:
                    cache.pop(key)
                else:
                    entry.start = turn
                    self._queue_refresh(job, entry)
        entry.turn = turn + 1
        replies = entry.replies
        return replies[turn % len(replies)]

    def _queue_refresh(self, job: tuple[bool, bytes], entry: Cached) -> None:
        """Queue ``entry``'s orders for refresh_steps (``job``: (tcp, its key))."""
        if self._refresh.get(job) is not entry:  # (a job for an entry gone: replaced)
            self._refresh[job] = entry
        if not self.refreshing:
            self.refreshing = True  # until the walk ends (the server's task says so)
            try:
                self.defer()  # type: ignore[misc]
            except Exception:  # (the next job asks again; this reply is still sent)
                self.refreshing = False
                log.exception("internal error starting to make answer orders")

    def refresh_steps(self) -> Iterator[None]:
        """Make the answer orders queued by ``cached_reply``, one order per step: the server
        walks this between packets. An entry that left the cache meanwhile (a snapshot swap, a
        reload, eviction) is dropped from the queue, its orders unused."""
        refresh = self._refresh
        while refresh:
            (tcp, key), entry = next(iter(refresh.items()))
            cache = self.tcp_cache if tcp else self.udp_cache
            try:  # (an error leaves this job out of the queue: the next one still runs)
                if cache.entries.get(key) is not entry:
                    continue
                replies: list[bytes] = []
                for reply in self._orders_steps(entry.pending or b"\0\0" + key, tcp,
                                                cache.room_for(len(entry.replies[0]))):
                    if reply is None:
                        break  # (no answer any more: the entry goes with the next change)
                    replies.append(reply)
                    yield
                    if cache.entries.get(key) is not entry:
                        break
                else:
                    if replies:
                        cache.expand(key, entry, tuple(replies))
                        entry.start = entry.turn
            finally:
                if refresh.get((tcp, key)) is entry:  # (not a job queued since for a new one)
                    del refresh[(tcp, key)]

    def fold_steps(self) -> Iterator[None]:
        """Count every cached reply's hits into the metrics, a step at a time (see
        ResponseCache.fold_steps): a ``/metrics`` scrape walks this between queries."""
        yield from self.udp_cache.fold_steps()
        yield from self.tcp_cache.fold_steps()

    def query_counts(self) -> Counter[tuple[str, str, str]]:
        """Queries by (kind, rcode, transport), cache hits included, folding every entry at
        once (a walk of both caches: /metrics uses ``fold_steps`` instead)."""
        for _ in self.fold_steps():
            pass
        return Counter(self.metrics.queries)

    def _respond_uncached(self, data: bytes, tcp: bool, cache: ResponseCache,
                          key: bytes) -> bytes | Forward | None:
        if self.serving:  # the packet-level path first (fastpath.PlainPath)
            reply = (self.tcp_plain if tcp else self.udp_plain).respond(data, key,
                                                                         self.snapshot, cache)
            if reply is not None:
                return reply
        return self._respond_general(data, tcp, cache, key)

    def _respond_general(self, data: bytes, tcp: bool, cache: ResponseCache,
                         key: bytes) -> bytes | Forward | None:
        """Every miss PlainPath does not take: the packet parsed, then the fast path for
        addresses (fastpath.service_addresses) or the general resolver."""
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
        answer, forward, tag = self._answer(question)
        if isinstance(answer, Execute):
            return Execute(question, data, answer.name, answer.datacenter)
        if forward:
            metrics.queries[("recursor", "forwarded", transport)] += 1
            return Forward(question, data)
        if answer is None:  # refused: not our domain and no recursors
            metrics.queries[("outside", "REFUSED", transport)] += 1
            reply = plain_reply(question, REFUSED, self.recursion)
            self._store(cache, question, data, key, reply, ("outside", "REFUSED", transport),
                        None)
            return reply
        counter_key = (answer.kind, _RCODE_NAMES.get(answer.rcode, str(answer.rcode)),
                       transport)
        metrics.queries[counter_key] += 1
        count = len(answer.answers)
        # a random rotation: cheap (random.sample alone costs a fifth of a miss), and every
        # record gets its turn first; the full shuffle comes with the other orders
        order = self._rotation(count)
        reply = self._render(question, answer, tcp, [order])[0]
        if reply[2] & 0x02:
            metrics.truncated += 1
        # One order now; the others only if the question comes again (the cold path pays once).
        # Only the query's bytes are kept for that: objects here would be walked by every
        # garbage collection while they sit in the cache. (Results Consul executed are held
        # for their own TTL by ``prepared``, not here.)
        if answer.kind != "query" or self.prepared is None:
            self._store(cache, question, data, key, reply, counter_key, tag, count > 1)
        if answer.rcode == NXDOMAIN:
            self.nxdomains.seen(question.name, cache.entries, key)
        return data[:2] + reply[2:]

    def _rotation(self, count: int) -> list[int] | None:
        """A random rotation of ``count`` answers (None: keep the order of one or none)."""
        if count < 2:
            return None
        turn = int(self._random.random() * count)
        return list(range(turn, count)) + list(range(turn))

    def _respond_with_addresses(self, question: Question, addresses: list[bytes], data: bytes,
                                tcp: bool, cache: ResponseCache, key: bytes) -> bytes:
        """The fast path's reply (fastpath.py): what the general path would send, written
        directly. Its other answer orders come from the general path on a second ask."""
        count = len(addresses)
        order = self._rotation(count)
        limits = limits_for(question, tcp, self.config.dns.udp_answer_limit,
                            self.config.dns.enable_truncate, self.max_udp_size)
        flags = reply_flags(question.flags, NOERROR, True, self.recursion)
        settings = self.settings
        reply = address_reply(question, addresses, order, settings.service_ttl(question.labels[0]),
                              settings.a_record_limit, limits, flags)
        counter_key = ("service", "NOERROR", "tcp" if tcp else "udp")
        self.metrics.queries[counter_key] += 1
        if reply[2] & 0x02:
            self.metrics.truncated += 1
        self._store(cache, question, data, key, reply, counter_key, question.labels[0],
                    count > 1)
        return data[:2] + reply[2:]

    def answer(self, question: Question,
               trace: Trace | None = None) -> tuple[Answer | Execute | None, bool]:
        """Resolve a parsed question: (answer, False), (None, True) to forward, (Execute, False)
        for a prepared query Consul must execute first, or (None, False) when it is not ours
        to answer. ``trace``: record why (explain.py; None on the packet path)."""
        answer, forward, _ = self._answer(question, trace)
        return answer, forward

    def _answer(self, question: Question, trace: Trace | None = None
                ) -> tuple[Answer | Execute | None, bool, str | None]:
        """``answer``, and the answer's dependency tag: the service it was computed from."""
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            return None, False, None
        labels = question.labels
        index = split_domain(labels, self.domain_labels)
        if index < 0:
            if labels[-1:] == ("arpa",):
                return (*self._reverse(question, trace), None)
            return None, self.recursion, None
        domain = self.domain_names[index]
        query = parse(labels[: len(labels) - len(self.domain_labels[index])], domain, trace)
        if query.kind == "query" and self.prepared is not None:
            if trace is not None:
                trace.query = query
                trace.note("Consul executes prepared queries (/v1/query/<name>/execute): it "
                           "chose the instances, so the steps are Consul's, not shown here")
            held = self.prepared.answer(query, question.qtype, self.snapshot, self.settings)
            if held is None:
                return (Execute(question, b"", *self.prepared.key(query, self.settings)), False,
                        None)
            return held, False, None  # (not cached here: see _respond_uncached)
        answer = resolve(query, question.qtype, self.snapshot, self.settings, trace)
        return answer, False, self._dependency(query, answer)

    def _dependency(self, query: Query, answer: Answer) -> str | None:
        """The service an answer depends on (None: nodes, addresses, anything else, which
        every catalog change drops)."""
        kind = query.kind
        if kind in SERVICE_KINDS:
            name = query.name
        elif kind == "query":
            pq = self.snapshot.prepared_queries.get(query.name)
            if pq is None:
                return None
            name = pq.service.lower()
        else:
            return None
        return None if self._leads_elsewhere(answer, name) else name

    def _leads_elsewhere(self, answer: Answer, name: str) -> bool:
        """True when an answer also carries another service's records: an instance whose
        address is a hostname under our domain (a CNAME, or an SRV target, resolved here)."""
        for (_, rtype, _, rdata), _ in answer.answers:
            if rtype == SRV:
                target = rdata[3]
            elif rtype == CNAME:
                target = rdata
            else:
                continue
            labels = tuple(target.lower().split("."))
            if _SERVICE_WORDS.isdisjoint(labels):
                continue  # a node or .addr. target, or a name outside the service grammar
            index = split_domain(labels, self.domain_labels)
            if index < 0:
                continue  # outside our domain: not looked up
            inner = parse(labels[: len(labels) - len(self.domain_labels[index])],
                          self.domain_names[index])
            if inner.kind == "query" or (inner.kind in SERVICE_KINDS and inner.name != name):
                return True
        return False

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

    def _all_orders(self, data: bytes, tcp: bool, room: int) -> tuple[bytes, ...]:
        """The reply in up to MAX_ORDERS answer orders (and at most ``room``): rotations of
        one random order, so every record takes its turn first (what round-robin clients
        rely on)."""
        replies = tuple(self._orders_steps(data, tcp, room))
        assert None not in replies  # it was answered a moment ago from the same snapshot
        return replies  # type: ignore[return-value]

    def _orders_steps(self, data: bytes, tcp: bool, room: int) -> Iterator[bytes | None]:
        """``_all_orders``, one order (without its ID) at a time; None when the question has no
        answer now."""
        question = parse_query(data)
        answer, _ = self.answer(question)
        if answer is None:
            yield None
            return
        count = len(answer.answers)
        base = list(range(count))
        self._random.shuffle(base)
        n = max(1, min(count, MAX_ORDERS, room))
        for i in range(n):
            cut = i * count // n
            yield self._render(question, answer, tcp, [base[cut:] + base[:cut]])[0][2:]

    def render(self, question: Question, answer: Answer, tcp: bool) -> bytes:
        """The reply (ID 0) the server sends for ``answer``, records in resolution order: what
        ``meshdns explain`` shows (the packet path only reorders the same records)."""
        return self._render(question, answer, tcp, [None])[0]

    def _render(self, question: Question, answer: Answer, tcp: bool,
                orders: list[list[int] | None]) -> list[bytes]:
        """The reply (ID 0) for each answer order, within the transport's limits."""
        limits = limits_for(question, tcp, self.config.dns.udp_answer_limit,
                            self.config.dns.enable_truncate, self.max_udp_size)
        flags = reply_flags(question.flags, answer.rcode, answer.authoritative, self.recursion)
        return [encode(question, answer, order, limits, flags) for order in orders]

    def _store(self, cache: ResponseCache, question: Question, data: bytes, key: bytes,
               reply: bytes, counter_key: tuple[str, str, str], tag: str | None,
               more_orders: bool = False) -> None:
        """Cache a reply just sent, unless the query carries more than a question and a
        plain OPT (see cache.plain_query). ``more_orders``: keep the query, to encode the
        reply's other answer orders if it is asked again."""
        if cache.enabled and plain_query(question, len(data)):
            # the first turn picks the order a second ask starts at: no draw for one order
            cache.store(key, (reply[2:],), int(self._random.random() * MAX_ORDERS)
                        if more_orders else 0, counter_key, tag, data if more_orders else None)


class _Both(Container[str | None]):
    """Two containers asked as one, without copying either."""

    def __init__(self, a: Container[str | None], b: Container[str | None]) -> None:
        self.a, self.b = a, b

    def __contains__(self, item: object) -> bool:
        return item in self.a or item in self.b


_RCODE_NAMES = {NOERROR: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
                5: "REFUSED", 16: "BADVERS"}

__all__ = ["Cached", "Execute", "Forward", "Responder"]
