"""An immutable, indexed view of the catalog: what every query reads.

A source (the file, later Consul) validates a ``Catalog`` and calls ``build_snapshot``; the server
swaps the new snapshot in with one assignment. Nothing here changes after construction, so a
query never sees half a reload.

Localities are keyed as ``(peer, datacenter)`` with exactly one of the two non-empty: imported
services live under their peer, local and WAN-federated ones under their datacenter.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import socket
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pydantic import ValidationError

from ..documents import error_message
from .model import (
    SERVICE_DEFAULTS,
    Catalog,
    CatalogFields,
    CatalogFile,
    PreparedQuery,
    SamenessGroup,
    Service,
    TaggedAddress,
    Target,
    consistent,
    service_fields,
)

Problem = tuple[tuple[str | int, ...], str]

#: (peer, datacenter, partition, namespace, service name lowercased)
ServiceKey = tuple[str, str, str, str, str]
#: (peer, partition, namespace, service name lowercased)
VipKey = tuple[str, str, str, str]

USABLE = frozenset({"passing", "warning"})
_NO_TAGS: frozenset[str] = frozenset()
_NO_ADDRESSES: Mapping[str, TaggedAddress] = {}  # shared: nothing mutates a snapshot
_RANK = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    address: str
    datacenter: str  # "" for imported nodes
    peer: str  # "" for local / federated nodes
    partition: str
    health: str
    meta: Mapping[str, str]
    tagged: Mapping[str, TaggedAddress]
    packed: bytes = b""  # the address as 4 or 16 bytes when it is an IP; b"" for a hostname


@dataclass(slots=True)  # not frozen: frozen __init__ costs 3x, and nothing mutates it
class Instance:
    """One service instance joined with its node, with its combined health."""

    service: str
    id: str
    node: NodeRecord
    namespace: str
    address: str  # the service address, else the node address
    own_address: bool  # the service registered an address of its own
    port: int
    tags: frozenset[str]  # lowercased
    status: str  # worst of node and service health
    weight_passing: int
    weight_warning: int
    kind: str
    tagged: Mapping[str, TaggedAddress]  # the service's tagged addresses, else the node's
    packed: bytes = b""  # ``address`` as 4 or 16 bytes when it is an IP (what A/AAAA carry)
    destination: str = ""  # connect-proxy: the service it fronts (lowercased)
    native: bool = False  # connect-native: the service itself is in the mesh

    @property
    def datacenter(self) -> str:
        return self.node.datacenter

    @property
    def peer(self) -> str:
        return self.node.peer

    @property
    def partition(self) -> str:
        return self.node.partition


class InstanceSet(NamedTuple):
    """The instances under one key, pre-split by health so queries filter nothing."""

    usable: tuple[Instance, ...]  # not critical, not in maintenance
    passing: tuple[Instance, ...]  # passing only (for only_passing)
    # critical or in maintenance: never answered, kept so `meshdns explain` and the status
    # page can say why an instance is missing
    unusable: tuple[Instance, ...] = ()

    def healthy(self, only_passing: bool) -> tuple[Instance, ...]:
        return self.passing if only_passing else self.usable


@dataclass(frozen=True)
class Snapshot:
    """Everything a query needs, indexed by the keys queries use."""

    local_datacenter: str
    services: Mapping[ServiceKey, InstanceSet]
    connect: Mapping[ServiceKey, InstanceSet]
    ingress: Mapping[ServiceKey, InstanceSet]
    nodes: Mapping[tuple[str, str, str, str], NodeRecord]  # (peer, dc, partition, name lower)
    vips: Mapping[VipKey, str]
    datacenters: frozenset[str]
    peers: frozenset[str]
    partitions: frozenset[str]
    failover: Mapping[ServiceKey, tuple[Target, ...]]
    sameness_groups: Mapping[tuple[str, str], SamenessGroup]  # (partition, name lower)
    default_sameness: Mapping[str, SamenessGroup]  # partition -> group with default_for_failover
    prepared_queries: Mapping[str, PreparedQuery]  # name lowercased
    rtt: Mapping[tuple[str, str], float]
    ptr: Mapping[str, tuple[str, ...]]  # IP -> name labels under the domain
    generation: int = 0
    serial: int = 0
    loaded_at: float = field(default_factory=time.time)
    counts: Mapping[str, int] = field(default_factory=dict)
    # Every instance of each registered service, critical ones included: what ``apply_update``
    # needs to take a service's old contribution out of the derived indexes. Sources that
    # update incrementally (Consul) fill it; a snapshot built from a file leaves it empty.
    registered: Mapping[ServiceKey, tuple[Instance, ...]] = field(default_factory=dict)
    # Set (once) by ``apply_update`` when a newer snapshot shares this one's indexes: then
    # ``dismantle`` must leave them alone.
    shared_onward: bool = False

    def node(self, peer: str, dc: str, partition: str, name: str) -> NodeRecord | None:
        return self.nodes.get((peer, dc, partition, name))


def _worst(a: str, b: str) -> str:
    return a if _RANK[a] >= _RANK[b] else b


_new_set = tuple.__new__


def _set(items: Iterable[Instance]) -> InstanceSet:
    items = tuple(items)
    for i in items:
        if i.status != "passing":
            break
    else:  # all passing (the common case): one tuple serves both
        return _new_set(InstanceSet, (items, items, ()))  # InstanceSet(...) without its __new__
    return InstanceSet(
        tuple(i for i in items if i.status in USABLE),
        tuple(i for i in items if i.status == "passing"),
        tuple(i for i in items if i.status not in USABLE),
    )


def _set_like(items: list[Instance], old: InstanceSet | None) -> InstanceSet:
    """``_set(items)``, or ``old`` when it holds exactly these instances (all usable)."""
    if old is not None and old.usable is old.passing and len(old.usable) == len(items) \
            and all(a is b for a, b in zip(old.usable, items, strict=True)):
        return old
    return _set(items)


def _counts(nodes: int, instances: int, services: int, vips: int,
            queries: int) -> dict[str, int]:
    """A snapshot's ``counts``, the same keys whichever way it was built."""
    return {"nodes": nodes, "instances": instances, "services": services,
            "virtual_ips": vips, "prepared_queries": queries}


