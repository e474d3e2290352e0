"""Storage tiers of the response cache: exact-match entries under a memory bound, kept by value.

The key of an entry is computed elsewhere (`t:<tenant>:<model>:<sha256 hex>` by convention); here
it is an opaque string. Every store implements `CacheStore`:

* `MemoryStore`: one process, a dict under `max_bytes`;
* `RedisStore`: shared by every cache replica, under `max_bytes` of Redis;
* `TieredStore`: a small in-process `LruCache` (L1) in front of either (L2).

Size. An entry's footprint is `len(key) + len(payload)` (UTF-8 bytes) plus
`ENTRY_OVERHEAD_BYTES`, a flat allowance for the bookkeeping around it; footprints are what
`max_bytes` bounds. `stats()` reports the data bytes (key and payload only).

Admission and eviction: GreedyDual-Size-Frequency. Each entry has a priority
`H = L + (hits + 1) * cost / footprint` (cost in micros, 0 counted as 1): what keeping the entry
saves per byte, weighted by how often it was read. `L` ("inflation") is the priority of the
last evicted entry; new and re-read entries start from the current `L`, so entries that stop
being read age out even if they were once valuable. A `put` that does not fit first drops
expired entries, then evicts the lowest priorities until the new entry fits, all or nothing:
if an entry that would have to go has a higher priority than the newcomer, the newcomer is
refused (`put` returns False) and nothing is evicted. An entry larger than `max_bytes`, or
already expired, is refused outright. A replaced entry (same key) keeps its place until its
replacement is admitted. Among equal priorities the memory store evicts the oldest; Redis
breaks ties by key.

End users. An entry may carry the keyed hash of the end user whose request produced it
(`end_user_hash`: the store's `end_user_digest` of the tenant and end user id, an HMAC-SHA256;
never the id), so `invalidate_end_user` can remove that end user's
entries (a GDPR erasure) without a scan: the memory store keeps the keys of each hash's entries
in a dict kept in step with the entries themselves, Redis in a sorted set per hash (below).
Entries with no end user are not indexed. The hashing key is the configured one (the
deployment's `SWITCHYARD_LEDGER_ERASURE_KEY`), else one the store keeps: random per process
in memory (entries live no longer than the process), in Redis for every replica sharing it.

Expiry. Entries carry `expires_at` (wall seconds). Expired entries are never returned: they are
dropped on `get`, and in bulk when space is needed and before `stats`.

Redis layout (`<p>` is the prefix, `<key>` the entry key):

    <p>e:<key>          hash: tenant, model, payload, cost, stored_at, expires_at, hits, and
                        end_user (the end user's hash) when there is one
                        (PEXPIREAT expires_at, so Redis removes it on time by itself)
    <p>eu:<hash>        zset: the keys of the entries stored for one end user (hash of tenant
                        and end user) by expiry (ms); expired members leave when the next is
                        added, removed entries at once; PEXPIREAT its latest member's expiry
    <p>end_user_key     the hashing key when none is configured (hex; made once, no TTL)
    <p>meta             hash: <key> -> "<footprint>:<tenant>" (what removing the entry frees)
    <p>prio             zset: <key> by GDSF priority
    <p>exp              zset: <key> by expiry (ms)
    <p>idx:<tenant>     zset: the tenant's keys by expiry (ms)
    <p>tbytes           hash: tenant -> data bytes
    <p>bytes            the total footprint (counter)
    <p>L                the inflation value
    <p>present          stream: "<expires_ms>:<key>" of each entry as it is admitted, added by
                        the put script itself (cache/presence.py), about `announce` long

`put`, `get`, removal and the stats read are Lua scripts (EVALSHA, reloaded on NOSCRIPT), each
atomic, so replicas never see half an entry or a counter out of step with the indexes. An entry
hash Redis expired on its own leaves its bookkeeping behind until a script meets it (on `get`,
when its expiry comes up in `exp`, or when eviction reaches it); the script then releases its
footprint from `meta`, so `<p>bytes` does not drift, and a counter found inconsistent anyway is
recounted. The scripts build key names from the prefix, so the store needs one Redis
(not Cluster). Redis time (`TIME`) decides expiry inside the scripts, the same clock as
PEXPIREAT.

Failures. A Redis error raises `SwitchyardError` UNAVAILABLE / DEPENDENCY_UNAVAILABLE (retry in
1 s); messages and logs name the operation and the error type, never keys or payloads.

L1. `LruCache` holds at most `max_entries` entries for at most `max_age_s` each (and never past
their expiry), so an invalidation made through another replica is seen within `max_age_s`.
Reads served by L1 count hits in L1 only; L2 sees the reads that miss L1.
"""

from __future__ import annotations

import fnmatch
import heapq
import itertools
import math
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, replace
from typing import Final, Protocol, TypeVar

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.end_users import end_user_digest
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.redis_client import open_redis, redis_text

