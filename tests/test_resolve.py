"""The resolver ("What each lookup answers" in the README), without sockets.

Catalogs are built in code, indexed with ``build_snapshot`` and asked through ``parse`` and
``resolve``; every test asserts the exact records (owner, type, TTL, data) and the rcode.
Records are rendered as ``(owner, "A", ttl, "10.0.0.1")`` so a failure reads like dig output;
an owner of ``None`` is the question name as it was asked. Recursors are tested elsewhere.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import dns.message
import pytest

from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import CatalogProblems, Snapshot, build_snapshot
from meshdns.config import Config
from meshdns.names import Query, parse
from meshdns.resolve import (
    AAAA,
    ANY,
    CNAME,
    NOERROR,
    NS,
    NXDOMAIN,
    PTR,
    SOA,
    SRV,
    TXT,
    A,
    Answer,
    Settings,
    resolve,
    txt_meta,
)
from meshdns.responder import Responder

MX = 15
TYPE_NAMES = {A: "A", AAAA: "AAAA", CNAME: "CNAME", NS: "NS", SOA: "SOA", PTR: "PTR", TXT: "TXT",
              SRV: "SRV"}

# --- helpers -------------------------------------------------------------------------------


def build(catalog: dict[str, Any], previous: Snapshot | None = None,
          vip_range: str = "240.0.0.0/4") -> Snapshot:
    return build_snapshot(Catalog.model_validate(catalog), local_datacenter="dc1",
                          vip_range=vip_range, previous=previous)


def settings(**config: Any) -> Settings:
    return Settings.from_config(Config(**config))


DEFAULT = settings()


def ask(name: str, qtype: int, snap: Snapshot, s: Settings = DEFAULT) -> Answer:
    """Resolve ``name`` (under ``s.domain`` or ``alt.example``) as the responder would."""
    labels = tuple(name.lower().split("."))
    for domain in ("alt.example", s.domain):
        dl = tuple(domain.split("."))
        if labels[-len(dl):] == dl:
            return resolve(parse(labels[:-len(dl)], domain), qtype, snap, s)
    raise AssertionError(f"{name} is not under the domain")


def render(record: tuple[Any, ...]) -> tuple[Any, ...]:
    owner, rtype, ttl, rdata = record
    if rtype in (A, AAAA):
        rdata = str(ipaddress.ip_address(rdata))
    return (owner, TYPE_NAMES.get(rtype, rtype), ttl, rdata)


def answers(answer: Answer) -> list[tuple[Any, ...]]:
    """The answer section, in the resolver's order."""
    return [render(r) for r, _ in answer.answers]


def answer_set(answer: Answer) -> set[tuple[Any, ...]]:
    return set(answers(answer))


def extras(answer: Answer) -> list[list[tuple[Any, ...]]]:
    """The additional records that travel with each answer record."""
    return [[render(x) for x in extra] for _, extra in answer.answers]


def srv(answer: Answer) -> dict[tuple[Any, ...], list[tuple[Any, ...]]]:
    """SRV answer -> the additional records that travel with it."""
    return {render(r): [render(x) for x in extra] for r, extra in answer.answers}


def soa(snap: Snapshot, domain: str = "consul", min_ttl: int = 0) -> tuple[Any, ...]:
    return (domain, "SOA", min_ttl, (f"ns.{domain}", f"hostmaster.{domain}", snap.serial, 3600,
                                     600, 86400, min_ttl))


def assert_nxdomain(answer: Answer, snap: Snapshot, domain: str = "consul") -> None:
    assert (answer.rcode, answers(answer), [render(r) for r in answer.authority],
            answer.additional) == (NXDOMAIN, [], [soa(snap, domain)], [])


def assert_nodata(answer: Answer, snap: Snapshot, domain: str = "consul") -> None:
    assert (answer.rcode, answers(answer), [render(r) for r in answer.authority],
            answer.additional) == (NOERROR, [], [soa(snap, domain)], [])


def a(ip: str, ttl: int = 0, owner: str | None = None) -> tuple[Any, ...]:
    return (owner, "AAAA" if ":" in ip else "A", ttl, ip)


# --- health --------------------------------------------------------------------------------

HEALTH = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1"},
        {"name": "n2", "address": "10.0.0.2"},
        {"name": "n3", "address": "10.0.0.3", "health": "critical"},
        {"name": "n4", "address": "10.0.0.4", "health": "maintenance"},
        {"name": "n5", "address": "10.0.0.5", "health": "warning"},
    ],
    "services": [
        {"name": "web", "id": "w1", "node": "n1"},
        {"name": "web", "id": "w2", "node": "n2", "health": "warning"},
        {"name": "web", "id": "w3", "node": "n2", "address": "10.0.2.3", "health": "critical"},
        {"name": "web", "id": "w4", "node": "n1", "address": "10.0.1.4",
         "health": "maintenance"},
        {"name": "web", "id": "w5", "node": "n3"},  # hidden by its critical node
        {"name": "web", "id": "w6", "node": "n4"},  # hidden by its node in maintenance
        {"name": "web", "id": "w7", "node": "n5"},  # warning through its node
        {"name": "down", "node": "n1", "health": "critical"},
        {"name": "down", "id": "d2", "node": "n3"},
        {"name": "maint", "node": "n1", "health": "maintenance"},
        {"name": "warn", "node": "n2", "health": "warning"},
        {"name": "warn", "id": "warn-2", "node": "n5"},
    ],
})


def test_health_hides_critical_and_maintenance_instances_and_nodes() -> None:
    got = ask("web.service.consul", A, HEALTH)
    assert got.rcode == NOERROR
    assert answer_set(got) == {a("10.0.0.1"), a("10.0.0.2"), a("10.0.0.5")}
    assert len(got.answers) == 3
    assert got.authority == []


def test_health_only_passing_excludes_warning() -> None:
    got = ask("web.service.consul", A, HEALTH, settings(dns={"only_passing": True}))
    assert answers(got) == [a("10.0.0.1")]


def test_health_srv_lists_the_same_instances() -> None:
    got = ask("web.service.consul", SRV, HEALTH)
    assert {r[3][3] for r in answers(got)} == {"n1.node.dc1.consul", "n2.node.dc1.consul",
                                               "n5.node.dc1.consul"}


@pytest.mark.parametrize("name", ["down", "maint"])
def test_health_no_usable_instance_is_nxdomain(name: str) -> None:
    assert_nxdomain(ask(f"{name}.service.consul", A, HEALTH), HEALTH)
    assert_nxdomain(ask(f"{name}.service.consul", SRV, HEALTH), HEALTH)


def test_health_does_not_hide_nodes() -> None:
    # node lookups are not health filtered (as Consul)
    assert answers(ask("n3.node.consul", A, HEALTH)) == [a("10.0.0.3")]
    assert answers(ask("n4.node.consul", A, HEALTH)) == [a("10.0.0.4")]


def test_health_only_warning_instances() -> None:
    assert answer_set(ask("warn.service.consul", A, HEALTH)) == {a("10.0.0.2"), a("10.0.0.5")}
    only_passing = settings(dns={"only_passing": True})
    assert_nxdomain(ask("warn.service.consul", A, HEALTH, only_passing), HEALTH)


# --- A / AAAA ------------------------------------------------------------------------------

ADDRESSES = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1", "meta": {"rack": "r1"}},
        {"name": "n2", "address": "10.0.0.2"},
        {"name": "dual", "address": "10.0.0.6", "tagged_addresses": {"lan_ipv6": "2001:db8::6"}},
        {"name": "v6", "address": "2001:db8::7", "tagged_addresses": {"lan_ipv4": "10.0.0.7"}},
        {"name": "host", "address": "node.example.com"},
    ],
    "services": [
        {"name": "web", "id": "w1", "node": "n1", "port": 80},
        {"name": "web", "id": "w2", "node": "n2", "address": "10.0.1.2", "port": 80},
        {"name": "dual", "node": "dual"},
        {"name": "v6", "node": "v6"},
        {"name": "v6own", "node": "v6", "address": "2001:db8::70",
         "tagged_addresses": {"lan_ipv4": "10.0.0.70"}},
        {"name": "v6only", "node": "v6", "address": "2001:db8::71"},
        # three instances, two addresses: answered once each
        {"name": "dup", "id": "d1", "node": "n1", "address": "10.1.1.1", "port": 1},
        {"name": "dup", "id": "d2", "node": "n1", "address": "10.1.1.1", "port": 2},
        {"name": "dup", "id": "d3", "node": "n2", "address": "10.1.1.1"},
        {"name": "dup", "id": "d4", "node": "n2", "address": "10.1.1.2"},
        {"name": "legacy", "node": "n1", "address": "legacy.example.com", "port": 443},
        {"name": "onhost", "node": "host", "port": 80},
        {"name": "alias", "node": "n1", "address": "web.service.consul"},
        {"name": "mixed", "id": "m1", "node": "n1", "address": "mixed.example.com"},
        {"name": "mixed", "id": "m2", "node": "n2", "address": "10.0.3.2"},
        {"name": "loop", "node": "n1", "address": "loop.service.consul"},
        {"name": "ping", "node": "n1", "address": "pong.service.consul"},
        {"name": "pong", "node": "n1", "address": "ping.service.consul"},
        {"name": "many", "id": "k1", "node": "n1", "address": "10.2.0.1"},
        {"name": "many", "id": "k2", "node": "n1", "address": "10.2.0.1", "port": 2},
        {"name": "many", "id": "k3", "node": "n1", "address": "10.2.0.3"},
        {"name": "many", "id": "k4", "node": "n1", "address": "10.2.0.4"},
        {"name": "many", "id": "k5", "node": "n1", "address": "10.2.0.5"},
    ],
})


