"""Sockets and the event loop: UDP and TCP listeners, recursor forwarding, snapshot swaps.

Everything DNS is decided by ``Responder``; this module moves bytes and swaps in the snapshots
a catalog source publishes (``catalog/source.py``). It knows nothing of files or HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import struct
import time
from collections.abc import Callable

from .catalog.snapshot import Snapshot, dismantle, empty_snapshot
from .catalog.source import CatalogSource, Change, SourceState
from .config import Config
from .metrics import Metrics
from .offload import in_thread
from .responder import REBUILD_AFTER, Execute, Forward, Responder
from .wire import plain_reply

log = logging.getLogger("meshdns")

TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP connection may sit without a complete query
TCP_MAX_CONNECTIONS = 1024
SAMPLE_EVERY = 64  # cache hits between two timed ones (timing every hit costs ~5%)


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        self.cache = server.responder.udp_cache  # emptied in place on reload, never replaced
        self._n = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        # The hot path: a cached reply, its next answer order, the query's ID patched in.
        # (Responder.cached_reply, inlined: a method call here costs ~10% of the throughput.)
        self._n += 1
        if self._n % SAMPLE_EVERY:
            key = data[2:]
            entry = self.cache.get(key)
            if entry is None:  # a miss: straight to the responder's miss path
                self._answer(data, addr, 0.0, key)
            elif entry.pending is None and entry.turn - entry.start < REBUILD_AFTER:
                turn = entry.turn
                entry.turn = turn + 1
                replies = entry.replies
                self.transport.sendto(data[:2] + replies[turn % len(replies)], addr)  # type: ignore
            else:
                self._answer(data, addr, 0.0)
        else:
            self._answer(data, addr, time.perf_counter())

    def _answer(self, data: bytes, addr: tuple, started: float, miss: bytes | None = None) -> None:
        """Everything else: misses (``miss``: the cache key looked up in vain), first repeats,
        drops, errors, forwards; timed if started."""
        responder = self.server.responder
        try:
            if miss is None:
                reply = responder.respond(data, False)
            else:
                reply = responder.respond_uncached(data, False, miss)
        except Exception:  # never die on a packet
            log.exception("internal error answering a UDP query")
            return
        if reply is None:
            return
        if isinstance(reply, Forward):
            self.server.start_forward(reply, False, self._send(addr))
            return
        if isinstance(reply, Execute):
            self.server.start_execute(reply, False, self._send(addr))
            return
        self.transport.sendto(reply, addr)  # type: ignore[union-attr]
        if started:
            self.server.metrics.observe(time.perf_counter() - started)

    def _send(self, addr: tuple) -> Callable[[bytes], None]:
        return lambda reply: self.transport.sendto(reply, addr)  # type: ignore[union-attr]

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do
        pass


class TcpProtocol(asyncio.Protocol):
    """Length-prefixed messages; replies in order; closes idle or abusive connections."""

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if len(self.server.tcp_connections) >= TCP_MAX_CONNECTIONS:
            transport.close()
            return
        self.server.tcp_connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.tcp_connections.discard(self)
        if self.idle:
            self.idle.cancel()

    def _arm(self) -> None:
        if self.idle:
            self.idle.cancel()
        loop = asyncio.get_running_loop()
        self.idle = loop.call_later(TCP_IDLE_TIMEOUT, self.transport.close)  # type: ignore

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= 2:
            size = struct.unpack_from("!H", self.buffer)[0]
            if len(self.buffer) < 2 + size:
                break
            message = bytes(self.buffer[2:2 + size])
            del self.buffer[:2 + size]
            self._arm()
            start = time.perf_counter()
            try:
                reply = self.server.responder.respond(message, True)
            except Exception:
                log.exception("internal error answering a TCP query")
                self.transport.close()  # type: ignore[union-attr]
                return
            if reply is None:
                continue
            if isinstance(reply, Forward):
                self.server.start_forward(reply, True, self._write)
                continue
            if isinstance(reply, Execute):
                self.server.start_execute(reply, True, self._write)
                continue
            self._write(reply)
            self.server.metrics.observe(time.perf_counter() - start)

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(reply)) + reply)


class DnsServer:
    """Listeners on every configured address, a responder, and the snapshots a source
    publishes. Until the first one arrives the responder holds an empty snapshot and answers
    SERVFAIL in the domain."""

    def __init__(self, config: Config, source: CatalogSource) -> None:
        self.config = config
        self.source = source
        self.metrics = Metrics()
        self.responder = Responder(config, empty_snapshot(config.datacenter), self.metrics)
        self.responder.serving = False  # no data yet
        # a source that executes prepared queries itself (Consul) answers them
        self.responder.prepared = getattr(source, "prepared", None)
        self.transports: list[asyncio.BaseTransport] = []
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp_connections: set[TcpProtocol] = set()
        self.bound: list[tuple[str, int]] = []
        # tasks in flight (forwards, retiring snapshots): the loop keeps only weak references
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def snapshot(self) -> Snapshot:
        return self.responder.snapshot

    @property
    def state(self) -> SourceState:
        """What the source says about itself (``/ready``, ``/v1/catalog``)."""
        return self.source.state

    def publish(self, snapshot: Snapshot, change: Change) -> None:
        """The source's ``publish``: serve ``snapshot`` from now on and retire the old one."""
        old = self.responder.snapshot
        self.responder.swap(snapshot, change)  # (the source froze it out of the GC's sight)
        self.responder.serving = self.source.state.serving
        self.metrics.generation = snapshot.generation
        self.metrics.loaded_at = snapshot.loaded_at
        if old is not snapshot:
            if old.generation:  # not the empty snapshot of the start
                self.metrics.reloads += 1
            self._retire(old)

    async def start(self, reuse_port: bool = False) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.config.listen_addresses():
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            # TCP first: with port 0 the kernel picks a port, and UDP then takes the same one
            tcp_sock = socket.socket(family, socket.SOCK_STREAM)
            tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                tcp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            udp_sock = socket.socket(family, socket.SOCK_DGRAM)
            if reuse_port:
                udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                tcp_sock.bind((host, port))
                port = tcp_sock.getsockname()[1]
                udp_sock.bind((host, port))
            except OSError as exc:
                tcp_sock.close()
                udp_sock.close()
                msg = f"cannot listen on {host}:{port}: {exc.strerror}"
                raise OSError(exc.errno, msg) from None
            udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            tcp_sock.listen(512)
            tcp_sock.setblocking(False)
            udp_sock.setblocking(False)
            transport, _ = await loop.create_datagram_endpoint(
                lambda: UdpProtocol(self), sock=udp_sock)
            self.transports.append(transport)
            self.tcp_servers.append(await loop.create_server(lambda: TcpProtocol(self),
                                                             sock=tcp_sock))
            self.bound.append((host, port))

    def start_forward(self, item: Forward, tcp: bool, send: Callable[[bytes], None]) -> None:
        self._keep(asyncio.ensure_future(self.forward(item, tcp, send)))

    def start_execute(self, item: Execute, tcp: bool, send: Callable[[bytes], None]) -> None:
        self._keep(asyncio.ensure_future(self.execute(item, tcp, send)))

    async def execute(self, item: Execute, tcp: bool, send: Callable[[bytes], None]) -> None:
        """A prepared query Consul executes (Consul mode): await the result, answer again."""
        prepared = self.responder.prepared
        ok = False
        try:
            ok = await prepared.execute(item.name, item.datacenter)
        except Exception:  # never lose a query to a bug: SERVFAIL it
            log.exception("internal error executing prepared query %s", item.name)
        reply = self.responder.respond(item.data, tcp) if ok else None
        if not isinstance(reply, bytes):
            reply = plain_reply(item.question, 2, self.responder.recursion)
        send(reply)

    def _keep(self, task: asyncio.Future[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def forward(self, item: Forward, tcp: bool, send: Callable[[bytes], None]) -> None:
        """Ask the recursors in turn; pass back the first NOERROR/NXDOMAIN reply."""
        question = item.question
        timeout = self.config.dns.recursor_timeout
        for host, port in self.config.dns.recursor_addresses():
            try:
                reply = await asyncio.wait_for(
                    _exchange(item.data, host, port, tcp), timeout)
            except (TimeoutError, OSError, ValueError) as exc:
                log.debug("recursor %s:%s failed: %s", host, port, exc)
                continue
            if len(reply) >= 12 and reply[:2] == item.data[:2] and reply[3] & 0xF in (0, 3):
                send(reply)
                return
        self.metrics.forward_failures += 1
        send(plain_reply(question, 2, recursion_available=True))

    def _retire(self, old: Snapshot) -> None:
        """Free the snapshot just replaced without stalling the event loop (see dismantle)."""
        self._keep(in_thread(lambda: dismantle(old), "meshdns-retire"))

    async def hangup(self) -> None:
        """SIGHUP: read the catalog again."""
        await self.source.reload("SIGHUP")

    async def stop(self) -> None:
        for transport in self.transports:
            transport.close()
        for srv in self.tcp_servers:
            srv.close()
        for conn in list(self.tcp_connections):
            if conn.transport:
                conn.transport.close()
        for srv in self.tcp_servers:
            await srv.wait_closed()


async def _exchange(data: bytes, host: str, port: int, tcp: bool) -> bytes:
    loop = asyncio.get_running_loop()
    if tcp:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(data)) + data)
            size = struct.unpack("!H", await reader.readexactly(2))[0]
            return await reader.readexactly(size)
        finally:
            writer.close()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    future: asyncio.Future[bytes] = loop.create_future()

    class _Client(asyncio.DatagramProtocol):
        def datagram_received(self, reply: bytes, addr: tuple) -> None:
            if not future.done() and reply[:2] == data[:2]:
                future.set_result(reply)

        def error_received(self, exc: Exception) -> None:
            if not future.done():
                future.set_exception(exc)

    transport, _ = await loop.create_datagram_endpoint(
        _Client, remote_addr=(host, port), family=family)
    try:
        transport.sendto(data)
        return await future
    finally:
        transport.close()


