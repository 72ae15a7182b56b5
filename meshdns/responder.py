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

from .catalog.snapshot import Snapshot
from .config import Config
from .metrics import Metrics
from .names import Query, parse, parse_reverse, split_domain
from .resolve import NOERROR, REFUSED, Answer, Settings, nxdomain, resolve
from .wire import (
    CLASS_ANY,
    CLASS_IN,
    Drop,
    Limits,
    Question,
    Reject,
    encode,
    error_reply,
    limits_for,
    parse_query,
    plain_reply,
    reply_flags,
)

MAX_ORDERS = 16  # distinct answer orders kept per cached reply
REBUILD_AFTER = 4096  # hits before a cached reply is rebuilt with fresh random orders


@dataclass(frozen=True, slots=True)
class Forward:
    """A query for the recursors (the server does the I/O)."""

    question: Question
    data: bytes


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
        self.recursion = bool(config.dns.recursors)
        self.cache_enabled = config.cache.enabled
        self.cache_size = config.cache.size
        self.udp_cache: dict[bytes, list] = {}
        self.tcp_cache: dict[bytes, list] = {}
        self._random = random.Random()

    def swap(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on (one assignment; cached replies are dropped)."""
        self.snapshot = snapshot
        self.udp_cache = {}
        self.tcp_cache = {}

    def respond(self, data: bytes, tcp: bool = False) -> bytes | Forward | None:
        """The reply to one query packet, a ``Forward`` for the recursors, or None (drop)."""
        cache = self.tcp_cache if tcp else self.udp_cache
        key = data[2:]
        entry = cache.get(key)
        if entry is not None:
            variants, turn, counter_key, pending = entry
            if pending is not None:  # asked again: now it pays to have every order ready
                variants = entry[0] = self._orders_of(*pending)
                entry[3] = None
            entry[1] = turn + 1
            self.metrics.queries[counter_key] += 1
            if turn >= REBUILD_AFTER:
                del cache[key]
            reply = variants[turn % len(variants)]
            if reply[0] & 0x02:  # TC: a cached truncated reply is still a truncation
                self.metrics.truncated += 1
            return data[:2] + reply
        return self._respond_uncached(data, tcp, cache, key)

    def _respond_uncached(self, data: bytes, tcp: bool, cache: dict[bytes, list],
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
        answer, forward = self.answer(question)
        if forward:
            metrics.queries[("recursor", "forwarded", transport)] += 1
            return Forward(question, data)
        if answer is None:  # refused: not our domain and no recursors
            metrics.queries[("outside", "REFUSED", transport)] += 1
            reply = plain_reply(question, REFUSED, self.recursion)
            self._store(cache, key, [reply[2:]], ("outside", "REFUSED", transport))
            return reply
        counter_key = (answer.kind, _RCODE_NAMES.get(answer.rcode, str(answer.rcode)),
                       transport)
        metrics.queries[counter_key] += 1
        limits = limits_for(question, tcp, self.config.dns.udp_answer_limit,
                            self.config.dns.enable_truncate)
        flags = reply_flags(question.flags, answer, self.recursion)
        count = len(answer.answers)
        order = self._random.sample(range(count), count) if count > 1 else None
        reply = encode(question, answer, order, limits, flags)
        if reply[2] & 0x02:
            metrics.truncated += 1
        # One order now; the others only if the question comes again (the cold path pays once).
        pending = (question, answer, limits, flags) if count > 1 else None
        self._store(cache, key, [reply[2:]], counter_key, pending)
        return data[:2] + reply[2:]

    def answer(self, question: Question) -> tuple[Answer | None, bool]:
        """Resolve a parsed question: (answer, False), (None, True) to forward, or (None, False)
        when it is not ours to answer."""
        if question.qclass not in (CLASS_IN, CLASS_ANY):
            return None, False
        labels = question.labels
        index = split_domain(labels, self.domain_labels)
        if index < 0:
            if labels[-1:] == ("arpa",):
                return self._reverse(question)
            return None, self.recursion
        domain = self.domain_names[index]
        query = parse(labels[: len(labels) - len(self.domain_labels[index])], domain)
        return resolve(query, question.qtype, self.snapshot, self.settings), False

    def _reverse(self, question: Question) -> tuple[Answer | None, bool]:
        ip = parse_reverse(question.labels)
        snap = self.snapshot
        if ip is not None and ip in snap.ptr:
            query = Query("ptr", self.config.domain, ip)
            return resolve(query, question.qtype, snap, self.settings), False
        if self.recursion:
            return None, True
        return nxdomain(self.settings, snap, self.config.domain, "ptr"), False

    def _orders_of(self, question: Question, answer: Answer, limits: Limits,
                   flags: int) -> list[bytes]:
        """The reply in up to MAX_ORDERS answer orders: rotations of one random order, so
        every record takes its turn first (what round-robin clients rely on)."""
        count = len(answer.answers)
        base = self._random.sample(range(count), count)
        n = min(count, MAX_ORDERS)
        orders = [base[i * count // n:] + base[: i * count // n] for i in range(n)]
        return [encode(question, answer, order, limits, flags)[2:] for order in orders]

    def _store(self, cache: dict[bytes, list], key: bytes, variants: list[bytes],
               counter_key: tuple[str, str, str], pending: tuple | None = None) -> None:
        if not self.cache_enabled:
            return
        if len(cache) >= self.cache_size:  # drop the oldest tenth (dicts keep insertion order)
            for old in list(islice(cache, max(1, self.cache_size // 10))):
                del cache[old]
        cache[key] = [variants, self._random.randrange(MAX_ORDERS), counter_key, pending]


_RCODE_NAMES = {NOERROR: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP",
                5: "REFUSED", 16: "BADVERS"}

__all__ = ["Forward", "Responder", "Counter"]
