"""The compiled UDP packet path (meshdns/_udpbatch.c, meshdns/packets.py) and its fallback.

- The extension must be built in the test venv: otherwise every other test would pass on the
  pure-Python path alone (conftest's MeshdnsProcess also checks each server's log for the path
  it must use: compiled, unless MESHDNS_PURE_PYTHON=1).
- Differential: the same packet sequences, sent as bursts that arrive in one batch, to a server
  on the compiled path and one on the pure path (in this process, over real UDP sockets, each
  responder's random orders seeded alike) get byte-identical replies, in the same order, and
  leave the same counters.
- A full send buffer (EAGAIN) loses no reply; the path in use is logged and on /v1/catalog;
  a representative set of the end-to-end tests also passes with MESHDNS_PURE_PYTHON=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.edns
import dns.flags
import dns.message
import pytest
import uvloop
import yaml
from cachetools import TTLCache
from conftest import EXAMPLE_CATALOG, ROOT, MeshdnsProcess

import meshdns.responder
import meshdns.server
from meshdns.cache import Cached, ResponseCache
from meshdns.catalog.file import FileSource
from meshdns.catalog.snapshot import Snapshot
from meshdns.catalog.source import EVERYTHING, Publish, SourceState
from meshdns.config import Config
from meshdns.packets import PURE_ENV, CompiledUdp, compiled_module
from meshdns.server import DnsServer

SEED = 1234
REBUILD_AFTER = 40  # (the real 4096, lowered for both paths alike, so a test crosses it often)


def test_the_extension_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PURE_ENV, raising=False)
    from meshdns import _udpbatch  # noqa: F401 - fails when pip install did not build it

    module, why = compiled_module()
    assert module is not None, why
    assert why.startswith("compiled")
    monkeypatch.setenv(PURE_ENV, "1")
    assert compiled_module() == (None, f"pure Python ({PURE_ENV}=1)")


# --- the differential test ------------------------------------------------------------------


class StaticSource:
    """A source with one snapshot, published at once."""

    kind = "static"

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.state = SourceState("static", serving=True)
        self.state.ready = True

    async def run(self, publish: Publish) -> None:
        publish(self.snapshot, EVERYTHING)
        await asyncio.Event().wait()

    async def reload(self, why: str) -> None:
        pass

    def reconfigure(self, config: Config) -> list[str]:
        return []


class LoopThread:
    """A uvloop event loop in a thread (as ``meshdns serve`` runs one), driven from the test."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(20)

    def hold(self, seconds: float) -> None:
        """Block the loop for ``seconds`` (returns once it is blocked): datagrams sent meanwhile
        wait in the socket and are read as one batch."""
        held = threading.Event()

        def block() -> None:
            held.set()
            time.sleep(seconds)

        self.loop.call_soon_threadsafe(block)
        assert held.wait(5)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def differential_catalog(path: Path, default_sameness: bool = True) -> Path:
    """The example catalog, plus a service with 30 instances (replies past 512 bytes); without
    ``default_sameness`` its default sameness group is not (a missing service is NXDOMAIN at
    once then, in C too, instead of failing over through the group)."""
    doc = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    if not default_sameness:
        for group in doc["sameness_groups"]:
            group["default_for_failover"] = False
    doc["nodes"] += [{"name": f"big-node-{i}", "address": f"10.9.0.{i + 1}"} for i in range(30)]
    doc["services"] += [{"name": "big", "node": f"big-node-{i}", "port": 9000 + i}
                        for i in range(30)]
    # one instance each: the miss the compiled path answers itself (IPv4, IPv6, a hostname)
    doc["nodes"] += [{"name": f"solo-node-{i}", "address": f"10.8.0.{i + 1}"} for i in range(20)]
    doc["services"] += [{"name": f"solo-{i}", "node": f"solo-node-{i}", "port": 80}
                        for i in range(20)]
    doc["services"] += [{"name": "solo-v6", "node": "solo-node-0", "address": "fd00::8"},
                        {"name": "solo-host", "node": "solo-node-1", "address": "db.example.org"}]
    path.write_text(yaml.safe_dump(doc))
    return path


