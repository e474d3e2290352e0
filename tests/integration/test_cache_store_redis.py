"""Cache store contract: the same cases against `MemoryStore` and `RedisStore` on a real Redis.

The memory store runs on a stepped clock; the Redis one on real time (Redis expires keys by its
own clock), so expiry cases use TTLs of a few tenths of a second there. Every Redis case gets a
prefix of its own. The Redis-only cases at the end cover what only a shared backend has: the
stored layout and TTLs, replicas sharing entries, the byte counter staying true when Redis drops
entries by itself, NOSCRIPT, and an unreachable Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from redis.asyncio import Redis

from switchyard.cache.presence import announcement
from switchyard.cache.store import (
    ENTRY_OVERHEAD_BYTES,
    CacheEntry,
    LruCache,
    MemoryStore,
    RedisStore,
    StoreStats,
    TieredStore,
    build_store,
    data_bytes,
    footprint,
)
from switchyard.common.end_users import end_user_digest
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import configure_logging, reset_logging
from switchyard.common.ports import free_port
from switchyard.common.redis_client import RedisOptions, open_redis

FAST = RedisOptions(connect_timeout_s=0.2, socket_timeout_s=0.5, pool_timeout_s=0.2)
PAYLOAD = b"p" * 100
# Long enough for a Redis round trip or two, short enough to wait out.
SHORT_TTL_S = 0.3


class SteppedClock:
    """Wall seconds that tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    name: str
    store: MemoryStore | RedisStore
    clock: Callable[[], float]
    elapse: Callable[[float], Awaitable[None]]

    def entry(
        self,
        key: str,
        *,
        tenant: str = "acme",
        model: str = "m/a",
        payload: bytes = PAYLOAD,
        cost: int = 1_000,
        ttl_s: float = 60.0,
        hits: int = 0,
        end_user_hash: str = "",
    ) -> CacheEntry:
        now = self.clock()
        return CacheEntry(key, tenant, model, payload, cost, now, now + ttl_s, hits, end_user_hash)

    async def put(self, *entries: CacheEntry) -> list[bool]:
        return [await self.store.put(e) for e in entries]


def key(i: int, tenant: str = "acme", model: str = "m/a") -> str:
    """Keys of one length (so entries of one payload have one footprint) that sort by `i`."""
    return f"t:{tenant}:{model}:{i:04d}"


FOOTPRINT = len(key(0).encode()) + len(PAYLOAD) + ENTRY_OVERHEAD_BYTES


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = open_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"test:{uuid.uuid4().hex}:"


def _memory_backend(max_bytes: int) -> Backend:
    clock = SteppedClock()

    async def elapse(seconds: float) -> None:
        clock.now += seconds

    return Backend("memory", MemoryStore(max_bytes, clock=clock), clock, elapse)


async def _sleep(seconds: float) -> None:
    await asyncio.sleep(seconds)


# Synchronous so that it may pull the (async) Redis fixtures only for the Redis case.
@pytest.fixture(params=["memory", "redis"])
def make_backend(request: pytest.FixtureRequest, prefix: str) -> Iterator[Callable[[int], Backend]]:
    """Builds the backend under test with a given `max_bytes`."""
    if request.param == "memory":
        yield _memory_backend
        return
    client: Redis = request.getfixturevalue("redis_client")
    stores: list[RedisStore] = []

    def build(max_bytes: int) -> Backend:
        store = RedisStore(client, prefix=prefix, max_bytes=max_bytes)
        stores.append(store)
        return Backend("redis", store, time.time, _sleep)

    yield build
    assert all(store.backend_failures == 0 for store in stores)


@pytest.fixture
def backend(make_backend: Callable[[int], Backend]) -> Backend:
    """A backend with room to spare."""
    return make_backend(1_000_000)


async def used_bytes(store: MemoryStore | RedisStore) -> int:
    if isinstance(store, MemoryStore):
        return store.used_bytes
    return await store.used_bytes()


# --- the contract, on both backends ---------------------------------------------------------


async def test_an_entry_put_is_got_back_with_its_hits_counted(backend: Backend) -> None:
    entry = backend.entry(key(1), cost=4_200)
    assert await backend.store.put(entry)

    got = await backend.store.get(entry.key)
    assert got == CacheEntry(
        entry.key, "acme", "m/a", PAYLOAD, 4_200, entry.stored_at, entry.expires_at, hits=1
    )
    assert (await backend.store.get(entry.key)) == CacheEntry(
        entry.key, "acme", "m/a", PAYLOAD, 4_200, entry.stored_at, entry.expires_at, hits=2
    )
    assert await backend.store.get(key(2)) is None


