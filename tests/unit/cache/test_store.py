"""Cache storage tiers in one process: GDSF details of `MemoryStore`, the L1 `LruCache`,
`TieredStore` and `build_store`.

The contract shared with the Redis store (round trip, expiry, bounds, invalidation, stats) runs
on both backends in tests/integration/test_cache_store_redis.py; these cases pin what only
the memory structures show (exact priorities, inflation, eviction order, heap upkeep).
"""

from __future__ import annotations

import dataclasses

import pytest

from switchyard.cache.store import (
    ENTRY_OVERHEAD_BYTES,
    CacheEntry,
    CacheStore,
    LruCache,
    MemoryStore,
    RedisStore,
    StoreStats,
    TieredStore,
    build_store,
    data_bytes,
    footprint,
)

PAYLOAD = b"p" * 100


class SteppedClock:
    """Wall seconds that tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def key(i: int, tenant: str = "acme") -> str:
    return f"t:{tenant}:m/a:{i:04d}"


FOOTPRINT = len(key(0).encode()) + len(PAYLOAD) + ENTRY_OVERHEAD_BYTES


def make(
    clock: SteppedClock,
    i: int,
    *,
    cost: int = 1_000,
    ttl_s: float = 60.0,
    payload: bytes = PAYLOAD,
    tenant: str = "acme",
    model: str = "m/a",
) -> CacheEntry:
    return CacheEntry(key(i, tenant), tenant, model, payload, cost, clock.now, clock.now + ttl_s)


@pytest.fixture
def clock() -> SteppedClock:
    return SteppedClock()


def store_of(clock: SteppedClock, entries: int) -> MemoryStore:
    return MemoryStore(entries * FOOTPRINT, clock=clock)


async def held(store: CacheStore, keys: list[str]) -> list[str]:
    """The keys `store` serves (reading them: each counts a hit)."""
    return [k for k in keys if await store.get(k) is not None]


def present(store: MemoryStore, keys: list[str]) -> list[str]:
    """The keys `store` holds, without reading them (no hit counted)."""
    return [k for k in keys if store.priority(k) is not None]


# --- sizes ---------------------------------------------------------------------------------------


def test_footprint_is_utf8_key_and_payload_bytes_plus_the_overhead(clock: SteppedClock) -> None:
    entry = CacheEntry("t:é", "t", "m", b"12345", 1, clock.now, clock.now + 1)
    assert data_bytes(entry) == 4 + 5
    assert footprint(entry) == 9 + ENTRY_OVERHEAD_BYTES


def test_a_store_needs_a_positive_bound() -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryStore(0)


# --- GDSF ----------------------------------------------------------------------------------------


async def test_priority_is_inflation_plus_frequency_times_cost_per_byte(clock: SteppedClock) -> None:
    store = store_of(clock, 10)
    assert await store.put(make(clock, 1, cost=3_000))
    assert store.priority(key(1)) == 3_000 / FOOTPRINT
    await store.get(key(1))
    await store.get(key(1))
    assert store.priority(key(1)) == 3 * 3_000 / FOOTPRINT
    # A free answer still counts as one micro, so hits still rank it.
    assert await store.put(make(clock, 2, cost=0))
    assert store.priority(key(2)) == 1 / FOOTPRINT
    assert store.priority(key(3)) is None


async def test_a_put_entry_brings_its_hits_into_its_priority(clock: SteppedClock) -> None:
    store = store_of(clock, 10)
    assert await store.put(dataclasses.replace(make(clock, 1, cost=10), hits=4))
    assert store.priority(key(1)) == 5 * 10 / FOOTPRINT
    got = await store.get(key(1))
    assert got is not None and got.hits == 5


async def test_the_lowest_priority_goes_first_and_sets_the_inflation(clock: SteppedClock) -> None:
    store = store_of(clock, 3)
    assert [await store.put(make(clock, i, cost=c)) for i, c in enumerate([500, 100, 300])] == [True] * 3
    assert store.inflation == 0.0

    assert await store.put(make(clock, 3, cost=1_000))
    assert present(store, [key(i) for i in range(4)]) == [key(0), key(2), key(3)]
    assert store.inflation == 100 / FOOTPRINT
    assert store.evictions == 1
    # Later entries start from the inflation: the same cost now ranks higher than before.
    assert await store.put(make(clock, 4, cost=300))
    assert store.inflation == 300 / FOOTPRINT
    assert store.priority(key(4)) == 300 / FOOTPRINT + 300 / FOOTPRINT
    assert await held(store, [key(i) for i in range(5)]) == [key(0), key(3), key(4)]


async def test_a_larger_entry_of_the_same_cost_goes_first(clock: SteppedClock) -> None:
    store = MemoryStore(3 * FOOTPRINT + 200, clock=clock)
    big = make(clock, 1, cost=1_000, payload=b"b" * 300)
    small = make(clock, 2, cost=1_000)
    assert await store.put(big) and await store.put(small)
    assert await store.put(make(clock, 3, cost=1_000))
    assert await store.put(make(clock, 4, cost=1_000))
    assert await held(store, [key(1), key(2), key(3), key(4)]) == [key(2), key(3), key(4)]


async def test_aging_lets_a_stream_of_new_entries_outlast_a_once_valuable_one(clock: SteppedClock) -> None:
    store = store_of(clock, 2)
    assert await store.put(make(clock, 0, cost=10))  # worth 10 units, never read again
    # Each newcomer is worth 4 on top of the inflation, which climbs as entries are evicted.
    newcomers = [make(clock, i, cost=4) for i in range(1, 8)]
    assert all([await store.put(e) for e in newcomers])
    assert await store.get(key(0)) is None
    assert store.inflation >= 10 / FOOTPRINT


async def test_equal_priorities_evict_the_oldest_first(clock: SteppedClock) -> None:
    store = store_of(clock, 3)
    assert all([await store.put(make(clock, i, cost=7)) for i in range(3)])
    assert await store.put(make(clock, 3, cost=7))
    assert await held(store, [key(i) for i in range(4)]) == [key(1), key(2), key(3)]


async def test_admission_is_all_or_nothing(clock: SteppedClock) -> None:
    store = MemoryStore(2 * FOOTPRINT, clock=clock)
    assert await store.put(make(clock, 1, cost=10))
    assert await store.put(make(clock, 2, cost=10_000))
    # Needs both gone: the first is worth less than it, the second more. Nothing is evicted.
    double = make(clock, 3, cost=2_000, payload=b"d" * (FOOTPRINT + len(PAYLOAD)))
    assert footprint(double) == 2 * FOOTPRINT
    assert not await store.put(double)
    assert await held(store, [key(1), key(2), key(3)]) == [key(1), key(2)]
    assert store.evictions == 0 and store.inflation == 0.0
    # The heap was left whole: the cheap entry is still the first to go.
    assert await store.put(make(clock, 4, cost=50))
    assert await held(store, [key(1), key(2), key(4)]) == [key(2), key(4)]


async def test_a_refused_replacement_keeps_the_entry_it_would_replace(clock: SteppedClock) -> None:
    store = MemoryStore(2 * FOOTPRINT, clock=clock)
    assert await store.put(make(clock, 1, cost=10))
    assert await store.put(make(clock, 2, cost=10_000))
    bigger = make(clock, 1, cost=10, payload=b"x" * (FOOTPRINT + len(PAYLOAD)))
    assert not await store.put(bigger)
    got = await store.get(key(1))
    assert got is not None and got.payload == PAYLOAD
    assert store.used_bytes == 2 * FOOTPRINT


async def test_a_replacement_reuses_the_space_of_the_entry_it_replaces(clock: SteppedClock) -> None:
    store = store_of(clock, 2)
    assert await store.put(make(clock, 1, cost=10_000))
    assert await store.put(make(clock, 2, cost=10_000))
    # A full store, a cheap replacement of the same size: nothing else has to go.
    assert await store.put(make(clock, 1, cost=1, payload=b"q" * len(PAYLOAD)))
    assert store.evictions == 0
    assert await held(store, [key(1), key(2)]) == [key(1), key(2)]
    assert (await store.stats()).entries == 2


async def test_expired_entries_are_dropped_before_anything_is_evicted(clock: SteppedClock) -> None:
    store = store_of(clock, 3)
    assert await store.put(make(clock, 1, cost=10**6, ttl_s=5))
    assert await store.put(make(clock, 2, cost=1))
    assert await store.put(make(clock, 3, cost=1))
    clock.now += 5  # expiry is inclusive: at expires_at the entry is gone
    assert await store.put(make(clock, 4, cost=1))
    assert store.evictions == 0 and store.inflation == 0.0
    assert await held(store, [key(i) for i in range(1, 5)]) == [key(2), key(3), key(4)]


async def test_an_expired_entry_is_dropped_when_read(clock: SteppedClock) -> None:
    store = store_of(clock, 3)
    assert await store.put(make(clock, 1, ttl_s=1))
    clock.now += 0.999
    assert await store.get(key(1)) is not None
    clock.now += 0.001
    assert await store.get(key(1)) is None
    assert store.used_bytes == 0


async def test_the_priority_heap_does_not_grow_with_reads(clock: SteppedClock) -> None:
    store = store_of(clock, 5)
    assert all([await store.put(make(clock, i, cost=100)) for i in range(5)])
    for _ in range(1_000):
        await store.get(key(4))
    assert len(store._by_priority) <= 2 * 5 + 64 + 1
    # Order is intact after compaction: the much-read entry survives, the oldest goes.
    assert await store.put(make(clock, 5, cost=100))
    assert await held(store, [key(0), key(4), key(5)]) == [key(4), key(5)]


async def test_many_replacements_keep_the_expiry_heap_bounded(clock: SteppedClock) -> None:
    store = store_of(clock, 5)
    for n in range(500):
        assert await store.put(make(clock, n % 3, cost=n + 1))
    assert len(store._by_expiry) <= 2 * 3 + 64 + 1
    assert (await store.stats()).entries == 3


async def test_close_forgets_everything(clock: SteppedClock) -> None:
    store = store_of(clock, 5)
    assert await store.put(make(clock, 1))
    await store.close()
    assert await store.get(key(1)) is None
    assert await store.stats() == StoreStats(0, 0) and store.used_bytes == 0


# --- L1 ------------------------------------------------------------------------------------------


def test_lru_drops_the_least_recently_used(clock: SteppedClock) -> None:
    l1 = LruCache(2, clock=clock)
    l1.put(make(clock, 1))
    l1.put(make(clock, 2))
    assert l1.get(key(1)) is not None  # now 2 is the least recently used
    l1.put(make(clock, 3))
    assert [k for k in (key(1), key(2), key(3)) if l1.get(k) is not None] == [key(1), key(3)]
    assert len(l1) == 2


def test_lru_replacing_an_entry_refreshes_it(clock: SteppedClock) -> None:
    l1 = LruCache(2, clock=clock)
    l1.put(make(clock, 1))
    l1.put(make(clock, 2))
    l1.put(make(clock, 1, payload=b"new"))
    l1.put(make(clock, 3))
    got = l1.get(key(1))
    assert got is not None and got.payload == b"new"
    assert l1.get(key(2)) is None


def test_lru_counts_hits_on_its_copy(clock: SteppedClock) -> None:
    l1 = LruCache(2, clock=clock)
    l1.put(dataclasses.replace(make(clock, 1), hits=3))
    assert [getattr(l1.get(key(1)), "hits", None) for _ in range(2)] == [4, 5]


def test_lru_never_serves_past_expiry_or_max_age(clock: SteppedClock) -> None:
    l1 = LruCache(4, max_age_s=10.0, clock=clock)
    l1.put(make(clock, 1, ttl_s=3))
    l1.put(make(clock, 2, ttl_s=60))
    clock.now += 3
    assert l1.get(key(1)) is None
    assert l1.get(key(2)) is not None
    clock.now += 7  # 10 s after it was put: stale even though it lives on in L2
    assert l1.get(key(2)) is None
    assert len(l1) == 0
    l1.put(make(clock, 3, ttl_s=-1))
    assert len(l1) == 0


def test_lru_of_no_entries_holds_nothing(clock: SteppedClock) -> None:
    l1 = LruCache(0, clock=clock)
    l1.put(make(clock, 1))
    assert l1.get(key(1)) is None and len(l1) == 0


def test_lru_invalidates_by_every_filter(clock: SteppedClock) -> None:
    l1 = LruCache(10, clock=clock)
    for i, (tenant, model) in enumerate([("acme", "m/a"), ("acme", "m/b"), ("beta", "m/a"), ("beta", "m/b")]):
        l1.put(make(clock, i, tenant=tenant, model=model))
    assert l1.invalidate(tenant_id="acme", model="m/b") == 1
    assert l1.invalidate(key_pattern="t:beta:*") == 2
    assert l1.invalidate(model="m/a") == 1
    assert len(l1) == 0
    with pytest.raises(ValueError):
        l1.invalidate()


# --- tiers ---------------------------------------------------------------------------------------


class CountingStore(MemoryStore):
    """A memory L2 that counts the reads reaching it."""

    def __init__(self, max_bytes: int, clock: SteppedClock) -> None:
        super().__init__(max_bytes, clock=clock)
        self.reads = 0
        self.closed = False

    async def get(self, key: str) -> CacheEntry | None:
        self.reads += 1
        return await super().get(key)

    async def close(self) -> None:
        self.closed = True
        await super().close()


async def test_an_l2_hit_is_promoted_to_l1(clock: SteppedClock) -> None:
    l2 = CountingStore(10 * FOOTPRINT, clock)
    assert await l2.put(make(clock, 1))
    tiered = TieredStore(LruCache(4, clock=clock), l2)
    first = await tiered.get(key(1))
    assert first is not None and first.hits == 1
    second = await tiered.get(key(1))
    assert second is not None and second.hits == 2
    assert l2.reads == 1
    assert await tiered.get(key(2)) is None
    assert l2.reads == 2


async def test_put_writes_l2_then_l1(clock: SteppedClock) -> None:
    l2 = CountingStore(10 * FOOTPRINT, clock)
    tiered = TieredStore(LruCache(4, clock=clock), l2)
    assert await tiered.put(make(clock, 1))
    assert await l2.stats() == StoreStats(1, data_bytes(make(clock, 1)))
    assert await tiered.get(key(1)) is not None
    assert l2.reads == 0


async def test_an_entry_l2_refuses_is_not_kept_in_l1(clock: SteppedClock) -> None:
    l2 = CountingStore(FOOTPRINT, clock)
    l1 = LruCache(4, clock=clock)
    tiered = TieredStore(l1, l2)
    assert await tiered.put(make(clock, 1, cost=10_000))
    assert not await tiered.put(make(clock, 2, cost=1))
    assert len(l1) == 1
    # A refused replacement also drops the L1 copy; L2 still serves the entry it kept.
    l1.put(make(clock, 1, payload=b"l1 copy"))
    assert not await tiered.put(make(clock, 1, payload=b"x" * (2 * FOOTPRINT)))
    got = await tiered.get(key(1))
    assert got is not None and got.payload == PAYLOAD
    assert l2.reads == 1


async def test_invalidate_reaches_both_tiers_and_stats_come_from_l2(clock: SteppedClock) -> None:
    l2 = CountingStore(10 * FOOTPRINT, clock)
    l1 = LruCache(4, clock=clock)
    tiered = TieredStore(l1, l2)
    for i, tenant in enumerate(["acme", "acme", "beta"]):
        assert await tiered.put(make(clock, i, tenant=tenant))
    assert len(l1) == 3
    assert await tiered.stats("acme") == StoreStats(2, 2 * (FOOTPRINT - ENTRY_OVERHEAD_BYTES))
    assert await tiered.invalidate(tenant_id="acme") == 2
    assert len(l1) == 1
    assert await tiered.get(key(0)) is None and await tiered.get(key(1)) is None
    assert await tiered.stats() == StoreStats(1, FOOTPRINT - ENTRY_OVERHEAD_BYTES)
    with pytest.raises(ValueError):
        await tiered.invalidate()
    assert len(l1) == 1
    await tiered.close()
    assert l2.closed and len(l1) == 0


# --- build_store ---------------------------------------------------------------------------------


async def test_build_store_without_redis_is_one_memory_store() -> None:
    store = build_store(None, max_bytes=1234, l1_entries=100)
    assert isinstance(store, MemoryStore) and store.max_bytes == 1234
    assert isinstance(build_store("", max_bytes=1, l1_entries=0), MemoryStore)


async def test_build_store_with_redis_puts_l1_in_front_and_connects_lazily() -> None:
    store = build_store("redis://127.0.0.1:1/0", max_bytes=4096, l1_entries=50)
    assert isinstance(store, TieredStore)
    assert isinstance(store.l2, RedisStore) and store.l2.max_bytes == 4096
    assert store.l1.max_entries == 50
    await store.close()
    bare = build_store("redis://127.0.0.1:1/0", max_bytes=4096, l1_entries=0)
    assert isinstance(bare, RedisStore)
    await bare.close()
