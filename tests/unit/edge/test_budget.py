"""The edge's lease book against a small fake ledger that grants like the real one."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
from google.protobuf import timestamp_pb2

from switchyard.common.errors import Reason, SwitchyardError, shutting_down
from switchyard.common.ports import free_port
from switchyard.edge import budget as budget_module
from switchyard.edge import routes
from switchyard.edge.budget import LEASE_REQUESTS, LEASE_SECONDS, LeaseBook, applies, scope_key
from switchyard.v1 import ledger_pb2, ledger_pb2_grpc

HARD = ledger_pb2.BUDGET_ENFORCEMENT_HARD
SOFT = ledger_pb2.BUDGET_ENFORCEMENT_SOFT


def _down() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down")


class FakeWatch:
    """A WatchBudgets call: yields what is pushed, fails when told to."""

    def __init__(self) -> None:
        # A directory to yield, None to fail, or an exception to raise (StopAsyncIteration:
        # the ledger ends the stream cleanly).
        self.queue: asyncio.Queue[ledger_pb2.WatchBudgetsResponse | BaseException | None] = asyncio.Queue()
        self.cancelled = False

    def __aiter__(self) -> FakeWatch:
        return self

    async def __anext__(self) -> ledger_pb2.WatchBudgetsResponse:
        item = await self.queue.get()
        if item is None:
            raise _down()
        if isinstance(item, BaseException):
            raise item
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
        self.requested: list[int] = []  # what each LeaseBudget asked for
        self.down = False
        self.watches: list[FakeWatch] = []
        self.epoch = "epoch-1"
        # Run after a grant is decided, before it is answered (a race on the way back).
        self.on_grant: Callable[[], Awaitable[None]] | None = None
        # Run before a return is taken in (a return still on its way).
        self.on_return: Callable[[], Awaitable[None]] | None = None
        self.returned: dict[str, int] = {}  # lease id -> unused given back

    def set_limit(self, budget_id: str, limit: int) -> None:
        """Change a budget's limit (a new version); what is left moves by the difference."""
        changed = self.budgets[budget_id]
        self.left[budget_id] += limit - changed.limit_micros
        changed.limit_micros = limit
        changed.version += 1

    def restart(self) -> None:
        """A ledger restarted on the in-memory store: its leases' holds are gone, a new epoch."""
        self.epoch += "-restarted"
        self.leases.clear()
        self.left = {b.budget_id: b.limit_micros for b in self.budgets.values()}

    async def ListBudgets(
        self,
        request: ledger_pb2.ListBudgetsRequest,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
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
            ledger_pb2.WatchBudgetsResponse(
                budgets=list(self.budgets.values()), version=version, epoch=self.epoch
            )
        )

    async def LeaseBudget(
        self,
        request: ledger_pb2.LeaseBudgetRequest,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> ledger_pb2.LeaseBudgetResponse:
        self.calls.append("lease")
        self.requested.append(request.requested_micros)
        if self.down:
            raise _down()
        await asyncio.sleep(0)
        response = ledger_pb2.LeaseBudgetResponse(epoch=self.epoch)
        for budget_id in request.budget_ids:
            grant = max(0, min(request.requested_micros, self.left[budget_id]))
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
                    epoch=self.epoch,
                )
            )
        if self.on_grant is not None:
            await self.on_grant()
        return response

    async def ReturnLease(
        self, request: ledger_pb2.ReturnLeaseRequest, *, timeout: float | None = None
    ) -> ledger_pb2.ReturnLeaseResponse:
        self.calls.append("return")
        if self.on_return is not None:
            await self.on_return()
        self.returned[request.lease_id] = self.returned.get(request.lease_id, 0) + request.unused_micros
        if request.lease_id not in self.leases:  # unknown here (granted before a restart)
            return ledger_pb2.ReturnLeaseResponse(returned_micros=0)
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


class RecordingLog:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def info(self, event: str, **fields: object) -> None:
        self.events.append(("info", event))

    def warning(self, event: str, **fields: object) -> None:
        self.events.append(("warning", event))


