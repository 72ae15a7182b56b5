"""The catalog file's models: what users write, validated (reference: ``docs/reference.md``,
generated from the ``description`` of each field by ``python -m meshdns.docs``).

These are the public shape of the file; ``catalog.snapshot`` turns a validated ``Catalog`` into
the indexed, immutable structure that queries read.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from typing import Annotated, Any, Literal, NotRequired

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from typing_extensions import TypedDict

from ..config import Duration, consul

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
    address: Address = Field(description="IP address or hostname.")
    port: int | None = Field(None, ge=0, le=65535, description="Port, where it differs.")


def _tagged(value: object) -> object:
    if isinstance(value, dict):
        return {k: ({"address": v} if isinstance(v, str) else v) for k, v in value.items()}
    return value


TaggedAddresses = Annotated[dict[str, TaggedAddress], BeforeValidator(_tagged), WithJsonSchema({
    "type": "object", "additionalProperties": {"anyOf": [
        {"type": "string"},
        {"type": "object", "required": ["address"], "additionalProperties": False,
         "properties": {"address": {"type": "string"},
                        "port": {"type": ["integer", "null"], "minimum": 0, "maximum": 65535}}},
    ]}})]


def _meta(value: object) -> object:
    # YAML turns `version: 1` into an int: accept scalars and keep them as text
    if isinstance(value, dict):
        return {
            str(k): ("true" if v is True else "false" if v is False else v)
            if not isinstance(v, (int, float)) else str(v)
            for k, v in value.items()
        }
    return value


Meta = Annotated[dict[str, str], BeforeValidator(_meta), WithJsonSchema(
    {"type": "object", "additionalProperties": {"type": ["string", "number", "boolean"]}})]


class Node(_Model):
    name: NodeName = Field(description="Unique per datacenter (or peer) and partition.",
                           json_schema_extra=consul("Node"))
    address: Address = Field(description="IPv4, IPv6 or hostname.",
                             json_schema_extra=consul("Address"))
    datacenter: Name | None = Field(None, description="Default: the server's datacenter.",
                                    json_schema_extra=consul("Datacenter"))
    partition: Name = Field("default", description="Admin partition.",
                            json_schema_extra=consul("Partition"))
    peer: Name | None = Field(None, description="Set for nodes imported from a cluster peer "
                              "(then no datacenter).", json_schema_extra=consul("PeerName"))
    health: Health = Field("passing", description="The node's health: instances on a "
                           "`critical` or `maintenance` node are never answered.",
                           json_schema_extra=consul("serfHealth / node maintenance checks"))
    meta: Meta = Field(default_factory=dict, description="Answered as TXT `key=value` "
                       "records.", json_schema_extra=consul("Meta"))
    tagged_addresses: TaggedAddresses = Field(
        default_factory=dict, description="Other addresses by tag (`wan`, `lan_ipv4`, ...); "
        "a bare address or `{address, port}`.", json_schema_extra=consul("TaggedAddresses"))

    @model_validator(mode="after")
    def _peer_or_dc(self) -> Node:
        if self.peer is not None and self.datacenter is not None:
            raise ValueError("a node is either imported from a peer or in a datacenter, not both")
        return self


class Weights(_Model):
    passing: int = Field(1, ge=0, le=65535, description="SRV weight while passing.",
                         json_schema_extra=consul("Weights.Passing"))
    warning: int = Field(1, ge=0, le=65535, description="SRV weight while in warning.",
                         json_schema_extra=consul("Weights.Warning"))


class Service(_Model):
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)

    name: Name = Field(description="The service name, as in `<name>.service.consul`.",
                       json_schema_extra=consul("Service"))
    id: str | None = Field(None, description="Instance ID, unique per node; default: the name.",
                           json_schema_extra=consul("ID"))
    node: NodeName = Field(description="The node it runs on (a node of the catalog).",
                           json_schema_extra=consul("Node"))
    namespace: Name = Field("default", description="Namespace.",
                            json_schema_extra=consul("Namespace"))
    # Where the node is, when its name alone is ambiguous (the same name in two localities).
    datacenter: Name | None = Field(None, description="The node's datacenter, when its name "
                                    "alone is ambiguous.", json_schema_extra=consul("Datacenter"))
    partition: Name | None = Field(None, description="The node's partition, when its name "
                                   "alone is ambiguous.", json_schema_extra=consul("Partition"))
    peer: Name | None = Field(None, description="The node's cluster peer, when its name alone "
                              "is ambiguous.", json_schema_extra=consul("PeerName"))
    address: Address | None = Field(None, description="Default: the node's address; may be a "
                                    "hostname.", json_schema_extra=consul("ServiceAddress"))
    port: int = Field(0, ge=0, le=65535, description="Port in SRV answers.",
                      json_schema_extra=consul("ServicePort"))
    tags: list[str] = Field(default_factory=list, description="Tags, as in "
                            "`<tag>.<name>.service.consul`.", json_schema_extra=consul("Tags"))
    meta: Meta = Field(default_factory=dict, description="Service meta (answered as TXT "
                       "records).", json_schema_extra=consul("ServiceMeta"))
    health: Health = Field("passing", description="The instance's aggregated check status.",
                           json_schema_extra=consul("health checks (aggregated status)"))
    weights: Weights = Field(Weights(), description="SRV weights by health.",
                             json_schema_extra=consul("Weights"))
    kind: Kind = Field("typical", description="What the instance is (answers of "
                       "`.connect` and `.ingress` lookups come from proxies and gateways).",
                       json_schema_extra=consul("Kind"))
    destination: Name | None = Field(None, description="connect-proxy: the service it fronts.",
                                     json_schema_extra=consul("Proxy.DestinationServiceName"))
    connect_native: bool = Field(False, description="The service speaks Connect itself "
                                 "(answered by `.connect` lookups).",
                                 json_schema_extra=consul("Connect.Native"))
    ingress: list[Name] = Field(default_factory=list, description="ingress-gateway: the "
                                "services it exposes.",
                                json_schema_extra=consul("ingress-gateway config entry"))
    tagged_addresses: TaggedAddresses = Field(
        default_factory=dict, description="Other addresses by tag (`wan`, `lan_ipv4`, ...).",
        json_schema_extra=consul("TaggedAddresses"))

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
    service: Name = Field(description="The service the address belongs to.",
                          json_schema_extra=consul("ServiceName"))
    namespace: Name = Field("default", description="Its namespace.")
    partition: Name = Field("default", description="Its partition.")
    peer: Name | None = Field(None, description="Its cluster peer, for an imported service.")
    ip: str = Field(description="The fixed IPv4 address answered by `<service>.virtual.consul`.",
                    json_schema_extra=consul("ManualVirtualIPs / consul-virtual tagged address"))

    @field_validator("ip")
    @classmethod
    def _ipv4(cls, value: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise ValueError(f"{value!r} is not an IPv4 address") from None


class Target(_Model):
    """A place to look: any of peer / datacenter / partition / namespace (others as the source)."""

    peer: Name | None = Field(None, description="A cluster peer.",
                              json_schema_extra=consul("Peer"))
    datacenter: Name | None = Field(None, description="A datacenter.",
                                    json_schema_extra=consul("Datacenter"))
    partition: Name | None = Field(None, description="A partition.",
                                   json_schema_extra=consul("Partition"))
    namespace: Name | None = Field(None, description="A namespace.",
                                   json_schema_extra=consul("Namespace"))

    @model_validator(mode="after")
    def _something(self) -> Target:
        if not any((self.peer, self.datacenter, self.partition, self.namespace)):
            raise ValueError("a target names one of peer, datacenter, partition, namespace")
        if self.peer and self.datacenter:
            raise ValueError("a target is either a peer or a datacenter, not both")
        return self


class Failover(_Model):
    service: Name = Field(description="The service whose lookups fail over.",
                          json_schema_extra=consul("service-resolver Name"))
    namespace: Name = Field("default", description="Its namespace.")
    partition: Name = Field("default", description="Its partition.")
    datacenter: Name | None = Field(None, description="Whose lookups this applies to; "
                                    "default: the server's datacenter.")
    targets: list[Target] = Field(min_length=1, description="Tried in order when no instance "
                                  "is healthy.", json_schema_extra=consul("Failover.Targets"))


class SamenessMember(_Model):
    partition: Name | None = Field(None, description="A partition of this cluster.",
                                   json_schema_extra=consul("Members.Partition"))
    peer: Name | None = Field(None, description="A cluster peer.",
                              json_schema_extra=consul("Members.Peer"))

    @model_validator(mode="after")
    def _one(self) -> SamenessMember:
        if (self.partition is None) == (self.peer is None):
            raise ValueError("a member is exactly one of {partition: ...} or {peer: ...}")
        return self


class SamenessGroup(_Model):
    name: Name = Field(description="The group's name (`<service>.service.<group>.sg.consul`).",
                       json_schema_extra=consul("sameness-group Name"))
    partition: Name = Field("default", description="The partition it is defined in.",
                            json_schema_extra=consul("Partition"))
    default_for_failover: bool = Field(False, description="Its members are failover targets "
                                       "for every service of the partition without its own "
                                       "`failover`.", json_schema_extra=consul(
                                           "DefaultForFailover"))
    include_local: bool = Field(False, description="Lookups through the group include the "
                                "local partition first.", json_schema_extra=consul(
                                    "IncludeLocal"))
    members: list[SamenessMember] = Field(min_length=1, description="Partitions and peers, in "
                                          "order.", json_schema_extra=consul("Members"))


class QueryFailover(_Model):
    nearest_n: int = Field(0, ge=0, description="Fail over to the N nearest datacenters "
                           "(by `datacenter_rtt`).", json_schema_extra=consul("NearestN"))
    datacenters: list[Name] = Field(default_factory=list, description="Then these "
                                    "datacenters, in order.",
                                    json_schema_extra=consul("Datacenters"))
    targets: list[Target] = Field(default_factory=list, description="Or these targets, in "
                                  "order (instead of nearest_n and datacenters).",
                                  json_schema_extra=consul("Targets"))


class PreparedQuery(_Model):
    name: str = Field(description="Looked up as `<name>.query.consul`.",
                      json_schema_extra=consul("Name"))
    service: Name = Field(description="The service it answers.",
                          json_schema_extra=consul("Service.Service"))
    namespace: Name = Field("default", description="Its namespace.",
                            json_schema_extra=consul("Service.Namespace"))
    partition: Name = Field("default", description="Its partition.",
                            json_schema_extra=consul("Service.Partition"))
    tags: list[str] = Field(default_factory=list, description="Instances must have all of "
                            "these tags.", json_schema_extra=consul("Service.Tags"))
    only_passing: bool = Field(False, description="Leave out instances in `warning`.",
                               json_schema_extra=consul("Service.OnlyPassing"))
    ttl: Duration | None = Field(None, description="TTL of its answers; default: the "
                                 "service's TTL.", json_schema_extra=consul("DNS.TTL"))
    failover: QueryFailover = Field(QueryFailover(), description="Where to look when no "
                                    "local instance is healthy.",
                                    json_schema_extra=consul("Service.Failover"))

    @field_validator("name")
    @classmethod
    def _dns_name(cls, value: str) -> str:
        if not value or any(not _LABEL.match(p) for p in value.split(".")):
            raise ValueError(f"{value!r} cannot be used in a DNS name")
        return value


class Catalog(_Model):
    nodes: list[Node] = Field(default_factory=list, description="Machines running a Consul "
                              "agent, here and in federated datacenters and peers.",
                              json_schema_extra=consul("catalog nodes (/v1/catalog/nodes)"))
    # Service models, or raw mappings that build_snapshot validates one at a time: a
    # 300,000-instance catalog held as models at once needs ~1 GB, one at a time ~150 MB.
    services: list[Service | dict[str, Any]] = Field(
        default_factory=list, description="Service instances, each on a node.",
        json_schema_extra=consul("catalog services (/v1/health/service)"))
    virtual_ips: list[VirtualIP] = Field(default_factory=list, description="Fixed virtual "
                                         "IPs; other services get one derived from their name "
                                         "in `virtual_ip_range`.",
                                         json_schema_extra=consul("virtual IPs"))
    failover: list[Failover] = Field(default_factory=list, description="Where to look when a "
                                     "service has no healthy instance.",
                                     json_schema_extra=consul("service-resolver Failover"))
    sameness_groups: list[SamenessGroup] = Field(default_factory=list, description="Groups of "
                                                 "partitions and peers that hold the same "
                                                 "services.",
                                                 json_schema_extra=consul("sameness-group"))
    prepared_queries: list[PreparedQuery] = Field(default_factory=list, description="Named "
                                                  "queries answered under `.query`.",
                                                  json_schema_extra=consul("prepared query"))
    # meshdns extension for prepared-query nearest_n: RTT between datacenters (symmetric)
    datacenter_rtt: dict[Name, dict[Name, Duration]] = Field(
        default_factory=dict, description="meshdns extension: round-trip time between "
        "datacenters (symmetric), for prepared queries' `nearest_n`.",
        json_schema_extra=consul("network coordinates"))


class CatalogFile(Catalog):
    """The catalog as read from a file: services stay raw until the snapshot validates them."""

    # build_snapshot consumes these entries (sets each to None once indexed)
    services: list[dict[str, Any] | None] = Field(default_factory=list)  # type: ignore


# --- one file entry's service fields, without the model ------------------------------------
# A large catalog file validates 300,000 service entries one by one (catalog/snapshot.py):
# building each Service model costs ~2.2 µs, validating the same fields into a dict ~1 µs,
# a third of a second of the first answer's 2.5 s. The dict's validator is made from the
# model's own fields (same types, constraints, validators, config), so they cannot drift;
# the model's own check (_kind_fields) is made on the dict, and any entry either refuses is
# validated by the model after all, for the model's own errors.
_ServiceFields = TypedDict(  # type: ignore[misc]
    "_ServiceFields",
    {name: info.rebuild_annotation() if info.is_required()
     else NotRequired[info.rebuild_annotation()]  # type: ignore[misc]
     for name, info in Service.model_fields.items()})
_ServiceFields.__pydantic_config__ = ConfigDict(  # type: ignore[attr-defined]
    extra="forbid", coerce_numbers_to_str=True)
_validate_fields = TypeAdapter(_ServiceFields).validator.validate_python
# shared by every entry that leaves them out (nothing mutates a validated catalog)
SERVICE_DEFAULTS: dict[str, Any] = {
    name: info.get_default(call_default_factory=True)
    for name, info in Service.model_fields.items() if not info.is_required()}


def service_fields(entry: object) -> dict[str, Any]:
    """The fields of one service entry, as ``Service.model_validate(entry)`` validates them:
    those the entry gives, the others at their defaults (``SERVICE_DEFAULTS``: read them with
    ``.get(name, SERVICE_DEFAULTS[name])``). Raises the ``ValidationError`` the model raises."""
    try:
        fields = _validate_fields(entry)
    except ValidationError:
        fields = None
    if fields is not None and consistent(fields):
        return fields
    return dict(Service.__pydantic_validator__.validate_python(entry).__dict__)


def consistent(fields: dict[str, Any]) -> bool:
    """Service._kind_fields, on an entry's fields: False where the model refuses them."""
    kind = fields.get("kind", "typical")
    return (kind == "connect-proxy") == bool(fields.get("destination")) \
        and (kind == "ingress-gateway" or not fields.get("ingress")) \
        and (fields.get("peer") is None or fields.get("datacenter") is None)


class CatalogFields(CatalogFile):
    """A JSON catalog read in one pass: each service entry validated into its fields
    (``service_fields``, less the check across them: ``consistent``) while the JSON is
    parsed, in Rust, with no raw dict built first (~0.2 s and 40 MiB less for 300,000
    instances). A problem in any field fails the whole pass: then the file is read as a
    ``CatalogFile``, for every problem it has (catalog/file.py)."""

    services: list[_ServiceFields | None] = Field(  # type: ignore
        default_factory=list)