__all__ = [
    "ENTRY_OVERHEAD_BYTES",
    "REDIS_PREFIX",
    "CacheEntry",
    "CacheStore",
    "LruCache",
    "MemoryStore",
    "RedisStore",
    "StoreStats",
    "TieredStore",
    "build_store",
    "data_bytes",
    "footprint",
]

_log = get_logger(__name__)

Clock = Callable[[], float]
"""Wall seconds (`time.time`)."""

ENTRY_OVERHEAD_BYTES: Final = 256
"""Added to every entry's key and payload bytes when counting it against `max_bytes`."""

_REDIS_ERRORS: Final = (RedisError, OSError)
# At most this many expired entries are dropped per script call (a script blocks Redis).
_PURGE_LIMIT: Final = 1_000
_STATS_PURGE_LIMIT: Final = 10_000
_INVALIDATE_BATCH: Final = 500
REDIS_PREFIX: Final = "switchyard:cache:"
_SCAN_COUNT: Final = 500

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class CacheEntry:
    """One cached answer.

    `key` is opaque here (its tenant and model are also stored separately); `payload` is a
    serialized `switchyard.v1.CachedAnswer`; `cost_micros` is what generating it cost, so what
    a hit saves; times are wall seconds; `hits` counts reads; `end_user_hash` is the keyed hash
    of the end user whose request produced it (`CacheStore.end_user_digest`), "" for none.
    """

    key: str
    tenant_id: str
    model: str
    payload: bytes
    cost_micros: int
    stored_at: float
    expires_at: float
    hits: int = 0
    end_user_hash: str = ""


@dataclass(frozen=True, slots=True)
class StoreStats:
    """What a store holds (of one tenant, or of all): live entries and their key + payload bytes."""

    entries: int = 0
    bytes: int = 0


class CacheStore(Protocol):
    """The interface every storage tier implements."""

    async def get(self, key: str) -> CacheEntry | None:
        """The live entry for `key`, counting a hit on it (the entry returned carries the new
        count); None when absent or expired."""
        ...

    async def put(self, entry: CacheEntry) -> bool:
        """Store `entry`, replacing any entry with the same key; False when admission refused it."""
        ...

    async def invalidate(self, *, tenant_id: str = "", model: str = "", key_pattern: str = "") -> int:
        """Remove the entries matching every given filter (`key_pattern` is an fnmatch glob over
        keys); the number of live entries removed. No filter at all raises `ValueError`."""
        ...

    async def invalidate_end_user(
        self, tenant_id: str, end_user_hash: str, *, model: str = "", key_pattern: str = ""
    ) -> list[str]:
        """Remove the live entries of `tenant_id` stored with `end_user_hash` (and matching
        `model` and `key_pattern` when given), found through the end user's index; their keys.
        An empty tenant or hash raises `ValueError`."""
        ...

    async def end_user_digest(self, tenant_id: str, end_user: str) -> str:
        """The keyed hash entries of `end_user` of `tenant_id` are stored with (hex)."""
        ...

    async def stats(self, tenant_id: str = "") -> StoreStats:
        """Live entries and bytes, of `tenant_id` or (empty) of every tenant."""
        ...

    async def close(self) -> None:
        """Release what the store owns."""
        ...


def data_bytes(entry: CacheEntry) -> int:
    """The key and payload bytes of `entry` (what `stats` reports)."""
    return len(entry.key.encode()) + len(entry.payload)


def footprint(entry: CacheEntry) -> int:
    """What `entry` counts against `max_bytes`: its data bytes plus `ENTRY_OVERHEAD_BYTES`."""
    return data_bytes(entry) + ENTRY_OVERHEAD_BYTES


def _weight(cost_micros: int) -> int:
    return max(1, cost_micros)


def _check_filters(tenant_id: str, model: str, key_pattern: str) -> None:
    if not (tenant_id or model or key_pattern):
        raise ValueError(
            "invalidate needs a tenant, a model or a key pattern (refusing to remove everything)"
        )


def _check_end_user(tenant_id: str, end_user_hash: str) -> None:
    if not tenant_id or not end_user_hash:
        raise ValueError("removing an end user's entries needs the tenant and the end user's hash")


def _matches(
    entry: CacheEntry, tenant_id: str, model: str, key_pattern: str, end_user_hash: str = ""
) -> bool:
    return (
        (not tenant_id or entry.tenant_id == tenant_id)
        and (not model or entry.model == model)
        and (not key_pattern or fnmatch.fnmatchcase(entry.key, key_pattern))
        and (not end_user_hash or entry.end_user_hash == end_user_hash)
    )


def _end_user_key(configured: bytes | None) -> bytes | None:
    if configured is not None and len(configured) < 16:
        raise ValueError("the end user hashing key must be at least 16 bytes")
    return configured


def _check_max_bytes(max_bytes: int) -> None:
    if max_bytes < 1:
        raise ValueError("max_bytes must be at least 1")


# --- in memory ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    """A stored entry with its mutable bookkeeping."""

    entry: CacheEntry
    footprint: int
    priority: float
    seq: int  # the sequence number of the entry's live heap item


