"""``meshdns explain``: why a name gets the answer it gets.

The name is put in a query packet and answered by the server's own code: ``wire.parse_query``,
``Responder.answer`` (names.parse -> resolve.resolve) with a ``Trace`` that records each step,
and ``Responder.render`` for the reply bytes. The records shown are decoded from those bytes,
so they are exactly what the server sends (the packet path's fast path and cache hold replies
that test_fastpath and the explain tests check against the same bytes). Nothing is changed: no
cache entry, no counter.

The document's shape is public (``meshdns explain --json``, ``GET /v1/explain``); its pinned
fields are name, type, query, steps, rcode and answer.
"""

from __future__ import annotations

import json
import struct
from typing import Any

import dns.message
import dns.rcode
import dns.rdatatype

from .names import Query, split_domain
from .resolve import Settings
from .responder import Execute, Responder
from .trace import Trace
from .wire import (
    NO_EDNS_MAX_ANSWERS,
    Reject,
    limits_for,
    parse_query,
    plain_reply,
)

_SERVICE_KINDS = ("service", "connect", "ingress")


class ExplainError(ValueError):
    """A name or type that cannot be asked at all (the caller's mistake, not the catalog's)."""


def record_type(text: str | int) -> int:
    """``A``, ``srv``, ``TYPE65`` or 28 -> the type number; ExplainError when unknown."""
    if isinstance(text, int):
        return text
    try:
        return int(dns.rdatatype.from_text(text.strip().upper() or "A"))
    except (dns.rdatatype.UnknownRdatatype, ValueError):
        raise ExplainError(f"unknown record type {text!r}") from None


def query_packet(name: str, qtype: int) -> bytes:
    """A query for ``name`` as a resolver would send it: RD set, no EDNS, class IN, ID 0.

    ``name`` is in presentation format, as dig takes it: ``\\.`` is a dot inside a label and
    ``\\DDD`` the byte DDD (what the status page shows for bytes that are not printable).
    Other characters become one byte when they can (latin-1, as the server decodes names it
    cannot read as ASCII), else their UTF-8 bytes."""
    labels = _labels(name)
    out = bytearray(struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 0))
    for raw in labels:
        if not raw:
            raise ExplainError(f"{name!r} has an empty label")
        if len(raw) > 63:
            raise ExplainError(f"a label of {name!r} is longer than 63 bytes")
        out.append(len(raw))
        out += raw
    out.append(0)
    if len(out) - 12 > 255:
        raise ExplainError(f"{name!r} is longer than 255 bytes")
    return bytes(out + struct.pack("!HH", qtype, 1))


def _labels(name: str) -> list[bytes]:
    """The labels of a presentation-format name (a final dot, or none, ends it)."""
    labels: list[bytes] = []
    label = bytearray()
    i, n = 0, len(name)
    while i < n:
        ch = name[i]
        if ch == "\\" and i + 1 < n:
            digits = name[i + 1:i + 4]
            if len(digits) == 3 and digits.isdigit() and int(digits) < 256:
                label.append(int(digits))
                i += 4
                continue
            ch = name[i + 1]
            i += 1
        elif ch == ".":
            labels.append(bytes(label))
            label = bytearray()
            i += 1
            continue
        try:
            label += ch.encode("latin-1")
        except UnicodeEncodeError:
            label += ch.encode("utf-8", "replace")
        i += 1
    if label or not labels:
        labels.append(bytes(label))
    if labels == [b""]:  # the root, or an empty name
        return []
    return labels


