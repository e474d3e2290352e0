"""Active probes: the jittered schedule (with an injected sleep and a seeded rng), raising and slow probes
turned into failed outcomes, publish errors that do not stop a loop, start/stop, `failed_probe`, and
`adapter_probe` against a fake adapter channel."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2

from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.settings import Settings
from switchyard.health import prober as prober_module
from switchyard.health.prober import (
    JITTER,
    PROBE_TIMEOUT_CAP_S,
    Prober,
    adapter_probe,
    failed_probe,
    probe_timeout_s,
)
from switchyard.v1 import common_pb2, health_pb2, provider_pb2

NOW = 1_700_000_000.25


class FakeSleep:
    """Records each delay; from the `limit`-th call on it parks (until cancelled) and sets `done`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.delays: list[float] = []
        self.done = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        if len(self.delays) >= self.limit:
            self.done.set()
            await asyncio.Event().wait()
        await asyncio.sleep(0)


class Recorder:
    """A probe and a publish that remember their calls."""

    def __init__(self, *, probe_error: BaseException | None = None, publish_error: bool = False) -> None:
        self.probed: list[tuple[str, str]] = []
        self.published: list[list[health_pb2.AttemptOutcome]] = []
        self.publish_calls = 0
        self._probe_error = probe_error
        self._publish_error = publish_error

    async def probe(self, provider: str, vendor: str) -> health_pb2.AttemptOutcome:
        self.probed.append((provider, vendor))
        if self._probe_error is not None:
            raise self._probe_error
        return health_pb2.AttemptOutcome(success=True, total_latency_ms=10 * len(self.probed))

    async def publish(self, outcomes: list[health_pb2.AttemptOutcome]) -> None:
        self.publish_calls += 1
        if self._publish_error:
            raise RuntimeError("feed down")
        self.published.append(outcomes)


def make_prober(
    recorder: Recorder,
    sleep: Callable[[float], Awaitable[None]],
    *,
    interval_s: float = 10.0,
    seed: int = 42,
    providers: dict[str, str] | None = None,
) -> Prober:
    return Prober(
        providers if providers is not None else {"openai": "openai"},
        recorder.probe,
        recorder.publish,
        interval_s,
        random.Random(seed),
        sleep=sleep,
        clock=lambda: NOW,
    )


async def run_until(prober: Prober, sleep: FakeSleep) -> None:
    prober.start()
    try:
        await asyncio.wait_for(sleep.done.wait(), timeout=5)
    finally:
        await prober.stop()


def seconds_of(stamp: timestamp_pb2.Timestamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


# --- construction and timeouts ------------------------------------------------------------------


@pytest.mark.parametrize("interval_s", [0.0, -1.0])
def test_interval_must_be_positive(interval_s: float) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="interval_s"):
        Prober({"openai": "openai"}, recorder.probe, recorder.publish, interval_s, random.Random(0))


def test_probe_timeout_is_the_interval_capped() -> None:
    assert PROBE_TIMEOUT_CAP_S == 10.0
    assert JITTER == 0.1
    assert probe_timeout_s(0.05) == 0.05
    assert probe_timeout_s(10.0) == 10.0
    assert probe_timeout_s(30.0) == 10.0


# --- the schedule -------------------------------------------------------------------------------


async def test_schedule_is_a_random_offset_then_jittered_intervals() -> None:
    recorder, sleep = Recorder(), FakeSleep(limit=6)
    await run_until(make_prober(recorder, sleep, interval_s=10.0, seed=42), sleep)
    replica = random.Random(42)
    expected = [replica.uniform(0.0, 10.0)] + [10.0 * replica.uniform(0.9, 1.1) for _ in range(5)]
    assert sleep.delays == expected
    assert 0.0 <= sleep.delays[0] < 10.0
    assert all(9.0 <= delay <= 11.0 for delay in sleep.delays[1:])
    # One probe between consecutive sleeps: 5 probes, each published on its own.
    assert recorder.probed == [("openai", "openai")] * 5
    assert [len(batch) for batch in recorder.published] == [1] * 5
    outcome = recorder.published[0][0]
    assert (outcome.provider, outcome.probe, outcome.success, outcome.total_latency_ms) == (
        "openai",
        True,
        True,
        10,
    )