def build_snapshot(
    catalog: Catalog,
    *,
    local_datacenter: str,
    vip_range: str = "240.0.0.0/4",
    previous: Snapshot | None = None,
    version: float | None = None,
    yielding: bool = False,
) -> Snapshot:
    """Index a validated catalog. Raises ``CatalogProblems`` for references that do not hold.

    ``yielding``: built in a thread beside a serving event loop, so free the build's scaffolding
    piece by piece (a bytecode boundary between pieces lets the loop take the GIL)."""
    problems: list[Problem] = []
    local_dc = local_datacenter.lower()

    nodes: dict[tuple[str, str, str, str], NodeRecord] = {}
    by_name: dict[str, list[NodeRecord]] = defaultdict(list)
    for i, n in enumerate(catalog.nodes):
        peer = (n.peer or "").lower()
        dc = "" if peer else (n.datacenter or local_dc).lower()
        rec = NodeRecord(n.name, n.address, dc, peer, n.partition.lower(), n.health,
                         n.meta, n.tagged_addresses, pack_address(n.address))
        key = (peer, dc, rec.partition, n.name.lower())
        if previous is not None:  # unchanged: the same object (see "shared with previous")
            old_rec = previous.nodes.get(key)
            if old_rec == rec:
                rec = old_rec  # type: ignore[assignment]
        if key in nodes:
            where = f"peer {peer}" if peer else f"datacenter {dc}"
            msg = f"node {n.name!r} is listed twice in {where}, partition {rec.partition}"
            problems.append((("nodes", i, "name"), msg))
            continue
        nodes[key] = rec
        by_name[n.name.lower()].append(rec)

    all_instances: list[Instance] = []
    groups: dict[ServiceKey, list[Instance]] = defaultdict(list)
    connect: dict[ServiceKey, list[Instance]] = defaultdict(list)
    ingress: dict[ServiceKey, list[Instance]] = defaultdict(list)
    mesh: set[VipKey] = set()
    seen_ids: set[tuple[int, str]] = set()
    raw_services = catalog.services
    # Shared with the previous snapshot: an instance equal to the one at the same place in
    # the previous snapshot's group is that object, and an unchanged group keeps its
    # InstanceSet. A reload that changes little then adds little memory beside the snapshot
    # it replaces (and the copies are freed as soon as they are made).
    old_groups = previous.services if previous is not None else {}
    consume = isinstance(catalog, CatalogFile)
    validated = isinstance(catalog, CatalogFields)  # its entries are their fields already
    # One object for each distinct value: a large catalog repeats the same namespace, kind,
    # health, service name and tag set across instances, and each parsed copy is a new object
    # (one-tag frozensets alone were a third of a 300,000-instance snapshot).
    shared: dict[Any, Any] = {}
    share = shared.setdefault
    tag_sets: dict[tuple[str, ...], frozenset[str]] = {}
    lowered: dict[str, str] = {}  # namespace as written -> lowercased, shared
    named: dict[str, tuple[str, str]] = {}  # service name -> (it, lowercased), shared
    first_node: dict[str, NodeRecord] = {}  # service id lowercased -> the first node it is on
    default_namespace, default_weights = (SERVICE_DEFAULTS[k] for k in ("namespace", "weights"))
    for i, entry in enumerate(raw_services):
        if isinstance(entry, Service):
            s = entry.__dict__  # the model's fields (read as a file entry's, below)
        else:  # a raw mapping (the file source): validated here, one at a time (memory)
            if consume:
                raw_services[i] = None  # consumed: its memory serves the next instances
            try:  # its fields only, no model: half the cost (model.service_fields)
                s = entry if validated and consistent(entry) else service_fields(entry)
            except ValidationError as exc:
                for err in exc.errors(include_url=False):
                    loc = tuple(p for p in err["loc"] if isinstance(p, (str, int)))
                    problems.append((("services", i, *loc), error_message(err, Service)))
                continue
        get = s.get  # a field the entry leaves out is at its default (SERVICE_DEFAULTS)
        s_node, s_peer, s_dc, s_partition = s["node"], get("peer"), get("datacenter"), \
            get("partition")
        candidates = by_name.get(s_node.lower(), ())
        if len(candidates) > 1 or s_peer or s_dc or s_partition:
            candidates = [
                r for r in candidates
                if (s_peer is None or r.peer == s_peer.lower())
                and (s_dc is None or r.datacenter == s_dc.lower())
                and (s_partition is None or r.partition == s_partition.lower())
            ]
        if len(candidates) > 1:  # prefer the local datacenter when nothing else says
            local = [r for r in candidates if r.datacenter == local_dc]
            candidates = local if len(local) == 1 and s_peer is None and s_dc is None \
                else candidates
        if not candidates:
            problems.append((("services", i, "node"), f"no node {s_node!r}" + _where(s)))
            continue
        if len(candidates) > 1:
            problems.append((("services", i, "node"),
                             f"node {s_node!r} is in several places; set datacenter, peer or "
                             "partition on the service"))
            continue
        node = candidates[0]
        name = s["name"]
        sid = get("id") or name
        low_id = sid.lower()
        if low_id == sid:
            low_id = sid  # the instance's own string: no copy kept for the scaffold
        first = first_node.get(low_id)  # (most ids are on one node only: no pair to keep)
        if first is None:
            first_node[low_id] = node
        elif first is node or (id(node), low_id) in seen_ids:
            problems.append((("services", i, "id"),
                             f"service id {sid!r} is used twice on node {node.name!r}"))
            continue
        else:
            seen_ids.add((id(node), low_id))
        # one object per distinct value, and each lowered once (see ``shared``)
        written = get("namespace", default_namespace)
        namespace = lowered.get(written)
        if namespace is None:
            namespace = lowered[written] = share(written.lower(), written.lower())
        names = named.get(name)
        if names is None:
            lower = name.lower()
            names = named[name] = (name, share(lower, lower))
        name, lower = names
        tags = get("tags")
        if tags:
            key_tags = tuple(tags)
            tag_set = tag_sets.get(key_tags)
            if tag_set is None:
                tag_set = tag_sets[key_tags] = frozenset(share(t, t) for t in map(str.lower,
                                                                                  tags))
        else:
            tag_set = _NO_TAGS
        address = get("address")
        own = address is not None
        weights = get("weights", default_weights)
        kind = get("kind", "typical")
        health = get("health", "passing")
        port = get("port", 0)
        destination = get("destination")
        native = get("connect_native", False)
        # positional: this runs once per instance (300,000 times for a large catalog)
        inst = Instance(
            name, sid, node, namespace, address if own else node.address, own,
            share(port, port),
            tag_set,
            share(health, health) if node.health == "passing" else _worst(health, node.health),
            weights.passing, weights.warning, share(kind, kind),
            get("tagged_addresses", _NO_ADDRESSES) if own else node.tagged,
            pack_address(address) if own else node.packed,
            destination.lower() if destination else "", native,
        )
        # index now, so the validated entry can be freed before the next one is made
        group_key = (node.peer, node.datacenter, node.partition, namespace, lower)
        group = groups[group_key]
        if old_groups:
            old_set = old_groups.get(group_key)
            if old_set is not None and len(group) < len(old_set.usable):
                old_inst = old_set.usable[len(group)]
                if old_inst == inst:
                    inst = old_inst
        group.append(inst)
        all_instances.append(inst)
        if kind == "typical" and not native:
            continue  # most services: nothing below applies
        base = (node.peer, node.datacenter, node.partition, namespace)
        if kind == "connect-proxy" and destination:
            connect[(*base, destination.lower())].append(inst)
            mesh.add((node.peer, node.partition, inst.namespace, destination.lower()))
        if native:
            connect[(*base, inst.service.lower())].append(inst)
            mesh.add((node.peer, node.partition, inst.namespace, inst.service.lower()))
        if kind == "ingress-gateway":
            for exposed in get("ingress", ()):
                ingress[(*base, exposed.lower())].append(inst)
    for inst in all_instances:  # imported services are mesh services (peering is mesh-only)
        if inst.peer and inst.kind == "typical":
            mesh.add((inst.peer, inst.partition, inst.namespace, inst.service.lower()))
    # cross-datacenter VIPs would collide: only local and imported services get one
    mesh = {k for k in mesh if k[0] or _in_local_dc(k, local_dc, groups, connect)}

    vips, vip_problems = _allocate_vips(catalog, mesh, vip_range, previous)
    problems.extend(vip_problems)

    failover: dict[ServiceKey, tuple[Target, ...]] = {}
    for i, f in enumerate(catalog.failover):
        key = ("", (f.datacenter or local_dc).lower(), f.partition.lower(),
               f.namespace.lower(), f.service.lower())
        if key in failover:
            problems.append((("failover", i, "service"),
                             f"failover for {f.service!r} is defined twice"))
        failover[key] = tuple(f.targets)

    sameness: dict[tuple[str, str], SamenessGroup] = {}
    default_sameness: dict[str, SamenessGroup] = {}
    for i, g in enumerate(catalog.sameness_groups):
        sameness[(g.partition.lower(), g.name.lower())] = g
        if g.default_for_failover:
            if g.partition.lower() in default_sameness:
                problems.append((("sameness_groups", i, "default_for_failover"),
                                 f"partition {g.partition!r} already has a default group"))
            default_sameness[g.partition.lower()] = g

    queries: dict[str, PreparedQuery] = {}
    for i, q in enumerate(catalog.prepared_queries):
        if q.name.lower() in queries:
            problems.append((("prepared_queries", i, "name"),
                             f"prepared query {q.name!r} is defined twice"))
        queries[q.name.lower()] = q

    rtt: dict[tuple[str, str], float] = {}
    for a, row in catalog.datacenter_rtt.items():
        for b, seconds in row.items():
            rtt[(a.lower(), b.lower())] = seconds
            rtt.setdefault((b.lower(), a.lower()), seconds)

    if problems:
        raise CatalogProblems(problems)

    datacenters = frozenset({local_dc} | {n.datacenter for n in nodes.values() if n.datacenter})
    peers = frozenset(n.peer for n in nodes.values() if n.peer)
    partitions = frozenset({"default"} | {n.partition for n in nodes.values()})

    ptr = _ptr_index(nodes.values(), all_instances, vips, local_dc)
    instance_count = len(all_instances)
    generation = previous.generation + 1 if previous else 1
    now = time.time()
    # The SOA serial follows the catalog's own version (the file's mtime), so every worker and
    # every restart on the same file answers the same serial; it still always increases.
    serial = int(version if version is not None else now)
    if previous is not None:
        serial = max(serial, previous.serial + 1)
    snapshot = Snapshot(
        local_datacenter=local_dc,
        services={k: _set_like(v, old_groups.get(k)) for k, v in groups.items()},
        connect={k: _set(v) for k, v in connect.items()},
        ingress={k: _set(v) for k, v in ingress.items()},
        nodes=nodes,
        vips=vips,
        datacenters=datacenters,
        peers=peers,
        partitions=partitions,
        failover=failover,
        sameness_groups=sameness,
        default_sameness=default_sameness,
        prepared_queries=queries,
        rtt=rtt,
        ptr=ptr,
        generation=generation,
        serial=serial,
        loaded_at=now,
        counts=_counts(len(nodes), instance_count, len(groups), len(vips), len(queries)),
    )
    # Free the build's scaffolding piece by piece (see dismantle): dropped at once, a
    # 300,000-entry set and dict would stall a serving event loop for ~100 ms. With no loop
    # to stall (the first load) it goes at once: one pop a call costs ~0.15 s at that size.
    for scaffold in (seen_ids, groups, connect, ingress, by_name, all_instances, shared,
                     tag_sets, lowered, named, first_node):
        if not yielding:
            scaffold.clear()
            continue
        pop = scaffold.popitem if isinstance(scaffold, dict) else scaffold.pop
        while scaffold:
            pop()
    return snapshot