def query(name: str, rdtype: str = "A", qid: int = 0, edns: int | None = None,
          options: list | None = None) -> bytes:
    if edns is None:
        msg = dns.message.make_query(name, rdtype)
    else:
        msg = dns.message.make_query(name, rdtype, use_edns=0, payload=edns,
                                     options=options or [])
    msg.id = qid
    return msg.to_wire()


def bursts() -> list[list[bytes]]:
    """The packet sequences, each sent as one burst (ids make every packet's reply tell)."""
    rng = random.Random(SEED)
    ids = iter(range(1, 1 << 16))
    q = lambda *a, **k: query(*a, qid=next(ids), **k)  # noqa: E731
    out: list[list[bytes]] = []
    # first ask (a miss, stored with its query pending), second (every order encoded), then
    # hits in turn, past the sampled 64th datagram
    out.append([q("web.service.consul") for _ in range(100)])
    # the same name asked again and again in one batch right from its first ask; SRV with
    # additional records; the 30-instance service without EDNS (udp_answer_limit), with a
    # 512-byte EDNS buffer (TC) and with 4096 (all of it)
    out.append([q("api.service.part-2.ap.consul") for _ in range(5)]
               + [q("web.service.consul", "SRV") for _ in range(20)]
               + [q("big.service.consul") for _ in range(20)]
               + [q("big.service.consul", "SRV", edns=512) for _ in range(20)]
               + [q("big.service.consul", "SRV", edns=4096) for _ in range(20)])
    # across REBUILD_AFTER: the entry is dropped and built anew (new random orders), twice
    out += [[q("big.service.consul", edns=1232) for _ in range(60)] for _ in range(3)]
    # misses of every kind, and the case asked kept
    names = ([f"nope-{i}.service.consul" for i in range(20)]
             + ["node-1.node.consul", "web.virtual.consul", "1.1.0.10.in-addr.arpa",
                "WeB.SeRvIcE.CoNsUl", "web.service.consul.", "example.org", "consul",
                "jobs.service.team-a.ns.consul", "db.service.consul",
                "web.virtual.cluster-02.peer.consul", "_web._tcp.service.consul"])
    out.append([q(name, rdtype) for name in names for rdtype in ("A", "SRV", "TXT")])
    # the same misses again (hits now), interleaved with first asks
    out.append([q(name) for name in names] + [q(f"again-{i}.service.consul") for i in range(10)]
               + [q(name) for name in names])
    # one-instance misses, answered in C on the compiled path: A and AAAA (of an IPv4 and an
    # IPv6 service: one answers, one is NOERROR with nothing), no EDNS, EDNS of every size
    # (under 512, DO set), the name in any case; a hostname instance and names it must leave
    # alone (another partition, a tag, a dot in the label)
    solo = []
    for i in range(20):
        edns = (None, 0, 1232, 4096, 65535)[i % 5]
        solo.append(q(f"solo-{i}.service.consul", ("A", "AAAA")[i % 2], edns=edns))
        solo.append(q(f"SOLO-{i}.SERVICE.consul", edns=1232))
    do = dns.message.make_query("solo-3.service.consul", "A", want_dnssec=True, payload=1400)
    do.id = next(ids)
    solo += [do.to_wire(), q("solo-v6.service.consul", "AAAA"), q("solo-v6.service.consul"),
             q("solo-host.service.consul"), q("solo-host.service.consul", "AAAA"),
             q("api.service.part-2.ap.consul"), q("v1.solo-1.service.consul"),
             q("solo-5.service.consul", "AAAA", edns=100)]
    # a missing service's NXDOMAIN (in C too), the name in any case; a suffix not in
    # lowercase is Python's (the SOA's names are compressed to the question's exact case)
    for i in range(10):
        edns = (None, 0, 1232, 4096, 65535)[i % 5]
        solo.append(q(f"gone-{i}.service.consul", ("A", "AAAA")[i % 2], edns=edns))
    gone_do = dns.message.make_query("GONE-x.service.consul", "A", want_dnssec=True)
    gone_do.id = next(ids)
    solo += [gone_do.to_wire(), q("gone-y.SERVICE.consul"), q("gone-z.service.Consul")]
    out.append(solo + solo[:10])  # and again: hits now
    # not a plain query: answered, never cached (padding), so never a hit either
    padded = [dns.edns.GenericOption(dns.edns.OptionType.PADDING, b"\0" * 40)]
    out.append([q("web.service.consul", edns=1232, options=padded) for _ in range(10)])
    # hostile: empty, 1 and 2 bytes, a header alone, a response (QR set: dropped), an opcode
    # we do not serve, two questions, a cut question, random bytes, 3,000 bytes of zeros
    header = bytes.fromhex("1234 0100 0001 0000 0000 0000")
    question = query("web.service.consul")[12:]
    hostile = [b"", b"\x01", b"\x12\x34", header[:11], header,
               bytes.fromhex("4321 8100 0001 0000 0000 0000") + question,
               bytes.fromhex("4322 1100 0001 0000 0000 0000") + question,
               bytes.fromhex("4323 0100 0002 0000 0000 0000") + question * 2,
               header + question[:8], b"\0" * 3000]
    hostile += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80))) for _ in range(30)]
    out.append(hostile + hostile)
    # everything at once, shuffled
    mixed = [p for burst in out[:5] for p in burst[:15]] + hostile
    rng.shuffle(mixed)
    out.append(mixed)
    return out


