"""The health book: what counts as a failure, the breaker's transitions, statuses and their reasons,
rate-limit headroom, the outcome window and its expiry, percentiles, EWMAs, the latency fit, versions,
probe entries and snapshots. Time comes from a fake clock, so every value is exact."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from google.protobuf import timestamp_pb2

from switchyard.common.settings import Settings
from switchyard.health.book import (
    CALLER_SIDE_REASONS,
    HEADROOM_DEFAULT_RESET_S,
    MAX_REGIONS,
    HealthBook,
    HealthConfig,
    counts_as_failure,
)
from switchyard.health.latency import DEFAULT_FORGETTING, MIN_FIT_SAMPLES, OnlineLatencyModel
from switchyard.v1 import common_pb2, health_pb2

START = 1_000.0
PROVIDER = "openai"
MODEL = "gpt-4o"

CLOSED = health_pb2.BREAKER_STATE_CLOSED
OPEN = health_pb2.BREAKER_STATE_OPEN
HALF_OPEN = health_pb2.BREAKER_STATE_HALF_OPEN
HEALTHY = health_pb2.HEALTH_STATUS_HEALTHY
DEGRADED = health_pb2.HEALTH_STATUS_DEGRADED
DOWN = health_pb2.HEALTH_STATUS_DOWN
UNSPECIFIED = health_pb2.HEALTH_STATUS_UNSPECIFIED


class FakeClock:
    """Wall seconds that only move when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_book(fake: FakeClock, **config: Any) -> HealthBook:
    return HealthBook(HealthConfig(**config), clock=lambda: fake.now)


def stamp(seconds: float) -> timestamp_pb2.Timestamp:
    whole = math.floor(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=round((seconds - whole) * 1e9))


def seconds_of(value: timestamp_pb2.Timestamp) -> float:
    return value.seconds + value.nanos / 1e9


def success(
    latency_ms: int = 100,
    *,
    provider: str = PROVIDER,
    model: str = MODEL,
    at: float | None = None,
    ttft_ms: int = 0,
    tokens_per_s: float = 0.0,
    input_tokens: int = 0,
    output_tokens: int = 0,
    headroom: common_pb2.RateLimitHeadroom | None = None,
    region: str = "",
    predicted_ms: int = 0,
) -> health_pb2.AttemptOutcome:
    outcome = health_pb2.AttemptOutcome(
        provider=provider,
        model=model,
        region=region,
        predicted_latency_ms=predicted_ms,
        success=True,
        total_latency_ms=latency_ms,
        time_to_first_token_ms=ttft_ms,
        output_tokens_per_second=tokens_per_s,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
    )
    if at is not None:
        outcome.finished_at.CopyFrom(stamp(at))
    if headroom is not None:
        outcome.headroom.CopyFrom(headroom)
    return outcome


def failure(
    reason: str = "PROVIDER_UNAVAILABLE",
    *,
    provider: str = PROVIDER,
    model: str = MODEL,
    at: float | None = None,
    headroom: common_pb2.RateLimitHeadroom | None = None,
) -> health_pb2.AttemptOutcome:
    outcome = health_pb2.AttemptOutcome(provider=provider, model=model, success=False, error_reason=reason)
    if at is not None:
        outcome.finished_at.CopyFrom(stamp(at))
    if headroom is not None:
        outcome.headroom.CopyFrom(headroom)
    return outcome


def current(book: HealthBook, provider: str = PROVIDER, model: str = MODEL) -> health_pb2.ModelHealth:
    entry = book.entry(provider, model)
    assert entry is not None
    return entry


def trip(book: HealthBook, failures: int) -> None:
    for _ in range(failures):
        book.apply(failure())
    assert current(book).breaker == OPEN


# --- counts_as_failure and the config ---------------------------------------------------------------


def test_a_success_is_not_a_failure() -> None:
    assert counts_as_failure(success()) is False


@pytest.mark.parametrize(
    "reason",
    ["PROVIDER_UNAVAILABLE", "ERROR_REASON_TIMEOUT", "PROVIDER_OVERLOADED", "INTERNAL", ""],
)
def test_provider_side_failures_count(reason: str) -> None:
    assert counts_as_failure(failure(reason)) is True


@pytest.mark.parametrize("reason", sorted(CALLER_SIDE_REASONS))
def test_caller_side_failures_count_neither_way(reason: str) -> None:
    assert counts_as_failure(failure(reason)) is None
    assert counts_as_failure(failure(f"ERROR_REASON_{reason}")) is None


def test_caller_side_reasons_are_the_documented_set() -> None:
    assert CALLER_SIDE_REASONS == {
        "INVALID_REQUEST",
        "CONTEXT_TOO_LONG",
        "CONTENT_FILTERED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BUDGET_EXCEEDED",
        "RATE_LIMITED",
        "CANCELLED",
    }


def test_config_defaults() -> None:
    config = HealthConfig()
    assert (config.failure_threshold, config.error_rate_threshold, config.window_s) == (5, 0.5, 60.0)
    assert (config.min_samples, config.open_s, config.half_open_trials) == (10, 60.0, 3)
    assert (config.degraded_error_rate, config.ewma_alpha, config.max_window_samples) == (0.1, 0.2, 1000)


