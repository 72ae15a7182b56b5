"""Query + catalog snapshot -> answer. Pure: no sockets, no clocks, no event loop.

An ``Answer`` holds records as plain tuples ``(owner, type, ttl, rdata)``; an owner of ``None``
is the question name exactly as it was asked. Each answer record travels with the additional
records that belong to it (an SRV target's address), so trimming keeps the two in step.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .catalog.model import Target
from .catalog.snapshot import (
    Instance,
    InstanceSet,
    NodeRecord,
    Snapshot,
    node_labels,
    pack_address,
)
from .config import Config
from .names import Query, parse

if TYPE_CHECKING:
    from .trace import Trace

# record types
A, NS, CNAME, SOA, PTR, TXT, AAAA, SRV, OPT, ANY = 1, 2, 5, 6, 12, 16, 28, 33, 41, 255
# response codes
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

Record = tuple[str | None, int, int, Any]


@dataclass(slots=True)
class Answer:
    """A response before it is put on the wire."""

    rcode: int = NOERROR
    # (answer record, the additional records that exist only because of it)
    answers: list[tuple[Record, tuple[Record, ...]]] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)
    additional: list[Record] = field(default_factory=list)
    authoritative: bool = True
    kind: str = ""  # the lookup kind, for metrics
    max_answers: int = 0  # a cap on answers on every transport (a_record_limit); 0: none


@dataclass(frozen=True)
class Settings:
    """What resolution needs from the config, precomputed once."""

    domain: str
    local_dc: str
    partition: str
    node_ttl: int
    service_ttls: dict[str, int]
    ttl_prefixes: tuple[tuple[str, int], ...]  # ("db", 30) for "db*", longest first
    only_passing: bool
    a_record_limit: int
    node_meta_txt: bool
    translate_wan: bool
    soa_refresh: int
    soa_retry: int
    soa_expire: int
    soa_min_ttl: int
    ns_glue: str | None  # address of ns.<domain>

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        dns = config.dns
        exact = {k: int(v) for k, v in dns.service_ttl.items() if not k.endswith("*")}
        prefixes = sorted(((k[:-1], int(v)) for k, v in dns.service_ttl.items()
                           if k.endswith("*")), key=lambda kv: -len(kv[0]))
        glue = config.advertise
        if glue is None:
            host = config.listen_addresses()[0][0]
            glue = None if host in ("0.0.0.0", "::") else host
        return cls(
            domain=config.domain, local_dc=config.datacenter, partition=config.partition,
            node_ttl=int(dns.node_ttl), service_ttls=exact, ttl_prefixes=tuple(prefixes),
            only_passing=dns.only_passing, a_record_limit=dns.a_record_limit,
            node_meta_txt=dns.enable_additional_node_meta_txt,
            translate_wan=dns.translate_wan_addrs,
            soa_refresh=dns.soa.refresh, soa_retry=dns.soa.retry, soa_expire=dns.soa.expire,
            soa_min_ttl=dns.soa.min_ttl, ns_glue=glue,
        )

    def service_ttl(self, name: str) -> int:
        ttl = self.service_ttls.get(name)
        if ttl is not None:
            return ttl
        for prefix, value in self.ttl_prefixes:
            if name.startswith(prefix):
                return value
        return 0

    def service_ttl_rule(self, name: str) -> str | None:
        """The ``dns.service_ttl`` key that gives ``name`` its TTL (None: none matches, 0)."""
        if name in self.service_ttls:
            return name
        for prefix, _ in self.ttl_prefixes:
            if name.startswith(prefix):
                return prefix + "*"
        return None


# --- records -------------------------------------------------------------------------------


def _ip_record(owner: str | None, ttl: int, ip: str) -> Record | None:
    """A or AAAA for an IP literal; None for a hostname."""
    packed = pack_address(ip)
    if not packed:
        return None
    return (owner, AAAA if len(packed) == 16 else A, ttl, packed)


def soa_record(s: Settings, snap: Snapshot | None, domain: str) -> Record:
    serial = snap.serial if snap is not None else 1
    return (domain, SOA, s.soa_min_ttl, (f"ns.{domain}", f"hostmaster.{domain}", serial,
                                         s.soa_refresh, s.soa_retry, s.soa_expire, s.soa_min_ttl))


def _ns_records(s: Settings, domain: str) -> tuple[Record, tuple[Record, ...]]:
    ns = (domain, NS, s.node_ttl, f"ns.{domain}")
    glue = _ip_record(f"ns.{domain}", s.node_ttl, s.ns_glue) if s.ns_glue else None
    return ns, ((glue,) if glue else ())


def txt_meta(meta: dict[str, str] | Any) -> list[bytes]:
    """Node meta as RFC 1464 ``key=value`` strings (``rfc1035-`` keys give the raw value)."""
    out = []
    for key, value in meta.items():
        if key.lower().startswith("rfc1035-"):
            text = value
        else:
            escaped = key.replace("`", "``").replace("=", "`=")
            # each leading and trailing space is quoted, and backquotes in the value (as Consul)
            stripped = escaped.lstrip(" ")
            escaped = "` " * (len(escaped) - len(stripped)) + stripped
            stripped = escaped.rstrip(" ")
            escaped = stripped + "` " * (len(escaped) - len(stripped))
            text = f"{escaped}={value.replace('`', '``')}"
        out.append(text.encode("utf-8"))
    return out


def _txt_records(owner: str | None, ttl: int, meta: Any) -> list[Record]:
    return [(owner, TXT, ttl, _chunks(text)) for text in txt_meta(meta)]


def _chunks(text: bytes) -> tuple[bytes, ...]:
    return tuple(text[i:i + 255] for i in range(0, len(text), 255)) or (b"",)


# --- results -------------------------------------------------------------------------------


def _negative(s: Settings, snap: Snapshot | None, domain: str, rcode: int, kind: str) -> Answer:
    return Answer(rcode, authority=[soa_record(s, snap, domain)], kind=kind)


def nxdomain(s: Settings, snap: Snapshot | None, domain: str, kind: str = "invalid") -> Answer:
    return _negative(s, snap, domain, NXDOMAIN, kind)


def nodata(s: Settings, snap: Snapshot | None, domain: str, kind: str) -> Answer:
    return _negative(s, snap, domain, NOERROR, kind)


def resolve(query: Query, qtype: int, snap: Snapshot, s: Settings,
            trace: Trace | None = None) -> Answer:
    """Answer ``query`` asked with ``qtype`` from ``snap``; with a ``trace``, also record why
    (the packet path passes none)."""
    domain = query.domain
    if trace is not None:
        trace.query = query
        if qtype in (SOA, NS) and query.kind != "ptr":
            trace.note(f"{'SOA' if qtype == SOA else 'NS'} is answered for any name under the "
                       "domain")
            trace.ttl_setting = "dns.soa.min_ttl" if qtype == SOA else "dns.node_ttl"
    if query.kind == "ptr":
        return _ptr(query, qtype, snap, s, trace)
    if qtype == SOA:
        ns, glue = _ns_records(s, domain)
        return Answer(answers=[(soa_record(s, snap, domain), ())], authority=[ns],
                      additional=list(glue), kind="soa")
    if qtype == NS:
        return Answer(answers=[_ns_records(s, domain)], kind="ns")
    handler = _HANDLERS.get(query.kind)
    if handler is None:
        return nxdomain(s, snap, domain, query.kind)
    return handler(query, qtype, snap, s, trace)


def _apex(query: Query, qtype: int, snap: Snapshot, s: Settings, trace: Trace | None) -> Answer:
    # the apex exists (it has SOA and NS): other types are NODATA, never NXDOMAIN
    if trace is not None:
        trace.note("the zone apex has only SOA and NS records: other types are NODATA")
    return nodata(s, snap, query.domain, "apex")


def _invalid(query: Query, qtype: int, snap: Snapshot, s: Settings,
             trace: Trace | None) -> Answer:
    if trace is not None:
        trace.note(f"the name does not fit the grammar: {trace.invalid}")
    return nxdomain(s, snap, query.domain, "invalid")


def _nameserver(query: Query, qtype: int, snap: Snapshot, s: Settings,
                trace: Trace | None) -> Answer:
    """``ns.<domain>``, the target of our NS record, resolves to the glue address."""
    glue = _ip_record(None, s.node_ttl, s.ns_glue) if s.ns_glue else None
    if trace is not None:
        trace.note(f"ns.{query.domain} is the target of the NS record: " +
                   (f"its address is {s.ns_glue} (advertise, else the first listen address)"
                    if glue else "no address to give (listening on a wildcard address and no "
                    "advertise set)"))
        trace.ttl_setting = "dns.node_ttl"
    if glue is None:
        return nxdomain(s, snap, query.domain, "ns")
    if qtype in (glue[1], ANY):
        return Answer(answers=[(glue, ())], kind="ns")
    return nodata(s, snap, query.domain, "ns")


# --- localities ----------------------------------------------------------------------------


Locality = tuple[str, str, str, str]  # (peer, datacenter, partition, namespace)


def _known(snap: Snapshot, dc: str | None, peer: str | None, partition: str | None,
           trace: Trace | None = None) -> bool:
    if ((dc is None or dc in snap.datacenters) and (peer is None or peer in snap.peers)
            and (partition is None or partition in snap.partitions)):
        return True
    if trace is not None:
        for what, value, names in (("datacenter", dc, snap.datacenters),
                                   ("peer", peer, snap.peers),
                                   ("partition", partition, snap.partitions)):
            if value is not None and value not in names:
                trace.note(f"unknown {what} {value!r} (the catalog has: "
                           f"{', '.join(sorted(names)) or 'none'})")
    return False


def _primary(query: Query, s: Settings) -> Locality:
    peer = query.peer or ""
    dc = "" if peer else (query.datacenter or s.local_dc)
    return (peer, dc, query.partition or s.partition, query.namespace or "default")


def _target_locality(t: Target, source: Locality, s: Settings) -> Locality:
    peer = t.peer.lower() if t.peer else ""
    if peer:
        dc = ""
    elif t.datacenter:
        dc = t.datacenter.lower()
    else:
        dc = source[1] or s.local_dc
    # a peer's services are imported into a local partition: the source's, unless named
    partition = t.partition.lower() if t.partition else source[2]
    return (peer, dc, partition, t.namespace.lower() if t.namespace else source[3])


def _localities(query: Query, snap: Snapshot, s: Settings,
                trace: Trace | None = None) -> list[Locality] | None:
    """Where a service lookup looks, in order (None: an unknown group)."""
    primary = _primary(query, s)
    if query.sameness_group:
        group = snap.sameness_groups.get((primary[2], query.sameness_group))
        if group is None:
            if trace is not None:
                trace.note(f"no sameness group {query.sameness_group!r} in partition "
                           f"{primary[2]}")
            return None
        out = [primary] if group.include_local else []
        out += [_member(m, primary, s) for m in group.members]
        if trace is not None:
            n = len(group.members)
            trace.plan(([(primary, f"the local partition (sameness group {group.name} has "
                          "include_local)")] if group.include_local else []) +
                       [(loc, f"member {i} of {n} of sameness group {group.name}")
                        for i, loc in enumerate(out[1 if group.include_local else 0:], 1)])
        return list(dict.fromkeys(out))
    out = [primary]
    if query.kind not in ("service", "connect") or primary[0]:
        return out
    targets = snap.failover.get(("", primary[1], primary[2], primary[3], query.name), ())
    group = snap.default_sameness.get(primary[2])
    if group is not None and (primary[1] != s.local_dc or query.datacenter is not None):
        group = None
    if not targets and group is None:
        return out  # the common case: no failover configured
    out += [_target_locality(t, primary, s) for t in targets]
    if group is not None:
        out += [_member(m, primary, s) for m in group.members]
    if trace is not None:
        n, m = len(targets), len(out) - 1 - len(targets)
        plan = [(primary, "the service's own locality")]
        plan += [(loc, f"failover target {i} of {n} of {query.name} (catalog failover)")
                 for i, loc in enumerate(out[1:1 + n], 1)]
        if group is not None:
            plan += [(loc, f"member {i} of {m} of sameness group {group.name} (its "
                           f"default_for_failover applies in partition {primary[2]})")
                     for i, loc in enumerate(out[1 + n:], 1)]
        trace.plan(plan)
    return list(dict.fromkeys(out))  # the empty locality is not tried twice


def _member(m: Any, source: Locality, s: Settings) -> Locality:
    if m.peer:  # imported into the group's partition (the source's), as a peer lookup there
        return (m.peer.lower(), "", source[2], source[3])
    return ("", s.local_dc, m.partition.lower(), source[3])


def _find(index: Any, localities: Sequence[Locality], name: str, tag: str | None,
          only_passing: bool,
          trace: Trace | None = None) -> tuple[Locality, tuple[Instance, ...]] | None:
    for loc in localities:
        group: InstanceSet | None = index.get((*loc, name))
        if group is None:
            if trace is not None:
                trace.look(loc, name, (), (), only_passing=only_passing,
                           only_passing_from="dns.only_passing")
            continue
        found = group.healthy(only_passing)
        if tag is not None:
            found = tuple(i for i in found if tag in i.tags)
        if trace is not None:
            trace.look(loc, name, group.usable + group.unusable, found,
                       tags=(tag,) if tag is not None else (), only_passing=only_passing,
                       only_passing_from="dns.only_passing")
        if found:
            return loc, found
    return None


# --- service, connect, ingress -------------------------------------------------------------


_INDEX = {"service": "services", "connect": "connect", "ingress": "ingress"}


def _service(query: Query, qtype: int, snap: Snapshot, s: Settings,
             trace: Trace | None) -> Answer:
    if not _known(snap, query.datacenter, query.peer, query.partition, trace):
        return nxdomain(s, snap, query.domain, query.kind)
    localities = _localities(query, snap, s, trace)
    index = getattr(snap, _INDEX[query.kind])
    found = _find(index, localities or (), query.name, query.tag, s.only_passing, trace)
    if found is None:
        if trace is not None:
            trace.note("no healthy instance in any locality tried: NXDOMAIN")
        return nxdomain(s, snap, query.domain, query.kind)
    ttl = s.service_ttl(query.name)
    if trace is not None:
        rule = s.service_ttl_rule(query.name)
        trace.ttl_setting = f"dns.service_ttl[{rule!r}]" if rule is not None else \
            "no dns.service_ttl entry matches: 0"
    return instance_answer(found[1], qtype, ttl, s, snap, query.domain, query.kind)


def instance_answer(instances: Sequence[Instance], qtype: int, ttl: int, s: Settings,
                    snap: Snapshot, domain: str, kind: str) -> Answer:
    """A/AAAA/SRV records for a set of healthy instances (shared with prepared queries)."""
    if qtype in (A, AAAA, ANY):
        return _address_answer(instances, qtype, ttl, s, snap, domain, kind)
    if qtype == SRV:
        return _srv_answer(instances, ttl, s, snap, domain, kind)
    return nodata(s, snap, domain, kind)


def _translate(inst: Instance, s: Settings) -> bool:
    return s.translate_wan and not inst.peer and inst.datacenter != s.local_dc


def _address_for(inst: Instance, family: int, s: Settings) -> tuple[str, int, bool]:
    """(address, port, translated) for the asked family (A or AAAA; ANY: as registered)."""
    address, port, translated = inst.address, inst.port, False
    tagged = inst.tagged
    if _translate(inst, s):
        wan = tagged.get("wan_ipv6" if family == AAAA else "wan_ipv4") or tagged.get("wan")
        if wan is not None:
            address, translated = wan.address, True
            if wan.port:
                port = wan.port
    if family in (A, AAAA) and pack_address(address) and (":" in address) != (family == AAAA):
        other = tagged.get("lan_ipv6" if family == AAAA else "lan_ipv4")
        if other is not None and not translated:
            address = other.address
    return address, port, translated


def _address_answer(instances: Sequence[Instance], qtype: int, ttl: int, s: Settings,
                    snap: Snapshot, domain: str, kind: str) -> Answer:
    records: dict[bytes, Record] = {}
    cname: str | None = None
    families = (A, AAAA) if qtype == ANY else (qtype,)
    size = 16 if qtype == AAAA else 4
    for inst in instances:
        packed = inst.packed
        if qtype != ANY and len(packed) == size and not (s.translate_wan and _translate(inst, s)):
            if packed not in records:  # the common case: the address as registered
                records[packed] = (None, qtype, ttl, packed)
            continue
        for family in families:  # a hostname, another family, a WAN address
            address, _, _ = _address_for(inst, family, s)
            rec = _ip_record(None, ttl, address)
            if rec is None:
                cname = cname or address
            elif rec[1] == family and rec[3] not in records:
                records[rec[3]] = rec
    if records:
        # a_record_limit is applied after the shuffle (wire.encode), as Consul does, so each
        # reply carries a different subset
        return Answer(answers=[(r, ()) for r in records.values()], kind=kind,
                      max_answers=s.a_record_limit)
    if cname is not None:
        return _cname_answer(cname, qtype, ttl, s, snap, domain, kind)
    return nodata(s, snap, domain, kind)


# CNAMEs followed so far in this resolution: hostnames under our domain may point in a loop
_CNAME_DEPTH: ContextVar[int] = ContextVar("cname_depth", default=0)


def _cname_answer(host: str, qtype: int, ttl: int, s: Settings, snap: Snapshot, domain: str,
                  kind: str) -> Answer:
    """``qname CNAME host`` plus host's records when host is itself under our domain."""
    answer = Answer(answers=[((None, CNAME, ttl, host), ())], kind=kind)
    answer.answers.extend((rec, ()) for rec in _host_addresses(host, qtype, ttl, s, snap, domain))
    return answer


