"""The ledger's SQL (usage rows, reports, CSV export, erasure, budgets and their audit log) against a
SQLite file and a real PostgreSQL server.

Every test runs on both backends. The PostgreSQL database lives for the session, so each test
uses its own tenants, models and (for reports across tenants) its own calendar month, and never
sees another test's rows.
"""

from __future__ import annotations

import asyncio
import csv
import hashlib
import hmac
import io
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from switchyard.common.sql import Backend, Database, open_database
from switchyard.ledger.alerts import AlertCenter
from switchyard.ledger.history import (
    COMPONENT,
    CSV_COLUMNS,
    MIGRATIONS,
    Erasure,
    FieldError,
    Holds,
    InvalidPageToken,
    LedgerStore,
    month_start_ms,
)
from switchyard.v1 import common_pb2, gateway_pb2, ledger_pb2
from tests.support.postgres import PostgresUnavailable, fresh_postgres_database, skip_or_fail

DAY_MS = 86_400_000
D = gateway_pb2.UsageDimension
_months = itertools.count()


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    try:
        async with fresh_postgres_database("switchyard_ledger_test") as url:
            yield url
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))


@pytest.fixture(params=[Backend.SQLITE, Backend.POSTGRESQL])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param is Backend.SQLITE:
        return f"sqlite:///{tmp_path / 'state' / 'ledger.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = await open_database(database_url)
    try:
        yield db
    finally:
        await db.close()


@pytest.fixture
async def store(database: Database) -> LedgerStore:
    return await LedgerStore.open(database)


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def own_month() -> datetime:
    """The first instant of a calendar month no other test in this session uses (from 2031 on)."""
    n = next(_months)
    return datetime(2031 + n // 12, n % 12 + 1, 1, tzinfo=UTC)


def usage_record(
    request_id: str,
    tenant: str,
    *,
    finished_ms: int | None,
    end_user: str = "",
    api_key: str = "",
    model: str = "m",
    provider: str = "p",
    scope_model: str | None = None,
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    reasoning_tokens: int = 0,
    estimated: bool = False,
    reported_cost: int = 0,
    cache_status: common_pb2.CacheStatus.ValueType = common_pb2.CACHE_STATUS_MISS,
    cache_saved: int = 0,
    status: str = "ok",
    attempts: int = 1,
    estimated_input_tokens: int = 0,
    estimated_cost_micros: int = 0,
) -> ledger_pb2.UsageRecord:
    record = ledger_pb2.UsageRecord(
        request_id=request_id,
        scope=ledger_pb2.BudgetScope(
            tenant_id=tenant,
            end_user=end_user,
            api_key_id=api_key,
            model=model if scope_model is None else scope_model,
            provider=provider,
        ),
        model=model,
        provider=provider,
        usage=common_pb2.Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            reasoning_tokens=reasoning_tokens,
            estimated=estimated,
        ),
        cost_micros=reported_cost,
        cache_status=cache_status,
        cache_saved_micros=cache_saved,
        latency_ms=120,
        status=status,
        attempts=attempts,
        estimated_input_tokens=estimated_input_tokens,
        estimated_cost_micros=estimated_cost_micros,
    )
    if finished_ms is not None:
        record.finished_at.FromMilliseconds(finished_ms)
    return record


def totals(
    requests: int,
    input_tokens: int,
    output_tokens: int,
    cost: int,
    *,
    cached: int = 0,
    reasoning: int = 0,
    hits: int = 0,
    saved: int = 0,
    failovers: int = 0,
    errors: int = 0,
) -> gateway_pb2.UsageTotals:
    return gateway_pb2.UsageTotals(
        requests=requests,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        reasoning_tokens=reasoning,
        cost_micros=cost,
        cache_hits=hits,
        cache_saved_micros=saved,
        failovers=failovers,
        errors=errors,
    )


def buckets(response: gateway_pb2.GetUsageResponse) -> list[tuple[dict[str, str], int, int]]:
    """(key, requests, cost) per bucket, in order."""
    return [(dict(b.key), b.totals.requests, b.totals.cost_micros) for b in response.buckets]


async def row_count(database: Database, where: str, params: tuple[object, ...]) -> int:
    row = await database.fetch_one(f"SELECT COUNT(*) AS n FROM ledger_usage WHERE {where}", params)
    assert row is not None
    return int(row["n"])


# --- usage rows: exactly once -------------------------------------------------------------------


async def test_a_request_id_is_recorded_once_and_a_repeat_changes_nothing(
    store: LedgerStore, database: Database
) -> None:
    tenant, request_id = unique("acme"), unique("req")
    first = usage_record(request_id, tenant, finished_ms=1_000, input_tokens=10, reported_cost=40)
    assert await store.record(first, 50, recorded_at_ms=2_000) is True
    again = usage_record(request_id, tenant, finished_ms=1_000, input_tokens=999, reported_cost=1)
    assert await store.record(again, 7_000, recorded_at_ms=3_000) is False

    rows = await database.fetch_all(
        "SELECT input_tokens, cost_micros, record_cost_micros, recorded_at_ms, finished_at_ms, cache_status"
        " FROM ledger_usage WHERE request_id = ?",
        (request_id,),
    )
    assert [
        (r["input_tokens"], r["cost_micros"], r["record_cost_micros"], r["recorded_at_ms"]) for r in rows
    ] == [(10, 50, 40, 2_000)]
    assert rows[0]["finished_at_ms"] == 1_000 and rows[0]["cache_status"] == "CACHE_STATUS_MISS"

    undated = unique("req")
    # Without a finished time the row is dated when it was recorded; without a status it did not fail.
    assert await store.record(
        usage_record(undated, tenant, finished_ms=None, status=""), 1, recorded_at_ms=5_000
    )
    assert (
        await row_count(database, "request_id = ? AND finished_at_ms = 5000 AND status = 'ok'", (undated,))
        == 1
    )
    with pytest.raises(ValueError, match="request id"):
        await store.record(usage_record("", tenant, finished_ms=1), 1, recorded_at_ms=1)


async def test_record_many_stores_each_id_once_including_duplicates_in_the_batch(
    store: LedgerStore, database: Database
) -> None:
    tenant = unique("acme")
    a, b, c = unique("a"), unique("b"), unique("c")
    assert await store.record(usage_record(c, tenant, finished_ms=10), 5, recorded_at_ms=10)
    batch = [
        (usage_record(a, tenant, finished_ms=20), 100),
        (usage_record(b, tenant, finished_ms=30), 200),
        (usage_record(a, tenant, finished_ms=40), 999),
        (usage_record(c, tenant, finished_ms=50), 999),
    ]
    assert await store.record_many(batch, recorded_at_ms=60) == [True, True, False, False]
    rows = await database.fetch_all(
        "SELECT request_id, cost_micros FROM ledger_usage WHERE tenant_id = ? ORDER BY finished_at_ms",
        (tenant,),
    )
    assert [(r["request_id"], r["cost_micros"]) for r in rows] == [(c, 5), (a, 100), (b, 200)]
    assert await store.record_many([], recorded_at_ms=60) == []

    # More rows than one INSERT statement carries, with repeats of the first half.
    many = [(usage_record(f"{tenant}-{i}", tenant, finished_ms=100 + i), i) for i in range(90)]
    assert await store.record_many(many[:45], recorded_at_ms=200) == [True] * 45
    assert await store.record_many(many, recorded_at_ms=300) == [False] * 45 + [True] * 45
    assert await row_count(database, "tenant_id = ?", (tenant,)) == 93