def test_config_from_settings_takes_the_health_settings() -> None:
    settings = Settings(
        health_failure_threshold=7,
        health_error_rate_threshold=0.25,
        health_window_s=30.0,
        health_min_samples=4,
        health_open_s=12.5,
        health_half_open_trials=2,
    )
    config = HealthConfig.from_settings(settings)
    assert config == HealthConfig(
        failure_threshold=7,
        error_rate_threshold=0.25,
        window_s=30.0,
        min_samples=4,
        open_s=12.5,
        half_open_trials=2,
    )


# --- first contact ------------------------------------------------------------------------------


def test_unknown_entry_is_none_and_the_first_success_makes_it_healthy() -> None:
    fake = FakeClock()
    book = make_book(fake)
    assert book.entry(PROVIDER, MODEL) is None
    changed = book.apply(success(120))
    # The model's entry, and the provider's aggregate it feeds.
    assert [(e.provider, e.model) for e in changed] == [(PROVIDER, MODEL), (PROVIDER, "")]
    entry = current(book)
    assert entry.status == HEALTHY
    assert entry.reason == ""
    assert entry.breaker == CLOSED
    assert entry.samples == 1
    assert entry.consecutive_failures == 0
    assert entry.error_rate == 0.0
    assert entry.half_open_trials == 3
    assert seconds_of(entry.updated_at) == START
    assert not entry.HasField("breaker_retry_at")
    assert not entry.HasField("last_error_at")
    assert not entry.HasField("headroom")
    assert book.entry(PROVIDER, "other-model") is None


def test_last_error_drops_the_prefix_and_defaults_to_unknown() -> None:
    fake = FakeClock()
    book = make_book(fake)
    book.apply(failure("ERROR_REASON_TIMEOUT"))
    entry = current(book)
    assert entry.last_error == "TIMEOUT"
    assert seconds_of(entry.last_error_at) == START
    fake.advance(2)
    book.apply(failure(""))
    entry = current(book)
    assert entry.last_error == "UNKNOWN"
    assert seconds_of(entry.last_error_at) == START + 2
    book.apply(success())
    assert current(book).last_error == "UNKNOWN"  # a success keeps the last error


# --- the breaker --------------------------------------------------------------------------------


def test_breaker_opens_after_exactly_failure_threshold_consecutive_failures() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=5, min_samples=1000, open_s=30.0)
    for count in range(1, 5):
        book.apply(failure())
        entry = current(book)
        assert entry.breaker == CLOSED, f"opened after {count} failures"
        assert entry.consecutive_failures == count
        assert entry.status == DEGRADED  # all failures: a 100% error rate
    changed = book.apply(failure())
    assert [e.model for e in changed] == [MODEL, ""]
    entry = changed[0]
    assert entry.breaker == OPEN
    assert entry.status == DOWN
    assert entry.reason == "breaker open: 5 consecutive failures"
    assert "5 consecutive failures" in entry.reason
    assert entry.consecutive_failures == 5
    assert seconds_of(entry.breaker_retry_at) == START + 30.0


def test_a_success_resets_the_consecutive_failures() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=3, min_samples=1000)
    for outcome in (failure(), failure(), success(), failure(), failure()):
        book.apply(outcome)
    entry = current(book)
    assert entry.breaker == CLOSED
    assert entry.consecutive_failures == 2
    book.apply(failure())
    assert current(book).breaker == OPEN
    assert current(book).reason == "breaker open: 3 consecutive failures"


def test_error_rate_trips_only_with_min_samples_in_the_window() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=100, min_samples=10, error_rate_threshold=0.5)
    # S F S F S F S F: 50% from the 2nd outcome on, but fewer than 10 samples.
    for index in range(9):
        book.apply(success() if index % 2 == 0 else failure())
        assert current(book).breaker == CLOSED, f"opened at outcome {index + 1}"
    assert current(book).error_rate == pytest.approx(4 / 9)
    entry = book.apply(failure())[0]  # the 10th outcome: 5 of 10 failed
    assert entry.breaker == OPEN
    assert entry.status == DOWN
    assert entry.reason == "breaker open: error rate 50% over 60 s"
    assert entry.consecutive_failures == 1


def test_error_rate_below_the_threshold_does_not_trip() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=100, min_samples=10, error_rate_threshold=0.5, window_s=30.0)
    for _ in range(6):
        book.apply(success())
    for _ in range(5):
        book.apply(failure())  # 4/10, then 5/11: below 50%
    assert current(book).breaker == CLOSED
    assert current(book).error_rate == pytest.approx(5 / 11)
    entry = book.apply(failure())[0]  # 6/12
    assert entry.breaker == OPEN
    assert entry.reason == "breaker open: error rate 50% over 30 s"


def test_caller_side_failures_neither_trip_nor_reset_the_breaker() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=5, min_samples=1000)
    for _ in range(4):
        book.apply(failure())
    version = book.version
    for reason in ("INVALID_REQUEST", "RATE_LIMITED", "ERROR_REASON_CONTEXT_TOO_LONG"):
        for _ in range(3):
            assert book.apply(failure(reason)) == []
    assert book.version == version
    entry = current(book)
    assert entry.consecutive_failures == 4
    assert entry.samples == 4
    assert entry.last_error == "PROVIDER_UNAVAILABLE"
    assert entry.breaker == CLOSED
    book.apply(failure())
    assert current(book).reason == "breaker open: 5 consecutive failures"


def test_caller_side_failure_of_an_unknown_entry_creates_nothing() -> None:
    fake = FakeClock()
    book = make_book(fake)
    version = book.version
    assert book.apply(failure("INVALID_REQUEST")) == []
    assert book.entry(PROVIDER, MODEL) is None
    assert book.version == version
    assert list(book.snapshot().entries) == []


