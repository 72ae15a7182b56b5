"""``meshdns explain`` and ``GET /v1/explain``: why a name gets its answer.

Every test asks a real server: explain's document comes from the server's admin endpoint (or
the CLI), and its final answer is compared with what the same server sends over the wire for
the same name (UDP, its cache and fast path included, and TCP). The assertions are on the
reasons (which locality, why it was tried, why each instance was kept or dropped), not only on
the answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest
import yaml
from conftest import EXAMPLE_CATALOG, MESHDNS, MeshdnsProcess


def explain_http(server: MeshdnsProcess, name: str, rdtype: str = "A") -> dict:
    query = urllib.parse.urlencode({"name": name, "type": rdtype})
    url = f"http://127.0.0.1:{server.admin_port}/v1/explain?{query}"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/json")
        return json.loads(response.read())


def wire_lines(msg: dns.message.Message, section: str = "answer") -> list[str]:
    return sorted(line for rrset in getattr(msg, section) for line in rrset.to_text().splitlines())


def check_same_as_wire(server: MeshdnsProcess, doc: dict) -> None:
    """The explained answer is what the server sends: over TCP (the full reply) and over UDP
    with EDNS, asked twice so the second comes from the response cache (or the fast path)."""
    name, rdtype = doc["name"], doc["type"]
    tcp = server.query(name, rdtype, tcp=True)
    assert dns.rcode.to_text(tcp.rcode()) == doc["rcode"]
    assert wire_lines(tcp) == doc["answer"]
    assert wire_lines(tcp, "authority") == doc["authority"]
    assert wire_lines(tcp, "additional") == doc["additional"]
    for _ in range(2):
        udp = server.query(name, rdtype, edns=0, payload=65000)
        assert dns.rcode.to_text(udp.rcode()) == doc["rcode"]
        assert wire_lines(udp) == doc["answer"]
    # and a UDP query without EDNS gets what udp_without_edns says
    plain = server.query(name, rdtype)
    udp_doc = doc["udp_without_edns"]
    assert len([1 for rrset in plain.answer for _ in rrset]) == udp_doc["answers"]
    assert bool(plain.flags & dns.flags.TC) == udp_doc["truncated"]


def step_ids(step: dict) -> dict[str, tuple[bool, str]]:
    return {i["id"]: (i["used"], i["reason"]) for i in step["instances"]}


@pytest.fixture(scope="module")
def example(example_server: MeshdnsProcess) -> MeshdnsProcess:
    return example_server


# --------------------------------------------------------------------------------------------
# every lookup kind of the grammar
# --------------------------------------------------------------------------------------------


def test_service_lookup_reasons(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "web.service.consul")
    assert doc["query"] == {**doc["query"], "kind": "service", "service": "web", "tag": None,
                            "namespace": "default", "partition": "default",
                            "datacenter": "dc1", "peer": None, "sameness_group": None}
    assert any(d.startswith("namespace: default") for d in doc["query"]["defaults"])
    assert any(d.startswith("datacenter: dc1") for d in doc["query"]["defaults"])
    (step,) = doc["steps"]
    assert step["locality"] == {"datacenter": "dc1", "partition": "default",
                                "namespace": "default", "peer": None}
    assert step["why"].startswith("the service's own locality")
    ids = step_ids(step)
    assert ids["web-1"] == (True, "healthy")
    assert ids["web-3"][0] and "warning" in ids["web-3"][1]
    assert ids["web-4"] == (False, "node node-4 is in maintenance")
    assert doc["rcode"] == "NOERROR" and doc["aa"]
    assert doc["ttl"] == {"value": 0, "setting": "dns.service_ttl['*']"}
    check_same_as_wire(example, doc)


@pytest.mark.parametrize(("name", "rdtype", "kind", "where"), [
    ("web.service.dc2.consul", "A", "service", {"datacenter": "dc2", "peer": None}),
    ("web.service.dc2.dc.consul", "SRV", "service", {"datacenter": "dc2", "peer": None}),
    ("web.service.cluster-02.peer.consul", "A", "service",
     {"datacenter": None, "peer": "cluster-02"}),
    ("web.connect.consul", "SRV", "connect", {"datacenter": "dc1", "peer": None}),
    ("web.ingress.consul", "A", "ingress", {"datacenter": "dc1", "peer": None}),
    ("jobs.service.team-a.ns.part-2.ap.consul", "A", "service",
     {"datacenter": "dc1", "partition": "part-2", "namespace": "team-a"}),
])
def test_service_forms(example: MeshdnsProcess, name: str, rdtype: str, kind: str,
                       where: dict) -> None:
    doc = explain_http(example, name, rdtype)
    assert doc["query"]["kind"] == kind
    first = doc["steps"][0]["locality"]
    assert {k: first[k] for k in where} == where
    assert all(i["used"] for i in doc["steps"][-1]["instances"] if i["status"] == "passing")
    assert doc["answer"]
    check_same_as_wire(example, doc)


def test_rfc2782_tag_reasons(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "_web._v2.service.consul", "SRV")
    assert doc["query"]["tag"] == "v2" and doc["query"]["service"] == "web"
    ids = step_ids(doc["steps"][0])
    assert ids["web-2"] == (True, "healthy")
    assert ids["web-1"] == (False, "no tag v2 (has: primary, v1)")
    assert ids["web-4"] == (False, "node node-4 is in maintenance")
    check_same_as_wire(example, doc)


@pytest.mark.parametrize(("name", "rdtype", "kind", "note"), [
    ("web.virtual.consul", "A", "virtual", "virtual IP of web"),
    ("web.virtual.cluster-02.consul", "A", "virtual", "240.0.0.20"),
    ("web.virtual.cluster-02.peer.consul", "A", "virtual", "240.0.0.20"),
    ("cache.virtual.consul", "A", "virtual", "has no virtual IP"),
    ("node-1.node.consul", "A", "node", "node node-1 in datacenter dc1"),
    ("dc2-node-1.node.dc2.consul", "TXT", "node", "datacenter dc2"),
    ("nope.node.consul", "A", "node", "no node 'nope'"),
    ("0a000114.addr.consul", "A", "addr", "the address 10.0.1.20"),
    ("0a000114.addr.consul", "SRV", "addr", "no catalog look-up"),
    ("consul", "SOA", "apex", "SOA is answered for any name"),
    ("consul", "A", "apex", "only SOA and NS"),
    ("ns.consul", "A", "nameserver", "target of the NS record"),
    ("1.1.0.10.in-addr.arpa", "PTR", "ptr", "node-1.node.dc1.consul."),
    ("web.service.dc9.consul", "A", "service", "unknown datacenter 'dc9'"),
    ("nope.query.consul", "A", "query", "no prepared query named 'nope'"),
])
def test_other_kinds(example: MeshdnsProcess, name: str, rdtype: str, kind: str,
                     note: str) -> None:
    doc = explain_http(example, name, rdtype)
    assert doc["query"]["kind"] == kind
    assert any(note in n for n in doc["notes"]), doc["notes"]
    check_same_as_wire(example, doc)


@pytest.mark.parametrize(("name", "reason"), [
    ("foo.bar.consul", "no lookup keyword"),
    ("service.consul", "nothing left of the keyword 'service'"),
    ("web.service.cluster-02.peer.dc2.dc.consul", ".peer cannot be combined with .dc"),
    ("web.service.a.b.c.consul", "3 locality labels"),
    ("web.service.x.zz.consul", "'zz' is not a locality key"),
    ("zzzz.addr.consul", "8 (IPv4) or 32 (IPv6) hex digits"),
    ("0a00011g.addr.consul", "is not hex"),
    ("web.virtual.dc1.dc.consul", "a .virtual name takes no .dc"),
])
def test_invalid_names_say_why(example: MeshdnsProcess, name: str, reason: str) -> None:
    doc = explain_http(example, name)
    assert doc["query"]["kind"] == "invalid"
    assert reason in doc["query"]["invalid"]
    assert doc["rcode"] == "NXDOMAIN" and doc["steps"] == []
    check_same_as_wire(example, doc)


def test_nodata_and_nxdomain_service(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "db.service.consul", "A")  # IPv6-only: NODATA
    assert doc["rcode"] == "NOERROR" and doc["answer"] == [] and doc["authority"]
    assert "dns.soa.min_ttl" in doc["ttl"]["setting"]
    check_same_as_wire(example, doc)
    doc = explain_http(example, "nope.service.consul")
    assert doc["rcode"] == "NXDOMAIN"
    assert all(s["outcome"] == "no instance of nope here" for s in doc["steps"])
    assert any("no healthy instance in any locality" in n for n in doc["notes"])
    check_same_as_wire(example, doc)


def test_outside_the_domain(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "example.com")
    assert doc["rcode"] == "REFUSED" and doc["query"] is None
    assert any("not an open resolver" in n for n in doc["notes"])
    check_same_as_wire(example, doc)


# --------------------------------------------------------------------------------------------
# every failover path
# --------------------------------------------------------------------------------------------


def test_failover_entry_to_a_peer(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "payments.service.consul")
    first, second = doc["steps"]
    assert first["locality"]["datacenter"] == "dc1"
    assert step_ids(first) == {"payments-1": (False, "service payments-1 is critical"),
                               "payments-2": (False, "service payments-2 is critical")}
    assert first["outcome"] == "none of 2 instance(s) usable"
    assert second["locality"] == {"datacenter": None, "partition": "default",
                                  "namespace": "default", "peer": "cluster-02"}
    assert second["why"].startswith("failover target 1 of 2 of payments")
    assert all(i["used"] and i["reason"] == "healthy" for i in second["instances"])
    assert doc["answer"] == ["payments.service.consul. 0 IN A 10.102.0.1",
                             "payments.service.consul. 0 IN A 10.102.0.2"]
    check_same_as_wire(example, doc)
    srv = explain_http(example, "payments.service.consul", "SRV")
    assert all(".node.cluster-02.peer.consul." in line for line in srv["answer"])
    check_same_as_wire(example, srv)


def test_failover_entry_to_another_partition(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "api.service.part-2.ap.consul")
    first, second = doc["steps"]
    assert first["locality"]["partition"] == "part-2"
    assert {r for _, r in step_ids(first).values()} == {"service api-1 is critical",
                                                         "service api-2 is critical"}
    assert second["locality"]["partition"] == "default"
    assert second["why"].startswith("failover target 1 of 1 of api")
    check_same_as_wire(example, doc)


def test_default_sameness_group(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "search.service.consul")
    first, second = doc["steps"]
    assert step_ids(first) == {"search": (False, "service search is critical")}
    assert second["locality"]["partition"] == "part-2"
    assert second["why"].startswith("member 2 of 3 of sameness group mesh-east")
    assert "default_for_failover" in second["why"]
    check_same_as_wire(example, doc)


def test_sameness_group_lookup(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "search.service.mesh-east.sg.consul")
    assert doc["query"]["sameness_group"] == "mesh-east"
    assert "include_local" in doc["steps"][0]["why"]
    assert doc["steps"][1]["why"] == "member 2 of 3 of sameness group mesh-east"
    check_same_as_wire(example, doc)
    missing = explain_http(example, "search.service.nope.sg.consul")
    assert missing["rcode"] == "NXDOMAIN"
    assert any("no sameness group 'nope'" in n for n in missing["notes"])


def test_prepared_query_failover(example: MeshdnsProcess) -> None:
    doc = explain_http(example, "payments-any.query.consul", "SRV")
    assert doc["query"]["prepared_query"] == "payments-any"
    first, second = doc["steps"]
    assert first["why"] == "the prepared query's own datacenter dc1"
    assert second["why"] == "prepared-query failover: targets entry 1 of 2"
    assert second["locality"]["peer"] == "cluster-02"
    assert doc["ttl"] == {"value": 30, "setting": "prepared query payments-any: ttl"}
    check_same_as_wire(example, doc)
    tagged = explain_http(example, "web-nearest.query.consul")
    assert step_ids(tagged["steps"][0])["web-2"] == (False, "no tag v1 (has: v2)")
    check_same_as_wire(example, tagged)
    srv = explain_http(example, "_web-nearest._tcp.query.consul", "SRV")
    check_same_as_wire(example, srv)


def _variant(tmp_path: Path, edit) -> Path:  # noqa: ANN001 - a small editing callback
    data = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    edit(data)
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_failover_to_another_datacenter(start_server, tmp_path: Path) -> None:
    """cluster-02 down too (a node critical, a service critical): payments fails over to its
    second target, datacenter dc2; the prepared query's nearest_n goes to dc2 by RTT."""
    def edit(data: dict) -> None:
        for node in data["nodes"]:
            if node["name"] == "c02-node-1":
                node["health"] = "critical"
        for svc in data["services"]:
            if svc["name"] == "payments" and svc["node"] == "c02-node-2":
                svc["health"] = "critical"
        data["prepared_queries"].append({"name": "pay-near", "service": "payments",
                                         "failover": {"nearest_n": 1}})
    server = start_server(catalog=_variant(tmp_path, edit))
    doc = explain_http(server, "payments.service.consul")
    dc1, c02, dc2 = doc["steps"]
    assert sorted((i["node"], i["reason"]) for i in c02["instances"]) == [
        ("c02-node-1", "node c02-node-1 is critical"),
        ("c02-node-2", "service payments is critical")]
    assert dc2["locality"] == {"datacenter": "dc2", "partition": "default",
                               "namespace": "default", "peer": None}
    assert dc2["why"] == "failover target 2 of 2 of payments (catalog failover)"
    assert {i["id"] for i in dc2["instances"] if i["used"]} == {"payments-dc2-1",
                                                                "payments-dc2-2"}
    check_same_as_wire(server, doc)
    near = explain_http(server, "pay-near.query.consul")
    assert near["steps"][1]["why"] == ("prepared-query failover: nearest_n 1 of 1 "
                                       "(datacenter dc2, rtt 12 ms)")
    check_same_as_wire(server, near)


