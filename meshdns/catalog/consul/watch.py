"""Blocking-query loops over Consul's HTTP API, with Consul's index rules.

A ``Watch`` follows one endpoint: it sends the last ``X-Consul-Index`` back as ``index`` so
Consul holds the request until something changes (or ``wait`` passes), and calls its handler
only when the body did change. The rules (Consul's "blocking queries" docs):

- an index lower than the last one (a snapshot restore, a new leader) resets the watch: it
  re-reads without an index and goes on from what that read returns;
- an ``X-Consul-Index`` of 0 counts as 1, so a read never sends 0 after the first one (that
  would return at once, forever);
- a reply is no promise of a change: a body equal to the last one is a wake-up with no change
  and publishes nothing;
- waits are jittered (so thousands of replicas do not reconnect in the same second), failures
  back off exponentially, and a token bucket caps how often one watch can loop under churn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .client import ConsulClient, ConsulError, Reply
from .mapping import Malformed

log = logging.getLogger("meshdns.consul")


class TokenBucket:
    """``rate`` loops a second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()

    def delay(self) -> float:
        """Take a token; the seconds to wait before using it (0: go now)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Backoff:
    """Exponential back-off with full jitter: 0.25 s doubling up to ``cap``."""

    def __init__(self, first: float = 0.25, cap: float = 5.0) -> None:
        self.first = first
        self.cap = cap
        self.failures = 0

    def next(self) -> float:
        self.failures += 1
        ceiling = min(self.cap, self.first * 2 ** (self.failures - 1))
        return ceiling / 2 + random.random() * ceiling / 2

    def reset(self) -> None:
        self.failures = 0


@dataclass
class WatchStats:
    """What ``/v1/catalog`` shows for a watch."""

    endpoint: str
    params: dict[str, str]
    index: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    reads: int = 0
    changes: int = 0
    no_change: int = 0  # wake-ups whose body was the same
    resets: int = 0  # index went backwards
    extra: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "params": self.params, "index": self.index,
                "last_success": self.last_success, "last_error": self.last_error,
                "last_error_at": self.last_error_at, "reads": self.reads,
                "changes": self.changes, "wakeups_no_change": self.no_change,
                "index_resets": self.resets}


Handler = Callable[[Any], Awaitable[None] | None]
ErrorHandler = Callable[[ConsulError], bool]


class Watch:
    """One endpoint followed with blocking queries (or polled, ``blocking=False``)."""

    def __init__(self, client: ConsulClient, endpoint: str, params: dict[str, str],
                 handler: Handler, *, blocking: bool = True, poll: float = 30.0,
                 on_error: ErrorHandler | None = None,
                 on_reply: Callable[[], None] | None = None,
                 on_same: Callable[[int], None] | None = None, raw: bool = False,
                 rate: float = 10.0, burst: float = 3.0) -> None:
        self.client = client
        self.endpoint = endpoint
        self.params = params
        self.handler = handler
        self.blocking = blocking
        self.poll = poll
        self.on_error = on_error  # True: handled (e.g. 404 on Consul CE), no back-off log
        self.on_reply = on_reply
        self.on_same = on_same  # a wake-up with a new index and the same body
        self.raw = raw  # the handler takes (last body, new body) as bytes, undecoded
        self.stats = WatchStats(endpoint, dict(params))
        self.bucket = TokenBucket(rate, burst)
        self.backoff = Backoff()
        self._last: bytes | None = None
        self.first_read = asyncio.Event()  # set after the first read (good or failed)
        self.wake = asyncio.Event()  # set: stop backing off, retry now (Consul is back)

    async def run(self) -> None:
        index = 0
        failed = False
        stats = self.stats
        while True:
            delay = self.bucket.delay()
            if delay:
                await asyncio.sleep(delay)
            # jitter: up to wait/16 shorter, so replicas and watches do not wake together
            wait = self.client.settings.wait * (1 - random.random() / 16)
            try:
                # After a failure, read at once: that tells Consul is back without waiting for
                # a change, and catches what changed meanwhile. Reads that do not block (the
                # first, polls, these) go in the fetchers' lane: the blocking lane is sized for
                # one held request per blocking watch.
                blocking = self.blocking and index > 0 and not failed
                reply = await self.client.get(self.endpoint, self.params,
                                              index=index if blocking else None,
                                              wait=wait, fetch=not blocking,
                                              decode=not self.raw)
            except ConsulError as exc:
                if self.on_reply is not None and not exc.unreachable:
                    self.on_reply()  # Consul answered: it is reachable
                handled = self.on_error(exc) if self.on_error else False
                stats.last_error = str(exc)
                stats.last_error_at = time.time()
                self.first_read.set()
                pause = self.backoff.next()
                if not handled and self.backoff.failures in (1, 4) or \
                        self.backoff.failures % 30 == 0:
                    log.warning("%s (retrying in %.1fs)", exc, pause)
                failed = True
                await self._pause(self.poll if handled else pause)
                continue
            failed = False
            if self.on_reply is not None:
                self.on_reply()
            self.backoff.reset()
            stats.reads += 1
            stats.last_success = time.time()
            new_index = max(reply.index, 1)  # 0 would make the next read return at once
            if self.blocking and index and new_index < index:
                stats.resets += 1
                log.info("consul %s: index went back from %d to %d (snapshot restore or new "
                         "leader): re-reading", self.endpoint, index, reply.index)
                index = 0
                stats.index = 0
                continue
            moved = new_index != index
            index = new_index
            stats.index = index
            if await self._deliver(reply) is False and moved and self.on_same is not None:
                self.on_same(index)
            self.first_read.set()
            if not self.blocking:
                await asyncio.sleep(self.poll * (0.75 + random.random() / 2))

    async def _pause(self, seconds: float) -> None:
        """Back off for ``seconds``, unless woken (another request just reached Consul)."""
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), seconds)

    async def _deliver(self, reply: Reply) -> bool:
        """Hand a changed body to the handler; False for a body equal to the last one."""
        stats = self.stats
        if reply.raw == self._last:
            stats.no_change += 1
            return False
        try:
            result = self.handler((self._last, reply.raw) if self.raw else reply.body)
            if result is not None:
                await result
        except Malformed as exc:
            stats.last_error = f"consul {self.endpoint}: malformed body: {exc}: update " \
                               "skipped, keeping the last good data"
            stats.last_error_at = time.time()
            log.warning("%s", stats.last_error)
            return True
        self._last = reply.raw
        stats.changes += 1
        stats.last_error = None
        return True


__all__ = ["Backoff", "TokenBucket", "Watch", "WatchStats"]
