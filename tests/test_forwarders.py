"""meshdns behind the real forwarders that cluster DNS is made of.

kube-dns turns ``stubDomains: {"consul": ["IP"]}`` into dnsmasq's ``server=/consul/IP``; CoreDNS,
unbound and most resolvers forward or stub a zone the same way. Each test starts meshdns, then a
real ``dnsmasq`` or ``unbound`` on a free loopback port that sends ``consul.`` to it, and asks
the forwarder with dnspython: the answers must be the ones meshdns gives directly (virtual IPs,
SRV with additional records, NXDOMAIN, NODATA, TCP fallback for large answers), names outside
``consul.`` must stay away from meshdns, and the forwarders' caches must follow meshdns's TTLs
and, for negative answers, the SOA minimum. What meshdns saw is read from its ``/metrics``.

Three forwarders are exercised:

- ``dnsmasq``: kube-dns's cache, started as kube-dns starts it for a stub domain;
- ``unbound-stub``: unbound with a ``stub-zone`` (iterative queries, RD=0), as resolvers that
  treat meshdns as the authoritative server for ``consul.`` do;
- ``unbound-forward``: unbound with a ``forward-zone`` (RD=1), as CoreDNS's ``forward`` does.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import pytest
from conftest import MeshdnsProcess, free_port, require_binary, stop_process, wait_for
from prometheus_client.parser import text_string_to_metric_families

VIP = "240.0.0.10"
OUTSIDE_ANSWER = "192.0.2.1"
BIG = 40  # instances of the service whose SRV answer does not fit in a UDP reply

CATALOG = """\
nodes:
  - {name: node-1, address: 10.0.0.1, meta: {rack: r1}}
  - {name: node-2, address: 10.0.0.2}
services:
  - {name: web, id: web-1, node: node-1, address: 10.0.1.1, port: 8080, tags: [v1]}
  - {name: web, id: web-2, node: node-2, address: 10.0.1.2, port: 8080}
  - {name: web-sidecar-proxy, id: web-1-proxy, node: node-1, port: 20000,
     kind: connect-proxy, destination: web}
  - {name: api, node: node-2, port: 9090}
  - {name: db, node: node-2, port: 5432}
"""
CATALOG += "".join(
    f"  - {{name: big, id: big-{i}, node: node-1, address: 10.9.0.{i + 1}, port: {9000 + i}}}\n"
    for i in range(BIG))
CATALOG += f"virtual_ips:\n  - {{service: web, ip: {VIP}}}\n"

#: what a forwarder may cache: positive answers 5 s, negative answers 3 s (the SOA minimum)
CACHED_CONFIG = {
    "dns": {"service_ttl": {"*": "5s"}, "node_ttl": "5s", "enable_truncate": True,
            "soa": {"min_ttl": 3}},
}
#: meshdns's defaults: TTL 0 everywhere, so a forwarder must ask every time
UNCACHED_CONFIG = {"dns": {"enable_truncate": True}}

FORWARDERS = ["dnsmasq", "unbound-stub", "unbound-forward"]

# Questions whose answers must be the same through every forwarder as from meshdns itself.
SAME_ANSWERS = [
    ("web.virtual.consul", "A"),             # the virtual IP a transparent proxy captures
    ("web.service.consul", "A"),
    ("web.service.consul", "SRV"),           # targets <hex>.addr.dc1.consul, A in additional
    ("_web._tcp.service.consul", "SRV"),     # RFC 2782 form
    ("v1.web.service.consul", "A"),          # tag filter
    ("db.service.consul", "SRV"),            # target node-2.node.dc1.consul
    ("node-1.node.consul", "A"),             # plus the node's meta as TXT (additional)
    ("node-1.node.consul", "TXT"),
    ("0a000101.addr.consul", "A"),
    ("consul", "SOA"),
    ("nope.service.consul", "A"),            # NXDOMAIN, SOA in authority
    ("api.virtual.consul", "A"),             # not in the mesh: no virtual IP, NXDOMAIN
    ("web.service.consul", "AAAA"),          # NODATA: NOERROR, empty, SOA in authority
    ("node-1.node.consul", "SRV"),           # NODATA
]


# ----------------------------------------------------------------------------------------------
# meshdns's own view: /metrics
# ----------------------------------------------------------------------------------------------


def scrape(server: MeshdnsProcess) -> dict[str, list]:
    """Every sample of meshdns's /metrics, by metric family name."""
    url = f"http://127.0.0.1:{server.admin_port}/metrics"
    with urllib.request.urlopen(url, timeout=2) as response:
        text = response.read().decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def queries_seen(server: MeshdnsProcess, **labels: str) -> float:
    """The sum of ``meshdns_queries_total`` over the samples matching ``labels``."""
    samples = scrape(server).get("meshdns_queries", [])
    return sum(s.value for s in samples if s.name == "meshdns_queries_total"
               and all(s.labels.get(k) == v for k, v in labels.items()))


