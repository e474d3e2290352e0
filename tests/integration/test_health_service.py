"""The HealthMonitorService end to end: real `switchyard serve health` processes over real gRPC.

* one replica with the in-memory feed: Report validation, breakers opening from reported
  failures, Watch (snapshot first, then updates, the half-open turn driven by the clock),
  latency per reporting region, plan predictions against actual latency, and the provider's
  aggregate of its models' traffic;
* two replicas on one real Redis: an outcome reported to one shows in the other's picture,
  and a replica started later warms up from the feed's recent history.

Probes are off here (interval 0); the probing path through a real adapter and simulator is
covered in `test_routing_mesh.py`. Breakers turn half-open after `OPEN_S`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from switchyard.common.errors import Reason, from_rpc_error
from switchyard.v1 import health_pb2, health_pb2_grpc
from tests.support.service_process import running_service

OPEN_S = 1.0


def health_env(redis_url: str = "") -> dict[str, str]:
    """What a health child runs with; every setting a developer's shell could leak is pinned."""
    return {
        "REDIS_URL": redis_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "SWITCHYARD_CATALOG": "",
        "SWITCHYARD_LOG_FORMAT": "json",
        "SWITCHYARD_SHUTDOWN_GRACE_S": "2",
        "SWITCHYARD_HEALTH_PROBE_INTERVAL_S": "0",
        "SWITCHYARD_HEALTH_OPEN_S": str(OPEN_S),
        "SWITCHYARD_HEALTH_FAILURE_THRESHOLD": "5",
    }


@asynccontextmanager
async def running_health(
    env: dict[str, str], log_path: Path
) -> AsyncIterator[health_pb2_grpc.HealthMonitorServiceStub]:
    """`switchyard serve health` on a free port, ready; stopped when the block ends."""
    async with running_service("health", env, log_path) as channel:
        yield health_pb2_grpc.HealthMonitorServiceStub(channel)


def failure(provider: str, model: str, reason: str = "PROVIDER_UNAVAILABLE") -> health_pb2.AttemptOutcome:
    outcome = health_pb2.AttemptOutcome(provider=provider, model=model, success=False, error_reason=reason)
    outcome.finished_at.GetCurrentTime()
    return outcome


def success(provider: str, model: str, latency_ms: int = 200) -> health_pb2.AttemptOutcome:
    outcome = health_pb2.AttemptOutcome(
        provider=provider,
        model=model,
        success=True,
        total_latency_ms=latency_ms,
        time_to_first_token_ms=latency_ms // 4,
        input_tokens=100,
        output_tokens=50,
        output_tokens_per_second=80.0,
    )
    outcome.finished_at.GetCurrentTime()
    return outcome


async def entry_of(
    stub: health_pb2_grpc.HealthMonitorServiceStub, provider: str, model: str
) -> health_pb2.ModelHealth | None:
    snapshot = (await stub.Snapshot(health_pb2.SnapshotRequest(provider=provider), timeout=5)).snapshot
    return next((e for e in snapshot.entries if e.model == model), None)


async def wait_for_samples(
    stub: health_pb2_grpc.HealthMonitorServiceStub, provider: str, model: str, samples: int
) -> health_pb2.ModelHealth:
    async with asyncio.timeout(5):
        while True:
            found = await entry_of(stub, provider, model)
            if found is not None and found.samples >= samples:
                return found
            await asyncio.sleep(0.05)


async def wait_for_entry(
    stub: health_pb2_grpc.HealthMonitorServiceStub,
    provider: str,
    model: str,
    breaker: int,
    within_s: float = 5,
) -> health_pb2.ModelHealth:
    async with asyncio.timeout(within_s):
        while True:
            found = await entry_of(stub, provider, model)
            if found is not None and found.breaker == breaker:
                return found
            await asyncio.sleep(0.05)


