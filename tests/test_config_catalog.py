"""Loading the catalog (YAML and JSON) and the server config, and ``meshdns check``.

Every bad file asserts the exact ``file:line: field: reason`` lines. The files are written with
the first line of each text block as line 1, so the line numbers can be read off the source.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from meshdns.catalog.file import example_catalog_path, load_snapshot
from meshdns.catalog.model import Catalog, Node, Service
from meshdns.catalog.snapshot import Snapshot, build_snapshot
from meshdns.cli import main
from meshdns.config import (
    DURATION_HINT,
    Config,
    DnsSettings,
    load_config,
    parse_duration,
    parse_hostport,
)
from meshdns.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "meshdns" / "examples" / "catalog.yaml"


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def load(path: Path, yielding: bool = False) -> Snapshot:
    return load_snapshot(path, local_datacenter="dc1", vip_range="240.0.0.0/4",
                         yielding=yielding)


def problems(path: Path, yielding: bool = False) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load(path, yielding)
    assert str(exc.value) == "\n".join(exc.value.problems)
    return exc.value.problems


# --- good catalogs ---------------------------------------------------------------------------

GOOD = {
    "nodes": [
        {"name": "n1", "address": "10.0.0.1", "meta": {"rack": "r1", "version": 2}},
        {"name": "n2", "address": "2001:DB8::2", "datacenter": "dc2"},
        {"name": "c1", "address": "Host.Example.COM.", "peer": "cluster-02"},
    ],
    "services": [
        {"name": "web", "node": "n1", "port": 8080, "tags": ["v1", 2],
         "meta": {"version": 1.5, "canary": True}},
        {"name": "web", "id": "web-2", "node": "n2", "port": 8080},
        {"name": "api", "node": "c1", "port": 9090},
    ],
    "virtual_ips": [{"service": "web", "ip": "240.0.0.10"}],
    "prepared_queries": [{"name": "web-q", "service": "web", "ttl": "10s"}],
}
GOOD_YAML = """\
nodes:
  - {name: n1, address: 10.0.0.1, meta: {rack: r1, version: 2}}
  - {name: n2, address: "2001:DB8::2", datacenter: dc2}
  - {name: c1, address: Host.Example.COM., peer: cluster-02}
services:
  - {name: web, node: n1, port: 8080, tags: [v1, 2], meta: {version: 1.5, canary: true}}
  - {name: web, id: web-2, node: n2, port: 8080}
  - {name: api, node: c1, port: 9090}
virtual_ips:
  - {service: web, ip: 240.0.0.10}
prepared_queries:
  - {name: web-q, service: web, ttl: 10s}
