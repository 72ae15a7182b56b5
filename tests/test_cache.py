"""The response cache (meshdns/cache.py) without sockets: the byte budget, what is not stored,
dependency tags and selective invalidation, hit counting."""

from __future__ import annotations

import gc
import os
import tracemalloc

import dns.edns
import dns.message
import pytest

from meshdns.cache import ENTRY_OVERHEAD, ORDER_SLACK, ResponseCache, entry_size
from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import build_snapshot
from meshdns.catalog.source import EVERYTHING, Change
from meshdns.config import Config
from meshdns.metrics import Metrics
from meshdns.responder import Responder

CATALOG = Catalog.model_validate({
    "nodes": [{"name": f"n{i}", "address": f"10.0.0.{i}"} for i in range(1, 6)],
    "services": (
        [{"name": "web", "id": f"web-{i}", "node": f"n{i}", "port": 80} for i in range(1, 4)]
        + [{"name": "db", "id": "db-1", "node": "n1", "port": 5432}]
        + [{"name": "alias", "id": "alias-1", "node": "n2", "port": 80,
            "address": "db.service.consul"}]
        + [{"name": "ext", "id": "ext-1", "node": "n2", "port": 80,
            "address": "db.example.com"}]
    ),
    "prepared_queries": [{"name": "pq-web", "service": "Web"}],
})
SNAPSHOT = build_snapshot(CATALOG, local_datacenter="dc1")


def query(name: str, rtype: str = "A", **kwargs: object) -> bytes:
    msg = dns.message.make_query(name, rtype, **kwargs)  # type: ignore[arg-type]
    return msg.to_wire()


def responder(**config: object) -> Responder:
    return Responder(Config.model_validate(config), SNAPSHOT)


def tag_of(r: Responder, packet: bytes) -> str | None | bool:
    """The tag the UDP cache gave ``packet``'s reply (False: not cached)."""
    r.respond(packet)
    entry = r.udp_cache.entries.get(packet[2:])
    return False if entry is None else entry.tag


@pytest.mark.parametrize(("name", "rtype", "tag"), [
    ("web.service.consul", "A", "web"),  # the fast path
    ("WEB.service.consul", "SRV", "web"),
    ("_web._tcp.service.consul", "SRV", "web"),
    ("web.connect.consul", "A", "web"),
    ("web.ingress.consul", "A", "web"),
    ("web.virtual.consul", "A", "web"),
    ("nosuch.service.consul", "A", "nosuch"),  # NXDOMAIN for a service name
    ("pq-web.query.consul", "A", "web"),  # a prepared query: its service
    ("pq-none.query.consul", "A", None),  # no such prepared query
    ("ext.service.consul", "A", "ext"),  # a hostname outside the domain
    ("alias.service.consul", "A", None),  # its address is another service's name
    ("alias.service.consul", "SRV", None),
    ("n1.node.consul", "A", None),
    ("0a000001.addr.dc1.consul", "A", None),
    ("consul", "SOA", None),
    ("consul", "NS", None),
    ("1.0.0.10.in-addr.arpa", "PTR", None),
    ("example.org", "A", None),  # refused
])
def test_dependency_tags(name: str, rtype: str, tag: str | None) -> None:
    assert tag_of(responder(), query(name, rtype)) == tag


def test_selective_invalidation() -> None:
    r = responder()
    packets = {name: query(name, rtype) for name, rtype in [
        ("web.service.consul", "A"), ("web.service.consul", "SRV"), ("db.service.consul", "A"),
        ("nosuch.service.consul", "A"), ("n1.node.consul", "A"), ("example.org", "A")]}
    for packet in packets.values():
        r.respond(packet)
        r.respond(packet, True)
    for cache in (r.udp_cache, r.tcp_cache):
        assert len(cache) == len(packets)
    r.swap(SNAPSHOT, Change(services=frozenset({"web", "nosuch"})))
    for cache in (r.udp_cache, r.tcp_cache):
        # web's and nosuch's entries went, and every untagged one; db's stayed
        assert set(cache.entries) == {packets["db.service.consul"][2:]}
        assert cache.bytes == sum(e.size for e in cache.entries.values())
    r.swap(SNAPSHOT)  # the default change: everything
    assert len(r.udp_cache) == len(r.tcp_cache) == 0
    assert r.udp_cache.bytes == r.tcp_cache.bytes == 0


