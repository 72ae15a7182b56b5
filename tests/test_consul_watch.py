"""The Consul client and watch loops (catalog/consul/client.py, watch.py) against a tiny
aiohttp server that plays one endpoint at a time: Consul's index rules, errors, concurrency."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest
from aiohttp import web

from meshdns.catalog.consul.client import ConsulClient, ConsulError
from meshdns.catalog.consul.watch import TokenBucket, Watch
from meshdns.config import ConsulSource


class Endpoint:
    """Replies from a script: each a (status, body, index) or a callable of the request."""

    def __init__(self, script):
        self.script = list(script)
        self.seen: list[web.Request] = []
        self.in_flight = 0
        self.peak = 0
        self.hold = asyncio.Event()
        self.hold.set()

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append(request)
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await self.hold.wait()
            if not self.script:
                await asyncio.sleep(3600)  # block, as a long poll with nothing new
            status, body, index = self.script.pop(0)
            text = body if isinstance(body, str) else json.dumps(body)
            return web.Response(status=status, text=text,
                                headers={"X-Consul-Index": str(index)})
        finally:
            self.in_flight -= 1


@contextlib.asynccontextmanager
async def serve(endpoint: Endpoint, **settings):
    app = web.Application()
    app.router.add_get("/{tail:.*}", endpoint.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    client = ConsulClient(ConsulSource(address=f"http://127.0.0.1:{port}", wait="5s",
                                       **settings))
    try:
        yield client
    finally:
        await client.close()
        await runner.cleanup()


async def until(predicate, timeout=5.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def params(request: web.Request) -> dict[str, str]:
    return dict(request.query)


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 20))


def test_index_rules_and_no_change_wakeups():
    async def main():
        ep = Endpoint([
            (200, {"web": []}, 0),  # X-Consul-Index 0: counts as 1
            (200, {"web": []}, 5),  # same body: a wake-up with no change
            (200, {"web": [], "db": []}, 9),
            (200, {"web": []}, 3),  # backwards: reset, re-read without index
            (200, {"web": []}, 3),
        ])
        bodies = []
        async with serve(ep) as client:
            watch = Watch(client, "/v1/catalog/services", {}, bodies.append)
            task = asyncio.ensure_future(watch.run())
            await until(lambda: len(ep.seen) == 6)
            task.cancel()
        indexes = [params(r).get("index") for r in ep.seen]
        assert indexes == [None, "1", "5", "9", None, "3"]
        assert all("stale" in params(r) for r in ep.seen)
        assert [params(r).get("wait") for r in ep.seen][1:3] != [None, None]
        assert bodies == [{"web": []}, {"web": [], "db": []}, {"web": []}]
        assert watch.stats.no_change == 1 and watch.stats.resets == 1
    run(main())


def test_malformed_json_keeps_the_last_good_data():
    async def main():
        ep = Endpoint([(200, {"web": []}, 2), (200, "{not json", 3), (200, {"db": []}, 4)])
        bodies = []
        async with serve(ep) as client:
            watch = Watch(client, "/v1/catalog/services", {}, bodies.append)
            watch.backoff.first = 0.01
            task = asyncio.ensure_future(watch.run())
            await until(lambda: len(bodies) == 2)
            task.cancel()
        assert bodies == [{"web": []}, {"db": []}]
        assert client.errors["malformed"] == 1
        # after the bad read, the next one reads at once (no index): what changed meanwhile
        assert "index" not in params(ep.seen[2]) and params(ep.seen[1])["index"] == "2"
    run(main())


def test_403_names_the_endpoint_and_the_permission():
    async def main():
        ep = Endpoint([(403, "Permission denied: token lacks peering:read", 0)])
        async with serve(ep, token="s3cret") as client:
            with pytest.raises(ConsulError) as caught:
                await client.get("/v1/peerings")
        assert "/v1/peerings" in str(caught.value) and "peering:read" in str(caught.value)
        assert caught.value.status == 403 and not caught.value.unreachable
        # the token travels in the header, never in the URL
        assert ep.seen[0].headers["X-Consul-Token"] == "s3cret"
        assert "token" not in params(ep.seen[0])
    run(main())


def test_token_file_is_read_again_when_it_changes(tmp_path):
    async def main():
        token = tmp_path / "token"
        token.write_text("one\n")
        ep = Endpoint([(200, [], 1), (200, [], 1)])
        async with serve(ep, token_file=str(token)) as client:
            await client.get("/v1/catalog/nodes")
            replacement = tmp_path / "token.new"
            replacement.write_text("two")
            replacement.rename(token)  # as a Kubernetes Secret update: a new file
            await client.get("/v1/catalog/nodes")
        assert [r.headers["X-Consul-Token"] for r in ep.seen] == ["one", "two"]
    run(main())


def test_429_lowers_concurrency_and_requests_stay_under_max_requests():
    async def main():
        ep = Endpoint([(429, "rate limited", 0)] + [(200, [], 1)] * 11)
        ep.hold.clear()
        async with serve(ep, max_requests=8) as client:
            async def one():
                with contextlib.suppress(ConsulError):
                    await client.get("/v1/health/service/x", fetch=True)
            tasks = [asyncio.ensure_future(one()) for _ in range(12)]
            await until(lambda: ep.in_flight == 2)  # the fetchers' lane: 8 // 4
            await asyncio.sleep(0.1)
            assert ep.in_flight == 2
            ep.hold.set()
            await asyncio.gather(*tasks)
            assert client.fetch_limiter.limit == 1  # halved by the 429 (20 successes give one back)
            assert client.peak <= 8 and ep.peak <= 8
    run(main())


def test_unreachable_is_an_error_naming_the_endpoint():
    async def main():
        client = ConsulClient(ConsulSource(address="http://127.0.0.1:1"))
        try:
            with pytest.raises(ConsulError) as caught:
                await client.get("/v1/catalog/services")
        finally:
            await client.close()
        assert caught.value.unreachable and "/v1/catalog/services" in str(caught.value)
    run(main())


def test_token_bucket_allows_a_burst_then_the_rate():
    bucket = TokenBucket(rate=10.0, burst=2.0)
    assert bucket.delay() == 0 and bucket.delay() == 0
    assert 0.05 < bucket.delay() <= 0.1