async def test_an_unsettled_row_keeps_the_holds_its_commit_named(store: LedgerStore) -> None:
    """The sweeper settles a row from the holds its commit drew on, so the row keeps them."""
    tenant = unique("acme")
    leased, reserved, bare = unique("leased"), unique("reserved"), unique("bare")
    holds = [Holds(lease_ids=("lease-1", 'lease "2"')), Holds(reservation_id="rsv-x"), Holds()]
    batch = [(usage_record(i, tenant, finished_ms=10), 7) for i in (leased, reserved, bare)]
    assert await store.record_many(batch, recorded_at_ms=20, holds=holds) == [True] * 3
    with pytest.raises(ValueError, match="one per item"):
        await store.record_many(batch, recorded_at_ms=20, holds=holds[:1])
    rows = await store.unsettled(recorded_before_ms=21, limit=100_000)
    found = {row.request_id: row.holds for row in rows if row.scope.tenant_id == tenant}
    assert found == {leased: holds[0], reserved: holds[1], bare: Holds()}
    await store.mark_settled([leased, reserved, bare], settled=True)
    assert not [
        row
        for row in await store.unsettled(recorded_before_ms=21, limit=100_000)
        if row.scope.tenant_id == tenant
    ]


async def test_a_batch_with_a_bad_record_stores_nothing(store: LedgerStore, database: Database) -> None:
    tenant = unique("acme")
    batch = [
        (usage_record(unique("ok"), tenant, finished_ms=1), 1),
        (usage_record("", tenant, finished_ms=1), 1),
    ]
    with pytest.raises(ValueError):
        await store.record_many(batch, recorded_at_ms=1)
    assert await row_count(database, "tenant_id = ?", (tenant,)) == 0


async def test_twenty_concurrent_commits_of_one_request_store_exactly_one_row(
    store: LedgerStore, database: Database
) -> None:
    tenant, request_id = unique("acme"), unique("req")
    results = await asyncio.gather(
        *(
            store.record(usage_record(request_id, tenant, finished_ms=1_000), 100 + i, recorded_at_ms=1_000)
            for i in range(20)
        )
    )
    assert results.count(True) == 1
    assert await row_count(database, "request_id = ?", (request_id,)) == 1


async def test_rows_survive_closing_and_reopening_the_database(database_url: str) -> None:
    tenant, request_id = unique("acme"), unique("req")
    first = await open_database(database_url)
    try:
        store = await LedgerStore.open(first)
        record = usage_record(request_id, tenant, finished_ms=5_000, input_tokens=7, output_tokens=3)
        assert await store.record(record, 1_234, recorded_at_ms=5_000)
    finally:
        await first.close()

    second = await open_database(database_url)
    try:
        assert await second.migrate(COMPONENT, MIGRATIONS) == []
        store = await LedgerStore.open(second)
        assert (
            await store.record(usage_record(request_id, tenant, finished_ms=5_000), 1, recorded_at_ms=6_000)
            is False
        )
        response = await store.usage(
            gateway_pb2.GetUsageRequest(tenant_id=tenant, start_time=Timestamp(seconds=0)), now_ms=10_000
        )
        assert response.totals == totals(1, 7, 3, 1_234)
    finally:
        await second.close()


# --- reports ------------------------------------------------------------------------------------


async def test_usage_totals_and_every_breakdown_match_hand_computed_numbers(store: LedgerStore) -> None:
    month = own_month()
    tenant, other = unique("acme"), unique("globex")
    day = month + timedelta(days=9)  # D
    k1, k2 = unique("key"), unique("key")
    rows = [
        # (request, charged)
        (
            usage_record(
                "r1",
                tenant,
                finished_ms=ms(day) + 1_000,
                end_user="u1",
                api_key=k1,
                model="m-a",
                provider="p1",
                input_tokens=100,
                output_tokens=50,
                cached_input_tokens=10,
                reasoning_tokens=5,
            ),
            1_000,
        ),
        (
            # The last millisecond of day D ...
            usage_record(
                "r2",
                tenant,
                finished_ms=ms(day + timedelta(days=1)) - 1,
                end_user="u1",
                api_key=k1,
                model="m-b",
                provider="p2",
                input_tokens=200,
                output_tokens=20,
                cache_status=common_pb2.CACHE_STATUS_HIT_EXACT,
                cache_saved=500,
            ),
            3_000,
        ),
        (
            # ... and the first of day D+1: different day buckets.
            usage_record(
                "r3",
                tenant,
                finished_ms=ms(day + timedelta(days=1)),
                end_user="u2",
                api_key=k2,
                model="m-a",
                provider="p1",
                input_tokens=300,
                output_tokens=30,
                cache_status=common_pb2.CACHE_STATUS_HIT_SEMANTIC,
                cache_saved=700,
                attempts=2,
            ),
            2_000,
        ),
        (
            usage_record(
                "r4",
                tenant,
                finished_ms=ms(day + timedelta(days=1, hours=5)),
                end_user="u2",
                api_key=k2,
                model="m-a",
                provider="p2",
                input_tokens=50,
                cache_status=common_pb2.CACHE_STATUS_DEDUPLICATED,
                cache_saved=100,
                status="PROVIDER_UNAVAILABLE",
                attempts=3,
            ),
            0,
        ),
        (
            usage_record(
                "r5",
                tenant,
                finished_ms=ms(day + timedelta(days=2)),
                end_user="u3",
                api_key=k1,
                model="m-c",
                provider="p1",
                input_tokens=10,
                output_tokens=10,
                cache_status=common_pb2.CACHE_STATUS_BYPASS,
            ),
            4_000,
        ),
        # Outside the default window: the month before, and after "now".
        (usage_record("r0", tenant, finished_ms=ms(month) - 1, model="m-a", input_tokens=1), 50_000),
        (usage_record("r6", tenant, finished_ms=ms(day + timedelta(days=4)), model="m-a"), 60_000),
        # Another tenant, same month.
        (usage_record("x1", other, finished_ms=ms(day), model="m-a", input_tokens=1_000), 70_000),
    ]
    for record, _ in rows:
        record.request_id = f"{tenant}-{record.request_id}"
    assert all(await store.record_many(rows, recorded_at_ms=ms(day)))
    now = ms(day + timedelta(days=3))

    async def report(*group_by: gateway_pb2.UsageDimension.ValueType) -> gateway_pb2.GetUsageResponse:
        return await store.usage(gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=group_by), now_ms=now)

    everything = await report()
    assert everything.totals == totals(
        5, 660, 110, 10_000, cached=10, reasoning=5, hits=3, saved=1_300, failovers=1, errors=1
    )
    assert list(everything.buckets) == [] and everything.next_page_token == ""

    by_model = await report(D.USAGE_DIMENSION_MODEL)
    # Ties on cost (m-a and m-b: 3000) are ordered by key.
    assert buckets(by_model) == [
        ({"model": "m-c"}, 1, 4_000),
        ({"model": "m-a"}, 3, 3_000),
        ({"model": "m-b"}, 1, 3_000),
    ]
    assert by_model.buckets[1].totals == totals(
        3, 450, 80, 3_000, cached=10, reasoning=5, hits=2, saved=800, failovers=1, errors=1
    )
    assert by_model.totals == everything.totals

    assert buckets(await report(D.USAGE_DIMENSION_PROVIDER)) == [
        ({"provider": "p1"}, 3, 7_000),
        ({"provider": "p2"}, 2, 3_000),
    ]
    assert buckets(await report(D.USAGE_DIMENSION_END_USER)) == [
        ({"end_user": "u1"}, 2, 4_000),
        ({"end_user": "u3"}, 1, 4_000),
        ({"end_user": "u2"}, 2, 2_000),
    ]
    assert buckets(await report(D.USAGE_DIMENSION_API_KEY)) == sorted(
        [({"api_key": k1}, 3, 8_000), ({"api_key": k2}, 2, 2_000)], key=lambda b: -b[2]
    )
    d0, d1, d2 = (f"{day + timedelta(days=n):%Y-%m-%d}" for n in range(3))
    assert buckets(await report(D.USAGE_DIMENSION_DAY)) == [
        ({"day": d0}, 2, 4_000),
        ({"day": d2}, 1, 4_000),
        ({"day": d1}, 2, 2_000),
    ]
    assert buckets(await report(D.USAGE_DIMENSION_TENANT)) == [({"tenant": tenant}, 5, 10_000)]
    two = await report(D.USAGE_DIMENSION_MODEL, D.USAGE_DIMENSION_DAY)
    assert buckets(two) == [
        ({"model": "m-c", "day": d2}, 1, 4_000),
        ({"model": "m-b", "day": d0}, 1, 3_000),
        ({"model": "m-a", "day": d1}, 2, 2_000),
        ({"model": "m-a", "day": d0}, 1, 1_000),
    ]
    assert two.buckets[2].totals == totals(2, 350, 30, 2_000, hits=2, saved=800, failovers=1, errors=1)

    # One end user only; and an explicit window [start, end).
    only_u2 = await store.usage(gateway_pb2.GetUsageRequest(tenant_id=tenant, end_user="u2"), now_ms=now)
    assert only_u2.totals == totals(2, 350, 30, 2_000, hits=2, saved=800, failovers=1, errors=1)
    window = gateway_pb2.GetUsageRequest(tenant_id=tenant)
    window.start_time.FromMilliseconds(ms(day + timedelta(days=1)))
    window.end_time.FromMilliseconds(ms(day + timedelta(days=2)))
    assert (await store.usage(window, now_ms=now)).totals == totals(
        2, 350, 30, 2_000, hits=2, saved=800, failovers=1, errors=1
    )


