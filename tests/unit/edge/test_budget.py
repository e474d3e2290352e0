"""The edge's lease book against a small fake ledger that grants like the real one."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from google.protobuf import timestamp_pb2

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.edge import routes
from switchyard.edge.budget import LeaseBook, applies, scope_key
from switchyard.v1 import ledger_pb2

HARD = ledger_pb2.BUDGET_ENFORCEMENT_HARD
SOFT = ledger_pb2.BUDGET_ENFORCEMENT_SOFT


def _down() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")


class FakeWatch:
    """A WatchBudgets call: yields what is pushed, fails when told to."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[ledger_pb2.WatchBudgetsResponse | None] = asyncio.Queue()
        self.cancelled = False

    def __aiter__(self) -> FakeWatch:
        return self

    async def __anext__(self) -> ledger_pb2.WatchBudgetsResponse:
        item = await self.queue.get()
        if item is None:
            raise _down()
        return item

    def cancel(self) -> bool:
        self.cancelled = True
        return True


class FakeLedger:
    """Budgets with limits; grants min(wanted, left), in whole multiples of min_micros."""

    def __init__(self, *budgets: ledger_pb2.Budget) -> None:
        self.budgets = {b.budget_id: b for b in budgets}
        self.left = {b.budget_id: b.limit_micros for b in budgets}
        self.leases: dict[str, tuple[str, int]] = {}
        self.calls: list[str] = []
        self.down = False
        self.watches: list[FakeWatch] = []

    async def ListBudgets(
        self, request: ledger_pb2.ListBudgetsRequest, *, timeout: float | None = None
    ) -> ledger_pb2.ListBudgetsResponse:
        self.calls.append("list")
        if self.down:
            raise _down()
        return ledger_pb2.ListBudgetsResponse(budgets=list(self.budgets.values()))

    def WatchBudgets(self, request: ledger_pb2.WatchBudgetsRequest) -> FakeWatch:
        self.calls.append("watch")
        watch = FakeWatch()
        self.watches.append(watch)
        return watch

    def push(self, version: int) -> None:
        """Push the current directory to the newest watcher."""
        self.watches[-1].queue.put_nowait(
            ledger_pb2.WatchBudgetsResponse(budgets=list(self.budgets.values()), version=version)
        )

    async def LeaseBudget(
        self, request: ledger_pb2.LeaseBudgetRequest, *, timeout: float | None = None
    ) -> ledger_pb2.LeaseBudgetResponse:
        self.calls.append("lease")
        if self.down:
            raise _down()
        await asyncio.sleep(0)
        response = ledger_pb2.LeaseBudgetResponse()
        for budget_id in request.budget_ids:
            grant = min(request.requested_micros, self.left[budget_id])
            grant -= grant % max(1, request.min_micros)
            lease_id = f"lease-{uuid.uuid4().hex[:6]}" if grant else ""
            self.left[budget_id] -= grant
            if grant:
                self.leases[lease_id] = (budget_id, grant)
            expires = timestamp_pb2.Timestamp()
            expires.FromSeconds(int(time.time()) + 30)
            response.leases.append(
                ledger_pb2.BudgetLease(
                    lease_id=lease_id,
                    budget_id=budget_id,
                    amount_micros=grant,
                    version=self.budgets[budget_id].version,
                    expires_at=expires,
                    limit_micros=self.budgets[budget_id].limit_micros,
                )
            )
        return response

    async def ReturnLease(
        self, request: ledger_pb2.ReturnLeaseRequest, *, timeout: float | None = None
    ) -> ledger_pb2.ReturnLeaseResponse:
        self.calls.append("return")
        budget_id, _ = self.leases.pop(request.lease_id)
        self.left[budget_id] += request.unused_micros
        return ledger_pb2.ReturnLeaseResponse(returned_micros=request.unused_micros)


def budget(budget_id: str, limit: int, *, enforcement: int = HARD, **scope: str) -> ledger_pb2.Budget:
    return ledger_pb2.Budget(
        budget_id=budget_id,
        scope=ledger_pb2.BudgetScope(**scope),
        enforcement=enforcement,  # type: ignore[arg-type]
        limit_micros=limit,
        version=1,
    )


SCOPE = ledger_pb2.BudgetScope(tenant_id="acme", end_user="u1", model="openai/gpt-4o-mini", provider="openai")


def test_a_budget_applies_when_every_field_it_names_matches() -> None:
    key = scope_key(SCOPE)
    assert applies(ledger_pb2.BudgetScope(tenant_id="acme"), key)
    assert applies(ledger_pb2.BudgetScope(tenant_id="acme", model="openai/gpt-4o-mini"), key)
    assert not applies(ledger_pb2.BudgetScope(tenant_id="acme", model="openai/gpt-4o"), key)
    assert not applies(ledger_pb2.BudgetScope(tenant_id="other"), key)
    assert applies(ledger_pb2.BudgetScope(), key)  # a global budget