def test_address_service_address_else_node_address() -> None:
    got = ask("web.service.consul", A, ADDRESSES)
    assert (got.rcode, answer_set(got), got.authority, got.additional) == (
        NOERROR, {a("10.0.0.1"), a("10.0.1.2")}, [], [])
    assert len(got.answers) == 2
    assert extras(got) == [[], []]


def test_address_tagged_lan_address_of_the_other_family() -> None:
    assert answers(ask("dual.service.consul", A, ADDRESSES)) == [a("10.0.0.6")]
    assert answers(ask("dual.service.consul", AAAA, ADDRESSES)) == [a("2001:db8::6")]
    assert answers(ask("v6.service.consul", AAAA, ADDRESSES)) == [a("2001:db8::7")]
    assert answers(ask("v6.service.consul", A, ADDRESSES)) == [a("10.0.0.7")]
    # a service with its own address uses its own tagged addresses
    assert answers(ask("v6own.service.consul", AAAA, ADDRESSES)) == [a("2001:db8::70")]
    assert answers(ask("v6own.service.consul", A, ADDRESSES)) == [a("10.0.0.70")]


def test_address_family_without_an_address_is_nodata() -> None:
    assert_nodata(ask("web.service.consul", AAAA, ADDRESSES), ADDRESSES)
    assert_nodata(ask("v6only.service.consul", A, ADDRESSES), ADDRESSES)
    assert answers(ask("v6only.service.consul", AAAA, ADDRESSES)) == [a("2001:db8::71")]


def test_address_any_answers_both_families() -> None:
    assert answer_set(ask("dual.service.consul", ANY, ADDRESSES)) == {a("10.0.0.6"),
                                                                      a("2001:db8::6")}


def test_address_duplicates_removed() -> None:
    got = ask("dup.service.consul", A, ADDRESSES)
    assert sorted(answers(got)) == [a("10.1.1.1"), a("10.1.1.2")]


def test_address_hostname_is_a_cname() -> None:
    got = ask("legacy.service.consul", A, ADDRESSES)
    assert (got.rcode, answers(got), got.authority, got.additional) == (
        NOERROR, [(None, "CNAME", 0, "legacy.example.com")], [], [])
    assert answers(ask("legacy.service.consul", AAAA, ADDRESSES)) == [
        (None, "CNAME", 0, "legacy.example.com")]
    # a node registered by hostname: its services are CNAMEs too
    assert answers(ask("onhost.service.consul", A, ADDRESSES)) == [
        (None, "CNAME", 0, "node.example.com")]


def test_address_hostname_under_the_domain_adds_its_records() -> None:
    got = ask("alias.service.consul", A, ADDRESSES, settings(dns={"service_ttl": {"*": "7s"}}))
    assert got.rcode == NOERROR
    assert answers(got)[0] == (None, "CNAME", 7, "web.service.consul")
    assert sorted(answers(got)[1:]) == [a("10.0.0.1", 7, "web.service.consul"),
                                        a("10.0.1.2", 7, "web.service.consul")]


def test_address_records_win_over_a_cname() -> None:
    assert answers(ask("mixed.service.consul", A, ADDRESSES)) == [a("10.0.3.2")]


@pytest.mark.parametrize("name", ["loop", "ping"])
def test_address_cname_loop_under_the_domain_ends(name: str) -> None:
    got = ask(f"{name}.service.consul", A, ADDRESSES)
    target = {"loop": "loop.service.consul", "ping": "pong.service.consul"}[name]
    assert (got.rcode, answers(got)) == (NOERROR, [(None, "CNAME", 0, target)])


def test_address_a_record_limit() -> None:
    """The resolver answers every distinct record and states the cap; the encoder applies it
    after the shuffle (test_address_a_record_limit_rotates_the_subset)."""
    limited = settings(dns={"a_record_limit": 2})
    got = ask("many.service.consul", A, ADDRESSES, limited)
    # k1 and k2 share an address: one record, so 4 distinct of 5 instances
    assert sorted(answers(got)) == sorted([a("10.2.0.1"), a("10.2.0.3"), a("10.2.0.4"),
                                           a("10.2.0.5")])
    assert got.max_answers == 2
    one = settings(dns={"a_record_limit": 1})
    assert ask("many.service.consul", A, ADDRESSES, one).max_answers == 1
    assert ask("many.service.consul", A, ADDRESSES).max_answers == 0
    # SRV is not capped (k1 and k2 differ by port there)
    assert len(ask("many.service.consul", SRV, ADDRESSES, one).answers) == 5


def test_address_a_record_limit_rotates_the_subset() -> None:
    """Not a socket in sight: the responder takes and returns bytes."""
    responder = Responder(Config(dns={"a_record_limit": 1}), ADDRESSES)
    seen: set[str] = set()
    for ident in range(64):
        query = dns.message.make_query("many.service.consul", "A")
        query.id = ident
        reply = responder.respond(query.to_wire())
        assert isinstance(reply, bytes)
        seen |= {rr.to_text() for rrset in dns.message.from_wire(reply).answer for rr in rrset}
    assert len(seen) > 1


# --- SRV -----------------------------------------------------------------------------------

SRV_CATALOG = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1", "meta": {"rack": "r1", "zone": "z1"}},
        {"name": "n2", "address": "10.0.0.2", "meta": {"rack": "r2"}},
        {"name": "n6", "address": "2001:db8::1"},
        {"name": "Upper", "address": "10.0.0.9"},
        {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02", "meta": {"rack": "c"}},
        {"name": "p1", "address": "10.1.0.1", "partition": "part-2"},
        {"name": "d1", "address": "10.20.0.1", "datacenter": "dc2"},
    ],
    "services": [
        {"name": "web", "id": "w1", "node": "n1", "port": 8080,
         "weights": {"passing": 10, "warning": 2}},
        {"name": "web", "id": "w2", "node": "n2", "address": "10.0.2.2", "port": 9090,
         "health": "warning", "weights": {"passing": 10, "warning": 2}},
        {"name": "web", "id": "w3", "node": "n2", "address": "10.0.2.2", "port": 9090},
        {"name": "v6", "node": "n6", "port": 53},
        {"name": "v6", "id": "v6-own", "node": "n1", "address": "2001:db8::10", "port": 54},
        {"name": "legacy", "node": "n1", "address": "legacy.example.com", "port": 443},
        {"name": "upper", "node": "Upper", "port": 1},
        {"name": "web", "node": "c1", "peer": "cluster-02", "port": 8080},
        {"name": "own", "node": "c1", "peer": "cluster-02", "address": "10.102.1.1", "port": 1},
        {"name": "web", "node": "p1", "partition": "part-2", "port": 8080},
        {"name": "web", "node": "d1", "datacenter": "dc2", "port": 8080},
        {"name": "own", "node": "d1", "datacenter": "dc2", "address": "10.20.1.1", "port": 2},
    ],
})


def test_srv_priority_weight_port_target_and_additional() -> None:
    got = ask("web.service.consul", SRV, SRV_CATALOG)
    assert (got.rcode, got.authority, got.additional) == (NOERROR, [], [])
    # w2 and w3 share node, address and port: one record (the first, in warning)
    assert srv(got) == {
        (None, "SRV", 0, (1, 10, 8080, "n1.node.dc1.consul")): [
            a("10.0.0.1", 0, "n1.node.dc1.consul"),
            ("n1.node.dc1.consul", "TXT", 0, (b"rack=r1",)),
            ("n1.node.dc1.consul", "TXT", 0, (b"zone=z1",)),
        ],
        (None, "SRV", 0, (1, 2, 9090, "0a000202.addr.dc1.consul")): [
            a("10.0.2.2", 0, "0a000202.addr.dc1.consul"),
            ("0a000202.addr.dc1.consul", "TXT", 0, (b"rack=r2",)),
        ],
    }
    assert len(got.answers) == 2


