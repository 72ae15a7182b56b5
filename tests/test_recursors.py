"""Recursors: names outside the domain forwarded to real upstreams (dnsmasq, started here).

Off by default (REFUSED, meshdns is never an open resolver). With ``dns.recursors`` set, a name
outside the domain, and a PTR name the catalog does not know, is forwarded to each recursor in
turn with ``recursor_timeout``; a NOERROR or NXDOMAIN reply is passed back as it is, anything
else (or silence) moves on to the next; SERVFAIL with RA when none answers. Names in the domain
are never forwarded: the upstream's query log shows it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.reversename
import pytest
from conftest import (
    MeshdnsProcess,
    free_port,
    require_binary,
    stop_process,
    wait_for,
    write_catalog,
)

TIMEOUT = 0.5  # recursor_timeout for these tests

CATALOG = """\
nodes:
  - {name: n1, address: 10.0.0.1}
services:
  - {name: web, node: n1, port: 80}
"""

# TXT strings large enough that the reply does not fit 512 bytes: dnsmasq sets TC over UDP
BIG_TXT = ",".join(c * 200 for c in "abc")


class Dnsmasq:
    """A dnsmasq on 127.0.0.1 that knows a few names and logs every query to a file."""

    def __init__(self, workdir: Path, *records: str) -> None:
        self.port = free_port()
        self.log_path = workdir / f"dnsmasq-{self.port}.log"
        self.log_path.touch()
        cmd = [require_binary("dnsmasq"), "--no-daemon", "--no-resolv", "--no-hosts",
               "--conf-file=/dev/null", f"--port={self.port}", "--listen-address=127.0.0.1",
               "--bind-interfaces", "--log-queries", f"--log-facility={self.log_path}",
               # as root it would switch to nobody, who cannot write the log in tmp_path
               *(["--user=root"] if os.geteuid() == 0 else []), *records]
        self.stderr_path = workdir / f"dnsmasq-{self.port}.stderr"
        with open(self.stderr_path, "w") as stderr:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
        if not wait_for(self._answers, timeout=10):
            self.stop()
            raise RuntimeError(f"dnsmasq did not start: {self.stderr_path.read_text()}")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            return False
        try:
            q = dns.message.make_query("ready.example.test", "A")
            dns.query.udp(q, "127.0.0.1", port=self.port, timeout=0.2)
            return True
        except (TimeoutError, OSError, dns.exception.Timeout):
            return False

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def queried(self) -> str:
        """The query lines of the log (lowercased)."""
        return "\n".join(line for line in self.log_path.read_text().lower().splitlines()
                         if "query[" in line)

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recursors")


@pytest.fixture(scope="module")
def upstream(workdir: Path) -> Iterator[Dnsmasq]:
    server = Dnsmasq(workdir, "--address=/example.test/192.0.2.7", "--address=/nx.test/",
                     "--host-record=multi.test,192.0.2.21",
                     "--host-record=multi.test,192.0.2.22",
                     f"--txt-record=big.test,{BIG_TXT}")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def second_upstream(workdir: Path) -> Iterator[Dnsmasq]:
    """Knows second.test, which the first upstream refuses (it has no upstream of its own)."""
    server = Dnsmasq(workdir, "--address=/second.test/192.0.2.9")
    yield server
    server.stop()


def _meshdns(workdir: Path, name: str, recursors: list[str]) -> MeshdnsProcess:
    where = workdir / name
    where.mkdir()
    catalog = write_catalog(where / "catalog.yaml", CATALOG)
    config = {"dns": {"recursors": recursors, "recursor_timeout": f"{TIMEOUT}s"}}
    return MeshdnsProcess(where, catalog, config)


@pytest.fixture(scope="module")
def forwarding(workdir: Path, upstream: Dnsmasq) -> Iterator[MeshdnsProcess]:
    server = _meshdns(workdir, "forwarding", [upstream.address])
    yield server
    server.stop()


def closed_port() -> int:
    """A port nobody listens on (UDP gets an ICMP error, TCP a reset)."""
    return free_port()


# --- forwarding ----------------------------------------------------------------------------


def ask_directly(upstream: Dnsmasq, name: str, rdtype: str) -> dns.message.Message:
    return dns.query.udp(dns.message.make_query(name, rdtype, use_edns=0, payload=1232),
                         "127.0.0.1", port=upstream.port, timeout=2)


def test_forwarded_answer(forwarding: MeshdnsProcess, upstream: Dnsmasq) -> None:
    direct = ask_directly(upstream, "www.example.test", "A")
    for tcp in (False, True):
        msg = forwarding.query("www.example.test", "A", tcp=tcp, edns=0)
        assert msg.rcode() == dns.rcode.NOERROR
        assert msg.flags & dns.flags.RA
        # the upstream's reply as it is: its flags (dnsmasq says AA for its own records), records
        assert msg.flags == direct.flags
        assert msg.answer == direct.answer
        assert [rr.address for rr in msg.answer[0]] == ["192.0.2.7"]
    msg = forwarding.query("multi.test", "A")
    assert sorted(rr.address for rr in msg.answer[0]) == ["192.0.2.21", "192.0.2.22"]
    assert wait_for(lambda: "query[a] www.example.test" in upstream.queried())


def test_forwarded_nxdomain_is_passed_back(forwarding: MeshdnsProcess) -> None:
    for tcp in (False, True):
        msg = forwarding.query("nothing.nx.test", "A", tcp=tcp)
        assert msg.rcode() == dns.rcode.NXDOMAIN
        assert msg.flags & dns.flags.RA
        assert not msg.answer


def test_forwarded_truncation_is_passed_back(forwarding: MeshdnsProcess) -> None:
    udp = forwarding.query("big.test", "TXT", edns=-1)  # no EDNS: 512 bytes at most
    assert udp.flags & dns.flags.TC and udp.rcode() == dns.rcode.NOERROR
    tcp = forwarding.query("big.test", "TXT", tcp=True, edns=-1)
    assert not tcp.flags & dns.flags.TC
    assert tcp.answer[0][0].strings == tuple(c * 200 for c in (b"a", b"b", b"c"))


def test_forwarded_with_dig(forwarding: MeshdnsProcess) -> None:
    out = forwarding.dig("www.example.test", "A")
    assert "status: NOERROR" in out and " ra" in out.split("flags:")[1].split(";")[0]
    assert forwarding.dig("+tcp", "www.example.test", "+short").split() == ["192.0.2.7"]


def test_in_domain_names_are_never_forwarded(forwarding: MeshdnsProcess,
                                             upstream: Dnsmasq) -> None:
    asked = [("web.service.consul", "A"), ("nothing.service.consul", "A"),
             ("web.service.consul", "TXT"), ("consul", "SOA"), ("bad.name.consul", "A"),
             ("n1.node.consul", "AAAA")]
    for name, rdtype in asked:
        msg = forwarding.query(name, rdtype)
        assert msg.flags & dns.flags.AA, name
        assert msg.flags & dns.flags.RA, name  # RA on every reply once recursors are set
    assert [rr.address for rr in forwarding.query("web.service.consul").answer[0]] == \
        ["10.0.0.1"]
    # a marker asked last: once the upstream logged it, it has seen everything before it
    forwarding.query("marker.example.test", "A")
    assert wait_for(lambda: "marker.example.test" in upstream.queried())
    assert "consul" not in upstream.queried()


def test_ptr_miss_is_forwarded_and_hit_is_not(forwarding: MeshdnsProcess,
                                              upstream: Dnsmasq) -> None:
    miss = dns.reversename.from_address("192.0.2.21").to_text()
    msg = forwarding.query(miss, "PTR")
    assert msg.rcode() == dns.rcode.NOERROR and msg.flags & dns.flags.RA
    assert [rr.target.to_text() for rr in msg.answer[0]] == ["multi.test."]
    hit = dns.reversename.from_address("10.0.0.1").to_text()
    msg = forwarding.query(hit, "PTR")
    assert msg.flags & dns.flags.AA
    assert [rr.target.to_text() for rr in msg.answer[0]] == ["n1.node.dc1.consul."]
    forwarding.query("marker2.example.test", "A")
    assert wait_for(lambda: "marker2.example.test" in upstream.queried())
    log = upstream.queried()
    assert "21.2.0.192.in-addr.arpa" in log
    assert "1.0.0.10.in-addr.arpa" not in log


# --- failing recursors ---------------------------------------------------------------------


def test_dead_or_refusing_recursor_is_skipped(workdir: Path, upstream: Dnsmasq,
                                              second_upstream: Dnsmasq) -> None:
    dead = f"127.0.0.1:{closed_port()}"
    server = _meshdns(workdir, "skipping", [dead, upstream.address, second_upstream.address])
    try:
        for tcp in (False, True):
            # the closed port fails at once; the first dnsmasq answers
            msg = server.query("www.example.test", "A", tcp=tcp)
            assert [rr.address for rr in msg.answer[0]] == ["192.0.2.7"]
            # the first dnsmasq REFUSES second.test: the next recursor answers
            msg = server.query("www.second.test", "A", tcp=tcp)
            assert msg.rcode() == dns.rcode.NOERROR
            assert [rr.address for rr in msg.answer[0]] == ["192.0.2.9"]
        assert "www.second.test" in upstream.queried()
    finally:
        server.stop()


def test_all_recursors_dead_is_servfail_after_the_timeout(workdir: Path) -> None:
    # a recursor that takes the query and never answers (UDP and TCP), then a closed port
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent_udp, \
            socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent_tcp:
        silent_udp.bind(("127.0.0.1", port))
        silent_tcp.bind(("127.0.0.1", port))
        silent_tcp.listen(8)
        server = _meshdns(workdir, "dead", [f"127.0.0.1:{port}",
                                            f"127.0.0.1:{closed_port()}"])
        try:
            for tcp in (False, True):
                start = time.monotonic()
                msg = server.query("www.example.test", "A", tcp=tcp, edns=0, timeout=5)
                elapsed = time.monotonic() - start
                assert msg.rcode() == dns.rcode.SERVFAIL
                assert msg.flags & dns.flags.RA and not msg.flags & dns.flags.AA
                assert msg.edns == 0  # the OPT is echoed
                assert TIMEOUT * 0.9 <= elapsed < TIMEOUT * 3, elapsed
            # in-domain names are still answered at once
            assert server.query("web.service.consul").rcode() == dns.rcode.NOERROR
        finally:
            server.stop()


def test_no_recursors_is_refused(workdir: Path) -> None:
    where = workdir / "none"
    where.mkdir()
    server = MeshdnsProcess(where, write_catalog(where / "catalog.yaml", CATALOG))
    try:
        for tcp in (False, True):
            msg = server.query("www.example.test", "A", tcp=tcp)
            assert msg.rcode() == dns.rcode.REFUSED
            assert not msg.flags & (dns.flags.AA | dns.flags.RA)
            assert not msg.answer
        # a PTR miss without recursors is ours to answer: NXDOMAIN with the SOA
        msg = server.query(dns.reversename.from_address("192.0.2.21").to_text(), "PTR")
        assert msg.rcode() == dns.rcode.NXDOMAIN and not msg.flags & dns.flags.RA
        assert msg.authority[0].rdtype == dns.rdatatype.SOA
        assert not server.query("web.service.consul").flags & dns.flags.RA
    finally:
        server.stop()
