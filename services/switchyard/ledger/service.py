"""The CostLedgerService: prices and estimates, budgets (leases, reservations, commits), the
per-request history, alerts and reports.

Where each part lives:

* `ledger.pricing` / `ledger.tokens`: the price in effect, volume discounts, token counts
  and estimates -- the same library the edge evaluates locally;
* `ledger.history.LedgerStore`: SQL (one row per request, unique by request id; budget
  definitions and their audit log; reports, CSV, erasure);
* `ledger.budgets.BudgetStore`: the budget counters, reservations and leases (Redis Lua with
  `REDIS_URL`, in memory otherwise), atomic so a hard budget is never overrun;
* `ledger.alerts.AlertCenter`: 80/90/100 % thresholds once per window, signed webhooks.

A commit writes the row first (the truth; a duplicate request id stops there, charging
nothing), then settles the budget counters, then lets the alert center look at the new
totals. A ledger that restarts with the in-memory store rebuilds each budget's spend in
its current window from the rows. Its leases' holds are gone with the old process, so the
store's epoch is new: every lease and every pushed directory carries the epoch, and edges
stop admitting on leases of an older one (`edge.budget`).

At shutdown (`CostLedgerServicer.drain`) `WatchBudgets` streams end at once and each
`CommitStream` once the batch it is committing is answered, cleanly, and new ones are refused;
an edge's outbox sends an unanswered batch again on a new stream, so, commits being idempotent
by request id, nothing is lost or charged twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import Final, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from switchyard.common import tracing
from switchyard.common.catalog import Catalog
from switchyard.common.drain import DRAINED, StreamDrain
from switchyard.common.errors import Reason, SwitchyardError, check_text, invalid
from switchyard.common.logging import get_logger
from switchyard.common.money import TokenCounts, format_usd
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.common.sql import Database, open_database
from switchyard.common.tasks import cancel_all
from switchyard.edge.budget import applies, scope_key
from switchyard.ledger.alerts import AlertCenter
from switchyard.ledger.budgets import (
    MAX_MICROS,
    BudgetRef,
    BudgetStore,
    BudgetStoreUnavailable,
    CountersLost,
    HoldConflict,
    RebuildClaim,
    build_budget_store,
)
from switchyard.ledger.history import Holds, LedgerStore
from switchyard.ledger.pricing import charge_micros, estimate_cost
from switchyard.v1 import common_pb2, gateway_pb2, ledger_pb2, ledger_pb2_grpc

log = get_logger(__name__)
_T = TypeVar("_T")

# A stored row still unsettled after this long was not settled by its commit.
UNSETTLED_AFTER_S: Final = 2.0
SERVICE_NAME: Final = ledger_pb2.DESCRIPTOR.services_by_name["CostLedgerService"].full_name
# A WatchBudgets stream with no change says the directory again this often (Envoy, between
# an edge and the ledger in a cluster, ends streams idle for 5 minutes).
WATCH_HEARTBEAT_S: Final = 60.0
# How long a reservation lives when the caller does not say.
DEFAULT_RESERVATION_TTL_S: Final = 300
MAX_RESERVATION_TTL_S: Final = 3600
# Counters outlive their window by this much (late commits, reports of the last window).
COUNTER_RETENTION: Final = timedelta(days=7)
# A lease takes at most this share of what a hard budget has left, so a small budget is not
# stranded in one edge while another edge starves.
LEASE_SHARE: Final = Fraction(1, 2)
# Extra time, past a lease's admission window and the longest request, for its commits to arrive.
SETTLE_GRACE_S: Final = 60.0
MAX_URL_CHARS: Final = 2048
# A rebuild of the budget counters renews its claim this often (it lapses after 30 s).
REBUILD_RENEW_S: Final = 5.0
# Cache statuses whose answer cost nothing upstream.
_FREE_STATUSES: Final = frozenset(
    {
        common_pb2.CACHE_STATUS_HIT_EXACT,
        common_pb2.CACHE_STATUS_HIT_SEMANTIC,
        common_pb2.CACHE_STATUS_DEDUPLICATED,
    }
)
_BUDGETS_REFRESH_S: Final = 5.0
# A tenant's monthly tokens on a model are re-read from SQL this often: other replicas commit
# too, and a cache only this replica adds to would drift from the truth for the whole month.
_VOLUMES_REFRESH_S: Final = 5.0
_MAX_CACHED_VOLUMES: Final = 100_000


def window_bounds(window: ledger_pb2.BudgetWindow.ValueType, at: datetime) -> tuple[str, datetime, datetime]:
    """The window containing `at` (UTC calendar day or month): its key, start and end."""
    at = at.astimezone(UTC)
    if window == ledger_pb2.BUDGET_WINDOW_DAILY:
        start = datetime(at.year, at.month, at.day, tzinfo=UTC)
        return start.strftime("%Y-%m-%d"), start, start + timedelta(days=1)
    start = datetime(at.year, at.month, 1, tzinfo=UTC)
    end = datetime(at.year + (at.month == 12), at.month % 12 + 1, 1, tzinfo=UTC)
    return start.strftime("%Y-%m"), start, end


def budget_ref(budget: ledger_pb2.Budget, at: datetime) -> BudgetRef:
    """The counter of `budget` for the window containing `at`."""
    key, _, end = window_bounds(budget.window, at)
    return BudgetRef(
        budget_id=budget.budget_id,
        window_key=key,
        limit_micros=budget.limit_micros,
        hard=budget.enforcement == ledger_pb2.BUDGET_ENFORCEMENT_HARD,
        expires_at_ms=_ms(end + COUNTER_RETENTION),
    )


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _timestamp(ms: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(ms)
    return stamp


def _now() -> datetime:
    return datetime.now(UTC)


def record_scope(record: ledger_pb2.UsageRecord) -> ledger_pb2.BudgetScope:
    """A record's scope with the model and provider that answered filled in."""
    scope = ledger_pb2.BudgetScope()
    scope.CopyFrom(record.scope)
    scope.model = scope.model or record.model
    scope.provider = scope.provider or record.provider
    return scope