def test_srv_ipv6_targets() -> None:
    got = ask("v6.service.consul", SRV, SRV_CATALOG)
    hexed = "20010db8000000000000000000000010.addr.dc1.consul"
    assert srv(got) == {
        (None, "SRV", 0, (1, 1, 53, "n6.node.dc1.consul")): [
            a("2001:db8::1", 0, "n6.node.dc1.consul")],
        (None, "SRV", 0, (1, 1, 54, hexed)): [
            a("2001:db8::10", 0, hexed),
            (hexed, "TXT", 0, (b"rack=r1",)),
            (hexed, "TXT", 0, (b"zone=z1",)),
        ],
    }


def test_srv_hostname_target() -> None:
    got = ask("legacy.service.consul", SRV, SRV_CATALOG)
    assert srv(got) == {(None, "SRV", 0, (1, 1, 443, "legacy.example.com")): []}


def test_srv_target_names_are_lowercase() -> None:
    got = ask("upper.service.consul", SRV, SRV_CATALOG)
    assert srv(got) == {(None, "SRV", 0, (1, 1, 1, "upper.node.dc1.consul")): [
        a("10.0.0.9", 0, "upper.node.dc1.consul")]}


def test_srv_without_node_meta_txt() -> None:
    got = ask("web.service.consul", SRV, SRV_CATALOG,
              settings(dns={"enable_additional_node_meta_txt": False}))
    assert srv(got) == {
        (None, "SRV", 0, (1, 10, 8080, "n1.node.dc1.consul")): [
            a("10.0.0.1", 0, "n1.node.dc1.consul")],
        (None, "SRV", 0, (1, 2, 9090, "0a000202.addr.dc1.consul")): [
            a("10.0.2.2", 0, "0a000202.addr.dc1.consul")],
    }


def test_srv_peer_targets() -> None:
    got = ask("web.service.cluster-02.peer.consul", SRV, SRV_CATALOG)
    assert srv(got) == {(None, "SRV", 0, (1, 1, 8080, "c1.node.cluster-02.peer.consul")): [
        a("10.102.0.1", 0, "c1.node.cluster-02.peer.consul"),
        ("c1.node.cluster-02.peer.consul", "TXT", 0, (b"rack=c",)),
    ]}
    got = ask("own.service.cluster-02.peer.consul", SRV, SRV_CATALOG)
    target = "0a660101.addr.cluster-02.peer.consul"
    assert srv(got) == {(None, "SRV", 0, (1, 1, 1, target)): [
        a("10.102.1.1", 0, target), (target, "TXT", 0, (b"rack=c",))]}


def test_srv_partition_and_datacenter_targets() -> None:
    got = ask("web.service.part-2.ap.consul", SRV, SRV_CATALOG)
    assert srv(got) == {(None, "SRV", 0, (1, 1, 8080, "p1.node.part-2.ap.dc1.dc.consul")): [
        a("10.1.0.1", 0, "p1.node.part-2.ap.dc1.dc.consul")]}
    got = ask("web.service.dc2.consul", SRV, SRV_CATALOG)
    assert srv(got) == {(None, "SRV", 0, (1, 1, 8080, "d1.node.dc2.consul")): [
        a("10.20.0.1", 0, "d1.node.dc2.consul")]}
    got = ask("own.service.dc2.dc.consul", SRV, SRV_CATALOG)
    assert srv(got) == {(None, "SRV", 0, (1, 1, 2, "0a140101.addr.dc2.consul")): [
        a("10.20.1.1", 0, "0a140101.addr.dc2.consul")]}


def test_srv_targets_resolve_back() -> None:
    """Every SRV target (and its additional A) is a name the grammar answers the same way."""
    for name in ("web.service.consul", "web.service.part-2.ap.consul",
                 "web.service.cluster-02.peer.consul", "own.service.dc2.consul"):
        for (_, _, _, (_, _, _, target)), extra in srv(ask(name, SRV, SRV_CATALOG)).items():
            assert answers(ask(target, A, SRV_CATALOG)) == [(None, "A", 0, extra[0][3])]


def test_srv_rfc2782_and_shorthand_forms() -> None:
    full = srv(ask("web.service.consul", SRV, SRV_CATALOG))
    assert srv(ask("_web._tcp.service.consul", SRV, SRV_CATALOG)) == full
    assert srv(ask("_web._tcp.consul", SRV, SRV_CATALOG)) == full
    assert srv(ask("_web._tcp.dc2.consul", SRV, SRV_CATALOG)) == srv(
        ask("web.service.dc2.consul", SRV, SRV_CATALOG))


# --- tags ------------------------------------------------------------------------------------

TAGS = build({
    "nodes": [{"name": "n1", "address": "10.0.0.1"}, {"name": "n2", "address": "10.0.0.2"},
              {"name": "n3", "address": "10.0.0.3"}],
    "services": [
        {"name": "web", "node": "n1", "tags": ["v1", "primary"]},
        {"name": "web", "node": "n2", "tags": ["V2", "v1.primary"]},
        {"name": "web", "node": "n3", "tags": ["tcp"]},
    ],
})


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("web.service.consul", {"10.0.0.1", "10.0.0.2", "10.0.0.3"}),
        ("v1.web.service.consul", {"10.0.0.1"}),
        ("V2.web.service.consul", {"10.0.0.2"}),
        ("v1.primary.web.service.consul", {"10.0.0.2"}),
        ("_web._v1.service.consul", {"10.0.0.1"}),
        ("_web._primary.consul", {"10.0.0.1"}),
        ("_web._tcp.service.consul", {"10.0.0.1", "10.0.0.2", "10.0.0.3"}),
        ("tcp.web.service.consul", {"10.0.0.3"}),
    ],
)
def test_tag_filter(name: str, expected: set[str]) -> None:
    assert {r[3] for r in answers(ask(name, A, TAGS))} == expected


def test_tag_filter_without_match_is_nxdomain() -> None:
    assert_nxdomain(ask("v3.web.service.consul", A, TAGS), TAGS)


# --- node ----------------------------------------------------------------------------------

NODE_META = {"rack": "r1", "a=b": "c", "`k": "v", " lead": "x", "trail ": "y",
             "rfc1035-raw": "raw text=1", "RFC1035-Upper": "kept"}
NODES = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1", "meta": NODE_META},
        {"name": "plain", "address": "10.0.0.2"},
        {"name": "v6", "address": "2001:db8::2", "meta": {"k": "v"}},
        {"name": "foo.bar", "address": "10.0.0.3"},
        {"name": "Mixed", "address": "10.0.0.4"},
        {"name": "host", "address": "host.example.com"},
        {"name": "alias", "address": "n1.node.consul"},
        {"name": "n1", "address": "10.1.0.1", "partition": "part-2"},
        {"name": "n1", "address": "10.20.0.1", "datacenter": "dc2"},
        {"name": "n1", "address": "10.102.0.1", "peer": "cluster-02"},
    ],
})
N1_TXT = [b"rack=r1", b"a`=b=c", b"``k=v", b"` lead=x", b"trail` =y", b"raw text=1", b"kept"]


def txt(owner: str | None, texts: list[bytes], ttl: int = 0) -> list[tuple[Any, ...]]:
    return [(owner, "TXT", ttl, (t,)) for t in texts]


def test_node_a_with_meta_txt_in_additional() -> None:
    got = ask("n1.node.consul", A, NODES)
    assert (got.rcode, answers(got), got.authority, [render(r) for r in got.additional]) == (
        NOERROR, [a("10.0.0.1")], [], txt(None, N1_TXT))


def test_node_a_without_meta_txt() -> None:
    got = ask("n1.node.consul", A, NODES, settings(dns={"enable_additional_node_meta_txt": False}))
    assert (answers(got), got.additional) == ([a("10.0.0.1")], [])


def test_node_txt_answers_meta() -> None:
    got = ask("n1.node.consul", TXT, NODES)
    assert (got.rcode, answers(got), got.additional) == (NOERROR, txt(None, N1_TXT), [])


def test_node_any_answers_address_and_meta() -> None:
    got = ask("n1.node.consul", ANY, NODES)
    assert (answers(got), got.additional) == ([a("10.0.0.1"), *txt(None, N1_TXT)], [])


