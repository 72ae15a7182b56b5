"""Sockets and the event loop: UDP and TCP listeners, recursor forwarding, catalog reloads.

Everything DNS is decided by ``Responder``; this module moves bytes and swaps snapshots.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .catalog.file import file_signature, load_snapshot
from .catalog.snapshot import Snapshot, dismantle
from .config import Config
from .errors import ConfigError
from .metrics import Metrics
from .responder import REBUILD_AFTER, Forward, Responder
from .wire import plain_reply

log = logging.getLogger("meshdns")

TCP_IDLE_TIMEOUT = 10.0  # seconds a TCP connection may sit without a complete query
TCP_MAX_CONNECTIONS = 1024
SAMPLE_EVERY = 64  # cache hits between two timed ones (timing every hit costs ~5%)
CATALOG_SETTLE = 0.1  # seconds a file rewritten in place must stay unchanged before it is read


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
            self._write(reply)
            self.server.metrics.observe(time.perf_counter() - start)

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(reply)) + reply)


class DnsServer:
    """Listeners on every configured address, a responder, and the catalog reload loop."""

    def __init__(self, config: Config, snapshot: Snapshot, catalog_path: Path | None) -> None:
        self.config = config
        self.metrics = Metrics(generation=snapshot.generation, loaded_at=snapshot.loaded_at)
        self.responder = Responder(config, snapshot, self.metrics)
        self.catalog_path = catalog_path
        self.transports: list[asyncio.BaseTransport] = []
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp_connections: set[TcpProtocol] = set()
        self.bound: list[tuple[str, int]] = []
        self.last_reload_error: str | None = None
        self.reload_failing_since: float | None = None  # wall time of the first failed reload
        self._signature = file_signature(catalog_path) if catalog_path else None
        self._reloading = False
        self._stopping = asyncio.Event()
        # tasks in flight (forwards, retiring snapshots): the loop keeps only weak references
        self._tasks: set[asyncio.Future[None]] = set()

    @property
    def snapshot(self) -> Snapshot:
        return self.responder.snapshot

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

    # --- catalog reloads -----------------------------------------------------------------

    async def watch_catalog(self) -> None:
        """Poll the catalog file's identity; reload when it changes. A file replaced atomically
        is read at once; one rewritten in place must first hold still for ``CATALOG_SETTLE``
        (meanwhile it is empty or half-written)."""
        if self.catalog_path is None:
            return
        interval = self.config.catalog.poll_interval
        while not self._stopping.is_set():
            await asyncio.sleep(interval)
            signature = file_signature(self.catalog_path)
            if signature is None or signature == self._signature:
                continue
            # A new inode is an atomic replace (rename, a ConfigMap's symlink flip): complete.
            # The same inode changed is a rewrite in place, which may still be under way.
            if self._signature is not None and signature[0] == self._signature[0]:
                await asyncio.sleep(CATALOG_SETTLE)
                if file_signature(self.catalog_path) != signature:
                    continue
            await self.reload("file changed")

    async def reload(self, why: str) -> bool:
        """Build a new snapshot off the event loop and swap it in; keep the old one on error."""
        if self.catalog_path is None or self._reloading:
            return False
        self._reloading = True
        path = self.catalog_path
        try:
            signature = file_signature(path)
            started = time.perf_counter()
            snapshot = await asyncio.to_thread(self._build, path)
        except ConfigError as exc:
            self._signature = signature
            self.metrics.reload_errors += 1
            self.last_reload_error = str(exc)
            if self.reload_failing_since is None:
                self.reload_failing_since = time.time()
            for problem in exc.problems:
                log.error("catalog reload refused, still serving generation %d: %s",
                          self.snapshot.generation, problem)
            return False
        finally:
            self._reloading = False
        self._signature = signature
        old = self.snapshot
        self.responder.swap(snapshot)  # (load_snapshot froze it out of the cyclic GC's sight)
        self._retire(old)
        del old
        self.last_reload_error = None
        self.reload_failing_since = None
        self.metrics.reloads += 1
        self.metrics.generation = snapshot.generation
        self.metrics.loaded_at = snapshot.loaded_at
        log.info("catalog reloaded (%s): generation %d, %d nodes, %d instances in %.0f ms",
                 why, snapshot.generation, snapshot.counts["nodes"],
                 snapshot.counts["instances"], (time.perf_counter() - started) * 1000)
        return True

    def _retire(self, old: Snapshot) -> None:
        """Free the snapshot just replaced without stalling the event loop (see dismantle)."""
        self._keep(asyncio.ensure_future(asyncio.to_thread(self._dismantle, old)))

    @staticmethod
    def _dismantle(old: Snapshot) -> None:
        with gil_handed_back():
            dismantle(old)

    def _build(self, path: Path) -> Snapshot:
        """Runs in a worker thread, handing the GIL back to the event loop often enough that
        queries keep flowing while a large catalog loads."""
        with gil_handed_back():
            return load_snapshot(path, local_datacenter=self.config.datacenter,
                                 vip_range=self.config.virtual_ip_range,
                                 previous=self.snapshot, yielding=True)

    async def stop(self) -> None:
        self._stopping.set()
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


_gil_lock = threading.Lock()
_gil_users = 0
_gil_interval = 0.005


@contextmanager
def gil_handed_back(interval: float = 0.0005) -> Iterator[None]:
    """While a worker thread does long Python work (a reload, freeing a snapshot), make the
    interpreter switch threads every ``interval`` so the event loop waits at most that long
    for the GIL. Counted, so overlapping users restore the original setting only once."""
    global _gil_users, _gil_interval
    with _gil_lock:
        if _gil_users == 0:
            _gil_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_gil_interval, interval))
        _gil_users += 1
    try:
        yield
    finally:
        with _gil_lock:
            _gil_users -= 1
            if _gil_users == 0:
                sys.setswitchinterval(_gil_interval)


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


async def run(config: Config, snapshot: Snapshot, catalog_path: Path | None,
              ready: Callable[[DnsServer], None] | None = None, reuse_port: bool = False,
              admin: bool = True) -> int:
    """Serve until SIGTERM/SIGINT; SIGHUP reloads the catalog."""
    server = DnsServer(config, snapshot, catalog_path)
    gc.collect()
    gc.freeze()  # see DnsServer.reload
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
    loop.add_signal_handler(signal.SIGHUP,
                            lambda: asyncio.ensure_future(server.reload("SIGHUP")))
    admin_runner = None
    if admin and config.admin.listen:
        from .admin import start_admin

        admin_runner = await start_admin(server, config.admin.listen)
    for host, port in server.bound:
        shown = f"[{host}]" if ":" in host else host
        log.info("serving DNS on %s:%d (udp, tcp), pid %d", shown, port, os.getpid())
    if ready:
        ready(server)
    watcher = asyncio.ensure_future(server.watch_catalog())
    freezer = asyncio.ensure_future(freeze_survivors())
    await stop.wait()
    log.info("stopping: draining TCP connections")
    watcher.cancel()
    freezer.cancel()
    await server.stop()
    if admin_runner is not None:
        await admin_runner.cleanup()
    log.info("stopped")
    return 0


__all__ = ["DnsServer", "install_uvloop", "run"]