def test_only_passing_and_ttl_settings(start_server) -> None:
    config = {"dns": {"only_passing": True, "service_ttl": {"web*": "30s", "*": "5s"},
                      "node_ttl": "7s"}}
    server = start_server(catalog=EXAMPLE_CATALOG, config=config)
    doc = explain_http(server, "web.service.consul")
    ids = step_ids(doc["steps"][0])
    assert ids["web-3"] == (False, "warning, and dns.only_passing is true")
    assert doc["ttl"] == {"value": 30, "setting": "dns.service_ttl['web*']"}
    check_same_as_wire(server, doc)
    doc = explain_http(server, "api.service.consul")
    assert doc["ttl"] == {"value": 5, "setting": "dns.service_ttl['*']"}
    doc = explain_http(server, "node-1.node.consul")
    assert doc["ttl"] == {"value": 7, "setting": "dns.node_ttl"}


@pytest.mark.parametrize("truncate", [False, True])
def test_udp_without_edns_trimming(start_server, tmp_path: Path, truncate: bool) -> None:
    def edit(data: dict) -> None:
        data["services"] += [{"name": "many", "id": f"many-{i}", "node": "node-1",
                              "address": f"10.7.0.{i}", "port": 80} for i in range(1, 6)]
    server = start_server(catalog=_variant(tmp_path, edit),
                          config={"dns": {"enable_truncate": truncate}})
    doc = explain_http(server, "many.service.consul")
    assert doc["udp_without_edns"]["answers"] == 3 and doc["udp_without_edns"]["of"] == 5
    assert doc["udp_without_edns"]["trimmed"]
    assert doc["udp_without_edns"]["truncated"] is truncate
    assert "dns.udp_answer_limit 3" in doc["udp_without_edns"]["why"]
    assert len(doc["answer"]) == 5
    check_same_as_wire(server, doc)


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MESHDNS, "explain", *args], capture_output=True, text=True,
                          timeout=30)


