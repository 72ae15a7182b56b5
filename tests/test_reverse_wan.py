"""PTR lookups (in-addr.arpa, ip6.arpa) and WAN address translation, asked over the wire.

PTR: a node address names the node, else a service address names the service, else a virtual
IP names the virtual service; anything else is NXDOMAIN with the SOA. WAN: with
``translate_wan_addrs`` a pod in dc1 asking about dc2 gets dc2's ``wan`` tagged addresses and
ports, so it reaches dc2 through its public address.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from conftest import MeshdnsProcess, addresses, glue, srv, write_catalog

CATALOG = """\
nodes:
  - {name: n1, address: 10.0.0.1, tagged_addresses: {wan: 198.51.100.1}}
  - {name: n6, address: "2001:db8::1"}
  - {name: p2n1, address: 10.1.0.1, partition: part-2}
  - {name: d2n1, address: 10.20.0.1, datacenter: dc2,
     tagged_addresses: {wan: 198.51.100.21, wan_ipv6: "2001:db8:ffff::21"}}
  - {name: d2n2, address: 10.20.0.2, datacenter: dc2,
     tagged_addresses: {wan: 198.51.100.22, wan_ipv4: 198.51.100.122}}
  - {name: d2n3, address: 10.20.0.3, datacenter: dc2}
  - {name: c2n1, address: 10.102.0.1, peer: cluster-02, tagged_addresses: {wan: 192.0.2.99}}
  # the same address as c2n1: the local node wins the PTR
  - {name: shadow, address: 10.102.0.1}
services:
  - {name: web, node: n1, port: 8080}
  - {name: api, node: n1, address: 10.0.5.5, port: 9090}
  - {name: api6, node: n6, address: "2001:db8::55", port: 9090}
  - {name: api, node: c2n1, address: 10.102.5.5, port: 9090}
  # dc2: web-1 has its own address and service-level WAN addresses (with ports)
  - name: web
    id: web-1
    node: d2n1
    address: 10.20.1.10
    port: 8080
    tagged_addresses:
      wan: {address: 203.0.113.50, port: 18080}
      wan_ipv6: {address: "2001:db8:eeee::50", port: 18081}
  # web-2 and web-3 use their nodes' addresses, so their nodes' WAN addresses
  - {name: web, id: web-2, node: d2n2, port: 8080}
  - {name: web, id: web-3, node: d2n1, port: 8081}
  # web-4 has no WAN address anywhere: it keeps its LAN address
  - {name: web, id: web-4, node: d2n3, port: 8082}
  - {name: web-sidecar-proxy, node: n1, port: 21000, kind: connect-proxy, destination: web}
virtual_ips:
  - {service: web, ip: 240.0.0.10}
  - {service: web, peer: cluster-02, ip: 240.0.0.20}