def _host_addresses(host: str, qtype: int, ttl: int, s: Settings, snap: Snapshot,
                    domain: str) -> list[Record]:
    """A/AAAA records of a hostname that is itself under our domain (none for others: names
    outside the domain are not looked up on the packet path). Loops end after 3 levels."""
    labels = tuple(host.split("."))
    dl = tuple(domain.split("."))
    depth = _CNAME_DEPTH.get()
    if depth >= 3 or labels[-len(dl):] != dl:
        return []
    inner = parse(labels[:-len(dl)], domain)
    if inner.kind not in ("service", "node", "virtual", "addr", "connect", "ingress"):
        return []
    token = _CNAME_DEPTH.set(depth + 1)
    try:
        sub = resolve(inner, qtype, snap, s)
    finally:
        _CNAME_DEPTH.reset(token)
    return [(host if owner is None else owner, rtype, ttl, rdata)
            for (owner, rtype, _ttl, rdata), _extra in sub.answers if rtype in (A, AAAA)]


def _locality_labels(inst: Instance) -> str:
    return f"{inst.peer}.peer" if inst.peer else inst.datacenter


def _srv_answer(instances: Sequence[Instance], ttl: int, s: Settings, snap: Snapshot,
                domain: str, kind: str) -> Answer:
    seen: set[tuple[str, str, int]] = set()
    answers: list[tuple[Record, tuple[Record, ...]]] = []
    for inst in instances:
        address, port, translated = _address_for(inst, ANY, s)
        key = (inst.node.name, address, port)
        if key in seen:
            continue
        seen.add(key)
        weight = inst.weight_warning if inst.status == "warning" else inst.weight_passing
        extra: list[Record] = []
        packed = pack_address(address)
        if not packed:  # a hostname: the target itself, and its addresses
            target = address
            extra.extend(_host_addresses(address, ANY, ttl, s, snap, domain))
        else:
            if inst.own_address or translated:  # (packed.hex() is names.addr_hex(address))
                target = f"{packed.hex()}.addr.{_locality_labels(inst)}.{domain}"
            else:
                target = ".".join(node_labels(inst.node)) + "." + domain
            extra.append((target, AAAA if len(packed) == 16 else A, ttl, packed))
            if s.node_meta_txt and inst.node.meta:
                extra.extend(_txt_records(target, ttl, inst.node.meta))
        answers.append(((None, SRV, ttl, (1, weight, port, target)), tuple(extra)))
    return Answer(answers=answers, kind=kind)


