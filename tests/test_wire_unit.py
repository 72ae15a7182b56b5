"""The hostile packets of ``test_hostile_packets.py`` against ``meshdns.wire`` and ``Responder``,
without sockets: ``parse_query`` drops (``Drop``) or rejects (``Reject(rcode)``) exactly as the
"Wire behaviour" section of names.md says, ``error_reply`` builds the reply the server sends,
and a seeded fuzz loop shows that nothing else ever escapes the parser or the responder.

(Not hypothesis: it is not a declared test dependency. A seeded ``random.Random`` keeps every
failure reproducible; the failing packet's bytes are in the message.)
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import dns.edns
import dns.message
import pytest
from conftest import EXAMPLE_CATALOG
from test_hostile_packets import (
    CASES,
    MUTATED_BASE,
    SRV,
    TXT,
    VALID,
    WEB,
    Case,
    check_reply,
    ecs,
    hostile_catalog,
    mutations,
    opt,
    query,
    wname,
)

from meshdns.catalog.file import load_snapshot
from meshdns.config import Config
from meshdns.responder import Forward, Responder
from meshdns.wire import Drop, Question, Reject, error_reply, parse_query


def make_responder(catalog: Path, config: Config | None = None) -> Responder:
    config = config or Config()
    snapshot = load_snapshot(catalog, local_datacenter=config.datacenter,
                             vip_range=config.virtual_ip_range)
    return Responder(config, snapshot)


@pytest.fixture(scope="module")
def responder(tmp_path_factory: pytest.TempPathFactory) -> Responder:
    """The catalog the socket tests serve: the example plus ``big``."""
    return make_responder(hostile_catalog(tmp_path_factory.mktemp("unit") / "catalog.yaml"))


@pytest.fixture(scope="module")
def example_responder() -> Responder:
    return make_responder(EXAMPLE_CATALOG)


# --- the cases, one by one -----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_parse_query(case: Case, responder: Responder) -> None:
    if case.rcode is None:
        with pytest.raises(Drop):
            parse_query(case.packet)
        for tcp in (False, True):
            assert responder.respond(case.packet, tcp) is None
        return
    if case.answered:
        question = parse_query(case.packet)
        assert isinstance(question, Question)
        if case.echo is not None:
            assert question.raw == case.echo
    else:
        with pytest.raises(Reject) as info:
            parse_query(case.packet)
        reject = info.value
        assert reject.rcode == case.rcode
        assert reject.query == case.packet
        if case.echo is not None:
            assert reject.question == case.echo
        reply = error_reply(reject)
        check_reply(case, reply)
        assert responder.respond(case.packet) == reply
    for tcp in (False, True):
        for _ in range(2):  # the first reply and the cached one
            check_reply(case, responder.respond(case.packet, tcp), tcp)


def test_names_at_the_255_octet_limit() -> None:
    labels = [b"a" * 63, b"b" * 63, b"c" * 63]
    question = parse_query(query(wname(*labels, b"d" * 61)))
    assert len(question.raw) == 255 + 4
    for last in (b"d" * 62, b"d" * 63):
        with pytest.raises(Reject) as info:
            parse_query(query(wname(*labels, last)))
        assert info.value.rcode == 1 and info.value.question == b""


def test_a_dot_byte_stays_inside_its_label() -> None:
    question = parse_query(query(wname(b"web.service.dc1", b"consul")))
    assert question.labels == ("web.service.dc1", "consul")
    assert question.name == "web.service.dc1.consul"  # as asked; the raw bytes are echoed
    assert question.raw == wname(b"web.service.dc1", b"consul") + b"\x00\x01\x00\x01"


def test_binary_labels_are_kept_byte_for_byte() -> None:
    name = wname(b"W\xc9B\x00\xff", b"service", b"consul")
    question = parse_query(query(name))
    assert question.raw[:-4] == name
    assert question.labels == ("w\xe9b\x00\xff", "service", "consul")


def test_error_reply_of_badvers_carries_the_opt() -> None:
    packet = query(additional=(opt(version=1, size=4096),))
    with pytest.raises(Reject) as info:
        parse_query(packet)
    reply = error_reply(info.value)
    msg = dns.message.from_wire(reply, ignore_trailing=False)
    assert msg.rcode() == 16 and reply[3] & 0xF == 0
    assert msg.edns == 0 and msg.payload == 4096


def test_error_reply_sets_ra_when_recursion_is_available() -> None:
    with pytest.raises(Reject) as info:
        parse_query(VALID + b"\x00")
    assert error_reply(info.value, recursion_available=True)[3] & 0x80
    assert not error_reply(info.value)[3] & 0x80


def test_valid_ecs_is_echoed_with_scope_0(example_responder: Responder) -> None:
    packet = query(additional=(opt(options=ecs(1, 20, b"\x0a\x01\x00", scope=12)),))
    question = parse_query(packet)
    assert question.edns is not None and question.edns.ecs == b"\x00\x01\x14\x00\x0a\x01\x00"
    reply = example_responder.respond(packet)
    assert isinstance(reply, bytes)
    option = dns.message.from_wire(reply).options[0]
    assert isinstance(option, dns.edns.ECSOption)
    assert (option.address, option.srclen, option.scopelen) == ("10.1.0.0", 20, 0)


# --- fuzzing -------------------------------------------------------------------------------


def _bases() -> list[bytes]:
    out = [VALID, MUTATED_BASE, query(wname(b"node-1", b"node", b"consul"), 255),
           query(wname(b"1", b"1", b"0", b"10", b"in-addr", b"arpa"), 12),
           query(wname(b"v1", b"web", b"service", b"dc1", b"consul"), SRV,
                 additional=(opt(do=True),)),
           query(wname(b"_web", b"_tcp", b"service", b"consul"), SRV),
           query(wname(b"0a000114", b"addr", b"dc1", b"consul"), 1),
           query(wname(b"consul"), 6), query(wname(b"version", b"bind"), TXT, 3),
           query(wname(b"www", b"example", b"com"), additional=(opt(),))]
    for name, rtype in [("web.connect.consul", "SRV"), ("web.virtual.consul", "A"),
                        ("web.query.consul", "SRV"), ("ns.consul", "AAAA")]:
        msg = dns.message.make_query(name, rtype, use_edns=0, payload=1232)
        msg.use_edns(0, options=[dns.edns.ECSOption("2001:db8::", 48)], payload=1232)
        out.append(msg.to_wire())
    return out


def _fuzz_inputs(rng: random.Random, count: int) -> list[bytes]:
    """Random bytes; random tails behind a readable query header; mutated valid queries."""
    bases = _bases()
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(rng.randbytes(rng.randint(0, 600)))
        elif kind == 1:
            head = struct.pack("!6H", rng.getrandbits(16), rng.getrandbits(16) & 0x07FF, 1,
                               rng.choice((0, 0, 1)), rng.choice((0, 0, 1)), rng.randint(0, 3))
            tail = rng.choice((WEB + b"\x00\x01\x00\x01", b"")) + rng.randbytes(
                rng.randint(0, 300))
            out.append(head + tail)
        else:
            packet = bytearray(rng.choice(bases))
            for _ in range(rng.randint(1, 4)):
                packet[rng.randrange(len(packet))] = rng.choice(
                    (rng.getrandbits(8), 0x00, 0x3F, 0x40, 0xC0, 0xFF, 0x2E))
            if rng.random() < 0.2:
                del packet[rng.randrange(len(packet) + 1):]
            if rng.random() < 0.1:
                packet += rng.randbytes(rng.randint(1, 20))
            out.append(bytes(packet))
    return out


_WELL_FORMED: set[bytes] = set()  # replies (after the ID) dnspython has already read


def check_never_escapes(responder: Responder, data: bytes) -> None:
    """parse_query raises Drop or Reject or returns a Question; respond never raises and
    replies with a well-formed message carrying the query's ID (or stays silent on Drop)."""
    try:
        parsed: Question | None = parse_query(data)
        dropped = False
    except Drop:
        parsed, dropped = None, True
    except Reject:
        parsed, dropped = None, False
    except Exception as exc:
        pytest.fail(f"parse_query({data.hex()}) raised {exc!r}")
    assert parsed is None or isinstance(parsed, Question)
    for tcp in (False, True):
        try:
            reply = responder.respond(data, tcp)
        except Exception as exc:
            pytest.fail(f"respond({data.hex()}, tcp={tcp}) raised {exc!r}")
        if dropped:
            assert reply is None, data.hex()
            continue
        if isinstance(reply, Forward):
            assert reply.data == data and isinstance(reply.question, Question)
            continue
        assert isinstance(reply, bytes), data.hex()
        if reply[2:] not in _WELL_FORMED:
            try:
                dns.message.from_wire(reply, ignore_trailing=False)
            except Exception as exc:
                pytest.fail(f"{data.hex()} (tcp={tcp}) -> malformed reply {reply.hex()}: {exc!r}")
            _WELL_FORMED.add(reply[2:])
        assert reply[:2] == data[:2] and reply[2] & 0x80, data.hex()
        assert len(reply) <= (65535 if tcp else 65507)


def test_fuzz_20000_inputs(example_responder: Responder) -> None:
    rng = random.Random(7871)
    inputs = _fuzz_inputs(rng, 20000)
    assert len(inputs) == 20000
    for data in inputs:
        check_never_escapes(example_responder, data)


def test_fuzz_with_recursors_and_an_alt_domain(tmp_path: Path) -> None:
    """The same, where names outside the domains are forwarded rather than refused."""
    config = Config.model_validate({"alt_domain": "mesh.internal",
                                    "dns": {"recursors": ["127.0.0.1:1"]}})
    responder = make_responder(EXAMPLE_CATALOG, config)
    for data in _fuzz_inputs(random.Random(1035), 4000):
        check_never_escapes(responder, data)


def test_every_single_byte_mutation(example_responder: Responder) -> None:
    """Every byte of a valid EDNS+ECS query set to every other value (an A query: its reply
    is small, so dnspython reads 16,000 of them quickly)."""
    base = query(wname(b"Web", b"service", b"consul"),
                 additional=(opt(do=True, options=ecs(1, 24, b"\x0a\x01\x02")),))
    packets = mutations(base, lambda b: list(range(256)))
    assert len(packets) == len(base) * 255
    for data in packets:
        check_never_escapes(example_responder, data)
