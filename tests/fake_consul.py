"""A fake Consul HTTP API, faithful to the documented shapes, for tests and benchmarks.

No Consul binary is available to the tests, so this module plays one from the outside: the
response shapes (field names and nesting) of Consul's docs and Go structs, its blocking-query
index rules, consistency headers, ACL behaviour and error bodies. Three layers:

- ``ConsulState``: the data and the index bookkeeping, pure (no sockets, no event loop). Every
  mutator is one raft write: the datacenter's raft index goes up by one and the tables and
  per-object watch keys it touched take that index, as Consul's state store does.
- ``build_app``: the aiohttp application that renders the state as Consul's HTTP API (blocking
  with ``index``/``wait``, ``stale``, ``dc``/``partition``/``ns``/``peer``, tokens, and
  ``filter`` expressions on ``/v1/health/state``, answering 400 to one it cannot compile, as
  Consul does) and applies injected faults; it records every request.
- ``FakeConsul``: runs the app in a background thread on a free loopback port and a unix
  socket; test code calls the state's mutators on it directly (they run on the server's loop).
  ``python tests/fake_consul.py`` runs the same server as a process, driven over
  ``POST /_fake/rpc`` by ``RemoteFake`` (the benchmark uses it, so the fake's CPU is not the
  load generator's).

Index rules modelled (Consul ``agent/consul/state``):

- ``/v1/health/service/<s>``, ``/v1/catalog/service/<s>``: the per-service index (bumped by a
  write to an instance of ``s``, to one of its checks, or to the node or a node check of a node
  that runs it); when ``s`` has no instance, the max of the nodes, services and checks tables,
  so any catalog write wakes a watch on a missing service without a change.
- ``/v1/health/connect/<s>``: the same, keyed by the connect destination (sidecars and
  connect-native instances of ``s``).
- ``/v1/catalog/services``: the services table, bumped by any instance write (a new instance
  of an existing service wakes it with an identical payload); ``/v1/health/state/<st>``: the
  checks table; ``/v1/catalog/nodes``: the nodes table; config entries, namespaces, prepared
  queries: their tables.
- Each datacenter has its own raft index; imported (peered) services live in the local one.
  ``/v1/health/state/<st>`` ignores ``peer`` (as Consul's ``HealthChecksInState``, which does
  not parse it): it answers the local checks whatever ``peer`` says.
- ``restore_snapshot`` lowers the index (a raft snapshot restore): blocked queries return at
  once with the lower index; a query that then asks for an index above it blocks until the
  index passes it or the wait ends, as Consul's ``blockingQuery`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import http.client
import ipaddress
import json
import random
import re
import socket
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

DEFAULT_WAIT = 300.0  # Consul: 5 minutes when `wait` is omitted
MAX_WAIT = 600.0  # Consul caps `wait` at 10 minutes
JITTER_FRACTION = 16  # Consul adds up to wait/16 of random jitter
STATUSES = ("passing", "warning", "critical")
SERF_CHECK = "serfHealth"
NODE_MAINT = "_node_maintenance"
SERVICE_MAINT_PREFIX = "_service_maintenance:"
VIP_START = ipaddress.IPv4Address("240.0.0.0")  # Consul's startingVirtualIP; first one is .1
LEVELS = {"deny": 0, "read": 1, "list": 1, "write": 2}


class ApiError(Exception):
    """An error answer: Consul writes the message as a plain-text body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def parse_go_duration(text: str) -> float:
    """Seconds from a Go duration (``10s``, ``1m30s``, ``250ms``); Consul rejects bare numbers."""
    units = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)", text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ApiError(400, f"Invalid wait time: time: invalid duration \"{text}\"")
    return sum(float(n) * units[u] for n, u in parts)


# ----------------------------------------------------------------------------------------------
# Filter expressions (``?filter=``), as Consul's docs define them (api-docs/features/filtering)
# ----------------------------------------------------------------------------------------------
#
# The grammar of HashiCorp's go-bexpr, which Consul evaluates on the server:
#
#   expression := and-expression ("or" and-expression)*
#   and-expression := unary ("and" unary)*
#   unary      := "not" unary | "(" expression ")" | match
#   match      := selector ("==" | "!=") value
#               | selector "is" ["not"] "empty"
#               | value ["not"] "in" selector
#               | selector ["not"] ("contains" | "matches") value
#   selector   := name ("." name | "[" string "]")*   name: [A-Za-z][A-Za-z0-9_]*
#   value      := "double-quoted" | `raw` | number | a bare name
#
# Each endpoint lists the selectors it accepts and the operations on each; an expression that
# does not parse, names another selector or uses another operation is answered 400 with
# "Failed to create boolean expression evaluator: ...", before the query blocks.

_FILTER_TOKEN = re.compile(r'\s*(?:(==|!=|\(|\)|\[|\]|\.)|("(?:[^"\\]|\\.)*")|(`[^`]*`)'
                           r'|(-?\d+(?:\.\d+)?)|([A-Za-z][A-Za-z0-9_]*))')
_KEYWORDS = {"and", "or", "not", "in", "is", "empty", "contains", "matches"}
#: the operations of a string selector and of a list selector (the docs' tables)
STRING_OPS = frozenset({"==", "!=", "in", "not in", "matches", "not matches"})
LIST_OPS = frozenset({"in", "not in", "is empty", "is not empty"})


@dataclass(frozen=True)
class FilterField:
    """A selector of an endpoint: how to read it from a record, and what it supports."""

    get: Callable[[Any], Any]
    ops: frozenset[str]


def _filter_error(detail: str) -> ApiError:
    return ApiError(400, f"Failed to create boolean expression evaluator: {detail}")