# --- node, virtual, addr, prepared query, PTR ----------------------------------------------


def _node(query: Query, qtype: int, snap: Snapshot, s: Settings,
          trace: Trace | None) -> Answer:
    if not _known(snap, query.datacenter, query.peer, query.partition, trace):
        return nxdomain(s, snap, query.domain, "node")
    peer = query.peer or ""
    dc = "" if peer else (query.datacenter or s.local_dc)
    node = snap.node(peer, dc, query.partition or s.partition, query.name)
    if trace is not None:
        where = f"peer {peer}" if peer else f"datacenter {dc}"
        where += f", partition {query.partition or s.partition}"
        trace.note(f"no node {query.name!r} in {where}" if node is None else
                   f"node {node.name} in {where}: address {node.address}, health {node.health} "
                   "(a node answers whatever its health)")
        trace.ttl_setting = "dns.node_ttl"
    if node is None:
        return nxdomain(s, snap, query.domain, "node")
    return node_answer(node, qtype, snap, s, query.domain)


def node_answer(node: NodeRecord, qtype: int, snap: Snapshot, s: Settings,
                domain: str) -> Answer:
    ttl = s.node_ttl
    answer = Answer(kind="node")
    if qtype in (A, AAAA, ANY):
        address = node.address
        if s.translate_wan and not node.peer and node.datacenter != s.local_dc:
            wan = node.tagged.get("wan_ipv6" if qtype == AAAA else "wan_ipv4") or \
                node.tagged.get("wan")
            address = wan.address if wan is not None else address
        rec = _ip_record(None, ttl, address)
        if rec is None:
            return _cname_answer(address, qtype, ttl, s, snap, domain, "node")
        if qtype == ANY or rec[1] == qtype:
            answer.answers.append((rec, ()))
            if s.node_meta_txt and qtype != ANY:
                answer.additional.extend(_txt_records(None, ttl, node.meta))
    if qtype in (TXT, ANY):
        answer.answers.extend((r, ()) for r in _txt_records(None, ttl, node.meta))
    if not answer.answers:
        return nodata(s, snap, domain, "node")
    return answer


