"""One synthetic Consul zone, rendered for every server under test, plus the query files.

The same `Zone` value produces the meshdns catalog (JSON), the dnsmasq config, the unbound config
and the dnslib baseline's record file, so every server answers the same names with the same
records. Records follow meshdns's answers for the catalog: a service instance with its own
address is the SRV target `<hex-ip>.addr.dc1.consul`, whose A record goes in the additional
section.
"""

from __future__ import annotations

import ipaddress
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

DOMAIN = "consul"
DC = "dc1"

NODE_NET = int(ipaddress.IPv4Address("10.1.0.1"))
SVC_NET = int(ipaddress.IPv4Address("10.2.0.0"))
BIG_NET = int(ipaddress.IPv4Address("10.64.0.0"))
COLD_NET = int(ipaddress.IPv4Address("10.128.0.0"))
VIP_NET = int(ipaddress.IPv4Address("240.0.1.0"))


def ip(n: int) -> str:
    return str(ipaddress.IPv4Address(n))


def addr_target(address: str) -> str:
    """Consul's SRV target for an instance with its own IPv4 address."""
    return f"{int(ipaddress.IPv4Address(address)):08x}.addr.{DC}.{DOMAIN}"


@dataclass(frozen=True)
class Sizes:
    services: int = 400  # svc-N, `instances` each
    instances: int = 2
    nodes: int = 300  # node-N
    virtual: int = 300  # svc-N.virtual for N < virtual (fixed virtual IPs)
    big_services: int = 50  # big-N, `big_instances` each: the large-SRV workload
    big_instances: int = 20
    cold: int = 0  # cold-N, one instance each: the every-query-different workload


@dataclass
class Zone:
    sizes: Sizes
    a: dict[str, list[str]] = field(default_factory=dict)
    srv: dict[str, list[tuple[int, int, int, str]]] = field(default_factory=dict)
    catalog: dict[str, list[dict[str, object]]] = field(default_factory=dict)

    def add_a(self, name: str, address: str) -> None:
        self.a.setdefault(name, []).append(address)


def build_zone(sizes: Sizes) -> Zone:
    zone = Zone(sizes=sizes)
    nodes: list[dict[str, object]] = []
    services: list[dict[str, object]] = []
    vips: list[dict[str, object]] = []

    for i in range(sizes.nodes):
        address = ip(NODE_NET + i)
        nodes.append({"name": f"node-{i}", "address": address, "datacenter": DC})
        zone.add_a(f"node-{i}.node.{DOMAIN}", address)

    def add_service(name: str, count: int, net: int, first: int) -> None:
        for k in range(count):
            address = ip(net + first + k)
            node = f"node-{(first + k) % sizes.nodes}"
            port = 8000 + k
            services.append(
                {"name": name, "id": f"{name}-{k}", "node": node, "address": address, "port": port}
            )
            zone.add_a(f"{name}.service.{DOMAIN}", address)
            target = addr_target(address)
            zone.srv.setdefault(f"_{name}._tcp.service.{DOMAIN}", []).append((1, 1, port, target))
            zone.add_a(target, address)

    for n in range(sizes.services):
        add_service(f"svc-{n}", sizes.instances, SVC_NET, n * sizes.instances)
    for n in range(sizes.big_services):
        add_service(f"big-{n}", sizes.big_instances, BIG_NET, n * sizes.big_instances)
    for n in range(sizes.cold):
        add_service(f"cold-{n}", 1, COLD_NET, n)

    for n in range(min(sizes.virtual, sizes.services)):
        vip = ip(VIP_NET + n)
        vips.append({"service": f"svc-{n}", "ip": vip})
        zone.add_a(f"svc-{n}.virtual.{DOMAIN}", vip)

    zone.catalog = {"nodes": nodes, "services": services, "virtual_ips": vips}
    return zone


# --- renderings -------------------------------------------------------------------------------


def write_meshdns_catalog(zone: Zone, path: Path) -> None:
    path.write_text(json.dumps(zone.catalog, separators=(",", ":")))


def write_dnsmasq_conf(zone: Zone, path: Path) -> None:
    """Records only; the listening options go on the command line (they carry the port)."""
    lines = []
    for name, addresses in zone.a.items():
        lines.extend(f"host-record={name},{address}" for address in addresses)
    for name, records in zone.srv.items():
        lines.extend(
            f"srv-host={name},{target},{port},{prio},{weight}"
            for prio, weight, port, target in records
        )
    path.write_text("\n".join(lines) + "\n")


def write_unbound_records(zone: Zone, path: Path) -> None:
    """`local-data:` lines for an `include:` inside the server clause; TTL 0 as meshdns."""
    lines = [
        f'local-zone: "{DOMAIN}." static',
        f'local-data: "{DOMAIN}. 0 IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 0"',
        f'local-data: "{DOMAIN}. 0 IN NS ns.{DOMAIN}."',
    ]
    for name, addresses in zone.a.items():
        lines.extend(f'local-data: "{name}. 0 IN A {address}"' for address in addresses)
    for name, records in zone.srv.items():
        lines.extend(
            f'local-data: "{name}. 0 IN SRV {prio} {weight} {port} {target}."'
            for prio, weight, port, target in records
        )
    path.write_text("\n".join(lines) + "\n")


