"""The edge's outcome reporter: `outcome()` field by field (and what the pipeline puts in it:
the edge's region and the plan's predicted latency), and `OutcomeReporter` batching, bounding,
retrying and closing against a fake health monitor."""

from __future__ import annotations

import asyncio
import inspect
import time
import types
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import grpc
import pytest

from switchyard.adapters.service import build_adapter
from switchyard.common.catalog import parse_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.common.settings import Settings
from switchyard.edge import reporter
from switchyard.edge.pipeline import Caller, ChatPipeline, collect
from switchyard.edge.reporter import MAX_BATCH, RETRY_CAP_S, HealthReports, OutcomeReporter, outcome
from switchyard.router.plan import Planner
from switchyard.router.table import RoutingTable, build_snapshot
from switchyard.sim.faults import FaultKnobs, start_simulator
from switchyard.v1 import common_pb2, health_pb2, provider_pb2_grpc

_real_sleep = asyncio.sleep
SIM_KEY = "sk-sim-reporter-test-key"


def _down() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())


async def until(condition: Callable[[], bool], timeout_s: float = 1.0) -> None:
    """Wait until `condition()` holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await _real_sleep(0.002)


class FakeHealth:
    """A health monitor whose `Report` records what it got and can fail or hang on demand."""

    def __init__(self) -> None:
        self.requests: list[health_pb2.ReportRequest] = []
        self.timeouts: list[float | None] = []
        self.attempts = 0
        # Exceptions raised by the next calls, one per call, in order.
        self.failures: list[BaseException] = []
        self.always_fail = False
        # When set (and not yet opened), a call waits on it before answering.
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def Report(
        self, request: health_pb2.ReportRequest, *, timeout: float | None = None
    ) -> health_pb2.ReportResponse:
        self.attempts += 1
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.failures:
            raise self.failures.pop(0)
        if self.always_fail:
            raise _down()
        self.requests.append(request)
        self.timeouts.append(timeout)
        return health_pb2.ReportResponse(accepted=len(request.outcomes))

    def sent_ids(self) -> list[str]:
        return [o.request_id for r in self.requests for o in r.outcomes]


class RecordingLog:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.events.append(("info", event, fields))


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> RecordingLog:
    recording = RecordingLog()
    monkeypatch.setattr(reporter, "log", recording)
    return recording


def item(request_id: str) -> health_pb2.AttemptOutcome:
    return health_pb2.AttemptOutcome(provider="alpha", model="alpha/m", request_id=request_id, success=True)


def make(health: FakeHealth, *, interval_s: float = 0.02, max_buffered: int = 10_000) -> OutcomeReporter:
    return OutcomeReporter(
        cast(HealthReports, health),
        "edge-7",
        interval_s=interval_s,
        call_timeout_s=1.5,
        max_buffered=max_buffered,
    )


def record_sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the reporter's own sleeps instant and record how long each would have been."""
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(delay)
        await _real_sleep(0)

    patched = types.SimpleNamespace(**{**vars(asyncio), "sleep": sleep})
    monkeypatch.setattr(reporter, "asyncio", patched)
    return delays


def finished(result: health_pb2.AttemptOutcome) -> datetime:
    return result.finished_at.ToDatetime(tzinfo=UTC)


# --- outcome() -----------------------------------------------------------------------------------


def test_success_outcome_carries_identity_latencies_tokens_and_throughput() -> None:
    before = datetime.now(UTC)
    result = outcome(
        provider="alpha",
        model="alpha/m",
        request_id="req-1",
        error=None,
        first_token_s=0.25,
        total_s=1.25,
        usage=common_pb2.Usage(input_tokens=120, output_tokens=40),
    )
    after = datetime.now(UTC)
    assert (result.provider, result.model, result.request_id) == ("alpha", "alpha/m", "req-1")
    assert result.success is True and result.error_reason == ""
    assert (result.time_to_first_token_ms, result.total_latency_ms) == (250, 1250)
    assert (result.input_tokens, result.output_tokens) == (120, 40)
    # 40 output tokens over the 1.0 s between the first token and the end.
    assert result.output_tokens_per_second == 40.0
    assert result.probe is False
    assert result.HasField("finished_at") and before <= finished(result) <= after
    assert not result.HasField("headroom")