async def test_schedule_stays_in_bounds_for_many_seeds() -> None:
    firsts: list[float] = []
    for seed in range(40):
        recorder, sleep = Recorder(), FakeSleep(limit=4)
        await run_until(make_prober(recorder, sleep, interval_s=2.0, seed=seed), sleep)
        first, *later = sleep.delays
        assert 0.0 <= first < 2.0
        assert all(2.0 * (1 - JITTER) <= delay <= 2.0 * (1 + JITTER) for delay in later)
        assert len(later) == 3
        firsts.append(first)
    # Offsets spread over the interval rather than sitting at one point.
    assert min(firsts) < 0.5
    assert max(firsts) > 1.5
    assert len(set(firsts)) == len(firsts)


async def test_publish_errors_do_not_stop_the_loop() -> None:
    recorder, sleep = Recorder(publish_error=True), FakeSleep(limit=4)
    await run_until(make_prober(recorder, sleep), sleep)
    assert len(recorder.probed) == 3
    assert recorder.publish_calls == 3
    assert recorder.published == []


async def test_a_raising_probe_keeps_the_loop_going_with_failed_outcomes() -> None:
    recorder, sleep = Recorder(probe_error=ConnectionError("refused")), FakeSleep(limit=3)
    await run_until(make_prober(recorder, sleep), sleep)
    assert len(recorder.published) == 2
    for (outcome,) in recorder.published:
        assert outcome.success is False
        assert outcome.error_reason == "PROVIDER_UNAVAILABLE"
        assert outcome.probe is True


async def test_a_probe_that_learns_nothing_publishes_nothing_and_the_loop_goes_on() -> None:
    answers: list[health_pb2.AttemptOutcome | None] = [None, health_pb2.AttemptOutcome(success=True), None]
    probed: list[str] = []

    async def probe(provider: str, vendor: str) -> health_pb2.AttemptOutcome | None:
        probed.append(provider)
        return answers[len(probed) - 1]

    recorder, sleep = Recorder(), FakeSleep(limit=4)
    prober = Prober(
        {"openai": "openai"}, probe, recorder.publish, 10.0, random.Random(1), sleep=sleep, clock=lambda: NOW
    )
    await run_until(prober, sleep)
    assert probed == ["openai"] * 3
    assert recorder.publish_calls == 1
    assert [(o.provider, o.probe, o.success) for (o,) in recorder.published] == [("openai", True, True)]


async def test_every_provider_gets_its_own_loop_and_start_is_idempotent() -> None:
    recorder = Recorder()
    parked = asyncio.Event()
    calls: dict[asyncio.Task[Any] | None, int] = {}

    async def sleep(delay: float) -> None:
        task = asyncio.current_task()
        calls[task] = calls.get(task, 0) + 1
        if calls[task] >= 2:  # each loop probes once, then parks
            if sum(calls.values()) >= 4:
                parked.set()
            await asyncio.Event().wait()

    providers = {"openai": "openai", "groq": "openai_compatible"}
    prober = make_prober(recorder, sleep, providers=providers)
    prober.start()
    prober.start()
    try:
        await asyncio.wait_for(parked.wait(), timeout=5)
        await asyncio.sleep(0.01)
    finally:
        await prober.stop()
    assert sorted(recorder.probed) == [("groq", "openai_compatible"), ("openai", "openai")]
    assert len(calls) == 2
    assert sorted(outcome.provider for (outcome,) in recorder.published) == ["groq", "openai"]
    assert all(task is not None and task.cancelled() for task in calls)


async def test_stop_without_start_and_twice_is_harmless() -> None:
    recorder, sleep = Recorder(), FakeSleep(limit=2)
    prober = make_prober(recorder, sleep)
    await prober.stop()
    await run_until(prober, sleep)
    await prober.stop()
    assert len(recorder.probed) == 1


# --- probe_once ---------------------------------------------------------------------------------


async def test_probe_once_marks_the_outcome_as_this_providers_probe() -> None:
    async def probe(provider: str, vendor: str) -> health_pb2.AttemptOutcome:
        return health_pb2.AttemptOutcome(provider="someone-else", model="", success=True, total_latency_ms=42)

    recorder = Recorder()
    prober = Prober({"openai": "openai"}, probe, recorder.publish, 10.0, random.Random(0), clock=lambda: NOW)
    outcome = await prober.probe_once("openai", "openai")
    assert outcome is not None
    assert (outcome.provider, outcome.probe, outcome.success, outcome.total_latency_ms) == (
        "openai",
        True,
        True,
        42,
    )


