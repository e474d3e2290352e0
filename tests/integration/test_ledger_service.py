"""The CostLedgerService end to end: a real `switchyard serve ledger` process over real gRPC.

Each test runs against two deployments of the ledger (a module-scoped process each):

* `sqlite-memory`: the local default, a SQLite file in a private state directory and the
  in-memory budget store;
* `postgres-redis`: a cluster's shape, a fresh PostgreSQL database and a real Redis for the
  budget counters (skipped locally without a server, failed under CI).

Tests share a process, so each one works on its own tenant (and budget ids) and asserts only
about those. Two tests start their own: the restart test (stopped by SIGTERM, started again on
the same state) and the sharing test (two replicas on one PostgreSQL and one Redis). Money is
checked against prices worked out by hand from the default catalog (openai/gpt-4o-mini: $0.15
input, $0.075 cached input, $0.60 output per 1M tokens). The sweep runs
every 0.2 s so expiry can be watched in about a second.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import hmac
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error
from switchyard.common.sql import open_database
from switchyard.edge.outbox import CommitOutbox
from switchyard.ledger.alerts import ALERT_ID_HEADER, SIGNATURE_HEADER, verify
from switchyard.v1 import common_pb2, gateway_pb2, ledger_pb2, ledger_pb2_grpc
from tests.support.postgres import PostgresUnavailable, fresh_postgres_database, skip_or_fail
from tests.support.service_process import running_service

MODEL = "openai/gpt-4o-mini"
SECRET = "whsec-ledger-e2e-0123456789abcdef"
ERASURE_KEY = "erasure-key-ledger-e2e-0123456789"
SWEEP_S = 0.2
BACKENDS = ("sqlite-memory", "postgres-redis")
# One micro-USD more than the budget counters hold exactly (2**53 - 1, about $9e9).
TOO_MUCH = 2**53


# --- processes --------------------------------------------------------------------------------


@dataclass
class LedgerProcess:
    """A running ledger: its stub, its environment and where its output goes."""

    stub: ledger_pb2_grpc.CostLedgerServiceStub
    env: dict[str, str]
    log_path: Path

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


def ledger_env(state_dir: Path, *, database_url: str = "", redis_url: str = "") -> dict[str, str]:
    """What a ledger child runs with. The supervisor starts from `os.environ`, so every setting
    that could leak in from the developer's shell is pinned here ("" means unset)."""
    return {
        "SWITCHYARD_STATE_DIR": str(state_dir),
        # "": the SQLite file in the state directory.
        "DATABASE_URL": database_url,
        # "": the in-memory budget store.
        "REDIS_URL": redis_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "SWITCHYARD_CATALOG": "",
        "SWITCHYARD_LOG_FORMAT": "json",
        "SWITCHYARD_LOG_LEVEL": "INFO",
        "SWITCHYARD_SHUTDOWN_GRACE_S": "2",
        "SWITCHYARD_LEDGER_SWEEP_S": str(SWEEP_S),
        # Expiry at once after start (the grace is tested in test_ledger_settlement.py).
        "SWITCHYARD_LEDGER_EXPIRE_AFTER_START_S": "0",
        "SWITCHYARD_WEBHOOK_SECRET": SECRET,
        "SWITCHYARD_LEDGER_ERASURE_KEY": ERASURE_KEY,
        "SWITCHYARD_LEASE_TTL_S": "10",
        "SWITCHYARD_GENERATE_TIMEOUT_S": "20",
    }


@asynccontextmanager
async def running_ledger(env: dict[str, str], log_path: Path) -> AsyncIterator[LedgerProcess]:
    """`switchyard serve ledger` on a free port, ready; stopped with SIGTERM (via the supervisor)
    when the block ends."""
    async with running_service("ledger", env, log_path) as channel:
        yield LedgerProcess(ledger_pb2_grpc.CostLedgerServiceStub(channel), env, log_path)


@pytest.fixture(scope="module")
async def postgres_url() -> AsyncIterator[str]:
    """One fresh PostgreSQL database for this module's ledgers."""
    try:
        async with fresh_postgres_database("switchyard_ledger_svc") as url:
            yield url
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))


def _backend_env(request: pytest.FixtureRequest, backend: str, state_dir: Path) -> dict[str, str]:
    # Synchronous callers only: getfixturevalue pulls the async fixtures for the shared backend.
    if backend == "sqlite-memory":
        return ledger_env(state_dir)
    return ledger_env(
        state_dir,
        database_url=request.getfixturevalue("postgres_url"),
        redis_url=request.getfixturevalue("redis_url"),
    )