def test_throughput_without_a_first_token_uses_the_whole_duration() -> None:
    result = outcome(
        provider="alpha",
        model="alpha/m",
        request_id="r",
        error=None,
        first_token_s=None,
        total_s=0.5,
        usage=common_pb2.Usage(input_tokens=3, output_tokens=30),
    )
    assert result.time_to_first_token_ms == 0
    assert result.total_latency_ms == 500
    assert result.output_tokens_per_second == 60.0


def test_no_throughput_without_output_or_generating_time_and_no_tokens_without_usage() -> None:
    no_output = outcome(
        provider="a",
        model="a/m",
        request_id="r",
        error=None,
        first_token_s=0.1,
        total_s=0.4,
        usage=common_pb2.Usage(input_tokens=9, output_tokens=0),
    )
    assert (no_output.input_tokens, no_output.output_tokens, no_output.output_tokens_per_second) == (
        9,
        0,
        0.0,
    )
    instant = outcome(
        provider="a",
        model="a/m",
        request_id="r",
        error=None,
        first_token_s=0.4,
        total_s=0.4,
        usage=common_pb2.Usage(output_tokens=5),
    )
    assert instant.output_tokens == 5 and instant.output_tokens_per_second == 0.0
    no_usage = outcome(provider="a", model="a/m", request_id="r", error=None, first_token_s=0.1, total_s=0.3)
    assert (no_usage.input_tokens, no_usage.output_tokens, no_usage.output_tokens_per_second) == (0, 0, 0.0)


def test_outcome_carries_the_edge_region_and_the_plans_prediction() -> None:
    plain = outcome(provider="a", model="a/m", request_id="r", error=None, first_token_s=0.1, total_s=0.3)
    assert (plain.region, plain.predicted_latency_ms) == ("", 0)  # none known: the proto defaults
    placed = outcome(
        provider="a",
        model="a/m",
        request_id="r",
        error=SwitchyardError(grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, "down"),
        first_token_s=None,
        total_s=0.3,
        region="eu-west",
        predicted_latency_ms=640,
    )
    assert (placed.region, placed.predicted_latency_ms) == ("eu-west", 640)
    assert (
        outcome(
            provider="a",
            model="a/m",
            request_id="r",
            error=None,
            first_token_s=None,
            total_s=0.3,
            predicted_latency_ms=-5,
        ).predicted_latency_ms
        == 0
    )


async def test_the_pipeline_reports_its_region_and_the_candidates_predicted_latency() -> None:
    # A real pipeline, its adapter a gRPC server in front of the OpenAI simulator, planning on
    # a table whose latency model predicts 1,234 ms for the model (measured from this region).
    sim = await start_simulator("openai", port=0, knobs=FaultKnobs(text="Fine.", chunks=2), api_key=SIM_KEY)
    catalog = parse_catalog(
        f"""
providers:
  up: {{vendor: openai, base_url: "{sim.base_url}"}}
models:
  - {{id: up/m, provider: up, upstream_model: gpt-4o-mini, context_window: 128000,
     max_output_tokens: 1000, prices: {{input: "1", output: "2"}}}}
"""
    )
    servicer = build_adapter(catalog, "openai", {"SWITCHYARD_PROVIDER_UP_API_KEY": SIM_KEY})
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    settings = Settings.from_env(
        {"SWITCHYARD_ADAPTER_OPENAI_TARGET": f"127.0.0.1:{port}", "SWITCHYARD_EDGE_REGION": "eu-west"}
    )
    assert settings.edge_region == "eu-west"
    measured = health_pb2.ModelHealth(
        provider="up",
        model="up/m",
        latency_base_ms=9_999,
        latency_fit_samples=40,
        regions=[health_pb2.RegionLatency(region="eu-west", samples=40, latency_base_ms=1_234)],
    )
    snapshot = build_snapshot(catalog, version=3, health=[measured])
    planner = Planner(RoutingTable.from_snapshot(snapshot, region=settings.edge_region))
    channels = ChannelPool()
    reported: list[health_pb2.AttemptOutcome] = []
    pipeline = ChatPipeline(settings, catalog, channels, planner=planner, report=reported.append)
    request = common_pb2.ChatRequest(model="up/m", request_id="req-geo")
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Hello?")])
    try:
        response = await collect(pipeline.stream(request, Caller("t"), timeout_s=15))
        assert response.message.parts[0].text == "Fine."
    finally:
        pipeline.close()
        await channels.close()
        await server.stop(grace=None)
        await servicer.aclose()
        await sim.close()
    [sent] = reported
    assert (sent.model, sent.success) == ("up/m", True)
    assert (sent.region, sent.predicted_latency_ms) == ("eu-west", 1_234)