def empty_snapshot(local_datacenter: str) -> Snapshot:
    """What the server holds before a source has published anything (generation 0): every
    index empty. The responder answers SERVFAIL in the domain meanwhile (``serving``)."""
    dc = local_datacenter.lower()
    return Snapshot(
        local_datacenter=dc, services={}, connect={}, ingress={}, nodes={}, vips={},
        datacenters=frozenset({dc}), peers=frozenset(), partitions=frozenset({"default"}),
        failover={}, sameness_groups={}, default_sameness={}, prepared_queries={}, rtt={},
        ptr={}, generation=0, serial=0, loaded_at=0.0,
        counts=_counts(0, 0, 0, 0, 0),
    )


def dismantle(snapshot: Snapshot) -> None:
    """Free a snapshot that is no longer served, one entry at a time.

    Dropping the last reference to a 300,000-instance snapshot frees it in one cascade of C
    deallocations that holds the GIL for ~0.7 s: no query is answered meanwhile. Emptying its
    indexes item by item from a worker thread lets the event loop run between items.
    A snapshot whose indexes live on in its successor (``apply_update``) is left alone."""
    if snapshot.shared_onward:
        return
    for mapping in (snapshot.services, snapshot.connect, snapshot.ingress, snapshot.nodes,
                    snapshot.ptr, snapshot.vips):
        pop = mapping.popitem  # type: ignore[attr-defined]
        while mapping:
            pop()
    release_free_memory()


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to hand back
        return None