async def test_binary_payloads_and_unicode_keys_survive(backend: Backend) -> None:
    payload = bytes(range(256)) * 3
    entry = backend.entry("t:ünï:m/a:\x00:ÿ", tenant="ünï", model="modèle", payload=payload)
    assert await backend.store.put(entry)
    got = await backend.store.get(entry.key)
    assert got is not None
    assert (got.key, got.tenant_id, got.model, got.payload) == (entry.key, "ünï", "modèle", payload)
    assert await backend.store.stats("ünï") == StoreStats(1, data_bytes(entry))


async def test_an_expired_entry_is_never_returned(backend: Backend) -> None:
    short = backend.entry(key(1), ttl_s=SHORT_TTL_S)
    long = backend.entry(key(2))
    assert await backend.put(short, long) == [True, True]
    assert await backend.store.get(short.key) is not None

    await backend.elapse(SHORT_TTL_S + 0.15)
    assert await backend.store.get(short.key) is None
    assert await backend.store.get(long.key) is not None
    assert await backend.store.stats() == StoreStats(1, data_bytes(long))
    assert await backend.store.stats("acme") == StoreStats(1, data_bytes(long))
    assert await used_bytes(backend.store) == footprint(long)


async def test_an_entry_that_has_already_expired_is_refused(backend: Backend) -> None:
    stale = backend.entry(key(1), ttl_s=-1.0)
    assert not await backend.store.put(stale)
    assert await backend.store.get(stale.key) is None
    assert await backend.store.stats() == StoreStats(0, 0)


async def test_put_replaces_the_entry_with_the_same_key(backend: Backend) -> None:
    first = backend.entry(key(1), payload=b"first answer", cost=10)
    assert await backend.store.put(first)
    assert await backend.store.get(first.key) is not None
    second = backend.entry(key(1), model="m/b", payload=b"the second, longer answer", cost=20)
    assert await backend.store.put(second)

    got = await backend.store.get(first.key)
    assert got is not None
    assert (got.model, got.payload, got.cost_micros, got.hits) == ("m/b", second.payload, 20, 1)
    assert await backend.store.stats() == StoreStats(1, data_bytes(second))
    assert await used_bytes(backend.store) == footprint(second)


async def test_a_replacement_may_move_an_entry_to_another_tenant(backend: Backend) -> None:
    assert await backend.store.put(backend.entry(key(1), tenant="acme"))
    moved = backend.entry(key(1), tenant="beta")
    assert await backend.store.put(moved)
    assert await backend.store.stats("acme") == StoreStats(0, 0)
    assert await backend.store.stats("beta") == StoreStats(1, data_bytes(moved))
    assert await backend.store.invalidate(tenant_id="acme") == 0
    assert await backend.store.invalidate(tenant_id="beta") == 1
    assert await backend.store.stats() == StoreStats(0, 0)


async def test_the_bound_holds_and_an_expensive_entry_outlives_cheap_ones(
    make_backend: Callable[[int], Backend],
) -> None:
    backend = make_backend(10 * FOOTPRINT)
    cheap = [backend.entry(key(i), cost=1) for i in range(25)]
    expensive = backend.entry(key(9_999), cost=1_000_000)
    assert await backend.put(*cheap[:10]) == [True] * 10
    assert await backend.store.put(expensive)
    assert await backend.put(*cheap[10:]) == [True] * 15
    assert await used_bytes(backend.store) <= 10 * FOOTPRINT
    assert (await backend.store.stats()).entries == 10

    # The cheap entries went oldest first; the expensive one stayed throughout.
    survivors = {e.key for e in cheap if await backend.store.get(e.key) is not None}
    assert survivors == {e.key for e in cheap[16:]}
    assert await backend.store.get(expensive.key) is not None


async def test_a_frequently_read_entry_survives_a_stream_of_new_ones(
    make_backend: Callable[[int], Backend],
) -> None:
    backend = make_backend(10 * FOOTPRINT)
    first = [backend.entry(key(i), cost=100) for i in range(10)]
    assert await backend.put(*first) == [True] * 10
    for _ in range(5):
        assert await backend.store.get(first[3].key) is not None

    later = [backend.entry(key(100 + i), cost=100) for i in range(10)]
    assert await backend.put(*later) == [True] * 10
    assert await used_bytes(backend.store) <= 10 * FOOTPRINT
    gone = [e.key for e in first if await backend.store.get(e.key) is None]
    assert gone == [e.key for i, e in enumerate(first) if i != 3]


