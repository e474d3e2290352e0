"""A commit whose budget counters could not be charged is charged later, exactly once.

The ledger in-process on a real SQLite file with the in-memory budget store; the store's
failure is injected by a subclass that refuses to settle while `down` is set (what a Redis
outage looks like to the ledger: the call raises). Money is checked against the row.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from switchyard.common.catalog import load_catalog, parse_catalog
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.redis_client import open_redis
from switchyard.common.sql import open_database
from switchyard.ledger import service as ledger_service
from switchyard.ledger.alerts import AlertCenter
from switchyard.ledger.budgets import BudgetRef, BudgetStoreUnavailable, Grant, MemoryBudgetStore, Settlement
from switchyard.ledger.budgets_redis import RedisBudgetStore
from switchyard.ledger.history import LedgerStore
from switchyard.ledger.service import Ledger, budget_ref
from switchyard.v1 import common_pb2, ledger_pb2

MODEL = "openai/gpt-4o-mini"


class FlakyStore(MemoryBudgetStore):
    """The in-memory store, whose settlements fail while `down`."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        # Awaited before each lease, with how many came before it (to fail or stall one).
        self.before_lease: Callable[[int], Awaitable[None]] | None = None
        self.after_lease: Callable[[int], Awaitable[None]] | None = None
        self.leases = 0

    async def lease(
        self,
        lease_id: str,
        budget: BudgetRef,
        wanted_micros: int,
        *,
        min_micros: int,
        ttl_ms: int,
        now_ms: int,
        max_share: Fraction | None = None,
    ) -> Grant:
        self.leases += 1
        if self.before_lease is not None:
            await self.before_lease(self.leases - 1)
        granted = await super().lease(
            lease_id,
            budget,
            wanted_micros,
            min_micros=min_micros,
            ttl_ms=ttl_ms,
            now_ms=now_ms,
            max_share=max_share,
        )
        if self.after_lease is not None:  # granted, the answer not back yet
            await self.after_lease(self.leases - 1)
        return granted

    async def settle(
        self,
        request_id: str,
        actual_micros: int,
        budgets: Sequence[BudgetRef],
        *,
        reservation_id: str = "",
        lease_ids: Sequence[str] = (),
        now_ms: int,
    ) -> Settlement:
        if self.down:
            raise BudgetStoreUnavailable("injected outage")
        return await super().settle(
            request_id,
            actual_micros,
            budgets,
            reservation_id=reservation_id,
            lease_ids=lease_ids,
            now_ms=now_ms,
        )


@pytest.fixture
async def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Ledger, FlakyStore]]:
    # The sweeper leaves rows younger than this to their commit; here it need not wait.
    monkeypatch.setattr(ledger_service, "UNSETTLED_AFTER_S", 0.0)
    database = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    store = FlakyStore()
    alerts = await AlertCenter.open(database, secret=None)
    ledger = Ledger(
        load_catalog(None),
        await LedgerStore.open(database),
        store,
        alerts,
        lease_ttl_s=30,
        settle_after_s=300,
    )
    try:
        yield ledger, store
    finally:
        await alerts.aclose()
        await database.close()


def lease_for(
    tenant: str, requested_micros: int, min_micros: int = 1, holder_id: str = "edge"
) -> ledger_pb2.LeaseBudgetRequest:
    """A lease request on `tenant`'s budgets."""
    return ledger_pb2.LeaseBudgetRequest(
        holder_id=holder_id,
        scope=ledger_pb2.BudgetScope(tenant_id=tenant),
        requested_micros=requested_micros,
        min_micros=min_micros,
    )


def commit(tenant: str, request_id: str) -> ledger_pb2.CommitRequest:
    record = ledger_pb2.UsageRecord(
        request_id=request_id,
        scope=ledger_pb2.BudgetScope(tenant_id=tenant),
        model=MODEL,
        provider="openai",
        usage=common_pb2.Usage(input_tokens=1_000_000, output_tokens=100_000),
        status="ok",
        attempts=1,
    )
    record.finished_at.GetCurrentTime()
    return ledger_pb2.CommitRequest(record=record)