def test_cli_json_matches_the_server(example: MeshdnsProcess) -> None:
    """The CLI on the catalog file and on the live server (--server) give the same document
    as /v1/explain, and its answer is the wire's."""
    local = run_cli("payments.service.consul", "--catalog", str(EXAMPLE_CATALOG), "--json")
    assert local.returncode == 0, local.stderr
    doc = json.loads(local.stdout)
    remote = run_cli("payments.service.consul", "A", "--json", "--server",
                     f"http://127.0.0.1:{example.admin_port}")
    assert remote.returncode == 0, remote.stderr
    live = json.loads(remote.stdout)
    http = explain_http(example, "payments.service.consul")
    for key in ("name", "type", "query", "steps", "rcode", "answer"):
        assert doc[key] == live[key] == http[key], key
    check_same_as_wire(example, doc)


def test_cli_text(example: MeshdnsProcess) -> None:
    out = run_cli("payments.service.consul", "--catalog", str(EXAMPLE_CATALOG))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "read as: service lookup payments" in text
    assert "dropped payments-1 on node-2 10.0.1.2:7070 critical: service payments-1 is " \
           "critical" in text
    assert "why: failover target 1 of 2 of payments" in text
    assert "payments.service.consul. 0 IN A 10.102.0.1" in text
    assert "ttl: 0 from dns.service_ttl['*']" in text
    # the answer lines are what dig prints (whitespace aside)
    dig = example.dig("+noall", "+answer", "payments.service.consul", "A")
    for line in dig.strip().splitlines():
        assert " ".join(line.split()) in text


