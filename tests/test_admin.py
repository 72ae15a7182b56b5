"""The admin HTTP endpoint (/health, /ready, /metrics, /v1/catalog) and the structured logs.

Each test starts ``meshdns serve --admin 127.0.0.1:0`` and talks to it over HTTP; /metrics is
parsed with ``prometheus_client``'s own parser, as a Prometheus server would read it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import dns.flags
import dns.message
import dns.rcode
import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import MeshdnsProcess, wait_for
from prometheus_client.parser import text_string_to_metric_families

from meshdns.admin import make_app
from meshdns.catalog.source import SourceState
from meshdns.config import Config

BIG = 40

CATALOG = """\
nodes:
  - {name: node-1, address: 10.0.0.1, meta: {rack: r1}}
  - {name: node-2, address: 10.0.0.2}
services:
  - {name: web, id: web-1, node: node-1, address: 10.0.1.1, port: 8080}
  - {name: web, id: web-2, node: node-2, address: 10.0.1.2, port: 8080}
  - {name: web-sidecar-proxy, id: web-1-proxy, node: node-1, port: 20000,
     kind: connect-proxy, destination: web}
""" + "".join(
    f"  - {{name: big, id: big-{i}, node: node-1, address: 10.9.0.{i + 1}, port: {9000 + i}}}\n"
    for i in range(BIG))

CONFIG = {"dns": {"enable_truncate": True}}


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG)
    return path


def get(server: MeshdnsProcess, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of an admin endpoint."""
    url = f"http://127.0.0.1:{server.admin_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


def scrape(server: MeshdnsProcess) -> dict[str, list]:
    """/metrics parsed by prometheus_client: samples by metric family name."""
    status, content_type, text = get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(metrics: dict[str, list], name: str) -> float:
    family = name.removesuffix("_total")
    (sample,) = [s for s in metrics[family] if s.name == name]
    return sample.value


def query_counts(metrics: dict[str, list]) -> dict[tuple[str, str, str], float]:
    return {(s.labels["kind"], s.labels["rcode"], s.labels["transport"]): s.value
            for s in metrics["meshdns_queries"] if s.name == "meshdns_queries_total"}