async def test_usage_pages_through_buckets_in_cost_order(store: LedgerStore) -> None:
    month = own_month()
    tenant = unique("acme")
    # 25 end users; costs repeat in threes so ties must break by key across page boundaries.
    costs = {f"user-{i:02d}": 1_000 * (i // 3 + 1) for i in range(25)}
    items = [
        (usage_record(f"{tenant}-{user}", tenant, finished_ms=ms(month) + i, end_user=user), cost)
        for i, (user, cost) in enumerate(costs.items())
    ]
    assert all(await store.record_many(items, recorded_at_ms=ms(month)))
    expected = sorted(costs.items(), key=lambda item: (-item[1], item[0]))

    request = gateway_pb2.GetUsageRequest(
        tenant_id=tenant, group_by=[D.USAGE_DIMENSION_END_USER], page_size=10
    )
    seen: list[tuple[str, int]] = []
    pages = 0
    now = ms(month + timedelta(days=1))
    while True:
        response = await store.usage(request, now_ms=now)
        pages += 1
        assert response.totals.requests == 25 and response.totals.cost_micros == sum(costs.values())
        seen += [(b.key["end_user"], b.totals.cost_micros) for b in response.buckets]
        if not response.next_page_token:
            break
        request.page_token = response.next_page_token
        now += 60_000  # later pages keep the first page's window even as the clock moves
    assert pages == 3 and seen == expected

    # A token only continues the query it came from.
    first = await store.usage(
        gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=[D.USAGE_DIMENSION_END_USER], page_size=10),
        now_ms=now,
    )
    for foreign in (
        gateway_pb2.GetUsageRequest(tenant_id=unique("other"), group_by=[D.USAGE_DIMENSION_END_USER]),
        gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=[D.USAGE_DIMENSION_MODEL]),
        gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=[D.USAGE_DIMENSION_END_USER], end_user="x"),
    ):
        foreign.page_token = first.next_page_token
        with pytest.raises(InvalidPageToken):
            await store.usage(foreign, now_ms=now)
    for garbage in ("not a token", "eyJrIjoidXNhZ2UifQ", first.next_page_token[:-3] + "AAA"):
        with pytest.raises(ValueError):
            await store.usage(
                gateway_pb2.GetUsageRequest(
                    tenant_id=tenant, group_by=[D.USAGE_DIMENSION_END_USER], page_token=garbage
                ),
                now_ms=now,
            )
    with pytest.raises(ValueError):
        await store.usage(
            gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=[D.USAGE_DIMENSION_UNSPECIFIED]),
            now_ms=now,
        )
    with pytest.raises(ValueError):
        await store.usage(gateway_pb2.GetUsageRequest(tenant_id=tenant, page_size=-1), now_ms=now)
    # Page size is capped at 1000.
    big = await store.usage(
        gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=[D.USAGE_DIMENSION_END_USER], page_size=5_000),
        now_ms=now,
    )
    assert len(big.buckets) == 25 and big.next_page_token == ""


async def test_a_tenants_usage_never_includes_another_tenants_rows(store: LedgerStore) -> None:
    month = own_month()
    acme, globex = unique("acme"), unique("globex")
    at = ms(month + timedelta(days=2))
    items = [
        (usage_record(f"{acme}-1", acme, finished_ms=at, end_user="shared", input_tokens=5), 100),
        (usage_record(f"{acme}-2", acme, finished_ms=at + 1, end_user="shared", input_tokens=6), 200),
        (usage_record(f"{globex}-1", globex, finished_ms=at, end_user="shared", input_tokens=7), 4_000),
    ]
    assert all(await store.record_many(items, recorded_at_ms=at))
    now = at + DAY_MS

    mine = await store.usage(
        gateway_pb2.GetUsageRequest(
            tenant_id=acme, group_by=[D.USAGE_DIMENSION_TENANT, D.USAGE_DIMENSION_END_USER]
        ),
        now_ms=now,
    )
    assert mine.totals == totals(2, 11, 0, 300)
    assert buckets(mine) == [({"tenant": acme, "end_user": "shared"}, 2, 300)]
    theirs = await store.usage(gateway_pb2.GetUsageRequest(tenant_id=globex, end_user="shared"), now_ms=now)
    assert theirs.totals == totals(1, 7, 0, 4_000)

    # The admin view ("" tenant) over this test's own month sees both, apart.
    admin = await store.usage(gateway_pb2.GetUsageRequest(group_by=[D.USAGE_DIMENSION_TENANT]), now_ms=now)
    assert buckets(admin) == [({"tenant": globex}, 1, 4_000), ({"tenant": acme}, 2, 300)]
    assert admin.totals.cost_micros == 4_300


async def test_the_default_window_is_the_current_utc_month(store: LedgerStore) -> None:
    month = own_month()
    tenant = unique("acme")
    assert month_start_ms(ms(month + timedelta(days=20, hours=3))) == ms(month)
    items = [
        (usage_record(f"{tenant}-first", tenant, finished_ms=ms(month)), 1),
        (usage_record(f"{tenant}-before", tenant, finished_ms=ms(month) - 1), 10),
        (usage_record(f"{tenant}-now", tenant, finished_ms=ms(month) + 5_000), 100),
        (usage_record(f"{tenant}-later", tenant, finished_ms=ms(month) + 5_001), 1_000),
    ]
    assert all(await store.record_many(items, recorded_at_ms=0))
    response = await store.usage(gateway_pb2.GetUsageRequest(tenant_id=tenant), now_ms=ms(month) + 5_000)
    assert response.totals.requests == 2 and response.totals.cost_micros == 101


