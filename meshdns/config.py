"""The server config (``config.yaml``): pydantic models with every default in one place.

Names follow Consul's ``dns_config`` where one exists. Every field has a ``description`` (and
``x-consul``, what it mirrors in Consul): ``python -m meshdns.docs`` turns them into
``docs/reference.md`` and the JSON Schemas, and a test fails when those are stale.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from .documents import read_document, validate
from .errors import ConfigError

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
# Go's time.ParseDuration units (what Consul's config accepts): 1m30s, 1h2m3.5s, 500us, 250ms
_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3, "s": 1.0,
          "m": 60.0, "h": 3600.0}
_PART = re.compile(rf"({_NUMBER})\s*(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_DURATION = re.compile(rf"(?:{_PART.pattern}\s*)+")
_BARE = re.compile(_NUMBER)
DURATION_HINT = "a duration like 10s, 500ms, 1m30s or 1h (units ns, us, ms, s, m, h)"


def parse_duration(value: Any) -> float:
    """Seconds from a Go/Consul duration (``10s``, ``250ms``, ``1m30s``, ``1h2m3.5s``,
    ``500us``) or a bare number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected {DURATION_HINT}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if _BARE.fullmatch(text):
            return float(text)
        if _DURATION.fullmatch(text):
            return sum(float(number) * _UNITS[unit] for number, unit in _PART.findall(text))
    raise ValueError(f"expected {DURATION_HINT}, got {value!r}")


def at_least(minimum: float, why: str) -> Any:
    """A validator for a ``Duration`` field that must not be shorter than ``minimum``."""

    def check(value: float | None) -> float | None:
        if value is not None and value < minimum:
            raise ValueError(f"must be at least {format_duration(minimum)} ({why}), "
                             f"got {format_duration(value)}")
        return value

    return check


def format_duration(seconds: float) -> str:
    """``0.025`` -> ``25ms``, ``90`` -> ``90s``: the shortest way the config would write it."""
    if seconds == 0:
        return "0s"
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= size:
            return f"{seconds / size:g}{unit}"
    return f"{seconds / 1e-9:g}ns"


# In the JSON Schema: what users write (a number of seconds, or a Go duration string).
DURATION_SCHEMA = {"anyOf": [
    {"type": "number", "minimum": 0},
    {"type": "string", "pattern": rf"^\s*(?:{_BARE.pattern}|(?:{_PART.pattern}\s*)+)$"}]}
Duration = Annotated[float, BeforeValidator(parse_duration), WithJsonSchema(DURATION_SCHEMA)]


def consul(name: str) -> dict[str, Any]:
    """What a field mirrors in Consul, for the generated reference (``docs/``)."""
    return {"x-consul": name}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
               "GB": 1000**3, "GiB": 1024**3}


