"""Prepared queries in Consul mode: executed by Consul, their results held for their DNS TTL.

``<name>.query[.<dc>].consul`` is answered by ``GET /v1/query/<name>/execute`` (``dc=`` for
another datacenter), so Consul's own failover, templates and ``near`` sorting apply. The
responder stays pure: ``answer`` builds a reply from a result held here, or says that none is
(``None``); the server then awaits ``execute`` (the I/O) and answers the packet again.
Concurrent asks for the same query share one execution; at most ``MAX_PENDING`` executions run
at once, and a query beyond that (or one Consul fails) is answered SERVFAIL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from cachetools import TLRUCache

from ...names import Query
from ...resolve import Answer, Settings, instance_answer, nxdomain
from ..snapshot import USABLE, Snapshot
from .client import ConsulClient, ConsulError
from .mapping import Malformed, QueryResult, query_result

log = logging.getLogger("meshdns.consul")

MAX_PENDING = 256  # prepared-query executions in flight at once
MISSING_HOLD = 5.0  # seconds an unknown query's NXDOMAIN is held
MIN_HOLD = 1.0  # a TTL of 0 still holds a result this long: one execution per second, not per ask
HELD = 10_000  # results held at most

#: what is held under (name, datacenter): a result, or None for "no such query"
Held = QueryResult | None


def _hold(_key: Any, value: tuple[float, Held], now: float) -> float:
    return now + value[0]


class PreparedQueries:
    """Results of prepared queries, and their execution in Consul."""

    def __init__(self, source: Any) -> None:
        self.source = source  # the ConsulCatalogSource: its client and local datacenter
        self.held: TLRUCache[tuple[str, str], tuple[float, Held]] = TLRUCache(
            maxsize=HELD, ttu=_hold, timer=time.monotonic)
        self.pending: dict[tuple[str, str], asyncio.Future[None]] = {}
        self.executions = 0
        self.failures = 0

    def key(self, query: Query, settings: Settings) -> tuple[str, str]:
        return (query.name, (query.datacenter or settings.local_dc).lower())

    def answer(self, query: Query, qtype: int, snap: Snapshot, settings: Settings
               ) -> Answer | None:
        """The answer from a held result; None when there is none (execute first)."""
        item = self.held.get(self.key(query, settings))
        if item is None:
            return None
        result = item[1]
        if result is None:
            return nxdomain(settings, snap, query.domain, "query")
        found = [i for i in result.instances if i.status in USABLE]
        if not found:
            return nxdomain(settings, snap, query.domain, "query")
        ttl = int(result.ttl) if result.ttl is not None else \
            settings.service_ttl(found[0].service.lower())
        return instance_answer(found, qtype, ttl, settings, snap, query.domain, "query")

    async def execute(self, name: str, datacenter: str) -> bool:
        """Execute ``name`` in Consul and hold the result. False: not executed (too many in
        flight, or Consul failed): answer SERVFAIL."""
        key = (name, datacenter)
        running = self.pending.get(key)
        if running is None:
            if len(self.pending) >= MAX_PENDING:
                return False
            running = asyncio.ensure_future(self._execute(key))
            self.pending[key] = running
            running.add_done_callback(lambda _: self.pending.pop(key, None))
        await asyncio.shield(running)
        return key in self.held

    async def _execute(self, key: tuple[str, str]) -> None:
        name, dc = key
        client: ConsulClient | None = self.source.client
        if client is None:
            return  # not started yet: SERVFAIL
        params = {"dc": dc} if dc != self.source.local_dc else {}
        self.executions += 1
        try:
            reply = await client.get(f"/v1/query/{name}/execute", params, fetch=True)
            result: Held = query_result(reply.body, dc)
        except ConsulError as exc:
            if exc.status == 404:  # no such query: NXDOMAIN, held a moment
                self.held[key] = (MISSING_HOLD, None)
                return
            self.failures += 1
            log.warning("%s: prepared query %s answered SERVFAIL", exc, name)
            return
        except Malformed as exc:
            self.failures += 1
            log.warning("consul /v1/query/%s/execute: malformed body: %s (SERVFAIL)", name, exc)
            return
        ttl = result.ttl if result is not None and result.ttl is not None else 0.0
        self.held[key] = (max(MIN_HOLD, ttl), result)


__all__ = ["PreparedQueries"]
