"""What meshdns answers when Consul misbehaves: one test per fault, over the wire, with the DNS
answers before, during and after, and the log line that names the endpoint."""

from __future__ import annotations

import time

from conftest import free_port
from consul_e2e import (
    NOERROR,
    NXDOMAIN,
    SERVFAIL,
    answer,
    base_catalog,
    converges,
    fake_fixture,  # noqa: F401 - the `fake` fixture
    logs_mentioning,
    metric,
    ready,
    start_meshdns,
    tail,
    wait_until,
)
from fake_consul import FakeConsul

WEB = (NOERROR, ["10.0.1.1", "10.0.1.2"])
WEB_AFTER = (NOERROR, ["10.0.1.1"])


def requests_to(fake: FakeConsul, pattern: str, since: float = 0.0) -> list[dict]:
    return [r for r in fake.requests() if pattern in r["path"] and r["start"] >= since]


def test_unreachable_at_start(start_server) -> None:
    port = free_port()
    server = start_meshdns(start_server, f"http://127.0.0.1:{port}", wait_ready=False)
    # Before Consul is there: not ready, SERVFAIL in the domain, a log line naming Consul.
    assert wait_until(lambda: ready(server) == 503)
    assert answer(server, "web.service.consul")[0] == SERVFAIL
    assert wait_until(lambda: logs_mentioning(server, f"127.0.0.1:{port}") or
                      logs_mentioning(server, "/v1/")), tail(server)
    time.sleep(1.0)  # it keeps retrying meanwhile (with back-off); still no data
    assert ready(server) == 503 and answer(server, "web.service.consul")[0] == SERVFAIL
    # Consul comes up on that address: meshdns retried, and now serves.
    with FakeConsul(port=port) as fake:
        base_catalog(fake)
        assert wait_until(lambda: ready(server) == 200, 60), tail(server)
        converges(server, "web.service.consul", WEB)


def test_unreachable_later_serves_the_last_snapshot(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "web.service.consul") == WEB
    assert (metric(server, "meshdns_catalog_stale_seconds") or 0.0) < 5
    fake.stop_listener()
    # During: the last data keeps being answered, its age grows, the log says so.
    for _ in range(10):
        assert answer(server, "web.service.consul") == WEB
        time.sleep(0.1)
    assert wait_until(lambda: (metric(server, "meshdns_catalog_stale_seconds") or 0) > 0.5)
    first = metric(server, "meshdns_catalog_stale_seconds") or 0
    assert wait_until(lambda: (metric(server, "meshdns_catalog_stale_seconds") or 0) > first)
    assert ready(server) == 200  # max_stale unlimited: still serving
    assert logs_mentioning(server, "/v1/"), tail(server)
    # After: Consul is back; a change made while it was down shows.
    fake.set_service_health("web-2", "n2", "critical")
    fake.start_listener()
    converges(server, "web.service.consul", WEB_AFTER)
    assert wait_until(lambda: (metric(server, "meshdns_catalog_stale_seconds") or 0) < first)


def test_max_stale_turns_answers_into_servfail(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url, max_stale="2s")
    assert answer(server, "web.service.consul") == WEB
    fake.stop_listener()
    assert answer(server, "web.service.consul") == WEB  # within max_stale
    converges(server, "web.service.consul", (SERVFAIL, []))
    assert wait_until(lambda: ready(server) == 503)
    fake.start_listener()
    converges(server, "web.service.consul", WEB)
    assert wait_until(lambda: ready(server) == 200)


def test_permission_denied_names_the_endpoint_and_the_permission(start_server,
                                                                 fake: FakeConsul) -> None:
    fake.enable_acls()
    no_peering = {"node_prefix": {"": {"policy": "read"}},
                  "service_prefix": {"": {"policy": "read"}}}
    fake.add_token("t", no_peering)
    fake.add_peer("cluster-02")
    fake.register_node("c02-n1", "10.102.0.1", peer="cluster-02", serf=False)
    fake.register_service("pay", "c02-n1", id="pay-1", peer="cluster-02")
    server = start_meshdns(start_server, fake.url, token="t", datacenter="dc1")
    # Before/during: what the token can read is served; the peers cannot be listed.
    assert answer(server, "web.service.consul") == WEB
    assert wait_until(lambda: logs_mentioning(server, "/v1/peerings", "peering:read")), (
        tail(server))
    assert answer(server, "pay.service.cluster-02.peer.consul")[0] != NOERROR
    fake.set_service_health("web-2", "n2", "critical")
    converges(server, "web.service.consul", WEB_AFTER)
    # After: the permission is granted; the peer's services appear.
    fake.add_token("t", {**no_peering, "peering": "read"})
    converges(server, "pay.service.cluster-02.peer.consul", (NOERROR, ["10.102.0.1"]),
              timeout=90)


