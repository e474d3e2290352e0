"""`switchyard erase-end-user`: the ledger's erasure, then the cache's, against real services.

The ledger and the cache are the services' own `build` (the ledger on a SQLite file, the cache
in memory without an embedder) on `build_server`, in this process over real gRPC. The command
runs as a process once (its arguments, and the targets from the environment); the other cases
call its coroutine in process, with a target nobody listens on for a service that is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from switchyard.cache import service as cache_service
from switchyard.common.channels import open_channel
from switchyard.common.logging import configure_logging, reset_logging
from switchyard.common.ports import free_port
from switchyard.common.server import ServiceParts, build_server
from switchyard.common.settings import Settings
from switchyard.erasure_cli import CACHE_NOT_ERASED, erase_end_user
from switchyard.ledger import service as ledger_service
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2, ledger_pb2, ledger_pb2_grpc

MODEL = "openai/gpt-4o-mini"
REPO = Path(__file__).resolve().parents[2]
ACTOR = "dpo@example.com"


@dataclass
class Mesh:
    ledger_target: str
    cache_target: str
    ledger: ledger_pb2_grpc.CostLedgerServiceStub
    cache: cache_pb2_grpc.CacheServiceStub
    logs: io.StringIO
    """What the services logged (not on stdout, where the command prints)."""


@contextlib.asynccontextmanager
async def serving(parts: ServiceParts) -> AsyncIterator[str]:
    """`parts` started and served on a free port; its target."""
    if parts.start is not None:
        await parts.start()
    running = await build_server(parts.bindings)
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        await running.server.stop(None)
        if parts.close is not None:
            await parts.close()


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    settings = Settings.from_env(
        {},
        database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
        ledger_erasure_key="erasure-key-cli-test-0123456789",
        cache_semantic=False,
    )
    logs = io.StringIO()
    configure_logging("test", stream=logs)
    async with (
        serving(ledger_service.build(settings)) as ledger_target,
        serving(cache_service.build(settings)) as cache_target,
    ):
        channels = [open_channel(ledger_target), open_channel(cache_target)]
        try:
            yield Mesh(
                ledger_target,
                cache_target,
                ledger_pb2_grpc.CostLedgerServiceStub(channels[0]),
                cache_pb2_grpc.CacheServiceStub(channels[1]),
                logs,
            )
        finally:
            for channel in channels:
                await channel.close()
    reset_logging()


def ask(text: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    return request


async def seed(mesh: Mesh, tenant: str) -> None:
    """A usage row and a cached answer for alice and for bob."""
    records = []
    for end_user in ("alice", "bob"):
        record = ledger_pb2.UsageRecord(
            request_id=f"req-{uuid.uuid4().hex[:12]}",
            scope=ledger_pb2.BudgetScope(tenant_id=tenant, end_user=end_user),
            model=MODEL,
            provider="openai",
            usage=common_pb2.Usage(input_tokens=100, output_tokens=10),
            status="ok",
            attempts=1,
        )
        record.finished_at.GetCurrentTime()
        records.append(ledger_pb2.CommitRequest(record=record))
    await mesh.ledger.CommitMany(ledger_pb2.CommitManyRequest(commits=records), timeout=10)
    answer = cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text="an answer")],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=MODEL,
        provider="openai",
    )
    offers = [
        cache_pb2.StoreRequest(
            tenant_id=tenant, request=ask(question), model=MODEL, answer=answer, end_user=who
        )
        for question, who in (("alice's question", "alice"), ("bob's question", "bob"))
    ]
    stored = await mesh.cache.StoreMany(cache_pb2.StoreManyRequest(stores=offers), timeout=10)
    assert all(result.admitted for result in stored.results)


async def cached(mesh: Mesh, tenant: str, question: str) -> bool:
    reply = await mesh.cache.Lookup(
        cache_pb2.LookupRequest(tenant_id=tenant, request=ask(question), model=MODEL), timeout=10
    )
    return reply.status == common_pb2.CACHE_STATUS_HIT_EXACT


async def end_users(mesh: Mesh, tenant: str) -> list[str]:
    """The end users of the tenant's usage rows, as the CSV export has them."""
    chunks = [
        piece.csv_chunk
        async for piece in mesh.ledger.ExportUsage(
            ledger_pb2.ExportUsageRequest(tenant_id=tenant), timeout=10
        )
    ]
    lines = b"".join(chunks).decode().splitlines()
    column = lines[0].split(",").index("end_user")
    return sorted(line.split(",")[column] for line in lines[1:])