def test_latencies_are_rounded_to_ms_and_never_negative() -> None:
    result = outcome(
        provider="a", model="a/m", request_id="r", error=None, first_token_s=0.0126, total_s=0.0304
    )
    assert (result.time_to_first_token_ms, result.total_latency_ms) == (13, 30)
    negative = outcome(
        provider="a", model="a/m", request_id="r", error=None, first_token_s=-0.5, total_s=-1.0
    )
    assert (negative.time_to_first_token_ms, negative.total_latency_ms) == (0, 0)


def test_success_headroom_is_copied_and_stamped_with_the_finish_time() -> None:
    given = common_pb2.RateLimitHeadroom(
        limit_requests=100, remaining_requests=7, limit_tokens=10_000, remaining_tokens=0, retry_after_ms=0
    )
    result = outcome(
        provider="alpha",
        model="alpha/m",
        request_id="r",
        error=None,
        first_token_s=0.1,
        total_s=0.2,
        headroom=given,
    )
    assert result.HasField("headroom")
    headroom = result.headroom
    assert (headroom.limit_requests, headroom.remaining_requests) == (100, 7)
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (10_000, 0)
    assert headroom.HasField("remaining_tokens")  # an explicit zero survives the copy
    assert headroom.observed_at == result.finished_at
    # The caller's message is copied, not modified.
    assert not given.HasField("observed_at")


def test_an_empty_headroom_is_not_reported() -> None:
    result = outcome(
        provider="a",
        model="a/m",
        request_id="r",
        error=None,
        first_token_s=None,
        total_s=0.2,
        headroom=common_pb2.RateLimitHeadroom(),
    )
    assert not result.HasField("headroom")


def test_failure_carries_the_reason_and_headroom_from_error_metadata_and_retry_delay() -> None:
    error = SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        "slow down",
        metadata={"remaining_requests": "0", "remaining_tokens": "512", "vendor": "openai"},
        retry_after_s=1.5,
    )
    before = datetime.now(UTC)
    result = outcome(
        provider="alpha", model="alpha/m", request_id="req-9", error=error, first_token_s=None, total_s=0.08
    )
    assert result.success is False
    assert result.error_reason == "RATE_LIMITED" == Reason.RATE_LIMITED.value
    assert (result.time_to_first_token_ms, result.total_latency_ms) == (0, 80)
    assert before <= finished(result)
    headroom = result.headroom
    assert headroom.HasField("remaining_requests") and headroom.remaining_requests == 0
    assert headroom.remaining_tokens == 512
    assert headroom.retry_after_ms == 1500
    assert not headroom.HasField("limit_requests") and not headroom.HasField("limit_tokens")
    assert headroom.observed_at == result.finished_at