async def test_an_entry_larger_than_the_bound_is_refused(make_backend: Callable[[int], Backend]) -> None:
    backend = make_backend(2 * FOOTPRINT)
    assert await backend.store.put(backend.entry(key(1)))
    huge = backend.entry(key(2), payload=b"x" * (2 * FOOTPRINT), cost=10**9)
    assert not await backend.store.put(huge)
    assert await backend.store.get(huge.key) is None
    # Nothing was evicted for it.
    assert await backend.store.get(key(1)) is not None
    assert (await backend.store.stats()).entries == 1


async def test_a_cheap_entry_is_refused_rather_than_evict_valuable_ones(
    make_backend: Callable[[int], Backend],
) -> None:
    backend = make_backend(5 * FOOTPRINT)
    valuable = [backend.entry(key(i), cost=50_000) for i in range(5)]
    assert await backend.put(*valuable) == [True] * 5
    assert not await backend.store.put(backend.entry(key(99), cost=10))
    assert await backend.store.get(key(99)) is None
    assert all([await backend.store.get(e.key) is not None for e in valuable])
    assert await used_bytes(backend.store) == 5 * FOOTPRINT


async def test_expired_entries_make_room_before_live_ones_are_evicted(
    make_backend: Callable[[int], Backend],
) -> None:
    backend = make_backend(4 * FOOTPRINT)
    doomed = [backend.entry(key(i), cost=10**6, ttl_s=SHORT_TTL_S) for i in range(2)]
    kept = [backend.entry(key(10 + i), cost=10) for i in range(2)]
    assert await backend.put(*doomed, *kept) == [True] * 4
    await backend.elapse(SHORT_TTL_S + 0.15)
    # Cheaper than the expired entries were, but they no longer count.
    newcomers = [backend.entry(key(20 + i), cost=10) for i in range(2)]
    assert await backend.put(*newcomers) == [True, True]
    assert all([await backend.store.get(e.key) is not None for e in kept + newcomers])
    assert await used_bytes(backend.store) == 4 * FOOTPRINT


async def seed(backend: Backend) -> list[CacheEntry]:
    """Two entries per (tenant, model) for two tenants and two models."""
    entries = [
        backend.entry(f"t:{tenant}:{model}:{i}", tenant=tenant, model=model)
        for tenant in ("acme", "beta")
        for model in ("m/one", "m/two")
        for i in range(2)
    ]
    assert await backend.put(*entries) == [True] * len(entries)
    return entries


async def remaining(backend: Backend, entries: list[CacheEntry]) -> set[str]:
    return {e.key for e in entries if await backend.store.get(e.key) is not None}


@pytest.mark.parametrize(
    ("filters", "removed"),
    [
        ({"tenant_id": "acme"}, {"t:acme:m/one:0", "t:acme:m/one:1", "t:acme:m/two:0", "t:acme:m/two:1"}),
        ({"model": "m/one"}, {"t:acme:m/one:0", "t:acme:m/one:1", "t:beta:m/one:0", "t:beta:m/one:1"}),
        ({"key_pattern": "t:beta:*:1"}, {"t:beta:m/one:1", "t:beta:m/two:1"}),
        ({"key_pattern": "*:[!0]"}, {f"t:{t}:{m}:1" for t in ("acme", "beta") for m in ("m/one", "m/two")}),
        ({"tenant_id": "acme", "model": "m/two"}, {"t:acme:m/two:0", "t:acme:m/two:1"}),
        ({"tenant_id": "beta", "key_pattern": "*:0"}, {"t:beta:m/one:0", "t:beta:m/two:0"}),
        ({"model": "m/one", "key_pattern": "t:acme:*"}, {"t:acme:m/one:0", "t:acme:m/one:1"}),
        ({"tenant_id": "beta", "model": "m/one", "key_pattern": "*1"}, {"t:beta:m/one:1"}),
        ({"tenant_id": "nobody"}, set()),
        ({"model": "m/none"}, set()),
        ({"key_pattern": "T:ACME:*"}, set()),  # globs are case-sensitive
    ],
)
async def test_invalidate_removes_what_every_filter_matches(
    backend: Backend, filters: dict[str, str], removed: set[str]
) -> None:
    entries = await seed(backend)
    assert await backend.store.invalidate(**filters) == len(removed)
    assert await remaining(backend, entries) == {e.key for e in entries} - removed
    stats = await backend.store.stats()
    assert stats == StoreStats(8 - len(removed), sum(data_bytes(e) for e in entries if e.key not in removed))


async def test_invalidate_without_a_filter_refuses_to_remove_everything(backend: Backend) -> None:
    entries = await seed(backend)
    with pytest.raises(ValueError, match="tenant, a model or a key pattern"):
        await backend.store.invalidate()
    with pytest.raises(ValueError):
        await backend.store.invalidate(tenant_id="", model="", key_pattern="")
    assert len(await remaining(backend, entries)) == 8


