"""The query-name grammar of the README ("Every lookup form"): names in, ``Query`` values out.

Every row of the lookup table has a case here, plus every form the spec calls invalid. The
names are given as the text left of the domain; ``parse`` receives them as lowercase labels.
"""

from __future__ import annotations

import pytest

from meshdns.names import Query, addr_hex, parse, parse_reverse, split_domain

D = "consul"


def q(kind: str, name: str = "", **fields: str | None) -> Query:
    """A ``Query`` under the default domain."""
    return Query(kind, D, name, **fields)


def labels(text: str) -> tuple[str, ...]:
    return tuple(text.split(".")) if text else ()


INVALID = Query("invalid", D)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # --- service ---
        ("web.service", q("service", "web")),
        ("v1.web.service", q("service", "web", tag="v1")),
        ("v1.primary.web.service", q("service", "web", tag="v1.primary")),
        ("a.b.c.web.service", q("service", "web", tag="a.b.c")),
        ("web.service.dc2.dc", q("service", "web", datacenter="dc2")),
        ("web.service.team-a.ns", q("service", "web", namespace="team-a")),
        ("web.service.part-2.ap", q("service", "web", partition="part-2")),
        ("web.service.team-a.ns.part-2.ap", q("service", "web", namespace="team-a",
                                               partition="part-2")),
        ("web.service.team-a.ns.part-2.ap.dc2.dc",
         q("service", "web", namespace="team-a", partition="part-2", datacenter="dc2")),
        # the qualifiers in any order
        ("web.service.dc2.dc.part-2.ap.team-a.ns",
         q("service", "web", namespace="team-a", partition="part-2", datacenter="dc2")),
        ("web.service.part-2.ap.dc2.dc.team-a.ns",
         q("service", "web", namespace="team-a", partition="part-2", datacenter="dc2")),
        ("v1.web.service.dc2.dc", q("service", "web", tag="v1", datacenter="dc2")),
        # legacy datacenter: one bare label
        ("web.service.dc2", q("service", "web", datacenter="dc2")),
        ("v1.web.service.dc2", q("service", "web", tag="v1", datacenter="dc2")),
        # peer
        ("web.service.cluster-02.peer", q("service", "web", peer="cluster-02")),
        ("web.service.team-a.ns.cluster-02.peer",
         q("service", "web", namespace="team-a", peer="cluster-02")),
        ("web.service.cluster-02.peer.part-2.ap.team-a.ns",
         q("service", "web", namespace="team-a", partition="part-2", peer="cluster-02")),
        # sameness group
        ("web.service.group-1.sg", q("service", "web", sameness_group="group-1")),
        ("web.service.group-1.sg.team-a.ns.part-2.ap",
         q("service", "web", namespace="team-a", partition="part-2", sameness_group="group-1")),
        ("web.service.part-2.ap.group-1.sg",
         q("service", "web", partition="part-2", sameness_group="group-1")),
        # RFC 2782
        ("_web._tcp.service", q("service", "web")),
        ("_web._v1.service", q("service", "web", tag="v1")),
        ("_web._udp.service", q("service", "web", tag="udp")),
        ("_web._tcp.service.dc2", q("service", "web", datacenter="dc2")),
        ("_web._tcp.service.dc2.dc", q("service", "web", datacenter="dc2")),
        ("_web._v1.service.cluster-02.peer", q("service", "web", tag="v1", peer="cluster-02")),
        # the SRV shorthand without `.service`
        ("_web._tcp", q("service", "web")),
        ("_web._tcp.dc2", q("service", "web", datacenter="dc2")),
        ("_web._v1", q("service", "web", tag="v1")),
        ("_web._tcp.dc2.dc", q("service", "web", datacenter="dc2")),
        # --- connect and ingress: the last part is the service, no tag ---
        ("web.connect", q("connect", "web")),
        ("web.connect.dc2", q("connect", "web", datacenter="dc2")),
        ("web.connect.team-a.ns.part-2.ap", q("connect", "web", namespace="team-a",
                                               partition="part-2")),
        ("extra.web.connect", q("connect", "web")),
        ("web.ingress", q("ingress", "web")),
        ("web.ingress.dc2.dc", q("ingress", "web", datacenter="dc2")),
        ("web.ingress.team-a.ns", q("ingress", "web", namespace="team-a")),
        # --- virtual ---
        ("web.virtual", q("virtual", "web")),
        ("web.virtual.team-a.ns", q("virtual", "web", namespace="team-a")),
        ("web.virtual.part-2.ap", q("virtual", "web", partition="part-2")),
        ("web.virtual.cluster-02.peer", q("virtual", "web", peer="cluster-02")),
        ("web.virtual.team-a.ns.part-2.ap.cluster-02.peer",
         q("virtual", "web", namespace="team-a", partition="part-2", peer="cluster-02")),
        ("web.virtual.cluster-02.peer.team-a.ns",
         q("virtual", "web", namespace="team-a", peer="cluster-02")),
        # legacy: the one bare label is a peer, not a datacenter
        ("web.virtual.cluster-02", q("virtual", "web", peer="cluster-02")),
        # --- node ---
        ("node-1.node", q("node", "node-1")),
        ("foo.bar.node", q("node", "foo.bar")),
        ("a.b.c.node", q("node", "a.b.c")),
        ("node-1.node.dc2", q("node", "node-1", datacenter="dc2")),
        ("node-1.node.dc2.dc", q("node", "node-1", datacenter="dc2")),
        ("node-1.node.part-2.ap", q("node", "node-1", partition="part-2")),
        ("node-1.node.part-2.ap.dc2.dc", q("node", "node-1", partition="part-2",
                                            datacenter="dc2")),
        ("node-1.node.cluster-02.peer", q("node", "node-1", peer="cluster-02")),
        ("foo.bar.node.cluster-02.peer", q("node", "foo.bar", peer="cluster-02")),
        ("node-1.node.default.ns", q("node", "node-1")),  # nodes live in namespace default
        # --- address ---
        ("0a000001.addr", q("addr", "0a000001")),
        ("0a000001.addr.dc2", q("addr", "0a000001", datacenter="dc2")),
        ("0a000001.addr.dc2.dc", q("addr", "0a000001", datacenter="dc2")),
        ("0a000001.addr.cluster-02.peer", q("addr", "0a000001", peer="cluster-02")),
        ("20010db8000000000000000000000010.addr",
         q("addr", "20010db8000000000000000000000010")),
        # --- prepared query ---
        ("web-nearest.query", q("query", "web-nearest")),
        ("web-nearest.query.dc2", q("query", "web-nearest", datacenter="dc2")),
        ("_web-nearest._tcp.query", q("query", "web-nearest")),
        ("_web-nearest._tcp.query.dc2", q("query", "web-nearest", datacenter="dc2")),
        ("a.b.query", q("query", "a.b")),
        # --- apex and the name server ---
        ("", q("apex")),
        ("ns", q("nameserver")),
    ],
)
def test_parse(text: str, expected: Query) -> None:
    assert parse(labels(text), D) == expected


