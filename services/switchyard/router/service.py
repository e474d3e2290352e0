"""The router: a control plane that turns the catalog and the health monitor's picture into
versioned routing snapshots, pushes them to every edge (`WatchRoutes`), and answers `Plan`
and `Explain` with the same plan library the edges run on those snapshots. A request's
`region` plans on the snapshot compiled for that region, as an edge there does (latency as
measured from it); empty, on every region's latency together.

What reaches the edges, and how fast:
- a breaker or status change from the health monitor: a new snapshot within
  `CRITICAL_DELAY_S` (changes arriving meanwhile ride along);
- statistics (latency, error rates, weights, headroom, latency models): folded in at most
  every `STATS_INTERVAL_S`, so a busy mesh does not rebuild on every outcome;
- an edit of the catalog file (models, tenants' routing rules): checked every
  `router_reload_s`; a file that no longer validates is logged and the last good catalog stays.

Versions are wall-clock milliseconds, bumped past the last one, so they increase across
restarts and are comparable between router replicas.

At shutdown every `WatchRoutes` stream ends at once, cleanly, and new ones are refused
(`common.drain`), so the edges resubscribe to another replica instead of waiting out the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Final

import grpc

from switchyard.common.catalog import Catalog, CatalogError, load_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.drain import DRAINED, StreamDrain
from switchyard.common.errors import invalid, is_shutting_down
from switchyard.common.logging import get_logger
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.common.tasks import cancel_all
from switchyard.ledger.tokens import count_prompt_tokens
from switchyard.router.plan import Planner, plan_response
from switchyard.router.table import RoutingTable, build_snapshot
from switchyard.router.weights import compute_weights
from switchyard.v1 import common_pb2, health_pb2, health_pb2_grpc, router_pb2, router_pb2_grpc

log = get_logger(__name__)

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name
CRITICAL_DELAY_S: Final = 0.05
STATS_INTERVAL_S: Final = 1.0
# A subscriber this many snapshots behind is skipped to the newest (older ones are useless).
SUBSCRIBER_QUEUE: Final = 4
RECONNECT_BASE_S: Final = 0.2
RECONNECT_CAP_S: Final = 5.0
# Regions Plan and Explain keep a planner for; beyond it the least recently asked is dropped,
# so callers naming arbitrary regions cannot grow memory.
REGION_PLANNERS: Final = 32
REGION_MAX_CHARS: Final = 64
_REGION_NAME: Final = re.compile(rf"[A-Za-z0-9._-]{{1,{REGION_MAX_CHARS}}}")

HealthKey = tuple[str, str]


def routing_settings(settings: Settings) -> router_pb2.RoutingSettings:
    """The plan library's knobs, as every edge receives them."""
    return router_pb2.RoutingSettings(
        max_candidates=3,
        equal_score_band=settings.router_equal_score_band,
        weight_floor=settings.router_weight_floor,
        headroom_reserve=settings.router_headroom_reserve,
    )


def _critical(before: health_pb2.ModelHealth | None, after: health_pb2.ModelHealth) -> bool:
    """Whether a health change must reach the edges at once (it changes who may be tried)."""
    if before is None:
        return (
            after.breaker != health_pb2.BREAKER_STATE_CLOSED or after.status == health_pb2.HEALTH_STATUS_DOWN
        )
    return (
        before.breaker != after.breaker
        or before.status != after.status
        or before.half_open_trials != after.half_open_trials
    )