@pytest.fixture(scope="module", params=BACKENDS)
def module_env(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return _backend_env(request, str(request.param), tmp_path_factory.mktemp("ledger-state"))


@pytest.fixture(scope="module")
async def ledger(
    module_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[LedgerProcess]:
    """The ledger process the module's tests share (one per backend)."""
    log_path = tmp_path_factory.mktemp("ledger-log") / "ledger.log"
    async with running_ledger(module_env, log_path) as process:
        yield process


# --- helpers ----------------------------------------------------------------------------------


def new_tenant() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def new_id(prefix: str = "req") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def usage_record(
    tenant: str,
    *,
    request_id: str = "",
    input_tokens: int = 0,
    output_tokens: int = 0,
    cached_input_tokens: int = 0,
    end_user: str = "",
    model: str = MODEL,
    estimated_input_tokens: int = 0,
    reported_cost_micros: int = 0,
    estimated_cost_micros: int = 0,
) -> ledger_pb2.UsageRecord:
    """A finished request on `model` for `tenant`, finished now."""
    record = ledger_pb2.UsageRecord(
        request_id=request_id or new_id(),
        scope=ledger_pb2.BudgetScope(tenant_id=tenant, end_user=end_user),
        model=model,
        provider=model.split("/", 1)[0],
        usage=common_pb2.Usage(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
        ),
        cost_micros=reported_cost_micros,
        latency_ms=120,
        status="ok",
        attempts=1,
        estimated_input_tokens=estimated_input_tokens,
        estimated_cost_micros=estimated_cost_micros,
    )
    record.finished_at.GetCurrentTime()
    return record


def budget(
    tenant: str,
    limit_micros: int,
    *,
    suffix: str = "daily",
    window: ledger_pb2.BudgetWindow.ValueType = ledger_pb2.BUDGET_WINDOW_DAILY,
    enforcement: ledger_pb2.BudgetEnforcement.ValueType = ledger_pb2.BUDGET_ENFORCEMENT_HARD,
    webhook_url: str = "",
    model: str = "",
) -> ledger_pb2.Budget:
    return ledger_pb2.Budget(
        budget_id=f"{tenant}:{suffix}",
        scope=ledger_pb2.BudgetScope(tenant_id=tenant, model=model),
        window=window,
        enforcement=enforcement,
        limit_micros=limit_micros,
        webhook_url=webhook_url,
    )


async def set_budget(
    stub: ledger_pb2_grpc.CostLedgerServiceStub, wanted: ledger_pb2.Budget
) -> ledger_pb2.Budget:
    reply: ledger_pb2.SetBudgetResponse = await stub.SetBudget(
        ledger_pb2.SetBudgetRequest(budget=wanted, actor="ops@example.com"), timeout=10
    )
    return reply.budget


async def list_budgets(stub: ledger_pb2_grpc.CostLedgerServiceStub, tenant: str) -> list[ledger_pb2.Budget]:
    listed = await stub.ListBudgets(ledger_pb2.ListBudgetsRequest(tenant_id=tenant), timeout=10)
    return list(listed.budgets)


async def budget_state(
    stub: ledger_pb2_grpc.CostLedgerServiceStub, tenant: str, budget_id: str
) -> ledger_pb2.Budget:
    (found,) = [b for b in await list_budgets(stub, tenant) if b.budget_id == budget_id]
    return found


async def usage(stub: ledger_pb2_grpc.CostLedgerServiceStub, tenant: str) -> gateway_pb2.UsageTotals:
    """The tenant's totals for the current UTC month."""
    reply: gateway_pb2.GetUsageResponse = await stub.GetUsage(
        gateway_pb2.GetUsageRequest(tenant_id=tenant), timeout=10
    )
    return reply.totals


async def rpc_error(call: Awaitable[object]) -> SwitchyardError:
    """The ledger's refusal of `call`, read back as the caller sees it."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return from_rpc_error(caught.value)


async def eventually(check: Callable[[], Awaitable[bool]], *, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def export_rows(
    stub: ledger_pb2_grpc.CostLedgerServiceStub, tenant: str, end_user: str = ""
) -> list[dict[str, str]]:
    pieces = [
        piece.csv_chunk
        async for piece in stub.ExportUsage(
            ledger_pb2.ExportUsageRequest(
                tenant_id=tenant, end_user=end_user, actor="dpo@example.com" if end_user else ""
            ),
            timeout=10,
        )
    ]
    return list(csv.DictReader(io.StringIO(b"".join(pieces).decode("utf-8"))))


# --- 1. exactly once ------------------------------------------------------------------------


async def test_a_commit_is_charged_once_at_the_catalog_price(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    # 1034 uncached input x $0.15 + 200 cached x $0.075 + 567 output x $0.60, per 1M tokens:
    # 155.1 + 15 + 340.2 = 510.3 micro-USD, rounded half up once.
    first = usage_record(
        tenant, input_tokens=1234, cached_input_tokens=200, output_tokens=567, reported_cost_micros=999
    )
    charged = 510

    reply = await stub.Commit(ledger_pb2.CommitRequest(record=first), timeout=10)
    assert (reply.duplicate, reply.charged_micros, reply.request_id) == (False, charged, first.request_id)
    assert reply.month_tokens == 1234 + 567

    again = await stub.Commit(ledger_pb2.CommitRequest(record=first), timeout=10)
    assert again.duplicate is True
    assert again.month_tokens == 1234 + 567  # nothing added by the repeat

    totals = await usage(stub, tenant)
    assert (totals.requests, totals.cost_micros, totals.input_tokens, totals.output_tokens) == (
        1,
        charged,
        1234,
        567,
    )

    # A batch an edge's outbox sends: one record twice, and a second record after it.
    second = usage_record(tenant, input_tokens=1000, output_tokens=500)  # 150 + 300
    third = usage_record(tenant, input_tokens=2001)  # 300.15 -> 300
    batch = await stub.CommitMany(
        ledger_pb2.CommitManyRequest(
            commits=[
                ledger_pb2.CommitRequest(record=second),
                ledger_pb2.CommitRequest(record=second),
                ledger_pb2.CommitRequest(record=first),
                ledger_pb2.CommitRequest(record=third),
            ]
        ),
        timeout=10,
    )
    results = [(r.request_id, r.duplicate, r.charged_micros) for r in batch.results]
    assert results == [
        (second.request_id, False, 450),
        (second.request_id, True, 450),
        (first.request_id, True, charged),
        (third.request_id, False, 300),
    ]
    # The month's tokens grow with each new request of the batch, the earlier ones included.
    assert batch.results[0].month_tokens == 1801 + 1500
    assert batch.results[3].month_tokens == 1801 + 1500 + 2001
    following = await stub.Commit(
        ledger_pb2.CommitRequest(record=usage_record(tenant, input_tokens=10)), timeout=10
    )
    assert following.month_tokens == 1801 + 1500 + 2001 + 10

    totals = await usage(stub, tenant)
    assert (totals.requests, totals.cost_micros) == (4, charged + 450 + 300 + 2)


async def test_a_commit_the_ledger_cannot_store_is_refused_alone_and_set_aside_by_the_outbox(
    ledger: LedgerProcess, tmp_path: Path
) -> None:
    """A record with a NUL in a stored string (PostgreSQL text cannot hold one) is refused
    INVALID_ARGUMENT before anything is written. An edge's outbox that sends it in a batch sends
    the batch again one commit at a time: the others are recorded and charged, the refused one
    is kept aside in its table and never sent again."""
    tenant = new_tenant()
    poisoned = usage_record(tenant, input_tokens=1000, end_user="bob\x00")
    caught = await rpc_error(ledger.stub.Commit(ledger_pb2.CommitRequest(record=poisoned), timeout=10))
    assert (caught.code, caught.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert caught.metadata["field"] == "record.scope.end_user"
    assert "bob" not in caught.message

    database = await open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    outbox = await CommitOutbox.open(database, ledger.stub, "edge-1", call_timeout_s=5.0)
    good = [usage_record(tenant, input_tokens=1000) for _ in range(4)]  # 150 micro-USD each
    try:
        for record in (*good[:2], poisoned, *good[2:]):
            outbox.add(ledger_pb2.CommitRequest(record=record))
        outbox.start()
        await outbox.flush(timeout_s=10)
        totals = await usage(ledger.stub, tenant)
        assert (totals.requests, totals.cost_micros) == (4, 4 * 150)
        assert (outbox.sent, outbox.refused) == (4, 1)
        left = await database.fetch_all("SELECT request_id, attempts FROM commit_outbox")
        assert [(row["request_id"], row["attempts"]) for row in left] == [(poisoned.request_id, -1)]
    finally:
        await outbox.aclose()
        await database.close()


# --- 2. reservations --------------------------------------------------------------------------


async def test_a_crashed_reservation_expires_and_frees_the_budget(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    limit = 50_000
    created = await set_budget(stub, budget(tenant, limit))
    scope = ledger_pb2.BudgetScope(tenant_id=tenant)
    sweeps_before = ledger.logs().count('"holds_expired"')

    held = await stub.Reserve(
        ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=limit, ttl_seconds=1),
        timeout=10,
    )
    assert held.reservation_id
    assert 0 < held.expires_at.ToMilliseconds() - time.time() * 1000 <= 1_500
    state = await budget_state(stub, tenant, created.budget_id)
    assert (state.spent_micros, state.held_micros) == (0, limit)

    error = await rpc_error(
        stub.Reserve(ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=1), timeout=10)
    )
    assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason is Reason.BUDGET_EXCEEDED
    assert error.metadata["budget_id"] == created.budget_id
    assert error.metadata["spent_micros"] == "0"
    assert error.metadata["held_micros"] == str(limit)
    assert error.metadata["requested_micros"] == "1"
    assert error.metadata["limit_micros"] == str(limit)

    # The holder "crashes": nobody commits or releases. The sweep frees the hold after its ttl.
    await asyncio.sleep(1.5)
    await eventually(lambda: _swept_since(ledger, sweeps_before))
    state = await budget_state(stub, tenant, created.budget_id)
    assert (state.spent_micros, state.held_micros) == (0, 0)
    again = await stub.Reserve(
        ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=limit, ttl_seconds=60),
        timeout=10,
    )
    released = await stub.Release(ledger_pb2.ReleaseRequest(reservation_id=again.reservation_id), timeout=10)
    assert released.released is True
    assert (await budget_state(stub, tenant, created.budget_id)).held_micros == 0
    # Releasing twice, or an expired hold, frees nothing more.
    assert (
        await stub.Release(ledger_pb2.ReleaseRequest(reservation_id=again.reservation_id), timeout=10)
    ).released is False
    assert (
        await stub.Release(ledger_pb2.ReleaseRequest(reservation_id=held.reservation_id), timeout=10)
    ).released is False


async def _swept_since(process: LedgerProcess, sweeps_before: int) -> bool:
    """Whether the sweeper logged freeing holds since it had logged it `sweeps_before` times."""
    return process.logs().count('"holds_expired"') > sweeps_before


async def test_a_commit_settles_its_reservation_at_the_actual_cost(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    created = await set_budget(stub, budget(tenant, 10_000))
    scope = ledger_pb2.BudgetScope(tenant_id=tenant)
    record = usage_record(tenant, input_tokens=1000, output_tokens=500)  # 450 micro-USD

    held = await stub.Reserve(
        ledger_pb2.ReserveRequest(request_id=record.request_id, scope=scope, amount_micros=4_000), timeout=10
    )
    assert (await budget_state(stub, tenant, created.budget_id)).held_micros == 4_000
    reply = await stub.Commit(
        ledger_pb2.CommitRequest(reservation_id=held.reservation_id, record=record), timeout=10
    )
    assert reply.charged_micros == 450
    state = await budget_state(stub, tenant, created.budget_id)
    assert (state.spent_micros, state.held_micros) == (450, 0)
    # The freed rest is available again: exactly the limit less what was spent.
    fits = await stub.Reserve(
        ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=10_000 - 450), timeout=10
    )
    error = await rpc_error(
        stub.Reserve(ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=1), timeout=10)
    )
    assert error.reason is Reason.BUDGET_EXCEEDED and error.metadata["spent_micros"] == "450"
    assert (
        await stub.Release(ledger_pb2.ReleaseRequest(reservation_id=fits.reservation_id), timeout=10)
    ).released


# --- 3. alerts --------------------------------------------------------------------------------


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    verified: bool


@dataclass
class WebhookReceiver:
    url: str = ""
    deliveries: list[Delivery] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        header = request.headers.get(SIGNATURE_HEADER, "")
        verified = verify(SECRET.encode(), header, body, now=int(time.time()))
        self.deliveries.append(Delivery(dict(request.headers), body, verified))
        return web.Response(status=200 if verified else 401)


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    """A real HTTP server on 127.0.0.1 (a free port) that checks each webhook's signature."""
    state = WebhookReceiver()
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


async def test_each_threshold_alerts_once_with_a_signed_webhook(
    ledger: LedgerProcess, receiver: WebhookReceiver
) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    created = await set_budget(
        stub,
        budget(
            tenant,
            15_000,
            suffix="monthly",
            window=ledger_pb2.BUDGET_WINDOW_MONTHLY,
            enforcement=ledger_pb2.BUDGET_ENFORCEMENT_SOFT,
            webhook_url=receiver.url,
        ),
    )

    async def commit(input_tokens: int) -> None:
        # input tokens x $0.15 per 1M: 10,000 tokens are 1,500 micro-USD, 10 % of the limit.
        record = usage_record(tenant, input_tokens=input_tokens)
        await stub.Commit(ledger_pb2.CommitRequest(record=record), timeout=10)

    await commit(70_000)  # 70 %: nothing
    await asyncio.sleep(0.3)
    assert receiver.deliveries == []
    for tokens, deliveries in ((10_000, 1), (10_000, 2), (10_000, 3)):  # 80 %, 90 %, 100 %
        await commit(tokens)
        await eventually(functools.partial(_at_least, receiver, deliveries))
    for _ in range(3):  # past 100 %: no threshold left to cross
        await commit(10_000)

    async def all_delivered() -> bool:
        listed = await stub.ListAlerts(ledger_pb2.ListAlertsRequest(tenant_id=tenant), timeout=10)
        return len(listed.alerts) == 3 and all(a.delivery_status == "delivered" for a in listed.alerts)

    await eventually(all_delivered)
    await asyncio.sleep(1.2)  # a pass of the delivery loop (1 s) would show any extra delivery
    assert len(receiver.deliveries) == 3
    assert all(d.verified for d in receiver.deliveries)
    bodies = [json.loads(d.body) for d in receiver.deliveries]
    assert [(b["threshold_percent"], b["spent_micros"]) for b in bodies] == [
        (80, 12_000),
        (90, 13_500),
        (100, 15_000),
    ]
    assert {b["budget_id"] for b in bodies} == {created.budget_id}
    assert {b["tenant_id"] for b in bodies} == {tenant}
    assert len({d.headers[ALERT_ID_HEADER] for d in receiver.deliveries}) == 3
    assert [d.headers[ALERT_ID_HEADER] for d in receiver.deliveries] == [b["alert_id"] for b in bodies]

    listed = await stub.ListAlerts(ledger_pb2.ListAlertsRequest(tenant_id=tenant), timeout=10)
    assert sorted((a.threshold_percent, a.delivery_status, a.delivery_attempts) for a in listed.alerts) == [
        (80, "delivered", 1),
        (90, "delivered", 1),
        (100, "delivered", 1),
    ]
    assert all(a.budget_id == created.budget_id and a.limit_micros == 15_000 for a in listed.alerts)
    state = await budget_state(stub, tenant, created.budget_id)
    assert state.spent_micros == 15_000 + 3 * 1_500


async def _at_least(receiver: WebhookReceiver, count: int) -> bool:
    return len(receiver.deliveries) >= count


# --- 4. restart -------------------------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def restart_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    state = tmp_path / "state"
    state.mkdir()
    return _backend_env(request, str(request.param), state)


async def test_a_restarted_ledger_loses_nothing_and_keeps_enforcing(
    restart_env: dict[str, str], tmp_path: Path
) -> None:
    tenant = new_tenant()
    limit = 10_000
    records = [usage_record(tenant, input_tokens=1000, output_tokens=500) for _ in range(5)]  # 450 each
    spent = 5 * 450
    log_path = tmp_path / "ledger.log"

    async with running_ledger(restart_env, log_path) as first:
        created = await set_budget(first.stub, budget(tenant, limit))
        # A budget on the model: the records name the model that answered, not a scope model.
        on_model = await set_budget(first.stub, budget(tenant, 2 * limit, suffix="model", model=MODEL))
        batch = await first.stub.CommitMany(
            ledger_pb2.CommitManyRequest(commits=[ledger_pb2.CommitRequest(record=r) for r in records]),
            timeout=10,
        )
        assert [r.duplicate for r in batch.results] == [False] * 5
        assert (await budget_state(first.stub, tenant, created.budget_id)).spent_micros == spent
        assert (await budget_state(first.stub, tenant, on_model.budget_id)).spent_micros == spent
    if not restart_env["DATABASE_URL"]:
        assert (Path(restart_env["SWITCHYARD_STATE_DIR"]) / "switchyard.db").is_file()

    async with running_ledger(restart_env, log_path) as second:
        stub = second.stub
        totals = await usage(stub, tenant)
        assert (totals.requests, totals.cost_micros) == (5, spent)
        # The in-memory store rebuilt the counter from the rows; Redis kept it (and must not be
        # given the rows' spend a second time).
        state = await budget_state(stub, tenant, created.budget_id)
        assert (state.spent_micros, state.held_micros, state.version) == (spent, 0, 1)
        assert (await budget_state(stub, tenant, on_model.budget_id)).spent_micros == spent
        # Still a hard budget: what is left fits, a micro-USD more does not.
        scope = ledger_pb2.BudgetScope(tenant_id=tenant)
        error = await rpc_error(
            stub.Reserve(
                ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=limit - spent + 1),
                timeout=10,
            )
        )
        assert error.reason is Reason.BUDGET_EXCEEDED
        assert error.metadata["spent_micros"] == str(spent)
        await stub.Reserve(
            ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=limit - spent),
            timeout=10,
        )
        # A commit retried after the restart is still a duplicate, charging nothing.
        retried = await stub.Commit(ledger_pb2.CommitRequest(record=records[0]), timeout=10)
        assert retried.duplicate is True
        assert (await budget_state(stub, tenant, created.budget_id)).spent_micros == spent
    assert "Traceback" not in log_path.read_text(errors="replace")