async def counter(ledger: Ledger, budget: ledger_pb2.Budget) -> tuple[int, int]:
    """The budget's (spent, held) now."""
    now = datetime.now(UTC)
    found = await ledger.store.counter(budget_ref(budget, now), now_ms=int(now.timestamp() * 1000))
    return found.spent_micros, found.held_micros


async def spent(ledger: Ledger, budget: ledger_pb2.Budget) -> int:
    return (await counter(ledger, budget))[0]


async def unsettled(ledger: Ledger) -> list[str]:
    rows = await ledger.history.unsettled(recorded_before_ms=2**62, limit=10)
    return [row.request_id for row in rows]


async def with_budget(
    ledger: Ledger,
    *,
    tenant: str = "",
    limit_micros: int = 100_000_000,
    window: ledger_pb2.BudgetWindow.ValueType = ledger_pb2.BUDGET_WINDOW_DAILY,
    end_user: str = "",
) -> tuple[str, ledger_pb2.Budget]:
    """A hard budget (of a new tenant unless named), id `<tenant>:<daily|monthly>[:<end user>]`."""
    tenant = tenant or f"t-{uuid.uuid4().hex[:8]}"
    name = "daily" if window == ledger_pb2.BUDGET_WINDOW_DAILY else "monthly"
    budget = await ledger.set_budget(
        ledger_pb2.Budget(
            budget_id=":".join(filter(None, (tenant, name, end_user))),
            scope=ledger_pb2.BudgetScope(tenant_id=tenant, end_user=end_user),
            window=window,
            enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
            limit_micros=limit_micros,
        ),
        "ops@example.com",
    )
    return tenant, budget