class Ledger:
    """The ledger's logic, independent of gRPC (the servicer is a thin skin over it)."""

    def __init__(
        self,
        catalog: Catalog,
        history: LedgerStore,
        store: BudgetStore,
        alerts: AlertCenter,
        *,
        lease_ttl_s: float,
        settle_after_s: float,
        expire_after_start_s: float = 0.0,
    ) -> None:
        self.catalog = catalog
        self.history = history
        self.store = store
        if expire_after_start_s > 0:
            # Expired holds stay until then: commits held back while this ledger was down still
            # draw their cost from them (`ledger_expire_after_start_s`).
            store.keep_expired_holds(until_ms=_ms(_now()) + int(expire_after_start_s * 1000))
        self.alerts = alerts
        self._lease_ttl_ms = int(lease_ttl_s * 1000)
        self._settle_ms = int((lease_ttl_s + settle_after_s + SETTLE_GRACE_S) * 1000)
        self._budgets: list[ledger_pb2.Budget] = []
        self._budgets_at = 0.0
        # The directory pushed to edges (WatchBudgets): its version and the subscribers' queues.
        self._directory = ledger_pb2.WatchBudgetsResponse()
        self._watchers: set[asyncio.Queue[ledger_pb2.WatchBudgetsResponse]] = set()
        self._rebuilding: asyncio.Task[bool] | None = None
        # (tenant, model, month key) -> (tokens, monotonic time they were read from SQL).
        self._volumes: dict[tuple[str, str, str], tuple[int, float]] = {}

    async def aclose(self) -> None:
        """Stop a rebuild under way (its claim given up, another replica takes it over), then
        close the alert center and the budget store."""
        if self._rebuilding is not None and not self._rebuilding.done():
            await cancel_all([self._rebuilding])
        await self.alerts.aclose()
        await self.store.aclose()

    # --- budgets ---------------------------------------------------------------------------

    async def refresh_budgets(self) -> None:
        """Reload budget definitions from SQL (other ledger replicas may have changed them) and
        the store's epoch; a change goes to every WatchBudgets subscriber."""
        budgets = await self.history.all_budgets()
        self._budgets = budgets
        self._budgets_at = time.monotonic()
        try:
            epoch = await self.store.epoch()
        except BudgetStoreUnavailable:
            epoch = self._directory.epoch  # kept until the store answers again
        # Every time, not only when the epoch changed: a replica whose rebuild failed, or
        # lapsed, must not leave the counters lost until the next loss. In the background:
        # commits reloading their budgets must not wait for it.
        self._rebuild_task()
        if (
            [(b.budget_id, b.version) for b in budgets]
            == [(b.budget_id, b.version) for b in self._directory.budgets]
            and epoch == self._directory.epoch
            and self._directory.version
        ):
            return
        self._publish(budgets, epoch)

    def _publish(self, budgets: Sequence[ledger_pb2.Budget], epoch: str) -> None:
        """Push a new directory to every WatchBudgets subscriber."""
        if epoch != self._directory.epoch and self._directory.epoch:
            log.warning("budget_store_epoch_changed")
        self._directory = ledger_pb2.WatchBudgetsResponse(
            budgets=budgets, version=max(self._directory.version + 1, int(time.time() * 1000)), epoch=epoch
        )
        for queue in self._watchers:
            while not queue.empty():  # only the newest directory matters
                queue.get_nowait()
            queue.put_nowait(self._directory)

    @property
    def directory(self) -> ledger_pb2.WatchBudgetsResponse:
        """The budget directory as pushed to edges now."""
        return self._directory

    def watch_budgets(self) -> asyncio.Queue[ledger_pb2.WatchBudgetsResponse]:
        """A queue that receives the directory now and again after every change."""
        queue: asyncio.Queue[ledger_pb2.WatchBudgetsResponse] = asyncio.Queue()
        queue.put_nowait(self._directory)
        self._watchers.add(queue)
        return queue

    def unwatch_budgets(self, queue: asyncio.Queue[ledger_pb2.WatchBudgetsResponse]) -> None:
        """Stop delivering to `queue`."""
        self._watchers.discard(queue)

    async def _all_budgets(self) -> list[ledger_pb2.Budget]:
        if time.monotonic() - self._budgets_at > _BUDGETS_REFRESH_S:
            await self.refresh_budgets()
        return self._budgets

    async def budgets_for(self, scope: ledger_pb2.BudgetScope) -> list[ledger_pb2.Budget]:
        """Every budget that applies to a request on `scope`."""
        key = scope_key(scope)
        return [b for b in await self._all_budgets() if applies(b.scope, key)]

    async def reconcile(self, budgets: Sequence[ledger_pb2.Budget] | None = None) -> None:
        """Give each budget's (default: every budget's) counter its spend in the current window
        from the rows, where the counter has none: a fresh in-memory store, a Redis that lost its
        data, or a budget just made (it covers its whole window, as it will after a restart).
        Rows count in the window their request finished in; a live store charges a request
        that ran across a window's end to the window its hold was taken in (`settle`), so a
        rebuilt counter may differ from the live one by such requests."""
        now = _now()
        for budget in await self._all_budgets() if budgets is None else budgets:
            ref = budget_ref(budget, now)
            counter = await self.store.counter(ref, now_ms=_ms(now))
            if counter.spent_micros or counter.held_micros:
                continue
            _, start, end = window_bounds(budget.window, now)
            spent = await self.history.spent(
                budget.scope, start_ms=_ms(start), end_ms=_ms(end), settled_only=True
            )
            if spent:
                # Added, not set: a commit settled meanwhile (by another replica) keeps its part.
                await self.store.add_spent(ref, spent)

    async def rebuild_if_lost(self) -> bool:
        """Rebuild the counters if the budget store lost its data (a new epoch whose counters
        nobody rebuilt yet) and no other replica is at it; True if this call rebuilt them.

        The rebuild runs as a task of its own, one at a time in this process, that callers
        join: a caller that gives up (a lease whose deadline passed) leaves it running."""
        return await asyncio.shield(self._rebuild_task())

    def _rebuild_task(self) -> asyncio.Task[bool]:
        """The rebuild under way in this process, or a new one (which claims it, if needed)."""
        task = self._rebuilding
        if task is None or task.done():
            task = self._rebuilding = asyncio.create_task(self._claim_and_rebuild(), name="budget-rebuild")
            task.add_done_callback(_log_rebuild_failure)
        return task

    async def _claim_and_rebuild(self) -> bool:
        claim = await self.store.claim_rebuild()
        if claim is None:
            return False
        try:
            return await self._rebuild(claim)
        except BaseException:
            # Another replica (or this one's next sweep) may rebuild at once, not in 30 s.
            with contextlib.suppress(BudgetStoreUnavailable):
                await self.store.release_rebuild(claim)
            raise

    async def _rebuild(self, claim: RebuildClaim) -> bool:
        """Give every budget's counter in the current window the spend of its rows, then let the
        store hold again; False if the claim lapsed on the way (another replica may be at it).
        Erring towards counting twice, never not at all: each counter gains what the rows hold
        beyond the spend it had before they were read, so a request settled meanwhile, or
        settled later from a row already read, may count twice (until the window ends), while
        none is missed."""
        renewed = time.monotonic()
        for budget in self._budgets:
            if time.monotonic() - renewed > REBUILD_RENEW_S:
                if not await self.store.renew_rebuild(claim):
                    log.warning("budget_rebuild_claim_lost")
                    return False
                renewed = time.monotonic()
            now = _now()
            ref = budget_ref(budget, now)
            before = (await self.store.counter(ref, now_ms=_ms(now))).spent_micros
            _, start, end = window_bounds(budget.window, now)
            rows = await self.history.spent(budget.scope, start_ms=_ms(start), end_ms=_ms(end))
            if rows > before:
                await self.store.add_spent(ref, rows - before)
        if not await self.store.mark_rebuilt(claim):
            log.warning("budget_rebuild_claim_lost")
            return False
        log.info("budget_counters_rebuilt", budgets=len(self._budgets))
        return True

    async def _with_store(self, work: Callable[[], Awaitable[_T]]) -> _T:
        """`work` on the budget store, once more after rebuilding the counters it lost (unless
        another replica claimed that); a store that cannot answer, or is being rebuilt by another
        replica, is UNAVAILABLE / DEPENDENCY_UNAVAILABLE (the caller retries)."""
        try:
            try:
                return await work()
            except CountersLost:
                # Rebuilt by this replica, or by another meanwhile: the retry says. (A rebuild
                # that failed says nothing more than that retry will: UNAVAILABLE.)
                with contextlib.suppress(Exception):
                    await self.rebuild_if_lost()
                return await work()
        except BudgetStoreUnavailable as exc:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.DEPENDENCY_UNAVAILABLE,
                str(exc) if isinstance(exc, CountersLost) else "the budget store is unavailable",
                metadata={"dependency": "budget_store"},
            ) from None

    async def describe(self, budget: ledger_pb2.Budget) -> ledger_pb2.Budget:
        """`budget` with its current window's spend, holds and start filled in."""
        now = _now()
        ref = budget_ref(budget, now)
        counter = await self.store.counter(ref, now_ms=_ms(now))
        out = ledger_pb2.Budget()
        out.CopyFrom(budget)
        out.spent_micros = counter.spent_micros
        out.held_micros = counter.held_micros
        out.window_start.CopyFrom(_timestamp(_ms(window_bounds(budget.window, now)[1])))
        return out

    async def set_budget(self, budget: ledger_pb2.Budget, actor: str) -> ledger_pb2.Budget:
        """Create or change a budget (audited)."""
        if budget.limit_micros <= 0:
            raise invalid("limit_micros must be positive", "budget.limit_micros")
        # Past this no counter could hold it, and every operation on the budget would fail.
        _check_amount(budget.limit_micros, "budget.limit_micros")
        if budget.window == ledger_pb2.BUDGET_WINDOW_UNSPECIFIED:
            raise invalid("window must be DAILY or MONTHLY", "budget.window")
        if budget.enforcement == ledger_pb2.BUDGET_ENFORCEMENT_UNSPECIFIED:
            raise invalid("enforcement must be HARD or SOFT", "budget.enforcement")
        if budget.webhook_url and not budget.webhook_url.startswith(("http://", "https://")):
            raise invalid("webhook_url must be an http(s) URL", "budget.webhook_url")
        if not actor:
            raise invalid("actor is required: budget changes are audited", "actor")
        check_text(actor, "actor")
        check_text(budget.budget_id, "budget.budget_id")
        _check_scope(budget.scope, "budget.scope")
        check_text(budget.webhook_url, "budget.webhook_url", max_chars=MAX_URL_CHARS)
        try:
            stored = await self.history.put_budget(budget, actor=actor, now_ms=_ms(_now()))
        except ValueError as exc:
            # The store's own checks (the id's length and spaces, a scope that may not change):
            # caller errors, not bugs. Its messages name the rule, never the caller's values.
            raise _invalid_from(exc, "budget.budget_id") from None
        # Before this replica charges it (others reload their budgets within a few seconds).
        await self.reconcile([stored])
        await self.refresh_budgets()
        return await self.describe(stored)

    async def delete_budget(self, budget_id: str, actor: str) -> ledger_pb2.Budget:
        """Delete a budget (audited); returns it as it was, with its spend and holds."""
        if not budget_id:
            raise invalid("budget_id is required", "budget_id")
        if not actor:
            raise invalid("actor is required: budget changes are audited", "actor")
        check_text(budget_id, "budget_id")
        check_text(actor, "actor")
        deleted = await self.history.delete_budget(budget_id, actor=actor, now_ms=_ms(_now()))
        if deleted is None:
            raise SwitchyardError(
                grpc.StatusCode.NOT_FOUND,
                Reason.NOT_FOUND,
                f"no budget {budget_id}",
                metadata={"budget_id": budget_id},
            )
        described = await self.describe(deleted)
        await self.refresh_budgets()
        await self.forget_counters((budget_id,))
        return described

    async def forget_counters(self, budget_ids: Sequence[str]) -> None:
        """Drop the counters of deleted budgets. After the SQL commit: should the store fail,
        the counters are left to end with their windows (nothing applies them any more)."""
        try:
            await self.store.forget(budget_ids)
        except BudgetStoreUnavailable:
            log.warning("deleted_budget_counters_kept", budgets=len(budget_ids))

    # --- holds -----------------------------------------------------------------------------

    async def reserve(self, request: ledger_pb2.ReserveRequest) -> ledger_pb2.ReserveResponse:
        """Hold an amount against every budget on the scope, all or nothing."""
        _check_amount(request.amount_micros, "amount_micros")
        if not request.scope.tenant_id:
            raise invalid("scope.tenant_id is required", "scope.tenant_id")
        check_text(request.request_id, "request_id")
        _check_scope(request.scope, "scope")
        ttl_s = request.ttl_seconds or DEFAULT_RESERVATION_TTL_S
        if ttl_s > MAX_RESERVATION_TTL_S:
            raise invalid(f"ttl_seconds must be at most {MAX_RESERVATION_TTL_S}", "ttl_seconds")
        now = _now()
        budgets = await self.budgets_for(request.scope)
        refs = [budget_ref(b, now) for b in budgets]
        hold_id = f"rsv-{request.request_id}" if request.request_id else f"rsv-{uuid.uuid4().hex}"
        if request.request_id and await self.history.charged([request.request_id]):
            # A late retry of a Reserve whose request was committed: holding again would hold
            # for nothing until the reservation expired (a retried commit charges nothing more).
            raise SwitchyardError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.INVALID_REQUEST,
                "this request id was already committed: there is nothing left to reserve for",
                metadata={"field": "request_id"},
            )
        try:
            outcome = await self._with_store(
                lambda: self.store.reserve(
                    hold_id, refs, request.amount_micros, ttl_ms=ttl_s * 1000, now_ms=_ms(now)
                )
            )
        except HoldConflict:
            raise invalid(
                "a live reservation of this request id holds another amount or other budgets:"
                " a retry must ask for what it asked before",
                "request_id",
            ) from None
        if not outcome.ok:
            refused = outcome.refused
            if refused is not None:
                budget = next(b for b in budgets if b.budget_id == refused.budget_id)
                await self._note_refusal(budget, refused, outcome.spent_micros, request.amount_micros, now)
            raise budget_exceeded(
                refused.budget_id if refused else "",
                limit=refused.limit_micros if refused else 0,
                spent=outcome.spent_micros,
                held=outcome.held_micros,
                requested=request.amount_micros,
            )
        return ledger_pb2.ReserveResponse(
            reservation_id=hold_id, expires_at=_timestamp(outcome.expires_at_ms)
        )

    async def _note_refusal(
        self, budget: ledger_pb2.Budget, ref: BudgetRef, spent: int, requested: int, now: datetime
    ) -> None:
        """A hard budget refused `requested`: if its spend alone leaves no room for it (holds
        that would end could not make any), it is used up, and its 100 % alert fires. Never
        fails the refusal."""
        if spent + requested <= ref.limit_micros:
            return
        try:
            await self.alerts.observe(
                budget, window_key=ref.window_key, spent_micros=spent, now_ms=_ms(now), exhausted=True
            )
        except Exception as exc:
            log.warning("budget_alert_failed", budget_id=budget.budget_id, error=type(exc).__name__)

    async def release(self, request: ledger_pb2.ReleaseRequest) -> ledger_pb2.ReleaseResponse:
        """Free a reservation whose request failed."""
        hold_id = request.reservation_id or (f"rsv-{request.request_id}" if request.request_id else "")
        if not hold_id:
            raise invalid("reservation_id or request_id is required", "reservation_id")
        if not hold_id.startswith("rsv-"):
            # A lease is the edge's: ReturnLease gives back what is left of it.
            raise invalid("reservation_id names no reservation", "reservation_id")
        released = await self._with_store(lambda: self.store.release(hold_id, now_ms=_ms(_now())))
        return ledger_pb2.ReleaseResponse(released=released)

    async def lease(self, request: ledger_pb2.LeaseBudgetRequest) -> ledger_pb2.LeaseBudgetResponse:
        """Slices of every hard budget on the scope (or the ones named) for an edge."""
        if not request.holder_id:
            raise invalid("holder_id is required", "holder_id")
        _check_amount(request.requested_micros, "requested_micros")
        _check_amount(request.min_micros, "min_micros")
        now = _now()
        budgets = await self.budgets_for(request.scope)
        response = ledger_pb2.LeaseBudgetResponse(
            budget_ids=[b.budget_id for b in budgets], epoch=self._directory.epoch
        )
        wanted_ids = set(request.budget_ids)
        asked: list[str] = []  # every lease id asked of the store, granted or in flight
        try:
            for budget in budgets:
                if budget.enforcement == ledger_pb2.BUDGET_ENFORCEMENT_HARD and (
                    not wanted_ids or budget.budget_id in wanted_ids
                ):
                    lease_id = f"lease-{uuid.uuid4().hex}"
                    asked.append(lease_id)
                    await self._lease_one(lease_id, budget, request, response, now)
        except BaseException:
            # The edge gets none of them (a later budget failed, or it gave up waiting, maybe
            # while the store was granting): what was granted goes back now rather than sit
            # unused until it expires. (Releasing an id never granted frees nothing.)
            await asyncio.shield(self._release_all(asked, _ms(now)))
            raise
        return response

    async def _release_all(self, hold_ids: Sequence[str], now_ms: int) -> None:
        for hold_id in hold_ids:
            with contextlib.suppress(BudgetStoreUnavailable):
                await self.store.release(hold_id, now_ms=now_ms)

    async def _lease_one(
        self,
        lease_id: str,
        budget: ledger_pb2.Budget,
        request: ledger_pb2.LeaseBudgetRequest,
        response: ledger_pb2.LeaseBudgetResponse,
        now: datetime,
    ) -> None:
        """Lease a slice of one hard budget into `response`, as `lease_id`."""
        now_ms = _ms(now)
        ref = budget_ref(budget, now)
        # A lease admits only within the window it holds against: the next window's spend
        # is leased from the next window's counter. (What it admitted before the end is
        # charged to this window however late it finishes: the store charges a hold's.)
        window_end_ms = _ms(window_bounds(budget.window, now)[2])
        grant = await self._with_store(
            functools.partial(
                self.store.lease,
                lease_id,
                ref,
                request.requested_micros,
                min_micros=max(1, request.min_micros),
                ttl_ms=self._settle_ms,
                now_ms=now_ms,
                max_share=LEASE_SHARE,
            )
        )
        response.leases.append(
            ledger_pb2.BudgetLease(
                lease_id=lease_id if grant.granted_micros > 0 else "",
                budget_id=budget.budget_id,
                amount_micros=grant.granted_micros,
                version=budget.version,
                expires_at=_timestamp(min(now_ms + self._lease_ttl_ms, window_end_ms)),
                settle_by=_timestamp(now_ms + self._settle_ms),
                enforcement=budget.enforcement,
                limit_micros=budget.limit_micros,
                spent_micros=grant.counter.spent_micros,
                held_micros=grant.counter.held_micros,
                epoch=grant.epoch,
            )
        )
        if grant.granted_micros == 0:
            await self._note_refusal(budget, ref, grant.counter.spent_micros, max(1, request.min_micros), now)
        if grant.epoch != response.epoch:
            # The store lost its holds since the last sweep: say so to the edges at once.
            response.epoch = grant.epoch
            self._publish(self._directory.budgets, grant.epoch)

    async def return_lease(self, request: ledger_pb2.ReturnLeaseRequest) -> ledger_pb2.ReturnLeaseResponse:
        """Take back what an edge did not use of a lease."""
        if not request.lease_id:
            raise invalid("lease_id is required", "lease_id")
        _check_amount(request.unused_micros, "unused_micros")
        returned = await self._with_store(
            lambda: self.store.return_lease(request.lease_id, request.unused_micros, now_ms=_ms(_now()))
        )
        return ledger_pb2.ReturnLeaseResponse(returned_micros=returned)

    # --- commits ---------------------------------------------------------------------------

    def charge(self, record: ledger_pb2.UsageRecord, month_tokens: int) -> int:
        """What a finished request costs: nothing for an answer that cost nothing upstream,
        else its tokens at the price in effect when it finished, after volume discounts."""
        if record.cache_status in _FREE_STATUSES:
            return 0
        model = self.catalog.model(record.model)
        usage = record.usage
        if model is None:
            return max(0, record.cost_micros)
        tokens = TokenCounts(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cache_write_input_tokens=usage.cache_write_input_tokens,
        )
        finished = _finished_at(record, _now())
        return charge_micros(model, tokens, at=finished, month_tokens=month_tokens)

    async def _month_tokens(self, tenant_id: str, model: str, at: datetime) -> int:
        key, start, end = window_bounds(ledger_pb2.BUDGET_WINDOW_MONTHLY, at)
        cache_key = (tenant_id, model, key)
        cached = self._volumes.get(cache_key)
        if cached is not None and time.monotonic() - cached[1] <= _VOLUMES_REFRESH_S:
            return cached[0]
        read_at = time.monotonic()
        found = await self.history.month_tokens(tenant_id, model, start_ms=_ms(start), end_ms=_ms(end))
        if len(self._volumes) > _MAX_CACHED_VOLUMES:
            self._volumes.clear()
        self._volumes[cache_key] = (found, read_at)
        return found

    def _add_volume(self, tenant_id: str, model: str, month_key: str, tokens: int) -> None:
        """Count tokens this replica just stored into its cached volume (until the next re-read).

        Added, not overwritten: batches committed concurrently on this replica each add theirs.
        (A re-read landing between a batch's insert and this call counts the batch twice until the
        next re-read, a few seconds later; volumes only decide discount tiers.)
        """
        cache_key = (tenant_id, model, month_key)
        cached = self._volumes.get(cache_key)
        if cached is not None:
            self._volumes[cache_key] = (cached[0] + tokens, cached[1])

    async def commit_many(
        self, commits: Sequence[ledger_pb2.CommitRequest]
    ) -> list[ledger_pb2.CommitResponse]:
        """Record and charge each request exactly once (rows in one transaction).

        A batch may hold several requests of one tenant on one model: each is priced with the
        tokens of the ones before it in the batch counted into the month's volume, as if they
        had been committed one by one. (A record that turns out to be an earlier call's
        duplicate was counted too; that can only matter at a volume tier's threshold.)
        """
        for index, commit in enumerate(commits):
            _check_record(commit.record, f"commits[{index}].record")
        now = _now()
        # (tenant, model, month) -> the month's tokens before this batch, then as the batch goes
        # on; the month the request finished in, whose prices and volume it is charged at.
        start: dict[tuple[str, str, str], int] = {}
        running: dict[tuple[str, str, str], int] = {}
        seen: set[str] = set()
        charged: list[tuple[ledger_pb2.UsageRecord, int]] = []
        for commit in commits:
            record = _effective(commit.record)
            key = _volume_key(record, now)
            if key not in start:
                start[key] = running[key] = await self._month_tokens(
                    key[0], key[1], min(_finished_at(record, now), now)
                )
            charged.append((record, self.charge(record, running[key])))
            if record.request_id not in seen:
                seen.add(record.request_id)
                running[key] += _tokens(record)
        inserted = await self.history.record_many(
            charged, recorded_at_ms=_ms(now), holds=[Holds.of(commit) for commit in commits]
        )
        # A duplicate answers with what its first commit charged. If its first commit stopped
        # between the row and the counters (a crash), the retry settles it now, with its leases.
        earlier = await self.history.charged(
            [record.request_id for (record, _), fresh in zip(charged, inserted, strict=True) if not fresh]
        )
        # What the month really holds after each row: only rows stored now add their tokens.
        stored = dict(start)
        results: list[ledger_pb2.CommitResponse] = []
        settled: list[str] = []
        for commit, (record, computed), fresh in zip(commits, charged, inserted, strict=True):
            key = _volume_key(record, now)
            amount, done = (computed, False) if fresh else earlier.get(record.request_id, (computed, True))
            if fresh:
                stored[key] += _tokens(record)
            if not done and await self._settle(commit, amount, now):
                settled.append(record.request_id)
            results.append(
                ledger_pb2.CommitResponse(
                    duplicate=not fresh,
                    charged_micros=amount,
                    month_tokens=stored[key],
                    request_id=record.request_id,
                )
            )
        for (tenant_id, model, month_key), tokens in stored.items():
            self._add_volume(tenant_id, model, month_key, tokens - start[(tenant_id, model, month_key)])
        # Rows whose settlement failed stay unsettled: the sweeper charges them once the store
        # answers (and a ledger that restarts rebuilds counters from settled rows only).
        if settled:
            await self.history.mark_settled(settled, settled=True)
        return results

    async def _settle(self, commit: ledger_pb2.CommitRequest, amount: int, now: datetime) -> bool:
        """Charge the budgets of a stored request, in the window it finished in (as its row
        and a counter rebuilt from the rows count it; never a later one than now); False when
        the budget store failed."""
        record = commit.record
        finished = _finished_at(record, now)
        return await self._charge_budgets(
            record.request_id,
            record_scope(record),
            amount,
            now,
            reservation_id=commit.reservation_id,
            lease_ids=list(commit.lease_ids),
            window_at=min(finished, now),
        )

    async def _charge_budgets(
        self,
        request_id: str,
        scope: ledger_pb2.BudgetScope,
        amount: int,
        now: datetime,
        *,
        reservation_id: str = "",
        lease_ids: Sequence[str] = (),
        window_at: datetime | None = None,
    ) -> bool:
        budgets = await self.budgets_for(scope)
        refs = [budget_ref(b, window_at or now) for b in budgets]
        try:
            settled = await self.store.settle(
                request_id,
                amount,
                refs,
                reservation_id=reservation_id,
                lease_ids=list(lease_ids),
                now_ms=_ms(now),
            )
            # A duplicate's too: this may be the sweeper retrying a settle that stopped before
            # its alerts were observed. Each threshold fires once per window however often seen.
            # In the window each budget was charged in (a hold's, for a request across midnight).
            for budget, held in zip(budgets, refs, strict=True):
                window = settled.windows.get(held.budget_id, held.window_key)
                ref = dataclasses.replace(held, window_key=window)
                counter = await self.store.counter(ref, now_ms=_ms(now))
                await self.alerts.observe(
                    budget, window_key=ref.window_key, spent_micros=counter.spent_micros, now_ms=_ms(now)
                )
        except Exception as exc:
            log.error("budget_settle_failed", request_id=request_id, error=type(exc).__name__)
            return False
        return True

    async def settle_unsettled(self, *, limit: int = 500) -> int:
        """Charge the budget counters of stored requests whose settlement failed or was cut
        short (in the window each request finished in); how many were settled now. Rows younger
        than `UNSETTLED_AFTER_S` are left to the commit that is storing them; an older one may
        still be settling, and whichever settles first charges it, from the same holds."""
        now = _now()
        rows = await self.history.unsettled(
            recorded_before_ms=_ms(now) - int(UNSETTLED_AFTER_S * 1000), limit=limit
        )
        done = [
            row.request_id
            for row in rows
            if await self._charge_budgets(
                row.request_id,
                row.scope,
                row.cost_micros,
                now,
                # Drawn from the holds its commit named, as the commit would have: charging the
                # spend alone would leave the lease holding it too (spend + holds past the limit).
                reservation_id=row.holds.reservation_id,
                lease_ids=row.holds.lease_ids,
                window_at=min(datetime.fromtimestamp(row.finished_at_ms / 1000, UTC), now),
            )
        ]
        if done:
            await self.history.mark_settled(done, settled=True)
        return len(done)

    async def sweep(self) -> int:
        """Charge the counters of requests whose settlement failed earlier, then free
        reservations and leases whose time is up (not in the first `expire_after_start_s` after
        start). In that order: a stored request draws its cost from the holds its commit named,
        which freeing them first would have handed to other edges."""
        await self.refresh_budgets()  # changes made through other replicas reach this one's edges
        repaired = await self.settle_unsettled()
        if repaired:
            log.info("settlements_repaired", count=repaired)
        return await self.store.expire(now_ms=_ms(_now()))


