"""Budget counters: atomic holds (reservations and leases), idempotent settlement, expiry.

The cost ledger owns budget definitions (SQL) and keeps their live counters here. This store
knows nothing about scopes or SQL: it is handed `BudgetRef`s (a budget id, a window key, the
limit and whether it is hard) and amounts in integer micro-USD.

Model. A counter, per (budget id, window key), has `spent` (committed) and `held` (the sum of
the live holds' remaining amounts). A hold has an id, the counters it is against, a
`remaining` amount (the same on each), an expiry, and a kind:

- a *reservation* holds one request's worst case on every budget that applies, all or
  nothing over the hard ones, and is settled once, then gone;
- a *lease* holds a slice of one budget for an edge, which admits requests against it
  locally; settlements draw it down, and its remainder is returned, released or expires.

Reservations and leases share one id space: an id names one hold of one kind.

Invariant. For every hard budget `spent + held <= limit` whatever the interleaving of calls,
across every process sharing one Redis: holds only ever take what is left. Settlement records
the truth (`spent += actual`), so it exceeds the limit only when a request cost more than was
held for it, or when it names budgets no hold covered; the ledger sizes holds to avoid that.

Atomicity. Every operation is one atomic step: the memory backend never awaits between its
reads and writes (one event loop, not threads); the Redis backend runs one Lua script per
operation (`budgets_redis.py`). The clock is always the caller's `now_ms` (wall-clock ms), never
the backend's, so every replica decides by the same rule and tests can step time.

Exactly once. `settle` is idempotent by request id: the id is remembered (with what was
charged) until the latest `expires_at_ms` of the budgets it charged, and at least
`SETTLED_RETENTION_MS`, so a retried commit charges nothing twice. `reserve` and `lease` are
idempotent by hold id while the hold lives, so a retried call never holds twice. A hold that
was settled or released is gone: reserving its id again creates a new hold (which expires if
nobody settles it).

Expiry. A hold whose expiry passed is freed by `expire()` (call it periodically), and lazily,
at most `LAZY_EXPIRY_PER_COUNTER` per counter, at the start of `reserve`, `lease` and
`counter`, so a crashed holder never blocks a budget; a caller that has just started keeps
them a while (`keep_expired_holds`), and until a lease is freed, commits naming it still draw
it down. Stored state expires too: counters at
their `expires_at_ms` (at least `MIN_KEY_TTL_MS` after their last write), settled request ids
as above, so nothing accumulates forever.

Epoch. Every store has an epoch id that changes only when the store lost its holds: the
memory backend draws a random one at each process start, the Redis backend keeps one in Redis
(`SET NX`, so a new one appears only once Redis lost its data). Each lease is granted in the
current epoch and says so; an edge holding leases of an older epoch admits nothing more on them,
since the holds that backed them are gone and the budget may be granted again in full.

Rebuild. A store that lost its data lost its counters' spend too. Until the ledger has rebuilt
them from its rows (`claim_rebuild`, then `add_spent` per counter, renewing the claim as it
goes, then `mark_rebuilt`),
`reserve` and `lease` hold nothing and raise `CountersLost`: granting from an empty counter
could pass a limit by everything spent before the loss. The memory backend is rebuilt by the
ledger before it serves (its process is its lifetime), so it never raises it.

Failure. Budgets are money: the Redis backend never falls back to local counters. It raises
`BudgetStoreUnavailable`, and the caller refuses or retries (every call but `return_lease` is
safe to retry, even after a timeout whose script may have run).
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Final, Literal

__all__ = [
    "DEFAULT_PREFIX",
    "LAZY_EXPIRY_PER_COUNTER",
    "MAX_MICROS",
    "MAX_SHARE_DENOMINATOR",
    "MIN_KEY_TTL_MS",
    "REBUILD_CLAIM_MS",
    "RESERVATION_MISMATCH",
    "SETTLED_RETENTION_MS",
    "BudgetRef",
    "BudgetStore",
    "BudgetStoreUnavailable",
    "Counter",
    "CountersLost",
    "Grant",
    "HoldConflict",
    "HoldOutcome",
    "MemoryBudgetStore",
    "RebuildClaim",
    "Settlement",
    "build_budget_store",
    "counter_ttl_ms",
    "hold_ttl_ms",
    "lease_grant",
    "settled_ttl_ms",
    "unique_budgets",
    "wall_clock_ms",
]

# Amounts and sums stay exact as Lua numbers (doubles) below 2**53 micro-USD (about 9e9 USD).
MAX_MICROS: Final = 2**53 - 1
_DAY_MS: Final = 24 * 3600 * 1000
SETTLED_RETENTION_MS: Final = 7 * _DAY_MS
"""Settled request ids are remembered at least this long."""
MIN_KEY_TTL_MS: Final = _DAY_MS
"""A counter written now lives at least this long, even past its `expires_at_ms`."""
LAZY_EXPIRY_PER_COUNTER: Final = 100
"""At most this many expired holds per counter are freed at the start of an operation."""
# max_share is applied as available * numerator // denominator; below this it stays exact in Lua.
MAX_SHARE_DENOMINATOR: Final = 2**24
DEFAULT_PREFIX: Final = "sy:budget:"
REBUILD_CLAIM_MS: Final = 30_000
"""A claim on a rebuild lapses this long after it was made or last renewed."""

RESERVATION_MISMATCH: Final = "the hold id names a live reservation of another amount or other budgets"

Kind = Literal["reservation", "lease"]
RESERVATION: Final = "reservation"
LEASE: Final = "lease"


@dataclass(frozen=True, slots=True)
class BudgetRef:
    """One budget's counter for one window, as the ledger knows it when it calls.

    `expires_at_ms` is when the counter may be dropped (the window's end plus retention,
    wall-clock ms); the store keeps it no longer, so nothing accumulates forever.
    """

    budget_id: str
    window_key: str
    limit_micros: int
    hard: bool
    expires_at_ms: int

    def __post_init__(self) -> None:
        if not self.budget_id or not self.window_key:
            raise ValueError("a budget ref needs a budget id and a window key")
        _check_micros("limit_micros", self.limit_micros)
        if self.expires_at_ms < 0:
            raise ValueError("expires_at_ms must not be negative")

    @property
    def key(self) -> tuple[str, str]:
        """What identifies the counter: (budget id, window key)."""
        return (self.budget_id, self.window_key)


@dataclass(frozen=True, slots=True)
class Counter:
    """A budget counter: committed spend and the sum of live holds, micro-USD."""

    spent_micros: int
    held_micros: int


@dataclass(frozen=True, slots=True)
class HoldOutcome:
    """What `reserve` decided.

    Refused (`ok=False`): `refused` is the first hard budget (in the order given) that did
    not fit, with its `spent_micros` and `held_micros` at that moment and the
    `requested_micros`, for the caller's refusal message. Nothing was held anywhere.
    """

    ok: bool
    hold_id: str
    expires_at_ms: int = 0
    refused: BudgetRef | None = None
    spent_micros: int = 0
    held_micros: int = 0
    requested_micros: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """What `lease` granted: 0 means no lease was created (and `expires_at_ms` is 0).

    `counter` is the budget after granting. Asking again for a live lease id returns its
    original grant and expiry (the current counter) and creates nothing. `epoch` is the
    store's epoch the grant was decided in.
    """

    lease_id: str
    granted_micros: int
    expires_at_ms: int
    counter: Counter
    epoch: str


@dataclass(frozen=True, slots=True)
class Settlement:
    """What `settle` did: `duplicate` when the request id was already settled (nothing changed).

    `charged_micros` is what was recorded for the request id: this call's actual cost, or
    the first call's on a duplicate. `windows` maps each budget id charged to the window key
    it was charged in (a named hold's window where that differs from the ref's); empty on a
    duplicate.
    """

    duplicate: bool
    charged_micros: int
    windows: dict[str, str] = field(default_factory=dict)


class BudgetStoreUnavailable(Exception):
    """The backend could not be reached or failed; the call's outcome is unknown.

    Every operation except `return_lease` is idempotent, so retrying is safe.
    """


class CountersLost(BudgetStoreUnavailable):
    """The store lost its data (a new epoch) and its counters are not rebuilt yet: nothing was
    held (see `claim_rebuild`)."""

    def __init__(self, epoch: str) -> None:
        super().__init__("the budget store lost its data and is being rebuilt")
        self.epoch = epoch


@dataclass(frozen=True, slots=True)
class RebuildClaim:
    """One caller's claim on rebuilding the counters of `epoch`; `token` tells it from another
    caller's claim on the same epoch (one made after this one lapsed)."""

    epoch: str
    token: str