def exchange(loop: LoopThread, port: int, packets: list[bytes],
             expected: int | None = None) -> list[bytes]:
    """Send ``packets`` while the server's loop is held (so they are read in batches); the
    replies in the order they came: until ``expected`` came (and a moment more, for any
    extra), or, without it, until 0.5 s pass without one (some packets get no reply)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind(("127.0.0.1", 0))
        loop.hold(0.05)
        for packet in packets:
            s.sendto(packet, ("127.0.0.1", port))
        replies: list[bytes] = []
        want = len(packets) if expected is None else expected
        s.settimeout(0.5 if expected is None else 5.0)
        while True:
            if len(replies) >= want:
                s.settimeout(0.05)
            try:
                replies.append(s.recv(65535))
            except TimeoutError:
                return replies


@pytest.fixture(params=["example", "no-default-sameness"])
def two_servers(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                ) -> Iterator[tuple[LoopThread, DnsServer, DnsServer]]:
    monkeypatch.setattr(meshdns.server, "REBUILD_AFTER", REBUILD_AFTER)
    monkeypatch.setattr(meshdns.responder, "REBUILD_AFTER", REBUILD_AFTER)
    monkeypatch.setattr(meshdns.responder, "REBUILD_SECONDS", 0.0)  # (each crossing rebuilds)
    config = Config(listen=["127.0.0.1:0"])
    snapshot = FileSource(config, differential_catalog(
        tmp_path / "catalog.yaml", request.param == "example")).load()
    loop = LoopThread()
    servers = []

    async def start() -> DnsServer:
        server = DnsServer(config, StaticSource(snapshot))
        server.responder._random = random.Random(SEED)
        # answer orders made on the spot, not between packets: when the loop gets to them
        # differs between the paths (batches), so the bytes would too; the deferred making
        # is tested on its own (test_answer_orders_are_made_between_packets)
        server.responder.defer = None
        server.publish(snapshot, EVERYTHING)
        await server.start()
        return server

    try:
        monkeypatch.delenv(PURE_ENV, raising=False)
        servers.append(loop.run(start()))
        monkeypatch.setenv(PURE_ENV, "1")
        servers.append(loop.run(start()))
        yield loop, servers[0], servers[1]
    finally:
        for server in servers:
            loop.run(server.stop(drain=0.1))
        loop.close()


def cache_state(cache: ResponseCache) -> tuple:
    """Everything a cache holds: each entry's every slot, the byte count, the tag index and
    the eviction order."""
    entries = {key: tuple(getattr(entry, slot) for slot in Cached.__slots__)
               for key, entry in cache.entries.items()}
    tagged = {tag: keys if isinstance(keys, bytes) else frozenset(keys)
              for tag, keys in cache._tagged.items()}
    return list(entries.items()), cache.bytes, tagged, list(cache._order)


def test_compiled_and_pure_paths_reply_byte_for_byte(
        two_servers: tuple[LoopThread, DnsServer, DnsServer]) -> None:
    loop, compiled, pure = two_servers
    assert isinstance(compiled.transports[0], CompiledUdp), compiled.packet_path
    assert not isinstance(pure.transports[0], CompiledUdp)
    assert pure.packet_path == f"pure Python ({PURE_ENV}=1)"
    for number, burst in enumerate(bursts()):
        want = exchange(loop, pure.bound[0][1], burst)
        got = exchange(loop, compiled.bound[0][1], burst, len(want))
        assert got == want, f"burst {number}: the compiled path's replies differ"
        assert got, f"burst {number}: no replies at all"
    # it was the C code that answered the hits, in batches, and rotated the orders
    reader = compiled.transports[0].reader  # type: ignore[attr-defined]
    assert reader.hits > 400 and reader.received > reader.hits
    assert reader.plain_answered >= 30  # the one-instance misses, answered in C
    if not compiled.snapshot.default_sameness:  # and the missing services' NXDOMAINs
        assert reader.plain_answered >= 60
    # every NXDOMAIN counted for the status page alike
    assert compiled.responder.nxdomains.top(100) == pure.responder.nxdomains.top(100)
    assert ("GONE-x.service.consul", 1) in compiled.responder.nxdomains.top(100)
    assert reader.stored_here >= 20  # ... and most of their cache entries made there too,
    # out of the cyclic collector's sight (Python's are frozen out of it a second later)
    assert sum(not gc.is_tracked(e) for e in compiled.responder.udp_cache.entries.values()) >= 20
    # the caches hold the same entries, bookkeeping and all
    assert cache_state(compiled.responder.udp_cache) == cache_state(pure.responder.udp_cache)
    web = exchange(loop, compiled.bound[0][1], [query("web.service.consul")] * 8, 8)
    assert len(set(web)) > 1, "answers not rotated"
    exchange(loop, pure.bound[0][1], [query("web.service.consul")] * 8, 8)
    # and both left the same counters (cache hits folded from the entries' turns)
    assert compiled.responder.query_counts() == pure.responder.query_counts()
    mine, theirs = compiled.metrics, pure.metrics
    assert (mine.truncated, mine.dropped) == (theirs.truncated, theirs.dropped)
    assert mine.dropped > 0 and mine.truncated > 0
    # one datagram in SAMPLE_EVERY timed, on both
    assert sum(mine.latency_counts) == sum(theirs.latency_counts) > 0


def records(reply: bytes) -> tuple[list[str], list[str]]:
    """A reply's answer records in order, and its additional records sorted."""
    msg = dns.message.from_wire(reply)
    return ([rr.to_text() for rrset in msg.answer for rr in rrset],
            sorted(rr.to_text() for rrset in msg.additional for rr in rrset))


