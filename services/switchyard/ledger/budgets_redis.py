"""The shared budget store: counters and holds in Redis, one Lua script per operation.

Same semantics as `MemoryBudgetStore` (see `switchyard.ledger.budgets`); both pass one
contract suite (tests/integration/test_budget_store.py). Each operation is a single script
run with EVALSHA (redis-py reloads it on NOSCRIPT), so it is atomic across every ledger
replica sharing the Redis. The scripts take the time from the caller's `now_ms`, never from
Redis `TIME`, so the backends decide alike and tests can step the clock.

Keys, under the constructor's `prefix` (`S` is a counter's suffix, `<len(budget_id)>:<budget
id>:<window key>`, unambiguous whatever the ids contain):

- `c:S`   hash `spent`, `held`: the counter; expires with its window (`expires_at_ms`);
- `i:S`   zset hold id -> expiry: the live holds on the counter (same expiry as the counter),
          for lazy expiry and to tell whether a hold still counts on it;
- `h:ID`  hash `k` ('r' reservation / 'l' lease), `rem`, `exp`, `g` (granted), `cs` (JSON list
          of its counters' suffixes): one hold; kept while its counters may live;
- `x`     zset hold id -> expiry: every live hold, for `expire()`;
- `r:ID`  the amount charged for a settled request id; kept per `settled_ttl_ms`;
- `e`     the store's epoch: created with `SET NX` by the first script that needs it, so a
          new one appears only when Redis lost its data; kept as long as any lease granted in
          it (and a day after the last read), so it never lapses under a live lease;
- `ready` the epoch whose counters the ledger has rebuilt from its rows (same lifetime as `e`):
          `reserve` and `lease` hold nothing in any other epoch (`CountersLost`);
- `rebuild` `<epoch> <token>`: the claim of the ledger replica rebuilding that epoch's counters
          (`REBUILD_CLAIM_MS`, renewed as it goes; a claim on an older epoch counts for nothing).

The scripts reach holds and counters they discover (through `x`, `i:S` and `cs`) by building
their names from the prefix, so under Redis Cluster the prefix must carry a hash tag
(`"sy:budget:{b}:"`) to keep every key in one slot.

Amounts are integers below 2**53, exact as Lua numbers; they are written with `%.0f` so Redis
never sees an exponent. A Redis failure raises `BudgetStoreUnavailable`: no local fallback,
since two replicas counting apart could overspend.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from fractions import Fraction
from typing import Final

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from switchyard.ledger.budgets import (
    DEFAULT_PREFIX,
    LAZY_EXPIRY_PER_COUNTER,
    MIN_KEY_TTL_MS,
    REBUILD_CLAIM_MS,
    RESERVATION_MISMATCH,
    BudgetRef,
    BudgetStore,
    BudgetStoreUnavailable,
    Counter,
    CountersLost,
    Grant,
    HoldConflict,
    HoldOutcome,
    RebuildClaim,
    Settlement,
    counter_ttl_ms,
    hold_ttl_ms,
    settled_ttl_ms,
    wall_clock_ms,
)

__all__ = ["RedisBudgetStore", "counter_suffix"]

# Shared by every script. ARGV[1] is always the prefix and ARGV[2] the caller's now (ms).
_PRELUDE: Final = (
    f"local LAZY = {LAZY_EXPIRY_PER_COUNTER}\n"
    + """
local prefix = ARGV[1]
local now = tonumber(ARGV[2])
local function fmt(n) return string.format('%.0f', n) end
local function num(v) return tonumber(v) or 0 end
-- floor(a / b) for non-negative integers, exact even where the double quotient rounds up.
local function idiv(a, b)
  local q = math.floor(a / b)
  if q * b > a then q = q - 1 elseif (q + 1) * b <= a then q = q + 1 end
  return q
end
local function add_held(ck, delta)
  local held = redis.call('HGET', ck, 'held')
  if held then
    local left = tonumber(held) + delta
    if left < 0 then left = 0 end
    redis.call('HSET', ck, 'held', fmt(left))
  end
end
-- Remove a hold and free its remainder on every counter that still indexes it; 1 if it existed.
local function free_hold(hid)
  local hk = prefix .. 'h:' .. hid
  redis.call('ZREM', prefix .. 'x', hid)
  local h = redis.call('HMGET', hk, 'rem', 'cs')
  if not h[1] then return 0 end
  local rem = tonumber(h[1])
  for _, sfx in ipairs(cjson.decode(h[2])) do
    if redis.call('ZREM', prefix .. 'i:' .. sfx, hid) == 1 then add_held(prefix .. 'c:' .. sfx, -rem) end
  end
  redis.call('DEL', hk)
  return 1
