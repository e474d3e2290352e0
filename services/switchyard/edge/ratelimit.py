"""Rate limits at the edge: GCRA buckets behind one interface, in memory or in Redis.

Algorithm. Each limit is a GCRA (generic cell rate algorithm) bucket: `rate` units per
`period_s`, of which up to `burst` may be spent at once. The only state per key is the
theoretical arrival time (TAT, integer microseconds): a request of `cost` units moves it
`cost * period / rate` into the future and conforms while the TAT stays within
`burst * period / rate` of now. So a client may spend a full burst at once and is then paced
at the steady rate, never admitted twice a window's worth at a window boundary as with fixed
windows; the exact wait of a refused request is the time until it would conform. Tier
limits use burst = the per-minute amount (a client may spend a minute's allowance at once,
which is what "10 requests/min" means to a person, then gets one request every 6 s).

Atomicity. `acquire(checks)` decides every check of a request together: all conform and all
are charged, or none is charged (a refused tokens-per-minute check does not use up a
request-per-minute slot). A refused check with `lockout_s > 0` also locks its `lockout_key`
(the tenant) out: while locked, every request is refused with the remaining lockout as its
wait. A request whose own cost exceeds a check's burst can never conform; it is refused with
an infinite wait and does not lock anybody out (it is not the client hammering).

Backends. `MemoryRateLimiter` keeps the state in dicts (the embedded default; one process).
`RedisRateLimiter` runs the same algorithm as one Lua script (EVALSHA, reloaded on NOSCRIPT):
one round trip per request, keys expire when their bucket is full again. Its clock is Redis
`TIME` inside the script, so every edge replica measures against one clock and replica clock
skew cannot grant or deny extra requests; tests may pass a clock instead. Both backends pass
the same contract tests (tests/integration/test_ratelimit_redis.py).

Correction. Token limits are charged an estimate up front (the prompt plus the requested
output cap); once the answer's usage is known, `adjust(checks, deltas)` moves each token
bucket by the difference: a refund when the request used fewer tokens than estimated (never
below an empty bucket), an unconditional charge when it used more (the tokens are spent; the
next request waits for them). So tokens per minute count what vendors actually served.

Redis failures fail open, but not unlimited: the Redis limiter then decides with a local
in-memory limiter (per-replica limits, marked `degraded`), logs `rate_limit_backend_failed`
once per outage, counts failures, and skips Redis for `failure_cooldown_s` so an outage does
not add a timeout to every request. Rate limits protect fairness and upstream quotas, not
money (budgets are the ledger's), so availability wins over exact shared counts.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.catalog import Tier
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.redis_client import open_redis
from switchyard.common.settings import Settings

__all__ = [
    "MODEL_RPM",
    "MODEL_TPM",
    "TIER_RPM",
    "TIER_TPM",
    "Clock",
    "Decision",
    "LimitCheck",
    "MemoryRateLimiter",
    "ModelLimits",
    "RateLimiter",
    "RedisRateLimiter",
    "build_rate_limiter",
    "rate_limited_error",
    "request_checks",
]

_log = get_logger(__name__)

Clock = Callable[[], float]
"""Seconds as a float; only differences matter."""

_US: Final = 1_000_000
# Doubles in the Lua script are exact below 2**53; every product of the algorithm stays under it.
_EXACT_LIMIT: Final = 2**53

TIER_RPM: Final = "tier_requests_per_minute"
TIER_TPM: Final = "tier_tokens_per_minute"
MODEL_RPM: Final = "model_requests_per_minute"
MODEL_TPM: Final = "model_tokens_per_minute"
_MINUTE_S: Final = 60.0

# Outcome codes, shared with the Lua script.
_REFUSED: Final = 0
_ALLOWED: Final = 1
_LOCKED: Final = 2
_NEVER: Final = 3


@dataclass(frozen=True, slots=True)
class LimitCheck:
    """One limit one request must pass: `cost` units against `rate` per `period_s`, `burst` at once.

    `key` names the bucket in storage (never shown to callers); `name` names the limit in
    decisions and errors. With `lockout_s > 0`, being refused by this check locks
    `lockout_key` for that long, and every check carrying the same `lockout_key` is refused
    until it ends.
    """

    key: str
    name: str
    rate: int
    period_s: float = _MINUTE_S
    burst: int | None = None  # None: `rate`, a whole period's allowance at once
    cost: int = 1
    lockout_key: str | None = None
    lockout_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.key or not self.name:
            raise ValueError("a limit check needs a key and a name")
        if self.rate < 1:
            raise ValueError(f"{self.name}: rate must be at least 1")
        if self.period_us < 1000:
            raise ValueError(f"{self.name}: period_s must be at least 1 ms")
        if self.burst_units < 1:
            raise ValueError(f"{self.name}: burst must be at least 1")
        if self.cost < 0:
            raise ValueError(f"{self.name}: cost must not be negative")
        if max(self.cost, self.burst_units) * self.period_us >= _EXACT_LIMIT:
            raise ValueError(f"{self.name}: cost or burst too large for period_s")
        if self.lockout_s < 0:
            raise ValueError(f"{self.name}: lockout_s must not be negative")
        if self.lockout_s > 0 and not self.lockout_key:
            raise ValueError(f"{self.name}: lockout_s needs a lockout_key")

    @property
    def period_us(self) -> int:
        return round(self.period_s * _US)

    @property
    def burst_units(self) -> int:
        return self.rate if self.burst is None else self.burst

    @property
    def lockout_us(self) -> int:
        return round(self.lockout_s * _US) if self.lockout_key else 0


@dataclass(frozen=True, slots=True)
class Decision:
    """What `acquire` decided.

    `retry_after_s` is the exact wait until the request would conform (0 when allowed; the
    remaining lockout when locked out; `math.inf` when the request alone exceeds a burst).
    `limit` names the check that refused. `remaining` holds, per check name, the units still
    available at once after this request (before it, when refused). `degraded` marks a
    decision taken by the local fallback while the shared backend was unreachable.
    """

    allowed: bool
    retry_after_s: float = 0.0
    limit: str | None = None
    remaining: Mapping[str, int] = field(default_factory=dict)
    locked_out: bool = False
    degraded: bool = False


class RateLimiter(Protocol):
    """The interface both backends implement."""

    async def acquire(self, checks: Sequence[LimitCheck]) -> Decision:
        """Charge every check, or none of them if any is refused."""
        ...

    async def adjust(self, checks: Sequence[LimitCheck], deltas: Sequence[int]) -> None:
        """Move each check's bucket by its delta in units: charged (> 0) without refusal, or
        refunded (< 0) down to an empty bucket at most."""
        ...

    async def aclose(self) -> None:
        """Release what the limiter owns (connections)."""
        ...


def _adjusted_tat(now: int, tat: int | None, delta: int, check: LimitCheck) -> int:
    """The TAT after moving `check`'s bucket by `delta` units at `now` (µs).

    The Lua script in `_ADJUST_SCRIPT` is this function line for line; change both together.
    """
    base = max(tat or 0, now)
    if delta >= 0:
        return base + _emission(delta, check)
    return max(now, base - _emission(-delta, check))


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """Per-model limits for each tenant using the model (proposed catalog field on `Model`)."""

    requests_per_minute: int | None = None
    tokens_per_minute: int | None = None


def request_checks(
    tenant_id: str,
    tier: Tier,
    *,
    model: str | None = None,
    estimated_tokens: int = 0,
    model_limits: ModelLimits | None = None,
) -> tuple[LimitCheck, ...]:
    """The checks one request must pass: its tier's RPM (and TPM), and the model's per-tenant limits.

    Tokens per minute are charged the request's estimated tokens up front. Only the tier's
    requests-per-minute limit locks a tenant out when exceeded: token limits pace, since one
    large request is no sign of abuse. All keys of a tenant share the Redis hash tag
    `{tenant}`, so the script's keys stay in one slot should Redis be clustered.
    """
    tag = "{" + tenant_id + "}"
    tokens = max(0, estimated_tokens)
    checks = [
        LimitCheck(
            key=f"{tag}:rpm",
            name=TIER_RPM,
            rate=tier.requests_per_minute,
            lockout_key=f"{tag}:lockout" if tier.lockout_seconds > 0 else None,
            lockout_s=float(tier.lockout_seconds),
        )
    ]
    if tier.tokens_per_minute is not None:
        checks.append(LimitCheck(key=f"{tag}:tpm", name=TIER_TPM, rate=tier.tokens_per_minute, cost=tokens))
    if model is not None and model_limits is not None:
        if model_limits.requests_per_minute is not None:
            checks.append(
                LimitCheck(
                    key=f"{tag}:model:{model}:rpm", name=MODEL_RPM, rate=model_limits.requests_per_minute
                )
            )
        if model_limits.tokens_per_minute is not None:
            checks.append(
                LimitCheck(
                    key=f"{tag}:model:{model}:tpm",
                    name=MODEL_TPM,
                    rate=model_limits.tokens_per_minute,
                    cost=tokens,
                )
            )
    return tuple(checks)


def rate_limited_error(decision: Decision, *, tenant: str, model: str | None = None) -> SwitchyardError:
    """`RESOURCE_EXHAUSTED` / `RATE_LIMITED` for a refused decision, with the exact wait as RetryInfo.

    The metadata names the limit and the tenant (and the model for a model limit), never the
    storage key. A request that can never conform gets no RetryInfo: waiting does not help.
    """
    if decision.allowed:
        raise ValueError("rate_limited_error needs a refused decision")
    limit = decision.limit or TIER_RPM
    metadata = {"limit": limit, "tenant": tenant, "locked_out": "true" if decision.locked_out else "false"}
    if model is not None and limit in (MODEL_RPM, MODEL_TPM):
        metadata["model"] = model
    wait = decision.retry_after_s
    if not math.isfinite(wait):
        return SwitchyardError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
            f"the request alone exceeds the {limit} limit and can never be admitted",
            metadata=metadata,
        )
    metadata["retry_after_ms"] = str(math.ceil(wait * 1000))
    if decision.locked_out:
        message = f"locked out after exceeding the {limit} limit; retry in {wait:.3f} s"
    else:
        message = f"the {limit} limit is exceeded; retry in {wait:.3f} s"
    return SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        message,
        metadata=metadata,
        retry_after_s=wait,
    )


def _validate(checks: Sequence[LimitCheck]) -> None:
    if len({c.key for c in checks}) != len(checks) or len({c.name for c in checks}) != len(checks):
        raise ValueError("the checks of one request need distinct keys and names")


def _emission(units: int, check: LimitCheck) -> int:
    """Microseconds that `units` move a TAT (rounded down: never stricter than the configured rate)."""
    return units * check.period_us // check.rate


def _remaining(slack_us: int, check: LimitCheck) -> int:
    return max(0, slack_us * check.rate // check.period_us)


@dataclass(slots=True)
class _Outcome:
    status: int
    index: int = -1
    wait_us: int = 0
    remaining: list[int] = field(default_factory=list)
    new_tats: list[int] = field(default_factory=list)
    new_locks: dict[str, int] = field(default_factory=dict)


def _evaluate(
    now: int, checks: Sequence[LimitCheck], tats: Sequence[int | None], locks: Mapping[str, int]
) -> _Outcome:
    """The decision for `checks` at `now` (µs), given stored TATs and lockout deadlines.

    The Lua script in `_SCRIPT` is this function line for line; change both together.
    """
    # 1. A running lockout refuses everything and charges nothing.
    locked_index, locked_wait = -1, -1
    for i, check in enumerate(checks):
        if check.lockout_key is None:
            continue
        until = locks.get(check.lockout_key, 0)
        if until > now and until - now > locked_wait:
            locked_index, locked_wait = i, until - now
    if locked_index >= 0:
        return _Outcome(_LOCKED, locked_index, locked_wait, [0] * len(checks))

    # 2. GCRA per check; the wait of the request is the longest of its refused checks.
    outcome = _Outcome(_ALLOWED)
    refused: list[bool] = []
    before: list[int] = []
    after: list[int] = []
    for i, check in enumerate(checks):
        tat = max(tats[i] or 0, now)
        increment = _emission(check.cost, check)
        tolerance = _emission(check.burst_units, check)
        new_tat = tat + increment
        outcome.new_tats.append(new_tat)
        before.append(_remaining(now + tolerance - tat, check))
        after.append(_remaining(now + tolerance - new_tat, check))
        allow_at = new_tat - tolerance
        refused.append(allow_at > now)
        if increment > tolerance:
            if outcome.status != _NEVER:
                outcome.status, outcome.index, outcome.wait_us = _NEVER, i, 0
        elif allow_at > now and (
            outcome.status == _ALLOWED or (outcome.status == _REFUSED and allow_at - now > outcome.wait_us)
        ):
            outcome.status, outcome.index, outcome.wait_us = _REFUSED, i, allow_at - now

    if outcome.status == _ALLOWED:
        outcome.remaining = after
        return outcome
    outcome.remaining = before
    if outcome.status == _REFUSED:
        # 3. Exceeding a limit that locks out starts the lockout.
        for i, check in enumerate(checks):
            lockout = check.lockout_us
            if refused[i] and lockout > 0 and check.lockout_key is not None:
                outcome.new_locks[check.lockout_key] = now + lockout
                if outcome.status != _LOCKED or lockout > outcome.wait_us:
                    outcome.status, outcome.index = _LOCKED, i
                    outcome.wait_us = max(outcome.wait_us, lockout)
    return outcome


def _decision(outcome: _Outcome, checks: Sequence[LimitCheck], *, degraded: bool = False) -> Decision:
    remaining = {check.name: outcome.remaining[i] for i, check in enumerate(checks)}
    if outcome.status == _ALLOWED:
        return Decision(True, remaining=remaining, degraded=degraded)
    wait = math.inf if outcome.status == _NEVER else outcome.wait_us / _US
    return Decision(
        False,
        retry_after_s=wait,
        limit=checks[outcome.index].name,
        remaining=remaining,
        locked_out=outcome.status == _LOCKED,
        degraded=degraded,
    )


class MemoryRateLimiter:
    """The embedded backend: GCRA state in dicts, for one process (one event loop, not threads).

    `acquire` never awaits, so each call is atomic on the event loop. Idle keys (bucket full
    again, lockout over) are dropped by a sweep at most every `sweep_interval_s`.
    """

    def __init__(self, *, clock: Clock = time.monotonic, sweep_interval_s: float = 60.0) -> None:
        self._clock = clock
        self._sweep_interval_us = round(sweep_interval_s * _US)
        self._tats: dict[str, int] = {}
        self._locks: dict[str, int] = {}
        self._next_sweep = 0

    def __len__(self) -> int:
        """How many keys hold state (buckets and lockouts)."""
        return len(self._tats) + len(self._locks)

    async def acquire(self, checks: Sequence[LimitCheck]) -> Decision:
        """Charge every check, or none of them if any is refused."""
        return self.acquire_now(checks)

    def acquire_now(self, checks: Sequence[LimitCheck]) -> Decision:
        """`acquire` without the coroutine, for callers that are not async (the Redis fallback)."""
        _validate(checks)
        now = round(self._clock() * _US)
        if now >= self._next_sweep:
            self.sweep(now)
        tats = [self._tats.get(check.key) for check in checks]
        outcome = _evaluate(now, checks, tats, self._locks)
        if outcome.status == _ALLOWED:
            for check, new_tat in zip(checks, outcome.new_tats, strict=True):
                if new_tat > now:
                    self._tats[check.key] = new_tat
        self._locks.update(outcome.new_locks)
        return _decision(outcome, checks)

    async def adjust(self, checks: Sequence[LimitCheck], deltas: Sequence[int]) -> None:
        """Move each check's bucket by its delta (see `RateLimiter.adjust`)."""
        self.adjust_now(checks, deltas)

    def adjust_now(self, checks: Sequence[LimitCheck], deltas: Sequence[int]) -> None:
        """`adjust` without the coroutine (the Redis fallback)."""
        now = round(self._clock() * _US)
        for check, delta in zip(checks, deltas, strict=True):
            if delta == 0:
                continue
            new_tat = _adjusted_tat(now, self._tats.get(check.key), delta, check)
            if new_tat > now:
                self._tats[check.key] = new_tat
            else:
                self._tats.pop(check.key, None)

    def sweep(self, now_us: int | None = None) -> None:
        """Forget every key whose state no longer matters (TAT or lockout in the past)."""
        now = round(self._clock() * _US) if now_us is None else now_us
        self._tats = {k: v for k, v in self._tats.items() if v > now}
        self._locks = {k: v for k, v in self._locks.items() if v > now}
        self._next_sweep = now + self._sweep_interval_us

    async def aclose(self) -> None:
        """Nothing to release."""