def test_open_turns_half_open_only_after_open_s_via_tick() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=30.0)
    trip(book, 2)
    fake.advance(29.999)
    assert book.tick() == []
    assert current(book).breaker == OPEN
    fake.advance(0.001)
    changed = book.tick()
    assert len(changed) == 1
    entry = changed[0]
    assert entry.breaker == HALF_OPEN
    assert entry.status == DEGRADED
    assert entry.reason == "half-open: trial requests"
    assert not entry.HasField("breaker_retry_at")
    assert current(book).breaker == HALF_OPEN
    assert book.tick() == []  # nothing further changes


def test_half_open_closes_on_a_success() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0, min_samples=1000)
    trip(book, 2)
    fake.advance(10)
    book.tick()
    entry = book.apply(success(80))[0]
    assert entry.breaker == CLOSED
    assert entry.status == HEALTHY
    assert entry.reason == ""
    assert entry.consecutive_failures == 0
    assert entry.error_rate == 0.0  # the failures that tripped it left the window
    assert not entry.HasField("breaker_retry_at")


def test_half_open_reopens_on_a_failure() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)
    trip(book, 2)
    fake.advance(15)
    book.tick()
    entry = book.apply(failure("TIMEOUT"))[0]
    assert entry.breaker == OPEN
    assert entry.status == DOWN
    assert entry.reason == "breaker open: trial failed"
    assert seconds_of(entry.breaker_retry_at) == START + 15 + 10.0
    fake.advance(9.5)
    assert book.tick() == []
    fake.advance(0.5)
    assert book.tick()[0].breaker == HALF_OPEN


def test_caller_side_failures_leave_a_half_open_breaker_half_open() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)
    trip(book, 2)
    fake.advance(10)
    book.tick()
    assert book.apply(failure("RATE_LIMITED")) == []
    assert current(book).breaker == HALF_OPEN


def test_after_closing_one_more_failure_does_not_trip_again() -> None:
    # S F F F trips on 3 consecutive failures. Had the window kept those failures, the next
    # failure would make 4 of 6 (>= 50%, >= 4 samples) and trip the error-rate rule at once.
    fake = FakeClock()
    book = make_book(fake, failure_threshold=3, min_samples=4, error_rate_threshold=0.5, open_s=5.0)
    book.apply(success())
    trip(book, 3)
    fake.advance(5)
    book.tick()
    assert book.apply(success())[0].breaker == CLOSED
    entry = book.apply(failure())[0]
    assert entry.breaker == CLOSED
    assert entry.consecutive_failures == 1
    assert entry.error_rate == pytest.approx(1 / 3)
    assert entry.status == DEGRADED
    assert entry.reason == "error rate 33% over 60 s"


def test_an_outcome_after_retry_at_half_opens_without_a_tick() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)
    trip(book, 2)
    fake.advance(11)
    assert book.apply(success())[0].breaker == CLOSED  # half-open, then closed by the success


def test_a_success_while_open_does_not_close_the_breaker() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)
    trip(book, 2)
    fake.advance(5)
    entry = book.apply(success())[0]
    assert entry.breaker == OPEN
    assert entry.status == DOWN
    assert entry.consecutive_failures == 0


def test_failures_while_open_keep_the_original_retry_time() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)
    trip(book, 2)
    fake.advance(5)
    entry = book.apply(failure())[0]
    assert entry.breaker == OPEN
    assert entry.reason == "breaker open: 2 consecutive failures"
    assert seconds_of(entry.breaker_retry_at) == START + 10.0
    assert entry.consecutive_failures == 3


# --- statuses -----------------------------------------------------------------------------------


def test_status_degraded_at_the_degraded_error_rate() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=100, min_samples=1000)
    for _ in range(10):
        book.apply(success())
    book.apply(failure())  # 1 of 11: 9%
    entry = current(book)
    assert entry.status == HEALTHY
    assert entry.reason == ""
    fake2 = FakeClock()
    book2 = make_book(fake2, failure_threshold=100, min_samples=1000)
    for _ in range(9):
        book2.apply(success())
    book2.apply(failure())  # 1 of 10: 10%
    entry = current(book2)
    assert entry.status == DEGRADED
    assert entry.reason == "error rate 10% over 60 s"


def test_status_down_carries_the_trip_reason_and_healthy_none() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=5, min_samples=1000)
    book.apply(success(provider="anthropic"))
    trip(book, 5)
    down = current(book)
    healthy = current(book, "anthropic")
    assert (down.status, down.reason) == (DOWN, "breaker open: 5 consecutive failures")
    assert (healthy.status, healthy.reason) == (HEALTHY, "")


# --- rate-limit headroom ------------------------------------------------------------------------


def test_exhausted_requests_degrade_until_the_reset_passes() -> None:
    fake = FakeClock()
    book = make_book(fake)
    headroom = common_pb2.RateLimitHeadroom(remaining_requests=0, requests_reset_at=stamp(START + 30))
    entry = book.apply(success(headroom=headroom))[0]
    assert entry.status == DEGRADED
    assert entry.reason == "rate-limit headroom low: 0 requests left"
    assert entry.headroom.remaining_requests == 0
    assert entry.headroom.HasField("remaining_requests")
    fake.advance(29.9)
    assert book.tick() == []
    assert current(book).status == DEGRADED
    fake.advance(0.1)
    changed = book.tick()
    assert len(changed) == 1
    assert changed[0].status == HEALTHY
    assert changed[0].reason == ""
    assert book.tick() == []


