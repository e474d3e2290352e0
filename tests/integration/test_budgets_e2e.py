"""Budgets that cannot be overrun, through real edges: two edge processes share one ledger.

200 concurrent requests meet a hard budget that covers about 50 of them at their worst
case. Whatever the interleaving across the two edges' leases:

* the committed spend never exceeds the budget;
* every admitted request is recorded exactly once, with the cost its caller was told;
* every refused request (RESOURCE_EXHAUSTED / BUDGET_EXCEEDED) has no row;
* once the edges have stopped (returning their leases), nothing is left held.

It runs twice: SQLite with the ledger's in-memory budget store, and PostgreSQL with Redis.
A last test restarts the ledger (on the in-memory store) under an edge holding a lease.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from switchyard.common.catalog import load_catalog
from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error
from switchyard.common.ports import free_port
from switchyard.common.sql import open_database
from switchyard.ledger.pricing import estimate_cost
from switchyard.local_mesh import plan_mesh
from switchyard.supervisor import ChildSpec, ReadinessCheck, Supervisor
from switchyard.v1 import common_pb2, gateway_pb2_grpc, ledger_pb2, ledger_pb2_grpc
from tests.support.auth import keyed_channel
from tests.support.postgres import PostgresUnavailable, fresh_postgres_database, skip_or_fail

MODEL = "openai/gpt-4o-mini"
MAX_OUTPUT = 64
CONCURRENT = 200


@dataclass
class BudgetMesh:
    ledger_target: str
    edge_targets: tuple[str, str]
    database_url: str
    edges: Supervisor
    ledger: Supervisor
    # To start the ledger again, on the same port and state.
    ledger_spec: ChildSpec
    edges_log: Path


@asynccontextmanager
async def _supervised(children: list[ChildSpec], log: Path) -> AsyncIterator[Supervisor]:
    with log.open("w") as out:
        supervisor = Supervisor(children, out=out, color=False)
        await supervisor.start()
        try:
            await supervisor.wait_ready(60)
            yield supervisor
        finally:
            await supervisor.stop(grace_s=10)


@asynccontextmanager
async def budget_mesh(tmp_path: Path, env: dict[str, str]) -> AsyncIterator[BudgetMesh]:
    """The OpenAI simulator and adapter, one ledger, and two edges, as real processes (the
    ledger under a supervisor of its own, so a test can stop it and start it again)."""
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    plan = plan_mesh(load_catalog(None), free_ports=True, simulate=True, environ=environ)
    by_name = {c.name: c for c in plan.children}
    extra = {"SWITCHYARD_LOG_FORMAT": "json", "SWITCHYARD_SHUTDOWN_GRACE_S": "5", **env}
    backend = [
        dataclasses.replace(by_name[name], env={**by_name[name].env, **extra})
        for name in ("sim-openai", "adapter-openai")
    ]
    ledger = dataclasses.replace(by_name["ledger"], env={**by_name["ledger"].env, **extra})
    edge = by_name["edge"]
    edges = []
    targets = []
    for label in ("a", "b"):
        port = free_port()
        targets.append(f"127.0.0.1:{port}")
        edges.append(
            dataclasses.replace(
                edge,
                name=f"edge-{label}",
                env={**edge.env, **extra, "SWITCHYARD_PORT": str(port), "SWITCHYARD_HTTP_PORT": "0"},
                readiness=ReadinessCheck.grpc_health(targets[-1]),
            )
        )
    ledger_port = by_name["ledger"].env["SWITCHYARD_PORT"]
    database_url = env.get("DATABASE_URL") or f"sqlite:///{env['SWITCHYARD_STATE_DIR']}/switchyard.db"
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(_supervised(backend, tmp_path / "backend.log"))
        ledger_running = await stack.enter_async_context(_supervised([ledger], tmp_path / "ledger.log"))
        running = await stack.enter_async_context(_supervised(edges, tmp_path / "edges.log"))
        yield BudgetMesh(
            f"127.0.0.1:{ledger_port}",
            (targets[0], targets[1]),
            database_url,
            running,
            ledger_running,
            ledger,
            tmp_path / "edges.log",
        )


def _request(index: int) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL, request_id=f"budget-{uuid.uuid4().hex[:8]}-{index}")
    request.messages.add(
        role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=f"question number {index}, briefly")]
    )
    request.sampling.max_output_tokens = MAX_OUTPUT
    return request


def _worst(request: common_pb2.ChatRequest) -> int:
    model = load_catalog(None).model(MODEL)
    assert model is not None
    return estimate_cost(request, model, at=datetime.now(UTC)).worst_case_cost_micros


def _assert_refusal_says(
    error: SwitchyardError, budget_id: str, limit: int, request: common_pb2.ChatRequest
) -> None:
    """A refusal names the budget, its limit, what was spent and held of it (as the ledger last
    saw it) and what the request asked for: its worst case."""
    metadata = error.metadata
    assert metadata["budget_id"] == budget_id
    assert metadata["limit_micros"] == str(limit)
    assert metadata["requested_micros"] == str(_worst(request))
    spent, held = int(metadata["spent_micros"]), int(metadata["held_micros"])
    # The ledger's invariant: outstanding leases plus committed spend never pass the limit.
    assert spent >= 0 and held >= 0 and spent + held <= limit


async def _hard_daily_budget(ledger: ledger_pb2_grpc.CostLedgerServiceStub, limit: int) -> ledger_pb2.Budget:
    """A hard daily budget of `limit` micro-USD on the `default` tenant."""
    response = await ledger.SetBudget(
        ledger_pb2.SetBudgetRequest(
            budget=ledger_pb2.Budget(
                scope=ledger_pb2.BudgetScope(tenant_id="default"),
                window=ledger_pb2.BUDGET_WINDOW_DAILY,
                enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
                limit_micros=limit,
            ),
            actor="test",
        ),
        timeout=10,
    )
    return response.budget


async def _run_budget_race(mesh: BudgetMesh, tmp_path: Path) -> None:
    worst = _worst(_request(0))
    limit = worst * 50
    async with grpc.aio.insecure_channel(mesh.ledger_target) as channel:
        ledger = ledger_pb2_grpc.CostLedgerServiceStub(channel)
        budget = await _hard_daily_budget(ledger, limit)

        answered: dict[str, int] = {}
        refused: list[str] = []
        other: list[str] = []
        channels = [keyed_channel(t) for t in mesh.edge_targets]
        try:
            stubs = [gateway_pb2_grpc.GatewayServiceStub(c) for c in channels]

            async def one(index: int) -> None:
                request = _request(index)
                try:
                    response = await stubs[index % 2].Chat(request, timeout=60)
                except grpc.aio.AioRpcError as exc:
                    error = from_rpc_error(exc)
                    if error.reason is Reason.BUDGET_EXCEEDED:
                        assert error.code is grpc.StatusCode.RESOURCE_EXHAUSTED
                        _assert_refusal_says(error, budget.budget_id, limit, request)
                        refused.append(request.request_id)
                    else:
                        other.append(f"{error.code.name} {error.reason.value}: {error.message}")
                    return
                answered[response.request_id] = response.cost_micros

            await asyncio.gather(*(one(i) for i in range(CONCURRENT)))
        finally:
            for channel_ in channels:
                await channel_.close()
        assert not other, other[:3]
        assert len(answered) + len(refused) == CONCURRENT
        assert 40 <= len(answered) < CONCURRENT, (len(answered), worst, limit)
        assert refused, "the budget must have refused some requests"

        # Stopping the edges sends what their outboxes hold and returns their leases.
        await mesh.edges.stop(grace_s=10)
        database = await open_database(mesh.database_url)
        try:
            for _ in range(100):
                rows = await database.fetch_all(
                    "SELECT request_id, cost_micros FROM ledger_usage WHERE tenant_id = ?", ("default",)
                )
                if len(rows) >= len(answered):
                    break
                await asyncio.sleep(0.1)
        finally:
            await database.close()
        recorded = {r["request_id"]: int(r["cost_micros"]) for r in rows}
        assert recorded == answered  # every admitted request once, at the cost it was told
        assert not set(refused) & set(recorded)
        spent = sum(recorded.values())
        assert 0 < spent <= limit

        listed = await ledger.ListBudgets(ledger_pb2.ListBudgetsRequest(tenant_id="default"), timeout=10)
        (state,) = [b for b in listed.budgets if b.budget_id == budget.budget_id]
        assert state.spent_micros == spent
        assert state.held_micros == 0  # every lease came back; nothing is left behind


async def test_two_edges_never_overrun_a_hard_budget_sqlite_memory(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    async with budget_mesh(tmp_path, {"SWITCHYARD_STATE_DIR": str(state)}) as mesh:
        await _run_budget_race(mesh, tmp_path)


async def test_two_edges_never_overrun_a_hard_budget_postgres_redis(tmp_path: Path, redis_url: str) -> None:
    try:
        async with fresh_postgres_database() as url:
            env = {"DATABASE_URL": url, "REDIS_URL": redis_url, "SWITCHYARD_STATE_DIR": str(tmp_path)}
            async with budget_mesh(tmp_path, env) as mesh:
                await _run_budget_race(mesh, tmp_path)
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))


async def _budget(ledger: ledger_pb2_grpc.CostLedgerServiceStub, budget_id: str) -> ledger_pb2.Budget:
    listed: ledger_pb2.ListBudgetsResponse = await ledger.ListBudgets(
        ledger_pb2.ListBudgetsRequest(tenant_id="default"), timeout=10
    )
    (found,) = [b for b in listed.budgets if b.budget_id == budget_id]
    return found


async def _until(
    ledger: ledger_pb2_grpc.CostLedgerServiceStub, budget_id: str, check: Callable[[ledger_pb2.Budget], bool]
) -> ledger_pb2.Budget:
    for _ in range(200):
        found = await _budget(ledger, budget_id)
        if check(found):
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"the budget never got there: {await _budget(ledger, budget_id)}")


async def test_a_restarted_ledgers_new_epoch_retires_the_lease_an_edge_holds(tmp_path: Path) -> None:
    """The ledger restarts on the in-memory store while edge A holds a lease. The holds behind
    leases died with the old process; the restarted ledger rebuilds the spend from the rows and
    would grant all the rest of the budget again -- here edge B takes it. Were A to go on
    admitting on its old lease, the budget would be overrun by what that lease had left. The
    new store epoch makes A retire the lease as soon as it hears from the restarted ledger.

    Requests go one at a time and none is in flight across the restart, so nothing falls under
    the epoch's one exception (spend admitted on an old lease that the new epoch's grants do
    not know of): the committed spend never exceeds the limit.
    """
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    numbers = iter(range(100, 1000))  # three digits: one token each, so every request costs alike at worst

    def request() -> common_pb2.ChatRequest:
        return _request(next(numbers))

    per_request = _worst(request())
    limit = 20 * per_request
    async with budget_mesh(tmp_path, {"SWITCHYARD_STATE_DIR": str(state_dir)}) as mesh:
        channels = [keyed_channel(t) for t in mesh.edge_targets]
        try:
            edge_a, edge_b = (gateway_pb2_grpc.GatewayServiceStub(c) for c in channels)
            async with grpc.aio.insecure_channel(mesh.ledger_target) as channel:
                ledger = ledger_pb2_grpc.CostLedgerServiceStub(channel)
                budget = await _hard_daily_budget(ledger, limit)
                before = sum([(await edge_a.Chat(request(), timeout=60)).cost_micros for _ in range(2)])
                held = await _until(ledger, budget.budget_id, lambda b: b.spent_micros == before)
                assert held.held_micros >= per_request  # A's lease has room for more requests

            await mesh.ledger.stop(grace_s=10)
            async with (
                _supervised([mesh.ledger_spec], tmp_path / "ledger-restarted.log"),
                grpc.aio.insecure_channel(mesh.ledger_target) as channel,
            ):
                ledger = ledger_pb2_grpc.CostLedgerServiceStub(channel)
                # The spend, rebuilt from the rows; A's lease is unknown here.
                restarted = await _until(ledger, budget.budget_id, lambda b: b.spent_micros == before)
                assert restarted.held_micros == 0
                for _ in range(200):
                    if "budget_leases_retired" in mesh.edges_log.read_text(errors="replace"):
                        break
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError("edge A kept its lease of the lost epoch")

                after = 0
                for _ in range(100):  # B takes what the restarted ledger grants, until refused
                    try:
                        after += (await edge_b.Chat(request(), timeout=60)).cost_micros
                    except grpc.aio.AioRpcError as exc:
                        assert from_rpc_error(exc).reason is Reason.BUDGET_EXCEEDED
                        break
                else:
                    raise AssertionError("edge B was never refused")
                # A's old lease still had room; it admits nothing any more.
                asked = request()
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await edge_a.Chat(asked, timeout=60)
                error = from_rpc_error(caught.value)
                assert (error.code, error.reason) == (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    Reason.BUDGET_EXCEEDED,
                )
                _assert_refusal_says(error, budget.budget_id, limit, asked)

                await mesh.edges.stop(grace_s=10)  # sends what the outboxes hold
                final = await _until(ledger, budget.budget_id, lambda b: b.spent_micros == before + after)
                assert before + after <= limit
                assert final.held_micros == 0
        finally:
            for channel_ in channels:
                await channel_.close()