def counter(server: MeshdnsProcess, name: str) -> float:
    samples = scrape(server).get(name.removesuffix("_total"), [])
    return sum(s.value for s in samples if s.name == name)


# ----------------------------------------------------------------------------------------------
# Forwarders
# ----------------------------------------------------------------------------------------------


class Forwarder:
    """A dnsmasq or unbound process on 127.0.0.1:``port``, stopped with ``stop()``."""

    def __init__(self, kind: str, cmd: list[str], port: int, log: Path, workdir: Path) -> None:
        self.kind = kind
        self.port = port
        self.log = log
        self.out = workdir / f"{kind}-{port}.out"
        with self.out.open("w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=workdir)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        text = self.out.read_text(errors="replace")
        if self.log.exists():
            text += self.log.read_text(errors="replace")
        return text

    def query(self, name: str, rdtype: str = "A", *, tcp: bool = False,
              payload: int = 1232, timeout: float = 3.0) -> dns.message.Message:
        msg = dns.message.make_query(name, rdtype, use_edns=0, payload=payload)
        if tcp:
            return dns.query.tcp(msg, "127.0.0.1", port=self.port, timeout=timeout)
        return dns.query.udp(msg, "127.0.0.1", port=self.port, timeout=timeout,
                             raise_on_truncation=False)

    def ready(self) -> bool:
        try:
            reply = self.query("ready.outside.test", timeout=0.3)
        except (dns.exception.Timeout, OSError):
            return False
        return reply.rcode() == dns.rcode.NOERROR and bool(reply.answer)

    def stop(self) -> None:
        stop_process(self.proc)


def dnsmasq_command(port: int, upstream: int, log: Path) -> list[str]:
    """dnsmasq as kube-dns runs it for ``stubDomains: {"consul": ["127.0.0.1:<upstream>"]}``."""
    return [
        require_binary("dnsmasq"), "--no-daemon", "--no-resolv", "--no-hosts",
        "--conf-file=/dev/null", f"--port={port}", "--listen-address=127.0.0.1",
        "--bind-interfaces", f"--server=/consul/127.0.0.1#{upstream}",
        "--rebind-domain-ok=/consul/", f"--address=/outside.test/{OUTSIDE_ANSWER}",
        "--log-queries", f"--log-facility={log}", "--pid-file",
        # stay the user running the tests (as root, dnsmasq would switch to nobody)
        f"--user={pwd.getpwuid(os.getuid()).pw_name}",
        f"--group={grp.getgrgid(os.getgid()).gr_name}",
    ]


def unbound_config(workdir: Path, port: int, upstream: int, log: Path, zone: str,
                   extra: dict[str, str] | None = None, insecure: bool = True) -> str:
    """unbound sending ``consul.`` to meshdns with a ``stub-zone`` or a ``forward-zone``.

    ``do-not-query-localhost: no`` is what makes a loopback meshdns reachable at all (unbound
    refuses to send queries to 127.0.0.0/8 and ::1 by default). ``qname-minimisation: no``
    saves a query per cache miss with a stub-zone (see test_unbound_qname_minimisation).
    ``domain-insecure`` only matters when the validator module is loaded (it is in Debian's
    default config): the signed root says there is no ``consul.`` TLD, so without it every
    answer is SERVFAIL (test_unbound_validator_needs_domain_insecure). ``extra`` replaces or
    adds ``server:`` settings.
    """
    server = [
        ("interface", "127.0.0.1"),
        ("port", str(port)),
        ("do-daemonize", "no"),
        ("chroot", '""'),
        ("username", '""'),
        ("use-syslog", "no"),
        ("logfile", f'"{log}"'),
        ("verbosity", "1"),
        ("log-queries", "yes"),
        ("log-replies", "yes"),
        ("pidfile", f'"{workdir / f"unbound-{port}.pid"}"'),
        ("directory", f'"{workdir}"'),
        ("num-threads", "1"),
        ("do-ip6", "no"),
        ("do-not-query-localhost", "no"),
        ("access-control", "127.0.0.0/8 allow"),
        ("module-config", '"iterator"'),
        ("qname-minimisation", "no"),
        ("local-zone", '"outside.test." redirect'),
        ("local-data", f'"outside.test. A {OUTSIDE_ANSWER}"'),
    ]
    if insecure:
        server.append(("domain-insecure", '"consul."'))
    extra = dict(extra or {})
    server = [(key, extra.pop(key, value)) for key, value in server] + list(extra.items())
    lines = ["server:", *(f"  {key}: {value}" for key, value in server),
             f"{zone}-zone:", '  name: "consul."',
             f"  {'stub-addr' if zone == 'stub' else 'forward-addr'}: 127.0.0.1@{upstream}"]
    return "\n".join(lines) + "\n"


@pytest.fixture
def forwarder(tmp_path: Path) -> Iterator:
    """``forwarder(kind, meshdns, extra=...)`` -> a running Forwarder (stopped after the test).

    ``kind`` is one of FORWARDERS; ``extra`` replaces or adds unbound ``server:`` settings, and
    ``insecure=False`` leaves out its ``domain-insecure: "consul."``.
    """
    started: list[Forwarder] = []

    def start(kind: str, upstream: MeshdnsProcess, extra: dict[str, str] | None = None,
              insecure: bool = True) -> Forwarder:
        for _attempt in range(3):  # a free port can be taken between free_port() and bind()
            port = free_port()
            log = tmp_path / f"{kind}-{port}.log"
            if kind == "dnsmasq":
                cmd = dnsmasq_command(port, upstream.port, log)
            else:
                conf = tmp_path / f"unbound-{port}.conf"
                conf.write_text(unbound_config(tmp_path, port, upstream.port, log,
                                               kind.removeprefix("unbound-"), extra, insecure))
                check = subprocess.run([require_binary("unbound-checkconf"), str(conf)],
                                       capture_output=True, text=True, timeout=10)
                assert check.returncode == 0, check.stdout + check.stderr
                cmd = [require_binary("unbound"), "-d", "-c", str(conf)]
            fwd = Forwarder(kind, cmd, port, log, tmp_path)
            started.append(fwd)
            wait_for(lambda f=fwd: f.ready() or not f.alive(), timeout=10, interval=0.05)
            if fwd.alive() and fwd.ready():
                return fwd
            fwd.stop()
        pytest.fail(f"{kind} did not start:\n{fwd.output()}")

    try:
        yield start
    finally:
        for fwd in started:
            fwd.stop()


@pytest.fixture(scope="module")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(CATALOG)
    return path


@pytest.fixture(scope="module")
def cached(tmp_path_factory: pytest.TempPathFactory, catalog_file: Path) -> Iterator:
    """meshdns with service TTL 5 s and SOA minimum 3 s (so forwarders cache)."""
    server = MeshdnsProcess(tmp_path_factory.mktemp("cached"), catalog_file, CACHED_CONFIG)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def uncached(tmp_path_factory: pytest.TempPathFactory, catalog_file: Path) -> Iterator:
    """meshdns with its default TTLs of 0 (so forwarders must not cache)."""
    server = MeshdnsProcess(tmp_path_factory.mktemp("uncached"), catalog_file, UNCACHED_CONFIG)
    yield server
    server.stop()


# ----------------------------------------------------------------------------------------------
# Comparing answers
# ----------------------------------------------------------------------------------------------


def section(rrsets: list) -> set[tuple[str, str, frozenset[str]]]:
    """An order-free, TTL-free view of a message section (OPT left out)."""
    return {(rrset.name.to_text().lower(), dns.rdatatype.to_text(rrset.rdtype),
             frozenset(rdata.to_text().lower() for rdata in rrset))
            for rrset in rrsets if rrset.rdtype != dns.rdatatype.OPT}


def passes_through(kind: str) -> bool:
    """dnsmasq passes meshdns's authority and additional sections through; unbound answers
    with ``minimal-responses: yes`` (its default): the SOA of a negative answer in authority,
    no NS there, no additional section."""
    return kind == "dnsmasq"


def assert_same(kind: str, via: dns.message.Message, direct: dns.message.Message) -> None:
    question = via.question[0].to_text()
    assert dns.rcode.to_text(via.rcode()) == dns.rcode.to_text(direct.rcode()), question
    assert section(via.answer) == section(direct.answer), question
    if passes_through(kind):
        assert section(via.authority) == section(direct.authority), question
        assert section(via.additional) == section(direct.additional), question
    else:
        negative = [r for r in direct.authority if r.rdtype == dns.rdatatype.SOA]
        assert section(via.authority) == section(negative if not direct.answer else []), \
            question
    assert not via.flags & dns.flags.TC, question


# ----------------------------------------------------------------------------------------------
# Answers through the forwarders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FORWARDERS)
def test_same_answers_as_meshdns(kind: str, forwarder, cached: MeshdnsProcess) -> None:
    fwd = forwarder(kind, cached)
    for name, rdtype in SAME_ANSWERS:
        direct = cached.query(name, rdtype, edns=0)
        assert direct.flags & dns.flags.AA, name
        assert_same(kind, fwd.query(name, rdtype), direct)


@pytest.mark.parametrize("kind", FORWARDERS)
def test_virtual_ip_and_services(kind: str, forwarder, cached: MeshdnsProcess) -> None:
    fwd = forwarder(kind, cached)
    reply = fwd.query("web.virtual.consul")
    assert reply.rcode() == dns.rcode.NOERROR
    assert [r.to_text() for r in reply.find_rrset(reply.answer, reply.question[0].name,
                                                  dns.rdataclass.IN, dns.rdatatype.A)] == [VIP]
    reply = fwd.query("web.service.consul")
    assert {r.to_text() for rrset in reply.answer for r in rrset} == {"10.0.1.1", "10.0.1.2"}
    reply = fwd.query("web.service.consul", "SRV")
    targets = {(r.port, r.target.to_text()) for rrset in reply.answer for r in rrset}
    assert targets == {(8080, "0a000101.addr.dc1.consul."), (8080, "0a000102.addr.dc1.consul.")}
    if passes_through(kind):
        glue = {(rrset.name.to_text(), r.to_text()) for rrset in reply.additional
                if rrset.rdtype == dns.rdatatype.A for r in rrset}
        assert glue == {("0a000101.addr.dc1.consul.", "10.0.1.1"),
                        ("0a000102.addr.dc1.consul.", "10.0.1.2")}


@pytest.mark.parametrize("kind", FORWARDERS)
def test_nxdomain_and_nodata(kind: str, forwarder, cached: MeshdnsProcess) -> None:
    fwd = forwarder(kind, cached)
    reply = fwd.query("missing.service.consul")
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert not reply.answer
    assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]
    # An IPv4-only service asked for AAAA: the name exists, so NOERROR with nothing in it --
    # never NXDOMAIN, which musl's getaddrinfo would take as "no such host" for the A too.
    reply = fwd.query("web.service.consul", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR
    assert not reply.answer
    soa = [rrset for rrset in reply.authority if rrset.rdtype == dns.rdatatype.SOA]
    assert soa and soa[0][0].minimum == 3


@pytest.mark.parametrize("kind", FORWARDERS)
def test_large_answer_falls_back_to_tcp(kind: str, forwarder, cached: MeshdnsProcess) -> None:
    """40 SRV records and their A records (~3.2 kB) do not fit the forwarder's 1232-byte EDNS
    buffer: meshdns sets TC, the forwarder goes to TCP (unbound by itself, dnsmasq when its
    client does), and the client gets every record over TCP from the forwarder."""
    full = cached.query("big.service.consul", "SRV", tcp=True)
    assert len(full.answer[0]) == BIG
    fwd = forwarder(kind, cached)
    truncated_before = counter(cached, "meshdns_truncated_total")
    tcp_before = queries_seen(cached, kind="service", transport="tcp")

    reply = fwd.query("big.service.consul", "SRV")
    assert reply.flags & dns.flags.TC
    assert sum(len(rrset) for rrset in reply.answer) < BIG
    reply = fwd.query("big.service.consul", "SRV", tcp=True)
    assert not reply.flags & dns.flags.TC
    assert_same(kind, reply, full)
    assert {r.port for r in reply.answer[0]} == set(range(9000, 9000 + BIG))

    # meshdns was asked over UDP, set TC, and was asked again over TCP
    assert counter(cached, "meshdns_truncated_total") == truncated_before + 1
    assert queries_seen(cached, kind="service", transport="tcp") == tcp_before + 1
    if kind == "dnsmasq":
        assert "reply is truncated" in fwd.log.read_text()


@pytest.mark.parametrize("kind", FORWARDERS)
def test_names_outside_consul_not_sent_to_meshdns(kind: str, forwarder,
                                                  cached: MeshdnsProcess) -> None:
    fwd = forwarder(kind, cached)
    before = queries_seen(cached)
    for name in ("x.outside.test", "y.outside.test"):
        reply = fwd.query(name)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.to_text() for rrset in reply.answer for r in rrset] == [OUTSIDE_ANSWER]
    assert queries_seen(cached) == before
    if kind == "dnsmasq":
        log = fwd.log.read_text()
        assert f"config x.outside.test is {OUTSIDE_ANSWER}" in log
        assert "forwarded x.outside.test" not in log
    # ...while a consul. name does reach it
    fwd.query("web.service.consul")
    assert queries_seen(cached) == before + 1


