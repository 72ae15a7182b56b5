"""Fixed-rate DNS latency prober: one client, per-query latencies, mean/p50/p99.

    python3 bench/latency.py --server 127.0.0.1:PORT --file QUERIES --rate 2000 --seconds 5

QUERIES is a dnsperf query file ("name TYPE" a line), cycled. Sends at `--rate` queries per
second from one UDP socket (or one pipelined TCP connection with --tcp), matches replies by
message ID and prints one JSON object. Uses uvloop when installed.

The bench's default p99 source is `dnsperf -v` at a fixed rate (a C client that prints each
query's latency); this prober is the alternative (`run.py --p99-tool prober`) and a handy
stand-alone check. Being Python, it adds its own few tens of microseconds and tops out around
10-20k queries/s on one core: read its figures as "at most".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from dnsmsg import build_query, parse_header
from zone import read_queries


def summarize(latencies: list[float], sent: int, rcodes: dict[str, int], elapsed: float) -> dict:
    lat = sorted(latencies)

    def pct(p: float) -> float | None:
        if not lat:
            return None
        return lat[min(len(lat) - 1, max(0, round(p / 100 * len(lat)) - 1))] * 1000

    return {
        "sent": sent,
        "completed": len(lat),
        "lost": sent - len(lat),
        "elapsed_s": round(elapsed, 3),
        "achieved_qps": round(sent / elapsed, 1) if elapsed else 0.0,
        "mean_ms": sum(lat) / len(lat) * 1000 if lat else None,
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "p999_ms": pct(99.9),
        "max_ms": lat[-1] * 1000 if lat else None,
        "rcodes": rcodes,
    }


class _Tracker:
    """Outstanding queries by 16-bit ID; a reused ID still outstanding counts as lost."""

    def __init__(self) -> None:
        self.pending: dict[int, float] = {}
        self.latencies: list[float] = []
        self.rcodes: dict[str, int] = {}

    def sent(self, qid: int) -> None:
        self.pending[qid] = time.perf_counter()

    def received(self, data: bytes) -> None:
        now = time.perf_counter()
        header = parse_header(data)
        if header is None:
            return
        start = self.pending.pop(header.qid, None)
        if start is None:
            return
        self.latencies.append(now - start)
        self.rcodes[header.rcode] = self.rcodes.get(header.rcode, 0) + 1


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, tracker: _Tracker) -> None:
        self.tracker = tracker

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.tracker.received(data)


async def _paced(send, queries, rate: float, seconds: float, count: int, tracker, edns: int):
    """Send at `rate`/s in 1 ms ticks until `seconds` pass or `count` are sent."""
    packets = [build_query(name, qtype, 0, edns) for name, qtype in queries]
    start = time.perf_counter()
    sent = 0
    i = 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= seconds or (count and sent >= count):
            break
        due = int(elapsed * rate) + 1
        while sent < due and not (count and sent >= count):
            qid = sent & 0xFFFF
            tracker.sent(qid)
            packet = packets[i]
            send(struct.pack("!H", qid) + packet[2:])
            sent += 1
            i = (i + 1) % len(packets)
        await asyncio.sleep(0.001)
    return sent, time.perf_counter() - start


async def probe(
    host: str,
    port: int,
    queries: list[tuple[str, str]],
    rate: float,
    seconds: float,
    count: int = 0,
    timeout: float = 1.0,
    tcp: bool = False,
    edns: int = 0,
) -> dict:
    loop = asyncio.get_running_loop()
    tracker = _Tracker()
    if tcp:
        reader, writer = await asyncio.open_connection(host, port)

        async def read_replies() -> None:
            try:
                while True:
                    (length,) = struct.unpack("!H", await reader.readexactly(2))
                    tracker.received(await reader.readexactly(length))
            except (asyncio.IncompleteReadError, ConnectionError):
                return

        reader_task = asyncio.ensure_future(read_replies())

        def send(packet: bytes) -> None:
            writer.write(struct.pack("!H", len(packet)) + packet)

        sent, elapsed = await _paced(send, queries, rate, seconds, count, tracker, edns)
        await _drain(tracker, timeout)
        writer.close()
        reader_task.cancel()
    else:
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpProtocol(tracker), remote_addr=(host, port)
        )
        sent, elapsed = await _paced(transport.sendto, queries, rate, seconds, count, tracker, edns)
        await _drain(tracker, timeout)
        transport.close()
    return summarize(tracker.latencies, sent, tracker.rcodes, elapsed)


async def _drain(tracker: _Tracker, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while tracker.pending and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)


def main() -> int:
    parser = argparse.ArgumentParser(description="fixed-rate DNS latency prober")
    parser.add_argument("--server", default="127.0.0.1:8600", help="HOST:PORT")
    parser.add_argument("--file", required=True, type=Path, help="dnsperf-format query file")
    parser.add_argument("--rate", type=float, default=1000.0, help="queries per second")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to send")
    parser.add_argument("--count", type=int, default=0, help="stop after this many (0: no cap)")
    parser.add_argument("--timeout", type=float, default=1.0, help="wait for stragglers")
    parser.add_argument("--tcp", action="store_true", help="one pipelined TCP connection")
    parser.add_argument("--edns", type=int, default=0, help="advertise this EDNS UDP size")
    args = parser.parse_args()
    host, _, port = args.server.rpartition(":")
    queries = read_queries(args.file)
    if not queries:
        parser.error(f"{args.file}: no queries")
    try:
        import uvloop  # type: ignore[import-not-found]

        run = uvloop.run
    except (ImportError, AttributeError):
        run = asyncio.run
    result = run(
        probe(
            host,
            int(port),
            queries,
            args.rate,
            args.seconds,
            args.count,
            args.timeout,
            args.tcp,
            args.edns,
        )
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