def parse_size(value: Any) -> int:
    """Bytes from ``64MiB``, ``500KB``, ``1GiB`` or a bare number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match:
            return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])
    raise ValueError(f"expected a size like 64MiB, 500KB or a number of bytes, got {value!r}")


SIZE_SCHEMA = {"anyOf": [
    {"type": "integer", "minimum": 1},
    {"type": "string", "pattern": r"^\s*\d+(?:\.\d+)?\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$"}]}
ByteSize = Annotated[int, BeforeValidator(parse_size), WithJsonSchema(SIZE_SCHEMA)]


def parse_hostport(value: str, default_port: int) -> tuple[str, int]:
    """``("127.0.0.1", 8600)`` from ``127.0.0.1:8600``, ``[::1]:53`` or a bare address."""
    value = value.strip()
    if value.startswith("["):
        host, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: expected [IPv6 address]:port")
        port = rest[1:]
    elif value.count(":") == 1:
        host, port = value.split(":")
    else:
        host, port = value, ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: {host!r} is not an IP address") from None
    if port == "":
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r}: port must be 0-65535")
    return host, int(port)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SoaSettings(_Model):
    refresh: int = Field(3600, ge=0, le=2**31 - 1, description="SOA refresh, in seconds.",
                         json_schema_extra=consul("dns_config.soa.refresh"))
    retry: int = Field(600, ge=0, le=2**31 - 1, json_schema_extra=consul("dns_config.soa.retry"),
                       description="SOA retry, in seconds.")
    expire: int = Field(86400, ge=0, le=2**31 - 1, description="SOA expire, in seconds.",
                        json_schema_extra=consul("dns_config.soa.expire"))
    min_ttl: int = Field(0, ge=0, le=2**31 - 1, json_schema_extra=consul("dns_config.soa.min_ttl"),
                         description="SOA minimum: how long resolvers cache NXDOMAIN and NODATA "
                         "answers, in seconds.")


class DnsSettings(_Model):
    node_ttl: Duration = Field(0.0, json_schema_extra=consul("dns_config.node_ttl"),
                               description="TTL of node answers (and of virtual IPs, as in "
                               "Consul).")
    service_ttl: dict[str, Duration] = Field(
        default_factory=lambda: {"*": 0.0}, json_schema_extra=consul("dns_config.service_ttl"),
        description="TTL of service answers, by service name: exact names, prefixes such as "
        "`db*`, and `*`; the longest match wins.")
    only_passing: bool = Field(False, json_schema_extra=consul("dns_config.only_passing"),
                               description="Leave out instances in `warning` too (`critical` and "
                               "`maintenance` ones are always left out).")
    udp_answer_limit: int = Field(3, ge=1, json_schema_extra=consul("dns_config.udp_answer_limit"),
                                  description="Answers in a UDP reply to a query without EDNS.")
    a_record_limit: int = Field(0, ge=0, json_schema_extra=consul("dns_config.a_record_limit"),
                                description="At most this many A/AAAA answers on every "
                                "transport, a different subset each time; 0: no limit.")
    enable_truncate: bool = Field(False, json_schema_extra=consul("dns_config.enable_truncate"),
                                  description="Set TC on UDP replies trimmed to "
                                  "`udp_answer_limit`, so clients retry over TCP.")
    enable_additional_node_meta_txt: bool = Field(
        True, json_schema_extra=consul("dns_config.enable_additional_node_meta_txt"),
        description="Add the node's meta as TXT records in the additional section of SRV and "
        "node answers.")
    translate_wan_addrs: bool = Field(
        False, json_schema_extra=consul("translate_wan_addrs"),
        description="Answers about other datacenters use their nodes' and services' `wan` "
        "tagged addresses.")
    soa: SoaSettings = Field(SoaSettings(), json_schema_extra=consul("dns_config.soa"),
                             description="The SOA record of the domain (also in the authority "
                             "section of negative answers).")
    recursors: list[str] = Field(default_factory=list, json_schema_extra=consul("recursors"),
                                 description="`IP` or `IP:port` (port 53 when omitted) of "
                                 "resolvers for names outside the domain, asked in turn; empty: "
                                 "such names are REFUSED.")
    recursor_timeout: Annotated[Duration, AfterValidator(
        at_least(0.001, "a recursor cannot answer in no time"))] = Field(
        2.0, json_schema_extra=consul("dns_config.recursor_timeout"),
        description="How long to wait for each recursor before trying the next.")
    recursor_max_pending: int = Field(
        256, ge=1, le=65536, description="Forwarded queries waiting for a recursor at once "
        "(each holds a socket); past it, SERVFAIL at once.")
    # 1232: the DNS flag day 2020 figure, which avoids IP fragmentation
    max_udp_size: int = Field(
        1232, ge=512, le=65507, description="The largest UDP reply in bytes, whatever size the "
        "client advertises; a larger answer is trimmed and sent with TC (the client retries "
        "over TCP).")
    tcp_max_connections: int = Field(
        1024, ge=1, description="TCP connections at once (lowered at start to leave file "
        "descriptors for reloads, the admin port and forwards); more are closed on accept.")
    tcp_max_connections_per_client: int = Field(
        64, ge=1, description="TCP connections at once from one client address.")
    tcp_idle_timeout: Annotated[Duration, AfterValidator(
        at_least(0.1, "clients need time to send a query"))] = Field(
        10.0, description="A TCP connection without a complete, answerable query for this "
        "long is closed (empty or malformed frames do not count).")

    @field_validator("recursors")
    @classmethod
    def _recursors_are_addresses(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item, 53)
        return value

    @field_validator("service_ttl", mode="before")
    @classmethod
    def _ttls_by_service(cls, value: object) -> object:
        # `service_ttl: 5s` is the natural first guess; pydantic's own word for it is "Input
        # should be a valid dictionary", which does not say what to write instead
        if not isinstance(value, dict):
            raise ValueError(f"expected TTLs by service name, e.g. {{'*': 5s}} for every "
                             f"service or {{'web': 10s, 'db*': 30s}}, got {value!r}")
        return value

    @field_validator("service_ttl")
    @classmethod
    def _wildcards_at_end(cls, value: dict[str, float]) -> dict[str, float]:
        for key in value:
            if "*" in key[:-1]:
                raise ValueError(f"{key!r}: '*' is only allowed at the end (prefix match)")
        return {k.lower(): v for k, v in value.items()}

    def recursor_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(r, 53) for r in self.recursors]


_FOLLOW_NAME = re.compile(r"^(\*|[A-Za-z0-9][A-Za-z0-9_-]{0,62})$")


class ConsulSource(_Model):
    """``catalog.consul``: follow a Consul cluster over its HTTP API (``catalog/consul/``)."""

    address: str = Field(description="`http://host:port`, `https://host:port` or "
                         "`unix:///path/to/consul.sock`: the agent's HTTP API.",
                         json_schema_extra=consul("CONSUL_HTTP_ADDR"))
    token: str | None = Field(None, description="ACL token, sent as `X-Consul-Token` (never in "
                              "the URL).", json_schema_extra=consul("CONSUL_HTTP_TOKEN"))
    token_file: str | None = Field(None, description="Read the token from this file, and again "
                                   "when it changes (a rotated Kubernetes Secret).",
                                   json_schema_extra=consul("CONSUL_HTTP_TOKEN_FILE"))
    ca_file: str | None = Field(None, description="TLS: CA bundle to verify Consul's "
                                "certificate.", json_schema_extra=consul("CONSUL_CACERT"))
    cert_file: str | None = Field(None, description="TLS client certificate (mTLS), with "
                                  "`key_file`.", json_schema_extra=consul("CONSUL_CLIENT_CERT"))
    key_file: str | None = Field(None, description="TLS client key (mTLS), with `cert_file`.",
                                 json_schema_extra=consul("CONSUL_CLIENT_KEY"))
    tls_server_name: str | None = Field(None, description="SNI and name to verify, when it "
                                        "differs from the address.",
                                        json_schema_extra=consul("CONSUL_TLS_SERVER_NAME"))
    datacenter: str | None = Field(None, description="The local datacenter; default: what the "
                                   "agent says it is.", json_schema_extra=consul("datacenter"))
    partitions: list[str] = Field(default_factory=lambda: ["default"], description="Admin "
                                  "partitions to follow; `*`: every one the token can list.",
                                  json_schema_extra=consul("admin partitions"))
    namespaces: list[str] = Field(default_factory=lambda: ["default"], description="Namespaces "
                                  "in each partition; `*`: all.",
                                  json_schema_extra=consul("namespaces"))
    peers: list[str] = Field(default_factory=lambda: ["*"], description="Cluster peers whose "
                             "imported services to follow; `[]`: none.",
                             json_schema_extra=consul("cluster peering"))
    datacenters: list[str] = Field(default_factory=lambda: ["*"], description="WAN-federated "
                                   "datacenters to follow; `[]`: only the local one. Their "
                                   "`default` partition only: Consul supports no other "
                                   "partition across WAN federation (use cluster peering).",
                                   json_schema_extra=consul("WAN federation"))
    stale: bool = Field(True, description="`?stale` reads (any server answers), as Consul's "
                        "DNS does.", json_schema_extra=consul("dns_config.allow_stale"))
    max_stale: Duration | None = Field(None, description="After Consul has been unreachable "
                                       "this long, answer SERVFAIL; null: serve the last data "
                                       "however old (as Consul).",
                                       json_schema_extra=consul("dns_config.max_stale"))
    wait: Duration = Field(300.0, description="Blocking-query wait (1s to 10m).",
                           json_schema_extra=consul("?wait"))
    max_requests: int = Field(64, ge=1, le=1024, description="Concurrent HTTP requests to "
                              "Consul, whatever the catalog size.")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        value = value.strip()
        if value.startswith("unix://"):
            if not value[len("unix://"):].startswith("/"):
                raise ValueError("unix:// needs an absolute socket path: unix:///path/consul.sock")
            return value
        match = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:\d{1,5})?/?", value)
        if not match:
            raise ValueError(f"{value!r}: expected http://host:port, https://host:port or "
                             "unix:///path/to/consul.sock")
        if match.group(3) and int(match.group(3)[1:]) > 65535:
            raise ValueError(f"{value!r}: port must be 0-65535")
        return value.rstrip("/")

    @field_validator("partitions", "namespaces", "peers", "datacenters")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _FOLLOW_NAME.match(name):
                raise ValueError(f"{name!r}: expected a name or '*'")
        return [name.lower() for name in value]

    @field_validator("datacenter")
    @classmethod
    def _dc(cls, value: str | None) -> str | None:
        if value is not None and (value == "*" or not _FOLLOW_NAME.match(value)):
            raise ValueError(f"{value!r}: expected a datacenter name")
        return value.lower() if value else value

    @field_validator("wait")
    @classmethod
    def _wait(cls, value: float) -> float:
        if not 1.0 <= value <= 600.0:
            raise ValueError("must be between 1s and 10m (Consul caps blocking waits at 10m)")
        return value

    @field_validator("tls_server_name")
    @classmethod
    def _sni(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,253}", value):
            raise ValueError(f"{value!r} is not a host name")
        return value

    @model_validator(mode="after")
    def _credentials(self) -> ConsulSource:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mTLS)")
        if self.address.startswith("unix://") and (self.ca_file or self.cert_file):
            raise ValueError("TLS files are for https:// addresses, not unix://")
        return self

    @property
    def tls(self) -> bool:
        return self.address.startswith("https://")


class CatalogSettings(_Model):
    file: str | None = Field(None, description="The catalog file (YAML, or JSON for large "
                             "catalogs), relative to this config file; reloaded when it changes "
                             "and on SIGHUP. A config must name a catalog (or `consul`).")
    consul: ConsulSource | None = Field(None, description="Follow a Consul cluster instead of a "
                                        "file.")
    poll_interval: Annotated[Duration, AfterValidator(
        at_least(0.005, "a shorter interval polls the file in a busy loop"))] = Field(
        0.025, description="How often the catalog file is checked for a change (at least 5ms). "
        "Where inotify is available (Linux), a quiet file is checked when its folder sees "
        "an event, and at least every second.")
    # Loading costs ~20x the file's size in memory as JSON, ~100x as YAML (measured): the
    # default keeps a reload inside the shipped 256 MiB pod, and holds any ConfigMap (1 MiB).
    max_size: ByteSize = Field(2 * 1024**2, ge=1, description="A larger catalog file is "
                               "refused unread (bytes, or `2MiB`, `1GB`, ...). Loading takes "
                               "~20x the file's size in memory as JSON, ~100x as YAML: raise it "
                               "with the memory limit, and use JSON for large catalogs.")
    max_parse_time: Duration = Field(60.0, gt=0, description="A reload still parsing after "
                                     "this long is abandoned (the last good catalog stays).")
    max_drop: float = Field(0.5, ge=0.0, le=1.0, description="A reload that would remove more "
                            "than this share of the instances is refused; 1.0: off.")

    @model_validator(mode="after")
    def _one_source(self) -> CatalogSettings:
        if self.file is not None and self.consul is not None:
            raise ValueError("catalog: set either file or consul, not both")
        return self


class AdminSettings(_Model):
    listen: str | None = Field("127.0.0.1:8601", json_schema_extra=consul("addresses.http"),
                               description="`HOST:PORT` of the admin HTTP endpoint (`/health`, "
                               "`/ready`, `/metrics`, `/v1/catalog`); null turns it off.")
    # Off by default: every replica reads the same ConfigMap, so a bad edit would take them all
    # out of the Service at once, while each still serves its last good catalog.
    ready_max_reload_failure: Duration | None = Field(
        None, description="`/ready` answers 503 once catalog reloads have failed for this long; "
        "null: never.")
    max_connections: int = Field(
        64, ge=1, le=4096, description="Admin HTTP connections at once; more are closed on "
        "accept.")
    idle_timeout: Annotated[Duration, AfterValidator(
        at_least(0.1, "clients need time to send a request"))] = Field(
        5.0, description="How long an admin connection may take to send a request's headers, "
        "or stay idle between keep-alive requests.")

    @field_validator("listen")
    @classmethod
    def _valid(cls, value: str | None) -> str | None:
        if value:
            parse_hostport(value, 8601)
        return value


class CacheSettings(_Model):
    enabled: bool = Field(True, description="Cache replies on the packet path (what a "
                          "new catalog changes is dropped when it is swapped in).")
    size: int = Field(100_000, ge=1, description="Cached replies, per transport.")
    # two of these fit a 256 MiB pod next to a large catalog
    max_bytes: ByteSize = Field(
        32 * 1024**2, ge=64 * 1024, description="Bytes of cached replies per transport (keys, "
        "replies and their bookkeeping counted; bytes, or `32MiB`, `512KiB`, ...). Queries "
        "with padding, cookies or other records are answered but not cached.")


class Config(_Model):
    domain: str = Field("consul", json_schema_extra=consul("domain"),
                        description="The DNS domain answered.")
    alt_domain: str | None = Field(None, json_schema_extra=consul("alt_domain"),
                                   description="A second domain answered exactly like `domain` "
                                   "(e.g. `mesh.internal`).")
    datacenter: str = Field("dc1", json_schema_extra=consul("datacenter"),
                            description="The local datacenter: names without a datacenter mean "
                            "this one.")
    partition: str = Field("default", json_schema_extra=consul("partition"),
                           description="The local admin partition.")
    listen: list[str] = Field(default_factory=lambda: ["127.0.0.1:8600"], min_length=1,
                              json_schema_extra=consul("addresses.dns, ports.dns"),
                              description="`HOST:PORT` addresses, each served over UDP and TCP; "
                              "port 0 picks a free port (the bound one is logged).")
    advertise: str | None = Field(None, json_schema_extra=consul("advertise_addr"),
                                  description="Address of `ns.<domain>` (the NS glue); default: "
                                  "the first listen address.")
    catalog: CatalogSettings = Field(CatalogSettings(),
                                     description="Where the catalog comes from.")
    virtual_ip_range: str = Field("240.0.0.0/4", json_schema_extra=consul("virtual IPs "
                                  "(240.0.0.0/4)"),
                                  description="IPv4 network where virtual IPs without a fixed "
                                  "address are allocated.")
    dns: DnsSettings = Field(DnsSettings(), json_schema_extra=consul("dns_config"),
                             description="How answers are built.")
    admin: AdminSettings = Field(AdminSettings(), description="The admin HTTP endpoint.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", json_schema_extra=consul("log_level"),
        description="JSON log lines on stderr at this level and above.")
    workers: int = Field(1, ge=1, le=64, description="Processes serving the same port "
                         "(SO_REUSEPORT); the first supervises the others.")
    cache: CacheSettings = Field(CacheSettings(), description="The response cache.")
    # Where relative paths in this config are resolved from (the config file's folder).
    base_dir: str = Field(".", exclude=True)

    @field_validator("domain", "alt_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().strip(".").lower()
        if not value or any(not 0 < len(label) < 64 for label in value.split(".")):
            raise ValueError("must be a DNS name such as 'consul'")
        return value

    @field_validator("datacenter", "partition")
    @classmethod
    def _label(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}", value):
            raise ValueError("must be a single DNS label")
        return value.lower()

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: list[str]) -> list[str]:
        for item in value:
            parse_hostport(item, 8600)
        return value

    @field_validator("advertise")
    @classmethod
    def _advertise(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{value!r} is not an IP address") from None
        return value

    @field_validator("virtual_ip_range")
    @classmethod
    def _range(cls, value: str) -> str:
        try:
            net = ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if net.version != 4 or net.num_addresses < 4:
            raise ValueError("must be an IPv4 network with room for addresses, e.g. 240.0.0.0/4")
        return str(net)

    @field_validator("alt_domain")  # a field validator, so the error names alt_domain's line
    @classmethod
    def _alt_differs(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and value == info.data.get("domain"):
            raise ValueError("alt_domain must differ from domain")
        return value

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(item, 8600) for item in self.listen]

    def config_path(self, value: str) -> Path:
        """A path from this config, relative to the config file's folder."""
        path = Path(value)
        return path if path.is_absolute() else Path(self.base_dir) / path

    def catalog_path(self) -> Path | None:
        if self.catalog.file is None:
            return None
        path = Path(self.catalog.file)
        return path if path.is_absolute() else Path(self.base_dir) / path


def load_config(path: Path | None) -> Config:
    """Read and validate a config file (``None``: all defaults)."""
    if path is None:
        return Config()
    doc = read_document(path)
    if doc.data is not None and not isinstance(doc.data, dict):
        raise ConfigError([f"{doc.where(())}: expected a mapping of settings"])
    data = dict(doc.data or {})
    data["base_dir"] = str(path.parent)
    return validate(doc.__class__(doc.file, data, doc.line_of), Config)
