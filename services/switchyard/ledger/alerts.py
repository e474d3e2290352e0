"""Budget threshold alerts: fired once per threshold per window, delivered as signed webhooks.

Firing. After a commit the ledger calls `AlertCenter.observe(budget, window_key=..., spent_micros=...)`.
Each threshold of `THRESHOLDS` (80, 90, 100 % of the limit, integer math) that the spend has
reached (100 % also when a hard budget past 90 % refuses a request its spend leaves no room
for) is recorded with `INSERT ... ON CONFLICT DO NOTHING` on the unique key
(budget_id, window_key, threshold_percent): whichever ledger replica inserts the row fired the
alert, every other one sees the conflict, so each alert fires exactly once in the mesh. A new
window (the next day or month) has a new key and fires again. An in-memory note of what fired
keeps the usual call (nothing new reached) free of SQL.

Delivery. An alert on a budget with a `webhook_url` is stored with status "pending" and its
JSON body fixed at fire time, so retries send identical bytes. The delivery loop (`start()`,
one pass is `deliver_due()`) reads due rows from SQL, so deliveries survive a restart. It
claims a row by a conditional UPDATE that also counts the attempt (two replicas never send the
same attempt, and a replica that dies mid-send only delays the retry until the claim lapses),
POSTs the body, and records the outcome: any 2xx is "delivered"; anything else is retried
after `retry_delays_s[n]` plus up to 10 % jitter (never earlier, so receivers that asked for
room get it), and after the attempt that follows the last delay the alert is "failed", kept
with `last_error` ("HTTP 500" or the exception class: never the body, the URL or the secret).
Delivery is at least once: receivers dedupe by the `Switchyard-Alert-Id` header.

Signing. With a secret, each request carries `Switchyard-Signature: t=<unix s>,v1=<hex>` where
the hex is HMAC-SHA256(secret, f"{t}." + body), as Stripe does: the timestamp inside the MAC
lets a receiver (`verify`) refuse replays of old requests. Without a secret alerts are still
delivered, unsigned, and `start()` logs a warning once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import httpx

from switchyard.common.errors import invalid
from switchyard.common.logging import get_logger
from switchyard.common.sql import Database, Migration, Row, Statements, now_ms
from switchyard.v1 import ledger_pb2

__all__ = [
    "ALERT_ID_HEADER",
    "COMPONENT",
    "MIGRATIONS",
    "SIGNATURE_HEADER",
    "THRESHOLDS",
    "AlertCenter",
    "DeliveryStatus",
    "sign",
    "verify",
]

log = get_logger(__name__)

THRESHOLDS: Final = (80, 90, 100)
# A hard budget refusing a request its spend leaves no room for, past this share, is used up.
EXHAUSTED_FROM_PERCENT: Final = 90
SIGNATURE_HEADER: Final = "Switchyard-Signature"
ALERT_ID_HEADER: Final = "Switchyard-Alert-Id"
EVENT_TYPE: Final = "budget.threshold"
USER_AGENT: Final = "switchyard-alerts/1"

# Retries wait their delay plus up to this fraction of it, so replicas do not retry in step.
JITTER_FRACTION: Final = 0.10
# How often the loop looks for due deliveries when nothing woke it (retries are ≥ 1 s apart anyway).
POLL_INTERVAL_S: Final = 1.0
# Rows claimed per pass, and sent at once.
BATCH_SIZE: Final = 100
MAX_CONCURRENT_SENDS: Final = 16
# A claim outlives the request timeout by this much before another replica may retry the alert.
CLAIM_MARGIN_S: Final = 30.0
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000

COMPONENT: Final = "alerts"
MIGRATIONS: Final = (
    Migration(
        1,
        "create_budget_alerts",
        sql=(
            """CREATE TABLE budget_alerts (
                alert_id TEXT PRIMARY KEY,
                budget_id TEXT NOT NULL,
                tenant_id TEXT NOT NULL,
                window_key TEXT NOT NULL,
                threshold_percent INTEGER NOT NULL,
                spent_micros BIGINT NOT NULL,
                limit_micros BIGINT NOT NULL,
                fired_at_ms BIGINT NOT NULL,
                webhook_url TEXT NOT NULL DEFAULT '',
                payload TEXT NOT NULL,
                delivery_status TEXT NOT NULL,
                delivery_attempts INTEGER NOT NULL DEFAULT 0,
                next_attempt_at_ms BIGINT,
                last_error TEXT NOT NULL DEFAULT '',
                delivered_at_ms BIGINT,
                UNIQUE (budget_id, window_key, threshold_percent)
            )""",
            "CREATE INDEX budget_alerts_due_idx ON budget_alerts (delivery_status, next_attempt_at_ms)",
            "CREATE INDEX budget_alerts_tenant_idx ON budget_alerts (tenant_id, fired_at_ms)",
        ),
    ),
)


class DeliveryStatus:
    """The values of `budget_alerts.delivery_status` (and `BudgetAlert.delivery_status`)."""

    NONE: Final = "none"
    PENDING: Final = "pending"
    DELIVERED: Final = "delivered"
    FAILED: Final = "failed"


# --- signatures -----------------------------------------------------------------------------


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `Switchyard-Signature` value for `body` sent at `timestamp` (unix seconds)."""
    return f"t={timestamp},v1={_mac(secret, timestamp, body)}"