def _effective(record: ledger_pb2.UsageRecord) -> ledger_pb2.UsageRecord:
    """`record` with its scope as its budgets are charged by (`record_scope`), as the row keeps it,
    so a counter rebuilt from the rows (`reconcile`) counts exactly what the commits charged."""
    scope = record_scope(record)
    if scope == record.scope:
        return record
    out = ledger_pb2.UsageRecord()
    out.CopyFrom(record)
    out.scope.CopyFrom(scope)
    return out


def _volume_key(record: ledger_pb2.UsageRecord, now: datetime) -> tuple[str, str, str]:
    """(tenant, model, month key): the monthly volume a finished request is priced with, that of
    the month it finished in (never a later one than now)."""
    month = window_bounds(ledger_pb2.BUDGET_WINDOW_MONTHLY, min(_finished_at(record, now), now))[0]
    return (record.scope.tenant_id, record.model, month)


def _finished_at(record: ledger_pb2.UsageRecord, default: datetime) -> datetime:
    """When the request finished, as its record says, else `default`."""
    return record.finished_at.ToDatetime(UTC) if record.HasField("finished_at") else default


def _tokens(record: ledger_pb2.UsageRecord) -> int:
    """The tokens a request adds to its tenant's monthly volume on its model."""
    return record.usage.input_tokens + record.usage.output_tokens


