"""meshdns follows a Consul cluster: change the (fake) Consul's data, see the DNS answers change.

Each test starts a real ``meshdns serve`` whose config has ``catalog.consul`` pointing at the
fake, asks over the wire, changes the fake, and polls until the answer is the new one.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import pytest
import yaml
from consul_e2e import (
    NOERROR,
    NXDOMAIN,
    admin_get,
    answer,
    consul_config,
    converges,
    fake_fixture,  # noqa: F401 - the `fake` fixture
    metric,
    rdata,
    ready,
    start_meshdns,
    wait_until,
)
from fake_consul import FakeConsul


def queried(fake: FakeConsul, path_prefix: str, **params: str) -> bool:
    """Whether meshdns asked ``path_prefix...`` with these query parameters."""
    for r in fake.requests():
        q = dict(r["query"])
        if r["path"].startswith(path_prefix) and all(q.get(k) == v for k, v in params.items()):
            return True
    return False


def test_services_follow_registrations(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "web.service.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    assert answer(server, "v1.web.service.consul") == (NOERROR, ["10.0.1.1"])
    # api has no address of its own: the node's.
    assert answer(server, "api.service.consul") == (NOERROR, ["10.0.0.2"])
    fake.register_service("web", "n2", id="web-3", address="10.0.1.3", port=8080)
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1", "10.0.1.2", "10.0.1.3"]))
    fake.deregister_service("web-1", "n1")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.2", "10.0.1.3"]))
    fake.register_node("n3", "10.0.0.3")
    fake.register_service("cache", "n3", port=6379)
    converges(server, "cache.service.consul", (NOERROR, ["10.0.0.3"]))
    fake.deregister_service("api-1", "n2")
    converges(server, "api.service.consul", (NXDOMAIN, []))
    srv = server.query("_web._tcp.service.consul", "SRV")
    assert [r.split()[2] for r in rdata(srv, "SRV")] == ["8080", "8080"]
    # Every read is stale by default, as Consul's own DNS reads.
    health = [r for r in fake.requests() if r["path"].startswith("/v1/health/")]
    assert health and all("stale" in dict(r["query"]) for r in health)


def test_health_of_services_and_nodes(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    fake.set_service_health("web-1", "n1", "critical")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.2"]))
    fake.set_service_health("web-1", "n1", "warning")  # warning is answered (only_passing off)
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1", "10.0.1.2"]))
    # A critical node check hides every instance on that node.
    fake.set_node_health("n2", "critical")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1"]))
    converges(server, "api.service.consul", (NXDOMAIN, []))
    fake.set_node_health("n2", "passing")
    converges(server, "api.service.consul", (NOERROR, ["10.0.0.2"]))
    # Maintenance mode is a critical check, as the agent writes it.
    fake.set_maintenance("n1", True, service_id="web-1", reason="deploy")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.2"]))
    fake.set_maintenance("n1", False, service_id="web-1")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1", "10.0.1.2"]))


def test_only_passing_excludes_warning(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url, dns={"only_passing": True})
    fake.set_service_health("web-2", "n2", "warning")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1"]))


def test_nodes_follow(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "n1.node.consul") == (NOERROR, ["10.0.0.1"])
    txt = server.query("n1.node.consul", "TXT")
    assert rdata(txt, "TXT") == ['"rack=r1"']
    fake.register_node("n1", "10.0.0.11", meta={"rack": "r2"})
    converges(server, "n1.node.consul", (NOERROR, ["10.0.0.11"]))
    assert wait_until(lambda: rdata(server.query("n1.node.consul", "TXT"), "TXT") ==
                      ['"rack=r2"'])
    fake.register_node("n9", "10.0.0.9")
    converges(server, "n9.node.consul", (NOERROR, ["10.0.0.9"]))
    fake.deregister_node("n9")
    converges(server, "n9.node.consul", (NXDOMAIN, []))


def test_peers_imported_services(start_server, fake: FakeConsul) -> None:
    fake.add_peer("cluster-02", remote_datacenter="dc9")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False)
    fake.register_service("pay", "c02-n1", id="pay-1", peer="cluster-02", port=7070)
    server = start_meshdns(start_server, fake.url)
    converges(server, "pay.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]))
    assert answer(server, "pay.service.consul")[0] == NXDOMAIN  # not a local service
    assert queried(fake, "/v1/health/service/pay", peer="cluster-02")
    fake.register_node("c02-n2", "10.102.0.2", peer="cluster-02", serf=False)
    fake.register_service("pay", "c02-n2", id="pay-2", peer="cluster-02", port=7070)
    converges(server, "pay.service.cluster-02.peer.consul",
              (NOERROR, ["10.102.0.1", "10.102.0.2"]))
    fake.set_service_health("pay-1", "c02-n1", "critical", peer="cluster-02")
    converges(server, "pay.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.2"]))
    # A new imported service of a known peer.
    fake.register_service("ledger", "c02-n2", id="ledger-1", peer="cluster-02")
    converges(server, "ledger.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.2"]))


def test_peer_nodes_follow_imported_services(start_server, fake: FakeConsul) -> None:
    """A peer's nodes are the nodes its imported services run on: their names answer, SRV
    targets naming them resolve (glue included), and a node leaves with its last service."""
    fake.add_peer("cluster-02")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False,
                       meta={"zone": "z1"})
    fake.register_service("pay", "c02-n1", id="pay-1", peer="cluster-02", port=7070)
    server = start_meshdns(start_server, fake.url)
    converges(server, "c02-n1.node.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]))
    srv = server.query("_pay._tcp.service.cluster-02.peer.consul", "SRV")
    assert [r.split()[3] for r in rdata(srv, "SRV")] == ["c02-n1.node.cluster-02.peer.consul."]
    glue = [rr.to_text() for rrset in srv.additional if rrset.rdtype == 1 for rr in rrset]
    assert glue == ["10.102.0.1"]
    assert answer(server, "c02-n1.node.consul")[0] == NXDOMAIN  # not a local node
    ptr = server.query("1.0.102.10.in-addr.arpa", "PTR")
    assert rdata(ptr, "PTR") == ["c02-n1.node.cluster-02.peer.consul."]
    # A second imported service on a new node; the node's address moves with its services.
    fake.register_node("c02-n2", "10.102.0.2", peer="cluster-02", serf=False)
    fake.register_service("ledger", "c02-n2", id="ledger-1", peer="cluster-02")
    converges(server, "c02-n2.node.cluster-02.peer.consul", (NOERROR, ["10.102.0.2"]))
    fake.register_service("pay", "c02-n2", id="pay-2", peer="cluster-02", port=7070)
    fake.register_node("c02-n2", "10.102.0.22", peer="cluster-02", serf=False)
    converges(server, "c02-n2.node.cluster-02.peer.consul", (NOERROR, ["10.102.0.22"]))
    # c02-n2 stays while pay-2 is on it, goes with the last of its services.
    fake.deregister_service("ledger-1", "c02-n2", peer="cluster-02")
    converges(server, "ledger.service.cluster-02.peer.consul", (NXDOMAIN, []))
    assert answer(server, "c02-n2.node.cluster-02.peer.consul") == (NOERROR, ["10.102.0.22"])
    fake.deregister_service("pay-2", "c02-n2", peer="cluster-02")
    converges(server, "c02-n2.node.cluster-02.peer.consul", (NXDOMAIN, []))
    assert answer(server, "c02-n1.node.cluster-02.peer.consul") == (NOERROR, ["10.102.0.1"])


def test_ingress_gateways_follow_config_entries(start_server, fake: FakeConsul) -> None:
    """``<service>.ingress`` answers the gateways whose ingress-gateway config entry exposes
    the service: entries and the gateways' instances are both followed."""
    fake.register_node("g1", "10.0.3.1")
    fake.register_service("edge", "g1", id="edge-1", kind="ingress-gateway", port=8443)
    fake.set_config_entry({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
        {"Port": 8080, "Protocol": "tcp", "Services": [{"Name": "web"}]}]})
    server = start_meshdns(start_server, fake.url)
    converges(server, "web.ingress.consul", (NOERROR, ["10.0.3.1"]))
    srv = server.query("web.ingress.consul", "SRV")
    assert [r.split()[2:] for r in rdata(srv, "SRV")] == [["8443", "g1.node.dc1.consul."]]
    assert answer(server, "api.ingress.consul")[0] == NXDOMAIN
    # A second gateway instance comes; the entry moves to expose api (and web no more).
    fake.register_node("g2", "10.0.3.2")
    fake.register_service("edge", "g2", id="edge-2", kind="ingress-gateway", port=8443)
    converges(server, "web.ingress.consul", (NOERROR, ["10.0.3.1", "10.0.3.2"]))
    fake.set_config_entry({"Kind": "ingress-gateway", "Name": "edge", "Listeners": [
        {"Port": 8080, "Protocol": "tcp", "Services": [{"Name": "api"}]}]})
    converges(server, "api.ingress.consul", (NOERROR, ["10.0.3.1", "10.0.3.2"]))
    converges(server, "web.ingress.consul", (NXDOMAIN, []))
    # The gateways' health counts; the entry deleted, nothing is exposed.
    fake.set_service_health("edge-1", "g1", "critical")
    converges(server, "api.ingress.consul", (NOERROR, ["10.0.3.2"]))
    fake.delete_config_entry("ingress-gateway", "edge")
    converges(server, "api.ingress.consul", (NXDOMAIN, []))
    assert answer(server, "api.service.consul") == (NOERROR, ["10.0.0.2"])