def test_a_health_endpoint_forbidden(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "web.service.consul") == WEB
    fake.add_fault(r"^/v1/health/service/web$", "status", status=403)
    fake.set_service_health("web-2", "n2", "critical")
    assert wait_until(lambda: logs_mentioning(server, "/v1/health/service/web",
                                              "service:read")), tail(server)
    assert answer(server, "web.service.consul") == WEB  # last good data
    fake.clear_faults()
    converges(server, "web.service.consul", WEB_AFTER)


def _churn_under_fault(fake: FakeConsul, server, status: int) -> tuple[int, float]:
    """Put every /v1/ path under ``status`` for 3 s while the data changes; (requests, s)."""
    fake.add_fault(r"^/v1/", "status", status=status)
    t0 = time.monotonic()
    fake.set_service_health("web-2", "n2", "critical")
    while time.monotonic() - t0 < 3:
        assert answer(server, "web.service.consul") == WEB  # during: last good data
        time.sleep(0.1)
    hits = len(requests_to(fake, "/v1/", since=t0 + 0.5))  # after the first round of errors
    return hits, time.monotonic() - (t0 + 0.5)


def test_rate_limited_429_backs_off_and_lowers_concurrency(start_server,
                                                          fake: FakeConsul) -> None:
    for i in range(30):
        fake.register_service(f"svc-{i}", "n1", id=f"svc-{i}")
    server = start_meshdns(start_server, fake.url, max_requests=16)
    assert answer(server, "web.service.consul") == WEB
    fake.reset_log()
    hits, seconds = _churn_under_fault(fake, server, 429)
    # A client that does not back off hammers a limiting Consul with hundreds of requests/s.
    assert hits / seconds < 30, f"{hits} requests in {seconds:.1f}s while rate-limited"
    overlapping = max_overlap(requests_to(fake, "/v1/"))
    assert overlapping <= 16
    assert logs_mentioning(server, "429"), tail(server)
    fake.clear_faults()
    converges(server, "web.service.consul", WEB_AFTER)


def max_overlap(records: list[dict]) -> int:
    """Most requests open at once, from the log's start/end times."""
    events = sorted([(r["start"], 1) for r in records] +
                    [(r["end"] if r["end"] is not None else float("inf"), -1) for r in records])
    best = now = 0
    for _, delta in events:
        now += delta
        best = max(best, now)
    return best


def test_server_errors_back_off(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "web.service.consul") == WEB
    fake.reset_log()
    hits, seconds = _churn_under_fault(fake, server, 500)
    assert hits / seconds < 30, f"{hits} requests in {seconds:.1f}s while Consul answers 500"
    assert logs_mentioning(server, "500"), tail(server)
    fake.clear_faults()
    converges(server, "web.service.consul", WEB_AFTER)


def test_requests_that_hang_time_out_and_are_retried(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url, wait="1s")
    assert answer(server, "web.service.consul") == WEB
    fake.add_fault(r"^/v1/health/service/web$", "hang")
    t0 = time.monotonic()
    fake.set_service_health("web-2", "n2", "critical")
    # During: answers from the last snapshot; the hung request is given up and retried.
    assert wait_until(lambda: len(requests_to(fake, "/v1/health/service/web", since=t0)) >= 2,
                      60), tail(server)
    assert answer(server, "web.service.consul") == WEB
    assert wait_until(lambda: logs_mentioning(server, "/v1/health/service/web")), tail(server)
    fake.clear_faults()
    converges(server, "web.service.consul", WEB_AFTER, timeout=60)