def _check_record(record: ledger_pb2.UsageRecord, field: str) -> None:
    if not record.request_id:
        raise invalid("request_id is required: commits are exactly once by it", f"{field}.request_id")
    if not record.scope.tenant_id:
        raise invalid("scope.tenant_id is required", f"{field}.scope.tenant_id")
    # Stored in SQL: bounded and without NUL, or the whole batch's transaction would fail.
    for name in ("request_id", "model", "provider", "status"):
        check_text(getattr(record, name), f"{field}.{name}")
    _check_scope(record.scope, f"{field}.scope")
    _check_amount(record.cost_micros, f"{field}.cost_micros")
    _check_amount(record.cache_saved_micros, f"{field}.cache_saved_micros")
    _check_amount(record.estimated_cost_micros, f"{field}.estimated_cost_micros")
    if record.HasField("finished_at"):
        try:
            record.finished_at.ToDatetime(UTC)
        except (ValueError, OverflowError):
            raise invalid("finished_at is out of range", f"{field}.finished_at") from None


def _invalid_from(exc: ValueError, field: str) -> SwitchyardError:
    """A store's refusal of a request (its message names the rule, never the caller's values) as
    INVALID_ARGUMENT naming the field it names (`history.FieldError`), else `field`."""
    return invalid(str(exc), getattr(exc, "field", field))


