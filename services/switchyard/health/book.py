"""The health book: per (provider, model) statistics, circuit breakers and statuses.

Pure and deterministic: time comes from an injected clock (wall seconds), and each outcome
is placed at its own `finished_at` (never later than the clock), so replicas that apply the
same outcomes in the same order, and a replica warming up from the recent history, end with
the same picture.

A caller's attempt updates its (provider, model) entry and the statistics of its provider's
entry (model ""); an active probe updates the provider's entry alone. Per entry the book keeps
EWMAs of total latency, time to first token and output tokens/s (successes only), a window of
recent outcomes (`window_s`, at most `max_window_samples`) for the error rate and the
nearest-rank p50/p95/p99 of successful latencies, the last error, the latest non-empty
rate-limit headroom, consecutive failures, an online latency fit (see `latency.py`), the EWMAs
and fit again per reporting edge's region (at most `MAX_REGIONS`), and the error of the plans'
latency predictions (EWMA and windowed p95).

Breakers and statuses judge the outcomes that are about the entry itself: a model's entry
every outcome of the model, a provider's entry its probes. Traffic reaches the provider's entry
as statistics only, so one model failing opens no breaker for the provider's other models.

Breaker: CLOSED → OPEN after `failure_threshold` counted failures in a row, or when a failure
brings the window's error rate to `error_rate_threshold` with at least `min_samples` outcomes
in it; OPEN → HALF_OPEN `open_s` after it opened; HALF_OPEN → CLOSED on a success (which
clears the window's failures, so the error-rate trip does not fire again at once), or back to
OPEN on a failure. Caller-side failures (`CALLER_SIDE_REASONS`) say nothing about the provider
and count neither way.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from switchyard.common.settings import Settings
from switchyard.common.timestamps import seconds_of, timestamp_of
from switchyard.health.latency import MIN_FIT_SAMPLES, OnlineLatencyModel
from switchyard.v1 import common_pb2, health_pb2

__all__ = [
    "CALLER_SIDE_REASONS",
    "HEADROOM_DEFAULT_RESET_S",
    "HEADROOM_LOW_FRACTION",
    "MAX_REGIONS",
    "HealthBook",
    "HealthConfig",
    "counts_as_failure",
    "relative_error",
]

# Failures caused by the caller (or by us refusing the caller), not by the provider: they
# neither trip nor reset a breaker. A vendor's 429 arrives as PROVIDER_OVERLOADED and counts.
CALLER_SIDE_REASONS: Final = frozenset(
    {
        "INVALID_REQUEST",
        "CONTEXT_TOO_LONG",
        "CONTENT_FILTERED",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "BUDGET_EXCEEDED",
        "RATE_LIMITED",
        "CANCELLED",
    }
)
# Headroom at or below this share of its limit (or at zero) marks an entry DEGRADED.
HEADROOM_LOW_FRACTION: Final = 0.05
# A low headroom without a reset time counts for this long after it was observed.
HEADROOM_DEFAULT_RESET_S: Final = 60.0
# Regions kept per entry; outcomes from further regions count only in the global figures.
MAX_REGIONS: Final = 32
_REASON_PREFIX: Final = "ERROR_REASON_"
_MAX_UINT32: Final = 2**32 - 1


@dataclass(frozen=True)
class HealthConfig:
    """Breaker thresholds and statistics knobs."""

    failure_threshold: int = 5
    error_rate_threshold: float = 0.5
    window_s: float = 60.0
    min_samples: int = 10
    open_s: float = 60.0
    half_open_trials: int = 3
    # An error rate at or above this marks an entry DEGRADED.
    degraded_error_rate: float = 0.1
    # Weight of the newest observation in each EWMA.
    ewma_alpha: float = 0.2
    max_window_samples: int = 1000

    @classmethod
    def from_settings(cls, settings: Settings) -> HealthConfig:
        """The config from the `health_*` settings (the rest keep their defaults)."""
        return cls(
            failure_threshold=settings.health_failure_threshold,
            error_rate_threshold=settings.health_error_rate_threshold,
            window_s=settings.health_window_s,
            min_samples=settings.health_min_samples,
            open_s=settings.health_open_s,
            half_open_trials=settings.health_half_open_trials,
        )


def counts_as_failure(outcome: health_pb2.AttemptOutcome) -> bool | None:
    """True for a failure the provider is blamed for, False for a success, None for a
    caller-side failure (which counts neither way)."""
    if outcome.success:
        return False
    reason = outcome.error_reason.removeprefix(_REASON_PREFIX)
    return None if reason in CALLER_SIDE_REASONS else True


def relative_error(predicted: float, actual: float) -> float:
    """|predicted - actual| / actual: how far off a latency prediction was (actual > 0)."""
    return abs(predicted - actual) / actual


@dataclass(slots=True)
class _Sample:
    at: float
    failed: bool
    # Total latency of a success; None for a failure.
    latency_ms: float | None
    # Whether it counts for the breaker and the status (False: a provider entry's traffic).
    judged: bool = True
    # The relative error of the plan's latency prediction; None without one.
    plan_error: float | None = None


@dataclass
class _Latency:
    """Latency of successes (globally or from one region): EWMAs of total latency and time to
    first token, and the online fit with the error of its predictions, each made before the
    outcome was learned from."""

    ewma_ms: float | None = None
    ewma_ttft_ms: float | None = None
    fit: OnlineLatencyModel = field(default_factory=OnlineLatencyModel)
    fit_error: float | None = None

    def learn(self, outcome: health_pb2.AttemptOutcome, alpha: float) -> None:
        if outcome.total_latency_ms > 0:
            latency = float(outcome.total_latency_ms)
            self.ewma_ms = _ewma(self.ewma_ms, latency, alpha)
            if self.fit.samples >= MIN_FIT_SAMPLES:
                predicted = self.fit.predict(outcome.input_tokens, outcome.output_tokens)
                self.fit_error = _ewma(self.fit_error, relative_error(predicted, latency), alpha)
            self.fit.update(outcome.input_tokens, outcome.output_tokens, latency)
        if outcome.time_to_first_token_ms > 0:
            self.ewma_ttft_ms = _ewma(self.ewma_ttft_ms, float(outcome.time_to_first_token_ms), alpha)


@dataclass
class _Entry:
    provider: str
    model: str
    breaker: health_pb2.BreakerState.ValueType = health_pb2.BREAKER_STATE_CLOSED
    opened_at: float = 0.0
    retry_at: float = 0.0
    trip_reason: str = ""
    consecutive_failures: int = 0
    window: deque[_Sample] = field(default_factory=deque)
    latency: _Latency = field(default_factory=_Latency)
    regions: dict[str, _Latency] = field(default_factory=dict)
    ewma_tokens_per_second: float | None = None
    plan_error: float | None = None
    last_error: str = ""
    last_error_at: float | None = None
    headroom: common_pb2.RateLimitHeadroom | None = None
    samples: int = 0
    updated_at: float = 0.0
    # The status and reason last published, to notice time-driven status changes.
    status: health_pb2.HealthStatus.ValueType = health_pb2.HEALTH_STATUS_UNSPECIFIED
    reason: str = ""

    def error_rate(self) -> float:
        """Over every outcome in the window."""
        if not self.window:
            return 0.0
        return sum(1 for s in self.window if s.failed) / len(self.window)

    def judged(self) -> tuple[int, float]:
        """(outcomes, error rate) over the window's outcomes that count for the breaker."""
        total = failed = 0
        for s in self.window:
            if s.judged:
                total += 1
                failed += s.failed
        return total, failed / total if total else 0.0

    def expire(self, cutoff: float) -> int:
        """Drop window samples older than `cutoff`; how many went."""
        dropped = 0
        while self.window and self.window[0].at < cutoff:
            self.window.popleft()
            dropped += 1
        return dropped

    def record(self, sample: _Sample, limit: int) -> None:
        """Add to the window in time order (outcomes may arrive slightly out of order)."""
        if not self.window or self.window[-1].at <= sample.at:
            self.window.append(sample)
        else:
            index = len(self.window)
            while index > 0 and self.window[index - 1].at > sample.at:
                index -= 1
            self.window.insert(index, sample)
        while len(self.window) > limit:
            self.window.popleft()