class MemoryStore:
    """GDSF-bounded entries in one process (see the module docstring).

    Priorities live in a heap with lazy deletion: each change pushes a new item and the slot
    remembers which item is current; stale items are skipped when popped and the heap is
    rebuilt when they outnumber the live ones. Expiries have a heap of their own, so expired
    entries are found without scanning. Every method runs without awaiting, so each call is
    atomic on the event loop (not thread-safe).
    """

    def __init__(
        self, max_bytes: int, clock: Clock = time.time, *, end_user_key: bytes | None = None
    ) -> None:
        _check_max_bytes(max_bytes)
        self.max_bytes = max_bytes
        self._clock = clock
        self._end_user_key = _end_user_key(end_user_key) or secrets.token_bytes(32)
        # (tenant, end user hash) -> the keys of its entries held (expired ones until dropped).
        self._by_end_user: dict[tuple[str, str], set[str]] = {}
        self._slots: dict[str, _Slot] = {}
        self._by_priority: list[tuple[float, int, str]] = []
        self._by_expiry: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._used = 0
        self._inflation = 0.0
        self._tenants: dict[str, list[int]] = {}  # tenant -> [entries, data bytes]
        self.evictions = 0
        """Entries evicted for space (not counting expired ones)."""

    @property
    def used_bytes(self) -> int:
        """The total footprint of the entries held (expired ones included until dropped)."""
        return self._used

    @property
    def inflation(self) -> float:
        """`L`: the priority of the last evicted entry."""
        return self._inflation

    def priority(self, key: str) -> float | None:
        """The current GDSF priority of `key`'s entry, if held."""
        slot = self._slots.get(key)
        return None if slot is None else slot.priority

    async def get(self, key: str) -> CacheEntry | None:
        slot = self._slots.get(key)
        if slot is None:
            return None
        if self._clock() >= slot.entry.expires_at:
            self._remove(key)
            return None
        slot.entry = replace(slot.entry, hits=slot.entry.hits + 1)
        self._set_priority(slot, self._priority_of(slot.entry, slot.footprint))
        self._maybe_compact()
        return slot.entry

    async def put(self, entry: CacheEntry) -> bool:
        size = footprint(entry)
        now = self._clock()
        if size > self.max_bytes or entry.expires_at <= now:
            return False
        key = entry.key
        need = self._need(key, size)
        if need > 0:
            self._purge_expired(now)
            need = self._need(key, size)
        priority = self._priority_of(entry, size)
        victims: list[str] = []
        if need > 0:
            victims = self._choose_victims(key, need, priority)
            if not victims:
                return False
            for victim in victims:
                self._inflation = max(self._inflation, self._slots[victim].priority)
                self._remove(victim)
                self.evictions += 1
            priority = self._priority_of(entry, size)
        if key in self._slots:
            self._remove(key)
        slot = _Slot(entry, size, priority, -1)
        self._slots[key] = slot
        self._set_priority(slot, priority)
        heapq.heappush(self._by_expiry, (entry.expires_at, slot.seq, key))
        self._used += size
        counts = self._tenants.setdefault(entry.tenant_id, [0, 0])
        counts[0] += 1
        counts[1] += size - ENTRY_OVERHEAD_BYTES
        if entry.end_user_hash:
            self._by_end_user.setdefault((entry.tenant_id, entry.end_user_hash), set()).add(key)
        self._maybe_compact()
        return True

    async def invalidate(self, *, tenant_id: str = "", model: str = "", key_pattern: str = "") -> int:
        _check_filters(tenant_id, model, key_pattern)
        self._purge_expired(self._clock())
        doomed = [k for k, s in self._slots.items() if _matches(s.entry, tenant_id, model, key_pattern)]
        for key in doomed:
            self._remove(key)
        self._maybe_compact()
        return len(doomed)

    async def invalidate_end_user(
        self, tenant_id: str, end_user_hash: str, *, model: str = "", key_pattern: str = ""
    ) -> list[str]:
        _check_end_user(tenant_id, end_user_hash)
        self._purge_expired(self._clock())
        indexed = self._by_end_user.get((tenant_id, end_user_hash), set())
        doomed = sorted(
            k for k in indexed if _matches(self._slots[k].entry, tenant_id, model, key_pattern, end_user_hash)
        )
        for key in doomed:
            self._remove(key)
        self._maybe_compact()
        return doomed

    async def end_user_digest(self, tenant_id: str, end_user: str) -> str:
        return end_user_digest(self._end_user_key, tenant_id, end_user)

    def end_user_keys(self, tenant_id: str, end_user_hash: str) -> frozenset[str]:
        """The keys indexed under the end user (the entries held for them, expired ones until
        they are dropped)."""
        return frozenset(self._by_end_user.get((tenant_id, end_user_hash), ()))

    async def stats(self, tenant_id: str = "") -> StoreStats:
        self._purge_expired(self._clock())
        if tenant_id:
            entries, size = self._tenants.get(tenant_id, (0, 0))
            return StoreStats(entries=entries, bytes=size)
        return StoreStats(
            entries=len(self._slots), bytes=self._used - len(self._slots) * ENTRY_OVERHEAD_BYTES
        )

    async def close(self) -> None:
        """Drop every entry."""
        self._slots.clear()
        self._by_priority.clear()
        self._by_expiry.clear()
        self._tenants.clear()
        self._by_end_user.clear()
        self._used = 0

    def _need(self, key: str, size: int) -> int:
        """Bytes to free for an entry of `size` under `key` (the entry it replaces counts as free)."""
        old = self._slots.get(key)
        return self._used - (old.footprint if old is not None else 0) + size - self.max_bytes

    def _priority_of(self, entry: CacheEntry, size: int) -> float:
        return self._inflation + (entry.hits + 1) * _weight(entry.cost_micros) / size

    def _set_priority(self, slot: _Slot, priority: float) -> None:
        slot.priority = priority
        slot.seq = next(self._seq)
        heapq.heappush(self._by_priority, (priority, slot.seq, slot.entry.key))

    def _choose_victims(self, key: str, need: int, priority: float) -> list[str]:
        """The lowest-priority entries (other than `key`'s) that free `need` bytes, or [] when one
        of them outranks `priority` (the newcomer is refused; the heap is left as it was)."""
        popped: list[tuple[float, int, str]] = []
        victims: list[str] = []
        freed = 0
        refused = False
        while freed < need and self._by_priority:
            item = heapq.heappop(self._by_priority)
            slot = self._slots.get(item[2])
            if slot is None or slot.seq != item[1]:
                continue  # stale
            popped.append(item)
            if item[2] == key:
                continue  # the entry being replaced: its space is already counted as free
            if item[0] > priority:
                refused = True
                break
            victims.append(item[2])
            freed += slot.footprint
        if refused or freed < need:
            for item in popped:
                heapq.heappush(self._by_priority, item)
            return []
        for item in popped:
            if item[2] == key:
                heapq.heappush(self._by_priority, item)
        return victims

    def _purge_expired(self, now: float) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now:
            _, seq, key = heapq.heappop(self._by_expiry)
            slot = self._slots.get(key)
            if slot is not None and slot.entry.expires_at <= now:
                self._remove(key)

    def _remove(self, key: str) -> None:
        slot = self._slots.pop(key)
        self._used -= slot.footprint
        counts = self._tenants[slot.entry.tenant_id]
        counts[0] -= 1
        counts[1] -= slot.footprint - ENTRY_OVERHEAD_BYTES
        if counts[0] == 0:
            del self._tenants[slot.entry.tenant_id]
        if slot.entry.end_user_hash:
            index = (slot.entry.tenant_id, slot.entry.end_user_hash)
            keys = self._by_end_user[index]
            keys.discard(key)
            if not keys:
                del self._by_end_user[index]

    def _maybe_compact(self) -> None:
        live = len(self._slots)
        if len(self._by_priority) > 2 * live + 64:
            self._by_priority = [(s.priority, s.seq, k) for k, s in self._slots.items()]
            heapq.heapify(self._by_priority)
        if len(self._by_expiry) > 2 * live + 64:
            self._by_expiry = [(s.entry.expires_at, s.seq, k) for k, s in self._slots.items()]
            heapq.heapify(self._by_expiry)