def test_hits_are_counted_when_entries_go_and_when_folded() -> None:
    r = responder()
    web, node = query("web.service.consul"), query("n1.node.consul")
    for _ in range(5):
        r.respond(web)
        r.respond(node)
    key = ("service", "NOERROR", "udp")
    assert r.metrics.queries[key] == 1  # the miss; the hits are counted by turn
    for _ in r.fold_steps():
        pass
    assert r.metrics.queries[key] == 5 and r.metrics.queries[("node", "NOERROR", "udp")] == 5
    for _ in range(3):
        r.respond(web)
    r.swap(SNAPSHOT, Change(services=frozenset({"web"})))
    assert r.metrics.queries[key] == 8
    for _ in r.fold_steps():  # nothing counted twice
        pass
    assert r.metrics.queries[key] == 8


def test_only_plain_queries_are_cached() -> None:
    r = responder()
    name = "web.service.consul"
    assert tag_of(r, query(name)) == "web"
    assert tag_of(r, query(name, use_edns=0, payload=4096)) == "web"
    ecs = dns.edns.ECSOption("10.1.2.0", 24)
    assert tag_of(r, query(name, use_edns=0, options=[ecs])) == "web"
    padded = query(name, use_edns=0, options=[dns.edns.GenericOption(12, b"\0" * 400)])
    cookie = query(name, use_edns=0, options=[dns.edns.GenericOption(10, os.urandom(8))])
    for packet in (padded, cookie):
        reply = r.respond(packet)
        assert isinstance(reply, bytes) and dns.message.from_wire(reply).answer
        assert tag_of(r, packet) is False
    assert len(r.udp_cache) == 3


def test_byte_budget_bounds_the_cache() -> None:
    budget = 256 << 10
    r = responder(cache={"size": 1_000_000, "max_bytes": budget})
    for i in range(5000):
        r.respond(query(f"svc-{i:05d}-{'x' * 40}.service.consul"))
        assert r.udp_cache.bytes <= budget
    cache = r.udp_cache
    assert cache.bytes == sum(e.size for e in cache.entries.values())
    assert 0 < len(cache) < 5000 and cache.evictions > 0
    # the newest entries are the ones kept
    assert query(f"svc-04999-{'x' * 40}.service.consul")[2:] in cache.entries
    assert r.metrics.queries[("service", "NXDOMAIN", "udp")] == 5000


def test_entry_cap_still_holds() -> None:
    r = responder(cache={"size": 100})
    for i in range(1000):
        r.respond(query(f"svc-{i}.service.consul"))
        assert len(r.udp_cache) <= 100


def test_a_full_cache_evicts_a_few_oldest_entries_per_store() -> None:
    """Dropping a tenth of a full cache at once stalled the packet path for milliseconds:
    each store into a full cache makes just the room it needs, oldest entries first, and
    the eviction order stays bounded however many entries leave by other ways."""
    cache = ResponseCache(Metrics(), 1000, 1 << 30)
    reply = (b"\x84\x00" + b"r" * 40,)
    for i in range(1000):
        cache.store(b"k%d" % i, reply, 0, ("x", "y", "z"), f"t{i}")
    assert len(cache) == 1000 and cache.evictions == 0
    for i in range(1000, 1100):
        cache.store(b"k%d" % i, reply, 0, ("x", "y", "z"), f"t{i}")
        assert cache.evictions == i - 999 and len(cache) == 1000
        assert b"k%d" % (i - 1000) not in cache.entries and b"k%d" % (i - 999) in cache.entries
    # by bytes too: a big entry pushes out just as many old ones as it needs
    big = (b"\x84\x00" + b"r" * 2000,)
    budget = ResponseCache(Metrics(), 1_000_000, 1 << 20)
    n = 0
    while budget.evictions == 0:
        budget.store(b"k%d" % n, reply, 0, ("x", "y", "z"), None)
        n += 1
    before = budget.evictions
    budget.store(b"big", big, 0, ("x", "y", "z"), None)
    assert 2000 // (len(reply[0]) + 400) <= budget.evictions - before <= 10
    assert budget.bytes <= budget.max_bytes
    # entries popped and stored again, never evicted: the order is compacted, not grown
    for _ in range(70):  # (7,000 keys: past 2 x 1,000 + ORDER_SLACK)
        for i in range(1000, 1100):
            cache.pop(b"k%d" % i)
            cache.store(b"k%d" % i, reply, 0, ("x", "y", "z"), f"t{i}")
    assert len(cache._order) <= 2 * len(cache) + ORDER_SLACK < 8000
    assert set(cache.entries) <= set(cache._order)