@pytest.fixture(scope="module")
async def memory_health(
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[health_pb2_grpc.HealthMonitorServiceStub]:
    log_path = tmp_path_factory.mktemp("health-log") / "health.log"
    async with running_health(health_env(), log_path) as stub:
        yield stub


@pytest.mark.parametrize(
    ("outcome", "field"),
    [
        (health_pb2.AttemptOutcome(model="m", success=True), "outcomes[1].provider"),
        (health_pb2.AttemptOutcome(provider="p", success=False), "outcomes[1].error_reason"),
        (
            health_pb2.AttemptOutcome(provider="p", success=False, error_reason="BAD_LUCK"),
            "outcomes[1].error_reason",
        ),
        (
            health_pb2.AttemptOutcome(provider="p", success=True, error_reason="TIMEOUT"),
            "outcomes[1].error_reason",
        ),
        (
            health_pb2.AttemptOutcome(provider="p", success=True, output_tokens_per_second=float("nan")),
            "outcomes[1].output_tokens_per_second",
        ),
    ],
)
async def test_a_bad_outcome_refuses_the_whole_batch(
    memory_health: health_pb2_grpc.HealthMonitorServiceStub, outcome: health_pb2.AttemptOutcome, field: str
) -> None:
    provider = f"refused-{field.split('.')[-1]}"
    batch = [failure(provider, f"{provider}/m"), outcome]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await memory_health.Report(health_pb2.ReportRequest(outcomes=batch), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(raised.value)
    assert error.reason == Reason.INVALID_REQUEST
    assert error.metadata.get("field") == field
    await asyncio.sleep(0.3)
    # Nothing of the batch counted, not even its valid first outcome.
    assert await entry_of(memory_health, provider, f"{provider}/m") is None


async def test_too_many_outcomes_in_one_report_are_refused(
    memory_health: health_pb2_grpc.HealthMonitorServiceStub,
) -> None:
    batch = [success("bulk", "bulk/m") for _ in range(1_001)]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await memory_health.Report(health_pb2.ReportRequest(outcomes=batch), timeout=5)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    accepted = await memory_health.Report(health_pb2.ReportRequest(outcomes=batch[:1_000]), timeout=5)
    assert accepted.accepted == 1_000


async def test_failures_open_the_breaker_and_watch_sees_it_turn_half_open_then_close(
    memory_health: health_pb2_grpc.HealthMonitorServiceStub,
) -> None:
    watch = memory_health.Watch(health_pb2.WatchRequest(subscriber_id="test"))
    events = aiter(watch)
    first = await anext(events)
    assert first.WhichOneof("event") == "snapshot"

    await memory_health.Report(
        health_pb2.ReportRequest(outcomes=[success("acme", "acme/m")] + [failure("acme", "acme/m")] * 4),
        timeout=5,
    )
    four = await wait_for_entry(memory_health, "acme", "acme/m", health_pb2.BREAKER_STATE_CLOSED)
    assert four.consecutive_failures == 4 and four.status == health_pb2.HEALTH_STATUS_DEGRADED
    await memory_health.Report(health_pb2.ReportRequest(outcomes=[failure("acme", "acme/m")]), timeout=5)

    seen: list[int] = []
    async with asyncio.timeout(OPEN_S + 5):
        async for event in events:
            assert event.WhichOneof("event") == "update"
            for entry in event.update.entries:
                if (entry.provider, entry.model) == ("acme", "acme/m") and (
                    not seen or seen[-1] != entry.breaker
                ):
                    seen.append(entry.breaker)
                    if entry.breaker == health_pb2.BREAKER_STATE_OPEN:
                        assert entry.status == health_pb2.HEALTH_STATUS_DOWN
                        assert entry.reason == "breaker open: 5 consecutive failures"
                        assert entry.last_error == "PROVIDER_UNAVAILABLE"
                        assert entry.HasField("breaker_retry_at")
            if seen and seen[-1] == health_pb2.BREAKER_STATE_HALF_OPEN:
                break
    assert seen[-2:] == [health_pb2.BREAKER_STATE_OPEN, health_pb2.BREAKER_STATE_HALF_OPEN]

    await memory_health.Report(health_pb2.ReportRequest(outcomes=[success("acme", "acme/m")]), timeout=5)
    closed = await wait_for_entry(memory_health, "acme", "acme/m", health_pb2.BREAKER_STATE_CLOSED)
    assert closed.consecutive_failures == 0
    assert closed.samples == 7
    watch.cancel()


async def test_statistics_and_headroom_reach_the_snapshot(
    memory_health: health_pb2_grpc.HealthMonitorServiceStub,
) -> None:
    outcomes = [success("stats", "stats/m", latency_ms=100 * (i + 1)) for i in range(10)]
    outcomes[-1].headroom.limit_requests = 1_000
    outcomes[-1].headroom.remaining_requests = 3
    outcomes[-1].headroom.requests_reset_at.GetCurrentTime()
    outcomes[-1].headroom.requests_reset_at.seconds += 60
    await memory_health.Report(health_pb2.ReportRequest(outcomes=outcomes), timeout=5)
    found = await wait_for_samples(memory_health, "stats", "stats/m", 10)
    # Nearest rank over 100, 200, ..., 1000 ms.
    assert (found.p50_latency_ms, found.p95_latency_ms, found.p99_latency_ms) == (500, 1_000, 1_000)
    assert found.output_tokens_per_second == pytest.approx(80.0)
    assert found.status == health_pb2.HEALTH_STATUS_DEGRADED
    assert found.reason == "rate-limit headroom low: 3 of 1000 requests left"
    assert found.headroom.remaining_requests == 3


async def test_regions_predictions_and_the_provider_aggregate_reach_the_snapshot(
    memory_health: health_pb2_grpc.HealthMonitorServiceStub,
) -> None:
    outcomes: list[health_pb2.AttemptOutcome] = []
    for index in range(4):
        near = success("geo", "geo/fast", latency_ms=100)
        near.region, near.predicted_latency_ms = "us", 125  # off by 25 %
        far = success("geo", "geo/fast", latency_ms=400)
        far.region, far.predicted_latency_ms = "eu", 100 if index == 3 else 400  # once off by 75 %
        outcomes += [near, far]
    outcomes += [failure("geo", "geo/broken")] * 5
    await memory_health.Report(health_pb2.ReportRequest(outcomes=outcomes), timeout=5)
    fast = await wait_for_samples(memory_health, "geo", "geo/fast", 8)
    assert [(r.region, r.samples) for r in fast.regions] == [("eu", 4), ("us", 4)]
    assert (fast.regions[0].ewma_latency_ms, fast.regions[1].ewma_latency_ms) == (400.0, 100.0)
    assert fast.plan_latency_error_samples == 8
    assert fast.plan_latency_error_p95 == pytest.approx(0.75)
    assert 0 < fast.plan_latency_error < 0.75
    broken = await wait_for_entry(memory_health, "geo", "geo/broken", health_pb2.BREAKER_STATE_OPEN)
    assert broken.status == health_pb2.HEALTH_STATUS_DOWN
    # The provider's entry has every model's traffic, but one broken model opens nothing else.
    provider = await wait_for_samples(memory_health, "geo", "", 13)
    assert provider.error_rate == pytest.approx(5 / 13)
    assert provider.last_error == "PROVIDER_UNAVAILABLE"
    assert [r.region for r in provider.regions] == ["eu", "us"]
    assert (provider.breaker, provider.status) == (
        health_pb2.BREAKER_STATE_CLOSED,
        health_pb2.HEALTH_STATUS_HEALTHY,
    )
    still = await entry_of(memory_health, "geo", "geo/fast")
    assert still is not None and still.breaker == health_pb2.BREAKER_STATE_CLOSED


async def test_two_replicas_on_one_redis_share_the_picture_and_a_late_one_warms_up(
    redis_url: str, tmp_path: Path
) -> None:
    env = health_env(redis_url)
    async with (
        running_health(env, tmp_path / "a.log") as first,
        running_health(env, tmp_path / "b.log") as second,
    ):
        await first.Report(health_pb2.ReportRequest(outcomes=[failure("shared", "shared/m")] * 5), timeout=5)
        on_second = await wait_for_entry(second, "shared", "shared/m", health_pb2.BREAKER_STATE_OPEN)
        on_first = await wait_for_entry(first, "shared", "shared/m", health_pb2.BREAKER_STATE_OPEN)
        assert on_second.reason == on_first.reason == "breaker open: 5 consecutive failures"
        await second.Report(health_pb2.ReportRequest(outcomes=[success("other", "other/m")] * 3), timeout=5)
        await wait_for_samples(first, "other", "other/m", 3)
        async with running_health(env, tmp_path / "c.log") as late:
            warmed = await entry_of(late, "shared", "shared/m")
            assert warmed is not None
            assert warmed.consecutive_failures == 5 and warmed.samples == 5
            assert warmed.breaker in (health_pb2.BREAKER_STATE_OPEN, health_pb2.BREAKER_STATE_HALF_OPEN)
            other = await entry_of(late, "other", "other/m")
            assert other is not None and other.samples == 3