def test_node_ttl() -> None:
    s = settings(dns={"node_ttl": "30s", "service_ttl": {"*": "5s"}})
    got = ask("n1.node.consul", A, NODES, s)
    assert answers(got) == [a("10.0.0.1", 30)]
    assert [render(r) for r in got.additional] == txt(None, N1_TXT, 30)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("n1.node.consul", "10.0.0.1"),
        ("n1.node.dc1.consul", "10.0.0.1"),
        ("N1.NODE.CONSUL", "10.0.0.1"),
        ("foo.bar.node.consul", "10.0.0.3"),
        ("mixed.node.consul", "10.0.0.4"),
        ("n1.node.part-2.ap.consul", "10.1.0.1"),
        ("n1.node.part-2.ap.dc1.dc.consul", "10.1.0.1"),
        ("n1.node.dc2.consul", "10.20.0.1"),
        ("n1.node.dc2.dc.consul", "10.20.0.1"),
        ("n1.node.cluster-02.peer.consul", "10.102.0.1"),
        ("n1.node.default.ns.consul", "10.0.0.1"),
    ],
)
def test_node_localities(name: str, expected: str) -> None:
    assert answers(ask(name, A, NODES, settings(dns={"enable_additional_node_meta_txt": False}))
                   ) == [a(expected)]


def test_node_other_types_are_nodata() -> None:
    assert_nodata(ask("n1.node.consul", SRV, NODES), NODES)
    assert_nodata(ask("n1.node.consul", AAAA, NODES), NODES)
    assert_nodata(ask("v6.node.consul", A, NODES), NODES)
    assert_nodata(ask("plain.node.consul", TXT, NODES), NODES)
    assert_nodata(ask("n1.node.consul", MX, NODES), NODES)
    got = ask("v6.node.consul", AAAA, NODES)
    assert (answers(got), [render(r) for r in got.additional]) == (
        [a("2001:db8::2")], txt(None, [b"k=v"]))


def test_node_hostname_is_a_cname() -> None:
    assert answers(ask("host.node.consul", A, NODES)) == [(None, "CNAME", 0, "host.example.com")]
    got = ask("alias.node.consul", A, NODES)
    assert answers(got) == [(None, "CNAME", 0, "n1.node.consul"), a("10.0.0.1", 0,
                                                                     "n1.node.consul")]


@pytest.mark.parametrize("name", ["nope.node.consul", "n1.node.dc3.consul",
                                  "n1.node.part-9.ap.consul", "n1.node.cluster-09.peer.consul",
                                  "plain.node.part-2.ap.consul", "plain.node.dc2.consul"])
def test_node_missing_is_nxdomain(name: str) -> None:
    assert_nxdomain(ask(name, A, NODES), NODES)


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        # Consul's TestEncodeKVasRFC1464 cases
        ("color", "blue", "color=blue"),
        ("equation", "a=4", "equation=a=4"),
        ("a=a", "true", "a`=a=true"),
        ("a\\=a", "false", "a\\`=a=false"),
        ("=", "\\=", "`==\\="),
        ("string", '"Cat"', 'string="Cat"'),
        ("string2", "`abc`", "string2=``abc``"),
        ("novalue", "", "novalue="),
        ("a b", "c d", "a b=c d"),
        ("abc ", "123 ", "abc` =123 "),
        (" abc", " 321", "` abc= 321"),
        ("`a", "b", "``a=b"),
        # several leading / trailing spaces: each one quoted
        ("  two", "v", "` ` two=v"),
        ("two  ", "v", "two` ` =v"),
        # rfc1035- keys give the raw value
        ("rfc1035-x", "a=b `c`", "a=b `c`"),
        ("RFC1035-y", "", ""),
    ],
)
def test_txt_rfc1464(key: str, value: str, text: str) -> None:
    assert txt_meta({key: value}) == [text.encode()]


def test_txt_longer_than_255_bytes_is_split() -> None:
    snap = build({"nodes": [{"name": "n", "address": "10.0.0.1", "meta": {"k": "x" * 300}}]})
    text = b"k=" + b"x" * 300
    assert answers(ask("n.node.consul", TXT, snap)) == [(None, "TXT", 0, (text[:255],
                                                                         text[255:]))]


# --- addr ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "qtype", "answer", "additional"),
    [
        ("0a000001.addr.consul", A, [a("10.0.0.1")], []),
        ("0a000001.addr.dc2.consul", A, [a("10.0.0.1")], []),
        ("0A000001.ADDR.CONSUL", A, [a("10.0.0.1")], []),
        ("0a000001.addr.consul", ANY, [a("10.0.0.1")], []),
        ("20010db8000000000000000000000010.addr.consul", AAAA, [a("2001:db8::10")], []),
        ("20010db8000000000000000000000010.addr.consul", ANY, [a("2001:db8::10")], []),
        # another type: the record goes in the additional section
        ("0a000001.addr.consul", AAAA, [], [a("10.0.0.1")]),
        ("0a000001.addr.consul", TXT, [], [a("10.0.0.1")]),
        ("0a000001.addr.consul", SRV, [], [a("10.0.0.1")]),
        ("20010db8000000000000000000000010.addr.consul", A, [], [a("2001:db8::10")]),
    ],
)
def test_addr(name: str, qtype: int, answer: list[Any], additional: list[Any]) -> None:
    snap = NODES  # no catalog look-up: any snapshot will do
    got = ask(name, qtype, snap, settings(dns={"node_ttl": "3s"}))
    ttl3 = [(o, t, 3, d) for o, t, _, d in answer + additional]
    assert (got.rcode, answers(got), [render(r) for r in got.additional]) == (
        NOERROR, ttl3[:len(answer)], ttl3[len(answer):])
    assert [render(r) for r in got.authority] == ([] if answer else [soa(snap)])


@pytest.mark.parametrize("name", ["0a00000g.addr.consul", "0a0001.addr.consul",
                                  "0a00000001.addr.consul", "0a 0b 0c.addr.consul"])
def test_addr_bad_is_nxdomain(name: str) -> None:
    assert_nxdomain(ask(name, A, NODES), NODES)


# --- virtual -------------------------------------------------------------------------------