end
-- Take `by` (at most the remainder) off a lease; at 0 the lease ends.
local function shrink(hid, rem, cs, by)
  if by >= rem then free_hold(hid) return end
  if by <= 0 then return end
  for _, sfx in ipairs(cjson.decode(cs)) do
    if redis.call('ZSCORE', prefix .. 'i:' .. sfx, hid) then add_held(prefix .. 'c:' .. sfx, -by) end
  end
  redis.call('HSET', prefix .. 'h:' .. hid, 'rem', fmt(rem - by))
end
-- Free up to LAZY holds on one counter whose expiry is at or before `upto` (-1: none).
local function expire_counter(sfx, upto)
  if upto < 0 then return end
  local ik = prefix .. 'i:' .. sfx
  local due = redis.call('ZRANGEBYSCORE', ik, '-inf', fmt(upto), 'LIMIT', 0, LAZY)
  for _, hid in ipairs(due) do
    if free_hold(hid) == 0 then redis.call('ZREM', ik, hid) end
  end
end
-- Create or refresh a counter (and its index) for a write; ttl in ms.
local function touch(ck, ik, ttl)
  redis.call('HSETNX', ck, 'spent', '0')
  redis.call('HSETNX', ck, 'held', '0')
  redis.call('PEXPIRE', ck, ttl)
  redis.call('PEXPIRE', ik, ttl)
end
-- The store's epoch, created from `candidate` when missing, kept at least `ttl` ms from now.
local function epoch(candidate, ttl)
  local ek = prefix .. 'e'
  redis.call('SET', ek, candidate, 'NX')
  if redis.call('PTTL', ek) < ttl then
    redis.call('PEXPIRE', ek, ttl)
    if redis.call('EXISTS', prefix .. 'ready') == 1 then redis.call('PEXPIRE', prefix .. 'ready', ttl) end
  end
  return redis.call('GET', ek)
end
-- Whether the counters of epoch `ep` were rebuilt from the ledger's rows.
local function rebuilt(ep) return redis.call('GET', prefix .. 'ready') == ep end
local function add_hold(hk, hid, kind, amount, exp, hold_ttl, sfxs)
  redis.call('HSET', hk, 'k', kind, 'rem', fmt(amount), 'exp', fmt(exp), 'g', fmt(amount),
    'cs', cjson.encode(sfxs))
  redis.call('PEXPIRE', hk, hold_ttl)
  redis.call('ZADD', prefix .. 'x', fmt(exp), hid)
end
"""
)

# KEYS: hold, x, then per budget its c:S and i:S.
# ARGV: prefix, now, hold id, amount, ttl, hold key ttl, n, then per budget: suffix, limit, hard, counter ttl,
# then a new epoch (used if there is none), the lazy expiry's cutoff (-1: none), then per budget
# the start of its counters' suffixes (`<len>:<id>:`).
# Returns {1, expires} (held), {2, expires} (the live reservation of that id), {0, index, spent, held}
# (refused by the index-th budget), {-1} (the id names a lease), {-2, epoch} (the counters are
# not rebuilt in this epoch: nothing held), {-3} (the id names a live reservation of another
# amount or other budgets).
_RESERVE: Final = (
    _PRELUDE
    + """