def explain(responder: Responder, name: str, qtype: str | int = "A") -> dict[str, Any]:
    """The explain document for ``name`` asked with ``qtype`` of the responder's snapshot."""
    rdtype = record_type(qtype)
    packet = query_packet(name, rdtype)
    type_text = dns.rdatatype.to_text(rdtype)
    snap = responder.snapshot
    s = responder.settings
    doc: dict[str, Any] = {
        "name": _fqdn(name), "type": type_text, "query": None, "steps": [], "rcode": None,
        "answer": [], "authority": [], "additional": [], "notes": [], "ttl": None,
        "udp_without_edns": None, "generation": snap.generation, "serial": snap.serial,
    }
    try:
        question = parse_query(packet)
    except Reject as reject:  # e.g. a type the server refuses (AXFR, OPT)
        doc["rcode"] = dns.rcode.to_text(reject.rcode)
        doc["notes"].append(f"the server answers {type_text} queries with {doc['rcode']}")
        return doc
    trace = Trace()
    if not responder.serving and split_domain(question.labels, responder.domain_labels) >= 0:
        # what the packet path answers while the source has nothing (fresh enough) to serve
        state = "no catalog data yet, or the last good one is older than max_stale"
        doc["notes"].append(f"the catalog source is not serving ({state}): SERVFAIL")
        doc["rcode"] = "SERVFAIL"
        return doc
    answer, forward = responder.answer(question, trace)
    doc["query"] = _query(trace.query, s, trace)
    doc["notes"] = list(trace.notes)
    if isinstance(answer, Execute):
        doc["notes"].append("no result held for this prepared query: the server would ask "
                            "Consul to execute it now (explain does not)")
        return doc
    if forward:
        recursors = ", ".join(responder.config.dns.recursors)
        doc["notes"].append(f"outside the domain: the server forwards it to the recursors "
                            f"({recursors}) and passes their answer back; explain does not "
                            "forward")
        return doc
    if answer is None:
        doc["notes"].append("outside the domain and no dns.recursors: REFUSED (meshdns is not "
                            "an open resolver)")
        full = udp = plain_reply(question, 5, responder.recursion)
    else:
        full = responder.render(question, answer, True)
        udp = responder.render(question, answer, False)
    message = dns.message.from_wire(full)
    doc["rcode"] = dns.rcode.to_text(message.rcode())
    doc["aa"] = bool(message.flags & 0x0400)
    for section, rrsets in (("answer", message.answer), ("authority", message.authority),
                            ("additional", message.additional)):
        doc[section] = sorted(line for rrset in rrsets for line in rrset.to_text().splitlines())
    doc["steps"] = [_step(step) for step in trace.steps]
    doc["ttl"] = _ttl(message, trace)
    doc["udp_without_edns"] = _udp(full, udp, question, responder)
    return doc


def _fqdn(name: str) -> str:
    return name if name.endswith(".") else name + "."


def _query(query: Query | None, s: Settings, trace: Trace) -> dict[str, Any] | None:
    """How the name was read, with the defaults filled in."""
    if query is None:
        return None if trace.invalid is None else {"kind": "invalid", "invalid": trace.invalid}
    kind = query.kind
    out: dict[str, Any] = {"kind": kind, "service": None, "tag": query.tag, "namespace": None,
                           "partition": None, "datacenter": None, "peer": query.peer,
                           "sameness_group": query.sameness_group, "domain": query.domain,
                           "defaults": []}
    defaults = out["defaults"]
    if kind == "invalid":
        out["invalid"] = trace.invalid
        return out
    if kind in (*_SERVICE_KINDS, "virtual"):
        out["service"] = query.name
    elif kind == "node":
        out["node"] = query.name
    elif kind == "query":
        out["prepared_query"] = query.name
    elif kind == "addr":
        out["address_hex"] = query.name
    elif kind == "ptr":
        out["address"] = query.name
    if kind in (*_SERVICE_KINDS, "virtual"):
        out["namespace"] = query.namespace or "default"
        if query.namespace is None:
            defaults.append("namespace: default")
    if kind in (*_SERVICE_KINDS, "virtual", "node"):
        out["partition"] = query.partition or s.partition
        if query.partition is None:
            defaults.append(f"partition: {s.partition} (the config's partition)")
    if kind in (*_SERVICE_KINDS, "node", "query"):
        if query.peer:
            out["datacenter"] = None
        else:
            out["datacenter"] = query.datacenter or s.local_dc
            if query.datacenter is None:
                defaults.append(f"datacenter: {s.local_dc} (the config's datacenter)")
    return out


def _step(step: Any) -> dict[str, Any]:
    peer, dc, partition, namespace = step.locality
    return {
        "locality": {"datacenter": dc or None, "partition": partition, "namespace": namespace,
                     "peer": peer or None},
        "why": step.why,
        "instances": [{
            "id": c.instance.id, "service": c.instance.service, "node": c.instance.node.name,
            "address": c.instance.address, "port": c.instance.port,
            "status": c.instance.status, "used": c.used, "reason": c.reason,
        } for c in step.instances],
        "outcome": step.outcome,
    }