def _shutting_down() -> grpc.aio.AioRpcError:
    refusal = shutting_down("ledger")
    return grpc.aio.AioRpcError(
        refusal.code, grpc.aio.Metadata(), grpc.aio.Metadata(*refusal.trailing_metadata()), refusal.message
    )


@pytest.mark.parametrize("end", ["clean", "shutting_down"])
async def test_a_ledger_going_away_is_resubscribed_after_the_base_delay_without_a_warning(
    monkeypatch: pytest.MonkeyPatch, end: str
) -> None:
    # A draining ledger ends the stream cleanly, and refuses new ones as shutting down: the
    # edge resubscribes (through the proxy, to another replica) after the shortest delay.
    log = RecordingLog()
    monkeypatch.setattr(budget_module, "log", log)
    monkeypatch.setattr(routes, "RECONNECT_BASE_S", 0.001)
    asked: list[int] = []

    def delay(failures: int) -> float:
        asked.append(failures)
        return routes.reconnect_delay(failures)

    monkeypatch.setattr(budget_module, "reconnect_delay", delay)
    ledger = FakeLedger(budget("b", 1000, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")
    book.start_watching()
    await asyncio.sleep(0)
    ledger.push(version=1)
    await asyncio.sleep(0.01)
    assert book.watching
    ledger.watches[-1].queue.put_nowait(StopAsyncIteration() if end == "clean" else _shutting_down())
    for _ in range(100):
        if len(ledger.watches) == 2:
            break
        await asyncio.sleep(0.001)
    ledger.push(version=2)
    await asyncio.sleep(0.01)
    assert book.watching
    await book.aclose()
    assert asked == [0]  # the base delay: no failure before it
    assert log.events == [("info", "budget_watch_ended"), ("info", "budget_watch_resumed")]


async def test_a_grant_decided_before_a_pushed_change_is_returned_unused_and_asked_again() -> None:
    # The limit is lowered while a grant made under the old one is on its way back, and the
    # edge hears of the change first: admitting on that grant could overrun the new limit.
    ledger = FakeLedger(budget("b", 1000, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")
    book.start_watching()
    await asyncio.sleep(0)
    ledger.push(version=1)
    await asyncio.sleep(0.01)
    stale: list[str] = []

    async def lower_the_limit_meanwhile() -> None:
        ledger.on_grant = None
        stale.extend(ledger.leases)  # the grant just made, under the old limit
        ledger.set_limit("b", 30)
        ledger.push(version=2)
        await asyncio.sleep(0.01)  # the edge applies the change before the grant arrives

    ledger.on_grant = lower_the_limit_meanwhile
    admitted = [await book.hold(SCOPE, 10)]
    (old,) = stale
    assert admitted[0].lease_ids != [old] and old not in ledger.leases  # given back, unused
    assert ledger.calls.count("lease") == 2 and ledger.calls.count("return") == 1
    with pytest.raises(SwitchyardError) as caught:
        for _ in range(20):
            admitted.append(await book.hold(SCOPE, 10))
    # The new limit's 30, and nothing of the 80 granted under the old one.
    assert len(admitted) == 3
    assert caught.value.reason is Reason.BUDGET_EXCEEDED and caught.value.metadata["limit_micros"] == "30"
    await book.aclose()


async def test_a_new_store_epoch_retires_the_old_leases_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(routes, "RECONNECT_BASE_S", 0.001)
    ledger = FakeLedger(budget("b", 100, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")
    book.start_watching()
    await asyncio.sleep(0)
    ledger.push(version=1)
    await asyncio.sleep(0.01)
    in_flight = await book.hold(SCOPE, 10)
    (old,) = in_flight.lease_ids  # 80 of the 100, 70 of it still free
    ledger.restart()  # the ledger lost the lease's hold: all 100 may be granted again
    ledger.watches[-1].queue.put_nowait(None)  # the stream ended with the old process
    await asyncio.sleep(0.01)
    ledger.push(version=2)  # the restarted ledger's directory, in its new epoch
    await asyncio.sleep(0.01)
    admitted = []
    with pytest.raises(SwitchyardError) as caught:
        for _ in range(20):
            admitted.append(await book.hold(SCOPE, 10))
    assert caught.value.reason is Reason.BUDGET_EXCEEDED
    # Only what the new epoch granted was admitted; the old lease's 70 admitted nothing more.
    assert len(admitted) == 10 and all(hold.lease_ids != [old] for hold in admitted)
    # The request admitted before the restart still settles, and commits naming its lease.
    assert book.settle(in_flight, 7) == [old]
    await book.aclose()


async def test_a_lease_answer_in_a_new_epoch_retires_old_leases_and_a_lost_epoch_stays_lost() -> None:
    ledger = FakeLedger(budget("b", 10_000, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")  # not watching: only lease answers tell it the epoch
    first = await book.hold(SCOPE, 10)
    (old,) = first.lease_ids  # 80, with room for 7 more such requests
    ledger.restart()
    big = await book.hold(SCOPE, 100)  # more than the old lease has: a lease answer, new epoch
    assert big.lease_ids != [old]
    # The old lease (the oldest, with room) would come first; it admits nothing any more.
    assert (await book.hold(SCOPE, 10)).lease_ids == big.lease_ids
    # A replica still answering in the lost epoch: its grants are given back, never used.
    ledger.epoch = "epoch-1"
    with pytest.raises(SwitchyardError) as caught:
        await book.hold(SCOPE, 750)  # more than the current lease has left
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
    )
    assert ledger.left["b"] == 10_000 - 800  # only the current epoch's lease is out
    assert (await book.hold(SCOPE, 10)).lease_ids == big.lease_ids
    assert book.settle(first, 10) == [old]
    await book.aclose()


async def test_the_lease_asked_for_follows_the_edges_recent_rate_of_spend() -> None:
    now = [0.0]
    ledger = FakeLedger(budget("b", 10**12, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1", monotonic=lambda: now[0])
    worst = 1000

    async def requests(count: int, every_s: float) -> None:
        for _ in range(count):
            book.settle(await book.hold(SCOPE, worst), worst)
            now[0] += every_s

    # A quiet edge (a request a minute) asks for LEASE_REQUESTS worst cases each time.
    await requests(30, every_s=60.0)
    assert len(ledger.requested) > 1 and set(ledger.requested) == {LEASE_REQUESTS * worst}
    # A busy one (two a second) for LEASE_SECONDS of its spend, once its average has caught up.
    ledger.requested.clear()
    await requests(200, every_s=0.5)
    steady = LEASE_SECONDS * worst / 0.5
    assert steady > LEASE_REQUESTS * worst and len(ledger.requested) > 1
    assert ledger.requested == sorted(ledger.requested)  # growing with the average
    assert 0.95 * steady <= ledger.requested[-1] <= steady
    # Quiet again: back to LEASE_REQUESTS worst cases.
    ledger.requested.clear()
    await requests(60, every_s=60.0)
    assert ledger.requested and set(ledger.requested) == {LEASE_REQUESTS * worst}
    await book.aclose()


async def test_an_idle_lease_too_small_for_a_request_is_given_back_so_the_request_fits() -> None:
    # The rest of the budget sits in this edge's one idle lease, which is too small for the
    # next request: the ledger can grant it only once the lease is back, as one piece.
    ledger = FakeLedger(budget("b", 100, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1")
    first = await book.hold(SCOPE, 40)
    (small,) = first.lease_ids  # 80 (two requests of 40); 20 left at the ledger
    book.settle(first, 30)  # 50 left in the lease, nothing in flight on it
    assert ledger.left["b"] == 20
    bigger = await book.hold(SCOPE, 60)  # 70 of the budget is left: 50 in the lease, 20 not leased
    assert bigger.lease_ids != [small] and small not in ledger.leases
    assert ledger.calls[-3:] == ["lease", "return", "lease"]
    book.settle(bigger, 60)
    with pytest.raises(SwitchyardError) as caught:  # 10 left: no request of 60 fits any more
        await book.hold(SCOPE, 60)
    assert caught.value.reason is Reason.BUDGET_EXCEEDED
    await book.aclose()


async def test_idle_leases_given_back_take_no_request_while_the_first_return_is_on_its_way() -> None:
    # Two idle leases go back when a request finds no room. A request that still fit one of
    # them while the other's return was on its way would have its share given back with it:
    # the ledger then charges its commit beyond what it holds, and the budget overruns.
    ledger = FakeLedger(budget("b", 100, tenant_id="acme"))
    book = LeaseBook(ledger, "edge-1", monotonic=lambda: 0.0)
    holds = [await book.hold(SCOPE, 10) for _ in range(5)]  # the 5th refills: 80 + 20
    for _ in range(5):
        await asyncio.sleep(0)  # the refill, in the background
    grants = dict(ledger.leases)
    assert ledger.left["b"] == 0 and sorted(g for _, g in grants.values()) == [20, 80]
    for hold in holds:
        book.settle(hold, 10)  # idle: 30 free in the first lease, 20 in the second
    gate, returning = asyncio.Event(), asyncio.Event()

    async def slow_return() -> None:
        returning.set()
        await gate.wait()

    ledger.on_return = slow_return
    big = asyncio.ensure_future(book.hold(SCOPE, 35))  # fits neither: both leases go back
    await asyncio.wait_for(returning.wait(), 5)
    small = asyncio.ensure_future(book.hold(SCOPE, 15))
    for _ in range(20):
        await asyncio.sleep(0)
    gate.set()
    settled: dict[str, int] = {}
    for task in (big, small):
        try:
            hold = await task
        except SwitchyardError as exc:
            assert exc.reason is Reason.BUDGET_EXCEEDED
            continue
        book.settle(hold, hold.amount)
        for lease_id in hold.lease_ids:
            settled[lease_id] = settled.get(lease_id, 0) + hold.amount
    await book.aclose()
    # What the ledger was told back plus what was charged on each lease is what it granted.
    for lease_id, (_, granted) in grants.items():
        assert (
            ledger.returned.get(lease_id, 0)
            + 10 * sum(1 for h in holds if lease_id in h.lease_ids)
            + settled.get(lease_id, 0)
            <= granted
        )


class _LedgerServer(ledger_pb2_grpc.CostLedgerServiceServicer):
    """The fake ledger behind a real gRPC server (WatchBudgets left UNIMPLEMENTED: polling)."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger = ledger

    async def ListBudgets(
        self, request: ledger_pb2.ListBudgetsRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListBudgetsResponse:
        return await self.ledger.ListBudgets(request)

    async def LeaseBudget(
        self, request: ledger_pb2.LeaseBudgetRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.LeaseBudgetResponse:
        return await self.ledger.LeaseBudget(request)

    async def ReturnLease(
        self, request: ledger_pb2.ReturnLeaseRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ReturnLeaseResponse:
        return await self.ledger.ReturnLease(request)


async def _serve(ledger: FakeLedger, port: int) -> grpc.aio.Server:
    server = grpc.aio.server()
    ledger_pb2_grpc.add_CostLedgerServiceServicer_to_server(_LedgerServer(ledger), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}") == port
    await server.start()
    return server


async def test_a_lease_asked_while_the_ledger_restarts_waits_for_it_within_the_timeout() -> None:
    """Over real gRPC: the ledger goes away and comes back half a second later. A request that
    needs a lease meanwhile waits for the channel to reconnect (within the call timeout) instead
    of failing UNAVAILABLE at once because the channel is between connection attempts."""
    ledger = FakeLedger(budget("b", 1_000, tenant_id="acme"))
    port = free_port()
    server = await _serve(ledger, port)
    channel = grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.initial_reconnect_backoff_ms", 200)]
    )
    book = LeaseBook(ledger_pb2_grpc.CostLedgerServiceStub(channel), "edge-1", call_timeout_s=5.0)
    try:
        # The whole budget, spent: the next hold needs a new lease (the restarted fake grants
        # its limit again, as an in-memory ledger rebuilt from no rows would).
        book.settle(await book.hold(SCOPE, 1_000), 1_000)
        await server.stop(grace=None)
        await asyncio.sleep(0.1)

        async def restart() -> grpc.aio.Server:
            await asyncio.sleep(0.5)
            ledger.restart()
            return await _serve(ledger, port)

        comeback = asyncio.create_task(restart())
        hold = await book.hold(SCOPE, 100)
        assert hold.lease_ids
        server = await comeback
    finally:
        await book.aclose()
        await channel.close()
        await server.stop(grace=None)