def _virtual(query: Query, qtype: int, snap: Snapshot, s: Settings,
             trace: Trace | None) -> Answer:
    if not _known(snap, None, query.peer, query.partition, trace):
        return nxdomain(s, snap, query.domain, "virtual")
    key = (query.peer or "", query.partition or s.partition, query.namespace or "default",
           query.name)
    ip = snap.vips.get(key)
    if trace is not None:
        where = (f"peer {key[0]}, " if key[0] else "") + f"partition {key[1]}, namespace {key[2]}"
        trace.note(f"virtual IP of {query.name} ({where}): {ip}" if ip is not None else
                   f"{query.name} ({where}) has no virtual IP: it is not in the mesh (no "
                   "connect proxy, not connect-native, not imported) and has no virtual_ips "
                   "entry")
        trace.ttl_setting = "dns.node_ttl"
    if ip is None:
        return nxdomain(s, snap, query.domain, "virtual")
    if qtype not in (A, ANY):
        return nodata(s, snap, query.domain, "virtual")
    return Answer(answers=[((None, A, s.node_ttl, socket.inet_aton(ip)), ())], kind="virtual")


def _addr(query: Query, qtype: int, snap: Snapshot, s: Settings,
          trace: Trace | None) -> Answer:
    raw = bytes.fromhex(query.name)
    rtype = A if len(raw) == 4 else AAAA
    if trace is not None:
        trace.note(f"{query.name} is the address "
                   f"{socket.inet_ntop(socket.AF_INET if rtype == A else socket.AF_INET6, raw)}"
                   " (no catalog look-up)")
        trace.ttl_setting = "dns.node_ttl"
    rec: Record = (None, rtype, s.node_ttl, raw)
    if qtype in (rtype, ANY):
        return Answer(answers=[(rec, ())], kind="addr")
    answer = nodata(s, snap, query.domain, "addr")
    answer.additional.append(rec)
    return answer


