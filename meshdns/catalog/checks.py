"""What a catalog is checked for beyond being valid: references that lead nowhere, and updates
that would take most of the catalog away. Pure functions over a ``Catalog`` and the
``Snapshot`` built from it; the file source and ``meshdns check`` report what they return.

A dangling reference is legal (a failover target may come later, a peer may be down) but
almost always a typo: ``virtual_ips: [{service: crat}]`` fixes an address for a service that
does not exist and leaves ``cart`` with a hashed one. So they are warnings, errors with
``meshdns check --strict``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any

from .model import Catalog, Target
from .snapshot import Problem, Snapshot

# "Did you mean" compares a name with every candidate (difflib: ~20 us each); over a 100,000-
# service catalog that is 0.25-2 s per dangling reference, so a large generated catalog with a
# few hundred of them would outrun catalog.max_parse_time and never load. Suggestions are
# made for the first few problems only, from pools of a size a person types names for.
MAX_SUGGESTED = 10
MAX_SUGGESTION_POOL = 20_000


def dangling_references(catalog: Catalog, snapshot: Snapshot,
                        raw_services: Sequence[Any] | None = None) -> list[Problem]:
    """Every name in ``virtual_ips``, ``failover``, ``sameness_groups``, ``prepared_queries``
    and ingress gateways' ``ingress`` lists that the catalog does not have, with the path of
    the field. ``raw_services``: the file's service entries, to point at an ingress list."""
    known = _Known(snapshot)
    problems: list[Problem] = []

    for i, v in enumerate(catalog.virtual_ips):
        peer = (v.peer or "").lower()
        if peer and peer not in snapshot.peers:
            problems.append((("virtual_ips", i, "peer"), known.missing("peer", v.peer or "")))
        elif (peer, v.partition.lower(), v.namespace.lower(), v.service.lower()) \
                not in known.mesh_keys:
            problems.append((("virtual_ips", i, "service"), known.missing(
                "service", v.service, f"partition {v.partition}, namespace {v.namespace}"
                + (f", peer {v.peer}" if v.peer else ""))))

    for i, f in enumerate(catalog.failover):
        dc = (f.datacenter or snapshot.local_datacenter).lower()
        key = ("", dc, f.partition.lower(), f.namespace.lower(), f.service.lower())
        if f.datacenter and dc not in snapshot.datacenters:
            problems.append((("failover", i, "datacenter"), known.missing("datacenter", dc)))
        elif key not in snapshot.services and key not in snapshot.connect:
            problems.append((("failover", i, "service"), known.missing(
                "service", f.service, f"datacenter {dc}, partition {f.partition}, "
                f"namespace {f.namespace}")))
        problems += known.targets(("failover", i, "targets"), f.targets)

    for i, g in enumerate(catalog.sameness_groups):
        if g.partition.lower() not in snapshot.partitions:
            problems.append((("sameness_groups", i, "partition"),
                             known.missing("partition", g.partition)))
        for j, m in enumerate(g.members):
            problems += known.unknown(("sameness_groups", i, "members", j), m,
                                      ("partition", "peer"))

    for i, q in enumerate(catalog.prepared_queries):
        if q.service.lower() not in known.names:
            problems.append((("prepared_queries", i, "service"),
                             known.missing("service", q.service)))
        for j, dc in enumerate(q.failover.datacenters):
            if dc.lower() not in snapshot.datacenters:
                problems.append((("prepared_queries", i, "failover", "datacenters", j),
                                 known.missing("datacenter", dc)))
        problems += known.targets(("prepared_queries", i, "failover", "targets"),
                                  q.failover.targets)

    for peer, dc, partition, namespace, name in snapshot.ingress:
        key = (peer, dc, partition, namespace, name)
        if key not in snapshot.services and key not in snapshot.connect:
            where = f"peer {peer}" if peer else f"datacenter {dc}"
            problems.append((_ingress_path(raw_services, name), known.missing(
                "service", name, f"exposed by an ingress gateway in {where}, partition "
                f"{partition}, namespace {namespace}")))
    return problems


def drop_refusal(before: int | None, after: int, max_drop: float) -> str | None:
    """Why a catalog of ``after`` service instances must not replace one of ``before``: it
    removes more than ``max_drop`` of them (a truncated file, a templater that lost a
    section). None: it may."""
    if not before or max_drop >= 1.0 or after >= before or (before - after) / before <= max_drop:
        return None
    return (f"(catalog): would drop {before - after} of {before} service instances "
            f"({(before - after) / before:.0%}, over catalog.max_drop {max_drop:.0%}): refused; "
            "set catalog.max_drop: 1.0 to allow it")


class _Known:
    """The names a snapshot has, for membership tests and suggestions."""

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.suggested = 0
        keys = list(snapshot.services) + list(snapshot.connect)
        self.names = {k[4] for k in keys}
        # virtual IPs are keyed without the datacenter (local and imported services only)
        self.mesh_keys = {(k[0], k[2], k[3], k[4]) for k in keys}

    def missing(self, kind: str, name: str, where: str = "") -> str:
        pool: Iterable[str] = {"service": self.names, "peer": self.snapshot.peers,
                               "partition": self.snapshot.partitions,
                               "datacenter": self.snapshot.datacenters}[kind]
        close: list[str] = []
        if self.suggested < MAX_SUGGESTED and len(pool) <= MAX_SUGGESTION_POOL:  # see above
            self.suggested += 1
            close = difflib.get_close_matches(name.lower(), sorted(pool), n=1)
        notes = ([where] if where else []) + ([f"did you mean {close[0]!r}?"] if close else [])
        return f"no {kind} {name!r} in the catalog" + (f" ({'; '.join(notes)})" if notes else "")

    def targets(self, base: tuple[str | int, ...], targets: Sequence[Target]) -> list[Problem]:
        out: list[Problem] = []
        for j, t in enumerate(targets):
            out += self.unknown((*base, j), t, ("peer", "datacenter", "partition"))
        return out

    def unknown(self, base: tuple[str | int, ...], item: Any,
                fields: Sequence[str]) -> list[Problem]:
        """``item``'s ``fields`` (peer, datacenter, partition) that name nothing known."""
        pools = {"peer": self.snapshot.peers, "datacenter": self.snapshot.datacenters,
                 "partition": self.snapshot.partitions}
        out: list[Problem] = []
        for field in fields:
            value = getattr(item, field)
            if value is not None and value.lower() not in pools[field]:
                out.append(((*base, field), self.missing(field, value)))
        return out


def _ingress_path(raw_services: Sequence[Any] | None, name: str) -> tuple[str | int, ...]:
    for i, entry in enumerate(raw_services or ()):
        if isinstance(entry, dict) and entry.get("kind") == "ingress-gateway":
            for j, exposed in enumerate(entry.get("ingress") or ()):
                if isinstance(exposed, str) and exposed.lower() == name:
                    return ("services", i, "ingress", j)
    return ("services",)


__all__ = ["dangling_references", "drop_refusal"]