def test_registration_only_change_rereads_without_decoding_the_rest(
        start_server, fake: FakeConsul) -> None:
    """An address change with no check change says nothing about which service changed:
    the scope is re-read, and bodies identical to the applied ones are not decoded."""
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "v1.web.service.consul") == (NOERROR, ["10.0.1.1"])
    unchanged = metric(server, "meshdns_consul_fetches_unchanged_total")
    assert unchanged == 0
    fake.register_service("web", "n1", id="web-1", address="10.0.1.9", port=8080, tags=["v1"])
    converges(server, "v1.web.service.consul", (NOERROR, ["10.0.1.9"]))
    assert answer(server, "web.service.consul") == (NOERROR, ["10.0.1.2", "10.0.1.9"])
    # api was re-read too (nothing names the changed service) but not decoded
    assert wait_until(lambda: (metric(server, "meshdns_consul_fetches_unchanged_total")
                               or 0) >= 1)
    assert answer(server, "api.service.consul") == (NOERROR, ["10.0.0.2"])


def test_federated_datacenters(start_server, fake: FakeConsul) -> None:
    fake.add_datacenter("dc2")
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    fake.register_service("web", "m1", id="web-dc2", dc="dc2")
    server = start_meshdns(start_server, fake.url)
    converges(server, "web.service.dc2.dc.consul", (NOERROR, ["10.2.0.1"]))
    assert answer(server, "web.service.dc2.consul") == (NOERROR, ["10.2.0.1"])
    assert answer(server, "web.service.dc1.dc.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    assert queried(fake, "/v1/health/service/web", dc="dc2")
    fake.register_node("m2", "10.2.0.2", dc="dc2")
    fake.register_service("web", "m2", id="web-dc2b", dc="dc2")
    converges(server, "web.service.dc2.dc.consul", (NOERROR, ["10.2.0.1", "10.2.0.2"]))
    converges(server, "m2.node.dc2.dc.consul", (NOERROR, ["10.2.0.2"]))
    assert answer(server, "web.service.nowhere.dc.consul")[0] == NXDOMAIN


def test_partitions_and_namespaces(start_server, fake: FakeConsul) -> None:
    fake.add_partition("part-2")
    fake.add_namespace("team-a", partition="part-2")
    fake.add_namespace("team-b")
    fake.register_node("p2-n1", "10.3.0.1", partition="part-2")
    fake.register_service("web", "p2-n1", id="web-p2", partition="part-2", namespace="team-a")
    fake.register_service("web", "n1", id="web-b", namespace="team-b", address="10.0.9.1")
    server = start_meshdns(start_server, fake.url, partitions=["*"], namespaces=["*"])
    converges(server, "web.service.team-a.ns.part-2.ap.consul", (NOERROR, ["10.3.0.1"]))
    converges(server, "web.service.team-b.ns.consul", (NOERROR, ["10.0.9.1"]))
    assert answer(server, "web.service.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    assert answer(server, "web.service.part-2.ap.consul")[0] == NXDOMAIN  # default ns there
    assert queried(fake, "/v1/health/service/web", partition="part-2", ns="team-a")
    fake.register_service("web", "p2-n1", id="web-p2", partition="part-2", namespace="team-a",
                          address="10.3.1.1")
    converges(server, "web.service.team-a.ns.part-2.ap.consul", (NOERROR, ["10.3.1.1"]))
    converges(server, "p2-n1.node.part-2.ap.consul", (NOERROR, ["10.3.0.1"]))


def test_only_the_configured_partitions_and_namespaces(start_server, fake: FakeConsul) -> None:
    fake.add_namespace("team-b")
    fake.register_service("web", "n1", id="web-b", namespace="team-b", address="10.0.9.1")
    server = start_meshdns(start_server, fake.url)  # default: ["default"] / ["default"]
    assert answer(server, "web.service.team-b.ns.consul")[0] == NXDOMAIN
    assert not queried(fake, "/v1/health/service/web", ns="team-b")


def test_virtual_ips_come_from_consul(start_server, fake: FakeConsul) -> None:
    fake.add_sidecar("web-1", "n1")
    fake.add_sidecar("web-2", "n2")
    fake.add_peer("cluster-02")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False)
    fake.register_service("web", "c02-n1", id="web-c", peer="cluster-02")
    fake.add_sidecar("web-c", "c02-n1", peer="cluster-02")
    local_vip = fake.virtual_ip("web")
    peer_vip = fake.virtual_ip("web", peer="cluster-02")
    assert local_vip and peer_vip and local_vip != peer_vip
    server = start_meshdns(start_server, fake.url)
    converges(server, "web.virtual.consul", (NOERROR, [local_vip]))
    converges(server, "web.virtual.cluster-02.peer.consul", (NOERROR, [peer_vip]))
    # The sidecars are the mesh-capable instances.
    assert answer(server, "web.connect.consul") == (NOERROR, ["10.0.0.1", "10.0.0.2"])
    # Consul moves the address (a manual VIP): meshdns follows, it does not keep its own.
    for sid, node in (("web-1-sidecar-proxy", "n1"), ("web-2-sidecar-proxy", "n2")):
        fake.set_tagged_address(sid, node, "consul-virtual", "240.0.9.9", 21000)
    converges(server, "web.virtual.consul", (NOERROR, ["240.0.9.9"]))
    ptr = server.query("9.9.0.240.in-addr.arpa", "PTR")
    assert any("web" in r for r in rdata(ptr, "PTR")), ptr


def test_a_mesh_service_without_a_consul_virtual_ip_has_none(start_server,
                                                             fake: FakeConsul) -> None:
    """Transparent proxies match traffic by Consul's VIPs: meshdns must never invent one."""
    fake.state.auto_virtual_ips = False  # a Consul that has not allocated one (yet)
    fake.add_sidecar("web-1", "n1")
    fake.register_node("n3", "10.0.0.3")
    fake.register_service("native", "n3", native=True)
    server = start_meshdns(start_server, fake.url)
    converges(server, "web.connect.consul", (NOERROR, ["10.0.0.1"]))
    assert answer(server, "web.virtual.consul")[0] == NXDOMAIN
    assert answer(server, "native.virtual.consul")[0] == NXDOMAIN
    fake.set_tagged_address("web-1-sidecar-proxy", "n1", "consul-virtual", "240.0.0.42", 21000)
    converges(server, "web.virtual.consul", (NOERROR, ["240.0.0.42"]))
    fake.set_tagged_address("native", "n3", "consul-virtual", "240.0.0.43", 0)
    converges(server, "native.virtual.consul", (NOERROR, ["240.0.0.43"]))
    fake.set_tagged_address("web-1-sidecar-proxy", "n1", "consul-virtual", None)
    converges(server, "web.virtual.consul", (NXDOMAIN, []))


def _peer_with_web(fake: FakeConsul) -> None:
    fake.add_peer("cluster-02")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False)
    fake.register_service("web", "c02-n1", id="web-c", peer="cluster-02", port=8080)