def test_eviction_skips_the_old_places_of_keys_stored_again() -> None:
    """A key popped (or invalidated) and stored again is as new as its last store: the
    oldest entry goes first, not it."""
    cache = ResponseCache(Metrics(), 5, 1 << 30)
    reply = (b"\x84\x00" + b"r" * 40,)
    for i in range(5):
        cache.store(b"k%d" % i, reply, 0, ("x", "y", "z"), None)
    cache.pop(b"k0")
    cache.store(b"k0", reply, 0, ("x", "y", "z"), None)
    cache.store(b"k1", reply, 0, ("x", "y", "z"), None)  # stored again while held
    cache.store(b"k5", reply, 0, ("x", "y", "z"), None)
    assert sorted(cache.entries) == [b"k0", b"k1", b"k3", b"k4", b"k5"]  # k2 was the oldest
    cache.store(b"k6", reply, 0, ("x", "y", "z"), None)
    assert sorted(cache.entries) == [b"k0", b"k1", b"k4", b"k5", b"k6"]


def test_a_failed_start_of_the_order_making_is_asked_again() -> None:
    """If starting the walk of refresh_steps fails once, the next job starts it again."""
    r = responder()
    calls = []

    def failing() -> None:
        calls.append("failed")
        raise RuntimeError("no loop")

    r.defer = failing
    packet = query("web.service.consul")
    r.respond(packet)
    r.respond(packet)  # a second ask queues the other orders: defer fails
    assert calls == ["failed"] and not r.refreshing and r._refresh
    r.defer = lambda: calls.append("ok")
    r.respond(query("web.service.consul", "SRV"))
    r.respond(query("web.service.consul", "SRV"))
    assert calls == ["failed", "ok"] and r.refreshing
    for _ in r.refresh_steps():
        pass
    assert not r._refresh
    entry = r.udp_cache.entries[packet[2:]]
    assert entry.pending is None and len(entry.replies) == 3


def test_one_entry_may_not_take_the_budget() -> None:
    cache = ResponseCache(Metrics(), 1000, 64 << 10)
    assert cache.store(b"k" * 10, (b"\x84\x00" + b"r" * 4000,), 0, ("x", "y", "z"), None) is None
    assert cache.store(b"k" * 10, (b"\x84\x00" + b"r" * 100,), 0, ("x", "y", "z"), None)
    assert cache.room_for(100) >= 1 and cache.room_for(10_000) == 0


@pytest.mark.parametrize("tags", [50, 20_000], ids=["shared-tags", "a-tag-each"])
def test_the_allowance_covers_what_an_entry_really_costs(tags: int) -> None:
    """ENTRY_OVERHEAD is what Python allocates per entry beyond the key and reply bytes, with
    tags shared by many entries or one per entry (names asked once: the cold path)."""
    cache = ResponseCache(Metrics(), 100_000, 1 << 30)
    keys = [os.urandom(40) for _ in range(20_000)]
    replies = [os.urandom(90) for _ in range(20_000)]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    charged = 0
    for i, key in enumerate(keys):
        reply = (b"\x84\x00" + replies[i],)
        cache.store(key, reply, 0, ("service", "NOERROR", "udp"), f"svc-{i % tags}")
        charged += entry_size(key, reply, None)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    # the key and reply objects existed before; a stored reply is a new bytes object
    real = used + len(keys) * (40 + 33)
    assert real <= charged, (real / len(keys), charged / len(keys), ENTRY_OVERHEAD)
    assert charged < 2 * real  # and the allowance is not wildly pessimistic


def test_swap_defaults_to_everything() -> None:
    r = responder()
    r.respond(query("web.service.consul"))
    r.swap(SNAPSHOT, EVERYTHING)
    assert not r.udp_cache.entries