async def test_holds_are_local_after_the_first_lease_and_refused_when_the_budget_is_spent() -> None:
    ledger = FakeLedger(budget("b", 100, tenant_id="acme"), budget("soft", 1, enforcement=SOFT))
    book = LeaseBook(ledger, "edge-1")
    holds = [await book.hold(SCOPE, 10) for _ in range(10)]
    assert ledger.calls.count("lease") <= 3  # leases of several requests each, not one per request
    assert all(h.lease_ids for h in holds)
    with pytest.raises(SwitchyardError) as caught:
        await book.hold(SCOPE, 10)
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BUDGET_EXCEEDED)
    assert error.metadata["budget_id"] == "b" and error.metadata["requested_micros"] == "10"
    # Settling at less than the worst case frees room for more.
    for hold in holds[:5]:
        book.settle(hold, 4)
    assert (await book.hold(SCOPE, 10)).lease_ids
    await book.aclose()


async def test_a_scope_without_hard_budgets_holds_nothing_and_asks_for_no_lease() -> None:
    ledger = FakeLedger(budget("other", 100, tenant_id="someone-else"), budget("soft", 1, enforcement=SOFT))
    book = LeaseBook(ledger, "edge-1")
    hold = await book.hold(SCOPE, 10**9)
    assert hold.lease_ids == [] and "lease" not in ledger.calls
    # The worst case is worked out only when a hard budget needs it.
    worked_out: list[int] = []

    def worst() -> int:
        worked_out.append(10)
        return 10

    assert (await book.hold(SCOPE, worst)).lease_ids == [] and worked_out == []
    covered = LeaseBook(FakeLedger(budget("b", 100, tenant_id="acme")), "edge-2")
    assert (await covered.hold(SCOPE, worst)).lease_ids and worked_out == [10]
    await covered.aclose()
    await book.aclose()


async def test_fails_closed_without_a_ledger_and_serves_on_the_last_state_when_it_goes() -> None:
    ledger = FakeLedger(budget("b", 1000, tenant_id="acme"))
    ledger.down = True
    book = LeaseBook(ledger, "edge-1", directory_refresh_s=0.0)
    with pytest.raises(SwitchyardError) as caught:
        await book.hold(SCOPE, 10)
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
    )
    ledger.down = False
    first = await book.hold(SCOPE, 10)
    ledger.down = True  # the ledger goes away: the lease it granted still admits requests
    second = await book.hold(SCOPE, 10)
    assert first.lease_ids == second.lease_ids
    await asyncio.sleep(0)  # let the background directory reload fail quietly
    await book.aclose()


async def test_a_budget_change_retires_the_lease_and_returns_what_is_left() -> None:
    ledger = FakeLedger(budget("b", 1000, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")
    hold = await book.hold(SCOPE, 10)
    (old,) = hold.lease_ids
    ledger.budgets["b"].version = 2
    await book.load_directory()
    book.settle(hold, 7)
    await asyncio.sleep(0.01)  # the return runs in the background
    assert old not in ledger.leases  # returned once its last request settled
    assert ledger.left["b"] == 1000 - 7 - sum(g for _, g in ledger.leases.values())
    fresh = await book.hold(SCOPE, 10)
    assert fresh.lease_ids != [old]
    await book.aclose()


async def test_a_deleted_budget_no_longer_holds_and_its_lease_goes_back() -> None:
    ledger = FakeLedger(budget("b", 1000, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")
    hold = await book.hold(SCOPE, 10)
    (old,) = hold.lease_ids
    del ledger.budgets["b"]  # DeleteBudget: the next directory no longer lists it
    await book.load_directory()
    leases_asked = ledger.calls.count("lease")
    after = await book.hold(SCOPE, 10_000)  # beyond the old limit: nothing applies now
    assert after.lease_ids == [] and ledger.calls.count("lease") == leases_asked
    book.settle(hold, 7)
    book.settle(after, 0)
    await asyncio.sleep(0.01)  # the return runs in the background
    assert old not in ledger.leases and ledger.left["b"] == 1000 - 7
    await book.aclose()


async def test_a_pushed_directory_retires_leases_at_once_and_replaces_polling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(routes, "RECONNECT_BASE_S", 0.001)
    ledger = FakeLedger(budget("b", 1000, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1", directory_refresh_s=0.0)  # polling would reload every time
    book.start_watching()
    await asyncio.sleep(0)
    ledger.push(version=1)
    await asyncio.sleep(0.01)
    assert book.watching
    hold = await book.hold(SCOPE, 10)
    (old,) = hold.lease_ids
    ledger.budgets["b"].version = 2  # the limit changed on the ledger: pushed, not polled
    ledger.push(version=2)
    await asyncio.sleep(0.01)
    book.settle(hold, 7)
    await asyncio.sleep(0.01)
    assert old not in ledger.leases  # retired by the push and returned once settled
    for _ in range(3):
        book.settle(await book.hold(SCOPE, 10), 0)
    assert ledger.calls.count("list") == 0  # watching: no polling

    ledger.watches[-1].queue.put_nowait(None)  # the stream breaks: polling takes over, then it comes back
    await asyncio.sleep(0.01)
    assert not book.watching and ledger.watches[0].cancelled
    book.settle(await book.hold(SCOPE, 10), 0)
    await asyncio.sleep(0.01)
    assert ledger.calls.count("list") >= 1 and len(ledger.watches) == 2
    ledger.push(version=3)
    await asyncio.sleep(0.01)
    assert book.watching
    await book.aclose()
