"""The edge's routing state: the router's pushed snapshots, planned on locally.

The edge starts planning on a table compiled from its own catalog (version 0: no health,
no weights), subscribes to `RouterService.WatchRoutes`, and swaps in each snapshot as it
arrives; planning itself never waits on the network. When the router cannot be reached the
edge keeps planning on the last snapshot it had, reconnects with backoff, and says so
(`connected`, `stale_for_s`, and a log line when the stream is lost and when it is back).
A router shutting down ends the stream cleanly (or refuses it as shutting down): the edge
resubscribes after the base delay, through the proxy to another replica, and logs it at info.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final, Protocol

import grpc

from switchyard.common.errors import is_shutting_down
from switchyard.common.logging import get_logger
from switchyard.router.plan import Planner
from switchyard.router.table import RoutingTable
from switchyard.v1 import router_pb2

log = get_logger(__name__)

RECONNECT_BASE_S: Final = 0.2
RECONNECT_CAP_S: Final = 5.0


class RouteSource(Protocol):
    """What the watcher calls on the router (a `RouterServiceStub` fits)."""

    def WatchRoutes(
        self, request: router_pb2.WatchRoutesRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[router_pb2.WatchRoutesRequest, router_pb2.WatchRoutesResponse]: ...


def reconnect_delay(failures: int) -> float:
    """Seconds before reconnecting a lost control-plane stream after `failures` in a row (0: a
    stream that delivered and then ended cleanly, as a draining replica's does: the base delay)."""
    return min(RECONNECT_CAP_S, RECONNECT_BASE_S * 2.0 ** min(failures, 8))


class RouteWatcher:
    """Keeps `planner` on the router's newest routing snapshot."""

    def __init__(
        self, router: RouteSource, planner: Planner, subscriber_id: str, *, region: str = ""
    ) -> None:
        self._router = router
        self._planner = planner
        # Snapshots are compiled for this edge's region: it plans on the latency measured here.
        self._region = region
        self._subscriber_id = subscriber_id
        self._task: asyncio.Task[None] | None = None
        self._received = asyncio.Event()
        self.connected = False
        self.snapshots = 0
        self._lost_at: float | None = time.monotonic()

    @property
    def version(self) -> int:
        """The version the edge plans on (0: its own catalog, no snapshot yet)."""
        return self._planner.table.version

    @property
    def stale_for_s(self) -> float:
        """Seconds since the router stream was lost (0 while connected)."""
        return 0.0 if self._lost_at is None else time.monotonic() - self._lost_at

    def apply(self, snapshot: router_pb2.RoutingSnapshot) -> bool:
        """Plan on `snapshot` from now on, unless it is older than the one in use."""
        if snapshot.version <= self._planner.table.version:
            return False
        self._planner.swap(RoutingTable.from_snapshot(snapshot, region=self._region))
        self.snapshots += 1
        self._received.set()
        return True

    async def wait_for_snapshot(self, timeout_s: float) -> bool:
        """Wait (for tests and start-up) until a first snapshot arrived; whether one did."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._received.wait(), timeout_s)
        return self._received.is_set()

    def start(self) -> None:
        """Start following the router."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="route-watcher")

    async def aclose(self) -> None:
        """Stop following the router."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        failures = 0
        warned = False  # the loss was logged as a warning (said once per outage)
        while True:
            call = self._router.WatchRoutes(
                router_pb2.WatchRoutesRequest(subscriber_id=self._subscriber_id, known_version=self.version)
            )
            status = "ENDED"  # the router closed the stream without an error
            try:
                async for response in call:
                    if not self.connected:
                        self.connected, self._lost_at = True, None
                        if failures:
                            log.info("routes_resumed", version=response.snapshot.version)
                    failures, warned = 0, False
                    try:
                        self.apply(response.snapshot)
                    except Exception as exc:  # a snapshot this edge cannot read: keep the last one
                        log.error("routes_snapshot_unreadable", error=type(exc).__name__)
                        status = "UNREADABLE"
                        break
            except grpc.aio.AioRpcError as exc:
                status = "SHUTTING_DOWN" if is_shutting_down(exc) else exc.code().name
            finally:
                call.cancel()
            if self.connected:
                self.connected, self._lost_at = False, time.monotonic()
            if status in ("ENDED", "SHUTTING_DOWN"):
                # A router replica going away (it ends its streams when it drains): not a failure.
                log.info("routes_stream_ended", status=status, version=self.version)
                delay = reconnect_delay(failures)
            else:
                if not warned:
                    log.warning("routes_lost", status=status, version=self.version)
                    warned = True
                delay = reconnect_delay(failures + 1)
            failures += 1
            await asyncio.sleep(delay)