# KEYS: one GCRA key per check, then the distinct lockout keys.
# ARGV: clock override in µs ('' = Redis TIME), number of checks, then six per check:
#       period_us, rate, burst, cost, index of its lockout key among the lockout keys (0 = none), lockout_us.
# Returns {status, check index (1-based, 0 if allowed), wait_us, remaining per check...}.
# Mirrors `_evaluate`; integers throughout (exact in doubles below 2**53).
_SCRIPT: Final = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local n = tonumber(ARGV[2])
local function arg(i, j) return tonumber(ARGV[2 + (i - 1) * 6 + j]) end

local locked_index, locked_wait = 0, -1
for i = 1, n do
  local li = arg(i, 5)
  if li > 0 then
    local until_ = tonumber(redis.call('GET', KEYS[n + li]) or '0')
    if until_ > now and until_ - now > locked_wait then
      locked_index, locked_wait = i, until_ - now
    end
  end
end
if locked_index > 0 then
  local out = {2, locked_index, locked_wait}
  for i = 1, n do out[3 + i] = 0 end
  return out
end

local status, index, wait = 1, 0, 0
local new_tats, refused, before, after = {}, {}, {}, {}
for i = 1, n do
  local period, rate, burst, cost = arg(i, 1), arg(i, 2), arg(i, 3), arg(i, 4)
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local increment = math.floor(cost * period / rate)
  local tolerance = math.floor(burst * period / rate)
  local new_tat = tat + increment
  new_tats[i] = new_tat
  before[i] = math.max(0, math.floor((now + tolerance - tat) * rate / period))
  after[i] = math.max(0, math.floor((now + tolerance - new_tat) * rate / period))
  local allow_at = new_tat - tolerance
  refused[i] = allow_at > now
  if increment > tolerance then
    if status ~= 3 then status, index, wait = 3, i, 0 end
  elseif allow_at > now and (status == 1 or (status == 0 and allow_at - now > wait)) then
    status, index, wait = 0, i, allow_at - now
  end
