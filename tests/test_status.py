"""The status page at the admin endpoint's ``/``: what it lists, that it changes nothing, that
every name it echoes is escaped, and that the catalog analysis runs once per snapshot.

Most tests start ``meshdns serve`` and read the page over HTTP; the HTML is checked with the
standard library's parser (no <script> element can appear, whatever names clients send).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import struct
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import yaml
from aiohttp.test_utils import TestClient, TestServer
from conftest import EXAMPLE_CATALOG, MeshdnsProcess, wait_for

import meshdns.status as status
from meshdns.admin import make_app
from meshdns.catalog.file import load_snapshot
from meshdns.catalog.source import SourceState
from meshdns.config import Config
from meshdns.metrics import Metrics
from meshdns.responder import Responder
from meshdns.topnames import TopNames


def get(server: MeshdnsProcess, path: str) -> tuple[int, dict[str, str], str]:
    url = f"http://127.0.0.1:{server.admin_port}{path}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.status, dict(response.headers), response.read().decode()


class Page(HTMLParser):
    """Every start tag, and the text of each table row of each section (by section id)."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.rows: dict[str, list[list[str]]] = {}
        self._section = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.pre: list[str] = []
        self._in_pre = False
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.append(tag)
        if tag == "section":
            self._section = dict(attrs).get("id") or ""
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "pre":
            self._in_pre = True

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._row is not None and self._cell is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.setdefault(self._section, []).append(self._row)
            self._row = None
        elif tag == "pre":
            self._in_pre = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        if self._in_pre:
            self.pre.append(data)


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_page_lists_failover_counts_and_unhealthy(start_server, tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE_CATALOG.read_text())
    data["services"].append({"name": "ghost", "node": "node-1", "port": 1,
                             "health": "critical"})
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(yaml.safe_dump(data))
    server = start_server(catalog=catalog)
    code, headers, body = get(server, "/")
    assert code == 200 and headers["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    page = Page(body)
    failover = {(r[0], r[2]): r[3] for r in page.rows["failover"][1:]}
    assert failover[("payments", "default")] == \
        "peer cluster-02, partition default, namespace default"
    assert failover[("search", "default")] == \
        "datacenter dc1, partition part-2, namespace default"
    assert failover[("api", "part-2")] == "datacenter dc1, partition default, namespace default"
    why = {r[0]: r[4] for r in page.rows["failover"][1:]}
    assert why["payments"].startswith("failover target 1 of 2 of payments")
    assert why["search"].startswith("member 2 of 3 of sameness group mesh-east")
    unhealthy = [r[0] for r in page.rows["unhealthy"] if r[0] != "service"]
    assert unhealthy.count("ghost") == 2  # NXDOMAIN locally, and healthy nowhere
    counts = {(r[0], r[1]): r[2:] for r in page.rows["counts"][1:]}
    assert counts[("dc1", "default")][0] == "8"  # nodes
    assert ("peer cluster-02", "default") in counts and ("dc2", "default") in counts
    assert ("dc1", "part-2") in counts
    source = {r[0]: r[1] for r in page.rows["source"]}
    assert source["kind"] == "file" and str(catalog) in source["file"]
    assert source["last error"] == "none"


def test_a_broken_edit_shows_on_the_page(start_server, tmp_path: Path) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(EXAMPLE_CATALOG.read_text())
    server = start_server(catalog=catalog)
    replace_file(catalog, "nodes:\n  - {name: n1}\n")

    def broken() -> bool:
        source = {r[0]: r[1] for r in Page(get(server, "/")[2]).rows["source"]}
        return "catalog.yaml:2" in source["last error"]
    assert wait_for(broken, 10)


def test_query_rates_and_frequent_nxdomain_names(start_server) -> None:
    """A name asked 40 times (39 of them answered from the cache on the UDP hot path) tops the
    NXDOMAIN list above names asked once; the rates count every query by kind and rcode."""
    server = start_server(catalog=EXAMPLE_CATALOG)
    for _ in range(40):
        assert server.query("paymnets.service.consul").rcode() == 3
    for i in range(15):
        server.query(f"other-{i}.service.consul")
    for _ in range(5):
        server.query("web.service.consul")
    page = Page(get(server, "/")[2])
    rows = page.rows["nxdomain"][1:]
    assert rows[0] == ["paymnets.service.consul", "40"]
    assert {r[0] for r in rows[1:]} == {f"other-{i}.service.consul" for i in range(15)}
    rates = {(r[0], r[1]): int(r[2]) for r in page.rows["rates"][1:]}
    assert rates[("service", "NXDOMAIN")] == 55
    assert rates[("service", "NOERROR")] == 5


def test_explain_form_and_nothing_changes(start_server) -> None:
    server = start_server(catalog=EXAMPLE_CATALOG)
    metrics_before = get(server, "/metrics")[2]
    for _ in range(3):
        code, _, body = get(server, "/?name=payments.service.consul&type=A")
        assert code == 200
        text = "".join(Page(body).pre)
        assert "why: failover target 1 of 2 of payments" in text
        assert "payments.service.consul. 0 IN A 10.102.0.1" in text
        get(server, "/v1/explain?name=nope.service.consul")
    # explaining is not querying: no counter moved, no NXDOMAIN name recorded
    queries = [line for line in get(server, "/metrics")[2].splitlines()
               if line.startswith("meshdns_queries_total")]
    assert queries == [line for line in metrics_before.splitlines()
                       if line.startswith("meshdns_queries_total")] == []
    assert Page(get(server, "/")[2]).rows.get("nxdomain", [[]])[1:] == []
    bad = Page(get(server, "/?name=web.service.consul&type=NOPE")[2])
    assert bad.pre == []


HOSTILE = ["<script>alert(1)</script>", "\x00\x01\xff\"'&\x7f", "<img src=x onerror=alert(1)>"]
HOSTILE_NAME = ".".join(HOSTILE) + ".consul"
HOSTILE_SHOWN = ("<script>alert(1)</script>.\\000\\001\\255\"'&\\127."
                 "<img src=x onerror=alert(1)>.consul")


def raw_query(labels: list[bytes], qtype: int = 1) -> bytes:
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\x00"
    return struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + qname + \
        struct.pack("!HH", qtype, 1)


def test_hostile_names_are_escaped(start_server) -> None:
    server = start_server(catalog=EXAMPLE_CATALOG)
    labels = [label.encode("latin-1") for label in HOSTILE] + [b"consul"]
    for _ in range(3):
        reply = server.raw(raw_query(labels))
        assert reply is not None and reply[3] & 0xF == 3  # NXDOMAIN
    quoted = urllib.parse.quote(HOSTILE_NAME, safe="")
    for path in ("/", f"/?name={quoted}&type=A"):
        code, headers, body = get(server, path)
        page = Page(body)
        assert not {"script", "img"} & set(page.tags), path
        assert "<script" not in body and "<img" not in body
        assert "\x00" not in body and "\x7f" not in body
    nx = Page(get(server, "/")[2]).rows["nxdomain"][1:]
    assert nx == [[HOSTILE_SHOWN, "3"]]
    form = Page(get(server, f"/?name={quoted}")[2])
    assert "not a valid name" in "".join(form.pre)
    # JSON: no markup character at all in the body, and the name decodes back exactly
    code, headers, body = get(server, f"/v1/explain?name={quoted}")
    assert headers["Content-Type"].startswith("application/json")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert not set("<>&") & set(body)
    doc = json.loads(body)
    assert doc["name"] == HOSTILE_NAME + "."
    assert doc["rcode"] == "NXDOMAIN" and doc["query"]["kind"] == "invalid"
    # what the page shows (dig's \\DDD escapes) asks for the very same bytes when submitted
    shown = json.loads(get(server, "/v1/explain?name=" +
                           urllib.parse.quote(HOSTILE_SHOWN, safe=""))[2])
    assert shown["authority"] == doc["authority"] and shown["query"] == doc["query"]
    assert shown["udp_without_edns"] == doc["udp_without_edns"]


def test_analysis_runs_once_per_snapshot(monkeypatch) -> None:
    """Page views reuse the catalog analysis of the snapshot being served; a new snapshot gets
    one new analysis, in a thread (never a per-request walk of the catalog)."""
    calls: list[int] = []
    real = status.summarize

    def counting(snap, s):  # noqa: ANN001, ANN202 - a spy
        calls.append(snap.generation)
        return real(snap, s)
    monkeypatch.setattr(status, "summarize", counting)
    config = Config()

    def load(previous=None):  # noqa: ANN001, ANN202
        return load_snapshot(EXAMPLE_CATALOG, local_datacenter="dc1",
                             vip_range=config.virtual_ip_range, previous=previous)

    class Server:
        def __init__(self) -> None:
            self.config = config
            self.metrics = Metrics()
            self.responder = Responder(config, load(), self.metrics)
            self.state = SourceState("file", ready=True, detail={"file": "x.yaml"})
            self.bound = [("127.0.0.1", 53)]

        @property
        def snapshot(self):  # noqa: ANN202
            return self.responder.snapshot

    async def scenario() -> None:
        server = Server()
        async with TestClient(TestServer(make_app(server))) as client:  # type: ignore[arg-type]
            for _ in range(5):
                response = await client.get("/")
                assert response.status == 200
                assert "payments" in await response.text()
            server.responder.swap(load(server.snapshot))
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:  # the next analysis waits 20x the last one
                if "generation <span id=analysed>2</span>" in await (await client.get("/")).text():
                    break
                await asyncio.sleep(0.01)
            for _ in range(3):
                assert (await client.get("/")).status == 200
            assert (await client.post("/")).status == 405
    asyncio.run(scenario())
    assert calls == [1, 2]


def test_a_churning_catalog_is_not_reanalysed_on_every_load(monkeypatch) -> None:
    """Snapshots swapped on every page load (Consul under churn): an analysis that takes
    50 ms starts again only after 20 x 50 ms; meanwhile the page shows the previous one."""
    calls: list[int] = []
    real = status.summarize

    def slow(snap, s):  # noqa: ANN001, ANN202 - a spy that takes 50 ms
        calls.append(snap.generation)
        time.sleep(0.05)
        out = real(snap, s)
        out.seconds = 0.05
        return out
    monkeypatch.setattr(status, "summarize", slow)
    config = Config()
    snap = load_snapshot(EXAMPLE_CATALOG, local_datacenter="dc1",
                         vip_range=config.virtual_ip_range)
    responder = Responder(config, snap)

    class Server:
        def __init__(self) -> None:
            self.config, self.metrics, self.responder = config, Metrics(), responder
            self.state = SourceState("file", ready=True)

        @property
        def snapshot(self):  # noqa: ANN202
            return self.responder.snapshot

    async def scenario() -> list[str]:
        page = status.StatusPage(Server())  # type: ignore[arg-type]
        seen = []
        started = time.monotonic()
        while time.monotonic() - started < 0.6:
            responder.swap(load_snapshot(EXAMPLE_CATALOG, local_datacenter="dc1",
                                         vip_range=config.virtual_ip_range,
                                         previous=responder.snapshot))
            summary = await page.summary()
            seen.append(summary.generation if summary else None)
        return seen
    seen = asyncio.run(scenario())
    assert len(calls) == 1 and len(seen) > 3
    assert set(seen) == {calls[0]}  # the one analysis, shown on every load


# ---------------------------------------------------------------------------------------------
# the NXDOMAIN sketch (pure)
# ---------------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Entry:
    def __init__(self) -> None:
        self.turn = 7


def test_sketch_memory_is_bounded_and_keeps_heavy_hitters() -> None:
    clock = Clock()
    top = TopNames(window=600, buckets=10, k=16, watch_limit=100, clock=clock)
    cache: dict[bytes, Entry] = {}
    rng = random.Random(1)
    biggest = 0
    for i in range(60_000):
        if i % 10 == 0:
            top.add("typo.service.consul")
        name = f"{rng.getrandbits(64):x}.service.consul"
        key = name.encode()
        cache[key] = Entry()
        top.seen(name, cache, key)
        if len(cache) > 500:
            cache.pop(next(iter(cache)))
        if i % 1000 == 0:
            clock.now += 30  # 30 minutes in all: buckets close and expire
        biggest = max(biggest, top.size())
    assert biggest <= 10 * 2 * 16 + 100
    ((name, count),) = top.top(1)  # ~2,000 of its 6,000 asks fall in the last 10 minutes
    assert name == "typo.service.consul" and 1800 <= count <= 2000


def test_sketch_counts_cache_hits_and_forgets_old_buckets() -> None:
    clock = Clock()
    top = TopNames(window=600, buckets=10, clock=clock)
    cache: dict[bytes, Entry] = {}
    entry = cache[b"k"] = Entry()
    top.seen("a.consul", cache, b"k")
    entry.turn += 9  # nine hits on the hot path
    assert top.top() == [("a.consul", 10)]
    entry.turn += 5
    del cache[b"k"]  # evicted: its last hits count, then it is forgotten
    assert top.top() == [("a.consul", 15)]
    entry.turn += 100
    assert top.top() == [("a.consul", 15)]
    clock.now += 601
    assert top.top() == []


def test_failing_check_names_are_used_when_the_source_has_them() -> None:
    from meshdns.trace import health_reason

    class Node:
        name, health = "node-2", "passing"

    class Inst:
        id, status, node, checks = "payments-1", "critical", Node(), (("serfHealth", "passing"),
                                                                       ("service:payments-1",
                                                                        "critical"))
    assert health_reason(Inst()) == "check service:payments-1 is critical"
    Inst.checks = ()
    assert health_reason(Inst()) == "service payments-1 is critical"
    Node.health = "maintenance"
    assert health_reason(Inst()) == "node node-2 is in maintenance"

