"""Failover instance sets, sameness groups and prepared queries, asked over the wire.

Each catalog here is written by the test and served by a real ``meshdns serve``. Failover
answers must come from the first locality with healthy instances, and their SRV targets and
additional records must name that locality, so that a client following the target reaches the
instances that were answered.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from conftest import MeshdnsProcess, addresses, glue, srv, wait_for, write_catalog

FAILOVER_CATALOG = """\
nodes:
  - {name: n1, address: 10.0.0.1}
  - {name: n2, address: 10.0.0.2}
  - {name: p2n1, address: 10.1.0.1, partition: part-2}
  - {name: p3n1, address: 10.3.0.1, partition: part-3}
  - {name: d2n1, address: 10.20.0.1, datacenter: dc2}
  - {name: d2n2, address: 10.20.0.2, datacenter: dc2}
  - {name: c2n1, address: 10.102.0.1, peer: cluster-02}
  - {name: c2p2, address: 10.102.2.1, peer: cluster-02, partition: part-2}
  - {name: c3n1, address: 10.103.0.1, peer: cluster-03}
services:
  # pay: local critical -> peer cluster-02 (dc2 is the second target, never reached)
  - {name: pay, node: n1, port: 7070, health: critical}
  - {name: pay, node: c2n1, port: 7071}
  - {name: pay, node: d2n1, port: 7072}
  # inv: local critical, cluster-03 critical -> datacenter dc2
  - {name: inv, node: n1, port: 8000, health: critical}
  - {name: inv, node: c3n1, port: 8000, health: critical}
  - {name: inv, id: inv-1, node: d2n1, address: 10.20.1.5, port: 8001}
  - {name: inv, id: inv-2, node: d2n2, port: 8001}
  # acct: local in maintenance -> partition part-2
  - {name: acct, node: n2, port: 9000, health: maintenance}
  - {name: acct, node: p2n1, port: 9001}
  # web: healthy locally; its proxies are critical, so web.connect fails over to cluster-02
  - {name: web, node: n1, port: 80}
  - {name: web-sidecar-proxy, node: n1, port: 21000, kind: connect-proxy, destination: web,
     health: critical}
  - {name: web-sidecar-proxy, node: c2n1, port: 21001, kind: connect-proxy, destination: web}
  # search, cache, late: no healthy local instance and no (useful) failover of their own, so
  # the default sameness group `mesh` applies: default -> part-3 -> part-2 -> cluster-02
  - {name: search, node: n1, port: 9200, health: critical}
  - {name: search, node: c2n1, port: 9201}
  - {name: cache, node: n2, port: 6379, health: critical}
  - {name: cache, node: p2n1, port: 6380}
  - {name: cache, node: c2n1, port: 6381}
  - {name: late, node: n1, port: 1, health: critical}
  - {name: late, node: p2n1, port: 2}
  # both: healthy everywhere; for the explicit sameness-group lookups
  - {name: both, node: n1, port: 1}
  - {name: both, node: p2n1, port: 2}
  - {name: both, node: c2n1, port: 3}
  # gone: critical wherever it exists
  - {name: gone, node: n1, port: 1, health: critical}
  - {name: gone, node: c2n1, port: 1, health: critical}
  - {name: gone, node: p2n1, port: 1, health: critical}
  # p2pay: partition part-2 fails over to cluster-02 as imported into part-2
  - {name: p2pay, node: p2n1, port: 1, health: critical}
  - {name: p2pay, node: c2p2, peer: cluster-02, partition: part-2, port: 2}
  - {name: p2pay, node: c2n1, port: 3}
  # own: the peer's instance has an address of its own
  - {name: own, node: n1, port: 1, health: critical}
  - {name: own, node: c2n1, address: 10.102.9.9, port: 2}
