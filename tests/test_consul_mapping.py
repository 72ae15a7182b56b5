"""Consul JSON -> catalog values (catalog/consul/mapping.py) on recorded documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshdns.catalog.consul import mapping
from meshdns.catalog.consul.mapping import Malformed, Scope
from meshdns.catalog.snapshot import vip_of

DOCS = Path(__file__).parent / "consul_documents"
LOCAL = Scope("", "dc1", "default", "default")


def doc(name: str):
    return json.loads((DOCS / name).read_text())


def test_health_entries_become_instances_with_combined_health():
    web1, web2 = mapping.instances(doc("health_service_web.json"), LOCAL)
    assert (web1.service, web1.id, web1.address, web1.port) == ("web", "web-1", "10.0.1.10", 8080)
    assert web1.own_address and web1.packed == bytes([10, 0, 1, 10])
    assert web1.tags == {"primary", "v1"}
    assert web1.status == "warning"  # node passing, service warning
    assert (web1.weight_passing, web1.weight_warning) == (10, 1)
    # lowercase registration spelling of tagged addresses, and the node's own (strings)
    assert web1.tagged["wan"].address == "198.51.100.10" and web1.tagged["wan"].port == 80
    assert web1.node.tagged["wan"].address == "198.51.100.1"
    assert web1.node.meta == {"rack": "r1"}
    # no service address: the node's; a critical node check makes the instance critical
    assert web2.address == "10.0.0.2" and not web2.own_address
    assert web2.status == "critical" and web2.node.health == "critical"
    assert web2.tags == frozenset() and web2.kind == "typical"


def test_sidecar_gives_connect_destination_and_consuls_virtual_ip():
    (proxy,) = mapping.instances(doc("health_service_web_sidecar.json"), LOCAL)
    assert proxy.kind == "connect-proxy" and proxy.destination == "web"
    # Go's spelling (Address/Port); consul-virtual wins over the Kubernetes ClusterIP
    assert vip_of(proxy) == "240.0.0.7"


def test_interned_nodes_are_shared_between_instances():
    interned: dict = {}
    a = mapping.instances(doc("health_service_web.json"), LOCAL, interned)
    b = mapping.instances(doc("health_service_web.json"), LOCAL, interned)
    assert a[0].node is b[0].node


@pytest.mark.parametrize("body", [
    {"not": "a list"},
    [{"Node": {"Node": "n", "Address": "10.0.0.1"}, "Service": "web", "Checks": []}],
    [{"Node": {"Node": "n", "Address": "10.0.0.999"},
      "Service": {"Service": "web", "Port": 1}, "Checks": []}],
    [{"Node": {"Node": "n", "Address": "10.0.0.1"},
      "Service": {"Service": "web", "Port": "80"}, "Checks": []}],
])
def test_malformed_bodies_are_refused(body):
    with pytest.raises(Malformed):
        mapping.instances(body, LOCAL)


def test_topology_documents():
    t = doc("topology.json")
    assert mapping.datacenters(t["datacenters"]) == ["dc1", "dc2"]
    assert mapping.partitions(t["partitions"]) == ["default", "part-2"]
    assert mapping.namespaces(t["namespaces"]) == ["default", "team-a"]
    assert mapping.peerings(t["peerings"]) == ["cluster-02"]
    assert mapping.service_names(t["services"])["web"] == ("primary", "v1")


def _body(checks, go=True):
    # Consul's Go encoder writes no spaces; Python's json.dumps does: both must work
    return json.dumps(checks, separators=(",", ":") if go else None).encode()


@pytest.mark.parametrize("go", [True, False])
def test_changed_checks_finds_exactly_the_checks_that_differ(go):
    import random
    from collections import Counter

    rng = random.Random(7)
    base = [{"Node": f"n{i % 50}", "CheckID": f"service:s{i}", "Status": "passing",
             "Output": "ok", "ServiceID": f"s{i}", "ServiceName": f"s{i}", "Definition": {}}
            for i in range(2000)]
    base += [{"Node": f"n{i}", "CheckID": "serfHealth", "Status": "passing", "ServiceID": "",
              "ServiceName": ""} for i in range(50)]

    def rows(checks):
        return Counter((c["Node"], c["CheckID"], c["ServiceID"], c["Status"], c["ServiceName"])
                       for c in checks)

    for _ in range(200):
        new = [dict(c) for c in base]
        edit = rng.choice(["status", "insert", "delete", "output"])
        i = rng.randrange(len(new))
        if edit == "status":
            new[i]["Status"] = "critical"
        elif edit == "insert":
            new.insert(i, {"Node": "nx", "CheckID": "service:new", "Status": "passing",
                           "ServiceID": "new", "ServiceName": "new"})
        elif edit == "delete":
            del new[i]
        else:
            new[i]["Output"] = "changed"
        before, after = mapping.changed_checks(_body(base, go), _body(new, go))
        assert Counter(before) - Counter(after) == rows(base) - rows(new)
        assert Counter(after) - Counter(before) == rows(new) - rows(base)
        assert len(before) <= 3  # only the objects around the change were decoded
    with pytest.raises(Malformed):
        mapping.changed_checks(b"[1,2", b"{")


def test_config_entries_map_onto_failover_and_sameness_groups():
    entries = doc("config_entries.json")
    groups = mapping.sameness_groups(entries["sameness-group"], "default")
    group = groups[("default", "group-1")]
    assert group.default_for_failover and group.include_local
    assert [(m.partition, m.peer) for m in group.members] == [
        ("default", None), ("part-2", None), (None, "cluster-02")]
    failover = mapping.resolver_failover(entries["service-resolver"], "dc1", "default", groups)
    web = failover[("", "dc1", "default", "default", "web")]
    assert [(t.peer, t.datacenter, t.partition) for t in web] == [
        ("cluster-02", None, None), (None, "dc2", None), (None, None, "part-2")]
    assert [t.datacenter for t in failover[("", "dc1", "default", "default", "api")]] == \
        ["dc2", "dc3"]
    db = failover[("", "dc1", "default", "default", "db")]
    assert [(t.peer, t.partition) for t in db] == [
        (None, "default"), (None, "part-2"), ("cluster-02", None)]
    assert ("", "dc1", "default", "default", "noop") not in failover


def test_prepared_query_result_reads_the_top_level_fields():
    result = mapping.query_result(doc("query_execute.json"), "dc1")
    assert result.ttl == 90.0 and result.datacenter == "dc3" and result.failovers == 2
    (inst,) = result.instances
    assert (inst.address, inst.port, inst.status, inst.datacenter) == \
        ("10.1.10.12", 8000, "passing", "dc3")


def test_scope_parameters_leave_defaults_out():
    assert LOCAL.params("dc1") == {}
    assert Scope("", "dc2", "part-2", "team-a").params("dc1") == \
        {"dc": "dc2", "partition": "part-2", "ns": "team-a"}
    assert Scope("cluster-02", "", "default", "default").params("dc1") == {"peer": "cluster-02"}
