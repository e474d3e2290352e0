"""Rate limiter units: the checks a request gets, the refusal error, validation, the memory backend's
housekeeping, and picking a backend. The behaviour contract runs against both backends in
tests/integration/test_ratelimit_redis.py.
"""

from __future__ import annotations

import math

import grpc
import pytest
from google.rpc import error_details_pb2

from switchyard.common.catalog import DEFAULT_TIERS, Tier
from switchyard.common.errors import Reason
from switchyard.common.redis_client import open_redis, redis_from_settings
from switchyard.common.settings import Settings, SettingsError
from switchyard.edge.ratelimit import (
    MODEL_RPM,
    MODEL_TPM,
    TIER_RPM,
    TIER_TPM,
    Decision,
    LimitCheck,
    MemoryRateLimiter,
    ModelLimits,
    RedisRateLimiter,
    build_rate_limiter,
    rate_limited_error,
    request_checks,
)


class SteppedClock:
    def __init__(self) -> None:
        self.us = 5_000_000_000

    def __call__(self) -> float:
        return self.us / 1_000_000

    def advance(self, seconds: float) -> None:
        self.us += round(seconds * 1_000_000)


# --- request_checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "rpm", "lockout_s"),
    [("free", 10, 300.0), ("pro", 50, 60.0), ("expert", 200, 30.0), ("master", 1000, 0.0)],
)
def test_default_tiers_give_their_rate_burst_and_lockout(tier: str, rpm: int, lockout_s: float) -> None:
    (check,) = request_checks("acme", DEFAULT_TIERS[tier])
    assert (check.name, check.rate, check.burst_units, check.period_s, check.cost) == (
        TIER_RPM,
        rpm,
        rpm,
        60.0,
        1,
    )
    assert check.lockout_s == lockout_s
    assert (check.lockout_key is not None) == (lockout_s > 0)


def test_token_and_model_limits_charge_the_estimated_tokens() -> None:
    tier = Tier(requests_per_minute=50, lockout_seconds=60, tokens_per_minute=40_000)
    checks = request_checks(
        "acme",
        tier,
        model="openai/gpt-4o",
        estimated_tokens=1234,
        model_limits=ModelLimits(requests_per_minute=5, tokens_per_minute=9000),
    )
    by_name = {c.name: c for c in checks}
    assert set(by_name) == {TIER_RPM, TIER_TPM, MODEL_RPM, MODEL_TPM}
    assert by_name[TIER_TPM].cost == by_name[MODEL_TPM].cost == 1234
    assert by_name[MODEL_RPM].rate == 5 and by_name[MODEL_TPM].rate == 9000
    # Only the tier's request limit locks out; every key of a tenant shares its hash tag.
    assert [c.name for c in checks if c.lockout_s > 0] == [TIER_RPM]
    assert all(c.key.startswith("{acme}:") for c in checks)
    assert len({c.key for c in checks}) == 4


def test_model_limits_need_a_model_and_negative_estimates_cost_nothing() -> None:
    tier = Tier(requests_per_minute=5, tokens_per_minute=100)
    assert [c.name for c in request_checks("a", tier, model_limits=ModelLimits(1, 1))] == [TIER_RPM, TIER_TPM]
    assert request_checks("a", tier, estimated_tokens=-5)[1].cost == 0


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0},
        {"burst": 0},
        {"cost": -1},
        {"period_s": 0.0},
        {"lockout_s": -1.0},
        {"lockout_s": 5.0},  # without a lockout key
        {"cost": 2**40},  # beyond exact arithmetic
        {"key": ""},
    ],
)
def test_impossible_checks_are_rejected(kwargs: dict[str, object]) -> None:
    fields: dict[str, object] = {"key": "k", "name": "n", "rate": 10, **kwargs}
    with pytest.raises(ValueError):
        LimitCheck(**fields)  # type: ignore[arg-type]


async def test_checks_of_one_request_need_distinct_keys() -> None:
    limiter = MemoryRateLimiter()
    with pytest.raises(ValueError, match="distinct"):
        await limiter.acquire([LimitCheck("k", "a", 1), LimitCheck("k", "b", 1)])