failover:
  - service: pay
    targets: [{peer: cluster-02}, {datacenter: dc2}]
  - service: inv
    targets: [{peer: cluster-03}, {datacenter: dc2}]
  - service: acct
    targets: [{partition: part-2}]
  - service: web
    targets: [{peer: cluster-02}]
  - service: late
    targets: [{datacenter: dc2}]
  - service: gone
    targets: [{peer: cluster-02}, {datacenter: dc2}]
  - service: p2pay
    partition: part-2
    targets: [{peer: cluster-02}]
  - service: own
    targets: [{peer: cluster-02}]
sameness_groups:
  - name: mesh
    default_for_failover: true
    members: [{partition: default}, {partition: part-3}, {partition: part-2}, {peer: cluster-02}]
  - name: east
    members: [{partition: part-2}, {peer: cluster-02}]
  - name: east-local
    include_local: true
    members: [{partition: part-2}, {peer: cluster-02}]
"""

QUERIES_CATALOG = """\
nodes:
  - {name: n1, address: 10.0.0.1}
  - {name: n2, address: 10.0.0.2}
  - {name: n3, address: 10.0.0.3}
  - {name: d2n1, address: 10.20.0.1, datacenter: dc2}
  - {name: d2n2, address: 10.20.0.2, datacenter: dc2}
  - {name: d3n1, address: 10.30.0.1, datacenter: dc3}
  - {name: d4n1, address: 10.40.0.1, datacenter: dc4}
  - {name: c2n1, address: 10.102.0.1, peer: cluster-02}
services:
  - {name: web, id: w1, node: n1, port: 80, tags: [v1]}
  - {name: web, id: w2, node: n2, port: 80, tags: [v1], health: warning}
  - {name: web, id: w3, node: n3, port: 80, tags: [v2]}
  - {name: web, node: d2n1, port: 80, tags: [v1]}
  - {name: api, node: d2n1, port: 90}
  - {name: api, node: d3n1, port: 90}
  - {name: api, node: d4n1, port: 90}
  - {name: db, node: d2n2, port: 5432}
  - {name: db, node: d3n1, port: 5432, health: critical}
  - {name: batch, node: d4n1, port: 1}
  - {name: pay, node: n1, port: 7070, health: warning}
  - {name: pay, node: c2n1, port: 7071}
  - {name: pay, node: d2n1, port: 7072}
prepared_queries:
  - {name: web-v1, service: web, tags: [v1], ttl: 10s}
  - {name: web-v1-passing, service: web, tags: [v1], only_passing: true}
  - {name: web-not-v2, service: web, tags: ["!v2"], ttl: 3s}
  - {name: web-near1, service: web, tags: [v1], failover: {nearest_n: 1}}
  - {name: api-near1, service: api, failover: {nearest_n: 1}}
  - {name: db-near1, service: db, failover: {nearest_n: 1}}
  - {name: db-near2, service: db, failover: {nearest_n: 2}}
  - {name: db-then-dcs, service: db, failover: {nearest_n: 1, datacenters: [dc2]}}
  - {name: api-dcs, service: api, failover: {datacenters: [dc9, dc4, dc2]}}
  - {name: batch-near2, service: batch, failover: {nearest_n: 2}}
  - {name: batch-near3, service: batch, failover: {nearest_n: 3}}
  - name: pay-targets
    service: pay
    only_passing: true
    failover: {targets: [{peer: cluster-02}, {datacenter: dc2}]}
  - name: pay-dc2
    service: pay
    only_passing: true
    failover: {targets: [{peer: cluster-03}, {datacenter: dc2}, {peer: cluster-02}]}
  - name: pay-order
    service: pay
    only_passing: true
    ttl: 0s
    failover: {nearest_n: 1, datacenters: [dc3], targets: [{datacenter: dc2}, {peer: cluster-02}]}
# dc1-dc3 is the nearest pair; dc4 has no RTT at all (it sorts last); the table is symmetric.
datacenter_rtt:
  dc1: {dc2: 40ms, dc3: 10ms}
  dc2: {dc3: 20ms}
