"""Active probes: each provider is asked, now and then, whether it answers.

One loop per provider. The first probe comes after a random offset in [0, interval) and the
next ones every interval ± 10 % (jitter), so replicas and providers do not probe in lockstep.
A probe that raises becomes a failed outcome (PROVIDER_UNAVAILABLE), one that takes longer
than `min(PROBE_TIMEOUT_CAP_S, interval)` a TIMEOUT; every outcome is published like a
caller's (model "", `probe` set), so it updates the provider's entry on every replica.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

import grpc

from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, from_rpc_error
from switchyard.common.logging import get_logger
from switchyard.common.settings import Settings
from switchyard.common.tasks import cancel_all
from switchyard.common.timestamps import timestamp_of
from switchyard.v1 import health_pb2, provider_pb2, provider_pb2_grpc

__all__ = ["JITTER", "PROBE_TIMEOUT_CAP_S", "ProbeFunction", "Prober", "adapter_probe", "probe_timeout_s"]

log = get_logger(__name__)

# A probe waits at most this long (or the interval, when shorter).
PROBE_TIMEOUT_CAP_S: Final = 10.0
# Each wait between probes is the interval times a factor in [1 - JITTER, 1 + JITTER].
JITTER: Final = 0.1

ProbeFunction = Callable[[str, str], Awaitable[health_pb2.AttemptOutcome | None]]
"""Probe (provider name, vendor) and say how it went; None when nothing was learnt about the
provider (its adapter could not be reached)."""


def probe_timeout_s(interval_s: float) -> float:
    """How long one probe may take."""
    return min(PROBE_TIMEOUT_CAP_S, interval_s)


def failed_probe(
    provider: str, reason: Reason, *, latency_ms: int = 0, now: float | None = None
) -> health_pb2.AttemptOutcome:
    """The outcome of a probe that did not get an answer."""
    return health_pb2.AttemptOutcome(
        provider=provider,
        probe=True,
        success=False,
        error_reason=reason.value,
        total_latency_ms=latency_ms,
        finished_at=timestamp_of(time.time() if now is None else now),
    )


class Prober:
    """Probes every provider on its own jittered schedule and publishes the outcomes."""

    def __init__(
        self,
        providers: Mapping[str, str],
        probe: ProbeFunction,
        publish: Callable[[list[health_pb2.AttemptOutcome]], Awaitable[None]],
        interval_s: float,
        rng: random.Random,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._providers = dict(providers)
        self._probe = probe
        self._publish = publish
        self._interval_s = interval_s
        self._rng = rng
        self._sleep = sleep
        self._clock = clock
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        """Start one probe loop per provider."""
        if self._tasks:
            return
        for provider, vendor in sorted(self._providers.items()):
            self._tasks.append(asyncio.create_task(self._loop(provider, vendor), name=f"probe-{provider}"))

    async def stop(self) -> None:
        """Cancel the loops and wait for them."""
        tasks, self._tasks = self._tasks, []
        await cancel_all(tasks)

    async def probe_once(self, provider: str, vendor: str) -> health_pb2.AttemptOutcome | None:
        """Probe one provider now; a raise or a timeout becomes a failed outcome, None means
        the probe learnt nothing about the provider."""
        started = time.monotonic()
        try:
            async with asyncio.timeout(probe_timeout_s(self._interval_s)):
                outcome = await self._probe(provider, vendor)
        except TimeoutError:
            return failed_probe(provider, Reason.TIMEOUT, latency_ms=_elapsed_ms(started), now=self._clock())
        except Exception as exc:
            log.warning("probe_failed", provider=provider, error=type(exc).__name__)
            return failed_probe(
                provider, Reason.PROVIDER_UNAVAILABLE, latency_ms=_elapsed_ms(started), now=self._clock()
            )
        if outcome is None:
            return None
        outcome.provider, outcome.probe = provider, True
        return outcome

    async def _loop(self, provider: str, vendor: str) -> None:
        await self._sleep(self._rng.uniform(0.0, self._interval_s))
        while True:
            outcome = await self.probe_once(provider, vendor)
            try:
                if outcome is not None:
                    await self._publish([outcome])
            except Exception as exc:
                log.warning("probe_publish_failed", provider=provider, error=type(exc).__name__)
            await self._sleep(self._interval_s * self._rng.uniform(1.0 - JITTER, 1.0 + JITTER))


def adapter_probe(channels: ChannelPool, settings: Settings) -> ProbeFunction:
    """A probe function calling `ProviderAdapterService.Probe` on the vendor's adapter.

    An adapter that cannot be reached says nothing about its vendor (it may be starting, or
    be the one thing down): that probe is skipped, logged once per outage, not counted."""
    unreachable: set[str] = set()
    timeout_s = probe_timeout_s(settings.health_probe_interval_s or PROBE_TIMEOUT_CAP_S)

    async def probe(provider: str, vendor: str) -> health_pb2.AttemptOutcome | None:
        stub = provider_pb2_grpc.ProviderAdapterServiceStub(channels.get(settings.adapter_target(vendor)))
        started = time.monotonic()
        try:
            reply = await stub.Probe(provider_pb2.ProbeRequest(provider=provider), timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                if vendor not in unreachable:
                    unreachable.add(vendor)
                    log.warning("probe_adapter_unreachable", provider=provider, vendor=vendor)
                return None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                reason = Reason.TIMEOUT
            else:
                reason = from_rpc_error(exc).reason
            return failed_probe(provider, reason, latency_ms=_elapsed_ms(started))
        unreachable.discard(vendor)
        outcome = health_pb2.AttemptOutcome(
            provider=provider,
            probe=True,
            success=reply.ok,
            total_latency_ms=reply.latency_ms,
            error_reason="" if reply.ok else (reply.error_reason or Reason.PROVIDER_UNAVAILABLE.value),
            finished_at=timestamp_of(time.time()),
        )
        if reply.HasField("headroom"):
            outcome.headroom.CopyFrom(reply.headroom)
        return outcome

    return probe


def _elapsed_ms(started: float) -> int:
    return max(0, round((time.monotonic() - started) * 1000))