def test_failure_headroom_ignores_non_numeric_metadata_and_rounds_a_tiny_delay_up() -> None:
    error = SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.PROVIDER_OVERLOADED,
        "busy",
        metadata={"remaining_requests": "lots", "remaining_tokens": ""},
        retry_after_s=0.0001,
    )
    result = outcome(provider="a", model="a/m", request_id="r", error=error, first_token_s=None, total_s=0.1)
    assert result.error_reason == "PROVIDER_OVERLOADED"
    assert not result.headroom.HasField("remaining_requests")
    assert not result.headroom.HasField("remaining_tokens")
    assert result.headroom.retry_after_ms == 1


def test_failure_without_rate_limit_facts_has_no_headroom() -> None:
    error = SwitchyardError(
        grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, "down", retry_after_s=0.0
    )
    result = outcome(
        provider="a",
        model="a/m",
        request_id="r",
        error=error,
        first_token_s=0.05,
        total_s=0.3,
        usage=common_pb2.Usage(input_tokens=4, output_tokens=10),
    )
    assert result.error_reason == "PROVIDER_UNAVAILABLE" and result.success is False
    assert not result.HasField("headroom")
    # Tokens of a failed attempt that produced some output are still reported.
    assert (result.input_tokens, result.output_tokens) == (4, 10)
    assert result.output_tokens_per_second == 40.0


def test_a_failures_explicit_headroom_wins_over_its_metadata() -> None:
    error = SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        "slow down",
        metadata={"remaining_requests": "3"},
        retry_after_s=2.0,
    )
    result = outcome(
        provider="a",
        model="a/m",
        request_id="r",
        error=error,
        first_token_s=None,
        total_s=0.1,
        headroom=common_pb2.RateLimitHeadroom(remaining_tokens=99),
    )
    assert result.headroom.remaining_tokens == 99
    assert not result.headroom.HasField("remaining_requests")
    assert result.headroom.retry_after_ms == 0


# --- OutcomeReporter -----------------------------------------------------------------------------


def test_module_limits() -> None:
    assert (reporter.MAX_BUFFERED, MAX_BATCH, RETRY_CAP_S) == (10_000, 1_000, 30.0)


async def test_add_is_synchronous_and_never_waits_on_the_monitor() -> None:
    health = FakeHealth()
    health.gate = asyncio.Event()  # every Report hangs until opened
    sender = make(health)
    assert not inspect.iscoroutinefunction(OutcomeReporter.add)
    sender.add(item("a"))
    sender.start()
    try:
        await asyncio.wait_for(health.entered.wait(), 1.0)
        assert sender.pending == 0  # the batch is in flight
        started = time.perf_counter()
        for n in range(200):
            sender.add(item(f"b{n}"))
        assert time.perf_counter() - started < 0.5
        assert sender.pending == 200 and sender.dropped == 0
    finally:
        health.gate.set()
        await sender.aclose()
    assert health.sent_ids() == ["a"] + [f"b{n}" for n in range(200)]


async def test_outcomes_are_sent_in_batches_every_interval() -> None:
    health = FakeHealth()
    sender = make(health, interval_s=0.02)
    for name in ("a", "b", "c"):
        sender.add(item(name))
    sender.start()
    try:
        await until(lambda: len(health.requests) == 1)
        first = health.requests[0]
        assert [o.request_id for o in first.outcomes] == ["a", "b", "c"]
        assert first.reporter_id == "edge-7"
        assert health.timeouts == [1.5]
        assert sender.pending == 0 and sender.sent == 3
        # Nothing buffered: nothing sent, however many intervals pass.
        await _real_sleep(0.1)
        assert health.attempts == 1
        sender.add(item("d"))
        sender.add(item("e"))
        await until(lambda: len(health.requests) == 2)
        assert [o.request_id for o in health.requests[1].outcomes] == ["d", "e"]
        assert health.requests[1].reporter_id == "edge-7"
        assert sender.sent == 5 and sender.dropped == 0
    finally:
        await sender.aclose()


async def test_start_twice_runs_one_sender() -> None:
    health = FakeHealth()
    sender = make(health)
    sender.start()
    sender.start()
    try:
        names = [t.get_name() for t in asyncio.all_tasks()]
        assert names.count("outcome-reporter") == 1
    finally:
        await sender.aclose()
    assert "outcome-reporter" not in [t.get_name() for t in asyncio.all_tasks()]


