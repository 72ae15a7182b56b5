"""``meshdns check`` in Consul mode: connect, say what the token can see and what it cannot.

Reads (once, without blocking) every endpoint the source follows, prints what it found
(datacenters, partitions, namespaces, peers, service and node counts per scope) and the ACL
permissions that are missing. Fails (exit 1) when Consul cannot be reached or when the token
cannot read what answering DNS needs (services, their health, nodes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...config import Config
from . import mapping
from .client import ConsulClient, ConsulError, permission_for
from .mapping import NOT_PASSING, Malformed, Scope


class _Report:
    def __init__(self, out: Callable[[str], None]) -> None:
        self.out = out
        self.missing: dict[str, str] = {}  # permission -> the endpoint that needed it
        self.filtered: dict[str, str] = {}  # endpoint -> permission: results hidden by ACLs
        self.failed = False

    def denied(self, exc: ConsulError, required: bool) -> None:
        self.missing.setdefault(permission_for(exc.endpoint), exc.endpoint)
        if required:
            self.failed = True


async def _read(client: ConsulClient, report: _Report, path: str, params: dict[str, str],
                read: Callable[[Any], Any], *, required: bool, fallback: Any = None) -> Any:
    """One read; 404 is "not on this Consul" (CE), 403 a missing permission."""
    try:
        reply = await client.get(path, params)
        if reply.filtered:  # Consul hides what the token may not read instead of a 403
            report.filtered.setdefault(path.rsplit("/", 1)[0] if path.startswith(
                "/v1/health/service/") else path, permission_for(path))
        return read(reply.body)
    except ConsulError as exc:
        if exc.status == 403:
            report.denied(exc, required)
            report.out(f"  {path}{_show(params)}: permission denied (needs "
                       f"{permission_for(path)})")
        elif exc.status in (400, 404) and not required:
            return fallback
        else:
            report.out(f"  {exc}")
            report.failed = True
            if exc.unreachable:
                raise
        return fallback
    except Malformed as exc:
        report.out(f"  {path}: malformed reply: {exc}")
        report.failed = True
        return fallback


def _show(params: dict[str, str]) -> str:
    return ("?" + "&".join(f"{k}={v}" for k, v in params.items())) if params else ""


async def check_consul(config: Config, out: Callable[[str], None] = print) -> int:
    """Print what ``catalog.consul`` can see; 0 when meshdns can serve from it, else 1."""
    settings = config.catalog.consul
    assert settings is not None
    report = _Report(out)
    client = ConsulClient(settings, config.base_dir)
    out(f"consul: {settings.address}")
    try:
        agent = await _read(client, report, "/v1/agent/self", {},
                            lambda b: (b or {}).get("Config", {}), required=False,
                            fallback={})
        local = (settings.datacenter or agent.get("Datacenter") or config.datacenter).lower()
        version = agent.get("Version")
        out(f"  agent: datacenter {local}" + (f", Consul {version}" if version else ""))
        if local != config.datacenter:
            out(f"  warning: the config's datacenter is {config.datacenter}, Consul's {local}")
        dcs = await _read(client, report, "/v1/catalog/datacenters", {}, mapping.datacenters,
                          required=False, fallback=[local])
        followed = [local] + [d for d in dcs if d != local and
                              ("*" in settings.datacenters or d in settings.datacenters)]
        out(f"  datacenters: {', '.join(dcs) or '(none)'} (following {', '.join(followed)})")
        if settings.partitions == ["*"]:
            partitions = await _read(client, report, "/v1/partitions", {}, mapping.partitions,
                                     required=False, fallback=None)
            if partitions is None:
                out("  partitions: none listed (Consul CE, or no operator:read): default")
                partitions = ["default"]
            else:
                out(f"  partitions: {', '.join(partitions)}")
        else:
            partitions = list(settings.partitions)
            out(f"  partitions: {', '.join(partitions)} (from the config)")
        scopes: list[Scope] = []
        for p in partitions:
            pp = {"partition": p} if p != "default" else {}
            if "*" in settings.namespaces:
                namespaces = await _read(client, report, "/v1/namespaces", pp,
                                         mapping.namespaces, required=False,
                                         fallback=["default"]) or ["default"]
            else:
                namespaces = list(settings.namespaces)
            if "*" in settings.peers:
                peers = await _read(client, report, "/v1/peerings", pp, mapping.peerings,
                                    required=False, fallback=[])
            else:
                peers = list(settings.peers)
            out(f"  partition {p}: namespaces {', '.join(namespaces)}; peers "
                f"{', '.join(peers) or '(none)'}")
            for ns in namespaces:
                scopes.append(Scope("", local, p, ns))
                scopes += [Scope(peer, "", p, ns) for peer in peers]
            for dc in followed[1:]:
                if p == "default":
                    scopes += [Scope("", dc, "default", ns) for ns in namespaces]
        total = 0
        for scope in scopes:
            params = scope.params(local)
            names = await _read(client, report, "/v1/catalog/services", params,
                                mapping.service_names, required=True, fallback=None)
            # the request the health watch makes, so a Consul that rejects it shows here
            checks = await _read(client, report, "/v1/health/state/any",
                                 {**params, "filter": NOT_PASSING}, lambda b: b,
                                 required=True, fallback=None)
            if names is None:
                continue
            total += len(names)
            line = f"  {scope.describe()}: {len(names)} services"
            if checks is not None:
                line += f", {len(checks or [])} checks not passing"
            if not scope.peer and scope.namespace == "default":
                nodes = await _read(client, report, "/v1/catalog/nodes",
                                    Scope("", scope.datacenter, scope.partition,
                                          "default").params(local), lambda b: b or [],
                                    required=True, fallback=None)
                if nodes is not None:
                    line += f", {len(nodes)} nodes"
            out(line)
            if names:  # one service's health, as the fetchers read it
                name = sorted(names)[0]
                await _read(client, report, f"/v1/health/service/{name}", params,
                            lambda b: b, required=True)
        for p in partitions:
            pp = {"partition": p} if p != "default" else {}
            await _read(client, report, "/v1/config/service-resolver", pp, lambda b: b,
                        required=False)
            await _read(client, report, "/v1/config/sameness-group", pp, lambda b: b,
                        required=False)
        out(f"  {total} services in {len(scopes)} scopes")
    except ConsulError:
        out("consul: unreachable: meshdns would answer SERVFAIL until it is")
        return 1
    finally:
        await client.close()
    for endpoint, permission in sorted(report.filtered.items()):
        report.missing.setdefault(f"{permission} (some results hidden)", endpoint)
    if report.missing:
        out("missing permissions:")
        for permission, endpoint in sorted(report.missing.items()):
            out(f"  {permission} (for {endpoint})")
    if report.failed:
        out("consul: FAILED: meshdns cannot serve from this Consul with this token")
        return 1
    out("consul: ok" + (" (some names will not resolve: see the missing permissions)"
                        if report.missing else ""))
    return 0


__all__ = ["check_consul"]