# --- 5. leases --------------------------------------------------------------------------------


async def test_leases_take_at_most_half_of_what_is_left_in_whole_requests(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    hard = await set_budget(stub, budget(tenant, 1_000_000))
    soft = await set_budget(
        stub,
        budget(
            tenant,
            5_000_000,
            suffix="monthly",
            window=ledger_pb2.BUDGET_WINDOW_MONTHLY,
            enforcement=ledger_pb2.BUDGET_ENFORCEMENT_SOFT,
        ),
    )
    scope = ledger_pb2.BudgetScope(tenant_id=tenant, model=MODEL)

    async def lease(requested: int) -> ledger_pb2.LeaseBudgetResponse:
        granted: ledger_pb2.LeaseBudgetResponse = await stub.LeaseBudget(
            ledger_pb2.LeaseBudgetRequest(
                holder_id="edge-a", scope=scope, requested_micros=requested, min_micros=30_000
            ),
            timeout=10,
        )
        return granted

    # Half of the 1,000,000 left is 500,000; in whole 30,000s, 480,000.
    first = await lease(10_000_000)
    assert sorted(first.budget_ids) == sorted([hard.budget_id, soft.budget_id])
    (granted,) = first.leases
    assert (granted.budget_id, granted.amount_micros, granted.enforcement) == (
        hard.budget_id,
        480_000,
        ledger_pb2.BUDGET_ENFORCEMENT_HARD,
    )
    assert granted.lease_id and granted.limit_micros == 1_000_000 and granted.spent_micros == 0
    assert granted.version == hard.version
    assert granted.settle_by.ToMilliseconds() > granted.expires_at.ToMilliseconds() > time.time() * 1000
    assert (await budget_state(stub, tenant, hard.budget_id)).held_micros == 480_000

    # Half of the 520,000 still left is 260,000: 240,000 in whole requests.
    second = await lease(10_000_000)
    assert [x.amount_micros for x in second.leases] == [240_000]
    # Asking for less than half gets what was asked, rounded down to whole requests.
    third = await lease(100_000)
    assert [x.amount_micros for x in third.leases] == [90_000]

    record = usage_record(tenant, input_tokens=100_000)  # 15,000 micro-USD
    reply = await stub.Commit(
        ledger_pb2.CommitRequest(record=record, lease_ids=[granted.lease_id]), timeout=10
    )
    assert reply.charged_micros == 15_000
    state = await budget_state(stub, tenant, hard.budget_id)
    assert (state.spent_micros, state.held_micros) == (15_000, 480_000 - 15_000 + 240_000 + 90_000)
    assert (await budget_state(stub, tenant, soft.budget_id)).spent_micros == 15_000

    for leased, unused in (
        (granted, 480_000 - 15_000),
        (second.leases[0], 240_000),
        (third.leases[0], 90_000),
    ):
        returned = await stub.ReturnLease(
            ledger_pb2.ReturnLeaseRequest(lease_id=leased.lease_id, unused_micros=unused), timeout=10
        )
        assert returned.returned_micros == unused
    state = await budget_state(stub, tenant, hard.budget_id)
    assert (state.spent_micros, state.held_micros) == (15_000, 0)
    # A returned lease gives nothing back twice.
    again = await stub.ReturnLease(
        ledger_pb2.ReturnLeaseRequest(lease_id=granted.lease_id, unused_micros=1), timeout=10
    )
    assert again.returned_micros == 0


async def test_a_budget_with_too_little_left_grants_an_empty_lease(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    hard = await set_budget(stub, budget(tenant, 50_000))
    reply = await stub.LeaseBudget(
        ledger_pb2.LeaseBudgetRequest(
            holder_id="edge-a",
            scope=ledger_pb2.BudgetScope(tenant_id=tenant),
            requested_micros=1_000_000,
            min_micros=60_000,
        ),
        timeout=10,
    )
    assert [(x.budget_id, x.amount_micros, x.lease_id) for x in reply.leases] == [(hard.budget_id, 0, "")]
    assert (await budget_state(stub, tenant, hard.budget_id)).held_micros == 0


# --- 6. bad input and the audit log -----------------------------------------------------------


async def test_bad_input_is_invalid_argument_naming_the_field(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()

    nameless = usage_record(tenant, input_tokens=10, request_id="x")
    nameless.request_id = ""
    error = await rpc_error(stub.Commit(ledger_pb2.CommitRequest(record=nameless), timeout=10))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == "record.request_id"
    error = await rpc_error(
        stub.CommitMany(
            ledger_pb2.CommitManyRequest(
                commits=[
                    ledger_pb2.CommitRequest(record=usage_record(tenant, input_tokens=10)),
                    ledger_pb2.CommitRequest(record=nameless),
                ]
            ),
            timeout=10,
        )
    )
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT
    assert error.metadata["field"] == "commits[1].record.request_id"
    assert (await usage(stub, tenant)).requests == 0  # a bad batch stores nothing

    def set_request(wanted: ledger_pb2.Budget, actor: str = "ops@example.com") -> ledger_pb2.SetBudgetRequest:
        return ledger_pb2.SetBudgetRequest(budget=wanted, actor=actor)

    for wanted, actor, field_path in (
        (budget(tenant, 0), "ops@example.com", "budget.limit_micros"),
        (budget(tenant, -5), "ops@example.com", "budget.limit_micros"),
        # More than a counter holds exactly: stored, it would break every call on the budget.
        (budget(tenant, TOO_MUCH), "ops@example.com", "budget.limit_micros"),
        (budget(tenant, 1_000), "", "actor"),
        (
            budget(tenant, 1_000, window=ledger_pb2.BUDGET_WINDOW_UNSPECIFIED),
            "ops@example.com",
            "budget.window",
        ),
        (budget(tenant, 1_000, webhook_url="ftp://example.com/x"), "ops@example.com", "budget.webhook_url"),
        (budget(tenant, 1_000, suffix="has space"), "ops@example.com", "budget.budget_id"),
        # PostgreSQL text cannot hold a NUL: refused before anything is read or written.
        (budget(tenant, 1_000, suffix="nul\x00"), "ops@example.com", "budget.budget_id"),
        (budget(tenant, 1_000, model="m\x00"), "ops@example.com", "budget.scope.model"),
        (budget(tenant, 1_000), "ops\x00", "actor"),
    ):
        error = await rpc_error(stub.SetBudget(set_request(wanted, actor), timeout=10))
        assert (error.code, error.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, field_path), (
            error
        )
    assert await list_budgets(stub, tenant) == []  # nothing refused was stored

    scope = ledger_pb2.BudgetScope(tenant_id=tenant)
    for call, field_path in (
        (stub.Reserve(ledger_pb2.ReserveRequest(scope=scope, amount_micros=-1), timeout=10), "amount_micros"),
        (
            stub.Reserve(ledger_pb2.ReserveRequest(scope=scope, amount_micros=TOO_MUCH), timeout=10),
            "amount_micros",
        ),
        (
            stub.LeaseBudget(
                ledger_pb2.LeaseBudgetRequest(holder_id="edge-a", scope=scope, requested_micros=TOO_MUCH),
                timeout=10,
            ),
            "requested_micros",
        ),
        (
            stub.ReturnLease(
                ledger_pb2.ReturnLeaseRequest(lease_id="lease-x", unused_micros=TOO_MUCH), timeout=10
            ),
            "unused_micros",
        ),
        (
            stub.Commit(
                ledger_pb2.CommitRequest(
                    record=usage_record(tenant, model="acme/unpriced", reported_cost_micros=TOO_MUCH)
                ),
                timeout=10,
            ),
            "record.cost_micros",
        ),
    ):
        error = await rpc_error(call)
        assert (error.code, error.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, field_path), (
            error
        )
    far = usage_record(tenant, input_tokens=10)
    far.finished_at.seconds = 253_402_300_800  # the year 10000
    negative = usage_record(tenant, input_tokens=10, estimated_cost_micros=-1)
    backwards = gateway_pb2.GetUsageRequest(tenant_id=tenant)
    backwards.start_time.GetCurrentTime()
    backwards.end_time.FromSeconds(backwards.start_time.seconds - 3600)
    for call, field_path in (
        (stub.Commit(ledger_pb2.CommitRequest(record=far), timeout=10), "record.finished_at"),
        (stub.Commit(ledger_pb2.CommitRequest(record=negative), timeout=10), "record.estimated_cost_micros"),
        (
            stub.GetUsage(gateway_pb2.GetUsageRequest(tenant_id=tenant, page_token="junk"), timeout=10),
            "page_token",
        ),
        (stub.GetUsage(backwards, timeout=10), "end_time"),
        (stub.GetUsage(gateway_pb2.GetUsageRequest(tenant_id=tenant, group_by=[99]), timeout=10), "group_by"),
        (stub.ListBudgetAudit(ledger_pb2.ListBudgetAuditRequest(page_size=-1), timeout=10), "page_size"),
        (stub.ListAlerts(ledger_pb2.ListAlertsRequest(page_size=-1), timeout=10), "page_size"),
        (
            stub.DeleteBudget(
                ledger_pb2.DeleteBudgetRequest(budget_id="b\x00", actor="ops@example.com"), timeout=10
            ),
            "budget_id",
        ),
        # Release frees reservations only: a lease is its edge's to give back.
        (stub.Release(ledger_pb2.ReleaseRequest(reservation_id="lease-1"), timeout=10), "reservation_id"),
    ):
        error = await rpc_error(call)
        assert (error.code, error.metadata.get("field")) == (grpc.StatusCode.INVALID_ARGUMENT, field_path), (
            error
        )
    assert (await usage(stub, tenant)).requests == 0


async def test_budget_changes_are_audited_with_old_and_new(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    created = await stub.SetBudget(
        ledger_pb2.SetBudgetRequest(budget=budget(tenant, 1_000), actor="alice@example.com"), timeout=10
    )
    updated = await stub.SetBudget(
        ledger_pb2.SetBudgetRequest(budget=budget(tenant, 2_500), actor="bob@example.com"), timeout=10
    )
    assert (created.budget.version, updated.budget.version) == (1, 2)
    assert updated.budget.limit_micros == 2_500

    audit = await stub.ListBudgetAudit(
        ledger_pb2.ListBudgetAuditRequest(budget_id=created.budget.budget_id), timeout=10
    )
    newest, oldest = audit.entries  # newest first
    assert (oldest.action, oldest.actor, oldest.HasField("old_budget")) == (
        "create",
        "alice@example.com",
        False,
    )
    assert (oldest.new_budget.limit_micros, oldest.new_budget.version) == (1_000, 1)
    assert (newest.action, newest.actor) == ("update", "bob@example.com")
    assert (newest.old_budget.limit_micros, newest.old_budget.version) == (1_000, 1)
    assert (newest.new_budget.limit_micros, newest.new_budget.version) == (2_500, 2)
    assert newest.at.ToMilliseconds() >= oldest.at.ToMilliseconds() > 0
    by_tenant = await stub.ListBudgetAudit(ledger_pb2.ListBudgetAuditRequest(tenant_id=tenant), timeout=10)
    assert [e.action for e in by_tenant.entries] == ["update", "create"]


async def test_commit_stream_answers_each_batch_in_order_and_ends_on_a_bad_one(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    one, two = usage_record(tenant, input_tokens=1000), usage_record(tenant, input_tokens=2000)
    call = stub.CommitStream()
    await call.write(ledger_pb2.CommitManyRequest(commits=[ledger_pb2.CommitRequest(record=one)]))
    first = await call.read()
    await call.write(
        ledger_pb2.CommitManyRequest(
            commits=[ledger_pb2.CommitRequest(record=two), ledger_pb2.CommitRequest(record=one)]
        )
    )
    second = await call.read()
    assert [(r.request_id, r.duplicate) for r in first.results] == [(one.request_id, False)]
    assert [(r.request_id, r.duplicate, r.charged_micros) for r in second.results] == [
        (two.request_id, False, 300),
        (one.request_id, True, 150),
    ]
    await call.write(ledger_pb2.CommitManyRequest(commits=[ledger_pb2.CommitRequest()]))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call.read()
    error = from_rpc_error(caught.value)
    assert (error.code, error.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "commits[0].record.request_id",
    )
    assert (await usage(stub, tenant)).requests == 2


async def test_watch_budgets_pushes_the_directory_and_every_change(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    first = await set_budget(stub, budget(tenant, 1_000))
    watch = stub.WatchBudgets(ledger_pb2.WatchBudgetsRequest(subscriber_id="test"))
    stream = aiter(watch)

    async def next_directory() -> tuple[int, dict[str, int]]:
        response = await asyncio.wait_for(anext(stream), timeout=5)
        mine = {b.budget_id: b.version for b in response.budgets if b.scope.tenant_id == tenant}
        return response.version, mine

    try:
        version, mine = await next_directory()
        assert mine == {first.budget_id: 1}
        changed = await set_budget(stub, budget(tenant, 2_000))
        version_after_set, mine = await next_directory()
        assert version_after_set > version and mine == {changed.budget_id: 2}
        await stub.DeleteBudget(
            ledger_pb2.DeleteBudgetRequest(budget_id=changed.budget_id, actor="ops@example.com"), timeout=10
        )
        version_after_delete, mine = await next_directory()
        assert version_after_delete > version_after_set and mine == {}
    finally:
        watch.cancel()


async def test_a_commit_is_charged_in_the_window_its_request_finished_in(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    daily = await set_budget(stub, budget(tenant, 1_000_000))
    yesterday = usage_record(tenant, input_tokens=1000)
    yesterday.finished_at.FromSeconds(yesterday.finished_at.seconds - 86_400)
    ahead = usage_record(tenant, input_tokens=2000)  # an edge clock an hour fast: now, not then
    ahead.finished_at.FromSeconds(ahead.finished_at.seconds + 3_600)
    for record in (yesterday, ahead):
        await stub.Commit(ledger_pb2.CommitRequest(record=record), timeout=10)
    # Today's window holds only what finished today, as the rows say (a restart rebuilds it so).
    assert (await budget_state(stub, tenant, daily.budget_id)).spent_micros == 300


async def test_a_deleted_budget_stops_refusing_and_its_counter_goes(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    small = await set_budget(stub, budget(tenant, 1_000))
    await stub.Commit(ledger_pb2.CommitRequest(record=usage_record(tenant, input_tokens=1000)), timeout=10)
    ask = ledger_pb2.ReserveRequest(scope=ledger_pb2.BudgetScope(tenant_id=tenant), amount_micros=5_000)
    refused = await rpc_error(stub.Reserve(ask, timeout=10))
    assert refused.reason is Reason.BUDGET_EXCEEDED

    deleted = await stub.DeleteBudget(
        ledger_pb2.DeleteBudgetRequest(budget_id=small.budget_id, actor="ops@example.com"), timeout=10
    )
    assert deleted.budget.budget_id == small.budget_id and deleted.budget.spent_micros == 150
    assert await list_budgets(stub, tenant) == []
    reserved = await stub.Reserve(ask, timeout=10)  # nothing applies any more
    await stub.Release(ledger_pb2.ReleaseRequest(reservation_id=reserved.reservation_id), timeout=10)
    audit = await stub.ListBudgetAudit(
        ledger_pb2.ListBudgetAuditRequest(budget_id=small.budget_id), timeout=10
    )
    assert [(e.action, e.actor) for e in audit.entries] == [
        ("delete", "ops@example.com"),
        ("create", "ops@example.com"),
    ]

    # Made again, it counts its window's rows (the commit before and the one while it was gone),
    # not the dropped counter (the first only); its version follows the deleted one's.
    await stub.Commit(ledger_pb2.CommitRequest(record=usage_record(tenant, input_tokens=1000)), timeout=10)
    again = await set_budget(stub, budget(tenant, 1_000))
    assert again.version == 3 and (await budget_state(stub, tenant, again.budget_id)).spent_micros == 300

    for request, field_path in (
        (ledger_pb2.DeleteBudgetRequest(actor="ops@example.com"), "budget_id"),
        (ledger_pb2.DeleteBudgetRequest(budget_id=again.budget_id), "actor"),
    ):
        error = await rpc_error(stub.DeleteBudget(request, timeout=10))
        assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, field_path)
    missing = await rpc_error(
        stub.DeleteBudget(
            ledger_pb2.DeleteBudgetRequest(budget_id="no-such", actor="ops@example.com"), timeout=10
        )
    )
    assert (missing.code, missing.reason) == (grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND)


# --- 7. reports -------------------------------------------------------------------------------


async def test_export_erase_and_estimate_accuracy(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    tenant = new_tenant()
    alice = [usage_record(tenant, input_tokens=1000, output_tokens=500, end_user="alice") for _ in range(2)]
    bob = [usage_record(tenant, input_tokens=2000, end_user='bob, "the" builder')]
    other_tenant = usage_record(new_tenant(), input_tokens=1000, end_user="alice")
    await stub.CommitMany(
        ledger_pb2.CommitManyRequest(
            commits=[ledger_pb2.CommitRequest(record=r) for r in [*alice, *bob, other_tenant]]
        ),
        timeout=10,
    )

    rows = await export_rows(stub, tenant)
    assert {r["request_id"]: (r["end_user"], r["cost_micros"], r["cost_usd"]) for r in rows} == {
        alice[0].request_id: ("alice", "450", "0.000450"),
        alice[1].request_id: ("alice", "450", "0.000450"),
        bob[0].request_id: ('bob, "the" builder', "300", "0.000300"),
    }
    assert {r["tenant_id"] for r in rows} == {tenant}
    assert {r["model"] for r in rows} == {MODEL}
    assert {r["request_id"] for r in await export_rows(stub, tenant, "alice")} == {
        r.request_id for r in alice
    }

    # Alice's own budget goes with her; the tenant's stays.
    hers = budget(tenant, 1_000_000, suffix="alice:daily")
    hers.scope.end_user = "alice"
    await set_budget(stub, hers)
    await set_budget(stub, budget(tenant, 5_000_000))
    alice_request = ledger_pb2.ReserveRequest(
        request_id=str(uuid.uuid4()),
        scope=ledger_pb2.BudgetScope(tenant_id=tenant, end_user="alice"),
        amount_micros=2_000_000,
        ttl_seconds=5,
    )
    refused = await rpc_error(stub.Reserve(alice_request, timeout=10))
    assert refused.reason is Reason.BUDGET_EXCEEDED and refused.metadata["budget_id"] == hers.budget_id
    later = usage_record(tenant, input_tokens=1000, output_tokens=500, end_user="alice")
    await stub.Commit(ledger_pb2.CommitRequest(record=later), timeout=10)
    spent = {b.budget_id: b.spent_micros for b in await list_budgets(stub, tenant)}
    # A budget made mid-window covers the whole window: the rows before it count.
    assert spent == {hers.budget_id: 3 * 450, f"{tenant}:daily": 3 * 450 + 300}

    erased = await stub.EraseEndUser(
        ledger_pb2.EraseEndUserRequest(tenant_id=tenant, end_user="alice", actor="dpo@example.com"),
        timeout=10,
    )
    assert (erased.rows_anonymised, erased.budgets_deleted, erased.audit_entries_deleted) == (3, 1, 1)
    assert [b.budget_id for b in await list_budgets(stub, tenant)] == [f"{tenant}:daily"]
    # Her requests are held against the tenant's budget only now (hers refused 2 USD before).
    reserved = await stub.Reserve(
        ledger_pb2.ReserveRequest(
            request_id=str(uuid.uuid4()),
            scope=ledger_pb2.BudgetScope(tenant_id=tenant, end_user="alice"),
            amount_micros=2_000_000,
            ttl_seconds=5,
        ),
        timeout=10,
    )
    await stub.Release(ledger_pb2.ReleaseRequest(reservation_id=reserved.reservation_id), timeout=10)
    # Her rows stay for the tenant's totals, with no end user; the tenant's budget keeps her spend.
    exported = {r["request_id"]: r["end_user"] for r in await export_rows(stub, tenant)}
    assert exported == {
        **{r.request_id: "" for r in [*alice, later]},
        bob[0].request_id: 'bob, "the" builder',
    }
    assert await export_rows(stub, tenant, "alice") == []
    totals = await usage(stub, tenant)
    assert (totals.requests, totals.cost_micros) == (4, 3 * 450 + 300)
    # Her budget's counter went too: the same budget made again finds none of her spend.
    await set_budget(stub, hers)
    spent = {b.budget_id: b.spent_micros for b in await list_budgets(stub, tenant)}
    assert spent == {hers.budget_id: 0, f"{tenant}:daily": 3 * 450 + 300}
    # Another tenant's end user of the same name keeps their rows.
    assert (await usage(stub, other_tenant.scope.tenant_id)).requests == 1
    audit = await stub.ListBudgetAudit(ledger_pb2.ListBudgetAuditRequest(tenant_id=tenant), timeout=10)
    # Each export of her rows was audited (who, which period), naming a digest, never her id.
    exports = [e for e in audit.entries if e.action == "export_end_user"]
    assert len(exports) == 2 and all(
        e.actor == "dpo@example.com" and "alice" not in e.detail for e in exports
    )
    keyed_id = hmac.new(
        ERASURE_KEY.encode(), json.dumps([tenant, "alice"]).replace(" ", "").encode(), "sha256"
    )
    assert json.loads(exports[0].detail)["end_user_hmac_sha256"] == keyed_id.hexdigest()
    unnamed = ledger_pb2.ExportUsageRequest(tenant_id=tenant, end_user="alice")
    refused = await rpc_error(anext(aiter(stub.ExportUsage(unnamed, timeout=10))))
    assert (refused.code, refused.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "actor")
    (entry,) = [e for e in audit.entries if e.action == "erase_end_user"]
    assert entry.actor == "dpo@example.com" and "alice" not in entry.detail
    keyed = hmac.new(ERASURE_KEY.encode(), json.dumps([tenant, "alice"]).replace(" ", "").encode(), "sha256")
    assert json.loads(entry.detail) == {
        "tenant_id": tenant,
        "end_user_hmac_sha256": keyed.hexdigest(),
        "rows_anonymised": 3,
        "budgets_deleted": 1,
        "audit_entries_deleted": 1,
        "alerts_deleted": 0,
    }

    # Estimates against the vendor's counts, on a model no other test records estimates for:
    # relative errors 0.1, 0.1 and 0.5; signed +0.1, -0.1, +0.5. Cost estimates against the
    # charges (input at $0.40 per 1M: 400, 400 and 80 micro-USD): +0.1, -0.25, +0.5.
    model = "openai/gpt-4.1-mini"
    samples = [(1100, 1000, 440), (900, 1000, 300), (300, 200, 120)]
    committed = await stub.CommitMany(
        ledger_pb2.CommitManyRequest(
            commits=[
                ledger_pb2.CommitRequest(
                    record=usage_record(
                        tenant,
                        input_tokens=actual,
                        estimated_input_tokens=estimate,
                        estimated_cost_micros=cost_estimate,
                        model=model,
                    )
                )
                for estimate, actual, cost_estimate in samples
            ]
            # A record without an estimate is no sample.
            + [ledger_pb2.CommitRequest(record=usage_record(tenant, input_tokens=500, model=model))]
        ),
        timeout=10,
    )
    assert [r.charged_micros for r in committed.results] == [400, 400, 80, 200]
    accuracy = await stub.GetEstimateAccuracy(ledger_pb2.GetEstimateAccuracyRequest(model=model), timeout=10)
    (found,) = accuracy.models
    assert (found.model, found.samples) == (model, 3)
    assert found.mean_relative_error == pytest.approx(0.7 / 3)
    assert found.p95_relative_error == pytest.approx(0.5)
    assert found.mean_signed_error == pytest.approx(0.5 / 3)
    assert found.cost_samples == 3
    assert found.cost_mean_relative_error == pytest.approx(0.85 / 3)
    assert found.cost_p95_relative_error == pytest.approx(0.5)
    assert found.cost_mean_signed_error == pytest.approx(0.35 / 3)
    everything = await stub.GetEstimateAccuracy(ledger_pb2.GetEstimateAccuracyRequest(), timeout=10)
    assert model in {m.model for m in everything.models}


# --- 8. estimates -----------------------------------------------------------------------------


def estimate_chat(model: str = MODEL) -> common_pb2.ChatRequest:
    # "tiktoken is great!" is 6 tokens in cl100k_base and o200k_base (OpenAI's cookbook).
    text = common_pb2.ContentPart(text="tiktoken is great!")
    return common_pb2.ChatRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=[text])],
        sampling=common_pb2.SamplingParams(max_output_tokens=1_000),
    )


async def test_estimate_prices_a_catalog_model(ledger: LedgerProcess) -> None:
    stub = ledger.stub
    reply = await stub.Estimate(ledger_pb2.EstimateRequest(request=estimate_chat()), timeout=10)
    # 6 text tokens, "user" 1, 3 for the message and 3 priming the reply.
    assert (reply.model, reply.input_tokens, reply.expected_output_tokens, reply.max_output_tokens) == (
        MODEL,
        13,
        256,
        1_000,
    )
    # $0.15 input and $0.60 output per 1M: 13 x 0.15 + 256 x 0.60 = 155.55, rounded half up.
    assert reply.expected_cost_micros == 156
    # The worst case: the 1,000-token cap x 0.60 = 600, plus 13 x 0.15 = 1.95 -> 602 when the
    # model's own o200k counted; where it is not installed cl100k stands in, the whole count is a
    # guess and the worst case takes a quarter more prompt: 17 x 0.15 = 2.55 -> 603.
    if reply.encoding == "o200k_base":
        assert (reply.approximate, reply.worst_case_cost_micros) == (False, 602)
    else:
        assert (reply.encoding, reply.approximate, reply.worst_case_cost_micros) == (
            "cl100k_base~o200k_base",
            True,
            603,
        )
    # The model by alias, named in EstimateRequest.model over the request's own: the same answer.
    aliased = await stub.Estimate(
        ledger_pb2.EstimateRequest(request=estimate_chat("auto"), model="fast"), timeout=10
    )
    assert aliased == reply


async def test_estimate_of_an_unknown_model_is_invalid_argument_and_writes_nothing(
    ledger: LedgerProcess,
) -> None:
    stub = ledger.stub
    everyone = gateway_pb2.GetUsageRequest()  # every tenant, this month

    async def state() -> tuple[gateway_pb2.GetUsageResponse, ledger_pb2.ListBudgetAuditResponse]:
        return (
            await stub.GetUsage(everyone, timeout=10),
            await stub.ListBudgetAudit(ledger_pb2.ListBudgetAuditRequest(page_size=1), timeout=10),
        )

    before = await state()
    for request, field_path in (
        (ledger_pb2.EstimateRequest(request=estimate_chat(), model="acme/unknown"), "model"),
        (ledger_pb2.EstimateRequest(request=estimate_chat("acme/unknown")), "request.model"),
    ):
        error = await rpc_error(stub.Estimate(request, timeout=10))
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
        assert (error.metadata["field"], error.metadata["model"]) == (field_path, "acme/unknown")
    error = await rpc_error(stub.Estimate(ledger_pb2.EstimateRequest(request=estimate_chat("")), timeout=10))
    assert (error.code, error.reason, error.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_REQUEST,
        "model",
    )
    assert await state() == before


# --- sharing: two replicas on one PostgreSQL and one Redis -----------------------------------


async def test_two_replicas_share_commits_holds_leases_and_alerts(
    postgres_url: str, redis_url: str, receiver: WebhookReceiver, tmp_path: Path
) -> None:
    env = ledger_env(tmp_path, database_url=postgres_url, redis_url=redis_url)
    tenant = new_tenant()
    limit = 100_000
    scope = ledger_pb2.BudgetScope(tenant_id=tenant)
    async with running_ledger(env, tmp_path / "a.log") as a:
        created = await set_budget(a.stub, budget(tenant, limit, webhook_url=receiver.url))
        # B starts after the budget exists: a replica reloads budget definitions only every few
        # seconds, and this test is about the shared state, not about that delay.
        async with running_ledger(env, tmp_path / "b.log") as b:
            # A hold taken on one replica is seen, and enforced, by the other.
            held = await a.stub.Reserve(
                ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=limit), timeout=10
            )
            error = await rpc_error(
                b.stub.Reserve(
                    ledger_pb2.ReserveRequest(request_id=new_id(), scope=scope, amount_micros=1), timeout=10
                )
            )
            assert error.reason is Reason.BUDGET_EXCEEDED and error.metadata["held_micros"] == str(limit)
            assert (
                await b.stub.Release(
                    ledger_pb2.ReleaseRequest(reservation_id=held.reservation_id), timeout=10
                )
            ).released

            # One request id is charged once, whichever replicas its commits reach.
            record = usage_record(tenant, input_tokens=400_000)  # 60,000 micro-USD: 60 %
            first = await a.stub.Commit(ledger_pb2.CommitRequest(record=record), timeout=10)
            again = await b.stub.Commit(ledger_pb2.CommitRequest(record=record), timeout=10)
            b_read_volume_at = time.monotonic()  # B's cached monthly tokens date from here
            assert (first.duplicate, again.duplicate) == (False, True)
            assert (first.month_tokens, again.month_tokens) == (400_000, 400_000)
            state = await budget_state(b.stub, tenant, created.budget_id)
            assert (state.spent_micros, state.held_micros) == (60_000, 0)

            # A lease granted by B is drawn down by a commit on A and returned to A.
            leased = await b.stub.LeaseBudget(
                ledger_pb2.LeaseBudgetRequest(
                    holder_id="edge-b", scope=scope, requested_micros=limit, min_micros=5_000
                ),
                timeout=10,
            )
            (lease,) = leased.leases
            assert lease.amount_micros == 20_000  # half of the 40,000 left
            drawn = usage_record(tenant, input_tokens=100_000)  # 15,000: 75 %
            await a.stub.Commit(
                ledger_pb2.CommitRequest(record=drawn, lease_ids=[lease.lease_id]), timeout=10
            )
            assert (await budget_state(a.stub, tenant, created.budget_id)).held_micros == 5_000
            returned = await a.stub.ReturnLease(
                ledger_pb2.ReturnLeaseRequest(lease_id=lease.lease_id, unused_micros=20_000), timeout=10
            )
            assert returned.returned_micros == 5_000

            # Commits on both replicas cross 80, 90 and 100 %: each alert fires and is delivered once.
            for stub in (b.stub, a.stub, b.stub, a.stub):
                more = usage_record(tenant, input_tokens=50_000)  # 7,500 each: 82.5, 90, 97.5, 105 %
                await stub.Commit(ledger_pb2.CommitRequest(record=more), timeout=10)

            async def all_delivered() -> bool:
                listed = await a.stub.ListAlerts(ledger_pb2.ListAlertsRequest(tenant_id=tenant), timeout=10)
                return len(listed.alerts) == 3 and all(
                    x.delivery_status == "delivered" for x in listed.alerts
                )

            await eventually(all_delivered)
            await asyncio.sleep(1.2)  # both delivery loops have had a pass to send anything twice
            assert sorted(json.loads(d.body)["threshold_percent"] for d in receiver.deliveries) == [
                80,
                90,
                100,
            ]
            assert all(d.verified for d in receiver.deliveries)
            state = await budget_state(a.stub, tenant, created.budget_id)
            assert (state.spent_micros, state.held_micros) == (60_000 + 15_000 + 4 * 7_500, 0)
            assert (await usage(b.stub, tenant)).requests == 6

            # Each replica re-reads a tenant's monthly tokens every few seconds, so the volume
            # that discounts are decided by includes what the other replica committed.
            await asyncio.sleep(max(0.0, b_read_volume_at + 5.2 - time.monotonic()))
            last = await b.stub.Commit(
                ledger_pb2.CommitRequest(record=usage_record(tenant, input_tokens=1_000)), timeout=10
            )
            assert last.month_tokens == 400_000 + 100_000 + 4 * 50_000 + 1_000
