"""Incremental snapshot updates (catalog/snapshot.py apply_update): a change to one service
touches that service's entries and shares everything else; answers follow."""

from __future__ import annotations

from meshdns.catalog.consul import mapping
from meshdns.catalog.consul.mapping import Scope
from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import Update, apply_update, build_snapshot, dismantle
from meshdns.config import Config
from meshdns.responder import Responder

LOCAL = Scope("", "dc1", "default", "default")


def entry(name, sid, node, address, status="passing", kind="", dest=None, vip=None, port=80):
    service = {"ID": sid, "Service": name, "Address": address, "Port": port, "Kind": kind}
    if dest:
        service["Proxy"] = {"DestinationServiceName": dest}
    if vip:
        service["TaggedAddresses"] = {"consul-virtual": {"Address": vip, "Port": 0}}
    return {"Node": {"Node": node, "Address": "10.0.0." + node.rsplit("-", 1)[-1]},
            "Service": service,
            "Checks": [{"Node": node, "CheckID": "c-" + sid, "Status": status,
                        "ServiceID": sid, "ServiceName": name}]}


def key(name, scope=LOCAL):
    return (scope.peer, scope.datacenter, scope.partition, scope.namespace, name)


def empty():
    return build_snapshot(Catalog(), local_datacenter="dc1")


def ask(snap, name, qtype="A"):
    import dns.message
    import dns.rdatatype

    responder = Responder(Config(), snap)
    query = dns.message.make_query(name, getattr(dns.rdatatype, qtype))
    reply = dns.message.from_wire(responder.respond(query.to_wire()))
    return reply.rcode(), sorted(r.to_text() for rrset in reply.answer for r in rrset)


def test_services_replace_and_share_the_rest():
    snap = empty()
    many = {key(f"svc{i}"): mapping.instances([entry(f"svc{i}", f"svc{i}-1", "node-1",
                                                     f"10.1.{i // 250}.{i % 250 + 1}")], LOCAL)
            for i in range(500)}
    first = apply_update(snap, Update(services=many))
    assert len(first.services) == 500 and first.snapshot.counts["instances"] == 500
    s1 = first.snapshot
    assert ask(s1, "svc7.service.consul.") == (0, ["10.1.0.8"])
    changed = apply_update(s1, Update(services={key("svc7"): mapping.instances(
        [entry("svc7", "svc7-1", "node-1", "10.9.9.9")], LOCAL)}))
    s2 = changed.snapshot
    assert changed.services == {"svc7"} and not changed.everything
    assert ask(s2, "svc7.service.consul.") == (0, ["10.9.9.9"])
    assert ask(s1, "svc7.service.consul.") == (0, ["10.1.0.8"])  # the old one is untouched
    assert s2.services[key("svc8")] is s1.services[key("svc8")]  # shared, not rebuilt
    assert s2.generation == s1.generation + 1
    # PTR follows the address
    assert s2.ptr["10.9.9.9"] == ("svc7", "service", "dc1") and "10.1.0.8" not in s2.ptr
    # the retired snapshot's shared indexes survive its dismantling
    dismantle(s1)
    assert ask(s2, "svc8.service.consul.") == (0, ["10.1.0.9"])


def test_same_payload_is_no_change():
    one = {key("web"): mapping.instances([entry("web", "web-1", "node-1", "10.1.0.1")], LOCAL)}
    s1 = apply_update(empty(), Update(services=one)).snapshot
    again = apply_update(s1, Update(services={key("web"): mapping.instances(
        [entry("web", "web-1", "node-1", "10.1.0.1")], LOCAL)}))
    assert again.snapshot is s1 and not again.services


def test_health_removal_and_virtual_ips_from_consul():
    web = mapping.instances([entry("web", "web-1", "node-1", "10.1.0.1"),
                             entry("web", "web-2", "node-2", "10.1.0.2")], LOCAL)
    proxy = mapping.instances([entry("web-sidecar-proxy", "web-1-sp", "node-1", "10.1.0.1",
                                     kind="connect-proxy", dest="web", vip="240.0.0.9",
                                     port=21000)], LOCAL)
    s1 = apply_update(empty(), Update(services={key("web"): web,
                                                key("web-sidecar-proxy"): proxy})).snapshot
    assert ask(s1, "web.virtual.consul.") == (0, ["240.0.0.9"])
    assert ask(s1, "web.connect.consul.", "SRV")[1] == ["1 1 21000 0a010001.addr.dc1.consul."]
    assert s1.ptr["240.0.0.9"] == ("web", "virtual")
    # web-2 critical: only web-1 answers
    web_sick = mapping.instances([entry("web", "web-1", "node-1", "10.1.0.1"),
                                  entry("web", "web-2", "node-2", "10.1.0.2", "critical")],
                                 LOCAL)
    s2 = apply_update(s1, Update(services={key("web"): web_sick})).snapshot
    assert ask(s2, "web.service.consul.") == (0, ["10.1.0.1"])
    # the proxy goes: no virtual IP any more, and none is invented
    gone = apply_update(s2, Update(services={key("web-sidecar-proxy"): []}))
    assert gone.services == {"web-sidecar-proxy", "web"}
    s3 = gone.snapshot
    assert ask(s3, "web.virtual.consul.")[0] == 3
    assert ask(s3, "web.connect.consul.")[0] == 3
    assert "240.0.0.9" not in s3.ptr and s3.counts["virtual_ips"] == 0
    # and the service itself goes
    s4 = apply_update(s3, Update(services={key("web"): []})).snapshot
    assert ask(s4, "web.service.consul.")[0] == 3 and s4.counts["instances"] == 0


def test_nodes_and_topology_changes_are_everything():
    node = mapping.nodes([{"Node": "node-1", "Address": "10.0.0.1"}], LOCAL)[0]
    applied = apply_update(empty(), Update(nodes={("", "dc1", "default", "node-1"): node},
                                           peers=frozenset({"cluster-02"})))
    assert applied.everything
    assert ask(applied.snapshot, "node-1.node.consul.") == (0, ["10.0.0.1"])
    assert applied.snapshot.ptr["10.0.0.1"] == ("node-1", "node", "dc1")