class LruCache:
    """A small in-process LRU of entries (L1), each kept at most `max_age_s` and never past its
    expiry. `max_entries <= 0` disables it. Synchronous: it never waits on anything."""

    def __init__(self, max_entries: int, *, max_age_s: float = 10.0, clock: Clock = time.time) -> None:
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[CacheEntry, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> CacheEntry | None:
        """The fresh entry for `key`, counting a hit on the L1 copy; None when absent or stale."""
        held = self._entries.get(key)
        if held is None:
            return None
        entry, fresh_until = held
        if self._clock() >= fresh_until:
            del self._entries[key]
            return None
        entry = replace(entry, hits=entry.hits + 1)
        self._entries[key] = (entry, fresh_until)
        self._entries.move_to_end(key)
        return entry

    def put(self, entry: CacheEntry) -> None:
        """Hold `entry` (replacing one with its key), dropping the least recently used beyond the bound."""
        if self.max_entries <= 0:
            return
        fresh_until = min(entry.expires_at, self._clock() + self.max_age_s)
        if fresh_until <= self._clock():
            self._entries.pop(entry.key, None)
            return
        self._entries[entry.key] = (entry, fresh_until)
        self._entries.move_to_end(entry.key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        self._entries.pop(key, None)

    def invalidate(
        self, *, tenant_id: str = "", model: str = "", key_pattern: str = "", end_user_hash: str = ""
    ) -> int:
        """Drop the entries matching every given filter; how many were dropped."""
        _check_filters(tenant_id, model, key_pattern)
        doomed = [
            k
            for k, (e, _) in self._entries.items()
            if _matches(e, tenant_id, model, key_pattern, end_user_hash)
        ]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def clear(self) -> None:
        self._entries.clear()


class TieredStore:
    """L1 (`LruCache`, this process) in front of L2 (any `CacheStore`, usually Redis)."""

    def __init__(self, l1: LruCache, l2: CacheStore) -> None:
        self.l1 = l1
        self.l2 = l2

    async def get(self, key: str) -> CacheEntry | None:
        entry = self.l1.get(key)
        if entry is not None:
            return entry
        entry = await self.l2.get(key)
        if entry is not None:
            self.l1.put(entry)
        return entry

    async def put(self, entry: CacheEntry) -> bool:
        admitted = await self.l2.put(entry)
        if admitted:
            self.l1.put(entry)
        else:
            self.l1.discard(entry.key)  # L2 keeps whatever it had; L1 refetches it
        return admitted

    async def invalidate(self, *, tenant_id: str = "", model: str = "", key_pattern: str = "") -> int:
        _check_filters(tenant_id, model, key_pattern)
        # L1 first: even if L2 is unreachable, this process stops serving the removed entries.
        self.l1.invalidate(tenant_id=tenant_id, model=model, key_pattern=key_pattern)
        return await self.l2.invalidate(tenant_id=tenant_id, model=model, key_pattern=key_pattern)

    async def invalidate_end_user(
        self, tenant_id: str, end_user_hash: str, *, model: str = "", key_pattern: str = ""
    ) -> list[str]:
        _check_end_user(tenant_id, end_user_hash)
        self.l1.invalidate(
            tenant_id=tenant_id, model=model, key_pattern=key_pattern, end_user_hash=end_user_hash
        )
        removed = await self.l2.invalidate_end_user(
            tenant_id, end_user_hash, model=model, key_pattern=key_pattern
        )
        for key in removed:  # in case a read in flight put one back in L1 meanwhile
            self.l1.discard(key)
        return removed

    async def end_user_digest(self, tenant_id: str, end_user: str) -> str:
        return await self.l2.end_user_digest(tenant_id, end_user)

    async def stats(self, tenant_id: str = "") -> StoreStats:
        return await self.l2.stats(tenant_id)

    async def close(self) -> None:
        self.l1.clear()
        await self.l2.close()


# --- in Redis ----------------------------------------------------------------------------------

# Every script gets ARGV[1] = the prefix and ARGV[2] = ENTRY_OVERHEAD_BYTES, then its own arguments.
_PRELUDE: Final = """
local P = ARGV[1]
local OVERHEAD = tonumber(ARGV[2])
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function footprint_of(key)
  local meta = redis.call('HGET', P .. 'meta', key)
  if meta then return tonumber(string.match(meta, '^(%d+):')) end
  return 0
end
-- Removes an entry and its bookkeeping; 1 if the entry itself was still there (live).
local function drop(key)
  local end_user = redis.call('HGET', P .. 'e:' .. key, 'end_user')
  if end_user then redis.call('ZREM', P .. 'eu:' .. end_user, key) end
  local live = redis.call('DEL', P .. 'e:' .. key)
  local meta = redis.call('HGET', P .. 'meta', key)
  if meta then
    local fp, tenant = string.match(meta, '^(%d+):(.*)$')
    fp = tonumber(fp)
    redis.call('HDEL', P .. 'meta', key)
    if redis.call('DECRBY', P .. 'bytes', fp) < 0 then redis.call('SET', P .. 'bytes', 0) end
    local idx = P .. 'idx:' .. tenant
    redis.call('ZREM', idx, key)
    if redis.call('ZCARD', idx) == 0 then
      redis.call('HDEL', P .. 'tbytes', tenant)
    else
      redis.call('HINCRBY', P .. 'tbytes', tenant, OVERHEAD - fp)
    end
  end
  redis.call('ZREM', P .. 'prio', key)
  redis.call('ZREM', P .. 'exp', key)
  return live
end
local function purge_expired(now, limit)
  local keys = redis.call('ZRANGEBYSCORE', P .. 'exp', '-inf', now, 'LIMIT', 0, limit)
  for _, k in ipairs(keys) do drop(k) end
  if redis.call('ZCARD', P .. 'exp') == 0 then redis.call('SET', P .. 'bytes', 0) end
  return #keys
end
local function recount()
  local total = 0
  for _, v in ipairs(redis.call('HVALS', P .. 'meta')) do
    total = total + tonumber(string.match(v, '^(%d+):'))
  end
  redis.call('SET', P .. 'bytes', total)
  return total
end
local function priority_of(inflation, hits, cost, fp)
  if cost < 1 then cost = 1 end
  return inflation + (hits + 1) * cost / fp
end
"""

# ARGV[3..]: key, tenant, model, payload, cost, stored_at, expires_at, expires_ms, hits,
# footprint, max_bytes, purge limit, end user hash ('' = none), the presence stream's length
# (about; 0: no announcement). Returns 1 when stored, 0 when refused.
_PUT_SCRIPT: Final = (
    _PRELUDE
    + """
local key, tenant, model, payload = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local cost, expires_ms, hits = tonumber(ARGV[7]), tonumber(ARGV[10]), tonumber(ARGV[11])
local fp, max_bytes, limit = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local now = now_ms()
if fp > max_bytes or expires_ms <= now then return 0 end
local inflation = tonumber(redis.call('GET', P .. 'L') or '0')
local priority = priority_of(inflation, hits, cost, fp)
local function need()
  return tonumber(redis.call('GET', P .. 'bytes') or '0') - footprint_of(key) + fp - max_bytes
end
local missing = need()
if missing > 0 then
  purge_expired(now, limit)
  missing = need()
end
-- Dry run: the lowest priorities (other than the entry being replaced) that free `missing`
-- bytes; nil when one of them outranks the newcomer (then nothing is evicted).
local function choose(missing)
  local victims, freed, last, start = {}, 0, inflation, 0
  while freed < missing do
    local page = redis.call('ZRANGE', P .. 'prio', start, start + 63, 'WITHSCORES')
    if #page == 0 then break end
    for i = 1, #page, 2 do
      local k, score = page[i], tonumber(page[i + 1])
      if k ~= key then
        if score > priority then return nil end
        victims[#victims + 1] = k
        freed = freed + footprint_of(k)
        last = score
        if freed >= missing then break end
      end
    end
    start = start + 64
  end
  return victims, freed, last
end
if missing > 0 then
  local victims, freed, last = choose(missing)
  if victims == nil then return 0 end
  if freed < missing then
    -- Everything else would go and it still would not fit: the counter is off; recount it.
    recount()
    missing = need()
    victims, freed, last = {}, 0, inflation
    if missing > 0 then
      victims, freed, last = choose(missing)
      if victims == nil or freed < missing then return 0 end
    end
  end
  for _, k in ipairs(victims) do drop(k) end
  if last > inflation then
    inflation = last
    redis.call('SET', P .. 'L', string.format('%.17g', inflation))
  end
  priority = priority_of(inflation, hits, cost, fp)
end
if redis.call('HEXISTS', P .. 'meta', key) == 1 or redis.call('EXISTS', P .. 'e:' .. key) == 1 then
  drop(key)
end
local ek = P .. 'e:' .. key
redis.call('HSET', ek, 'tenant', tenant, 'model', model, 'payload', payload, 'cost', ARGV[7],
  'stored_at', ARGV[8], 'expires_at', ARGV[9], 'hits', ARGV[11])
local end_user = ARGV[15]
if end_user ~= '' then
  redis.call('HSET', ek, 'end_user', end_user)
  local eu = P .. 'eu:' .. end_user
  redis.call('ZREMRANGEBYSCORE', eu, '-inf', now)
  redis.call('ZADD', eu, expires_ms, key)
  local latest = redis.call('ZRANGE', eu, -1, -1, 'WITHSCORES')
  redis.call('PEXPIREAT', eu, tonumber(latest[2]))
end
redis.call('PEXPIREAT', ek, expires_ms)
redis.call('HSET', P .. 'meta', key, ARGV[12] .. ':' .. tenant)
redis.call('INCRBY', P .. 'bytes', fp)
redis.call('HINCRBY', P .. 'tbytes', tenant, fp - OVERHEAD)
redis.call('ZADD', P .. 'idx:' .. tenant, expires_ms, key)
redis.call('ZADD', P .. 'exp', expires_ms, key)
redis.call('ZADD', P .. 'prio', string.format('%.17g', priority), key)
local announce = tonumber(ARGV[16])
if announce > 0 then
  redis.call('XADD', P .. 'present', 'MAXLEN', '~', announce, '*', 'b', ARGV[10] .. ':' .. key)
end
return 1
"""
)

# ARGV[3]: key. Returns nil, or {tenant, model, payload, cost, stored_at, expires_at, hits,
# end user hash or ''} with the hit just counted (HINCRBY) and the priority raised to match.
_GET_SCRIPT: Final = (
    _PRELUDE
    + """
local key = ARGV[3]
local ek = P .. 'e:' .. key
local raw = redis.call('HGETALL', ek)
if #raw == 0 then
  if redis.call('HEXISTS', P .. 'meta', key) == 1 then drop(key) end
  return false
end
local h = {}
for i = 1, #raw, 2 do h[raw[i]] = raw[i + 1] end
local expires_ms = tonumber(redis.call('ZSCORE', P .. 'exp', key) or '0')
if expires_ms <= now_ms() then
  drop(key)
  return false
end
local hits = redis.call('HINCRBY', ek, 'hits', 1)
local fp = footprint_of(key)
if fp > 0 then
  local inflation = tonumber(redis.call('GET', P .. 'L') or '0')
  local priority = priority_of(inflation, hits, tonumber(h['cost']), fp)
  redis.call('ZADD', P .. 'prio', string.format('%.17g', priority), key)
end
return {h['tenant'], h['model'], h['payload'], h['cost'], h['stored_at'], h['expires_at'], hits,
  h['end_user'] or ''}
"""
)

# ARGV[3..]: tenant ('' = any), model ('' = any), end user hash ('' = any), then keys. Removes
# the listed entries that match; returns the keys of those that were live. With an end user,
# the listed keys that are no longer that end user's entries (gone, or stored since for someone
# else) leave the end user's index.
_REMOVE_SCRIPT: Final = (
    _PRELUDE
    + """
local tenant, model, end_user, removed = ARGV[3], ARGV[4], ARGV[5], {}
for i = 6, #ARGV do
  local key = ARGV[i]
  local ek = P .. 'e:' .. key
  local ok = true
  if end_user ~= '' and redis.call('HGET', ek, 'end_user') ~= end_user then
    ok = false
    redis.call('ZREM', P .. 'eu:' .. end_user, key)
  end
  if ok and model ~= '' and redis.call('HGET', ek, 'model') ~= model then ok = false end
  if ok and tenant ~= '' then
    local meta = redis.call('HGET', P .. 'meta', key)
    if not meta or string.match(meta, '^%d+:(.*)$') ~= tenant then ok = false end
  end
  if ok then
    if drop(key) == 1 then removed[#removed + 1] = key end
  elseif redis.call('EXISTS', ek) == 0 and redis.call('HEXISTS', P .. 'meta', key) == 1 then
    drop(key)  -- expired: only its bookkeeping was left
  end
end
return removed
"""
)

# ARGV[3]: tenant ('' = all), ARGV[4]: purge limit. Drops expired entries, then returns
# {entries, data bytes}.
_STATS_SCRIPT: Final = (
    _PRELUDE
    + """
local tenant = ARGV[3]
purge_expired(now_ms(), tonumber(ARGV[4]))
if tenant ~= '' then
  local size = tonumber(redis.call('HGET', P .. 'tbytes', tenant) or '0')
  return {redis.call('ZCARD', P .. 'idx:' .. tenant), size}
end
local entries = redis.call('ZCARD', P .. 'exp')
return {entries, tonumber(redis.call('GET', P .. 'bytes') or '0') - entries * OVERHEAD}
"""
)


def _unavailable() -> SwitchyardError:
    return SwitchyardError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
        "the response cache store is unavailable",
        retry_after_s=1.0,
    )


def _blob(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    return str(value).encode()


class RedisStore:
    """GDSF-bounded entries in Redis, shared by every replica (see the module docstring).

    `max_bytes` bounds the footprints counted in Redis (not Redis's own memory use; leave Redis
    room for its overhead). A client passed in stays the caller's unless `owns_client`.
    `end_user_key` hashes end users; None: a random one kept in Redis, shared by the replicas.
    `announce` > 0: each admitted entry is announced on the presence stream, kept about that
    many entries long (cache/presence.py).
    """

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str = REDIS_PREFIX,
        max_bytes: int,
        owns_client: bool = False,
        end_user_key: bytes | None = None,
        announce: int = 0,
    ) -> None:
        _check_max_bytes(max_bytes)
        self.max_bytes = max_bytes
        self.prefix = prefix
        self._announce = announce
        self._end_user_key = _end_user_key(end_user_key)
        self._client = client
        self._owns_client = owns_client
        self._put_script = client.register_script(_PUT_SCRIPT)
        self._get_script = client.register_script(_GET_SCRIPT)
        self._remove_script = client.register_script(_REMOVE_SCRIPT)
        self._stats_script = client.register_script(_STATS_SCRIPT)
        self.backend_failures = 0
        """Redis calls that failed (a counter for metrics)."""

    def _args(self, *args: str | bytes | int) -> list[str | bytes | int]:
        return [self.prefix, ENTRY_OVERHEAD_BYTES, *args]

    async def _call(self, op: str, pending: Awaitable[_T]) -> _T:
        try:
            return await pending
        except _REDIS_ERRORS as exc:
            self._failed(op, exc)
            raise _unavailable() from None

    def _failed(self, op: str, exc: BaseException) -> None:
        self.backend_failures += 1
        _log.warning("cache_store_failed", op=op, error=type(exc).__name__)

    async def get(self, key: str) -> CacheEntry | None:
        raw = await self._call("get", self._get_script(keys=[], args=self._args(key)))
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) != 8:
            self._failed("get", RedisError("unexpected reply"))
            raise _unavailable()
        tenant, model, payload, cost, stored_at, expires_at, hits, end_user_hash = raw
        return CacheEntry(
            key=key,
            tenant_id=redis_text(tenant),
            model=redis_text(model),
            payload=_blob(payload),
            cost_micros=int(cost),
            stored_at=float(stored_at),
            expires_at=float(expires_at),
            hits=int(hits),
            end_user_hash=redis_text(end_user_hash),
        )

    async def put(self, entry: CacheEntry) -> bool:
        size = footprint(entry)
        if size > self.max_bytes:
            return False
        args = self._args(
            entry.key,
            entry.tenant_id,
            entry.model,
            entry.payload,
            entry.cost_micros,
            repr(entry.stored_at),
            repr(entry.expires_at),
            math.ceil(entry.expires_at * 1000),
            entry.hits,
            size,
            self.max_bytes,
            _PURGE_LIMIT,
            entry.end_user_hash,
            self._announce,
        )
        stored = await self._call("put", self._put_script(keys=[], args=args))
        return int(stored) == 1

    async def invalidate(self, *, tenant_id: str = "", model: str = "", key_pattern: str = "") -> int:
        _check_filters(tenant_id, model, key_pattern)
        index = f"{self.prefix}idx:{tenant_id}" if tenant_id else f"{self.prefix}exp"
        try:
            keys: list[str] = []
            async for member, _score in self._client.zscan_iter(index, count=_SCAN_COUNT):
                key = redis_text(member)
                if not key_pattern or fnmatch.fnmatchcase(key, key_pattern):
                    keys.append(key)
            return len(await self._remove(keys, tenant_id, model, ""))
        except _REDIS_ERRORS as exc:
            self._failed("invalidate", exc)
            raise _unavailable() from None

    async def invalidate_end_user(
        self, tenant_id: str, end_user_hash: str, *, model: str = "", key_pattern: str = ""
    ) -> list[str]:
        _check_end_user(tenant_id, end_user_hash)
        try:
            keys: list[str] = []
            async for member, _score in self._client.zscan_iter(
                f"{self.prefix}eu:{end_user_hash}", count=_SCAN_COUNT
            ):
                key = redis_text(member)
                if not key_pattern or fnmatch.fnmatchcase(key, key_pattern):
                    keys.append(key)
            return await self._remove(keys, tenant_id, model, end_user_hash)
        except _REDIS_ERRORS as exc:
            self._failed("invalidate_end_user", exc)
            raise _unavailable() from None

    async def _remove(self, keys: list[str], tenant_id: str, model: str, end_user_hash: str) -> list[str]:
        """The remove script over `keys` in batches; the keys of the live entries it removed."""
        removed: list[str] = []
        for batch in _batches(keys, _INVALIDATE_BATCH):
            args = self._args(tenant_id, model, end_user_hash, *batch)
            removed.extend(redis_text(k) for k in await self._remove_script(keys=[], args=args))
        return removed

    async def end_user_digest(self, tenant_id: str, end_user: str) -> str:
        key = self._end_user_key
        if key is None:
            key = self._end_user_key = await self._call("end_user_key", self._shared_end_user_key())
        return end_user_digest(key, tenant_id, end_user)

    async def _shared_end_user_key(self) -> bytes:
        """The hashing key kept in Redis: made by the first replica that needs it."""
        name = f"{self.prefix}end_user_key"
        await self._client.set(name, secrets.token_hex(32), nx=True)
        raw = await self._client.get(name)
        if raw is None:  # removed between the two calls: the next call makes another
            raise RedisError("the end user key vanished")
        return bytes.fromhex(redis_text(raw))

    async def stats(self, tenant_id: str = "") -> StoreStats:
        raw = await self._call(
            "stats", self._stats_script(keys=[], args=self._args(tenant_id, _STATS_PURGE_LIMIT))
        )
        entries, size = (int(v) for v in raw)
        return StoreStats(entries=entries, bytes=max(0, size))

    async def used_bytes(self) -> int:
        """The footprint counter (expired entries count until a script drops them)."""
        raw = await self._call("used_bytes", self._client.get(f"{self.prefix}bytes"))
        return int(raw or 0)

    async def close(self) -> None:
        """Close the client if this store owns it."""
        if self._owns_client:
            await self._client.aclose()


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def build_store(
    redis_url: str | None,
    *,
    max_bytes: int,
    l1_entries: int,
    end_user_key: bytes | None = None,
    announce: int = 0,
) -> CacheStore:
    """The store for a cache replica: L1 in front of Redis when `redis_url` is set (no L1 when
    `l1_entries` is 0), else one `MemoryStore` (an L1 in front of memory would only copy it).
    `end_user_key` hashes end users (None: the store keeps a key of its own); `announce` > 0
    announces admitted entries to the other replicas (`RedisStore`).

    The Redis client is lazy (no connection until the first call) and owned by the store.
    """
    if not redis_url:
        return MemoryStore(max_bytes, end_user_key=end_user_key)
    l2 = RedisStore(
        open_redis(redis_url, client_name="switchyard-cache"),
        max_bytes=max_bytes,
        owns_client=True,
        end_user_key=end_user_key,
        announce=announce,
    )
    if l1_entries <= 0:
        return l2
    return TieredStore(LruCache(l1_entries), l2)
