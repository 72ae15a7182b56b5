"""The fake Consul itself, over real HTTP: shapes, index rules, blocking, ACLs, faults.

The end-to-end tests trust this fake to behave as Consul does; these tests are why they may.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import stop_process, wait_for  # noqa: E402
from fake_consul import (  # noqa: E402
    ApiError,
    FakeConsul,
    RemoteFake,
    UnixHTTPConnection,
    parse_go_duration,
)


@pytest.fixture
def fake() -> Iterator[FakeConsul]:
    with FakeConsul() as f:
        f.register_node("n1", "10.0.0.1", meta={"rack": "r1"})
        f.register_node("n2", "10.0.0.2")
        f.register_service("web", "n1", id="web-1", port=8080, tags=["v1"])
        f.register_service("web", "n2", id="web-2", port=8080, address="10.0.1.2")
        f.register_service("db", "n2", port=5432)
        yield f


def get(fake: FakeConsul, path: str, token: str | None = None, bearer: bool = False,
        timeout: float = 30) -> tuple[int, dict[str, str], Any]:
    headers = {}
    if token:
        headers = {"Authorization": f"Bearer {token}"} if bearer else {"X-Consul-Token": token}
    req = urllib.request.Request(fake.url + path, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def index_of(fake: FakeConsul, path: str) -> int:
    status, headers, _ = get(fake, path)
    assert status == 200
    return int(headers["X-Consul-Index"])


def in_background(fake: FakeConsul, path: str) -> tuple[threading.Thread, dict[str, Any]]:
    """Start a (blocking) GET; wait until the fake holds it."""
    out: dict[str, Any] = {}
    before = fake.stats()["requests"]

    def run() -> None:
        t0 = time.monotonic()
        try:
            out["result"] = get(fake, path)
        except OSError as e:  # the fake went away under it
            out["error"] = e
        out["elapsed"] = time.monotonic() - t0

    thread = threading.Thread(target=run)
    thread.start()
    assert wait_for(lambda: fake.stats()["requests"] > before and fake.stats()["in_flight"] > 0)
    return thread, out


# -- shapes -------------------------------------------------------------------------------------


def test_health_service_entries_have_the_documented_nesting(fake: FakeConsul) -> None:
    status, headers, body = get(fake, "/v1/health/service/web")
    assert status == 200 and int(headers["X-Consul-Index"]) >= 1
    assert [e["Service"]["ID"] for e in body] == ["web-1", "web-2"]
    entry = body[0]
    assert set(entry) == {"Node", "Service", "Checks"}
    assert {"ID", "Node", "Address", "Datacenter", "TaggedAddresses", "Meta", "Partition",
            "CreateIndex", "ModifyIndex"} <= set(entry["Node"])
    assert entry["Node"]["Meta"] == {"rack": "r1"} and entry["Node"]["Datacenter"] == "dc1"
    assert {"Kind", "ID", "Service", "Tags", "Address", "Meta", "Port", "Weights", "Proxy",
            "Connect", "Namespace", "Partition", "CreateIndex", "ModifyIndex"} <= set(
                entry["Service"])
    assert "PeerName" not in entry["Service"]  # omitempty for local services
    assert [c["CheckID"] for c in entry["Checks"]] == ["serfHealth", "service:web-1"]
    assert entry["Checks"][1]["ServiceTags"] == ["v1"] and entry["Checks"][0]["ServiceID"] == ""
    # An explicit address gets the agent's lan_ipv4/wan_ipv4 tagged addresses, capitalized.
    assert body[1]["Service"]["TaggedAddresses"]["lan_ipv4"] == {"Address": "10.0.1.2",
                                                                 "Port": 8080}


def test_catalog_endpoints(fake: FakeConsul) -> None:
    _, _, flat = get(fake, "/v1/catalog/service/web")
    assert {"ID", "Node", "Address", "ServiceID", "ServiceName", "ServiceAddress", "ServicePort",
            "ServiceTags", "ServiceTaggedAddresses", "NodeMeta"} <= set(flat[0])
    assert get(fake, "/v1/catalog/services")[2] == {"db": [], "web": ["v1"]}
    assert [n["Node"] for n in get(fake, "/v1/catalog/nodes")[2]] == ["n1", "n2"]
    assert get(fake, "/v1/catalog/datacenters")[2] == ["dc1"]
    node = get(fake, "/v1/catalog/node/n2")[2]
    assert sorted(node["Services"]) == ["db", "web-2"]
    assert get(fake, "/v1/status/leader")[2] == "127.0.0.1:8300"
    agent = get(fake, "/v1/agent/self")[2]
    assert agent["Config"]["Datacenter"] == "dc1" and "DebugConfig" in agent


def test_prepared_query_result_is_top_level_as_the_go_struct(fake: FakeConsul) -> None:
    fake.add_prepared_query("web-q", "web", ttl="10s", tags=["v1"])
    status, headers, body = get(fake, "/v1/query/web-q/execute")
    assert status == 200 and "X-Consul-Index" in headers
    assert set(body) >= {"Service", "Nodes", "DNS", "Datacenter", "Failovers"}
    assert body["DNS"] == {"TTL": "10s"} and body["Datacenter"] == "dc1"
    assert [e["Service"]["ID"] for e in body["Nodes"]] == ["web-1"]
    assert "DNS" not in body["Nodes"][0]  # the v1.21 doc sample's nesting is wrong
    assert get(fake, "/v1/query/nope/execute")[:3:2] == (404, "Query not found")
    listed = get(fake, "/v1/query")[2]
    assert listed[0]["Name"] == "web-q" and listed[0]["Token"] == "<hidden>"


def test_prepared_query_failover_to_a_datacenter_and_a_peer(fake: FakeConsul) -> None:
    fake.add_datacenter("dc2")
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    fake.register_service("web", "m1", id="web-dc2", dc="dc2")
    fake.add_peer("p1")
    fake.register_node("p-n", "10.9.0.1", peer="p1", serf=False)
    fake.register_service("api", "p-n", id="api-p", peer="p1")
    fake.add_prepared_query("web-fo", "web", failover={"Datacenters": ["dc2"]})
    fake.add_prepared_query("api-fo", "api", failover={"Targets": [{"Peer": "p1"}]})
    fake.set_service_health("web-1", "n1", "critical")
    fake.set_service_health("web-2", "n2", "critical")
    body = get(fake, "/v1/query/web-fo/execute")[2]
    assert (body["Datacenter"], body["Failovers"]) == ("dc2", 1)
    assert [e["Service"]["ID"] for e in body["Nodes"]] == ["web-dc2"]
    body = get(fake, "/v1/query/api-fo/execute")[2]
    assert body["PeerName"] == "p1" and [e["Service"]["ID"] for e in body["Nodes"]] == ["api-p"]
    # Executed in dc2 (the definition must exist there).
    assert get(fake, "/v1/query/web-fo/execute?dc=dc2")[0] == 404
    fake.add_prepared_query("geo-", "${name.suffix}", template="name_prefix_match", dc="dc2")
    body = get(fake, "/v1/query/geo-web/execute?dc=dc2")[2]
    assert body["Service"] == "web" and len(body["Nodes"]) == 1


def test_only_passing_and_warning(fake: FakeConsul) -> None:
    fake.set_service_health("web-1", "n1", "warning")
    assert len(get(fake, "/v1/health/service/web")[2]) == 2
    assert [e["Service"]["ID"] for e in get(fake, "/v1/health/service/web?passing")[2]] == [
        "web-2"]
    fake.add_prepared_query("strict", "web", only_passing=True)
    assert len(get(fake, "/v1/query/strict/execute")[2]["Nodes"]) == 1


def _filtered(fake: FakeConsul, expression: str, state: str = "any", extra: str = ""
              ) -> tuple[int, dict[str, str], Any]:
    return get(fake, f"/v1/health/state/{state}?" + urlencode({"filter": expression}) + extra)


def test_health_state_filter_follows_the_documented_grammar(fake: FakeConsul) -> None:
    """``?filter=`` on /v1/health/state: go-bexpr's expressions over the documented
    selectors (CheckID, Name, Node, Notes, Output, ServiceID, ServiceName, ServiceTags,
    Status)."""
    fake.set_service_health("web-1", "n1", "critical")
    fake.set_service_health("db", "n2", "warning")
    fake.set_node_health("n2", "critical")

    def ids(expression: str) -> list[str]:
        status, _, body = _filtered(fake, expression)
        assert status == 200, body
        return sorted(f"{c['Node']}/{c['CheckID']}" for c in body)

    not_passing = ["n1/service:web-1", "n2/serfHealth", "n2/service:db"]
    assert ids('Status != "passing"') == not_passing
    assert ids("not Status == passing") == not_passing  # a bare value; `not`
    assert ids('Status != "passing" and ServiceName == ""') == ["n2/serfHealth"]
    assert ids('(Status == "warning" or Status == "critical") and Node == `n1`') == [
        "n1/service:web-1"]
    assert ids('"v1" in ServiceTags') == ["n1/service:web-1"]
    assert ids('ServiceTags is empty and Status == "passing"') == [
        "n1/serfHealth", "n2/service:web-2"]
    assert ids('ServiceName contains "we" and "pass" not in Status') == ["n1/service:web-1"]
    assert ids('CheckID matches "^serf" and Status != "passing"') == ["n2/serfHealth"]
    # The path's state and the filter both apply.
    status, _, body = _filtered(fake, 'ServiceName != ""', "critical")
    assert status == 200 and [c["CheckID"] for c in body] == ["service:web-1"]


def test_a_filter_applies_after_acls(fake: FakeConsul) -> None:
    """As Consul's Health.ChecksInState: ACLs hide checks first (and say so in the header,
    whatever the expression keeps), then the filter selects from the rest."""
    fake.set_service_health("web-1", "n1", "critical")
    fake.set_service_health("db", "n2", "critical")
    fake.enable_acls()
    fake.add_token("web-only", {"node_prefix": {"": {"policy": "read"}},
                                "service": {"web": {"policy": "read"}}})
    path = "/v1/health/state/any?" + urlencode({"filter": 'Status != "passing"'})
    status, headers, body = get(fake, path, "web-only")
    assert status == 200 and [c["CheckID"] for c in body] == ["service:web-1"]
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    path = "/v1/health/state/any?" + urlencode({"filter": 'ServiceName == "web"'})
    status, headers, body = get(fake, path, "web-only")
    assert sorted(c["CheckID"] for c in body) == ["service:web-1", "service:web-2"]
    assert headers["X-Consul-Results-Filtered-By-ACLs"] == "true"  # db's check was hidden


@pytest.mark.parametrize("expression", [
    "Status", 'Status ==', 'Status == "a" and', '(Status == "a"', 'Status === "a"', "",
    'Bogus == "a"', 'Node.Meta == "a"', 'Status is empty', 'ServiceTags == "a"',
    'Status matches "("', '"a" in',
])
def test_a_filter_the_fake_cannot_compile_is_400_at_once(fake: FakeConsul,
                                                         expression: str) -> None:
    """Consul answers 400 "Failed to create boolean expression evaluator" for an expression
    that does not parse or names a selector or operation the endpoint lacks; a blocking
    query with such a filter is answered before it would block."""
    index = index_of(fake, "/v1/health/state/any")
    t0 = time.monotonic()
    status, _, body = _filtered(fake, expression, extra=f"&index={index}&wait=20s")
    assert time.monotonic() - t0 < 10
    assert status == 400
    assert body.startswith("Failed to create boolean expression evaluator")


def test_a_filtered_watch_wakes_on_every_check_write(fake: FakeConsul) -> None:
    """The index is the checks table's: a write that leaves the filtered set as it was still
    returns a blocked query (with the same body), as Consul's blocking queries do."""
    status, headers, body = _filtered(fake, 'Status != "passing"')
    assert status == 200 and body == []
    index = int(headers["X-Consul-Index"])
    thread, out = in_background(
        fake, "/v1/health/state/any?" + urlencode({"filter": 'Status != "passing"'}) +
        f"&index={index}&wait=20s")
    fake.set_check("n1", "serfHealth", "passing", output="still fine")
    thread.join(15)
    status, headers, body = out["result"]
    assert status == 200 and body == [] and int(headers["X-Consul-Index"]) > index


