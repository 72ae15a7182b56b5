"""The catalog file's models (``shared/spec/catalog.md``): what users write, validated.

These are the public shape of the file; ``catalog.snapshot`` turns a validated ``Catalog`` into
the indexed, immutable structure that queries read.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from ..config import Duration

Health = Literal["passing", "warning", "critical", "maintenance"]
Kind = Literal[
    "typical", "connect-proxy", "ingress-gateway", "mesh-gateway", "terminating-gateway"
]

_HOSTNAME = re.compile(r"^(?=.{1,253}\.?$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.)*"
                       r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?\.?$")
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]{0,62})?$")


def check_address(value: str) -> str:
    """An IPv4/IPv6 address or a hostname."""
    value = value.strip()
    family = socket.AF_INET6 if ":" in value else socket.AF_INET
    try:  # the C parser: ipaddress costs 10 us an address, a third of loading a node
        return socket.inet_ntop(family, socket.inet_pton(family, value))
    except (OSError, ValueError):
        pass
    # an all-digit last label is a mistyped IP address (10.0.0.300), never a hostname
    if not _HOSTNAME.match(value) or value.rstrip(".").rsplit(".", 1)[-1].isdigit():
        raise ValueError(f"{value!r} is neither an IP address nor a hostname")
    return value.rstrip(".").lower()


Address = Annotated[str, BeforeValidator(lambda v: check_address(v) if isinstance(v, str) else v)]
# Checked by pydantic-core's own regex engine: a Python validator per name costs ~15% of
# loading a 300,000-instance catalog.
Name = Annotated[str, StringConstraints(pattern=_LABEL.pattern)]
NodeName = Name


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TaggedAddress(_Model):
    address: Address
    port: int | None = Field(None, ge=0, le=65535)


def _tagged(value: object) -> object:
    if isinstance(value, dict):
        return {k: ({"address": v} if isinstance(v, str) else v) for k, v in value.items()}
    return value


TaggedAddresses = Annotated[dict[str, TaggedAddress], BeforeValidator(_tagged)]


def _meta(value: object) -> object:
    # YAML turns `version: 1` into an int: accept scalars and keep them as text
    if isinstance(value, dict):
        return {
            str(k): ("true" if v is True else "false" if v is False else v)
            if not isinstance(v, (int, float)) else str(v)
            for k, v in value.items()
        }
    return value


Meta = Annotated[dict[str, str], BeforeValidator(_meta)]


class Node(_Model):
    name: NodeName
    address: Address
    datacenter: Name | None = None
    partition: Name = "default"
    peer: Name | None = None
    health: Health = "passing"
    meta: Meta = Field(default_factory=dict)
    tagged_addresses: TaggedAddresses = Field(default_factory=dict)

    @model_validator(mode="after")
    def _peer_or_dc(self) -> Node:
        if self.peer is not None and self.datacenter is not None:
            raise ValueError("a node is either imported from a peer or in a datacenter, not both")
        return self


class Weights(_Model):
    passing: int = Field(1, ge=0, le=65535)
    warning: int = Field(1, ge=0, le=65535)


class Service(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: Name
    id: str | None = None
    node: NodeName
    namespace: Name = "default"
    # Where the node is, when its name alone is ambiguous (the same name in two localities).
    datacenter: Name | None = None
    partition: Name | None = None
    peer: Name | None = None
    address: Address | None = None
    port: int = Field(0, ge=0, le=65535)
    tags: list[str] = Field(default_factory=list)
    meta: Meta = Field(default_factory=dict)
    health: Health = "passing"
    weights: Weights = Weights()
    kind: Kind = "typical"
    destination: Name | None = None
    connect_native: bool = False
    ingress: list[Name] = Field(default_factory=list)
    tagged_addresses: TaggedAddresses = Field(default_factory=dict)

    @model_validator(mode="after")
    def _kind_fields(self) -> Service:
        if self.kind == "connect-proxy" and not self.destination:
            raise ValueError("a connect-proxy needs 'destination' (the service it fronts)")
        if self.kind != "connect-proxy" and self.destination:
            raise ValueError("'destination' is only for kind connect-proxy")
        if self.ingress and self.kind != "ingress-gateway":
            raise ValueError("'ingress' is only for kind ingress-gateway")
        if self.peer is not None and self.datacenter is not None:
            raise ValueError("a service is either imported from a peer or in a datacenter")
        return self


class VirtualIP(_Model):
    service: Name
    namespace: Name = "default"
    partition: Name = "default"
    peer: Name | None = None
    ip: str

    @field_validator("ip")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address") from None


class Target(_Model):
    """A place to look: any of peer / datacenter / partition / namespace (others as the source)."""

    peer: Name | None = None
    datacenter: Name | None = None
    partition: Name | None = None
    namespace: Name | None = None

    @model_validator(mode="after")
    def _something(self) -> Target:
        if not any((self.peer, self.datacenter, self.partition, self.namespace)):
            raise ValueError("a target names one of peer, datacenter, partition, namespace")
        if self.peer and self.datacenter:
            raise ValueError("a target is either a peer or a datacenter, not both")
        return self


class Failover(_Model):
    service: Name
    namespace: Name = "default"
    partition: Name = "default"
    datacenter: Name | None = None
    targets: list[Target] = Field(min_length=1)


class SamenessMember(_Model):
    partition: Name | None = None
    peer: Name | None = None

    @model_validator(mode="after")
    def _one(self) -> SamenessMember:
        if (self.partition is None) == (self.peer is None):
            raise ValueError("a member is exactly one of {partition: ...} or {peer: ...}")
        return self


class SamenessGroup(_Model):
    name: Name
    partition: Name = "default"
    default_for_failover: bool = False
    include_local: bool = False
    members: list[SamenessMember] = Field(min_length=1)


class QueryFailover(_Model):
    nearest_n: int = Field(0, ge=0)
    datacenters: list[Name] = Field(default_factory=list)
    targets: list[Target] = Field(default_factory=list)


class PreparedQuery(_Model):
    name: str
    service: Name
    namespace: Name = "default"
    partition: Name = "default"
    tags: list[str] = Field(default_factory=list)
    only_passing: bool = False
    ttl: Duration | None = None
    failover: QueryFailover = QueryFailover()

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not value or any(not _LABEL.match(p) for p in value.split(".")):
            raise ValueError(f"{value!r} cannot be used in a DNS name")
        return value


class Catalog(_Model):
    nodes: list[Node] = Field(default_factory=list)
    # Service models, or raw mappings that build_snapshot validates one at a time: a
    # 300,000-instance catalog held as models at once needs ~1 GB, one at a time ~150 MB.
    services: list[Service | dict[str, Any]] = Field(default_factory=list)
    virtual_ips: list[VirtualIP] = Field(default_factory=list)
    failover: list[Failover] = Field(default_factory=list)
    sameness_groups: list[SamenessGroup] = Field(default_factory=list)
    prepared_queries: list[PreparedQuery] = Field(default_factory=list)
    # meshdns extension for prepared-query nearest_n: RTT between datacenters (symmetric)
    datacenter_rtt: dict[Name, dict[Name, Duration]] = Field(default_factory=dict)


class CatalogFile(Catalog):
    """The catalog as read from a file: services stay raw until the snapshot validates them."""

    # build_snapshot consumes these entries (sets each to None once indexed)
    services: list[dict[str, Any] | None] = Field(default_factory=list)  # type: ignore