def test_cli_exit_codes(tmp_path: Path) -> None:
    nx = run_cli("nope.service.consul", "--catalog", str(EXAMPLE_CATALOG))
    assert nx.returncode == 0 and "rcode: NXDOMAIN" in nx.stdout  # explained, whatever rcode
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - {name: n1}\n")
    broken = run_cli("web.service.consul", "--catalog", str(bad))
    assert broken.returncode == 1
    assert re.search(r"bad\.yaml:\d+", broken.stderr) and "Traceback" not in broken.stderr
    down = run_cli("web.service.consul", "--server", "http://127.0.0.1:9")
    assert down.returncode == 1 and "cannot read" in down.stderr
    assert "Traceback" not in down.stderr
    badtype = run_cli("web.service.consul", "NOPE", "--catalog", str(EXAMPLE_CATALOG))
    assert badtype.returncode == 2 and "unknown record type" in badtype.stderr


def test_http_errors(example: MeshdnsProcess) -> None:
    base = f"http://127.0.0.1:{example.admin_port}/v1/explain"
    for query in ("", "?type=A", "?name=web.service.consul&type=BOGUS",
                  "?name=" + "a" * 70 + ".service.consul"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + query, timeout=5)
        assert err.value.code == 400
    request = urllib.request.Request(base + "?name=web.service.consul", method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request, timeout=5)
    assert err.value.code == 405  # GET only: nothing to change