async def test_probe_once_passes_on_a_probe_that_learnt_nothing() -> None:
    async def probe(provider: str, vendor: str) -> health_pb2.AttemptOutcome | None:
        return None

    recorder = Recorder()
    prober = Prober({"openai": "openai"}, probe, recorder.publish, 10.0, random.Random(0), clock=lambda: NOW)
    assert await prober.probe_once("openai", "openai") is None


@pytest.mark.parametrize("error", [RuntimeError("boom"), ConnectionError("refused"), ValueError("bad")])
async def test_a_raising_probe_is_provider_unavailable(error: Exception) -> None:
    recorder = Recorder(probe_error=error)
    prober = make_prober(recorder, FakeSleep(limit=1))
    outcome = await prober.probe_once("anthropic", "anthropic")
    assert outcome is not None
    assert recorder.probed == [("anthropic", "anthropic")]
    assert outcome.provider == "anthropic"
    assert outcome.model == ""
    assert outcome.probe is True
    assert outcome.success is False
    assert outcome.error_reason == "PROVIDER_UNAVAILABLE"
    assert 0 <= outcome.total_latency_ms < 1000
    assert seconds_of(outcome.finished_at) == NOW


async def test_a_slow_probe_times_out_after_the_interval() -> None:
    async def slow(provider: str, vendor: str) -> health_pb2.AttemptOutcome:
        await asyncio.sleep(5)
        return health_pb2.AttemptOutcome(success=True)

    recorder = Recorder()
    prober = Prober({"openai": "openai"}, slow, recorder.publish, 0.05, random.Random(0), clock=lambda: NOW)
    started = time.monotonic()
    outcome = await prober.probe_once("openai", "openai")
    assert outcome is not None
    elapsed = time.monotonic() - started
    assert 0.04 <= elapsed < 1.0
    assert outcome.error_reason == "TIMEOUT"
    assert outcome.success is False
    assert outcome.probe is True
    assert outcome.provider == "openai"
    assert 40 <= outcome.total_latency_ms < 1000
    assert seconds_of(outcome.finished_at) == NOW


# --- failed_probe -------------------------------------------------------------------------------


def test_failed_probe_with_a_given_time() -> None:
    outcome = failed_probe("mistral", Reason.TIMEOUT, latency_ms=1234, now=NOW)
    assert outcome.provider == "mistral"
    assert outcome.model == ""
    assert outcome.probe is True
    assert outcome.success is False
    assert outcome.error_reason == "TIMEOUT"
    assert outcome.total_latency_ms == 1234
    assert (outcome.finished_at.seconds, outcome.finished_at.nanos) == (1_700_000_000, 250_000_000)


def test_failed_probe_defaults_to_now() -> None:
    before = time.time()
    outcome = failed_probe("mistral", Reason.PROVIDER_UNAVAILABLE)
    after = time.time()
    assert outcome.total_latency_ms == 0
    assert before - 1e-6 <= seconds_of(outcome.finished_at) <= after + 1e-6


# --- adapter_probe ------------------------------------------------------------------------------