def _check_scope(scope: ledger_pb2.BudgetScope, field: str) -> None:
    for name in ("tenant_id", "end_user", "api_key_id", "model", "provider"):
        check_text(getattr(scope, name), f"{field}.{name}")


def _check_amount(micros: int, field: str) -> None:
    """An amount the budget counters can hold exactly: 0 through `MAX_MICROS` (about $9e9)."""
    if micros < 0:
        raise invalid(f"{field.rsplit('.', 1)[-1]} must not be negative", field)
    if micros > MAX_MICROS:
        raise invalid(f"{field.rsplit('.', 1)[-1]} must be at most {MAX_MICROS} micro-USD", field)


def budget_exceeded(budget_id: str, *, limit: int, spent: int, held: int, requested: int) -> SwitchyardError:
    """RESOURCE_EXHAUSTED / BUDGET_EXCEEDED with the budget, spent and requested amounts."""
    return SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.BUDGET_EXCEEDED,
        f"budget {budget_id} would be exceeded: {format_usd(spent)} spent and {format_usd(held)} held "
        f"of {format_usd(limit)}, {format_usd(requested)} requested",
        metadata={
            "budget_id": budget_id,
            "limit_micros": str(limit),
            "spent_micros": str(spent),
            "held_micros": str(held),
            "requested_micros": str(requested),
        },
    )


