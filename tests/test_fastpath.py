"""The fast path writes exactly the bytes the general path writes, or stands aside."""

from __future__ import annotations

import itertools

import dns.flags
import dns.message
import pytest

from meshdns.cache import ResponseCache, plain_query
from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import build_snapshot
from meshdns.config import Config
from meshdns.fastpath import address_reply, service_addresses
from meshdns.metrics import Metrics
from meshdns.responder import Responder
from meshdns.wire import Drop, Reject, encode, limits_for, parse_query, reply_flags

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


# --- the packet-level path (PlainPath) ------------------------------------------------------


# 100 distinct addresses: a reply (1,600+ bytes of answers) that meets every size limit
HUGE = build_snapshot(Catalog.model_validate({
    "nodes": CATALOG.model_dump()["nodes"],
    "services": CATALOG.model_dump()["services"] + [
        {"name": "huge", "id": f"huge-{i}", "node": "n1", "address": f"10.7.0.{i}"}
        for i in range(1, 101)],
}), local_datacenter="dc1")
PACKET_CONFIGS = {**CONFIGS, "small-udp": {"dns": {"max_udp_size": 700, "enable_truncate": True}},
                  "no-truncate": {"dns": {"max_udp_size": 1500, "enable_truncate": False}},
                  "many": {"dns": {"udp_answer_limit": 20}},
                  "one-ttl": {"dns": {"service_ttl": {"*": "7s"}, "a_record_limit": 2}}}


def _packets() -> list[bytes]:
    """Queries the packet-level reader takes, and near misses it must hand to parse_query."""
    out = []
    for payload in (None, 512, 600, 1232, 1400, 4096, 65535):
        for dnssec in (False, True):
            if payload is None:  # (a payload given, dnspython would add an OPT)
                msg = dns.message.make_query("huge.service.consul", "A")
            else:
                msg = dns.message.make_query("huge.service.consul", "A", use_edns=0,
                                             payload=payload, want_dnssec=dnssec)
            msg.flags |= dns.flags.CD if dnssec else 0
            out.append(msg.to_wire())
    for name, rtype, edns, payload, rd in QUESTIONS:
        msg = dns.message.make_query(f"{name}.service.consul", rtype, use_edns=edns,
                                     payload=payload, want_dnssec=rd and edns is not None)
        if not rd:
            msg.flags &= ~dns.flags.RD
        out.append(msg.to_wire())
    for payload in (None, 512, 4096):  # a missing service: NXDOMAIN from the packet path too
        for dnssec in (False, True):
            for text in ("nope.service.consul", "No-Such.service.consul", "n.service.consul"):
                msg = dns.message.make_query(text, "A" if dnssec else "AAAA",
                                             use_edns=None if payload is None else 0,
                                             payload=payload or 0, want_dnssec=dnssec)
                msg.flags |= dns.flags.CD if dnssec else 0
                out.append(msg.to_wire())
    for text in ("nope.SERVICE.consul", "nope.service.CONSUL", "nope.service.consul.extra"):
        out.append(dns.message.make_query(text, "A").to_wire())  # (the general path's)
    for text in ("WEB.SERVICE.CONSUL", "web.Service.Consul", "_web.service.consul",
                 "web.service.consul.extra", "web.servic.consul", "nope.service.consul",
                 "down.service.consul", "named.service.consul", "mixed.service.consul",
                 "web.node.consul", "v1.web.service.consul", "tagged.service.consul"):
        for rtype in ("A", "AAAA", "SRV", "ANY"):
            out.append(dns.message.make_query(text, rtype).to_wire())
    web = dns.message.make_query("web.service.consul", "A", use_edns=0, payload=1232).to_wire()
    plain = dns.message.make_query("web.service.consul", "A").to_wire()
    out += [
        web[:-11] + b"\x00\x00\x29\x04\xd0\x00\x01\x00\x00\x00\x00",  # EDNS version 1: BADVERS
        web[:-2] + b"\x00\x04\x00\x0a\x00\x00",  # an option in the OPT (not a bare OPT)
        web + b"\x00",  # trailing byte: FORMERR
        plain[:2] + b"\x81\x00" + plain[4:],  # a response: dropped
        plain[:2] + b"\x09\x00" + plain[4:],  # opcode 1: NOTIMP
        plain[:5] + b"\x02" + plain[6:],  # qdcount 2
        plain[:-4] + b"\x00\x01\x00\x03",  # class CH
        plain[:-2] + b"\x00\xff",  # class ANY
        plain[:12] + b"\x03w\xe9b" + plain[16:],  # a non-ASCII byte in the service's label
        plain[:12] + b"\x03w.b" + plain[16:],  # a dot inside a label
        plain[:12] + b"\x03WeB" + plain[16:],
        plain[:-5],  # cut short
    ]
    return out