def test_headroom_at_five_percent_of_the_limit_is_low() -> None:
    fake = FakeClock()
    book = make_book(fake)
    reset = stamp(START + 60)
    low = common_pb2.RateLimitHeadroom(limit_requests=1000, remaining_requests=50, requests_reset_at=reset)
    entry = book.apply(success(headroom=low))[0]
    assert entry.status == DEGRADED
    assert entry.reason == "rate-limit headroom low: 50 of 1000 requests left"
    enough = common_pb2.RateLimitHeadroom(limit_requests=1000, remaining_requests=51, requests_reset_at=reset)
    entry = book.apply(success(headroom=enough))[0]
    assert entry.status == HEALTHY
    assert entry.headroom.remaining_requests == 51


def test_low_token_headroom_is_reported_as_tokens() -> None:
    fake = FakeClock()
    book = make_book(fake)
    headroom = common_pb2.RateLimitHeadroom(
        limit_requests=100,
        remaining_requests=90,
        limit_tokens=100_000,
        remaining_tokens=10,
        tokens_reset_at=stamp(START + 5),
    )
    entry = book.apply(success(headroom=headroom))[0]
    assert (entry.status, entry.reason) == (DEGRADED, "rate-limit headroom low: 10 of 100000 tokens left")
    fake.advance(5)
    assert book.tick()[0].status == HEALTHY


def test_retry_after_degrades_for_its_duration() -> None:
    fake = FakeClock()
    book = make_book(fake)
    entry = book.apply(success(headroom=common_pb2.RateLimitHeadroom(retry_after_ms=5000)))[0]
    assert (entry.status, entry.reason) == (DEGRADED, "rate-limited: retry after 5000 ms")
    assert seconds_of(entry.headroom.observed_at) == START  # filled in from the outcome's time
    fake.advance(4.999)
    assert book.tick() == []
    fake.advance(0.001)
    assert book.tick()[0].status == HEALTHY


def test_low_headroom_without_a_reset_time_counts_for_the_default_period() -> None:
    fake = FakeClock()
    book = make_book(fake)
    book.apply(success(headroom=common_pb2.RateLimitHeadroom(remaining_tokens=0)))
    assert current(book).reason == "rate-limit headroom low: 0 tokens left"
    fake.advance(HEADROOM_DEFAULT_RESET_S - 0.5)
    assert book.tick() == []
    fake.advance(0.5)
    assert book.tick()[0].status == HEALTHY


def test_a_given_observed_at_is_kept() -> None:
    fake = FakeClock()
    book = make_book(fake)
    headroom = common_pb2.RateLimitHeadroom(retry_after_ms=10_000, observed_at=stamp(START - 8))
    entry = book.apply(success(headroom=headroom))[0]
    assert seconds_of(entry.headroom.observed_at) == START - 8
    assert entry.status == DEGRADED
    fake.advance(2)
    assert book.tick()[0].status == HEALTHY


def test_an_empty_headroom_does_not_replace_the_latest_one() -> None:
    fake = FakeClock()
    book = make_book(fake)
    low = common_pb2.RateLimitHeadroom(remaining_requests=0, requests_reset_at=stamp(START + 30))
    book.apply(success(headroom=low))
    book.apply(success(headroom=common_pb2.RateLimitHeadroom()))
    book.apply(success())
    entry = current(book)
    assert entry.status == DEGRADED
    assert entry.headroom.HasField("remaining_requests")
    assert entry.headroom.remaining_requests == 0


def test_a_caller_side_failure_with_headroom_records_only_the_headroom() -> None:
    fake = FakeClock()
    book = make_book(fake)
    headroom = common_pb2.RateLimitHeadroom(remaining_requests=0, requests_reset_at=stamp(START + 30))
    changed = book.apply(failure("RATE_LIMITED", headroom=headroom))
    assert len(changed) == 1
    entry = changed[0]
    assert entry.samples == 0
    assert entry.consecutive_failures == 0
    assert entry.last_error == ""
    assert (entry.status, entry.reason) == (DEGRADED, "rate-limit headroom low: 0 requests left")
    fake.advance(30)
    # Nothing but headroom was ever heard: once it resets there is no status to give.
    assert book.tick()[0].status == UNSPECIFIED


# --- the window ---------------------------------------------------------------------------------


def test_window_samples_expire_via_tick() -> None:
    fake = FakeClock()
    book = make_book(fake, window_s=60.0)
    book.apply(failure())
    book.apply(success(200))
    entry = current(book)
    assert (entry.status, entry.reason) == (DEGRADED, "error rate 50% over 60 s")
    assert entry.p50_latency_ms == 200.0
    fake.advance(60)
    assert book.tick() == []  # exactly window_s old: still in
    fake.advance(0.001)
    changed = book.tick()
    assert [e.model for e in changed] == [MODEL, ""]  # the provider's aggregate expires too
    entry = changed[0]
    assert entry.status == HEALTHY
    assert entry.error_rate == 0.0
    assert (entry.p50_latency_ms, entry.p95_latency_ms, entry.p99_latency_ms) == (0.0, 0.0, 0.0)
    assert entry.samples == 2  # the total count stays
    assert book.tick() == []