async def test_invalidate_counts_only_live_entries(backend: Backend) -> None:
    assert await backend.put(backend.entry(key(1), ttl_s=SHORT_TTL_S), backend.entry(key(2))) == [True, True]
    await backend.elapse(SHORT_TTL_S + 0.15)
    assert await backend.store.invalidate(tenant_id="acme") == 1
    assert await backend.store.stats() == StoreStats(0, 0)
    assert await used_bytes(backend.store) == 0


async def test_tenants_are_counted_apart(backend: Backend) -> None:
    acme = [backend.entry(key(i, "acme"), tenant="acme", payload=b"a" * (10 * i)) for i in range(1, 3)]
    beta = [backend.entry(key(1, "beta"), tenant="beta", payload=b"b" * 7)]
    assert await backend.put(*acme, *beta) == [True] * 3

    assert await backend.store.stats("acme") == StoreStats(2, sum(data_bytes(e) for e in acme))
    assert await backend.store.stats("beta") == StoreStats(1, data_bytes(beta[0]))
    assert await backend.store.stats("nobody") == StoreStats(0, 0)
    assert await backend.store.stats() == StoreStats(3, sum(data_bytes(e) for e in acme + beta))

    assert await backend.store.invalidate(tenant_id="beta") == 1
    assert await backend.store.stats("acme") == StoreStats(2, sum(data_bytes(e) for e in acme))
    assert await backend.store.stats("beta") == StoreStats(0, 0)


# --- end users (erasure), on both backends ----------------------------------------------------


async def indexed(backend: Backend, tenant: str, end_user_hash: str) -> set[str]:
    """The keys the store's end-user index holds for `end_user_hash` (without reading entries)."""
    store = backend.store
    if isinstance(store, MemoryStore):
        return set(store.end_user_keys(tenant, end_user_hash))
    members = await store._client.zrange(f"{store.prefix}eu:{end_user_hash}", 0, -1)
    return {m.decode() for m in members}


async def hashes(backend: Backend) -> dict[str, str]:
    return {
        "alice": await backend.store.end_user_digest("acme", "alice"),
        "bob": await backend.store.end_user_digest("acme", "bob"),
        "beta-alice": await backend.store.end_user_digest("beta", "alice"),
    }


async def test_the_end_user_hash_is_keyed_per_tenant_and_never_the_id(backend: Backend) -> None:
    h = await hashes(backend)
    assert len(set(h.values())) == 3  # per end user, and per tenant for the same id
    assert all(len(v) == 64 and int(v, 16) >= 0 and "alice" not in v for v in h.values())
    assert await backend.store.end_user_digest("acme", "alice") == h["alice"]  # stable
    configured = MemoryStore(1_000, end_user_key=b"k" * 32)
    assert await configured.end_user_digest("acme", "alice") == end_user_digest(b"k" * 32, "acme", "alice")
    assert await configured.end_user_digest("acme", "alice") != h["alice"]  # a key of its own
    with pytest.raises(ValueError, match="16 bytes"):
        MemoryStore(1_000, end_user_key=b"short")


async def test_an_end_users_entries_go_and_everyone_elses_stay(backend: Backend) -> None:
    h = await hashes(backend)
    alice = [
        backend.entry(key(i), model=m, end_user_hash=h["alice"]) for i, m in ((1, "m/one"), (2, "m/two"))
    ]
    bob = backend.entry(key(3), end_user_hash=h["bob"])
    nobody = backend.entry(key(4))
    other_tenant = backend.entry(key(5, "beta"), tenant="beta", end_user_hash=h["beta-alice"])
    entries = [*alice, bob, nobody, other_tenant]
    assert await backend.put(*entries) == [True] * 5
    got = await backend.store.get(alice[0].key)
    assert got is not None and got.end_user_hash == h["alice"]
    assert (await backend.store.get(nobody.key)) == dataclasses.replace(nobody, hits=1)

    # Narrowed by model: only that entry of hers goes.
    assert await backend.store.invalidate_end_user("acme", h["alice"], model="m/two") == [alice[1].key]
    assert sorted(await backend.store.invalidate_end_user("acme", h["alice"])) == [alice[0].key]
    assert await remaining(backend, entries) == {bob.key, nobody.key, other_tenant.key}
    assert await indexed(backend, "acme", h["alice"]) == set()
    assert await backend.store.stats("acme") == StoreStats(2, data_bytes(bob) + data_bytes(nobody))
    # Idempotent: nothing left to remove.
    assert await backend.store.invalidate_end_user("acme", h["alice"]) == []
    # Her hash within another tenant names nothing there; the tenant must match too.
    assert await backend.store.invalidate_end_user("acme", h["beta-alice"]) == []
    assert await backend.store.get(other_tenant.key) is not None
    assert await backend.store.invalidate_end_user("beta", h["bob"]) == []
    assert await backend.store.get(bob.key) is not None
    with pytest.raises(ValueError, match="tenant and the end user"):
        await backend.store.invalidate_end_user("", h["alice"])
    with pytest.raises(ValueError):
        await backend.store.invalidate_end_user("acme", "")