end

if status == 1 then
  for i = 1, n do
    if new_tats[i] > now then
      local ttl_ms = math.ceil((new_tats[i] - now) / 1000)
      redis.call('SET', KEYS[i], string.format('%.0f', new_tats[i]), 'PX', ttl_ms)
    end
  end
  local out = {1, 0, 0}
  for i = 1, n do out[3 + i] = after[i] end
  return out
end

if status == 0 then
  for i = 1, n do
    local li, lockout = arg(i, 5), arg(i, 6)
    if refused[i] and lockout > 0 and li > 0 then
      redis.call('SET', KEYS[n + li], string.format('%.0f', now + lockout), 'PX', math.ceil(lockout / 1000))
      if status ~= 2 or lockout > wait then
        status, index = 2, i
        if lockout > wait then wait = lockout end
      end
    end
  end
end
local out = {status, index, wait}
for i = 1, n do out[3 + i] = before[i] end
return out
"""


# KEYS: one GCRA key per check. ARGV: clock override in µs ('' = Redis TIME), number of checks,
# then three per check: period_us, rate, delta. Mirrors `_adjusted_tat`.
_ADJUST_SCRIPT: Final = """
local now
if ARGV[1] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
else
  now = tonumber(ARGV[1])
end
local n = tonumber(ARGV[2])
for i = 1, n do
  local period, rate, delta = tonumber(ARGV[3 * i]), tonumber(ARGV[3 * i + 1]), tonumber(ARGV[3 * i + 2])
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  if tat < now then tat = now end
  local new_tat
  if delta >= 0 then
    new_tat = tat + math.floor(delta * period / rate)
  else
    new_tat = tat - math.floor(-delta * period / rate)
    if new_tat < now then new_tat = now end
  end
  if new_tat > now then
    redis.call('SET', KEYS[i], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
  else
    redis.call('DEL', KEYS[i])
  end
end
return n
"""


class RedisRateLimiter:
    """The shared backend: one Lua script per request against Redis, same algorithm as memory.

    `clock=None` (production) uses Redis `TIME`, one clock for every replica; tests pass a
    clock to step time without sleeping. Keys are `key_prefix + check.key` and expire once
    their state no longer matters. On a Redis failure, decisions come from `fallback`
    (a fresh `MemoryRateLimiter` by default) for `failure_cooldown_s` and are marked degraded.
    """

    def __init__(
        self,
        client: Redis,
        *,
        clock: Clock | None = None,
        key_prefix: str = "switchyard:ratelimit:",
        fallback: MemoryRateLimiter | None = None,
        failure_cooldown_s: float = 1.0,
        monotonic: Clock = time.monotonic,
        owns_client: bool = False,
    ) -> None:
        self._client = client
        self._script = client.register_script(_SCRIPT)
        self._adjust_script = client.register_script(_ADJUST_SCRIPT)
        self._clock = clock
        self._prefix = key_prefix
        self._fallback = fallback if fallback is not None else MemoryRateLimiter()
        self._cooldown_s = failure_cooldown_s
        self._monotonic = monotonic
        self._owns_client = owns_client
        self._down_until: float | None = None
        self.backend_failures = 0
        """Redis calls that failed (a counter for metrics)."""
        self.degraded_decisions = 0
        """Decisions taken by the local fallback."""

    async def acquire(self, checks: Sequence[LimitCheck]) -> Decision:
        """Charge every check, or none of them if any is refused (one Redis round trip)."""
        _validate(checks)
        if not checks:
            return Decision(True)
        if self._down_until is not None and self._monotonic() < self._down_until:
            return self._degraded(checks)
        keys, args = self._encode(checks)
        try:
            outcome = _parse(await self._script(keys=keys, args=args), len(checks))
        except (RedisError, OSError) as exc:
            self.backend_failures += 1
            if self._down_until is None:
                _log.warning(
                    "rate_limit_backend_failed", error=type(exc).__name__, fallback="local", detail=str(exc)
                )
            self._down_until = self._monotonic() + self._cooldown_s
            return self._degraded(checks)
        if self._down_until is not None:
            self._down_until = None
            _log.info("rate_limit_backend_recovered", failures=self.backend_failures)
        return _decision(outcome, checks)

    async def adjust(self, checks: Sequence[LimitCheck], deltas: Sequence[int]) -> None:
        """Move each check's bucket by its delta (one Redis round trip; the local fallback's
        buckets while Redis is unreachable)."""
        if not any(deltas):
            return
        if self._down_until is not None and self._monotonic() < self._down_until:
            self._fallback.adjust_now(checks, deltas)
            return
        now = "" if self._clock is None else str(round(self._clock() * _US))
        args: list[str | int] = [now, len(checks)]
        for check, delta in zip(checks, deltas, strict=True):
            args += [check.period_us, check.rate, delta]
        try:
            await self._adjust_script(keys=[self._prefix + check.key for check in checks], args=args)
        except (RedisError, OSError) as exc:
            self.backend_failures += 1
            _log.warning("rate_limit_adjust_failed", error=type(exc).__name__)
            self._fallback.adjust_now(checks, deltas)

    def _degraded(self, checks: Sequence[LimitCheck]) -> Decision:
        self.degraded_decisions += 1
        decision = self._fallback.acquire_now(checks)
        return Decision(
            decision.allowed,
            retry_after_s=decision.retry_after_s,
            limit=decision.limit,
            remaining=decision.remaining,
            locked_out=decision.locked_out,
            degraded=True,
        )

    def _encode(self, checks: Sequence[LimitCheck]) -> tuple[list[str], list[str | int]]:
        lock_index: dict[str, int] = {}
        for check in checks:
            if check.lockout_key is not None and check.lockout_key not in lock_index:
                lock_index[check.lockout_key] = len(lock_index) + 1
        keys = [self._prefix + check.key for check in checks]
        keys += [self._prefix + lock_key for lock_key in lock_index]
        now = "" if self._clock is None else str(round(self._clock() * _US))
        args: list[str | int] = [now, len(checks)]
        for check in checks:
            index = lock_index[check.lockout_key] if check.lockout_key is not None else 0
            args += [check.period_us, check.rate, check.burst_units, check.cost, index, check.lockout_us]
        return keys, args

    async def aclose(self) -> None:
        """Close the client if this limiter opened it."""
        if self._owns_client:
            await self._client.aclose()


def _parse(raw: object, n: int) -> _Outcome:
    if not isinstance(raw, list) or len(raw) != 3 + n:
        raise RedisError("unexpected reply from the rate-limit script")
    values = [int(v) for v in raw]
    return _Outcome(values[0], values[1] - 1, values[2], values[3:])


def build_rate_limiter(settings: Settings, *, redis: Redis | None = None) -> RateLimiter:
    """Redis when `settings.redis_url` is set (or a client is given), else the in-memory default.

    A client passed in stays the caller's; one opened here is closed by `aclose()`.
    """
    if redis is not None:
        return RedisRateLimiter(redis)
    if settings.redis_url:
        return RedisRateLimiter(
            open_redis(settings.redis_url, client_name="switchyard-edge"), owns_client=True
        )
    return MemoryRateLimiter()