async def test_spent_and_month_tokens_sum_a_scope_over_a_window(store: LedgerStore) -> None:
    tenant, other = unique("acme"), unique("globex")
    model, fallback = unique("model"), unique("fallback")
    items = [
        (
            usage_record(
                f"{tenant}-1",
                tenant,
                finished_ms=1_000,
                model=model,
                end_user="u1",
                input_tokens=10,
                output_tokens=1,
            ),
            100,
        ),
        (
            usage_record(
                f"{tenant}-2",
                tenant,
                finished_ms=1_500,
                model=model,
                end_user="u2",
                input_tokens=20,
                output_tokens=2,
            ),
            200,
        ),
        # Failed over: answered by another model, but charged to the scope's.
        (
            usage_record(
                f"{tenant}-3", tenant, finished_ms=1_999, model=fallback, scope_model=model, input_tokens=40
            ),
            400,
        ),
        (usage_record(f"{tenant}-4", tenant, finished_ms=999, model=model, input_tokens=80), 800),  # before
        (
            usage_record(f"{tenant}-5", tenant, finished_ms=2_000, model=model, input_tokens=160),
            1_600,
        ),  # at end
        (usage_record(f"{other}-1", other, finished_ms=1_200, model=model, input_tokens=320), 3_200),
    ]
    assert all(await store.record_many(items, recorded_at_ms=5_000))
    window = {"start_ms": 1_000, "end_ms": 2_000}
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant), **window) == 700
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant, model=model), **window) == 700
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant, model=fallback), **window) == 0
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant, end_user="u2"), **window) == 200
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant, provider="p"), **window) == 700
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant, provider="nope"), **window) == 0
    # No tenant: across tenants (this model is unique to the test).
    assert await store.spent(ledger_pb2.BudgetScope(model=model), **window) == 3_900
    assert await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant), start_ms=0, end_ms=10_000) == 3_100

    # Volume discounts count tokens by the model that answered.
    assert await store.month_tokens(tenant, model, **window) == 33
    assert await store.month_tokens(tenant, fallback, **window) == 40
    assert await store.month_tokens(tenant, model, start_ms=0, end_ms=10_000) == 273
    with pytest.raises(ValueError):
        await store.spent(ledger_pb2.BudgetScope(tenant_id=tenant), start_ms=10, end_ms=5)


async def test_estimate_accuracy_per_model(store: LedgerStore) -> None:
    small, large = unique("model-small"), unique("model-large")
    tenant = unique("acme")
    items: list[tuple[ledger_pb2.UsageRecord, int]] = []
    for i, estimate in enumerate((110, 90, 100, 150)):  # errors +0.1, -0.1, 0, +0.5, oldest first
        items.append(
            (
                usage_record(
                    f"{small}-{i}",
                    tenant,
                    finished_ms=1_000 + i,
                    model=small,
                    input_tokens=100,
                    estimated_input_tokens=estimate,
                ),
                1,
            )
        )
    # Left out: usage itself estimated, no estimate, no vendor count.
    items += [
        (
            usage_record(
                f"{small}-e",
                tenant,
                finished_ms=900,
                model=small,
                input_tokens=100,
                estimated_input_tokens=500,
                estimated=True,
            ),
            1,
        ),
        (usage_record(f"{small}-n", tenant, finished_ms=901, model=small, input_tokens=100), 1),
        (usage_record(f"{small}-z", tenant, finished_ms=902, model=small, estimated_input_tokens=50), 1),
    ]
    for k in range(1, 21):  # errors 0.01 ... 0.20
        items.append(
            (
                usage_record(
                    f"{large}-{k}",
                    tenant,
                    finished_ms=2_000 + k,
                    model=large,
                    input_tokens=100,
                    estimated_input_tokens=100 + k,
                ),
                1,
            )
        )
    assert all(await store.record_many(items, recorded_at_ms=3_000))

    [acc] = await store.estimate_accuracy(small)
    assert acc.model == small and acc.samples == 4
    assert acc.mean_relative_error == pytest.approx(0.175)
    assert acc.mean_signed_error == pytest.approx(0.125)
    assert acc.p95_relative_error == pytest.approx(0.5)

    [recent] = await store.estimate_accuracy(small, limit_per_model=2)  # the two newest: 0 and +0.5
    assert recent.samples == 2
    assert recent.mean_relative_error == pytest.approx(0.25)
    assert recent.mean_signed_error == pytest.approx(0.25)

    everyone = {a.model: a for a in await store.estimate_accuracy() if a.model in (small, large)}
    assert list(everyone) == sorted([small, large])
    assert everyone[large].samples == 20
    assert everyone[large].mean_relative_error == pytest.approx(0.105)
    assert everyone[large].p95_relative_error == pytest.approx(0.19)  # nearest rank: the 19th of 20
    assert await store.estimate_accuracy(unique("no-such-model")) == []
    # No cost estimates among these rows.
    assert {
        (a.cost_samples, a.cost_mean_relative_error, a.cost_p95_relative_error) for a in everyone.values()
    } == {(0, 0.0, 0.0)}


