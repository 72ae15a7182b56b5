"""What one resolution did, step by step: the record ``meshdns explain`` reads.

The resolver (``names.parse``, ``resolve.resolve``) takes an optional ``Trace``; on the packet
path it is None and every ``if trace is not None`` costs one comparison. With a trace, the same
code that decides the answer also writes down why: how the name was read, each locality looked
at and why it came next, every instance considered and whether it was used. Nothing here
decides anything: the resolver's own choices (the instances it found) are what gets recorded,
and the reasons for the others are read from the catalog's health, tags and settings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

#: (peer, datacenter, partition, namespace), as resolve.py keys localities
Locality = tuple[str, str, str, str]


@dataclass(slots=True)
class Considered:
    """One instance looked at in one locality."""

    instance: Any  # catalog.snapshot.Instance
    used: bool
    reason: str


@dataclass(slots=True)
class Step:
    """One locality looked at."""

    locality: Locality
    why: str
    instances: list[Considered]
    outcome: str


@dataclass(slots=True)
class Trace:
    """Filled in by the resolver when it is given one."""

    query: Any = None  # the names.Query resolved (set by resolve.resolve)
    invalid: str | None = None  # why the name does not fit the grammar
    notes: list[str] = field(default_factory=list)  # what happened, in order
    steps: list[Step] = field(default_factory=list)
    whys: dict[Locality, str] = field(default_factory=dict)  # why each locality is tried
    ttl_setting: str | None = None  # the setting the answer's TTL comes from

    def reject(self, reason: str) -> None:
        """The name does not fit the grammar (the first reason found is kept)."""
        if self.invalid is None:
            self.invalid = reason

    def note(self, text: str) -> None:
        self.notes.append(text)

    def plan(self, localities: Iterable[tuple[Locality, str]]) -> None:
        """Why each locality is in the list; a locality named twice is tried once (the first
        reason wins, the others are appended)."""
        for loc, why in localities:
            if loc in self.whys:
                self.whys[loc] += f"; also {why}"
            else:
                self.whys[loc] = why

    def look(self, loc: Locality, service: str, everything: Iterable[Any],
             found: tuple[Any, ...], *, tags: tuple[str, ...] = (), only_passing: bool,
             only_passing_from: str) -> None:
        """Record the instances of ``service`` at ``loc`` and which of them ``found`` (the
        resolver's own choice) holds."""
        chosen = {id(i) for i in found}
        considered = [Considered(i, id(i) in chosen,
                                 _reason(i, id(i) in chosen, tags, only_passing,
                                         only_passing_from))
                      for i in everything]
        if found:
            outcome = f"answered from {len(found)} of {len(considered)} instance(s)"
        elif considered:
            outcome = f"none of {len(considered)} instance(s) usable"
        else:
            outcome = f"no instance of {service} here"
        self.steps.append(Step(loc, self.whys.get(loc, "the service's own locality"),
                               considered, outcome))


def failing_check(inst: Any) -> str | None:
    """The name of a check that makes ``inst`` critical or in maintenance, when the source
    knows check names (the Consul source may set ``checks``: (name, status) pairs covering the
    instance and its node; the file catalog has only a health per instance and node)."""
    checks = getattr(inst, "checks", None)
    if not checks:
        return None
    items = checks.items() if hasattr(checks, "items") else checks
    worst = None
    for name, status in items:
        if status == "critical":
            return f"check {name} is critical"
        if status == "maintenance" and worst is None:
            worst = f"check {name} is in maintenance"
    return worst


def health_reason(inst: Any) -> str:
    """Why an instance's health keeps it out of every answer."""
    named = failing_check(inst)
    if named is not None:
        return named
    node = inst.node
    if node.health in ("critical", "maintenance"):
        state = "critical" if node.health == "critical" else "in maintenance"
        return f"node {node.name} is {state}"
    state = "critical" if inst.status == "critical" else "in maintenance"
    return f"service {inst.id} is {state}"


def _reason(inst: Any, used: bool, tags: tuple[str, ...], only_passing: bool,
            only_passing_from: str) -> str:
    status = inst.status
    if used:
        if status == "warning":
            return f"warning, still answered ({only_passing_from} is false)"
        return "healthy"
    if status in ("critical", "maintenance"):
        return health_reason(inst)
    if status == "warning" and only_passing:
        return f"warning, and {only_passing_from} is true"
    for tag in tags:
        if tag.startswith("!"):
            if tag[1:] in inst.tags:
                return f"has tag {tag[1:]}, which the query excludes"
        elif tag not in inst.tags:
            have = ", ".join(sorted(inst.tags)) or "none"
            return f"no tag {tag} (has: {have})"
    return "not answered"


__all__ = ["Considered", "Locality", "Step", "Trace", "failing_check", "health_reason"]