async def freeze_survivors(interval: float = 1.0) -> None:
    """Every second, move what survived (cached replies, mostly) out of the cyclic
    collector's sight, so each collection walks only the last second's objects. They are
    still freed by reference counting when evicted."""
    while True:
        await asyncio.sleep(interval)
        gc.freeze()


def install_uvloop() -> str:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def run(config: Config, source: CatalogSource,
              ready: Callable[[DnsServer], None] | None = None, reuse_port: bool = False,
              admin: bool = True) -> int:
    """Serve what ``source`` publishes until SIGTERM/SIGINT; SIGHUP reloads the catalog."""
    server = DnsServer(config, source)
    # Started before the listeners open: a source with data at hand (a file read at start-up)
    # publishes it before its first await, so the first query already finds it.
    follower = asyncio.ensure_future(source.run(server.publish))
    follower.add_done_callback(_source_ended)
    await asyncio.sleep(0)
    gc.collect()
    gc.freeze()  # what start-up built lives as long as the process
    # Answers, replies and cache entries are freed by reference counting (they form no cycles).
    # The cyclic collector every 700 allocations cost ~15% of a cache miss; every 70,000 it
    # paused the loop ~10 ms each time (bench/run.py cold: p99 18 ms). So: every 10,000, and
    # what survives a second (cache entries) is frozen out of its sight (freeze_survivors).
    gc.set_threshold(10_000, 10, 10)
    await server.start(reuse_port=reuse_port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: server._keep(
        asyncio.ensure_future(server.hangup())))
    admin_runner = None
    if admin and config.admin.listen:
        from .admin import start_admin

        admin_runner = await start_admin(server, config.admin.listen)
    for host, port in server.bound:
        shown = f"[{host}]" if ":" in host else host
        log.info("serving DNS on %s:%d (udp, tcp), pid %d", shown, port, os.getpid())
    if ready:
        ready(server)
    freezer = asyncio.ensure_future(freeze_survivors())
    await stop.wait()
    log.info("stopping: draining TCP connections")
    follower.cancel()
    freezer.cancel()
    await server.stop()
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("stopped")
    return 0


def _source_ended(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("catalog source stopped: %s (serving its last snapshot)", task.exception())


__all__ = ["DnsServer", "install_uvloop", "run"]