def test_apply_expires_old_samples_before_counting() -> None:
    fake = FakeClock()
    book = make_book(fake, window_s=10.0, failure_threshold=100, min_samples=3)
    book.apply(failure())
    book.apply(failure())
    fake.advance(11)
    entry = book.apply(failure())[0]  # the first two expired: 1 sample, no error-rate trip
    assert entry.breaker == CLOSED
    assert entry.error_rate == 1.0
    assert entry.consecutive_failures == 3


def test_window_keeps_at_most_max_window_samples() -> None:
    fake = FakeClock()
    book = make_book(fake, max_window_samples=3)
    for latency in (10, 20, 30, 40, 50):
        book.apply(success(latency))
    entry = current(book)
    assert (entry.p50_latency_ms, entry.p95_latency_ms) == (40.0, 50.0)
    assert entry.samples == 5


def test_out_of_order_outcomes_are_windowed_by_finished_at() -> None:
    fake = FakeClock()
    book = make_book(fake, window_s=60.0)
    book.apply(success(10, at=START - 10))
    book.apply(success(5, at=START - 50))  # arrives later but finished earlier
    assert current(book).p50_latency_ms == 5.0
    fake.advance(15)  # cutoff START - 45: only the older outcome leaves
    entry = book.tick()[0]
    assert entry.p50_latency_ms == 10.0
    assert entry.p99_latency_ms == 10.0


def test_finished_at_in_the_future_is_clamped_to_now() -> None:
    fake = FakeClock()
    book = make_book(fake, window_s=60.0)
    entry = book.apply(failure(at=START + 3600))[0]
    assert seconds_of(entry.last_error_at) == START
    fake.advance(60.5)
    # Placed at START, the failure leaves the window now (placed an hour ahead, it would stay).
    assert book.tick()[0].error_rate == 0.0


def test_an_outcome_older_than_the_window_is_not_counted_in_it() -> None:
    fake = FakeClock()
    book = make_book(fake, window_s=60.0)
    book.apply(success())
    assert book.apply(failure(at=START - 120)) == []
    entry = book.entry(PROVIDER, MODEL)
    assert entry is not None
    assert (entry.error_rate, entry.samples, entry.consecutive_failures) == (0.0, 1, 0)
    assert entry.status == HEALTHY


def test_finished_at_in_the_past_is_used() -> None:
    fake = FakeClock()
    book = make_book(fake)
    entry = book.apply(failure(at=START - 12.5))[0]
    assert seconds_of(entry.last_error_at) == START - 12.5


# --- percentiles and EWMAs ----------------------------------------------------------------------


def test_percentiles_are_nearest_rank_over_a_hundred_values() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=1000, min_samples=1000)
    latencies = list(range(1, 101))
    random.Random(7).shuffle(latencies)
    for latency in latencies:
        book.apply(success(latency))
    book.apply(failure())  # failures have no latency
    entry = current(book)
    assert (entry.p50_latency_ms, entry.p95_latency_ms, entry.p99_latency_ms) == (50.0, 95.0, 99.0)


def test_percentiles_over_ten_values() -> None:
    fake = FakeClock()
    book = make_book(fake)
    for latency in (100, 30, 90, 10, 60, 20, 80, 40, 70, 50):
        book.apply(success(latency))
    entry = current(book)
    assert (entry.p50_latency_ms, entry.p95_latency_ms, entry.p99_latency_ms) == (50.0, 100.0, 100.0)


def test_percentiles_of_one_value_and_of_none() -> None:
    fake = FakeClock()
    book = make_book(fake)
    book.apply(success(42))
    entry = current(book)
    assert (entry.p50_latency_ms, entry.p95_latency_ms, entry.p99_latency_ms) == (42.0, 42.0, 42.0)
    book.apply(failure(provider="other"))
    entry = current(book, "other")
    assert (entry.p50_latency_ms, entry.p95_latency_ms, entry.p99_latency_ms) == (0.0, 0.0, 0.0)


def test_ewma_of_latency_ttft_and_tokens_per_second() -> None:
    fake = FakeClock()
    book = make_book(fake)
    book.apply(success(100, ttft_ms=50, tokens_per_s=10.0))
    entry = current(book)
    assert (entry.ewma_latency_ms, entry.ewma_time_to_first_token_ms) == (100.0, 50.0)
    assert entry.output_tokens_per_second == 10.0
    book.apply(success(200, ttft_ms=100, tokens_per_s=20.0))
    entry = current(book)
    assert entry.ewma_latency_ms == pytest.approx(120.0)
    assert entry.ewma_time_to_first_token_ms == pytest.approx(60.0)
    assert entry.output_tokens_per_second == pytest.approx(12.0)
    book.apply(success(300))
    entry = current(book)
    assert entry.ewma_latency_ms == pytest.approx(156.0)
    assert entry.ewma_time_to_first_token_ms == pytest.approx(60.0)  # 0 means unknown: unchanged
    assert entry.output_tokens_per_second == pytest.approx(12.0)


def test_ewma_ignores_failures_and_zero_latencies_and_follows_alpha() -> None:
    fake = FakeClock()
    book = make_book(fake, ewma_alpha=0.5)
    book.apply(success(100))
    book.apply(failure())
    book.apply(success(0))
    assert current(book).ewma_latency_ms == 100.0
    book.apply(success(300))
    assert current(book).ewma_latency_ms == pytest.approx(200.0)