# ----------------------------------------------------------------------------------------------
# The forwarders' caches and meshdns's TTLs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FORWARDERS)
def test_positive_answer_cached_for_its_ttl(kind: str, forwarder,
                                            cached: MeshdnsProcess) -> None:
    fwd = forwarder(kind, cached)
    before = queries_seen(cached, kind="service", rcode="NOERROR")
    first = fwd.query("web.service.consul")
    time.sleep(1.1)
    second = fwd.query("web.service.consul")
    assert section(second.answer) == section(first.answer)
    assert 0 < first.answer[0].ttl <= 5
    assert second.answer[0].ttl < first.answer[0].ttl  # counted down in the forwarder's cache
    assert queries_seen(cached, kind="service", rcode="NOERROR") == before + 1
    if kind == "dnsmasq":
        assert "cached web.service.consul is 10.0.1." in fwd.log.read_text()


@pytest.mark.parametrize("kind", FORWARDERS)
def test_negative_answers_cached_for_soa_minimum(kind: str, forwarder,
                                                 cached: MeshdnsProcess) -> None:
    """NXDOMAIN and NODATA are cached for the SOA minimum (3 s here), then asked again."""
    fwd = forwarder(kind, cached)
    nx_before = queries_seen(cached, kind="service", rcode="NXDOMAIN")
    nodata_before = queries_seen(cached, kind="service", rcode="NOERROR")
    first = time.monotonic()
    for _ in range(3):
        assert fwd.query("gone.service.consul").rcode() == dns.rcode.NXDOMAIN
        reply = fwd.query("web.service.consul", "AAAA")
        assert reply.rcode() == dns.rcode.NOERROR and not reply.answer
    assert queries_seen(cached, kind="service", rcode="NXDOMAIN") == nx_before + 1
    assert queries_seen(cached, kind="service", rcode="NOERROR") == nodata_before + 1

    # Once the SOA minimum has passed, the forwarder asks meshdns again.
    def asked_again() -> bool:
        assert fwd.query("gone.service.consul").rcode() == dns.rcode.NXDOMAIN
        return queries_seen(cached, kind="service", rcode="NXDOMAIN") == nx_before + 2

    assert wait_for(asked_again, timeout=6, interval=0.2)
    assert 1.9 <= time.monotonic() - first <= 5.5


