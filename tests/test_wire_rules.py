"""The "Wire behaviour" rules of names.md, over real sockets of a real ``meshdns serve``.

Four servers share one catalog (``big``: 60 instances, ``five``: 5, ``web``: 2) and differ in
their DNS settings:

- ``plain``: the defaults (udp_answer_limit 3, no truncation flag, response cache on);
- ``trunc``: udp_answer_limit 5 and enable_truncate;
- ``wide``: udp_answer_limit 20 (capped at 8) and a_record_limit 10;
- ``nocache``: the defaults with the response cache off, the reference the cached server is
  compared with.
"""

from __future__ import annotations

import re
import socket
import struct
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import dns.edns
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdatatype
import pytest
from conftest import MeshdnsProcess, write_catalog

BIG = 60


def catalog_text() -> str:
    nodes = [f"  - {{name: n{i:02d}, address: 10.1.0.{i + 1}}}" for i in range(BIG)]
    big = [f"  - {{name: big, node: n{i:02d}, port: 80}}" for i in range(BIG)]
    five = [f"  - {{name: five, id: five-{i}, node: n{i:02d}, address: 10.5.0.{i + 1}, "
            f"port: 5000}}" for i in range(5)]
    web = ["  - {name: web, id: web-1, node: n00, address: 10.2.0.1, port: 8080}",
           "  - {name: web, id: web-2, node: n01, address: 10.2.0.2, port: 8080}"]
    return "\n".join(["nodes:", *nodes, "services:", *big, *five, *web]) + "\n"


CONFIGS: dict[str, dict | None] = {
    "plain": None,
    "trunc": {"dns": {"udp_answer_limit": 5, "enable_truncate": True}},
    "wide": {"dns": {"udp_answer_limit": 20, "a_record_limit": 10}},
    "nocache": {"cache": {"enabled": False}},
    "large": {"dns": {"max_udp_size": 4096}},
}


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MeshdnsProcess]]:
    """All four servers, started side by side (each start is mostly Python imports)."""
    root = tmp_path_factory.mktemp("wire")
    catalog = write_catalog(root / "catalog.yaml", catalog_text())

    def start(name: str) -> MeshdnsProcess:
        workdir = root / name
        workdir.mkdir()
        return MeshdnsProcess(workdir, catalog, CONFIGS[name], ["--admin", "off"])

    with ThreadPoolExecutor(len(CONFIGS)) as pool:
        futures = {name: pool.submit(start, name) for name in CONFIGS}
        started = {}
        errors = []
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except Exception as exc:  # stop the others before failing
                errors.append(exc)
    if errors:
        for proc in started.values():
            proc.stop()
        raise errors[0]
    yield started
    for proc in started.values():
        assert proc.stop() == 0


@pytest.fixture(scope="module")
def plain(servers: dict[str, MeshdnsProcess]) -> MeshdnsProcess:
    return servers["plain"]


# --- helpers -------------------------------------------------------------------------------


def make(name: str, rtype: str = "A", edns: int | None = None, payload: int = 1232,
         rd: bool = True) -> dns.message.Message:
    if edns is None:  # make_query turns EDNS on as soon as a payload is given
        msg = dns.message.make_query(name, rtype)
    else:
        msg = dns.message.make_query(name, rtype, use_edns=edns, payload=payload)
    assert msg.edns == (-1 if edns is None else edns)
    if not rd:
        msg.flags &= ~dns.flags.RD
    return msg


def udp_raw(server: MeshdnsProcess, query: dns.message.Message) -> bytes:
    reply = server.raw(query.to_wire(), timeout=3)
    assert reply is not None, "no UDP reply"
    return reply


def tcp_raw(server: MeshdnsProcess, query: dns.message.Message) -> bytes:
    reply = server.raw_tcp(query.to_wire(), timeout=3)
    assert reply is not None, "no TCP reply"
    return reply


def exchange(server: MeshdnsProcess, query: dns.message.Message,
             tcp: bool = False) -> tuple[dns.message.Message, bytes]:
    raw = tcp_raw(server, query) if tcp else udp_raw(server, query)
    return dns.message.from_wire(raw, one_rr_per_rrset=True), raw


def records(section: list) -> list[str]:
    return [" ".join(rrset.to_text().split()) for rrset in section]


def answer_values(msg: dns.message.Message) -> list[str]:
    return [rd.to_text() for rrset in msg.answer for rd in rrset]