class HealthBook:
    """Health per (provider, model), fed by attempt outcomes and advanced by `tick`."""

    def __init__(self, config: HealthConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._entries: dict[tuple[str, str], _Entry] = {}
        # Wall milliseconds, so a restarted replica does not go backwards.
        self._version = max(1, int(clock() * 1000))

    @property
    def config(self) -> HealthConfig:
        """The thresholds in use."""
        return self._config

    @property
    def version(self) -> int:
        """Increases with every change."""
        return self._version

    def apply(self, outcome: health_pb2.AttemptOutcome) -> list[health_pb2.ModelHealth]:
        """Learn from one outcome; the entries it changed."""
        return self.apply_many((outcome,))

    def apply_many(self, outcomes: Iterable[health_pb2.AttemptOutcome]) -> list[health_pb2.ModelHealth]:
        """Learn from outcomes in order; the changed entries (each once), with one version bump."""
        now = self._clock()
        changed: dict[tuple[str, str], _Entry] = {}
        for outcome in outcomes:
            for entry in self._apply(outcome, now):
                changed[(entry.provider, entry.model)] = entry
        return self._publish(changed.values(), now)

    def tick(self) -> list[health_pb2.ModelHealth]:
        """Time-driven changes: open breakers turning half-open, window samples expiring,
        headroom resets passing. The entries that changed."""
        now = self._clock()
        cutoff = now - self._config.window_s
        changed: list[_Entry] = []
        for entry in self._entries.values():
            moved = self._maybe_half_open(entry, now)
            expired = entry.expire(cutoff)
            status, reason = self._status(entry, now)
            if moved or expired or (status, reason) != (entry.status, entry.reason):
                changed.append(entry)
        return self._publish(changed, now)

    def snapshot(self, provider: str = "") -> health_pb2.HealthSnapshot:
        """Every entry (of `provider` only, when given), in a stable order."""
        now = self._clock()
        entries = [
            self._render(entry, now)
            for key, entry in sorted(self._entries.items())
            if not provider or key[0] == provider
        ]
        return health_pb2.HealthSnapshot(
            version=self._version, entries=entries, generated_at=timestamp_of(now)
        )

    def entry(self, provider: str, model: str) -> health_pb2.ModelHealth | None:
        """One entry, or None when nothing was heard of it."""
        found = self._entries.get((provider, model))
        return None if found is None else self._render(found, self._clock())

    # --- internals -------------------------------------------------------------------------

    def _publish(self, entries: Iterable[_Entry], now: float) -> list[health_pb2.ModelHealth]:
        rendered: list[health_pb2.ModelHealth] = []
        for entry in entries:
            entry.updated_at = now
            entry.status, entry.reason = self._status(entry, now)
            rendered.append(self._render(entry, now))
        if rendered:
            self._version = max(self._version + 1, int(now * 1000))
        return rendered

    def _apply(self, outcome: health_pb2.AttemptOutcome, now: float) -> list[_Entry]:
        """Learn from one outcome; the entries it changed."""
        config = self._config
        verdict = counts_as_failure(outcome)
        has_headroom = outcome.HasField("headroom") and outcome.headroom.ByteSize() > 0
        at = now
        if outcome.HasField("finished_at"):
            at = min(now, outcome.finished_at.seconds + outcome.finished_at.nanos / 1e9)
        if at < now - config.window_s:
            # Older than the window (a batch held up somewhere): it would only distort it.
            verdict = None
        key = (outcome.provider, outcome.model)
        entry = self._entries.get(key)
        if entry is None:
            if verdict is None and not has_headroom:
                return []
            entry = self._entries[key] = _Entry(outcome.provider, outcome.model)
        if has_headroom:
            entry.headroom = common_pb2.RateLimitHeadroom()
            entry.headroom.CopyFrom(outcome.headroom)
            if not entry.headroom.HasField("observed_at"):
                entry.headroom.observed_at.CopyFrom(timestamp_of(at))
        if verdict is None:
            return [entry] if has_headroom else []
        self._count(entry, outcome, verdict, at, now, judged=True)
        if not outcome.model or outcome.probe:
            return [entry]
        # The provider's aggregate learns from its models' traffic too, but judges only probes.
        provider_key = (outcome.provider, "")
        aggregate = self._entries.get(provider_key)
        if aggregate is None:
            aggregate = self._entries[provider_key] = _Entry(outcome.provider, "")
        self._count(aggregate, outcome, verdict, at, now, judged=False)
        return [entry, aggregate]

    def _count(
        self,
        entry: _Entry,
        outcome: health_pb2.AttemptOutcome,
        failed: bool,
        at: float,
        now: float,
        *,
        judged: bool,
    ) -> None:
        entry.expire(now - self._config.window_s)
        self._maybe_half_open(entry, at)
        entry.samples += 1
        if failed:
            self._failure(entry, outcome, at, judged)
        else:
            self._success(entry, outcome, at, judged)

    def _success(self, entry: _Entry, outcome: health_pb2.AttemptOutcome, at: float, judged: bool) -> None:
        config = self._config
        alpha = config.ewma_alpha
        latency = float(outcome.total_latency_ms)
        plan_error: float | None = None
        if outcome.predicted_latency_ms > 0 and latency > 0:
            plan_error = relative_error(float(outcome.predicted_latency_ms), latency)
            entry.plan_error = _ewma(entry.plan_error, plan_error, alpha)
        entry.record(_Sample(at, False, latency, judged, plan_error), config.max_window_samples)
        entry.latency.learn(outcome, alpha)
        if outcome.region:
            regional = entry.regions.get(outcome.region)
            if regional is None and len(entry.regions) < MAX_REGIONS:
                regional = entry.regions[outcome.region] = _Latency()
            if regional is not None:
                regional.learn(outcome, alpha)
        if outcome.output_tokens_per_second > 0:
            entry.ewma_tokens_per_second = _ewma(
                entry.ewma_tokens_per_second, outcome.output_tokens_per_second, alpha
            )
        if not judged:
            return
        entry.consecutive_failures = 0
        if entry.breaker == health_pb2.BREAKER_STATE_HALF_OPEN:
            entry.breaker = health_pb2.BREAKER_STATE_CLOSED
            entry.trip_reason = ""
            entry.opened_at = entry.retry_at = 0.0
            # The failures that tripped it would trip it again on the next failure.
            entry.window = deque(s for s in entry.window if not (s.failed and s.judged))

    def _failure(self, entry: _Entry, outcome: health_pb2.AttemptOutcome, at: float, judged: bool) -> None:
        config = self._config
        entry.record(_Sample(at, True, None, judged), config.max_window_samples)
        entry.last_error = outcome.error_reason.removeprefix(_REASON_PREFIX) or "UNKNOWN"
        entry.last_error_at = at
        if not judged:
            return
        entry.consecutive_failures += 1
        if entry.breaker == health_pb2.BREAKER_STATE_HALF_OPEN:
            self._open(entry, at, "breaker open: trial failed")
        elif entry.breaker == health_pb2.BREAKER_STATE_CLOSED:
            outcomes, rate = entry.judged()
            if entry.consecutive_failures >= config.failure_threshold:
                self._open(entry, at, f"breaker open: {entry.consecutive_failures} consecutive failures")
            elif outcomes >= config.min_samples and rate >= config.error_rate_threshold:
                self._open(entry, at, f"breaker open: error rate {rate:.0%} over {config.window_s:g} s")

    def _open(self, entry: _Entry, at: float, reason: str) -> None:
        entry.breaker = health_pb2.BREAKER_STATE_OPEN
        entry.opened_at = at
        entry.retry_at = at + self._config.open_s
        entry.trip_reason = reason

    @staticmethod
    def _maybe_half_open(entry: _Entry, now: float) -> bool:
        if entry.breaker == health_pb2.BREAKER_STATE_OPEN and now >= entry.retry_at:
            entry.breaker = health_pb2.BREAKER_STATE_HALF_OPEN
            entry.retry_at = 0.0
            return True
        return False

    def _status(self, entry: _Entry, now: float) -> tuple[health_pb2.HealthStatus.ValueType, str]:
        if entry.breaker == health_pb2.BREAKER_STATE_OPEN:
            return health_pb2.HEALTH_STATUS_DOWN, entry.trip_reason
        if entry.breaker == health_pb2.BREAKER_STATE_HALF_OPEN:
            return health_pb2.HEALTH_STATUS_DEGRADED, "half-open: trial requests"
        outcomes, rate = entry.judged()
        if outcomes and rate >= self._config.degraded_error_rate:
            return (
                health_pb2.HEALTH_STATUS_DEGRADED,
                f"error rate {rate:.0%} over {self._config.window_s:g} s",
            )
        if entry.headroom is not None:
            low = _headroom_low(entry.headroom, now)
            if low:
                return health_pb2.HEALTH_STATUS_DEGRADED, low
        if entry.samples == 0:
            return health_pb2.HEALTH_STATUS_UNSPECIFIED, ""
        return health_pb2.HEALTH_STATUS_HEALTHY, ""

    def _render(self, entry: _Entry, now: float) -> health_pb2.ModelHealth:
        p50, p95, p99 = _percentiles(sorted(s.latency_ms for s in entry.window if s.latency_ms is not None))
        plan_errors = sorted(s.plan_error for s in entry.window if s.plan_error is not None)
        latency = entry.latency
        base, per_input, per_output = latency.fit.coefficients
        result = health_pb2.ModelHealth(
            provider=entry.provider,
            model=entry.model,
            status=entry.status,
            reason=entry.reason,
            breaker=entry.breaker,
            ewma_latency_ms=latency.ewma_ms or 0.0,
            p50_latency_ms=p50,
            p95_latency_ms=p95,
            p99_latency_ms=p99,
            ewma_time_to_first_token_ms=latency.ewma_ttft_ms or 0.0,
            error_rate=entry.error_rate(),
            output_tokens_per_second=entry.ewma_tokens_per_second or 0.0,
            last_error=entry.last_error,
            samples=entry.samples,
            updated_at=timestamp_of(entry.updated_at),
            consecutive_failures=entry.consecutive_failures,
            half_open_trials=self._config.half_open_trials,
            latency_base_ms=base,
            latency_ms_per_input_token=per_input,
            latency_ms_per_output_token=per_output,
            latency_fit_samples=min(latency.fit.samples, _MAX_UINT32),
            latency_prediction_error=latency.fit_error or 0.0,
            latency_fit_output_reach=latency.fit.output_reach,
            regions=[_render_region(region, entry.regions[region]) for region in sorted(entry.regions)],
            plan_latency_error=entry.plan_error or 0.0,
            plan_latency_error_p95=_percentiles(plan_errors)[1],
            plan_latency_error_samples=len(plan_errors),
        )
        if entry.last_error_at is not None:
            result.last_error_at.CopyFrom(timestamp_of(entry.last_error_at))
        if entry.headroom is not None:
            result.headroom.CopyFrom(entry.headroom)
        if entry.breaker == health_pb2.BREAKER_STATE_OPEN:
            result.breaker_retry_at.CopyFrom(timestamp_of(entry.retry_at))
        return result


def _render_region(region: str, latency: _Latency) -> health_pb2.RegionLatency:
    base, per_input, per_output = latency.fit.coefficients
    return health_pb2.RegionLatency(
        region=region,
        samples=min(latency.fit.samples, _MAX_UINT32),
        ewma_latency_ms=latency.ewma_ms or 0.0,
        ewma_time_to_first_token_ms=latency.ewma_ttft_ms or 0.0,
        latency_base_ms=base,
        latency_ms_per_input_token=per_input,
        latency_ms_per_output_token=per_output,
        latency_prediction_error=latency.fit_error or 0.0,
        latency_fit_output_reach=latency.fit.output_reach,
    )


def _ewma(previous: float | None, value: float, alpha: float) -> float:
    return value if previous is None else previous + alpha * (value - previous)


def _percentiles(ordered: list[float]) -> tuple[float, float, float]:
    """Nearest-rank p50, p95 and p99 of sorted values (zeros when empty)."""
    if not ordered:
        return 0.0, 0.0, 0.0
    n = len(ordered)

    def rank(p: int) -> float:
        return ordered[max(1, math.ceil(p * n / 100)) - 1]

    return rank(50), rank(95), rank(99)


def _headroom_low(headroom: common_pb2.RateLimitHeadroom, now: float) -> str:
    """Why the headroom is nearly exhausted now, or "" when it is not."""
    observed = seconds_of(headroom.observed_at) if headroom.HasField("observed_at") else now
    if headroom.retry_after_ms and now < observed + headroom.retry_after_ms / 1000:
        return f"rate-limited: retry after {headroom.retry_after_ms} ms"
    kinds = (
        ("requests", "remaining_requests", "limit_requests", "requests_reset_at"),
        ("tokens", "remaining_tokens", "limit_tokens", "tokens_reset_at"),
    )
    for kind, remaining_field, limit_field, reset_field in kinds:
        if not headroom.HasField(remaining_field):  # type: ignore[arg-type]
            continue
        reset = (
            seconds_of(getattr(headroom, reset_field))
            if headroom.HasField(reset_field)  # type: ignore[arg-type]
            else observed + HEADROOM_DEFAULT_RESET_S
        )
        if now >= reset:
            continue
        remaining: int = getattr(headroom, remaining_field)
        limit: int = getattr(headroom, limit_field) if headroom.HasField(limit_field) else 0  # type: ignore[arg-type]
        if remaining <= 0 or (limit > 0 and remaining <= HEADROOM_LOW_FRACTION * limit):
            of = f" of {limit}" if limit > 0 else ""
            return f"rate-limit headroom low: {remaining}{of} {kind} left"
    return ""
