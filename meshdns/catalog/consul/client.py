"""HTTP to Consul: one aiohttp session, a bound on requests in flight, errors that say why.

Everything meshdns asks Consul goes through ``ConsulClient.get``: it adds the token header
(``X-Consul-Token``, never ``?token=``, which would land in access logs), ``stale`` reads, the
blocking-query ``index``/``wait`` parameters and a timeout above what Consul may hold a
blocking query; it keeps the number of requests in flight at or under ``max_requests`` (halved
on HTTP 429, grown back slowly) and turns every failure into a ``ConsulError`` whose message
names the endpoint (and, for 403, the ACL permission it needs).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import ssl
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from ...config import ConsulSource

log = logging.getLogger("meshdns.consul")

#: seconds allowed on top of wait + wait/16 (Consul's jitter) for Consul's RPC hold and the network
TIMEOUT_MARGIN = 10.0
#: timeout of a request that does not block
REQUEST_TIMEOUT = 10.0

# The ACL permission each endpoint needs (Consul's API docs), for the 403 message.
_PERMISSIONS = (
    ("/v1/health/service/", "service:read on the service and node:read"),
    ("/v1/health/state/", "node:read and service:read"),
    ("/v1/catalog/services", "service:read"),
    ("/v1/catalog/nodes", "node:read"),
    ("/v1/catalog/datacenters", "none (any token)"),
    ("/v1/partitions", "operator:read"),
    ("/v1/namespaces", "operator:read (or access in the namespace)"),
    ("/v1/peerings", "peering:read"),
    ("/v1/config/service-resolver", "service:read"),
    ("/v1/config/sameness-group", "mesh:read"),
    ("/v1/query/", "query:read, and service:read for the query's service"),
    ("/v1/agent/self", "agent:read"),
)


def permission_for(path: str) -> str:
    """The ACL permission ``path`` needs, as Consul's docs state it."""
    for prefix, permission in _PERMISSIONS:
        if path.startswith(prefix):
            return permission
    return "read access"


class ConsulError(Exception):
    """A request that did not give usable data. ``status``: the HTTP status, 0 for no reply
    (refused, timed out), -1 for a reply whose body is not the JSON Consul documents."""

    def __init__(self, endpoint: str, status: int, message: str) -> None:
        super().__init__(f"consul {endpoint}: {message}")
        self.endpoint = endpoint
        self.status = status

    @property
    def unreachable(self) -> bool:
        """Consul did not answer, or answered it cannot serve (5xx): back off and retry."""
        return self.status == 0 or self.status >= 500


@dataclass(frozen=True, slots=True)
class Reply:
    body: Any  # decoded JSON
    raw: bytes  # the body as sent (compared to tell a wake-up with no change)
    index: int  # X-Consul-Index; 0 when the endpoint does not block
    known_leader: bool
    filtered: bool = False  # X-Consul-Results-Filtered-By-ACLs: the token hid some results
    digest: bytes = b""  # of ``raw``, when asked for (``unless``)
    same: bool = False  # ``raw`` has the digest given as ``unless``: not decoded, body None