def srv_targets(msg: dns.message.Message) -> list[str]:
    return [rd.target.to_text() for rrset in msg.answer for rd in rrset
            if rrset.rdtype == dns.rdatatype.SRV]


def additional_owners(msg: dns.message.Message) -> list[str]:
    return [rrset.name.to_text() for rrset in msg.additional]


def big_ips(n: int = BIG) -> set[str]:
    return {f"10.1.0.{i + 1}" for i in range(n)}


def assert_in_step(msg: dns.message.Message) -> None:
    """The additional section holds exactly one A record per remaining SRV target."""
    targets = srv_targets(msg)
    assert len(set(targets)) == len(targets)
    assert sorted(additional_owners(msg)) == sorted(targets)
    for rrset in msg.additional:
        assert rrset.rdtype == dns.rdatatype.A
        index = int(rrset.name.labels[0][1:])  # nNN.node.dc1.consul -> NN
        assert rrset[0].address == f"10.1.0.{index + 1}"


def sorted_sections(msg: dns.message.Message) -> tuple:
    return (dns.rcode.to_text(msg.rcode()), dns.flags.to_text(msg.flags), msg.edns,
            msg.payload if msg.edns >= 0 else None, sorted(records(msg.answer)),
            sorted(records(msg.authority)), sorted(records(msg.additional)))


# --- UDP and TCP on one port ---------------------------------------------------------------


def test_udp_and_tcp_on_the_same_port(plain: MeshdnsProcess) -> None:
    udp, _ = exchange(plain, make("web.service.consul"))
    tcp, _ = exchange(plain, make("web.service.consul"), tcp=True)
    assert sorted(answer_values(udp)) == sorted(answer_values(tcp)) == ["10.2.0.1", "10.2.0.2"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, \
            socket.create_connection(plain.address, timeout=3) as t:
        assert t.getpeername() == ("127.0.0.1", plain.port)
        u.connect(plain.address)
        assert u.getpeername() == t.getpeername()


def test_tcp_connection_carries_several_queries_in_order(plain: MeshdnsProcess) -> None:
    queries = [make("web.service.consul"), make("nope.service.consul"),
               make("five.service.consul", edns=0), make("www.example.com")]
    for i, query in enumerate(queries):
        query.id = 0x100 + i
    stream = b"".join(struct.pack("!H", len(w)) + w for w in (q.to_wire() for q in queries))
    with socket.create_connection(plain.address, timeout=3) as s:
        s.sendall(stream)  # all at once: the server splits them by their length prefixes
        replies = []
        for _ in queries:
            size = struct.unpack("!H", recv_exact(s, 2))[0]
            replies.append(dns.message.from_wire(recv_exact(s, size)))
    assert [r.id for r in replies] == [0x100, 0x101, 0x102, 0x103]
    assert [r.rcode() for r in replies] == [dns.rcode.NOERROR, dns.rcode.NXDOMAIN,
                                            dns.rcode.NOERROR, dns.rcode.REFUSED]
    assert len(answer_values(replies[2])) == 5


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed"
        buf += chunk
    return buf


# --- EDNS0 ---------------------------------------------------------------------------------


CASES = [  # name, type, rcode, answers
    ("web.service.consul", "A", dns.rcode.NOERROR, 2),
    ("nope.service.consul", "A", dns.rcode.NXDOMAIN, 0),
    ("web.service.consul", "AAAA", dns.rcode.NOERROR, 0),  # NODATA
    ("consul", "SOA", dns.rcode.NOERROR, 1),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("size", [1232, 4096])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}/{c[1]}" for c in CASES])
def test_opt_echoed_with_the_clients_size(plain: MeshdnsProcess, case: tuple, size: int,
                                          tcp: bool) -> None:
    name, rtype, rcode, count = case
    for _ in range(3):  # the first reply is built, the next ones come from the cache
        reply, raw = exchange(plain, make(name, rtype, edns=0, payload=size), tcp)
        assert reply.rcode() == rcode
        assert len(answer_values(reply)) == count
        assert reply.edns == 0
        assert reply.payload == size
        assert reply.ednsflags == 0 and list(reply.options) == []
        assert struct.unpack("!H", raw[10:12])[0] == len(reply.additional) + 1  # ARCOUNT
        if count == 0:
            assert [rrset.rdtype for rrset in reply.authority] == [dns.rdatatype.SOA]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}/{c[1]}" for c in CASES])