def test_service_resolver_failover(start_server, fake: FakeConsul) -> None:
    _peer_with_web(fake)
    fake.add_datacenter("dc2")
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    fake.register_service("api", "m1", id="api-dc2", dc="dc2")
    server = start_meshdns(start_server, fake.url)
    for sid, node in (("web-1", "n1"), ("web-2", "n2")):
        fake.set_service_health(sid, node, "critical")
    fake.set_service_health("api-1", "n2", "critical")
    converges(server, "web.service.consul", (NXDOMAIN, []))
    fake.set_config_entry({"Kind": "service-resolver", "Name": "web",
                           "Failover": {"*": {"Targets": [{"Peer": "cluster-02"}]}}})
    converges(server, "web.service.consul", (NOERROR, ["10.102.0.1"]))
    fake.set_config_entry({"Kind": "service-resolver", "Name": "api",
                           "Failover": {"*": {"Datacenters": ["dc2"]}}})
    converges(server, "api.service.consul", (NOERROR, ["10.2.0.1"]))
    # Back home once healthy again; the entry removed, no more failover.
    fake.set_service_health("web-1", "n1", "passing")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1"]))
    fake.set_service_health("web-1", "n1", "critical")
    fake.delete_config_entry("service-resolver", "web")
    converges(server, "web.service.consul", (NXDOMAIN, []))