"""


def check_good(snap: Snapshot) -> None:
    assert dict(snap.counts) == {"nodes": 3, "instances": 3, "services": 3, "virtual_ips": 2,
                                 "prepared_queries": 1}
    assert snap.datacenters == {"dc1", "dc2"}
    assert snap.peers == {"cluster-02"}
    assert snap.partitions == {"default"}
    n1 = snap.node("", "dc1", "default", "n1")
    assert n1 is not None and dict(n1.meta) == {"rack": "r1", "version": "2"}
    assert snap.node("", "dc2", "default", "n2").address == "2001:db8::2"  # type: ignore
    assert snap.node("cluster-02", "", "default", "c1").address == "host.example.com"  # type: ignore
    (web,) = snap.services[("", "dc1", "default", "default", "web")].usable
    assert (web.id, web.address, web.own_address, web.port, web.tags) == (
        "web", "10.0.0.1", False, 8080, frozenset({"v1", "2"}))
    assert snap.vips[("", "default", "default", "web")] == "240.0.0.10"
    assert snap.prepared_queries["web-q"].ttl == 10.0


def test_good_yaml_catalog(tmp_path: Path) -> None:
    check_good(load(write(tmp_path / "catalog.yaml", GOOD_YAML)))


@pytest.mark.parametrize("yielding", [False, True])
def test_good_json_catalog(tmp_path: Path, yielding: bool) -> None:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps(GOOD, indent=2))
    check_good(load(path, yielding))


def test_good_catalog_in_code() -> None:
    catalog = Catalog.model_validate(GOOD)
    check_good(build_snapshot(catalog, local_datacenter="dc1"))


def test_empty_catalog(tmp_path: Path) -> None:
    # an empty or comments-only document is a mistake (a templater that wrote nothing)...
    for name, text in (("empty.yaml", ""), ("comments.yaml", "# nothing yet\n")):
        with pytest.raises(ConfigError, match=r"empty\.yaml:1: \(top level\): the document "
                           r"is empty|comments\.yaml:1: \(top level\): the document is empty"):
            load(write(tmp_path / name, text))
    # ...an explicitly empty catalog is not
    snap = load(write(tmp_path / "none.yaml", "nodes: []\n"))
    assert dict(snap.counts) == {"nodes": 0, "instances": 0, "services": 0, "virtual_ips": 0,
                                 "prepared_queries": 0}


def test_example_catalog() -> None:
    assert example_catalog_path() == EXAMPLE
    snap = load(EXAMPLE)
    assert dict(snap.counts) == {"nodes": 17, "instances": 42, "services": 24, "virtual_ips": 6,
                                 "prepared_queries": 2}
    assert snap.datacenters == {"dc1", "dc2", "dc3"}
    assert snap.partitions == {"default", "part-2"}
    assert snap.peers == {"cluster-02", "cluster-03"}


# --- bad YAML catalogs ---------------------------------------------------------------------

# the valid keys an unknown-field error lists (whatever fields the models have today)
NODE_FIELDS = ", ".join(Node.model_fields)
SERVICE_FIELDS = ", ".join(Service.model_fields)
CATALOG_FIELDS = ", ".join(Catalog.model_fields)
BAD_DURATION = "expected " + DURATION_HINT
DNS_FIELDS = ", ".join(DnsSettings.model_fields)

BAD_YAML = [
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1: x
        """, ["3: (syntax): mapping values are not allowed in this context"], id="syntax"),
    pytest.param("""\
        nodes:
          - name: n1
        \taddress: 10.0.0.1
        """, ["3: (syntax): found a tab character that violates indentation"], id="tab"),
    pytest.param("""\
        nodes:
          - name: "n1
            address: 10.0.0.1
        """, ["2: (syntax): found unexpected end of stream"], id="unclosed-quote"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
          - name: [n2
        """, ["4: (syntax): did not find expected ',' or ']'"], id="unclosed-bracket"),
    pytest.param("""\
        nodes:
          - {name: n1, address: 10.0.0.1}
          - *missing
        """, ["3: (syntax): found undefined alias"], id="alias"),
    pytest.param("""\
        - name: n1
        - name: n2
        """, ["1: (top level): expected a mapping with nodes, services, ..."], id="top-list"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
        services:
          - name: web
            node: n1
            port: eighty
        """, ["7: services[0].port: Input should be a valid integer, unable to parse string as "
              "an integer"], id="wrong-type"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
            health: sick
        """, ["4: nodes[0].health: Input should be 'passing', 'warning', 'critical' or "
              "'maintenance'"], id="wrong-enum"),
    pytest.param("""\
        nodes:
          name: n1
        """, ["1: nodes: Input should be a valid list"], id="not-a-list"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
            colour: red
        """, ["4: nodes[0].colour: unknown field 'colour' (valid here: " + NODE_FIELDS + ")"],
        id="unknown-node-field"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
        services:
          - {name: web, node: n1}
          - name: api
            node: n1
            colour: red
        """, ["8: services[1].colour: unknown field 'colour' (valid here: " + SERVICE_FIELDS + ")"],
        id="unknown-service-field"),
    pytest.param("""\
        nodes: []
        servics: []
        """, ["2: servics: unknown field 'servics'; did you mean 'services'? (valid here: "
              + CATALOG_FIELDS + ")"],
        id="unknown-top-field"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
          - name: n2
            datacenter: dc2
        """, ["4: nodes[1].address: Field required"], id="missing-node-address"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
        services:
          - name: web
            node: n1
          - name: api
            port: 80
        """, ["7: services[1].node: Field required"], id="missing-service-node"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.300
          - name: n2
            address: 10.0.0.1/24
          - name: n3
            address: 10.0.0.3
            tagged_addresses:
              wan: 198.51.100.300
        """, ["3: nodes[0].address: '10.0.0.300' is neither an IP address nor a hostname",
              "5: nodes[1].address: '10.0.0.1/24' is neither an IP address nor a hostname",
              "9: nodes[2].tagged_addresses.wan: '198.51.100.300' is neither an IP address nor "
              "a hostname"], id="bad-ip"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
        services:
          - name: web
            node: n1
            address: 10.0.1.256
        """, ["7: services[0].address: '10.0.1.256' is neither an IP address nor a hostname"],
        id="bad-service-ip"),
    pytest.param("""\
        virtual_ips:
          - service: web
            ip: 240.0.0.256
        """, ["3: virtual_ips[0].ip: '240.0.0.256' is not an IPv4 address"], id="bad-virtual-ip"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
        services:
          - name: web
            node: ghost
          - name: api
            node: n1
            datacenter: dc2
        """, ["6: services[0].node: no node 'ghost'",
              "8: services[1].node: no node 'n1' in datacenter 'dc2'"], id="missing-node"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
          - name: N1
            address: 10.0.0.2
          - {name: n1, address: 10.0.0.3, datacenter: dc2}
        """, ["4: nodes[1].name: node 'N1' is listed twice in datacenter dc1, partition "
              "default"], id="duplicate-node"),
    pytest.param("""\
        nodes:
          - {name: n1, address: 10.20.0.1, datacenter: dc2}
          - {name: n1, address: 10.102.0.1, peer: cluster-02}
        services:
          - name: web
            node: n1
        """, ["6: services[0].node: node 'n1' is in several places; set datacenter, peer or "
              "partition on the service"], id="ambiguous-node"),
    pytest.param("""\
        nodes:
          - {name: n1, address: 10.0.0.1}
        services:
          - {name: web, node: n1}
          - {name: api, id: web, node: n1}
        """, ["5: services[1].id: service id 'web' is used twice on node 'n1'"],
        id="duplicate-service-id"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
            datacenter: dc2
            peer: cluster-02
        """, ["2: nodes[0]: a node is either imported from a peer or in a datacenter, not "
              "both"], id="peer-and-dc"),
    pytest.param("""\
        nodes:
          - name: n1
            address: 10.0.0.1
        services:
          - name: web proxy
            node: n1
        """, ["5: services[0].name: 'web proxy' cannot be used in a DNS name (letters, digits, "
              "'-', '_' and '.', at most 63 characters)"], id="bad-name"),
    pytest.param("""\
        virtual_ips:
          - {service: a, ip: 240.0.0.10}
          - {service: b, ip: 240.0.0.10}
        """, ["3: virtual_ips[1].ip: 240.0.0.10 is given to two services"], id="vip-twice"),
    pytest.param("""\
        prepared_queries:
          - name: q
            service: web
            ttl: soon
        """, ["4: prepared_queries[0].ttl: " + BAD_DURATION + ", got "
              "'soon'"], id="bad-duration"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_YAML)
def test_bad_yaml_catalog(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path / "catalog.yaml", text)
    assert problems(path) == [f"{path}:{line}" for line in expected]


def test_ambiguous_node_prefers_the_local_datacenter(tmp_path: Path) -> None:
    path = write(tmp_path / "catalog.yaml", """\
        nodes:
          - {name: n1, address: 10.0.0.1}
          - {name: n1, address: 10.20.0.1, datacenter: dc2}
        services:
          - {name: web, node: n1}
          - {name: web, node: n1, datacenter: dc2}
        """)
    snap = load(path)
    assert [i.address for i in snap.services[("", "dc1", "default", "default", "web")].usable
            ] == ["10.0.0.1"]
    assert [i.address for i in snap.services[("", "dc2", "default", "default", "web")].usable
            ] == ["10.20.0.1"]


def test_unreadable_catalog(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    assert problems(path) == [f"{path}:0: (file): cannot read: No such file or directory"]


# --- bad JSON catalogs -----------------------------------------------------------------------

BAD_JSON = [
    pytest.param("""\
        {
          "nodes": [
            {"name": "n1",}
          ]
        }
        """, ["3: (syntax): Expecting property name enclosed in double quotes"], id="syntax"),
    pytest.param("""\
        [
          {"name": "n1"}
        ]
        """, {False: ["1: (top level): expected an object with nodes, services, ..."],
              True: ["1: (top level): expected an object with nodes, services"]}, id="top-list"),
    pytest.param("""\
        {
          "nodes": [
            {"name": "n1", "address": "10.0.0.1"},
            {
              "name": "n2",
              "address": "10.0.0.2",
              "colour": "red"
            }
          ]
        }
        """, ["7: nodes[1].colour: unknown field 'colour' (valid here: " + NODE_FIELDS + ")"],
        id="unknown-field"),
    pytest.param("""\
        {
          "nodes": [
            {"name": "n1", "address": "10.0.0.1"},
            {"name": "n2", "address": "10.0.0.300"},
            {"name": "n3"}
          ]
        }
        """, ["4: nodes[1].address: '10.0.0.300' is neither an IP address nor a hostname",
              "5: nodes[2].address: Field required"], id="bad-ip-and-missing"),
    pytest.param("""\
        {
          "nodes": [{"name": "n1", "address": "10.0.0.1"}],
          "services": [
            {"name": "web", "node": "n1", "port": "eighty"},
            {"name": "api"},
            {
              "name": "db",
              "node": "ghost"
            }
          ]
        }
        """, ["4: services[0].port: Input should be a valid integer, unable to parse string as "
              "an integer",
              "5: services[1].node: Field required",
              "8: services[2].node: no node 'ghost'"], id="services"),
    pytest.param("""\
        {
          "nodes": [
            {"name": "n1", "address": "10.0.0.1"},
            {"name": "n1", "address": "10.0.0.2"},
            {"name": "n3", "address": "10.20.0.3", "datacenter": "dc2"},
            {"name": "n3", "address": "10.30.0.3", "datacenter": "dc3"}
          ],
          "services": [
            {"name": "web", "node": "n3"}
          ]
        }
        """, ["4: nodes[1].name: node 'n1' is listed twice in datacenter dc1, partition default",
              "9: services[0].node: node 'n3' is in several places; set datacenter, peer or "
              "partition on the service"], id="duplicate-and-ambiguous"),
    pytest.param("""\
        {"nodes": [], "services": {"name": "web"}}
        """, {False: ["1: services: Input should be a valid array"],
              True: ["1: services: expected a list of services"]}, id="services-not-a-list"),
]


@pytest.mark.parametrize("yielding", [False, True], ids=["load", "reload"])
@pytest.mark.parametrize(("text", "expected"), BAD_JSON)
def test_bad_json_catalog(tmp_path: Path, text: str,
                          expected: list[str] | dict[bool, list[str]], yielding: bool) -> None:
    """The same lines at start-up and on a reload (which parses step by step)."""
    path = write(tmp_path / "catalog.json", text)
    lines = expected[yielding] if isinstance(expected, dict) else expected
    assert problems(path, yielding) == [f"{path}:{line}" for line in lines]


# --- meshdns check ---------------------------------------------------------------------------


def run_check(*args: str) -> subprocess.CompletedProcess[str]:
    """``meshdns check`` as a user runs it: a new process."""
    return subprocess.run([sys.executable, "-m", "meshdns", "check", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def check_in_process(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``meshdns check`` through ``cli.main`` (no process start-up: the slow part)."""
    code = main(["check", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_example_catalog() -> None:
    done = run_check("--catalog", str(EXAMPLE))
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines() == [
        "config: (defaults): ok (domain consul, datacenter dc1, listen 127.0.0.1:8600)",
        f"catalog: {EXAMPLE}: ok",
        "  17 nodes, 42 service instances of 24 services, 6 virtual IPs, 2 prepared queries",
        "  datacenters: dc1, dc2, dc3",
        "  partitions: default, part-2",
        "  peers: cluster-02, cluster-03",
    ]


def test_check_with_config_and_relative_catalog(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "data").mkdir()
    write(tmp_path / "data" / "catalog.yaml", GOOD_YAML)
    config = write(tmp_path / "config.yaml", """\
        domain: mesh
        datacenter: DC1
        listen: ["127.0.0.1:5353", "[::1]:5353"]
        catalog:
          file: data/catalog.yaml
        """)
    code, out, err = check_in_process(capsys, "--config", str(config))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"config: {config}: ok (domain mesh, datacenter dc1, listen 127.0.0.1:5353, "
        "[::1]:5353)",
        f"catalog: {tmp_path / 'data' / 'catalog.yaml'}: ok",
        "  3 nodes, 3 service instances of 3 services, 2 virtual IPs, 1 prepared queries",
        "  datacenters: dc1, dc2",
        "  partitions: default",
        "  peers: cluster-02",
    ]


def test_check_bad_catalog(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", """\
        nodes:
          - name: n1
            address: 10.0.0.1
          - name: n1
            address: 10.0.0.2
        services:
          - name: web
            node: ghost
        """)
    done = run_check("--catalog", str(path))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [
        f"{path}:4: nodes[1].name: node 'n1' is listed twice in datacenter dc1, partition "
        "default",
        f"{path}:8: services[0].node: no node 'ghost'",
    ]


def test_check_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write(tmp_path / "config.yaml", """\
        domain: consul
        listen: ["localhost:53"]
        dns:
          node_ttl: 10 parsecs
        """)
    code, out, err = check_in_process(capsys, "--config", str(config))
    assert (code, out) == (1, "")
    assert err.splitlines() == [
        f"{config}:2: listen: 'localhost:53': 'localhost' is not an IP address",
        f"{config}:4: dns.node_ttl: {BAD_DURATION}, got '10 parsecs'",
    ]


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("10s", 10.0), ("500ms", 0.5), ("1m", 60.0), ("1h", 3600.0), ("2.5s", 2.5),
     ("1.5m", 90.0), (" 10 s ", 10.0), ("7", 7.0), (3, 3.0), (0.25, 0.25), ("0", 0.0)],
)
def test_parse_duration(value: Any, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("10x", BAD_DURATION + ", got '10x'"),
        ("-1s", BAD_DURATION + ", got '-1s'"),
        ("", BAD_DURATION + ", got ''"),
        ("1d", BAD_DURATION + ", got '1d'"),
        (None, BAD_DURATION + ", got None"),
        (True, BAD_DURATION),
        (-1, "a duration cannot be negative"),
    ],
)
def test_parse_duration_rejects(value: Any, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_duration(value)
    assert str(exc.value) == message


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:8600", ("127.0.0.1", 8600)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("10.0.0.1", ("10.0.0.1", 53)),
        (" 10.0.0.1:5353 ", ("10.0.0.1", 5353)),
        ("[::1]:53", ("::1", 53)),
        ("[::]:8600", ("::", 8600)),
        ("[::1]", ("::1", 53)),
        ("::1", ("::1", 53)),
        ("2001:db8::1", ("2001:db8::1", 53)),
    ],
)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value, 53) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("localhost:53", "'localhost:53': 'localhost' is not an IP address"),
        ("10.0.0.300:53", "'10.0.0.300:53': '10.0.0.300' is not an IP address"),
        ("10.0.0.1:70000", "'10.0.0.1:70000': port must be 0-65535"),
        ("10.0.0.1:x", "'10.0.0.1:x': port must be 0-65535"),
        ("10.0.0.1:-1", "'10.0.0.1:-1': port must be 0-65535"),
        ("[::1]53", "'[::1]53': expected [IPv6 address]:port"),
        ("[::1:53", "'[::1:53': expected [IPv6 address]:port"),
        ("[localhost]:53", "'[localhost]:53': 'localhost' is not an IP address"),
        ("", "'': '' is not an IP address"),
    ],
)
def test_parse_hostport_rejects(value: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_hostport(value, 53)
    assert str(exc.value) == message


def test_config_defaults() -> None:
    config = load_config(None)
    assert config == Config()
    assert (config.domain, config.alt_domain, config.datacenter, config.partition) == (
        "consul", None, "dc1", "default")
    assert config.listen_addresses() == [("127.0.0.1", 8600)]
    assert config.advertise is None
    assert config.catalog_path() is None
    assert config.virtual_ip_range == "240.0.0.0/4"
    dns = config.dns
    assert (dns.node_ttl, dict(dns.service_ttl), dns.only_passing, dns.udp_answer_limit,
            dns.a_record_limit, dns.enable_truncate, dns.enable_additional_node_meta_txt,
            dns.translate_wan_addrs, dns.recursors, dns.recursor_timeout) == (
        0.0, {"*": 0.0}, False, 3, 0, False, True, False, [], 2.0)
    assert (dns.soa.refresh, dns.soa.retry, dns.soa.expire, dns.soa.min_ttl) == (
        3600, 600, 86400, 0)
    assert config.admin.listen == "127.0.0.1:8601"


def test_config_file(tmp_path: Path) -> None:
    path = write(tmp_path / "config.yaml", """\
        domain: Consul.
        alt_domain: mesh.example.
        datacenter: DC2
        listen: ["10.0.0.1:53", "[::1]:8600", "::1"]
        advertise: 192.0.2.1
        catalog:
          file: catalog.yaml
        dns:
          node_ttl: 10s
          service_ttl: {"*": 500ms, "DB*": 1m, web: 30}
          recursors: ["8.8.8.8", "[2001:4860:4860::8888]:5353"]
          recursor_timeout: 1500ms
          soa: {min_ttl: 5}
        """)
    config = load_config(path)
    assert (config.domain, config.alt_domain, config.datacenter) == (
        "consul", "mesh.example", "dc2")
    assert config.listen_addresses() == [("10.0.0.1", 53), ("::1", 8600), ("::1", 8600)]
    assert config.catalog_path() == tmp_path / "catalog.yaml"
    assert config.dns.node_ttl == 10.0
    assert dict(config.dns.service_ttl) == {"*": 0.5, "db*": 60.0, "web": 30.0}
    assert config.dns.recursor_addresses() == [("8.8.8.8", 53), ("2001:4860:4860::8888", 5353)]
    assert config.dns.recursor_timeout == 1.5
    assert (config.dns.soa.min_ttl, config.dns.soa.refresh) == (5, 3600)


BAD_CONFIG = [
    pytest.param("""\
        domain: consul
        alt_domain: Consul.
        """, ["2: alt_domain: alt_domain must differ from domain"], id="alt-equals-domain"),
    pytest.param("""\
        domain: mesh
        alt_domain: mesh
        datacenter: dc1
        """, ["2: alt_domain: alt_domain must differ from domain"], id="alt-equals-domain-2"),
    pytest.param("""\
        datacenter: dc1
        listen:
          - 127.0.0.1:8600
          - "[::1]53"
        """, ["2: listen: '[::1]53': expected [IPv6 address]:port"], id="bad-listen"),
    pytest.param("""\
        listen: []
        """, ["1: listen: List should have at least 1 item after validation, not 0"],
        id="no-listen"),
    pytest.param("""\
        dns:
          service_ttl:
            "*": 5s
            "d*b": 1s
        """, ["2: dns.service_ttl: 'd*b': '*' is only allowed at the end (prefix match)"],
        id="ttl-wildcard"),
    pytest.param("""\
        dns:
          service_ttl:
            web: forever
        """, ["3: dns.service_ttl.web: " + BAD_DURATION + ", got "
              "'forever'"], id="ttl-value"),
    pytest.param("""\
        dns:
          node_ttl: 5s
          udp_answer_limit: many
          nodettl: 5s
        """, ["3: dns.udp_answer_limit: Input should be a valid integer, unable to parse "
              "string as an integer",
              "4: dns.nodettl: unknown field 'nodettl'; did you mean 'node_ttl'? (valid here: "
              + DNS_FIELDS + ")"],
        id="type-and-unknown"),
    pytest.param("""\
        domain: consul
        advertise: 10.0.0.300
        dns:
          recursors: [8.8.8.8, "dns.google"]
        """, ["2: advertise: '10.0.0.300' is not an IP address",
              "4: dns.recursors: 'dns.google': 'dns.google' is not an IP address"],
        id="bad-ips"),
    pytest.param("""\
        domain: consul
        virtual_ip_range: 2001:db8::/64
        """, ["2: virtual_ip_range: must be an IPv4 network with room for addresses, e.g. "
              "240.0.0.0/4"], id="vip-range"),
    pytest.param("""\
        - domain: consul
        """, ["1: (top level): expected a mapping of settings"], id="top-list"),
    pytest.param("""\
        domain: consul
          datacenter: dc1
        """, ["2: (syntax): mapping values are not allowed in this context"], id="syntax"),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CONFIG)
def test_bad_config(tmp_path: Path, text: str, expected: list[str]) -> None:
    path = write(tmp_path / "config.yaml", text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.problems == [f"{path}:{line}" for line in expected]


def test_config_in_code_refuses_alt_domain_equal_to_domain() -> None:
    with pytest.raises(ValidationError) as exc:
        Config(domain="mesh", alt_domain="MESH.")
    assert [(e["loc"], e["msg"]) for e in exc.value.errors()] == [
        (("alt_domain",), "Value error, alt_domain must differ from domain")]
    assert Config(domain="mesh", alt_domain="consul").alt_domain == "consul"


def test_configs_catalog_is_the_shipped_example() -> None:
    """configs/catalog.yaml (what users read) and the copy inside the package (what
    `meshdns serve` serves with no options) are one file, byte for byte."""
    root = Path(__file__).resolve().parent.parent
    shipped = root / "meshdns" / "examples" / "catalog.yaml"
    assert (root / "configs" / "catalog.yaml").read_bytes() == shipped.read_bytes()