class Limiter:
    """At most ``limit`` requests in flight; the limit halves on 429 and creeps back up."""

    def __init__(self, limit: int) -> None:
        self.maximum = limit
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self._successes = 0
        self._cond = asyncio.Condition()

    async def __aenter__(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.in_flight < self.limit)
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)

    async def __aexit__(self, *exc: object) -> None:
        async with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    async def resize(self, maximum: int) -> None:
        """A new ceiling; the limit follows it (or stays as low as a 429 left it)."""
        async with self._cond:
            throttled = self.limit < self.maximum
            self.maximum = max(1, maximum)
            self.limit = min(self.limit, self.maximum) if throttled else self.maximum
            self._cond.notify_all()

    def throttled(self) -> None:
        """Consul said 429 (too many requests from this client): halve the concurrency."""
        self.limit = max(1, self.limit // 2)
        self._successes = 0

    def succeeded(self) -> None:
        if self.limit < self.maximum:
            self._successes += 1
            if self._successes >= 20:  # 20 good replies give one more slot back
                self._successes = 0
                self.limit += 1


def body_digest(raw: bytes) -> bytes:
    """What a body is known by between reads (``ConsulClient.get``'s ``unless``)."""
    return hashlib.blake2b(raw, digest_size=16).digest()


def fetch_pool_size(max_requests: int) -> int:
    """How many of ``max_requests`` go to the fetchers (the rest to blocking watches)."""
    return max(1, min(16, max_requests // 4))


class ConsulClient:
    """The HTTP side of the Consul source. Create it on the event loop; ``close`` it."""

    def __init__(self, settings: ConsulSource, base_dir: str = ".") -> None:
        self.settings = settings
        self.base_dir = base_dir
        # Two lanes that add up to max_requests: blocking watches hold their request for up
        # to ``wait``, so they must not take the slots the fetchers need (nor the reverse).
        # The source widens the fetchers' lane into the slots no blocking watch holds while a
        # scope's first read is fetched; ``total`` keeps the sum at max_requests whatever.
        fetchers = fetch_pool_size(settings.max_requests)
        self.fetch_limiter = Limiter(fetchers)
        self.limiter = Limiter(max(1, settings.max_requests - fetchers))
        self.total = Limiter(settings.max_requests)
        self.peak = 0
        self.requests = 0
        self.bytes = 0
        self.errors: Counter[str] = Counter()  # by status ("403", "429", "timeout", ...)
        self._token_path = self._path(settings.token_file) if settings.token_file else None
        self._token = settings.token
        self._token_signature: tuple[int, int] | None = None
        self._filtered_logged: set[str] = set()
        address = settings.address
        if address.startswith("unix://"):
            self._base = "http://consul"
            connector: aiohttp.BaseConnector = aiohttp.UnixConnector(
                path=address[len("unix://"):], limit=settings.max_requests)
        else:
            self._base = address
            connector = aiohttp.TCPConnector(limit=settings.max_requests,
                                             ssl=self._ssl_context() if settings.tls else False)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                              skip_auto_headers=("User-Agent",),
                                              headers={"User-Agent": "meshdns"})

    def _path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def _ssl_context(self) -> ssl.SSLContext:
        s = self.settings
        ctx = ssl.create_default_context(cafile=str(self._path(s.ca_file)) if s.ca_file else None)
        if s.cert_file and s.key_file:
            ctx.load_cert_chain(str(self._path(s.cert_file)), str(self._path(s.key_file)))
        return ctx

    def token(self) -> str | None:
        """The ACL token: the configured one, or ``token_file``'s content, re-read whenever
        the file changes (a rotated Kubernetes Secret is a new file behind a symlink)."""
        if self._token_path is None:
            return self._token
        try:
            st = os.stat(self._token_path)
        except OSError as exc:
            if self._token_signature is not None:
                log.error("consul token_file %s: %s (keeping the token read before)",
                          self._token_path, exc.strerror)
                self._token_signature = None
            return self._token
        signature = (st.st_ino, st.st_mtime_ns)
        if signature != self._token_signature:
            try:
                self._token = self._token_path.read_text().strip() or None
            except OSError as exc:
                log.error("consul token_file %s: %s", self._token_path, exc)
            if self._token_signature is not None:
                log.info("consul token_file %s changed: using the new token", self._token_path)
            self._token_signature = signature
        return self._token

    @property
    def in_flight(self) -> int:
        return self.limiter.in_flight + self.fetch_limiter.in_flight

    async def get(self, path: str, params: dict[str, str] | None = None, *,
                  index: int | None = None, wait: float | None = None,
                  fetch: bool = False, decode: bool = True,
                  unless: bytes | None = None) -> Reply:
        """GET ``path`` (``/v1/...``). ``index``: block until Consul's index passes it (for at
        most ``wait`` seconds). ``fetch``: a one-off read in the fetchers' lane. ``unless``:
        the digest of the body last read (b"": none yet): a body with the same digest is not
        decoded (``Reply.same``), as decoding is most of a re-read's cost. Raises
        ``ConsulError``."""
        query = dict(params or {})
        if self.settings.stale:
            query["stale"] = ""
        timeout = REQUEST_TIMEOUT
        if index:
            query["index"] = str(index)
            wait = wait or self.settings.wait
            query["wait"] = f"{max(1, int(wait))}s"
            timeout = wait + wait / 16 + TIMEOUT_MARGIN
        headers = {}
        token = self.token()
        if token:
            headers["X-Consul-Token"] = token
        url = self._base + quote(path)
        kwargs: dict[str, Any] = {}
        if self.settings.tls_server_name:
            kwargs["server_hostname"] = self.settings.tls_server_name
        limiter = self.fetch_limiter if fetch else self.limiter
        async with limiter, self.total:
            self.requests += 1
            self.peak = max(self.peak, self.in_flight)
            try:
                async with self._session.get(
                        url, params=query, headers=headers,
                        timeout=aiohttp.ClientTimeout(total=timeout), **kwargs) as response:
                    raw = await response.read()
                    status = response.status
                    resp_headers = response.headers
            except TimeoutError:
                self.errors["timeout"] += 1
                raise ConsulError(path, 0, f"no reply within {timeout:.0f}s") from None
            except aiohttp.ClientError as exc:
                self.errors["unreachable"] += 1
                raise ConsulError(path, 0, f"unreachable: {_reason(exc)}") from None
            except OSError as exc:
                self.errors["unreachable"] += 1
                raise ConsulError(path, 0, f"unreachable: {exc.strerror or exc}") from None
        self.bytes += len(raw)
        if status != 200:
            self.errors[str(status)] += 1
            text = raw[:200].decode("utf-8", "replace").strip()
            if status == 403:
                raise ConsulError(path, 403, f"HTTP 403 permission denied: the token needs "
                                  f"{permission_for(path)} ({text or 'no detail'})")
            if status == 429:
                self.limiter.throttled()
                self.fetch_limiter.throttled()
                raise ConsulError(path, 429, "HTTP 429 too many requests: backing off, "
                                  f"{self.limiter.limit + self.fetch_limiter.limit} requests "
                                  "at most now")
            raise ConsulError(path, status, f"HTTP {status}: {text or 'no detail'}")
        digest = b""
        if unless is not None:
            digest = body_digest(raw)
            if digest == unless:
                decode = False
        try:
            body = json.loads(raw) if decode and raw.strip() else None
        except ValueError as exc:
            self.errors["malformed"] += 1
            raise ConsulError(path, -1, f"malformed JSON ({exc}): update skipped, keeping "
                              "the last good data") from None
        limiter.succeeded()
        filtered = resp_headers.get("X-Consul-Results-Filtered-By-ACLs") == "true"
        if filtered:
            kind = "/v1/health/service/" if path.startswith("/v1/health/service/") else path
            if kind not in self._filtered_logged:
                self._filtered_logged.add(kind)
                log.warning("consul %s: some results hidden by ACLs: the token lacks %s for "
                            "them (their names will not resolve)", kind, permission_for(path))
        try:
            reply_index = int(resp_headers.get("X-Consul-Index", "0"))
        except ValueError:
            reply_index = 0
        return Reply(body, raw, max(0, reply_index),
                     resp_headers.get("X-Consul-KnownLeader", "true") != "false", filtered,
                     digest, bool(unless) and digest == unless)

    async def close(self) -> None:
        await self._session.close()

    def stats(self) -> dict[str, Any]:
        return {"requests": self.requests, "bytes": self.bytes, "in_flight": self.in_flight,
                "peak_in_flight": self.peak,
                "limit": min(self.total.limit, self.limiter.limit + self.fetch_limiter.limit),
                "errors": dict(self.errors)}


def _reason(exc: BaseException) -> str:
    cause = getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror
    return str(exc) or type(exc).__name__


__all__ = ["body_digest", "ConsulClient", "ConsulError", "Limiter", "Reply", "fetch_pool_size",
           "permission_for"]