class CostLedgerServicer(ledger_pb2_grpc.CostLedgerServiceServicer):
    """The gRPC skin over `Ledger` (attached by the service's `start`, before the port opens)."""

    def __init__(self, ledger: Ledger | None = None) -> None:
        self._attached = ledger
        self._streams = StreamDrain("ledger")

    def drain(self) -> None:
        """Shutdown begins: WatchBudgets streams end (after what they have queued); each commit
        stream answers the batch it is committing, then ends without reading another; new
        streams are refused UNAVAILABLE. Callers resubscribe and resend elsewhere at once."""
        self._streams.drain()

    def attach(self, ledger: Ledger) -> None:
        """Serve `ledger`."""
        self._attached = ledger

    @property
    def _ledger(self) -> Ledger:
        if self._attached is None:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE, "the ledger is starting"
            )
        return self._attached

    async def Estimate(
        self, request: ledger_pb2.EstimateRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.EstimateResponse:
        """Prompt tokens and the expected and worst-case cost on a model. An unknown model is
        INVALID_ARGUMENT naming the field it came from (the ledger does not route `auto`)."""
        name = request.model or request.request.model
        field = "model" if request.model else "request.model"
        if not name:
            raise invalid("model is required: the catalog model to price", "model")
        model = self._ledger.catalog.resolve(name)
        if model is None:
            raise invalid(f"unknown model or alias {name!r}", field, model=name)
        found = estimate_cost(request.request, model, at=_now())
        return ledger_pb2.EstimateResponse(
            model=found.model,
            input_tokens=found.input_tokens,
            expected_output_tokens=found.expected_output_tokens,
            max_output_tokens=found.max_output_tokens,
            expected_cost_micros=found.expected_cost_micros,
            worst_case_cost_micros=found.worst_case_cost_micros,
            encoding=found.encoding,
            approximate=found.approximate,
        )

    async def Reserve(
        self, request: ledger_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ReserveResponse:
        """Hold an amount against every budget that applies."""
        return await self._ledger.reserve(request)

    async def Commit(
        self, request: ledger_pb2.CommitRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.CommitResponse:
        """Charge a finished request exactly once."""
        # Checked here too, so a refusal names this request's field path, not the batch's.
        _check_record(request.record, "record")
        started = time.time_ns()
        results = await self._ledger.commit_many([request])
        _trace_commits([request], results, started)
        return results[0]

    async def CommitMany(
        self, request: ledger_pb2.CommitManyRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.CommitManyResponse:
        """Several commits in one call, each exactly once."""
        started = time.time_ns()
        results = await self._ledger.commit_many(request.commits)
        _trace_commits(request.commits, results, started)
        return ledger_pb2.CommitManyResponse(results=results)

    async def CommitStream(
        self, requests: AsyncIterator[ledger_pb2.CommitManyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ledger_pb2.CommitManyResponse]:
        """CommitMany for each batch on the stream, answered in order. At shutdown the batch
        being committed is answered and the stream then ends (OK) without reading another:
        the caller sends what is still unanswered again, on a new stream."""
        self._streams.refuse_if_draining()
        async for request in self._streams.until_drained(requests):
            yield await self.CommitMany(request, context)

    async def Release(
        self, request: ledger_pb2.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ReleaseResponse:
        """Free a hold whose request failed."""
        return await self._ledger.release(request)

    async def LeaseBudget(
        self, request: ledger_pb2.LeaseBudgetRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.LeaseBudgetResponse:
        """Slices of budgets for an edge."""
        return await self._ledger.lease(request)

    async def ReturnLease(
        self, request: ledger_pb2.ReturnLeaseRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ReturnLeaseResponse:
        """What an edge did not use of a lease."""
        return await self._ledger.return_lease(request)

    async def GetUsage(
        self, request: gateway_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetUsageResponse:
        """Totals and breakdowns of spend (any tenant)."""
        return await usage_report(self._ledger.history, request)

    async def SetBudget(
        self, request: ledger_pb2.SetBudgetRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.SetBudgetResponse:
        """Create or change a budget; audited."""
        return ledger_pb2.SetBudgetResponse(
            budget=await self._ledger.set_budget(request.budget, request.actor)
        )

    async def DeleteBudget(
        self, request: ledger_pb2.DeleteBudgetRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.DeleteBudgetResponse:
        """Delete a budget; audited."""
        return ledger_pb2.DeleteBudgetResponse(
            budget=await self._ledger.delete_budget(request.budget_id, request.actor)
        )

    async def WatchBudgets(
        self, request: ledger_pb2.WatchBudgetsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ledger_pb2.WatchBudgetsResponse]:
        """The budget directory now, then again after every change, until the ledger shuts down."""
        self._streams.refuse_if_draining()
        queue = self._ledger.watch_budgets()
        log.info("budgets_watched", subscriber=request.subscriber_id)
        try:
            while True:
                try:
                    directory = await self._streams.next(queue, timeout_s=WATCH_HEARTBEAT_S)
                except TimeoutError:  # unchanged: said again, so no proxy takes the stream for idle
                    directory = self._ledger.directory
                if directory is DRAINED:
                    return
                yield directory
        finally:
            self._ledger.unwatch_budgets(queue)

    async def ListBudgets(
        self, request: ledger_pb2.ListBudgetsRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListBudgetsResponse:
        """Budgets with their current spend and holds."""
        if request.page_size < 0:
            raise invalid("page_size must not be negative", "page_size")
        try:
            budgets, token = await self._ledger.history.list_budgets(
                request.tenant_id, page_size=request.page_size or 100, page_token=request.page_token
            )
        except ValueError as exc:
            raise _invalid_from(exc, "page_token") from None
        described = [await self._ledger.describe(b) for b in budgets]
        return ledger_pb2.ListBudgetsResponse(budgets=described, next_page_token=token)

    async def ExportUsage(
        self, request: ledger_pb2.ExportUsageRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ledger_pb2.ExportUsageResponse]:
        """A period's rows as CSV, in pieces; one end user's export is audited first."""
        if not request.tenant_id:
            raise invalid("tenant_id is required", "tenant_id")
        start_ms, end_ms = _period(request.start_time, request.end_time)
        if request.end_user:
            if not request.actor:
                raise invalid("actor is required: an end user's export is audited", "actor")
            check_text(request.actor, "actor")
            await self._ledger.history.audit_end_user_export(
                request.tenant_id,
                request.end_user,
                actor=request.actor,
                start_ms=start_ms,
                end_ms=end_ms,
                now_ms=_ms(_now()),
            )
        async for piece in self._ledger.history.export_csv(
            request.tenant_id, start_ms=start_ms, end_ms=end_ms, end_user=request.end_user
        ):
            yield ledger_pb2.ExportUsageResponse(csv_chunk=piece)

    async def EraseEndUser(
        self, request: ledger_pb2.EraseEndUserRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.EraseEndUserResponse:
        """Erase one end user: rows anonymised; their budgets with those budgets' counters, audit
        and alerts deleted; the erasure audited."""
        if not request.tenant_id or not request.end_user:
            raise invalid("tenant_id and end_user are required", "end_user")
        if not request.actor:
            raise invalid("actor is required: erasures are audited", "actor")
        check_text(request.tenant_id, "tenant_id")
        check_text(request.end_user, "end_user")
        check_text(request.actor, "actor")
        ledger = self._ledger
        erased = await ledger.history.erase_end_user(
            request.tenant_id,
            request.end_user,
            actor=request.actor,
            now_ms=_ms(_now()),
            also=ledger.alerts.forget_budgets,
        )
        if erased.budget_ids:
            await ledger.refresh_budgets()
            await ledger.forget_counters(erased.budget_ids)
        return ledger_pb2.EraseEndUserResponse(
            rows_anonymised=erased.rows,
            budgets_deleted=len(erased.budget_ids),
            audit_entries_deleted=erased.audit_entries,
            alerts_deleted=erased.alerts,
        )

    async def ListAlerts(
        self, request: ledger_pb2.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListAlertsResponse:
        """Threshold alerts and their deliveries."""
        if request.page_size < 0:
            raise invalid("page_size must not be negative", "page_size")
        try:
            alerts, token = await self._ledger.alerts.list_alerts(
                request.tenant_id, page_size=request.page_size or 100, page_token=request.page_token
            )
        except ValueError as exc:
            raise _invalid_from(exc, "page_token") from None
        return ledger_pb2.ListAlertsResponse(alerts=alerts, next_page_token=token)

    async def GetEstimateAccuracy(
        self, request: ledger_pb2.GetEstimateAccuracyRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.GetEstimateAccuracyResponse:
        """Estimate error per model: prompt tokens vs the vendors' counts, expected cost vs the charge."""
        models = await self._ledger.history.estimate_accuracy(request.model)
        return ledger_pb2.GetEstimateAccuracyResponse(models=models)

    async def ListBudgetAudit(
        self, request: ledger_pb2.ListBudgetAuditRequest, context: grpc.aio.ServicerContext
    ) -> ledger_pb2.ListBudgetAuditResponse:
        """The budget audit log."""
        if request.page_size < 0:
            raise invalid("page_size must not be negative", "page_size")
        try:
            entries, token = await self._ledger.history.list_audit(
                budget_id=request.budget_id,
                tenant_id=request.tenant_id,
                page_size=request.page_size or 100,
                page_token=request.page_token,
            )
        except ValueError as exc:
            raise _invalid_from(exc, "page_token") from None
        return ledger_pb2.ListBudgetAuditResponse(entries=entries, next_page_token=token)


async def usage_report(
    history: LedgerStore, request: gateway_pb2.GetUsageRequest
) -> gateway_pb2.GetUsageResponse:
    """`GetUsage` over the rows, with request errors as INVALID_ARGUMENT."""
    if request.page_size < 0:
        raise invalid("page_size must not be negative", "page_size")
    try:
        return await history.usage(request, now_ms=_ms(_now()))
    except ValueError as exc:
        raise _invalid_from(exc, "page_token") from None


def _period(start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp) -> tuple[int, int]:
    now = _now()
    start_ms = (
        start.ToMilliseconds()
        if start.seconds or start.nanos
        else _ms(window_bounds(ledger_pb2.BUDGET_WINDOW_MONTHLY, now)[1])
    )
    end_ms = end.ToMilliseconds() if end.seconds or end.nanos else _ms(now) + 1
    if end_ms <= start_ms:
        raise invalid("end_time must be after start_time", "end_time")
    return start_ms, end_ms


def build(settings: Settings) -> ServiceParts:
    """The ledger's bindings; `start` opens SQL, the budget store and the alert center, `drain`
    ends its streams at shutdown."""
    parts: list[Ledger] = []
    tasks: list[asyncio.Task[None]] = []
    databases: list[Database] = []
    servicer = CostLedgerServicer()
    binding = ServiceBinding(
        SERVICE_NAME, lambda server: ledger_pb2_grpc.add_CostLedgerServiceServicer_to_server(servicer, server)
    )

    async def start() -> None:
        database = await open_database(settings.database_url)
        databases.append(database)
        erasure_key = settings.ledger_erasure_key.encode() if settings.ledger_erasure_key else None
        history = await LedgerStore.open(database, erasure_key=erasure_key)
        store = build_budget_store(settings.redis_url)
        secret = settings.webhook_secret.encode() if settings.webhook_secret else None
        alerts = await AlertCenter.open(database, secret=secret)
        ledger = Ledger(
            settings.catalog,
            history,
            store,
            alerts,
            lease_ttl_s=settings.lease_ttl_s,
            settle_after_s=settings.generate_timeout_s,
            expire_after_start_s=settings.ledger_expire_after_start_s,
        )
        await ledger.refresh_budgets()
        if store.shared:
            # Its counters outlive this process; if Redis lost them, they are rebuilt.
            await ledger.rebuild_if_lost()
        else:
            await ledger.reconcile()  # a new process: every counter from the rows
        await alerts.start()
        parts.append(ledger)
        servicer.attach(ledger)
        tasks.append(asyncio.create_task(_sweeper(ledger, settings.ledger_sweep_s), name="ledger-sweeper"))

    async def close() -> None:
        await cancel_all(tasks)
        for ledger in parts:
            await ledger.aclose()
        for database in databases:
            await database.close()

    return ServiceParts([binding], close, start, drain=servicer.drain)


def _log_rebuild_failure(task: asyncio.Task[bool]) -> None:
    """Say why a rebuild failed (its callers may have given up on it); the next sweep retries."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("budget_rebuild_failed", error=type(exc).__name__)


async def _sweeper(ledger: Ledger, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            freed = await ledger.sweep()
            if freed:
                log.info("holds_expired", count=freed)
        except Exception as exc:
            log.warning("ledger_sweep_failed", error=type(exc).__name__)


def _trace_commits(
    commits: Sequence[ledger_pb2.CommitRequest], results: Sequence[ledger_pb2.CommitResponse], started_ns: int
) -> None:
    """Each commit as a span in its own request's trace (the batch's RPC span is in none of them)."""
    for commit, result in zip(commits, results, strict=True):
        if commit.traceparent:
            tracing.record_span_in(
                commit.traceparent,
                "switchyard.ledger/commit",
                start_time_ns=started_ns,
                tracer_name="switchyard.ledger",
                attributes={
                    "switchyard.request_id": commit.record.request_id,
                    "switchyard.charged_micros": result.charged_micros,
                    "switchyard.duplicate": result.duplicate,
                },
            )
