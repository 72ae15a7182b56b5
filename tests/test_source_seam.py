"""The seam between catalog sources and the server (``catalog/source.py``).

A source that has nothing yet (Consul unreachable at start) must not stop the server from
starting: it listens, answers SERVFAIL in the domain (never cached), says 503 on /ready, and
serves the first snapshot published the moment it arrives. Run in-process with a source
written here, over real UDP, TCP and HTTP on loopback.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import dns.asyncquery
import dns.message
import dns.rcode

from meshdns.admin import start_admin
from meshdns.catalog.model import Catalog
from meshdns.catalog.snapshot import build_snapshot
from meshdns.catalog.source import EVERYTHING, Publish, SourceState
from meshdns.config import Config
from meshdns.server import DnsServer

CATALOG = Catalog.model_validate({
    "nodes": [{"name": "node-1", "address": "10.0.0.1"}],
    "services": [{"name": "web", "node": "node-1", "port": 80}],
})


class LateSource:
    """A source that publishes only when told to (``go``), and can stop serving."""

    kind = "late"

    def __init__(self) -> None:
        self.state = SourceState("late", serving=False, last_error="upstream: unreachable")
        self.go = asyncio.Event()
        self.publish: Publish | None = None

    async def run(self, publish: Publish) -> None:
        self.publish = publish
        await self.go.wait()
        self.state.ready = self.state.serving = True
        self.state.last_error = None
        self.snapshot = build_snapshot(CATALOG, local_datacenter="dc1")
        publish(self.snapshot, EVERYTHING)
        await asyncio.Event().wait()

    async def reload(self, why: str) -> None:
        pass

    def reconfigure(self, config: Config) -> list[str]:
        return []

    def stop_serving(self) -> None:
        self.state.serving = False
        assert self.publish is not None
        self.publish(self.snapshot, EVERYTHING)


async def ask(port: int, name: str, tcp: bool = False) -> dns.message.Message:
    query = dns.message.make_query(name, "A")
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", port=port, timeout=3)
    return await dns.asyncquery.udp(query, "127.0.0.1", port=port, timeout=3)


async def http(port: int, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{port}{path}") as response:
        body = await response.text()
        return response.status, json.loads(body) if path.startswith("/v1/") else body


def test_a_server_starts_before_its_source_has_data() -> None:
    async def scenario() -> None:
        config = Config(listen=["127.0.0.1:0"], admin={"listen": "127.0.0.1:0"})
        source = LateSource()
        server = DnsServer(config, source)
        await server.start()
        follower = asyncio.ensure_future(source.run(server.publish))
        runner = await start_admin(server, "127.0.0.1:0")
        port, admin = server.bound[0][1], server.admin_port  # type: ignore[attr-defined]
        try:
            for tcp in (False, True):  # asked twice: a SERVFAIL is never cached
                for _ in range(2):
                    reply = await ask(port, "web.service.consul", tcp)
                    assert reply.rcode() == dns.rcode.SERVFAIL
            assert (await ask(port, "example.org")).rcode() == dns.rcode.REFUSED  # as before
            status, text = await http(admin, "/ready")
            assert status == 503 and "upstream: unreachable" in text
            status, body = await http(admin, "/v1/catalog")
            assert body["state"]["kind"] == "late" and body["state"]["ready"] is False
            assert body["state"]["last_error"] == "upstream: unreachable"

            source.go.set()  # the first snapshot: answered at once, over both transports
            for _ in range(100):
                await asyncio.sleep(0.01)
                if server.snapshot.generation:
                    break
            for tcp in (False, True):
                reply = await ask(port, "web.service.consul", tcp)
                assert reply.rcode() == dns.rcode.NOERROR
                assert [rd.address for rd in reply.answer[0]] == ["10.0.0.1"]
            status, _ = await http(admin, "/ready")
            assert status == 200
            status, body = await http(admin, "/v1/catalog")
            assert body["state"]["ready"] is True and body["counts"]["instances"] == 1

            source.stop_serving()  # e.g. max_stale passed: cached answers go too
            assert (await ask(port, "web.service.consul")).rcode() == dns.rcode.SERVFAIL
            status, _ = await http(admin, "/ready")
            assert status == 503
        finally:
            follower.cancel()
            await runner.cleanup()
            await server.stop()

    asyncio.run(scenario())