@contextlib.contextmanager
def orders_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pure: bool
                  ) -> Iterator[tuple[LoopThread, DnsServer, int]]:
    """A server on the differential catalog (``big``: a 30-instance service), on the compiled
    or the pure path, making answer orders between packets as it does in production; REBUILD_AFTER
    lowered: (its loop, the server, its UDP port)."""
    monkeypatch.setattr(meshdns.server, "REBUILD_AFTER", REBUILD_AFTER)
    monkeypatch.setattr(meshdns.responder, "REBUILD_AFTER", REBUILD_AFTER)
    if pure:
        monkeypatch.setenv(PURE_ENV, "1")
    else:
        monkeypatch.delenv(PURE_ENV, raising=False)
    config = Config(listen=["127.0.0.1:0"], dns={"max_udp_size": 4096})
    snapshot = FileSource(config, differential_catalog(tmp_path / "catalog.yaml")).load()
    loop = LoopThread()

    async def start() -> DnsServer:
        server = DnsServer(config, StaticSource(snapshot))
        server.publish(snapshot, EVERYTHING)
        await server.start()
        return server

    server = None
    try:
        server = loop.run(start())
        assert isinstance(server.transports[0], CompiledUdp) != pure
        yield loop, server, server.bound[0][1]
    finally:
        if server is not None:
            loop.run(server.stop(drain=0.1))
        loop.close()


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_answer_orders_are_made_between_packets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                pure: bool) -> None:
    """A reply asked a second time gets its other answer orders, and one hit REBUILD_AFTER
    times fresh ones, made by the server between packets (16 orders of a 30-record SRV reply
    take milliseconds: not on the spot): meanwhile the orders made so far are served, the
    entry is never dropped, and every reply holds the same records."""
    with orders_server(tmp_path, monkeypatch, pure) as (loop, server, port):
        ask = [query("big.service.consul", "SRV", qid=i, edns=4096) for i in range(30)]
        key = ask[0][2:]
        cache = server.responder.udp_cache
        first = exchange(loop, port, ask[:1], 1)
        entry = cache.entries[key]
        assert entry.pending is not None and len(entry.replies) == 1
        # the second ask and the rest of its batch: served the one order made so far
        burst = exchange(loop, port, ask[1:], 29)
        assert len(burst) == 29
        canonical = records(first[0])
        assert len(canonical[0]) == 30
        for reply in burst:
            answers, additional = records(reply)
            assert sorted(answers) == sorted(canonical[0]) and additional == canonical[1]
        assert {records(r)[0][0] for r in burst} == {canonical[0][0]}  # one order, still
        deadline = time.monotonic() + 5
        while cache.entries[key].pending is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.entries[key] is entry and entry.pending is None
        assert len(entry.replies) == 16 and not server.responder._refresh
        orders = entry.replies
        # now every order, in turn; past REBUILD_AFTER hits the same entry gets new ones
        more = [r for _ in range(3) for r in exchange(loop, port, ask, 30)]
        assert len({records(r)[0][0] for r in more}) > 8, "answers not rotated"
        for reply in more:
            answers, additional = records(reply)
            assert sorted(answers) == sorted(canonical[0]) and additional == canonical[1]
        deadline = time.monotonic() + 5
        while entry.replies is orders and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cache.entries[key] is entry, "the entry was dropped to be rebuilt"
        assert entry.replies is not orders and len(entry.replies) == 16
        assert entry.turn - entry.start < REBUILD_AFTER