def test_no_opt_without_edns(plain: MeshdnsProcess, case: tuple, tcp: bool) -> None:
    name, rtype, rcode, count = case
    for _ in range(3):
        reply, raw = exchange(plain, make(name, rtype), tcp)
        assert reply.rcode() == rcode
        assert len(answer_values(reply)) == count
        assert reply.edns == -1
        assert struct.unpack("!H", raw[10:12])[0] == len(reply.additional)


def test_dig_shows_the_echoed_opt(plain: MeshdnsProcess) -> None:
    out = plain.dig("+bufsize=3000", "+nocookie", "nope.service.consul", "A")
    assert "status: NXDOMAIN" in out
    assert "; EDNS: version: 0, flags:; udp: 3000" in out
    out = plain.dig("+noedns", "nope.service.consul", "A")
    assert "OPT PSEUDOSECTION" not in out


# --- answer limits and trimming ------------------------------------------------------------


@pytest.mark.parametrize("name,limit", [("plain", 3), ("trunc", 5), ("wide", 8)])
def test_udp_without_edns_gets_at_most_min_limit_8(servers: dict, name: str,
                                                   limit: int) -> None:
    server = servers[name]
    for _ in range(3):
        reply, raw = exchange(server, make("big.service.consul"))
        values = answer_values(reply)
        assert len(values) == len(set(values)) == limit
        assert set(values) <= big_ips()
        assert bool(reply.flags & dns.flags.TC) == (name == "trunc")
        assert len(raw) <= 512
    # SRV answers are counted the same way, their additional records follow them
    reply, raw = exchange(server, make("big.service.consul", "SRV"))
    assert len(srv_targets(reply)) == limit
    assert_in_step(reply)
    assert bool(reply.flags & dns.flags.TC) == (name == "trunc")
    assert len(raw) <= 512
    # fewer instances than the limit: all of them, never flagged
    reply, _ = exchange(server, make("web.service.consul"))
    assert sorted(answer_values(reply)) == ["10.2.0.1", "10.2.0.2"]
    assert not reply.flags & dns.flags.TC


def test_udp_without_edns_srv_keeps_additional_in_step(plain: MeshdnsProcess) -> None:
    for _ in range(3):
        reply, raw = exchange(plain, make("big.service.consul", "SRV"))
        assert len(srv_targets(reply)) == 3
        assert_in_step(reply)
        assert len(raw) <= 512
        assert not reply.flags & dns.flags.TC


def test_edns_gets_every_a_record_that_fits(plain: MeshdnsProcess) -> None:
    reply, raw = exchange(plain, make("big.service.consul", edns=0, payload=1232))
    assert set(answer_values(reply)) == big_ips() and len(answer_values(reply)) == BIG
    # at 512 bytes: header 12 + question 24 + OPT 11 + 16 per A record -> 29 records
    reply, raw = exchange(plain, make("big.service.consul", edns=0, payload=512))
    assert len(raw) == 12 + 24 + 11 + 29 * 16
    assert len(set(answer_values(reply))) == 29
    assert not reply.flags & dns.flags.TC


@pytest.mark.parametrize("size", [512, 1232])
def test_edns_srv_trimmed_to_size_with_additional_in_step(servers: dict, size: int) -> None:
    plain, trunc = servers["plain"], servers["trunc"]
    full, full_raw = exchange(plain, make("big.service.consul", "SRV", edns=0), tcp=True)
    assert len(srv_targets(full)) == BIG
    assert_in_step(full)
    for server in (plain, trunc):
        for _ in range(3):
            reply, raw = exchange(server, make("big.service.consul", "SRV", edns=0,
                                               payload=size))
            n = len(srv_targets(reply))
            assert 0 < n < BIG
            assert_in_step(reply)
            assert len(raw) <= size
            # every SRV+A pair costs the same here: one more would not have fitted
            pair = (len(full_raw) - len(raw)) // (BIG - n)
            assert len(full_raw) - len(raw) == pair * (BIG - n)
            assert len(raw) + pair > size
            assert bool(reply.flags & dns.flags.TC) == (server is trunc)
            assert reply.edns == 0 and reply.payload == size


def test_edns_large_enough_gets_everything_untruncated(servers: dict) -> None:
    """Within dns.max_udp_size (here raised to 4096) the client's size is honoured."""
    reply, raw = exchange(servers["large"], make("big.service.consul", "SRV", edns=0,
                                                 payload=4096))
    assert len(srv_targets(reply)) == BIG and len(raw) > 1232
    assert_in_step(reply)
    assert not reply.flags & dns.flags.TC