def _prepared(query: Query, qtype: int, snap: Snapshot, s: Settings,
              trace: Trace | None) -> Answer:
    pq = snap.prepared_queries.get(query.name)
    if pq is None and trace is not None:
        trace.note(f"no prepared query named {query.name!r}")
    if pq is None or not _known(snap, query.datacenter, None, None, trace):
        return nxdomain(s, snap, query.domain, "query")
    dc = query.datacenter or s.local_dc
    source: Locality = ("", dc, pq.partition.lower(), pq.namespace.lower())
    localities = [source] + _query_failover(pq, source, snap, s, trace)
    tags = [t.lower() for t in pq.tags]
    only_passing = pq.only_passing or s.only_passing
    name = pq.service.lower()
    if trace is not None:
        trace.note(f"prepared query {pq.name}: service {pq.service}" +
                   (f", tags {', '.join(pq.tags)}" if pq.tags else "") +
                   (", only_passing" if pq.only_passing else ""))
        trace.whys.setdefault(source, f"the prepared query's own datacenter {dc}")
        why_passing = "the prepared query's only_passing" if pq.only_passing else \
            "dns.only_passing"
    for loc in dict.fromkeys(localities):
        group = snap.services.get((*loc, name))
        if group is None:
            if trace is not None:
                trace.look(loc, name, (), (), only_passing=only_passing,
                           only_passing_from=why_passing)
            continue
        found = [i for i in group.healthy(only_passing) if _tags_match(i.tags, tags)]
        if trace is not None:
            trace.look(loc, name, group.usable + group.unusable, tuple(found),
                       tags=tuple(tags), only_passing=only_passing,
                       only_passing_from=why_passing)
        if found:
            ttl = int(pq.ttl) if pq.ttl is not None else s.service_ttl(name)
            if trace is not None:
                rule = s.service_ttl_rule(name)
                trace.ttl_setting = f"prepared query {pq.name}: ttl" if pq.ttl is not None \
                    else f"dns.service_ttl[{rule!r}]" if rule is not None else \
                    "no ttl on the prepared query and no dns.service_ttl entry matches: 0"
            return instance_answer(found, qtype, ttl, s, snap, query.domain, "query")
    if trace is not None:
        trace.note("no healthy instance in any locality tried: NXDOMAIN")
    return nxdomain(s, snap, query.domain, "query")