def _ttl(message: dns.message.Message, trace: Trace) -> dict[str, Any] | None:
    if message.answer:
        return {"value": message.answer[0].ttl, "setting": trace.ttl_setting}
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            return {"value": rrset.ttl, "setting": "dns.soa.min_ttl (a negative answer is "
                    "cached for the SOA's TTL and minimum)"}
    return None


def _udp(full: bytes, udp: bytes, question: Any, responder: Responder) -> dict[str, Any]:
    """What a UDP query without EDNS (512 bytes, a few answers) would get."""
    total = struct.unpack_from("!H", full, 6)[0]
    sent = struct.unpack_from("!H", udp, 6)[0]
    truncated = bool(udp[2] & 0x02)
    dns_config = responder.config.dns
    out: dict[str, Any] = {"answers": sent, "of": total, "bytes": len(udp),
                           "trimmed": sent < total, "truncated": truncated}
    limits = limits_for(question, False, dns_config.udp_answer_limit, dns_config.enable_truncate)
    if sent < total:
        cap = limits.max_answers
        why = (f"at most {cap} answers without EDNS (min(dns.udp_answer_limit "
               f"{dns_config.udp_answer_limit}, {NO_EDNS_MAX_ANSWERS}))" if cap and total > cap
               and sent == cap else f"{limits.max_bytes} bytes at most without EDNS")
        tc = "TC set (dns.enable_truncate is true)" if truncated else \
            "TC not set (dns.enable_truncate is false)"
        out["why"] = f"{why}; {tc}"
    return out


def to_json(doc: dict[str, Any]) -> str:
    """The document as JSON, with <, > and & escaped so no byte of a name can be markup."""
    text = json.dumps(doc, indent=2, ensure_ascii=True)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _loc_text(loc: dict[str, Any]) -> str:
    where = f"peer {loc['peer']}" if loc["peer"] else f"datacenter {loc['datacenter']}"
    return f"{where}, partition {loc['partition']}, namespace {loc['namespace']}"


def render_text(doc: dict[str, Any]) -> str:
    """The document for a terminal."""
    lines = [f"{doc['name']} {doc['type']}"]
    q = doc.get("query")
    if q is not None:
        if q["kind"] == "invalid":
            lines.append(f"  read as: not a valid name: {q.get('invalid')}")
        else:
            what = q.get("service") or q.get("node") or q.get("prepared_query") or \
                q.get("address_hex") or q.get("address") or ""
            parts = [f"{k} {q[k]}" for k in ("tag", "namespace", "partition", "datacenter",
                                             "peer", "sameness_group") if q.get(k)]
            lines.append(f"  read as: {q['kind']} lookup {what}".rstrip() +
                         (f" ({', '.join(parts)})" if parts else ""))
            if q["defaults"]:
                lines.append(f"  defaults filled in: {'; '.join(q['defaults'])}")
    for i, step in enumerate(doc["steps"], 1):
        lines.append(f"  {i}. {_loc_text(step['locality'])}")
        lines.append(f"     why: {step['why']}")
        for inst in step["instances"]:
            mark = "used   " if inst["used"] else "dropped"
            lines.append(f"     {mark} {inst['id']} on {inst['node']} "
                         f"{inst['address']}:{inst['port']} {inst['status']}: {inst['reason']}")
        lines.append(f"     -> {step['outcome']}")
    for note in doc["notes"]:
        lines.append(f"  note: {note}")
    lines.append(f"  rcode: {doc['rcode'] or '(forwarded)'}")
    if doc["ttl"] is not None:
        lines.append(f"  ttl: {doc['ttl']['value']} from {doc['ttl']['setting']}")
    for section in ("answer", "authority", "additional"):
        if doc[section]:
            lines.append(f"  {section}:")
            lines += [f"    {line}" for line in doc[section]]
    udp = doc.get("udp_without_edns")
    if udp is not None:
        if udp["trimmed"]:
            lines.append(f"  udp without edns: {udp['answers']} of {udp['of']} answers: "
                         f"{udp['why']}")
        else:
            lines.append(f"  udp without edns: the whole reply fits ({udp['bytes']} bytes)")
    return "\n".join(lines) + "\n"


__all__ = ["ExplainError", "explain", "query_packet", "record_type", "render_text", "to_json"]
