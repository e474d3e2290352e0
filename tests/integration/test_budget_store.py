"""Budget store contract: the same cases against the in-memory backend and a real Redis.

Time is the caller's `now_ms` in both backends, so expiry is tested by moving it, without
sleeping. Every Redis case gets its own key prefix. The Redis-only cases at the end cover
what only a shared store has: several clients at once, key TTLs, NOSCRIPT, an outage.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from fractions import Fraction

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from switchyard.common.ports import free_port
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.ledger.budgets import (
    MIN_KEY_TTL_MS,
    SETTLED_RETENTION_MS,
    BudgetRef,
    BudgetStore,
    BudgetStoreUnavailable,
    Counter,
    CountersLost,
    HoldConflict,
    MemoryBudgetStore,
    RebuildClaim,
    build_budget_store,
)
from switchyard.ledger.budgets_redis import RedisBudgetStore

NOW = 1_790_000_000_000  # wall-clock ms, late 2026
DAY = 24 * 3600 * 1000
TTL = 60_000


def ref(
    budget_id: str = "tenant:acme:monthly",
    window: str = "2026-11",
    *,
    limit: int = 1000,
    hard: bool = True,
    expires_in_ms: int = 40 * DAY,
) -> BudgetRef:
    return BudgetRef(budget_id, window, limit, hard, NOW + expires_in_ms)


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    client = open_redis(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# Synchronous so that it may pull the (async) Redis fixtures only for the Redis case.
@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[BudgetStore]:
    if request.param == "memory":
        yield MemoryBudgetStore()
        return
    client: Redis = request.getfixturevalue("redis_client")
    prefix = f"test:{uuid.uuid4().hex}:budget:"
    rebuilt(request.getfixturevalue("redis_url"), prefix)
    yield RedisBudgetStore(client, prefix=prefix)


def rebuilt(redis_url: str, prefix: str, epoch: str = "e0") -> None:
    """Mark the store under `prefix` as a ledger leaves it after rebuilding its counters in
    `epoch` (a fresh store holds nothing until then: see the rebuild tests); synchronous, for
    the synchronous fixture."""
    with SyncRedis.from_url(redis_url) as sync:
        sync.set(prefix + "e", epoch, px=DAY)
        sync.set(prefix + "ready", epoch, px=DAY)


async def rebuild(store: BudgetStore) -> str:
    """What the ledger does with a fresh store before it serves: claim, (nothing to add), mark."""
    claim = await store.claim_rebuild()
    assert claim is not None
    await store.mark_rebuilt(claim)
    return claim.epoch


async def counter(store: BudgetStore, budget: BudgetRef, now_ms: int = NOW) -> Counter:
    return await store.counter(budget, now_ms=now_ms)


# --- reservations ---------------------------------------------------------------------------


async def test_reserve_holds_within_a_hard_limit_and_refuses_beyond_it(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    first = await store.reserve("r1", [budget], 600, ttl_ms=TTL, now_ms=NOW)
    assert first.ok and first.hold_id == "r1" and first.expires_at_ms == NOW + TTL
    assert (await store.reserve("r2", [budget], 400, ttl_ms=TTL, now_ms=NOW)).ok
    assert await counter(store, budget) == Counter(0, 1000)

    refused = await store.reserve("r3", [budget], 1, ttl_ms=TTL, now_ms=NOW)
    assert not refused.ok and refused.hold_id == "r3" and refused.expires_at_ms == 0
    assert refused.refused == budget
    assert (refused.spent_micros, refused.held_micros, refused.requested_micros) == (0, 1000, 1)
    assert await counter(store, budget) == Counter(0, 1000)
    assert not await store.release("r3", now_ms=NOW)


async def test_a_soft_budget_holds_beyond_its_limit_without_refusing(store: BudgetStore) -> None:
    soft = ref("tenant:acme:soft", limit=100, hard=False)
    assert (await store.reserve("r1", [soft], 150, ttl_ms=TTL, now_ms=NOW)).ok
    assert (await store.reserve("r2", [soft], 150, ttl_ms=TTL, now_ms=NOW)).ok
    assert await counter(store, soft) == Counter(0, 300)


async def test_reserve_is_all_or_nothing_across_budgets(store: BudgetStore) -> None:
    tenant, user = ref("tenant:acme", limit=1000), ref("user:bob", limit=100)
    await store.add_spent(user, 30, now_ms=NOW)
    refused = await store.reserve("r1", [tenant, user], 200, ttl_ms=TTL, now_ms=NOW)
    assert not refused.ok and refused.refused == user
    assert (refused.spent_micros, refused.held_micros, refused.requested_micros) == (30, 0, 200)
    assert await counter(store, tenant) == Counter(0, 0)  # the first budget was not held either

    # A soft budget over its limit neither refuses nor stops the hard ones from holding.
    soft = ref("tenant:acme:soft", limit=10, hard=False)
    ok = await store.reserve("r2", [soft, tenant, user], 70, ttl_ms=TTL, now_ms=NOW)
    assert ok.ok
    assert [await counter(store, b) for b in (soft, tenant, user)] == [
        Counter(0, 70),
        Counter(0, 70),
        Counter(30, 70),
    ]


async def test_the_same_reservation_id_never_holds_twice(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    first = await store.reserve("r1", [budget], 300, ttl_ms=TTL, now_ms=NOW)
    again = await store.reserve("r1", [budget], 300, ttl_ms=TTL, now_ms=NOW + 5)
    assert again.ok and again.expires_at_ms == first.expires_at_ms
    assert await counter(store, budget) == Counter(0, 300)
    # The same budget named twice is held once.
    assert (await store.reserve("r2", [budget, budget], 100, ttl_ms=TTL, now_ms=NOW)).ok
    assert await counter(store, budget) == Counter(0, 400)
    with pytest.raises(HoldConflict):
        await store.lease("r1", budget, 10, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    # A retry must ask for what it asked before: another amount, or other budgets, is refused
    # (else a smaller first hold would cover a larger request).
    other = ref("tenant:other", limit=1000)
    for amount, budgets in ((900, [budget]), (300, [other]), (300, [budget, other])):
        with pytest.raises(HoldConflict):
            await store.reserve("r1", budgets, amount, ttl_ms=TTL, now_ms=NOW + 5)
    # The same budgets in another window (a retry across midnight) are the same budgets.
    assert (await store.reserve("r1", [ref(window="2026-12")], 300, ttl_ms=TTL, now_ms=NOW + 5)).ok
    assert await counter(store, budget) == Counter(0, 400)
    # A hold on one budget in two windows is not a hold on that budget once.
    november, december = ref("tenant:w", window="2026-11"), ref("tenant:w", window="2026-12")
    assert (await store.reserve("r4", [november, december], 10, ttl_ms=TTL, now_ms=NOW)).ok
    with pytest.raises(HoldConflict):
        await store.reserve("r4", [november], 10, ttl_ms=TTL, now_ms=NOW)
    # Ids of more bytes than characters are told apart as well.
    first_, second_ = ref("éé:x", limit=1000), ref("éé:y", limit=1000)
    assert (await store.reserve("r3", [first_], 10, ttl_ms=TTL, now_ms=NOW)).ok
    assert (await store.reserve("r3", [first_], 10, ttl_ms=TTL, now_ms=NOW)).ok
    with pytest.raises(HoldConflict):
        await store.reserve("r3", [second_], 10, ttl_ms=TTL, now_ms=NOW)


# --- settlement -----------------------------------------------------------------------------


async def test_settle_charges_once_and_frees_the_reservation(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.reserve("r1", [budget], 300, ttl_ms=TTL, now_ms=NOW)
    settled = await store.settle("req-1", 120, [budget], reservation_id="r1", now_ms=NOW)
    assert not settled.duplicate and settled.charged_micros == 120
    assert await counter(store, budget) == Counter(120, 0)
    assert not await store.release("r1", now_ms=NOW)  # the reservation is gone

    again = await store.settle("req-1", 999, [budget], reservation_id="r1", now_ms=NOW + 1000)
    assert again.duplicate and again.charged_micros == 120
    assert await counter(store, budget) == Counter(120, 0)


async def test_settle_records_the_truth_when_the_cost_exceeds_the_hold(store: BudgetStore) -> None:
    budget = ref(limit=150)
    await store.reserve("r1", [budget], 100, ttl_ms=TTL, now_ms=NOW)
    await store.reserve("r2", [budget], 50, ttl_ms=TTL, now_ms=NOW)
    await store.settle("req-1", 400, [budget], reservation_id="r1", now_ms=NOW)
    assert await counter(store, budget) == Counter(400, 50)  # all of r1 freed, r2 still held
    refused = await store.reserve("r3", [budget], 1, ttl_ms=TTL, now_ms=NOW)
    assert not refused.ok and refused.spent_micros == 400


async def test_settle_charges_every_budget_given_and_ignores_unknown_holds(store: BudgetStore) -> None:
    tenant, model = ref("tenant:acme"), ref("model:acme:gpt", hard=False)
    await store.reserve("r1", [tenant], 100, ttl_ms=TTL, now_ms=NOW)
    settled = await store.settle(
        "req-1", 80, [tenant, model], reservation_id="r1", lease_ids=["no-such-lease"], now_ms=NOW
    )
    assert not settled.duplicate
    assert await counter(store, tenant) == Counter(80, 0)
    assert await counter(store, model) == Counter(80, 0)

    orphan = await store.settle("req-2", 5, [tenant], reservation_id="gone", now_ms=NOW)
    assert not orphan.duplicate and await counter(store, tenant) == Counter(85, 0)
    # A lease id named as the reservation is not removed by it.
    await store.lease("l1", tenant, 100, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    await store.settle("req-3", 5, [tenant], reservation_id="l1", now_ms=NOW)
    assert await counter(store, tenant) == Counter(90, 100)


# --- leases ---------------------------------------------------------------------------------


async def test_a_lease_grants_what_is_left_when_less_than_wanted(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.add_spent(budget, 900, now_ms=NOW)
    grant = await store.lease("l1", budget, 500, min_micros=10, ttl_ms=TTL, now_ms=NOW)
    assert grant.lease_id == "l1" and grant.granted_micros == 100
    assert grant.expires_at_ms == NOW + TTL and grant.counter == Counter(900, 100)
    # Asking again for the same lease returns it and holds nothing more.
    again = await store.lease("l1", budget, 500, min_micros=10, ttl_ms=TTL, now_ms=NOW + 1)
    assert (again.granted_micros, again.expires_at_ms) == (100, NOW + TTL)
    assert await counter(store, budget) == Counter(900, 100)
    with pytest.raises(HoldConflict):
        await store.reserve("l1", [budget], 1, ttl_ms=TTL, now_ms=NOW)


async def test_a_lease_below_min_micros_grants_nothing(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.reserve("r1", [budget], 950, ttl_ms=TTL, now_ms=NOW)
    grant = await store.lease("l1", budget, 500, min_micros=100, ttl_ms=TTL, now_ms=NOW)
    assert (grant.granted_micros, grant.expires_at_ms) == (0, 0)
    assert grant.counter == Counter(0, 950)
    assert not await store.release("l1", now_ms=NOW)  # no lease was created
    assert (await store.lease("l2", budget, 500, min_micros=50, ttl_ms=TTL, now_ms=NOW)).granted_micros == 50
    assert (await store.lease("l3", budget, 500, min_micros=0, ttl_ms=TTL, now_ms=NOW)).granted_micros == 0


async def test_max_share_caps_a_lease_at_a_share_of_what_is_left(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    quarter = await store.lease(
        "l1", budget, 900, min_micros=1, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(1, 4)
    )
    assert quarter.granted_micros == 250
    # A third of the 750 left, rounded down; a small ask is granted whole.
    third = await store.lease(
        "l2", budget, 900, min_micros=1, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(1, 3)
    )
    assert third.granted_micros == 250 and third.counter == Counter(0, 500)
    small = await store.lease("l3", budget, 7, min_micros=1, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(1, 3))
    assert small.granted_micros == 7
    odd = await store.lease("l4", budget, 900, min_micros=1, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(2, 7))
    assert odd.granted_micros == (1000 - 507) * 2 // 7


async def test_the_share_never_refuses_the_last_request_and_grants_whole_requests(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    # 40 per request: half of 1000 is 500, granted as 12 whole requests (480).
    first = await store.lease(
        "l1", budget, 900, min_micros=40, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(1, 2)
    )
    assert first.granted_micros == 480
    # 520 left: half is 260, so 6 requests (240); then 280 left -> 3 (120); 160 -> 2 (80); 80 -> 1.
    grants = [
        (
            await store.lease(
                f"l{i}", budget, 900, min_micros=40, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(1, 2)
            )
        ).granted_micros
        for i in range(2, 7)
    ]
    assert grants == [240, 120, 80, 40, 40]  # the last 40 is granted although half of it is 20
    assert (await store.counter(budget, now_ms=NOW)) == Counter(0, 1000)
    last = await store.lease(
        "l7", budget, 900, min_micros=40, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(1, 2)
    )
    assert last.granted_micros == 0


async def test_a_soft_lease_grants_what_is_wanted(store: BudgetStore) -> None:
    soft = ref(limit=100, hard=False)
    await store.add_spent(soft, 500, now_ms=NOW)
    grant = await store.lease("l1", soft, 300, min_micros=10, ttl_ms=TTL, now_ms=NOW)
    assert grant.granted_micros == 300 and grant.counter == Counter(500, 300)


async def test_settle_draws_leases_down_and_a_drained_lease_ends(store: BudgetStore) -> None:
    tenant, user = ref("tenant:acme", limit=10_000), ref("user:bob", limit=1000)
    await store.lease("lt", tenant, 500, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    await store.lease("lu", user, 200, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    await store.settle("req-1", 120, [tenant, user], lease_ids=["lt", "lu", "lt"], now_ms=NOW)
    assert await counter(store, tenant) == Counter(120, 380)
    assert await counter(store, user) == Counter(120, 80)

    # The user lease has only 80 left: that is all it gives; the spend is the truth.
    await store.settle("req-2", 100, [tenant, user], lease_ids=["lt", "lu"], now_ms=NOW)
    assert await counter(store, tenant) == Counter(220, 280)
    assert await counter(store, user) == Counter(220, 0)
    assert await store.return_lease("lu", 50, now_ms=NOW) == 0  # drained: the lease ended
    assert await store.return_lease("lt", 1000, now_ms=NOW) == 280
    assert await counter(store, tenant) == Counter(220, 0)


async def test_return_lease_gives_back_at_most_what_is_left(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.lease("l1", budget, 500, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    assert await store.return_lease("l1", 200, now_ms=NOW) == 200
    assert await counter(store, budget) == Counter(0, 300)
    assert await store.return_lease("l1", 1000, now_ms=NOW) == 300
    assert await counter(store, budget) == Counter(0, 0)
    assert await store.return_lease("l1", 1, now_ms=NOW) == 0
    assert await store.return_lease("never", 1, now_ms=NOW) == 0
    await store.reserve("r1", [budget], 100, ttl_ms=TTL, now_ms=NOW)
    assert await store.return_lease("r1", 100, now_ms=NOW) == 0  # a reservation is not a lease
    assert await counter(store, budget) == Counter(0, 100)


async def test_release_frees_a_reservation_or_the_rest_of_a_lease(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.reserve("r1", [budget], 300, ttl_ms=TTL, now_ms=NOW)
    await store.lease("l1", budget, 400, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    await store.settle("req-1", 100, [budget], lease_ids=["l1"], now_ms=NOW)
    assert await counter(store, budget) == Counter(100, 600)
    assert await store.release("r1", now_ms=NOW)
    assert await store.release("l1", now_ms=NOW)
    assert await counter(store, budget) == Counter(100, 0)
    assert not await store.release("r1", now_ms=NOW)
    assert not await store.release("l1", now_ms=NOW)
    assert not await store.release("never", now_ms=NOW)


# --- expiry ---------------------------------------------------------------------------------


async def test_expire_frees_holds_whose_ttl_passed(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.reserve("r1", [budget], 300, ttl_ms=1000, now_ms=NOW)
    await store.lease("l1", budget, 200, min_micros=0, ttl_ms=2000, now_ms=NOW)
    assert await store.expire(now_ms=NOW + 999) == 0
    assert await counter(store, budget, NOW + 999) == Counter(0, 500)
    assert await store.expire(now_ms=NOW + 1000) == 1
    assert await counter(store, budget, NOW + 1000) == Counter(0, 200)
    assert await store.expire(now_ms=NOW + 5000) == 1
    assert await counter(store, budget, NOW + 5000) == Counter(0, 0)
    assert await store.expire(now_ms=NOW + 5000) == 0
    assert not await store.release("r1", now_ms=NOW + 5000)


async def test_expire_is_bounded_by_its_limit_oldest_first(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    for i in range(5):
        await store.reserve(f"r{i}", [budget], 10, ttl_ms=100 + i, now_ms=NOW)
    await store.reserve("live", [budget], 10, ttl_ms=TTL, now_ms=NOW)
    assert await store.expire(now_ms=NOW + 200, limit=2) == 2
    # r0 and r1 are freed; the other three wait for the next call.
    assert await counter(store, ref("unrelated"), NOW + 200) == Counter(0, 0)
    assert await store.expire(now_ms=NOW + 200) == 3
    assert await store.expire(now_ms=NOW + 200) == 0
    assert await counter(store, budget, NOW + 200) == Counter(0, 10)


async def test_an_expired_hold_is_freed_lazily_by_the_next_reserve_or_lease(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    assert (await store.reserve("crashed", [budget], 1000, ttl_ms=1000, now_ms=NOW)).ok
    assert not (await store.reserve("r1", [budget], 1, ttl_ms=TTL, now_ms=NOW + 999)).ok
    # Nobody calls expire(): the next reserve frees the crashed holder's hold itself.
    assert (await store.reserve("r2", [budget], 600, ttl_ms=1000, now_ms=NOW + 1000)).ok
    assert await counter(store, budget, NOW + 1000) == Counter(0, 600)
    grant = await store.lease("l1", budget, 1000, min_micros=0, ttl_ms=TTL, now_ms=NOW + 2000)
    assert grant.granted_micros == 1000 and grant.counter == Counter(0, 1000)
    # Holds named after they expired are ignored (freed once), and the spend is still recorded.
    settled = await store.settle("req-1", 40, [budget], reservation_id="r2", now_ms=NOW + 2000)
    assert not settled.duplicate and await counter(store, budget, NOW + 2000) == Counter(40, 1000)
    other = ref("other")
    await store.reserve("r3", [other], 5, ttl_ms=10, now_ms=NOW)
    await store.settle("req-2", 5, [other], reservation_id="r3", now_ms=NOW + 2000)
    assert await counter(store, other, NOW + 2000) == Counter(5, 0)
    assert await store.return_lease("l1", 10, now_ms=NOW + 2000 + TTL) == 0
    assert await counter(store, budget, NOW + 2000 + TTL) == Counter(40, 0)


async def test_a_commit_draws_down_an_expired_lease_and_a_new_caller_keeps_expired_holds(
    store: BudgetStore,
) -> None:
    budget = ref(limit=1000)
    await store.lease("l1", budget, 600, min_micros=1, ttl_ms=1000, now_ms=NOW)
    # A caller that has just started frees no expired hold until its grace is over...
    store.keep_expired_holds(until_ms=NOW + 10_000)
    assert await store.expire(now_ms=NOW + 5000) == 0
    assert (await store.reserve("r1", [budget], 400, ttl_ms=TTL, now_ms=NOW + 5000)).ok
    assert not (await store.reserve("r2", [budget], 1, ttl_ms=TTL, now_ms=NOW + 5000)).ok
    # ...and a late commit on the expired lease draws it down, as a live one.
    await store.settle("req-1", 250, [budget], lease_ids=["l1"], now_ms=NOW + 5000)
    assert await counter(store, budget, NOW + 5000) == Counter(250, 750)
    await store.settle("req-2", 100, [budget], lease_ids=["l1"], now_ms=NOW + 6000)
    assert await counter(store, budget, NOW + 6000) == Counter(350, 650)
    # Past the grace, what is left of it is freed (lazily here).
    assert await counter(store, budget, NOW + 10_000) == Counter(350, 400)
    assert await store.expire(now_ms=NOW + 10_000) == 0


async def test_when_the_named_holds_hold_a_budget_in_two_windows_the_first_named_decides(
    store: BudgetStore,
) -> None:
    november, december = ref(window="2026-11"), ref(window="2026-12")
    await store.reserve("r1", [november], 10, ttl_ms=TTL, now_ms=NOW)
    await store.lease("l1", december, 100, min_micros=1, ttl_ms=TTL, now_ms=NOW)
    await store.lease("l2", november, 100, min_micros=1, ttl_ms=TTL, now_ms=NOW)
    first = await store.settle("req-1", 5, [december], reservation_id="r1", lease_ids=["l1"], now_ms=NOW)
    assert first.windows == {december.budget_id: "2026-11"}
    assert await counter(store, november) == Counter(5, 100)
    assert await counter(store, december) == Counter(0, 95)
    second = await store.settle("req-2", 7, [december], lease_ids=["l2", "l1"], now_ms=NOW)
    assert second.windows == {december.budget_id: "2026-11"}
    assert await counter(store, november) == Counter(12, 93)
    assert await counter(store, december) == Counter(0, 88)
    # Held in its own window, or not held at all: charged there.
    other = ref("tenant:other", window="2026-12")
    third = await store.settle("req-3", 1, [december, other], lease_ids=["l1"], now_ms=NOW)
    assert third.windows == {december.budget_id: "2026-12", other.budget_id: "2026-12"}
    assert (await store.settle("req-3", 1, [december], now_ms=NOW)).windows == {}  # a duplicate


async def test_a_reservation_id_can_be_reused_once_its_hold_expired(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.reserve("r1", [budget], 300, ttl_ms=1000, now_ms=NOW)
    again = await store.reserve("r1", [budget], 200, ttl_ms=1000, now_ms=NOW + 1000)
    assert again.ok and again.expires_at_ms == NOW + 2000
    assert await counter(store, budget, NOW + 1000) == Counter(0, 200)


# --- windows and reconciliation -------------------------------------------------------------


async def test_two_windows_of_one_budget_are_independent(store: BudgetStore) -> None:
    november, december = ref(window="2026-11", limit=100), ref(window="2026-12", limit=100)
    assert (await store.reserve("r1", [november], 100, ttl_ms=TTL, now_ms=NOW)).ok
    assert not (await store.reserve("r2", [november], 1, ttl_ms=TTL, now_ms=NOW)).ok
    assert (await store.reserve("r3", [december], 100, ttl_ms=TTL, now_ms=NOW)).ok
    await store.settle("req-1", 60, [november], reservation_id="r1", now_ms=NOW)
    assert await counter(store, november) == Counter(60, 0)
    assert await counter(store, december) == Counter(0, 100)
    # Ids that would collide if keys were naively joined stay apart.
    a, b = ref("x:y", window="z", limit=5), ref("x", window="y:z", limit=5)
    await store.add_spent(a, 5, now_ms=NOW)
    assert await counter(store, b) == Counter(0, 0)


async def test_a_request_is_charged_in_the_window_its_hold_was_taken_in(store: BudgetStore) -> None:
    """Admitted before midnight on the day's lease (or reservation), finished after it: the day
    that admitted it is charged, so the new day's counter, leased whole by other edges, never
    passes its limit. A budget no named hold covers is charged in the window it was given in."""
    day1, day2 = (
        ref("t:daily", window="2026-12-04", limit=1000),
        ref("t:daily", window="2026-12-05", limit=1000),
    )
    user1, user2 = (
        ref("u:daily", window="2026-12-04", limit=1000),
        ref("u:daily", window="2026-12-05", limit=1000),
    )
    assert (await store.lease("l1", day1, 400, min_micros=0, ttl_ms=TTL, now_ms=NOW)).granted_micros == 400
    assert (await store.lease("l2", day2, 1000, min_micros=0, ttl_ms=TTL, now_ms=NOW)).granted_micros == 1000
    await store.settle("req-1", 150, [day2, user2], lease_ids=["l1"], now_ms=NOW)
    assert await counter(store, day1) == Counter(150, 250)
    assert await counter(store, day2) == Counter(0, 1000)
    assert await counter(store, user2) == Counter(150, 0)
    assert await counter(store, user1) == Counter(0, 0)

    assert (await store.reserve("r1", [day1], 200, ttl_ms=TTL, now_ms=NOW)).ok
    await store.settle("req-2", 120, [day2], reservation_id="r1", now_ms=NOW)
    assert await counter(store, day1) == Counter(270, 250)
    assert await counter(store, day2) == Counter(0, 1000)


async def test_add_spent_adds_to_spent_and_keeps_held(store: BudgetStore) -> None:
    budget = ref(limit=1000)
    await store.reserve("r1", [budget], 300, ttl_ms=TTL, now_ms=NOW)
    await store.settle("req-1", 50, [budget], now_ms=NOW)
    await store.add_spent(budget, 600, now_ms=NOW)
    assert await counter(store, budget) == Counter(650, 300)
    assert not (await store.reserve("r2", [budget], 51, ttl_ms=TTL, now_ms=NOW)).ok
    assert (await store.reserve("r3", [budget], 50, ttl_ms=TTL, now_ms=NOW)).ok


async def test_forget_drops_every_window_of_a_budget_and_nothing_else(store: BudgetStore) -> None:
    # Ids with glob characters and ids that prefix one another: only the named one goes.
    odd = "user:*[a]?\\x"
    windows = [ref(odd, window=w, limit=100) for w in ("2026-11", "2026-12", "2026-12-01")]
    others = [ref("user:*[a]?\\xy", limit=100), ref("user:", limit=100), ref("user:b", limit=100)]
    for budget in [*windows, *others]:
        await store.add_spent(budget, 40, now_ms=NOW)
    assert (await store.reserve("r1", [windows[0], others[0]], 10, ttl_ms=TTL, now_ms=NOW)).ok
    assert await store.forget([odd, odd, "never-seen"]) == len(windows)
    for budget in windows:
        assert await counter(store, budget) == Counter(0, 0)
    assert [await counter(store, b) for b in others] == [Counter(40, 10), Counter(40, 0), Counter(40, 0)]
    # The hold that counted on the forgotten counter ends without touching it again.
    assert await store.release("r1", now_ms=NOW)
    assert await counter(store, windows[0]) == Counter(0, 0)
    assert await counter(store, others[0]) == Counter(40, 0)
    assert await store.forget([]) == 0
    with pytest.raises(ValueError):
        await store.forget([""])


async def test_arguments_are_checked_alike(store: BudgetStore) -> None:
    budget = ref()
    with pytest.raises(ValueError):
        await store.reserve("r1", [budget], -1, ttl_ms=TTL, now_ms=NOW)
    with pytest.raises(ValueError):
        await store.reserve("", [budget], 1, ttl_ms=TTL, now_ms=NOW)
    with pytest.raises(ValueError):
        await store.reserve("r1", [budget], 1, ttl_ms=0, now_ms=NOW)
    with pytest.raises(ValueError):
        await store.lease("l1", budget, 1, min_micros=0, ttl_ms=TTL, now_ms=NOW, max_share=Fraction(3, 2))
    with pytest.raises(ValueError):
        await store.settle("req-1", -5, [budget], now_ms=NOW)
    with pytest.raises(TypeError):
        await store.settle("req-1", 1.5, [budget], now_ms=NOW)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        BudgetRef("b", "w", -1, True, NOW)
    assert await counter(store, budget) == Counter(0, 0)


# --- concurrency ----------------------------------------------------------------------------

AMOUNT = 7_000


async def _race(stores: list[BudgetStore]) -> None:
    """195 reserves and 5 settles at once against room for 50 holds: exactly 50 hold in the end."""
    budget = ref("tenant:race", limit=50 * AMOUNT)
    early = [
        await stores[0].reserve(f"early-{i}", [budget], AMOUNT, ttl_ms=TTL, now_ms=NOW) for i in range(5)
    ]
    assert all(outcome.ok for outcome in early)

    violations: list[Counter] = []
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            now = await stores[-1].counter(budget, now_ms=NOW)
            if now.spent_micros + now.held_micros > budget.limit_micros:
                violations.append(now)
            await asyncio.sleep(0)

    async def reserve(i: int) -> bool:
        store = stores[i % len(stores)]
        return (await store.reserve(f"race-{i}", [budget], AMOUNT, ttl_ms=TTL, now_ms=NOW)).ok

    async def settle(i: int) -> bool:
        store = stores[i % len(stores)]
        await store.settle(f"req-{i}", AMOUNT, [budget], reservation_id=f"early-{i}", now_ms=NOW)
        return False

    watcher = asyncio.create_task(watch())
    try:
        tasks = [reserve(i) for i in range(195)]
        for i in range(5):  # the settles land among the reserves
            tasks.insert(40 * i + 20, settle(i))
        results = await asyncio.gather(*tasks)
    finally:
        done.set()
        await watcher
    assert sum(results) == 45
    assert violations == []
    final = await stores[0].counter(budget, now_ms=NOW)
    assert final == Counter(5 * AMOUNT, 45 * AMOUNT)


async def test_concurrent_reserves_never_overdraw_a_hard_budget(store: BudgetStore) -> None:
    await _race([store])


# --- epochs ---------------------------------------------------------------------------------


async def test_leases_carry_the_epoch_which_stays_while_the_store_keeps_its_holds(store: BudgetStore) -> None:
    epoch = await store.epoch()
    budget = ref(limit=1000)
    granted = await store.lease("l1", budget, 100, min_micros=10, ttl_ms=TTL, now_ms=NOW)
    again = await store.lease("l1", budget, 100, min_micros=10, ttl_ms=TTL, now_ms=NOW)
    nothing = await store.lease("l2", budget, 5000, min_micros=5000, ttl_ms=TTL, now_ms=NOW)
    assert (granted.granted_micros, nothing.granted_micros) == (100, 0)
    assert epoch and granted.epoch == again.epoch == nothing.epoch == epoch
    assert await store.epoch() == epoch


async def test_a_new_memory_store_is_a_new_epoch() -> None:
    # A ledger restarted on the in-memory store lost its leases' holds: its epoch says so.
    assert await MemoryBudgetStore().epoch() != await MemoryBudgetStore().epoch()
    # ...and the ledger rebuilds it before serving, so it never asks for a rebuild while it runs.
    assert await MemoryBudgetStore().claim_rebuild() is None


# --- Redis only -----------------------------------------------------------------------------


async def test_the_redis_epoch_is_shared_and_changes_only_when_redis_lost_its_data(
    redis_url: str, redis_client: Redis
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:budget:"
    first = RedisBudgetStore(redis_client, prefix=prefix)
    # Another replica, or this ledger restarted: the same Redis, the same epoch.
    second = RedisBudgetStore(open_redis(redis_url), prefix=prefix, owns_client=True)
    try:
        budget = ref(limit=1000)
        # A fresh store holds nothing until a ledger has rebuilt its counters, and only one
        # caller at a time holds the claim on that rebuild.
        with pytest.raises(CountersLost) as caught:
            await first.lease("l0", budget, 1000, min_micros=10, ttl_ms=TTL, now_ms=NOW)
        assert caught.value.epoch == await first.epoch()
        claim = await first.claim_rebuild()
        assert claim is not None and claim.epoch == caught.value.epoch
        with pytest.raises(CountersLost):
            await second.reserve("r0", [budget], 10, ttl_ms=TTL, now_ms=NOW)
        assert await second.claim_rebuild() is None  # the first is at it
        await first.mark_rebuilt(claim)
        assert await first.claim_rebuild() is None  # rebuilt
        granted = await first.lease("l1", budget, 1000, min_micros=10, ttl_ms=TTL, now_ms=NOW)
        assert granted.granted_micros == 1000
        assert await second.epoch() == granted.epoch == await first.epoch()

        # Redis loses its data (here: this store's keys): the lease's hold and the spend are
        # gone with it, so nothing is held until the spend is back from the ledger's rows.
        await first.settle("req-1", 700, [budget], lease_ids=["l1"], now_ms=NOW)
        await redis_client.delete(*[key async for key in redis_client.scan_iter(match=prefix + "*")])
        with pytest.raises(CountersLost) as caught:
            await second.lease("l2", budget, 1000, min_micros=10, ttl_ms=TTL, now_ms=NOW)
        lost = caught.value
        assert lost.epoch != granted.epoch
        claim = await second.claim_rebuild()
        assert claim is not None and claim.epoch == lost.epoch
        await second.add_spent(budget, 700, now_ms=NOW)
        assert not await second.mark_rebuilt(RebuildClaim("an epoch since replaced", claim.token))
        with pytest.raises(CountersLost):
            await second.lease("l2", budget, 1000, min_micros=10, ttl_ms=TTL, now_ms=NOW)
        await second.mark_rebuilt(claim)
        regranted = await second.lease("l2", budget, 1000, min_micros=10, ttl_ms=TTL, now_ms=NOW)
        assert regranted.granted_micros == 300  # what the rows left, not the whole budget
        assert regranted.epoch == lost.epoch == await first.epoch()
    finally:
        await second.aclose()


async def test_a_rebuild_claim_is_the_claimers_until_it_ends_and_one_of_an_old_epoch_is_void(
    redis_client: Redis,
) -> None:
    prefix = f"test:{uuid.uuid4().hex}:budget:"
    store = RedisBudgetStore(redis_client, prefix=prefix)
    claim = await store.claim_rebuild()
    assert claim is not None
    assert await store.renew_rebuild(claim)
    assert 29_000 < await redis_client.pttl(prefix + "rebuild") <= 30_000
    # Only the claimer's own token renews or releases it.
    stranger = RebuildClaim(claim.epoch, "someone else")
    assert not await store.renew_rebuild(stranger)
    await store.release_rebuild(stranger)
    assert await store.claim_rebuild() is None
    # Released (its rebuild failed): another caller may claim at once, not in 30 s.
    await store.release_rebuild(claim)
    assert not await store.renew_rebuild(claim)
    again = await store.claim_rebuild()
    assert again is not None and again.token != claim.token
    # A stranger (one whose claim lapsed) marks nothing and leaves the claim alone; the
    # claimer's mark ends it.
    assert not await store.mark_rebuilt(stranger)
    assert await redis_client.get(prefix + "ready") is None
    assert await store.renew_rebuild(again)
    assert await store.mark_rebuilt(again)
    assert await redis_client.get(prefix + "ready") == again.epoch.encode()
    assert not await store.renew_rebuild(again)
    assert await store.claim_rebuild() is None
    # A claim left from an epoch since lost does not hold back the rebuild of the new one.
    await redis_client.delete(prefix + "e", prefix + "ready")
    await redis_client.set(prefix + "rebuild", "an-old-epoch some-token", px=30_000)
    fresh = await store.claim_rebuild()
    assert fresh is not None and fresh.epoch != claim.epoch


async def test_stores_on_separate_connections_share_one_budget(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:budget:"
    stores: list[BudgetStore] = [
        RedisBudgetStore(open_redis(redis_url), prefix=prefix, owns_client=True) for _ in range(2)
    ]
    try:
        await rebuild(stores[0])
        await _race(stores)
    finally:
        for store in stores:
            await store.aclose()


async def test_every_key_carries_a_ttl(redis_client: Redis) -> None:
    prefix = f"test:{uuid.uuid4().hex}:budget:"
    store = RedisBudgetStore(redis_client, prefix=prefix)
    await rebuild(store)
    budget, late = ref(expires_in_ms=40 * DAY), ref("tenant:late", expires_in_ms=-DAY)
    await store.reserve("r1", [budget], 10, ttl_ms=TTL, now_ms=NOW)
    await store.lease("l1", late, 10, min_micros=0, ttl_ms=TTL, now_ms=NOW)
    await store.settle("req-1", 5, [budget], reservation_id="r1", now_ms=NOW)
    await store.settle("req-2", 5, [late], now_ms=NOW)

    keys = [key async for key in redis_client.scan_iter(match=prefix + "*")]
    ttls = {key.decode(): await redis_client.pttl(key) for key in keys}
    # Only the global expiry index, which empties itself as holds go, has no TTL.
    assert {k for k, ttl in ttls.items() if ttl < 0} == {prefix + "x"}
    assert 39 * DAY < ttls[store.counter_key(budget)] <= 40 * DAY
    # A counter whose window has passed is still kept a day after a write.
    assert MIN_KEY_TTL_MS - 60_000 < ttls[store.counter_key(late)] <= MIN_KEY_TTL_MS
    assert 39 * DAY < ttls[prefix + "r:req-1"] <= 40 * DAY
    assert SETTLED_RETENTION_MS - 60_000 < ttls[prefix + "r:req-2"] <= SETTLED_RETENTION_MS
    assert ttls[prefix + "h:l1"] > TTL
    # The epoch outlives every lease granted in it, and its rebuilt mark lives as long.
    assert ttls[prefix + "e"] >= ttls[prefix + "h:l1"] - 1000
    assert abs(ttls[prefix + "ready"] - ttls[prefix + "e"]) < 1000
    assert prefix + "rebuild" not in ttls


async def test_the_scripts_are_reloaded_after_a_script_flush(redis_client: Redis) -> None:
    store = RedisBudgetStore(redis_client, prefix=f"test:{uuid.uuid4().hex}:budget:")
    await rebuild(store)
    budget = ref(limit=100)
    assert (await store.reserve("r1", [budget], 60, ttl_ms=TTL, now_ms=NOW)).ok
    await redis_client.script_flush()
    assert not (await store.reserve("r2", [budget], 60, ttl_ms=TTL, now_ms=NOW)).ok
    assert await counter(store, budget) == Counter(0, 60)


@pytest.fixture
async def unreachable() -> AsyncIterator[RedisBudgetStore]:
    """A store on a port nobody listens on, its URL carrying a password."""
    options = RedisOptions(connect_timeout_s=0.2, socket_timeout_s=0.2, pool_timeout_s=0.2)
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    store = RedisBudgetStore(open_redis(url, options=options), owns_client=True)
    try:
        yield store
    finally:
        await store.aclose()


async def test_an_unreachable_redis_raises_unavailable_without_the_url(unreachable: RedisBudgetStore) -> None:
    with pytest.raises(BudgetStoreUnavailable) as caught:
        await unreachable.reserve("r1", [ref()], 1, ttl_ms=TTL, now_ms=NOW)
    assert "hunter2" not in str(caught.value)
    with pytest.raises(BudgetStoreUnavailable) as caught:
        await unreachable.forget(["b1"])
    assert "hunter2" not in str(caught.value)


async def test_build_budget_store_picks_the_backend(redis_url: str) -> None:
    memory = build_budget_store(None)
    assert isinstance(memory, MemoryBudgetStore)
    shared = build_budget_store(redis_url, prefix=f"test:{uuid.uuid4().hex}:budget:")
    try:
        assert isinstance(shared, RedisBudgetStore)
        await rebuild(shared)
        assert (await shared.reserve("r1", [ref()], 5, ttl_ms=TTL, now_ms=NOW)).ok
    finally:
        await shared.aclose()