_TRIM = _malloc_trim()


def release_free_memory() -> None:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).

    Loading a catalog parses it into short-lived objects first; once they are freed their pages
    stay in the process (they sit between live allocations, so the heap cannot shrink from its
    top) and count in its RSS: ~120 MiB for 300,000 instances. Takes a few ms."""
    if _TRIM is not None:
        _TRIM(0)


# --- incremental updates ---------------------------------------------------------------------

#: (peer, datacenter, partition, node name lowercased)
NodeKey = tuple[str, str, str, str]


@dataclass(frozen=True, slots=True)
class Update:
    """What changed, for ``apply_update``: only the entries named here are touched.

    ``services``: every instance of each named registered service (an empty sequence: the
    service is gone), critical ones included. ``nodes``: node records to set (None: remove).
    The other fields, when not None, replace the snapshot's value whole (they are small)."""

    services: Mapping[ServiceKey, Sequence[Instance]] = field(default_factory=dict)
    nodes: Mapping[NodeKey, NodeRecord | None] = field(default_factory=dict)
    datacenters: frozenset[str] | None = None
    peers: frozenset[str] | None = None
    partitions: frozenset[str] | None = None
    failover: Mapping[ServiceKey, tuple[Target, ...]] | None = None
    sameness_groups: Mapping[tuple[str, str], SamenessGroup] | None = None
    prepared_queries: Mapping[str, PreparedQuery] | None = None
    #: ``.ingress`` entries to set (an empty sequence: remove): the gateway instances
    #: exposing each service, computed by the source from its config entries
    ingress: Mapping[ServiceKey, Sequence[Instance]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.services or self.nodes or self.ingress) or any(
            v is not None for v in (self.datacenters, self.peers, self.partitions, self.failover,
                                    self.sameness_groups, self.prepared_queries))