# -- index rules --------------------------------------------------------------------------------


def test_each_write_is_one_raft_index_and_per_service_indexes(fake: FakeConsul) -> None:
    web, db = index_of(fake, "/v1/health/service/web"), index_of(fake, "/v1/health/service/db")
    services = index_of(fake, "/v1/catalog/services")
    raft = fake.index()
    assert fake.set_service_health("db", "n2", "warning") == raft + 1
    assert index_of(fake, "/v1/health/service/web") == web  # unrelated service: unchanged
    assert index_of(fake, "/v1/health/service/db") == raft + 1 > db
    assert index_of(fake, "/v1/catalog/services") == services  # a check is not a service write
    assert index_of(fake, "/v1/health/state/any") == raft + 1
    # A new instance of an existing service: the service list's index moves, its payload not.
    payload = get(fake, "/v1/catalog/services")[2]
    fake.register_service("db", "n1", id="db-2", port=5432)
    assert index_of(fake, "/v1/catalog/services") == raft + 2
    assert get(fake, "/v1/catalog/services")[2] == payload


def test_a_node_check_moves_every_service_on_that_node(fake: FakeConsul) -> None:
    web, db = index_of(fake, "/v1/health/service/web"), index_of(fake, "/v1/health/service/db")
    fake.register_node("n3", "10.0.0.3")
    fake.register_service("api", "n3")
    api = index_of(fake, "/v1/health/service/api")
    idx = fake.set_node_health("n2", "critical")
    assert index_of(fake, "/v1/health/service/web") == idx > web  # web-2 runs on n2
    assert index_of(fake, "/v1/health/service/db") == idx > db
    assert index_of(fake, "/v1/health/service/api") == api
    entry = [e for e in get(fake, "/v1/health/service/db")[2]][0]
    assert entry["Checks"][0] == {**entry["Checks"][0], "CheckID": "serfHealth",
                                  "Status": "critical"}