@pytest.mark.parametrize(
    "text",
    [
        # no keyword
        "foo",
        "web.foo",
        "nothing.here.at.all",
        # nothing left of the keyword
        "service",
        "service.dc2",
        "connect",
        "ingress",
        "virtual",
        "node",
        "query",
        "addr",
        "node.dc2.dc",
        # .peer with .dc or .sg; .sg with .dc
        "web.service.dc2.dc.cluster-02.peer",
        "web.service.cluster-02.peer.dc2.dc",
        "web.service.group-1.sg.cluster-02.peer",
        "web.service.group-1.sg.dc2.dc",
        "node-1.node.dc2.dc.cluster-02.peer",
        # three or five locality labels; more than three pairs
        "web.service.a.b.c",
        "web.service.dc2.dc.x",
        "web.service.a.b.c.d.e",
        "web.service.a.ns.b.ap.c.dc.d",
        "web.service.a.ns.b.ap.c.dc.d.dc",
        "node-1.node.a.b.c",
        "web.virtual.a.b.c",
        # unknown key, duplicate key
        "web.service.dc2.datacenter",
        "web.service.x.foo",
        "web.service.a.dc.b.dc",
        "web.service.a.ns.b.ns",
        "web.virtual.a.peer.b.peer",
        # .virtual has no datacenter form, nor a sameness group
        "web.virtual.dc2.dc",
        "web.virtual.group-1.sg",
        # nodes: no sameness group, only the default namespace
        "node-1.node.group-1.sg",
        "node-1.node.team-a.ns",
        # prepared queries: only a datacenter
        "q.query.team-a.ns",
        "q.query.cluster-02.peer",
        "q.query.a.b.c",
        # addr: bad hex, wrong length, more than one part
        "0a00000g.addr",
        "zzzzzzzz.addr",
        "0a0001.addr",
        "0a00000001.addr",
        "20010db800000000000000000000001.addr",
        "20010db80000000000000000000000100.addr",
        "a.0a000001.addr",
        "0a000001.addr.a.b.c",
        # 8 characters, but not 8 hex digits (bytes.fromhex would skip the spaces)
        "0a 0b 0c.addr",
        "20010db80000000000000000  000010.addr",
    ],
)
def test_parse_invalid(text: str) -> None:
    assert parse(labels(text), D) == INVALID


