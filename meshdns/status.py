"""The status page (``GET /``) and ``GET /v1/explain`` of the admin endpoint.

One server-rendered HTML page with no external assets (it must work in an air-gapped cluster):
where the catalog comes from and how fresh it is, counts by locality, the services answering
from failover right now and those with no healthy instance anywhere, query rates, the most
frequent NXDOMAIN names, and a form that runs ``meshdns explain``.

Nothing here changes anything (GET only; explain renders without caching or counting), every
name is escaped byte by byte, and the packet path pays nothing: the catalog analysis runs in a
thread once per snapshot, the query rates are read at most every few seconds, and the NXDOMAIN
sketch is fed on the miss path (topnames.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import html
import time
import weakref
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .catalog.snapshot import Snapshot
from .explain import ExplainError, explain, record_type, render_text, to_json
from .names import Query
from .offload import in_thread
from .resolve import NOERROR, A, Settings, resolve
from .trace import Trace

if TYPE_CHECKING:
    from .server import DnsServer

MAX_NAME = 1024  # characters of a name the form or /v1/explain accepts
RATES_EVERY = 5.0  # seconds between two reads of the query counters (they walk the cache)
ANALYSE_LIMIT = 1000  # unhealthy local services resolved (with failover) per snapshot
ANALYSIS_SHARE = 20  # a new analysis waits 20x the last one's duration (<= 5% of a core)
MIN_ANALYSIS_GAP = 0.0  # seconds; the share alone bounds the cost
SHOWN = 200  # rows of a list on the page


# --- the catalog, once per snapshot -------------------------------------------------------


@dataclass
class CatalogSummary:
    """What the page shows of one snapshot (computed in a thread, cached by snapshot)."""

    generation: int
    localities: list[dict[str, Any]] = field(default_factory=list)
    failing_over: list[dict[str, Any]] = field(default_factory=list)
    unanswered: list[dict[str, Any]] = field(default_factory=list)  # local lookups: NXDOMAIN
    nowhere: list[dict[str, Any]] = field(default_factory=list)  # no healthy instance anywhere
    not_analysed: int = 0  # unhealthy local services beyond ANALYSE_LIMIT
    seconds: float = 0.0


def summarize(snap: Snapshot, s: Settings, limit: int = ANALYSE_LIMIT) -> CatalogSummary:
    """Counts by locality, failover and unhealthy services of ``snap``.

    Which locality a service fails over to is found by the resolver itself (``resolve`` with a
    trace), for each local service with no healthy instance."""
    started = time.perf_counter()
    per_locality: dict[tuple[str, str, str], list[int]] = {}
    healthy_names: set[tuple[str, str]] = set()  # (namespace, name) healthy somewhere
    unhealthy: dict[tuple[str, str], list[str]] = {}  # (namespace, name) -> where it is down
    candidates: list[tuple[str, str, str]] = []  # (partition, namespace, name) in the local dc
    only_passing, local_dc = s.only_passing, s.local_dc
    # one pass over every key (100,000 services: ~0.5 s, in a thread): keep the loop lean
    for key, group in list(snap.services.items()):
        loc = key[:3]
        counts = per_locality.get(loc)
        if counts is None:
            counts = per_locality[loc] = [0, 0, 0, 0]
        usable = group.usable
        healthy = len(group.passing) if only_passing else len(usable)
        counts[0] += 1
        counts[1] += len(usable) + len(group.unusable)
        counts[2] += healthy
        if healthy:
            healthy_names.add(key[3:])
            continue
        peer, dc, partition, namespace, name = key
        unhealthy.setdefault((namespace, name), []).append(f"peer {peer}" if peer else dc)
        if not peer and dc == local_dc:
            candidates.append((partition, namespace, name))
    for peer, dc, partition, _name in list(snap.nodes):
        per_locality.setdefault((peer, dc, partition), [0, 0, 0, 0])[3] += 1
    for key in list(snap.failover):  # failover for a service with no local instance at all
        if key[1] == s.local_dc and key not in snap.services:
            candidates.append((key[2], key[3], key[4]))
    out = CatalogSummary(snap.generation)
    for (peer, dc, partition), (services, instances, healthy, nodes) in sorted(
            per_locality.items()):
        out.localities.append({"datacenter": dc or None, "peer": peer or None,
                               "partition": partition, "services": services,
                               "instances": instances, "healthy": healthy, "nodes": nodes})
    out.not_analysed = max(0, len(candidates) - limit)
    for partition, namespace, name in sorted(set(candidates))[:limit]:
        trace = Trace()
        query = Query("service", s.domain, name, None, namespace, partition)
        answer = resolve(query, A, snap, s, trace)
        used = [step for step in trace.steps if any(c.used for c in step.instances)]
        row = {"service": name, "namespace": namespace, "partition": partition}
        if answer.rcode == NOERROR and used:
            step = used[-1]
            row["to"] = _locality_text(step.locality)
            row["why"] = step.why
            row["instances"] = sum(1 for c in step.instances if c.used)
            out.failing_over.append(row)
        else:
            row["tried"] = len(trace.steps)
            out.unanswered.append(row)
    for (namespace, name), where in sorted(unhealthy.items()):
        if (namespace, name) not in healthy_names:
            out.nowhere.append({"service": name, "namespace": namespace,
                                "localities": sorted(set(where))})
    out.seconds = time.perf_counter() - started
    return out


def _locality_text(loc: tuple[str, str, str, str]) -> str:
    peer, dc, partition, namespace = loc
    return (f"peer {peer}" if peer else f"datacenter {dc}") + \
        f", partition {partition}, namespace {namespace}"


# --- escaping and headers -----------------------------------------------------------------


def shown(text: str) -> str:
    """A name as HTML text: bytes outside printable ASCII as dig's \\DDD, then HTML-escaped.
    (A query name may hold any byte; the wire parser keeps them as latin-1 characters.)"""
    out = []
    for ch in text:
        code = ord(ch)
        if 0x20 <= code < 0x7F:
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\{code:03d}")
        else:
            out.append("".join(f"\\{b:03d}" for b in ch.encode("utf-8", "surrogatepass")))
    return html.escape("".join(out), quote=True)


_CSS = """
body{font:15px/1.4 system-ui,sans-serif;margin:0;color:#1d2733;background:#f5f7fa}
header{background:#1d2733;color:#fff;padding:.8em 1em}header h1{font-size:1.2em;margin:0}
header p{margin:.2em 0 0;opacity:.85}main{max-width:70em;margin:auto;padding:0 .8em 2em}
section{background:#fff;border:1px solid #dde3ea;border-radius:6px;margin:1em 0;padding:.6em 1em}
h2{font-size:1.05em;margin:.3em 0 .6em}.wrap{overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:.92em}
th,td{text-align:left;padding:.25em .6em .25em 0;border-bottom:1px solid #eef1f4;
vertical-align:top}.n{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#b3261e;font-weight:600}.ok{color:#1e7d32;font-weight:600}.muted{color:#687685}
form{display:flex;flex-wrap:wrap;gap:.5em}input[type=text]{flex:1 1 16em;font:inherit;
padding:.35em}select,button{font:inherit;padding:.35em .8em}
pre{white-space:pre-wrap;word-break:break-all;background:#f5f7fa;padding:.6em;
border-radius:4px;font-size:.85em}
"""
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
SECURITY_HEADERS = {
    "Content-Security-Policy": f"default-src 'none'; style-src 'sha256-{_CSS_HASH}'; "
                               "form-action 'self'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_TYPES = ("A", "AAAA", "SRV", "TXT", "PTR", "ANY", "SOA", "NS")


# --- the page ------------------------------------------------------------------------------


def _table(head: list[str], rows: list[list[str]], numeric: frozenset[int] = frozenset()) -> str:
    """An HTML table; cells are already-escaped HTML."""
    out = ["<div class=wrap><table><tr>",
           *(f"<th class=n>{h}</th>" if i in numeric else f"<th>{h}</th>"
             for i, h in enumerate(head)), "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f"<td class=n>{c}</td>" if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>")
    out.append("</table></div>")
    return "".join(out)


def _ago(seconds: float | None) -> str:
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{seconds / 3600:.1f} h ago"


def _when(wall: float | None, now: float) -> str:
    if wall is None:
        return "never"
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(wall))
    return f"{stamp} ({_ago(now - wall)})"


def _detail(key: str, value: Any, now: float) -> str:
    """A source detail value as HTML: wall times (``last_success``, ``*_at``) as times."""
    if isinstance(value, float) and value > 1e9 and (key.startswith("last_success")
                                                     or key.endswith("_at")):
        return _when(value, now)
    return shown(str(value))


def render_page(view: dict[str, Any]) -> str:
    """The status page from ``StatusPage.view``'s plain values (pure; every name escaped)."""
    now = view["now"]
    e = shown
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        "<meta name=viewport content='width=device-width, initial-scale=1'>",
        f"<title>meshdns {e(view['domain'])} status</title><style>{_CSS}</style></head><body>",
        f"<header><h1>meshdns: {e(view['domain'])}. in datacenter {e(view['datacenter'])}</h1>",
        f"<p>catalog generation {view['generation']}, serial {view['serial']}; up "
        f"{_ago(view['uptime']).removesuffix(' ago')}</p></header><main>",
    ]
    # explain first: it is what someone on call came for
    form = view["form"]
    options = "".join(f"<option{' selected' if t == form['type'] else ''}>{t}</option>"
                      for t in _TYPES)
    parts.append("<section id=explain><h2>Explain a name</h2><form method=get action='/'>"
                 f"<input type=text name=name id=name placeholder='payments.service.consul' "
                 f"value='{shown(form['name'])}' aria-label=name>"
                 f"<select name=type id=type aria-label=type>{options}</select>"
                 "<button type=submit id=run>Explain</button></form>")
    if form["error"]:
        parts.append(f"<p class=bad id=explain-error>{e(form['error'])}</p>")
    if form["result"] is not None:
        text = "\n".join(shown(line) for line in form["result"].split("\n"))
        parts.append(f"<pre id=explain-result>{text}</pre>")
    parts.append("</section>")

    src = view["source"]
    rows = [["kind", e(src["kind"])]]
    rows += [["serving", "<span class=ok>yes</span>" if src["serving"] else
              "<span class=bad>no: SERVFAIL</span>"],
             ["last good read", _when(src.get("last_success"), now)],
             ["catalog loaded", _when(view["loaded_at"], now)]]
    if src.get("last_error"):
        lines = "<br>".join(e(line) for line in src["last_error"].splitlines())
        rows.append(["last error", f"<span class=bad>{lines}</span> (failing "
                     f"since {_when(src.get('failing_since'), now)})"])
    else:
        rows.append(["last error", "none"])
    rows.append(["updates refused", str(src["errors"])])
    for key, value in src.get("detail", {}).items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            head = sorted({k for v in value for k in v})  # e.g. Consul's watches, one a row
            cells = [[_detail(k, v.get(k, ""), now) for k in head] for v in value[:SHOWN]]
            rows.append([e(key), _table([e(h) for h in head], cells)])
        elif isinstance(value, dict):
            rows.append([e(key), ", ".join(f"{e(str(k))} {_detail(str(k), v, now)}"
                                           for k, v in value.items())])
        else:
            rows.append([e(key), _detail(key, value, now)])
    parts.append("<section id=source><h2>Catalog source</h2>" +
                 _table(["", ""], rows) + "</section>")

    summary: CatalogSummary | None = view["summary"]
    if summary is None:
        parts.append("<section><h2>Catalog</h2><p class=muted>analysing this snapshot; reload "
                     "the page in a moment</p></section>")
    else:
        rows = [[e(f"peer {r['peer']}" if r["peer"] else r["datacenter"]), e(r["partition"]),
                 str(r["nodes"]), str(r["services"]), str(r["instances"]), str(r["healthy"])]
                for r in summary.localities]
        if summary.generation != view["generation"]:
            parts.append(f"<p class=muted id=stale>The lists below are of generation "
                         f"{summary.generation}; generation {view['generation']} is being "
                         "analysed next.</p>")
        parts.append(f"<section id=counts><h2>By datacenter, partition and peer (generation "
                     f"<span id=analysed>{summary.generation}</span>)</h2>" +
                     _table(["datacenter / peer", "partition", "nodes", "services", "instances",
                             "healthy"], rows, frozenset({2, 3, 4, 5})) + "</section>")
        rows = [[e(r["service"]), e(r["namespace"]), e(r["partition"]), e(r["to"]),
                 e(r["why"]), str(r["instances"])] for r in summary.failing_over[:SHOWN]]
        parts.append(f"<section id=failover><h2>Answering from failover now "
                     f"({len(summary.failing_over)})</h2>" +
                     (_table(["service", "namespace", "partition", "answered from", "why",
                              "instances"], rows, frozenset({5})) if rows else
                      "<p class=muted>none: every local service answers from its own "
                      "instances</p>") + "</section>")
        rows = [[e(r["service"]), e(r["namespace"]), e(r["partition"]), str(r["tried"])]
                for r in summary.unanswered[:SHOWN]]
        rows2 = [[e(r["service"]), e(r["namespace"]), e(", ".join(r["localities"]))]
                 for r in summary.nowhere[:SHOWN]]
        more = (f"<p class=muted>{summary.not_analysed} more local services without a healthy "
                "instance were not analysed</p>") if summary.not_analysed else ""
        parts.append(
            f"<section id=unhealthy><h2>No healthy instance</h2>"
            f"<p>Local lookups answering NXDOMAIN, failover included "
            f"({len(summary.unanswered)}):</p>" +
            (_table(["service", "namespace", "partition", "localities tried"], rows,
                    frozenset({3})) if rows else "<p class=muted>none</p>") + more +
            f"<p>Services with no healthy instance anywhere ({len(summary.nowhere)}):</p>" +
            (_table(["service", "namespace", "registered in"], rows2) if rows2 else
             "<p class=muted>none</p>") + "</section>")

    rates = view["rates"]
    uptime = max(view["uptime"], 1e-9)
    rows = [[e(kind), e(rcode), str(count), f"{count / uptime:.1f}"]
            for (kind, rcode), count in rates["counts"]]
    parts.append(f"<section id=rates><h2>Queries since start</h2>"
                 f"<p class=muted>as of {_ago(now - rates['at'])}</p>" +
                 (_table(["kind", "rcode", "queries", "per second"], rows, frozenset({2, 3}))
                  if rows else "<p class=muted>no queries yet</p>") + "</section>")
    rows = [[e(name), str(count)] for name, count in view["nxdomains"]]
    parts.append("<section id=nxdomain><h2>Most frequent NXDOMAIN names, last 10 minutes</h2>" +
                 (_table(["name", "queries"], rows, frozenset({1})) if rows else
                  "<p class=muted>none</p>") + "</section>")
    parts.append("<p class=muted>JSON: <a href='/v1/explain?name=web.service.consul'>"
                 "/v1/explain?name=NAME&amp;type=TYPE</a>, <a href='/v1/catalog'>/v1/catalog"
                 "</a>, <a href='/metrics'>/metrics</a></p></main></body></html>")
    return "".join(parts)


# --- the handlers --------------------------------------------------------------------------


class StatusPage:
    """The page's state: the cached catalog analysis and query rates (nothing a caller sets)."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self._summary: CatalogSummary | None = None
        self._summary_of: weakref.ref[Snapshot] | None = None
        self._pending: asyncio.Future[CatalogSummary] | None = None
        self._pending_of: weakref.ref[Snapshot] | None = None
        self._next_analysis = 0.0  # monotonic time before which no new analysis starts
        self._rates: dict[str, Any] | None = None
        self.analyses = 0  # summaries computed (the once-per-snapshot test reads it)

    async def summary(self, wait: float = 0.5) -> CatalogSummary | None:
        """The analysis of the snapshot being served: cached per snapshot, computed in a
        thread that hands the GIL back often (and waited for up to ``wait`` seconds).

        A source that changes the catalog all the time (Consul) would have an open page
        re-analyse on every reload: a new analysis starts at most every ANALYSIS_SHARE times
        the last one's duration, so it never takes more than 1/ANALYSIS_SHARE of a core; the
        previous one is shown meanwhile (the page says of which generation)."""
        snap = self.server.snapshot
        current = self._summary
        if current is not None and self._summary_of is not None and self._summary_of() is snap:
            return current
        pending = self._pending
        if pending is None and time.monotonic() >= self._next_analysis:
            self.analyses += 1
            self._pending_of = weakref.ref(snap)
            settings = self.server.responder.settings
            pending = self._pending = in_thread(lambda: summarize(snap, settings),
                                                "status-analysis")
            pending.add_done_callback(self._analysed)
        if pending is None:
            return current
        # still running after ``wait``, or the snapshot was retired: show what there is
        with contextlib.suppress(TimeoutError, RuntimeError):
            await asyncio.wait_for(asyncio.shield(pending), wait)
        return self._summary

    def _analysed(self, future: asyncio.Future[CatalogSummary]) -> None:
        self._pending = None
        if future.cancelled() or future.exception() is not None:
            # the snapshot was retired (emptied) while it was walked: try the next one soon
            self._next_analysis = time.monotonic() + MIN_ANALYSIS_GAP
            return
        result = future.result()
        self._summary, self._summary_of = result, self._pending_of
        self._next_analysis = time.monotonic() + max(MIN_ANALYSIS_GAP,
                                                     ANALYSIS_SHARE * result.seconds)

    def rates(self) -> dict[str, Any]:
        """Queries by (kind, rcode), cache hits included; read at most every RATES_EVERY s
        (``query_counts`` walks the response cache, as a /metrics scrape does)."""
        now = time.time()
        if self._rates is None or now - self._rates["at"] >= RATES_EVERY:
            totals: Counter[tuple[str, str]] = Counter()
            for (kind, rcode, _transport), count in self.server.responder.query_counts().items():
                totals[(kind, rcode)] += count
            self._rates = {"at": now, "counts": sorted(totals.items(),
                                                       key=lambda kv: (-kv[1], kv[0]))}
        return self._rates

    def source(self) -> dict[str, Any]:
        """Where the catalog comes from and how fresh it is: the source's ``state``
        (catalog/source.py; its ``detail`` holds the file and generation, or Consul's
        watches)."""
        state = self.server.state
        return {"kind": state.kind, "serving": state.serving, "ready": state.ready,
                "last_error": state.last_error, "failing_since": state.failing_since,
                "last_success": state.last_success, "errors": state.errors,
                "detail": dict(state.detail)}

    async def page(self, request: web.Request) -> web.Response:
        name = request.query.get("name", "")
        qtype = request.query.get("type", "A") or "A"
        form: dict[str, Any] = {"name": name[:MAX_NAME], "type": qtype.upper()[:16],
                                "result": None, "error": None}
        if name:
            try:
                doc = self._explain(name, qtype)
                form["result"] = render_text(doc)
            except ExplainError as exc:
                form["error"] = str(exc)
        server = self.server
        snap = server.snapshot
        config = server.config
        view = {
            "now": time.time(), "domain": config.domain, "datacenter": config.datacenter,
            "generation": snap.generation, "serial": snap.serial, "loaded_at": snap.loaded_at,
            "uptime": time.time() - server.metrics.started_at, "form": form,
            "source": self.source(), "summary": await self.summary(), "rates": self.rates(),
            "nxdomains": server.responder.nxdomains.top(20),
        }
        return web.Response(text=render_page(view), content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    def _explain(self, name: str, qtype: str) -> dict[str, Any]:
        if len(name) > MAX_NAME:
            raise ExplainError(f"a name is at most {MAX_NAME} characters")
        return explain(self.server.responder, name, record_type(qtype))

    async def explain_json(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        headers = {**SECURITY_HEADERS, "Content-Security-Policy": "default-src 'none'"}
        if not name:
            return web.Response(status=400, text="name is required: /v1/explain?name=NAME"
                                "&type=TYPE\n", headers=headers)
        try:
            doc = self._explain(name, request.query.get("type", "A") or "A")
        except ExplainError as exc:
            return web.Response(status=400, text=f"{exc}\n", headers=headers)
        return web.Response(text=to_json(doc) + "\n", content_type="application/json",
                            headers=headers)


def routes(server: DnsServer) -> list[tuple[str, Callable[[web.Request],
                                                          Awaitable[web.Response]]]]:
    """The GET routes this module serves on the admin endpoint."""
    page = StatusPage(server)
    return [("/", page.page), ("/v1/explain", page.explain_json)]


__all__ = ["CatalogSummary", "StatusPage", "render_page", "routes", "shown", "summarize"]