class HoldConflict(ValueError):
    """A hold id that already names a live hold of the other kind (reservation vs lease)."""


def _check_micros(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int (micro-USD)")
    if not 0 <= value <= MAX_MICROS:
        raise ValueError(f"{name} must be between 0 and {MAX_MICROS} micro-USD")


def _check_id(name: str, value: str) -> None:
    if not value:
        raise ValueError(f"{name} must not be empty")


def _check_ttl(ttl_ms: int) -> None:
    if ttl_ms < 1:
        raise ValueError("ttl_ms must be at least 1")


def _check_share(max_share: Fraction | None) -> None:
    if max_share is None:
        return
    if not 0 < max_share <= 1:
        raise ValueError("max_share must be in (0, 1]")
    if max_share.denominator > MAX_SHARE_DENOMINATOR:
        raise ValueError(f"max_share's denominator must be at most {MAX_SHARE_DENOMINATOR}")


def unique_budgets(budgets: Iterable[BudgetRef]) -> tuple[BudgetRef, ...]:
    """`budgets` without repeats of one counter (the first ref of each wins), in order.

    A counter named twice would otherwise be held or charged twice.
    """
    seen: set[tuple[str, str]] = set()
    out: list[BudgetRef] = []
    for ref in budgets:
        if ref.key not in seen:
            seen.add(ref.key)
            out.append(ref)
    return tuple(out)


def counter_ttl_ms(ref: BudgetRef, now_ms: int) -> int:
    """How long a counter written at `now_ms` is kept: to its expiry, at least `MIN_KEY_TTL_MS`."""
    return max(ref.expires_at_ms - now_ms, MIN_KEY_TTL_MS)


def settled_ttl_ms(budgets: Sequence[BudgetRef], now_ms: int) -> int:
    """How long a settled request id is remembered: to the latest budget expiry, at least 7 days."""
    latest = max((ref.expires_at_ms for ref in budgets), default=0)
    return max(latest - now_ms, SETTLED_RETENTION_MS)


def hold_ttl_ms(expires_at_ms: int, budgets: Sequence[BudgetRef], now_ms: int) -> int:
    """How long a hold's record is kept: while its counters may live, and past its own expiry.

    A hold must outlive its expiry until `expire()` frees it; once its counters are gone too
    there is nothing left to free.
    """
    longest = max((counter_ttl_ms(ref, now_ms) for ref in budgets), default=0)
    return max(expires_at_ms - now_ms, longest) + MIN_KEY_TTL_MS


def lease_grant(
    budget: BudgetRef, counter: Counter, wanted_micros: int, min_micros: int, max_share: Fraction | None
) -> int:
    """What a lease on `budget` may grant now (the Lua lease script is this function line for line).

    Hard: `min(wanted, available)`, with `available = limit - spent - held`, at most
    `floor(max_share * available)` when a share is given -- but the share never refuses
    `min_micros` while that much is available, so the last requests' worth of a budget can
    still be leased. Hard grants are whole multiples of `min_micros`. Soft: `wanted`. A grant
    below `min_micros` (the least worth having, one request's worst case) or of 0 grants nothing.
    """
    grant = wanted_micros
    if budget.hard:
        available = max(0, budget.limit_micros - counter.spent_micros - counter.held_micros)
        cap = available
        if max_share is not None:
            shared = available * max_share.numerator // max_share.denominator
            cap = min(available, max(shared, min_micros))
        grant = min(grant, cap)
        if min_micros > 0:
            # Whole multiples of one request's worst case: no lease ends with a sliver too
            # small for any request while another edge could have used it.
            grant -= grant % min_micros
    if grant <= 0 or grant < min_micros:
        return 0
    return grant


def wall_clock_ms() -> int:
    """Milliseconds since the epoch, for calls that are not given a `now_ms`."""
    return time.time_ns() // 1_000_000


class BudgetStore(ABC):
    """Budget counters and the holds against them; see the module docstring for the model.

    The public methods validate their arguments (identically for every backend) and call
    the backend's `_reserve`, `_lease`, ... with budgets de-duplicated.
    """

    shared: bool = False
    """Whether the counters outlive the process (shared by ledger replicas): a ledger starting
    on a store that is not fills every counter from its rows."""

    async def reserve(
        self, hold_id: str, budgets: Sequence[BudgetRef], amount_micros: int, *, ttl_ms: int, now_ms: int
    ) -> HoldOutcome:
        """Hold `amount_micros` on every budget, or on none if a hard one has less left.

        Soft budgets are held too (so their `held` shows what is in flight) but never refuse.
        The hold expires at `now_ms + ttl_ms`. Asking again with the id of a live reservation
        returns that reservation's outcome and holds nothing more.

        Raises `HoldConflict` when `hold_id` names a live lease, or a live reservation of
        another amount or on other budgets (a retry must ask for what it asked before).
        """
        _check_id("hold_id", hold_id)
        _check_micros("amount_micros", amount_micros)
        _check_ttl(ttl_ms)
        return await self._reserve(hold_id, unique_budgets(budgets), amount_micros, ttl_ms, now_ms)

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
        """Hold a slice of one budget for an edge, sized by `lease_grant`; 0 granted creates nothing.

        The lease expires at `now_ms + ttl_ms` (the ledger passes its settle-by time). Asking
        again with the id of a live lease returns its original grant and holds nothing more.

        Raises `HoldConflict` when `lease_id` names a live reservation.
        """
        _check_id("lease_id", lease_id)
        _check_micros("wanted_micros", wanted_micros)
        _check_micros("min_micros", min_micros)
        _check_ttl(ttl_ms)
        _check_share(max_share)
        return await self._lease(lease_id, budget, wanted_micros, min_micros, ttl_ms, now_ms, max_share)

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
        """Charge a finished request, exactly once by `request_id`.

        `spent += actual_micros` on every budget in `budgets` (the budgets that apply to the
        request now, held or not), in the window of the ref, except where a named hold holds
        that budget in another window: the request was admitted against that window's counter,
        and that counter is charged (a request that ran across midnight counts where its hold
        was taken, so neither window passes its limit). The named reservation is removed and
        its whole remainder freed, even when `actual_micros` exceeds it. Each named lease is
        drawn down by `min(actual, its remaining)` (its counter's `held` by the same) and ends
        at 0.
        A named lease past its expiry is drawn down all the same (what it admitted before then
        is still settling): only `expire()`, or the lazy expiry of `reserve`, `lease` and
        `counter`, frees what is left of it. Unknown or other-kind hold ids are ignored; the
        spend is recorded all the same. A request id already settled changes nothing and
        returns `duplicate=True`.
        """
        _check_id("request_id", request_id)
        _check_micros("actual_micros", actual_micros)
        leases = tuple(dict.fromkeys(lid for lid in lease_ids if lid))
        return await self._settle(
            request_id, actual_micros, unique_budgets(budgets), reservation_id, leases, now_ms
        )

    async def release(self, hold_id: str, *, now_ms: int) -> bool:
        """Free a reservation, or what is left of a lease; False if unknown, settled or expired.

        An expired hold not yet freed is freed now (as `expire()` would), and still gives False.
        """
        _check_id("hold_id", hold_id)
        return await self._release(hold_id, now_ms)

    async def return_lease(self, lease_id: str, unused_micros: int, *, now_ms: int) -> int:
        """Give back `min(unused_micros, remaining)` of a live lease; returns the amount given back.

        Returning everything that is left ends the lease. Unknown, expired or reservation ids
        return 0 (an expired lease is freed as `expire()` would). Not idempotent: a retried
        partial return gives back twice, so callers return everything at once.
        """
        _check_id("lease_id", lease_id)
        _check_micros("unused_micros", unused_micros)
        return await self._return_lease(lease_id, unused_micros, now_ms)

    async def expire(self, *, now_ms: int, limit: int = 1000) -> int:
        """Free up to `limit` holds whose expiry is at or before `now_ms`, oldest first; returns how many.

        Also drops stored state past its own expiry (memory backend; Redis does that itself).
        Frees nothing while expired holds are kept (`keep_expired_holds`).
        """
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if now_ms < self._keep_expired_until_ms:
            return 0
        return await self._expire(now_ms, limit)

    _keep_expired_until_ms: int = 0

    def keep_expired_holds(self, *, until_ms: int) -> None:
        """Free no hold past its expiry, neither by `expire()` nor lazily, while the caller's
        `now_ms` is before `until_ms`: this store's caller has just started, and commits held
        back while it was down still draw their cost from the holds they name. (Per store
        object, so per ledger process: a replica that stayed up frees them as usual.)"""
        self._keep_expired_until_ms = until_ms

    def _expired_by(self, now_ms: int) -> int:
        """Holds expiring at or before this are freed lazily at `now_ms`: `now_ms` itself, or -1
        (none) while expired holds are kept."""
        return now_ms if now_ms >= self._keep_expired_until_ms else -1

    async def forget(self, budget_ids: Sequence[str]) -> int:
        """Drop the counters of `budget_ids` in every window (the budgets were deleted); returns
        how many counters went. Holds on them live on until they end, no longer counted there."""
        for budget_id in budget_ids:
            _check_id("budget_id", budget_id)
        return await self._forget(tuple(dict.fromkeys(budget_ids)))

    async def counter(self, budget: BudgetRef, *, now_ms: int) -> Counter:
        """The budget's counter now (expired holds on it freed first); zeros if it has none."""
        return await self._counter(budget, now_ms)

    async def epoch(self) -> str:
        """The store's epoch now: it changes only when the store lost its holds (module docstring)."""
        return await self._epoch()

    async def claim_rebuild(self) -> RebuildClaim | None:
        """A claim on rebuilding the current epoch's counters, the caller's alone for
        `REBUILD_CLAIM_MS` unless renewed, or None when they are rebuilt or another caller holds
        the claim. A claim left over from an older epoch does not count."""
        return await self._claim_rebuild()

    async def renew_rebuild(self, claim: RebuildClaim) -> bool:
        """Keep the claim another `REBUILD_CLAIM_MS`; False when it is no longer the caller's
        (it lapsed, and another caller may be rebuilding)."""
        return await self._rebuild_claim(claim, REBUILD_CLAIM_MS)

    async def release_rebuild(self, claim: RebuildClaim) -> None:
        """Give up the claim (the rebuild failed), so another caller may rebuild at once."""
        await self._rebuild_claim(claim, 0)

    async def mark_rebuilt(self, claim: RebuildClaim) -> bool:
        """The counters of the claim's epoch are rebuilt: `reserve` and `lease` hold again, and
        the claim ends. False (nothing marked) unless the claim is still the caller's and its
        epoch still current."""
        _check_id("epoch", claim.epoch)
        return await self._mark_rebuilt(claim)

    async def add_spent(self, budget: BudgetRef, micros: int, *, now_ms: int | None = None) -> None:
        """Add to the committed spend (rebuilding it from the ledger's rows); `held` is kept.

        `now_ms` (default: the wall clock) only decides how long the counter is kept.
        """
        _check_micros("micros", micros)
        await self._add_spent(budget, micros, wall_clock_ms() if now_ms is None else now_ms)

    @abstractmethod
    async def aclose(self) -> None:
        """Release what the store owns (connections)."""

    @abstractmethod
    async def _reserve(
        self, hold_id: str, budgets: tuple[BudgetRef, ...], amount: int, ttl_ms: int, now_ms: int
    ) -> HoldOutcome: ...

    @abstractmethod
    async def _lease(
        self,
        lease_id: str,
        budget: BudgetRef,
        wanted: int,
        min_micros: int,
        ttl_ms: int,
        now_ms: int,
        max_share: Fraction | None,
    ) -> Grant: ...

    @abstractmethod
    async def _settle(
        self,
        request_id: str,
        actual: int,
        budgets: tuple[BudgetRef, ...],
        reservation_id: str,
        lease_ids: tuple[str, ...],
        now_ms: int,
    ) -> Settlement: ...

    @abstractmethod
    async def _release(self, hold_id: str, now_ms: int) -> bool: ...

    @abstractmethod
    async def _return_lease(self, lease_id: str, unused: int, now_ms: int) -> int: ...

    @abstractmethod
    async def _expire(self, now_ms: int, limit: int) -> int: ...

    @abstractmethod
    async def _counter(self, budget: BudgetRef, now_ms: int) -> Counter: ...

    @abstractmethod
    async def _add_spent(self, budget: BudgetRef, micros: int, now_ms: int) -> None: ...

    @abstractmethod
    async def _claim_rebuild(self) -> RebuildClaim | None: ...

    @abstractmethod
    async def _rebuild_claim(self, claim: RebuildClaim, keep_ms: int) -> bool: ...

    @abstractmethod
    async def _mark_rebuilt(self, claim: RebuildClaim) -> bool: ...

    @abstractmethod
    async def _forget(self, budget_ids: tuple[str, ...]) -> int: ...

    @abstractmethod
    async def _epoch(self) -> str: ...


@dataclass(slots=True)
class _MemCounter:
    spent: int = 0
    held: int = 0
    drop_at: int = 0
    # The live holds against this counter and their expiries (Redis: the counter's index zset).
    holds: dict[str, int] = field(default_factory=dict)


@dataclass(slots=True)
class _MemHold:
    kind: Kind
    remaining: int
    expires_at: int
    granted: int
    counters: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class _MemSettled:
    charged: int
    drop_at: int


class MemoryBudgetStore(BudgetStore):
    """The embedded backend: counters and holds in dicts, for one process (one event loop).

    No method awaits between reading and writing, so each operation is atomic on the event
    loop. State past its expiry is dropped by `expire()`, which the ledger calls periodically.
    """

    def __init__(self) -> None:
        # Everything this store holds dies with the process: a new process is a new epoch.
        self._epoch_id = uuid.uuid4().hex
        self._counters: dict[tuple[str, str], _MemCounter] = {}
        self._holds: dict[str, _MemHold] = {}
        self._settled: dict[str, _MemSettled] = {}

    def _live_counter(self, key: tuple[str, str], now_ms: int) -> _MemCounter | None:
        counter = self._counters.get(key)
        if counter is not None and counter.drop_at <= now_ms:
            del self._counters[key]
            return None
        return counter

    def _touch(self, ref: BudgetRef, now_ms: int) -> _MemCounter:
        """The counter of `ref`, created if missing, kept for its TTL from now."""
        counter = self._live_counter(ref.key, now_ms)
        if counter is None:
            counter = self._counters[ref.key] = _MemCounter()
        counter.drop_at = now_ms + counter_ttl_ms(ref, now_ms)
        return counter

    def _snapshot(self, key: tuple[str, str], now_ms: int) -> Counter:
        counter = self._live_counter(key, now_ms)
        return Counter(0, 0) if counter is None else Counter(counter.spent, counter.held)

    def _free(self, hold_id: str) -> bool:
        """Remove a hold and free its remainder from its counters; False if there was none."""
        hold = self._holds.pop(hold_id, None)
        if hold is None:
            return False
        for key in hold.counters:
            counter = self._counters.get(key)
            # Only a counter that still indexes the hold counts it: one dropped and written
            # again since must not lose what other holds hold.
            if counter is not None and counter.holds.pop(hold_id, None) is not None:
                counter.held = max(0, counter.held - hold.remaining)
        return True

    def _shrink(self, hold_id: str, hold: _MemHold, by: int) -> None:
        """Take `by` (at most the remainder) off a lease; at 0 the lease ends."""
        if by >= hold.remaining:
            self._free(hold_id)
            return
        for key in hold.counters:
            counter = self._counters.get(key)
            if counter is not None and hold_id in counter.holds:
                counter.held = max(0, counter.held - by)
        hold.remaining -= by

    def _expire_counter(self, key: tuple[str, str], now_ms: int) -> None:
        counter = self._live_counter(key, now_ms)
        if counter is None:
            return
        upto = self._expired_by(now_ms)
        due = sorted((exp, hid) for hid, exp in counter.holds.items() if exp <= upto)
        for _, hold_id in due[:LAZY_EXPIRY_PER_COUNTER]:
            if not self._free(hold_id):
                counter.holds.pop(hold_id, None)

    def _add_hold(
        self, hold_id: str, kind: Kind, refs: Sequence[BudgetRef], amount: int, expires_at: int, now_ms: int
    ) -> None:
        for ref in refs:
            counter = self._touch(ref, now_ms)
            counter.held += amount
            counter.holds[hold_id] = expires_at
        self._holds[hold_id] = _MemHold(kind, amount, expires_at, amount, tuple(ref.key for ref in refs))

    async def _reserve(
        self, hold_id: str, budgets: tuple[BudgetRef, ...], amount: int, ttl_ms: int, now_ms: int
    ) -> HoldOutcome:
        for ref in budgets:
            self._expire_counter(ref.key, now_ms)
        existing = self._holds.get(hold_id)
        if existing is not None:
            if existing.kind != RESERVATION:
                raise HoldConflict("the hold id names a live lease")
            if existing.expires_at > now_ms:
                # As the Redis script: as many counters as budgets, each budget on one of them.
                held = {key[0] for key in existing.counters}
                if (
                    existing.granted != amount
                    or len(existing.counters) != len(budgets)
                    or any(ref.budget_id not in held for ref in budgets)
                ):
                    raise HoldConflict(RESERVATION_MISMATCH)
                return HoldOutcome(True, hold_id, existing.expires_at)
            self._free(hold_id)
        for ref in budgets:
            if not ref.hard:
                continue
            now = self._snapshot(ref.key, now_ms)
            if now.spent_micros + now.held_micros + amount > ref.limit_micros:
                return HoldOutcome(
                    False,
                    hold_id,
                    refused=ref,
                    spent_micros=now.spent_micros,
                    held_micros=now.held_micros,
                    requested_micros=amount,
                )
        expires_at = now_ms + ttl_ms
        self._add_hold(hold_id, RESERVATION, budgets, amount, expires_at, now_ms)
        return HoldOutcome(True, hold_id, expires_at)

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
        self._expire_counter(budget.key, now_ms)
        existing = self._holds.get(lease_id)
        if existing is not None:
            if existing.kind != LEASE:
                raise HoldConflict("the lease id names a live reservation")
            if existing.expires_at > now_ms:
                counter = self._snapshot(budget.key, now_ms)
                return Grant(lease_id, existing.granted, existing.expires_at, counter, self._epoch_id)
            self._free(lease_id)
        before = self._snapshot(budget.key, now_ms)
        grant = lease_grant(budget, before, wanted, min_micros, max_share)
        if grant == 0:
            return Grant(lease_id, 0, 0, before, self._epoch_id)
        expires_at = now_ms + ttl_ms
        self._add_hold(lease_id, LEASE, (budget,), grant, expires_at, now_ms)
        return Grant(lease_id, grant, expires_at, self._snapshot(budget.key, now_ms), self._epoch_id)

    async def _settle(
        self,
        request_id: str,
        actual: int,
        budgets: tuple[BudgetRef, ...],
        reservation_id: str,
        lease_ids: tuple[str, ...],
        now_ms: int,
    ) -> Settlement:
        done = self._settled.get(request_id)
        if done is not None and done.drop_at > now_ms:
            return Settlement(True, done.charged)
        named = [(reservation_id, RESERVATION), *((lease_id, LEASE) for lease_id in lease_ids)]
        # The first named hold on a budget decides its window (as in the Redis script).
        held_windows: dict[str, tuple[str, str]] = {}
        for hold_id, kind in named:
            if (hold := self._holds.get(hold_id)) is not None and hold.kind == kind:
                for key in hold.counters:
                    held_windows.setdefault(key[0], key)
        windows: dict[str, str] = {}
        for ref in budgets:
            key = held_windows.get(ref.budget_id, ref.key)
            counter = self._live_counter(key, now_ms) if key != ref.key else None
            if counter is None:
                counter, key = self._touch(ref, now_ms), ref.key
            counter.spent += actual
            windows[ref.budget_id] = key[1]
        if reservation_id:
            reservation = self._holds.get(reservation_id)
            if reservation is not None and reservation.kind == RESERVATION:
                self._free(reservation_id)
        for lease_id in lease_ids:
            lease = self._holds.get(lease_id)
            if lease is not None and lease.kind == LEASE:
                self._shrink(lease_id, lease, min(actual, lease.remaining))
        self._settled[request_id] = _MemSettled(actual, now_ms + settled_ttl_ms(budgets, now_ms))
        return Settlement(False, actual, windows)

    async def _release(self, hold_id: str, now_ms: int) -> bool:
        hold = self._holds.get(hold_id)
        if hold is None:
            return False
        live = hold.expires_at > now_ms
        self._free(hold_id)
        return live

    async def _return_lease(self, lease_id: str, unused: int, now_ms: int) -> int:
        lease = self._holds.get(lease_id)
        if lease is None or lease.kind != LEASE:
            return 0
        if lease.expires_at <= now_ms:
            self._free(lease_id)
            return 0
        given = min(unused, lease.remaining)
        self._shrink(lease_id, lease, given)
        return given

    async def _expire(self, now_ms: int, limit: int) -> int:
        due = sorted((hold.expires_at, hid) for hid, hold in self._holds.items() if hold.expires_at <= now_ms)
        freed = sum(self._free(hold_id) for _, hold_id in due[:limit])
        self._counters = {k: c for k, c in self._counters.items() if c.drop_at > now_ms}
        self._settled = {k: s for k, s in self._settled.items() if s.drop_at > now_ms}
        return freed

    async def _counter(self, budget: BudgetRef, now_ms: int) -> Counter:
        self._expire_counter(budget.key, now_ms)
        return self._snapshot(budget.key, now_ms)

    async def _add_spent(self, budget: BudgetRef, micros: int, now_ms: int) -> None:
        self._touch(budget, now_ms).spent += micros

    async def _claim_rebuild(self) -> RebuildClaim | None:
        return None  # rebuilt by the ledger before it serves, and never loses data while it runs

    async def _rebuild_claim(self, claim: RebuildClaim, keep_ms: int) -> bool:
        return False  # never claimed

    async def _mark_rebuilt(self, claim: RebuildClaim) -> bool:
        return False  # never claimed

    async def _forget(self, budget_ids: tuple[str, ...]) -> int:
        forgotten = set(budget_ids)
        gone = [key for key in self._counters if key[0] in forgotten]
        for key in gone:
            del self._counters[key]
        return len(gone)

    async def _epoch(self) -> str:
        return self._epoch_id

    async def aclose(self) -> None:
        """Nothing to release."""


def build_budget_store(redis_url: str | None, *, prefix: str = DEFAULT_PREFIX) -> BudgetStore:
    """The Redis store for `redis_url` (it owns its client), or the in-memory one when None."""
    if redis_url is None:
        return MemoryBudgetStore()
    # Imported here: budgets_redis builds on this module's types.
    from switchyard.common.redis_client import open_redis
    from switchyard.ledger.budgets_redis import RedisBudgetStore

    client = open_redis(redis_url, client_name="switchyard-ledger-budgets")
    return RedisBudgetStore(client, prefix=prefix, owns_client=True)