"""


def _serve(factory: pytest.TempPathFactory, name: str, translate: bool) -> MeshdnsProcess:
    workdir = factory.mktemp(name)
    catalog = write_catalog(workdir / "catalog.yaml", CATALOG)
    return MeshdnsProcess(workdir, catalog, {"dns": {"translate_wan_addrs": translate}})


@pytest.fixture(scope="module")
def wan_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    server = _serve(tmp_path_factory, "wan", True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def lan_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    server = _serve(tmp_path_factory, "lan", False)
    yield server
    server.stop()



def addr_name(ip: str, locality: str = "dc2") -> str:
    return f"{ipaddress.ip_address(ip).packed.hex()}.addr.{locality}.consul."


# --- PTR -----------------------------------------------------------------------------------


def ptr(server: MeshdnsProcess, ip: str, *, tcp: bool = False) -> dns.message.Message:
    return server.query(dns.reversename.from_address(ip).to_text(), "PTR", tcp=tcp)


@pytest.mark.parametrize(("ip", "name"), [
    ("10.0.0.1", "n1.node.dc1.consul."),  # node address
    ("2001:db8::1", "n6.node.dc1.consul."),  # ip6.arpa
    ("10.20.0.1", "d2n1.node.dc2.consul."),  # a WAN-federated datacenter's node
    ("10.1.0.1", "p2n1.node.part-2.ap.dc1.dc.consul."),  # a partition's node
    ("10.102.0.1", "shadow.node.dc1.consul."),  # the local node beats the imported one
    ("10.0.5.5", "api.service.dc1.consul."),  # service address
    ("10.20.1.10", "web.service.dc2.consul."),
    ("2001:db8::55", "api6.service.dc1.consul."),
    ("240.0.0.10", "web.virtual.consul."),  # virtual IP
    ("240.0.0.20", "web.virtual.cluster-02.peer.consul."),  # an imported service's VIP
])
def test_ptr(lan_server: MeshdnsProcess, ip: str, name: str) -> None:
    for tcp in (False, True):
        msg = ptr(lan_server, ip, tcp=tcp)
        assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
        assert [(rrset.rdtype, rrset.ttl, [rr.target.to_text() for rr in rrset])
                for rrset in msg.answer] == [(dns.rdatatype.PTR, 0, [name])]


def test_ptr_of_an_imported_node(tmp_path_factory: pytest.TempPathFactory) -> None:
    # without a local node on the same address, the imported node names its peer
    workdir = tmp_path_factory.mktemp("imported")
    catalog = write_catalog(workdir / "catalog.yaml", CATALOG.replace(
        "  - {name: shadow, address: 10.102.0.1}\n", ""))
    server = MeshdnsProcess(workdir, catalog)
    try:
        msg = ptr(server, "10.102.0.1")
        assert [rr.target.to_text() for rr in msg.answer[0]] == \
            ["c2n1.node.cluster-02.peer.consul."]
        assert msg.answer[0].ttl == 0
        # imported service addresses are not ours to name
        assert ptr(server, "10.102.5.5").rcode() == dns.rcode.NXDOMAIN
    finally:
        server.stop()


def test_ptr_names_resolve_back(lan_server: MeshdnsProcess) -> None:
    for ip in ("10.0.0.1", "10.1.0.1", "10.20.0.1", "10.0.5.5", "240.0.0.10", "240.0.0.20"):
        target = ptr(lan_server, ip).answer[0][0].target.to_text()
        assert ip in addresses(lan_server.query(target)), target


@pytest.mark.parametrize("ip", ["10.9.9.9", "2001:db8::99", "10.102.5.5"])
def test_ptr_unknown_is_nxdomain_with_soa(lan_server: MeshdnsProcess, ip: str) -> None:
    msg = ptr(lan_server, ip)
    assert msg.rcode() == dns.rcode.NXDOMAIN
    assert msg.flags & dns.flags.AA
    assert not msg.answer
    assert [(rrset.name.to_text(), rrset.rdtype) for rrset in msg.authority] == \
        [("consul.", dns.rdatatype.SOA)]


def test_ptr_name_asked_with_another_type_is_nodata(lan_server: MeshdnsProcess) -> None:
    msg = lan_server.query(dns.reversename.from_address("10.0.0.1").to_text(), "A")
    assert msg.rcode() == dns.rcode.NOERROR and not msg.answer
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]


def test_ptr_with_dig_x(lan_server: MeshdnsProcess) -> None:
    assert lan_server.dig("-x", "10.0.0.1", "+short").split() == ["n1.node.dc1.consul."]
    assert lan_server.dig("-x", "2001:db8::1", "+short").split() == ["n6.node.dc1.consul."]


# --- WAN translation -----------------------------------------------------------------------


def test_translated_a_records(wan_server: MeshdnsProcess) -> None:
    for tcp in (False, True):
        msg = wan_server.query("web.service.dc2.consul", "A", tcp=tcp, edns=0)
        assert addresses(msg) == sorted([
            "203.0.113.50",  # web-1: the service's own wan address
            "198.51.100.122",  # web-2: node d2n2's wan_ipv4 beats its wan
            "198.51.100.21",  # web-3: node d2n1's wan
            "10.20.0.3",  # web-4: nothing to translate to
        ])
    assert addresses(wan_server.query("web.service.dc2.dc.consul", edns=0)) == addresses(msg)


def test_translated_aaaa_records(wan_server: MeshdnsProcess) -> None:
    msg = wan_server.query("web.service.dc2.consul", "AAAA")
    assert addresses(msg) == ["2001:db8:eeee::50", "2001:db8:ffff::21"]  # the wan_ipv6 ones


def test_translated_srv(wan_server: MeshdnsProcess) -> None:
    for tcp in (False, True):
        msg = wan_server.query("web.service.dc2.consul", "SRV", tcp=tcp, edns=0)
        assert srv(msg) == sorted([
            (18080, addr_name("203.0.113.50")),  # the service's wan port
            (8080, addr_name("198.51.100.122")),
            (8081, addr_name("198.51.100.21")),
            (8082, "d2n3.node.dc2.consul."),
        ])
        assert glue(msg) == {
            addr_name("203.0.113.50"): ["203.0.113.50"],
            addr_name("198.51.100.122"): ["198.51.100.122"],
            addr_name("198.51.100.21"): ["198.51.100.21"],
            "d2n3.node.dc2.consul.": ["10.20.0.3"],
        }
    # the targets resolve to what the glue says
    assert addresses(wan_server.query(addr_name("203.0.113.50"))) == ["203.0.113.50"]


def test_translated_node_lookup(wan_server: MeshdnsProcess) -> None:
    assert addresses(wan_server.query("d2n1.node.dc2.consul")) == ["198.51.100.21"]
    assert addresses(wan_server.query("d2n1.node.dc2.consul", "AAAA")) == ["2001:db8:ffff::21"]
    assert addresses(wan_server.query("d2n2.node.dc2.consul")) == ["198.51.100.122"]


def test_local_datacenter_and_peers_are_not_translated(wan_server: MeshdnsProcess) -> None:
    assert addresses(wan_server.query("web.service.consul")) == ["10.0.0.1"]
    assert addresses(wan_server.query("web.service.dc1.consul")) == ["10.0.0.1"]
    assert srv(wan_server.query("web.service.consul", "SRV")) == [(8080, "n1.node.dc1.consul.")]
    assert addresses(wan_server.query("n1.node.consul")) == ["10.0.0.1"]
    assert addresses(wan_server.query("api.service.cluster-02.peer.consul")) == ["10.102.5.5"]


def test_without_translation_lan_addresses(lan_server: MeshdnsProcess) -> None:
    assert addresses(lan_server.query("web.service.dc2.consul", edns=0)) == \
        ["10.20.0.1", "10.20.0.2", "10.20.0.3", "10.20.1.10"]
    assert not lan_server.query("web.service.dc2.consul", "AAAA").answer
    assert srv(lan_server.query("web.service.dc2.consul", "SRV", edns=0)) == sorted([
        (8080, addr_name("10.20.1.10")),
        (8080, "d2n2.node.dc2.consul."),
        (8081, "d2n1.node.dc2.consul."),
        (8082, "d2n3.node.dc2.consul."),
    ])
    assert addresses(lan_server.query("d2n1.node.dc2.consul")) == ["10.20.0.1"]