async def test_the_command_erases_from_the_ledger_then_the_cache(mesh: Mesh) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    await seed(mesh, tenant)
    env = {
        **os.environ,
        "SWITCHYARD_LEDGER_TARGET": mesh.ledger_target,
        "SWITCHYARD_CACHE_TARGET": mesh.cache_target,
        "SWITCHYARD_ACTOR": ACTOR,
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchyard.cli",
        "erase-end-user",
        "--tenant",
        tenant,
        "--end-user",
        "alice",
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().splitlines() == [
        "ledger: 1 usage rows anonymised, 0 budgets, 0 audit entries and 0 alerts deleted",
        "cache: 1 cached answers removed",
    ]
    assert await end_users(mesh, tenant) == ["", "bob"]
    assert not await cached(mesh, tenant, "alice's question")
    assert await cached(mesh, tenant, "bob's question")
    audit = await mesh.ledger.ListBudgetAudit(ledger_pb2.ListBudgetAuditRequest(tenant_id=tenant), timeout=10)
    assert [(e.action, e.actor) for e in audit.entries] == [("erase_end_user", ACTOR)]


async def test_a_cache_that_is_down_is_a_warning_after_the_ledger_and_a_retry_finishes(
    mesh: Mesh, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = f"acme-{uuid.uuid4().hex[:8]}"
    await seed(mesh, tenant)
    nowhere = f"127.0.0.1:{free_port()}"

    async def erase(ledger_target: str, cache_target: str) -> int:
        return await erase_end_user(
            tenant_id=tenant,
            end_user="alice",
            actor=ACTOR,
            ledger_target=ledger_target,
            cache_target=cache_target,
            timeout_s=2,
        )

    # The ledger down: nothing is erased, the cache is not called.
    assert await erase(nowhere, mesh.cache_target) == 1
    out = capsys.readouterr()
    assert out.out == "" and f"the ledger at {nowhere}: unreachable" in out.err
    assert "nothing was erased" in out.err
    assert await end_users(mesh, tenant) == ["alice", "bob"]
    assert await cached(mesh, tenant, "alice's question")

    # The cache down: the ledger's part is done and said so; the warning says to run it again.
    assert await erase(mesh.ledger_target, nowhere) == CACHE_NOT_ERASED
    out = capsys.readouterr()
    assert out.out.startswith("ledger: 1 usage rows anonymised")
    assert "warning" in out.err and f"the cache at {nowhere}" in out.err
    assert "run this command again" in out.err
    assert await end_users(mesh, tenant) == ["", "bob"]
    assert await cached(mesh, tenant, "alice's question")

    # Again, with both up: the ledger has nothing left, the cache removes her answer.
    assert await erase(mesh.ledger_target, mesh.cache_target) == 0
    out = capsys.readouterr()
    assert out.out.splitlines() == [
        "ledger: 0 usage rows anonymised, 0 budgets, 0 audit entries and 0 alerts deleted",
        "cache: 1 cached answers removed",
    ]
    assert not await cached(mesh, tenant, "alice's question")
    assert await cached(mesh, tenant, "bob's question")
    # And once more: nothing anywhere.
    assert await erase(mesh.ledger_target, mesh.cache_target) == 0
    assert capsys.readouterr().out.endswith("cache: 0 cached answers removed\n")
    # Both services logged the erasures, never whose.
    assert "end_user_erased" in mesh.logs.getvalue() and "cache_invalidated" in mesh.logs.getvalue()
    assert "alice" not in mesh.logs.getvalue()


def test_empty_names_are_refused_before_any_call(capsys: pytest.CaptureFixture[str]) -> None:
    from switchyard.cli import main

    nowhere = f"127.0.0.1:{free_port()}"
    argv = ["erase-end-user", "--ledger-target", nowhere, "--cache-target", nowhere]
    assert main([*argv, "--tenant", " ", "--end-user", "alice"]) == 2
    assert main([*argv, "--tenant", "acme", "--end-user", ""]) == 2
    assert main([*argv, "--tenant", "acme", "--end-user", "alice", "--actor", ""]) == 2
    assert "must not be empty" in capsys.readouterr().err