async def test_flush_splits_a_large_backlog_into_max_batch_sized_calls() -> None:
    health = FakeHealth()
    sender = make(health)
    total = 2 * MAX_BATCH + 500
    for n in range(total):
        sender.add(item(str(n)))
    assert await sender.flush() == total
    assert [len(r.outcomes) for r in health.requests] == [MAX_BATCH, MAX_BATCH, 500]
    assert health.sent_ids() == [str(n) for n in range(total)]
    assert sender.sent == total and sender.pending == 0


async def test_flush_of_an_empty_buffer_sends_nothing() -> None:
    health = FakeHealth()
    assert await make(health).flush() == 0
    assert health.attempts == 0


async def test_a_full_buffer_drops_the_oldest_and_counts_them() -> None:
    health = FakeHealth()
    sender = make(health, max_buffered=5)
    for n in range(8):
        sender.add(item(str(n)))
    assert sender.pending == 5 and sender.dropped == 3
    await sender.flush()
    assert health.sent_ids() == ["3", "4", "5", "6", "7"]
    assert sender.dropped == 3 and sender.sent == 5


async def test_a_failed_flush_raises_and_keeps_the_batch_in_order() -> None:
    health = FakeHealth()
    health.always_fail = True
    sender = make(health)
    for name in ("a", "b", "c"):
        sender.add(item(name))
    with pytest.raises(grpc.aio.AioRpcError):
        await sender.flush()
    assert sender.pending == 3 and sender.dropped == 0 and sender.sent == 0
    health.always_fail = False
    sender.add(item("d"))
    assert await sender.flush() == 4
    assert health.sent_ids() == ["a", "b", "c", "d"]


async def test_a_failed_batch_only_keeps_what_still_fits_dropping_the_oldest() -> None:
    health = FakeHealth()
    health.gate = asyncio.Event()
    health.failures = [_down()]
    sender = make(health, max_buffered=4)
    for name in ("a0", "a1", "a2", "a3"):
        sender.add(item(name))
    flushing = asyncio.create_task(sender.flush())
    await asyncio.wait_for(health.entered.wait(), 1.0)
    assert sender.pending == 0
    for name in ("b0", "b1", "b2"):  # arrive while the batch is in flight
        sender.add(item(name))
    health.gate.set()
    with pytest.raises(grpc.aio.AioRpcError):
        await flushing
    # Room for one of the failed batch: its newest, ahead of the newer arrivals.
    assert sender.pending == 4 and sender.dropped == 3
    await sender.flush()
    assert health.sent_ids() == ["a3", "b0", "b1", "b2"]
    assert sender.sent + sender.dropped == 7


async def test_overflow_during_a_failing_call_counts_every_lost_outcome() -> None:
    health = FakeHealth()
    health.gate = asyncio.Event()
    health.failures = [_down()]
    sender = make(health, max_buffered=4)
    for n in range(4):
        sender.add(item(f"a{n}"))
    flushing = asyncio.create_task(sender.flush())
    await asyncio.wait_for(health.entered.wait(), 1.0)
    for n in range(6):
        sender.add(item(f"b{n}"))
    assert sender.dropped == 2  # b0, b1 pushed out by the buffer itself
    health.gate.set()
    with pytest.raises(grpc.aio.AioRpcError):
        await flushing
    assert sender.dropped == 6 and sender.pending == 4
    await sender.flush()
    assert health.sent_ids() == ["b2", "b3", "b4", "b5"]
    assert sender.sent + sender.dropped == 10