# --- the refusal error ------------------------------------------------------------------------


def test_refusal_is_resource_exhausted_with_the_exact_retry_info() -> None:
    decision = Decision(False, retry_after_s=8.571424, limit=TIER_RPM, remaining={TIER_RPM: 0})
    error = rate_limited_error(decision, tenant="acme")
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == Reason.RATE_LIMITED and error.retryable
    assert error.retry_after_s == 8.571424
    assert error.metadata == {
        "limit": TIER_RPM,
        "tenant": "acme",
        "locked_out": "false",
        "retry_after_ms": "8572",
    }
    status = error.to_status_proto()
    retry = error_details_pb2.RetryInfo()
    assert status.details[1].Unpack(retry)
    assert (retry.retry_delay.seconds, retry.retry_delay.nanos) == (8, 571_424_000)


def test_lockout_refusal_says_so_and_names_the_model_only_for_model_limits() -> None:
    locked = rate_limited_error(Decision(False, 300.0, TIER_RPM, locked_out=True), tenant="t", model="v/m")
    assert locked.metadata["locked_out"] == "true" and "locked out" in locked.message
    assert "model" not in locked.metadata
    model = rate_limited_error(Decision(False, 2.0, MODEL_TPM), tenant="t", model="v/m")
    assert model.metadata["model"] == "v/m"


def test_a_request_that_can_never_conform_gets_no_retry_info() -> None:
    error = rate_limited_error(Decision(False, math.inf, TIER_TPM), tenant="t")
    assert error.retry_after_s is None
    assert len(error.to_status_proto().details) == 1  # ErrorInfo only
    assert "can never" in error.message


def test_an_allowed_decision_is_no_error() -> None:
    with pytest.raises(ValueError):
        rate_limited_error(Decision(True), tenant="t")


# --- the memory backend's housekeeping --------------------------------------------------------


async def test_memory_forgets_idle_keys_once_their_buckets_are_full_again() -> None:
    clock = SteppedClock()
    limiter = MemoryRateLimiter(clock=clock, sweep_interval_s=10.0)
    tier = Tier(requests_per_minute=10, lockout_seconds=30)
    for _ in range(11):
        await limiter.acquire(request_checks("a", tier))
    assert len(limiter) == 2  # the bucket and the lockout

    clock.advance(31.0)  # lockout over, bucket not yet full (one minute after the burst)
    await limiter.acquire(request_checks("b", Tier(requests_per_minute=1)))
    assert len(limiter) == 2  # a's bucket (still refilling) and b's new one

    clock.advance(61.0)
    await limiter.acquire([])  # a sweep is due
    assert len(limiter) == 0


async def test_memory_state_is_per_instance() -> None:
    first, second = MemoryRateLimiter(), MemoryRateLimiter()
    check = LimitCheck("k", "n", rate=1)
    assert (await first.acquire([check])).allowed
    assert not (await first.acquire([check])).allowed
    assert (await second.acquire([check])).allowed


# --- choosing the backend, opening Redis ------------------------------------------------------


async def test_without_redis_url_the_limiter_is_in_memory() -> None:
    limiter = build_rate_limiter(Settings())
    assert isinstance(limiter, MemoryRateLimiter)
    await limiter.aclose()


async def test_with_redis_url_the_limiter_is_redis_and_connects_lazily() -> None:
    limiter = build_rate_limiter(Settings(redis_url="redis://127.0.0.1:1/0"))
    assert isinstance(limiter, RedisRateLimiter)
    await limiter.aclose()
    assert redis_from_settings(Settings()) is None


def test_a_bad_redis_url_names_the_variable_but_not_the_secret() -> None:
    with pytest.raises(SettingsError) as info:
        open_redis("http://user:hunter2@example/0")
    assert "REDIS_URL" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(SettingsError) as info:
        open_redis("redis://user:hunter2@127.0.0.1:notaport/0")
    assert "REDIS_URL" in str(info.value) and "hunter2" not in str(info.value)
