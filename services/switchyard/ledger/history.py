"""The ledger's durable state in SQL: one usage row per request, budget definitions and their audit log.

`LedgerStore.open(database)` migrates the "ledger" component and returns the store the
cost-ledger service calls. Three tables:

- `ledger_usage`: one row per finished request, unique by request id. `record()` is
  `INSERT ... ON CONFLICT (request_id) DO NOTHING RETURNING`, so a commit retried by an edge's
  outbox, or sent by two replicas at once, is stored (and charged) exactly once. Reports
  (`usage()`, `export_csv()`, `spent()`, `month_tokens()`) select by `finished_at_ms`, the
  time the request finished, so a request is counted in the day and month it ran in, whenever
  its commit arrived. Each row also keeps what was estimated before the request was sent (its
  prompt tokens, its expected cost), so `estimate_accuracy()` can report how far off that was.
- `ledger_budgets`: budget definitions. Spend, holds and the window start live in the service
  (Redis counters); this table keeps only what an administrator set, plus a version.
- `ledger_budget_audit`: who changed which budget from what to what, written in the same
  transaction as the change, and the GDPR erasures of end users (by hash, never in clear).
- `ledger_erasures`: each erased end user's hash with the latest erasure's time, so a commit
  that arrives after an erasure (from an edge's outbox) for a request that finished before it
  is stored anonymised, as the erasure would have left it.

Arguments the caller can get wrong (unknown dimensions, foreign page tokens, a window that ends
before it starts, a budget without a window) raise `ValueError`; the service maps it to
INVALID_ARGUMENT. Messages never repeat end user ids, tokens or other caller data.

Text is compared byte-wise on both backends (`COLLATE "C"` on PostgreSQL), so orderings and
page boundaries are the same whichever database runs underneath.
"""

from __future__ import annotations

import base64
import binascii
import csv
import hashlib
import io
import json
import math
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any, Final, TypeVar, cast

from google.protobuf import json_format

from switchyard.common import end_users
from switchyard.common.logging import get_logger
from switchyard.common.money import MICROS_PER_USD
from switchyard.common.sql import Backend, Database, DatabaseError, Migration, Row, Statements
from switchyard.v1 import common_pb2, gateway_pb2, ledger_pb2

__all__ = [
    "COMPONENT",
    "CSV_COLUMNS",
    "DEFAULT_PAGE_SIZE",
    "Erasure",
    "Holds",
    "MAX_PAGE_SIZE",
    "MIGRATIONS",
    "InvalidPageToken",
    "LedgerStore",
    "month_start_ms",
]

log = get_logger(__name__)

COMPONENT: Final = "ledger"
DEFAULT_PAGE_SIZE: Final = 100
MAX_PAGE_SIZE: Final = 1000
MS_PER_DAY: Final = 86_400_000
_MAX_BUDGET_ID_LENGTH: Final = 200
_IDS_PER_STATEMENT: Final = 500
_AUDIT_SCAN_PAGE: Final = 1000
_Id = TypeVar("_Id", str, int)
_PUT_BUDGET_ATTEMPTS: Final = 5
_CACHE_HITS: Final = ("CACHE_STATUS_HIT_EXACT", "CACHE_STATUS_HIT_SEMANTIC", "CACHE_STATUS_DEDUPLICATED")