async def test_cost_estimate_accuracy_per_model(store: LedgerStore, database: Database) -> None:
    """The expected cost predicted vs the cost charged (`cost_micros`, what the ledger charged,
    not what the record reported), beside and independent of the prompt-token accuracy."""
    small, large, tokens_only = unique("model-small"), unique("model-large"), unique("model-tokens")
    tenant = unique("acme")
    items: list[tuple[ledger_pb2.UsageRecord, int]] = []
    # Charged 1 000 each; estimates 1 200, 800, 1 000, 1 500: errors +0.2, -0.2, 0, +0.5, oldest first.
    for i, estimate in enumerate((1_200, 800, 1_000, 1_500)):
        items.append(
            (
                usage_record(
                    f"{small}-{i}",
                    tenant,
                    finished_ms=1_000 + i,
                    model=small,
                    input_tokens=100,
                    reported_cost=7,
                    estimated_cost_micros=estimate,
                ),
                1_000,
            )
        )
    # Left out of the cost figures: no cost estimate (but a token one, which counts there), nothing
    # charged (a cache hit or a failure), usage itself estimated (the charge is a guess too).
    items += [
        (
            usage_record(
                f"{small}-t",
                tenant,
                finished_ms=900,
                model=small,
                input_tokens=100,
                estimated_input_tokens=110,
            ),
            1_000,
        ),
        (
            usage_record(
                f"{small}-free",
                tenant,
                finished_ms=901,
                model=small,
                input_tokens=100,
                cache_status=common_pb2.CACHE_STATUS_HIT_EXACT,
                estimated_cost_micros=900,
            ),
            0,
        ),
        (
            usage_record(
                f"{small}-e",
                tenant,
                finished_ms=902,
                model=small,
                input_tokens=100,
                estimated=True,
                estimated_cost_micros=5_000,
            ),
            1_000,
        ),
    ]
    for k in range(1, 21):  # charged 2 000; estimates 1 980 ... 1 600: errors -0.01 ... -0.20
        items.append(
            (
                usage_record(
                    f"{large}-{k}",
                    tenant,
                    finished_ms=2_000 + k,
                    model=large,
                    input_tokens=100,
                    estimated_cost_micros=2_000 - 20 * k,
                ),
                2_000,
            )
        )
    items.append(
        (
            usage_record(
                f"{tokens_only}-1",
                tenant,
                finished_ms=3_000,
                model=tokens_only,
                input_tokens=100,
                estimated_input_tokens=90,
            ),
            500,
        )
    )
    assert all(await store.record_many(items, recorded_at_ms=4_000))

    # Stored as given, 0 where the record had none.
    rows = await database.fetch_all(
        "SELECT request_id, estimated_cost_micros, cost_micros FROM ledger_usage WHERE model = ?"
        " ORDER BY request_id",
        (small,),
    )
    assert {str(r["request_id"]): (int(r["estimated_cost_micros"]), int(r["cost_micros"])) for r in rows} == {
        f"{small}-0": (1_200, 1_000),
        f"{small}-1": (800, 1_000),
        f"{small}-2": (1_000, 1_000),
        f"{small}-3": (1_500, 1_000),
        f"{small}-t": (0, 1_000),
        f"{small}-free": (900, 0),
        f"{small}-e": (5_000, 1_000),
    }

    [acc] = await store.estimate_accuracy(small)
    assert (acc.model, acc.cost_samples) == (small, 4)
    assert acc.cost_mean_relative_error == pytest.approx(0.9 / 4)
    assert acc.cost_mean_signed_error == pytest.approx(0.5 / 4)
    assert acc.cost_p95_relative_error == pytest.approx(0.5)  # nearest rank: the 4th of 4
    # The prompt-token figures count their own rows: only the one with a token estimate.
    assert (acc.samples, acc.mean_relative_error, acc.p95_relative_error) == (
        1,
        pytest.approx(0.1),
        pytest.approx(0.1),
    )

    [recent] = await store.estimate_accuracy(small, limit_per_model=2)  # the two newest: 0 and +0.5
    assert recent.cost_samples == 2
    assert recent.cost_mean_relative_error == pytest.approx(0.25)
    assert recent.cost_mean_signed_error == pytest.approx(0.25)
    assert recent.cost_p95_relative_error == pytest.approx(0.5)

    everyone = {a.model: a for a in await store.estimate_accuracy() if a.model in (small, large, tokens_only)}
    assert list(everyone) == sorted([small, large, tokens_only])
    big = everyone[large]
    assert (big.samples, big.mean_relative_error) == (0, 0.0)  # no token estimates on this model
    assert big.cost_samples == 20
    assert big.cost_mean_relative_error == pytest.approx(0.105)
    assert big.cost_mean_signed_error == pytest.approx(-0.105)
    assert big.cost_p95_relative_error == pytest.approx(0.19)  # nearest rank: the 19th of 20
    only = everyone[tokens_only]
    assert (only.samples, only.mean_signed_error) == (1, pytest.approx(-0.1))
    assert (only.cost_samples, only.cost_mean_relative_error, only.cost_p95_relative_error) == (0, 0.0, 0.0)


async def test_rows_stored_before_cost_estimates_are_kept_and_left_out_of_cost_accuracy(
    database_url: str, tmp_path: Path
) -> None:
    """Upgrading a database from before `estimated_cost_micros`: its rows stay as they were (no cost
    estimate), their prompt-token accuracy still counts, and only new rows give cost samples."""
    tenant, model = unique("acme"), unique("model")

    async def check(url: str) -> None:
        database = await open_database(url)
        try:
            await database.migrate(COMPONENT, MIGRATIONS[:7])
            for i, estimate in enumerate((120, 80)):  # as the release before wrote them
                await database.execute(
                    "INSERT INTO ledger_usage (request_id, tenant_id, model, input_tokens, cost_micros,"
                    " estimated_input_tokens, finished_at_ms, recorded_at_ms)"
                    " VALUES (?, ?, ?, 100, 1000, ?, ?, ?)",
                    (f"{tenant}-old-{i}", tenant, model, estimate, 1_000 + i, 1_000 + i),
                )
            store = await LedgerStore.open(database)
            assert await database.migrate(COMPONENT, MIGRATIONS) == []
            old = await database.fetch_all(
                "SELECT request_id, estimated_cost_micros, cost_micros FROM ledger_usage"
                " WHERE tenant_id = ? ORDER BY request_id",
                (tenant,),
            )
            assert [(r["request_id"], r["estimated_cost_micros"], r["cost_micros"]) for r in old] == [
                (f"{tenant}-old-0", 0, 1_000),
                (f"{tenant}-old-1", 0, 1_000),
            ]
            new = usage_record(
                f"{tenant}-new",
                tenant,
                finished_ms=2_000,
                model=model,
                input_tokens=100,
                estimated_input_tokens=100,
                estimated_cost_micros=1_100,
            )
            assert await store.record(new, 1_000, recorded_at_ms=2_000)
            [acc] = await store.estimate_accuracy(model)
            assert (acc.samples, acc.mean_relative_error) == (3, pytest.approx(0.4 / 3))
            assert (acc.cost_samples, acc.cost_mean_relative_error, acc.cost_p95_relative_error) == (
                1,
                pytest.approx(0.1),
                pytest.approx(0.1),
            )
        finally:
            await database.close()

    if database_url.startswith("sqlite"):
        await check(f"sqlite:///{tmp_path / 'old' / 'ledger.db'}")
    else:
        async with fresh_postgres_database("switchyard_ledger_cost_upgrade") as url:
            await check(url)


# --- CSV export ---------------------------------------------------------------------------------


async def test_export_is_quoted_csv_in_time_order_in_pieces(store: LedgerStore) -> None:
    tenant, other = unique("acme"), unique("globex")
    awkward = 'Doe, "Jane"\nsecond line'
    items = [
        (usage_record(f"{tenant}-c", tenant, finished_ms=3_000, end_user="bob", input_tokens=3), 3_000_000),
        (
            usage_record(
                f"{tenant}-a",
                tenant,
                finished_ms=1_000,
                end_user=awkward,
                input_tokens=1,
                cache_status=common_pb2.CACHE_STATUS_HIT_EXACT,
                cache_saved=1_500,
            ),
            1_500,
        ),
        (usage_record(f"{tenant}-b", tenant, finished_ms=2_000, end_user="bob", estimated=True), 0),
        (usage_record(f"{tenant}-d", tenant, finished_ms=3_000, end_user=awkward), 12_345_678),
        (usage_record(f"{tenant}-e", tenant, finished_ms=4_000, end_user="bob"), 1),
        (usage_record(f"{tenant}-late", tenant, finished_ms=9_000, end_user="bob"), 1),  # at the end: out
        (usage_record(f"{other}-a", other, finished_ms=2_500, end_user="bob"), 1),
    ]
    assert all(await store.record_many(items, recorded_at_ms=10_000))

    chunks = [c async for c in store.export_csv(tenant, start_ms=1_000, end_ms=9_000, chunk_rows=2)]
    assert len(chunks) == 4  # header, 2 + 2 + 1 rows
    parsed = list(csv.DictReader(io.StringIO(b"".join(chunks).decode("utf-8"), newline="")))
    assert list(parsed[0]) == list(CSV_COLUMNS)
    assert [r["request_id"] for r in parsed] == [f"{tenant}-{x}" for x in "abcde"]  # ties by request id
    first = parsed[0]
    assert first["end_user"] == awkward and first["tenant_id"] == tenant
    assert (first["cost_usd"], first["cost_micros"]) == ("0.001500", "1500")
    assert (first["cache_saved_usd"], first["cache_saved_micros"]) == ("0.001500", "1500")
    assert (
        first["cache_status"] == "CACHE_STATUS_HIT_EXACT"
        and first["finished_at"] == "1970-01-01T00:00:01.000Z"
    )
    assert first["finished_at_ms"] == "1000" and first["input_tokens"] == "1" and first["status"] == "ok"
    assert parsed[1]["usage_estimated"] == "true" and parsed[0]["usage_estimated"] == "false"
    assert (parsed[2]["cost_usd"], parsed[3]["cost_usd"]) == ("3.000000", "12.345678")

    only = [c async for c in store.export_csv(tenant, start_ms=0, end_ms=5_000, end_user=awkward)]
    rows = list(csv.reader(io.StringIO(b"".join(only).decode(), newline="")))
    assert [r[0] for r in rows[1:]] == [f"{tenant}-a", f"{tenant}-d"]

    empty = [c async for c in store.export_csv(unique("nobody"), start_ms=0, end_ms=5_000)]
    assert len(empty) == 1 and empty[0].decode().strip() == ",".join(CSV_COLUMNS)


