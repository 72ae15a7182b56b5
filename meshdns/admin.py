"""The admin HTTP endpoint (aiohttp): /health, /ready, /metrics, /v1/catalog.

The shipped manifests expose it cluster-wide, so what a client can make it hold is bounded
(``start_admin``): at most ``admin.max_connections`` connections (more are closed on accept),
``admin.idle_timeout`` to send a request's headers and between keep-alive requests, short
request lines and few headers. Work that grows with the catalog is done once per snapshot off
the event loop (/v1/catalog) or a slice at a time between queries (/metrics folding the cache
hits), so no request stalls DNS. A malformed request is logged as one JSON line, at most one a
second (the others are counted in the next line), never as a traceback.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from typing import Any, Protocol

from aiohttp import web

from .catalog.snapshot import Snapshot
from .catalog.source import SourceState
from .config import Config, parse_hostport
from .metrics import Metrics, render_families

log = logging.getLogger("meshdns")

MAX_REQUEST_LINE = 4096  # bytes; every path here is short
MAX_HEADER_FIELD = 4096
MAX_HEADERS = 32
SERVICES_SHOWN = 1000  # /v1/catalog lists the first services by name, not all of them


class Responder(Protocol):
    """What the admin endpoint reads from the responder."""

    udp_cache: Any
    tcp_cache: Any

    def fold_steps(self) -> Any: ...


class Served(Protocol):
    """What the admin endpoint reads from the DNS server (it never imports it)."""

    config: Config
    metrics: Metrics
    responder: Responder
    source: Any  # the catalog source (catalog/source.py); its ``metrics()``, if it has one
    bound: list[tuple[str, int]]
    tcp_connections: Any  # sized
    pending_forwards: int
    draining: bool
    admin_port: int
    packet_path: str  # which UDP packet path serves: compiled or pure Python (packets.py)

    @property
    def snapshot(self) -> Snapshot: ...

    @property
    def state(self) -> SourceState: ...


def make_app(server: Served) -> web.Application:
    catalog_summary = _PerSnapshot(_summarize)
    counts = _Folding(server)

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def ready(_: web.Request) -> web.Response:
        snap = server.snapshot
        state = server.state
        if not state.ready or not server.bound:
            why = f": {state.last_error}" if state.last_error else ""
            return web.Response(status=503, text=f"not ready: no catalog loaded{why}\n")
        if not state.serving:
            return web.Response(status=503, text="not ready: catalog too stale to serve: "
                                f"{state.last_error}\n")
        if server.draining:
            return web.Response(status=503, text="not ready: shutting down\n")
        failing_since = state.failing_since
        limit = server.config.admin.ready_max_reload_failure
        if failing_since is not None and limit is not None and time.time() - failing_since > limit:
            return web.Response(status=503, text="not ready: catalog stale, last reload failed: "
                                f"{state.last_error}\n")
        return web.Response(text=f"ready: generation {snap.generation}\n")

    async def metrics(_: web.Request) -> web.Response:
        await counts.refresh()
        snap = server.snapshot
        responder = server.responder
        extra: dict[str, float] = {f"meshdns_catalog_{k}": v for k, v in snap.counts.items()}
        extra["meshdns_cache_entries"] = len(responder.udp_cache) + len(responder.tcp_cache)
        extra["meshdns_cache_bytes"] = responder.udp_cache.bytes + responder.tcp_cache.bytes
        extra["meshdns_tcp_connections"] = len(server.tcp_connections)
        extra["meshdns_recursor_pending"] = server.pending_forwards
        text = server.metrics.render(extra, server.state.errors)
        source_metrics = getattr(server.source, "metrics", None)  # the Consul source's own
        if source_metrics is not None:
            text += render_families(source_metrics())
        return web.Response(text=text,
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def catalog(_: web.Request) -> web.Response:
        snap = server.snapshot
        summary = await catalog_summary.get(snap)
        return web.json_response({
            "generation": snap.generation,
            "serial": snap.serial,
            "loaded_at": snap.loaded_at,
            "age_seconds": round(time.time() - snap.loaded_at, 3),
            **summary,
            "last_reload_error": server.state.last_error,
            "state": server.state.as_json(),
            "packet_path": server.packet_path,
        })

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/catalog", catalog)
    from .status import routes  # the status page and /v1/explain (GET only)

    for path, handler in routes(server):
        app.router.add_get(path, handler)
    return app


def _summarize(snap: Snapshot) -> dict[str, Any]:
    """The parts of /v1/catalog that grow with the catalog (run in a worker thread)."""
    names = {k[4] + (f" (peer {k[0]})" if k[0] else f" ({k[1]})") for k in snap.services}
    return {
        "counts": dict(snap.counts),
        "datacenters": sorted(snap.datacenters),
        "partitions": sorted(snap.partitions),
        "peers": sorted(snap.peers),
        "services": heapq.nsmallest(SERVICES_SHOWN, names),
    }


class _PerSnapshot:
    """A value computed from a snapshot once, in a worker thread, and reused until another
    snapshot is served. Only the result is kept, never the snapshot (it would outlive its
    swap); concurrent requests share one computation."""

    def __init__(self, compute: Any) -> None:
        self._compute = compute
        self._key: tuple[int, int] | None = None
        self._value: Any = None
        self._task: asyncio.Future[Any] | None = None
        self._task_key: tuple[int, int] | None = None

    async def get(self, snap: Snapshot) -> Any:
        key = (id(snap), snap.generation)
        if self._key == key:
            return self._value
        if self._task is None or self._task_key != key:
            self._task = asyncio.ensure_future(asyncio.to_thread(self._compute, snap))
            self._task_key = key
        task = self._task
        value = await asyncio.shield(task)
        if self._task is task:
            self._key, self._value, self._task = key, value, None
        return value


class _Folding:
    """Brings the metrics up to date with the cache hits (counted by turn in each entry) a
    slice at a time, yielding to the event loop between slices; concurrent scrapes share one
    walk."""

    def __init__(self, server: Served) -> None:
        self._server = server
        self._walk: asyncio.Future[None] | None = None

    async def refresh(self) -> None:
        if self._walk is None or self._walk.done():
            self._walk = asyncio.ensure_future(self._run())
        await asyncio.shield(self._walk)

    async def _run(self) -> None:
        for _ in self._server.responder.fold_steps():
            await asyncio.sleep(0)


class RequestErrorLog:
    """Stands in for aiohttp's server logger: each failed or malformed request becomes one
    line through the meshdns logger (JSON in ``serve``), at most ``per_second`` a second; the
    rest are counted and the count is given with the next line. No traceback: a client's
    garbage is not our bug. aiohttp's debug chatter is dropped."""

    def __init__(self, per_second: float = 1.0) -> None:
        self._gap = 1.0 / per_second
        self._next = 0.0
        self.suppressed = 0

    def _line(self, msg: str, *args: Any, exc_info: Any = None, **_: Any) -> None:
        now = time.monotonic()
        if now < self._next:
            self.suppressed += 1
            return
        self._next = now + self._gap
        text = msg % args if args else str(msg)
        if isinstance(exc_info, BaseException):
            reason = str(exc_info).strip().splitlines()[0] if str(exc_info).strip() else ""
            text += f": {type(exc_info).__name__}" + (f": {reason[:200]}" if reason else "")
        if self.suppressed:
            text += f" ({self.suppressed} more since the last line)"
            self.suppressed = 0
        log.warning("admin: %s", text)

    exception = error = warning = _line

    def debug(self, *args: Any, **kwargs: Any) -> None:
        pass

    info = debug

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging.Logger's name
        return level >= logging.WARNING