def test_a_missing_service_follows_the_tables(fake: FakeConsul) -> None:
    before = index_of(fake, "/v1/health/service/nope")
    fake.register_service("other", "n1")
    assert index_of(fake, "/v1/health/service/nope") > before
    assert get(fake, "/v1/health/service/nope")[2] == []


def test_each_datacenter_has_its_own_raft_index(fake: FakeConsul) -> None:
    fake.add_datacenter("dc2")
    local = fake.index()
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    assert fake.index() == local and fake.index("dc2") == 2
    assert index_of(fake, "/v1/catalog/nodes?dc=dc2") == 2
    assert [n["Datacenter"] for n in get(fake, "/v1/catalog/nodes?dc=dc2")[2]] == ["dc2"]
    assert get(fake, "/v1/catalog/datacenters")[2] == ["dc1", "dc2"]


# -- blocking -----------------------------------------------------------------------------------


def test_blocking_query_returns_when_the_watched_service_changes(fake: FakeConsul) -> None:
    idx = index_of(fake, "/v1/health/service/web")
    thread, out = in_background(fake, f"/v1/health/service/web?index={idx}&wait=60s")
    fake.set_service_health("db", "n2", "critical")  # unrelated: keeps blocking
    time.sleep(0.2)
    assert thread.is_alive()
    fake.set_service_health("web-1", "n1", "critical")
    thread.join(10)
    status, headers, body = out["result"]
    assert int(headers["X-Consul-Index"]) > idx and out["elapsed"] < 30
    assert body[0]["Checks"][1]["Status"] == "critical"