async def test_an_entry_stored_again_for_someone_else_is_theirs_only(backend: Backend) -> None:
    h = await hashes(backend)
    assert await backend.put(backend.entry(key(1), end_user_hash=h["alice"]))
    # Bob asks the same question: the entry (one key per question) is now his answer.
    assert await backend.put(backend.entry(key(1), end_user_hash=h["bob"]))
    assert await indexed(backend, "acme", h["alice"]) == set()
    assert await backend.store.invalidate_end_user("acme", h["alice"]) == []
    assert await backend.store.get(key(1)) is not None
    # And stored again with no end user, it is nobody's.
    assert await backend.put(backend.entry(key(1)))
    assert await indexed(backend, "acme", h["bob"]) == set()
    assert await backend.store.invalidate_end_user("acme", h["bob"]) == []
    assert await backend.store.get(key(1)) is not None


async def test_an_end_user_index_holds_no_more_than_their_live_entries(
    make_backend: Callable[[int], Backend],
) -> None:
    backend = make_backend(3 * FOOTPRINT)
    h = await hashes(backend)
    # Expired entries leave it.
    short = [backend.entry(key(i), end_user_hash=h["alice"], ttl_s=SHORT_TTL_S) for i in range(3)]
    assert await backend.put(*short) == [True] * 3
    assert await indexed(backend, "acme", h["alice"]) == {e.key for e in short}
    await backend.elapse(SHORT_TTL_S + 0.15)
    assert await backend.put(backend.entry(key(10), end_user_hash=h["alice"], cost=1))
    await backend.store.stats()
    assert await indexed(backend, "acme", h["alice"]) == {key(10)}
    # Evicted entries leave it: Bob's dearer answers push her cheap one out.
    bob = [backend.entry(key(20 + i), end_user_hash=h["bob"], cost=10**6) for i in range(3)]
    assert await backend.put(*bob) == [True] * 3
    assert await backend.store.get(key(10)) is None
    assert await indexed(backend, "acme", h["alice"]) == set()
    assert await indexed(backend, "acme", h["bob"]) == {e.key for e in bob}
    # Invalidated ones too, whichever filter removed them.
    assert await backend.store.invalidate(key_pattern=bob[0].key) == 1
    assert await indexed(backend, "acme", h["bob"]) == {bob[1].key, bob[2].key}
    # A long run of stores by one end user keeps the index at the live entries.
    for i in range(30):
        assert await backend.put(backend.entry(key(100 + i), end_user_hash=h["alice"], cost=10**7))
    await backend.store.stats()
    assert len(await indexed(backend, "acme", h["alice"])) == 3


async def test_an_end_users_entries_leave_l1_too(backend: Backend) -> None:
    h = await hashes(backend)
    l1 = LruCache(8, clock=backend.clock)
    tiered = TieredStore(l1, backend.store)
    hers = backend.entry(key(1), end_user_hash=h["alice"])
    his = backend.entry(key(2), end_user_hash=h["bob"])
    assert [await tiered.put(hers), await tiered.put(his)] == [True, True]
    # Served from L2 once (L1 refetches), then L1 holds it with its end user.
    l1.clear()
    assert await tiered.get(hers.key) is not None and await tiered.get(his.key) is not None
    held = l1.get(hers.key)
    assert held is not None and held.end_user_hash == h["alice"]

    assert await tiered.invalidate_end_user("acme", h["alice"]) == [hers.key]
    assert l1.get(hers.key) is None and await tiered.get(hers.key) is None
    assert l1.get(his.key) is not None
    assert await tiered.invalidate_end_user("acme", h["alice"]) == []
    assert await tiered.end_user_digest("acme", "alice") == h["alice"]


# --- Redis only -----------------------------------------------------------------------------