class _Refused(asyncio.Protocol):
    """Over admin.max_connections: closed on accept."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()


class AdminEndpoint:
    """The running endpoint: its listening socket and aiohttp's request machinery."""

    def __init__(self, runner: web.AppRunner, listener: asyncio.base_events.Server) -> None:
        self.runner = runner
        self.listener = listener

    async def cleanup(self) -> None:
        self.listener.close()
        await self.runner.shutdown()
        await self.runner.cleanup()


async def start_admin(server: Served, listen: str,
                      app: web.Application | None = None) -> AdminEndpoint:
    """Listen on ``listen`` with the bounds of the module docstring."""
    host, port = parse_hostport(listen, 8601)
    settings = server.config.admin
    runner = web.AppRunner(
        app or make_app(server), access_log=None, logger=RequestErrorLog(),
        keepalive_timeout=settings.idle_timeout, lingering_time=1.0,
        max_line_size=MAX_REQUEST_LINE, max_field_size=MAX_HEADER_FIELD,
        max_headers=MAX_HEADERS, handler_cancellation=True)
    await runner.setup()
    handlers = runner.server
    assert handlers is not None
    def connection() -> asyncio.Protocol:
        # read on every accept: a SIGHUP may have changed it
        if len(handlers.connections) >= server.config.admin.max_connections:
            return _Refused()
        return handlers()

    loop = asyncio.get_running_loop()
    listener = await loop.create_server(connection, host, port, backlog=128,
                                        reuse_address=True)
    bound = listener.sockets[0].getsockname()[1] if listener.sockets else port
    server.admin_port = bound
    shown = f"[{host}]" if ":" in host else host
    log.info("admin endpoint on http://%s:%d", shown, bound)
    return AdminEndpoint(runner, listener)


__all__ = ["AdminEndpoint", "RequestErrorLog", "Served", "make_app", "start_admin"]