local hid, amount, ttl = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local hold_ttl, n = ARGV[6], tonumber(ARGV[7])
local function barg(i, j) return ARGV[7 + (i - 1) * 4 + j] end
local ep = epoch(ARGV[8 + 4 * n], tonumber(hold_ttl))
if not rebuilt(ep) then return {-2, ep} end
for i = 1, n do expire_counter(barg(i, 1), tonumber(ARGV[9 + 4 * n])) end
local h = redis.call('HMGET', KEYS[1], 'k', 'exp', 'g', 'cs')
if h[1] then
  if h[1] ~= 'r' then return {-1} end
  if tonumber(h[2]) > now then
    -- A retry must ask for what it asked before: the same amount on the same budgets (in any
    -- window). Each budget is held on one counter, so n counters each matching a budget match.
    if tonumber(h[3]) ~= amount then return {-3} end
    local held = cjson.decode(h[4])
    if #held ~= n then return {-3} end
    for i = 1, n do
      local budget, found = ARGV[9 + 4 * n + i], false
      for _, sfx in ipairs(held) do
        if string.sub(sfx, 1, #budget) == budget then found = true break end
      end
      if not found then return {-3} end
    end
    return {2, tonumber(h[2])}
  end
  free_hold(hid)
end
for i = 1, n do
  if barg(i, 3) == '1' then
    local c = redis.call('HMGET', KEYS[1 + 2 * i], 'spent', 'held')
    local spent, held = num(c[1]), num(c[2])
    if spent + held + amount > tonumber(barg(i, 2)) then return {0, i, spent, held} end
  end
end
local exp = now + ttl
local sfxs = {}
for i = 1, n do
  local ck, ik = KEYS[1 + 2 * i], KEYS[2 + 2 * i]
  redis.call('ZADD', ik, fmt(exp), hid)
  touch(ck, ik, barg(i, 4))
  redis.call('HINCRBY', ck, 'held', fmt(amount))
  sfxs[i] = barg(i, 1)
end
add_hold(KEYS[1], hid, 'r', amount, exp, hold_ttl, sfxs)
return {1, exp}
"""
)

# KEYS: hold, x, c:S, i:S, e.
# ARGV: prefix, now, lease id, wanted, min, ttl, hold key ttl, suffix, limit, hard, counter ttl,
#       share numerator, share denominator (0: no share), a new epoch (used if there is none),
#       the lazy expiry's cutoff (-1: none).
# Returns {status, granted, expires, spent, held, epoch}: status 1 granted, 2 the live lease of
# that id, 0 nothing granted, -2 nothing granted as the counters are not rebuilt in this epoch;
# {-1} when the id names a reservation.
# Mirrors `lease_grant`.
_LEASE: Final = (
    _PRELUDE
    + """
local lid, wanted, minm = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local ttl, hold_ttl = tonumber(ARGV[6]), ARGV[7]
local sfx, limit, hard, cttl = ARGV[8], tonumber(ARGV[9]), ARGV[10], ARGV[11]
local snum, sden = tonumber(ARGV[12]), tonumber(ARGV[13])
local ck, ik = KEYS[3], KEYS[4]
expire_counter(sfx, tonumber(ARGV[15]))
local h = redis.call('HMGET', KEYS[1], 'k', 'exp', 'g')
if h[1] and h[1] ~= 'l' then return {-1} end
-- The epoch outlives every lease granted in it: the hold's record outlives the hold.
local ep = epoch(ARGV[14], tonumber(hold_ttl))
if not rebuilt(ep) then return {-2, 0, 0, 0, 0, ep} end
if h[1] then
  if tonumber(h[2]) > now then
    local c = redis.call('HMGET', ck, 'spent', 'held')
    return {2, tonumber(h[3]), tonumber(h[2]), num(c[1]), num(c[2]), ep}
  end
  free_hold(lid)
end
local c = redis.call('HMGET', ck, 'spent', 'held')
local spent, held = num(c[1]), num(c[2])
local grant = wanted
if hard == '1' then
  local available = limit - spent - held
  if available < 0 then available = 0 end
  local cap = available
  if sden > 0 then
    local q = idiv(available, sden)
    cap = q * snum + idiv((available - q * sden) * snum, sden)
    if cap < minm then cap = minm end
    if cap > available then cap = available end
  end
  if grant > cap then grant = cap end
  if minm > 0 then grant = grant - (grant % minm) end
end
if grant <= 0 or grant < minm then return {0, 0, 0, spent, held, ep} end
local exp = now + ttl
redis.call('ZADD', ik, fmt(exp), lid)
touch(ck, ik, cttl)
redis.call('HINCRBY', ck, 'held', fmt(grant))
add_hold(KEYS[1], lid, 'l', grant, exp, hold_ttl, {sfx})
return {1, grant, exp, spent, held + grant, ep}
"""
)

# KEYS: r:ID, then per budget c:S and i:S.
# ARGV: prefix, now, actual, settled ttl, n, per budget its counter ttl, reservation id ('' none),
#       m, then m lease ids, then per budget the start of its counters' suffixes (`<len>:<id>:`).
# Returns {duplicate (0/1), charged}, then (not on a duplicate) per budget the window key it was
# charged in where that is a named hold's, not its own ('' for its own).
# Mirrors `MemoryBudgetStore._settle`.
_SETTLE: Final = (
    _PRELUDE
    + """
local done = redis.call('GET', KEYS[1])
if done then return {1, tonumber(done)} end
local actual, n = tonumber(ARGV[3]), tonumber(ARGV[5])
local rid = ARGV[6 + n]
local m = tonumber(ARGV[7 + n])
-- The counters the named holds hold (their windows), to charge a budget where it was held.
local held = {}
local function note_held(hid, kind)
  local h = redis.call('HMGET', prefix .. 'h:' .. hid, 'k', 'cs')
  if h[1] ~= kind then return end
  for _, sfx in ipairs(cjson.decode(h[2])) do held[#held + 1] = sfx end
end
if rid ~= '' then note_held(rid, 'r') end
for j = 1, m do note_held(ARGV[7 + n + j], 'l') end
local windows = {}
for i = 1, n do
  local ck, ik = KEYS[2 * i], KEYS[1 + 2 * i]
  local budget = ARGV[7 + n + m + i]
  windows[i] = ''
  for _, sfx in ipairs(held) do
    if string.sub(sfx, 1, #budget) == budget then
      local other = prefix .. 'c:' .. sfx
      if other ~= ck and redis.call('EXISTS', other) == 1 then
        ck, ik = other, nil
        windows[i] = string.sub(sfx, #budget + 1)
      end
      break
    end
  end
  if ik then touch(ck, ik, ARGV[5 + i]) end
  redis.call('HINCRBY', ck, 'spent', fmt(actual))
end
if rid ~= '' and redis.call('HGET', prefix .. 'h:' .. rid, 'k') == 'r' then free_hold(rid) end
for j = 1, m do
  local lid = ARGV[7 + n + j]
  local h = redis.call('HMGET', prefix .. 'h:' .. lid, 'k', 'rem', 'cs')
  if h[1] == 'l' then
    local rem = tonumber(h[2])
    shrink(lid, rem, h[3], math.min(actual, rem))
  end
end
redis.call('SET', KEYS[1], fmt(actual), 'PX', ARGV[4])
return {0, actual, unpack(windows)}
"""
)

# KEYS: h:ID. ARGV: prefix, now, hold id. Returns 1 if a live hold was released.
_RELEASE: Final = (
    _PRELUDE
    + """
local exp = redis.call('HGET', KEYS[1], 'exp')
if not exp then return 0 end
free_hold(ARGV[3])
if tonumber(exp) > now then return 1 end
return 0
"""
)

# KEYS: h:ID. ARGV: prefix, now, lease id, unused. Returns the amount given back.
_RETURN_LEASE: Final = (
    _PRELUDE
    + """
local lid, unused = ARGV[3], tonumber(ARGV[4])
local h = redis.call('HMGET', KEYS[1], 'k', 'rem', 'exp', 'cs')
if h[1] ~= 'l' then return 0 end
if tonumber(h[3]) <= now then
  free_hold(lid)
  return 0
end
local given = math.min(unused, tonumber(h[2]))
shrink(lid, tonumber(h[2]), h[4], given)
return given
"""
)

# KEYS: x. ARGV: prefix, now, limit. Returns how many holds were freed.
_EXPIRE: Final = (
    _PRELUDE
    + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now), 'LIMIT', 0, tonumber(ARGV[3]))
local freed = 0
for _, hid in ipairs(due) do freed = freed + free_hold(hid) end
return freed
"""
)

# KEYS: c:S, i:S. ARGV: prefix, now, suffix, the lazy expiry's cutoff (-1: none). Returns {spent, held}.
_COUNTER: Final = (
    _PRELUDE
    + """
expire_counter(ARGV[3], tonumber(ARGV[4]))
local c = redis.call('HMGET', KEYS[1], 'spent', 'held')
return {num(c[1]), num(c[2])}
"""
)

# KEYS: e. ARGV: prefix, now, a new epoch (used if there is none), ttl. Returns the epoch.
_EPOCH: Final = (
    _PRELUDE
    + """
return epoch(ARGV[3], tonumber(ARGV[4]))
"""
)

# KEYS: e, rebuild. ARGV: prefix, now, a new epoch (used if there is none), ttl, token, claim ms.
# Returns {claimed, epoch}: claimed 1 when this caller is to rebuild the epoch's counters (the
# `rebuild` key then holds `<epoch> <token>`); a claim on an older epoch is overwritten.
_CLAIM_REBUILD: Final = (
    _PRELUDE
    + """
local ep = epoch(ARGV[3], tonumber(ARGV[4]))
if rebuilt(ep) then return {0, ep} end
local held = redis.call('GET', KEYS[2])
if held and string.sub(held, 1, #ep + 1) == ep .. ' ' then return {0, ep} end
redis.call('SET', KEYS[2], ep .. ' ' .. ARGV[5], 'PX', ARGV[6])
return {1, ep}
"""
)

# KEYS: rebuild. ARGV: the claim (`<epoch> <token>`), ms to keep it (0: release it).
# Returns 1 if the claim was the caller's.
_REBUILD_CLAIM: Final = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: e, ready, rebuild. ARGV: prefix, now, epoch, the claim (`<epoch> <token>`).
# Returns 1 if marked: the claim was still the caller's (it ends) and its epoch is current.
_MARK_REBUILT: Final = (
    _PRELUDE
    + """
if redis.call('GET', KEYS[3]) ~= ARGV[4] then return 0 end
redis.call('DEL', KEYS[3])
if redis.call('GET', KEYS[1]) ~= ARGV[3] then return 0 end
local left = redis.call('PTTL', KEYS[1])
if left < 1 then left = 1 end
redis.call('SET', KEYS[2], ARGV[3], 'PX', left)
return 1
"""
)

# KEYS: c:S, i:S. ARGV: prefix, now, micros, counter ttl.
_ADD_SPENT: Final = (
    _PRELUDE
    + """
touch(KEYS[1], KEYS[2], ARGV[4])
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[3])
return 1
"""
)


def counter_suffix(budget_id: str, window_key: str) -> str:
    """The part of a counter's key after `c:` / `i:`; the length prefix keeps it unambiguous."""
    return f"{len(budget_id)}:{budget_id}:{window_key}"


@contextmanager
def _unavailable_on_error() -> Iterator[None]:
    """Redis failures inside as `BudgetStoreUnavailable`."""
    try:
        yield
    except (RedisError, OSError) as exc:
        # The error's type only: a message could quote connection details.
        raise BudgetStoreUnavailable(f"budget store unavailable ({type(exc).__name__})") from exc


def _glob_escape(text: str) -> str:
    """`text` matched literally by a Redis glob pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def _int(raw: object) -> int:
    if not isinstance(raw, int):
        raise BudgetStoreUnavailable("unexpected reply from a budget script")
    return raw


def _claim_value(claim: RebuildClaim) -> str:
    """What the `rebuild` key holds while `claim` is its caller's."""
    return f"{claim.epoch} {claim.token}"


def _ints(raw: object, *, at_least: int) -> list[int]:
    if not isinstance(raw, list) or len(raw) < at_least:
        raise BudgetStoreUnavailable("unexpected reply from a budget script")
    return [_int(v) for v in raw]


def _text(raw: object) -> str:
    if not isinstance(raw, bytes | str) or not raw:
        raise BudgetStoreUnavailable("unexpected reply from a budget script")
    return raw.decode() if isinstance(raw, bytes) else raw


class RedisBudgetStore(BudgetStore):
    """The shared backend: one Lua script per operation, same semantics as `MemoryBudgetStore`.

    A client passed in stays the caller's unless `owns_client` (then `aclose()` closes it).
    """

    shared = True

    def __init__(self, client: Redis, *, prefix: str = DEFAULT_PREFIX, owns_client: bool = False) -> None:
        if not prefix:
            raise ValueError("a budget store needs a key prefix")
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client
        self._reserve_script = client.register_script(_RESERVE)
        self._lease_script = client.register_script(_LEASE)
        self._settle_script = client.register_script(_SETTLE)
        self._release_script = client.register_script(_RELEASE)
        self._return_script = client.register_script(_RETURN_LEASE)
        self._expire_script = client.register_script(_EXPIRE)
        self._counter_script = client.register_script(_COUNTER)
        self._epoch_script = client.register_script(_EPOCH)
        self._claim_script = client.register_script(_CLAIM_REBUILD)
        self._mark_script = client.register_script(_MARK_REBUILT)
        self._rebuild_claim_script = client.register_script(_REBUILD_CLAIM)
        self._add_spent_script = client.register_script(_ADD_SPENT)

    @property
    def prefix(self) -> str:
        """The prefix of every key this store writes."""
        return self._prefix

    def counter_key(self, budget: BudgetRef) -> str:
        """The Redis key of a budget's counter hash (for operators and tests)."""
        return self._prefix + "c:" + counter_suffix(budget.budget_id, budget.window_key)

    def _counter_keys(self, budget: BudgetRef) -> list[str]:
        suffix = counter_suffix(budget.budget_id, budget.window_key)
        return [self._prefix + "c:" + suffix, self._prefix + "i:" + suffix]

    def _hold_key(self, hold_id: str) -> str:
        return self._prefix + "h:" + hold_id

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> object:
        with _unavailable_on_error():
            reply: object = await script(keys=list(keys), args=list(args))
        return reply

    async def _reserve(
        self, hold_id: str, budgets: tuple[BudgetRef, ...], amount: int, ttl_ms: int, now_ms: int
    ) -> HoldOutcome:
        keys = [self._hold_key(hold_id), self._prefix + "x"]
        args: list[str | int] = [
            self._prefix,
            now_ms,
            hold_id,
            amount,
            ttl_ms,
            hold_ttl_ms(now_ms + ttl_ms, budgets, now_ms),
            len(budgets),
        ]
        for ref in budgets:
            keys += self._counter_keys(ref)
            args += [
                counter_suffix(ref.budget_id, ref.window_key),
                ref.limit_micros,
                1 if ref.hard else 0,
                counter_ttl_ms(ref, now_ms),
            ]
        keys.append(self._prefix + "e")
        args += [uuid.uuid4().hex, self._expired_by(now_ms)]
        args += [counter_suffix(ref.budget_id, "") for ref in budgets]
        raw = await self._run(self._reserve_script, keys, args)
        if isinstance(raw, list) and len(raw) == 2 and raw[0] == -2:
            raise CountersLost(_text(raw[1]))
        reply = _ints(raw, at_least=1)
        status = reply[0]
        if status == -1:
            raise HoldConflict("the hold id names a live lease")
        if status == -3:
            raise HoldConflict(RESERVATION_MISMATCH)
        if status in (1, 2):
            return HoldOutcome(True, hold_id, reply[1])
        _, index, spent, held = _ints(reply, at_least=4)
        return HoldOutcome(
            False,
            hold_id,
            refused=budgets[index - 1],
            spent_micros=spent,
            held_micros=held,
            requested_micros=amount,
        )

    async def _lease(
        self,
        lease_id: str,
        budget: BudgetRef,
        wanted: int,
        min_micros: int,
        ttl_ms: int,
        now_ms: int,
        max_share: Fraction | None,
    ) -> Grant:
        keys = [self._hold_key(lease_id), self._prefix + "x", *self._counter_keys(budget), self._prefix + "e"]
        args: list[str | int] = [
            self._prefix,
            now_ms,
            lease_id,
            wanted,
            min_micros,
            ttl_ms,
            hold_ttl_ms(now_ms + ttl_ms, (budget,), now_ms),
            counter_suffix(budget.budget_id, budget.window_key),
            budget.limit_micros,
            1 if budget.hard else 0,
            counter_ttl_ms(budget, now_ms),
            0 if max_share is None else max_share.numerator,
            0 if max_share is None else max_share.denominator,
            uuid.uuid4().hex,
            self._expired_by(now_ms),
        ]
        reply = await self._run(self._lease_script, keys, args)
        if not isinstance(reply, list) or len(reply) not in (1, 6):
            raise BudgetStoreUnavailable("unexpected reply from a budget script")
        if reply[0] == -1:
            raise HoldConflict("the lease id names a live reservation")
        if reply[0] == -2:
            raise CountersLost(_text(reply[5]))
        _, granted, expires_at, spent, held = _ints(reply[:5], at_least=5)
        return Grant(lease_id, granted, expires_at, Counter(spent, held), _text(reply[5]))

    async def _settle(
        self,
        request_id: str,
        actual: int,
        budgets: tuple[BudgetRef, ...],
        reservation_id: str,
        lease_ids: tuple[str, ...],
        now_ms: int,
    ) -> Settlement:
        keys = [self._prefix + "r:" + request_id]
        for ref in budgets:
            keys += self._counter_keys(ref)
        holds = [reservation_id] if reservation_id else []
        keys += [self._hold_key(hold_id) for hold_id in (*holds, *lease_ids)]  # declared, for routing
        args: list[str | int] = [
            self._prefix,
            now_ms,
            actual,
            settled_ttl_ms(budgets, now_ms),
            len(budgets),
            *(counter_ttl_ms(ref, now_ms) for ref in budgets),
            reservation_id,
            len(lease_ids),
            *lease_ids,
            *(counter_suffix(ref.budget_id, "") for ref in budgets),
        ]
        reply = await self._run(self._settle_script, keys, args)
        if not isinstance(reply, list) or len(reply) not in (2, 2 + len(budgets)):
            raise BudgetStoreUnavailable("unexpected reply from a budget script")
        duplicate, charged = _ints(reply[:2], at_least=2)
        if duplicate:
            return Settlement(True, charged)
        windows = {
            ref.budget_id: (_text(window) if window else ref.window_key)
            for ref, window in zip(budgets, reply[2:], strict=True)
        }
        return Settlement(False, charged, windows)

    async def _release(self, hold_id: str, now_ms: int) -> bool:
        reply = await self._run(
            self._release_script, [self._hold_key(hold_id)], [self._prefix, now_ms, hold_id]
        )
        return _int(reply) == 1

    async def _return_lease(self, lease_id: str, unused: int, now_ms: int) -> int:
        reply = await self._run(
            self._return_script, [self._hold_key(lease_id)], [self._prefix, now_ms, lease_id, unused]
        )
        return _int(reply)

    async def _expire(self, now_ms: int, limit: int) -> int:
        reply = await self._run(self._expire_script, [self._prefix + "x"], [self._prefix, now_ms, limit])
        return _int(reply)

    async def _counter(self, budget: BudgetRef, now_ms: int) -> Counter:
        suffix = counter_suffix(budget.budget_id, budget.window_key)
        reply = await self._run(
            self._counter_script,
            self._counter_keys(budget),
            [self._prefix, now_ms, suffix, self._expired_by(now_ms)],
        )
        spent, held = _ints(reply, at_least=2)
        return Counter(spent, held)

    async def _add_spent(self, budget: BudgetRef, micros: int, now_ms: int) -> None:
        await self._run(
            self._add_spent_script,
            self._counter_keys(budget),
            [self._prefix, now_ms, micros, counter_ttl_ms(budget, now_ms)],
        )

    async def _claim_rebuild(self) -> RebuildClaim | None:
        token = uuid.uuid4().hex
        reply = await self._run(
            self._claim_script,
            [self._prefix + "e", self._prefix + "rebuild"],
            [self._prefix, wall_clock_ms(), uuid.uuid4().hex, MIN_KEY_TTL_MS, token, REBUILD_CLAIM_MS],
        )
        if not isinstance(reply, list) or len(reply) != 2:
            raise BudgetStoreUnavailable("unexpected reply from a budget script")
        return RebuildClaim(_text(reply[1]), token) if reply[0] == 1 else None

    async def _rebuild_claim(self, claim: RebuildClaim, keep_ms: int) -> bool:
        reply = await self._run(
            self._rebuild_claim_script, [self._prefix + "rebuild"], [_claim_value(claim), keep_ms]
        )
        return _int(reply) == 1

    async def _mark_rebuilt(self, claim: RebuildClaim) -> bool:
        keys = [self._prefix + "e", self._prefix + "ready", self._prefix + "rebuild"]
        args: list[str | int] = [self._prefix, wall_clock_ms(), claim.epoch, _claim_value(claim)]
        return _int(await self._run(self._mark_script, keys, args)) == 1

    async def _epoch(self) -> str:
        # Read every sweep: a running ledger keeps it alive even while no lease is granted.
        reply = await self._run(
            self._epoch_script,
            [self._prefix + "e"],
            [self._prefix, wall_clock_ms(), uuid.uuid4().hex, MIN_KEY_TTL_MS],
        )
        return _text(reply)

    async def _forget(self, budget_ids: tuple[str, ...]) -> int:
        counters = 0
        with _unavailable_on_error():
            for budget_id in budget_ids:
                for kind in ("c:", "i:"):
                    # Every window of the budget: the length prefix keeps other ids out.
                    pattern = _glob_escape(self._prefix + kind + counter_suffix(budget_id, "")) + "*"
                    keys = [key async for key in self._client.scan_iter(match=pattern, count=1000)]
                    for start in range(0, len(keys), 1000):
                        removed = int(await self._client.unlink(*keys[start : start + 1000]))
                        counters += removed if kind == "c:" else 0
        return counters

    async def aclose(self) -> None:
        """Close the client if this store opened it."""
        if self._owns_client:
            await self._client.aclose()
