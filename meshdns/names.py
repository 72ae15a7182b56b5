"""The query-name grammar: a name in, a ``Query`` out. No I/O.

The kind of lookup is decided by the right-most keyword label; labels to its right are
``<value>.<key>`` locality pairs or one bare label (a datacenter, or a peer for ``.virtual``).
Anything that does not fit is ``INVALID`` (NXDOMAIN with the SOA).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .trace import Trace

KEYWORDS = frozenset({"service", "connect", "ingress", "virtual", "node", "query", "addr"})
LOCALITY_KEYS = frozenset({"ns", "ap", "dc", "peer", "sg"})


class Query(NamedTuple):  # a NamedTuple: built per query, 5x cheaper than a frozen dataclass
    """What a name asks for. ``None`` fields mean "the default" (resolved against config)."""

    kind: str  # service connect ingress virtual node query addr apex nameserver ptr invalid
    domain: str  # the domain the name was under ("consul" or the alt_domain), lowercase
    name: str = ""  # service / node / prepared-query name, hex for addr, IP for ptr
    tag: str | None = None
    namespace: str | None = None
    partition: str | None = None
    datacenter: str | None = None
    peer: str | None = None
    sameness_group: str | None = None


def split_domain(labels: tuple[str, ...], domains: tuple[tuple[str, ...], ...]) -> int:
    """How many labels of ``labels`` (lowercase) belong to the first domain that is a suffix.

    ``domains`` is ordered longest first. Returns -1 when none matches.
    """
    for index, domain in enumerate(domains):
        n = len(domain)
        if len(labels) >= n and labels[len(labels) - n:] == domain:
            return index
    return -1


def parse(labels: tuple[str, ...], domain: str, trace: Trace | None = None) -> Query:
    """Parse the labels left of ``domain`` (lowercase, no empty root label). With a ``trace``,
    an invalid name also says why (``meshdns explain``)."""
    if not labels:
        return Query("apex", domain)
    if labels == ("ns",):
        return Query("nameserver", domain)  # the target of our NS record
    # right-most keyword; an `_x` label met first (RFC 2782 without `.service`) means service
    for i in range(len(labels) - 1, -1, -1):
        label = labels[i]
        if label in KEYWORDS:
            kind, parts, suffix = label, labels[:i], labels[i + 1:]
            break
        if label.startswith("_"):
            kind, parts, suffix = "service", labels[: i + 1], labels[i + 1:]
            break
    else:
        return _invalid(domain, trace, "no lookup keyword (service, connect, ingress, virtual, "
                        "node, query, addr) and no _service label")
    if not parts:
        return _invalid(domain, trace, f"nothing left of the keyword {kind!r}")
    return _BUILDERS[kind](parts, suffix, domain, trace)


def _invalid(domain: str, trace: Trace | None = None, why: str = "") -> Query:
    if trace is not None:
        trace.reject(why)
    return Query("invalid", domain)


def _locality(suffix: tuple[str, ...], bare_is_peer: bool,
              trace: Trace | None = None) -> dict[str, str] | None:
    """``{"dc": ..., "ns": ...}`` from the labels right of the keyword, or None if malformed."""
    if not suffix:
        return {}
    if len(suffix) == 1:
        return {"peer": suffix[0]} if bare_is_peer else {"dc": suffix[0]}
    if len(suffix) % 2 or len(suffix) > 6:
        if trace is not None:
            trace.reject(f"{len(suffix)} locality labels after the keyword: expected one bare "
                         "label or up to three <value>.<key> pairs")
        return None
    out: dict[str, str] = {}
    for value, key in zip(suffix[0::2], suffix[1::2]):
        if key not in LOCALITY_KEYS or key in out or not value:
            if trace is not None:
                trace.reject(f"{key!r} is given twice" if key in out else
                             f"{value}.{key}: {key!r} is not a locality key (ns, ap, dc, peer, "
                             "sg)" if key not in LOCALITY_KEYS else f"an empty {key} label")
            return None
        out[key] = value
    if "peer" in out and ("dc" in out or "sg" in out):
        if trace is not None:
            trace.reject(".peer cannot be combined with ." + ("dc" if "dc" in out else "sg"))
        return None
    if "sg" in out and "dc" in out:
        if trace is not None:
            trace.reject(".sg cannot be combined with .dc")
        return None
    return out


def _service(kind: str):  # noqa: ANN202 - a small factory of builders
    def build(parts: tuple[str, ...], suffix: tuple[str, ...], domain: str,
              trace: Trace | None = None) -> Query:
        loc = _locality(suffix, False, trace)
        if loc is None:
            return _invalid(domain, trace)
        tag: str | None
        if kind == "service" and len(parts) == 2 and all(p.startswith("_") for p in parts):
            name, tag = parts[0][1:], parts[1][1:]
            if tag == "tcp":
                tag = None
        elif kind == "service":
            name = parts[-1]
            tag = ".".join(parts[:-1]) or None
            if name.startswith("_") and tag is None:
                name = name[1:]
        else:  # connect / ingress: the service is the last part, no tag filter
            name, tag = parts[-1], None
        if not name:
            return _invalid(domain, trace, "an empty service name")
        return Query(kind, domain, name, tag, loc.get("ns"), loc.get("ap"), loc.get("dc"),
                     loc.get("peer"), loc.get("sg"))

    return build


def _virtual(parts: tuple[str, ...], suffix: tuple[str, ...], domain: str,
             trace: Trace | None = None) -> Query:
    loc = _locality(suffix, True, trace)
    if loc is None or "dc" in loc or "sg" in loc:
        # virtual IPs are per cluster: no cross-datacenter form
        return _invalid(domain, trace, "a .virtual name takes no .dc or .sg")
    return Query("virtual", domain, parts[-1], None, loc.get("ns"), loc.get("ap"), None,
                 loc.get("peer"))


def _node(parts: tuple[str, ...], suffix: tuple[str, ...], domain: str,
          trace: Trace | None = None) -> Query:
    loc = _locality(suffix, False, trace)
    if loc is None or "sg" in loc or loc.get("ns", "default") != "default":
        # nodes live in the default namespace
        return _invalid(domain, trace, "a .node name takes no .sg, and no .ns but default")
    return Query("node", domain, ".".join(parts), None, None, loc.get("ap"), loc.get("dc"),
                 loc.get("peer"))


def _prepared(parts: tuple[str, ...], suffix: tuple[str, ...], domain: str,
              trace: Trace | None = None) -> Query:
    loc = _locality(suffix, False, trace)
    if loc is None or set(loc) - {"dc"}:
        return _invalid(domain, trace, "a .query name takes only a datacenter")
    if len(parts) >= 2 and parts[0].startswith("_") and parts[-1].startswith("_"):
        name = ".".join(parts[:-1])[1:]  # _name._tcp: the protocol label is ignored
    else:
        name = ".".join(parts)
    if not name:
        return _invalid(domain, trace, "an empty prepared-query name")
    return Query("query", domain, name, datacenter=loc.get("dc"))


def _addr(parts: tuple[str, ...], suffix: tuple[str, ...], domain: str,
          trace: Trace | None = None) -> Query:
    loc = _locality(suffix, False, trace)
    if loc is None or len(parts) != 1 or len(parts[0]) not in (8, 32):
        return _invalid(domain, trace, ".addr takes one label of 8 (IPv4) or 32 (IPv6) hex "
                        "digits")
    if parts[0].strip("0123456789abcdef"):  # bytes.fromhex would skip spaces: check digits
        return _invalid(domain, trace, f"{parts[0]!r} is not hex")
    return Query("addr", domain, parts[0], datacenter=loc.get("dc"), peer=loc.get("peer"))


_BUILDERS = {
    "service": _service("service"),
    "connect": _service("connect"),
    "ingress": _service("ingress"),
    "virtual": _virtual,
    "node": _node,
    "query": _prepared,
    "addr": _addr,
}


def parse_reverse(labels: tuple[str, ...]) -> str | None:
    """The IP address of a ``…in-addr.arpa`` / ``…ip6.arpa`` name (lowercase labels), or None."""
    if labels[-2:] == ("in-addr", "arpa") and len(labels) == 6:
        octets = labels[3::-1]
        if all(o.isascii() and o.isdigit() and len(o) <= 3 and int(o) <= 255 for o in octets):
            return ".".join(str(int(o)) for o in octets)
        return None
    if labels[-2:] == ("ip6", "arpa") and len(labels) == 34:
        nibbles = labels[31::-1]
        if all(len(n) == 1 and n in "0123456789abcdef" for n in nibbles):
            # inet_ntop: the same text as the catalog's addresses (model.check_address)
            return socket.inet_ntop(socket.AF_INET6, bytes.fromhex("".join(nibbles)))
    return None


def addr_hex(ip: str) -> str:
    """The ``<hex>`` of an ``.addr`` name: 8 hex digits for IPv4, 32 for IPv6."""
    return ipaddress.ip_address(ip).packed.hex()