def test_blocking_query_times_out_with_the_same_index(fake: FakeConsul) -> None:
    idx = index_of(fake, "/v1/health/service/web")
    t0 = time.monotonic()
    _, headers, _ = get(fake, f"/v1/health/service/web?index={idx}&wait=500ms")
    elapsed = time.monotonic() - t0
    assert int(headers["X-Consul-Index"]) == idx
    assert 0.5 <= elapsed < 0.5 + 0.5 / 16 + 1.0  # wait plus at most wait/16 of jitter


def test_wait_is_a_go_duration_capped_at_ten_minutes(fake: FakeConsul) -> None:
    assert parse_go_duration("1m30s") == 90 and parse_go_duration("250ms") == 0.25
    with pytest.raises(ApiError):
        parse_go_duration("10")
    status, _, body = get(fake, "/v1/health/service/web?index=1&wait=10")
    assert status == 400 and "Invalid wait" in body
    assert get(fake, "/v1/health/service/web?index=x")[0] == 400
    # index=0 (or no index) never blocks.
    t0 = time.monotonic()
    get(fake, "/v1/health/service/web?index=0&wait=5s")
    assert time.monotonic() - t0 < 4


def test_an_unrelated_write_can_wake_a_watch_without_a_change(fake: FakeConsul) -> None:
    """Consul's replies are no guarantee of change: a missing service's watch and the service
    list's watch return on writes that leave their payload as it was."""
    idx = index_of(fake, "/v1/health/service/nope")
    thread, out = in_background(fake, f"/v1/health/service/nope?index={idx}&wait=60s")
    fake.set_node_health("n1", "warning")
    thread.join(10)
    assert int(out["result"][1]["X-Consul-Index"]) > idx and out["result"][2] == []


def test_wake_all_on_write_returns_every_watch(fake: FakeConsul) -> None:
    fake.state.wake_all_on_write = True
    idx = index_of(fake, "/v1/health/service/web")
    thread, out = in_background(fake, f"/v1/health/service/web?index={idx}&wait=60s")
    fake.set_service_health("db", "n2", "critical")
    thread.join(10)
    assert int(out["result"][1]["X-Consul-Index"]) > idx
    assert out["result"][2] == get(fake, "/v1/health/service/web")[2]