def test_sameness_group_failover(start_server, fake: FakeConsul) -> None:
    _peer_with_web(fake)
    server = start_meshdns(start_server, fake.url)
    fake.set_config_entry({"Kind": "sameness-group", "Name": "g1", "DefaultForFailover": True,
                           "IncludeLocal": True,
                           "Members": [{"Partition": "default"}, {"Peer": "cluster-02"}]})
    for sid, node in (("web-1", "n1"), ("web-2", "n2")):
        fake.set_service_health(sid, node, "critical")
    converges(server, "web.service.consul", (NOERROR, ["10.102.0.1"]))
    fake.set_config_entry({"Kind": "sameness-group", "Name": "g1", "DefaultForFailover": False,
                           "Members": [{"Partition": "default"}, {"Peer": "cluster-02"}]})
    converges(server, "web.service.consul", (NXDOMAIN, []))
    # Asked through the group, its members are tried in order.
    converges(server, "web.service.g1.sg.consul", (NOERROR, ["10.102.0.1"]))


def test_prepared_queries_run_in_consul(start_server, fake: FakeConsul) -> None:
    fake.add_datacenter("dc2")
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    fake.register_service("web", "m1", id="web-dc2", dc="dc2", address="10.2.1.1")
    fake.add_prepared_query("web-v1", "web", tags=["v1"], ttl="10s")
    fake.add_prepared_query("web-fo", "web", ttl="1s", failover={"Datacenters": ["dc2"]})
    fake.add_prepared_query("web-remote", "web", ttl="1s", dc="dc2")
    server = start_meshdns(start_server, fake.url)
    reply = server.query("web-v1.query.consul", "A")
    assert sorted(r.address for rrset in reply.answer for r in rrset) == ["10.0.1.1"]
    assert {rrset.ttl for rrset in reply.answer} == {10}  # DNS.TTL of the query
    assert queried(fake, "/v1/query/web-v1/execute")
    converges(server, "web-fo.query.consul", (NOERROR, ["10.0.1.1", "10.0.1.2"]))
    # Consul's failover, executed by Consul: everything local is critical -> dc2.
    for sid, node in (("web-1", "n1"), ("web-2", "n2")):
        fake.set_service_health(sid, node, "critical")
    converges(server, "web-fo.query.consul", (NOERROR, ["10.2.1.1"]))
    # .query.<dc> executes in that datacenter.
    converges(server, "web-remote.query.dc2.consul", (NOERROR, ["10.2.1.1"]))
    assert queried(fake, "/v1/query/web-remote/execute", dc="dc2")
    assert answer(server, "no-such-query.query.consul")[0] == NXDOMAIN


