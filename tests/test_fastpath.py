"""The fast path writes exactly the bytes the general path writes, or stands aside."""

from __future__ import annotations

import itertools

import dns.flags
import dns.message
import pytest

from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import build_snapshot
from meshdns.config import Config
from meshdns.fastpath import address_reply, service_addresses
from meshdns.responder import Responder
from meshdns.wire import encode, limits_for, parse_query, reply_flags

CATALOG = Catalog.model_validate({
    "nodes": [
        {"name": f"n{i}", "address": f"10.0.0.{i}"} for i in range(1, 41)
    ] + [
        {"name": "v6", "address": "2001:db8::1"},
        {"name": "sick", "address": "10.9.9.9", "health": "critical"},
        {"name": "far", "address": "10.2.0.1", "datacenter": "dc2"},
    ],
    "services": (
        [{"name": "web", "id": f"web-{i}", "node": f"n{i}", "port": 80} for i in range(1, 4)]
        + [{"name": "big", "id": f"big-{i}", "node": f"n{i}", "port": 80} for i in range(1, 41)]
        + [{"name": "dup", "id": "dup-1", "node": "n1", "address": "10.5.0.1"},
           {"name": "dup", "id": "dup-2", "node": "n2", "address": "10.5.0.1"},
           {"name": "dup", "id": "dup-3", "node": "n3", "address": "10.5.0.3"}]
        + [{"name": "warn", "id": "w-1", "node": "n1", "health": "warning"},
           {"name": "warn", "id": "w-2", "node": "n2"}]
        + [{"name": "six", "id": "six-1", "node": "n1", "address": "2001:db8::10"},
           {"name": "six", "id": "six-2", "node": "n2", "address": "2001:db8::11"}]
        + [{"name": "mixed", "id": "m-1", "node": "n1"},
           {"name": "mixed", "id": "m-2", "node": "v6"}]
        + [{"name": "named", "id": "h-1", "node": "n1", "address": "db.example.com"}]
        + [{"name": "down", "id": "d-1", "node": "sick"}]
        + [{"name": "remote", "id": "r-1", "node": "far"}]
        + [{"name": "tagged", "id": "t-1", "node": "n1", "tags": ["v1"]}]
    ),
})
SNAPSHOT = build_snapshot(CATALOG, local_datacenter="dc1")

CONFIGS = {
    "defaults": {},
    "limits": {"dns": {"udp_answer_limit": 5, "a_record_limit": 7, "enable_truncate": True,
                       "service_ttl": {"b*": "30s", "*": "5s"}}},
    "passing": {"dns": {"only_passing": True, "node_ttl": "1s"}},
    "recursing": {"dns": {"recursors": ["127.0.0.1:53"], "enable_truncate": True}},
}


def _config(name: str) -> Config:
    return Config.model_validate(CONFIGS[name])


QUESTIONS = [
    (name, rtype, edns, payload, rd)
    for name in ("web", "big", "dup", "warn", "six", "WeB")
    for rtype in ("A", "AAAA")
    for edns, payload in ((None, 512), (0, 512), (0, 1232), (0, 4096))
    for rd in (True, False)
]


def _question(name: str, rtype: str, edns: int | None, payload: int, rd: bool):
    msg = dns.message.make_query(f"{name}.service.consul", rtype, use_edns=edns,
                                 payload=payload)
    if not rd:
        msg.flags &= ~dns.flags.RD
    return parse_query(msg.to_wire())


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_fast_path_bytes_equal_the_general_path(config_name: str, tcp: bool) -> None:
    config = _config(config_name)
    responder = Responder(config, SNAPSHOT)
    settings = responder.settings
    compared = 0
    for name, rtype, edns, payload, rd in QUESTIONS:
        question = _question(name, rtype, edns, payload, rd)
        addresses = service_addresses(question, SNAPSHOT, settings, ("consul",))
        answer, _ = responder.answer(question)
        assert answer is not None
        if addresses is None:  # it stood aside: only when the general path has no records
            assert not answer.answers, (name, rtype)
            continue
        assert len(addresses) == len(answer.answers)
        limits = limits_for(question, tcp, config.dns.udp_answer_limit,
                            config.dns.enable_truncate)
        flags = reply_flags(question.flags, answer.rcode, answer.authoritative,
                            bool(config.dns.recursors))
        count = len(addresses)
        rotations = [list(range(t, count)) + list(range(t)) for t in range(count)]
        for order in rotations[:5] + [list(reversed(range(count)))]:
            fast = address_reply(question, addresses, order, settings.service_ttl(name.lower()),
                                 settings.a_record_limit, limits, flags)
            general = encode(question, answer, order, limits, flags)
            assert fast == general, (config_name, name, rtype, edns, payload, rd, order)
            compared += 1
    assert compared > 100


@pytest.mark.parametrize("name", [
    "v1.web.service.consul",       # a tag
    "web.service.dc1.consul",      # a locality label
    "_web._tcp.service.consul",    # RFC 2782
    "named.service.consul",        # a hostname: CNAME
    "mixed.service.consul",        # another family among the instances
    "down.service.consul",         # nothing healthy: failover or NXDOMAIN
    "nope.service.consul",         # no such service
    "remote.service.consul",       # only in dc2
    "web.connect.consul",          # another kind
    "web.service.mesh.test",       # the alt domain
])
def test_fast_path_stands_aside(name: str) -> None:
    config = Config(alt_domain="mesh.test")
    responder = Responder(config, SNAPSHOT)
    for rtype in ("A", "AAAA", "SRV", "TXT"):
        question = parse_query(dns.message.make_query(name, rtype).to_wire())
        assert service_addresses(question, SNAPSHOT, responder.settings, ("consul",)) is None


def test_fast_path_and_general_path_replies_agree_through_the_responder() -> None:
    """Same answers whichever path built them (the first miss is the fast path, the orders
    built on the second ask come from the general path)."""
    responder = Responder(Config(), SNAPSHOT)
    for ident, name in zip(itertools.count(1), ["web", "big", "dup", "warn"] * 3):
        msg = dns.message.make_query(f"{name}.service.consul", "A", use_edns=0, payload=4096)
        msg.id = ident
        reply = dns.message.from_wire(responder.respond(msg.to_wire()))  # type: ignore[arg-type]
        general, _ = responder.answer(parse_query(msg.to_wire()))
        assert reply.id == ident
        got = sorted(rr.address for rrset in reply.answer for rr in rrset)
        want = sorted(".".join(str(b) for b in rec[3]) for rec, _ in general.answers)
        assert got == want