"""


def _serve(factory: pytest.TempPathFactory, name: str, text: str,
           config: dict | None = None) -> MeshdnsProcess:
    workdir = factory.mktemp(name)
    return MeshdnsProcess(workdir, write_catalog(workdir / "catalog.yaml", text), config)


@pytest.fixture(scope="module")
def failover_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    server = _serve(tmp_path_factory, "failover", FAILOVER_CATALOG)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def query_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshdnsProcess]:
    config = {"dns": {"service_ttl": {"web": "5s", "*": "1s"}}}
    server = _serve(tmp_path_factory, "queries", QUERIES_CATALOG, config)
    yield server
    server.stop()


# --- helpers -------------------------------------------------------------------------------



def answer_ttls(msg: dns.message.Message) -> set[int]:
    return {rrset.ttl for rrset in msg.answer}


def assert_nxdomain(msg: dns.message.Message) -> None:
    assert msg.rcode() == dns.rcode.NXDOMAIN, msg
    assert msg.flags & dns.flags.AA
    assert not msg.answer
    assert [rrset.rdtype for rrset in msg.authority] == [dns.rdatatype.SOA]
    assert msg.authority[0].name.to_text() == "consul."


def ask_both(server: MeshdnsProcess, name: str, rdtype: str = "A"
             ) -> Iterator[dns.message.Message]:
    """The same question over UDP and over TCP."""
    for tcp in (False, True):
        yield server.query(name, rdtype, tcp=tcp)


# --- failover targets ----------------------------------------------------------------------


def test_local_to_peer(failover_server: MeshdnsProcess) -> None:
    for msg in ask_both(failover_server, "pay.service.consul", "SRV"):
        assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
        assert srv(msg) == [(7071, "c2n1.node.cluster-02.peer.consul.")]
        assert glue(msg) == {"c2n1.node.cluster-02.peer.consul.": ["10.102.0.1"]}
    for msg in ask_both(failover_server, "pay.service.consul"):
        assert addresses(msg) == ["10.102.0.1"]


def test_local_to_other_datacenter(failover_server: MeshdnsProcess) -> None:
    # cluster-03 is the first target but only has a critical instance: dc2 answers
    for msg in ask_both(failover_server, "inv.service.consul", "SRV"):
        assert srv(msg) == [(8001, "0a140105.addr.dc2.consul."),
                            (8001, "d2n2.node.dc2.consul.")]
        assert glue(msg) == {"0a140105.addr.dc2.consul.": ["10.20.1.5"],
                             "d2n2.node.dc2.consul.": ["10.20.0.2"]}
    assert addresses(failover_server.query("inv.service.consul")) == ["10.20.0.2", "10.20.1.5"]


def test_local_to_other_partition(failover_server: MeshdnsProcess) -> None:
    msg = failover_server.query("acct.service.consul", "SRV")
    assert srv(msg) == [(9001, "p2n1.node.part-2.ap.dc1.dc.consul.")]
    assert glue(msg) == {"p2n1.node.part-2.ap.dc1.dc.consul.": ["10.1.0.1"]}
    assert addresses(failover_server.query("acct.service.consul")) == ["10.1.0.1"]


def test_peer_instance_with_its_own_address(failover_server: MeshdnsProcess) -> None:
    msg = failover_server.query("own.service.consul", "SRV")
    assert srv(msg) == [(2, "0a660909.addr.cluster-02.peer.consul.")]
    assert glue(msg) == {"0a660909.addr.cluster-02.peer.consul.": ["10.102.9.9"]}


def test_srv_targets_resolve_to_their_glue(failover_server: MeshdnsProcess) -> None:
    """A client that follows a failover SRV target reaches the instance that was answered."""
    for name in ("pay", "inv", "acct", "search", "cache", "own"):
        msg = failover_server.query(f"{name}.service.consul", "SRV")
        for target, expected in glue(msg).items():
            assert addresses(failover_server.query(target)) == expected, target


def test_connect_lookup_fails_over(failover_server: MeshdnsProcess) -> None:
    for msg in ask_both(failover_server, "web.connect.consul", "SRV"):
        assert srv(msg) == [(21001, "c2n1.node.cluster-02.peer.consul.")]
        assert glue(msg) == {"c2n1.node.cluster-02.peer.consul.": ["10.102.0.1"]}
    assert addresses(failover_server.query("web.connect.consul")) == ["10.102.0.1"]
    # the service itself is healthy locally and does not move
    assert addresses(failover_server.query("web.service.consul")) == ["10.0.0.1"]


def test_failover_keeps_the_tag_filter(failover_server: MeshdnsProcess) -> None:
    assert_nxdomain(failover_server.query("v9.pay.service.consul"))


def test_peer_target_from_a_partition_uses_that_partitions_import(
        failover_server: MeshdnsProcess) -> None:
    # as `p2pay.service.part-2.ap.cluster-02.peer.consul` would answer, not cluster-02's
    # import into partition default (port 3)
    msg = failover_server.query("p2pay.service.part-2.ap.consul", "SRV")
    assert srv(msg) == [(2, "c2p2.node.part-2.ap.cluster-02.peer.consul.")]
    direct = failover_server.query("p2pay.service.part-2.ap.cluster-02.peer.consul", "SRV")
    assert srv(direct) == srv(msg)


def test_explicit_datacenter_lookup_is_not_rescued_by_the_sameness_group(
        failover_server: MeshdnsProcess) -> None:
    # the sameness group applies to plain lookups only; dc2 has no search at all
    assert_nxdomain(failover_server.query("search.service.dc2.consul"))


# --- sameness groups -----------------------------------------------------------------------


def test_default_sameness_group_members_in_order(failover_server: MeshdnsProcess) -> None:
    # default (empty, not tried twice) -> part-3 (no cache) -> part-2 answers; cluster-02 not
    for msg in ask_both(failover_server, "cache.service.consul", "SRV"):
        assert srv(msg) == [(6380, "p2n1.node.part-2.ap.dc1.dc.consul.")]
    # search is in no partition: the peer member answers, its target names the peer
    for msg in ask_both(failover_server, "search.service.consul", "SRV"):
        assert srv(msg) == [(9201, "c2n1.node.cluster-02.peer.consul.")]
        assert glue(msg) == {"c2n1.node.cluster-02.peer.consul.": ["10.102.0.1"]}


def test_own_failover_targets_come_before_the_sameness_group(
        failover_server: MeshdnsProcess) -> None:
    # late's own target dc2 has none: the group's part-2 member answers after it
    assert srv(failover_server.query("late.service.consul", "SRV")) == [
        (2, "p2n1.node.part-2.ap.dc1.dc.consul.")]


def test_explicit_sameness_group_without_include_local(failover_server: MeshdnsProcess) -> None:
    # both is healthy locally, but `east` does not include the local partition: part-2 first
    for msg in ask_both(failover_server, "both.service.east.sg.consul", "SRV"):
        assert srv(msg) == [(2, "p2n1.node.part-2.ap.dc1.dc.consul.")]
    msg = failover_server.query("both.service.east.sg.default.ns.default.ap.consul", "SRV")
    assert srv(msg) == [(2, "p2n1.node.part-2.ap.dc1.dc.consul.")]
    # search is only in cluster-02, the second member
    assert srv(failover_server.query("search.service.east.sg.consul", "SRV")) == [
        (9201, "c2n1.node.cluster-02.peer.consul.")]


def test_explicit_sameness_group_with_include_local(failover_server: MeshdnsProcess) -> None:
    for msg in ask_both(failover_server, "both.service.east-local.sg.consul", "SRV"):
        assert srv(msg) == [(1, "n1.node.dc1.consul.")]  # the first member with instances only
    # local empty: the members follow in order
    assert srv(failover_server.query("cache.service.east-local.sg.consul", "SRV")) == [
        (6380, "p2n1.node.part-2.ap.dc1.dc.consul.")]


def test_unknown_sameness_group_is_nxdomain(failover_server: MeshdnsProcess) -> None:
    assert_nxdomain(failover_server.query("both.service.nope.sg.consul"))


# --- nothing anywhere ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gone.service.consul", "gone.connect.consul",
                                  "gone.service.east.sg.consul",
                                  "gone.service.east-local.sg.consul"])
def test_all_targets_empty_is_nxdomain_with_soa(failover_server: MeshdnsProcess,
                                                name: str) -> None:
    for rdtype in ("A", "SRV"):
        for msg in ask_both(failover_server, name, rdtype):
            assert_nxdomain(msg)


# --- recovery ------------------------------------------------------------------------------


RECOVERY_CATALOG = """\
nodes:
  - {{name: n1, address: 10.0.0.1}}
  - {{name: d2n1, address: 10.20.0.1, datacenter: dc2}}
  - {{name: c2n1, address: 10.102.0.1, peer: cluster-02}}
