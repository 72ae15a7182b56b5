"""The response cache: encoded replies by query bytes, bounded in entries and in bytes.

A reply is cached under the query's bytes after the ID (so the flags, the exact case of the name
and the EDNS options are all part of the key) and only the ID is patched in on a hit. A cached
answer with several records is kept in several orders, served in turn, so clients still see
answers shuffled.

What a client can add here is bounded twice per transport: ``cache.size`` entries and
``cache.max_bytes`` bytes, where an entry costs its key, its replies (every answer order) and an
allowance for the Python objects around them, so the bound holds for RSS and not only for a
count. A query that carries anything but its question and a plain OPT record (with at most the
client-subnet option) is answered but never stored: padding, cookies and extra records vary per
client or per query, so such entries would only push useful ones out.

Every entry carries a *dependency tag*: the lowercased service name its answer was computed from
(service-like lookups and prepared queries, positive or negative), or None (nodes, PTR, address
names, SOA/NS, refusals). ``invalidate`` drops what a catalog change (``catalog.source.Change``)
may have made wrong: everything, or the entries of the changed services and every untagged one.

Hits are counted by turn (see ``Cached``) and folded into the metrics when an entry leaves or
when ``fold_steps`` is walked (a ``/metrics`` scrape), never one by one on the packet path.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Iterator

from .catalog.source import Change
from .metrics import Metrics
from .wire import Question

# Bytes of Python objects an entry costs beyond the bytes of its key and replies: the Cached
# object, the bytes objects' headers, the replies tuple, the dict and tag-index slots, the tag.
# Measured with tracemalloc (tests/test_cache.py checks it covers what is really allocated,
# with tags shared or one per entry: ~370 and ~310 bytes on CPython 3.11).
ENTRY_OVERHEAD = 400
REPLY_OVERHEAD = 48  # per reply order: a bytes header and a tuple slot
ENTRY_SHARE = 32  # no single entry may take more than 1/32 of the byte budget
MAX_ORDERS = 16  # distinct answer orders kept per cached reply
ORDER_SLACK = 4096  # keys of departed entries the eviction order may hold, beyond a quarter


class Cached:
    """A cached reply: its encodings (one per answer order, without the ID) and its use.

    ``turn`` advances on every hit and picks the order. ``start`` is the turn the encodings
    were made at, or last kept at (the packet path rebuilds them after REBUILD_AFTER hits, at
    most once per REBUILD_SECONDS: see Responder.cached_reply); hits since
    ``counted`` are the queries answered from it that the metrics have not counted yet
    (counting them one by one would be the most expensive thing on the hot path)."""

    __slots__ = ("replies", "turn", "start", "counted", "counter_key", "pending", "truncated",
                 "tag", "size")

    def __init__(self, replies: tuple[bytes, ...], turn: int,
                 counter_key: tuple[str, str, str], pending: bytes | None, tag: str | None,
                 size: int) -> None:
        self.replies = replies
        self.turn = turn
        self.start = turn
        self.counted = turn
        self.counter_key = counter_key
        self.pending = pending  # the query, to encode the other orders on a second ask
        self.truncated = bool(replies[0][0] & 0x02)
        self.tag = tag
        self.size = size


def entry_size(key: bytes, replies: tuple[bytes, ...], pending: bytes | None) -> int:
    """What an entry is charged against the byte budget."""
    size = ENTRY_OVERHEAD + len(key) + (len(pending) if pending is not None else 0)
    for reply in replies:
        size += REPLY_OVERHEAD + len(reply)
    return size


def plain_query(question: Question, size: int) -> bool:
    """True when a query of ``size`` bytes holds only its question and, if any, one OPT record
    whose only option is the client subnet: what the cache stores. Anything more (padding,
    cookies, other options or records) makes the key unique to one client or one query."""
    expected = 12 + len(question.raw)
    edns = question.edns
    if edns is not None:
        expected += 11 if edns.ecs is None else 15 + len(edns.ecs)
    return size == expected


class ResponseCache:
    """One transport's cached replies. ``entries`` is the dict the UDP fast path reads
    directly (one lookup per packet); it is only ever emptied in place, never replaced."""

    def __init__(self, metrics: Metrics, max_entries: int, max_bytes: int,
                 enabled: bool = True) -> None:
        self.entries: dict[bytes, Cached] = {}
        self.metrics = metrics
        self.bytes = 0  # charged by the entries held now
        self.evictions = 0
        # the keys in the order they were stored, oldest first, for eviction. An entry that
        # left otherwise (popped, invalidated, stored again) leaves its key here, counted in
        # ``_gone``: a key's oldest places are the stale ones, so eviction skips as many of
        # them as counted. Rebuilt from ``entries`` when the stale ones pass a quarter of it.
        self._order: deque[bytes] = deque()
        self._gone: dict[bytes, int] = {}
        # the keys of the entries by tag: one key itself, several in a set
        self._tagged: dict[str | None, bytes | set[bytes]] = {}
        self.resize(max_entries, max_bytes, enabled)

    def resize(self, max_entries: int, max_bytes: int, enabled: bool = True) -> None:
        """New limits (a config reload); what is cached now is dropped."""
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.max_entry_bytes = max(max_bytes // ENTRY_SHARE, 2048)
        self.enabled = enabled
        self.clear()

    def __len__(self) -> int:
        return len(self.entries)

    def room_for(self, reply_size: int) -> int:
        """How many answer orders of ``reply_size`` bytes one entry may hold (0: none)."""
        return max(0, (self.max_entry_bytes - ENTRY_OVERHEAD - 600)
                   // (reply_size + REPLY_OVERHEAD))

    def store(self, key: bytes, replies: tuple[bytes, ...], turn: int,
              counter_key: tuple[str, str, str], tag: str | None,
              pending: bytes | None = None) -> Cached | None:
        """Keep a reply (None when it is not kept: disabled, or too big for one entry)."""
        if not self.enabled:
            return None
        size = ENTRY_OVERHEAD + len(key)  # entry_size, inlined: this is every miss's cost
        for reply in replies:
            size += REPLY_OVERHEAD + len(reply)
        if pending is not None:
            size += len(pending)
        if size > self.max_entry_bytes:
            return None
        entries = self.entries
        if key in entries:
            self._remove(key)
        if len(entries) >= self.max_entries or self.bytes + size > self.max_bytes:
            self._evict(size)
        entry = entries[key] = Cached(replies, turn, counter_key, pending, tag, size)
        self.bytes += size
        order = self._order
        order.append(key)
        if len(order) > len(entries) + len(entries) // 4 + ORDER_SLACK:
            self._order = deque(entries)  # (the _udpbatch reader's store mirrors this test)
            self._gone.clear()
        tagged = self._tagged
        keys = tagged.get(tag)
        if keys is None:  # the tag's only entry (a name asked once, the cold path): no set
            tagged[tag] = key
        elif keys.__class__ is bytes:
            tagged[tag] = {keys, key}  # type: ignore[arg-type]
        else:
            keys.add(key)  # type: ignore[union-attr]
        return entry

    def expand(self, key: bytes, entry: Cached, replies: tuple[bytes, ...]) -> None:
        """Replace a first-asked entry's one order with all its orders (``pending`` done)."""
        entry.replies = replies
        entry.pending = None
        size = entry_size(key, replies, None)
        if self.entries.get(key) is entry:
            self.bytes += size - entry.size
            entry.size = size
            if self.bytes > self.max_bytes:
                self._evict(0, adding=False)
        else:
            entry.size = size

    def pop(self, key: bytes) -> None:
        """Drop one entry (its hits counted)."""
        if key in self.entries:
            self._remove(key)

    def tags(self) -> Collection[str | None]:
        """The dependency tags of the entries held now (a live view: read it, keep nothing)."""
        return self._tagged.keys()

    def invalidate(self, change: Change) -> int:
        """Drop what ``change`` may have made wrong; returns how many entries went."""
        if change.everything:
            return self.clear()
        dropped = 0
        for tag in (*change.services, None):
            keys = self._tagged.pop(tag, None)
            if keys is None:
                continue
            if keys.__class__ is bytes:
                keys = (keys,)  # type: ignore[assignment]
            for key in keys:
                self._remove(key, untag=False)  # type: ignore[arg-type]
            dropped += len(keys)
        return dropped

    def clear(self) -> int:
        """Drop every entry (their hits counted)."""
        count = len(self.entries)
        fold = self.fold
        for entry in self.entries.values():
            fold(entry)
        self.entries.clear()
        self._order.clear()
        self._gone.clear()
        self._tagged.clear()
        self.bytes = 0
        return count

    def fold(self, entry: Cached) -> None:
        """Move an entry's uncounted hits into the metrics."""
        hits = entry.turn - entry.counted
        if hits:
            entry.counted = entry.turn
            metrics = self.metrics
            metrics.queries[entry.counter_key] += hits
            if entry.truncated:
                metrics.truncated += hits

    def fold_steps(self, chunk: int = 4096) -> Iterator[None]:
        """Fold every entry's hits into the metrics, ``chunk`` entries per step, so a caller
        on the event loop can yield between steps instead of stalling queries for the whole
        walk. Entries added or hit meanwhile are counted by the next walk."""
        values = list(self.entries.values())
        fold = self.fold
        for start in range(0, len(values), chunk):
            for entry in values[start:start + chunk]:
                fold(entry)
            yield

    def _remove(self, key: bytes, untag: bool = True, evicted: bool = False) -> None:
        entry = self.entries.pop(key)
        if not evicted:  # its place in _order is stale now
            gone = self._gone
            gone[key] = gone.get(key, 0) + 1
        self.fold(entry)
        self.bytes -= entry.size
        if untag:
            tagged = self._tagged
            keys = tagged.get(entry.tag)
            if keys is None:
                return
            if keys.__class__ is bytes:
                if keys == key:
                    del tagged[entry.tag]
                return
            keys.discard(key)  # type: ignore[union-attr]
            if len(keys) == 1:
                tagged[entry.tag] = next(iter(keys))  # type: ignore[arg-type]

    def _evict(self, room: int, adding: bool = True) -> None:
        """Make room for ``room`` more bytes (and one more entry when ``adding``): drop the
        oldest entries, just as many as that takes. (Dropping a tenth of the cache at once,
        as this did before, stalled the packet path for ~5 ms every few thousand misses of a
        full cache.)"""
        entries, order, gone, remove = self.entries, self._order, self._gone, self._remove
        max_bytes, max_entries = self.max_bytes - room, self.max_entries - adding
        evicted = 0
        while (self.bytes > max_bytes or len(entries) > max_entries) and order:
            key = order.popleft()
            stale = gone.get(key)
            if stale:  # an older place of a key stored again, or of one that left
                if stale == 1:
                    del gone[key]
                else:
                    gone[key] = stale - 1
                continue
            if key in entries:  # (always, by the count above; never trust it blindly)
                remove(key, evicted=True)
                evicted += 1
        self.evictions += evicted

__all__ = ["MAX_ORDERS", "Cached", "ResponseCache", "entry_size", "plain_query"]