def test_parse_keeps_the_domain_it_was_asked_under() -> None:
    assert parse(("web", "service"), "mesh.example") == Query("service", "mesh.example", "web")
    assert parse((), "mesh.example") == Query("apex", "mesh.example")
    assert parse(("foo",), "mesh.example") == Query("invalid", "mesh.example")


def test_right_most_keyword_decides() -> None:
    # only the right-most keyword counts: the labels left of it are tag, service or node name
    assert parse(labels("web.node.service"), D) == q("service", "node", tag="web")
    assert parse(labels("web.service.node"), D) == q("node", "web.service")
    assert parse(labels("x.addr.query"), D) == q("query", "x.addr")


@pytest.mark.parametrize(
    ("name", "domains", "expected"),
    [
        (("web", "service", "consul"), (("consul",),), 0),
        (("consul",), (("consul",),), 0),
        (("web", "service", "example"), (("consul",),), -1),
        (("com",), (("example", "com"),), -1),
        # longest first: a name under both picks the longer alt_domain
        (("web", "service", "mesh", "consul"), (("mesh", "consul"), ("consul",)), 0),
        (("web", "service", "consul"), (("mesh", "consul"), ("consul",)), 1),
        (("mesh", "consul"), (("mesh", "consul"), ("consul",)), 0),
        (("web", "service", "dc1", "example", "com"), (("dc1", "example", "com"), ("consul",)),
         0),
        (("web", "service", "consul"), (("dc1", "example", "com"), ("consul",)), 1),
        (("web", "service", "example", "com"), (("dc1", "example", "com"), ("consul",)), -1),
    ],
)
def test_split_domain(name: tuple[str, ...], domains: tuple[tuple[str, ...], ...],
                      expected: int) -> None:
    assert split_domain(name, domains) == expected


V6_ONE = tuple("1" + "0" * 31)  # ::1 reversed, nibble by nibble
V6_DB8 = tuple("0100000000000000000000008bd01002")  # 2001:db8::10 reversed


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (("1", "0", "0", "10", "in-addr", "arpa"), "10.0.0.1"),
        (("255", "255", "255", "255", "in-addr", "arpa"), "255.255.255.255"),
        (("10", "0", "0", "240", "in-addr", "arpa"), "240.0.0.10"),
        (("001", "0", "0", "10", "in-addr", "arpa"), "10.0.0.1"),
        ((*V6_ONE, "ip6", "arpa"), "::1"),
        ((*V6_DB8, "ip6", "arpa"), "2001:db8::10"),
        # malformed
        (("256", "0", "0", "10", "in-addr", "arpa"), None),
        (("1", "0", "10", "in-addr", "arpa"), None),
        (("1", "1", "0", "0", "10", "in-addr", "arpa"), None),
        (("x", "0", "0", "10", "in-addr", "arpa"), None),
        (("-1", "0", "0", "10", "in-addr", "arpa"), None),
        (("1000", "0", "0", "10", "in-addr", "arpa"), None),
        (("0", "10", "in-addr", "arpa"), None),
        (("in-addr", "arpa"), None),
        ((*V6_ONE[:-1], "ip6", "arpa"), None),
        ((*V6_ONE, "0", "ip6", "arpa"), None),
        ((*V6_ONE[:-1], "g", "ip6", "arpa"), None),
        ((*V6_ONE[:-1], "10", "ip6", "arpa"), None),
        (("1", "0", "0", "10", "ip6", "arpa"), None),
        (("1", "0", "0", "10", "in-addr", "example"), None),
        (("arpa",), None),
    ],
)
def test_parse_reverse(name: tuple[str, ...], expected: str | None) -> None:
    assert parse_reverse(name) == expected


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("10.0.0.1", "0a000001"),
        ("10.0.1.20", "0a000114"),
        ("2001:db8::10", "20010db8000000000000000000000010"),
    ],
)
def test_addr_hex(ip: str, expected: str) -> None:
    assert addr_hex(ip) == expected
    assert parse((expected, "addr"), D) == q("addr", expected)