@dataclass(frozen=True, slots=True)
class Applied:
    """A new snapshot and what its answers may differ in (for the response cache)."""

    snapshot: Snapshot
    services: frozenset[str]  # lowercased service names whose answers may differ
    everything: bool  # nodes, topology or config entries changed: every answer may differ


def vip_of(inst: Instance) -> str:
    """The virtual IP Consul gave a mesh instance: its ``consul-virtual`` tagged address
    (``virtual`` is the Kubernetes ClusterIP, the fallback), or ""."""
    for key in ("consul-virtual", "virtual"):
        tagged = inst.tagged.get(key)
        if tagged is not None and ":" not in tagged.address and pack_address(tagged.address):
            return tagged.address
    return ""


def _mesh_name(inst: Instance) -> str:
    """The mesh service an instance stands for (its VIP's owner), or ""."""
    if inst.kind == "connect-proxy":
        return inst.destination
    if inst.native or (inst.peer and inst.kind == "typical"):
        return inst.service.lower()
    return ""


def apply_update(snap: Snapshot, update: Update) -> Applied:
    """A new snapshot with ``update`` applied, sharing every untouched entry with ``snap``.

    Cost: proportional to the changed services' instances, plus one C-level copy of each index
    that changes (a dict copy: ~1 us per 200 entries). Virtual IPs come from the instances
    (``vip_of``): never allocated here. ``snap`` keeps serving until its successor is
    swapped in; both are immutable once returned."""
    services = dict(snap.services) if update.services else snap.services
    registered = dict(snap.registered) if update.services else snap.registered
    connect: dict[ServiceKey, InstanceSet] | Mapping[ServiceKey, InstanceSet] = snap.connect
    vips: dict[VipKey, str] | Mapping[VipKey, str] = snap.vips
    ptr: dict[str, tuple[str, ...]] | Mapping[str, tuple[str, ...]] = snap.ptr
    names: set[str] = set()
    instances = snap.counts.get("instances", 0)
    local_dc = snap.local_datacenter
    for key, new_seq in update.services.items():
        new = tuple(new_seq)
        old = registered.get(key)
        if old is None:
            known = snap.services.get(key)
            old = known.usable if known is not None else ()
        if old == new:
            continue
        names.add(key[4])
        instances += len(new) - len(old)
        if new:
            services[key] = _set(new)  # type: ignore[index]
            registered[key] = new  # type: ignore[index]
        else:
            services.pop(key, None)  # type: ignore[union-attr]
            registered.pop(key, None)  # type: ignore[union-attr]
        base = key[:4]
        # connect: drop this service's old instances from each set it fed, add the new ones
        fed = {_connect_name(i) for i in (*old, *new)} - {""}
        if fed:
            if connect is snap.connect:
                connect = dict(snap.connect)
            for dest in fed:
                ckey = (*base, dest)
                previous = connect.get(ckey)
                keep = [i for i in previous.usable if i.service.lower() != key[4]] \
                    if previous else []
                keep += [i for i in new if _connect_name(i) == dest]  # _set drops critical
                if keep:
                    connect[ckey] = _set(keep)  # type: ignore[index]
                else:
                    connect.pop(ckey, None)  # type: ignore[union-attr]
                names.add(dest)
        # virtual IPs: Consul's own, on the proxies and connect-native instances
        owners = {_mesh_name(i) for i in (*old, *new)} - {""}
        if owners and (base[0] or base[1] == local_dc):
            for owner in owners:
                vkey = (base[0], base[2], base[3], owner)
                ip = next((vip_of(i) for i in new if _mesh_name(i) == owner and vip_of(i)), "")
                if not ip:  # another proxy of the same service may still carry it
                    ckey = (*base, owner)
                    others = connect.get(ckey)
                    ip = next((vip_of(i) for i in (others.usable if others else ())
                               if i.service.lower() != key[4] and vip_of(i)), "")
                before = vips.get(vkey, "")
                if ip == before:
                    continue
                if vips is snap.vips:
                    vips = dict(snap.vips)
                if ptr is snap.ptr:
                    ptr = dict(snap.ptr)
                labels = (owner, "virtual", base[0], "peer") if base[0] else (owner, "virtual")
                if before:
                    del vips[vkey]  # type: ignore[attr-defined]
                    if ptr.get(before) == labels:
                        del ptr[before]  # type: ignore[attr-defined]
                if ip:
                    vips[vkey] = ip  # type: ignore[index]
                    ptr.setdefault(ip, labels)  # type: ignore[attr-defined]
                names.add(owner)
        # PTRs of the service's own addresses (node PTRs come first and stay)
        if not base[0]:
            labels = (key[4], "service", base[1])
            gone = {i.address for i in old if i.own_address and i.packed}
            came = [i.address for i in new if i.own_address and i.packed]
            if gone or came:
                if ptr is snap.ptr:
                    ptr = dict(snap.ptr)
                for address in gone:
                    if ptr.get(address) == labels:
                        del ptr[address]  # type: ignore[attr-defined]
                for address in came:
                    ptr.setdefault(address, labels)  # type: ignore[attr-defined]

    ingress: dict[ServiceKey, InstanceSet] | Mapping[ServiceKey, InstanceSet] = snap.ingress
    if update.ingress:
        ingress = dict(snap.ingress)
        for key, gateways in update.ingress.items():
            if gateways:
                ingress[key] = _set(gateways)  # type: ignore[index]
            else:
                ingress.pop(key, None)  # type: ignore[union-attr]
            names.add(key[4])

    nodes: dict[NodeKey, NodeRecord] | Mapping[NodeKey, NodeRecord] = snap.nodes
    if update.nodes:
        nodes = dict(snap.nodes)
        if ptr is snap.ptr:
            ptr = dict(snap.ptr)
        for nkey, rec in update.nodes.items():
            before_rec = nodes.pop(nkey, None)  # type: ignore[union-attr]
            if before_rec is not None and before_rec.packed and \
                    ptr.get(before_rec.address) == node_labels(before_rec):
                del ptr[before_rec.address]  # type: ignore[attr-defined]
            if rec is not None:
                nodes[nkey] = rec  # type: ignore[index]
                if rec.packed:
                    # a node's name wins over a service's for its own address
                    ptr[rec.address] = node_labels(rec)  # type: ignore[index]

    everything = bool(update.nodes) or any(
        v is not None for v in (update.datacenters, update.peers, update.partitions,
                                update.failover, update.sameness_groups,
                                update.prepared_queries))
    if not names and not everything:
        return Applied(snap, frozenset(), False)
    sameness = snap.sameness_groups if update.sameness_groups is None else update.sameness_groups
    default_sameness = snap.default_sameness if update.sameness_groups is None else {
        g.partition.lower(): g for g in update.sameness_groups.values() if g.default_for_failover}
    queries = snap.prepared_queries if update.prepared_queries is None \
        else update.prepared_queries
    now = time.time()
    new_snap = Snapshot(
        local_datacenter=local_dc,
        services=services,
        connect=connect,
        ingress=ingress,
        nodes=nodes,
        vips=vips,
        datacenters=snap.datacenters if update.datacenters is None else update.datacenters,
        peers=snap.peers if update.peers is None else update.peers,
        partitions=snap.partitions if update.partitions is None else update.partitions,
        failover=snap.failover if update.failover is None else update.failover,
        sameness_groups=sameness,
        default_sameness=default_sameness,
        prepared_queries=queries,
        rtt=snap.rtt,
        ptr=ptr,
        generation=snap.generation + 1,
        serial=max(int(now), snap.serial + 1),
        loaded_at=now,
        counts=_counts(len(nodes), instances, len(services), len(vips), len(queries)),
        registered=registered,
    )
    object.__setattr__(snap, "shared_onward", True)  # see dismantle
    return Applied(new_snap, frozenset(names), everything)


