"""Budgets on the edge's request path: holds against local leases, refilled ahead of need.

The ledger owns budgets; the edge must not ask it on every request (DESIGN.md: one hop
costs more than our whole latency budget). So the edge keeps two things the ledger gives it:

* the *budget directory*: every budget's id, scope and enforcement, pushed by the ledger on
  every change (`WatchBudgets`; while that stream is down, `ListBudgets` every few seconds in
  the background), so the edge finds the budgets that apply to a request locally. A ledger
  shutting down ends the stream cleanly: the edge resubscribes after the base delay (to
  another replica, through the proxy) and logs it at info;
* *leases*: for each hard budget a request touches, a slice of that budget's remaining
  amount granted to this edge (`LeaseBudget`), with a version and an expiry.

A request holds its worst-case cost against a lease of every hard budget that applies to
it (soft budgets never refuse, so they need no lease; the ledger still charges them and
fires their alerts). When this edge's leases on a budget run low, another is asked for in
the background, sized to this edge's recent rate of spend, so in the common case no request
waits on the ledger. Only when no lease can cover a request does it wait for a refill (one
per budget at a time, shared by every request waiting); if the ledger has nothing left to
grant, the edge first gives back its own idle leases and asks once more, then refuses with
`RESOURCE_EXHAUSTED` / `BUDGET_EXCEEDED`.

After the request, its actual cost is drawn from the leases it held (the ledger does the
same when the commit arrives, naming the lease ids), and the rest of the hold is freed.
A lease that expired or was made stale by a budget change admits nothing more; once its
last request settles, what is left of it is returned. A grant that arrives already stale
(decided before a change this edge has been told of, say a limit lowered while the grant was
on its way) is given back at once, unused, and asked for again. An edge that dies returns
nothing: the ledger takes its leases back at their `settle_by`.

Epochs. A lease is only as good as the hold the ledger keeps for it, and those holds are lost
when the budget store loses its state (a ledger restarted on the in-memory store, a Redis that
lost its data): the ledger would then grant the whole budget again. So every lease names the
store epoch it was granted in, and every pushed directory and lease answer names the epoch now;
as soon as the edge sees a new epoch, its leases of older ones admit nothing more (requests
already admitted on them finish and commit as usual; the ledger records their spend). What was
admitted on old leases -- before the loss, or after it but before this edge heard of the new
epoch, which it cannot do sooner -- is the one exception to the invariant below: the new
epoch's grants do not know of it.

Invariant (the ledger's): the sum of outstanding leases plus committed spend never exceeds a
hard budget; the edge never holds more than a lease has, so it never overruns one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Final, Protocol

import grpc

from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error, is_shutting_down
from switchyard.common.logging import get_logger
from switchyard.common.money import format_usd
from switchyard.edge.routes import reconnect_delay
from switchyard.v1 import ledger_pb2

log = get_logger(__name__)

ScopeKey = tuple[str, str, str, str, str]

# Reload the directory this often (seconds): how soon a new budget reaches the edge.
DIRECTORY_REFRESH_S: Final = 5.0
# Ask for a lease of this many worst-case requests at least...
LEASE_REQUESTS: Final = 8
# ...or this many seconds of this edge's recent spend on the budget, whichever is more.
LEASE_SECONDS: Final = 10.0
# Refill in the background once a budget's leases have less room than this share of the last grant.
REFILL_BELOW: Final = 0.5
# Half-life of the spend-rate average, in seconds.
RATE_HALF_LIFE_S: Final = 5.0
# Asks for a lease that may come back stale before giving up (a ledger replica behind the
# directory this edge has catches up within its next sweep).
STALE_ASKS: Final = 3
_MAX_MEMO: Final = 50_000


class LedgerLeases(Protocol):
    """What the lease book calls on the ledger (a `CostLedgerServiceStub` fits)."""

    def LeaseBudget(
        self,
        request: ledger_pb2.LeaseBudgetRequest,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> grpc.aio.UnaryUnaryCall[ledger_pb2.LeaseBudgetRequest, ledger_pb2.LeaseBudgetResponse]: ...

    def ReturnLease(
        self, request: ledger_pb2.ReturnLeaseRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryUnaryCall[ledger_pb2.ReturnLeaseRequest, ledger_pb2.ReturnLeaseResponse]: ...

    def ListBudgets(
        self,
        request: ledger_pb2.ListBudgetsRequest,
        *,
        timeout: float | None = None,
        wait_for_ready: bool | None = None,
    ) -> grpc.aio.UnaryUnaryCall[ledger_pb2.ListBudgetsRequest, ledger_pb2.ListBudgetsResponse]: ...

    def WatchBudgets(
        self, request: ledger_pb2.WatchBudgetsRequest
    ) -> grpc.aio.UnaryStreamCall[ledger_pb2.WatchBudgetsRequest, ledger_pb2.WatchBudgetsResponse]: ...


def scope_key(scope: ledger_pb2.BudgetScope) -> ScopeKey:
    """The scope as a hashable tuple."""
    return (scope.tenant_id, scope.end_user, scope.api_key_id, scope.model, scope.provider)


def applies(budget_scope: ledger_pb2.BudgetScope, request: ScopeKey) -> bool:
    """Whether a budget on `budget_scope` covers a request on `request`: every field the budget
    names must match (a budget on a tenant covers all its requests; on a tenant and a model,
    only those on the model)."""
    return all(not want or want == have for want, have in zip(scope_key(budget_scope), request, strict=True))


@dataclass(slots=True)
class _Lease:
    lease_id: str
    budget_id: str
    granted: int
    version: int
    expires_at: float  # wall clock, seconds
    epoch: str = ""
    used: int = 0
    inflight: int = 0
    admitting: bool = True

    @property
    def available(self) -> int:
        return self.granted - self.used - self.inflight

    @property
    def unused(self) -> int:
        return self.granted - self.used


@dataclass(slots=True)
class _BudgetState:
    budget: ledger_pb2.Budget
    # Leases that may still admit requests, oldest first; a new grant joins them.
    leases: list[_Lease] = field(default_factory=list)
    draining: list[_Lease] = field(default_factory=list)
    refill: asyncio.Task[None] | None = None
    exhausted: bool = False
    rate: float = 0.0  # micro-USD per second, exponentially averaged (statistics, not money)
    rate_at: float = 0.0
    last_limit: int = 0
    last_spent: int = 0
    last_held: int = 0


@dataclass(slots=True)
class BudgetHold:
    """What one request holds: an amount on one lease of each hard budget that applies."""

    amount: int
    parts: list[_Lease]
    settled: bool = False

    @property
    def lease_ids(self) -> list[str]:
        """The leases this request is charged against, for the ledger commit."""
        return [lease.lease_id for lease in self.parts]


NO_HOLD: Final = BudgetHold(0, [], settled=True)


class LeaseBook:
    """This edge's view of budgets: the directory, its leases and the holds on them."""

    def __init__(
        self,
        ledger: LedgerLeases,
        holder_id: str,
        *,
        call_timeout_s: float = 2.0,
        directory_refresh_s: float = DIRECTORY_REFRESH_S,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self._holder_id = holder_id
        self._timeout = call_timeout_s
        self._refresh_s = directory_refresh_s
        self._clock = clock
        self._monotonic = monotonic
        self._directory: dict[str, ledger_pb2.Budget] | None = None
        self._loaded_at = 0.0
        self._memo: dict[ScopeKey, tuple[str, ...]] = {}
        self._states: dict[str, _BudgetState] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload: asyncio.Task[None] | None = None
        self._load_lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        # True while the ledger pushes the directory (WatchBudgets): no polling then.
        self.watching = False
        self._pushed_version = 0
        # The budget store's epoch as last heard, and the ones before it (never current again).
        self._epoch = ""
        self._old_epochs: set[str] = set()

    # --- the directory -----------------------------------------------------------------

    async def load_directory(self) -> None:
        """Fetch every budget from the ledger (all pages); raises when it cannot be reached."""
        budgets: dict[str, ledger_pb2.Budget] = {}
        token = ""
        while True:
            try:
                # As a lease: ride out a ledger (re)starting, or a connection the ledger just
                # ended, within the timeout rather than fail at once.
                page = await self._ledger.ListBudgets(
                    ledger_pb2.ListBudgetsRequest(page_size=1000, page_token=token),
                    timeout=self._timeout,
                    wait_for_ready=True,
                )
            except grpc.aio.AioRpcError as exc:
                raise _unavailable(from_rpc_error(exc).reason.value) from None
            for budget in page.budgets:
                budgets[budget.budget_id] = budget
            token = page.next_page_token
            if not token:
                break
        self._apply_directory(budgets)

    def _apply_directory(self, budgets: dict[str, ledger_pb2.Budget]) -> None:
        """Use `budgets` from now on: leases of budgets gone, turned soft or changed retire."""
        self._directory = budgets
        self._loaded_at = self._monotonic()
        self._memo.clear()
        for budget_id, state in list(self._states.items()):
            fresh = budgets.get(budget_id)
            if fresh is None or fresh.enforcement != ledger_pb2.BUDGET_ENFORCEMENT_HARD:
                self._retire_all(state)
                del self._states[budget_id]
                continue
            state.budget = fresh
            for lease in list(state.leases):
                if lease.version < fresh.version:
                    self._retire(state, lease)  # the budget changed: this lease is stale

    async def _directory_now(self) -> dict[str, ledger_pb2.Budget]:
        if self._directory is None:
            async with self._load_lock:
                if self._directory is None:
                    await self.load_directory()
        elif (
            not self.watching
            and self._monotonic() - self._loaded_at > self._refresh_s
            and (self._reload is None or self._reload.done())
        ):
            self._reload = self._spawn(self._reload_quietly())
        assert self._directory is not None
        return self._directory

    def start_watching(self) -> None:
        """Follow the ledger's pushed directory (WatchBudgets); polling covers its outages."""
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._follow(), name="budget-watch")

    async def _follow(self) -> None:
        failures = 0
        warned = False  # the loss was logged as a warning (said once per outage)
        while True:
            call = self._ledger.WatchBudgets(ledger_pb2.WatchBudgetsRequest(subscriber_id=self._holder_id))
            status = "ENDED"  # the ledger closed the stream without an error
            try:
                async for response in call:
                    if not response.version:  # a ledger that has not read its budgets yet
                        continue
                    if not self.watching and failures:
                        log.info("budget_watch_resumed", version=response.version)
                    self.watching, failures, warned = True, 0, False
                    self._note_epoch(response.epoch)
                    if response.version != self._pushed_version:  # else a heartbeat
                        self._pushed_version = response.version
                        self._apply_directory({b.budget_id: b for b in response.budgets})
            except grpc.aio.AioRpcError as exc:
                status = "SHUTTING_DOWN" if is_shutting_down(exc) else exc.code().name
            finally:
                call.cancel()
            self.watching = False
            if status in ("ENDED", "SHUTTING_DOWN"):
                # A ledger replica going away (it ends its streams when it drains): not a failure.
                log.info("budget_watch_ended", status=status)
                delay = reconnect_delay(failures)
            else:
                if not warned:
                    log.warning("budget_watch_lost", status=status)
                    warned = True
                delay = reconnect_delay(failures + 1)
            failures += 1
            await asyncio.sleep(delay)

    async def _reload_quietly(self) -> None:
        try:
            await self.load_directory()
        except SwitchyardError as exc:
            # Keep serving on the last directory and leases (DESIGN.md); say so in the log.
            log.warning("budget_directory_stale", reason=exc.reason.value)
            self._loaded_at = self._monotonic()

    def hard_budgets(self, directory: dict[str, ledger_pb2.Budget], key: ScopeKey) -> tuple[str, ...]:
        """The hard budgets that apply to a request scope (memoised per scope)."""
        found = self._memo.get(key)
        if found is None:
            found = tuple(
                b.budget_id
                for b in directory.values()
                if b.enforcement == ledger_pb2.BUDGET_ENFORCEMENT_HARD and applies(b.scope, key)
            )
            if len(self._memo) >= _MAX_MEMO:
                self._memo.clear()
            self._memo[key] = found
        return found

    # --- holds ---------------------------------------------------------------------------

    async def hold(self, scope: ledger_pb2.BudgetScope, amount: int | Callable[[], int]) -> BudgetHold:
        """Hold `amount` micro-USD against every hard budget on `scope`; raises BUDGET_EXCEEDED.

        `amount` may be a function, called only when a hard budget applies (working out a
        request's worst case is skipped for the many requests no hard budget covers).
        """
        directory = await self._directory_now()
        key = scope_key(scope)
        budget_ids = self.hard_budgets(directory, key)
        if not budget_ids:
            return BudgetHold(0, [])
        if callable(amount):
            amount = amount()
        parts: list[_Lease] = []
        try:
            for budget_id in budget_ids:
                state = self._states.get(budget_id)
                if state is None:
                    state = self._states[budget_id] = _BudgetState(directory[budget_id])
                lease = await self._lease_for(state, scope, amount)
                lease.inflight += amount
                parts.append(lease)
                self._note_spend(state, amount)
                room = sum(held.available for held in state.leases)
                if state.refill is None and room < REFILL_BELOW * lease.granted:
                    state.refill = self._spawn(self._refill(state, scope, amount, quiet=True))
        except BaseException:
            for lease in parts:
                lease.inflight -= amount
            raise
        return BudgetHold(amount, parts)

    def settle(self, hold: BudgetHold, actual_micros: int) -> list[str]:
        """Draw the actual cost from the hold's leases and free the rest; returns the lease ids
        for the ledger commit (which draws the same amounts). Settling twice does nothing."""
        if hold.settled:
            return []
        hold.settled = True
        for lease in hold.parts:
            lease.inflight -= hold.amount
            lease.used += min(actual_micros, lease.granted - lease.used)
            self._maybe_return(lease)
        return hold.lease_ids

    def release(self, hold: BudgetHold) -> None:
        """Free a hold whose request was not sent or not charged."""
        self.settle(hold, 0)

    async def _lease_for(self, state: _BudgetState, scope: ledger_pb2.BudgetScope, amount: int) -> _Lease:
        """The lease to hold `amount` on: one of ours with room, else a fresh one.

        One request for a lease per budget is in flight at a time: requests that find the
        lease dry while a refill is under way wait for that refill instead of each asking.
        """
        gave_back = False
        while True:
            lease = self._usable(state, amount)
            if lease is not None:
                return lease
            refill = state.refill
            if refill is None or refill.done():
                refill = state.refill = self._spawn(self._refill(state, scope, amount, quiet=False))
            await asyncio.shield(refill)
            lease = self._usable(state, amount)
            if lease is not None:
                return lease
            # Every grant is at least one request's worth, so each round either admits
            # someone or finds the budget exhausted: the loop ends.
            if not state.exhausted:
                continue
            if gave_back:
                raise _budget_exceeded(state, amount)
            # What is left may sit in our own idle leases: give it back and ask once more.
            gave_back = True
            if not await self._give_back_idle(state):
                raise _budget_exceeded(state, amount)

    def _usable(self, state: _BudgetState, amount: int) -> _Lease | None:
        """The oldest admitting lease with room for `amount`; expired ones are retired."""
        now = self._clock()
        for lease in list(state.leases):
            if now >= lease.expires_at:
                self._retire(state, lease)
            elif lease.available >= amount:
                return lease
        return None

    async def _acquire(
        self, state: _BudgetState, scope: ledger_pb2.BudgetScope, amount: int
    ) -> _Lease | None:
        """Ask the ledger for a lease on this budget; the new one joins this edge's leases.

        A grant that is stale on arrival (an older budget version or store epoch than this edge
        already knows) is returned unused and asked for again: admitting on it could overrun
        the budget as it is now. Raises DEPENDENCY_UNAVAILABLE when every ask came back stale.
        """
        wanted = max(amount * LEASE_REQUESTS, int(state.rate * LEASE_SECONDS), amount)
        request = ledger_pb2.LeaseBudgetRequest(
            holder_id=self._holder_id,
            scope=scope,
            requested_micros=wanted,
            budget_ids=[state.budget.budget_id],
            min_micros=amount,
        )
        for _ in range(STALE_ASKS):
            try:
                # A request may wait on this call: ride out a ledger restart (the channel is
                # reconnecting) within the timeout rather than fail at once.
                response = await self._ledger.LeaseBudget(request, timeout=self._timeout, wait_for_ready=True)
            except grpc.aio.AioRpcError as exc:
                raise _unavailable(from_rpc_error(exc).reason.value) from None
            self._note_epoch(response.epoch)
            granted = next((g for g in response.leases if g.budget_id == state.budget.budget_id), None)
            if granted is None:
                return None
            lease = _Lease(
                lease_id=granted.lease_id,
                budget_id=granted.budget_id,
                granted=granted.amount_micros,
                version=granted.version,
                expires_at=granted.expires_at.ToSeconds() + granted.expires_at.nanos / 1e9,
                epoch=granted.epoch,
            )
            # Read after the await: a push may have changed the budget while the call was out.
            if granted.version < state.budget.version or (granted.epoch and granted.epoch != self._epoch):
                if lease.granted > 0 and lease.lease_id:
                    await self._return(lease)
                continue
            state.last_limit, state.last_spent = granted.limit_micros, granted.spent_micros
            state.last_held = granted.held_micros
            if lease.granted <= 0 or not lease.lease_id:
                return None
            state.leases.append(lease)
            return lease
        log.warning("budget_lease_stale", budget_id=state.budget.budget_id, asks=STALE_ASKS)
        raise _unavailable("STALE_LEASE", "the cost ledger's budgets are behind this edge's")

    async def _refill(
        self, state: _BudgetState, scope: ledger_pb2.BudgetScope, amount: int, *, quiet: bool
    ) -> None:
        """Ask for a lease; `exhausted` says whether the ledger had nothing left to grant.
        A request waiting on it gets the ledger's failure; a refill ahead of need only logs."""
        try:
            state.exhausted = await self._acquire(state, scope, amount) is None
        except SwitchyardError as exc:
            if not quiet:
                raise
            log.warning("budget_refill_failed", budget_id=state.budget.budget_id, reason=exc.reason.value)
        finally:
            state.refill = None

    async def _give_back_idle(self, state: _BudgetState) -> bool:
        """Return what idle leases of this budget hold, so the ledger can grant it as one piece."""
        # Taken all at once, before the first await: a lease still admitting while an earlier
        # one's return is on the way could take a request whose share would then go back too.
        taken = [
            (lease, self._take(lease))
            for lease in (*state.leases, *state.draining)
            if not lease.inflight and lease.unused
        ]
        await asyncio.gather(*(self._send_return(lease, unused) for lease, unused in taken))
        return bool(taken)

    def _note_epoch(self, epoch: str) -> None:
        """Follow the budget store's epoch (module docstring): on a new one, leases of older
        epochs admit nothing more. An epoch this edge has left is old news, never current again."""
        if not epoch or epoch == self._epoch or epoch in self._old_epochs:
            return
        if self._epoch:
            self._old_epochs.add(self._epoch)
        self._epoch = epoch
        retired = 0
        for state in self._states.values():
            for lease in list(state.leases):
                if lease.epoch != epoch:
                    self._retire(state, lease)
                    retired += 1
        if retired:
            log.warning("budget_leases_retired", cause="store_epoch", leases=retired)

    def _note_spend(self, state: _BudgetState, amount: int) -> None:
        now = self._monotonic()
        if state.rate_at:
            decay = 0.5 ** ((now - state.rate_at) / RATE_HALF_LIFE_S)
            state.rate = state.rate * decay + amount * (1 - decay) / max(now - state.rate_at, 1e-3)
        state.rate_at = now

    # --- giving leases back --------------------------------------------------------------

    def _retire(self, state: _BudgetState, lease: _Lease) -> None:
        lease.admitting = False
        if lease in state.leases:
            state.leases.remove(lease)
        if lease not in state.draining:
            state.draining.append(lease)
        self._maybe_return(lease)

    def _retire_all(self, state: _BudgetState) -> None:
        for lease in list(state.leases):
            self._retire(state, lease)

    def _maybe_return(self, lease: _Lease) -> None:
        if not lease.admitting and lease.inflight == 0:
            state = self._states.get(lease.budget_id)
            if state is not None and lease in state.draining:
                state.draining.remove(lease)
            if lease.unused > 0:
                self._spawn(self._send_return(lease, self._take(lease)))

    async def _return(self, lease: _Lease) -> None:
        await self._send_return(lease, self._take(lease))

    def _take(self, lease: _Lease) -> int:
        """Stop `lease` admitting and take what it has free, to give back. What requests in
        flight hold stays: the ledger draws their cost from its hold of the lease when their
        commits arrive (giving it back too would let their spend pass the budget); what they
        leave unused goes back once they settle."""
        unused = lease.available
        lease.used += unused  # nothing more can be drawn from it here
        lease.admitting = False
        state = self._states.get(lease.budget_id)
        if state is not None:
            for pool in (state.leases, state.draining):
                if lease in pool:
                    pool.remove(lease)
        return unused

    async def _send_return(self, lease: _Lease, unused: int) -> None:
        if unused <= 0:
            return
        try:
            await self._ledger.ReturnLease(
                ledger_pb2.ReturnLeaseRequest(lease_id=lease.lease_id, unused_micros=unused),
                timeout=self._timeout,
            )
        except grpc.aio.AioRpcError as exc:
            # The ledger takes it back at the lease's settle_by anyway.
            log.info("lease_return_failed", lease_id=lease.lease_id, code=exc.code().name)

    def _spawn(self, work: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def leases(self) -> Iterable[tuple[str, int, int]]:
        """(budget id, lease unused, in flight) of every live lease, for stats and tests."""
        for budget_id, state in self._states.items():
            for lease in (*state.leases, *state.draining):
                yield budget_id, lease.unused, lease.inflight

    async def aclose(self) -> None:
        """Return every lease's unused part (best effort) and stop background work."""
        for state in self._states.values():
            for lease in (*state.leases, *state.draining):
                if lease.unused > 0 and lease.inflight == 0:
                    lease.admitting = False
                    await self._return(lease)
        tasks = [*self._tasks]
        if self._watch is not None:
            tasks.append(self._watch)
            self._watch = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _budget_exceeded(state: _BudgetState, amount: int) -> SwitchyardError:
    """The refusal, with the budget as the ledger last saw it (the same metadata as its own)."""
    budget = state.budget
    limit = state.last_limit or budget.limit_micros
    return SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.BUDGET_EXCEEDED,
        f"budget {budget.budget_id} cannot cover this request: its worst case is {format_usd(amount)}, "
        f"and {format_usd(state.last_spent)} of {format_usd(limit)} is spent and "
        f"{format_usd(state.last_held)} held for requests in flight",
        metadata={
            "budget_id": budget.budget_id,
            "limit_micros": str(limit),
            "spent_micros": str(state.last_spent),
            "held_micros": str(state.last_held),
            "requested_micros": str(amount),
        },
    )


def _unavailable(cause: str, why: str = "the cost ledger is unreachable") -> SwitchyardError:
    return SwitchyardError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
        f"budgets cannot be checked: {why}",
        metadata={"dependency": "cost-ledger", "cause": cause},
        retry_after_s=1.0,
    )
