"""The Consul catalog source: follow a Consul cluster and publish snapshots as it changes.

How it stays bounded whatever the number of services N (requests in flight depend on the
number of scopes and the fetch pool, never on N):

- a *scope* is a datacenter (local or WAN-federated) x partition x namespace, or a cluster peer
  x partition x namespace. Per scope, two blocking watches say *which* services changed: the
  service list (``/v1/catalog/services``: names added or removed, tags) and the checks of the
  scope that are not passing (``/v1/health/state/any`` with ``filter=Status != "passing"``: a
  service whose checks entered or left that set, or changed status in it, or a node whose node
  checks did, which changes every service on it). An instance's health is its worst check, so
  the checks that are not passing say all of it; a check going back to passing leaves the set.
  Following only those keeps each wake-up's body the size of what is unhealthy, not of the
  catalog (every check write wakes every scope's watch: the index is the checks table's).
  Per datacenter x partition, a blocking watch on ``/v1/catalog/nodes`` follows ``.node``
  names;
- a fixed pool of fetchers re-reads only the changed services (``/v1/health/service/<name>``)
  and the result replaces just their entries in the snapshot (``snapshot.apply_update``), so a
  change reaches DNS within one blocking return plus one fetch;
- the topology (datacenters, partitions, namespaces, peerings) is polled with jitter; on Consul
  CE the Enterprise endpoints answer 404, which means "only default";
- ``service-resolver`` and ``sameness-group`` config entries (blocking) become the failover
  that ``resolve.py`` already follows.

A service list that wakes with a new index but the same body means a registration changed
without changing the set of checks that are not passing (an address, a port, a virtual IP, or
an instance added or removed with only passing checks): Consul does not say which, so the
scope is re-read whole, at most once per ``RESCAN_INTERVAL``, through the same fetcher pool
(bodies identical to the applied ones are not decoded). Agents register a new check as
critical unless it says otherwise, so a new instance usually enters the set, and its own
services are re-read at once.

Cluster peers: ``/v1/health/state`` has no ``peer`` parameter (Consul answers the local checks
whatever it says), so a peer scope has only its service-list watch (``?peer=``: imported
services added or removed, tags; a same-body wake-up re-reads the scope as above), and the
health of its imported services is followed per service through ``/v1/health/service/<s>
?peer=``, in two bounded ways:

- *demand*: an imported service whose answers sit in the response cache (the server says which
  names do, ``follow_demand``) gets a blocking watch of its own, so a change to a service that
  is being asked reaches DNS within one blocking return. Watches go to the blocking-lane slots
  the scopes leave free (never more than ``max_requests`` in all); a service keeps its watch
  ``DEMAND_HOLD`` seconds after its answers left the cache (a change drops them, and the next
  ask brings them back);
- *sweep*: every other imported service is re-read in turn, ``PEER_SWEEP_RATE`` a second at
  most, a round at least every ``PEER_SWEEP_MIN`` seconds (bodies equal to the applied ones
  are not decoded). A service asked for the first time answers from its last re-read, then from
  its own watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Container
from typing import Any

from cachetools import TTLCache

from ...config import Config
from ...metrics import Family
from ..model import SamenessGroup, Target
from ..snapshot import (
    Instance,
    NodeKey,
    NodeRecord,
    ServiceKey,
    Snapshot,
    Update,
    apply_update,
    empty_snapshot,
)
from ..source import EVERYTHING, Change, Publish, SourceState
from . import mapping
from .client import ConsulClient, ConsulError, body_digest, fetch_pool_size
from .mapping import NOT_PASSING, Malformed, Scope
from .queries import PreparedQueries
from .watch import Backoff, Watch, WatchStats

log = logging.getLogger("meshdns.consul")

TOPOLOGY_POLL = 30.0  # seconds between reads of datacenters, partitions, namespaces, peerings
RESCAN_INTERVAL = 10.0  # at most one whole re-read of a scope this often
POLL_WHEN_FULL = 5.0  # seconds between polls of a watch the blocking lane has no room for
FLUSH_DELAY = 0.005  # results arriving within this are published as one snapshot
RETRY_CAP = 5.0  # seconds between retries of a service whose fetch keeps failing
STALE_LOG_EVERY = 60.0
# Imported services (see "Cluster peers" above):
PEER_SWEEP_RATE = 20.0  # re-reads per second at most by the sweep of every imported service
PEER_SWEEP_MIN = 5.0  # seconds: the sweep's shortest round (a peer with few services)
DEMAND_POLL = 1.0  # seconds between looks at which imported services have cached answers
DEMAND_HOLD = 120.0  # seconds a service keeps its watch after its answers left the cache
DEMAND_SPARE = 2  # blocking-lane slots left free for scopes the topology may add


class ScopeWatch:
    """The watches of one scope and what they last said."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.names: dict[str, tuple[str, ...]] | None = None  # None: not read yet
        self.node_services: dict[str, set[str]] = {}  # node name -> service names on it
        self.check_changes: list[int] = []  # indexes at which the checks changed (recent)
        self.tasks: list[asyncio.Task[None]] = []
        self.watches: list[Watch] = []
        self.initial: set[str] = set()  # services of the first read not fetched yet
        self.synced = False  # first read done and fetched
        self.last_rescan = 0.0
        self.rescan_pending = False


