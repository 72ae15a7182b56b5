"""Every lookup form of names.md, asked over the wire of a real ``meshdns serve``.

One server runs on a catalog written here, so every expected record is known exactly: owner
names (with the case asked), TTLs (``node_ttl`` 7, ``service_ttl`` 13 for web, SOA 5), record
values, sections, rcode and header flags. Each row is asked with the real ``dig`` and with
dnspython, over UDP and over TCP. ``dig`` asks every row in one run per transport (one process
instead of a hundred) and the blocks of its output are matched to rows by their question.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from conftest import MeshdnsProcess, write_catalog

CATALOG = """\
nodes:
  - {name: node-1, address: 10.0.0.1, meta: {rack: r1}}
  - {name: node-2, address: 10.0.0.2}
  - {name: foo.bar, address: 10.0.0.9}
  - {name: dc2-node, address: 10.2.0.1, datacenter: dc2}
  - {name: p2-node, address: 10.3.0.1, partition: part-2}
  - {name: peer-node, address: 10.9.0.1, peer: cluster-02}
services:
  - {name: web, id: web-1, node: node-1, port: 8080, tags: [v1]}
  - {name: web, id: web-2, node: node-2, address: 10.0.1.2, port: 8081, tags: [v2]}
  # critical: never answered (it would add 10.0.0.2 and port 8083)
  - {name: web, id: web-3, node: node-2, port: 8083, tags: [v1], health: critical}
  - {name: web, node: dc2-node, datacenter: dc2, port: 8082}
  - {name: web, namespace: team-a, node: node-1, address: 10.0.5.1, port: 9000}
  - {name: web, node: p2-node, partition: part-2, port: 9001}
  - {name: web, node: peer-node, peer: cluster-02, port: 9002}
  - {name: web-sidecar-proxy, node: node-1, port: 21000, kind: connect-proxy, destination: web}
  - {name: ingress-gw, node: node-2, port: 8443, kind: ingress-gateway, ingress: [web]}
  - {name: api, node: node-2, port: 9090}
virtual_ips:
  - {service: web, ip: 240.0.0.10}
  - {service: web, peer: cluster-02, ip: 240.0.0.20}
  - {service: web, namespace: team-a, ip: 240.0.0.30}
  - {service: web, partition: part-2, ip: 240.0.0.40}