def _connect_name(inst: Instance) -> str:
    """The ``.connect`` name an instance answers under, or ""."""
    if inst.kind == "connect-proxy":
        return inst.destination
    return inst.service.lower() if inst.native else ""


class CatalogProblems(Exception):
    """References in a catalog that do not hold, each with the path of the offending field."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(msg for _, msg in problems))
        self.problems = problems


def _where(s: Mapping[str, Any]) -> str:
    parts = [f"{k} {s.get(k)!r}" for k in ("datacenter", "peer", "partition")
             if s.get(k) is not None]
    return (" in " + ", ".join(parts)) if parts else ""


def _in_local_dc(key: VipKey, local_dc: str, *indexes: Mapping[ServiceKey, Any]) -> bool:
    peer, partition, namespace, name = key
    return any(("", local_dc, partition, namespace, name) in idx for idx in indexes)


def _allocate_vips(
    catalog: Catalog, mesh: set[VipKey], vip_range: str, previous: Snapshot | None
) -> tuple[dict[VipKey, str], list[Problem]]:
    """Fixed VIPs from the file, then a stable address for every other mesh service.

    Stability: an address given out before a reload is kept while its service exists; a new
    service hashes into the range (so restarts give the same answer) and probes past taken slots.
    """
    problems: list[Problem] = []
    net = ipaddress.IPv4Network(vip_range)
    first = int(net.network_address) + 1
    size = net.num_addresses - 2
    vips: dict[VipKey, str] = {}
    taken: set[str] = set()
    for i, v in enumerate(catalog.virtual_ips):
        key = ((v.peer or "").lower(), v.partition.lower(), v.namespace.lower(), v.service.lower())
        if v.ip in taken:
            problems.append((("virtual_ips", i, "ip"), f"{v.ip} is given to two services"))
            continue
        if key in vips:
            problems.append((("virtual_ips", i, "service"),
                             f"service {v.service!r} has two fixed virtual IPs"))
            continue
        vips[key] = v.ip
        taken.add(v.ip)
    pending = sorted(k for k in mesh if k not in vips)
    if previous is not None:
        for key in pending:
            ip = previous.vips.get(key)
            if ip is not None and ip not in taken and ipaddress.IPv4Address(ip) in net:
                vips[key] = ip
                taken.add(ip)
    # fixed VIPs may lie outside the range: only addresses in its slots fill it
    used = sum(1 for ip in taken if 0 <= int(ipaddress.IPv4Address(ip)) - first < size)
    for key in pending:
        if key in vips:
            continue
        if used >= size:
            problems.append((("virtual_ips",), f"virtual_ip_range {vip_range} is full"))
            break
        digest = hashlib.blake2b("\0".join(key).encode(), digest_size=8).digest()
        slot = int.from_bytes(digest, "big") % size
        while True:
            ip = str(ipaddress.IPv4Address(first + slot))
            if ip not in taken:
                break
            slot = (slot + 1) % size
        vips[key] = ip
        taken.add(ip)
        used += 1
    return vips, problems


def _ptr_index(
    nodes: Iterable[NodeRecord],
    instances: Iterable[Instance],
    vips: Mapping[VipKey, str],
    local_dc: str,
) -> dict[str, tuple[str, ...]]:
    """IP -> the labels of its name under the domain: nodes first, then services, then VIPs."""
    ptr: dict[str, tuple[str, ...]] = {}
    ordered = sorted(nodes, key=lambda n: (n.datacenter != local_dc, n.peer != "", n.name))
    for n in ordered:
        if n.packed:  # addresses are canonical text already (model.check_address)
            ptr.setdefault(n.address, node_labels(n))
    for inst in instances:
        if inst.own_address and inst.packed and not inst.peer:
            ptr.setdefault(inst.address, (inst.service.lower(), "service", inst.datacenter))
    for (peer, _part, _ns, name), ip in vips.items():
        ptr.setdefault(ip, (name, "virtual", peer, "peer") if peer else (name, "virtual"))
    return ptr


def node_labels(n: NodeRecord) -> tuple[str, ...]:
    """``<node>.node[.<ap>.ap].<dc>`` (or ``.<peer>.peer``): a name our grammar resolves back."""
    labels: tuple[str, ...] = (n.name.lower(), "node")
    if n.partition != "default":
        labels += (n.partition, "ap")
        return labels + ((n.peer, "peer") if n.peer else (n.datacenter, "dc"))
    return labels + ((n.peer, "peer") if n.peer else (n.datacenter,))


def pack_address(address: str | None) -> bytes:
    """4 or 16 bytes for an IP address (as A/AAAA records carry it); b"" for a hostname."""
    if not address:
        return b""
    try:
        return socket.inet_pton(socket.AF_INET6 if ":" in address else socket.AF_INET, address)
    except OSError:
        return b""


__all__ = [
    "Applied", "CatalogProblems", "Instance", "InstanceSet", "NodeKey", "NodeRecord",
    "Snapshot", "Update", "apply_update", "build_snapshot", "dismantle", "empty_snapshot",
    "node_labels", "pack_address", "release_free_memory", "vip_of",
]