@pytest.mark.parametrize("kind", FORWARDERS)
def test_ttl_zero_is_asked_every_time(kind: str, forwarder, uncached: MeshdnsProcess) -> None:
    fwd = forwarder(kind, uncached)
    ok_before = queries_seen(uncached, kind="service", rcode="NOERROR")
    nx_before = queries_seen(uncached, kind="service", rcode="NXDOMAIN")
    for _ in range(3):
        reply = fwd.query("web.service.consul")
        assert reply.answer and reply.answer[0].ttl == 0
        assert fwd.query("gone.service.consul").rcode() == dns.rcode.NXDOMAIN
    assert queries_seen(uncached, kind="service", rcode="NOERROR") == ok_before + 3
    assert queries_seen(uncached, kind="service", rcode="NXDOMAIN") == nx_before + 3


# ----------------------------------------------------------------------------------------------
# unbound's own ways
# ----------------------------------------------------------------------------------------------


def test_unbound_qname_minimisation(forwarder, cached: MeshdnsProcess) -> None:
    """With unbound's default ``qname-minimisation: yes``, a stub-zone lookup of
    ``web.virtual.consul`` first asks ``virtual.consul. A``; meshdns answers NXDOMAIN (as Consul
    does for a name with nothing left of the keyword), unbound (not strict) then asks the full
    name. The answers are right; each cache miss costs meshdns a second query."""
    fwd = forwarder("unbound-stub", cached, extra={"qname-minimisation": "yes"})
    before = queries_seen(cached)
    for name, rdtype in SAME_ANSWERS:
        assert_same("unbound-stub", fwd.query(name, rdtype), cached.query(name, rdtype, edns=0))
    assert queries_seen(cached) > before + len(SAME_ANSWERS)


