"""The seam between where the catalog comes from and the server that serves it.

A *source* (``catalog/file.py``: a catalog file; ``catalog/consul/``: a Consul cluster) builds
immutable ``Snapshot`` values and hands each one, with what it changed, to ``publish``. The
server swaps what it is given and knows nothing of files or HTTP; the resolver never knows which
source built a snapshot. Data flows one way: source -> publish -> responder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .snapshot import Snapshot

if TYPE_CHECKING:
    from ..config import Config


@dataclass(frozen=True, slots=True)
class Change:
    """What a new snapshot changed, so the response cache drops only what depends on it.

    ``services``: lowercased service names whose answers may differ (their ``.service``,
    ``.connect``, ``.ingress``, ``.virtual`` names, failover answers and prepared queries that
    reach them). ``everything``: nodes, addresses, config entries or anything else changed; drop
    every cached answer."""

    services: frozenset[str] = frozenset()
    everything: bool = False


EVERYTHING = Change(everything=True)

#: Called by a source, on the event loop, for every new snapshot worth serving. A source whose
#: ``state.serving`` flips (first data, ``max_stale`` passed) publishes again, the same snapshot
#: will do, with ``EVERYTHING``: the server reads ``serving`` there and drops cached answers.
Publish = Callable[[Snapshot, Change], None]


@dataclass(slots=True)
class SourceState:
    """What a source tells ``/ready``, ``/v1/catalog``, ``/metrics`` and the status page."""

    kind: str  # "file" | "consul"
    ready: bool = False  # has data to serve
    serving: bool = True  # False: answer SERVFAIL in the domain (no data yet, or max_stale)
    last_error: str | None = None
    failing_since: float | None = None  # wall time of the first failure since the last success
    last_success: float | None = None  # wall time of the last good read
    detail: dict[str, Any] = field(default_factory=dict)  # JSON-able, source-specific
    errors: int = 0  # updates refused or reads failed (meshdns_catalog_reload_errors_total)

    def as_json(self) -> dict[str, Any]:
        """What ``/v1/catalog`` shows under ``state``."""
        return {"kind": self.kind, "ready": self.ready, "serving": self.serving,
                "last_error": self.last_error, "failing_since": self.failing_since,
                "last_success": self.last_success, "errors": self.errors,
                "detail": self.detail}


class CatalogSource(Protocol):
    """One place the catalog comes from."""

    kind: str
    state: SourceState

    async def run(self, publish: Publish) -> None:
        """Follow the catalog until cancelled, publishing each new snapshot. Never raises:
        every failure is logged, counted and kept in ``state``; the last good snapshot keeps
        being served."""

    async def reload(self, why: str) -> None:
        """Re-read now (SIGHUP)."""

    def reconfigure(self, config: Config) -> list[str]:
        """Take a re-read server config (SIGHUP, before ``reload``): apply what this source can
        change live; return the settings that need a restart to take effect (logged)."""


__all__ = ["EVERYTHING", "CatalogSource", "Change", "Publish", "SourceState"]