def test_snapshot_restore_lowers_the_index(fake: FakeConsul) -> None:
    idx = index_of(fake, "/v1/health/service/web")
    thread, out = in_background(fake, f"/v1/health/service/web?index={idx}&wait=60s")
    fake.restore_snapshot(2)
    thread.join(10)
    assert int(out["result"][1]["X-Consul-Index"]) == 2 < idx
    # A client that keeps its old index blocks (Consul's blockingQuery) until wait ends...
    t0 = time.monotonic()
    _, headers, _ = get(fake, f"/v1/health/service/web?index={idx}&wait=300ms")
    assert time.monotonic() - t0 >= 0.3 and int(headers["X-Consul-Index"]) == 2
    # ...while one that reset to 0 gets the data at once.
    assert len(get(fake, "/v1/health/service/web?index=0")[2]) == 2


# -- consistency, scoping -----------------------------------------------------------------------


def test_stale_headers_and_a_lost_leader(fake: FakeConsul) -> None:
    _, headers, _ = get(fake, "/v1/health/service/web?stale")
    assert headers["X-Consul-KnownLeader"] == "true"
    assert headers["X-Consul-Effective-Consistency"] == "stale"
    assert headers["X-Consul-LastContact"] == "0"
    fake.set_leader(False, last_contact_ms=4200)
    status, _, body = get(fake, "/v1/health/service/web")
    assert (status, body) == (500, "No cluster leader")
    status, headers, _ = get(fake, "/v1/health/service/web?stale")
    assert status == 200 and headers["X-Consul-KnownLeader"] == "false"
    assert headers["X-Consul-LastContact"] == "4200"


def test_unknown_or_unreachable_datacenter(fake: FakeConsul) -> None:
    assert get(fake, "/v1/health/service/web?dc=nowhere")[:3:2] == (500,
                                                                     "No path to datacenter")
    fake.add_datacenter("dc2")
    assert get(fake, "/v1/health/service/web?dc=dc2")[0] == 200
    fake.set_datacenter_reachable("dc2", False)
    assert get(fake, "/v1/health/service/web?dc=dc2")[:3:2] == (500, "No path to datacenter")


def test_partitions_namespaces_and_peers(fake: FakeConsul) -> None:
    fake.add_partition("part-2")
    fake.add_namespace("team-a", partition="part-2")
    fake.register_node("p2-n1", "10.3.0.1", partition="part-2")
    fake.register_service("web", "p2-n1", id="web-p2", namespace="team-a",
                          partition="part-2")
    assert [p["Name"] for p in get(fake, "/v1/partitions")[2]] == ["default", "part-2"]
    assert [n["Name"] for n in get(fake, "/v1/namespaces?partition=part-2")[2]] == [
        "default", "team-a"]
    assert get(fake, "/v1/health/service/web?partition=part-2")[2] == []
    body = get(fake, "/v1/health/service/web?partition=part-2&ns=team-a")[2]
    assert [(e["Service"]["ID"], e["Service"]["Namespace"], e["Node"]["Partition"])
            for e in body] == [("web-p2", "team-a", "part-2")]
    assert get(fake, "/v1/catalog/services?partition=part-2&ns=*")[2] == {"web": []}
    fake.add_peer("cluster-02", remote_datacenter="dc9")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False)
    fake.register_service("pay", "c02-n1", id="pay-1", peer="cluster-02", port=7070)
    assert get(fake, "/v1/health/service/pay")[2] == []  # imported: only with ?peer=
    body = get(fake, "/v1/health/service/pay?peer=cluster-02")[2]
    assert body[0]["Service"]["PeerName"] == "cluster-02"
    assert body[0]["Node"]["PeerName"] == "cluster-02"
    assert get(fake, "/v1/catalog/services?peer=cluster-02")[2] == {"pay": []}
    # /v1/health/state takes no peer (Consul's HealthChecksInState does not parse it): the
    # local checks are answered, never the imported ones
    fake.set_service_health("pay-1", "c02-n1", "critical", peer="cluster-02")
    fake.set_service_health("db", "n2", "critical")
    for query in ("", "?peer=cluster-02"):
        checks = get(fake, "/v1/health/state/critical" + query)[2]
        assert [(c["CheckID"], c.get("PeerName", "")) for c in checks] == [("service:db", "")]
    peering = get(fake, "/v1/peerings")[2][0]
    assert peering["Name"] == "cluster-02" and peering["State"] == "ACTIVE"
    assert peering["StreamStatus"]["ImportedServices"] == ["pay"]
    assert peering["Remote"] == {"Partition": "default", "Datacenter": "dc9"}


def test_consul_ce_has_no_partitions() -> None:
    with FakeConsul(enterprise=False) as f:
        f.register_node("n1", "10.0.0.1")
        f.register_service("web", "n1")
        assert get(f, "/v1/partitions")[0] == 404
        assert get(f, "/v1/namespaces")[0] == 404
        entry = get(f, "/v1/health/service/web")[2][0]
        assert "Namespace" not in entry["Service"] and "Partition" not in entry["Node"]