@pytest.mark.parametrize("pure", [False, True], ids=["compiled", "pure"])
def test_an_entry_is_rebuilt_at_most_once_per_rebuild_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pure: bool) -> None:
    """Past REBUILD_AFTER hits an entry gets fresh orders, but not again within
    REBUILD_SECONDS of that: its count starts over and the orders it has are served (a hot
    name's rebuilds are steps of ~125 us between packets, and every query arriving
    meanwhile waits); once REBUILD_SECONDS have passed, the next crossing rebuilds it. (The
    rebuilt entries' clock is the test's: no timing window.)"""
    now = [0.0]
    with orders_server(tmp_path, monkeypatch, pure) as (loop, server, port):
        # (before the first query: nothing reads it yet)
        server.responder._rebuilt = TTLCache(meshdns.responder.REBUILT_KEPT,
                                             meshdns.responder.REBUILD_SECONDS,
                                             timer=lambda: now[0])
        ask = [query("big.service.consul", "SRV", qid=i, edns=4096) for i in range(30)]
        key = ask[0][2:]
        cache = server.responder.udp_cache

        def settled(what: str) -> tuple[bytes, ...]:
            deadline = time.monotonic() + 5
            while (cache.entries[key].pending is not None or server.responder._refresh
                   ) and time.monotonic() < deadline:
                time.sleep(0.01)
            entry = cache.entries[key]
            assert entry.pending is None and not server.responder._refresh, what
            assert len(entry.replies) == 16, what
            return entry.replies

        exchange(loop, port, ask[:2], 2)  # stored, then every order
        expanded = settled("the second ask")
        exchange(loop, port, ask, 30)
        exchange(loop, port, ask, 30)  # past REBUILD_AFTER (40) hits: rebuilt
        first = settled("the first rebuild")
        assert first is not expanded, "not rebuilt after REBUILD_AFTER hits"
        now[0] += meshdns.responder.REBUILD_SECONDS - 1
        for _ in range(3):  # 90 hits more, two crossings, within REBUILD_SECONDS: kept
            exchange(loop, port, ask, 30)
        assert settled("hits within REBUILD_SECONDS") is first, "rebuilt again too soon"
        now[0] += 2
        for _ in range(2):  # past REBUILD_SECONDS: the next crossing rebuilds it
            exchange(loop, port, ask, 30)
        again = settled("the crossing after REBUILD_SECONDS")
        assert again is not first, "not rebuilt once REBUILD_SECONDS had passed"
        for reply in exchange(loop, port, ask, 30):
            assert len(records(reply)[0]) == 30