# --- GDPR erasure -------------------------------------------------------------------------------


async def test_erasing_an_end_user_anonymises_rows_deletes_budgets_audit_alerts_and_audits_a_keyed_hash(
    store: LedgerStore, database: Database
) -> None:
    tenant, other = unique("acme"), unique("globex")
    person = unique("jane.doe@example.com")
    items = [
        (usage_record(f"{tenant}-1", tenant, finished_ms=1, end_user=person), 1),
        (usage_record(f"{tenant}-2", tenant, finished_ms=2, end_user=person), 1),
        (usage_record(f"{tenant}-3", tenant, finished_ms=3, end_user="someone-else"), 1),
        (usage_record(f"{other}-1", other, finished_ms=1, end_user=person), 1),
    ]
    assert all(await store.record_many(items, recorded_at_ms=5))
    # Budgets: two of the person's (one changed once: two audit entries), the tenant's own,
    # another user's, and the same id in another tenant: only the person's two go.
    alerts = await AlertCenter.open(database, secret=None)
    theirs = await store.put_budget(
        budget(tenant, budget_id=f"{person}:monthly", end_user=person), actor="admin@acme", now_ms=1_000
    )
    changed = ledger_pb2.Budget()
    changed.CopyFrom(theirs)
    changed.limit_micros = 2_000_000
    theirs = await store.put_budget(changed, actor="admin@acme", now_ms=1_500)
    daily = await store.put_budget(
        budget(tenant, end_user=person, window=ledger_pb2.BUDGET_WINDOW_DAILY),
        actor="admin@acme",
        now_ms=1_000,
    )
    # A budget once scoped to the person, deleted and made again for someone else, stays; the
    # audit entries that named the person go. (A live budget's scope cannot change.)
    moved = await store.put_budget(
        budget(tenant, budget_id=unique("moved"), end_user=person), actor="admin@acme", now_ms=1_000
    )
    moved.scope.end_user = "someone-new"
    with pytest.raises(FieldError):
        await store.put_budget(moved, actor="admin@acme", now_ms=1_100)
    await store.delete_budget(moved.budget_id, actor="admin@acme", now_ms=1_150)
    moved = await store.put_budget(moved, actor="admin@acme", now_ms=1_200)
    kept = [
        await store.put_budget(budget(tenant), actor="admin@acme", now_ms=1_000),
        await store.put_budget(budget(tenant, end_user="someone-else"), actor="admin@acme", now_ms=1_000),
        await store.put_budget(budget(other, end_user=person), actor="admin@globex", now_ms=1_000),
        moved,
    ]
    for b in (theirs, daily, *kept):
        assert await alerts.observe(b, window_key="2030-01", spent_micros=b.limit_micros, now_ms=2_000)

    erased = await store.erase_end_user(
        tenant, person, actor="admin@acme", now_ms=7_000, also=alerts.forget_budgets
    )
    assert sorted(erased.budget_ids) == sorted([theirs.budget_id, daily.budget_id])
    assert (erased.rows, erased.audit_entries, erased.alerts) == (2, 5, 6)
    # The rows stay for the tenant's totals, no longer linked to the person.
    assert await row_count(database, "tenant_id = ? AND end_user = ?", (tenant, person)) == 0
    assert await row_count(database, "tenant_id = ? AND end_user = ''", (tenant,)) == 2
    assert await row_count(database, "tenant_id = ?", (tenant,)) == 3
    assert await row_count(database, "tenant_id = ? AND end_user = ?", (other, person)) == 1
    assert (
        await store.get_budget(theirs.budget_id) is None and await store.get_budget(daily.budget_id) is None
    )
    assert [await store.get_budget(b.budget_id) for b in kept] == kept
    remaining = (await alerts.list_alerts(tenant))[0] + (await alerts.list_alerts(other))[0]
    assert {a.budget_id for a in remaining} == {b.budget_id for b in kept} and len(remaining) == 12
    assert not {a.budget_id for a in remaining} & {theirs.budget_id, daily.budget_id}

    entries, token = await store.list_audit(tenant_id=tenant)
    assert token == ""
    assert [(e.action, e.budget_id) for e in entries] == [
        ("erase_end_user", ""),
        ("create", kept[1].budget_id),
        ("create", kept[0].budget_id),
        ("create", moved.budget_id),  # made again for someone else: it names no one erased
    ]
    entry = entries[0]
    assert (entry.action, entry.budget_id, entry.actor) == ("erase_end_user", "", "admin@acme")
    assert entry.at.ToMilliseconds() == 7_000
    assert not entry.HasField("old_budget") and not entry.HasField("new_budget")
    # The database's own key (none configured), the same on every read: the holder of the key
    # can show this user was erased; a bare hash of a guessed id matches nothing.
    key = await store.erasure_key()
    assert len(key) == 32 and key == await LedgerStore(database).erasure_key()
    digest = hmac.new(key, json.dumps([tenant, person], separators=(",", ":")).encode(), hashlib.sha256)
    assert json.loads(entry.detail) == {
        "tenant_id": tenant,
        "end_user_hmac_sha256": digest.hexdigest(),
        "rows_anonymised": 2,
        "budgets_deleted": 2,
        "audit_entries_deleted": 5,
        "alerts_deleted": 6,
    }
    assert hashlib.sha256(person.encode()).hexdigest() not in entry.detail
    # Nothing the tenant's tables keep names the person any more (the other tenant's do).
    for table in ("ledger_budget_audit", "ledger_budgets", "ledger_usage", "budget_alerts"):
        stored = await database.fetch_all(f"SELECT * FROM {table} WHERE tenant_id = ?", (tenant,))
        assert stored and person not in json.dumps([dict(row) for row in stored], default=str)
    assert await row_count(database, "tenant_id = ? AND end_user = ?", (other, person)) == 1

    # Erasing again finds nothing, and is audited too; an empty id would erase every anonymous row.
    again = await store.erase_end_user(tenant, person, actor="admin@acme", now_ms=8_000)
    assert again == Erasure(rows=0, budget_ids=(), audit_entries=0, alerts=0)
    assert len((await store.list_audit(tenant_id=tenant))[0]) == 5
    with pytest.raises(ValueError):
        await store.erase_end_user(tenant, "", actor="admin@acme", now_ms=8_000)