def test_prepared_query_results_are_held_for_their_ttl(start_server, fake: FakeConsul) -> None:
    fake.add_prepared_query("web-long", "web", ttl="10m")
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "web-long.query.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    executed = sum(1 for r in fake.requests() if r["path"] == "/v1/query/web-long/execute")
    for _ in range(20):
        server.query("web-long.query.consul", "A")
    after = sum(1 for r in fake.requests() if r["path"] == "/v1/query/web-long/execute")
    assert after == executed, "a held result must not be executed again within its TTL"


def test_unix_socket_address(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.unix_url)
    assert answer(server, "web.service.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    fake.set_service_health("web-2", "n2", "critical")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1"]))
    transports = {r["transport"] for r in fake.requests() if r["path"].startswith("/v1/")}
    assert transports == {"unix"}


def test_token_file_is_reread_when_it_changes(start_server, fake: FakeConsul,
                                              tmp_path: Path) -> None:
    policy = {"node_prefix": {"": {"policy": "read"}}, "service_prefix": {"": {"policy": "read"}},
              "agent_prefix": {"": {"policy": "read"}}}
    fake.enable_acls()
    fake.add_token("secret-one", policy)
    token_file = tmp_path / "token"
    token_file.write_text("secret-one\n")
    server = start_meshdns(start_server, fake.url, token_file=str(token_file))
    assert answer(server, "web.service.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    sent = {r["headers"].get("x-consul-token") or r["headers"].get("authorization")
            for r in fake.requests() if r["path"].startswith("/v1/health/")}
    assert sent in ({"secret-one"}, {"Bearer secret-one"})
    # Rotation, as a Kubernetes Secret update does it: the new token first, the old one revoked.
    fake.add_token("secret-two", policy)
    token_file.write_text("secret-two\n")
    fake.delete_token("secret-one")
    t0 = max(r["start"] for r in fake.requests())
    fake.set_service_health("web-2", "n2", "critical")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1"]))
    later = [r for r in fake.requests() if r["start"] > t0 and r["path"].startswith("/v1/")]
    assert later and all("secret-two" in (r["headers"].get("x-consul-token", "") +
                                          r["headers"].get("authorization", ""))
                         for r in later if r["status"] == 200)