@pytest.mark.parametrize("payload", [4096, 65000])
def test_udp_replies_never_exceed_max_udp_size(servers: dict, payload: int) -> None:
    """Issue 8 point 8: whatever size a client advertises, a UDP reply is at most
    dns.max_udp_size (1232 by default) bytes; one trimmed to it has TC (with or without
    enable_truncate), so the client asks again over TCP and gets everything there."""
    for server in (servers["plain"], servers["trunc"]):
        for _ in range(3):  # the miss path, the first repeat, the cache
            reply, raw = exchange(server, make("big.service.consul", "SRV", edns=0,
                                               payload=payload))
            assert len(raw) <= 1232
            assert 0 < len(srv_targets(reply)) < BIG
            assert reply.flags & dns.flags.TC
            assert_in_step(reply)
        full, _ = exchange(server, make("big.service.consul", "SRV", edns=0,
                                        payload=payload), tcp=True)
        assert len(srv_targets(full)) == BIG


@pytest.mark.parametrize("edns", [None, 0])
def test_tcp_returns_the_full_set(plain: MeshdnsProcess, edns: int | None) -> None:
    for _ in range(2):
        reply, _ = exchange(plain, make("big.service.consul", edns=edns), tcp=True)
        assert sorted(answer_values(reply)) == sorted(big_ips())
        assert not reply.flags & dns.flags.TC
        reply, _ = exchange(plain, make("big.service.consul", "SRV", edns=edns), tcp=True)
        assert sorted(srv_targets(reply)) == sorted(f"n{i:02d}.node.dc1.consul."
                                                    for i in range(BIG))
        assert_in_step(reply)
        assert not reply.flags & dns.flags.TC


def test_truncate_flag_and_dig(servers: dict) -> None:
    trunc, plain = servers["trunc"], servers["plain"]
    flags = re.compile(r";; flags: ([^;]*);.*ANSWER: (\d+),")

    # +ignore: dig keeps the truncated UDP reply
    out = trunc.dig("+noedns", "+ignore", "big.service.consul", "A")
    got, count = flags.search(out).groups()
    assert set(got.split()) == {"qr", "aa", "tc", "rd"} and int(count) == 5
    # by default dig sees TC and asks again over TCP: the full set
    out = trunc.dig("+noedns", "big.service.consul", "A")
    assert "Truncated, retrying in TCP mode." in out
    got, count = flags.search(out).groups()
    assert set(got.split()) == {"qr", "aa", "rd"} and int(count) == BIG
    assert "(TCP)" in out
    # without enable_truncate the trimmed reply is final: no TC, no retry
    out = plain.dig("+noedns", "big.service.consul", "A")
    assert "Truncated" not in out
    got, count = flags.search(out).groups()
    assert set(got.split()) == {"qr", "aa", "rd"} and int(count) == 3
    # EDNS at dig's default 1232 bytes: all SRV pairs do not fit, retried over TCP
    out = trunc.dig("big.service.consul", "SRV")
    assert "Truncated, retrying in TCP mode." in out
    assert int(flags.search(out).group(2)) == BIG


def test_a_record_limit_on_every_transport(servers: dict) -> None:
    wide = servers["wide"]
    for _ in range(2):
        for tcp, edns in ((True, None), (True, 0), (False, 0)):
            reply, _ = exchange(wide, make("big.service.consul", edns=edns), tcp)
            values = answer_values(reply)
            assert len(values) == len(set(values)) == 10
            assert set(values) <= big_ips()
            assert not reply.flags & dns.flags.TC
        # no EDNS over UDP: the cap of 8 is lower still
        reply, _ = exchange(wide, make("big.service.consul"))
        assert len(set(answer_values(reply))) == 8
        # SRV is not an address lookup: not capped
        reply, _ = exchange(wide, make("big.service.consul", "SRV"), tcp=True)
        assert len(srv_targets(reply)) == BIG


# --- question and owner case, shuffling, flags ---------------------------------------------


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("rtype", ["A", "SRV"])
def test_question_echoed_with_its_exact_case(plain: MeshdnsProcess, tcp: bool,
                                             rtype: str) -> None:
    query = make("WeB.SeRvIcE.CoNsUl", rtype, edns=0)
    wire = query.to_wire()
    question = wire[12:12 + len(b"\x03WeB\x07SeRvIcE\x06CoNsUl\x00") + 4]
    assert question.startswith(b"\x03WeB\x07SeRvIcE\x06CoNsUl\x00")
    for _ in range(3):
        raw = (tcp_raw if tcp else udp_raw)(plain, query)
        assert raw[12:12 + len(question)] == question
        reply = dns.message.from_wire(raw)
        assert reply.question[0].name.to_text() == "WeB.SeRvIcE.CoNsUl."
        assert [rrset.name.to_text() for rrset in reply.answer] == ["WeB.SeRvIcE.CoNsUl."]
        assert len(reply.answer[0]) == 2