async def test_a_configured_erasure_key_hashes_erasures(database: Database) -> None:
    key = b"k" * 32
    store = await LedgerStore.open(database, erasure_key=key)
    tenant = unique("acme")
    await store.erase_end_user(tenant, "bob", actor="admin@acme", now_ms=1_000)
    [entry], _ = await store.list_audit(tenant_id=tenant)
    expected = hmac.new(key, json.dumps([tenant, "bob"], separators=(",", ":")).encode(), hashlib.sha256)
    assert json.loads(entry.detail)["end_user_hmac_sha256"] == expected.hexdigest()
    with pytest.raises(ValueError, match="at least 16 bytes"):
        await LedgerStore.open(database, erasure_key=b"short")


async def end_users(database: Database, tenant: str) -> dict[str, str]:
    rows = await database.fetch_all(
        "SELECT request_id, end_user FROM ledger_usage WHERE tenant_id = ?", (tenant,)
    )
    return {str(row["request_id"]): str(row["end_user"]) for row in rows}


async def test_a_late_commit_of_an_erased_end_user_is_stored_anonymised(
    store: LedgerStore, database: Database
) -> None:
    tenant, other = unique("acme"), unique("globex")
    person = unique("jane.doe@example.com")
    assert await store.record(
        usage_record(f"{tenant}-early", tenant, finished_ms=5_000, end_user=person), 1, recorded_at_ms=5_000
    )
    await store.erase_end_user(tenant, person, actor="admin@acme", now_ms=10_000)

    # An edge's outbox delivers after the erasure: requests that finished by then lose the end
    # user, as the erasure left the person's other rows; one that finished after it keeps it,
    # as do other users and the same id in another tenant.
    late = [
        (usage_record(f"{tenant}-before", tenant, finished_ms=9_999, end_user=person), 1),
        (usage_record(f"{tenant}-at", tenant, finished_ms=10_000, end_user=person), 1),
        (usage_record(f"{tenant}-after", tenant, finished_ms=10_001, end_user=person), 1),
        (usage_record(f"{tenant}-else", tenant, finished_ms=9_000, end_user="someone-else"), 1),
        (usage_record(f"{tenant}-nobody", tenant, finished_ms=9_000), 1),
        (usage_record(f"{other}-same", other, finished_ms=9_000, end_user=person), 1),
    ]
    assert await store.record_many(late, recorded_at_ms=20_000) == [True] * len(late)
    assert await store.record(
        usage_record(f"{tenant}-single", tenant, finished_ms=8_000, end_user=person), 1, recorded_at_ms=20_000
    )
    assert await end_users(database, tenant) == {
        f"{tenant}-early": "",
        f"{tenant}-before": "",
        f"{tenant}-at": "",
        f"{tenant}-after": person,
        f"{tenant}-else": "someone-else",
        f"{tenant}-nobody": "",
        f"{tenant}-single": "",
    }
    assert await end_users(database, other) == {f"{other}-same": person}

    # Erased again later: the time moves on, so the row after the first erasure goes now and a
    # late one from before the second follows it. A replica whose clock is behind cannot move
    # the time back.
    again = await store.erase_end_user(tenant, person, actor="admin@acme", now_ms=30_000)
    assert again.rows == 1
    await store.erase_end_user(tenant, person, actor="admin@acme", now_ms=15_000)
    assert await store.record(
        usage_record(f"{tenant}-late2", tenant, finished_ms=29_000, end_user=person), 1, recorded_at_ms=40_000
    )
    assert await store.record(
        usage_record(f"{tenant}-new", tenant, finished_ms=30_001, end_user=person), 1, recorded_at_ms=40_000
    )
    found = await end_users(database, tenant)
    assert (found[f"{tenant}-after"], found[f"{tenant}-late2"], found[f"{tenant}-new"]) == ("", "", person)
    # The erasures table keeps the keyed digest only, never the id.
    stored = await database.fetch_all("SELECT * FROM ledger_erasures")
    assert person not in json.dumps([dict(row) for row in stored], default=str)


async def test_commits_racing_an_erasure_never_keep_the_end_user(
    store: LedgerStore, database: Database
) -> None:
    tenant, person = unique("acme"), unique("racer")
    erased_at = 50_000
    # Every request finished before the erasure, whichever of the commit and the erasure wins.
    commits = [
        store.record(
            usage_record(f"{tenant}-{i}", tenant, finished_ms=erased_at - i, end_user=person),
            1,
            recorded_at_ms=erased_at,
        )
        for i in range(30)
    ]
    erasure = store.erase_end_user(tenant, person, actor="admin@acme", now_ms=erased_at)
    await asyncio.gather(*commits[:15], erasure, *commits[15:])
    found = await end_users(database, tenant)
    assert len(found) == 30 and set(found.values()) == {""}


async def test_erasures_audited_before_the_erasures_table_are_remembered(
    database_url: str, tmp_path: Path
) -> None:
    """An erasure made by a release without `ledger_erasures` is carried over from its audit entry."""
    key = b"e" * 32
    tenant, person = unique("acme"), unique("jane")
    digest = hmac.new(key, json.dumps([tenant, person], separators=(",", ":")).encode(), hashlib.sha256)

    async def check(url: str) -> None:
        database = await open_database(url)
        try:
            await database.migrate(COMPONENT, MIGRATIONS[:6])
            await database.execute(
                "INSERT INTO ledger_budget_audit (budget_id, tenant_id, actor, at_ms, action, detail)"
                " VALUES ('', ?, 'admin@acme', 10000, 'erase_end_user', ?)",
                (tenant, json.dumps({"tenant_id": tenant, "end_user_hmac_sha256": digest.hexdigest()})),
            )
            store = await LedgerStore.open(database, erasure_key=key)
            late = [
                (usage_record(f"{tenant}-before", tenant, finished_ms=9_000, end_user=person), 1),
                (usage_record(f"{tenant}-after", tenant, finished_ms=11_000, end_user=person), 1),
            ]
            assert await store.record_many(late, recorded_at_ms=20_000) == [True, True]
            assert await end_users(database, tenant) == {f"{tenant}-before": "", f"{tenant}-after": person}
        finally:
            await database.close()

    if database_url.startswith("sqlite"):
        await check(f"sqlite:///{tmp_path / 'old' / 'ledger.db'}")
    else:
        async with fresh_postgres_database("switchyard_ledger_upgrade") as url:
            await check(url)


# --- budgets and their audit log ----------------------------------------------------------------


def budget(
    tenant: str = "",
    *,
    budget_id: str = "",
    limit: int = 1_000_000,
    window: ledger_pb2.BudgetWindow.ValueType = ledger_pb2.BUDGET_WINDOW_MONTHLY,
    **scope: str,
) -> ledger_pb2.Budget:
    return ledger_pb2.Budget(
        budget_id=budget_id,
        scope=ledger_pb2.BudgetScope(tenant_id=tenant, **scope),
        window=window,
        enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
        limit_micros=limit,
    )