def test_config_entries(fake: FakeConsul) -> None:
    fake.set_config_entry({"Kind": "service-resolver", "Name": "web",
                           "Failover": {"*": {"Targets": [{"Peer": "cluster-02"}]}}})
    fake.set_config_entry({"Kind": "sameness-group", "Name": "g1", "DefaultForFailover": True,
                           "Members": [{"Partition": "default"}, {"Peer": "cluster-02"}]})
    idx = index_of(fake, "/v1/config/service-resolver")
    entries = get(fake, "/v1/config/service-resolver")[2]
    assert entries[0]["Failover"]["*"]["Targets"] == [{"Peer": "cluster-02"}]
    assert entries[0]["Namespace"] == "default" and entries[0]["ModifyIndex"] == idx - 1
    assert get(fake, "/v1/config/sameness-group/g1")[2]["DefaultForFailover"] is True
    assert get(fake, "/v1/config/service-resolver/nope")[0] == 404
    thread, out = in_background(fake, f"/v1/config/service-resolver?index={idx}&wait=60s")
    fake.delete_config_entry("service-resolver", "web")
    thread.join(10)
    assert out["result"][2] == []


# -- virtual IPs --------------------------------------------------------------------------------


def test_virtual_ips_are_allocated_for_mesh_services(fake: FakeConsul) -> None:
    fake.add_sidecar("web-1", "n1")
    fake.add_sidecar("web-2", "n2")
    fake.add_sidecar("db", "n2")
    body = get(fake, "/v1/health/connect/web")[2]
    assert [e["Service"]["Kind"] for e in body] == ["connect-proxy", "connect-proxy"]
    assert {e["Service"]["TaggedAddresses"]["consul-virtual"]["Address"] for e in body} == {
        "240.0.0.1"}
    assert fake.virtual_ip("db") == "240.0.0.2"
    # The app instances themselves carry none.
    assert all("consul-virtual" not in (e["Service"].get("TaggedAddresses") or {})
               for e in get(fake, "/v1/health/service/web")[2])
    # Freed with the last mesh instance, then reused.
    fake.deregister_service("db-sidecar-proxy", "n2")
    assert fake.virtual_ip("db") is None
    fake.register_node("n3", "10.0.0.3")
    fake.register_service("api", "n3", native=True)
    assert fake.virtual_ip("api") == "240.0.0.2"
    # An imported service has its own, distinct from a local one of the same name.
    fake.add_peer("p1")
    fake.register_node("pn", "10.9.0.1", peer="p1", serf=False)
    fake.register_service("web", "pn", id="web-p", peer="p1")
    fake.add_sidecar("web-p", "pn", peer="p1")
    assert fake.virtual_ip("web", peer="p1") not in (None, "240.0.0.1")


def test_sidecar_alias_check_follows_its_service(fake: FakeConsul) -> None:
    fake.add_sidecar("web-1", "n1")
    idx = index_of(fake, "/v1/health/connect/web")
    fake.set_service_health("web-1", "n1", "critical")
    assert index_of(fake, "/v1/health/connect/web") > idx
    checks = get(fake, "/v1/health/connect/web")[2][0]["Checks"]
    assert {c["Type"]: c["Status"] for c in checks if c["ServiceID"]}["alias"] == "critical"


def test_virtual_ips_can_be_off_and_set_by_hand(fake: FakeConsul) -> None:
    fake.state.auto_virtual_ips = False
    fake.add_sidecar("web-1", "n1")
    entry = get(fake, "/v1/health/connect/web")[2][0]
    assert "consul-virtual" not in entry["Service"].get("TaggedAddresses", {})  # omitempty
    fake.set_tagged_address("web-1-sidecar-proxy", "n1", "consul-virtual", "240.0.0.77", 21000)
    entry = get(fake, "/v1/health/connect/web")[2][0]
    assert entry["Service"]["TaggedAddresses"]["consul-virtual"] == {"Address": "240.0.0.77",
                                                                     "Port": 21000}


# -- ACLs ---------------------------------------------------------------------------------------

READ_ALL = {"node_prefix": {"": {"policy": "read"}}, "service_prefix": {"": {"policy": "read"}}}