def test_unbound_minimal_responses_off_keeps_srv_targets(forwarder,
                                                         cached: MeshdnsProcess) -> None:
    """unbound leaves the additional section out by default (``minimal-responses: yes``);
    with ``minimal-responses: no`` it returns the SRV targets' addresses as meshdns sent them."""
    fwd = forwarder("unbound-forward", cached, extra={"minimal-responses": "no"})
    reply = fwd.query("web.service.consul", "SRV")
    glue = {(rrset.name.to_text(), r.to_text()) for rrset in reply.additional
            if rrset.rdtype == dns.rdatatype.A for r in rrset}
    assert glue == {("0a000101.addr.dc1.consul.", "10.0.1.1"),
                    ("0a000102.addr.dc1.consul.", "10.0.1.2")}


# The root zone's trust anchor (KSK-2017), as in Debian's dns-root-data /usr/share/dns/root.ds.
ROOT_TRUST_ANCHOR = (". DS 20326 8 2 "
                     "E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D")
VALIDATOR = {"module-config": '"validator iterator"', "trust-anchor": f'"{ROOT_TRUST_ANCHOR}"'}


def test_unbound_validator_needs_domain_insecure(forwarder, cached: MeshdnsProcess) -> None:
    """A validating unbound (Debian's default config loads the validator) answers consul.
    names only with ``domain-insecure: "consul."``; without it, the answer is SERVFAIL: the
    validator cannot prove ``consul.`` insecure (offline it cannot even fetch the root DNSKEY;
    online the root's NSEC records say there is no such TLD, so the answers are bogus)."""
    fwd = forwarder("unbound-forward", cached, extra=VALIDATOR)
    assert_same("unbound-forward", fwd.query("web.virtual.consul"),
                cached.query("web.virtual.consul", edns=0))
    fwd = forwarder("unbound-forward", cached, extra=VALIDATOR, insecure=False)
    try:
        reply = fwd.query("web.virtual.consul", timeout=5)
    except dns.exception.Timeout:  # still trying to reach the root servers
        return
    assert reply.rcode() == dns.rcode.SERVFAIL