def test_ewma_is_zero_before_any_success() -> None:
    fake = FakeClock()
    book = make_book(fake)
    entry = book.apply(failure())[0]
    assert (entry.ewma_latency_ms, entry.ewma_time_to_first_token_ms, entry.output_tokens_per_second) == (
        0.0,
        0.0,
        0.0,
    )


# --- the latency fit ----------------------------------------------------------------------------


def test_book_fits_latency_on_tokens() -> None:
    fake = FakeClock()
    book = make_book(fake)
    rng = random.Random(3)
    for _ in range(40):
        # An even input count keeps 0.5 ms per input token an exact integer latency.
        input_tokens, output_tokens = 2 * rng.randint(5, 2000), rng.randint(1, 800)
        latency = 100 + input_tokens // 2 + 20 * output_tokens
        book.apply(success(latency, input_tokens=input_tokens, output_tokens=output_tokens))
    entry = current(book)
    assert entry.latency_fit_samples == 40
    assert entry.latency_base_ms == pytest.approx(100.0, abs=0.5)
    assert entry.latency_ms_per_input_token == pytest.approx(0.5, abs=1e-3)
    assert entry.latency_ms_per_output_token == pytest.approx(20.0, abs=1e-3)
    assert entry.latency_prediction_error == pytest.approx(0.0, abs=1e-4)


def test_prediction_error_is_reported_once_the_fit_has_enough_samples() -> None:
    fake = FakeClock()
    book = make_book(fake)
    observations = [(100, 10, 400), (300, 20, 700), (50, 40, 1000), (200, 30, 2000), (400, 5, 300)]
    replica = OnlineLatencyModel()
    expected: float | None = None
    for index, (input_tokens, output_tokens, latency) in enumerate(observations):
        if replica.samples >= MIN_FIT_SAMPLES:
            error = abs(replica.predict(input_tokens, output_tokens) - latency) / latency
            expected = error if expected is None else expected + 0.2 * (error - expected)
        replica.update(input_tokens, output_tokens, latency)
        book.apply(success(latency, input_tokens=input_tokens, output_tokens=output_tokens))
        entry = current(book)
        assert entry.latency_fit_samples == index + 1
        if index < MIN_FIT_SAMPLES:
            assert entry.latency_prediction_error == 0.0
        else:
            assert expected is not None
            assert entry.latency_prediction_error == pytest.approx(expected)
            assert entry.latency_prediction_error > 0.01
    base, per_input, per_output = replica.coefficients
    entry = current(book)
    assert entry.latency_base_ms == pytest.approx(base)
    assert entry.latency_ms_per_input_token == pytest.approx(per_input)
    assert entry.latency_ms_per_output_token == pytest.approx(per_output)


def test_failures_and_zero_latencies_do_not_feed_the_fit() -> None:
    fake = FakeClock()
    book = make_book(fake)
    book.apply(success(250, input_tokens=10, output_tokens=10))
    book.apply(failure())
    book.apply(success(0, input_tokens=10, output_tokens=10))
    entry = current(book)
    assert entry.latency_fit_samples == 1
    assert (entry.latency_base_ms, entry.latency_ms_per_input_token, entry.latency_ms_per_output_token) == (
        250.0,
        0.0,
        0.0,
    )


# --- versions, probes and snapshots -------------------------------------------------------------


def test_version_strictly_increases_on_each_change_only() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)
    assert book.version == int(START * 1000)
    seen = [book.version]
    book.apply(success())
    seen.append(book.version)
    book.apply(failure())
    seen.append(book.version)
    book.apply(failure())  # trips
    seen.append(book.version)
    assert book.tick() == []
    assert book.version == seen[-1]
    assert book.apply(failure("INVALID_REQUEST")) == []
    assert book.version == seen[-1]
    fake.advance(10)
    assert len(book.tick()) == 1  # half-open
    seen.append(book.version)
    assert seen == sorted(set(seen))
    assert seen[1:4] == [seen[0] + 1, seen[0] + 2, seen[0] + 3]  # the clock stood still: +1 each
    assert book.version == int((START + 10) * 1000)  # wall milliseconds when the clock is ahead


def test_apply_many_bumps_the_version_once_and_reports_each_entry_once() -> None:
    fake = FakeClock()
    book = make_book(fake)
    version = book.version
    changed = book.apply_many(
        [success(), success(), failure(), success(model="m2"), failure("INVALID_REQUEST", model="m3")]
    )
    assert sorted((e.provider, e.model) for e in changed) == [
        (PROVIDER, ""),
        (PROVIDER, MODEL),
        (PROVIDER, "m2"),
    ]
    assert book.version == version + 1
    assert current(book).samples == 3
    assert book.apply_many([]) == []
    assert book.version == version + 1


def test_version_never_starts_below_one() -> None:
    assert HealthBook(HealthConfig(), clock=lambda: 0.0).version == 1


def test_probe_outcomes_update_the_provider_entry() -> None:
    fake = FakeClock()
    book = make_book(fake)
    probe = health_pb2.AttemptOutcome(provider=PROVIDER, probe=True, success=True, total_latency_ms=33)
    changed = book.apply(probe)
    assert [(e.provider, e.model) for e in changed] == [(PROVIDER, "")]
    assert book.entry(PROVIDER, MODEL) is None
    entry = current(book, PROVIDER, "")
    assert entry.samples == 1
    assert entry.ewma_latency_ms == 33.0
    book.apply(success(model=MODEL))
    assert current(book, PROVIDER, "").samples == 2  # traffic feeds the provider's statistics
    book.apply(probe)
    assert current(book, PROVIDER, MODEL).samples == 1  # a probe feeds no model's entry


