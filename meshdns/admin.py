"""The admin HTTP endpoint (aiohttp): /health, /ready, /metrics, /v1/catalog."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

from .config import parse_hostport
from .metrics import render_families

if TYPE_CHECKING:
    from .server import DnsServer

def make_app(server: DnsServer) -> web.Application:
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
        failing_since = state.failing_since
        limit = server.config.admin.ready_max_reload_failure
        if failing_since is not None and limit is not None and time.time() - failing_since > limit:
            return web.Response(status=503, text="not ready: catalog stale, last reload failed: "
                                f"{state.last_error}\n")
        return web.Response(text=f"ready: generation {snap.generation}\n")

    async def metrics(_: web.Request) -> web.Response:
        snap = server.snapshot
        extra = {f"meshdns_catalog_{k}": v for k, v in snap.counts.items()}
        extra["meshdns_cache_entries"] = len(server.responder.udp_cache) + \
            len(server.responder.tcp_cache)
        responder = server.responder
        text = server.metrics.render(extra, responder.query_counts(),
                                     responder.truncated_count(), server.state.errors)
        source_metrics = getattr(server.source, "metrics", None)  # the Consul source's own
        if source_metrics is not None:
            text += render_families(source_metrics())
        return web.Response(text=text,
                            content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def catalog(_: web.Request) -> web.Response:
        snap = server.snapshot
        services = sorted({f"{k[4]}" + (f" (peer {k[0]})" if k[0] else f" ({k[1]})")
                           for k in snap.services})
        return web.json_response({
            "generation": snap.generation,
            "serial": snap.serial,
            "loaded_at": snap.loaded_at,
            "age_seconds": round(time.time() - snap.loaded_at, 3),
            "counts": dict(snap.counts),
            "datacenters": sorted(snap.datacenters),
            "partitions": sorted(snap.partitions),
            "peers": sorted(snap.peers),
            "services": services[:1000],
            "last_reload_error": server.state.last_error,
            "state": server.state.as_json(),
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


async def start_admin(server: DnsServer, listen: str) -> web.AppRunner:
    host, port = parse_hostport(listen, 8601)
    runner = web.AppRunner(make_app(server), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
    bound = sockets[0].getsockname()[1] if sockets else port
    server.admin_port = bound  # type: ignore[attr-defined]
    import logging

    logging.getLogger("meshdns").info("admin endpoint on http://%s:%d", host, bound)
    return runner