def test_readme_example_is_what_explain_prints() -> None:
    """The README's "When an answer looks wrong" output is the command's output today."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("<!-- explain-example:start -->", 1)[1].split(
        "<!-- explain-example:end -->", 1)[0]
    lines = block.strip().removeprefix("```console").removesuffix("```").strip("\n")
    command, _, shown = lines.partition("\n")
    assert command == "$ meshdns explain payments.service.consul"
    out = subprocess.run([*MESHDNS, "explain", "payments.service.consul"], capture_output=True,
                         text=True, timeout=30, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == shown.rstrip("\n")
    assert (Path(__file__).resolve().parent.parent / "docs" / "status.png").read_bytes()[:4] \
        == b"\x89PNG"


def test_explain_in_consul_mode(start_server) -> None:
    """A server following (a fake) Consul: explain names the critical service check and the
    critical node check that hide instances, its answer is the wire's, and the status page shows
    the Consul source's state."""
    from conftest import wait_for
    from fake_consul import FakeConsul

    with FakeConsul() as fake:
        for i in (1, 2, 3):
            fake.register_node(f"n{i}", f"10.0.0.{i}")
        fake.register_service("web", "n1", id="web-1", address="10.0.1.1", port=80)
        fake.register_service("web", "n2", id="web-2", address="10.0.1.2", port=80,
                              status="critical")
        fake.register_service("web", "n3", id="web-3", address="10.0.1.3", port=80)
        fake.set_check("n3", "disk", "critical", name="disk full")
        server = start_server(config={"catalog": {"consul": {"address": fake.url}}})

        def ready() -> bool:
            return explain_http(server, "web.service.consul")["rcode"] == "NOERROR"
        assert wait_for(ready, 20)
        doc = explain_http(server, "web.service.consul")
        reasons = {i["id"]: (i["used"], i["reason"]) for i in doc["steps"][0]["instances"]}
        assert reasons["web-1"] == (True, "healthy")
        assert reasons["web-2"] == (False, "service web-2 is critical")
        assert reasons["web-3"] == (False, "node n3 is critical")
        assert doc["answer"] == ["web.service.consul. 0 IN A 10.0.1.1"]
        check_same_as_wire(server, doc)
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}/",
                                    timeout=10) as response:
            page = response.read().decode()
        assert "<tr><td>kind</td><td>consul</td></tr>" in page
        assert "<tr><td>serving</td><td><span class=ok>yes</span></td></tr>" in page