# --- a full send buffer -----------------------------------------------------------------------


def test_a_full_send_buffer_delays_replies_and_loses_none() -> None:
    """Loopback UDP never says EAGAIN (a sent datagram stops counting against the sender's
    buffer as soon as it is queued at the receiver), so a Unix datagram pair stands in: there
    a reply counts until the peer reads it, and 4 KiB of send buffer fill after a few."""
    module, why = compiled_module()
    assert module is not None, why
    client, server_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    server_end.setblocking(False)
    client.setblocking(False)
    entries = {b"HIT": Cached((b"A" * 1000, b"B" * 1000), 0, ("service", "NOERROR", "udp"),
                              None, None, 2000)}
    answered: list[bytes] = []

    def answer(data: bytes, addr: tuple | None, miss: bytes | None) -> bytes:
        answered.append(data)
        return data[:2] + b"python:" + data[2:] + b"." * 900

    async def scenario() -> tuple[list[bytes], bool, int]:
        listener = CompiledUdp(module, server_end, entries, answer, lambda _: None, 4096, 64)
        for i in range(60):
            client.send(i.to_bytes(2, "big") + (b"HIT" if i % 3 else b"MISS"))
        waited = False
        replies: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(replies) < 60 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
            waited = waited or listener.waiting
            while True:  # read only now and then: the server's buffer stays full meanwhile
                try:
                    replies.append(client.recv(4096))
                except BlockingIOError:
                    break
        errors = listener.reader.send_errors
        listener.close()
        return replies, waited, errors

    replies, waited, errors = uvloop.run(scenario())
    client.close()
    assert waited, "the send buffer never filled: the test shows nothing"
    assert errors == 0
    assert [int.from_bytes(r[:2], "big") for r in replies] == list(range(60))  # none lost
    for i, reply in enumerate(replies):
        if i % 3:
            assert reply[2:] in (b"A" * 1000, b"B" * 1000)
        else:
            assert reply[2:].startswith(b"python:MISS")
    assert len(answered) == 20  # the misses: every hit was answered in C