async def test_an_entry_is_a_hash_that_redis_expires_on_time(redis_client: Redis, prefix: str) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=1_000_000)
    now = time.time()
    entry = CacheEntry(key(1), "acme", "m/a", PAYLOAD, 77, now, now + 30.0)
    assert await store.put(entry)
    stored = await redis_client.hgetall(f"{prefix}e:{entry.key}")
    assert stored == {
        b"tenant": b"acme",
        b"model": b"m/a",
        b"payload": PAYLOAD,
        b"cost": b"77",
        b"stored_at": repr(now).encode(),
        b"expires_at": repr(now + 30.0).encode(),
        b"hits": b"0",
    }
    # The store rounds the expiry up to the next millisecond (math.ceil), so Redis may see 1 ms more.
    assert 29_000 < await redis_client.pttl(f"{prefix}e:{entry.key}") <= 30_001
    assert await store.get(entry.key) is not None
    assert await redis_client.hget(f"{prefix}e:{entry.key}", "hits") == b"1"
    assert await store.used_bytes() == footprint(entry)


async def test_an_admitted_entry_is_announced_with_its_expiry_and_a_refused_one_is_not(
    redis_client: Redis, prefix: str
) -> None:
    quiet = RedisStore(redis_client, prefix=prefix, max_bytes=1_000_000)
    now = time.time()
    assert await quiet.put(CacheEntry(key(1), "acme", "m/a", PAYLOAD, 77, now, now + 30.0))
    assert await redis_client.xlen(f"{prefix}present") == 0  # announce 0: nothing

    store = RedisStore(redis_client, prefix=prefix, max_bytes=footprint_of_one(), announce=100)
    entry = CacheEntry(key(2), "acme", "m/a", PAYLOAD, 77, now, now + 30.0)
    assert await store.put(entry)
    cheap = CacheEntry(key(3), "acme", "m/a", PAYLOAD, 0, now, now + 30.0)
    assert not await store.put(cheap)  # worth less than what it would evict
    announced = await redis_client.xrange(f"{prefix}present")
    assert [fields for _id, fields in announced] == [
        {b"b": announcement(entry.key, math.ceil(entry.expires_at * 1000))}
    ]


def footprint_of_one() -> int:
    """A bound that holds one entry of `PAYLOAD` under a short key, not two."""
    return footprint(CacheEntry(key(0), "acme", "m/a", PAYLOAD, 0, 0.0, 0.0)) + 10


async def test_an_end_users_index_is_a_sorted_set_that_outlives_their_entries(
    redis_client: Redis, prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=1_000_000)
    digest = await store.end_user_digest("acme", "alice")
    index = f"{prefix}eu:{digest}"
    now = time.time()
    short = CacheEntry(key(1), "acme", "m/a", PAYLOAD, 5, now, now + 30.0, end_user_hash=digest)
    long = CacheEntry(key(2), "acme", "m/a", PAYLOAD, 5, now, now + 90.0, end_user_hash=digest)
    assert await store.put(long) and await store.put(short)
    assert await redis_client.hget(f"{prefix}e:{short.key}", "end_user") == digest.encode()
    # Its TTL is the longest of its entries' (not shortened by a later, shorter one).
    assert 89_000 < await redis_client.pttl(index) <= 90_001  # expiry rounded up to the next ms
    assert await redis_client.zscore(index, short.key) == math.ceil(short.expires_at * 1000)
    # No clear id anywhere in the store.
    for name in await redis_client.keys(f"{prefix}*"):
        assert b"alice" not in name
        if await redis_client.type(name) == b"hash":
            assert all(b"alice" not in v for v in (await redis_client.hgetall(name)).values())

    # An entry Redis expired by itself (gone before the index noticed) is skipped, not counted.
    await redis_client.delete(f"{prefix}e:{long.key}")
    assert await store.invalidate_end_user("acme", digest) == [short.key]
    assert await redis_client.exists(index) == 0
    assert await store.stats() == StoreStats(0, 0)


async def test_replicas_hash_end_users_alike_with_the_key_they_share_or_the_configured_one(
    redis_url: str, prefix: str
) -> None:
    replicas = [
        RedisStore(open_redis(redis_url), prefix=prefix, max_bytes=1_000_000, owns_client=True)
        for _ in range(2)
    ]
    configured = RedisStore(
        open_redis(redis_url), prefix=prefix, max_bytes=1_000_000, owns_client=True, end_user_key=b"k" * 16
    )
    try:
        first = await replicas[0].end_user_digest("acme", "alice")
        assert await replicas[1].end_user_digest("acme", "alice") == first
        assert await configured.end_user_digest("acme", "alice") == end_user_digest(
            b"k" * 16, "acme", "alice"
        )
        now = time.time()
        entry = CacheEntry(key(1), "acme", "m/a", PAYLOAD, 5, now, now + 60, end_user_hash=first)
        assert await replicas[0].put(entry)
        assert await replicas[1].invalidate_end_user("acme", first) == [entry.key]
    finally:
        for store in (*replicas, configured):
            await store.close()