@pytest.mark.parametrize("how", ["udp", "udp-edns", "tcp"])
def test_answer_order_is_shuffled(plain: MeshdnsProcess, how: str) -> None:
    orders = []
    for _ in range(40):
        reply, _ = exchange(plain, make("five.service.consul",
                                        edns=0 if how != "udp" else None), how == "tcp")
        orders.append(tuple(answer_values(reply)))
    expected = {f"10.5.0.{i}" for i in range(1, 6)}
    assert all(set(o) <= expected for o in orders)
    assert all(len(o) == (3 if how == "udp" else 5) for o in orders)
    assert len(set(orders)) > 1
    assert len({o[0] for o in orders}) > 1
    if how != "udp":
        assert all(set(o) == expected for o in orders)


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_aa_on_catalog_answers_refused_outside(plain: MeshdnsProcess, tcp: bool) -> None:
    for name, rtype, rcode in (("web.service.consul", "A", dns.rcode.NOERROR),
                               ("nope.service.consul", "A", dns.rcode.NXDOMAIN),
                               ("web.service.consul", "TXT", dns.rcode.NOERROR)):
        reply, _ = exchange(plain, make(name, rtype, edns=0), tcp)
        assert reply.rcode() == rcode
        assert reply.flags & dns.flags.AA
        assert not reply.flags & dns.flags.RA
    for _ in range(3):
        for edns in (None, 0):
            query = make("www.example.com", "A", edns=edns)
            reply, raw = exchange(plain, query, tcp)
            assert reply.id == query.id
            assert reply.rcode() == dns.rcode.REFUSED
            assert dns.flags.to_text(reply.flags) == "QR RD"  # no AA, no RA
            # the OPT is echoed to an EDNS query, as in every other reply (names.md)
            assert reply.edns == (-1 if edns is None else 0)
            assert raw[4:12] == (b"\x00\x01\x00\x00\x00\x00\x00" + (b"\x00" if edns is None
                                                                         else b"\x01"))
            assert reply.question == query.question


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_root_ns_probe_gets_a_well_formed_reply(plain: MeshdnsProcess, tcp: bool) -> None:
    """CoreDNS's forward health check: ``. IN NS`` with RD. Any reply is healthy; silence
    is not. Names outside the domain are REFUSED, so is the root."""
    for _ in range(3):
        query = make(".", "NS")
        reply, raw = exchange(plain, query, tcp)
        assert reply.id == query.id
        assert reply.flags & dns.flags.QR
        assert reply.opcode() == dns.opcode.QUERY
        assert reply.rcode() == dns.rcode.REFUSED
        assert reply.question == query.question
        assert raw[12:17] == b"\x00\x00\x02\x00\x01"  # root, NS, IN: the question as asked


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_id_echoed_and_rd_copied(plain: MeshdnsProcess, tcp: bool) -> None:
    for ident in (0, 1, 0xBEEF, 0xFFFF, 0x1234):
        for rd in (True, False):
            query = make("web.service.consul", rd=rd)
            query.id = ident
            reply, raw = exchange(plain, query, tcp)
            assert raw[:2] == struct.pack("!H", ident)
            assert bool(reply.flags & dns.flags.RD) == rd
            assert reply.flags & dns.flags.AA and not reply.flags & dns.flags.RA
            assert sorted(answer_values(reply)) == ["10.2.0.1", "10.2.0.2"]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("rtype", ["AXFR", "IXFR"])