def test_a_failing_answer_loses_only_its_own_reply(caplog: pytest.LogCaptureFixture) -> None:
    """The loop calls the reader itself (Reader.readable): an answer that raises is logged with
    its traceback and leaves that one datagram unanswered, the rest of the batch and the next
    batches are answered; every sampled reply is timed; a closed reader does nothing."""
    module, why = compiled_module()
    assert module is not None, why
    server_end = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server_end.bind(("127.0.0.1", 0))
    server_end.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(5)
    entries = {b"HIT": Cached((b"cached",), 0, ("service", "NOERROR", "udp"), None, None, 6)}
    timed: list[float] = []

    def answer(data: bytes, addr: tuple, miss: bytes | None) -> bytes | None:
        if data[2:] == b"BAD":
            raise RuntimeError("a bug in the answer")
        assert addr == client.getsockname()
        return data[:2] + b"python:" + (miss or b"(sampled)")

    async def scenario() -> tuple[list[bytes], CompiledUdp]:
        listener = CompiledUdp(module, server_end, entries, answer, timed.append, 4096, 4)
        replies: list[bytes] = []
        for burst in ([b"MISS", b"BAD", b"HIT", b"HIT", b"MISS", b"HIT"], [b"HIT", b"MISS"]):
            for i, tail in enumerate(burst):
                client.sendto(bytes([len(replies), i]) + tail, server_end.getsockname())
            expected = len(burst) - burst.count(b"BAD")
            for _ in range(expected):
                replies.append(await asyncio.get_running_loop().run_in_executor(
                    None, client.recv, 4096))
        listener.close()
        listener.reader.readable()  # (a wakeup after close: nothing read, nothing raised)
        return replies, listener

    with caplog.at_level("DEBUG", logger="meshdns"):
        replies, listener = uvloop.run(scenario())
    client.close()
    assert sorted(r[2:] for r in replies[:5]) == sorted(
        [b"python:MISS", b"python:MISS", b"cached", b"cached", b"python:(sampled)"])
    assert [r[2:] for r in replies[5:]] == [b"cached", b"python:(sampled)"]
    failures = [r for r in caplog.records
                if r.getMessage() == "internal error answering a UDP query"]
    assert len(failures) == 1 and failures[0].exc_info is not None
    assert "a bug in the answer" in str(failures[0].exc_info[1])
    assert listener.reader.received == 8
    assert len(timed) == 2 and all(0 <= t < 5 for t in timed)  # the 4th and 8th datagrams


# --- end to end -------------------------------------------------------------------------------


def test_the_path_in_use_is_logged_and_on_the_catalog_endpoint(tmp_path: Path) -> None:
    for env, expected in (({}, "compiled"), ({PURE_ENV: "1"}, f"pure Python ({PURE_ENV}=1)")):
        server = MeshdnsProcess(tmp_path, EXAMPLE_CATALOG, env=env)
        try:
            assert server.packet_path.startswith(f"UDP packet path: {expected}")
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{server.admin_port}/v1/catalog", timeout=5) as response:
                shown = json.load(response)["packet_path"]
            assert shown.startswith(expected)
            assert sorted(rr.address for rrset in server.query("web.service.consul").answer
                          for rr in rrset) == ["10.0.1.1", "10.0.1.20", "10.0.1.3"]
        finally:
            assert server.stop() == 0


#: End-to-end tests run again on the pure-Python path: every lookup form over UDP and TCP,
#: hostile packets, cache bounds, counters and sampled latency, forwarding, workers.
PURE_SUBSET = [
    "tests/test_lookups_e2e.py",
    "tests/test_hostile_packets.py",
    "tests/test_recursors.py",
    "tests/test_admin.py::test_query_counters_are_exact",
    "tests/test_admin.py::test_latency_histogram",
    "tests/test_abuse.py::test_padded_queries_are_answered_not_cached",
    "tests/test_abuse.py::test_distinct_names_fill_the_cache_to_its_byte_budget",
    "tests/test_abuse.py::test_edns_65000_gets_at_most_1232_bytes_and_tc",
    "tests/test_abuse.py::test_silent_recursor_flood_is_bounded",
    "tests/test_workers.py::test_two_workers_share_the_port_and_stop_together",
]


def test_representative_e2e_tests_pass_on_the_pure_path() -> None:
    """(conftest's MeshdnsProcess checks every server there really is on the pure path.)"""
    env = {**os.environ, PURE_ENV: "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             *PURE_SUBSET], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