def test_a_token_is_a_header_never_a_url_parameter(start_server, fake: FakeConsul) -> None:
    fake.enable_acls()
    fake.add_token("s3cret", {"node_prefix": {"": {"policy": "read"}},
                              "service_prefix": {"": {"policy": "read"}},
                              "agent_prefix": {"": {"policy": "read"}}})
    server = start_meshdns(start_server, fake.url, token="s3cret", datacenter="dc1")
    assert answer(server, "web.service.consul") == (NOERROR, ["10.0.1.1", "10.0.1.2"])
    urls = [r["path"] + "?" + urlencode(r["query"]) for r in fake.requests()]
    assert not [u for u in urls if "s3cret" in u]
    assert all(not parse_qs(u.partition("?")[2]).get("token") for u in urls)
    assert "s3cret" not in server.log_path.read_text()


def test_two_replicas_give_the_same_answers_and_converge(start_server,
                                                        fake: FakeConsul) -> None:
    fake.add_sidecar("web-1", "n1")
    fake.add_sidecar("api-1", "n2")
    fake.add_peer("cluster-02")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False)
    fake.register_service("pay", "c02-n1", id="pay-1", peer="cluster-02")
    fake.add_sidecar("pay-1", "c02-n1", peer="cluster-02")
    names = ["web.service.consul", "api.service.consul", "web.virtual.consul",
             "api.virtual.consul", "pay.virtual.cluster-02.peer.consul",
             "pay.service.cluster-02.peer.consul", "n1.node.consul", "db.virtual.consul"]
    one = start_meshdns(start_server, fake.url)
    two = start_meshdns(start_server, fake.url)

    def same() -> bool:
        return [answer(one, n) for n in names] == [answer(two, n) for n in names]

    assert wait_until(same), [(n, answer(one, n), answer(two, n)) for n in names]
    assert answer(one, "web.virtual.consul") == (NOERROR, [fake.virtual_ip("web")])
    # A change: a new mesh service (a new VIP) and a health change; both replicas follow.
    fake.register_node("n3", "10.0.0.3")
    fake.register_service("db", "n3", id="db-1", port=5432)
    fake.add_sidecar("db-1", "n3")
    fake.set_service_health("web-1", "n1", "critical")
    vip = fake.virtual_ip("db")
    for server in (one, two):
        converges(server, "db.virtual.consul", (NOERROR, [vip]))
        converges(server, "web.service.consul", (NOERROR, ["10.0.1.2"]))
    assert wait_until(same)