async def test_an_entry_is_not_served_past_its_expiry_even_if_its_ttl_was_lost(
    redis_client: Redis, prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=1_000_000)
    now = time.time()
    entry = CacheEntry(key(1), "acme", "m/a", PAYLOAD, 5, now, now + SHORT_TTL_S)
    assert await store.put(entry)
    assert await redis_client.persist(f"{prefix}e:{entry.key}")  # e.g. restored from a dump
    await asyncio.sleep(SHORT_TTL_S + 0.15)
    assert await store.get(entry.key) is None
    assert await redis_client.exists(f"{prefix}e:{entry.key}") == 0
    assert await store.used_bytes() == 0


async def test_replicas_sharing_a_prefix_share_entries_and_the_bound(redis_url: str, prefix: str) -> None:
    replicas = [
        RedisStore(open_redis(redis_url), prefix=prefix, max_bytes=3 * FOOTPRINT, owns_client=True)
        for _ in range(2)
    ]
    try:
        now = time.time()
        entries = [CacheEntry(key(i), "acme", "m/a", PAYLOAD, 100 + i, now, now + 60) for i in range(4)]
        assert [await replicas[i % 2].put(e) for i, e in enumerate(entries)] == [True] * 4
        # The bound is shared: the cheapest (the first) went, whoever stored it.
        assert await replicas[1].get(entries[0].key) is None
        got = await replicas[1].get(entries[2].key)
        assert got is not None and got.hits == 1
        again = await replicas[0].get(entries[2].key)
        assert again is not None and again.hits == 2
        assert await replicas[1].invalidate(key_pattern="t:acme:*") == 3
        assert await replicas[0].stats() == StoreStats(0, 0)
    finally:
        for replica in replicas:
            await replica.close()


async def test_stores_with_different_prefixes_do_not_see_each_other(redis_client: Redis) -> None:
    one = RedisStore(redis_client, prefix=f"test:{uuid.uuid4().hex}:", max_bytes=1_000_000)
    two = RedisStore(redis_client, prefix=f"test:{uuid.uuid4().hex}:", max_bytes=1_000_000)
    now = time.time()
    entry = CacheEntry(key(1), "acme", "m/a", PAYLOAD, 1, now, now + 60)
    assert await one.put(entry)
    assert await two.get(entry.key) is None
    assert await two.invalidate(tenant_id="acme") == 0
    assert await two.stats() == StoreStats(0, 0)
    assert await one.get(entry.key) is not None


async def test_the_byte_counter_is_corrected_for_entries_redis_expired(
    redis_client: Redis, prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=4 * FOOTPRINT)
    now = time.time()
    short = [CacheEntry(key(i), "acme", "m/a", PAYLOAD, 10**6, now, now + SHORT_TTL_S) for i in range(4)]
    assert [await store.put(e) for e in short] == [True] * 4
    await asyncio.sleep(SHORT_TTL_S + 0.15)
    # Redis dropped the hashes by itself; the counter still holds them until a script looks.
    assert await redis_client.exists(*(f"{prefix}e:{e.key}" for e in short)) == 0
    assert await store.used_bytes() == 4 * FOOTPRINT

    now = time.time()
    fresh = CacheEntry(key(10), "acme", "m/a", PAYLOAD, 1, now, now + 60)
    assert await store.put(fresh)  # cheap, yet admitted: the expired entries made room
    assert await store.used_bytes() == FOOTPRINT
    assert await redis_client.hlen(f"{prefix}meta") == 1
    assert await redis_client.zcard(f"{prefix}prio") == 1
    assert await redis_client.zcard(f"{prefix}idx:acme") == 1


async def test_entries_that_vanished_behind_the_stores_back_are_accounted_for(
    redis_client: Redis, prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=4 * FOOTPRINT)
    now = time.time()
    entries = [CacheEntry(key(i), "acme", "m/a", PAYLOAD, 100 + i, now, now + 60) for i in range(4)]
    assert [await store.put(e) for e in entries] == [True] * 4
    # As if Redis's own maxmemory policy had evicted two hashes.
    await redis_client.delete(f"{prefix}e:{entries[0].key}", f"{prefix}e:{entries[3].key}")

    assert await store.get(entries[3].key) is None  # found missing on read: its bytes are released
    assert await store.used_bytes() == 3 * FOOTPRINT
    # Eviction meets the other missing one first (lowest priority) and releases it too.
    newcomers = [CacheEntry(key(10 + i), "acme", "m/a", PAYLOAD, 1_000, now, now + 60) for i in range(2)]
    assert [await store.put(e) for e in newcomers] == [True, True]
    assert await store.used_bytes() == 4 * FOOTPRINT
    assert await store.stats("acme") == StoreStats(4, 4 * (FOOTPRINT - ENTRY_OVERHEAD_BYTES))
    assert await store.get(entries[1].key) is not None and await store.get(entries[2].key) is not None