async def test_the_sender_retries_with_backoff_logs_once_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch, log: RecordingLog
) -> None:
    delays = record_sleeps(monkeypatch)
    health = FakeHealth()
    health.failures = [_down(), _down(), _down()]
    sender = make(health, interval_s=1.0)
    for name in ("a", "b"):
        sender.add(item(name))
    sender.start()
    try:
        await until(lambda: len(health.requests) == 1)
        await until(lambda: len(delays) >= 5)
    finally:
        await sender.aclose()
    assert health.attempts == 4
    assert health.sent_ids() == ["a", "b"]
    assert sender.sent == 2 and sender.dropped == 0 and sender.pending == 0
    # interval, then doubling per failure, back to the interval once a report succeeded.
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 1.0]
    assert log.events == [
        ("warning", "health_report_failed", {"status": "UNAVAILABLE", "pending": 2}),
        ("info", "health_report_resumed", {"dropped": 0}),
    ]


async def test_the_retry_delay_is_capped(monkeypatch: pytest.MonkeyPatch, log: RecordingLog) -> None:
    delays = record_sleeps(monkeypatch)
    health = FakeHealth()
    health.always_fail = True
    sender = make(health, interval_s=0.5)
    sender.add(item("a"))
    sender.start()
    try:
        await until(lambda: len(delays) >= 9)
    finally:
        await sender.aclose()
    # Doubling from the interval until the cap (30 s, not 30 intervals).
    assert delays[:9] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, RETRY_CAP_S, RETRY_CAP_S, RETRY_CAP_S]
    # The monitor never came back: the last flush on close says what was left unsent.
    assert [e[1] for e in log.events] == ["health_report_failed", "health_report_unsent"]
    assert sender.pending == 1 and sender.sent == 0


async def test_a_report_timeout_is_retried_like_an_unreachable_monitor(
    monkeypatch: pytest.MonkeyPatch, log: RecordingLog
) -> None:
    delays = record_sleeps(monkeypatch)
    health = FakeHealth()
    health.failures = [TimeoutError()]
    sender = make(health, interval_s=0.5)
    sender.add(item("a"))
    sender.start()
    try:
        await until(lambda: len(health.requests) == 1)
    finally:
        await sender.aclose()
    assert health.sent_ids() == ["a"]
    assert delays[:2] == [0.5, 1.0]
    assert log.events[0] == ("warning", "health_report_failed", {"status": "DEADLINE", "pending": 1})


async def test_aclose_flushes_what_is_left_and_stops_the_task() -> None:
    health = FakeHealth()
    sender = make(health, interval_s=60.0)  # the sender never gets to send by itself
    sender.start()
    for name in ("a", "b"):
        sender.add(item(name))
    await _real_sleep(0.01)
    assert health.attempts == 0
    await sender.aclose()
    assert health.sent_ids() == ["a", "b"]
    assert sender.pending == 0 and sender.sent == 2
    assert "outcome-reporter" not in [t.get_name() for t in asyncio.all_tasks()]


async def test_aclose_resends_a_batch_cut_off_in_flight() -> None:
    health = FakeHealth()
    health.gate = asyncio.Event()
    sender = make(health, interval_s=0.01)
    for name in ("a", "b"):
        sender.add(item(name))
    sender.start()
    await asyncio.wait_for(health.entered.wait(), 1.0)
    assert sender.pending == 0
    health.gate.set()  # later calls answer at once; the one in flight is cancelled first
    await sender.aclose()
    assert health.attempts == 2
    assert health.sent_ids() == ["a", "b"]
    assert sender.pending == 0 and sender.dropped == 0


async def test_aclose_with_the_monitor_down_does_not_raise_and_keeps_the_outcomes() -> None:
    health = FakeHealth()
    health.always_fail = True
    sender = make(health, interval_s=60.0)
    sender.start()
    sender.add(item("a"))
    await sender.aclose()
    assert health.attempts == 1 and health.requests == []
    assert sender.pending == 1 and sender.sent == 0
    assert "outcome-reporter" not in [t.get_name() for t in asyncio.all_tasks()]


async def test_aclose_without_start_still_flushes() -> None:
    health = FakeHealth()
    sender = make(health)
    sender.add(item("a"))
    await sender.aclose()
    assert health.sent_ids() == ["a"]