class FakeAdapterChannel:
    """Enough of a grpc.aio.Channel for `ProviderAdapterServiceStub.Probe`."""

    def __init__(self, reply: provider_pb2.ProbeResponse | BaseException) -> None:
        self.reply = reply
        self.requests: list[tuple[provider_pb2.ProbeRequest, float]] = []

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        if method != "/switchyard.v1.ProviderAdapterService/Probe":
            return self.unexpected

        async def call(request: provider_pb2.ProbeRequest, timeout: float) -> provider_pb2.ProbeResponse:
            self.requests.append((request, timeout))
            if isinstance(self.reply, BaseException):
                raise self.reply
            return self.reply

        return call

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self.unexpected

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Callable[..., Any]:
        return self.unexpected

    @staticmethod
    def unexpected(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("only Probe is called")


class FakePool(ChannelPool):
    def __init__(self, channel: FakeAdapterChannel) -> None:
        super().__init__()
        self.channel = channel
        self.targets: list[str] = []

    def get(self, target: str) -> Any:
        self.targets.append(target)
        return self.channel


def rpc_error(code: grpc.StatusCode, trailers: tuple[tuple[str, str | bytes], ...] = ()) -> BaseException:
    error: BaseException = grpc.aio.AioRpcError(
        code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details="nope"
    )
    return error


async def test_adapter_probe_turns_a_reply_into_an_outcome() -> None:
    headroom = common_pb2.RateLimitHeadroom(remaining_requests=7)
    channel = FakeAdapterChannel(provider_pb2.ProbeResponse(ok=True, latency_ms=87, headroom=headroom))
    pool = FakePool(channel)
    settings = Settings(health_probe_interval_s=4.0, adapter_targets={"openai": "adapter:1"})
    before = time.time()
    outcome = await adapter_probe(pool, settings)("openai-main", "openai")
    assert outcome is not None
    assert pool.targets == ["adapter:1"]
    assert [(request.provider, timeout) for request, timeout in channel.requests] == [("openai-main", 4.0)]
    assert (outcome.provider, outcome.probe, outcome.success) == ("openai-main", True, True)
    assert outcome.total_latency_ms == 87
    assert outcome.error_reason == ""
    assert outcome.headroom.remaining_requests == 7
    assert seconds_of(outcome.finished_at) >= before - 1e-6


@pytest.mark.parametrize(
    ("error_reason", "expected"),
    [("PROVIDER_OVERLOADED", "PROVIDER_OVERLOADED"), ("", "PROVIDER_UNAVAILABLE")],
)
async def test_adapter_probe_not_ok_names_a_reason(error_reason: str, expected: str) -> None:
    channel = FakeAdapterChannel(
        provider_pb2.ProbeResponse(ok=False, latency_ms=5, error_reason=error_reason)
    )
    outcome = await adapter_probe(FakePool(channel), Settings())("openai", "openai")
    assert outcome is not None
    assert (outcome.success, outcome.error_reason, outcome.total_latency_ms) == (False, expected, 5)
    assert not outcome.HasField("headroom")
    # The default interval (30 s) is above the cap.
    assert channel.requests[0][1] == PROBE_TIMEOUT_CAP_S


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (grpc.StatusCode.DEADLINE_EXCEEDED, "TIMEOUT"),
        (grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED"),
        (grpc.StatusCode.INTERNAL, "INTERNAL"),
    ],
)
async def test_adapter_probe_maps_rpc_errors(code: grpc.StatusCode, expected: str) -> None:
    channel = FakeAdapterChannel(rpc_error(code))
    outcome = await adapter_probe(FakePool(channel), Settings())("openai", "openai")
    assert outcome is not None
    assert (outcome.provider, outcome.probe, outcome.success) == ("openai", True, False)
    assert outcome.error_reason == expected


async def test_adapter_probe_reads_the_reason_from_rich_error_details() -> None:
    rich = SwitchyardError(grpc.StatusCode.PERMISSION_DENIED, Reason.AUTH_FAILED, "bad key")
    channel = FakeAdapterChannel(rpc_error(grpc.StatusCode.PERMISSION_DENIED, rich.trailing_metadata()))
    outcome = await adapter_probe(FakePool(channel), Settings())("openai", "openai")
    assert outcome is not None
    assert outcome.error_reason == "AUTH_FAILED"


class FakeLog:
    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.warnings.append((event, fields))


async def test_an_unreachable_adapter_is_skipped_and_logged_once_per_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_log = FakeLog()
    monkeypatch.setattr(prober_module, "log", fake_log)
    channel = FakeAdapterChannel(rpc_error(grpc.StatusCode.UNAVAILABLE))
    probe = adapter_probe(FakePool(channel), Settings())
    assert await probe("openai", "openai") is None
    assert await probe("openai", "openai") is None
    unreachable = [fields for event, fields in fake_log.warnings if event == "probe_adapter_unreachable"]
    assert unreachable == [{"provider": "openai", "vendor": "openai"}]
    # Back: the probe counts again, and the next outage is logged again.
    channel.reply = provider_pb2.ProbeResponse(ok=True, latency_ms=3)
    outcome = await probe("openai", "openai")
    assert outcome is not None
    assert outcome.success is True
    channel.reply = rpc_error(grpc.StatusCode.UNAVAILABLE)
    assert await probe("openai", "openai") is None
    unreachable = [fields for event, fields in fake_log.warnings if event == "probe_adapter_unreachable"]
    assert len(unreachable) == 2


async def test_an_unreachable_adapter_is_tracked_per_vendor(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_log = FakeLog()
    monkeypatch.setattr(prober_module, "log", fake_log)
    probe = adapter_probe(FakePool(FakeAdapterChannel(rpc_error(grpc.StatusCode.UNAVAILABLE))), Settings())
    assert await probe("openai", "openai") is None
    assert await probe("mistral", "mistral") is None
    assert await probe("mistral", "mistral") is None
    vendors = [
        fields["vendor"] for event, fields in fake_log.warnings if event == "probe_adapter_unreachable"
    ]
    assert vendors == ["openai", "mistral"]
