"""Sockets and the event loop: UDP and TCP listeners, recursor forwarding, snapshot swaps.

Everything DNS is decided by ``Responder``; this module moves bytes and swaps in the snapshots
a catalog source publishes (``catalog/source.py``). It knows nothing of files or HTTP.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import signal
import socket
import struct
import time
from collections.abc import Callable

from .catalog.snapshot import Snapshot, dismantle, empty_snapshot
from .catalog.source import CatalogSource, Change, SourceState
from .config import Config
from .errors import ConfigError
from .metrics import Metrics
from .offload import in_thread
from .packets import CompiledUdp, compiled_module
from .responder import REBUILD_AFTER, Execute, Forward, Responder
from .wire import plain_reply, truncated_reply, udp_limit

log = logging.getLogger("meshdns")

SAMPLE_EVERY = 64  # cache hits between two timed ones (timing every hit costs ~5%)

# TCP limits that need no tuning (the tunable ones are dns.tcp_* in the config)
TCP_WRITE_HIGH = 256 << 10  # bytes of unread replies before a connection stops being read
TCP_WRITE_LOW = 64 << 10  # ... and resumes
TCP_MAX_LIFETIME = 300.0  # seconds any connection may stay open, however busy
DRAIN_TIMEOUT = 5.0  # seconds SIGTERM waits for answers owed (well under Kubernetes' 30 s)
DRAIN_QUIET = 0.05  # seconds of nothing left to answer before a draining connection closes
FD_RESERVE = 64  # descriptors kept free for catalog reads, logs, listeners and the like
_ERROR_RCODES = frozenset({1, 4})  # FORMERR, NOTIMP: a frame like that is not a real query


class UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None
        # the cache's dict, emptied in place on reload, never replaced
        self.cache = server.responder.udp_cache.entries
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
        reply = self.reply(data, addr, miss)
        if reply is not None:
            self.transport.sendto(reply, addr)  # type: ignore[union-attr]
            if started:
                self.server.metrics.observe(time.perf_counter() - started)

    def reply(self, data: bytes, addr: tuple, miss: bytes | None = None) -> bytes | None:
        """The reply to send now to a datagram that is not a plain cache hit; None when there
        is none (dropped) or it comes later (a forward, a prepared query Consul executes: sent
        through the transport then). The compiled packet path (packets.py) calls this too."""
        responder = self.server.responder
        try:
            if miss is None:
                reply = responder.respond(data, False)
            else:
                reply = responder.respond_uncached(data, False, miss)
        except Exception:  # never die on a packet
            log.exception("internal error answering a UDP query")
            return None
        if reply is None or isinstance(reply, bytes):
            return reply
        if isinstance(reply, Forward):
            self.server.start_forward(reply, False, self._send_later(reply, addr))
        else:
            self.server.start_execute(reply, False, self._send_later(reply, addr))
        return None

    def _send_later(self, item: Forward | Execute, addr: tuple) -> Callable[[bytes], None]:
        """Send a reply made later (a recursor's, or after Consul executed a prepared query),
        cut to an empty TC reply past the UDP size we allow (a recursor sizes its reply for
        what the client advertised)."""
        limit = udp_limit(item.question, self.server.config.dns.max_udp_size)

        def send(reply: bytes) -> None:
            if len(reply) > limit:
                reply = truncated_reply(item.question, reply)
            if self.transport is not None and not self.transport.is_closing():
                self.transport.sendto(reply, addr)

        return send

    def error_received(self, exc: Exception) -> None:  # ICMP errors: nothing to do
        pass


class TcpProtocol(asyncio.Protocol):
    """Length-prefixed messages, answered in order; what one client can make it hold is
    bounded:

    - replies the client does not read: past TCP_WRITE_HIGH buffered bytes the connection is
      no longer read (so no more replies are made) until the client drains them to
      TCP_WRITE_LOW; if it has not within dns.tcp_idle_timeout, it is cut off;
    - idle time: only a complete query that gets a real answer counts as activity (empty or
      malformed frames do not keep a connection open), and no connection outlives
      TCP_MAX_LIFETIME;
    - connections: dns.tcp_max_connections_per_client per address, and a global cap that
      leaves file descriptors for everything else (DnsServer.tcp_limit).
    """

    def __init__(self, server: DnsServer) -> None:
        self.server = server
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.client = ""
        self.paused = False  # the client is not reading its replies
        self.draining = False  # SIGTERM: answer what was received, then close
        self.quiet = False  # draining, and nothing arrived since the last check
        self.forwards = 0  # forwarded queries whose reply is still owed
        self.opened = 0.0
        self.active = 0.0  # loop time of the last real query
        self._timer: asyncio.TimerHandle | None = None
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        server = self.server
        peer = transport.get_extra_info("peername")
        self.client = peer[0] if peer else ""
        per_client = server.tcp_clients.get(self.client, 0)
        if (len(server.tcp_connections) >= server.tcp_limit or server.draining
                or per_client >= server.config.dns.tcp_max_connections_per_client):
            server.metrics.tcp_refused += 1
            transport.abort()  # nothing was written: no reason to linger
            return
        server.tcp_connections.add(self)
        server.tcp_clients[self.client] = per_client + 1
        self.transport.set_write_buffer_limits(TCP_WRITE_HIGH, TCP_WRITE_LOW)  # type: ignore
        loop = asyncio.get_running_loop()
        self.opened = self.active = loop.time()
        self._timer = loop.call_later(server.config.dns.tcp_idle_timeout, self._check)

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        if self in server.tcp_connections:
            server.tcp_connections.discard(self)
            left = server.tcp_clients.get(self.client, 1) - 1
            if left > 0:
                server.tcp_clients[self.client] = left
            else:
                server.tcp_clients.pop(self.client, None)
        for timer in (self._timer, self._stall):
            if timer is not None:
                timer.cancel()
        self.buffer = bytearray()

    def _check(self) -> None:
        """The idle/lifetime timer: one per connection, re-aimed rather than re-created on
        every query (a timer per query would cost more than answering it)."""
        self._timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.draining:
            # nothing owed, and nothing arrived for DRAIN_QUIET (what the client had sent
            # before SIGTERM has been read by then); half a query is not waited for
            if self.forwards == 0 and self.quiet:
                self._close()
                return
            self.quiet = True
            self._timer = loop.call_later(DRAIN_QUIET, self._check)
            return
        idle_until = self.active + self.server.config.dns.tcp_idle_timeout
        if now >= idle_until or now >= self.opened + TCP_MAX_LIFETIME:
            if self.forwards and now < idle_until:  # past its lifetime but owed replies
                self._timer = loop.call_later(DRAIN_QUIET, self._check)
                return
            self._close()
            return
        self._timer = loop.call_at(min(idle_until, self.opened + TCP_MAX_LIFETIME), self._check)

    def _close(self) -> None:
        """Close; abort instead when replies sit unread (close would wait for them forever)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size():
            transport.abort()
        else:
            transport.close()

    def drain(self) -> None:
        """SIGTERM: stop taking new work once what was received is answered, then close."""
        self.draining = True
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(DRAIN_QUIET, self._check)

    def pause_writing(self) -> None:
        self.paused = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()
            self._stall = asyncio.get_running_loop().call_later(
                self.server.config.dns.tcp_idle_timeout, self._stalled)

    def resume_writing(self) -> None:
        self.paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()
            self._process()  # what arrived before reading stopped

    def _stalled(self) -> None:
        self._stall = None
        self.server.metrics.tcp_stalled += 1
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.quiet = False
        if not self.paused:
            self._process()

    def _process(self) -> None:
        buffer = self.buffer
        responder = self.server.responder
        real = False
        while len(buffer) >= 2 and not self.paused:
            size = (buffer[0] << 8) | buffer[1]
            if len(buffer) < 2 + size:
                break
            message = bytes(buffer[2:2 + size])
            del buffer[:2 + size]
            start = time.perf_counter()
            try:
                reply = responder.respond(message, True)
            except Exception:
                log.exception("internal error answering a TCP query")
                self._close()
                return
            if reply is None:
                continue
            if isinstance(reply, Forward):
                real = True
                self.forwards += 1
                self.server.start_forward(reply, True, self._forwarded)
                continue
            if isinstance(reply, Execute):
                real = True
                self.forwards += 1
                self.server.start_execute(reply, True, self._forwarded)
                continue
            if reply[3] & 0xF not in _ERROR_RCODES:
                real = True
            self._write(reply)
            self.server.metrics.observe(time.perf_counter() - start)
        if real:
            self.active = asyncio.get_running_loop().time()

    def _forwarded(self, reply: bytes) -> None:
        self.forwards -= 1
        self._write(reply)

    def _write(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(struct.pack("!H", len(reply)) + reply)


def bind_tcp_udp(host: str, port: int,
                 reuse_port: bool = False) -> tuple[socket.socket, socket.socket]:
    """A TCP and a UDP socket bound to the same address. TCP first, with SO_REUSEADDR (so
    connections in TIME_WAIT do not count): with port 0 the kernel picks a port, and UDP then
    takes the same one. On failure both are closed and the ``OSError`` is raised."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    tcp = socket.socket(family, socket.SOCK_STREAM)
    udp = socket.socket(family, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        tcp.bind((host, port))
        udp.bind((host, tcp.getsockname()[1]))
    except OSError:
        tcp.close()
        udp.close()
        raise
    return tcp, udp


class DnsServer:
    """Listeners on every configured address, a responder, and the snapshots a source
    publishes. Until the first one arrives the responder holds an empty snapshot and answers
    SERVFAIL in the domain."""

    def __init__(self, config: Config, source: CatalogSource,
                 reload_config: Callable[[], Config] | None = None) -> None:
        self.config = config
        self.source = source
        self.reload_config = reload_config  # SIGHUP: the config as the command line reads it
        self.metrics = Metrics()
        self.responder = Responder(config, empty_snapshot(config.datacenter), self.metrics)
        self.responder.serving = False  # no data yet
        # a source that executes prepared queries itself (Consul) answers them
        self.responder.prepared = getattr(source, "prepared", None)
        # a source that follows some services closer while they are asked (Consul's imported
        # services) is told which have cached answers
        follow = getattr(source, "follow_demand", None)
        if follow is not None:
            follow(self.responder.cached_services)
        # a cached reply's other answer orders are made between packets, not on the spot
        self.responder.defer = self._make_orders_soon
        self.transports: list[asyncio.BaseTransport] = []  # (or packets.CompiledUdp)
        self.packet_path = ""  # the UDP packet path serving, once started (packets.py)
        self.tcp_servers: list[asyncio.base_events.Server] = []
        self.tcp_connections: set[TcpProtocol] = set()
        self.tcp_clients: dict[str, int] = {}  # open connections by client address
        self.tcp_limit = config.dns.tcp_max_connections  # lowered by start() to fit the fds
        self.fd_room: int | None = None  # TCP connections the fds leave room for (start())
        self.draining = False
        self.pending_forwards = 0
        self.admin_port = 0  # set by admin.start_admin
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
        self.fd_room = tcp_fd_room(self.config)
        self.tcp_limit = tcp_connection_limit(self.config, self.fd_room)
        compiled, self.packet_path = compiled_module()
        for host, port in self.config.listen_addresses():
            try:
                tcp_sock, udp_sock = bind_tcp_udp(host, port, reuse_port)
            except OSError as exc:
                msg = f"cannot listen on {host}:{port}: {exc.strerror}"
                raise OSError(exc.errno, msg) from None
            port = tcp_sock.getsockname()[1]
            udp_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            tcp_sock.listen(512)
            tcp_sock.setblocking(False)
            udp_sock.setblocking(False)
            if compiled is not None:
                protocol = UdpProtocol(self)
                try:
                    listener = CompiledUdp(compiled, udp_sock, self.responder.udp_cache.entries,
                                           protocol.reply, self.metrics.observe, REBUILD_AFTER,
                                           SAMPLE_EVERY, self.responder)
                except (AttributeError, TypeError, ValueError, OSError) as exc:
                    # an extension out of step with cache.Cached, a socket it cannot serve
                    compiled, self.packet_path = None, f"pure Python (the extension refused: {exc})"
                else:
                    protocol.transport = listener  # type: ignore[assignment]
                    self.transports.append(listener)  # type: ignore[arg-type]
            if compiled is None:
                transport, _ = await loop.create_datagram_endpoint(
                    lambda: UdpProtocol(self), sock=udp_sock)
                self.transports.append(transport)
            self.tcp_servers.append(await loop.create_server(lambda: TcpProtocol(self),
                                                             sock=tcp_sock))
            self.bound.append((host, port))

    def start_forward(self, item: Forward, tcp: bool, send: Callable[[bytes], None]) -> None:
        """Forward to the recursors, or SERVFAIL at once when dns.recursor_max_pending
        forwards already wait (each holds a socket until its recursor answers or times out)."""
        if self.pending_forwards >= self.config.dns.recursor_max_pending:
            self.metrics.forward_rejected += 1
            send(plain_reply(item.question, 2, recursion_available=True))
            return
        self.pending_forwards += 1
        task = asyncio.ensure_future(self.forward(item, tcp, send))
        task.add_done_callback(self._forward_done)
        self._keep(task)

    def _forward_done(self, _: asyncio.Future[None]) -> None:
        self.pending_forwards -= 1

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

    def _make_orders_soon(self) -> None:
        self._keep(asyncio.ensure_future(self._make_orders()))

    async def _make_orders(self) -> None:
        """Walk Responder.refresh_steps, letting the loop read packets between steps."""
        responder = self.responder
        try:
            steps = responder.refresh_steps()
            while True:
                try:
                    next(steps)
                except StopIteration:
                    return
                except Exception:  # that job is dropped (the entry keeps what it has): go on
                    log.exception("internal error making a cached reply's answer orders")
                    steps = responder.refresh_steps()
                    continue
                await asyncio.sleep(0)
        finally:  # (ended, failed or cancelled: the next job queued starts a walk again)
            responder.refreshing = False

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
            except TimeoutError:  # (its socket is closed as _exchange is cancelled)
                self.metrics.forward_timeouts += 1
                log.debug("recursor %s:%s did not answer in %.3g s", host, port, timeout)
                continue
            except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
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
        """SIGHUP: read the server config again (when it came from a file), then the catalog."""
        if self.reload_config is not None:
            self.apply_config()
        await self.source.reload("SIGHUP")

    def apply_config(self) -> None:
        """Re-read the config; apply what can change while serving, log what cannot."""
        assert self.reload_config is not None
        try:
            new = self.reload_config()
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config reload refused, keeping the running config: %s", problem)
            return
        old = self.config
        changed = changed_settings(old, new)
        if not changed:
            log.info("config reloaded: no change")
            return
        restart = [name for name in changed if name in NEEDS_RESTART
                   or name.split(".")[0] in NEEDS_RESTART]
        # what needs a restart keeps its running value, so the config shown is the one in use
        new = new.model_copy(update={
            "listen": old.listen, "workers": old.workers,
            "admin": new.admin.model_copy(update={"listen": old.admin.listen})})
        self.config = new
        # the cap is read per connection; the fd room was measured at start
        self.tcp_limit = tcp_connection_limit(new, self.fd_room, warn=False)
        self.responder.reconfigure(new)
        logging.getLogger("meshdns").setLevel(new.log_level.upper())
        restart += self.source.reconfigure(new)
        live = [name for name in changed if name not in restart]
        if live:
            log.info("config reloaded: applied %s", ", ".join(live))
        if restart:
            log.warning("config reloaded: %s changed, which takes a restart to apply "
                        "(still using the old value)", ", ".join(restart))

    async def stop(self, drain: float = DRAIN_TIMEOUT) -> None:
        """Drain, then close: accept no more TCP connections, answer what was already received
        (forwards included) and close each connection once nothing is owed on it; after
        ``drain`` seconds, cut what is left. UDP is answered until the end of the drain."""
        self.draining = True
        for srv in self.tcp_servers:
            srv.close()
        for conn in list(self.tcp_connections):
            conn.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + drain
        while (self.tcp_connections or self.pending_forwards) and loop.time() < deadline:
            await asyncio.sleep(DRAIN_QUIET)
        if self.tcp_connections:
            log.warning("drain: %d TCP connections still open after %.3g s, closing them",
                        len(self.tcp_connections), drain)
        for conn in list(self.tcp_connections):
            if conn.transport:
                conn.transport.abort()
        for transport in self.transports:
            transport.close()
        for srv in self.tcp_servers:
            await srv.wait_closed()


def tcp_connection_limit(config: Config, room: int | None, warn: bool = True) -> int:
    """dns.tcp_max_connections, lowered to ``room`` (``tcp_fd_room``) if that is less."""
    if room is None:
        return config.dns.tcp_max_connections
    if room < config.dns.tcp_max_connections and warn:
        log.warning("open-file limit %d: at most %d TCP connections at once "
                    "(dns.tcp_max_connections is %d)", resource.getrlimit(
                        resource.RLIMIT_NOFILE)[0], room, config.dns.tcp_max_connections)
    return min(config.dns.tcp_max_connections, room)


def tcp_fd_room(config: Config) -> int | None:
    """How many TCP connections the open-file limit leaves room for, once there are still
    descriptors for the admin port's connections, pending forwards, catalog reloads and the
    listeners (at the cap a reload failing with EMFILE would leave stale data); None when
    there is no limit to read. Raises the soft RLIMIT_NOFILE to the hard one first, as most
    servers do: the default soft limit (often 1024) is for interactive shells."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            wanted = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
                soft = wanted
            except (ValueError, OSError):
                pass
    except (ValueError, OSError):  # pragma: no cover - no limit to read
        return None
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:  # pragma: no cover - not Linux
        in_use = 16
    others = (FD_RESERVE + in_use
              + (config.dns.recursor_max_pending if config.dns.recursors else 0)
              + (config.admin.max_connections + 1 if config.admin.listen else 0)
              + 2 * len(config.listen))
    return max(16, soft - others)


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
              admin: bool = True, reload_config: Callable[[], Config] | None = None) -> int:
    """Serve what ``source`` publishes until SIGTERM/SIGINT; SIGHUP reloads the catalog (and
    the config, with ``reload_config``)."""
    server = DnsServer(config, source, reload_config)
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
    if admin and config.admin.listen:
        # imported before the listeners open: importing aiohttp takes ~0.25 s, which stalled
        # the first queries a new server answered
        from . import admin as _admin  # noqa: F401
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
    log.info("UDP packet path: %s", server.packet_path)
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


#: Settings bound to sockets and processes at start-up.
NEEDS_RESTART = frozenset({"listen", "workers", "admin.listen", "admin.idle_timeout",
                           "catalog.consul"})  # (aiohttp takes its keep-alive timer once)


def changed_settings(old: Config, new: Config) -> list[str]:
    """Dotted names of the settings that differ (``dns.service_ttl``, ``listen``)."""
    a, b = old.model_dump(), new.model_dump()
    out = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) == b.get(key):
            continue
        if isinstance(a.get(key), dict) and isinstance(b.get(key), dict):
            out += [f"{key}.{sub}" for sub in sorted(set(a[key]) | set(b[key]))
                    if a[key].get(sub) != b[key].get(sub)]
        else:
            out.append(key)
    return out


def _source_ended(task: asyncio.Future[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("catalog source stopped: %s (serving its last snapshot)", task.exception())


__all__ = ["DnsServer", "install_uvloop", "run"]