def test_acl_tokens(fake: FakeConsul) -> None:
    fake.enable_acls()
    fake.add_token("full", {**READ_ALL, "peering": "read"})
    fake.add_token("web-only", {"node_prefix": {"": {"policy": "read"}},
                                "service": {"web": {"policy": "read"}}})
    fake.add_token("no-nodes", {"service_prefix": {"": {"policy": "read"}}})
    status, headers, body = get(fake, "/v1/health/service/web")  # anonymous: nothing
    assert status == 200 and body == [] and headers["X-Consul-Default-ACL-Policy"] == "deny"
    assert "X-Consul-Results-Filtered-By-ACLs" not in headers  # not for anonymous
    assert len(get(fake, "/v1/health/service/web", "full")[2]) == 2
    assert len(get(fake, "/v1/health/service/web", "full", bearer=True)[2]) == 2
    status, headers, body = get(fake, "/v1/health/service/web", "no-nodes")
    assert body == [] and headers["X-Consul-Results-Filtered-By-ACLs"] == "true"
    assert get(fake, "/v1/catalog/services", "web-only")[2] == {"web": ["v1"]}
    assert get(fake, "/v1/peerings", "web-only")[:3:2] == (403, "Permission denied")
    assert get(fake, "/v1/peerings", "full")[0] == 200
    assert get(fake, "/v1/agent/self", "full")[0] == 403
    assert get(fake, "/v1/health/service/web", "bogus")[:3:2] == (403, "ACL not found")


def test_the_shipped_policy_reads_everything_meshdns_needs(fake: FakeConsul) -> None:
    policy = json.loads((Path(__file__).resolve().parents[1] / "configs" / "consul" /
                         "meshdns-policy.json").read_text())
    fake.enable_acls()
    fake.add_token("meshdns", policy)
    fake.add_peer("p1")
    fake.set_config_entry({"Kind": "sameness-group", "Name": "g1", "Members": []})
    for path in ("/v1/health/service/web", "/v1/catalog/services", "/v1/catalog/nodes",
                 "/v1/health/state/any", "/v1/peerings", "/v1/partitions", "/v1/namespaces",
                 "/v1/config/service-resolver", "/v1/config/sameness-group", "/v1/query",
                 "/v1/agent/self", "/v1/catalog/datacenters"):
        status, headers, body = get(fake, path, "meshdns")
        assert status == 200, (path, body)
        assert "X-Consul-Results-Filtered-By-ACLs" not in headers, path
    assert get(fake, "/v1/config/sameness-group", "meshdns")[2][0]["Name"] == "g1"


# -- faults, listener, unix socket, log ---------------------------------------------------------


def test_injected_status_malformed_and_hang(fake: FakeConsul) -> None:
    fid = fake.add_fault(r"^/v1/health/service/", "status", status=429)
    status, _, body = get(fake, "/v1/health/service/web")
    assert status == 429 and "rate limit" in body
    assert get(fake, "/v1/catalog/services")[0] == 200
    fake.clear_faults(fid)
    fake.add_fault(r"/v1/catalog/services", "malformed", times=1)
    req = urllib.request.urlopen(fake.url + "/v1/catalog/services", timeout=10)
    assert req.status == 200 and "X-Consul-Index" in req.headers
    with pytest.raises(json.JSONDecodeError):
        json.loads(req.read())
    assert get(fake, "/v1/catalog/services")[0] == 200  # times=1: once only
    fake.add_fault(r"/v1/catalog/nodes", "hang")
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(fake.url + "/v1/catalog/nodes", timeout=0.5)
    fake.clear_faults()
    assert get(fake, "/v1/catalog/nodes")[0] == 200
    fake.add_fault(r"/v1/catalog/nodes", "drop", times=1)
    with pytest.raises((urllib.error.URLError, ConnectionError, http_remote_closed())):
        urllib.request.urlopen(fake.url + "/v1/catalog/nodes", timeout=5)


def http_remote_closed() -> type[Exception]:
    import http.client
    return http.client.RemoteDisconnected


def test_stop_and_start_the_listener(fake: FakeConsul) -> None:
    idx = index_of(fake, "/v1/health/service/web")
    thread, out = in_background(fake, f"/v1/health/service/web?index={idx}&wait=60s")
    fake.stop_listener()
    thread.join(10)
    assert not thread.is_alive() and "error" in out  # the long-poll was cut
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(fake.url + "/v1/catalog/services", timeout=5)
    with pytest.raises((ConnectionRefusedError, FileNotFoundError)):
        conn = UnixHTTPConnection(fake.unix_path)
        conn.request("GET", "/v1/catalog/services")
    fake.start_listener()
    assert get(fake, "/v1/catalog/services")[0] == 200