async def test_a_drifted_counter_is_recounted_instead_of_refusing_forever(
    redis_client: Redis, prefix: str
) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=3 * FOOTPRINT)
    now = time.time()
    assert await store.put(CacheEntry(key(1), "acme", "m/a", PAYLOAD, 5, now, now + 60))
    await redis_client.incrby(f"{prefix}bytes", 10 * FOOTPRINT)  # a counter gone wrong
    assert await store.put(CacheEntry(key(2), "acme", "m/a", PAYLOAD, 5, now, now + 60))
    # Recounted, the second entry fitted without evicting the first.
    assert await store.used_bytes() == 2 * FOOTPRINT
    assert await store.get(key(1)) is not None and await store.get(key(2)) is not None


async def test_scripts_are_reloaded_after_a_script_flush(redis_client: Redis, prefix: str) -> None:
    store = RedisStore(redis_client, prefix=prefix, max_bytes=1_000_000)
    now = time.time()
    assert await store.put(CacheEntry(key(1), "acme", "m/a", PAYLOAD, 5, now, now + 60))
    await redis_client.script_flush()
    assert await store.get(key(1)) is not None
    await redis_client.script_flush()
    assert await store.invalidate(model="m/a") == 1
    await redis_client.script_flush()
    assert await store.stats() == StoreStats(0, 0)


async def test_a_tiered_store_over_redis_serves_repeats_from_l1(redis_url: str, prefix: str) -> None:
    l2 = RedisStore(open_redis(redis_url), prefix=prefix, max_bytes=1_000_000, owns_client=True)
    tiered = TieredStore(LruCache(8), l2)
    try:
        now = time.time()
        entry = CacheEntry(key(1), "acme", "m/a", PAYLOAD, 5, now, now + 60)
        assert await tiered.put(entry)
        assert (await tiered.get(entry.key)) is not None
        assert (await tiered.get(entry.key)) is not None
        # Both reads came from L1: Redis counted none.
        assert (await l2.get(entry.key)) == dataclasses.replace(entry, hits=1)
        assert await tiered.invalidate(tenant_id="acme") == 1
        assert await tiered.get(entry.key) is None
    finally:
        await tiered.close()


async def test_build_store_with_a_url_stores_in_redis(redis_url: str) -> None:
    store = build_store(redis_url, max_bytes=1_000_000, l1_entries=0)
    assert isinstance(store, RedisStore)
    try:
        now = time.time()
        entry = CacheEntry(f"t:build:{uuid.uuid4().hex}", "build", "m/a", PAYLOAD, 5, now, now + 60)
        assert await store.put(entry)
        assert await store.get(entry.key) is not None
        assert await store.invalidate(key_pattern=entry.key) == 1
    finally:
        await store.close()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("test", stream=stream)
    yield stream
    reset_logging()


async def test_an_unreachable_redis_is_unavailable_and_leaks_nothing(log_stream: io.StringIO) -> None:
    secret_key = "t:acme:m/a:5ec7e7"
    secret_payload = b"the confidential answer"
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", options=FAST)
    store = RedisStore(client, max_bytes=1_000_000, owns_client=True)
    now = time.time()
    entry = CacheEntry(secret_key, "acme", "m/a", secret_payload, 5, now, now + 60)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: store.get(secret_key),
        lambda: store.put(entry),
        lambda: store.invalidate(tenant_id="acme", key_pattern=secret_key),
        lambda: store.invalidate_end_user("acme", "0" * 64),
        lambda: store.end_user_digest("acme", "alice"),
        lambda: store.stats("acme"),
    ]
    try:
        for call in calls:
            with pytest.raises(SwitchyardError) as caught:
                await call()
            error = caught.value
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert error.reason == Reason.DEPENDENCY_UNAVAILABLE
            assert error.retry_after_s == 1.0
            assert secret_key not in error.message and "confidential" not in error.message
            assert error.__cause__ is None
        assert store.backend_failures == 6
    finally:
        await store.close()
    logs = log_stream.getvalue()
    assert secret_key not in logs and "confidential" not in logs
    events = [json.loads(line) for line in logs.splitlines() if line.strip()]
    failures = [e for e in events if e["event"] == "cache_store_failed"]
    assert [e["op"] for e in failures] == [
        "get",
        "put",
        "invalidate",
        "invalidate_end_user",
        "end_user_key",
        "stats",
    ]
    assert all(e["level"] == "warning" for e in failures)