def _tags_match(have: frozenset[str], wanted: list[str]) -> bool:
    return all((t[1:] not in have) if t.startswith("!") else (t in have) for t in wanted)


def _query_failover(pq: Any, source: Locality, snap: Snapshot, s: Settings,
                    trace: Trace | None = None) -> list[Locality]:
    f = pq.failover
    dc = source[1]
    out: list[Locality] = []
    if f.nearest_n:
        # as Consul: datacenters without a known RTT sort after those with one, by name
        inf = float("inf")
        others = sorted((d for d in snap.datacenters if d != dc),
                        key=lambda d: (snap.rtt.get((dc, d), inf), d))
        out += [("", d, source[2], source[3]) for d in others[: f.nearest_n]]
        if trace is not None:
            trace.plan([(loc, f"prepared-query failover: nearest_n {i} of {f.nearest_n} "
                              f"(datacenter {loc[1]}, rtt " + (
                                  f"{snap.rtt[(dc, loc[1])] * 1000:g} ms)"
                                  if (dc, loc[1]) in snap.rtt else "unknown)"))
                        for i, loc in enumerate(out, 1)])
    listed = [("", d.lower(), source[2], source[3]) for d in f.datacenters
              if d.lower() in snap.datacenters]
    targets = [_target_locality(t, source, s) for t in f.targets]
    if trace is not None:
        trace.plan([(loc, f"prepared-query failover: datacenters entry {i} of "
                          f"{len(f.datacenters)} ({loc[1]})") for i, loc in enumerate(listed, 1)]
                   + [(loc, f"prepared-query failover: targets entry {i} of {len(targets)}")
                      for i, loc in enumerate(targets, 1)])
        for d in f.datacenters:
            if d.lower() not in snap.datacenters:
                trace.note(f"prepared-query failover datacenter {d!r} is not in the catalog: "
                           "skipped")
    return out + listed + targets


def _ptr(query: Query, qtype: int, snap: Snapshot, s: Settings,
         trace: Trace | None = None) -> Answer:
    labels = snap.ptr.get(query.name)
    if trace is not None:
        trace.note(f"{query.name} is not a node, service or virtual IP address in the catalog"
                   if labels is None else f"{query.name} is {'.'.join(labels)}.{s.domain}. "
                   "(nodes first, then service addresses, then virtual IPs)")
        trace.ttl_setting = "fixed: PTR answers have TTL 0"
    if labels is None:
        return nxdomain(s, snap, s.domain, "ptr")
    if qtype not in (PTR, ANY):
        return nodata(s, snap, s.domain, "ptr")
    target = ".".join(labels) + "." + s.domain
    return Answer(answers=[((None, PTR, 0, target), ())], kind="ptr")


_HANDLERS: dict[str, Callable[[Query, int, Snapshot, Settings, Any], Answer]] = {
    "service": _service,
    "connect": _service,
    "ingress": _service,
    "node": _node,
    "virtual": _virtual,
    "addr": _addr,
    "query": _prepared,
    "apex": _apex,
    "invalid": _invalid,
    "nameserver": _nameserver,
}