def test_zone_transfer_not_implemented(plain: MeshdnsProcess, tcp: bool, rtype: str) -> None:
    query = make("consul", rtype)
    for _ in range(2):
        reply, _ = exchange(plain, query, tcp)
        assert reply.id == query.id
        assert reply.rcode() == dns.rcode.NOTIMP
        assert reply.answer == []


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("opcode", [dns.opcode.STATUS, dns.opcode.NOTIFY, dns.opcode.UPDATE])
def test_other_opcodes_not_implemented(plain: MeshdnsProcess, tcp: bool, opcode: int) -> None:
    query = make("web.service.consul")
    query.set_opcode(opcode)
    for _ in range(2):
        raw = (tcp_raw if tcp else udp_raw)(plain, query)
        ident, flags = struct.unpack("!HH", raw[:4])
        assert ident == query.id
        assert flags & 0x8000  # QR
        assert (flags >> 11) & 0xF == opcode  # the opcode is echoed
        assert flags & 0xF == dns.rcode.NOTIMP


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_edns_version_1_gets_badvers(plain: MeshdnsProcess, tcp: bool) -> None:
    query = make("web.service.consul", edns=1)
    for _ in range(2):
        reply, _ = exchange(plain, query, tcp)
        assert reply.id == query.id
        assert reply.rcode() == dns.rcode.BADVERS
        assert reply.edns == 0  # the reply speaks the version we do
        assert reply.answer == []


# --- malformed packets ---------------------------------------------------------------------


def first_reply(server: MeshdnsProcess, packets: list[bytes]) -> bytes:
    """Send packets in order on one socket; the first datagram that comes back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        for packet in packets:
            s.sendto(packet, server.address)
        return s.recv(65535)


def test_dropped_packets_get_no_reply(plain: MeshdnsProcess) -> None:
    """A response (QR set) and a packet shorter than a header are dropped: the first reply on
    the socket is the one to the good query sent after them."""
    good = make("web.service.consul")
    response = make("web.service.consul")
    response.flags |= dns.flags.QR
    for bad in (response.to_wire(), b"\x12\x34\x01\x00\x00"):
        good.id = (good.id + 1) & 0xFFFF
        reply = first_reply(plain, [bad, good.to_wire()])
        assert reply[:2] == struct.pack("!H", good.id)


@pytest.mark.parametrize("name,packet", [
    ("no question", struct.pack("!6H", 0x4242, 0x0100, 0, 0, 0, 0)),
    ("two questions", struct.pack("!6H", 0x4242, 0x0100, 2, 0, 0, 0)
     + (b"\x03web\x07service\x06consul\x00\x00\x01\x00\x01") * 2),
    ("cut question", struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0) + b"\x03web\x07serv"),
    ("trailing bytes", struct.pack("!6H", 0x4242, 0x0100, 1, 0, 0, 0)
     + b"\x03web\x07service\x06consul\x00\x00\x01\x00\x01" + b"\x00\x00"),
])
def test_malformed_gets_formerr(plain: MeshdnsProcess, name: str, packet: bytes) -> None:
    for send in (plain.raw, plain.raw_tcp):
        for _ in range(2):
            raw = send(packet, timeout=3)
            assert raw is not None, name
            ident, flags = struct.unpack("!HH", raw[:4])
            assert ident == 0x4242 and flags & 0x8000
            assert flags & 0xF == dns.rcode.FORMERR


# --- the response cache changes nothing ----------------------------------------------------


CACHED = [
    ("web.service.consul", "A", None, 1232),
    ("web.service.consul", "SRV", 0, 1232),
    ("WEB.service.consul", "A", 0, 4096),
    ("big.service.consul", "A", None, 1232),
    ("big.service.consul", "SRV", 0, 512),
    ("nope.service.consul", "A", 0, 1232),
    ("web.service.consul", "AAAA", None, 1232),
    ("n07.node.consul", "A", 0, 1232),
    ("consul", "NS", None, 1232),
    ("www.example.com", "A", 0, 1232),
]


@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
@pytest.mark.parametrize("case", CACHED, ids=[f"{c[0]}/{c[1]}/edns={c[2]}" for c in CACHED])
def test_cache_changes_nothing(servers: dict, case: tuple, tcp: bool) -> None:
    """Asked again and again (cached) the reply holds what an uncached server says."""
    name, rtype, edns, payload = case
    cached, nocache = servers["plain"], servers["nocache"]
    big = name.startswith("big")
    for _ in range(5):
        for rd in (True, False):
            query = make(name, rtype, edns=edns, payload=payload, rd=rd)
            reply, raw = exchange(cached, query, tcp)
            assert reply.id == query.id
            assert bool(reply.flags & dns.flags.RD) == rd
            again, _ = exchange(nocache, query, tcp)
            got, want = sorted_sections(reply), sorted_sections(again)
            if big and not tcp:  # a trimmed set: which instances remain is random
                got, want = got[:4] + (len(got[4]),), want[:4] + (len(want[4]),)
                if rtype == "SRV":
                    assert_in_step(reply)
            assert got == want
            assert reply.question[0].name.to_text() == name + "."