class RoutingState:
    """The router's picture (catalog + health) and the snapshot built from it."""

    def __init__(
        self, catalog: Catalog, settings: router_pb2.RoutingSettings, *, weight_floor: float
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._weight_floor = weight_floor
        self._health: dict[HealthKey, health_pb2.ModelHealth] = {}
        self._version = 0
        self._changed = asyncio.Event()
        self._critical = asyncio.Event()
        self._subscribers: set[asyncio.Queue[router_pb2.RoutingSnapshot]] = set()
        self.snapshot = router_pb2.RoutingSnapshot()
        self.planner = Planner(RoutingTable.from_catalog(catalog, settings=settings))
        # Planners for named regions, least recently asked first; see `planner_for`.
        self._regional: OrderedDict[str, Planner] = OrderedDict()
        self.rebuild()

    @property
    def catalog(self) -> Catalog:
        """The catalog the snapshots are built from."""
        return self._catalog

    @property
    def version(self) -> int:
        """The current snapshot's version."""
        return self._version

    def rebuild(self) -> router_pb2.RoutingSnapshot:
        """Build a new snapshot now, plan on it, and hand it to every subscriber."""
        self._version = max(self._version + 1, int(time.time() * 1000))
        health = list(self._health.values())
        self.snapshot = build_snapshot(
            self._catalog,
            version=self._version,
            health=health,
            weights=compute_weights(health, floor=self._weight_floor),
            settings=self._settings,
            now=datetime.now(UTC),
        )
        self.planner.swap(RoutingTable.from_snapshot(self.snapshot))
        for queue in self._subscribers:
            while queue.qsize() >= SUBSCRIBER_QUEUE:
                queue.get_nowait()
            queue.put_nowait(self.snapshot)
        self._critical.clear()
        self._changed.clear()
        return self.snapshot

    def planner_for(self, region: str) -> Planner:
        """The planner on the current snapshot compiled for `region` ("": `planner`, every
        region together), as an edge in that region plans.

        A region's table is compiled when first asked for on a snapshot, not on every rebuild.
        Its planner is kept across snapshots, like an edge's, so round robin and half-open
        trial counts carry over; at most `REGION_PLANNERS` regions are kept.
        """
        if not region:
            return self.planner
        planner = self._regional.pop(region, None)
        if planner is None:
            planner = Planner(RoutingTable.from_snapshot(self.snapshot, region=region))
        elif planner.table.version != self.snapshot.version:
            planner.swap(RoutingTable.from_snapshot(self.snapshot, region=region))
        self._regional[region] = planner
        while len(self._regional) > REGION_PLANNERS:
            self._regional.popitem(last=False)
        return planner

    def set_catalog(self, catalog: Catalog) -> None:
        """A new catalog (an edited file): rebuild at once."""
        self._catalog = catalog
        self._mark(critical=True)

    def replace_health(self, entries: list[health_pb2.ModelHealth]) -> None:
        """The health monitor's full picture (its snapshot)."""
        before = self._health
        self._health = {(e.provider, e.model): e for e in entries}
        critical = set(before) != set(self._health) or any(
            _critical(before.get(key), entry) for key, entry in self._health.items()
        )
        self._mark(critical=critical)

    def update_health(self, entries: list[health_pb2.ModelHealth]) -> None:
        """Entries that changed."""
        critical = False
        for entry in entries:
            key = (entry.provider, entry.model)
            critical = critical or _critical(self._health.get(key), entry)
            self._health[key] = entry
        self._mark(critical=critical)

    def _mark(self, *, critical: bool) -> None:
        if critical:
            self._critical.set()
        self._changed.set()

    async def run(self) -> None:
        """Rebuild when something changed: soon for critical changes, at a steady pace otherwise."""
        last = time.monotonic()
        while True:
            await self._changed.wait()
            if not self._critical.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._critical.wait(), timeout=max(0.0, last + STATS_INTERVAL_S - time.monotonic())
                    )
            if self._critical.is_set():
                # Changes arriving meanwhile ride along.
                await asyncio.sleep(CRITICAL_DELAY_S)
            self.rebuild()
            last = time.monotonic()

    def subscribe(self) -> asyncio.Queue[router_pb2.RoutingSnapshot]:
        """A queue that receives the current snapshot now and every new one after."""
        queue: asyncio.Queue[router_pb2.RoutingSnapshot] = asyncio.Queue()
        queue.put_nowait(self.snapshot)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[router_pb2.RoutingSnapshot]) -> None:
        """Stop delivering to `queue`."""
        self._subscribers.discard(queue)


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Plans routes and streams routing snapshots."""

    def __init__(self, state: RoutingState) -> None:
        self._state = state
        self._streams = StreamDrain("router")

    def drain(self) -> None:
        """Shutdown begins: every WatchRoutes stream ends (after what it has queued) and new
        ones are refused UNAVAILABLE, so edges resubscribe elsewhere at once."""
        self._streams.drain()

    def _input_tokens(self, request: common_pb2.ChatRequest, given: int) -> tuple[int, int | None]:
        """The prompt tokens the caller counted, or our own count of them, and what they fill
        of a context window (None: the same)."""
        if not request.messages:
            raise invalid("a request needs at least one message", "request.messages")
        if given:
            return given, None
        name = request.model.strip()
        count = count_prompt_tokens(request, self._state.catalog.resolve(name) if name else None)
        return count.tokens, count.window_tokens

    def _planner(
        self, request: common_pb2.ChatRequest, region: str, given_tokens: int
    ) -> tuple[Planner, int, int | None]:
        """The planner for the requested region (a plausible region name), the prompt tokens
        and what they fill of a context window."""
        if region and not _REGION_NAME.fullmatch(region):
            raise invalid(
                f"a region is at most {REGION_MAX_CHARS} letters, digits, '.', '_' or '-'", "region"
            )
        tokens, window = self._input_tokens(request, given_tokens)
        return self._state.planner_for(region), tokens, window

    async def Plan(
        self, request: router_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PlanResponse:
        """The ordered candidates for a request, on the current snapshot as seen from its region."""
        planner, tokens, window = self._planner(request.request, request.region, request.input_tokens)
        plan = planner.plan(
            request.request, tenant_id=request.tenant_id, input_tokens=tokens, context_tokens=window
        )
        return plan_response(plan)

    async def Explain(
        self, request: router_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ExplainResponse:
        """The whole scoring table, filtered-out candidates included, as seen from its region."""
        planner, tokens, window = self._planner(request.request, request.region, request.input_tokens)
        explained = planner.explain(
            request.request, tenant_id=request.tenant_id, input_tokens=tokens, context_tokens=window
        )
        return explained.to_proto()

    async def WatchRoutes(
        self, request: router_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.WatchRoutesResponse]:
        """The current snapshot first, then every new one, until the router shuts down."""
        self._streams.refuse_if_draining()
        queue = self._state.subscribe()
        log.info("routes_subscribed", subscriber=request.subscriber_id, known_version=request.known_version)
        try:
            while (snapshot := await self._streams.next(queue)) is not DRAINED:
                yield router_pb2.WatchRoutesResponse(snapshot=snapshot)
        finally:
            self._state.unsubscribe(queue)


async def follow_health(
    state: RoutingState, stub: health_pb2_grpc.HealthMonitorServiceStub, subscriber_id: str
) -> None:
    """Keep `state` in step with the health monitor's Watch stream, reconnecting forever.

    While the monitor is unreachable the last picture it sent stays in force. A stream the
    monitor ended (a replica shutting down ends its streams cleanly, and refuses new ones) is
    resumed after the base delay and logged at info: it is a replica going away, not a failure.
    """
    failures = 0
    warned = False  # the loss was logged as a warning (said once per outage)
    while True:
        status = "ENDED"  # the monitor closed the stream without an error
        try:
            call = stub.Watch(health_pb2.WatchRequest(subscriber_id=subscriber_id))
            async for event in call:
                if failures:
                    log.info("health_watch_resumed")
                failures, warned = 0, False
                if event.WhichOneof("event") == "snapshot":
                    state.replace_health(list(event.snapshot.entries))
                else:
                    state.update_health(list(event.update.entries))
        except grpc.aio.AioRpcError as exc:
            status = "SHUTTING_DOWN" if is_shutting_down(exc) else exc.code().name
        if status in ("ENDED", "SHUTTING_DOWN"):
            log.info("health_watch_ended", status=status)
            delay = RECONNECT_BASE_S * 2 ** min(failures, 8)
        else:
            if not warned:
                log.warning("health_watch_lost", status=status)
                warned = True
            delay = RECONNECT_BASE_S * 2 ** min(failures + 1, 8)
        failures += 1
        await asyncio.sleep(min(RECONNECT_CAP_S, delay))


async def follow_catalog_file(
    state: RoutingState, path: str, interval_s: float, load: Callable[[str], Catalog] = load_catalog
) -> None:
    """Reload the catalog when its file changes; a file that fails validation is reported and
    the last good catalog stays in force."""

    def stamp() -> tuple[int, int] | None:
        try:
            info = os.stat(path)
        except OSError:
            return None
        return (info.st_mtime_ns, info.st_size)

    seen = stamp()
    while True:
        await asyncio.sleep(interval_s)
        now = stamp()
        if now is None or now == seen:
            continue
        seen = now
        try:
            catalog = load(path)
        except CatalogError as exc:
            log.error("catalog_reload_failed", error=str(exc))
            continue
        state.set_catalog(catalog)
        log.info("catalog_reloaded", path=path)


def build(settings: Settings) -> ServiceParts:
    """The router's bindings; `start` subscribes to the health monitor and the catalog file,
    `drain` ends the WatchRoutes streams at shutdown."""
    state = RoutingState(
        settings.catalog, routing_settings(settings), weight_floor=settings.router_weight_floor
    )
    servicer = RouterServicer(state)
    channels = ChannelPool(default_timeout_s=settings.call_timeout_s)
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        health = health_pb2_grpc.HealthMonitorServiceStub(channels.get(settings.health_target))
        subscriber = f"router-{os.uname().nodename}-{os.getpid()}"
        tasks.append(asyncio.create_task(state.run(), name="router-rebuild"))
        tasks.append(asyncio.create_task(follow_health(state, health, subscriber), name="router-health"))
        if settings.catalog_path:
            tasks.append(
                asyncio.create_task(
                    follow_catalog_file(state, settings.catalog_path, settings.router_reload_s),
                    name="router-catalog",
                )
            )

    async def close() -> None:
        await cancel_all(tasks)
        await channels.close()

    return ServiceParts(
        [
            ServiceBinding(
                SERVICE_NAME,
                lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
            )
        ],
        start=start,
        close=close,
        drain=servicer.drain,
    )