async def test_a_commit_during_a_store_outage_is_charged_once_the_store_is_back(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    service, store = ledger
    tenant, budget = await with_budget(service)
    store.down = True
    (result,) = await service.commit_many([commit(tenant, "req-outage")])
    # $0.15 per 1M input + $0.60 per 1M output: 150,000 + 60,000 micro-USD.
    assert result.charged_micros == 210_000 and not result.duplicate
    assert await spent(service, budget) == 0
    assert await unsettled(service) == ["req-outage"]

    await service.sweep()  # still down: nothing changes, nothing is lost
    assert await spent(service, budget) == 0
    assert await unsettled(service) == ["req-outage"]

    # An edge whose clock runs two days ahead: its request finished no later than now.
    ahead = commit(tenant, "req-ahead")
    ahead.record.finished_at.FromDatetime(datetime.now(UTC) + timedelta(days=2))
    await service.commit_many([ahead])

    store.down = False
    await service.sweep()
    assert await spent(service, budget) == 2 * 210_000
    assert await unsettled(service) == []
    await service.sweep()
    assert await spent(service, budget) == 2 * 210_000


async def test_the_sweeper_draws_a_commits_cost_from_the_lease_it_named(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    """The sweeper settles a row its commit did not (here: the store failed under the commit;
    equally, a commit still settling when the sweeper finds its row): the cost comes out of the
    edge's lease, as the commit would have taken it. Charging the spend alone left the lease
    holding it too, so spend plus holds passed the limit by that request until the lease ended."""
    service, store = ledger
    tenant, budget = await with_budget(service)
    response = await service.lease(lease_for(tenant, 1_000_000, 250_000, holder_id="edge-a"))
    (lease,) = response.leases
    assert lease.amount_micros == 1_000_000
    assert await counter(service, budget) == (0, 1_000_000)

    request = commit(tenant, "req-on-lease")
    request.lease_ids.append(lease.lease_id)
    store.down = True
    (result,) = await service.commit_many([request])
    cost = result.charged_micros
    assert cost == 210_000
    assert await counter(service, budget) == (0, 1_000_000)

    store.down = False
    await service.sweep()
    assert await unsettled(service) == []
    assert await counter(service, budget) == (cost, 1_000_000 - cost)
    # The edge, having drawn the same cost from its lease, gives back the rest: nothing is held.
    returned = await service.return_lease(
        ledger_pb2.ReturnLeaseRequest(lease_id=lease.lease_id, unused_micros=1_000_000 - cost)
    )
    assert returned.returned_micros == 1_000_000 - cost
    assert await counter(service, budget) == (cost, 0)
    # The commit's retry is a duplicate and draws nothing more.
    (again,) = await service.commit_many([request])
    assert again.duplicate and await counter(service, budget) == (cost, 0)


async def test_a_lease_admits_until_its_window_ends_and_what_it_admitted_is_charged_there(
    ledger: tuple[Ledger, FlakyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten seconds before midnight an edge is leased part of the day's budget: the lease says it
    admits until midnight (not for its usual 30 s). A request it admitted finishes after
    midnight: the day that admitted it is charged, so the new day, leased whole to other edges,
    never has more spent and held than its limit."""
    service, _ = ledger
    clock = [datetime(2026, 12, 4, 23, 59, 50, tzinfo=UTC)]
    monkeypatch.setattr(ledger_service, "_now", lambda: clock[0])
    tenant, budget = await with_budget(service, limit_micros=1_000_000)

    async def lease() -> ledger_pb2.BudgetLease:
        response = await service.lease(lease_for(tenant, 500_000))
        (granted,) = response.leases
        return granted

    before = await lease()
    midnight = datetime(2026, 12, 5, tzinfo=UTC)
    assert before.amount_micros == 500_000
    assert before.expires_at.ToDatetime(UTC) == midnight
    assert before.settle_by.ToDatetime(UTC) > midnight  # its commits still have their time

    clock[0] = midnight + timedelta(seconds=5)
    day_one, day_two = budget_ref(budget, midnight - timedelta(seconds=1)), budget_ref(budget, clock[0])
    after = await lease()
    assert after.amount_micros == 500_000  # half of the new day (LEASE_SHARE)
    request = commit(tenant, "req-across-midnight")
    request.lease_ids.append(before.lease_id)
    (result,) = await service.commit_many([request])
    now_ms = int(clock[0].timestamp() * 1000)
    one = await service.store.counter(day_one, now_ms=now_ms)
    two = await service.store.counter(day_two, now_ms=now_ms)
    assert (one.spent_micros, one.held_micros) == (result.charged_micros, 500_000 - result.charged_micros)
    assert (two.spent_micros, two.held_micros) == (0, 500_000)

    # A dear one admitted on the same lease takes the day it was charged to past 80%: the alert
    # is that day's, where the spend is, not the new day's.
    dear = commit(tenant, "req-dear")
    dear.record.usage.input_tokens = 4_000_000  # 600,000 + 60,000 micro-USD
    dear.lease_ids.append(before.lease_id)
    await service.commit_many([dear])
    alerts, _ = await service.alerts.list_alerts(tenant)
    assert [(a.window_key, a.threshold_percent) for a in alerts] == [(day_one.window_key, 80)]


async def test_a_ledger_just_started_frees_no_expired_hold_until_its_grace_is_over(
    ledger: tuple[Ledger, FlakyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Edges send the commits a ledger could not take while it was down once it is back; each
    draws its cost from its lease's hold, though the lease's settle-by has passed meanwhile. A
    ledger that has just started leaves expired holds alone for a while (here an hour): its
    sweeper does not free them, nor does a hold taken meanwhile (lazily), and a late commit
    still draws its lease down; past the grace the sweeper frees what is left."""
    service, store = ledger
    at = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    monkeypatch.setattr(ledger_service, "_now", lambda: at)
    tenant, budget = await with_budget(service)
    scope = ledger_pb2.BudgetScope(tenant_id=tenant)
    granted = await service.lease(
        ledger_pb2.LeaseBudgetRequest(holder_id="edge-1", scope=scope, requested_micros=500_000, min_micros=1)
    )
    (lease,) = granted.leases

    async def counter_at(moment: datetime) -> tuple[int, int]:
        found = await store.counter(budget_ref(budget, moment), now_ms=int(moment.timestamp() * 1000))
        return found.spent_micros, found.held_micros

    # The ledger was down past the lease's settle-by; a new one starts.
    later = lease.settle_by.ToDatetime(UTC) + timedelta(seconds=5)
    monkeypatch.setattr(ledger_service, "_now", lambda: later)
    restarted = Ledger(
        service.catalog,
        service.history,
        store,
        service.alerts,
        lease_ttl_s=30,
        settle_after_s=300,
        expire_after_start_s=3600,
    )
    assert await restarted.sweep() == 0
    await restarted.reserve(ledger_pb2.ReserveRequest(request_id="req-new", scope=scope, amount_micros=1))
    assert await counter_at(later) == (0, 500_001)
    late = commit(tenant, "req-late")
    late.lease_ids.append(lease.lease_id)
    (result,) = await restarted.commit_many([late])
    assert await counter_at(later) == (result.charged_micros, 500_001 - result.charged_micros)

    past = later + timedelta(hours=1, seconds=1)
    monkeypatch.setattr(ledger_service, "_now", lambda: past)
    assert await restarted.sweep() == 2  # the lease's rest, and the reservation (its 60 s are up)
    assert await counter_at(past) == (result.charged_micros, 0)


async def test_a_lease_that_fails_or_is_given_up_part_way_returns_what_it_had_granted(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    """Two hard budgets apply; the store fails on the second, or the edge stops waiting while it
    is asked: the first budget's slice, which the edge never learns of, is freed at once."""
    service, store = ledger
    tenant, daily = await with_budget(service)
    _, monthly = await with_budget(service, tenant=tenant, window=ledger_pb2.BUDGET_WINDOW_MONTHLY)
    request = lease_for(tenant, 1_000)
    stalled = asyncio.Event()

    async def fail_the_second(before: int) -> None:
        if before % 2 == 1:
            raise BudgetStoreUnavailable("injected outage")

    async def stall_the_second(before: int) -> None:
        if before % 2 == 1:
            stalled.set()
            await asyncio.Event().wait()

    store.before_lease = fail_the_second
    with pytest.raises(SwitchyardError) as caught:
        await service.lease(request)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert store.leases == 2
    assert [await counter(service, b) for b in (daily, monthly)] == [(0, 0), (0, 0)]

    store.before_lease = stall_the_second
    waiting = asyncio.create_task(service.lease(request))
    await stalled.wait()
    assert sorted([await counter(service, b) for b in (daily, monthly)]) == [(0, 0), (0, 1_000)]
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert [await counter(service, b) for b in (daily, monthly)] == [(0, 0), (0, 0)]

    # The edge stops waiting while the store's answer to the first is on its way back.
    store.before_lease = None
    stalled.clear()
    store.after_lease = stall_the_second
    waiting = asyncio.create_task(service.lease(request))
    await stalled.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert [await counter(service, b) for b in (daily, monthly)] == [(0, 0), (0, 0)]

    store.after_lease = None
    assert [lease.amount_micros for lease in (await service.lease(request)).leases] == [1_000, 1_000]


async def test_a_hard_budget_used_up_short_of_its_limit_fires_its_100_percent_alert(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    """Nothing is admitted past a hard limit, so its spend stops short of it: past 90 %, the
    100 % alert fires when the budget refuses a request its spend leaves no room for (through
    Reserve, or a lease that grants nothing); not when holds that will end are what is in the
    way, nor below 90 % (the request was large, the budget is not used up)."""
    service, _ = ledger

    async def tenant_with_spend(commits: int) -> str:
        tenant, _ = await with_budget(service, limit_micros=1_100_000)
        await service.commit_many([commit(tenant, f"{tenant}-{i}") for i in range(commits)])  # 210,000 each
        return tenant

    async def thresholds(tenant: str) -> list[int]:
        alerts, _ = await service.alerts.list_alerts(tenant)
        return sorted(a.threshold_percent for a in alerts)

    async def refused(tenant: str, amount: int) -> None:
        scope = ledger_pb2.BudgetScope(tenant_id=tenant)
        with pytest.raises(SwitchyardError) as caught:
            await service.reserve(ledger_pb2.ReserveRequest(scope=scope, amount_micros=amount))
        assert caught.value.reason is Reason.BUDGET_EXCEEDED

    at_76 = await tenant_with_spend(4)  # 840,000
    await refused(at_76, 300_000)
    assert await thresholds(at_76) == []

    by_reserve = await tenant_with_spend(5)  # 1,050,000: 95 %
    assert await thresholds(by_reserve) == [80, 90]
    scope = ledger_pb2.BudgetScope(tenant_id=by_reserve)
    await service.reserve(ledger_pb2.ReserveRequest(scope=scope, amount_micros=30_000))
    await refused(by_reserve, 40_000)  # 1,050,000 + 40,000 fit once the hold ends
    assert await thresholds(by_reserve) == [80, 90]
    await refused(by_reserve, 100_000)  # 1,050,000 + 100,000 never fit
    assert await thresholds(by_reserve) == [80, 90, 100]

    by_lease = await tenant_with_spend(5)
    response = await service.lease(lease_for(by_lease, 500_000, 100_000))
    assert [lease.amount_micros for lease in response.leases] == [0]
    assert await thresholds(by_lease) == [80, 90, 100]


async def test_a_reserve_retried_with_another_amount_or_after_its_commit_is_refused(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    service, _ = ledger
    tenant, budget = await with_budget(service)
    scope = ledger_pb2.BudgetScope(tenant_id=tenant)

    def reserve(amount: int, request_id: str = "req-r") -> Awaitable[ledger_pb2.ReserveResponse]:
        return service.reserve(
            ledger_pb2.ReserveRequest(request_id=request_id, scope=scope, amount_micros=amount)
        )

    first = await reserve(100_000)
    assert (await reserve(100_000)).reservation_id == first.reservation_id
    with pytest.raises(SwitchyardError) as caught:
        await reserve(900_000)
    assert (caught.value.code, caught.value.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "request_id",
    )
    assert await counter(service, budget) == (0, 100_000)

    request = commit(tenant, "req-r")
    request.reservation_id = first.reservation_id
    (result,) = await service.commit_many([request])
    assert await counter(service, budget) == (result.charged_micros, 0)
    with pytest.raises(SwitchyardError) as caught:
        await reserve(100_000)  # a late retry of the Reserve: nothing to hold for any more
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert await counter(service, budget) == (result.charged_micros, 0)


async def test_a_budget_s_scope_cannot_change_and_one_made_again_counts_its_new_scope(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    """A live budget's counter counts the requests of its scope; a changed scope would have it
    count some twice or miss some while edges and replicas learn of the change one by one. So
    the change is refused, and a budget deleted and made again on the wider scope counts that
    scope's spend of the window from the rows."""
    service, _ = ledger
    tenant, budget = await with_budget(service, limit_micros=1_000_000, end_user="bob")
    commits = [commit(tenant, f"{tenant}-{i}") for i in range(3)]  # 210,000 each
    commits[0].record.scope.end_user = "bob"
    await service.commit_many(commits)
    bobs = ledger_pb2.BudgetScope(tenant_id=tenant, end_user="bob")
    await service.reserve(ledger_pb2.ReserveRequest(scope=bobs, amount_micros=300_000))
    assert await counter(service, budget) == (210_000, 300_000)

    widened = ledger_pb2.Budget()
    widened.CopyFrom(budget)
    widened.scope.end_user = ""
    with pytest.raises(SwitchyardError) as caught:
        await service.set_budget(widened, "ops@example.com")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.metadata["field"] == "budget.scope"
    stored = await service.history.get_budget(budget.budget_id)
    assert stored is not None and (stored.scope, stored.version) == (budget.scope, 1)  # unchanged
    # Other changes keep the counter, its spend and its holds.
    budget.limit_micros = 2_000_000
    budget = await service.set_budget(budget, "ops@example.com")
    assert await counter(service, budget) == (210_000, 300_000)

    await service.delete_budget(budget.budget_id, "ops@example.com")
    remade = await service.set_budget(widened, "ops@example.com")
    assert await counter(service, remade) == (3 * 210_000, 0)


async def test_the_sweeper_frees_the_reservation_a_commit_named(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    service, store = ledger
    tenant, budget = await with_budget(service)
    reserved = await service.reserve(
        ledger_pb2.ReserveRequest(
            request_id="req-reserved", scope=ledger_pb2.BudgetScope(tenant_id=tenant), amount_micros=500_000
        )
    )
    assert await counter(service, budget) == (0, 500_000)
    request = commit(tenant, "req-reserved")
    request.reservation_id = reserved.reservation_id
    store.down = True
    await service.commit_many([request])
    store.down = False
    await service.sweep()
    assert await counter(service, budget) == (210_000, 0)


async def test_a_retried_commit_completes_a_settlement_a_crash_cut_short(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    service, _ = ledger
    tenant, budget = await with_budget(service)
    first = commit(tenant, "req-crash")
    # The first commit's row landed, then the process died before the counters were charged;
    # the row says what was charged then (not what the catalog would charge today).
    (stored,) = await service.history.record_many([(first.record, 123_456)], recorded_at_ms=1)
    assert stored
    assert await spent(service, budget) == 0

    (retry,) = await service.commit_many([first])
    assert retry.duplicate and retry.charged_micros == 123_456
    assert await spent(service, budget) == 123_456
    assert await unsettled(service) == []
    (again,) = await service.commit_many([first])
    assert again.duplicate and again.charged_micros == 123_456
    assert await spent(service, budget) == 123_456


PRICE_CHANGE_CATALOG = """\
providers:
  openai: {{vendor: openai, base_url: https://api.openai.com/v1}}
models:
  - id: openai/repriced
    provider: openai
    upstream_model: repriced
    context_window: 128000
    max_output_tokens: 16384
    prices: {{input: "1", output: "2"}}
    price_changes:
      - effective_from: "{change}"
        prices: {{input: "3", output: "4"}}
"""


async def test_a_commit_is_priced_when_its_request_finished_not_when_it_arrived(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    service, _ = ledger
    # The price rose an hour ago; commits of requests that finished before that arrive only now
    # (an edge's outbox, a ledger outage) and are still charged the old price.
    change = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    service.catalog = parse_catalog(PRICE_CHANGE_CATALOG.format(change=change.isoformat()))
    tenant = f"t-{uuid.uuid4().hex[:8]}"

    def finished(request_id: str, at: datetime | None) -> ledger_pb2.CommitRequest:
        request = commit(tenant, request_id)
        request.record.model = "openai/repriced"
        if at is None:
            request.record.ClearField("finished_at")
        else:
            request.record.finished_at.FromDatetime(at)
        return request

    commits = [
        finished("req-before", change - timedelta(hours=1)),
        finished("req-just-before", change - timedelta(milliseconds=1)),
        finished("req-at", change),
        finished("req-after", change + timedelta(minutes=30)),
        finished("req-undated", None),  # no finish time: priced as of its arrival
    ]
    results = await service.commit_many(commits)
    # 1M input + 100k output: $1 and $2 per 1M before the change, $3 and $4 from it.
    old, new = 1_000_000 + 200_000, 3_000_000 + 400_000
    assert [r.charged_micros for r in results] == [old, old, new, new, new]
    stored = await service.history.charged([c.record.request_id for c in commits])
    assert [stored[c.record.request_id][0] for c in commits] == [old, old, new, new, new]
    # A retry of the old request, later still, answers with what it was charged.
    (retry,) = await service.commit_many([commits[0]])
    assert retry.duplicate and retry.charged_micros == old


@asynccontextmanager
async def ledger_on_redis(tmp_path: Path, redis_url: str) -> AsyncIterator[tuple[Ledger, Redis, str]]:
    """A ledger on SQLite and a Redis budget store of its own prefix: (ledger, client, prefix)."""
    database = await open_database(f"sqlite:///{tmp_path / 'ledger.db'}")
    client = open_redis(redis_url)
    prefix = f"test:{uuid.uuid4().hex}:budget:"
    alerts = await AlertCenter.open(database, secret=None)
    service = Ledger(
        load_catalog(None),
        await LedgerStore.open(database),
        RedisBudgetStore(client, prefix=prefix),
        alerts,
        lease_ttl_s=30,
        settle_after_s=300,
    )
    try:
        yield service, client, prefix
    finally:
        await alerts.aclose()
        await client.aclose()
        await database.close()


async def test_a_budget_store_that_lost_its_data_is_rebuilt_from_the_rows_before_it_grants(
    tmp_path: Path, redis_url: str
) -> None:
    """Redis loses its data while the ledger runs: the spend of the day is gone from the counter.
    Nothing is leased from the empty counter; the spend comes back from the rows first (at the
    next sweep, or at the first lease if that comes sooner), so the budget is not granted twice."""
    async with ledger_on_redis(tmp_path, redis_url) as (service, client, prefix):
        await service.refresh_budgets()  # as the ledger starts: the fresh store is rebuilt
        tenant, budget = await with_budget(service)  # 100 USD a day
        results = await service.commit_many([commit(tenant, f"req-{i}") for i in range(2)])
        spent_before = sum(r.charged_micros for r in results)
        assert await counter(service, budget) == (spent_before, 0)

        for lost_at_sweep in (True, False):
            await client.delete(*[key async for key in client.scan_iter(match=prefix + "*")])
            if lost_at_sweep:
                await service.sweep()  # starts the rebuild in the background...
                await service.rebuild_if_lost()  # ...which this joins
                assert await counter(service, budget) == (spent_before, 0)
            response = await service.lease(lease_for(tenant, 100_000_000))
            (lease,) = response.leases
            # Half of what the rows left, never half of the whole budget.
            assert lease.amount_micros == (100_000_000 - spent_before) // 2
            assert await counter(service, budget) == (spent_before, lease.amount_micros)


async def test_a_rebuild_outlives_a_caller_that_gave_up_and_one_that_failed_is_retried_at_once(
    tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rebuild runs on its own: a lease that gave up waiting (its deadline passed) leaves it
    running to the end. One that failed gives up its claim, and the next sweep rebuilds, though
    the epoch it sees is no longer new."""
    async with ledger_on_redis(tmp_path, redis_url) as (service, client, prefix):
        history_spent = service.history.spent
        gate = asyncio.Event()
        gate.set()
        failures: list[Exception] = []

        async def slow_or_failing_spent(*args: Any, **kwargs: Any) -> int:
            await gate.wait()
            if failures:
                raise failures.pop()
            return await history_spent(*args, **kwargs)

        await service.refresh_budgets()
        tenant, budget = await with_budget(service)
        (result,) = await service.commit_many([commit(tenant, "req-1")])
        request = lease_for(tenant, 10)
        monkeypatch.setattr(service.history, "spent", slow_or_failing_spent)

        # Lost; the first lease to meet it starts the rebuild, then gives up.
        gate.clear()
        await client.delete(*[key async for key in client.scan_iter(match=prefix + "*")])
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(service.lease(request), 0.2)
        gate.set()
        assert await service.rebuild_if_lost()  # joins the rebuild still running
        assert await counter(service, budget) == (result.charged_micros, 0)
        assert (await service.lease(request)).leases[0].amount_micros == 10

        # Lost again; this rebuild fails at the database (the sweep goes on: it settles and
        # expires as ever)...
        failures.append(RuntimeError("the database went away"))
        await client.delete(*[key async for key in client.scan_iter(match=prefix + "*")])
        gate.clear()
        await service.sweep()
        assert await client.get(prefix + "rebuild") is not None  # claimed, under way
        gate.set()
        with pytest.raises(RuntimeError):
            await service.rebuild_if_lost()  # joins the one under way, which fails
        assert await client.get(prefix + "rebuild") is None  # its claim given up
        assert await counter(service, budget) == (0, 0)
        # ...and the next sweep rebuilds, the new epoch already known.
        await service.sweep()
        await service.rebuild_if_lost()
        assert await counter(service, budget) == (result.charged_micros, 0)
        assert (await service.lease(request)).leases[0].amount_micros == 10


TIERED_CATALOG = """\
providers:
  openai: {vendor: openai, base_url: https://api.openai.com/v1}
models:
  - id: openai/tiered
    provider: openai
    upstream_model: tiered
    context_window: 128000
    max_output_tokens: 16384
    prices:
      input: "1"
      output: "2"
      volume_tiers: [{above_monthly_tokens: 1500000, discount_percent: "50"}]
"""


async def test_a_late_commit_is_priced_with_the_volume_of_the_month_it_finished_in(
    ledger: tuple[Ledger, FlakyStore],
) -> None:
    """Past 1.5M tokens a month the tenant pays half. Commits of last month arriving now are priced
    with last month's volume (as the edges that served them then priced them); a request of this
    month starts this month's volume afresh and pays in full."""
    service, _ = ledger
    service.catalog = parse_catalog(TIERED_CATALOG)
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    last_month = (now.replace(day=1) - timedelta(days=1)).replace(hour=12)

    def finished(request_id: str, at: datetime) -> ledger_pb2.CommitRequest:
        request = commit(tenant, request_id)
        request.record.model = "openai/tiered"
        request.record.finished_at.FromDatetime(at)
        return request

    last = [(await service.commit_many([finished(f"req-last-{i}", last_month)]))[0] for i in range(3)]
    (current,) = await service.commit_many([finished("req-now", now)])
    # 1M input at $1 + 100k output at $2 = $1.2 each (1.1M tokens); the third starts past 1.5M
    # tokens of last month: half price. This month's first request pays in full.
    assert [r.charged_micros for r in last] == [1_200_000, 1_200_000, 600_000]
    assert (current.charged_micros, current.month_tokens) == (1_200_000, 1_100_000)


async def test_an_alert_the_commit_could_not_fire_is_fired_when_the_sweeper_settles_it(
    ledger: tuple[Ledger, FlakyStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit's counters were charged, then its alerts failed (the database refused): the
    row stays unsettled, and the sweeper's retry, a duplicate for the counters, still fires
    the 80% alert the spend reached, once."""
    service, _ = ledger
    tenant, budget = await with_budget(service)  # $100
    observe = service.alerts.observe
    failures = iter([True])

    async def flaky_observe(*args: Any, **kwargs: Any) -> list[int]:
        if next(failures, False):
            raise OSError("injected")
        return await observe(*args, **kwargs)

    monkeypatch.setattr(service.alerts, "observe", flaky_observe)
    big = commit(tenant, "req-big")
    big.record.usage.input_tokens = 550_000_000  # $82.5 at $0.15 per 1M
    big.record.usage.output_tokens = 0
    await service.commit_many([big])
    assert await unsettled(service) == ["req-big"]
    assert await spent(service, budget) == 82_500_000
    await service.sweep()
    await service.sweep()
    assert await unsettled(service) == []
    assert await spent(service, budget) == 82_500_000
    alerts, _ = await service.alerts.list_alerts(tenant_id=tenant)
    assert [a.threshold_percent for a in alerts] == [80]
