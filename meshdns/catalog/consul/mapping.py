"""Consul's JSON to our catalog values: pure functions, no network, tested on recorded documents.

Each function takes one decoded response body (as Consul's HTTP API documents it) and returns
the values the snapshot is made of (``Instance``, ``NodeRecord``, ``Target``, ...). Bodies that
do not have the documented shape raise ``Malformed``: the caller skips that update and keeps
its last good data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from ...config import parse_duration
from ..model import SamenessGroup, SamenessMember, TaggedAddress, Target, check_address
from ..snapshot import Instance, NodeRecord, pack_address

_RANK = {"passing": 0, "warning": 1, "critical": 2, "maintenance": 3}
_NO_TAGS: frozenset[str] = frozenset()
_EMPTY: Mapping[str, Any] = {}
#: the kinds the catalog knows; Consul's others (api-gateway, ...) are kept as they come
_KINDS = {"": "typical", "typical": "typical"}


class Malformed(ValueError):
    """A response body without the documented shape."""


@dataclass(frozen=True, slots=True)
class Scope:
    """Where a watch looks: a datacenter (local or federated) or a peer, a partition and a
    namespace. Exactly one of ``peer`` and ``datacenter`` is set (as snapshot localities)."""

    peer: str
    datacenter: str
    partition: str
    namespace: str

    def params(self, local_dc: str) -> dict[str, str]:
        """The query parameters that select this scope (default ones left out, as CE has
        no partitions or namespaces to name)."""
        out: dict[str, str] = {}
        if self.peer:
            out["peer"] = self.peer
        elif self.datacenter != local_dc:
            out["dc"] = self.datacenter
        if self.partition != "default":
            out["partition"] = self.partition
        if self.namespace != "default":
            out["ns"] = self.namespace
        return out

    def describe(self) -> str:
        where = f"peer {self.peer}" if self.peer else f"dc {self.datacenter}"
        return f"{where}, partition {self.partition}, namespace {self.namespace}"


def _list(doc: Any, what: str) -> list[Any]:
    if doc is None:  # Consul answers `null` for an empty result in places
        return []
    if not isinstance(doc, list):
        raise Malformed(f"{what}: expected a JSON array, got {type(doc).__name__}")
    return doc


def _dict(doc: Any, what: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise Malformed(f"{what}: expected a JSON object, got {type(doc).__name__}")
    return doc


def _str(value: Any, what: str, default: str = "") -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise Malformed(f"{what}: expected a string")
    return value


def _worst(statuses: Any) -> str:
    worst = "passing"
    for status in statuses:
        if status not in _RANK:
            status = "critical"  # an unknown status is not a healthy one
        if _RANK[status] > _RANK[worst]:
            worst = status
    return worst


def tagged_addresses(value: Any) -> dict[str, TaggedAddress]:
    """Tagged addresses in any of Consul's spellings: ``{"lan": "10.0.0.1"}`` (nodes),
    ``{"wan": {"Address": ..., "Port": ...}}`` (services, as served) or lowercase
    ``{"address", "port"}`` (as registered, and in the docs' samples)."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise Malformed("TaggedAddresses: expected an object")
    out: dict[str, TaggedAddress] = {}
    for key, item in value.items():
        port: Any = None
        if isinstance(item, str):
            address = item
        elif isinstance(item, dict):
            address = item.get("Address", item.get("address"))
            port = item.get("Port", item.get("port"))
        else:
            raise Malformed(f"TaggedAddresses.{key}: expected a string or an object")
        if not address:
            continue
        try:
            address = check_address(str(address))
        except ValueError:
            continue  # a tagged address we cannot serve is not worth losing the instance
        if not isinstance(port, int) or not 0 <= port <= 65535:
            port = None
        # model_construct: these are checked above; full validation costs ~5 us each
        out[key] = TaggedAddress.model_construct(address=address, port=port)
    return out


def node_record(node: Any, scope: Scope, health: str = "passing",
                interned: MutableMapping[tuple[Any, ...], NodeRecord] | None = None
                ) -> NodeRecord:
    """A node as ``/v1/catalog/nodes`` and the ``Node`` of ``/v1/health/service`` give it.

    ``interned``: records already made; an identical one is reused, so the many instances of
    one node share one record."""
    node = _dict(node, "Node")
    name = _str(node.get("Node"), "Node.Node")
    if not name:
        raise Malformed("Node.Node: missing")
    try:
        address = check_address(_str(node.get("Address"), "Node.Address"))
    except ValueError as exc:
        raise Malformed(f"node {name}: Address: {exc}") from None
    meta = node.get("Meta") or {}
    if not isinstance(meta, dict):
        raise Malformed(f"node {name}: Meta: expected an object")
    meta = {str(k): str(v) for k, v in meta.items()}
    tagged = tagged_addresses(node.get("TaggedAddresses"))
    partition = _str(node.get("Partition"), "Node.Partition", scope.partition).lower() \
        or scope.partition
    key = (name, address, scope.peer, scope.datacenter, partition, health,
           tuple(sorted(meta.items())), tuple(sorted((k, v.address, v.port)
                                                     for k, v in tagged.items())))
    if interned is not None:
        known = interned.get(key)
        if known is not None:
            return known
    rec = NodeRecord(name, address, scope.datacenter, scope.peer, partition, health, meta,
                     tagged, pack_address(address))
    if interned is not None:
        interned[key] = rec
    return rec


def nodes(doc: Any, scope: Scope) -> list[NodeRecord]:
    """``/v1/catalog/nodes``: the nodes of a scope (their names answer ``.node`` lookups)."""
    out = []
    for item in _list(doc, "/v1/catalog/nodes"):
        out.append(node_record(item, scope))
    return out


def instances(doc: Any, scope: Scope,
              interned: MutableMapping[tuple[Any, ...], NodeRecord] | None = None
              ) -> list[Instance]:
    """``/v1/health/service/<name>``: one ``Instance`` per entry, its status the worst of its
    node's checks and its own (as Consul's DNS filters them)."""
    out: list[Instance] = []
    for entry in _list(doc, "/v1/health/service"):
        entry = _dict(entry, "entry")
        service = _dict(entry.get("Service"), "Service")
        checks = _list(entry.get("Checks"), "Checks")
        node_statuses = []
        service_statuses = []
        for check in checks:
            check = _dict(check, "Checks[]")
            status = check.get("Status")
            (service_statuses if check.get("ServiceID") else node_statuses).append(status)
        node_health = _worst(node_statuses)
        node = node_record(entry.get("Node"), scope, node_health, interned)
        name = _str(service.get("Service"), "Service.Service")
        if not name:
            raise Malformed("Service.Service: missing")
        sid = _str(service.get("ID"), "Service.ID", name) or name
        raw_address = _str(service.get("Address"), "Service.Address")
        own = bool(raw_address)
        if own:
            try:
                address = check_address(raw_address)
            except ValueError as exc:
                raise Malformed(f"service {sid}: Address: {exc}") from None
        else:
            address = node.address
        port = service.get("Port") or 0
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise Malformed(f"service {sid}: Port: expected 0-65535")
        tags = service.get("Tags") or []
        if not isinstance(tags, list):
            raise Malformed(f"service {sid}: Tags: expected an array")
        weights = service.get("Weights") or {}
        if not isinstance(weights, dict):
            raise Malformed(f"service {sid}: Weights: expected an object")
        kind = _str(service.get("Kind"), "Service.Kind")
        kind = _KINDS.get(kind, kind)
        proxy = service.get("Proxy") or {}
        connect = service.get("Connect") or {}
        destination = ""
        if kind == "connect-proxy" and isinstance(proxy, dict):
            destination = _str(proxy.get("DestinationServiceName"),
                               "Proxy.DestinationServiceName").lower()
        own_tagged = tagged_addresses(service.get("TaggedAddresses"))
        # the service's tagged addresses, then the node's for what it does not say (wan)
        tagged = {**node.tagged, **own_tagged} if own_tagged else node.tagged
        namespace = _str(service.get("Namespace"), "Service.Namespace", scope.namespace)
        out.append(Instance(
            name, sid, node, (namespace or scope.namespace).lower(), address, own, port,
            frozenset(str(t).lower() for t in tags) if tags else _NO_TAGS,
            _worst(node_statuses + service_statuses),
            _weight(weights.get("Passing"), 1), _weight(weights.get("Warning"), 1), kind,
            tagged, pack_address(address) if own else node.packed,
            destination, bool(isinstance(connect, dict) and connect.get("Native")),
        ))
    return out


def _weight(value: Any, default: int) -> int:
    return value if isinstance(value, int) and 0 <= value <= 65535 else default


def service_names(doc: Any) -> dict[str, tuple[str, ...]]:
    """``/v1/catalog/services``: service name -> its tags (sidecars and gateways included)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, tags in _dict(doc if doc is not None else {}, "/v1/catalog/services").items():
        if tags is not None and not isinstance(tags, list):
            raise Malformed(f"/v1/catalog/services: {name}: expected an array of tags")
        out[name] = tuple(sorted(str(t) for t in tags or ()))
    return out


#: ``filter`` of a scope's ``/v1/health/state/any`` watch: the checks that make an instance less
#: than healthy (Consul's filter language, evaluated by the server, so only those are sent).
#: An instance's health is its worst check, so these say all of it.
NOT_PASSING = 'Status != "passing"'
_CHECK_START = b'{"Node":'
CheckRow = tuple[str, str, str, str, str]  # node, check id, service id, status, service name


def _rows(doc: Any) -> list[CheckRow]:
    rows = []
    for check in _list(doc, "/v1/health/state/any"):
        check = _dict(check, "check")
        rows.append((str(check.get("Node", "")), str(check.get("CheckID", "")),
                     str(check.get("ServiceID", "")), str(check.get("Status", "")),
                     str(check.get("ServiceName") or "")))
    return rows


_CHUNK = 1 << 14


def _common_prefix(a: bytes, b: bytes) -> int:
    """Length of the common prefix: chunks compared by memcmp, then a binary search inside
    the first chunk that differs (C speed: ~0.2 ms a megabyte)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i:i + _CHUNK] == b[i:i + _CHUNK]:
        i += _CHUNK
    i = min(i, n)
    lo, hi = i, min(n, i + _CHUNK)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[i:mid] == b[i:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """Length of the common suffix, at most ``limit``."""
    la, lb = len(a), len(b)
    i = 0
    while i < limit and a[max(la - i - _CHUNK, la - limit):la - i] == \
            b[max(lb - i - _CHUNK, lb - limit):lb - i]:
        i += _CHUNK
    i = min(i, limit)
    lo, hi = i, min(limit, i + _CHUNK)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[la - mid:la - i] == b[lb - mid:lb - i]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def changed_checks(old: bytes, new: bytes) -> tuple[list[CheckRow], list[CheckRow]]:
    """The checks that differ between two ``/v1/health/state/any`` bodies: (before, after).

    The health watch asks only for the checks not passing (``NOT_PASSING``), so its bodies
    are the size of what is unhealthy; but a Consul that ignores ``filter`` sends
    every check, megabytes for 10,000 services, and many failing checks make a large body
    too. Decoding it whole on every change would cost more than everything else a change
    does. So only the objects around the bytes that differ are decoded: the bodies share a
    prefix and a suffix (Consul returns checks in a stable order), and each check object
    starts with ``{"Node":``. When that does not hold, both bodies are decoded whole."""
    p = _common_prefix(old, new)
    s = _common_suffix(old, new, min(len(old), len(new)) - p)
    start = new.rfind(_CHECK_START, 0, p + 1)
    if start > 0 and old[start:start + len(_CHECK_START)] == _CHECK_START:
        slices = []
        for body in (old, new):
            # the first object that starts after the last differing byte ends the region
            nxt = body.find(_CHECK_START, max(start + 1, len(body) - s))
            end = nxt if nxt >= 0 else body.rfind(b"]")
            slices.append(body[start:end].rstrip().rstrip(b",") if end > start else None)
        if slices[0] is not None and slices[1] is not None:
            try:
                return (_rows(json.loads(b"[" + slices[0] + b"]")),
                        _rows(json.loads(b"[" + slices[1] + b"]")))
            except (ValueError, Malformed):
                pass  # not where objects begin: decode whole
    try:
        return _rows(json.loads(old)), _rows(json.loads(new))
    except ValueError as exc:
        raise Malformed(f"/v1/health/state/any: not JSON: {exc}") from None


def datacenters(doc: Any) -> list[str]:
    """``/v1/catalog/datacenters``: names, nearest first."""
    return [_str(d, "datacenter").lower() for d in _list(doc, "/v1/catalog/datacenters")]


def partitions(doc: Any) -> list[str]:
    """``/v1/partitions`` (Enterprise): names of partitions not being deleted."""
    return [_str(_dict(p, "partition").get("Name"), "Name").lower()
            for p in _list(doc, "/v1/partitions") if not p.get("DeletedAt")]


def namespaces(doc: Any) -> list[str]:
    """``/v1/namespaces`` (Enterprise): names."""
    return [_str(_dict(n, "namespace").get("Name"), "Name").lower()
            for n in _list(doc, "/v1/namespaces") if not n.get("DeletedAt")]


_GONE = {"DELETING", "TERMINATED"}


def peerings(doc: Any) -> list[str]:
    """``/v1/peerings``: names of the peerings that are not being torn down."""
    return [_str(_dict(p, "peering").get("Name"), "Name").lower()
            for p in _list(doc, "/v1/peerings") if p.get("State") not in _GONE]


def sameness_groups(doc: Any, partition: str) -> dict[tuple[str, str], SamenessGroup]:
    """``/v1/config/sameness-group``: the groups of a partition."""
    out: dict[tuple[str, str], SamenessGroup] = {}
    for entry in _list(doc, "/v1/config/sameness-group"):
        entry = _dict(entry, "sameness-group")
        name = _str(entry.get("Name"), "Name")
        members = []
        for m in _list(entry.get("Members"), "Members"):
            m = _dict(m, "Members[]")
            if m.get("Peer"):
                members.append(SamenessMember(peer=str(m["Peer"]).lower()))
            elif m.get("Partition"):
                members.append(SamenessMember(partition=str(m["Partition"]).lower()))
        if not name or not members:
            continue
        part = (_str(entry.get("Partition"), "Partition", partition) or partition).lower()
        out[(part, name.lower())] = SamenessGroup(
            name=name.lower(), partition=part,
            default_for_failover=bool(entry.get("DefaultForFailover")),
            include_local=bool(entry.get("IncludeLocal")), members=members)
    return out


def ingress_exposed(doc: Any, partition: str
                    ) -> dict[tuple[str, str], tuple[tuple[str, str, str], ...]]:
    """``/v1/config/ingress-gateway``: (gateway namespace, gateway name) -> the services its
    listeners expose, as (partition, namespace, name); a service's namespace and partition
    default to the gateway's. The wildcard ``*`` service is left out: which services it
    exposes depends on their protocol, which these entries do not say."""
    out: dict[tuple[str, str], tuple[tuple[str, str, str], ...]] = {}
    for entry in _list(doc, "/v1/config/ingress-gateway"):
        entry = _dict(entry, "ingress-gateway entry")
        name = _str(entry.get("Name"), "Name").lower()
        if not name:
            raise Malformed("ingress-gateway entry: Name: missing")
        gns = _str(entry.get("Namespace"), "Namespace", "default").lower() or "default"
        gap = _str(entry.get("Partition"), "Partition", partition).lower() or partition
        exposed: list[tuple[str, str, str]] = []
        for listener in _list(entry.get("Listeners") or [], "Listeners"):
            listener = _dict(listener, "Listeners[]")
            for svc in _list(listener.get("Services") or [], "Listeners[].Services"):
                svc = _dict(svc, "Listeners[].Services[]")
                sname = _str(svc.get("Name"), "Services[].Name").lower()
                if not sname or sname == "*":
                    continue
                item = (_str(svc.get("Partition"), "Services[].Partition", gap).lower() or gap,
                        _str(svc.get("Namespace"), "Services[].Namespace", gns).lower() or gns,
                        sname)
                if item not in exposed:
                    exposed.append(item)
        out[(gns, name)] = tuple(exposed)
    return out


def resolver_failover(doc: Any, datacenter: str, partition: str,
                      groups: Mapping[tuple[str, str], SamenessGroup]
                      ) -> dict[tuple[str, str, str, str, str], tuple[Target, ...]]:
    """``/v1/config/service-resolver``: each resolver's ``Failover["*"]`` (every subset) as
    the ordered targets that ``resolve.py`` tries when no instance is healthy.

    ``Targets`` name peers, datacenters, partitions and namespaces; ``Datacenters`` is the
    older list form; a ``SamenessGroup`` expands to its members (``groups``)."""
    out: dict[tuple[str, str, str, str, str], tuple[Target, ...]] = {}
    for entry in _list(doc, "/v1/config/service-resolver"):
        entry = _dict(entry, "service-resolver")
        name = _str(entry.get("Name"), "Name").lower()
        failover = entry.get("Failover") or {}
        if not name or not isinstance(failover, dict):
            continue
        policy = failover.get("*")
        if not isinstance(policy, dict):
            continue
        part = (_str(entry.get("Partition"), "Partition", partition) or partition).lower()
        ns = (_str(entry.get("Namespace"), "Namespace", "default") or "default").lower()
        targets: list[Target] = []
        for t in _list(policy.get("Targets"), "Failover.Targets"):
            t = _dict(t, "Failover.Targets[]")
            fields = {k.lower(): str(t[k]).lower() for k in
                      ("Peer", "Datacenter", "Partition", "Namespace") if t.get(k)}
            if fields and not ("peer" in fields and "datacenter" in fields):
                targets.append(Target(**fields))
        for dc in _list(policy.get("Datacenters"), "Failover.Datacenters"):
            targets.append(Target(datacenter=str(dc).lower()))
        group_name = policy.get("SamenessGroup")
        if group_name:
            group = groups.get((part, str(group_name).lower()))
            for m in group.members if group else ():
                targets.append(Target(peer=m.peer) if m.peer else Target(partition=m.partition))
        if targets:
            out[("", datacenter, part, ns, name)] = tuple(targets)
    return out


@dataclass(frozen=True, slots=True)
class QueryResult:
    """What ``/v1/query/<name>/execute`` returned: instances and how long to keep them."""

    instances: tuple[Instance, ...]
    ttl: float | None  # the query's DNS TTL; None: the server's service TTL
    datacenter: str
    failovers: int


def query_result(doc: Any, local_dc: str) -> QueryResult:
    """``/v1/query/<name>/execute``. ``DNS``, ``Datacenter`` and ``Failovers`` are read at the
    top level (as Consul's Go structs put them), and inside the first node as some versions of
    the docs show them."""
    doc = _dict(doc, "/v1/query/execute")
    nodes_ = _list(doc.get("Nodes"), "Nodes")
    first = nodes_[0] if nodes_ and isinstance(nodes_[0], dict) else {}
    dns = doc.get("DNS") or first.get("DNS") or {}
    ttl: float | None = None
    if isinstance(dns, dict) and dns.get("TTL"):
        try:
            ttl = parse_duration(str(dns["TTL"]))  # a Go duration
        except ValueError:
            ttl = None
    dc = str(doc.get("Datacenter") or first.get("Datacenter") or local_dc).lower()
    peer = str(doc.get("PeerName") or "").lower()
    scope = Scope(peer, "" if peer else dc, str(doc.get("Partition") or "default").lower(),
                  str(doc.get("Namespace") or "default").lower())
    found = instances(nodes_, scope)
    failovers = doc.get("Failovers", first.get("Failovers", 0))
    return QueryResult(tuple(found), ttl, dc, failovers if isinstance(failovers, int) else 0)


__all__ = [
    "NOT_PASSING", "Malformed", "QueryResult", "Scope", "changed_checks", "datacenters",
    "instances",    "namespaces", "node_record", "nodes", "partitions", "peerings", "query_result",
    "resolver_failover", "sameness_groups", "service_names", "tagged_addresses",
]