class ConsulCatalogSource:
    """``catalog.consul``: the ``CatalogSource`` that follows a Consul cluster."""

    kind = "consul"

    def __init__(self, config: Config) -> None:
        assert config.catalog.consul is not None
        self.config = config
        self.settings = config.catalog.consul
        self.state = SourceState("consul", ready=False, serving=False)
        self.snapshot: Snapshot = empty_snapshot(config.datacenter)
        self.local_dc = (self.settings.datacenter or config.datacenter).lower()
        self.client: ConsulClient | None = None
        self.prepared = PreparedQueries(self)  # the server hands it to the responder
        self.scopes: dict[Scope, ScopeWatch] = {}
        self.node_watches: dict[tuple[str, str], tuple[asyncio.Task[None], Watch]] = {}
        self.config_watches: dict[str, list[tuple[asyncio.Task[None], Watch]]] = {}
        self.topology = WatchStats("topology", {})
        self.datacenters: list[str] = []
        self.partitions: list[str] = []
        self.peers: dict[str, list[str]] = {}  # partition -> peers
        self.namespaces: dict[str, list[str]] = {}  # partition -> namespaces
        self.resolvers: dict[str, Any] = {}  # partition -> service-resolver body
        self.groups: dict[str, dict[tuple[str, str], SamenessGroup]] = {}
        # partition -> (gateway namespace, name) -> exposed (partition, namespace, service)
        self.ingress_entries: dict[str, dict[tuple[str, str],
                                             tuple[tuple[str, str, str], ...]]] = {}
        self.ingress_dirty = False
        self.ingress_last: dict[ServiceKey, tuple[Instance, ...]] = {}  # what the snapshot has
        self.nodes_by_scope: dict[tuple[str, str], dict[NodeKey, NodeRecord]] = {}
        # Imported nodes: a peer has no /v1/catalog/nodes, so its nodes are the ``Node`` objects
        # of its imported services' entries, indexed while some imported service is on them.
        self.peer_nodes: dict[ServiceKey, dict[NodeKey, NodeRecord]] = {}  # service -> its nodes
        self.peer_node_users: dict[NodeKey, dict[ServiceKey, NodeRecord]] = {}  # node -> services
        self.pending: dict[ServiceKey, list[Instance]] = {}
        self.pending_nodes: dict[NodeKey, NodeRecord | None] = {}
        self.pending_ingress: dict[ServiceKey, tuple[Instance, ...]] = {}
        self.pending_topology: dict[str, Any] = {}
        self.queue: asyncio.Queue[tuple[Scope, str]] = asyncio.Queue()
        self.queued: set[tuple[Scope, str]] = set()
        self.interned: dict[tuple[Any, ...], NodeRecord] = {}
        self.publish: Publish | None = None
        self.started = time.monotonic()
        self.index_resets = 0
        self.fetches = 0
        self.fetches_same = 0  # fetches whose body was the one last applied: not decoded
        self.fetch_errors = 0
        # (scope, service) -> digest of the /v1/health/service body last applied
        self.digests: dict[tuple[Scope, str], bytes] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._topology_changed = asyncio.Event()
        self._last_stale_log = 0.0
        self._blocking = 0  # blocking watches started (each holds one request)
        self._lane_warned = False
        self._retries: dict[tuple[Scope, str], int] = {}  # failed fetches in a row
        self._denied_logged: set[str] = set()
        # Imported services followed one by one (see "Cluster peers" above): how to tell which
        # names have cached answers (the server's), the services wanted (until DEMAND_HOLD
        # after they were last seen there) and the watches they have
        self.demand: Callable[[], Container[str | None]] | None = None
        self.wanted: TTLCache[tuple[Scope, str], bool] = TTLCache(
            maxsize=4096, ttl=DEMAND_HOLD, timer=time.monotonic)
        self.followed: dict[tuple[Scope, str], tuple[asyncio.Task[None], Watch]] = {}
        self.sweeps = 0  # re-reads the sweep of imported services asked for
        self._demand_warned = False

    # --- the CatalogSource protocol ------------------------------------------------------

    async def run(self, publish: Publish) -> None:
        self.publish = publish
        self.client = ConsulClient(self.settings, self.config.base_dir)
        log.info("consul: following %s (datacenter %s, partitions %s, namespaces %s, peers %s,"
                 " datacenters %s)", self.settings.address, self.settings.datacenter or
                 "from the agent", _show(self.settings.partitions),
                 _show(self.settings.namespaces), _show(self.settings.peers),
                 _show(self.settings.datacenters))
        try:
            await self._local_datacenter()
            # as many fetchers as requests may be in flight: the fetch lane's limit (wide
            # while a scope's first read is fetched, see _size_fetch_lane) says how many run
            for _ in range(self.settings.max_requests):
                self._spawn(self._fetcher())
            self._spawn(self._watch_staleness())
            self._spawn(self._follow_imported())
            self._spawn(self._sweep_imported())
            await self._follow_topology()
        finally:
            for task in self._all_tasks():
                task.cancel()
            await asyncio.gather(*self._all_tasks(), return_exceptions=True)
            await self.client.close()

    async def reload(self, why: str) -> None:
        """SIGHUP: read the topology again now (the watches follow everything else live)."""
        log.info("consul: %s: re-reading the topology", why)
        self._topology_changed.set()

    def follow_demand(self, cached: Callable[[], Container[str | None]]) -> None:
        """How to tell which service names (lowercased) have answers in the response cache:
        the imported services among them get blocking watches of their own."""
        self.demand = cached

    def reconfigure(self, config: Config) -> list[str]:
        if config.catalog.consul != self.settings:
            return ["catalog.consul"]
        return []

    # --- bookkeeping --------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    def _all_tasks(self) -> list[asyncio.Task[None]]:
        tasks = list(self._tasks)
        for sw in self.scopes.values():
            tasks += sw.tasks
        tasks += [t for t, _ in self.node_watches.values()]
        for items in self.config_watches.values():
            tasks += [t for t, _ in items]
        tasks += [t for t, _ in self.followed.values()]
        return tasks

    def watches(self) -> list[Watch]:
        out = [w for sw in self.scopes.values() for w in sw.watches]
        out += [w for _, w in self.node_watches.values()]
        out += [w for items in self.config_watches.values() for _, w in items]
        out += [w for _, w in self.followed.values()]
        return out

    def _watch(self, endpoint: str, params: dict[str, str], handler: Any, *,
               optional: bool = False, **kw: Any) -> Watch:
        """A watch that blocks while the blocking lane has a slot for it; beyond that it polls
        (every POLL_WHEN_FULL seconds), so requests in flight stay within max_requests."""
        assert self.client is not None
        blocking = self._blocking < self.client.limiter.maximum
        if blocking:
            self._blocking += 1
        elif not self._lane_warned:
            self._lane_warned = True
            log.warning("consul: max_requests %d leaves room for %d blocking watches: the "
                        "others poll every %gs (raise max_requests to follow every scope with "
                        "blocking queries)", self.settings.max_requests,
                        self.client.limiter.maximum, POLL_WHEN_FULL)
        # an optional endpoint missing here (404 on Consul CE) is asked again every 30 s
        return Watch(self.client, endpoint, params, handler, blocking=blocking,
                     poll=30.0 if blocking else POLL_WHEN_FULL,
                     on_error=self._on_error(optional), on_reply=self._reachable, **kw)

    def _reachable(self) -> None:
        """Consul answered something: it is reachable."""
        state = self.state
        state.last_success = time.time()
        if state.failing_since is not None:
            log.info("consul %s reachable again after %.0fs", self.settings.address,
                     time.time() - state.failing_since)
            state.failing_since = None
            for watch in self.watches():  # the others stop backing off: retry at once
                watch.wake.set()
            if not state.serving and state.ready:
                state.serving = True
                self._republish()

    def _failed(self, exc: ConsulError) -> bool:
        """Every watch's and fetch's errors pass here."""
        state = self.state
        state.last_error = str(exc)
        state.errors += 1
        if exc.unreachable and state.failing_since is None:
            state.failing_since = time.time()
            if state.ready:
                log.warning("consul unreachable (%s): serving the catalog as of %s", exc,
                            time.strftime("%H:%M:%S", time.localtime(self.snapshot.loaded_at)))
        return False

    def _on_error(self, optional: bool) -> Callable[[ConsulError], bool]:
        """An error handler for a watch. ``optional``: 404/400 mean the endpoint does not
        exist here (Consul CE): handled, polled again later."""
        def handle(exc: ConsulError) -> bool:
            self._failed(exc)
            return optional and exc.status in (400, 404)
        return handle

    def _republish(self) -> None:
        if self.publish is not None:
            self.publish(self.snapshot, EVERYTHING)

    # --- the local datacenter and the topology ------------------------------------------

    async def _local_datacenter(self) -> None:
        """Ask the agent which datacenter is local, unless the config says."""
        if self.settings.datacenter:
            self._check_dc()
            return
        backoff = Backoff()
        assert self.client is not None
        while True:
            try:
                reply = await self.client.get("/v1/agent/self")
                self._reachable()
                config = reply.body.get("Config", {}) if isinstance(reply.body, dict) else {}
                dc = str(config.get("Datacenter") or "").lower()
                if dc:
                    self.local_dc = dc
                self._check_dc()
                return
            except ConsulError as exc:
                self._failed(exc)
                if exc.status in (403, 404):  # no agent:read: the config's datacenter it is
                    log.warning("%s: using datacenter %s", exc, self.local_dc)
                    return
                pause = backoff.next()
                if backoff.failures in (1, 4) or backoff.failures % 30 == 0:
                    log.warning("%s (retrying in %.1fs)", exc, pause)
                await asyncio.sleep(pause)

    def _check_dc(self) -> None:
        if self.local_dc != self.config.datacenter:
            log.warning("consul's local datacenter is %s but the config's datacenter is %s: "
                        "names without a datacenter look in %s; set datacenter: %s",
                        self.local_dc, self.config.datacenter, self.config.datacenter,
                        self.local_dc)

    async def _follow_topology(self) -> None:
        """Read the topology, reconcile the scopes; again every TOPOLOGY_POLL (jittered)."""
        backoff = Backoff()
        while True:
            try:
                await self._read_topology()
                backoff.reset()
                self.topology.last_success = time.time()
                self.topology.reads += 1
                pause = TOPOLOGY_POLL * (0.75 + random.random() / 2)
            except ConsulError as exc:
                self._failed(exc)
                self.topology.last_error = str(exc)
                self.topology.last_error_at = time.time()
                pause = backoff.next()
                if backoff.failures in (1, 4) or backoff.failures % 30 == 0:
                    log.warning("%s (retrying in %.1fs)", exc, pause)
            self._topology_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._topology_changed.wait(), pause)

    async def _optional(self, path: str, params: dict[str, str], read: Callable[[Any], Any],
                        fallback: Any) -> Any:
        """A topology read where 404 (Consul CE) or 403 (the token may not list) give
        ``fallback``; unreachable raises."""
        assert self.client is not None
        try:
            reply = await self.client.get(path, params)
        except ConsulError as exc:
            if exc.status in (400, 403, 404):
                self._reachable()
                if exc.status == 403:
                    self._failed(exc)
                    self.topology.last_error = str(exc)
                    if path not in self._denied_logged:  # polled: say it once
                        self._denied_logged.add(path)
                        log.warning("%s (going on without it)", exc)
                return fallback
            raise
        self._reachable()
        self._denied_logged.discard(path)
        try:
            return read(reply.body)
        except Malformed as exc:
            log.warning("consul %s: malformed body: %s (keeping the last one)", path, exc)
            raise ConsulError(path, -1, f"malformed body: {exc}") from None

    async def _read_topology(self) -> None:
        s = self.settings
        if s.partitions == ["*"]:
            partitions = await self._optional("/v1/partitions", {}, mapping.partitions,
                                              ["default"]) or ["default"]
        else:
            partitions = list(s.partitions)
        namespaces: dict[str, list[str]] = {}
        peers: dict[str, list[str]] = {}
        for p in partitions:
            pp = {"partition": p} if p != "default" else {}
            if "*" in s.namespaces:
                namespaces[p] = await self._optional("/v1/namespaces", pp, mapping.namespaces,
                                                     ["default"]) or ["default"]
            else:
                namespaces[p] = list(s.namespaces)
            if "*" in s.peers:
                peers[p] = await self._optional("/v1/peerings", pp, mapping.peerings, [])
            else:
                peers[p] = list(s.peers)
        if "*" in s.datacenters:
            dcs = await self._optional("/v1/catalog/datacenters", {}, mapping.datacenters, [])
        else:
            dcs = list(s.datacenters)
        dcs = [self.local_dc] + [d for d in dcs if d != self.local_dc]
        changed = (partitions, namespaces, peers, dcs) != (
            self.partitions, self.namespaces, self.peers, self.datacenters)
        self.partitions, self.namespaces, self.peers, self.datacenters = (
            partitions, namespaces, peers, dcs)
        if changed:
            self._reconcile()

    def _reconcile(self) -> None:
        """Start the watches the topology asks for; stop (and empty) the others."""
        wanted: set[Scope] = set()
        for p in self.partitions:
            for ns in self.namespaces.get(p, ["default"]):
                wanted.add(Scope("", self.local_dc, p, ns))
                for peer in self.peers.get(p, []):
                    wanted.add(Scope(peer, "", p, ns))
        for dc in self.datacenters[1:]:  # federated: the default partition, as WAN federation
            for ns in self.namespaces.get("default", ["default"]):
                wanted.add(Scope("", dc, "default", ns))
        for scope in sorted(set(self.scopes) - wanted, key=repr):
            self._stop_scope(scope)
        for scope in sorted(wanted - set(self.scopes), key=repr):
            self._start_scope(scope)
        node_scopes = {(sc.datacenter, sc.partition) for sc in wanted if not sc.peer}
        for key in set(self.node_watches) - node_scopes:
            task, _ = self.node_watches.pop(key)
            task.cancel()
            for nkey in self.nodes_by_scope.pop(key, {}):
                self.pending_nodes[nkey] = None
        for key in sorted(node_scopes - set(self.node_watches)):
            self._start_nodes(*key)
        for p in set(self.config_watches) - set(self.partitions):
            for task, _ in self.config_watches.pop(p):
                task.cancel()
            self.resolvers.pop(p, None)
            self.groups.pop(p, None)
            if self.ingress_entries.pop(p, None) is not None:
                self.ingress_dirty = True
        for p in self.partitions:
            if p not in self.config_watches:
                self._start_config(p)
        self._size_fetch_lane()
        self.pending_topology = {
            "datacenters": frozenset(self.datacenters),
            "partitions": frozenset({"default", *self.partitions}),
            "peers": frozenset(peer for ps in self.peers.values() for peer in ps),
        }
        self._schedule_flush()
        self._maybe_ready()

    # --- scopes --------------------------------------------------------------------------

    def _start_scope(self, scope: Scope) -> None:
        assert self.client is not None
        sw = ScopeWatch(scope)
        params = scope.params(self.local_dc)
        names = self._watch("/v1/catalog/services", params,
                            lambda body: self._names_changed(sw, body),
                            on_same=lambda index: self._unexplained(sw, index))
        if scope.peer:  # no checks watch: see "Cluster peers" above
            sw.watches = [names]
            sw.tasks.append(asyncio.ensure_future(names.run()))
        else:
            checks = self._watch("/v1/health/state/any", {**params, "filter": NOT_PASSING},
                                 lambda bodies: self._checks_changed(sw, *bodies), raw=True)
            sw.watches = [names, checks]

            async def run() -> None:
                sw.tasks.append(asyncio.ensure_future(checks.run()))
                # the checks first: a change between the services' first fetch and the
                # checks' first read would otherwise go unseen
                await checks.first_read.wait()
                await names.run()

            sw.tasks.append(asyncio.ensure_future(run()))
        self.scopes[scope] = sw
        log.debug("consul: watching %s", scope.describe())

    def _stop_scope(self, scope: Scope) -> None:
        sw = self.scopes.pop(scope)
        for task in sw.tasks:
            task.cancel()
        for item in [item for item in self.followed if item[0] == scope]:
            self._unfollow(item)
        for name in sw.names or {}:
            self.pending[_key(scope, name)] = []
            self.digests.pop((scope, name), None)
        log.info("consul: no longer following %s", scope.describe())
        self._schedule_flush()

    def _names_changed(self, sw: ScopeWatch, body: Any) -> None:
        names = mapping.service_names(body)
        old = sw.names
        sw.names = names
        scope = sw.scope
        if old is None:  # the first read: fetch everything
            sw.initial = set(names)
            for name in names:
                self._enqueue(scope, name)
            if not names:
                self._synced(sw)
            return
        for name in names:
            if name not in old or names[name] != old[name]:
                self._enqueue(scope, name)
        for name in set(old) - set(names):
            self.pending[_key(scope, name)] = []
            self.digests.pop((scope, name), None)
            sw.initial.discard(name)
            if (scope, name) in self.followed:
                self._unfollow((scope, name))
            self._schedule_flush()

    def _checks_changed(self, sw: ScopeWatch, old: bytes | None, new: bytes) -> None:
        """The scope's checks that are not passing changed (``old``: the last body, None at
        the first read): re-read the services whose checks differ (entered the set, left it,
        or changed status), and every service on a node whose node checks do."""
        index = next((w.stats.index for w in sw.watches if w.endpoint.endswith("/any")), 0)
        sw.check_changes = (sw.check_changes + [index])[-64:]
        if old is None or sw.names is None:
            return  # the first read: the service list's first fetch reads everything
        before, after = mapping.changed_checks(old, new)
        rows: dict[tuple[str, str], list[set[tuple[str, ...]]]] = {}
        for side, found in enumerate((before, after)):
            for row in found:
                # (service name, "") for a service's checks, ("", node) for a node's own
                key = (row[4], "") if row[4] else ("", row[0])
                rows.setdefault(key, [set(), set()])[side].add(row)
        changed: set[str] = set()
        for (service, node), (was, now) in rows.items():
            if was == now:
                continue
            if service:
                changed.add(service)
            else:
                changed |= sw.node_services.get(node, set())
        for name in changed:
            if name in sw.names:
                self._enqueue(sw.scope, name)

    def _unexplained(self, sw: ScopeWatch, index: int) -> None:
        """The service list moved to ``index`` with the same body: a registration changed
        (address, port, virtual IP) without its checks, or a check write moved a shared
        index. Wait a moment for the checks' watch: a change it saw at this very index
        explains the wake-up; otherwise re-read the scope."""
        if sw.rescan_pending:
            return
        sw.rescan_pending = True

        async def settle() -> None:
            try:
                await asyncio.sleep(0.2)
                if index in sw.check_changes:
                    return
                wait = sw.last_rescan + RESCAN_INTERVAL - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                sw.last_rescan = time.monotonic()
                log.debug("consul: %s: registrations changed at index %d: re-reading its %d "
                          "services", sw.scope.describe(), index, len(sw.names or ()))
                for name in sw.names or ():
                    self._enqueue(sw.scope, name)
            finally:
                sw.rescan_pending = False

        sw.tasks.append(asyncio.ensure_future(settle()))
        sw.tasks = [t for t in sw.tasks if not t.done()]

    # --- fetchers ------------------------------------------------------------------------

    def _enqueue(self, scope: Scope, name: str) -> None:
        item = (scope, name)
        if item not in self.queued:
            self.queued.add(item)
            self.queue.put_nowait(item)

    async def _fetcher(self) -> None:
        assert self.client is not None
        while True:
            scope, name = await self.queue.get()
            self.queued.discard((scope, name))
            sw = self.scopes.get(scope)
            if sw is None:
                continue
            item = (scope, name)
            try:
                reply = await self.client.get("/v1/health/service/" + name,
                                              scope.params(self.local_dc), fetch=True,
                                              unless=self.digests.get(item, b""))
                self._reachable()
                if reply.same:  # what the snapshot holds already (a scope re-read, mostly)
                    self._retries.pop(item, None)
                    self.fetches += 1
                    self.fetches_same += 1
                    self._fetched(sw, name)
                    continue
                found = mapping.instances(reply.body, scope, self.interned)
            except ConsulError as exc:
                self.fetch_errors += 1
                self._failed(exc)
                if not exc.unreachable and exc.status != 429:
                    log.warning("%s", exc)  # 403, 404, malformed JSON: worth a line each
                self._retry(sw, name)
                continue
            except Malformed as exc:
                self.fetch_errors += 1
                log.warning("consul /v1/health/service/%s: malformed body: %s (update skipped,"
                            " keeping the last good data)", name, exc)
                self._retry(sw, name)
                continue
            self._retries.pop((scope, name), None)
            self.fetches += 1
            self._apply(sw, name, found, reply.digest)
            self._fetched(sw, name)

    def _apply(self, sw: ScopeWatch, name: str, found: list[Instance], digest: bytes) -> None:
        """A service's instances as just read: into the next snapshot."""
        scope = sw.scope
        if self.scopes.get(scope) is not sw or name not in (sw.names or {}):
            return  # gone meanwhile
        for inst in found:
            sw.node_services.setdefault(inst.node.name, set()).add(name)
        self.pending[_key(scope, name)] = found
        self.digests[(scope, name)] = digest
        self._schedule_flush()

    def _retry(self, sw: ScopeWatch, name: str) -> None:
        """A fetch failed: the last good data stays, and the service is read again later
        (backing off per service), so the change it was fetched for still shows."""
        key = (sw.scope, name)
        failures = self._retries.get(key, 0) + 1
        self._retries[key] = failures
        delay = min(RETRY_CAP, 0.25 * 2 ** (failures - 1)) * (0.5 + random.random() / 2)
        self._fetched(sw, name)  # a first read that fails must not hold readiness back
        asyncio.get_running_loop().call_later(delay, self._enqueue, sw.scope, name)

    def _fetched(self, sw: ScopeWatch, name: str) -> None:
        if sw.initial:
            sw.initial.discard(name)
            if not sw.initial and not sw.synced:
                self._synced(sw)

    def _synced(self, sw: ScopeWatch) -> None:
        sw.synced = True
        self._size_fetch_lane()
        self._maybe_ready()

    def _size_fetch_lane(self) -> None:
        """While some scope's first read is being fetched (one request per service), the
        fetchers may use every request the blocking watches do not hold (one each, and one
        for the topology reads): time to ready is then bounded by how fast Consul answers,
        not by a pool sized for changes. Afterwards the pool goes back to its size."""
        assert self.client is not None
        pool = fetch_pool_size(self.settings.max_requests)
        width = pool
        if any(not sw.synced for sw in self.scopes.values()):
            width = max(pool, self.settings.max_requests - self._blocking - 1)
        if width != self.client.fetch_limiter.maximum:
            log.debug("consul: %d fetches at once (%s)", width,
                      "first reads" if width > pool else "following changes")
            self._spawn(self.client.fetch_limiter.resize(width))

    # --- imported services: demand and sweep (see "Cluster peers" above) ----------------

    async def _follow_imported(self) -> None:
        while True:
            await asyncio.sleep(DEMAND_POLL)
            self._refresh_demand()

    def _refresh_demand(self) -> None:
        """Give watches to the imported services with cached answers, as the blocking lane
        has room; take them from services no longer wanted."""
        assert self.client is not None
        wanted = self.wanted
        cached = self.demand() if self.demand is not None else ()
        for sw in self.scopes.values():
            if sw.scope.peer:
                for name in sw.names or ():
                    if name.lower() in cached:  # (the cache's tags are lowercased names)
                        wanted[(sw.scope, name)] = True  # (again: held DEMAND_HOLD from now)
        wanted.expire()
        budget = max(0, self.client.limiter.maximum - self._blocking - DEMAND_SPARE)
        keep = {item for item in self.followed if item in wanted and self._imported(item)}
        if len(keep) > budget:
            keep = set(sorted(keep, key=repr)[:budget])
        for item in [item for item in self.followed if item not in keep]:
            self._unfollow(item)
        room = budget - len(self.followed)
        left = 0
        for item in list(wanted):
            if item in self.followed or not self._imported(item):
                continue
            if room > 0:
                self._follow(item)
                room -= 1
            else:
                left += 1
        if left and not self._demand_warned:
            self._demand_warned = True
            log.warning("consul: %d imported services with cached answers have no watch of "
                        "their own (max_requests %d leaves room for %d): they are re-read by "
                        "the sweep, %g a second", left, self.settings.max_requests, budget,
                        PEER_SWEEP_RATE)

    def _imported(self, item: tuple[Scope, str]) -> bool:
        sw = self.scopes.get(item[0])
        return sw is not None and item[1] in (sw.names or {})

    def _follow(self, item: tuple[Scope, str]) -> None:
        assert self.client is not None
        scope, name = item
        watch = Watch(self.client, "/v1/health/service/" + name, scope.params(self.local_dc),
                      lambda bodies: self._followed_changed(item, bodies[1]), blocking=True,
                      on_error=self._on_error(False), on_reply=self._reachable, raw=True)
        self.followed[item] = (asyncio.ensure_future(watch.run()), watch)
        log.debug("consul: %s in %s is asked: following it with its own watch", name,
                  scope.describe())

    def _unfollow(self, item: tuple[Scope, str]) -> None:
        task, _ = self.followed.pop(item)
        task.cancel()

    def _followed_changed(self, item: tuple[Scope, str], raw: bytes) -> None:
        """An imported service's own watch read a new body."""
        if not self._imported(item):
            return
        scope, name = item
        digest = body_digest(raw)
        if digest == self.digests.get(item):
            return  # what the snapshot holds already (its first read, mostly)
        try:
            body = json.loads(raw) if raw.strip() else None
        except ValueError as exc:
            raise Malformed(f"not JSON: {exc}") from None
        self._apply(self.scopes[scope], name, mapping.instances(body, scope, self.interned),
                    digest)

    async def _sweep_imported(self) -> None:
        """Re-read every imported service in turn, PEER_SWEEP_RATE a second at most, a round
        at least every PEER_SWEEP_MIN seconds; not while Consul is unreachable (the retries
        of what changed are enough then)."""
        while True:
            items = [(sw.scope, name) for sw in self.scopes.values()
                     if sw.scope.peer and sw.synced for name in sw.names or ()]
            if not items:
                await asyncio.sleep(PEER_SWEEP_MIN)
                continue
            random.shuffle(items)
            pace = max(PEER_SWEEP_MIN / len(items), 1 / PEER_SWEEP_RATE)
            for item in items:
                await asyncio.sleep(pace * (0.5 + random.random()))
                if item in self.followed or not self._imported(item):
                    continue
                if self.state.failing_since is not None or self.queue.qsize() > 64:
                    continue
                self.sweeps += 1
                self._enqueue(*item)

    # --- nodes and config entries ---------------------------------------------------------

    def _start_nodes(self, dc: str, partition: str) -> None:
        assert self.client is not None
        scope = Scope("", dc, partition, "default")
        params = scope.params(self.local_dc)
        watch = self._watch("/v1/catalog/nodes", params,
                            lambda body: self._nodes_changed(dc, partition, body))
        self.node_watches[(dc, partition)] = (asyncio.ensure_future(watch.run()), watch)

    def _nodes_changed(self, dc: str, partition: str, body: Any) -> None:
        scope = Scope("", dc, partition, "default")
        records = {(r.peer, r.datacenter, r.partition, r.name.lower()): r
                   for r in mapping.nodes(body, scope)}
        old = self.nodes_by_scope.get((dc, partition), {})
        self.nodes_by_scope[(dc, partition)] = records
        moved: set[str] = set()
        for key in set(old) | set(records):
            if old.get(key) != records.get(key):
                self.pending_nodes[key] = records.get(key)
                if key in old and key in records and old[key].address != records[key].address:
                    moved.add(old[key].name)
        # services without an address of their own answer with their node's: re-read them
        for sw in self.scopes.values():
            if sw.scope.datacenter == dc and sw.scope.partition == partition:
                for node in moved:
                    for name in sw.node_services.get(node, ()):
                        self._enqueue(sw.scope, name)
        self._schedule_flush()

    def _start_config(self, partition: str) -> None:
        assert self.client is not None
        params = {"partition": partition} if partition != "default" else {}
        if self.settings.namespaces != ["default"]:
            params = {**params, "ns": "*"}
        resolvers = self._watch("/v1/config/service-resolver", params,
                                lambda body: self._resolvers_changed(partition, body),
                                optional=True)
        gparams = {"partition": partition} if partition != "default" else {}
        groups = self._watch("/v1/config/sameness-group", gparams,
                             lambda body: self._groups_changed(partition, body), optional=True)
        ingress = self._watch("/v1/config/ingress-gateway", params,
                              lambda body: self._ingress_changed(partition, body),
                              optional=True)
        self.config_watches[partition] = [(asyncio.ensure_future(w.run()), w)
                                          for w in (resolvers, groups, ingress)]

    def _ingress_changed(self, partition: str, body: Any) -> None:
        self.ingress_entries[partition] = mapping.ingress_exposed(body, partition)
        self.ingress_dirty = True
        self._schedule_flush()

    def _index_ingress(self) -> None:
        """``<service>.ingress`` answers the instances of the local ingress gateways whose
        config entry exposes the service (as Consul's ``/v1/health/ingress/<service>``).
        Recomputed when an entry or a gateway's instances change; only the keys whose
        gateways differ go into the update."""
        gateways = {("", self.local_dc, p, gns, gname)
                    for p, entries in self.ingress_entries.items() for gns, gname in entries}
        if not self.ingress_dirty and not gateways.intersection(self.pending):
            return
        self.ingress_dirty = False
        registered = self.snapshot.registered
        wanted: dict[ServiceKey, list[Instance]] = {}
        for p, entries in sorted(self.ingress_entries.items()):
            for (gns, gname), exposed in sorted(entries.items()):
                gkey = ("", self.local_dc, p, gns, gname)
                found = self.pending[gkey] if gkey in self.pending else registered.get(gkey, ())
                instances = [i for i in found if i.kind == "ingress-gateway"]
                for ap, ns, name in exposed:
                    if instances:
                        wanted.setdefault(("", self.local_dc, ap, ns, name), []).extend(
                            instances)
        for key in set(self.ingress_last) | set(wanted):
            now = tuple(wanted.get(key, ()))
            if self.ingress_last.get(key, ()) != now:
                self.pending_ingress[key] = now
                if now:
                    self.ingress_last[key] = now
                else:
                    del self.ingress_last[key]

    def _resolvers_changed(self, partition: str, body: Any) -> None:
        mapping.resolver_failover(body, self.local_dc, partition, {})  # shape check
        self.resolvers[partition] = body
        self._config_entries_changed()

    def _groups_changed(self, partition: str, body: Any) -> None:
        self.groups[partition] = mapping.sameness_groups(body, partition)
        self._config_entries_changed()

    def _config_entries_changed(self) -> None:
        groups: dict[tuple[str, str], SamenessGroup] = {}
        for g in self.groups.values():
            groups.update(g)
        failover: dict[ServiceKey, tuple[Target, ...]] = {}
        for partition, body in self.resolvers.items():
            failover.update(mapping.resolver_failover(body, self.local_dc, partition, groups))
        self.pending_topology["failover"] = failover
        self.pending_topology["sameness_groups"] = groups
        self._schedule_flush()

    # --- publishing ----------------------------------------------------------------------

    def _maybe_ready(self) -> None:
        if self.state.ready or not self.scopes:
            return
        if not all(sw.synced for sw in self.scopes.values()):
            return
        self._flush()
        self.state.ready = True
        self.state.serving = True
        c = self.snapshot.counts
        log.info("consul: ready in %.2fs: %d services, %d instances, %d nodes in %d scopes "
                 "(%d datacenters, %d partitions, %d peers)",
                 time.monotonic() - self.started, c["services"], c["instances"], c["nodes"],
                 len(self.scopes), len(self.datacenters), len(self.partitions),
                 len(self.snapshot.peers))
        self.state.detail = self.describe()
        self._republish()

    def _schedule_flush(self) -> None:
        if not self.state.ready or self._flush_handle is not None:
            return
        self._flush_handle = asyncio.get_running_loop().call_later(FLUSH_DELAY, self._flush)

    def _flush(self) -> None:
        """Apply what the watches and fetchers gathered as one new snapshot; publish it."""
        self._flush_handle = None
        self._index_peer_nodes()
        self._index_ingress()
        topology = self.pending_topology
        update = Update(services=self.pending, nodes=self.pending_nodes,
                        ingress=self.pending_ingress,
                        datacenters=topology.get("datacenters"),
                        peers=topology.get("peers"), partitions=topology.get("partitions"),
                        failover=topology.get("failover"),
                        sameness_groups=topology.get("sameness_groups"))
        self.pending, self.pending_nodes, self.pending_topology = {}, {}, {}
        self.pending_ingress = {}
        if not update:
            return
        applied = apply_update(self.snapshot, update)
        if applied.snapshot is self.snapshot:
            return
        self.snapshot = applied.snapshot
        if len(self.interned) > 4 * max(1, self.snapshot.counts["nodes"]) + 1024:
            self.interned.clear()  # records of old node states; live ones are in the snapshot
        if self.state.ready and self.publish is not None:
            self.publish(self.snapshot, Change(applied.services, applied.everything))

    def _index_peer_nodes(self) -> None:
        """Follow the nodes of imported services: a node is in the catalog (answering
        ``<node>.node.<peer>.peer`` and the SRV targets naming it) while an imported service
        has an instance on it, with the record of its latest fetch. Only records that differ
        from the snapshot's go into the update (a node change empties the whole cache)."""
        touched: set[NodeKey] = set()
        for skey, found in self.pending.items():
            if not skey[0]:
                continue  # a local or federated service: its nodes come from /v1/catalog/nodes
            now = {(i.node.peer, i.node.datacenter, i.node.partition, i.node.name.lower()):
                   i.node for i in found}
            was = self.peer_nodes.pop(skey, {})
            if now:
                self.peer_nodes[skey] = now
            for nkey in was.keys() | now.keys():
                users = self.peer_node_users.setdefault(nkey, {})
                users.pop(skey, None)  # re-inserted last: the latest fetch comes last
                if nkey in now:
                    users[skey] = now[nkey]
                elif not users:
                    del self.peer_node_users[nkey]
                touched.add(nkey)
        for nkey in touched:
            users = self.peer_node_users.get(nkey)
            rec = next(reversed(users.values())) if users else None
            if self.snapshot.nodes.get(nkey) != rec:
                self.pending_nodes[nkey] = rec

    # --- staleness -----------------------------------------------------------------------

    def stale_seconds(self) -> float:
        since = self.state.failing_since
        return 0.0 if since is None else max(0.0, time.time() - since)

    async def _watch_staleness(self) -> None:
        """Log how stale the served catalog is while Consul is unreachable; past
        ``max_stale``, answer SERVFAIL (state.serving False) until Consul is back."""
        while True:
            await asyncio.sleep(1.0)
            state = self.state
            state.detail = self.describe()  # what /v1/catalog shows
            stale = self.stale_seconds()
            if not stale or not state.ready:
                continue
            now = time.monotonic()
            if now - self._last_stale_log >= STALE_LOG_EVERY:
                self._last_stale_log = now
                log.warning("consul unreachable for %.0fs (%s): serving the catalog as of %s",
                            stale, state.last_error,
                            time.strftime("%H:%M:%S", time.localtime(self.snapshot.loaded_at)))
            limit = self.settings.max_stale
            if limit is not None and stale > limit and state.serving:
                state.serving = False
                log.error("consul unreachable for %.0fs, more than max_stale %gs: answering "
                          "SERVFAIL until it is back (%s)", stale, limit, state.last_error)
                self._republish()

    # --- what the admin endpoint shows -----------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """``/v1/catalog``'s ``state.detail``: every watch, its index, last success/error."""
        client = self.client.stats() if self.client else {}
        return {
            "address": self.settings.address,
            "datacenter": self.local_dc,
            "datacenters": self.datacenters,
            "partitions": self.partitions,
            "namespaces": self.namespaces,
            "peers": self.peers,
            "scopes": len(self.scopes),
            "fetch_queue": self.queue.qsize(),
            "fetches": self.fetches,
            "fetches_unchanged": self.fetches_same,
            "fetch_errors": self.fetch_errors,
            "imported_followed": sorted(f"{name} ({scope.describe()})"
                                        for scope, name in self.followed),
            "imported_sweep_reads": self.sweeps,
            "stale_seconds": round(self.stale_seconds(), 3),
            "client": client,
            "topology": self.topology.as_json(),
            "watches": [w.stats.as_json() for w in self.watches()],
        }

    def metrics(self) -> list[Family]:
        """(name, type, help, [(labels, value)]) for ``/metrics``."""
        client = self.client
        watches = self.watches()
        errors = sorted((client.errors if client else {}).items())
        return [
            ("meshdns_catalog_stale_seconds", "gauge",
             "Seconds since Consul was last reachable while it is not (0 when it is).",
             [("", round(self.stale_seconds(), 3))]),
            ("meshdns_consul_requests_in_flight", "gauge", "HTTP requests to Consul now.",
             [("", client.in_flight if client else 0)]),
            ("meshdns_consul_requests_in_flight_max", "gauge",
             "The most HTTP requests to Consul in flight at once since start.",
             [("", client.peak if client else 0)]),
            ("meshdns_consul_requests_total", "counter", "HTTP requests sent to Consul.",
             [("", client.requests if client else 0)]),
            ("meshdns_consul_response_bytes_total", "counter", "Bytes of Consul's replies.",
             [("", client.bytes if client else 0)]),
            ("meshdns_consul_request_errors_total", "counter",
             "Consul requests that failed, by HTTP status (or timeout, unreachable, "
             "malformed).", [(f'status="{k}"', v) for k, v in errors]),
            ("meshdns_consul_index_resets_total", "counter",
             "Blocking queries whose index went backwards (re-read from scratch).",
             [("", sum(w.stats.resets for w in watches))]),
            ("meshdns_consul_wakeups_no_change_total", "counter",
             "Blocking queries that returned with nothing changed.",
             [("", sum(w.stats.no_change for w in watches))]),
            ("meshdns_consul_fetches_total", "counter",
             "Services re-read after a change.", [("", self.fetches)]),
            ("meshdns_consul_fetches_unchanged_total", "counter",
             "Re-reads whose body was the one already applied (not decoded).",
             [("", self.fetches_same)]),
            ("meshdns_consul_imported_watches", "gauge",
             "Imported (peer) services with cached answers followed by a watch of their own.",
             [("", len(self.followed))]),
            ("meshdns_consul_imported_sweep_reads_total", "counter",
             "Re-reads of imported services by the sweep (their health has no scope watch).",
             [("", self.sweeps)]),
            ("meshdns_consul_query_executions_total", "counter",
             "Prepared queries executed in Consul (results are held for their DNS TTL).",
             [("", self.prepared.executions)]),
            ("meshdns_consul_query_failures_total", "counter",
             "Prepared-query executions that failed (answered SERVFAIL).",
             [("", self.prepared.failures)]),
        ]


def _key(scope: Scope, name: str) -> ServiceKey:
    return (scope.peer, scope.datacenter, scope.partition, scope.namespace, name.lower())


def _show(values: list[str]) -> str:
    return ",".join(values) if values else "(none)"


__all__ = ["ConsulCatalogSource"]