MESH: dict[str, Any] = {
    "nodes": [
        {"name": "n1", "address": "10.0.0.1"},
        {"name": "p1", "address": "10.1.0.1", "partition": "part-2"},
        {"name": "d1", "address": "10.20.0.1", "datacenter": "dc2"},
        {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02"},
    ],
    "services": [
        {"name": "fixed", "node": "n1"},
        {"name": "api", "node": "n1", "port": 9090},
        {"name": "api-proxy", "node": "n1", "port": 21000, "kind": "connect-proxy",
         "destination": "api"},
        {"name": "api", "id": "api-a", "node": "n1", "namespace": "team-a"},
        {"name": "api-proxy", "id": "api-proxy-a", "node": "n1", "namespace": "team-a",
         "kind": "connect-proxy", "destination": "api"},
        {"name": "api", "node": "p1", "partition": "part-2"},
        {"name": "api-proxy", "node": "p1", "partition": "part-2", "kind": "connect-proxy",
         "destination": "api"},
        {"name": "billing", "node": "n1", "address": "10.0.5.5", "port": 8443,
         "connect_native": True},
        {"name": "plain", "node": "n1"},
        # mesh services of another datacenter get no virtual IP (they would collide)
        {"name": "remote", "node": "d1", "datacenter": "dc2"},
        {"name": "remote-proxy", "node": "d1", "datacenter": "dc2", "kind": "connect-proxy",
         "destination": "remote"},
        # imported services are mesh services
        {"name": "api", "node": "c1", "peer": "cluster-02"},
        {"name": "fixed", "node": "c1", "peer": "cluster-02"},
        {"name": "gw", "node": "c1", "peer": "cluster-02", "kind": "mesh-gateway"},
    ],
    "virtual_ips": [
        {"service": "fixed", "ip": "240.0.0.10"},
        {"service": "fixed", "peer": "cluster-02", "ip": "240.0.0.20"},
        {"service": "nowhere", "ip": "240.0.0.30"},  # a fixed VIP needs no instance
    ],
}
VIRTUAL = build(MESH)
VIP_RANGE = ipaddress.IPv4Network("240.0.0.0/4")


def vip(name: str, snap: Snapshot = VIRTUAL, s: Settings = DEFAULT) -> str:
    got = ask(name, A, snap, s)
    assert got.rcode == NOERROR and len(got.answers) == 1, name
    owner, rtype, ttl, ip = answers(got)[0]
    assert (owner, rtype, ttl) == (None, "A", s.node_ttl)
    return ip


def test_virtual_fixed() -> None:
    assert vip("fixed.virtual.consul") == "240.0.0.10"
    assert vip("fixed.virtual.cluster-02.peer.consul") == "240.0.0.20"
    assert vip("fixed.virtual.cluster-02.consul") == "240.0.0.20"  # legacy peer form
    assert vip("nowhere.virtual.consul") == "240.0.0.30"
    assert vip("fixed.virtual.default.ns.default.ap.consul") == "240.0.0.10"


def test_virtual_ttl_is_node_ttl() -> None:
    assert vip("fixed.virtual.consul", s=settings(dns={"node_ttl": "9s"})) == "240.0.0.10"


def test_virtual_allocated_for_mesh_services_only() -> None:
    allocated = {
        name: vip(name) for name in (
            "api.virtual.consul", "api.virtual.team-a.ns.consul", "api.virtual.part-2.ap.consul",
            "api.virtual.cluster-02.peer.consul", "billing.virtual.consul",
            "fixed.virtual.consul", "fixed.virtual.cluster-02.peer.consul")
    }
    # unique per (peer, partition, namespace, service), all inside virtual_ip_range
    assert len(set(allocated.values())) == len(allocated)
    assert all(ipaddress.IPv4Address(ip) in VIP_RANGE for ip in allocated.values())
    assert vip("api.virtual.cluster-02.consul") == allocated["api.virtual.cluster-02.peer.consul"]
    assert allocated["api.virtual.cluster-02.peer.consul"] != allocated["api.virtual.consul"]
    assert len(VIRTUAL.vips) == 8


@pytest.mark.parametrize("name", [
    "plain.virtual.consul",  # not in the mesh
    "api-proxy.virtual.consul",  # the proxy itself is not a destination
    "remote.virtual.consul",  # another datacenter's mesh service
    "gw.virtual.cluster-02.peer.consul",  # an imported gateway
    "nope.virtual.consul",
    "api.virtual.team-b.ns.consul",
    "api.virtual.cluster-09.peer.consul",  # unknown peer
    "api.virtual.cluster-09.consul",
    "api.virtual.part-9.ap.consul",  # unknown partition
    "billing.virtual.cluster-02.peer.consul",
])
def test_virtual_missing_is_nxdomain(name: str) -> None:
    assert_nxdomain(ask(name, A, VIRTUAL), VIRTUAL)


def test_virtual_other_types_are_nodata() -> None:
    assert_nodata(ask("api.virtual.consul", AAAA, VIRTUAL), VIRTUAL)
    assert_nodata(ask("fixed.virtual.consul", TXT, VIRTUAL), VIRTUAL)


def test_virtual_stable_across_restarts_and_reloads() -> None:
    again = build(MESH)  # a restart: no previous snapshot, the same addresses
    assert again.vips == VIRTUAL.vips
    # a reload keeps what was given out, even where a fresh allocation would differ
    key = ("", "default", "default", "api")
    moved = dataclasses.replace(VIRTUAL, vips={**VIRTUAL.vips, key: "240.0.0.99"})
    grown = dict(MESH, services=[*MESH["services"],
                                 {"name": "new", "node": "n1", "connect_native": True}])
    reloaded = build(grown, previous=moved)
    assert vip("api.virtual.consul", reloaded) == "240.0.0.99"
    assert vip("billing.virtual.consul", reloaded) == vip("billing.virtual.consul")
    assert ipaddress.IPv4Address(vip("new.virtual.consul", reloaded)) in VIP_RANGE
    assert len(set(reloaded.vips.values())) == len(reloaded.vips) == 9
    # an address outside the (new) range is not kept
    elsewhere = dataclasses.replace(VIRTUAL, vips={key: "10.9.9.9"})
    assert build(MESH, previous=elsewhere).vips[key] == VIRTUAL.vips[key]


def test_virtual_allocation_probes_past_taken_addresses() -> None:
    # 6 slots (240.0.0.1-6) for 5 services: slots collide and probe on; the fixed VIPs lie
    # outside the range and use none of its slots
    small = build(MESH, vip_range="240.0.0.0/29")
    fixed = {"240.0.0.10", "240.0.0.20", "240.0.0.30"}
    allocated = set(small.vips.values()) - fixed
    assert len(small.vips) == 8
    assert len(allocated) == 5
    assert allocated < {f"240.0.0.{i}" for i in range(1, 7)}


def test_virtual_range_full() -> None:
    with pytest.raises(CatalogProblems) as exc:
        build(MESH, vip_range="240.0.0.0/30")  # 2 slots for 5 services
    assert exc.value.problems == [(("virtual_ips",), "virtual_ip_range 240.0.0.0/30 is full")]


# --- NXDOMAIN vs NODATA --------------------------------------------------------------------

MIXED = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1"},
        {"name": "d1", "address": "10.20.0.1", "datacenter": "dc2"},
        {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02"},
        {"name": "p1", "address": "10.1.0.1", "partition": "part-2"},
    ],
    "services": [
        {"name": "web", "node": "n1", "port": 80},
        {"name": "web-proxy", "node": "n1", "kind": "connect-proxy", "destination": "web"},
        {"name": "api", "node": "d1", "datacenter": "dc2"},
    ],
    "sameness_groups": [{"name": "group-1", "members": [{"partition": "part-2"}]}],
})


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("web.service.consul", AAAA),  # IPv4-only service
        ("web.service.consul", TXT),
        ("web.service.consul", MX),
        ("web.service.consul", PTR),
        ("web.connect.consul", TXT),
        ("n1.node.consul", SRV),
        ("consul", A),  # the apex exists: it has SOA and NS
        ("consul", AAAA),
        ("consul", TXT),
        ("consul", SRV),
        ("consul", ANY),
    ],
)
def test_nodata(name: str, qtype: int) -> None:
    assert_nodata(ask(name, qtype, MIXED), MIXED)


@pytest.mark.parametrize(
    ("name", "qtype"),
    [
        ("nope.service.consul", A),
        ("nope.service.consul", SRV),
        ("nope.service.consul", TXT),
        ("web.service.dc9.consul", A),  # unknown datacenter
        ("web.service.dc9.dc.consul", SRV),
        ("web.service.part-9.ap.consul", A),  # unknown partition
        ("web.service.cluster-09.peer.consul", A),  # unknown peer
        ("web.service.group-9.sg.consul", A),  # unknown sameness group
        ("web.service.team-z.ns.consul", A),  # nothing in that namespace
        ("web.service.dc2.consul", A),  # a known datacenter without the service
        ("web.ingress.consul", A),
        ("nope.connect.consul", A),
        ("nope.query.consul", A),
        ("foo.consul", A),  # no keyword
        ("service.consul", A),  # nothing left of the keyword
        ("web.service.a.b.c.consul", A),  # three locality labels
        ("web.service.dc1.dc.cluster-02.peer.consul", A),
    ],
)
def test_nxdomain(name: str, qtype: int) -> None:
    assert_nxdomain(ask(name, qtype, MIXED), MIXED)


def test_negative_answers_use_the_soa_settings() -> None:
    s = settings(dns={"soa": {"min_ttl": 30, "refresh": 10, "retry": 20, "expire": 40}})
    got = ask("nope.service.consul", A, MIXED, s)
    assert (got.rcode, [render(r) for r in got.authority]) == (NXDOMAIN, [
        ("consul", "SOA", 30, ("ns.consul", "hostmaster.consul", MIXED.serial, 10, 20, 40, 30))])


# --- SOA and NS ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["consul", "web.service.consul", "nope.consul",
                                  "n1.node.consul", "0a000001.addr.consul"])
def test_soa_any_name_under_the_domain(name: str) -> None:
    got = ask(name, SOA, MIXED)
    assert (got.rcode, answers(got), [render(r) for r in got.authority],
            [render(r) for r in got.additional]) == (
        NOERROR, [soa(MIXED)], [("consul", "NS", 0, "ns.consul")],
        [("ns.consul", "A", 0, "127.0.0.1")])


def test_soa_fields_from_settings() -> None:
    s = settings(dns={"node_ttl": "4s", "soa": {"refresh": 1, "retry": 2, "expire": 3,
                                                "min_ttl": 5}})
    got = ask("consul", SOA, MIXED, s)
    assert answers(got) == [("consul", "SOA", 5, ("ns.consul", "hostmaster.consul",
                                                  MIXED.serial, 1, 2, 3, 5))]
    assert [render(r) for r in got.authority] == [("consul", "NS", 4, "ns.consul")]


def test_soa_under_alt_domain() -> None:
    s = settings(alt_domain="alt.example")
    got = ask("web.service.alt.example", SOA, MIXED, s)
    assert answers(got) == [soa(MIXED, "alt.example")]
    assert [render(r) for r in got.authority] == [("alt.example", "NS", 0, "ns.alt.example")]
    assert_nxdomain(ask("nope.service.alt.example", A, MIXED, s), MIXED, "alt.example")
    got = ask("web.service.alt.example", SRV, MIXED, s)
    assert answers(got) == [(None, "SRV", 0, (1, 1, 80, "n1.node.dc1.alt.example"))]