services:
  - {{name: pay, node: n1, port: 7070, health: {local}}}
  - {{name: pay-sidecar-proxy, node: n1, port: 21000, kind: connect-proxy, destination: pay,
     health: {local}}}
  - {{name: pay, node: c2n1, port: 7070, health: {peer}}}
  - {{name: pay-sidecar-proxy, node: c2n1, port: 21000, kind: connect-proxy, destination: pay,
     health: {peer}}}
  - {{name: pay, node: d2n1, port: 7070}}
  - {{name: pay-sidecar-proxy, node: d2n1, port: 21000, kind: connect-proxy, destination: pay}}
failover:
  - service: pay
    targets: [{{peer: cluster-02}}, {{datacenter: dc2}}]
"""


def _rewrite(path: Path, local: str, peer: str = "passing") -> None:
    """Replace the catalog in one step, as a ConfigMap update or an editor's save does."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(RECOVERY_CATALOG.format(local=local, peer=peer))
    os.replace(tmp, path)


def test_a_recovered_locality_takes_the_answer_back(start_server, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    _rewrite(catalog, local="critical")
    server = start_server(catalog=catalog)

    def answer(name: str = "pay.service.consul", rdtype: str = "SRV") -> list:
        return srv(server.query(name, rdtype))

    local = [(7070, "n1.node.dc1.consul.")]
    peer = [(7070, "c2n1.node.cluster-02.peer.consul.")]
    dc2 = [(7070, "d2n1.node.dc2.consul.")]
    assert answer() == peer
    assert addresses(server.query("pay.connect.consul")) == ["10.102.0.1"]

    _rewrite(catalog, local="passing")
    assert wait_for(lambda: answer() == local), answer()
    assert addresses(server.query("pay.service.consul")) == ["10.0.0.1"]
    assert addresses(server.query("pay.connect.consul")) == ["10.0.0.1"]

    # the local instances fail again, and so does the peer: the second target takes over
    _rewrite(catalog, local="maintenance", peer="critical")
    assert wait_for(lambda: answer() == dc2), answer()
    assert addresses(server.query("pay.connect.consul", tcp=True)) == ["10.20.0.1"]

    _rewrite(catalog, local="warning", peer="critical")
    assert wait_for(lambda: answer() == local), answer()


# --- prepared queries ----------------------------------------------------------------------


def test_query_with_tags_and_own_ttl(query_server: MeshdnsProcess) -> None:
    for msg in ask_both(query_server, "web-v1.query.consul"):
        assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.AA
        assert addresses(msg) == ["10.0.0.1", "10.0.0.2"]  # the warning one included
        assert answer_ttls(msg) == {10}  # the query's ttl beats service_ttl web: 5s
    assert addresses(query_server.query("web-not-v2.query.consul")) == ["10.0.0.1", "10.0.0.2"]


def test_query_srv_form(query_server: MeshdnsProcess) -> None:
    for msg in ask_both(query_server, "_web-v1._tcp.query.consul", "SRV"):
        assert srv(msg) == [(80, "n1.node.dc1.consul."), (80, "n2.node.dc1.consul.")]
        assert glue(msg) == {"n1.node.dc1.consul.": ["10.0.0.1"],
                             "n2.node.dc1.consul.": ["10.0.0.2"]}
        assert answer_ttls(msg) == {10}
        assert {rrset.ttl for rrset in msg.additional if rrset.rdtype == dns.rdatatype.A} \
            == {10}


def test_query_only_passing_and_service_ttl(query_server: MeshdnsProcess) -> None:
    msg = query_server.query("web-v1-passing.query.consul")
    assert addresses(msg) == ["10.0.0.1"]
    assert answer_ttls(msg) == {5}  # no ttl of its own: service_ttl for web


def test_query_in_another_datacenter(query_server: MeshdnsProcess) -> None:
    msg = query_server.query("web-v1.query.dc2.consul", "SRV")
    assert srv(msg) == [(80, "d2n1.node.dc2.consul.")]
    assert answer_ttls(msg) == {10}


def test_query_nearest_n_follows_datacenter_rtt(query_server: MeshdnsProcess) -> None:
    # api is not in dc1; dc3 (10ms) is nearer than dc2 (40ms)
    msg = query_server.query("api-near1.query.consul", "SRV")
    assert srv(msg) == [(90, "d3n1.node.dc3.consul.")]
    assert answer_ttls(msg) == {1}  # service_ttl "*"
    # db's dc3 instance is critical: nearest_n 1 stops there, nearest_n 2 reaches dc2
    assert_nxdomain(query_server.query("db-near1.query.consul"))
    assert addresses(query_server.query("db-near2.query.consul")) == ["10.20.0.2"]
    # dc4 has no RTT: it comes after the measured ones
    assert_nxdomain(query_server.query("batch-near2.query.consul"))
    assert addresses(query_server.query("batch-near3.query.consul")) == ["10.40.0.1"]


def test_query_nearest_n_rtt_is_symmetric(query_server: MeshdnsProcess) -> None:
    # executed in dc3, which has no web: dc1 (10ms, written as dc1 -> dc3) beats dc2 (20ms)
    msg = query_server.query("web-near1.query.dc3.consul", "SRV")
    assert srv(msg) == [(80, "n1.node.dc1.consul."), (80, "n2.node.dc1.consul.")]


def test_query_then_datacenters(query_server: MeshdnsProcess) -> None:
    assert addresses(query_server.query("db-then-dcs.query.consul")) == ["10.20.0.2"]
    # listed order, not distance; an unknown datacenter is skipped
    assert srv(query_server.query("api-dcs.query.consul", "SRV")) == [
        (90, "d4n1.node.dc4.consul.")]


def test_query_then_targets(query_server: MeshdnsProcess) -> None:
    # only_passing drops dc1's warning instance; the peer target answers, named as a peer
    for msg in ask_both(query_server, "pay-targets.query.consul", "SRV"):
        assert srv(msg) == [(7071, "c2n1.node.cluster-02.peer.consul.")]
        assert glue(msg) == {"c2n1.node.cluster-02.peer.consul.": ["10.102.0.1"]}
    # an empty (unknown) peer target is skipped: the datacenter target answers
    assert srv(query_server.query("_pay-dc2._tcp.query.consul", "SRV")) == [
        (7072, "d2n1.node.dc2.consul.")]
    # nearest_n (dc3) and datacenters (dc3) have no pay: targets in their order
    msg = query_server.query("pay-order.query.consul")
    assert addresses(msg) == ["10.20.0.1"]
    assert answer_ttls(msg) == {0}  # an explicit ttl of 0 is still the query's own


@pytest.mark.parametrize("name", ["nope.query.consul", "_nope._tcp.query.consul",
                                  "web-v1.query.dc9.consul"])
def test_unknown_query_is_nxdomain(query_server: MeshdnsProcess, name: str) -> None:
    for rdtype in ("A", "SRV"):
        assert_nxdomain(query_server.query(name, rdtype))


def test_query_name_is_case_insensitive_and_echoed(query_server: MeshdnsProcess) -> None:
    msg = query_server.query("Web-V1.Query.Consul")
    assert msg.answer[0].name.to_text() == "Web-V1.Query.Consul."
    assert addresses(msg) == ["10.0.0.1", "10.0.0.2"]