def verify(secret: bytes, header: str, body: bytes, *, now: int, tolerance_s: int = 300) -> bool:
    """Whether `header` signs exactly `body` with `secret`, stamped within `tolerance_s` of `now`.

    For receivers. Several `v1=` entries are accepted (a sender rotating secrets may send one per
    secret); a malformed header, a timestamp further than `tolerance_s` from `now` either way (a
    replay, or a badly wrong clock) or no matching MAC is False. MACs are compared in constant time.
    """
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            return False
        if name == "t":
            if not value.isdigit() or timestamp is not None:
                return False
            timestamp = int(value)
        elif name == "v1":
            candidates.append(value)
    if timestamp is None or not candidates or abs(now - timestamp) > tolerance_s:
        return False
    expected = _mac(secret, timestamp, body).encode("ascii")
    matched = False
    for candidate in candidates:
        # Compare every candidate, so timing does not tell which one (if any) matched.
        matched |= hmac.compare_digest(expected, candidate.encode("utf-8", "replace"))
    return matched


def _mac(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


# --- the payload ----------------------------------------------------------------------------


def _usd(micros: int) -> str:
    """Micro-USD as a plain decimal string with six places ("12.500000"), exact."""
    return format(Decimal(micros).scaleb(-6).quantize(Decimal("0.000001")), "f")


def _rfc3339(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    moment = datetime.fromtimestamp(seconds, tz=UTC).replace(microsecond=millis * 1000)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _enforcement(budget: ledger_pb2.Budget) -> str:
    # Unspecified enforcement is treated as hard, the stricter reading.
    return "soft" if budget.enforcement == ledger_pb2.BUDGET_ENFORCEMENT_SOFT else "hard"


@dataclass(frozen=True, slots=True)
class _Fired:
    alert_id: str
    threshold: int
    payload: str


def _new_alert(
    budget: ledger_pb2.Budget, window_key: str, threshold: int, spent_micros: int, fired_at_ms: int
) -> _Fired:
    alert_id = f"alrt_{uuid.uuid4().hex}"
    body = {
        "type": EVENT_TYPE,
        "alert_id": alert_id,
        "budget_id": budget.budget_id,
        "tenant_id": budget.scope.tenant_id,
        "window": window_key,
        "threshold_percent": threshold,
        "spent_micros": spent_micros,
        "limit_micros": budget.limit_micros,
        "spent_usd": _usd(spent_micros),
        "limit_usd": _usd(budget.limit_micros),
        "enforcement": _enforcement(budget),
        "fired_at": _rfc3339(fired_at_ms),
    }
    return _Fired(alert_id, threshold, json.dumps(body, separators=(",", ":")))


# --- paging ---------------------------------------------------------------------------------


def _encode_page_token(row: Row) -> str:
    position = [int(row["fired_at_ms"]), int(row["threshold_percent"]), str(row["alert_id"])]
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode()


def _decode_page_token(token: str) -> tuple[int, int, str]:
    try:
        fired_at_ms, threshold, alert_id = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, TypeError):
        raise invalid("page_token is not one this server issued", "page_token") from None
    if not (isinstance(fired_at_ms, int) and isinstance(threshold, int) and isinstance(alert_id, str)):
        raise invalid("page_token is not one this server issued", "page_token")
    return fired_at_ms, threshold, alert_id


def _alert_from_row(row: Row) -> ledger_pb2.BudgetAlert:
    alert = ledger_pb2.BudgetAlert(
        budget_id=str(row["budget_id"]),
        tenant_id=str(row["tenant_id"]),
        window_key=str(row["window_key"]),
        threshold_percent=int(row["threshold_percent"]),
        spent_micros=int(row["spent_micros"]),
        limit_micros=int(row["limit_micros"]),
        delivery_status=str(row["delivery_status"]),
        delivery_attempts=int(row["delivery_attempts"]),
        last_error=str(row["last_error"]),
    )
    alert.fired_at.FromMilliseconds(int(row["fired_at_ms"]))
    return alert


_LIST_COLUMNS: Final = (
    "alert_id, budget_id, tenant_id, window_key, threshold_percent, spent_micros, limit_micros,"
    " fired_at_ms, delivery_status, delivery_attempts, last_error"
)


# --- the center -----------------------------------------------------------------------------


class AlertCenter:
    """Fires budget threshold alerts into SQL and delivers their webhooks.

    Open with `await AlertCenter.open(db, secret=...)` (migrates the schema), call `observe` after
    each change of a budget's spend, `start()` the delivery loop, and `aclose()` at shutdown.
    Any number of replicas may share one database: each alert fires once and each delivery
    attempt is made by one replica.
    """

    def __init__(
        self, database: Database, *, secret: bytes | None, retry_delays_s: Sequence[float], timeout_s: float
    ) -> None:
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if any(delay < 0 for delay in retry_delays_s):
            raise ValueError("retry delays must not be negative")
        self.database = database
        self._secret = secret
        self._retry_delays_s = tuple(retry_delays_s)
        self._claim_ms = int((timeout_s + CLAIM_MARGIN_S) * 1000)
        # No redirects: a webhook answers where it was configured, or the attempt fails.
        self._http = httpx.AsyncClient(timeout=timeout_s, follow_redirects=False)
        self._rng = random.Random()
        # budget_id -> (window_key, thresholds known fired there): one window per budget, so it stays small.
        self._fired: dict[str, tuple[str, set[int]]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned_unsigned = False

    @classmethod
    async def open(
        cls,
        db: Database,
        *,
        secret: bytes | None,
        retry_delays_s: Sequence[float] = (1, 5, 30, 120, 600),
        timeout_s: float = 5.0,
    ) -> AlertCenter:
        """A center on `db`, its table created or upgraded. `secret` None: webhooks go unsigned."""
        await db.migrate(COMPONENT, MIGRATIONS)
        return cls(db, secret=secret, retry_delays_s=retry_delays_s, timeout_s=timeout_s)

    # --- firing ---

    async def observe(
        self,
        budget: ledger_pb2.Budget,
        *,
        window_key: str,
        spent_micros: int,
        now_ms: int,
        exhausted: bool = False,
    ) -> list[int]:
        """Fire the thresholds `spent_micros` has reached in `window_key` that have not fired yet.

        `exhausted`: a hard budget refused a request because its spend leaves less than the
        request needs. It stops short of its limit (nothing is admitted past it), so once past
        90 % that fires 100 % too: the budget is used up. (Below 90 % a refusal says the
        request was large, not that the budget is used up.)
        Returns the thresholds this call fired (ascending); a threshold another replica fired
        first is not among them. A budget without a positive limit has no percentages and
        fires nothing. Costs no SQL when every reached threshold is known to have fired.
        """
        if not budget.budget_id or not window_key:
            raise ValueError("an alert needs a budget id and a window key")
        limit = budget.limit_micros
        if limit <= 0:
            return []
        used_up = exhausted and spent_micros * 100 >= limit * EXHAUSTED_FROM_PERCENT
        reached = [t for t in THRESHOLDS if spent_micros * 100 >= limit * t or (used_up and t == 100)]
        if not reached:
            return []
        known = self._known(budget.budget_id, window_key)
        todo = [t for t in reached if t not in known]
        if not todo:
            return []
        status = DeliveryStatus.PENDING if budget.webhook_url else DeliveryStatus.NONE
        fired: list[int] = []
        for threshold in todo:
            alert = _new_alert(budget, window_key, threshold, spent_micros, now_ms)
            inserted = await self.database.execute(
                "INSERT INTO budget_alerts (alert_id, budget_id, tenant_id, window_key, threshold_percent,"
                " spent_micros, limit_micros, fired_at_ms, webhook_url, payload, delivery_status,"
                " delivery_attempts, next_attempt_at_ms, last_error)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, '') ON CONFLICT DO NOTHING",
                (
                    alert.alert_id,
                    budget.budget_id,
                    budget.scope.tenant_id,
                    window_key,
                    threshold,
                    spent_micros,
                    limit,
                    now_ms,
                    budget.webhook_url,
                    alert.payload,
                    status,
                    now_ms if status == DeliveryStatus.PENDING else None,
                ),
            )
            # Inserted here or by another replica: either way it has fired and never fires again.
            known.add(threshold)
            if inserted == 1:
                fired.append(threshold)
                log.info(
                    "budget_alert_fired",
                    alert_id=alert.alert_id,
                    budget_id=budget.budget_id,
                    tenant_id=budget.scope.tenant_id,
                    window=window_key,
                    threshold_percent=threshold,
                    delivery_status=status,
                )
        if fired and status == DeliveryStatus.PENDING:
            self._wake.set()
        return fired

    def _known(self, budget_id: str, window_key: str) -> set[int]:
        entry = self._fired.get(budget_id)
        if entry is None or entry[0] != window_key:
            # A budget's window moved on (or a late commit names an older one): SQL decides again.
            entry = (window_key, set())
            self._fired[budget_id] = entry
        return entry[1]

    # --- delivery ---

    async def start(self) -> None:
        """Run the delivery loop in the background until `aclose()`; picks up pending deliveries."""
        if self._secret is None and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning("alert_webhooks_unsigned", reason="no webhook signing secret is configured")
        if self._task is None:
            self._task = asyncio.create_task(self._deliver_forever(), name="budget-alert-delivery")

    async def _deliver_forever(self) -> None:
        while True:
            try:
                attempted = await self.deliver_due(now_ms=now_ms())
            except Exception as exc:  # the database may be down: try again next round
                log.warning("alert_delivery_pass_failed", error=type(exc).__name__)
                attempted = 0
            if attempted >= BATCH_SIZE:
                continue  # more may be due right now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_INTERVAL_S)
            self._wake.clear()

    async def deliver_due(self, *, now_ms: int) -> int:
        """One delivery pass at `now_ms`: claim up to `BATCH_SIZE` due alerts, send them, record
        each outcome. Returns how many deliveries were attempted. The loop calls it with the wall
        clock; tests call it with a fake one."""
        rows = await self.database.fetch_all(
            "SELECT alert_id, webhook_url, payload, delivery_attempts FROM budget_alerts"
            " WHERE delivery_status = ? AND next_attempt_at_ms <= ?"
            " ORDER BY next_attempt_at_ms, alert_id LIMIT ?",
            (DeliveryStatus.PENDING, now_ms, BATCH_SIZE),
        )
        claimed: list[tuple[Row, int]] = []
        for row in rows:
            attempt = int(row["delivery_attempts"]) + 1
            # Counting the attempt is the claim: a replica that read the same row loses this race.
            changed = await self.database.execute(
                "UPDATE budget_alerts SET delivery_attempts = ?, next_attempt_at_ms = ?"
                " WHERE alert_id = ? AND delivery_status = ? AND delivery_attempts = ?"
                " AND next_attempt_at_ms <= ?",
                (
                    attempt,
                    now_ms + self._claim_ms,
                    row["alert_id"],
                    DeliveryStatus.PENDING,
                    attempt - 1,
                    now_ms,
                ),
            )
            if changed == 1:
                claimed.append((row, attempt))
        if not claimed:
            return 0
        gate = asyncio.Semaphore(MAX_CONCURRENT_SENDS)

        async def send(row: Row, attempt: int) -> None:
            async with gate:
                await self._attempt(row, attempt, now_ms)

        async with asyncio.TaskGroup() as group:
            for row, attempt in claimed:
                group.create_task(send(row, attempt))
        return len(claimed)

    async def _attempt(self, row: Row, attempt: int, now: int) -> None:
        alert_id = str(row["alert_id"])
        body = str(row["payload"]).encode("utf-8")
        headers = {"Content-Type": "application/json", ALERT_ID_HEADER: alert_id, "User-Agent": USER_AGENT}
        if self._secret is not None:
            headers[SIGNATURE_HEADER] = sign(self._secret, now // 1000, body)
        error = ""
        try:
            response = await self._http.post(str(row["webhook_url"]), content=body, headers=headers)
            if not 200 <= response.status_code < 300:
                error = f"HTTP {response.status_code}"
        except Exception as exc:  # any failure to send is a failed attempt; only its class is kept
            error = type(exc).__name__
        try:
            await self._record(alert_id, attempt, now, error)
        except Exception as exc:  # the claim lapses and the alert is tried again
            log.warning("alert_delivery_unrecorded", alert_id=alert_id, error=type(exc).__name__)

    async def _record(self, alert_id: str, attempt: int, now: int, error: str) -> None:
        # Each update requires our attempt count, so a late outcome never overwrites a newer claim's.
        if not error:
            await self.database.execute(
                "UPDATE budget_alerts SET delivery_status = ?, delivered_at_ms = ?,"
                " next_attempt_at_ms = NULL, last_error = '' WHERE alert_id = ? AND delivery_attempts = ?",
                (DeliveryStatus.DELIVERED, now, alert_id, attempt),
            )
            log.info("alert_webhook_delivered", alert_id=alert_id, attempts=attempt)
            return
        if attempt > len(self._retry_delays_s):
            await self.database.execute(
                "UPDATE budget_alerts SET delivery_status = ?, next_attempt_at_ms = NULL, last_error = ?"
                " WHERE alert_id = ? AND delivery_attempts = ?",
                (DeliveryStatus.FAILED, error, alert_id, attempt),
            )
            log.warning("alert_webhook_failed", alert_id=alert_id, attempts=attempt, error=error)
            return
        delay_s = self._retry_delays_s[attempt - 1]
        delay_ms = int(delay_s * 1000 * (1 + self._rng.uniform(0, JITTER_FRACTION)))
        await self.database.execute(
            "UPDATE budget_alerts SET next_attempt_at_ms = ?, last_error = ?"
            " WHERE alert_id = ? AND delivery_attempts = ?",
            (now + delay_ms, error, alert_id, attempt),
        )
        log.info(
            "alert_webhook_retrying", alert_id=alert_id, attempts=attempt, error=error, delay_ms=delay_ms
        )

    async def forget_budgets(self, tx: Statements, budget_ids: Sequence[str]) -> int:
        """Delete the alerts of `budget_ids` (fired and pending alike) within `tx`; returns how
        many. For erasures: an alert's payload and row name its budget."""
        if not budget_ids:
            return 0
        for budget_id in budget_ids:
            self._fired.pop(budget_id, None)
        marks = ", ".join("?" * len(budget_ids))
        return await tx.execute(f"DELETE FROM budget_alerts WHERE budget_id IN ({marks})", list(budget_ids))

    # --- reading ---

    async def list_alerts(
        self, tenant_id: str = "", *, page_size: int = 100, page_token: str = ""
    ) -> tuple[list[ledger_pb2.BudgetAlert], str]:
        """Alerts newest first, of one tenant or (empty) all; returns a page and the next page's
        token ("" on the last). A page size of 0 means the default; at most `MAX_PAGE_SIZE`."""
        if page_size < 0:
            raise invalid("page_size must not be negative", "page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        clauses: list[str] = []
        params: list[object] = []
        if tenant_id:
            clauses.append("tenant_id = ?")
            params.append(tenant_id)
        if page_token:
            # Keyset paging: stable while new alerts arrive, unlike offsets.
            clauses.append("(fired_at_ms, threshold_percent, alert_id) < (?, ?, ?)")
            params.extend(_decode_page_token(page_token))
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.database.fetch_all(
            f"SELECT {_LIST_COLUMNS} FROM budget_alerts{where}"
            " ORDER BY fired_at_ms DESC, threshold_percent DESC, alert_id DESC LIMIT ?",
            (*params, size + 1),
        )
        page = rows[:size]
        next_token = _encode_page_token(page[-1]) if len(rows) > size else ""
        return [_alert_from_row(row) for row in page], next_token

    async def aclose(self) -> None:
        """Stop the delivery loop and the HTTP client. A send cut off here is retried after its claim
        lapses (the database stays open: it belongs to the caller)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._http.aclose()