def _tokens(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: op, str (decoded), num, word."""
    out: list[tuple[str, str]] = []
    pos = 0
    while pos < len(text):
        if not text[pos:].strip():
            break
        m = _FILTER_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _filter_error(f"1:{pos + 1}: unexpected {text[pos:pos + 10]!r}")
        op, dq, raw, num, word = m.groups()
        if op:
            out.append(("op", op))
        elif dq is not None:
            try:
                out.append(("str", json.loads(dq)))
            except ValueError:
                raise _filter_error(f"1:{pos + 1}: invalid string {dq}") from None
        elif raw is not None:
            out.append(("str", raw[1:-1]))
        elif num is not None:
            out.append(("num", num))
        else:
            out.append(("word", word))
        pos = m.end()
    return out


class _FilterParser:
    def __init__(self, text: str, fields: dict[str, FilterField]) -> None:
        self.toks = _tokens(text)
        self.i = 0
        self.fields = fields
        self.used: set[str] = set()  # the selectors the expression reads

    def peek(self, k: int = 0) -> tuple[str, str] | None:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else None

    def word(self, *words: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok is not None and tok[0] == "word" and tok[1] in words

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise _filter_error("unexpected end of the expression")
        self.i += 1
        return tok

    def expect_op(self, op: str) -> None:
        tok = self.take()
        if tok != ("op", op):
            raise _filter_error(f"expected {op!r}, found {tok[1]!r}")

    def parse(self) -> Callable[[Any], bool]:
        if not self.toks:
            raise _filter_error("empty expression")
        pred = self.expression()
        if self.peek() is not None:
            raise _filter_error(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return pred

    def expression(self) -> Callable[[Any], bool]:
        parts = [self.and_expression()]
        while self.word("or"):
            self.i += 1
            parts.append(self.and_expression())
        return parts[0] if len(parts) == 1 else (lambda r: any(p(r) for p in parts))

    def and_expression(self) -> Callable[[Any], bool]:
        parts = [self.unary()]
        while self.word("and"):
            self.i += 1
            parts.append(self.unary())
        return parts[0] if len(parts) == 1 else (lambda r: all(p(r) for p in parts))

    def unary(self) -> Callable[[Any], bool]:
        if self.word("not") and not self.word("in", k=1):
            self.i += 1
            inner = self.unary()
            return lambda r: not inner(r)
        if self.peek() == ("op", "("):
            self.i += 1
            inner = self.expression()
            self.expect_op(")")
            return inner
        return self.match()

    def selector(self) -> str:
        kind, text = self.take()
        if kind != "word" or text in _KEYWORDS:
            raise _filter_error(f"expected a selector, found {text!r}")
        parts = [text]
        while self.peek() in (("op", "."), ("op", "[")):
            if self.take() == ("op", "."):
                kind, text = self.take()
                if kind != "word":
                    raise _filter_error(f"expected a name after '.', found {text!r}")
            else:
                kind, text = self.take()
                if kind != "str":
                    raise _filter_error("expected a quoted map key inside [ ]")
                self.expect_op("]")
            parts.append(text)
        return ".".join(parts)

    def value(self) -> str:
        kind, text = self.take()
        if kind == "op" or (kind == "word" and text in _KEYWORDS):
            raise _filter_error(f"expected a value, found {text!r}")
        if kind == "word":  # a bare value may be written like a selector
            self.i -= 1
            return self.selector()
        return text

    def field(self, name: str, op: str) -> FilterField:
        found = self.fields.get(name)
        if found is None:
            raise _filter_error(f'Selector "{name}" is not valid')
        if op not in found.ops:
            raise _filter_error(f'Invalid match operator "{op}" for selector "{name}"')
        self.used.add(name)
        return found

    def match(self) -> Callable[[Any], bool]:
        first = self.peek()
        value_first = first is not None and (first[0] in ("str", "num") or (
            self.word("in", k=1) or (self.word("not", k=1) and self.word("in", k=2))))
        if value_first:
            value = self.value()
            negate = self.word("not")
            if negate:
                self.i += 1
            if not self.word("in"):
                raise _filter_error(f"expected 'in' after the value {value!r}")
            self.i += 1
            name = self.selector()
            return self._contains(name, value, negate, "not in" if negate else "in")
        name = self.selector()
        tok = self.take()
        if tok in (("op", "=="), ("op", "!=")):
            get = self.field(name, tok[1]).get
            value = self.value()
            if tok[1] == "==":
                return lambda r: str(get(r)) == value
            return lambda r: str(get(r)) != value
        if tok == ("word", "is"):
            negate = self.word("not")
            if negate:
                self.i += 1
            if self.take() != ("word", "empty"):
                raise _filter_error("expected 'empty' after 'is'")
            get = self.field(name, "is not empty" if negate else "is empty").get
            return (lambda r: bool(get(r))) if negate else (lambda r: not get(r))
        negate = tok == ("word", "not")
        if negate:
            tok = self.take()
        if tok == ("word", "contains"):
            return self._contains(name, self.value(), negate, "not in" if negate else "in")
        if tok == ("word", "matches"):
            get = self.field(name, "not matches" if negate else "matches").get
            pattern = self.value()
            try:
                regex = re.compile(pattern)
            except re.error as e:
                raise _filter_error(f"invalid regular expression {pattern!r}: {e}") from None
            if negate:
                return lambda r: regex.search(str(get(r))) is None
            return lambda r: regex.search(str(get(r))) is not None
        raise _filter_error(f"expected a match operator after {name}, found {tok[1]!r}")

    def _contains(self, name: str, value: str, negate: bool, op: str
                  ) -> Callable[[Any], bool]:
        """``in``/``contains``: membership of a list, substring of a string."""
        get = self.field(name, op).get

        def contains(r: Any) -> bool:
            got = get(r)
            return (value in got) if isinstance(got, str) else (value in [str(x) for x in got])
        return (lambda r: not contains(r)) if negate else contains


@dataclass(frozen=True)
class CompiledFilter:
    """``keep(record)``: whether the expression holds; ``selectors``: what it reads."""

    keep: Callable[[Any], bool]
    selectors: frozenset[str]

    def __call__(self, record: Any) -> bool:
        return self.keep(record)


_FILTERS: dict[tuple[str, int], CompiledFilter] = {}


def compile_filter(text: str, fields: dict[str, FilterField]) -> CompiledFilter:
    """A predicate for ``?filter=text`` over an endpoint's records; ApiError 400 if it does
    not parse or uses what the endpoint does not support. Compiled once per expression."""
    key = (text, id(fields))
    compiled = _FILTERS.get(key)
    if compiled is None:
        if len(_FILTERS) > 1000:
            _FILTERS.clear()
        parser = _FilterParser(text, fields)
        keep = parser.parse()
        compiled = _FILTERS[key] = CompiledFilter(keep, frozenset(parser.used))
    return compiled


def _check_field(attr: str) -> FilterField:
    return FilterField(lambda r: getattr(r[0], attr), STRING_OPS)


#: ``/v1/health/state/:state`` (and ``/health/node``, ``/health/checks``): a record is
#: (Check, its service's tags); the selectors of Consul's docs, nothing else
CHECK_FILTER_FIELDS: dict[str, FilterField] = {
    "CheckID": _check_field("check_id"), "Name": _check_field("name"),
    "Node": _check_field("node"), "Notes": _check_field("notes"),
    "Output": _check_field("output"), "ServiceID": _check_field("service_id"),
    "ServiceName": _check_field("service_name"), "Status": _check_field("status"),
    "ServiceTags": FilterField(lambda r: r[1], LIST_OPS),
}


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    address: str
    partition: str = "default"
    peer: str = ""
    id: str = field(default_factory=lambda: str(uuid.uuid4()))
    tagged_addresses: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    create_index: int = 0
    modify_index: int = 0


@dataclass
class Service:
    id: str
    name: str
    node: str
    address: str = ""
    port: int = 0
    tags: list[str] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)
    kind: str = ""  # "" | connect-proxy | mesh-gateway | ingress-gateway | terminating-gateway
    proxy: dict[str, Any] = field(default_factory=dict)
    native: bool = False
    tagged_addresses: dict[str, dict[str, Any]] = field(default_factory=dict)
    weights: dict[str, int] = field(default_factory=lambda: {"Passing": 1, "Warning": 1})
    namespace: str = "default"
    partition: str = "default"
    peer: str = ""
    create_index: int = 0
    modify_index: int = 0

    @property
    def connect_name(self) -> str | None:
        """The name this instance serves for /v1/health/connect (and its virtual IP)."""
        if self.kind == "connect-proxy":
            return str(self.proxy.get("DestinationServiceName") or "") or None
        return self.name if self.native else None


@dataclass
class Check:
    node: str
    check_id: str
    name: str
    status: str = "passing"
    service_id: str = ""
    service_name: str = ""
    notes: str = ""
    output: str = ""
    type: str = ""
    namespace: str = "default"
    partition: str = "default"
    peer: str = ""
    create_index: int = 0
    modify_index: int = 0
    alias_service: str = ""  # an alias check mirrors this service (on the same node)


class _RawJSON(str):
    """A body already serialised (``/v1/health/state`` joins cached per-check fragments): sent
    as is, so a change to one check re-encodes one check, not the whole body (real Consul is
    Go; the fake's Python encoding of ~1 MB per scope per change starved the bench)."""


class _Indexed(dict):  # type: ignore[type-arg]
    """A dict of (partition, peer, node, id) -> object that also keeps them by node (and, for
    services, by name), so a 100,000-service fake answers per-service reads in O(instances)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_node: dict[tuple[str, str, str], dict[tuple, Any]] = {}
        self.by_name: dict[tuple, dict[tuple, Any]] = {}
        # checks by (partition, peer, status): a read of the checks not passing costs what
        # is not passing, not the whole scope (values are replaced, never changed in place)
        self.by_status: dict[tuple[str, str, str], set[tuple]] = {}

    def _names(self, value: Any) -> list[tuple]:
        if not isinstance(value, Service):
            return []
        out = [("service", value.partition, value.namespace, value.peer, value.name)]
        if value.connect_name:
            out.append(("connect", value.partition, value.namespace, value.peer,
                        value.connect_name))
        return out

    version = 0  # bumped when a key comes or goes (not when a value is replaced)

    def __setitem__(self, key: tuple, value: Any) -> None:
        if key in self:
            self._remove(key)
        else:
            self.version += 1
        super().__setitem__(key, value)
        self.by_node.setdefault(key[:3], {})[key] = value
        if isinstance(value, Check):
            self.by_status.setdefault((key[0], key[1], value.status), set()).add(key)
        for name in self._names(value):
            self.by_name.setdefault(name, {})[key] = value

    def __delitem__(self, key: tuple) -> None:
        self.version += 1
        self._remove(key)

    def _remove(self, key: tuple) -> None:
        value = self[key]
        super().__delitem__(key)
        self.by_node[key[:3]].pop(key, None)
        if isinstance(value, Check):
            self.by_status.get((key[0], key[1], value.status), set()).discard(key)
        for name in self._names(value):
            self.by_name[name].pop(key, None)

    def pop(self, key: tuple, *default: Any) -> Any:  # type: ignore[override]
        if key in self:
            value = self[key]
            del self[key]
            return value
        if default:
            return default[0]
        raise KeyError(key)

    def on_node(self, partition: str, peer: str, node: str) -> dict[tuple, Any]:
        return self.by_node.get((partition, peer, node), {})


@dataclass
class Datacenter:
    """One datacenter's raft state. Peered (imported) data lives in the local datacenter."""

    name: str
    index: int = 1
    reachable: bool = True
    tables: dict[str, int] = field(default_factory=dict)
    keys: dict[tuple, int] = field(default_factory=dict)  # per-object watch indexes
    nodes: dict[tuple[str, str, str], Node] = field(default_factory=dict)  # (ap, peer, name)
    services: _Indexed = field(default_factory=_Indexed)  # (ap, peer, node, id)
    checks: _Indexed = field(default_factory=_Indexed)  # (ap, peer, node, check id)
    partitions: dict[str, dict[str, Any]] = field(default_factory=dict)
    namespaces: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    config: dict[tuple[str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    queries: dict[str, dict[str, Any]] = field(default_factory=dict)  # by ID
    peers: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)  # (ap, name)
    vips: dict[tuple[str, str, str, str], str] = field(default_factory=dict)
    free_vips: list[str] = field(default_factory=list)
    next_vip: int = 1

    def table(self, *names: str) -> int:
        return max([self.tables.get(n, 0) for n in names] + [1])


@dataclass
class Token:
    secret: str
    accessor: str
    policy: dict[str, Any]


class Authorizer:
    """Evaluates a Consul ACL policy document (the JSON form of the HCL rules).

    Exact rules (``service "web"``) win over prefix rules; the longest prefix wins; rules under
    ``partition``/``partition_prefix`` and ``namespace``/``namespace_prefix`` blocks apply in
    those scopes and are merged over the top-level ones."""

    def __init__(self, policy: dict[str, Any] | None, *, allow_all: bool = False) -> None:
        self.policy = policy or {}
        self.allow_all = allow_all

    @staticmethod
    def _level(rules: dict[str, Any], kind: str, name: str) -> int | None:
        exact = rules.get(kind)
        if isinstance(exact, dict) and name in exact:
            return LEVELS[_policy_of(exact[name])]
        prefixes = rules.get(f"{kind}_prefix")
        if isinstance(prefixes, dict):
            best = max((p for p in prefixes if name.startswith(p)), key=len, default=None)
            if best is not None:
                return LEVELS[_policy_of(prefixes[best])]
        return None

    def _scoped(self, partition: str, namespace: str) -> list[dict[str, Any]]:
        """Rule sets that apply in a scope, most specific last."""
        out = [self.policy]
        for part_rules in _scope_blocks(self.policy, "partition", partition):
            out.append(part_rules)
            out.extend(_scope_blocks(part_rules, "namespace", namespace))
        out.extend(_scope_blocks(self.policy, "namespace", namespace))
        return out

    def allows(self, kind: str, name: str, need: str = "read", *, partition: str = "default",
               namespace: str = "default") -> bool:
        if self.allow_all:
            return True
        level = None
        for rules in self._scoped(partition, namespace):
            found = self._level(rules, kind, name)
            if found is not None:
                level = found
        return level is not None and level >= LEVELS[need]

    def allows_global(self, resource: str, need: str = "read") -> bool:
        """operator / mesh / peering / acl / keyring: one level, no name."""
        if self.allow_all:
            return True
        value = self.policy.get(resource)
        if value is None:
            for part_rules in _scope_blocks(self.policy, "partition", "default"):
                value = part_rules.get(resource, value)
        return value is not None and LEVELS[str(value)] >= LEVELS[need]


def _policy_of(rule: Any) -> str:
    return str(rule.get("policy", "deny") if isinstance(rule, dict) else rule)


def _scope_blocks(rules: dict[str, Any], kind: str, name: str) -> list[dict[str, Any]]:
    out = []
    prefixes = rules.get(f"{kind}_prefix")
    if isinstance(prefixes, dict):
        out += [r for p, r in sorted(prefixes.items(), key=lambda i: len(i[0]))
                if name.startswith(p)]
    exact = rules.get(kind)
    if isinstance(exact, dict) and name in exact:
        out.append(exact[name])
    return [r for r in out if isinstance(r, dict)]


class ConsulState:
    """Every datacenter, partition, namespace, peer, node, service, check, config entry and
    prepared query of a fake Consul federation, with Consul's index bookkeeping. Pure: it
    holds no socket and no event loop; ``listeners`` are told of every write."""

    def __init__(self, datacenter: str = "dc1", *, enterprise: bool = True,
                 node_name: str = "consul-server-1") -> None:
        self.local = datacenter
        self.enterprise = enterprise
        self.node_name = node_name
        self.datacenters: dict[str, Datacenter] = {}
        self.listeners: list[Callable[[str, bool], None]] = []  # (dc, abandoned)
        self.acl_enabled = False
        self.default_policy = "allow"  # X-Consul-Default-ACL-Policy
        self.anonymous_policy: dict[str, Any] | None = None
        self.tokens: dict[str, Token] = {}
        self.leader = True
        self.last_contact_ms = 0
        self.auto_virtual_ips = True  # Consul >= 1.11 allocates them for mesh services
        self.wake_all_on_write = False  # every write wakes every blocked query of the DC
        self.add_datacenter(datacenter)

    # -- bookkeeping ---------------------------------------------------------------------------

    def dc(self, name: str | None = None) -> Datacenter:
        """The datacenter a request is for: 500 "No path to datacenter" when unknown or cut."""
        name = name or self.local
        found = self.datacenters.get(name)
        if found is None or not found.reachable:
            raise ApiError(500, "No path to datacenter")
        return found

    def _dc_any(self, name: str | None) -> Datacenter:
        """For mutators: the datacenter even when unreachable."""
        found = self.datacenters.get(name or self.local)
        if found is None:
            raise KeyError(f"no datacenter {name!r}; add_datacenter first")
        return found

    def _write(self, dc: Datacenter, tables: Iterable[str], keys: Iterable[tuple] = ()) -> int:
        dc.index += 1
        for t in tables:
            dc.tables[t] = dc.index
        for k in keys:
            dc.keys[k] = dc.index
        self._notify(dc.name, False)
        return dc.index

    def _notify(self, dc: str, abandoned: bool) -> None:
        for listener in list(self.listeners):
            listener(dc, abandoned)

    @staticmethod
    def _service_key(s: Service) -> tuple:
        return ("service", s.partition, s.namespace, s.peer, s.name)

    def _instance_keys(self, s: Service) -> list[tuple]:
        keys = [self._service_key(s)]
        if s.connect_name:
            keys.append(("connect", s.partition, s.namespace, s.peer, s.connect_name))
        return keys

    def _node_service_keys(self, dc: Datacenter, partition: str, peer: str, node: str
                           ) -> list[tuple]:
        """Watch keys of every service on a node: a node write changes their health answers
        (Consul's updateAllServiceIndexesOfNode)."""
        return [k for s in dc.services.on_node(partition, peer, node).values()
                for k in self._instance_keys(s)]

    def service_index(self, dc: Datacenter, key: tuple) -> int:
        """Consul's maxIndexForService: the key's index while an instance exists, else the
        catalog tables' max (so any catalog write wakes a watch on a missing service)."""
        kind, ap, ns, peer, name = key
        if key in dc.keys and self._instances(dc, ap, ns, peer, name, kind):
            return dc.keys[key]
        return dc.table("nodes", "services", "checks")

    def _instances(self, dc: Datacenter, partition: str, namespace: str, peer: str, name: str,
                   kind: str = "service") -> list[Service]:
        return list(dc.services.by_name.get((kind, partition, namespace, peer, name),
                                            {}).values())

    # -- topology ------------------------------------------------------------------------------

    def add_datacenter(self, name: str, *, reachable: bool = True) -> None:
        """A WAN-federated datacenter (with its own raft index, default partition and ns)."""
        dc = Datacenter(name, reachable=reachable)
        dc.partitions["default"] = {"Name": "default", "Description": "Builtin Default Partition",
                                    "CreateIndex": 1, "ModifyIndex": 1}
        dc.namespaces[("default", "default")] = _namespace_json("default", "default",
                                                                "Builtin Default Namespace", 1)
        self.datacenters[name] = dc

    def set_datacenter_reachable(self, name: str, reachable: bool) -> None:
        """Cut (or restore) the WAN path: ?dc= requests answer 500 "No path to datacenter"."""
        self._dc_any(name).reachable = reachable
        self._notify(name, True)

    def add_partition(self, name: str, *, dc: str | None = None, description: str = "") -> int:
        d = self._dc_any(dc)
        idx = self._write(d, ["partitions"])
        d.partitions[name] = {"Name": name, "Description": description,
                              "CreateIndex": idx, "ModifyIndex": idx}
        d.namespaces[(name, "default")] = _namespace_json("default", name,
                                                          "Builtin Default Namespace", idx)
        self._write(d, ["namespaces"])
        return idx

    def delete_partition(self, name: str, *, dc: str | None = None) -> None:
        d = self._dc_any(dc)
        for key in [k for k in d.services if k[0] == name]:
            s = d.services[key]
            self.deregister_service(s.id, s.node, partition=name, peer=s.peer, dc=dc)
        for key in [k for k in d.nodes if k[0] == name]:
            self.deregister_node(key[2], partition=name, peer=key[1], dc=dc)
        d.partitions.pop(name, None)
        for key in [k for k in d.namespaces if k[0] == name]:
            d.namespaces.pop(key)
        self._write(d, ["partitions", "namespaces"])

    def add_namespace(self, name: str, *, partition: str = "default", dc: str | None = None,
                      description: str = "") -> int:
        d = self._dc_any(dc)
        if partition not in d.partitions:
            raise KeyError(f"no partition {partition!r}")
        idx = self._write(d, ["namespaces"])
        d.namespaces[(partition, name)] = _namespace_json(name, partition, description, idx)
        return idx

    def delete_namespace(self, name: str, *, partition: str = "default",
                         dc: str | None = None) -> None:
        d = self._dc_any(dc)
        for s in [s for s in d.services.values()
                  if (s.partition, s.namespace) == (partition, name)]:
            self.deregister_service(s.id, s.node, partition=partition, peer=s.peer, dc=dc)
        d.namespaces.pop((partition, name), None)
        self._write(d, ["namespaces"])

    def add_peer(self, name: str, *, partition: str = "default", state: str = "ACTIVE",
                 remote_datacenter: str = "dc-remote", remote_partition: str = "default") -> int:
        """A cluster peering of the local datacenter; register its imported services with
        ``peer=name``."""
        d = self._dc_any(None)
        idx = self._write(d, ["peering"])
        d.peers[(partition, name)] = {
            "ID": str(uuid.uuid4()), "Name": name, "State": state, "Partition": partition,
            "PeerID": str(uuid.uuid4()), "PeerServerName": f"server.{remote_datacenter}.peering",
            "PeerServerAddresses": ["10.200.0.1:8503"], "Meta": {},
            "Remote": {"Partition": remote_partition, "Datacenter": remote_datacenter},
            "CreateIndex": idx, "ModifyIndex": idx}
        return idx

    def set_peer_state(self, name: str, state: str, *, partition: str = "default") -> None:
        d = self._dc_any(None)
        idx = self._write(d, ["peering"])
        d.peers[(partition, name)].update(State=state, ModifyIndex=idx)

    def delete_peer(self, name: str, *, partition: str = "default") -> None:
        """Deleting a peering drops everything imported from it."""
        d = self._dc_any(None)
        for s in [s for s in d.services.values() if (s.partition, s.peer) == (partition, name)]:
            self.deregister_service(s.id, s.node, partition=partition, peer=name)
        for key in [k for k in d.nodes if k[:2] == (partition, name)]:
            self.deregister_node(key[2], partition=partition, peer=name)
        d.peers.pop((partition, name), None)
        self._write(d, ["peering"])

    # -- nodes, services, checks ---------------------------------------------------------------

    def register_node(self, name: str, address: str, *, dc: str | None = None,
                      partition: str = "default", peer: str = "",
                      meta: dict[str, str] | None = None,
                      tagged_addresses: dict[str, str] | None = None, serf: bool = True,
                      node_id: str | None = None) -> int:
        """Register (or update) a node. ``serf``: it runs an agent, so it has the
        ``serfHealth`` check, passing (imported and external nodes have none)."""
        d = self._dc_any(dc)
        key = (partition, peer, name)
        old = d.nodes.get(key)
        if tagged_addresses is None:
            tagged_addresses = dict(old.tagged_addresses) if old else _default_tagged(address)
        node = Node(name, address, partition, peer, node_id or (old.id if old else
                    str(uuid.uuid4())), dict(tagged_addresses), dict(meta or {}))
        changed = old is None or not _same(old, node)  # Consul skips identical writes
        tables = ["nodes"] if changed else []
        if serf and not peer and (partition, peer, name, SERF_CHECK) not in d.checks:
            tables.append("checks")
        idx = self._write(d, tables, self._node_service_keys(d, partition, peer, name)
                          if changed else [])
        if changed:
            node.create_index = old.create_index if old else idx
            node.modify_index = idx
            d.nodes[key] = node
        if "checks" in tables:
            d.checks[(partition, peer, name, SERF_CHECK)] = Check(
                name, SERF_CHECK, "Serf Health Status", "passing",
                output="Agent alive and reachable", type="serf", partition=partition,
                create_index=idx, modify_index=idx)
        return idx

    def deregister_node(self, name: str, *, dc: str | None = None, partition: str = "default",
                        peer: str = "") -> int:
        """Remove a node with its services and checks (one write, as Consul's Deregister)."""
        d = self._dc_any(dc)
        gone = list(d.services.on_node(partition, peer, name).values())
        keys = [k for s in gone for k in self._instance_keys(s)]
        idx = self._write(d, ["nodes", "services", "checks"], keys)
        d.nodes.pop((partition, peer, name), None)
        for s in gone:
            d.services.pop((partition, peer, name, s.id), None)
        for key in list(d.checks.on_node(partition, peer, name)):
            d.checks.pop(key)
        for s in gone:
            self._maybe_free_vip(d, s)
        return idx

    def register_service(self, name: str, node: str, *, id: str | None = None,
                         address: str = "", port: int = 0, tags: Iterable[str] = (),
                         meta: dict[str, str] | None = None, kind: str = "",
                         proxy: dict[str, Any] | None = None, native: bool = False,
                         tagged_addresses: dict[str, dict[str, Any]] | None = None,
                         weights: dict[str, int] | None = None, namespace: str = "default",
                         partition: str = "default", peer: str = "", dc: str | None = None,
                         status: str | None = "passing", check_output: str = "") -> int:
        """Register (or update) a service instance on an existing node, with one service check
        ``service:<id>`` of ``status`` (None: no check). Addresses given get the ``lan_ipv4``/
        ``wan_ipv4`` (or ``_ipv6``) tagged addresses the agent adds. A connect proxy or a
        connect-native instance gets its service's ``consul-virtual`` tagged address when
        ``auto_virtual_ips`` is on, allocated from 240.0.0.0/4 as Consul does."""
        d = self._dc_any(dc)
        if (partition, peer, node) not in d.nodes:
            raise KeyError(f"register node {node!r} (partition {partition}, peer {peer!r}) first")
        if (partition, namespace) not in d.namespaces and not peer:
            raise KeyError(f"no namespace {namespace!r} in partition {partition!r}")
        sid = id or name
        key = (partition, peer, node, sid)
        old = d.services.get(key)
        svc = Service(sid, name, node, address, port, list(tags), dict(meta or {}), kind,
                      dict(proxy or {}), native, {}, dict(weights or {"Passing": 1,
                                                                       "Warning": 1}),
                      namespace, partition, peer)
        if address and tagged_addresses is None:
            fam = "ipv6" if ":" in address else "ipv4"
            with contextlib.suppress(ValueError):
                ipaddress.ip_address(address)
                svc.tagged_addresses = {f"lan_{fam}": {"Address": address, "Port": port},
                                        f"wan_{fam}": {"Address": address, "Port": port}}
        for k, v in (tagged_addresses or {}).items():
            svc.tagged_addresses[k] = {"Address": v.get("Address", v.get("address", "")),
                                       "Port": v.get("Port", v.get("port", 0))}
        if svc.connect_name and self.auto_virtual_ips \
                and "consul-virtual" not in svc.tagged_addresses:
            vip = self._assign_vip(d, (partition, namespace, peer, svc.connect_name))
            svc.tagged_addresses["consul-virtual"] = {"Address": vip, "Port": port}
        check_key = (partition, peer, node, f"service:{sid}")
        prior = d.checks.get(check_key)
        check = None if status is None else Check(
            node, f"service:{sid}", f"Service '{name}' check", status, sid, name,
            output=check_output, type="ttl", namespace=namespace, partition=partition, peer=peer)
        # As Consul's ensureServiceTxn / ensureCheckTxn: what did not change keeps its index.
        service_changed = old is None or not _same(old, svc)
        check_changed = check is not None and (prior is None or not _same(prior, check))
        keys = self._instance_keys(svc) + (self._instance_keys(old) if old else [])
        tables = (["services"] if service_changed else []) + (["checks"] if check_changed
                                                              else [])
        idx = self._write(d, tables, keys if tables else [])
        if service_changed:
            svc.create_index = old.create_index if old else idx
            svc.modify_index = idx
            d.services[key] = svc
        if check is not None and check_changed:
            check.create_index = prior.create_index if prior else idx
            check.modify_index = idx
            d.checks[check_key] = check
        if old:
            self._maybe_free_vip(d, old)
        self._refresh_aliases(d, partition, peer, node)
        return idx

    def add_sidecar(self, service_id: str, node: str, *, port: int = 21000,
                    namespace: str = "default", partition: str = "default", peer: str = "",
                    dc: str | None = None, status: str | None = "passing",
                    address: str = "", **kw: Any) -> int:
        """Register ``<name>-sidecar-proxy`` for an instance, as ``connect { sidecar_service }``
        does: Kind connect-proxy, Proxy.DestinationServiceName/ID."""
        d = self._dc_any(dc)
        dest = d.services[(partition, peer, node, service_id)]
        proxy = {"DestinationServiceName": dest.name, "DestinationServiceID": dest.id,
                 "LocalServiceAddress": "127.0.0.1", "LocalServicePort": dest.port,
                 "Mode": "transparent"}
        sid = f"{service_id}-sidecar-proxy"
        idx = self.register_service(f"{dest.name}-sidecar-proxy", node, id=sid, port=port,
                                    address=address, kind="connect-proxy", proxy=proxy,
                                    namespace=namespace, partition=partition, peer=peer,
                                    dc=dc, status=status, **kw)
        # The agent gives a sidecar an alias check on the service it fronts, so a sick
        # service takes its proxy out of /health/connect answers too.
        d.checks[(partition, peer, node, f"service:{sid}:2")] = Check(
            node, f"service:{sid}:2", f"Connect Sidecar Aliasing {service_id}", "passing", sid,
            f"{dest.name}-sidecar-proxy", type="alias", namespace=namespace,
            partition=partition, peer=peer, create_index=idx, modify_index=idx,
            alias_service=service_id)
        self._refresh_aliases(d, partition, peer, node)
        return idx

    def _refresh_aliases(self, d: Datacenter, partition: str, peer: str, node: str) -> None:
        """Alias checks take the worst status of their target's checks and the node checks,
        in the same raft write as the change that moved them."""
        on_node = d.checks.on_node(partition, peer, node)
        checks = list(on_node.values())
        rank = {s: i for i, s in enumerate(STATUSES)}
        for key, alias in [(k, c) for k, c in on_node.items() if c.alias_service]:
            target = [c for c in checks if not c.alias_service
                      and c.service_id in ("", alias.alias_service)]
            status = max((c.status for c in target), key=rank.__getitem__, default="passing")
            if status != alias.status:
                d.checks[key] = dataclasses.replace(alias, status=status,
                                                    modify_index=d.index)
                d.tables["checks"] = d.index
                svc = d.services.get((partition, peer, node, alias.service_id))
                for k in self._instance_keys(svc) if svc else ():
                    d.keys[k] = d.index

    def deregister_service(self, service_id: str, node: str, *, dc: str | None = None,
                           partition: str = "default", peer: str = "") -> int:
        d = self._dc_any(dc)
        key = (partition, peer, node, service_id)
        svc = d.services.get(key)
        if svc is None:
            raise KeyError(f"no service {service_id!r} on {node!r}")
        idx = self._write(d, ["services", "checks"], self._instance_keys(svc))
        del d.services[key]
        for ck in [k for k, c in d.checks.on_node(*key[:3]).items()
                   if c.service_id == service_id]:
            d.checks.pop(ck)
        self._maybe_free_vip(d, svc)
        return idx

    def set_check(self, node: str, check_id: str, status: str, *, dc: str | None = None,
                  partition: str = "default", peer: str = "", output: str = "",
                  name: str | None = None, service_id: str = "", notes: str = "") -> int:
        """Create or update a check: a node check when ``service_id`` is empty and the check is
        not already a service's (its status then hides every instance on the node)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}")
        d = self._dc_any(dc)
        key = (partition, peer, node, check_id)
        old = d.checks.get(key)
        sid = old.service_id if old else service_id
        if sid:
            svc = d.services[(partition, peer, node, sid)]
            keys = self._instance_keys(svc)
            sname, ns = svc.name, svc.namespace
        else:
            if (partition, peer, node) not in d.nodes:
                raise KeyError(f"no node {node!r}")
            keys = self._node_service_keys(d, partition, peer, node)
            sname, ns = "", "default"
        check = Check(node, check_id, name or (old.name if old else check_id), status, sid,
                      sname, notes=notes, output=output, type=old.type if old else "ttl",
                      namespace=ns, partition=partition, peer=peer,
                      alias_service=old.alias_service if old else "")
        if old is not None and _same(old, check):
            return self._write(d, [])  # a raft entry that changes no table
        idx = self._write(d, ["checks"], keys)
        check.create_index = old.create_index if old else idx
        check.modify_index = idx
        d.checks[key] = check
        self._refresh_aliases(d, partition, peer, node)
        return idx

    def remove_check(self, node: str, check_id: str, *, dc: str | None = None,
                     partition: str = "default", peer: str = "") -> int:
        d = self._dc_any(dc)
        c = d.checks[(partition, peer, node, check_id)]
        keys = (self._instance_keys(d.services[(partition, peer, node, c.service_id)])
                if c.service_id else self._node_service_keys(d, partition, peer, node))
        idx = self._write(d, ["checks"], keys)
        del d.checks[(partition, peer, node, check_id)]
        self._refresh_aliases(d, partition, peer, node)
        return idx

    def set_node_health(self, node: str, status: str, **kw: Any) -> int:
        """The node's serfHealth check (the agent's liveness, as the gossip layer reports)."""
        return self.set_check(node, SERF_CHECK, status, name="Serf Health Status", **kw)

    def set_service_health(self, service_id: str, node: str, status: str, **kw: Any) -> int:
        return self.set_check(node, f"service:{service_id}", status, service_id=service_id,
                              **kw)

    def set_maintenance(self, node: str, enable: bool, *, service_id: str = "",
                        reason: str = "", **kw: Any) -> int:
        """Maintenance mode, as the agent does it: a critical ``_node_maintenance`` or
        ``_service_maintenance:<id>`` check."""
        check_id = f"{SERVICE_MAINT_PREFIX}{service_id}" if service_id else NODE_MAINT
        if not enable:
            return self.remove_check(node, check_id, **kw)
        return self.set_check(node, check_id, "critical", service_id=service_id,
                              name="Service Maintenance Mode" if service_id else
                              "Node Maintenance Mode", notes=reason, **kw)

    def set_tagged_address(self, service_id: str, node: str, key: str, address: str | None,
                           port: int = 0, *, dc: str | None = None, partition: str = "default",
                           peer: str = "") -> int:
        """Set (or, with address None, remove) one tagged address of a service instance, e.g.
        ``consul-virtual`` on a sidecar or ``virtual`` as consul-k8s writes it."""
        d = self._dc_any(dc)
        svc = d.services[(partition, peer, node, service_id)]
        idx = self._write(d, ["services"], self._instance_keys(svc))
        if address is None:
            svc.tagged_addresses.pop(key, None)
        else:
            svc.tagged_addresses[key] = {"Address": address, "Port": port}
        svc.modify_index = idx
        return idx

    def _assign_vip(self, d: Datacenter, key: tuple[str, str, str, str]) -> str:
        if key not in d.vips:
            if d.free_vips:
                d.vips[key] = d.free_vips.pop(0)
            else:
                d.vips[key] = str(VIP_START + d.next_vip)
                d.next_vip += 1
        return d.vips[key]

    def _maybe_free_vip(self, d: Datacenter, svc: Service) -> None:
        """Consul frees a virtual IP when the last mesh instance of its service goes."""
        name = svc.connect_name
        if not name:
            return
        key = (svc.partition, svc.namespace, svc.peer, name)
        if key in d.vips and not self._instances(d, *key, kind="connect"):
            d.free_vips.append(d.vips.pop(key))

    def virtual_ip(self, service: str, *, namespace: str = "default",
                   partition: str = "default", peer: str = "", dc: str | None = None
                   ) -> str | None:
        """The virtual IP Consul holds for a service (for assertions)."""
        return self._dc_any(dc).vips.get((partition, namespace, peer, service))

    # -- config entries, prepared queries ------------------------------------------------------

    def set_config_entry(self, entry: dict[str, Any], *, dc: str | None = None) -> int:
        """Write a config entry as ``consul config write`` takes it (``Kind`` and ``Name``
        required; ``Partition``/``Namespace`` default to default)."""
        d = self._dc_any(dc)
        kind, name = entry["Kind"], entry["Name"]
        ap = entry.get("Partition", "default")
        ns = "" if kind == "sameness-group" else entry.get("Namespace", "default")
        key = (kind, ap, ns, name)
        old = d.config.get(key)
        idx = self._write(d, ["config-entries"])
        stored = dict(entry, Kind=kind, Name=name, CreateIndex=old["CreateIndex"] if old else
                      idx, ModifyIndex=idx)
        if self.enterprise:
            stored["Partition"] = ap
            if kind != "sameness-group":
                stored["Namespace"] = ns
        d.config[key] = stored
        return idx

    def delete_config_entry(self, kind: str, name: str, *, partition: str = "default",
                            namespace: str = "default", dc: str | None = None) -> int:
        d = self._dc_any(dc)
        ns = "" if kind == "sameness-group" else namespace
        idx = self._write(d, ["config-entries"])
        d.config.pop((kind, partition, ns, name), None)
        return idx

    def add_prepared_query(self, name: str, service: str, *, tags: Iterable[str] = (),
                           only_passing: bool = False, ttl: str = "",
                           failover: dict[str, Any] | None = None, namespace: str = "",
                           partition: str = "", peer: str = "", dc: str | None = None,
                           template: str | None = None, connect: bool = False,
                           ignore_check_ids: Iterable[str] = (), query_id: str | None = None
                           ) -> str:
        """Create a prepared query (``failover`` as the API spells it: ``NearestN``,
        ``Datacenters``, ``Targets``); its ID."""
        d = self._dc_any(dc)
        qid = query_id or str(uuid.uuid4())
        idx = self._write(d, ["prepared-queries"])
        d.queries[qid] = {
            "ID": qid, "Name": name, "Session": "", "Token": "",
            "Template": {"Type": template or "", "Regexp": "", "RemoveEmptyTags": False},
            "Service": {"Service": service,
                        "Failover": {"NearestN": 0, "Datacenters": None, "Targets": None,
                                     **(failover or {})},
                        "OnlyPassing": only_passing, "IgnoreCheckIDs": list(ignore_check_ids)
                        or None, "Near": "", "Tags": list(tags) or None, "NodeMeta": None,
                        "ServiceMeta": None, "Connect": {"Enabled": connect}, "Peer": peer,
                        "Namespace": namespace, "Partition": partition, "SamenessGroup": ""},
            "DNS": {"TTL": ttl}, "CreateIndex": idx, "ModifyIndex": idx}
        return qid

    def delete_prepared_query(self, name_or_id: str, *, dc: str | None = None) -> None:
        d = self._dc_any(dc)
        q = self._find_query(d, name_or_id, templates=False)
        d.queries.pop(q["ID"])
        self._write(d, ["prepared-queries"])

    # -- ACLs, cluster health, snapshots -------------------------------------------------------

    def enable_acls(self, default_policy: str = "deny",
                    anonymous_policy: dict[str, Any] | None = None) -> None:
        """ACLs on: requests are authorized by their token's policy; no token is the anonymous
        token (``anonymous_policy``; None grants nothing)."""
        self.acl_enabled = True
        self.default_policy = default_policy
        self.anonymous_policy = anonymous_policy

    def add_token(self, secret: str, policy: dict[str, Any], accessor: str | None = None
                  ) -> None:
        """A token whose policy is a Consul policy document (the JSON rules form)."""
        self.tokens[secret] = Token(secret, accessor or str(uuid.uuid4()), policy)

    def delete_token(self, secret: str) -> None:
        self.tokens.pop(secret, None)

    def authorizer(self, secret: str | None) -> Authorizer:
        if not self.acl_enabled:
            return Authorizer(None, allow_all=True)
        if not secret or secret == "anonymous":
            return Authorizer(self.anonymous_policy, allow_all=self.default_policy == "allow"
                              and self.anonymous_policy is None)
        token = self.tokens.get(secret)
        if token is None:
            raise ApiError(403, "ACL not found")
        return Authorizer(token.policy)

    def set_leader(self, leader: bool, last_contact_ms: int = 0) -> None:
        """No leader: default-consistency reads answer 500 "No cluster leader"; ``stale``
        reads still answer, with X-Consul-KnownLeader false and LastContact growing."""
        self.leader = leader
        self.last_contact_ms = last_contact_ms

    def restore_snapshot(self, index: int, *, dc: str | None = None) -> None:
        """A raft snapshot restore: the index drops to ``index`` (objects keep their data),
        and every blocked query of the datacenter returns at once."""
        d = self._dc_any(dc)
        d.index = max(1, index)
        d.tables = {k: min(v, d.index) for k, v in d.tables.items()}
        d.keys = {k: min(v, d.index) for k, v in d.keys.items()}
        for obj in [*d.nodes.values(), *d.services.values(), *d.checks.values()]:
            obj.modify_index = min(obj.modify_index, d.index)
            obj.create_index = min(obj.create_index, d.index)
        self._notify(d.name, True)

    def index(self, dc: str | None = None) -> int:
        return self._dc_any(dc).index

    # -- reads (the HTTP layer renders these) --------------------------------------------------

    def node_json(self, d: Datacenter, n: Node) -> dict[str, Any]:
        out: dict[str, Any] = {"ID": n.id, "Node": n.name, "Address": n.address,
                               "Datacenter": d.name, "TaggedAddresses": dict(n.tagged_addresses),
                               "Meta": dict(n.meta)}
        if self.enterprise:
            out["Partition"] = n.partition
        if n.peer:
            out["PeerName"] = n.peer
        out.update(CreateIndex=n.create_index, ModifyIndex=n.modify_index)
        return out

    def service_json(self, s: Service) -> dict[str, Any]:
        if s.kind == "connect-proxy":
            proxy: dict[str, Any] = {"DestinationServiceName": "", "DestinationServiceID": "",
                                     "LocalServiceAddress": "", "LocalServicePort": 0,
                                     "Mode": "", "TransparentProxy": {}, "Upstreams": [],
                                     "MeshGateway": {}, "Expose": {}, **s.proxy}
        else:
            proxy = {"Mode": "", "MeshGateway": {}, "Expose": {}}
        out: dict[str, Any] = {
            "Kind": s.kind, "ID": s.id, "Service": s.name, "Tags": list(s.tags),
            "Address": s.address,
            "TaggedAddresses": {k: dict(v) for k, v in s.tagged_addresses.items()} or None,
            "Meta": dict(s.meta), "Port": s.port, "Weights": dict(s.weights),
            "EnableTagOverride": False, "Proxy": proxy,
            "Connect": {"Native": True} if s.native else {}}
        if out["TaggedAddresses"] is None:
            del out["TaggedAddresses"]
        if s.peer:
            out["PeerName"] = s.peer
        if self.enterprise:
            out.update(Namespace=s.namespace, Partition=s.partition)
        out.update(CreateIndex=s.create_index, ModifyIndex=s.modify_index)
        return out

    def check_fragment(self, c: Check, tags: Iterable[str]) -> str:
        """``check_json`` serialised, cached by everything it is made of (a check whose
        fields or service tags change gets a new entry; the cache is trimmed when large)."""
        tags = tuple(tags)
        key = (c.node, c.check_id, c.name, c.status, c.service_id, c.service_name, c.notes,
               c.output, c.type, c.namespace, c.partition, c.peer, c.create_index,
               c.modify_index, tags, self.enterprise)
        cache = self.__dict__.setdefault("_fragments", {})
        text = cache.get(key)
        if text is None:
            if len(cache) > 500_000:  # old check states: bounded memory
                cache.clear()
            text = cache[key] = json.dumps(self.check_json(c, list(tags)))
        return text

    def check_json(self, c: Check, tags: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "Node": c.node, "CheckID": c.check_id, "Name": c.name, "Status": c.status,
            "Notes": c.notes, "Output": c.output, "ServiceID": c.service_id,
            "ServiceName": c.service_name, "ServiceTags": tags, "Type": c.type,
            "Interval": "", "Timeout": "", "ExposedPort": 0, "Definition": {}}
        if c.peer:
            out["PeerName"] = c.peer
        if self.enterprise:
            out.update(Namespace=c.namespace, Partition=c.partition)
        out.update(CreateIndex=c.create_index, ModifyIndex=c.modify_index)
        return out

    def health_entries(self, d: Datacenter, instances: list[Service], authz: Authorizer
                       ) -> tuple[list[dict[str, Any]], bool]:
        """``{Node, Service, Checks}`` entries (node checks first), and whether ACLs trimmed
        any."""
        out, filtered = [], False
        for s in sorted(instances, key=lambda s: (s.node, s.id)):
            node = d.nodes.get((s.partition, s.peer, s.node))
            if node is None:
                continue
            if not (authz.allows("service", s.name, partition=s.partition,
                                 namespace=s.namespace)
                    and authz.allows("node", s.node, partition=s.partition)):
                filtered = True
                continue
            checks = [self.check_json(c, list(s.tags) if c.service_id else [])
                      for _, c in sorted(d.checks.on_node(s.partition, s.peer,
                                                          s.node).items())
                      if c.service_id in ("", s.id)]
            checks.sort(key=lambda c: c["ServiceID"] != "")
            out.append({"Node": self.node_json(d, node), "Service": self.service_json(s),
                        "Checks": checks})
        return out, filtered

    def _find_query(self, d: Datacenter, name_or_id: str, templates: bool = True
                    ) -> dict[str, Any]:
        if name_or_id in d.queries:
            return d.queries[name_or_id]
        for q in d.queries.values():
            if q["Name"] == name_or_id and not q["Template"]["Type"]:
                return q
        if templates:
            best = max((q for q in d.queries.values() if q["Template"]["Type"] ==
                        "name_prefix_match" and name_or_id.startswith(q["Name"])),
                       key=lambda q: len(q["Name"]), default=None)
            if best is not None:
                suffix = name_or_id[len(best["Name"]):]
                rendered = json.loads(json.dumps(best).replace("${name.full}", name_or_id)
                                      .replace("${name.prefix}", best["Name"])
                                      .replace("${name.suffix}", suffix))
                return rendered
        raise ApiError(404, "Query not found")

    def execute_query(self, name_or_id: str, authz: Authorizer, *, dc: str | None = None,
                      limit: int = 0, connect: bool = False) -> dict[str, Any]:
        """``/v1/query/<name>/execute``: Consul's top-level PreparedQueryExecuteResponse."""
        d = self.dc(dc)
        q = self._find_query(d, name_or_id)
        svc = q["Service"]
        ap = svc["Partition"] or "default"
        ns = svc["Namespace"] or "default"
        connect = connect or svc["Connect"]["Enabled"]

        def run(where: Datacenter, peer: str) -> list[dict[str, Any]]:
            kind = "connect" if connect else "service"
            entries, _ = self.health_entries(
                where, self._instances(where, ap, ns, peer, svc["Service"], kind), authz)
            return [e for e in entries if _query_keeps(e, svc)]

        nodes, used_dc, used_peer, failovers = run(d, svc["Peer"]), d.name, svc["Peer"], 0
        fo = svc["Failover"]
        if not nodes:
            targets: list[dict[str, str]] = list(fo.get("Targets") or [])
            if not targets:
                others = [n for n in self.datacenters if n != d.name]
                nearest = others[: int(fo.get("NearestN") or 0)]
                targets = [{"Datacenter": n} for n in
                           dict.fromkeys(nearest + list(fo.get("Datacenters") or []))]
            for target in targets:
                if target.get("PeerName") or target.get("Peer"):
                    peer = target.get("PeerName") or target.get("Peer") or ""
                    failovers += 1
                    nodes = run(d, peer)
                    used_dc, used_peer = d.name, peer
                else:
                    remote = self.datacenters.get(target.get("Datacenter", ""))
                    if remote is None or remote is d:
                        continue
                    failovers += 1
                    if not remote.reachable:
                        continue
                    nodes = run(remote, "")
                    used_dc, used_peer = remote.name, ""
                if nodes:
                    break
        random.shuffle(nodes)
        if limit > 0:
            nodes = nodes[:limit]
        out: dict[str, Any] = {"Service": svc["Service"]}
        if self.enterprise:
            out.update(Namespace=ns, Partition=ap)
        out.update(Nodes=nodes, DNS={"TTL": q["DNS"]["TTL"]}, Datacenter=used_dc,
                   PeerName=used_peer, Failovers=failovers)
        return out


def _scope_checks(d: Any, ap: str, peer: str) -> list[tuple[Any, Any]]:
    """The checks of one (partition, peer) in key order. The order is re-sorted only when the
    set of checks changes, not per request nor per status change: a check change wakes the
    checks watch of every scope, and sorting the datacenter's checks for each of them was most
    of the fake's CPU in bench/consul.py (a real Consul does not share meshdns's cores)."""
    cached = d.__dict__.get("_scope_check_keys")
    checks = d.checks
    if cached is None or cached[0] is not checks or cached[1] != checks.version:
        scopes: dict[tuple[str, str], list[Any]] = {}
        for key in sorted(checks):
            scopes.setdefault(key[:2], []).append(key)
        cached = d.__dict__["_scope_check_keys"] = (checks, checks.version, scopes)
    return [(key, checks[key]) for key in cached[2].get((ap, peer), ())]


def _query_keeps(entry: dict[str, Any], svc: dict[str, Any]) -> bool:
    """A prepared query's health and tag filters (critical never; warning with OnlyPassing)."""
    ignore = set(svc.get("IgnoreCheckIDs") or ())
    for c in entry["Checks"]:
        if c["CheckID"] in ignore:
            continue
        if c["Status"] == "critical" or (svc["OnlyPassing"] and c["Status"] != "passing"):
            return False
    tags = {t.lower() for t in entry["Service"]["Tags"]}
    for tag in svc.get("Tags") or ():
        want = tag.lower()
        if want.startswith("!"):
            if want[1:] in tags:
                return False
        elif want not in tags:
            return False
    return True


def _same(a: Any, b: Any) -> bool:
    """Equal but for the raft indexes (Consul's IsSame)."""
    skip = {"create_index", "modify_index"}
    return all(getattr(a, f) == getattr(b, f) for f in a.__dataclass_fields__ if f not in skip)


def _namespace_json(name: str, partition: str, description: str, idx: int) -> dict[str, Any]:
    return {"Name": name, "Description": description,
            "ACLs": {"PolicyDefaults": [], "RoleDefaults": []}, "Meta": {},
            "Partition": partition, "CreateIndex": idx, "ModifyIndex": idx}


def _default_tagged(address: str) -> dict[str, str]:
    """The tagged addresses an agent gives its node."""
    try:
        fam = "ipv6" if ipaddress.ip_address(address).version == 6 else "ipv4"
    except ValueError:
        return {"lan": address, "wan": address}
    return {"lan": address, f"lan_{fam}": address, "wan": address, f"wan_{fam}": address}


# ----------------------------------------------------------------------------------------------
# Faults and the request log
# ----------------------------------------------------------------------------------------------


@dataclass
class Fault:
    """An injected misbehaviour for requests whose path matches ``path`` (a regex, searched).

    kind: ``status`` (answer ``status`` with ``body``), ``hang`` (hold the request ``delay``
    seconds, None: until the fault is cleared), ``malformed`` (200 with a broken JSON body and
    a real X-Consul-Index), ``drop`` (close the connection without an answer), ``delay`` (answer
    normally after ``delay`` seconds). ``times``: how many requests it hits (None: all)."""

    id: int
    path: str
    kind: str
    status: int = 500
    body: str = ""
    delay: float | None = None
    times: int | None = None
    hits: int = 0


@dataclass
class RequestRecord:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    start: float  # time.monotonic()
    end: float | None = None
    status: int | None = None
    bytes: int = 0
    transport: str = "tcp"

    def as_dict(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "query": self.query,
                "headers": self.headers, "start": self.start, "end": self.end,
                "status": self.status, "bytes": self.bytes, "transport": self.transport}


# ----------------------------------------------------------------------------------------------
# HTTP
# ----------------------------------------------------------------------------------------------

BLOCKING = "blocking"


class Api:
    """The HTTP face of a ``ConsulState``: routing, blocking, consistency, ACLs, faults, log."""

    def __init__(self, state: ConsulState) -> None:
        self.state = state
        self.faults: list[Fault] = []
        self._fault_ids = 0
        self.log: list[RequestRecord] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._waiters: dict[str, asyncio.Future[bool]] = {}
        self._fault_cleared: asyncio.Event | None = None
        self._live: set[asyncio.Task[Any]] = set()
        state.listeners.append(self._on_write)

    # -- wake-ups ------------------------------------------------------------------------------

    def _future(self, dc: str) -> asyncio.Future[bool]:
        fut = self._waiters.get(dc)
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().create_future()
            self._waiters[dc] = fut
        return fut

    def _on_write(self, dc: str, abandoned: bool) -> None:
        fut = self._waiters.pop(dc, None)
        if fut is not None and not fut.done():
            fut.set_result(abandoned)

    # -- faults --------------------------------------------------------------------------------

    def add_fault(self, path: str, kind: str, **kw: Any) -> int:
        if kind not in ("status", "hang", "malformed", "drop", "delay"):
            raise ValueError(f"unknown fault kind {kind!r}")
        self._fault_ids += 1
        self.faults.append(Fault(self._fault_ids, path, kind, **kw))
        return self._fault_ids

    def clear_faults(self, fault_id: int | None = None) -> None:
        self.faults = [f for f in self.faults if fault_id is not None and f.id != fault_id]
        if self._fault_cleared is not None:
            self._fault_cleared.set()
            self._fault_cleared = None

    def _fault_for(self, path: str) -> Fault | None:
        for f in self.faults:
            if re.search(f.path, path) and (f.times is None or f.hits < f.times):
                f.hits += 1
                return f
        return None

    # -- request handling ----------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/_fake/{tail:.*}", self.control)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        rec = RequestRecord(request.method, request.path, list(request.query.items()),
                            {k.lower(): v for k, v in request.headers.items()},
                            time.monotonic(),
                            transport="unix" if sock is not None and sock.family ==
                            socket.AF_UNIX else "tcp")
        self.log.append(rec)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        task = asyncio.current_task()
        if task is not None:
            self._live.add(task)
        try:
            resp = await self._respond(request)
            rec.status = resp.status
            rec.bytes = len(resp.body) if isinstance(resp, web.Response) and resp.body else 0
            return resp
        finally:
            rec.end = time.monotonic()
            self.in_flight -= 1
            if task is not None:
                self._live.discard(task)

    def abort_in_flight(self) -> None:
        """Cut every open request (Consul going away mid long-poll)."""
        for task in list(self._live):
            task.cancel()

    async def _respond(self, request: web.Request) -> web.Response:
        fault = self._fault_for(request.path)
        if fault is not None:
            if fault.kind == "status":
                return self._error(fault.status, fault.body or _STATUS_BODIES.get(
                    fault.status, "Internal Server Error"))
            if fault.kind == "drop":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if fault.kind in ("hang", "delay"):
                if fault.delay is None:
                    self._fault_cleared = self._fault_cleared or asyncio.Event()
                    await self._fault_cleared.wait()
                else:
                    await asyncio.sleep(fault.delay)
                if fault.kind == "hang":
                    return self._error(500, "fake_consul: hang fault cleared")
        try:
            if request.method != "GET":
                raise ApiError(405, "method not allowed")
            status, body, headers = await self._route(request)
        except ApiError as e:
            return self._error(e.status, e.message)
        text = body if isinstance(body, _RawJSON) else json.dumps(body)
        if fault is not None and fault.kind == "malformed":
            body_bytes = (text[: max(1, len(text) // 2)] + '{"' ).encode()
        else:
            body_bytes = text.encode()
        headers["X-Consul-Default-ACL-Policy"] = self.state.default_policy
        return web.Response(status=status, body=body_bytes, headers=headers,
                            content_type="application/json")

    def _error(self, status: int, message: str) -> web.Response:
        return web.Response(status=status, text=message, headers={
            "X-Consul-Default-ACL-Policy": self.state.default_policy})

    @staticmethod
    def _token(request: web.Request) -> str | None:
        token = request.headers.get("X-Consul-Token")
        auth = request.headers.get("Authorization", "")
        if not token and auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        return token or request.query.get("token") or None

    def _scope(self, request: web.Request) -> tuple[str, str, str]:
        q = request.query
        if not self.state.enterprise:
            return "default", "default", q.get("peer", "")
        ap = q.get("partition") or request.headers.get("X-Consul-Partition") or "default"
        ns = q.get("ns") or request.headers.get("X-Consul-Namespace") or "default"
        return ap, ns, q.get("peer", "")

    def _consistency(self, request: web.Request, headers: dict[str, str]) -> None:
        q = request.query
        if "stale" in q:
            headers["X-Consul-Effective-Consistency"] = "stale"
        else:
            if not self.state.leader:
                raise ApiError(500, "No cluster leader")
            headers["X-Consul-Effective-Consistency"] = (
                "consistent" if "consistent" in q else "leader")
        headers["X-Consul-KnownLeader"] = "true" if self.state.leader else "false"
        headers["X-Consul-LastContact"] = str(self.state.last_contact_ms if "stale" in q else 0)

    async def _block(self, request: web.Request, d: Datacenter, index_of: Callable[[], int]
                     ) -> int:
        """Hold a blocking query until the watched index passes ``index``, or ``wait`` (+ up
        to wait/16 of jitter) ends; a snapshot restore returns at once."""
        q = request.query
        raw = q.get("index")
        if raw is None:
            return max(1, index_of())
        if not raw.isdigit():
            raise ApiError(400, "Invalid index")
        min_index = int(raw)
        wait = min(parse_go_duration(q["wait"]), MAX_WAIT) if "wait" in q else DEFAULT_WAIT
        deadline = time.monotonic() + wait + random.uniform(0, wait / JITTER_FRACTION)
        while min_index > 0 and index_of() <= min_index:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            fut = self._future(d.name)
            try:
                abandoned = await asyncio.wait_for(asyncio.shield(fut), remaining)
            except TimeoutError:
                break
            if abandoned or self.state.wake_all_on_write:
                break
        # Consul re-runs the query, token resolution included, on every wake-up: a token
        # revoked while the query was held answers 403 "ACL not found" now.
        self.state.authorizer(self._token(request))
        if self.state.wake_all_on_write and min_index > 0:
            return max(d.index, index_of())  # a write elsewhere woke it: same data
        return max(1, index_of())

    async def _route(self, request: web.Request) -> tuple[int, Any, dict[str, str]]:
        st = self.state
        path = request.path
        q = request.query
        headers: dict[str, str] = {}
        authz = st.authorizer(self._token(request))
        self._consistency(request, headers)
        ap, ns, peer = self._scope(request)
        if path == "/v1/status/leader":
            return 200, "127.0.0.1:8300" if st.leader else "", headers
        if path == "/v1/status/peers":
            return 200, ["127.0.0.1:8300"], headers
        if path == "/v1/catalog/datacenters":
            return 200, [st.local] + sorted(n for n in st.datacenters if n != st.local), headers
        if path == "/v1/agent/self":
            if not authz.allows("agent", st.node_name):
                raise ApiError(403, "Permission denied")
            return 200, self._agent_self(), headers
        d = st.dc(q.get("dc"))
        filtered = False
        m = re.fullmatch(r"/v1/(health/service|health/connect|catalog/service)/(.+)", path)
        if m:
            kind = "connect" if m.group(1) == "health/connect" else "service"
            key = (kind, ap, ns, peer, m.group(2))
            if "filter" in q:
                raise ApiError(400, "fake_consul: the filter parameter is not modelled")
            index = await self._block(request, d, lambda: st.service_index(d, key))
            entries, filtered = st.health_entries(d, st._instances(d, *key[1:], kind=kind),
                                                  authz)
            tags = [t.lower() for t in q.getall("tag", [])]
            entries = [e for e in entries
                       if all(t in (x.lower() for x in e["Service"]["Tags"]) for t in tags)]
            if m.group(1) == "catalog/service":
                body: Any = [_flat(e) for e in entries]
            else:
                if "passing" in q and q.get("passing") not in ("false", "0"):
                    entries = [e for e in entries
                               if all(c["Status"] == "passing" for c in e["Checks"])]
                body = entries
        elif path == "/v1/catalog/services":
            index = await self._block(request, d, lambda: d.table("services"))
            body = {}
            for s in sorted(d.services.values(), key=lambda s: s.name):
                if (s.partition, s.peer) == (ap, peer) and ns in ("*", s.namespace):
                    if not authz.allows("service", s.name, partition=ap, namespace=s.namespace):
                        filtered = True
                        continue
                    tags = body.setdefault(s.name, [])
                    tags.extend(t for t in s.tags if t not in tags)
        elif path == "/v1/catalog/nodes":
            index = await self._block(request, d, lambda: d.table("nodes"))
            body = []
            for (n_ap, n_peer, name), n in sorted(d.nodes.items()):
                if (n_ap, n_peer) == (ap, peer):
                    if not authz.allows("node", name, partition=ap):
                        filtered = True
                        continue
                    body.append(st.node_json(d, n))
        elif m := re.fullmatch(r"/v1/catalog/node/(.+)", path):
            name = m.group(1)
            index = await self._block(request, d, lambda: d.table("nodes", "services"))
            node = d.nodes.get((ap, peer, name))
            if node is None or not authz.allows("node", name, partition=ap):
                body = None
            else:
                services = {s.id: st.service_json(s)
                            for s in d.services.on_node(ap, peer, name).values()
                            if authz.allows("service", s.name, partition=ap,
                                             namespace=s.namespace)}
                body = {"Node": st.node_json(d, node), "Services": services}
        elif m := re.fullmatch(r"/v1/health/state/(any|passing|warning|critical)", path):
            want = m.group(1)
            # Consul's HealthChecksInState reads dc, ns, partition, node-meta, filter and near
            # but not peer: ?peer= is ignored and the local checks are answered (imported
            # services' checks are only in /v1/health/service/<s>?peer= and its kin)
            peer = ""
            # an expression that does not compile is answered at once, before blocking
            keep = compile_filter(q["filter"], CHECK_FILTER_FIELDS) if "filter" in q else None
            index = await self._block(request, d, lambda: d.table("checks"))
            statuses = set(STATUSES) if want == "any" else {want}
            if keep is not None and keep.selectors <= {"Status"} and authz.allow_all:
                # decided by the status alone, and no ACL can hide a check: keep the statuses
                # it holds for, and skip the rest by one comparison (the same answer, at a
                # cost in proportion to the scope's checks, not to evaluating each)
                statuses = {st_ for st_ in statuses if keep((Check("", "", "", st_), ()))}
                keep = None
            body = []
            if "passing" in statuses:
                found = _scope_checks(d, ap, peer)
            else:  # the usual case (meshdns's watch): only what is not passing
                found = [(k, d.checks[k]) for k in sorted(
                    k for st_ in statuses for k in d.checks.by_status.get((ap, peer, st_), ()))]
            for (c_ap, c_peer, node, _), c in found:
                if c.status not in statuses:
                    continue
                if c.service_id and ns not in ("*", c.namespace):
                    continue
                # ACLs first, then the filter (as Consul's Health.ChecksInState): the
                # filtered-by-ACLs header does not depend on the expression
                ok = authz.allows("node", node, partition=ap) and (
                    not c.service_id or authz.allows("service", c.service_name, partition=ap,
                                                     namespace=c.namespace))
                if not ok:
                    filtered = True
                    continue
                svc = d.services.get((c_ap, c_peer, node, c.service_id)) \
                    if c.service_id else None
                tags = svc.tags if svc else ()
                if keep is not None and not keep((c, tags)):
                    continue
                body.append(st.check_fragment(c, tags))
            body = _RawJSON("[" + ",".join(body) + "]")
        elif path == "/v1/partitions":
            if not st.enterprise:
                raise ApiError(404, "")
            index = d.table("partitions")
            body = []
            for name, p in sorted(d.partitions.items()):
                if authz.allows_global("operator") or (
                        authz.allows("service", "", partition=name) or
                        _mentions(authz.policy, name)):
                    body.append(dict(p))
                else:
                    filtered = True
        elif path == "/v1/namespaces":
            if not st.enterprise:
                raise ApiError(404, "")
            index = await self._block(request, d, lambda: d.table("namespaces"))
            body = [dict(v) for (p, _), v in sorted(d.namespaces.items()) if p == ap]
        elif path == "/v1/peerings":
            if not authz.allows_global("peering"):
                raise ApiError(403, "Permission denied")
            index = d.table("peering")
            body = [self._peering_json(d, p) for (p_ap, _), p in sorted(d.peers.items())
                    if p_ap == ap]
        elif m := re.fullmatch(r"/v1/config/([a-z-]+)(?:/(.+))?", path):
            kind, name = m.group(1), m.group(2)
            index = await self._block(request, d, lambda: d.table("config-entries"))
            entries = []
            for (e_kind, e_ap, e_ns, e_name), e in sorted(d.config.items()):
                if e_kind != kind or e_ap != ap or (name is not None and e_name != name):
                    continue
                if kind != "sameness-group" and ns not in ("*", e_ns):
                    continue
                allowed = (authz.allows_global("mesh") if kind in ("sameness-group", "mesh",
                                                                    "exported-services")
                           else authz.allows("service", e_name, partition=ap, namespace=e_ns))
                if not allowed:
                    filtered = True
                    continue
                entries.append(e)
            if name is not None:
                if not entries:
                    raise ApiError(404, f"Config entry not found for \"{kind}\" / \"{name}\"")
                body = entries[0]
            else:
                body = entries
        elif path == "/v1/query":
            index = await self._block(request, d, lambda: d.table("prepared-queries"))
            body = [dict(qd, Token="<hidden>") for qd in d.queries.values()
                    if authz.allows("query", qd["Name"])]
        elif m := re.fullmatch(r"/v1/query/([^/]+)/execute", path):
            limit = int(q.get("limit", "0") or 0)
            body = st.execute_query(m.group(1), authz, dc=q.get("dc"), limit=limit,
                                    connect=q.get("connect") in ("true", "1", ""))
            index = st.dc(q.get("dc")).index
        elif m := re.fullmatch(r"/v1/query/([^/]+)", path):
            index = d.table("prepared-queries")
            body = [dict(st._find_query(d, m.group(1), templates=False), Token="<hidden>")]
        else:
            raise ApiError(404, "404 page not found")
        headers["X-Consul-Index"] = str(max(1, index))
        if filtered and self._token(request):
            headers["X-Consul-Results-Filtered-By-ACLs"] = "true"
        if "cached" in q:
            headers.update({"X-Cache": "MISS", "Age": "0"})
        return 200, body, headers

    def _agent_self(self) -> dict[str, Any]:
        st = self.state
        config = {"Datacenter": st.local, "PrimaryDatacenter": st.local,
                  "NodeName": st.node_name, "NodeID": "4e8a5c2f-0000-4000-8000-000000000001",
                  "Revision": "fake", "Server": True, "Version": "1.21.0", "BuildDate":
                  "2025-01-01T00:00:00Z"}
        if st.enterprise:
            config["Partition"] = "default"
        return {"Config": config,
                "DebugConfig": {"DNSDomain": "consul.", "DNSAltDomain": "", "Datacenter":
                                st.local},
                "Coord": {"Adjustment": 0, "Error": 1.5, "Height": 1e-05, "Vec": [0.0] * 8},
                "Member": {"Name": st.node_name, "Addr": "127.0.0.1", "Port": 8301,
                           "Tags": {"dc": st.local, "role": "consul", "vsn": "2"},
                           "Status": 1},
                "Meta": {"consul-network-segment": ""}, "Stats": {},
                "xDS": {"SupportedProxies": {"envoy": ["1.31.0"]}, "Port": 8502,
                        "Ports": {"Plaintext": 8502, "TLS": -1}}}

    def _peering_json(self, d: Datacenter, p: dict[str, Any]) -> dict[str, Any]:
        imported = sorted({s.name for s in d.services.values()
                           if (s.partition, s.peer) == (p["Partition"], p["Name"])})
        out = dict(p)
        out["StreamStatus"] = {"ImportedServices": imported or None, "ExportedServices": None,
                               "LastHeartbeat": "2025-01-01T00:00:00Z",
                               "LastReceive": "2025-01-01T00:00:00Z",
                               "LastSend": "2025-01-01T00:00:00Z"}
        return out

    # -- control (tests in another process) ----------------------------------------------------

    async def control(self, request: web.Request) -> web.Response:
        """``POST /_fake/rpc {"method", "args", "kwargs"}`` calls a mutator; ``GET
        /_fake/requests`` is the request log; ``GET /_fake/stats`` the concurrency figures."""
        tail = request.match_info["tail"]
        if tail == "requests":
            return web.json_response([r.as_dict() for r in self.log])
        if tail == "stats":
            return web.json_response(self.stats())
        if tail == "rpc":
            call = await request.json()
            try:
                result = self.call(call["method"], *call.get("args", ()),
                                   **call.get("kwargs", {}))
            except Exception as e:  # report, do not kill the fake
                return web.json_response({"error": f"{type(e).__name__}: {e}"}, status=400)
            return web.json_response({"result": result})
        return web.Response(status=404)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run a mutator (of the state, or of this API: faults, log) by name."""
        if method.startswith("_"):
            raise AttributeError(method)
        target = getattr(self, method, None) if method in _API_METHODS else None
        if target is None:
            target = getattr(self.state, method)
        return target(*args, **kwargs)

    def batch(self, calls: list[tuple[str, list[Any], dict[str, Any]]]) -> list[Any]:
        return [self.call(m, *a, **k) for m, a, k in calls]

    def start_churn(self, calls: list[tuple[str, list[Any], dict[str, Any]]], rate: float,
                    seconds: float) -> None:
        """Make the writes ``calls`` (cycled) at ``rate`` a second for ``seconds``, on the
        fake's own loop, so the rate does not depend on a client's round trips."""
        async def run() -> None:
            start = time.monotonic()
            n = 0
            while time.monotonic() - start < seconds:
                method, args, kwargs = calls[n % len(calls)]
                self.call(method, *args, **kwargs)
                n += 1
                self.churned = n
                await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        self.churned = 0
        self._churn = asyncio.ensure_future(run())

    def churn_count(self) -> int:
        return int(getattr(self, "churned", 0))

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.in_flight, "max_in_flight": self.max_in_flight,
                "requests": len(self.log),
                "bytes": sum(r.bytes for r in self.log)}

    def reset_log(self) -> None:
        self.log.clear()
        self.max_in_flight = self.in_flight

    def requests(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.log]


_API_METHODS = {"add_fault", "clear_faults", "reset_log", "requests", "stats", "batch",
                "start_churn", "churn_count"}
_STATUS_BODIES = {
    403: "Permission denied",
    429: "Your IP is issuing too many concurrent connections, please rate limit your calls\n",
    500: "Internal Server Error",
    503: "rpc error: No cluster leader",
}


def _mentions(policy: dict[str, Any], partition: str) -> bool:
    return bool(_scope_blocks(policy, "partition", partition))


def _flat(entry: dict[str, Any]) -> dict[str, Any]:
    """A /health/service entry as /catalog/service renders it (ServiceNode)."""
    n, s = entry["Node"], entry["Service"]
    out = {"ID": n["ID"], "Node": n["Node"], "Address": n["Address"],
           "Datacenter": n["Datacenter"], "TaggedAddresses": n["TaggedAddresses"],
           "NodeMeta": n["Meta"], "ServiceKind": s["Kind"], "ServiceID": s["ID"],
           "ServiceName": s["Service"], "ServiceTags": s["Tags"],
           "ServiceAddress": s["Address"], "ServiceTaggedAddresses": s.get("TaggedAddresses"),
           "ServiceWeights": s["Weights"], "ServiceMeta": s["Meta"], "ServicePort": s["Port"],
           "ServiceSocketPath": "", "ServiceEnableTagOverride": False,
           "ServiceProxy": s["Proxy"], "ServiceConnect": s["Connect"]}
    for k in ("PeerName", "Namespace", "Partition"):
        if k in s:
            out[k] = s[k]
    out.update(CreateIndex=s["CreateIndex"], ModifyIndex=s["ModifyIndex"])
    return out


# ----------------------------------------------------------------------------------------------
# Running it
# ----------------------------------------------------------------------------------------------


class FakeConsul:
    """A fake Consul on 127.0.0.1:<free port> and a unix socket, in a background thread.

    Mutators of ``ConsulState`` and ``Api`` are called on this object (``fake.register_node``,
    ``fake.add_fault``, ...) and run on the server's event loop, so a test never races it."""

    def __init__(self, datacenter: str = "dc1", *, enterprise: bool = True,
                 unix_path: str | Path | None = None, port: int = 0) -> None:
        self.state = ConsulState(datacenter, enterprise=enterprise)
        self._tmp = None
        if unix_path is None:
            self._tmp = tempfile.mkdtemp(prefix="fake-consul-")
            unix_path = Path(self._tmp) / "consul.sock"
        self.unix_path = str(unix_path)
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name="fake-consul")
        self._runner: web.AppRunner | None = None
        self._sites: list[web.BaseSite] = []
        self.api: Api | None = None

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeConsul:
        self._thread.start()
        self._run(self._start())
        return self

    async def _start(self) -> None:
        self.api = Api(self.state)
        self._runner = web.AppRunner(self.api.app(), access_log=None, handle_signals=False,
                                     shutdown_timeout=0.5)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        tcp = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await tcp.start()
        self.port = tcp._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        with contextlib.suppress(FileNotFoundError):
            Path(self.unix_path).unlink()
        unix = web.UnixSite(self._runner, self.unix_path)
        await unix.start()
        self._sites = [tcp, unix]

    def stop_listener(self) -> None:
        """Consul goes away: the sockets close (connection refused) and open requests end."""
        async def stop() -> None:
            assert self.api is not None
            for site in self._sites:
                await site.stop()
            self._sites = []
            self.api.abort_in_flight()
            assert self._runner is not None and self._runner.server is not None
            for conn in self._runner.server.connections:  # idle keep-alive ones too
                conn.force_close()
                if conn.transport is not None:
                    conn.transport.close()
        self._run(stop())

    def start_listener(self) -> None:
        """Consul comes back on the same port and socket path."""
        self._run(self._listen())

    def stop(self) -> None:
        if self._runner is not None:
            self._run(self._runner.cleanup())
            self._runner = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if self._tmp:
            with contextlib.suppress(OSError):
                Path(self.unix_path).unlink()
                Path(self._tmp).rmdir()

    def __enter__(self) -> FakeConsul:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- calling into the loop -----------------------------------------------------------------

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        async def run() -> Any:
            assert self.api is not None
            return self.api.call(method, *args, **kwargs)
        return self._run(run())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_") or not (name in _API_METHODS or hasattr(ConsulState, name)):
            raise AttributeError(name)
        return lambda *a, **k: self.call(name, *a, **k)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def unix_url(self) -> str:
        return f"unix://{self.unix_path}"

    @property
    def max_in_flight(self) -> int:
        return int(self.call("stats")["max_in_flight"])


class RemoteFake:
    """Drives a fake started with ``python tests/fake_consul.py`` (``POST /_fake/rpc``)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        data = json.dumps({"method": method, "args": args, "kwargs": kwargs}).encode()
        req = urllib.request.Request(f"{self.url}/_fake/rpc", data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return json.loads(resp.read())["result"]
        except urllib.error.HTTPError as e:
            raise RuntimeError(json.loads(e.read()).get("error")) from None

    def requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.url}/_fake/requests", timeout=60) as resp:
            return json.loads(resp.read())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.call(name, *a, **k)


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a unix socket (for tests of the fake's unix listener)."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def main(argv: list[str] | None = None) -> int:
    """Run the fake as a process until SIGTERM; print its URL once it listens."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--unix", default=None)
    parser.add_argument("--datacenter", default="dc1")
    parser.add_argument("--ce", action="store_true", help="Consul CE (no partitions)")
    args = parser.parse_args(argv)
    fake = FakeConsul(args.datacenter, enterprise=not args.ce, unix_path=args.unix,
                      port=args.port).start()
    print(f"fake consul on {fake.url} and {fake.unix_url}", flush=True)
    stop = threading.Event()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    stop.wait()
    fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