"""

CONFIG = {
    "alt_domain": "mesh.test",
    "dns": {"node_ttl": "7s", "service_ttl": {"*": "11s", "web": "13s"}, "soa": {"min_ttl": 5}},
}

NOERROR, NXDOMAIN = "NOERROR", "NXDOMAIN"
AUTHORITATIVE = frozenset({"qr", "aa", "rd"})  # AA set, RA clear (no recursors), RD copied


def soa(domain: str = "consul") -> str:
    return f"{domain}. 5 IN SOA ns.{domain}. hostmaster.{domain}. SERIAL 3600 600 86400 5"


def srv(owner: str, port: int, target: str, ttl: int = 13) -> str:
    return f"{owner}. {ttl} IN SRV 1 1 {port} {target}."


def rr(owner: str, rtype: str, value: str, ttl: int) -> str:
    return f"{owner}. {ttl} IN {rtype} {value}"


@dataclass(frozen=True)
class Row:
    name: str
    rtype: str
    rcode: str
    answer: tuple[str, ...] = ()
    authority: tuple[str, ...] = ()
    additional: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return f"{self.name}/{self.rtype}"


def ok(name: str, rtype: str, answer: list[str], additional: list[str] = (),
       authority: list[str] = ()) -> Row:
    return Row(name, rtype, NOERROR, tuple(answer), tuple(authority), tuple(additional))


def nodata(name: str, rtype: str, domain: str = "consul", additional: list[str] = ()) -> Row:
    return Row(name, rtype, NOERROR, (), (soa(domain),), tuple(additional))


def nxdomain(name: str, rtype: str = "A", domain: str = "consul") -> Row:
    return Row(name, rtype, NXDOMAIN, (), (soa(domain),))


def web_srv(owner: str, domain: str = "consul") -> Row:
    """web in dc1/default/default: web-1 on node-1 (node address), web-2 with its own."""
    return ok(owner, "SRV",
              [srv(owner, 8080, f"node-1.node.dc1.{domain}"),
               srv(owner, 8081, f"0a000102.addr.dc1.{domain}")],
              [rr(f"node-1.node.dc1.{domain}", "A", "10.0.0.1", 13),
               rr(f"node-1.node.dc1.{domain}", "TXT", '"rack=r1"', 13),
               rr(f"0a000102.addr.dc1.{domain}", "A", "10.0.1.2", 13)])


def a(owner: str, *ips: str, ttl: int = 13) -> Row:
    return ok(owner, "A", [rr(owner, "A", ip, ttl) for ip in ips])


NODE1_TXT = '"rack=r1"'

ROWS = [
    # --- service ---
    a("web.service.consul", "10.0.0.1", "10.0.1.2"),
    web_srv("web.service.consul"),
    a("WeB.SeRvIcE.CoNsUl", "10.0.0.1", "10.0.1.2"),
    a("v1.web.service.consul", "10.0.0.1"),
    ok("v2.web.service.consul", "SRV", [srv("v2.web.service.consul", 8081,
                                            "0a000102.addr.dc1.consul")],
       [rr("0a000102.addr.dc1.consul", "A", "10.0.1.2", 13)]),
    nxdomain("v3.web.service.consul"),
    web_srv("_web._tcp.service.consul"),
    web_srv("_web._tcp.consul"),
    ok("_web._v1.service.consul", "SRV", [srv("_web._v1.service.consul", 8080,
                                              "node-1.node.dc1.consul")],
       [rr("node-1.node.dc1.consul", "A", "10.0.0.1", 13),
        rr("node-1.node.dc1.consul", "TXT", NODE1_TXT, 13)]),
    a("web.service.dc2.consul", "10.2.0.1"),
    ok("web.service.dc2.consul", "SRV", [srv("web.service.dc2.consul", 8082,
                                             "dc2-node.node.dc2.consul")],
       [rr("dc2-node.node.dc2.consul", "A", "10.2.0.1", 13)]),
    a("web.service.dc2.dc.consul", "10.2.0.1"),
    a("web.service.dc1.dc.consul", "10.0.0.1", "10.0.1.2"),
    a("web.service.team-a.ns.consul", "10.0.5.1"),
    ok("web.service.team-a.ns.consul", "SRV", [srv("web.service.team-a.ns.consul", 9000,
                                                   "0a000501.addr.dc1.consul")],
       [rr("0a000501.addr.dc1.consul", "A", "10.0.5.1", 13),
        rr("0a000501.addr.dc1.consul", "TXT", NODE1_TXT, 13)]),
    a("web.service.team-a.ns.default.ap.dc1.dc.consul", "10.0.5.1"),
    a("web.service.part-2.ap.consul", "10.3.0.1"),
    ok("web.service.part-2.ap.consul", "SRV", [srv("web.service.part-2.ap.consul", 9001,
                                                   "p2-node.node.part-2.ap.dc1.dc.consul")],
       [rr("p2-node.node.part-2.ap.dc1.dc.consul", "A", "10.3.0.1", 13)]),
    a("web.service.cluster-02.peer.consul", "10.9.0.1"),
    ok("web.service.cluster-02.peer.consul", "SRV",
       [srv("web.service.cluster-02.peer.consul", 9002, "peer-node.node.cluster-02.peer.consul")],
       [rr("peer-node.node.cluster-02.peer.consul", "A", "10.9.0.1", 13)]),
    a("api.service.consul", "10.0.0.2", ttl=11),  # the "*" service_ttl
    nodata("web.service.consul", "AAAA"),
    nodata("web.service.consul", "TXT"),
    nxdomain("nope.service.consul"),
    nxdomain("web.service.dc9.consul"),
    nxdomain("web.service.nope.ap.consul"),
    nxdomain("web.service.nope.peer.consul"),
    nxdomain("web.service.cluster-02.peer.dc1.dc.consul"),  # .peer with .dc
    nxdomain("web.service.a.b.c.consul"),  # three locality labels
    nxdomain("web.service.team-b.ns.consul"),
    nxdomain("nothing.consul"),  # no keyword
    nxdomain("service.consul"),  # nothing left of the keyword
    # --- mesh-capable, ingress ---
    a("web.connect.consul", "10.0.0.1"),
    ok("web.connect.consul", "SRV", [srv("web.connect.consul", 21000, "node-1.node.dc1.consul")],
       [rr("node-1.node.dc1.consul", "A", "10.0.0.1", 13),
        rr("node-1.node.dc1.consul", "TXT", NODE1_TXT, 13)]),
    nxdomain("api.connect.consul"),
    a("web.ingress.consul", "10.0.0.2"),
    ok("web.ingress.consul", "SRV", [srv("web.ingress.consul", 8443, "node-2.node.dc1.consul")],
       [rr("node-2.node.dc1.consul", "A", "10.0.0.2", 13)]),
    nxdomain("api.ingress.consul", "SRV"),
    # --- virtual IPs (node_ttl) ---
    a("web.virtual.consul", "240.0.0.10", ttl=7),
    a("web.virtual.default.ns.default.ap.consul", "240.0.0.10", ttl=7),
    a("web.virtual.team-a.ns.consul", "240.0.0.30", ttl=7),
    a("web.virtual.part-2.ap.consul", "240.0.0.40", ttl=7),
    a("web.virtual.cluster-02.peer.consul", "240.0.0.20", ttl=7),
    a("web.virtual.cluster-02.consul", "240.0.0.20", ttl=7),  # legacy peer form
    nodata("web.virtual.consul", "AAAA"),
    nxdomain("api.virtual.consul"),  # not in the mesh, no fixed IP
    nxdomain("web.virtual.dc1.dc.consul"),  # no cross-datacenter form
    # --- node (node_ttl; meta as TXT in additional) ---
    ok("node-1.node.consul", "A", [rr("node-1.node.consul", "A", "10.0.0.1", 7)],
       [rr("node-1.node.consul", "TXT", NODE1_TXT, 7)]),
    ok("node-1.node.dc1.dc.consul", "A", [rr("node-1.node.dc1.dc.consul", "A", "10.0.0.1", 7)],
       [rr("node-1.node.dc1.dc.consul", "TXT", NODE1_TXT, 7)]),
    ok("node-1.node.dc1.consul", "A", [rr("node-1.node.dc1.consul", "A", "10.0.0.1", 7)],
       [rr("node-1.node.dc1.consul", "TXT", NODE1_TXT, 7)]),
    ok("node-1.node.consul", "TXT", [rr("node-1.node.consul", "TXT", NODE1_TXT, 7)]),
    a("node-2.node.consul", "10.0.0.2", ttl=7),
    a("dc2-node.node.dc2.consul", "10.2.0.1", ttl=7),
    a("dc2-node.node.dc2.dc.consul", "10.2.0.1", ttl=7),
    a("peer-node.node.cluster-02.peer.consul", "10.9.0.1", ttl=7),
    a("p2-node.node.part-2.ap.consul", "10.3.0.1", ttl=7),
    a("foo.bar.node.consul", "10.0.0.9", ttl=7),
    nodata("node-1.node.consul", "SRV"),
    nodata("node-2.node.consul", "AAAA"),
    nxdomain("node-9.node.consul"),
    nxdomain("dc2-node.node.consul"),  # lives in dc2, not in dc1
    nxdomain("p2-node.node.consul"),  # lives in partition part-2
    # --- addr ---
    a("0a000001.addr.consul", "10.0.0.1", ttl=7),
    a("c0a80001.addr.dc1.consul", "192.168.0.1", ttl=7),
    ok("20010db8000000000000000000000001.addr.consul", "AAAA",
       [rr("20010db8000000000000000000000001.addr.consul", "AAAA", "2001:db8::1", 7)]),
    nodata("0a000001.addr.consul", "AAAA",
           additional=[rr("0a000001.addr.consul", "A", "10.0.0.1", 7)]),
    nxdomain("0a00001.addr.consul"),  # 7 hex digits
    nxdomain("0a00000g.addr.consul"),  # not hex
    # --- zone apex, name server ---
    ok("consul", "SOA", [soa()], [rr("ns.consul", "A", "127.0.0.1", 7)],
       [rr("consul", "NS", "ns.consul.", 7)]),
    ok("consul", "NS", [rr("consul", "NS", "ns.consul.", 7)],
       [rr("ns.consul", "A", "127.0.0.1", 7)]),
    nodata("consul", "A"),
    ok("nope.service.consul", "SOA", [soa()], [rr("ns.consul", "A", "127.0.0.1", 7)],
       [rr("consul", "NS", "ns.consul.", 7)]),
    ok("ns.consul", "A", [rr("ns.consul", "A", "127.0.0.1", 7)]),
    nodata("ns.consul", "AAAA"),
    # --- alt_domain: every generated name uses the domain that was asked ---
    ok("mesh.test", "SOA", [soa("mesh.test")], [rr("ns.mesh.test", "A", "127.0.0.1", 7)],
       [rr("mesh.test", "NS", "ns.mesh.test.", 7)]),
    ok("mesh.test", "NS", [rr("mesh.test", "NS", "ns.mesh.test.", 7)],
       [rr("ns.mesh.test", "A", "127.0.0.1", 7)]),
    ok("ns.mesh.test", "A", [rr("ns.mesh.test", "A", "127.0.0.1", 7)]),
    web_srv("web.service.mesh.test", "mesh.test"),
    web_srv("_web._tcp.mesh.test", "mesh.test"),
    a("web.service.mesh.test", "10.0.0.1", "10.0.1.2"),
    ok("node-1.node.dc1.mesh.test", "A", [rr("node-1.node.dc1.mesh.test", "A", "10.0.0.1", 7)],
       [rr("node-1.node.dc1.mesh.test", "TXT", NODE1_TXT, 7)]),
    a("web.virtual.mesh.test", "240.0.0.10", ttl=7),
    nxdomain("nope.service.mesh.test", domain="mesh.test"),
    nodata("web.service.mesh.test", "AAAA", domain="mesh.test"),
]

assert len({r.id for r in ROWS}) == len(ROWS), "each row is asked once per dig run"


@dataclass(frozen=True)
class Reply:
    rcode: str
    flags: frozenset[str]
    answer: tuple[str, ...]
    authority: tuple[str, ...]
    additional: tuple[str, ...]


def normal(line: str) -> str:
    """One record as ``owner ttl class type rdata`` with single spaces."""
    return " ".join(line.split())


def parse_dig(text: str) -> dict[tuple[str, str], Reply]:
    """The replies of a multi-question ``dig +noall +question +answer +authority +additional
    +comments`` run, keyed by (question name as printed, type)."""
    out: dict[tuple[str, str], Reply] = {}
    for block in text.split(";; Got answer:")[1:]:
        status = re.search(r"status: (\w+)", block).group(1)
        flags = frozenset(re.search(r";; flags:([^;]*);", block).group(1).split())
        question = re.search(r";; QUESTION SECTION:\n;(\S+)\s+IN\s+(\S+)", block)
        sections: dict[str, list[str]] = {"ANSWER": [], "AUTHORITY": [], "ADDITIONAL": []}
        current = None
        for line in block.splitlines():
            m = re.match(r";; (\w+) SECTION:", line)
            if m:
                current = m.group(1)
                continue
            if not line.strip() or line.startswith(";"):
                if not line.strip():
                    current = None
                continue
            if current in sections:
                sections[current].append(normal(line))
        key = (question.group(1).rstrip("."), question.group(2))
        out[key] = Reply(status, flags, *(tuple(sorted(sections[s]))
                                          for s in ("ANSWER", "AUTHORITY", "ADDITIONAL")))
    return out


def from_message(msg: dns.message.Message) -> Reply:
    def lines(section: list) -> tuple[str, ...]:
        return tuple(sorted(normal(rrset.to_text()) for rrset in section))

    return Reply(dns.rcode.to_text(msg.rcode()),
                 frozenset(dns.flags.to_text(msg.flags).lower().split()),
                 lines(msg.answer), lines(msg.authority), lines(msg.additional))


def ask(server: MeshdnsProcess, name: str, rtype: str, tcp: bool) -> Reply:
    """dnspython, no EDNS, one record per RRset (so duplicates would show)."""
    query = dns.message.make_query(name, rtype)
    if tcp:
        msg = dns.query.tcp(query, "127.0.0.1", port=server.port, timeout=3,
                            one_rr_per_rrset=True)
    else:
        msg = dns.query.udp(query, "127.0.0.1", port=server.port, timeout=3,
                            one_rr_per_rrset=True, raise_on_truncation=False)
    assert msg.id == query.id
    assert [q.to_text() for q in msg.question] == [q.to_text() for q in query.question]
    assert msg.edns == -1  # no OPT when the query had none
    return from_message(msg)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    workdir = tmp_path_factory.mktemp("lookups")
    catalog = write_catalog(workdir / "catalog.yaml", CATALOG)
    before = int(time.time())
    proc = MeshdnsProcess(workdir, catalog, CONFIG, ["--admin", "off"])
    proc.started_at = before  # type: ignore[attr-defined]
    yield proc
    assert proc.stop() == 0


@pytest.fixture(scope="module")
def serial(server: MeshdnsProcess) -> int:
    reply = dns.query.udp(dns.message.make_query("consul", "SOA"), "127.0.0.1",
                          port=server.port, timeout=3)
    value = reply.answer[0][0].serial
    # the serial is the load time in seconds: between starting the process and now
    assert server.started_at - 1 <= value <= time.time() + 1
    return value


@pytest.fixture(scope="module")
def dig_replies(server: MeshdnsProcess) -> dict[bool, dict[tuple[str, str], Reply]]:
    """All rows asked by one ``dig`` run per transport."""
    out = {}
    for tcp in (False, True):
        args = ["dig", "@127.0.0.1", "-p", str(server.port), "+time=3", "+tries=1",
                "+noall", "+question", "+answer", "+authority", "+additional", "+comments"]
        if tcp:
            args.append("+tcp")
        for row in ROWS:
            args += [row.name, row.rtype]
        text = subprocess.run(args, capture_output=True, text=True, timeout=60,
                              check=True).stdout
        out[tcp] = parse_dig(text)
        assert len(out[tcp]) == len(ROWS), text
    return out


def expected(row: Row, serial: int) -> Reply:
    def fill(lines: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted(normal(x.replace("SERIAL", str(serial))) for x in lines))

    return Reply(row.rcode, AUTHORITATIVE, fill(row.answer), fill(row.authority),
                 fill(row.additional))


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_dnspython(server: MeshdnsProcess, serial: int, row: Row, transport: str) -> None:
    assert ask(server, row.name, row.rtype, transport == "tcp") == expected(row, serial)


@pytest.mark.parametrize("transport", ["udp", "tcp"])
@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_dig(dig_replies: dict, serial: int, row: Row, transport: str) -> None:
    reply = dig_replies[transport == "tcp"][(row.name, row.rtype)]
    assert reply == expected(row, serial)


@pytest.mark.parametrize("name", ["web.service.consul", "web.virtual.consul",
                                  "node-1.node.consul"])
def test_dig_short(server: MeshdnsProcess, name: str) -> None:
    """``+short`` prints the values alone, the way scripts read them."""
    want = {"web.service.consul": ["10.0.0.1", "10.0.1.2"],
            "web.virtual.consul": ["240.0.0.10"], "node-1.node.consul": ["10.0.0.1"]}[name]
    assert sorted(server.dig("+short", name, "A").split()) == want
    assert sorted(server.dig("+short", "+tcp", name, "A").split()) == want


def test_srv_short_has_targets_under_alt_domain(server: MeshdnsProcess) -> None:
    out = server.dig("+short", "web.service.mesh.test", "SRV").splitlines()
    assert sorted(out) == ["1 1 8080 node-1.node.dc1.mesh.test.",
                           "1 1 8081 0a000102.addr.dc1.mesh.test."]


def test_owner_keeps_the_case_asked(server: MeshdnsProcess) -> None:
    """dnspython compares names case-insensitively: check the text of the owner itself."""
    for tcp in (False, True):
        query = dns.message.make_query("WeB.SeRvIcE.CoNsUl", "SRV")
        send = dns.query.tcp if tcp else dns.query.udp
        reply = send(query, "127.0.0.1", port=server.port, timeout=3)
        assert reply.question[0].name.to_text() == "WeB.SeRvIcE.CoNsUl."
        assert {rrset.name.to_text() for rrset in reply.answer} == {"WeB.SeRvIcE.CoNsUl."}
        assert sorted(rd.target.to_text() for rd in reply.answer[0]) == [
            "0a000102.addr.dc1.consul.", "node-1.node.dc1.consul."]