def write_nsd_zone(zone: Zone, path: Path) -> None:
    """The same records as a zone file for NSD (authoritative only, as meshdns): TTL 0."""
    lines = [
        f"$ORIGIN {DOMAIN}.",
        "$TTL 0",
        f"@ IN SOA ns.{DOMAIN}. hostmaster.{DOMAIN}. 1 3600 600 86400 0",
        f"@ IN NS ns.{DOMAIN}.",
        "ns IN A 127.0.0.1",
    ]
    for name, addresses in zone.a.items():
        lines.extend(f"{name}. IN A {address}" for address in addresses)
    for name, records in zone.srv.items():
        lines.extend(
            f"{name}. IN SRV {prio} {weight} {port} {target}."
            for prio, weight, port, target in records
        )
    path.write_text("\n".join(lines) + "\n")


def write_dnslib_records(zone: Zone, path: Path) -> None:
    path.write_text(json.dumps({"A": zone.a, "SRV": zone.srv}, separators=(",", ":")))


# --- query files --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """A question with the answer every server must give (checked before measuring)."""

    name: str
    qtype: str
    rcode: str
    min_answers: int


def hot_queries(sizes: Sizes, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """40% service A, 15% SRV, 20% virtual A, 20% node A, 5% NXDOMAIN, uniform over names."""
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.40:
            out.append((f"svc-{rng.randrange(sizes.services)}.service.{DOMAIN}", "A"))
        elif r < 0.55:
            out.append((f"_svc-{rng.randrange(sizes.services)}._tcp.service.{DOMAIN}", "SRV"))
        elif r < 0.75:
            out.append((f"svc-{rng.randrange(sizes.virtual)}.virtual.{DOMAIN}", "A"))
        elif r < 0.95:
            out.append((f"node-{rng.randrange(sizes.nodes)}.node.{DOMAIN}", "A"))
        else:
            out.append((f"missing-{rng.randrange(100_000)}.service.{DOMAIN}", "A"))
    return out


def cold_queries(sizes: Sizes, rng: random.Random) -> list[tuple[str, str]]:
    order = list(range(sizes.cold))
    rng.shuffle(order)
    return [(f"cold-{n}.service.{DOMAIN}", "A") for n in order]


def large_queries(sizes: Sizes, count: int, rng: random.Random) -> list[tuple[str, str]]:
    return [
        (f"_big-{rng.randrange(sizes.big_services)}._tcp.service.{DOMAIN}", "SRV")
        for _ in range(count)
    ]


A_ONLY = Sizes(services=0, nodes=1000, virtual=0, big_services=0)


def a_only_queries(sizes: Sizes, count: int, rng: random.Random) -> list[tuple[str, str]]:
    """The brief's reference mix: 1,000 A names (nodes here) and 5% NXDOMAIN."""
    return [(f"node-{rng.randrange(sizes.nodes)}.node.{DOMAIN}", "A") if rng.random() < 0.95
            else (f"missing-{rng.randrange(100_000)}.node.{DOMAIN}", "A") for _ in range(count)]


def probes(sizes: Sizes) -> list[Probe]:
    """Answers every server must give, asked with EDNS 4096 so no trimming gets in the way."""
    if sizes == A_ONLY:
        return [Probe(f"node-3.node.{DOMAIN}", "A", "NOERROR", 1),
                Probe(f"missing-4.node.{DOMAIN}", "A", "NXDOMAIN", 0)]
    out = [
        Probe(f"svc-0.service.{DOMAIN}", "A", "NOERROR", sizes.instances),
        Probe(f"svc-{sizes.services - 1}.service.{DOMAIN}", "A", "NOERROR", sizes.instances),
        Probe(f"_svc-1._tcp.service.{DOMAIN}", "SRV", "NOERROR", sizes.instances),
        Probe(f"svc-2.virtual.{DOMAIN}", "A", "NOERROR", 1),
        Probe(f"node-3.node.{DOMAIN}", "A", "NOERROR", 1),
        Probe(f"missing-4.service.{DOMAIN}", "A", "NXDOMAIN", 0),
        # meshdns's replies stop at dns.max_udp_size (1232 bytes by default): 19 of the 20
        # SRV records with their addresses fit, as many as Consul's trimming keeps
        Probe(f"_big-0._tcp.service.{DOMAIN}", "SRV", "NOERROR", min(sizes.big_instances, 15)),
    ]
    if sizes.cold:
        out.append(Probe(f"cold-{sizes.cold - 1}.service.{DOMAIN}", "A", "NOERROR", 1))
    return out


def write_queries(queries: list[tuple[str, str]], path: Path) -> None:
    path.write_text("".join(f"{name} {qtype}\n" for name, qtype in queries))


def read_queries(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and not line.startswith("#"):
            out.append((parts[0], parts[1]))
    return out