@pytest.mark.parametrize("config_name", list(PACKET_CONFIGS))
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_packet_reader_replies_are_byte_identical(config_name: str, tcp: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Differential: every packet answered with the packet-level path on and off gives the
    same bytes (same random answer order: both responders draw from the same seed), the same
    counts and the same cache entries, and the path takes the common shapes."""
    from meshdns.fastpath import PlainPath

    config = Config.model_validate(PACKET_CONFIGS[config_name])
    packets = _packets()
    fast, general = Responder(config, HUGE), Responder(config, HUGE)
    fast._random.seed(7)
    general._random.seed(7)
    taken = sum(Responder(config, HUGE).udp_plain.respond(data, data[2:], HUGE, ResponseCache(
        Metrics(), 100, 10**6)) is not None for data in packets)
    assert taken > 60
    fast_replies = [fast.respond(data, tcp) for data in packets * 2]  # misses, then hits
    monkeypatch.setattr(PlainPath, "respond", lambda *args: None)
    general_replies = [general.respond(data, tcp) for data in packets * 2]
    for data, a, b in zip(packets * 2, fast_replies, general_replies):
        assert a == b, (config_name, data)
    assert fast.metrics.queries == general.metrics.queries
    assert fast.metrics.truncated == general.metrics.truncated
    assert set(fast.udp_cache.entries) == set(general.udp_cache.entries)
    assert set(fast.tcp_cache.entries) == set(general.tcp_cache.entries)
    for key, entry in fast.udp_cache.entries.items():  # the same tag: a change drops both
        assert entry.tag == general.udp_cache.entries[key].tag
        assert entry.counter_key == general.udp_cache.entries[key].counter_key
    assert fast.nxdomains.top() == general.nxdomains.top() != []  # the status page's names


def test_a_missing_service_with_somewhere_else_to_look_is_the_general_paths() -> None:
    """NXDOMAIN from the packet path only where the general path looks nowhere else: a
    catalog failover for the name, or a default sameness group, makes it stand aside."""
    nodes = [{"name": "n1", "address": "10.0.0.1"},
             {"name": "p1", "address": "10.3.0.1", "partition": "part-2"}]
    services = [{"name": "late", "node": "p1", "partition": "part-2", "port": 1}]
    catalogs = {
        "failover": {"failover": [{"service": "late", "targets": [{"partition": "part-2"}]}]},
        "sameness": {"sameness_groups": [{"name": "mesh", "default_for_failover": True,
                                          "members": [{"partition": "part-2"}]}]},
    }
    for what, extra in catalogs.items():
        snap = build_snapshot(Catalog.model_validate({"nodes": nodes, "services": services,
                                                       **extra}), local_datacenter="dc1")
        responder = Responder(Config(), snap)
        data = dns.message.make_query("late.service.consul", "A").to_wire()
        assert responder.udp_plain.respond(data, data[2:], snap, responder.udp_cache) is None
        reply = dns.message.from_wire(responder.respond(data))  # type: ignore[arg-type]
        assert [rr.address for rrset in reply.answer for rr in rrset] == ["10.3.0.1"], what
        other = dns.message.make_query("other.service.consul", "A").to_wire()
        if what == "failover":  # (a name without failover is still the packet path's)
            assert responder.udp_plain.respond(other, other[2:], snap,
                                               responder.udp_cache) is not None
        else:
            assert responder.udp_plain.respond(other, other[2:], snap,
                                               responder.udp_cache) is None


def test_packet_path_takes_what_the_general_path_reads_as_plain() -> None:
    """The packet-level path answers exactly the packets that parse_query reads as a plain
    service A/AAAA question (the fast path's kind) holding nothing but it and a bare OPT."""
    responder = Responder(Config(), HUGE)
    for data in _packets():
        taken = responder.udp_plain.respond(data, data[2:], HUGE, responder.udp_cache)
        try:
            question = parse_query(data)
        except (Drop, Reject):
            assert taken is None, data
            continue
        labels = question.labels
        missing = len(labels) == 3 and labels[1:] == ("service", "consul") \
            and question.qtype in (1, 28) and question.qclass == 1 \
            and ("", "dc1", "default", "default", labels[0]) not in HUGE.services \
            and question.name.endswith(".service.consul") and labels[0][:1] != "_" \
            and labels[0].isascii() and "." not in labels[0]
        plain = (question.edns is None or question.edns.ecs is None) \
            and plain_query(question, len(data)) \
            and (missing or service_addresses(question, HUGE, responder.settings,
                                              ("consul",)) is not None)
        assert (taken is not None) == plain, data