def test_soa_serial_increases_on_rebuild() -> None:
    catalog = {"nodes": [{"name": "n1", "address": "10.0.0.1"}]}
    first = build(catalog)
    second = build(catalog, previous=first)
    third = build(catalog, previous=second)
    assert first.serial < second.serial < third.serial
    assert answers(ask("consul", SOA, third))[0][3][2] == third.serial
    assert (second.generation, third.generation) == (first.generation + 1, first.generation + 2)


def test_ns_with_glue() -> None:
    got = ask("consul", NS, MIXED)
    assert (got.rcode, answers(got), extras(got), got.authority) == (
        NOERROR, [("consul", "NS", 0, "ns.consul")], [[("ns.consul", "A", 0, "127.0.0.1")]], [])
    # asked of any name under the domain
    assert answers(ask("web.service.consul", NS, MIXED)) == [("consul", "NS", 0, "ns.consul")]


@pytest.mark.parametrize(
    ("config", "glue"),
    [
        ({"listen": ["10.1.2.3:53", "127.0.0.1:8600"]}, [("ns.consul", "A", 0, "10.1.2.3")]),
        ({"listen": ["10.1.2.3:53"], "advertise": "192.0.2.1"},
         [("ns.consul", "A", 0, "192.0.2.1")]),
        ({"listen": ["[::1]:53"]}, [("ns.consul", "AAAA", 0, "::1")]),
        ({"advertise": "2001:db8::53"}, [("ns.consul", "AAAA", 0, "2001:db8::53")]),
        ({"listen": ["0.0.0.0:53"]}, []),  # no address to give
        ({"listen": ["0.0.0.0:53"], "dns": {"node_ttl": "6s"}, "advertise": "192.0.2.1"},
         [("ns.consul", "A", 6, "192.0.2.1")]),
    ],
)
def test_ns_glue_address(config: dict[str, Any], glue: list[Any]) -> None:
    s = settings(**config)
    got = ask("consul", NS, MIXED, s)
    assert answers(got) == [("consul", "NS", s.node_ttl, "ns.consul")]
    assert extras(got) == [glue]


def test_nameserver_name_resolves_to_the_glue() -> None:
    s = settings(advertise="192.0.2.1", dns={"node_ttl": "2s"})
    assert answers(ask("ns.consul", A, MIXED, s)) == [a("192.0.2.1", 2)]
    assert_nodata(ask("ns.consul", AAAA, MIXED, s), MIXED)
    assert_nxdomain(ask("ns.consul", A, MIXED, settings(listen=["0.0.0.0:53"])), MIXED)


# --- TTLs ----------------------------------------------------------------------------------

TTLS = build({
    "nodes": [{"name": "n1", "address": "10.0.0.1"}],
    "services": [{"name": name, "node": "n1", "port": 1} for name in
                 ("web", "db", "db-main", "dbadmin", "other", "Upper")],
})
TTL_SETTINGS = settings(dns={"node_ttl": "1s", "service_ttl": {
    "web": "10s", "db*": "20s", "dba*": "40s", "*": "5s", "UPPER": "7s", "db-main": "30s"}})


@pytest.mark.parametrize(
    ("name", "ttl"),
    [
        ("web", 10),  # exact
        ("db", 20),  # prefix db*
        ("db-main", 30),  # exact beats a prefix
        ("dbadmin", 40),  # the longest prefix wins
        ("other", 5),  # *
        ("upper", 7),  # keys are case-insensitive
    ],
)
def test_service_ttl(name: str, ttl: int) -> None:
    assert answers(ask(f"{name}.service.consul", A, TTLS, TTL_SETTINGS)) == [a("10.0.0.1", ttl)]
    got = ask(f"{name}.service.consul", SRV, TTLS, TTL_SETTINGS)
    assert srv(got) == {(None, "SRV", ttl, (1, 1, 1, "n1.node.dc1.consul")): [
        a("10.0.0.1", ttl, "n1.node.dc1.consul")]}


def test_service_ttl_defaults() -> None:
    assert answers(ask("web.service.consul", A, TTLS)) == [a("10.0.0.1", 0)]
    no_star = settings(dns={"service_ttl": {"db*": "20s"}})
    assert answers(ask("web.service.consul", A, TTLS, no_star)) == [a("10.0.0.1", 0)]
    assert answers(ask("dbadmin.service.consul", A, TTLS, no_star)) == [a("10.0.0.1", 20)]


def test_node_ttl_for_node_answers() -> None:
    assert answers(ask("n1.node.consul", A, TTLS, TTL_SETTINGS)) == [a("10.0.0.1", 1)]


# --- connect and ingress -------------------------------------------------------------------

CONNECT = build({
    "nodes": [{"name": "n1", "address": "10.0.0.1"}, {"name": "n2", "address": "10.0.0.2"},
              {"name": "gw", "address": "10.0.3.1"}],
    "services": [
        {"name": "web", "node": "n1", "port": 8080},
        {"name": "web", "id": "web-2", "node": "n2", "port": 8080},
        {"name": "web-sidecar-proxy", "node": "n1", "port": 21000, "kind": "connect-proxy",
         "destination": "web"},
        {"name": "web-sidecar-proxy", "node": "n2", "port": 21000, "kind": "connect-proxy",
         "destination": "web", "address": "10.0.2.20", "health": "critical"},
        {"name": "billing", "node": "n2", "address": "10.0.2.11", "port": 8443,
         "connect_native": True},
        {"name": "plain", "node": "n1", "port": 1},
        {"name": "ingress-gateway", "node": "gw", "port": 8443, "kind": "ingress-gateway",
         "ingress": ["web", "api"]},
    ],
})


def test_connect_answers_proxies() -> None:
    assert answers(ask("web.connect.consul", A, CONNECT)) == [a("10.0.0.1")]
    assert srv(ask("web.connect.consul", SRV, CONNECT)) == {
        (None, "SRV", 0, (1, 1, 21000, "n1.node.dc1.consul")): [
            a("10.0.0.1", 0, "n1.node.dc1.consul")]}


def test_connect_answers_native_services() -> None:
    assert answers(ask("billing.connect.consul", A, CONNECT)) == [a("10.0.2.11")]
    assert srv(ask("billing.connect.consul", SRV, CONNECT)) == {
        (None, "SRV", 0, (1, 1, 8443, "0a00020b.addr.dc1.consul")): [
            a("10.0.2.11", 0, "0a00020b.addr.dc1.consul")]}


@pytest.mark.parametrize("name", ["plain.connect.consul", "web-sidecar-proxy.connect.consul",
                                  "plain.ingress.consul", "ingress-gateway.ingress.consul"])
def test_connect_and_ingress_missing(name: str) -> None:
    assert_nxdomain(ask(name, A, CONNECT), CONNECT)


def test_ingress_answers_gateways() -> None:
    for name in ("web", "api"):
        assert answers(ask(f"{name}.ingress.consul", A, CONNECT)) == [a("10.0.3.1")]
        assert srv(ask(f"{name}.ingress.consul", SRV, CONNECT)) == {
            (None, "SRV", 0, (1, 1, 8443, "gw.node.dc1.consul")): [
                a("10.0.3.1", 0, "gw.node.dc1.consul")]}


def test_connect_and_ingress_use_the_service_ttl() -> None:
    s = settings(dns={"service_ttl": {"web": "3s", "*": "1s"}})
    assert answers(ask("web.connect.consul", A, CONNECT, s)) == [a("10.0.0.1", 3)]
    assert answers(ask("web.ingress.consul", A, CONNECT, s)) == [a("10.0.3.1", 3)]


# --- failover --------------------------------------------------------------------------------