def test_snapshot_is_sorted_and_filters_by_provider() -> None:
    fake = FakeClock()
    book = make_book(fake)
    book.apply(success(provider="openai", model="b"))
    book.apply(success(provider="anthropic", model="z"))
    book.apply(success(provider="openai", model="a"))
    book.apply(success(provider="openai", model=""))
    fake.advance(3)
    snapshot = book.snapshot()
    assert [(e.provider, e.model) for e in snapshot.entries] == [
        ("anthropic", ""),
        ("anthropic", "z"),
        ("openai", ""),
        ("openai", "a"),
        ("openai", "b"),
    ]
    assert snapshot.version == book.version
    assert seconds_of(snapshot.generated_at) == START + 3
    only = book.snapshot("openai")
    assert [(e.provider, e.model) for e in only.entries] == [("openai", ""), ("openai", "a"), ("openai", "b")]
    assert only.version == book.version
    assert list(book.snapshot("nobody").entries) == []


def test_two_books_given_the_same_outcomes_agree() -> None:
    outcomes = [success(100 + i, at=START - 30 + i) for i in range(5)] + [failure(at=START - 20)]
    first_clock, second_clock = FakeClock(), FakeClock()
    first, second = make_book(first_clock), make_book(second_clock)
    for outcome in outcomes:
        first.apply(outcome)
    second.apply_many(outcomes)
    assert list(first.snapshot().entries) == list(second.snapshot().entries)


# --- latency per region -------------------------------------------------------------------------


def test_latency_is_kept_per_reporting_region_beside_the_global_figures() -> None:
    fake = FakeClock()
    book = make_book(fake, ewma_alpha=0.5)
    book.apply(success(100, ttft_ms=40, region="us"))
    book.apply(success(500, ttft_ms=200, region="eu"))
    book.apply(success(300, ttft_ms=80, region="us"))
    book.apply(success(700))  # an edge without a region: global figures only
    entry = current(book)
    assert entry.ewma_latency_ms == pytest.approx(500.0)  # 100, 500, 300, 700 at alpha 0.5
    assert [r.region for r in entry.regions] == ["eu", "us"]
    eu, us = entry.regions
    assert (us.samples, us.ewma_latency_ms, us.ewma_time_to_first_token_ms) == (2, 200.0, 60.0)
    assert (eu.samples, eu.ewma_latency_ms, eu.ewma_time_to_first_token_ms) == (1, 500.0, 200.0)
    # Each region's own fit: below MIN_FIT_SAMPLES it is the region's (forgetting-weighted) mean.
    assert us.latency_base_ms == pytest.approx((DEFAULT_FORGETTING * 100 + 300) / (DEFAULT_FORGETTING + 1))
    assert (us.latency_ms_per_input_token, us.latency_ms_per_output_token) == (0.0, 0.0)
    assert eu.latency_base_ms == 500.0
    # Failures say nothing about latency, in a region or globally.
    failed = failure()
    failed.region = "ap"
    book.apply(failed)
    assert [r.region for r in current(book).regions] == ["eu", "us"]


def test_a_region_fit_learns_the_latency_seen_from_that_region() -> None:
    fake = FakeClock()
    book = make_book(fake)
    rng = random.Random(5)
    for _ in range(30):
        input_tokens, output_tokens = 2 * rng.randint(5, 2000), rng.randint(1, 800)
        base = 100 + input_tokens // 2 + 20 * output_tokens
        # The same provider seen from far away: 400 ms more on every call.
        book.apply(success(base, input_tokens=input_tokens, output_tokens=output_tokens, region="near"))
        book.apply(success(base + 400, input_tokens=input_tokens, output_tokens=output_tokens, region="far"))
    far, near = current(book).regions
    assert (far.region, near.region) == ("far", "near")
    assert near.latency_base_ms == pytest.approx(100.0, abs=0.5)
    assert far.latency_base_ms == pytest.approx(500.0, abs=0.5)
    for region in (far, near):
        assert region.samples == 30
        assert region.latency_ms_per_input_token == pytest.approx(0.5, abs=1e-3)
        assert region.latency_ms_per_output_token == pytest.approx(20.0, abs=1e-3)
        assert region.latency_prediction_error == pytest.approx(0.0, abs=1e-4)
        assert region.latency_fit_output_reach > 0
    # The global fit mixes both: its base lies between them.
    assert 100.0 < current(book).latency_base_ms < 500.0


def test_regions_per_entry_are_capped() -> None:
    fake = FakeClock()
    book = make_book(fake)
    for index in range(MAX_REGIONS + 3):
        book.apply(success(100 + index, region=f"r{index:03d}"))
    entry = current(book)
    assert len(entry.regions) == MAX_REGIONS
    assert entry.regions[-1].region == f"r{MAX_REGIONS - 1:03d}"
    assert entry.samples == MAX_REGIONS + 3  # the rest still count globally


# --- the provider's aggregate -------------------------------------------------------------------