def replace_file(path: Path, text: str) -> None:
    """Write a new version of ``path`` the way editors and ConfigMaps do: whole, then rename."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# /health, /ready, /v1/catalog
# ----------------------------------------------------------------------------------------------


def test_health_and_ready(start_server, catalog: Path) -> None:
    server = start_server(catalog=catalog, config=CONFIG)
    assert server.admin_port
    status, _, body = get(server, "/health")
    assert status == 200 and body.strip() == "ok"
    # The catalog is loaded before the listeners start, so /ready answers 200 at once.
    status, _, body = get(server, "/ready")
    assert status == 200 and "generation 1" in body
    assert get(server, "/nope")[0] == 404


def test_catalog_summary(start_server, catalog: Path) -> None:
    server = start_server(catalog=catalog, config=CONFIG)
    status, content_type, body = get(server, "/v1/catalog")
    assert status == 200 and content_type.startswith("application/json")
    summary = json.loads(body)
    assert summary["generation"] == 1
    assert summary["counts"]["nodes"] == 2
    assert summary["counts"]["instances"] == 3 + BIG
    assert summary["counts"]["virtual_ips"] == 1
    assert summary["datacenters"] == ["dc1"]
    assert summary["partitions"] == ["default"]
    assert summary["peers"] == []
    assert {"web (dc1)", "big (dc1)"} <= set(summary["services"])
    assert summary["last_reload_error"] is None
    assert 0 <= summary["age_seconds"] < 60
    assert summary["serial"] > 0


# ----------------------------------------------------------------------------------------------
# /metrics
# ----------------------------------------------------------------------------------------------


def test_query_counters_are_exact(start_server, catalog: Path) -> None:
    """Queries of several kinds over UDP and TCP, most of them repeated (so answered from
    meshdns's response cache the second time): every one is counted once, by kind, rcode and
    transport; truncated replies are counted, cached or not."""
    server = start_server(catalog=catalog, config=CONFIG)
    before = scrape(server)
    assert query_counts(before) == {}
    assert value(before, "meshdns_truncated_total") == 0

    udp = [("web.service.consul", "A")] * 3 + [("nope.service.consul", "A")] * 2 \
        + [("web.virtual.consul", "A")] * 2 + [("example.com", "A")] * 2 \
        + [("0a000101.addr.consul", "A")] + [("web.service.consul", "AAAA")] * 2
    tcp = [("web.service.consul", "A")] * 2 + [("node-1.node.consul", "A")] * 2 \
        + [("big.service.consul", "SRV")] + [("example.com", "A")]
    for name, rdtype in udp:
        server.query(name, rdtype, edns=0)
    for name, rdtype in tcp:
        server.query(name, rdtype, tcp=True, edns=0)
    for _ in range(3):  # does not fit in 1232 bytes: TC every time
        reply = server.query("big.service.consul", "SRV", edns=0, payload=1232)
        assert reply.flags & dns.flags.TC
    # two malformed queries (no question: FORMERR) and a response sent as a query (dropped)
    header = struct.pack("!HHHHHH", 0x1234, 0x0100, 0, 0, 0, 0)
    for _ in range(2):
        reply = server.raw(header)
        assert reply is not None and reply[3] & 0xF == dns.rcode.FORMERR
    assert server.raw(struct.pack("!HHHHHH", 0x1235, 0x8100, 0, 0, 0, 0), timeout=0.3) is None

    after = scrape(server)
    assert query_counts(after) == {
        ("service", "NOERROR", "udp"): 3 + 2 + 3,  # A, AAAA (NODATA), SRV (truncated)
        ("service", "NXDOMAIN", "udp"): 2,
        ("virtual", "NOERROR", "udp"): 2,
        ("outside", "REFUSED", "udp"): 2,
        ("addr", "NOERROR", "udp"): 1,
        ("malformed", "FORMERR", "udp"): 2,
        ("service", "NOERROR", "tcp"): 2 + 1,
        ("node", "NOERROR", "tcp"): 2,
        ("outside", "REFUSED", "tcp"): 1,
    }
    assert value(after, "meshdns_truncated_total") == 3
    assert value(after, "meshdns_dropped_total") == 1


def test_latency_histogram(start_server, catalog: Path) -> None:
    server = start_server(catalog=catalog, config=CONFIG)
    for _ in range(5):
        server.query("web.service.consul", tcp=True)
    server.query("nope.service.consul", tcp=True)
    for _ in range(10):
        server.query("web.service.consul")

    def histogram() -> tuple[list[tuple[float, float]], float, float]:
        samples = scrape(server)["meshdns_query_duration_seconds"]
        buckets = [(float(s.labels["le"]), s.value) for s in samples
                   if s.name == "meshdns_query_duration_seconds_bucket"]
        (count,) = [s.value for s in samples if s.name == "meshdns_query_duration_seconds_count"]
        (total,) = [s.value for s in samples if s.name == "meshdns_query_duration_seconds_sum"]
        return buckets, count, total

    buckets, count, total = histogram()
    bounds = [b for b, _ in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == float("inf")
    counts = [c for _, c in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert counts[-1] == count
    # every TCP query is timed; UDP datagrams are sampled one in 64 (10 so far: none)
    assert count == 6
    assert 0 < total < 6 * 1.0

    for _ in range(64):  # exactly one of 64 consecutive datagrams is timed
        server.query("web.service.consul")
    buckets, count, _ = histogram()
    assert count == 7 and buckets[-1][1] == 7


def test_reloads_generation_errors_and_age(start_server, catalog: Path) -> None:
    server = start_server(catalog=catalog, config=CONFIG)
    first = scrape(server)
    assert value(first, "meshdns_catalog_generation") == 1
    assert value(first, "meshdns_catalog_reloads_total") == 0
    assert value(first, "meshdns_catalog_reload_errors_total") == 0
    assert value(first, "meshdns_catalog_nodes") == 2
    time.sleep(0.5)
    age = value(scrape(server), "meshdns_catalog_age_seconds")
    assert age >= 0.5

    # a good edit: a new service; the generation goes up and the catalog is young again
    replace_file(catalog, CATALOG + "  - {name: api, node: node-2, port: 9090}\n")
    assert wait_for(lambda: value(scrape(server), "meshdns_catalog_generation") == 2)
    metrics = scrape(server)
    assert value(metrics, "meshdns_catalog_reloads_total") == 1
    assert value(metrics, "meshdns_catalog_age_seconds") < age
    assert server.query("api.service.consul").answer

    # a broken edit: refused, counted, the last good catalog keeps serving
    replace_file(catalog, CATALOG + "  - {name: api, node: no-such-node}\n")
    assert wait_for(lambda: value(scrape(server), "meshdns_catalog_reload_errors_total") == 1)
    metrics = scrape(server)
    assert value(metrics, "meshdns_catalog_generation") == 2
    assert value(metrics, "meshdns_catalog_reloads_total") == 1
    assert server.query("api.service.consul").answer
    summary = json.loads(get(server, "/v1/catalog")[2])
    assert summary["generation"] == 2
    assert "catalog.yaml" in summary["last_reload_error"]
    assert get(server, "/ready")[0] == 200  # still fresh enough to serve
    errors = [e for e in server.logs() if e["level"] == "error"]
    assert any("catalog.yaml:" in e["msg"] and "no-such-node" in e["msg"] for e in errors), errors

    # fixed again: a new generation, and the error is cleared
    replace_file(catalog, CATALOG)
    assert wait_for(lambda: value(scrape(server), "meshdns_catalog_generation") == 3)
    assert json.loads(get(server, "/v1/catalog")[2])["last_reload_error"] is None


def test_metrics_exposition_is_well_formed(start_server, catalog: Path) -> None:
    """Every family has a type; counters only go up; names follow Prometheus conventions."""
    server = start_server(catalog=catalog, config=CONFIG)
    server.query("web.service.consul")
    _, _, text = get(server, "/metrics")
    families = list(text_string_to_metric_families(text))
    names = {f.name for f in families}
    assert {"meshdns_queries", "meshdns_query_duration_seconds", "meshdns_truncated",
            "meshdns_catalog_generation", "meshdns_catalog_age_seconds",
            "meshdns_catalog_reloads", "meshdns_catalog_reload_errors"} <= names
    types = {f.name: f.type for f in families}
    assert types["meshdns_queries"] == "counter"
    assert types["meshdns_query_duration_seconds"] == "histogram"
    assert types["meshdns_catalog_generation"] == "gauge"
    for family in families:
        assert re.fullmatch(r"meshdns_[a-z0-9_]+", family.name), family.name
        for sample in family.samples:
            assert sample.value >= 0, sample
    assert text.endswith("\n")


# ----------------------------------------------------------------------------------------------
# Logs
# ----------------------------------------------------------------------------------------------

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def check_log_lines(server: MeshdnsProcess) -> list[dict]:
    lines = server.log_path.read_text().splitlines()
    assert lines
    entries = []
    for line in lines:
        entry = json.loads(line)  # one JSON object per line, nothing else on stderr
        assert isinstance(entry, dict)
        assert {"ts", "level", "msg"} <= entry.keys(), entry
        assert TS.fullmatch(entry["ts"]), entry
        assert entry["level"] in {"debug", "info", "warning", "error", "critical"}, entry
        entries.append(entry)
    return entries


def test_logs_are_json_lines_at_the_configured_level(start_server, catalog: Path,
                                                     tmp_path: Path) -> None:
    server = start_server(catalog=catalog, config=CONFIG)
    server.query("web.service.consul")
    entries = check_log_lines(server)
    assert not [e for e in entries if e["level"] == "debug"]
    assert any(e["msg"].startswith("serving DNS on 127.0.0.1:") for e in entries)
    assert any(e["msg"].startswith("admin endpoint on http://127.0.0.1:") for e in entries)
    server.stop()
    assert any(e["msg"] == "stopped" for e in check_log_lines(server))

    debug_dir = tmp_path / "debug"
    debug_dir.mkdir()
    debug = MeshdnsProcess(debug_dir, catalog, {**CONFIG, "log_level": "debug"})
    try:
        debug.query("web.service.consul")
        entries = check_log_lines(debug)
        assert [e for e in entries if e["level"] == "debug"], entries
    finally:
        debug.stop()


# ----------------------------------------------------------------------------------------------
# /ready and a catalog that keeps failing to reload (in-process: five minutes are not waited)
# ----------------------------------------------------------------------------------------------


class _Snapshot:
    generation = 7


class _Server:
    """What /ready reads of a DnsServer."""

    def __init__(self, loaded_ago: float, failing_for: float | None,
                 limit: float | None) -> None:
        self.config = Config(admin={"ready_max_reload_failure": limit})
        self.snapshot = _Snapshot()
        self.snapshot.loaded_at = time.time() - loaded_ago
        self.bound = [("127.0.0.1", 53)]
        self.draining = False
        self.state = SourceState(
            "file", ready=True,
            last_error=None if failing_for is None else "catalog.yaml:3: nodes: bad",
            failing_since=None if failing_for is None else time.time() - failing_for)


@pytest.mark.parametrize(("loaded_ago", "failing_for", "limit", "status"), [
    (3600, None, 300, 200),   # an old catalog that nobody edited is fine
    (3600, 10, 300, 200),     # a broken edit just now: keep serving the last good one
    (3600, 301, 300, 503),    # failing for longer than ready_max_reload_failure: not ready
    (10, 301, 300, 503),
    (3600, 86400, None, 200),  # the default: failed reloads never make a replica unready
])
def test_ready_follows_how_long_reloads_have_failed(loaded_ago: float, failing_for: float | None,
                                                    limit: float | None, status: int) -> None:
    async def ask() -> tuple[int, str]:
        server = _Server(loaded_ago, failing_for, limit)
        async with TestClient(TestServer(make_app(server))) as client:  # type: ignore[arg-type]
            response = await client.get("/ready")
            return response.status, await response.text()

    got, text = asyncio.run(ask())
    assert got == status, text
    if status == 503:
        assert "catalog.yaml:3" in text