FAILOVER = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1"},
        {"name": "p1", "address": "10.1.0.1", "partition": "part-2"},
        {"name": "d1", "address": "10.20.0.1", "datacenter": "dc2"},
        {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02"},
    ],
    "services": [
        # payments: critical here, healthy in cluster-02 and dc2
        {"name": "payments", "node": "n1", "port": 1, "health": "critical"},
        {"name": "payments", "node": "c1", "peer": "cluster-02", "port": 2},
        {"name": "payments", "node": "d1", "datacenter": "dc2", "port": 3},
        # orders: its first target has nothing healthy, the second answers
        {"name": "orders", "node": "n1", "health": "critical"},
        {"name": "orders", "node": "c1", "peer": "cluster-02", "health": "critical"},
        {"name": "orders", "node": "d1", "datacenter": "dc2", "port": 3},
        # search: no failover of its own; the default sameness group applies
        {"name": "search", "node": "n1", "health": "critical"},
        {"name": "search", "node": "p1", "partition": "part-2", "port": 4},
        {"name": "search", "node": "c1", "peer": "cluster-02", "port": 5},
        # cart: its own failover comes before the sameness group
        {"name": "cart", "node": "c1", "peer": "cluster-02", "port": 6},
        {"name": "cart", "node": "d1", "datacenter": "dc2", "port": 7},
        # only in the peer: reached through the sameness group's last member
        {"name": "remote", "node": "c1", "peer": "cluster-02", "port": 8},
        # healthy here: no failover
        {"name": "web", "node": "n1", "port": 9},
        {"name": "web", "node": "d1", "datacenter": "dc2", "port": 9},
        {"name": "web", "node": "c1", "peer": "cluster-02", "port": 9},
    ],
    "failover": [
        {"service": "payments", "targets": [{"peer": "cluster-02"}, {"datacenter": "dc2"}]},
        {"service": "orders", "targets": [{"peer": "cluster-02"}, {"datacenter": "dc2"}]},
        {"service": "cart", "targets": [{"datacenter": "dc2"}]},
        {"service": "web", "targets": [{"datacenter": "dc2"}]},
    ],
    "sameness_groups": [
        {"name": "mesh-east", "default_for_failover": True, "include_local": True,
         "members": [{"partition": "default"}, {"partition": "part-2"}, {"peer": "cluster-02"}]},
        {"name": "peers-only", "members": [{"peer": "cluster-02"}]},
    ],
})


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("payments", (1, 1, 2, "c1.node.cluster-02.peer.consul")),
        ("orders", (1, 1, 3, "d1.node.dc2.consul")),
        ("search", (1, 1, 4, "p1.node.part-2.ap.dc1.dc.consul")),
        ("cart", (1, 1, 7, "d1.node.dc2.consul")),
        ("remote", (1, 1, 8, "c1.node.cluster-02.peer.consul")),
        ("web", (1, 1, 9, "n1.node.dc1.consul")),
    ],
)
def test_failover_srv_names_the_locality_that_answered(name: str, target: tuple[Any, ...]
                                                      ) -> None:
    got = ask(f"{name}.service.consul", SRV, FAILOVER)
    assert answers(got) == [(None, "SRV", 0, target)]
    assert extras(got)[0][0][0] == target[3]


def test_failover_a_records() -> None:
    assert answers(ask("payments.service.consul", A, FAILOVER)) == [a("10.102.0.1")]
    assert answers(ask("search.service.consul", A, FAILOVER)) == [a("10.1.0.1")]


def test_failover_only_for_lookups_it_applies_to() -> None:
    # the failover entry is for lookups in dc1 (the default); a dc2 lookup answers dc2 only
    assert answers(ask("payments.service.dc2.consul", A, FAILOVER)) == [a("10.20.0.1")]
    # the default sameness group is not used when a datacenter is named
    assert_nxdomain(ask("search.service.dc1.dc.consul", A, FAILOVER), FAILOVER)
    # a peer lookup does not fail over
    assert_nxdomain(ask("orders.service.cluster-02.peer.consul", A, FAILOVER), FAILOVER)


def test_sameness_group_lookup() -> None:
    got = ask("search.service.mesh-east.sg.consul", SRV, FAILOVER)
    assert answers(got) == [(None, "SRV", 0, (1, 1, 4, "p1.node.part-2.ap.dc1.dc.consul"))]
    got = ask("web.service.mesh-east.sg.consul", A, FAILOVER)
    assert answers(got) == [a("10.0.0.1")]  # the local member first
    got = ask("web.service.peers-only.sg.consul", A, FAILOVER)
    assert answers(got) == [a("10.102.0.1")]  # include_local false: only the members
    assert_nxdomain(ask("search.service.nope.sg.consul", A, FAILOVER), FAILOVER)


def test_failover_nothing_anywhere_is_nxdomain() -> None:
    snap = build({
        "nodes": [{"name": "n1", "address": "10.0.0.1"},
                  {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02"}],
        "services": [{"name": "x", "node": "n1", "health": "critical"},
                     {"name": "x", "node": "c1", "peer": "cluster-02", "health": "maintenance"}],
        "failover": [{"service": "x", "targets": [{"peer": "cluster-02"}]}],
    })
    assert_nxdomain(ask("x.service.consul", A, snap), snap)


# --- prepared queries ------------------------------------------------------------------------

QUERIES = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1"},
        {"name": "n2", "address": "10.0.0.2"},
        {"name": "d2", "address": "10.20.0.1", "datacenter": "dc2"},
        {"name": "d3", "address": "10.30.0.1", "datacenter": "dc3"},
        {"name": "d4", "address": "10.40.0.1", "datacenter": "dc4"},
        {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02"},
    ],
    "services": [
        {"name": "web", "node": "n1", "port": 80, "tags": ["v1", "primary"]},
        {"name": "web", "id": "web-2", "node": "n2", "port": 80, "tags": ["v1", "canary"],
         "health": "warning"},
        {"name": "api", "node": "n1", "health": "critical"},
        {"name": "api", "node": "d2", "datacenter": "dc2", "port": 2},
        {"name": "api", "node": "d3", "datacenter": "dc3", "port": 3},
        {"name": "api", "node": "d4", "datacenter": "dc4", "port": 4},
        {"name": "api", "node": "c1", "peer": "cluster-02", "port": 5},
        {"name": "only-peer", "node": "n1", "health": "warning"},
        {"name": "only-peer", "node": "c1", "peer": "cluster-02", "port": 6},
    ],
    "prepared_queries": [
        {"name": "web-v1", "service": "web", "tags": ["v1"], "ttl": "10s"},
        {"name": "web-stable", "service": "web", "tags": ["v1", "!canary"]},
        {"name": "web-passing", "service": "web", "only_passing": True},
        {"name": "web-v2", "service": "web", "tags": ["v2"]},
        {"name": "api-nearest", "service": "api", "ttl": "1m",
         "failover": {"nearest_n": 2, "datacenters": ["dc4"]}},
        {"name": "api-listed", "service": "api", "failover": {"datacenters": ["dc9", "dc4",
                                                                             "dc2"]}},
        {"name": "api-peer", "service": "api", "failover": {"targets": [{"peer": "cluster-02"},
                                                                       {"datacenter": "dc2"}]}},
        {"name": "peer-passing", "service": "only-peer", "only_passing": True,
         "failover": {"targets": [{"peer": "cluster-02"}]}},
        {"name": "Dotted.Name", "service": "web"},
    ],
    "datacenter_rtt": {"dc1": {"dc2": "30ms", "dc3": "10ms", "dc4": "50ms"}},
})


def test_prepared_query_tags_and_ttl() -> None:
    s = settings(dns={"service_ttl": {"*": "5s"}})
    assert answer_set(ask("web-v1.query.consul", A, QUERIES, s)) == {a("10.0.0.1", 10),
                                                                     a("10.0.0.2", 10)}
    assert answers(ask("web-stable.query.consul", A, QUERIES, s)) == [a("10.0.0.1", 5)]
    assert answers(ask("web-passing.query.consul", A, QUERIES, s)) == [a("10.0.0.1", 5)]
    assert answers(ask("dotted.name.query.consul", A, QUERIES, s))[0][2] == 5
    assert_nxdomain(ask("web-v2.query.consul", A, QUERIES), QUERIES)


def test_prepared_query_srv_forms() -> None:
    expected = {(None, "SRV", 10, (1, 1, 80, "n1.node.dc1.consul")),
                (None, "SRV", 10, (1, 1, 80, "n2.node.dc1.consul"))}
    assert answer_set(ask("web-v1.query.consul", SRV, QUERIES)) == expected
    assert answer_set(ask("_web-v1._tcp.query.consul", SRV, QUERIES)) == expected


def test_prepared_query_only_passing_setting() -> None:
    s = settings(dns={"only_passing": True})
    assert answers(ask("web-v1.query.consul", A, QUERIES, s)) == [a("10.0.0.1", 10)]


@pytest.mark.parametrize(
    ("name", "target"),
    [
        # nearest_n 2: dc3 (10ms) before dc2 (30ms); then the datacenters list
        ("api-nearest", (1, 1, 3, "d3.node.dc3.consul")),
        # unknown datacenters are skipped; the listed order is kept
        ("api-listed", (1, 1, 4, "d4.node.dc4.consul")),
        # targets in order: the peer first
        ("api-peer", (1, 1, 5, "c1.node.cluster-02.peer.consul")),
        ("peer-passing", (1, 1, 6, "c1.node.cluster-02.peer.consul")),
    ],
)
def test_prepared_query_failover_order(name: str, target: tuple[Any, ...]) -> None:
    got = ask(f"{name}.query.consul", SRV, QUERIES)
    ttl = 60 if name == "api-nearest" else 0
    assert answers(got) == [(None, "SRV", ttl, target)]