def test_traffic_of_every_model_feeds_the_provider_statistics() -> None:
    fake = FakeClock()
    book = make_book(fake, ewma_alpha=0.5)
    book.apply(success(100, model="a", ttft_ms=20, tokens_per_s=10.0, region="us"))
    book.apply(success(300, model="b", ttft_ms=60, tokens_per_s=30.0))
    fake.advance(1)
    book.apply(failure("ERROR_REASON_TIMEOUT", model="b"))
    book.apply(failure("INVALID_REQUEST", model="a"))  # caller-side: counts nowhere
    provider = current(book, PROVIDER, "")
    assert provider.samples == 3
    assert provider.ewma_latency_ms == pytest.approx(200.0)
    assert provider.ewma_time_to_first_token_ms == pytest.approx(40.0)
    assert provider.output_tokens_per_second == pytest.approx(20.0)
    assert (provider.p50_latency_ms, provider.p95_latency_ms) == (100.0, 300.0)
    assert provider.error_rate == pytest.approx(1 / 3)
    assert provider.last_error == "TIMEOUT"
    assert seconds_of(provider.last_error_at) == START + 1
    assert [(r.region, r.samples) for r in provider.regions] == [("us", 1)]
    # Its breaker and status are the probes' business: traffic failures leave them alone.
    assert (provider.status, provider.breaker, provider.consecutive_failures) == (HEALTHY, CLOSED, 0)
    # Headroom stays with the model that reported it (limits are often per model).
    low = common_pb2.RateLimitHeadroom(remaining_requests=0)
    book.apply(success(100, model="a", headroom=low))
    assert current(book, PROVIDER, "a").HasField("headroom")
    assert not current(book, PROVIDER, "").HasField("headroom")


def test_one_model_failing_opens_no_breaker_for_the_provider_or_its_other_models() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=5, min_samples=4)
    book.apply(success(model="healthy"))
    for _ in range(10):
        book.apply(failure(model="broken"))
    assert current(book, PROVIDER, "broken").breaker == OPEN
    assert current(book, PROVIDER, "healthy").breaker == CLOSED
    assert current(book, PROVIDER, "healthy").status == HEALTHY
    provider = current(book, PROVIDER, "")
    assert provider.error_rate == pytest.approx(10 / 11)  # over 4 samples and past both thresholds
    assert (provider.breaker, provider.status, provider.reason) == (CLOSED, HEALTHY, "")


def test_the_provider_breaker_and_status_follow_its_probes_alone() -> None:
    fake = FakeClock()
    book = make_book(fake, failure_threshold=2, open_s=10.0)

    def probe(ok: bool) -> health_pb2.AttemptOutcome:
        if ok:
            return health_pb2.AttemptOutcome(provider=PROVIDER, probe=True, success=True, total_latency_ms=30)
        return health_pb2.AttemptOutcome(
            provider=PROVIDER, probe=True, success=False, error_reason="PROVIDER_UNAVAILABLE"
        )

    book.apply(probe(False))
    for _ in range(20):
        book.apply(success())  # traffic successes do not dilute the probes' error rate
    entry = current(book, PROVIDER, "")
    assert (entry.status, entry.reason) == (DEGRADED, "error rate 100% over 60 s")
    assert entry.consecutive_failures == 1
    book.apply(probe(False))
    assert current(book, PROVIDER, "").breaker == OPEN
    fake.advance(10)
    book.tick()
    assert current(book, PROVIDER, "").breaker == HALF_OPEN
    book.apply(success())  # a model's success is no probe of the provider
    book.apply(failure())  # nor is a model's failure
    assert current(book, PROVIDER, "").breaker == HALF_OPEN
    book.apply(probe(True))
    entry = current(book, PROVIDER, "")
    assert (entry.breaker, entry.status) == (CLOSED, HEALTHY)
    # Closing dropped the probe failures, not the traffic failure the statistics hold.
    assert entry.error_rate > 0


# --- plan predictions against actual latency ----------------------------------------------------


def test_plan_prediction_error_is_a_mean_and_a_windowed_p95_per_model() -> None:
    fake = FakeClock()
    book = make_book(fake, ewma_alpha=0.5, window_s=60.0)
    entry = book.apply(success(100))[0]  # no prediction carried
    assert (entry.plan_latency_error, entry.plan_latency_error_p95, entry.plan_latency_error_samples) == (
        0.0,
        0.0,
        0,
    )
    book.apply(success(200, predicted_ms=100))  # off by 50 %
    book.apply(success(100, predicted_ms=110))  # off by 10 %
    book.apply(failure())  # a failure has no latency to compare
    entry = current(book)
    assert entry.plan_latency_error == pytest.approx(0.3)  # 0.5, then 0.5 + 0.5 x (0.1 - 0.5)
    assert entry.plan_latency_error_p95 == pytest.approx(0.5)
    assert entry.plan_latency_error_samples == 2
    for _ in range(18):
        book.apply(success(100, predicted_ms=100))
    entry = current(book)
    assert entry.plan_latency_error_samples == 20
    assert entry.plan_latency_error_p95 == pytest.approx(0.1)  # nearest rank 19 of 20
    # Tracked per model: another model's predictions are its own, the provider's aggregate has all.
    book.apply(success(100, model="other", predicted_ms=300))
    assert current(book, PROVIDER, "other").plan_latency_error == pytest.approx(2.0)
    assert current(book, PROVIDER, "").plan_latency_error_samples == 21
    fake.advance(60.001)
    book.tick()
    entry = current(book)
    assert (entry.plan_latency_error_p95, entry.plan_latency_error_samples) == (0.0, 0)
    assert entry.plan_latency_error == pytest.approx(0.3 * 0.5**18)  # the mean is an EWMA: it stays