async def test_put_budget_versions_each_change_and_audits_old_and_new(store: LedgerStore) -> None:
    tenant = unique("acme")
    draft = budget(tenant, limit=5_000_000)
    # Read-only fields in the input are ignored.
    draft.spent_micros, draft.held_micros, draft.version = 77, 88, 99
    draft.window_start.FromMilliseconds(123)
    draft.webhook_url = "https://hooks.example.com/budget"
    created = await store.put_budget(draft, actor="alice", now_ms=1_000)
    assert created.budget_id.startswith(f"{tenant}:monthly:")
    assert created.version == 1 and created.spent_micros == 0 and created.held_micros == 0
    assert not created.HasField("window_start") and created.limit_micros == 5_000_000
    assert await store.get_budget(created.budget_id) == created

    change = ledger_pb2.Budget()
    change.CopyFrom(created)
    change.limit_micros = 9_000_000
    change.enforcement = ledger_pb2.BUDGET_ENFORCEMENT_SOFT
    updated = await store.put_budget(change, actor="bob", now_ms=2_000)
    assert updated.version == 2 and updated.limit_micros == 9_000_000
    assert await store.get_budget(created.budget_id) == updated
    assert await store.get_budget(unique("nope")) is None

    entries, _ = await store.list_audit(budget_id=created.budget_id)
    assert [(e.action, e.actor, e.at.ToMilliseconds()) for e in entries] == [
        ("update", "bob", 2_000),
        ("create", "alice", 1_000),
    ]
    assert entries[0].old_budget == created and entries[0].new_budget == updated
    assert not entries[1].HasField("old_budget") and entries[1].new_budget == created
    assert [e.budget_id for e in (await store.list_audit(tenant_id=tenant))[0]] == [created.budget_id] * 2

    for bad in (
        budget(tenant, window=ledger_pb2.BUDGET_WINDOW_UNSPECIFIED),
        budget(tenant, limit=-1),
        budget(tenant, budget_id="has space"),
    ):
        with pytest.raises(ValueError):
            await store.put_budget(bad, actor="alice", now_ms=3_000)
    no_enforcement = budget(tenant)
    no_enforcement.enforcement = ledger_pb2.BUDGET_ENFORCEMENT_UNSPECIFIED
    with pytest.raises(ValueError):
        await store.put_budget(no_enforcement, actor="alice", now_ms=3_000)


async def test_a_deleted_budget_is_gone_audited_and_made_again_after_its_last_version(
    store: LedgerStore,
) -> None:
    tenant = unique("acme")
    budget_id = f"{tenant}:daily"
    made = await store.put_budget(
        budget(tenant, budget_id=budget_id, window=ledger_pb2.BUDGET_WINDOW_DAILY), actor="alice", now_ms=1
    )
    scope = ledger_pb2.BudgetScope(tenant_id=tenant)
    assert [b.budget_id for b in await store.budgets_for(scope)] == [budget_id]

    deleted = await store.delete_budget(budget_id, actor="bob", now_ms=2)
    assert deleted == made
    assert await store.get_budget(budget_id) is None
    assert await store.budgets_for(scope) == []
    assert budget_id not in {b.budget_id for b in await store.all_budgets()}
    assert (await store.list_budgets(tenant))[0] == []
    assert await store.delete_budget(budget_id, actor="bob", now_ms=3) is None  # once only
    assert await store.delete_budget(unique("never"), actor="bob", now_ms=3) is None

    # Made again: a new budget whose version comes after every version of the old one, so an
    # edge's lease of the old one (version 1) is stale for it.
    again = await store.put_budget(
        budget(tenant, budget_id=budget_id, limit=7, window=ledger_pb2.BUDGET_WINDOW_DAILY),
        actor="carol",
        now_ms=4,
    )
    assert again.version == 3 and again.limit_micros == 7
    assert await store.get_budget(budget_id) == again
    entries, _ = await store.list_audit(budget_id=budget_id)
    assert [(e.action, e.actor) for e in entries] == [
        ("create", "carol"),
        ("delete", "bob"),
        ("create", "alice"),
    ]
    assert entries[1].old_budget == made and not entries[1].HasField("new_budget")
    assert not entries[0].HasField("old_budget") and entries[0].new_budget == again


async def test_concurrent_writes_to_one_budget_each_get_their_own_version(store: LedgerStore) -> None:
    tenant = unique("acme")
    budget_id = f"{tenant}:daily"
    results = await asyncio.gather(
        *(
            store.put_budget(
                budget(tenant, budget_id=budget_id, limit=i, window=ledger_pb2.BUDGET_WINDOW_DAILY),
                actor=f"writer-{i}",
                now_ms=i,
            )
            for i in range(6)
        )
    )
    assert sorted(r.version for r in results) == [1, 2, 3, 4, 5, 6]
    entries, _ = await store.list_audit(budget_id=budget_id)
    assert sorted(e.action for e in entries) == ["create"] + ["update"] * 5
    # Each update's old budget is the version before it: no change was lost.
    for entry in entries:
        if entry.action == "update":
            assert entry.old_budget.version == entry.new_budget.version - 1
    final = await store.get_budget(budget_id)
    assert final is not None and final.version == 6


async def test_budget_listings_page_and_refuse_foreign_tokens(store: LedgerStore) -> None:
    tenant, other = unique("acme"), unique("globex")
    ids = [f"{tenant}:b{i}" for i in range(5)]
    for budget_id in reversed(ids):
        await store.put_budget(budget(tenant, budget_id=budget_id), actor="alice", now_ms=1)
    await store.put_budget(budget(other, budget_id=f"{other}:b0"), actor="alice", now_ms=1)

    listed: list[str] = []
    token = ""
    while True:
        page, token = await store.list_budgets(tenant, page_size=2, page_token=token)
        assert len(page) <= 2
        listed += [b.budget_id for b in page]
        if not token:
            break
    assert listed == ids

    _, first_token = await store.list_budgets(tenant, page_size=2)
    with pytest.raises(InvalidPageToken):
        await store.list_budgets(other, page_token=first_token)
    with pytest.raises(InvalidPageToken):
        await store.list_audit(tenant_id=tenant, page_token=first_token)

    audit: list[str] = []
    token = ""
    while True:
        entries, token = await store.list_audit(tenant_id=tenant, page_size=2, page_token=token)
        audit += [e.budget_id for e in entries]
        if not token:
            break
    assert audit == ids  # newest first: created in reverse id order

    everything = {b.budget_id for b in await store.all_budgets()}
    assert set(ids) | {f"{other}:b0"} <= everything


async def test_budgets_for_a_request_match_every_non_empty_scope_field(store: LedgerStore) -> None:
    tenant, other = unique("acme"), unique("globex")
    model, other_model = unique("model"), unique("model")
    user, key = unique("user"), unique("key")
    made = {
        name: await store.put_budget(b, actor="alice", now_ms=1)
        for name, b in {
            "tenant": budget(tenant),
            "tenant+model": budget(tenant, model=model),
            "model, any tenant": budget("", model=model),
            "other tenant": budget(other),
            "tenant+user": budget(tenant, end_user=user),
            "tenant+key": budget(tenant, api_key_id=key),
            "tenant+provider": budget(tenant, provider="p-x"),
            "other model": budget("", model=other_model),
        }.items()
    }
    names = {b.budget_id: name for name, b in made.items()}

    async def applying(**scope: str) -> set[str]:
        found = await store.budgets_for(ledger_pb2.BudgetScope(**scope))
        return {names[b.budget_id] for b in found if b.budget_id in names}

    assert await applying(
        tenant_id=tenant, end_user=unique("u"), api_key_id=key, model=model, provider="p-y"
    ) == {
        "tenant",
        "tenant+model",
        "model, any tenant",
        "tenant+key",
    }
    assert await applying(tenant_id=tenant, end_user=user, model=unique("m"), provider="p-x") == {
        "tenant",
        "tenant+user",
        "tenant+provider",
    }
    assert await applying(tenant_id=other, model=model) == {"other tenant", "model, any tenant"}
    # A request without an end user is not charged to a budget on one.
    assert await applying(tenant_id=tenant) == {"tenant"}
