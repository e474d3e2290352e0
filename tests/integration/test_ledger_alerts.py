"""Budget threshold alerts and their signed webhooks, on a SQLite file and a real PostgreSQL.

Each test gets its own database, a fresh SQLite file or a fresh PostgreSQL database, since a
delivery pass takes every due alert in it. The webhook receiver is a real aiohttp server on
127.0.0.1 that checks signatures with `verify`; retries are driven by calling `deliver_due`
with a fake clock, never by sleeping.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web

from switchyard.common.errors import SwitchyardError
from switchyard.common.logging import configure_logging, reset_logging
from switchyard.common.ports import free_port
from switchyard.common.sql import Backend, Database, now_ms, open_database
from switchyard.ledger.alerts import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    THRESHOLDS,
    AlertCenter,
    sign,
    verify,
)
from switchyard.v1 import ledger_pb2
from tests.support.postgres import PostgresUnavailable, fresh_postgres_database, skip_or_fail

SECRET = b"whsec-test-0123456789abcdef"
LIMIT = 1_000_000  # $1.00


@pytest.fixture
async def postgres_url() -> AsyncIterator[str]:
    # A database per test: a delivery pass takes every due alert in the database, whoever fired it.
    try:
        async with fresh_postgres_database("switchyard_alerts") as url:
            yield url
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))


# Synchronous, so that it may pull the (async) PostgreSQL fixture only for that case.
@pytest.fixture(params=[Backend.SQLITE, Backend.POSTGRESQL])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param is Backend.SQLITE:
        return f"sqlite:///{tmp_path / 'state' / 'switchyard.db'}"
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
async def centers(database: Database) -> AsyncIterator[list[AlertCenter]]:
    """Centers a test opened; closed afterwards (append to it)."""
    opened: list[AlertCenter] = []
    try:
        yield opened
    finally:
        for center in opened:
            await center.aclose()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def budget(
    tenant: str,
    *,
    webhook_url: str = "",
    limit_micros: int = LIMIT,
    enforcement: ledger_pb2.BudgetEnforcement.ValueType = ledger_pb2.BUDGET_ENFORCEMENT_HARD,
) -> ledger_pb2.Budget:
    return ledger_pb2.Budget(
        budget_id=f"tenant:{tenant}:monthly",
        scope=ledger_pb2.BudgetScope(tenant_id=tenant),
        window=ledger_pb2.BUDGET_WINDOW_MONTHLY,
        enforcement=enforcement,
        limit_micros=limit_micros,
        webhook_url=webhook_url,
    )


# --- the webhook receiver -------------------------------------------------------------------


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    verified: bool | None


@dataclass
class Receiver:
    """A real HTTP server taking webhooks: answers `statuses` in turn (then 200), refuses bad signatures."""

    url: str = ""
    statuses: list[int] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    # The receiver's clock for `verify`, in unix seconds; None: the wall clock.
    now_s: int | None = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        signature = request.headers.get(SIGNATURE_HEADER)
        verified = None
        if signature is not None:
            now = int(time.time()) if self.now_s is None else self.now_s
            verified = verify(SECRET, signature, body, now=now)
        self.received.append(Received(dict(request.headers), body, verified))
        if verified is False:
            return web.Response(status=401, text="bad signature")
        status = self.statuses.pop(0) if self.statuses else 200
        return web.Response(status=status, text="secret-response-body")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/budget", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    state.url = f"http://{host}:{port}/hooks/budget"
    try:
        yield state
    finally:
        await runner.cleanup()


async def statuses(center: AlertCenter, tenant: str) -> list[tuple[int, str, int, str]]:
    alerts, _ = await center.list_alerts(tenant)
    return sorted((a.threshold_percent, a.delivery_status, a.delivery_attempts, a.last_error) for a in alerts)


# --- firing ---------------------------------------------------------------------------------


async def test_thresholds_fire_once_each_as_spend_grows(
    database: Database, centers: list[AlertCenter], monkeypatch: pytest.MonkeyPatch
) -> None:
    center = await AlertCenter.open(database, secret=SECRET)
    centers.append(center)
    tenant = unique("acme")
    b = budget(tenant)
    t = now_ms()
    steps = [(790_000, []), (850_000, [80]), (950_000, [90]), (1_000_000, [100]), (1_300_000, [])]
    for spent, expected in steps:
        assert await center.observe(b, window_key="2026-11", spent_micros=spent, now_ms=t) == expected
    alerts, token = await center.list_alerts(tenant)
    assert token == ""
    assert [(a.threshold_percent, a.spent_micros, a.limit_micros) for a in alerts] == [
        (100, 1_000_000, LIMIT),
        (90, 950_000, LIMIT),
        (80, 850_000, LIMIT),
    ]
    assert {(a.budget_id, a.tenant_id, a.window_key, a.delivery_status) for a in alerts} == {
        (b.budget_id, tenant, "2026-11", "none")
    }
    assert alerts[0].fired_at.ToMilliseconds() == t

    # Everything reached has fired: observing again does not touch the database at all.
    async def no_sql(*args: Any) -> int:
        raise AssertionError("observe went to the database")

    monkeypatch.setattr(database, "execute", no_sql)
    assert await center.observe(b, window_key="2026-11", spent_micros=2_000_000, now_ms=t) == []


async def test_thresholds_use_exact_integer_math(database: Database, centers: list[AlertCenter]) -> None:
    center = await AlertCenter.open(database, secret=SECRET)
    centers.append(center)
    # 80 % of 999 micros is 799.2: 799 has not reached it, 800 has.
    b = budget(unique("acme"), limit_micros=999)
    assert await center.observe(b, window_key="w", spent_micros=799, now_ms=1) == []
    assert await center.observe(b, window_key="w", spent_micros=800, now_ms=2) == [80]
    # No limit, no percentages.
    zero = budget(unique("acme"), limit_micros=0)
    assert await center.observe(zero, window_key="w", spent_micros=5, now_ms=3) == []


async def test_a_jump_fires_all_three_and_a_new_window_fires_again(
    database: Database, centers: list[AlertCenter]
) -> None:
    center = await AlertCenter.open(database, secret=SECRET)
    centers.append(center)
    tenant = unique("acme")
    b = budget(tenant)
    assert await center.observe(b, window_key="2026-11", spent_micros=0, now_ms=1) == []
    assert await center.observe(b, window_key="2026-11", spent_micros=LIMIT, now_ms=2) == [80, 90, 100]
    assert await center.observe(b, window_key="2026-11", spent_micros=LIMIT, now_ms=3) == []
    assert await center.observe(b, window_key="2026-12", spent_micros=850_000, now_ms=4) == [80]
    # A late commit for the old window does not fire it again, even after the cache moved on.
    assert await center.observe(b, window_key="2026-11", spent_micros=LIMIT * 2, now_ms=5) == []
    # Nor does a fresh replica that has never seen this budget.
    other = await AlertCenter.open(database, secret=SECRET)
    centers.append(other)
    assert await other.observe(b, window_key="2026-12", spent_micros=900_000, now_ms=6) == [90]
    alerts, _ = await center.list_alerts(tenant)
    assert sorted((a.window_key, a.threshold_percent) for a in alerts) == [
        ("2026-11", 80),
        ("2026-11", 90),
        ("2026-11", 100),
        ("2026-12", 80),
        ("2026-12", 90),
    ]


async def test_two_centers_on_one_database_fire_each_threshold_once(
    database_url: str, centers: list[AlertCenter], receiver: Receiver
) -> None:
    # Two replicas: each its own connection (pool) and its own center.
    db_a, db_b = await open_database(database_url), await open_database(database_url)
    try:
        a = await AlertCenter.open(db_a, secret=SECRET)
        b = await AlertCenter.open(db_b, secret=SECRET)
        centers.extend([a, b])
        tenant = unique("acme")
        bud = budget(tenant, webhook_url=receiver.url)
        spends = [LIMIT * pct // 100 for pct in range(75, 106)]
        results = await asyncio.gather(
            *(
                center.observe(bud, window_key="2026-11", spent_micros=spent, now_ms=1_000)
                for spent in spends
                for center in (a, b)
            )
        )
        fired = sorted(t for result in results for t in result)
        assert fired == list(THRESHOLDS)
        alerts, _ = await a.list_alerts(tenant)
        assert sorted(x.threshold_percent for x in alerts) == list(THRESHOLDS)
        # Both replicas deliver at once: each alert is still sent once.
        sent = await asyncio.gather(a.deliver_due(now_ms=2_000), b.deliver_due(now_ms=2_000))
        assert sum(sent) == 3
        assert len(receiver.received) == 3
        assert len({r.headers[ALERT_ID_HEADER] for r in receiver.received}) == 3
    finally:
        await db_a.close()
        await db_b.close()


# --- delivery -------------------------------------------------------------------------------


async def test_webhooks_are_signed_and_a_tampered_body_is_refused(
    database: Database, centers: list[AlertCenter], receiver: Receiver
) -> None:
    center = await AlertCenter.open(database, secret=SECRET)
    centers.append(center)
    tenant = unique("acme")
    b = budget(tenant, webhook_url=receiver.url, enforcement=ledger_pb2.BUDGET_ENFORCEMENT_SOFT)
    t = now_ms()
    receiver.now_s = t // 1000
    assert await center.observe(b, window_key="2026-11", spent_micros=850_000, now_ms=t) == [80]
    assert await center.deliver_due(now_ms=t) == 1

    [got] = receiver.received
    assert got.verified is True
    assert got.headers["Content-Type"] == "application/json"
    payload = json.loads(got.body)
    [alert] = (await center.list_alerts(tenant))[0]
    assert payload == {
        "type": "budget.threshold",
        "alert_id": got.headers[ALERT_ID_HEADER],
        "budget_id": b.budget_id,
        "tenant_id": tenant,
        "window": "2026-11",
        "threshold_percent": 80,
        "spent_micros": 850_000,
        "limit_micros": LIMIT,
        "spent_usd": "0.850000",
        "limit_usd": "1.000000",
        "enforcement": "soft",
        "fired_at": payload["fired_at"],
    }
    assert datetime.fromisoformat(payload["fired_at"]) == datetime.fromtimestamp(t // 1000, tz=UTC).replace(
        microsecond=(t % 1000) * 1000
    )
    assert payload["fired_at"].endswith("Z")
    assert (alert.delivery_status, alert.delivery_attempts, alert.last_error) == ("delivered", 1, "")
    assert SECRET.decode() not in got.body.decode() and "webhook" not in got.body.decode()

    # A body changed in transit does not verify, whatever else is replayed with it.
    tampered = got.body.replace(b'"spent_micros":850000', b'"spent_micros":1')
    assert tampered != got.body
    headers = {SIGNATURE_HEADER: got.headers[SIGNATURE_HEADER], "Content-Type": "application/json"}
    async with httpx.AsyncClient() as client:
        refused = await client.post(receiver.url, content=tampered, headers=headers)
        assert refused.status_code == 401
        # The untouched request replayed ten minutes later is stale.
        receiver.now_s = t // 1000 + 600
        replayed = await client.post(receiver.url, content=got.body, headers=headers)
        assert replayed.status_code == 401
    assert [r.verified for r in receiver.received] == [True, False, False]


async def test_a_failing_receiver_is_retried_until_it_accepts(
    database: Database, centers: list[AlertCenter], receiver: Receiver
) -> None:
    center = await AlertCenter.open(database, secret=SECRET)
    centers.append(center)
    tenant = unique("acme")
    b = budget(tenant, webhook_url=receiver.url)
    t = now_ms()
    receiver.now_s = t // 1000
    receiver.statuses = [500, 500]
    assert await center.observe(b, window_key="2026-11", spent_micros=800_000, now_ms=t) == [80]
    assert await center.deliver_due(now_ms=t) == 1
    assert await statuses(center, tenant) == [(80, "pending", 1, "HTTP 500")]

    # First retry after 1 s (+ at most 10 % jitter), never before.
    assert await center.deliver_due(now_ms=t + 999) == 0
    assert await center.deliver_due(now_ms=t + 1_100) == 1
    assert await statuses(center, tenant) == [(80, "pending", 2, "HTTP 500")]
    # Second retry after 5 s.
    assert await center.deliver_due(now_ms=t + 1_100 + 4_999) == 0
    assert await center.deliver_due(now_ms=t + 1_100 + 5_500) == 1
    assert await statuses(center, tenant) == [(80, "delivered", 3, "")]
    assert await center.deliver_due(now_ms=t + 3_600_000) == 0

    # The same alert, the same bytes, each time (receivers dedupe by the id), each signed.
    assert len(receiver.received) == 3
    assert len({r.headers[ALERT_ID_HEADER] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1
    assert all(r.verified for r in receiver.received)


async def test_an_always_failing_receiver_ends_failed_with_the_reason(
    database: Database, centers: list[AlertCenter], receiver: Receiver
) -> None:
    center = await AlertCenter.open(database, secret=SECRET, retry_delays_s=(1, 2))
    centers.append(center)
    tenant = unique("acme")
    b = budget(tenant, webhook_url=receiver.url)
    t = now_ms()
    receiver.now_s = t // 1000
    receiver.statuses = [500] * 10
    assert await center.observe(b, window_key="2026-11", spent_micros=800_000, now_ms=t) == [80]
    assert await center.deliver_due(now_ms=t) == 1
    assert await center.deliver_due(now_ms=t + 1_100) == 1
    assert await statuses(center, tenant) == [(80, "pending", 2, "HTTP 500")]
    assert await center.deliver_due(now_ms=t + 1_100 + 2_200) == 1
    [row] = await statuses(center, tenant)
    assert row == (80, "failed", 3, "HTTP 500")
    assert "secret-response-body" not in row[3] and SECRET.decode() not in row[3]
    assert await center.deliver_due(now_ms=t + 86_400_000) == 0
    assert len(receiver.received) == 3


async def test_an_unreachable_receiver_records_the_error_class(
    database: Database, centers: list[AlertCenter]
) -> None:
    center = await AlertCenter.open(database, secret=SECRET, retry_delays_s=(), timeout_s=2.0)
    centers.append(center)
    tenant = unique("acme")
    url = f"http://127.0.0.1:{free_port()}/hook?token=secret-in-url"
    b = budget(tenant, webhook_url=url)
    assert await center.observe(b, window_key="d", spent_micros=LIMIT, now_ms=10) == [80, 90, 100]
    assert await center.deliver_due(now_ms=10) == 3
    assert await statuses(center, tenant) == [(t, "failed", 1, "ConnectError") for t in THRESHOLDS]


async def test_delivery_survives_a_restart(database_url: str, receiver: Receiver) -> None:
    tenant = unique("acme")
    b = budget(tenant, webhook_url=receiver.url)
    db = await open_database(database_url)
    try:
        first = await AlertCenter.open(db, secret=SECRET)
        assert await first.observe(b, window_key="2026-11", spent_micros=900_000, now_ms=now_ms()) == [80, 90]
        await first.aclose()  # stopped before it delivered anything
    finally:
        await db.close()
    assert receiver.received == []

    db = await open_database(database_url)
    second = await AlertCenter.open(db, secret=SECRET)
    try:
        await second.start()
        deadline = asyncio.get_running_loop().time() + 10.0
        while await statuses(second, tenant) != [(80, "delivered", 1, ""), (90, "delivered", 1, "")]:
            assert asyncio.get_running_loop().time() < deadline, "pending alerts were not delivered"
            await asyncio.sleep(0.02)
        assert sorted(json.loads(r.body)["threshold_percent"] for r in receiver.received) == [80, 90]
        assert all(r.verified for r in receiver.received)
        # The running loop also sends what fires from now on, without waiting for a poll.
        receiver.received.clear()
        assert await second.observe(b, window_key="2026-11", spent_micros=LIMIT, now_ms=now_ms()) == [100]
        while not receiver.received:
            assert asyncio.get_running_loop().time() < deadline, "a new alert was not delivered"
            await asyncio.sleep(0.02)
    finally:
        await second.aclose()
        await db.close()


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("test", stream=stream)
    yield stream
    reset_logging()


async def test_without_a_secret_webhooks_go_unsigned_with_one_warning(
    database: Database, centers: list[AlertCenter], receiver: Receiver, log_stream: io.StringIO
) -> None:
    center = await AlertCenter.open(database, secret=None)
    centers.append(center)
    await center.start()
    await center.start()
    tenant = unique("acme")
    b = budget(tenant, webhook_url=receiver.url)
    assert await center.observe(b, window_key="w", spent_micros=LIMIT, now_ms=now_ms()) == [80, 90, 100]
    deadline = asyncio.get_running_loop().time() + 10.0
    while len(receiver.received) < 3:
        assert asyncio.get_running_loop().time() < deadline, "unsigned alerts were not delivered"
        await asyncio.sleep(0.02)
    assert [r.verified for r in receiver.received] == [None, None, None]
    assert all(SIGNATURE_HEADER not in r.headers for r in receiver.received)
    events = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.strip()]
    assert [e["event"] for e in events].count("alert_webhooks_unsigned") == 1
    assert "budget_alert_fired" in [e["event"] for e in events]


# --- listing --------------------------------------------------------------------------------


async def test_list_alerts_filters_by_tenant_and_pages(
    database: Database, centers: list[AlertCenter]
) -> None:
    center = await AlertCenter.open(database, secret=SECRET)
    centers.append(center)
    mine, theirs = unique("acme"), unique("globex")
    for tenant in (mine, theirs):
        b = budget(tenant)
        await center.observe(b, window_key="2026-10", spent_micros=LIMIT, now_ms=1_000)
        await center.observe(b, window_key="2026-11", spent_micros=900_000, now_ms=2_000)

    seen: list[ledger_pb2.BudgetAlert] = []
    token = ""
    pages = 0
    while True:
        page, token = await center.list_alerts(mine, page_size=2, page_token=token)
        seen.extend(page)
        pages += 1
        if not token:
            break
    assert pages == 3
    assert {a.tenant_id for a in seen} == {mine}
    assert [(a.window_key, a.threshold_percent) for a in seen] == [
        ("2026-11", 90),
        ("2026-11", 80),
        ("2026-10", 100),
        ("2026-10", 90),
        ("2026-10", 80),
    ]
    everyone, _ = await center.list_alerts("", page_size=1000)
    assert {mine, theirs} <= {a.tenant_id for a in everyone}
    with pytest.raises(SwitchyardError):
        await center.list_alerts(mine, page_token="not-a-token")
    with pytest.raises(SwitchyardError):
        await center.list_alerts(mine, page_size=-1)


# --- signatures -----------------------------------------------------------------------------


def test_sign_is_hmac_sha256_over_timestamp_and_body() -> None:
    body = b'{"a":1}'
    expected = hmac.new(SECRET, b"1700000000." + body, hashlib.sha256).hexdigest()
    assert sign(SECRET, 1_700_000_000, body) == f"t=1700000000,v1={expected}"


@pytest.mark.parametrize(
    ("header", "now", "ok"),
    [
        (sign(SECRET, 1_000, b"x"), 1_000, True),
        (sign(SECRET, 1_000, b"x"), 1_300, True),
        (sign(SECRET, 1_000, b"x"), 1_301, False),  # stale
        (sign(SECRET, 1_000, b"x"), 699, False),  # from the future
        (sign(b"another secret", 1_000, b"x"), 1_000, False),
        (sign(SECRET, 1_000, b"y"), 1_000, False),
        (sign(SECRET, 1_000, b"x") + ",v1=" + "0" * 64, 1_000, True),  # one of several
        ("t=1000,v1=" + "0" * 64 + "," + sign(SECRET, 1_000, b"x").split(",")[1], 1_000, True),
        ("v1=" + sign(SECRET, 1_000, b"x").split("v1=")[1], 1_000, False),  # no timestamp
        ("t=1000", 1_000, False),
        ("t=abc,v1=00", 1_000, False),
        ("garbage", 1_000, False),
        ("", 1_000, False),
        ("t=1000,v1=ünïcode", 1_000, False),
    ],
)
def test_verify(header: str, now: int, ok: bool) -> None:
    assert verify(SECRET, header, b"x", now=now) is ok
