"""The most frequent NXDOMAIN names of the last minutes, in bounded memory.

A typo in a deployment shows up as one name asked thousands of times; a scan or an attack as
millions of names asked once. ``TopNames`` keeps, per time bucket, a frequent-items sketch: a
dict of counts pruned back to its ``k`` largest whenever it reaches ``2k`` entries (amortised
O(log k) a name, memory O(k) a bucket whatever clients send). A name asked more than 1/k of a
bucket's traffic is never pruned; the counts of rare names are lower bounds.

Cache hits count too, without touching the packet path: the responder calls ``seen`` when it
stores an NXDOMAIN reply (a cache miss, already the slow path), and the sketch remembers that
cache entry; entries count their own hits (``Cached.turn``), so ``fold`` adds each entry's new
hits to its name when the page is read or a bucket closes. At most ``watch_limit`` entries are
remembered (the newest); evicted entries are forgotten after their last hits are counted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class TopNames:
    """Counts by name over a sliding window of ``buckets`` buckets of ``bucket_seconds``."""

    def __init__(self, window: float = 600.0, buckets: int = 10, k: int = 64,
                 watch_limit: int = 4096, clock: Callable[[], float] = time.monotonic) -> None:
        self.bucket_seconds = window / buckets
        self.buckets = buckets
        self.k = k
        self.watch_limit = watch_limit
        self.clock = clock
        self._counts: dict[int, dict[str, int]] = {}  # bucket number -> name -> count
        self._now = -1
        self._current: dict[str, int] | None = None
        # cache key -> (the cache holding it, the entry, its name, its turn when last counted)
        self._watched: dict[bytes, tuple[dict[bytes, Any], Any, str, int]] = {}

    def _bucket(self) -> dict[str, int]:
        now = int(self.clock() // self.bucket_seconds)
        if now != self._now:
            if self._current is not None:
                self.fold(self._current)  # the hits so far belong to the bucket that closes
            self._current = self._counts[now] = {}
            self._now = now
            for old in [b for b in self._counts if b <= now - self.buckets]:
                del self._counts[old]
        return self._current  # type: ignore[return-value]

    def add(self, name: str, count: int = 1) -> None:
        self._add(self._bucket(), name, count)

    def _add(self, counts: dict[str, int], name: str, count: int) -> None:
        counts[name] = counts.get(name, 0) + count
        if len(counts) >= 2 * self.k:
            keep = sorted(counts.items(), key=lambda kv: -kv[1])[: self.k]
            counts.clear()
            counts.update(keep)

    def seen(self, name: str, cache: dict[bytes, Any], key: bytes) -> None:
        """One NXDOMAIN answered for ``name`` and, if cached, stored under ``key``."""
        self.add(name)
        entry = cache.get(key)
        if entry is None:
            return
        watched = self._watched
        watched.pop(key, None)
        if len(watched) >= self.watch_limit:  # forget the oldest, after counting its hits
            old = next(iter(watched))
            cache_, entry_, name_, counted = watched.pop(old)
            if entry_.turn > counted:
                self._add(self._bucket(), name_, entry_.turn - counted)
        watched[key] = (cache, entry, name, entry.turn)

    def fold(self, into: dict[str, int] | None = None) -> None:
        """Move the watched cache entries' new hits into the counts (``into``: a bucket; by
        default the current one). Entries no longer in their cache are forgotten."""
        counts = self._bucket() if into is None else into
        watched = self._watched
        for key, (cache, entry, name, counted) in list(watched.items()):
            if entry.turn > counted:
                self._add(counts, name, entry.turn - counted)
            if cache.get(key) is entry:
                watched[key] = (cache, entry, name, entry.turn)
            else:
                del watched[key]

    def top(self, n: int = 20) -> list[tuple[str, int]]:
        """The ``n`` most frequent names of the window, most frequent first."""
        self.fold()
        now = int(self.clock() // self.bucket_seconds)
        total: dict[str, int] = {}
        for bucket, counts in self._counts.items():
            if bucket > now - self.buckets:
                for name, count in counts.items():
                    total[name] = total.get(name, 0) + count
        return sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:n]

    def size(self) -> int:
        """Names and entries held (for the memory-bound test)."""
        return sum(len(c) for c in self._counts.values()) + len(self._watched)


__all__ = ["TopNames"]