def test_unix_socket_and_the_request_log(fake: FakeConsul) -> None:
    conn = UnixHTTPConnection(fake.unix_path)
    conn.request("GET", "/v1/health/service/web?stale&index=0", headers={"X-Consul-Token": "t"})
    resp = conn.getresponse()
    assert resp.status == 200 and len(json.loads(resp.read())) == 2
    record = fake.requests()[-1]
    assert record["path"] == "/v1/health/service/web" and record["transport"] == "unix"
    assert ("stale", "") in [tuple(q) for q in record["query"]]
    assert record["headers"]["x-consul-token"] == "t"
    assert record["end"] >= record["start"] and record["status"] == 200 and record["bytes"] > 0


def test_concurrency_is_counted(fake: FakeConsul) -> None:
    fake.reset_log()
    idx = index_of(fake, "/v1/health/service/web")
    threads = [in_background(fake, f"/v1/health/service/web?index={idx}&wait=60s")[0]
               for _ in range(5)]
    assert fake.stats()["in_flight"] == 5
    fake.set_service_health("web-1", "n1", "warning")
    for t in threads:
        t.join(10)
    assert fake.max_in_flight == 5 and fake.stats()["in_flight"] == 0


def test_runs_as_a_process_driven_over_rpc(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_consul.py"),
                             "--unix", str(tmp_path / "c.sock")], stdout=subprocess.PIPE,
                            text=True)
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        url = line.split()[3]
        remote = RemoteFake(url)
        remote.register_node("n1", "10.0.0.1")
        remote.batch([["register_service", ["web", "n1"], {"port": 80}]])
        with urllib.request.urlopen(url + "/v1/health/service/web", timeout=10) as resp:
            assert json.loads(resp.read())[0]["Service"]["Port"] == 80
        assert remote.requests()[-1]["path"] == "/v1/health/service/web"
        with pytest.raises(RuntimeError, match="KeyError"):
            remote.register_service("x", "no-such-node")
    finally:
        stop_process(proc)


def test_identical_writes_keep_their_indexes(fake: FakeConsul) -> None:
    """As Consul's ensureServiceTxn/ensureCheckTxn: a re-registration that changes nothing
    moves no index; one that moves the address moves the service, not its check."""
    web, checks = index_of(fake, "/v1/health/service/web"), index_of(fake, "/v1/health/state/any")
    services = index_of(fake, "/v1/catalog/services")
    fake.register_service("web", "n1", id="web-1", port=8080, tags=["v1"])
    fake.register_node("n1", "10.0.0.1", meta={"rack": "r1"})
    fake.set_service_health("web-2", "n2", "passing")
    assert (index_of(fake, "/v1/health/service/web"), index_of(fake, "/v1/health/state/any"),
            index_of(fake, "/v1/catalog/services")) == (web, checks, services)
    fake.register_service("web", "n1", id="web-1", port=8080, tags=["v1"], address="10.0.7.7")
    assert index_of(fake, "/v1/health/service/web") > web
    assert index_of(fake, "/v1/catalog/services") > services
    assert index_of(fake, "/v1/health/state/any") == checks


def test_a_token_revoked_during_a_blocking_query(fake: FakeConsul) -> None:
    fake.enable_acls()
    fake.add_token("t", READ_ALL)
    idx = int(get(fake, "/v1/health/service/web", "t")[1]["X-Consul-Index"])
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(
        r=get(fake, f"/v1/health/service/web?index={idx}&wait=60s", "t")))
    thread.start()
    assert wait_for(lambda: fake.stats()["in_flight"] > 0)
    fake.delete_token("t")
    fake.set_service_health("web-1", "n1", "critical")
    thread.join(10)
    assert out["r"][0] == 403 and out["r"][2] == "ACL not found"


def test_the_enterprise_policy_reads_every_partition_and_namespace(fake: FakeConsul) -> None:
    policy = json.loads((Path(__file__).resolve().parents[1] / "configs" / "consul" /
                         "meshdns-policy-enterprise.json").read_text())
    fake.add_partition("part-2")
    fake.add_namespace("team-a", partition="part-2")
    fake.register_node("p2-n1", "10.3.0.1", partition="part-2")
    fake.register_service("api", "p2-n1", partition="part-2", namespace="team-a")
    fake.add_peer("p9", partition="part-2")
    fake.enable_acls()
    fake.add_token("meshdns", policy)
    scope = "partition=part-2&ns=team-a"
    for path in (f"/v1/health/service/api?{scope}", f"/v1/catalog/services?{scope}",
                 "/v1/catalog/nodes?partition=part-2", f"/v1/health/state/any?{scope}",
                 "/v1/partitions", "/v1/peerings?partition=part-2", "/v1/agent/self"):
        status, headers, body = get(fake, path, "meshdns")
        assert status == 200 and body, (path, body)
        assert "X-Consul-Results-Filtered-By-ACLs" not in headers, path