def test_malformed_json_keeps_the_last_good_data(start_server, fake: FakeConsul) -> None:
    server = start_meshdns(start_server, fake.url)
    assert answer(server, "web.service.consul") == WEB
    fid = fake.add_fault(r"^/v1/health/service/web$", "malformed")
    t0 = time.monotonic()
    fake.set_service_health("web-2", "n2", "critical")
    assert wait_until(lambda: len(requests_to(fake, "/v1/health/service/web", since=t0)) >= 1)
    assert wait_until(lambda: logs_mentioning(server, "/v1/health/service/web")), tail(server)
    for _ in range(5):
        assert answer(server, "web.service.consul") == WEB
        time.sleep(0.1)
    fake.clear_faults(fid)
    converges(server, "web.service.consul", WEB_AFTER, timeout=60)


def test_index_reset_is_followed(start_server, fake: FakeConsul) -> None:
    """A snapshot restore lowers the index: meshdns must reset to 0, or it would sit in a
    blocking query until its wait (here 5 minutes) ends."""
    server = start_meshdns(start_server, fake.url, wait="5m")
    assert answer(server, "web.service.consul") == WEB
    fake.restore_snapshot(3)
    fake.set_service_health("web-2", "n2", "critical")  # index 4: below what meshdns held
    converges(server, "web.service.consul", WEB_AFTER)


def _many_services(fake: FakeConsul) -> None:
    for i in range(200):
        fake.register_service(f"svc-{i}", "n1" if i % 2 else "n2", id=f"svc-{i}")
    fake.add_datacenter("dc2")
    fake.register_node("m1", "10.2.0.1", dc="dc2")
    for i in range(50):
        fake.register_service(f"svc-{i}", "m1", id=f"svc-{i}", dc="dc2")
    fake.reset_log()


def test_concurrency_never_above_max_requests(start_server, fake: FakeConsul) -> None:
    _many_services(fake)
    server = start_meshdns(start_server, fake.url, max_requests=16)
    converges(server, "svc-199.service.consul", (NOERROR, ["10.0.0.1"]))
    converges(server, "svc-49.service.dc2.dc.consul", (NOERROR, ["10.2.0.1"]))
    for i in range(0, 200, 5):  # a burst of changes
        fake.set_service_health(f"svc-{i}", "n1" if i % 2 else "n2", "critical")
    converges(server, "svc-195.service.consul", (NXDOMAIN, []))
    assert fake.max_in_flight <= 16, f"{fake.max_in_flight} concurrent requests, max 16"
    assert max_overlap(requests_to(fake, "/v1/")) <= 16


def test_a_small_max_requests_still_follows_two_datacenters(start_server,
                                                            fake: FakeConsul) -> None:
    _many_services(fake)
    server = start_meshdns(start_server, fake.url, wait_ready=False, max_requests=8)
    assert wait_until(lambda: ready(server) == 200, 20), tail(server)
    converges(server, "svc-49.service.dc2.dc.consul", (NOERROR, ["10.2.0.1"]))
    assert fake.max_in_flight <= 8


def test_first_reads_use_the_request_budget_and_changes_the_pool(start_server,
                                                                 fake: FakeConsul) -> None:
    """A scope's first read is one fetch per service: while it runs, the fetchers may use
    every request the blocking watches do not hold (a slow Consul then costs time to ready
    in proportion to N / that budget, not N / the pool); once synced, re-reads go back to
    the pool of max_requests / 4. Never more than max_requests in flight."""
    _many_services(fake)
    slow = fake.add_fault(r"^/v1/health/service/", "delay", delay=0.2)
    server = start_meshdns(start_server, fake.url, max_requests=32)
    first = requests_to(fake, "/v1/health/service/")
    assert max_overlap(first) > 8  # the pool is 32 // 4
    assert max_overlap(requests_to(fake, "/v1/")) <= 32
    # a registration-only change: the scope is re-read whole, through the pool
    since = time.monotonic()
    fake.register_service("web", "n1", id="web-1", address="10.0.1.9", port=8080, tags=["v1"])
    converges(server, "v1.web.service.consul", (NOERROR, ["10.0.1.9"]))
    assert wait_until(lambda: len(requests_to(fake, "/v1/health/service/", since)) >= 200)
    fake.clear_faults(slow)
    reread = [r for r in requests_to(fake, "/v1/health/service/", since) if r["end"]]
    assert 2 < max_overlap(reread) <= 8
    assert fake.max_in_flight <= 32
