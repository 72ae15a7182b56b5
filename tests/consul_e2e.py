"""Helpers for the end-to-end tests of the Consul source: a fake Consul with a small catalog,
real ``meshdns serve`` processes whose config names it in ``catalog.consul``, and ways to
wait for a DNS answer to become what the fake now says.

Only public interfaces meet here: the ``catalog.consul`` config, Consul's HTTP API (played by
``fake_consul``), DNS over the wire and the admin endpoint.
"""

from __future__ import annotations

import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import MeshdnsProcess, addresses  # noqa: E402
from fake_consul import FakeConsul  # noqa: E402

CONVERGE = 15.0  # seconds a change may take to reach DNS in these tests (bench/ measures it)


def base_catalog(fake: FakeConsul) -> None:
    """Two nodes, two web instances, an api: the catalog most tests start from."""
    fake.register_node("n1", "10.0.0.1", meta={"rack": "r1"})
    fake.register_node("n2", "10.0.0.2")
    fake.register_service("web", "n1", id="web-1", address="10.0.1.1", port=8080, tags=["v1"])
    fake.register_service("web", "n2", id="web-2", address="10.0.1.2", port=8080)
    fake.register_service("api", "n2", id="api-1", port=9090)


@pytest.fixture(name="fake")
def fake_fixture() -> Iterator[FakeConsul]:
    """A fake Consul with ``base_catalog``. After the test: meshdns used only documented
    endpoints and never put a token in a URL. (Import ``fake_fixture`` to use it.)"""
    with FakeConsul() as f:
        base_catalog(f)
        yield f
        assert_clean_requests(f.requests())


def assert_clean_requests(log: list[dict[str, Any]]) -> None:
    internal = sorted({r["path"] for r in log if r["path"].startswith("/v1/internal")})
    assert not internal, f"meshdns called undocumented endpoints: {internal}"
    in_url = sorted({r["path"] for r in log if any(k == "token" for k, _ in r["query"])})
    assert not in_url, f"meshdns sent ?token= (logged in URLs) to {in_url}"


def consul_config(address: str, *, dns: dict[str, Any] | None = None, **consul: Any
                  ) -> dict[str, Any]:
    return {"catalog": {"consul": {"address": address, **consul}},
            "dns": dns or {}, "log_level": "debug"}


def start_meshdns(start_server: Callable[..., MeshdnsProcess], address: str, *,
                  wait_ready: bool = True, dns: dict[str, Any] | None = None, **consul: Any
                  ) -> MeshdnsProcess:
    server = start_server(config=consul_config(address, dns=dns, **consul))
    if wait_ready:
        assert wait_until(lambda: ready(server) == 200, 30), (
            f"meshdns never became ready against {address}:\n{tail(server)}")
    return server


def admin_get(server: MeshdnsProcess, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.admin_port}{path}",
                                    timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def ready(server: MeshdnsProcess) -> int:
    return admin_get(server, "/ready")[0]


def metric(server: MeshdnsProcess, name: str) -> float | None:
    """The value of a metric (the first series of that name) on /metrics."""
    _, text = admin_get(server, "/metrics")
    m = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.eE+-]+|NaN|\+Inf)$", text, re.M)
    return float(m.group(1)) if m else None


def tail(server: MeshdnsProcess, lines: int = 40) -> str:
    return "\n".join(server.log_path.read_text().splitlines()[-lines:])


def answer(server: MeshdnsProcess, name: str, rdtype: str = "A") -> tuple[str, list[str]]:
    """(rcode, sorted A/AAAA addresses) of a UDP query."""
    try:
        msg = server.query(name, rdtype)
    except dns.exception.Timeout:
        return "TIMEOUT", []
    return dns.rcode.to_text(msg.rcode()), addresses(msg)


def wait_until(predicate: Callable[[], bool], timeout: float = CONVERGE,
               interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def converges(server: MeshdnsProcess, name: str, want: tuple[str, list[str]],
              rdtype: str = "A", timeout: float = CONVERGE) -> None:
    """Poll until ``name`` answers ``want`` (rcode, addresses); fail saying what it answered."""
    seen: list[tuple[str, list[str]]] = []

    def check() -> bool:
        got = answer(server, name, rdtype)
        if not seen or seen[-1] != got:
            seen.append(got)
        return got == want

    assert wait_until(check, timeout), (
        f"{name} {rdtype}: wanted {want}, answers seen {seen}\n{tail(server)}")


def rdata(msg: dns.message.Message, rdtype: str) -> list[str]:
    kind = dns.rdatatype.from_text(rdtype)
    return sorted(rr.to_text() for rrset in msg.answer if rrset.rdtype == kind for rr in rrset)


def logs_mentioning(server: MeshdnsProcess, *words: str) -> list[str]:
    """Log lines (their text) that contain every word."""
    out = []
    for line in server.log_path.read_text().splitlines():
        if all(w in line for w in words):
            out.append(line)
    return out


NOERROR = "NOERROR"
NXDOMAIN = "NXDOMAIN"
SERVFAIL = "SERVFAIL"