# ----------------------------------------------------------------------------------------------
# CoreDNS forward's health probe: `. IN NS`
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("rd", [True, False], ids=["rd", "norec"])
def test_coredns_health_probe_answered(tcp: bool, rd: bool, cached: MeshdnsProcess) -> None:
    """CoreDNS's ``forward`` sends ``. IN NS`` (RD=1; +norec in old releases) over UDP, or TCP
    with ``force_tcp``, and counts any reply that arrives within its 2 s read timeout as
    healthy. meshdns must answer well-formed and fast: REFUSED, no recursion."""
    query = dns.message.make_query(".", "NS")
    if not rd:
        query.flags &= ~dns.flags.RD
    started = time.monotonic()
    if tcp:
        reply = dns.query.tcp(query, "127.0.0.1", port=cached.port, timeout=2)
    else:
        reply = dns.query.udp(query, "127.0.0.1", port=cached.port, timeout=2)
    assert time.monotonic() - started < 0.5
    assert reply.id == query.id and reply.flags & dns.flags.QR
    assert reply.question == query.question
    assert reply.rcode() == dns.rcode.REFUSED
    assert not reply.flags & dns.flags.AA and not reply.answer
    assert bool(reply.flags & dns.flags.RD) == rd


def test_coredns_health_probe_with_dead_recursor(start_server, catalog_file: Path) -> None:
    """With recursors configured, the probe is forwarded; when none answers, meshdns still
    replies (SERVFAIL) once ``recursor_timeout`` has passed. Keep that timeout well below
    CoreDNS's 2 s read timeout if meshdns has recursors behind CoreDNS."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as black_hole:
        black_hole.bind(("127.0.0.1", 0))  # receives, never answers
        dead = f"127.0.0.1:{black_hole.getsockname()[1]}"
        server = start_server(catalog=catalog_file,
                              config={"dns": {"recursors": [dead], "recursor_timeout": "300ms"}})
        started = time.monotonic()
        reply = server.query(".", "NS", timeout=2)
        assert time.monotonic() - started < 1.0
        assert reply.rcode() == dns.rcode.SERVFAIL
        assert reply.flags & dns.flags.RA
        # consul. names are still answered from the catalog, not forwarded
        assert server.query("web.virtual.consul").answer[0][0].to_text() == VIP