@pytest.mark.parametrize("address", ["http", "unix"])
def test_check_in_consul_mode_prints_what_the_token_sees(tmp_path: Path, fake: FakeConsul,
                                                         address: str) -> None:
    fake.add_peer("cluster-02")
    url = fake.url if address == "http" else fake.unix_url
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(consul_config(url)))
    done = subprocess.run([sys.executable, "-m", "meshdns", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    for word in ("dc1", "default", "cluster-02"):
        assert word in done.stdout, done.stdout
    fake.stop_listener()
    done = subprocess.run([sys.executable, "-m", "meshdns", "check", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr


# -- the health watch follows only the checks that are not passing ------------------------------

NOT_PASSING = 'Status != "passing"'


def health_state_requests(fake: FakeConsul) -> list[dict]:
    return [r for r in fake.requests() if r["path"].startswith("/v1/health/state/")]


def test_health_watch_follows_only_the_checks_not_passing(start_server,
                                                          fake: FakeConsul) -> None:
    """Each scope's health watch asks Consul for the checks that are not passing; a check
    that goes back to passing leaves that set, and that is seen too."""
    server = start_meshdns(start_server, fake.url)
    fake.set_service_health("web-1", "n1", "critical")
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.2"]))
    fake.set_service_health("web-1", "n1", "passing")  # critical -> passing: leaves the set
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1", "10.0.1.2"]))
    # A node check entering and leaving the set changes every service on that node.
    fake.set_check("n2", "disk", "critical", name="Disk")
    converges(server, "api.service.consul", (NXDOMAIN, []))
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1"]))
    fake.set_check("n2", "disk", "passing")
    converges(server, "api.service.consul", (NOERROR, ["10.0.0.2"]))
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.1", "10.0.1.2"]))
    state = health_state_requests(fake)
    assert state and all(r["path"] == "/v1/health/state/any" and
                         dict(r["query"]).get("filter") == NOT_PASSING for r in state)
    assert all(r["status"] == 200 for r in state if r["end"] is not None)  # not held ones


def test_federated_scopes_follow_filtered_checks_and_peers_do_not(start_server,
                                                                  fake: FakeConsul) -> None:
    """A federated datacenter's checks are followed as the local ones (``dc=``). Consul's
    /v1/health/state has no ``peer`` parameter (it would answer the local checks), so no
    such watch is asked for a peer: its imported services' health comes through
    /v1/health/service/<s>?peer= (see test_imported_services_health_is_followed_per_service)."""
    fake.add_datacenter("dc2")
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    fake.register_service("web", "m1", id="web-dc2", dc="dc2", port=80)
    _peer_with_web(fake)
    server = start_meshdns(start_server, fake.url, datacenters=["dc2"], peers=["cluster-02"])
    converges(server, "web.service.dc2.consul", (NOERROR, ["10.2.0.1"]))
    converges(server, "web.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]))
    fake.set_node_health("m1", "critical", dc="dc2")
    converges(server, "web.service.dc2.consul", (NXDOMAIN, []))
    fake.set_node_health("m1", "passing", dc="dc2")
    converges(server, "web.service.dc2.consul", (NOERROR, ["10.2.0.1"]))
    fake.set_service_health("web-c", "c02-n1", "critical", peer="cluster-02")
    converges(server, "web.service.cluster-02.peer.consul", (NXDOMAIN, []))
    fake.set_service_health("web-c", "c02-n1", "passing", peer="cluster-02")
    converges(server, "web.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]))
    queries = [dict(r["query"]) for r in health_state_requests(fake)]
    scopes = {(q.get("dc", ""), q.get("peer", "")) for q in queries
              if q.get("filter") == NOT_PASSING}
    assert {("", ""), ("dc2", "")} <= scopes
    assert not [q for q in queries if "peer" in q]


def _blocking_reads(fake: FakeConsul, path: str, **params: str) -> list[dict[str, Any]]:
    return [r for r in fake.requests() if r["path"] == path and "index" in dict(r["query"])
            and all(dict(r["query"]).get(k) == v for k, v in params.items())]


def test_imported_services_health_is_followed_per_service(start_server,
                                                          fake: FakeConsul) -> None:
    """An imported service that is asked (its answers are cached) gets a blocking watch of
    its own on /v1/health/service/<s>?peer=; one that is not is re-read by the sweep, so its
    first answer after a change is already the new one."""
    _peer_with_web(fake)
    fake.register_service("ledger", "c02-n1", id="ledger-1", peer="cluster-02")
    server = start_meshdns(start_server, fake.url, peers=["cluster-02"])
    converges(server, "web.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]))
    assert wait_until(lambda: bool(_blocking_reads(fake, "/v1/health/service/web",
                                                   peer="cluster-02")))
    assert not _blocking_reads(fake, "/v1/health/service/ledger", peer="cluster-02")

    def shown() -> list[str]:  # /v1/catalog's view is refreshed every second
        return json.loads(admin_get(server, "/v1/catalog")[1])["state"]["detail"][
            "imported_followed"]

    assert wait_until(lambda: shown() == ["web (peer cluster-02, partition default, "
                                          "namespace default)"]), shown()
    assert metric(server, "meshdns_consul_imported_watches") == 1
    fake.set_service_health("web-c", "c02-n1", "critical", peer="cluster-02")
    converges(server, "web.service.cluster-02.peer.consul", (NXDOMAIN, []))
    fake.set_service_health("web-c", "c02-n1", "passing", peer="cluster-02")
    converges(server, "web.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]))

    # Never asked: no watch of its own. After the change, the sweep re-reads it, and the
    # first answer (nothing cached) is the new one.
    fake.set_service_health("ledger-1", "c02-n1", "critical", peer="cluster-02")
    fake.reset_log()  # from here on, every read of ledger sees the change
    assert wait_until(lambda: any(
        r["path"] == "/v1/health/service/ledger" and r["end"] is not None
        and dict(r["query"]).get("peer") == "cluster-02" for r in fake.requests())), (
        "the sweep never re-read an imported service that is not asked")
    time.sleep(0.5)  # the read is applied within a flush
    assert answer(server, "ledger.service.cluster-02.peer.consul") == (NXDOMAIN, [])
    assert (metric(server, "meshdns_consul_imported_sweep_reads_total") or 0) > 0


def test_checks_are_read_before_the_services_first_fetch(start_server,
                                                         fake: FakeConsul) -> None:
    """The first read of a scope's checks is the base later ones are compared with, so it
    must come before the services are first fetched: a check that changes in between would
    otherwise be in the base already, and never seen. Here the first checks read is held
    while web-1 turns critical."""
    fake.add_fault(r"^/v1/health/state/", "delay", delay=2.0, times=1)
    server = start_meshdns(start_server, fake.url, wait_ready=False)
    assert wait_until(lambda: bool(health_state_requests(fake)), 15)
    time.sleep(0.5)  # what does not wait for the checks has been fetched by now
    fake.set_service_health("web-1", "n1", "critical")
    assert wait_until(lambda: ready(server) == 200, 30)
    converges(server, "web.service.consul", (NOERROR, ["10.0.1.2"]))
    first_state = min(r["start"] for r in health_state_requests(fake))
    first_fetch = min(r["start"] for r in fake.requests()
                      if r["path"].startswith("/v1/health/service/"))
    assert first_fetch > first_state + 1.5


def test_a_change_costs_what_is_unhealthy_not_the_catalog(start_server,
                                                          fake: FakeConsul) -> None:
    """Requests and bytes per check change, in the fake's own counters: a change wakes each
    scope's health watch once, and its reply holds the checks not passing, not all of them."""
    calls: list = [["register_node", [f"bulk-{n}", f"10.9.0.{n}"], {}] for n in range(30)]
    calls += [["register_service", [f"bulk-{i}", f"bulk-{i % 30}"], {"port": 80}]
              for i in range(300)]
    fake.batch(calls)
    server = start_meshdns(start_server, fake.url)
    converges(server, "bulk-299.service.consul", (NOERROR, ["10.9.0.29"]))
    with urllib.request.urlopen(fake.url + "/v1/health/state/any", timeout=10) as resp:
        whole = len(resp.read())  # what one wake-up of the scope's watch used to carry
    fake.reset_log()
    changes = 10
    for i in range(changes):
        fake.set_service_health(f"bulk-{i}", f"bulk-{i % 30}", "critical")
        converges(server, f"bulk-{i}.service.consul", (NXDOMAIN, []))
    log = fake.requests()
    state = [r for r in log if r["path"].startswith("/v1/health/state/")]
    fetches = [r for r in log if r["path"].startswith("/v1/health/service/")]
    assert len(fetches) >= changes  # each changed service was re-read
    assert len(state) <= 2 * changes  # one wake-up per change (one scope), some slack
    assert len(log) <= 5 * changes
    # at most `changes` checks are not passing, so each reply is at most that many checks
    assert sum(r["bytes"] for r in state) <= changes * whole / 20
    assert sum(r["bytes"] for r in log) <= changes * whole / 10