MIGRATIONS: Final = (
    Migration(
        1,
        "create_ledger_usage",
        sql=(
            """CREATE TABLE ledger_usage (
                request_id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL,
                end_user TEXT NOT NULL DEFAULT '',
                api_key_id TEXT NOT NULL DEFAULT '',
                model TEXT NOT NULL DEFAULT '',
                provider TEXT NOT NULL DEFAULT '',
                scope_model TEXT NOT NULL DEFAULT '',
                scope_provider TEXT NOT NULL DEFAULT '',
                input_tokens BIGINT NOT NULL DEFAULT 0,
                output_tokens BIGINT NOT NULL DEFAULT 0,
                cached_input_tokens BIGINT NOT NULL DEFAULT 0,
                reasoning_tokens BIGINT NOT NULL DEFAULT 0,
                cache_write_input_tokens BIGINT NOT NULL DEFAULT 0,
                usage_estimated BOOLEAN NOT NULL DEFAULT FALSE,
                cost_micros BIGINT NOT NULL,
                record_cost_micros BIGINT NOT NULL DEFAULT 0,
                cache_status TEXT NOT NULL DEFAULT 'CACHE_STATUS_UNSPECIFIED',
                cache_saved_micros BIGINT NOT NULL DEFAULT 0,
                latency_ms BIGINT NOT NULL DEFAULT 0,
                status TEXT NOT NULL DEFAULT 'ok',
                attempts BIGINT NOT NULL DEFAULT 0,
                estimated_input_tokens BIGINT NOT NULL DEFAULT 0,
                finished_at_ms BIGINT NOT NULL,
                recorded_at_ms BIGINT NOT NULL
            )""",
            "CREATE INDEX ledger_usage_tenant_time_idx ON ledger_usage (tenant_id, finished_at_ms)",
            "CREATE INDEX ledger_usage_tenant_user_time_idx"
            " ON ledger_usage (tenant_id, end_user, finished_at_ms)",
            # month_tokens() runs on every commit.
            "CREATE INDEX ledger_usage_tenant_model_time_idx"
            " ON ledger_usage (tenant_id, model, finished_at_ms)",
            # Admin reports and exports across tenants, and tenant-less budgets' spent().
            "CREATE INDEX ledger_usage_time_idx ON ledger_usage (finished_at_ms)",
        ),
    ),
    Migration(
        2,
        "create_ledger_budgets",
        sql=(
            # `window` is a reserved word in PostgreSQL, hence `budget_window`.
            """CREATE TABLE ledger_budgets (
                budget_id TEXT PRIMARY KEY,
                tenant_id TEXT NOT NULL DEFAULT '',
                end_user TEXT NOT NULL DEFAULT '',
                api_key_id TEXT NOT NULL DEFAULT '',
                model TEXT NOT NULL DEFAULT '',
                provider TEXT NOT NULL DEFAULT '',
                budget_window TEXT NOT NULL,
                enforcement TEXT NOT NULL,
                limit_micros BIGINT NOT NULL,
                webhook_url TEXT NOT NULL DEFAULT '',
                version BIGINT NOT NULL,
                created_at_ms BIGINT NOT NULL,
                updated_at_ms BIGINT NOT NULL
            )""",
            "CREATE INDEX ledger_budgets_tenant_idx ON ledger_budgets (tenant_id, budget_id)",
        ),
    ),
    Migration(
        3,
        "create_ledger_budget_audit",
        sqlite=(
            """CREATE TABLE ledger_budget_audit (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                budget_id TEXT NOT NULL,
                tenant_id TEXT NOT NULL,
                actor TEXT NOT NULL,
                at_ms BIGINT NOT NULL,
                action TEXT NOT NULL,
                old_budget TEXT,
                new_budget TEXT,
                detail TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX ledger_budget_audit_budget_idx ON ledger_budget_audit (budget_id, id)",
            "CREATE INDEX ledger_budget_audit_tenant_idx ON ledger_budget_audit (tenant_id, id)",
        ),
        postgresql=(
            """CREATE TABLE ledger_budget_audit (
                id BIGSERIAL PRIMARY KEY,
                budget_id TEXT NOT NULL,
                tenant_id TEXT NOT NULL,
                actor TEXT NOT NULL,
                at_ms BIGINT NOT NULL,
                action TEXT NOT NULL,
                old_budget TEXT,
                new_budget TEXT,
                detail TEXT NOT NULL DEFAULT ''
            )""",
            "CREATE INDEX ledger_budget_audit_budget_idx ON ledger_budget_audit (budget_id, id)",
            "CREATE INDEX ledger_budget_audit_tenant_idx ON ledger_budget_audit (tenant_id, id)",
        ),
    ),
    Migration(
        4,
        "ledger_usage_settled",
        sql=(
            # 0: the row is the truth but its budget counters were not charged yet (the budget
            # store failed); the ledger's sweeper charges them and sets 1.
            "ALTER TABLE ledger_usage ADD COLUMN settled INTEGER NOT NULL DEFAULT 1",
            "CREATE INDEX ledger_usage_unsettled_idx ON ledger_usage (recorded_at_ms) WHERE settled = 0",
        ),
    ),
    Migration(
        5,
        "create_ledger_keys",
        sql=(
            # Keys the ledger makes for itself, once per database (every replica reads the same):
            # "erasure" keys the hash an erasure is audited under, when none is configured.
            "CREATE TABLE ledger_keys (name TEXT PRIMARY KEY, key_hex TEXT NOT NULL)",
            "CREATE INDEX ledger_budgets_end_user_idx ON ledger_budgets (tenant_id, end_user)",
        ),
    ),
    Migration(
        6,
        "ledger_budgets_deleted",
        sql=(
            # A deleted budget keeps its row (NULL: live) so that its version keeps rising: an
            # edge's lease of the old budget is never taken for one of a budget made again.
            "ALTER TABLE ledger_budgets ADD COLUMN deleted_at_ms BIGINT",
        ),
    ),
    Migration(
        7,
        "create_ledger_erasures",
        # Erased end users by `end_user_digest` and the latest erasure's time, filled from the
        # erasures already audited (the same digest, in the audit entry's JSON detail).
        sqlite=(
            "CREATE TABLE ledger_erasures (end_user_hmac TEXT PRIMARY KEY, erased_at_ms BIGINT NOT NULL)",
            "INSERT INTO ledger_erasures (end_user_hmac, erased_at_ms)"
            " SELECT json_extract(detail, '$.end_user_hmac_sha256'), MAX(at_ms) FROM ledger_budget_audit"
            " WHERE action = 'erase_end_user' AND json_extract(detail, '$.end_user_hmac_sha256') IS NOT NULL"
            " GROUP BY 1",
        ),
        postgresql=(
            "CREATE TABLE ledger_erasures (end_user_hmac TEXT PRIMARY KEY, erased_at_ms BIGINT NOT NULL)",
            "INSERT INTO ledger_erasures (end_user_hmac, erased_at_ms)"
            " SELECT detail::jsonb ->> 'end_user_hmac_sha256', MAX(at_ms) FROM ledger_budget_audit"
            " WHERE action = 'erase_end_user' AND detail::jsonb ->> 'end_user_hmac_sha256' IS NOT NULL"
            " GROUP BY 1",
        ),
    ),
    Migration(
        8,
        "ledger_usage_estimated_cost",
        sql=(
            # The expected cost the gateway predicted for the request, to compare with what it
            # was charged (`estimate_accuracy`); 0: no estimate, as for every row stored before.
            "ALTER TABLE ledger_usage ADD COLUMN estimated_cost_micros BIGINT NOT NULL DEFAULT 0",
        ),
    ),
    Migration(
        9,
        "ledger_usage_holds",
        sql=(
            # The budget holds the commit drew its cost from (`Holds`, JSON; '': none), so that
            # the sweeper, settling a row its commit did not, draws from them as the commit would.
            "ALTER TABLE ledger_usage ADD COLUMN holds TEXT NOT NULL DEFAULT ''",
        ),
    ),
)
_LIVE: Final = "deleted_at_ms IS NULL"
_ERASURE_KEY_NAME: Final = "erasure"
# PostgreSQL advisory lock between commits (shared) and erasures (exclusive): without it a commit
# could read no erasure, an erasure anonymise the rows it can see, and the commit's row land
# after both, naming the person. (SQLite's write transactions are serial already.)
_PG_ERASURE_LOCK: Final = 0x5357_4C45_5241  # "SWLERA"

_USAGE_COLUMNS: Final = (
    "request_id",
    "tenant_id",
    "end_user",
    "api_key_id",
    "model",
    "provider",
    "scope_model",
    "scope_provider",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cache_write_input_tokens",
    "usage_estimated",
    "cost_micros",
    "record_cost_micros",
    "cache_status",
    "cache_saved_micros",
    "latency_ms",
    "status",
    "attempts",
    "estimated_input_tokens",
    "finished_at_ms",
    "recorded_at_ms",
    # Stored as 0; set to 1 once the request's budget counters are charged (`mark_settled`).
    "settled",
    "estimated_cost_micros",
    "holds",
)
_USAGE_ROW_PLACEHOLDERS: Final = "(" + ", ".join("?" for _ in _USAGE_COLUMNS) + ")"
# Rows per multi-row INSERT in record_many: their variables stay under SQLite's oldest limit
# (999), so the statement works on any build (27 columns: 37 rows).
_INSERT_ROWS_PER_STATEMENT: Final = 999 // len(_USAGE_COLUMNS)
_TENANT_AT: Final = _USAGE_COLUMNS.index("tenant_id")
_END_USER_AT: Final = _USAGE_COLUMNS.index("end_user")
_FINISHED_AT: Final = _USAGE_COLUMNS.index("finished_at_ms")

_BUDGET_COLUMNS: Final = (
    "budget_id, tenant_id, end_user, api_key_id, model, provider, budget_window, enforcement,"
    " limit_micros, webhook_url, version"
)

# The aggregates of a usage report, shared by the totals and every bucket.
_AGGREGATES: Final = f"""
    COUNT(*) AS requests,
    COALESCE(SUM(input_tokens), 0) AS input_tokens,
    COALESCE(SUM(output_tokens), 0) AS output_tokens,
    COALESCE(SUM(cached_input_tokens), 0) AS cached_input_tokens,
    COALESCE(SUM(reasoning_tokens), 0) AS reasoning_tokens,
    COALESCE(SUM(cost_micros), 0) AS total_cost,
    COALESCE(SUM(CASE WHEN cache_status IN ({", ".join(f"'{name}'" for name in _CACHE_HITS)})
        THEN 1 ELSE 0 END), 0) AS cache_hits,
    COALESCE(SUM(cache_saved_micros), 0) AS cache_saved,
    COALESCE(SUM(CASE WHEN attempts > 1 AND status = 'ok' THEN 1 ELSE 0 END), 0) AS failovers,
    COALESCE(SUM(CASE WHEN status <> 'ok' THEN 1 ELSE 0 END), 0) AS errors"""

# CSV export: the header, in this order.
CSV_COLUMNS: Final = (
    "request_id",
    "finished_at",
    "finished_at_ms",
    "tenant_id",
    "end_user",
    "api_key_id",
    "model",
    "provider",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "reasoning_tokens",
    "cache_write_input_tokens",
    "usage_estimated",
    "cost_usd",
    "cost_micros",
    "cache_status",
    "cache_saved_usd",
    "cache_saved_micros",
    "latency_ms",
    "status",
    "attempts",
)


@dataclass(frozen=True, slots=True)
class Holds:
    """The budget holds a commit draws its cost from: a reservation, an edge's leases."""

    reservation_id: str = ""
    lease_ids: tuple[str, ...] = ()

    @classmethod
    def of(cls, commit: ledger_pb2.CommitRequest) -> Holds:
        return cls(commit.reservation_id, tuple(commit.lease_ids))

    def encode(self) -> str:
        """As the row keeps them: '' for none."""
        if not self.reservation_id and not self.lease_ids:
            return ""
        return json.dumps({"reservation_id": self.reservation_id, "lease_ids": list(self.lease_ids)})

    @classmethod
    def decode(cls, text: str) -> Holds:
        if not text:
            return cls()
        found = json.loads(text)
        return cls(str(found.get("reservation_id", "")), tuple(str(i) for i in found.get("lease_ids", ())))


NO_HOLDS: Final = Holds()


@dataclass(frozen=True, slots=True)
class UnsettledRow:
    """A stored request whose budget counters are still to be charged."""

    request_id: str
    scope: ledger_pb2.BudgetScope
    cost_micros: int
    finished_at_ms: int
    holds: Holds = NO_HOLDS


class InvalidPageToken(ValueError):
    """A page token that this store did not issue for this very request (another query, or garbage)."""


class _BudgetConflict(Exception):
    """Another writer created or changed the budget between our read and our write: try again."""


@dataclass(frozen=True, slots=True)
class _Dimension:
    name: str  # the bucket key's name
    column: str  # the SQL expression it groups by (before collation)
    numeric: bool = False


_DIMENSIONS: Final = {
    gateway_pb2.USAGE_DIMENSION_TENANT: _Dimension("tenant", "tenant_id"),
    gateway_pb2.USAGE_DIMENSION_END_USER: _Dimension("end_user", "end_user"),
    gateway_pb2.USAGE_DIMENSION_MODEL: _Dimension("model", "model"),
    gateway_pb2.USAGE_DIMENSION_PROVIDER: _Dimension("provider", "provider"),
    # Days since the epoch (integer division on both backends), formatted as a UTC date in Python.
    gateway_pb2.USAGE_DIMENSION_DAY: _Dimension("day", f"finished_at_ms / {MS_PER_DAY}", numeric=True),
    gateway_pb2.USAGE_DIMENSION_API_KEY: _Dimension("api_key", "api_key_id"),
}


# --- small conversions ----------------------------------------------------------------------


def _enum_name(enum: Any, value: int) -> str:
    # Open proto3 enums may carry numbers this build has no name for.
    try:
        return str(enum.Name(value))
    except ValueError:
        return str(value)


def _usd(micros: int) -> str:
    """Micro-USD as a plain decimal dollar string with six places ("0.001500"), for CSV."""
    return str((Decimal(micros) / MICROS_PER_USD).quantize(Decimal("0.000001")))


def _iso_utc(ms: int) -> str:
    moment = datetime.fromtimestamp(ms // 1000, tz=UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{ms % 1000:03d}Z"


def _day_key(days_since_epoch: int) -> str:
    return (date(1970, 1, 1) + timedelta(days=days_since_epoch)).isoformat()


def month_start_ms(now_ms: int) -> int:
    """The start of the UTC calendar month that `now_ms` falls in: a usage report's default start."""
    moment = datetime.fromtimestamp(now_ms // 1000, tz=UTC)
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return int(start.timestamp()) * 1000


def _page_size(requested: int) -> int:
    if requested < 0:
        raise ValueError("page_size must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


class FieldError(ValueError):
    """A request's field is wrong; `field` names it (the message never quotes its value)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def _check_window(start_ms: int, end_ms: int) -> None:
    if end_ms < start_ms:
        raise FieldError("the end of the time window is before its start", "end_time")


def _fingerprint(*parts: object) -> str:
    """Ties a page token to the query it continues, so a token of another query is refused."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()[:16]


def _encode_token(kind: str, fingerprint: str, position: dict[str, Any]) -> str:
    body = json.dumps({"k": kind, "f": fingerprint, "p": position}, separators=(",", ":"))
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def _decode_token(token: str, kind: str, fingerprint: str) -> dict[str, Any]:
    try:
        padded = token + "=" * (-len(token) % 4)
        body = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise InvalidPageToken("page_token is not one this server issued") from None
    if not isinstance(body, dict) or body.get("k") != kind or body.get("f") != fingerprint:
        raise InvalidPageToken("page_token belongs to another request")
    position = body.get("p")
    if not isinstance(position, dict):
        raise InvalidPageToken("page_token is not one this server issued")
    return position


def _token_int(position: dict[str, Any], name: str) -> int:
    value = position.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidPageToken("page_token is not one this server issued")
    return value


def _token_str(position: dict[str, Any], name: str) -> str:
    value = position.get(name)
    if not isinstance(value, str):
        raise InvalidPageToken("page_token is not one this server issued")
    return value


def _usage_row(
    record: ledger_pb2.UsageRecord, charged_micros: int, recorded_at_ms: int, holds: Holds
) -> tuple[object, ...]:
    if not record.request_id:
        raise ValueError("a usage record needs a request id")
    scope = record.scope
    usage = record.usage
    finished = record.finished_at.ToMilliseconds() if record.HasField("finished_at") else recorded_at_ms
    return (
        record.request_id,
        scope.tenant_id,
        scope.end_user,
        scope.api_key_id,
        record.model or scope.model,
        record.provider or scope.provider,
        scope.model,
        scope.provider,
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.reasoning_tokens,
        usage.cache_write_input_tokens,
        usage.estimated,
        int(charged_micros),
        record.cost_micros,
        _enum_name(common_pb2.CacheStatus, record.cache_status),
        record.cache_saved_micros,
        record.latency_ms,
        # "ok" is the only success; a record that names no status did not fail.
        record.status or "ok",
        record.attempts,
        record.estimated_input_tokens,
        finished,
        recorded_at_ms,
        0,
        record.estimated_cost_micros,
        holds.encode(),
    )


def _totals(row: Row) -> gateway_pb2.UsageTotals:
    return gateway_pb2.UsageTotals(
        requests=int(row["requests"]),
        input_tokens=int(row["input_tokens"]),
        output_tokens=int(row["output_tokens"]),
        cached_input_tokens=int(row["cached_input_tokens"]),
        reasoning_tokens=int(row["reasoning_tokens"]),
        cost_micros=int(row["total_cost"]),
        cache_hits=int(row["cache_hits"]),
        cache_saved_micros=int(row["cache_saved"]),
        failovers=int(row["failovers"]),
        errors=int(row["errors"]),
    )


def _scope_clauses(
    scope: ledger_pb2.BudgetScope, model_column: str, provider_column: str
) -> list[tuple[str, str]]:
    fields = (
        ("tenant_id", scope.tenant_id),
        ("end_user", scope.end_user),
        ("api_key_id", scope.api_key_id),
        (model_column, scope.model),
        (provider_column, scope.provider),
    )
    return [(column, value) for column, value in fields if value]


# --- budgets --------------------------------------------------------------------------------


def _check_budget(budget: ledger_pb2.Budget) -> None:
    if budget.window not in (ledger_pb2.BUDGET_WINDOW_DAILY, ledger_pb2.BUDGET_WINDOW_MONTHLY):
        raise ValueError("a budget's window must be daily or monthly")
    if budget.enforcement not in (ledger_pb2.BUDGET_ENFORCEMENT_HARD, ledger_pb2.BUDGET_ENFORCEMENT_SOFT):
        raise ValueError("a budget's enforcement must be hard or soft")
    if budget.limit_micros < 0:
        raise ValueError("a budget's limit must not be negative")
    if len(budget.budget_id) > _MAX_BUDGET_ID_LENGTH or any(ch.isspace() for ch in budget.budget_id):
        raise ValueError(f"a budget id is at most {_MAX_BUDGET_ID_LENGTH} characters without spaces")


def _new_budget_id(budget: ledger_pb2.Budget) -> str:
    window = "daily" if budget.window == ledger_pb2.BUDGET_WINDOW_DAILY else "monthly"
    return f"{budget.scope.tenant_id or 'global'}:{window}:{uuid.uuid4().hex[:8]}"


def _stored_budget(budget: ledger_pb2.Budget, budget_id: str, version: int) -> ledger_pb2.Budget:
    """What is kept of `budget`: its definition and version; the read-only figures are the service's."""
    scope = budget.scope
    return ledger_pb2.Budget(
        budget_id=budget_id,
        scope=ledger_pb2.BudgetScope(
            tenant_id=scope.tenant_id,
            end_user=scope.end_user,
            api_key_id=scope.api_key_id,
            model=scope.model,
            provider=scope.provider,
        ),
        window=budget.window,
        enforcement=budget.enforcement,
        limit_micros=budget.limit_micros,
        webhook_url=budget.webhook_url,
        version=version,
    )


def _budget_from_row(row: Row) -> ledger_pb2.Budget:
    return ledger_pb2.Budget(
        budget_id=str(row["budget_id"]),
        scope=ledger_pb2.BudgetScope(
            tenant_id=str(row["tenant_id"]),
            end_user=str(row["end_user"]),
            api_key_id=str(row["api_key_id"]),
            model=str(row["model"]),
            provider=str(row["provider"]),
        ),
        window=ledger_pb2.BudgetWindow.Value(str(row["budget_window"])),
        enforcement=ledger_pb2.BudgetEnforcement.Value(str(row["enforcement"])),
        limit_micros=int(row["limit_micros"]),
        webhook_url=str(row["webhook_url"]),
        version=int(row["version"]),
    )


def _budget_params(budget: ledger_pb2.Budget) -> tuple[object, ...]:
    scope = budget.scope
    return (
        scope.tenant_id,
        scope.end_user,
        scope.api_key_id,
        scope.model,
        scope.provider,
        ledger_pb2.BudgetWindow.Name(budget.window),
        ledger_pb2.BudgetEnforcement.Name(budget.enforcement),
        budget.limit_micros,
        budget.webhook_url,
    )


def _budget_json(budget: ledger_pb2.Budget) -> str:
    return json_format.MessageToJson(budget, preserving_proto_field_name=True, indent=None, sort_keys=True)


def _budget_from_json(text: str) -> ledger_pb2.Budget:
    return json_format.Parse(text, ledger_pb2.Budget(), ignore_unknown_fields=True)


def _audit_from_row(row: Row) -> ledger_pb2.BudgetAuditEntry:
    entry = ledger_pb2.BudgetAuditEntry(
        budget_id=str(row["budget_id"]),
        actor=str(row["actor"]),
        action=str(row["action"]),
        detail=str(row["detail"]),
    )
    entry.at.FromMilliseconds(int(row["at_ms"]))
    if row["old_budget"] is not None:
        entry.old_budget.CopyFrom(_budget_from_json(str(row["old_budget"])))
    if row["new_budget"] is not None:
        entry.new_budget.CopyFrom(_budget_from_json(str(row["new_budget"])))
    return entry


async def _insert_audit(
    tx: Statements,
    *,
    budget_id: str,
    tenant_id: str,
    actor: str,
    at_ms: int,
    action: str,
    old: ledger_pb2.Budget | None,
    new: ledger_pb2.Budget | None,
    detail: str = "",
) -> None:
    await tx.execute(
        "INSERT INTO ledger_budget_audit"
        " (budget_id, tenant_id, actor, at_ms, action, old_budget, new_budget, detail)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            budget_id,
            tenant_id,
            actor,
            at_ms,
            action,
            None if old is None else _budget_json(old),
            None if new is None else _budget_json(new),
            detail,
        ),
    )


async def _audit_end_user(
    tx: Statements, action: str, tenant_id: str, digest: str, *, actor: str, now_ms: int, **facts: int
) -> None:
    """An audit entry about one end user, naming the keyed digest of their id, never the id."""
    detail = json.dumps({"tenant_id": tenant_id, "end_user_hmac_sha256": digest, **facts}, sort_keys=True)
    await _insert_audit(
        tx,
        budget_id="",
        tenant_id=tenant_id,
        actor=actor,
        at_ms=now_ms,
        action=action,
        old=None,
        new=None,
        detail=detail,
    )


async def _without_erased_end_users(
    tx: Statements, rows: list[tuple[object, ...]], key: bytes
) -> list[tuple[object, ...]]:
    """`rows` with the end user blanked where that user was erased at or after the request finished."""
    digests = {
        index: end_users.end_user_digest(key, str(row[_TENANT_AT]), str(row[_END_USER_AT]))
        for index, row in enumerate(rows)
        if row[_END_USER_AT]
    }
    erased: dict[str, int] = {}
    for chunk in _chunks(sorted(set(digests.values()))):
        found = await tx.fetch_all(
            "SELECT end_user_hmac, erased_at_ms FROM ledger_erasures WHERE end_user_hmac IN ("
            + ", ".join("?" for _ in chunk)
            + ")",
            chunk,
        )
        erased.update({str(row["end_user_hmac"]): int(row["erased_at_ms"]) for row in found})
    if not erased:
        return rows
    out = list(rows)
    for index, digest in digests.items():
        erased_at = erased.get(digest)
        if erased_at is not None and cast(int, out[index][_FINISHED_AT]) <= erased_at:
            row = list(out[index])
            row[_END_USER_AT] = ""
            out[index] = tuple(row)
    return out


def _chunks(ids: Sequence[_Id]) -> list[Sequence[_Id]]:
    """`ids` in pieces small enough for one `IN (...)` list."""
    return [ids[start : start + _IDS_PER_STATEMENT] for start in range(0, len(ids), _IDS_PER_STATEMENT)]


async def _audit_naming(tx: Statements, budget_ids: set[str], tenant_id: str, end_user: str) -> list[int]:
    """Ids of the budget audit entries about `budget_ids`, or whose old or new budget is scoped
    to `end_user` of `tenant_id` (a budget since moved to another scope still has them)."""
    found: list[int] = []
    after = 0
    while True:
        page = await tx.fetch_all(
            "SELECT id, budget_id, old_budget, new_budget FROM ledger_budget_audit"
            " WHERE budget_id <> '' AND id > ? ORDER BY id LIMIT ?",
            (after, _AUDIT_SCAN_PAGE),
        )
        for row in page:
            scopes = [_budget_from_json(str(row[c])).scope for c in ("old_budget", "new_budget") if row[c]]
            if str(row["budget_id"]) in budget_ids or any(
                scope.tenant_id == tenant_id and scope.end_user == end_user for scope in scopes
            ):
                found.append(int(row["id"]))
        if len(page) < _AUDIT_SCAN_PAGE:
            return found
        after = int(page[-1]["id"])


@dataclass(frozen=True, slots=True)
class Erasure:
    """What erasing an end user did: rows anonymised, budgets (ids) and entries deleted."""

    rows: int
    budget_ids: tuple[str, ...]
    audit_entries: int
    alerts: int


# --- the store ------------------------------------------------------------------------------


class LedgerStore:
    """Usage rows, budgets and the audit log in SQL. Open with `await LedgerStore.open(database)`."""

    def __init__(self, database: Database, *, erasure_key: bytes | None = None) -> None:
        self.database = database
        self._erasure_key = erasure_key

    @classmethod
    async def open(cls, database: Database, *, erasure_key: bytes | None = None) -> LedgerStore:
        """A store on `database`, its tables created or upgraded. `erasure_key`: what erasures
        are hashed with (see `end_user_digest`); None: a key this database keeps for itself."""
        if erasure_key is not None and len(erasure_key) < 16:
            raise ValueError("the erasure key must be at least 16 bytes")
        await database.migrate(COMPONENT, MIGRATIONS)
        return cls(database, erasure_key=erasure_key)

    def _text(self, column: str) -> str:
        # Byte-wise ordering on PostgreSQL too, whatever the database's default collation.
        return f'{column} COLLATE "C"' if self.database.backend is Backend.POSTGRESQL else column

    # --- usage rows -------------------------------------------------------------------------

    async def record(
        self, record: ledger_pb2.UsageRecord, charged_micros: int, *, recorded_at_ms: int
    ) -> bool:
        """Store one request's row; True when stored now, False when its request id was already there.

        `charged_micros` is what the ledger charged (kept as `cost_micros`); the record's own
        `cost_micros` is kept beside it as what the caller reported. A duplicate changes nothing.
        """
        (stored,) = await self.record_many([(record, charged_micros)], recorded_at_ms=recorded_at_ms)
        return stored

    async def record_many(
        self,
        items: Sequence[tuple[ledger_pb2.UsageRecord, int]],
        *,
        recorded_at_ms: int,
        holds: Sequence[Holds] | None = None,
    ) -> list[bool]:
        """Store several rows in one transaction; per item, in order, True when stored now.

        `holds`, one per item when given, are the budget holds each commit draws its cost
        from, kept for the sweeper (`unsettled`).

        An item whose request id is already stored, or appeared earlier in `items`, is False.
        A row of an erased end user whose request finished at or before the (latest) erasure is
        stored without its end user, as the erasure left that user's other rows.
        """
        if holds is not None and len(holds) != len(items):
            raise ValueError("holds, when given, are one per item")
        rows = [
            _usage_row(record, charged, recorded_at_ms, holds[index] if holds is not None else NO_HOLDS)
            for index, (record, charged) in enumerate(items)
        ]
        first_index: dict[str, int] = {}
        for index, row in enumerate(rows):
            first_index.setdefault(str(row[0]), index)
        fresh = [rows[index] for index in sorted(first_index.values())]
        inserted: set[str] = set()
        if fresh:
            key = await self.erasure_key() if any(row[_END_USER_AT] for row in fresh) else b""
            async with self.database.transaction() as tx:
                if self.database.backend is Backend.POSTGRESQL:
                    await tx.execute("SELECT pg_advisory_xact_lock_shared(?)", (_PG_ERASURE_LOCK,))
                if key:
                    fresh = await _without_erased_end_users(tx, fresh, key)
                for start in range(0, len(fresh), _INSERT_ROWS_PER_STATEMENT):
                    chunk = fresh[start : start + _INSERT_ROWS_PER_STATEMENT]
                    returned = await tx.fetch_all(
                        f"INSERT INTO ledger_usage ({', '.join(_USAGE_COLUMNS)}) VALUES "
                        + ", ".join(_USAGE_ROW_PLACEHOLDERS for _ in chunk)
                        + " ON CONFLICT (request_id) DO NOTHING RETURNING request_id",
                        [value for row in chunk for value in row],
                    )
                    inserted.update(str(row["request_id"]) for row in returned)
        return [
            str(row[0]) in inserted and first_index[str(row[0])] == index for index, row in enumerate(rows)
        ]

    async def charged(self, request_ids: Sequence[str]) -> dict[str, tuple[int, bool]]:
        """What each stored request was charged and whether its budget counters were, by
        request id (ids not stored are absent)."""
        found: dict[str, tuple[int, bool]] = {}
        ids = list(dict.fromkeys(request_ids))
        for chunk in _chunks(ids):
            rows = await self.database.fetch_all(
                "SELECT request_id, cost_micros, settled FROM ledger_usage WHERE request_id IN ("
                + ", ".join("?" for _ in chunk)
                + ")",
                chunk,
            )
            found.update(
                {str(row["request_id"]): (int(row["cost_micros"]), bool(row["settled"])) for row in rows}
            )
        return found

    async def mark_settled(self, request_ids: Sequence[str], *, settled: bool) -> None:
        """Note whether the budget counters of these stored requests were charged."""
        ids = list(dict.fromkeys(request_ids))
        for chunk in _chunks(ids):
            await self.database.execute(
                "UPDATE ledger_usage SET settled = ? WHERE request_id IN ("
                + ", ".join("?" for _ in chunk)
                + ")",
                [1 if settled else 0, *chunk],
            )

    async def unsettled(self, *, recorded_before_ms: int, limit: int) -> list[UnsettledRow]:
        """Stored requests recorded before `recorded_before_ms` whose budget counters are still
        to be charged, oldest first."""
        rows = await self.database.fetch_all(
            "SELECT request_id, tenant_id, end_user, api_key_id, scope_model, scope_provider, cost_micros,"
            " finished_at_ms, holds FROM ledger_usage WHERE settled = 0 AND recorded_at_ms < ?"
            " ORDER BY recorded_at_ms LIMIT ?",
            (recorded_before_ms, limit),
        )
        return [
            UnsettledRow(
                request_id=str(row["request_id"]),
                scope=ledger_pb2.BudgetScope(
                    tenant_id=str(row["tenant_id"]),
                    end_user=str(row["end_user"]),
                    api_key_id=str(row["api_key_id"]),
                    model=str(row["scope_model"]),
                    provider=str(row["scope_provider"]),
                ),
                cost_micros=int(row["cost_micros"]),
                finished_at_ms=int(row["finished_at_ms"]),
                holds=Holds.decode(str(row["holds"])),
            )
            for row in rows
        ]

    async def spent(
        self, scope: ledger_pb2.BudgetScope, *, start_ms: int, end_ms: int, settled_only: bool = False
    ) -> int:
        """Charged micro-USD of the requests in [start, end) whose scope matches every non-empty field
        of `scope`: what a budget on that scope has spent in that window (to reconcile its counter,
        with `settled_only`: the rows not yet settled are charged by the sweeper instead).

        Model and provider match the request's scope (what its budgets were charged by), not the
        model that answered after a failover.
        """
        _check_window(start_ms, end_ms)
        clauses = _scope_clauses(scope, "scope_model", "scope_provider")
        where = "".join(f" AND {column} = ?" for column, _ in clauses)
        if settled_only:
            where += " AND settled = 1"
        row = await self.database.fetch_one(
            "SELECT COALESCE(SUM(cost_micros), 0) AS spent FROM ledger_usage"
            f" WHERE finished_at_ms >= ? AND finished_at_ms < ?{where}",
            (start_ms, end_ms, *(value for _, value in clauses)),
        )
        return 0 if row is None else int(row["spent"])

    async def month_tokens(self, tenant_id: str, model: str, *, start_ms: int, end_ms: int) -> int:
        """Input plus output tokens of `tenant_id` on `model` (the model that answered) in [start, end)."""
        _check_window(start_ms, end_ms)
        row = await self.database.fetch_one(
            "SELECT COALESCE(SUM(input_tokens + output_tokens), 0) AS tokens FROM ledger_usage"
            " WHERE tenant_id = ? AND model = ? AND finished_at_ms >= ? AND finished_at_ms < ?",
            (tenant_id, model, start_ms, end_ms),
        )
        return 0 if row is None else int(row["tokens"])

    async def usage(
        self, request: gateway_pb2.GetUsageRequest, *, now_ms: int
    ) -> gateway_pb2.GetUsageResponse:
        """Totals of the requests in a window, and a page of buckets when `group_by` names dimensions.

        `tenant_id` "" covers every tenant (admin). The window defaults to the start of the
        current UTC month through `now_ms` (inclusive); a page token carries the window its first
        page resolved, so later pages of an open-ended report do not drift with the clock.
        Buckets are ordered by cost, highest first, then by their key (group by model alone:
        the top-models report).
        """
        dimensions: list[_Dimension] = []
        for value in request.group_by:
            dimension = _DIMENSIONS.get(value)
            if dimension is None:
                raise FieldError("group_by names an unknown usage dimension", "group_by")
            if dimension not in dimensions:
                dimensions.append(dimension)
        page_size = _page_size(request.page_size)
        fingerprint = _fingerprint(
            "usage",
            request.tenant_id,
            request.end_user,
            [d.name for d in dimensions],
            request.start_time.ToMilliseconds() if request.HasField("start_time") else None,
            request.end_time.ToMilliseconds() if request.HasField("end_time") else None,
        )
        after: list[Any] | None = None
        if request.page_token:
            position = _decode_token(request.page_token, "usage", fingerprint)
            start_ms, end_ms = _token_int(position, "start"), _token_int(position, "end")
            after = self._usage_position(position, dimensions)
        else:
            start_ms = (
                request.start_time.ToMilliseconds()
                if request.HasField("start_time")
                else month_start_ms(now_ms)
            )
            end_ms = request.end_time.ToMilliseconds() if request.HasField("end_time") else now_ms + 1
            _check_window(start_ms, end_ms)

        where = ["finished_at_ms >= ?", "finished_at_ms < ?"]
        params: list[object] = [start_ms, end_ms]
        if request.tenant_id:
            where.append("tenant_id = ?")
            params.append(request.tenant_id)
        if request.end_user:
            where.append("end_user = ?")
            params.append(request.end_user)
        where_sql = " AND ".join(where)

        totals_row = await self.database.fetch_one(
            f"SELECT {_AGGREGATES} FROM ledger_usage WHERE {where_sql}", params
        )
        response = gateway_pb2.GetUsageResponse()
        if totals_row is not None:
            response.totals.CopyFrom(_totals(totals_row))
        if not dimensions:
            return response

        keys = [d.column if d.numeric else self._text(d.column) for d in dimensions]
        cost = "CAST(SUM(cost_micros) AS BIGINT)"
        select_keys = ", ".join(f"{key} AS k{index}" for index, key in enumerate(keys))
        having = ""
        bucket_params = list(params)
        if after is not None:
            # Keyset paging in (cost desc, keys asc) order: rows strictly after the last one shown.
            having = f" HAVING (-{cost}, {', '.join(keys)}) > ({', '.join('?' for _ in after)})"
            bucket_params += after
        order = ", ".join(f"k{index}" for index in range(len(keys)))
        rows = await self.database.fetch_all(
            f"SELECT {select_keys}, {_AGGREGATES} FROM ledger_usage WHERE {where_sql}"
            f" GROUP BY {', '.join(keys)}{having} ORDER BY total_cost DESC, {order} LIMIT ?",
            [*bucket_params, page_size + 1],
        )
        for row in rows[:page_size]:
            bucket = response.buckets.add()
            for index, dimension in enumerate(dimensions):
                value = row[f"k{index}"]
                bucket.key[dimension.name] = _day_key(int(value)) if dimension.numeric else str(value)
            bucket.totals.CopyFrom(_totals(row))
        if len(rows) > page_size:
            last = rows[page_size - 1]
            position = {
                "start": start_ms,
                "end": end_ms,
                "after": [-int(last["total_cost"])]
                + [int(last[f"k{i}"]) if d.numeric else str(last[f"k{i}"]) for i, d in enumerate(dimensions)],
            }
            response.next_page_token = _encode_token("usage", fingerprint, position)
        return response

    @staticmethod
    def _usage_position(position: dict[str, Any], dimensions: list[_Dimension]) -> list[Any]:
        after = position.get("after")
        if not isinstance(after, list) or len(after) != len(dimensions) + 1:
            raise InvalidPageToken("page_token is not one this server issued")
        kinds = [int, *(int if d.numeric else str for d in dimensions)]
        for value, kind in zip(after, kinds, strict=True):
            if not isinstance(value, kind) or isinstance(value, bool):
                raise InvalidPageToken("page_token is not one this server issued")
        return after

    async def export_csv(
        self, tenant_id: str, *, start_ms: int, end_ms: int, end_user: str = "", chunk_rows: int = 500
    ) -> AsyncIterator[bytes]:
        """The usage rows of [start, end) as a UTF-8 CSV document, in pieces: the header, then one piece
        per `chunk_rows` rows, in time order.

        `tenant_id` "" exports every tenant (admin); `end_user` narrows to one end user. Rows are
        read a page at a time (keyset on finished time and request id), so memory stays flat and
        no transaction is held while the consumer is slow; rows committed meanwhile may appear.
        Money is in two columns each: dollars with six decimals and integer micro-USD. Values are
        written as stored (no spreadsheet-formula escaping), quoted per RFC 4180.
        """
        _check_window(start_ms, end_ms)
        if chunk_rows < 1:
            raise ValueError("chunk_rows must be at least 1")
        yield _csv_chunk([CSV_COLUMNS])
        filters = ["finished_at_ms >= ?", "finished_at_ms < ?"]
        params: list[object] = [start_ms, end_ms]
        if tenant_id:
            filters.append("tenant_id = ?")
            params.append(tenant_id)
        if end_user:
            filters.append("end_user = ?")
            params.append(end_user)
        after: tuple[int, str] | None = None
        while True:
            where = list(filters)
            page_params = list(params)
            if after is not None:
                where.append(f"(finished_at_ms, {self._text('request_id')}) > (?, ?)")
                page_params += after
            rows = await self.database.fetch_all(
                f"SELECT {', '.join(_USAGE_COLUMNS)} FROM ledger_usage WHERE {' AND '.join(where)}"
                f" ORDER BY finished_at_ms, {self._text('request_id')} LIMIT ?",
                [*page_params, chunk_rows],
            )
            if not rows:
                return
            yield _csv_chunk([_csv_row(row) for row in rows])
            if len(rows) < chunk_rows:
                return
            after = (int(rows[-1]["finished_at_ms"]), str(rows[-1]["request_id"]))

    async def erasure_key(self) -> bytes:
        """The key erasures are hashed with: the configured one, else this database's own (made
        on first use, the same for every replica)."""
        if self._erasure_key is not None:
            return self._erasure_key
        async with self.database.transaction() as tx:
            await tx.execute(
                "INSERT INTO ledger_keys (name, key_hex) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
                (_ERASURE_KEY_NAME, secrets.token_hex(32)),
            )
            row = await tx.fetch_one("SELECT key_hex FROM ledger_keys WHERE name = ?", (_ERASURE_KEY_NAME,))
        assert row is not None  # inserted just above, or by another replica first
        self._erasure_key = bytes.fromhex(str(row["key_hex"]))
        return self._erasure_key

    async def end_user_digest(self, tenant_id: str, end_user: str) -> str:
        """HMAC-SHA256 of the tenant and end user id under the erasure key (hex): what an erasure
        is audited under. Whoever holds the key can show that a given user was erased; nobody
        can test guesses of ids against the audit log without it."""
        return end_users.end_user_digest(await self.erasure_key(), tenant_id, end_user)

    async def erase_end_user(
        self,
        tenant_id: str,
        end_user: str,
        *,
        actor: str,
        now_ms: int,
        also: Callable[[Statements, Sequence[str]], Awaitable[int]] | None = None,
    ) -> Erasure:
        """Erase `end_user` of `tenant_id` (GDPR) and return what was done.

        - Usage rows are anonymised, not deleted: their end user becomes "" so nothing links
          them to the person, while the tenant's totals, invoices and budget spend (rebuilt from
          the rows when a counter is lost) stay exact.
        - Budgets scoped to the end user (tenant and end user both match) are deleted, with every
          audit entry that names them or whose old or new scope names the end user.
        - `also(tx, budget_ids)` removes what other tables hold of those budgets (the alerts) in
          the same transaction and returns how many rows it removed.

        - The digest and `now_ms` are remembered (`ledger_erasures`): a row of this end user
          that arrives later for a request finished by then is stored anonymised (`record_many`).

        Everything and the erasure's own audit entry commit together. The entry names the tenant
        and the keyed digest of the id (`end_user_digest`), never the id. On PostgreSQL, commits
        wait while an erasure runs (see `_PG_ERASURE_LOCK`); erasures are rare.
        """
        if not tenant_id or not end_user:
            raise ValueError("erasing an end user needs both the tenant and the end user id")
        digest = await self.end_user_digest(tenant_id, end_user)
        async with self.database.transaction() as tx:
            if self.database.backend is Backend.POSTGRESQL:
                await tx.execute("SELECT pg_advisory_xact_lock(?)", (_PG_ERASURE_LOCK,))
            await tx.execute(
                "INSERT INTO ledger_erasures (end_user_hmac, erased_at_ms) VALUES (?, ?)"
                " ON CONFLICT (end_user_hmac) DO UPDATE SET erased_at_ms = CASE"
                " WHEN excluded.erased_at_ms > ledger_erasures.erased_at_ms THEN excluded.erased_at_ms"
                " ELSE ledger_erasures.erased_at_ms END",
                (digest, now_ms),
            )
            rows = await tx.execute(
                "UPDATE ledger_usage SET end_user = '' WHERE tenant_id = ? AND end_user = ?",
                (tenant_id, end_user),
            )
            budget_ids = tuple(
                str(row["budget_id"])
                for row in await tx.fetch_all(
                    "SELECT budget_id FROM ledger_budgets WHERE tenant_id = ? AND end_user = ?",
                    (tenant_id, end_user),
                )
            )
            alerts = 0
            for chunk in _chunks(budget_ids):
                marks = ", ".join("?" * len(chunk))
                await tx.execute(f"DELETE FROM ledger_budgets WHERE budget_id IN ({marks})", chunk)
                if also is not None:
                    alerts += await also(tx, chunk)
            audit_ids = await _audit_naming(tx, set(budget_ids), tenant_id, end_user)
            for entries in _chunks(audit_ids):
                marks = ", ".join("?" * len(entries))
                await tx.execute(f"DELETE FROM ledger_budget_audit WHERE id IN ({marks})", entries)
            erasure = Erasure(rows, budget_ids, len(audit_ids), alerts)
            await _audit_end_user(
                tx,
                "erase_end_user",
                tenant_id,
                digest,
                actor=actor,
                now_ms=now_ms,
                rows_anonymised=rows,
                budgets_deleted=len(budget_ids),
                audit_entries_deleted=len(audit_ids),
                alerts_deleted=alerts,
            )
        log.info(
            "end_user_erased",
            tenant_id=tenant_id,
            rows_anonymised=rows,
            budgets_deleted=len(budget_ids),
            audit_entries_deleted=len(audit_ids),
            alerts_deleted=alerts,
        )
        return erasure

    async def audit_end_user_export(
        self, tenant_id: str, end_user: str, *, actor: str, start_ms: int, end_ms: int, now_ms: int
    ) -> None:
        """Write the audit entry of an export of one end user's rows (personal data leaving):
        who, when, which period, and the keyed digest of the id, never the id."""
        digest = await self.end_user_digest(tenant_id, end_user)
        async with self.database.transaction() as tx:
            await _audit_end_user(
                tx,
                "export_end_user",
                tenant_id,
                digest,
                actor=actor,
                now_ms=now_ms,
                start_ms=start_ms,
                end_ms=end_ms,
            )

    async def estimate_accuracy(
        self, model: str = "", *, limit_per_model: int = 10_000
    ) -> list[ledger_pb2.ModelEstimateAccuracy]:
        """How far estimates were from the truth, per model (sorted by model): prompt tokens
        against the vendors' counts, and the expected cost predicted against the cost charged.

        Each uses the model's most recent `limit_per_model` rows that have an estimate and a
        truth above 0 (an estimate, a vendor count / an estimated cost, a charge); rows whose
        usage was itself estimated are left out of both, as their truth is a guess too. A model
        appears when it has samples of either kind. `model` "" covers every model. The p95 is
        nearest-rank.
        """
        if limit_per_model < 1:
            raise ValueError("limit_per_model must be at least 1")
        tokens = await self._estimate_pairs("estimated_input_tokens", "input_tokens", model, limit_per_model)
        costs = await self._estimate_pairs("estimated_cost_micros", "cost_micros", model, limit_per_model)
        return [
            _accuracy(name, tokens.get(name, []), costs.get(name, []))
            for name in sorted(tokens.keys() | costs.keys())
        ]

    async def _estimate_pairs(
        self, estimated: str, actual: str, model: str, limit_per_model: int
    ) -> dict[str, list[tuple[int, int]]]:
        """(estimated, actual) of each model's most recent rows where both are above 0."""
        model_filter = " AND model = ?" if model else ""
        params: list[object] = [model] if model else []
        rows = await self.database.fetch_all(
            f"SELECT model, {estimated} AS estimated, {actual} AS actual FROM ("
            f" SELECT model, {estimated}, {actual}, ROW_NUMBER() OVER ("
            "  PARTITION BY model ORDER BY finished_at_ms DESC, request_id DESC) AS recency"
            " FROM ledger_usage"
            f" WHERE {estimated} > 0 AND {actual} > 0 AND NOT usage_estimated"
            f"{model_filter}) recent WHERE recency <= ? ORDER BY model",
            [*params, limit_per_model],
        )
        pairs: dict[str, list[tuple[int, int]]] = {}
        for row in rows:
            pairs.setdefault(str(row["model"]), []).append((int(row["estimated"]), int(row["actual"])))
        return pairs

    # --- budgets ----------------------------------------------------------------------------

    async def put_budget(self, budget: ledger_pb2.Budget, *, actor: str, now_ms: int) -> ledger_pb2.Budget:
        """Create `budget`, or replace the one with its id; returns it as stored, with its new version.

        An empty id gets a generated one ("<tenant>:<window>:<8 hex>"). The read-only fields
        (spent, held, version, window start) of the input are ignored. The change and its audit
        entry (old and new budget) commit together. A live budget's scope cannot change
        (`FieldError`); one deleted may be made again with any.
        """
        _check_budget(budget)
        for _ in range(_PUT_BUDGET_ATTEMPTS):
            generated = not budget.budget_id
            budget_id = budget.budget_id or _new_budget_id(budget)
            stored = await self._put_budget_once(
                budget, budget_id, create_only=generated, actor=actor, now_ms=now_ms
            )
            if stored is not None:
                return stored
        raise DatabaseError("could not store the budget: concurrent changes kept conflicting")

    async def _put_budget_once(
        self, budget: ledger_pb2.Budget, budget_id: str, *, create_only: bool, actor: str, now_ms: int
    ) -> ledger_pb2.Budget | None:
        lock = " FOR UPDATE" if self.database.backend is Backend.POSTGRESQL else ""
        try:
            async with self.database.transaction() as tx:
                row = None
                if not create_only:
                    row = await tx.fetch_one(
                        f"SELECT {_BUDGET_COLUMNS}, deleted_at_ms FROM ledger_budgets"
                        f" WHERE budget_id = ?{lock}",
                        (budget_id,),
                    )
                if row is None:
                    new = _stored_budget(budget, budget_id, 1)
                    inserted = await tx.fetch_all(
                        f"INSERT INTO ledger_budgets ({_BUDGET_COLUMNS}, created_at_ms, updated_at_ms)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                        " ON CONFLICT (budget_id) DO NOTHING RETURNING budget_id",
                        (budget_id, *_budget_params(new), new.version, now_ms, now_ms),
                    )
                    if not inserted:
                        raise _BudgetConflict
                    old = None
                else:
                    # A deleted budget made again is a new budget, its version after the old one's.
                    version = int(row["version"])
                    old = None if row["deleted_at_ms"] is not None else _budget_from_row(row)
                    new = _stored_budget(budget, budget_id, version + 1)
                    if old is not None and old.scope != new.scope:
                        # Its counters count the requests of its scope: changed, they would count
                        # some twice or miss some (edges and replicas learn of it one by one).
                        raise FieldError(
                            "a budget's scope cannot change: delete it and make a new one", "budget.scope"
                        )
                    changed = await tx.execute(
                        "UPDATE ledger_budgets SET tenant_id = ?, end_user = ?, api_key_id = ?,"
                        " model = ?, provider = ?, budget_window = ?, enforcement = ?, limit_micros = ?,"
                        " webhook_url = ?, version = ?, updated_at_ms = ?, deleted_at_ms = NULL,"
                        " created_at_ms = CASE WHEN deleted_at_ms IS NULL THEN created_at_ms ELSE ? END"
                        " WHERE budget_id = ? AND version = ?",
                        (*_budget_params(new), new.version, now_ms, now_ms, budget_id, version),
                    )
                    if changed != 1:
                        raise _BudgetConflict
                await _insert_audit(
                    tx,
                    budget_id=budget_id,
                    tenant_id=new.scope.tenant_id,
                    actor=actor,
                    at_ms=now_ms,
                    action="create" if old is None else "update",
                    old=old,
                    new=new,
                )
        except _BudgetConflict:
            return None
        return new

    async def delete_budget(self, budget_id: str, *, actor: str, now_ms: int) -> ledger_pb2.Budget | None:
        """Delete a live budget; returns it as it was, or None when there is none. The row stays
        (its version rises once more, so a budget made again with this id comes after it); the
        delete and its audit entry (the old budget) commit together."""
        lock = " FOR UPDATE" if self.database.backend is Backend.POSTGRESQL else ""
        async with self.database.transaction() as tx:
            row = await tx.fetch_one(
                f"SELECT {_BUDGET_COLUMNS} FROM ledger_budgets WHERE budget_id = ? AND {_LIVE}{lock}",
                (budget_id,),
            )
            if row is None:
                return None
            old = _budget_from_row(row)
            changed = await tx.execute(
                "UPDATE ledger_budgets SET deleted_at_ms = ?, version = ?, updated_at_ms = ?"
                f" WHERE budget_id = ? AND version = ? AND {_LIVE}",
                (now_ms, old.version + 1, now_ms, budget_id, old.version),
            )
            if changed != 1:
                return None  # deleted or changed by another replica just now: nothing of ours
            await _insert_audit(
                tx,
                budget_id=budget_id,
                tenant_id=old.scope.tenant_id,
                actor=actor,
                at_ms=now_ms,
                action="delete",
                old=old,
                new=None,
            )
        return old

    async def get_budget(self, budget_id: str) -> ledger_pb2.Budget | None:
        """The budget with `budget_id`, or None."""
        row = await self.database.fetch_one(
            f"SELECT {_BUDGET_COLUMNS} FROM ledger_budgets WHERE budget_id = ? AND {_LIVE}", (budget_id,)
        )
        return None if row is None else _budget_from_row(row)

    async def list_budgets(
        self, tenant_id: str = "", *, page_size: int = DEFAULT_PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[ledger_pb2.Budget], str]:
        """Budgets by id, of one tenant or ("") all: a page, and the next page's token ("" at the end)."""
        size = _page_size(page_size)
        fingerprint = _fingerprint("budgets", tenant_id)
        where: list[str] = [_LIVE]
        params: list[object] = []
        if tenant_id:
            where.append("tenant_id = ?")
            params.append(tenant_id)
        if page_token:
            position = _decode_token(page_token, "budgets", fingerprint)
            where.append(f"{self._text('budget_id')} > ?")
            params.append(_token_str(position, "after"))
        rows = await self.database.fetch_all(
            f"SELECT {_BUDGET_COLUMNS} FROM ledger_budgets WHERE {' AND '.join(where)}"
            f" ORDER BY {self._text('budget_id')} LIMIT ?",
            [*params, size + 1],
        )
        budgets = [_budget_from_row(row) for row in rows[:size]]
        token = ""
        if len(rows) > size:
            token = _encode_token("budgets", fingerprint, {"after": budgets[-1].budget_id})
        return budgets, token

    async def budgets_for(self, scope: ledger_pb2.BudgetScope) -> list[ledger_pb2.Budget]:
        """Every budget that applies to a request with `scope`: those whose every non-empty scope field
        equals the request's (a budget with no tenant applies across tenants), by id."""
        rows = await self.database.fetch_all(
            f"SELECT {_BUDGET_COLUMNS} FROM ledger_budgets"
            " WHERE tenant_id IN ('', ?) AND end_user IN ('', ?) AND api_key_id IN ('', ?)"
            f" AND model IN ('', ?) AND provider IN ('', ?) AND {_LIVE} ORDER BY {self._text('budget_id')}",
            (scope.tenant_id, scope.end_user, scope.api_key_id, scope.model, scope.provider),
        )
        return [_budget_from_row(row) for row in rows]

    async def all_budgets(self) -> list[ledger_pb2.Budget]:
        """Every budget, by id: what the service caches (a ledger holds few budgets)."""
        rows = await self.database.fetch_all(
            f"SELECT {_BUDGET_COLUMNS} FROM ledger_budgets WHERE {_LIVE} ORDER BY {self._text('budget_id')}"
        )
        return [_budget_from_row(row) for row in rows]

    async def list_audit(
        self,
        *,
        budget_id: str = "",
        tenant_id: str = "",
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> tuple[list[ledger_pb2.BudgetAuditEntry], str]:
        """Audit entries, newest first, by budget and/or tenant ("": any): a page, and the next token."""
        size = _page_size(page_size)
        fingerprint = _fingerprint("audit", budget_id, tenant_id)
        where: list[str] = []
        params: list[object] = []
        if budget_id:
            where.append("budget_id = ?")
            params.append(budget_id)
        if tenant_id:
            where.append("tenant_id = ?")
            params.append(tenant_id)
        if page_token:
            position = _decode_token(page_token, "audit", fingerprint)
            where.append("id < ?")
            params.append(_token_int(position, "before"))
        where_sql = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.database.fetch_all(
            "SELECT id, budget_id, actor, at_ms, action, old_budget, new_budget, detail"
            f" FROM ledger_budget_audit{where_sql} ORDER BY id DESC LIMIT ?",
            [*params, size + 1],
        )
        entries = [_audit_from_row(row) for row in rows[:size]]
        token = ""
        if len(rows) > size:
            token = _encode_token("audit", fingerprint, {"before": int(rows[size - 1]["id"])})
        return entries, token


@dataclass(frozen=True, slots=True)
class _Errors:
    """Relative errors of (estimated, actual) pairs: count, mean |error|, its p95, mean signed error."""

    samples: int = 0
    mean: float = 0.0
    p95: float = 0.0
    signed: float = 0.0

    @classmethod
    def of(cls, pairs: list[tuple[int, int]]) -> _Errors:
        if not pairs:
            return cls()
        relative = sorted(abs(estimated - actual) / actual for estimated, actual in pairs)
        signed = [(estimated - actual) / actual for estimated, actual in pairs]
        count = len(pairs)
        rank = (95 * count + 99) // 100  # nearest rank: ceil(0.95 n), in integers
        return cls(count, math.fsum(relative) / count, relative[rank - 1], math.fsum(signed) / count)


def _accuracy(
    model: str, tokens: list[tuple[int, int]], costs: list[tuple[int, int]]
) -> ledger_pb2.ModelEstimateAccuracy:
    token = _Errors.of(tokens)
    cost = _Errors.of(costs)
    return ledger_pb2.ModelEstimateAccuracy(
        model=model,
        samples=token.samples,
        mean_relative_error=token.mean,
        p95_relative_error=token.p95,
        mean_signed_error=token.signed,
        cost_samples=cost.samples,
        cost_mean_relative_error=cost.mean,
        cost_p95_relative_error=cost.p95,
        cost_mean_signed_error=cost.signed,
    )


def _csv_chunk(rows: Sequence[Sequence[object]]) -> bytes:
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    return buffer.getvalue().encode("utf-8")


def _csv_row(row: Row) -> list[object]:
    finished = int(row["finished_at_ms"])
    cost = int(row["cost_micros"])
    saved = int(row["cache_saved_micros"])
    return [
        row["request_id"],
        _iso_utc(finished),
        finished,
        row["tenant_id"],
        row["end_user"],
        row["api_key_id"],
        row["model"],
        row["provider"],
        int(row["input_tokens"]),
        int(row["output_tokens"]),
        int(row["cached_input_tokens"]),
        int(row["reasoning_tokens"]),
        int(row["cache_write_input_tokens"]),
        "true" if row["usage_estimated"] else "false",
        _usd(cost),
        cost,
        row["cache_status"],
        _usd(saved),
        saved,
        int(row["latency_ms"]),
        row["status"],
        int(row["attempts"]),
    ]