def test_prepared_query_nearest_then_datacenters() -> None:
    snap = build({
        "nodes": [{"name": "d2", "address": "10.20.0.1", "datacenter": "dc2"},
                  {"name": "d3", "address": "10.30.0.1", "datacenter": "dc3"},
                  {"name": "d4", "address": "10.40.0.1", "datacenter": "dc4"}],
        "services": [{"name": "api", "node": "d2", "datacenter": "dc2"},
                     {"name": "api", "node": "d4", "datacenter": "dc4"}],
        "prepared_queries": [{"name": "q", "service": "api",
                              "failover": {"nearest_n": 1, "datacenters": ["dc4", "dc2"]}}],
        "datacenter_rtt": {"dc1": {"dc2": "30ms", "dc3": "10ms", "dc4": "50ms"}},
    })
    # dc3 (nearest) has none; then dc4 from the list, though dc2 is nearer
    assert answers(ask("q.query.consul", A, snap)) == [a("10.40.0.1")]


def test_prepared_query_in_another_datacenter() -> None:
    assert answers(ask("api-listed.query.dc2.consul", A, QUERIES)) == [a("10.20.0.1")]
    assert_nxdomain(ask("api-listed.query.dc9.consul", A, QUERIES), QUERIES)


def test_prepared_query_missing_is_nxdomain() -> None:
    assert_nxdomain(ask("nope.query.consul", A, QUERIES), QUERIES)
    assert_nodata(ask("web-v1.query.consul", AAAA, QUERIES), QUERIES)


# --- PTR ---------------------------------------------------------------------------------------

PTRS = build({
    "nodes": [
        {"name": "N1", "address": "10.0.0.1"},
        {"name": "p1", "address": "10.1.0.1", "partition": "part-2"},
        {"name": "d1", "address": "10.20.0.1", "datacenter": "dc2"},
        {"name": "d1-same-ip", "address": "10.0.0.1", "datacenter": "dc2"},
        {"name": "c1", "address": "10.102.0.1", "peer": "cluster-02"},
        {"name": "v6", "address": "2001:db8::1"},
    ],
    "services": [
        {"name": "web", "node": "N1", "address": "10.0.1.10"},
        {"name": "web", "id": "shadowed", "node": "N1", "address": "10.1.0.1"},
        {"name": "api", "node": "N1"},
        {"name": "api-proxy", "node": "N1", "kind": "connect-proxy", "destination": "api"},
        {"name": "imp", "node": "c1", "peer": "cluster-02", "address": "10.102.1.1"},
    ],
    "virtual_ips": [{"service": "fixed", "ip": "240.0.0.10"},
                    {"service": "fixed", "peer": "cluster-02", "ip": "240.0.0.20"}],
})


@pytest.mark.parametrize(
    ("ip", "target"),
    [
        ("10.0.0.1", "n1.node.dc1.consul"),  # the local datacenter's node first
        ("10.1.0.1", "p1.node.part-2.ap.dc1.dc.consul"),  # a node before a service
        ("10.20.0.1", "d1.node.dc2.consul"),
        ("10.102.0.1", "c1.node.cluster-02.peer.consul"),
        ("2001:db8::1", "v6.node.dc1.consul"),
        ("10.0.1.10", "web.service.dc1.consul"),
        ("240.0.0.10", "fixed.virtual.consul"),
        ("240.0.0.20", "fixed.virtual.cluster-02.peer.consul"),
    ],
)
def test_ptr(ip: str, target: str) -> None:
    got = resolve(Query("ptr", "consul", ip), PTR, PTRS, DEFAULT)
    assert (got.rcode, answers(got), got.authority) == (NOERROR, [(None, "PTR", 0, target)], [])
    got = resolve(Query("ptr", "consul", ip), ANY, PTRS, settings(dns={"node_ttl": "5s"}))
    assert answers(got) == [(None, "PTR", 0, target)]


def test_ptr_allocated_virtual_ip() -> None:
    ip = PTRS.vips[("", "default", "default", "api")]
    got = resolve(Query("ptr", "consul", ip), PTR, PTRS, DEFAULT)
    assert answers(got) == [(None, "PTR", 0, "api.virtual.consul")]


def test_ptr_misses() -> None:
    assert_nxdomain(resolve(Query("ptr", "consul", "10.9.9.9"), PTR, PTRS, DEFAULT), PTRS)
    # imported service addresses are not answered (only nodes and local services)
    assert_nxdomain(resolve(Query("ptr", "consul", "10.102.1.1"), PTR, PTRS, DEFAULT), PTRS)
    assert_nodata(resolve(Query("ptr", "consul", "10.0.0.1"), A, PTRS, DEFAULT), PTRS)


def test_ptr_uses_the_primary_domain() -> None:
    s = settings(domain="mesh", alt_domain="alt.example")
    got = resolve(Query("ptr", "mesh", "10.0.0.1"), PTR, PTRS, s)
    assert answers(got) == [(None, "PTR", 0, "n1.node.dc1.mesh")]


# --- WAN translation -------------------------------------------------------------------------

WAN = build({
    "nodes": [
        {"name": "n1", "address": "10.0.0.1", "tagged_addresses": {"wan": "198.51.100.1"}},
        {"name": "d1", "address": "10.20.0.1", "datacenter": "dc2",
         "tagged_addresses": {"wan": "198.51.100.21"}},
        {"name": "d2", "address": "10.20.0.2", "datacenter": "dc2"},
    ],
    "services": [
        {"name": "web", "node": "n1", "port": 80},
        {"name": "web", "node": "d1", "datacenter": "dc2", "port": 80},
        {"name": "web", "id": "web-own", "node": "d2", "datacenter": "dc2",
         "address": "10.20.1.2", "port": 80,
         "tagged_addresses": {"wan": {"address": "203.0.113.2", "port": 18080}}},
    ],
})


def test_translate_wan_addrs() -> None:
    on = settings(dns={"translate_wan_addrs": True})
    assert answers(ask("web.service.consul", A, WAN, on)) == [a("10.0.0.1")]
    assert answer_set(ask("web.service.dc2.consul", A, WAN, on)) == {a("198.51.100.21"),
                                                                     a("203.0.113.2")}
    assert answer_set(ask("web.service.dc2.consul", A, WAN)) == {a("10.20.0.1"),
                                                                a("10.20.1.2")}
    assert srv(ask("web.service.dc2.consul", SRV, WAN, on)) == {
        (None, "SRV", 0, (1, 1, 80, "c6336415.addr.dc2.consul")): [
            a("198.51.100.21", 0, "c6336415.addr.dc2.consul")],
        (None, "SRV", 0, (1, 1, 18080, "cb007102.addr.dc2.consul")): [
            a("203.0.113.2", 0, "cb007102.addr.dc2.consul")],
    }
    assert answers(ask("d1.node.dc2.consul", A, WAN, on)) == [a("198.51.100.21")]
    assert answers(ask("n1.node.consul", A, WAN, on)) == [a("10.0.0.1")]


# --- SRV targets that are hostnames ----------------------------------------------------------

HOSTNAMES = build({
    "nodes": [{"name": "n1", "address": "10.0.0.1"}, {"name": "n2", "address": "10.0.0.2"}],
    "services": [
        {"name": "web", "id": "web-1", "node": "n1", "port": 80},
        {"name": "web", "id": "web-2", "node": "n2", "port": 80},
        {"name": "alias", "id": "alias-1", "node": "n1", "address": "web.service.consul",
         "port": 8080},
        {"name": "outside", "id": "o-1", "node": "n1", "address": "db.example.com", "port": 5432},
    ],
})


def test_srv_hostname_target_under_the_domain_carries_its_addresses() -> None:
    got = srv(ask("alias.service.consul", SRV, HOSTNAMES, settings(dns={"service_ttl": {
        "*": "7s"}})))
    assert got == {(None, "SRV", 7, (1, 1, 8080, "web.service.consul")): [
        a("10.0.0.1", 7, "web.service.consul"), a("10.0.0.2", 7, "web.service.consul")]}


def test_srv_hostname_target_outside_the_domain_has_no_additional() -> None:
    got = srv(ask("outside.service.consul", SRV, HOSTNAMES))
    assert got == {(None, "SRV", 0, (1, 1, 5432, "db.example.com")): []}
