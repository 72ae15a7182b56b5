"""A plain dnslib `DNSServer` answering the bench zone: the "naive Python" baseline.

    python3 bench/dnslib_baseline.py --records FILE --listen 127.0.0.1:PORT

FILE is the JSON written by zone.write_dnslib_records: {"A": {name: [ip]}, "SRV": {name:
[[prio, weight, port, target]]}}. Answers A and SRV (with the targets' A records as additional),
NXDOMAIN for unknown names under the zone, over UDP and TCP. Two small changes to stock dnslib
so the comparison is fair: UDP replies are trimmed to the client's advertised size (512 without
EDNS), and a TCP connection may carry many queries (stock dnslib answers one and closes).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import threading
from pathlib import Path

from dnslib import QTYPE, RCODE, RR, SRV, A, DNSRecord
from dnslib.server import BaseResolver, DNSHandler, DNSServer

ZONE = "consul."


class ZoneResolver(BaseResolver):
    def __init__(self, records: dict[str, dict[str, list]]) -> None:
        self.a = {k.lower().rstrip(".") + ".": v for k, v in records.get("A", {}).items()}
        self.srv = {k.lower().rstrip(".") + ".": v for k, v in records.get("SRV", {}).items()}

    def resolve(self, request: DNSRecord, handler: DNSHandler) -> DNSRecord:
        reply = request.reply()
        qname = request.q.qname
        key = str(qname).lower()
        qtype = QTYPE[request.q.qtype]
        if not key.endswith(ZONE) and key != ZONE:
            reply.header.rcode = RCODE.REFUSED
            return reply
        reply.header.aa = 1
        if key not in self.a and key not in self.srv:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        if qtype == "A":
            for address in self.a.get(key, []):
                reply.add_answer(RR(qname, QTYPE.A, rdata=A(address), ttl=0))
        elif qtype == "SRV":
            for prio, weight, port, target in self.srv.get(key, []):
                reply.add_answer(
                    RR(qname, QTYPE.SRV, rdata=SRV(prio, weight, port, target + "."), ttl=0)
                )
                for address in self.a.get(target.lower() + ".", []):
                    reply.add_ar(RR(target + ".", QTYPE.A, rdata=A(address), ttl=0))
        return reply


class QuietLogger:
    def __getattr__(self, name: str):  # every log_* hook is a no-op
        return lambda *args, **kwargs: None


class FairHandler(DNSHandler):
    def handle(self) -> None:
        if self.server.socket_type == socket.SOCK_STREAM:
            self.protocol = "tcp"
            self._serve_tcp()
            return
        self.protocol = "udp"
        data, connection = self.request
        try:
            connection.sendto(self.get_reply(data), self.client_address)
        except Exception as exc:  # noqa: BLE001 - malformed packet: drop it, keep serving
            print(f"dropped a query: {exc}", file=sys.stderr)

    def _serve_tcp(self) -> None:
        sock = self.request
        buf = b""
        while True:
            while len(buf) >= 2 and len(buf) - 2 >= struct.unpack("!H", buf[:2])[0]:
                length = struct.unpack("!H", buf[:2])[0]
                message, buf = buf[2 : 2 + length], buf[2 + length :]
                try:
                    reply = self.get_reply(message)
                except Exception:  # noqa: BLE001
                    return
                sock.sendall(struct.pack("!H", len(reply)) + reply)
            chunk = sock.recv(65536)
            if not chunk:
                return
            buf += chunk

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        packed = reply.pack()
        if self.protocol == "udp":
            limit = 512
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(512, rr.rclass)
            if len(packed) > limit:
                packed = reply.truncate().pack()
        return packed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True, type=Path)
    parser.add_argument("--listen", default="127.0.0.1:8600")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    resolver = ZoneResolver(json.loads(args.records.read_text()))
    servers = [
        DNSServer(
            resolver,
            address=host,
            port=int(port),
            tcp=tcp,
            logger=QuietLogger(),
            handler=FairHandler,
        )
        for tcp in (False, True)
    ]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    for server in servers:
        server.start_thread()
    print(f"dnslib baseline listening on {host}:{port} (udp, tcp)", file=sys.stderr, flush=True)
    stop.wait()
    for server in servers:
        server.server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
