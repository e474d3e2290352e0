"""Ledger speed: `python -m bench.ledger [--seconds S] [--redis-url URL]`.

Reserve + commit pairs per second through the ledger's own logic (`Ledger.reserve`, then
`Ledger.commit_many` of that one request: the row in SQL, the budget counters settled, the hold
freed), in process, for each budget backend: the in-memory store and Redis (one Lua call per
operation). Every pair is charged against a daily and a monthly hard budget of its tenant (8
tenants, large enough never to refuse), as a real request would be. Usage rows go to a SQLite
file in a temporary directory (the ledger's default). Two loads per backend: one pair at a time,
and 16 pairs in flight (what a busy ledger sees from several edges). Edges that hold budget
leases commit without a reserve; this measures the path of clients that reserve.

Redis is `--redis-url`, else `REDIS_URL`, else redis://127.0.0.1:6379/0; its rows are skipped
with a note when it does not answer. Each run uses a key prefix of its own and deletes it. Prints
a markdown table; no targets, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from redis.exceptions import RedisError

from switchyard.common.catalog import load_catalog
from switchyard.common.redis_client import open_redis
from switchyard.common.sql import open_database
from switchyard.ledger.alerts import AlertCenter
from switchyard.ledger.budgets import BudgetStore, MemoryBudgetStore
from switchyard.ledger.budgets_redis import RedisBudgetStore
from switchyard.ledger.history import LedgerStore
from switchyard.ledger.service import Ledger
from switchyard.v1 import common_pb2, ledger_pb2

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
TENANTS: Final = 8
MODEL: Final = "openai/gpt-4o-mini"
CONCURRENCY: Final = (1, 16)


@dataclass(frozen=True)
class Row:
    backend: str
    concurrency: int
    pairs: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.pairs / self.seconds


async def _ledger(store: BudgetStore, workdir: Path) -> tuple[Ledger, list[str]]:
    database = await open_database(f"sqlite:///{workdir / f'ledger-{uuid.uuid4().hex[:8]}.db'}")
    alerts = await AlertCenter.open(database, secret=None)
    ledger = Ledger(
        load_catalog(None),
        await LedgerStore.open(database),
        store,
        alerts,
        lease_ttl_s=30,
        settle_after_s=300,
    )
    tenants = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(TENANTS)]
    for tenant in tenants:
        for window, name in (
            (ledger_pb2.BUDGET_WINDOW_DAILY, "daily"),
            (ledger_pb2.BUDGET_WINDOW_MONTHLY, "monthly"),
        ):
            await ledger.set_budget(
                ledger_pb2.Budget(
                    budget_id=f"{tenant}:{name}",
                    scope=ledger_pb2.BudgetScope(tenant_id=tenant),
                    window=window,
                    limit_micros=10**15,
                    enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
                ),
                actor="bench",
            )
    return ledger, tenants


def _commit(tenant: str, request_id: str, reservation_id: str) -> ledger_pb2.CommitRequest:
    record = ledger_pb2.UsageRecord(
        request_id=request_id,
        scope=ledger_pb2.BudgetScope(tenant_id=tenant),
        model=MODEL,
        provider="openai",
        usage=common_pb2.Usage(input_tokens=200, output_tokens=40),
        status="ok",
        attempts=1,
    )
    record.finished_at.GetCurrentTime()
    return ledger_pb2.CommitRequest(reservation_id=reservation_id, record=record)


async def _run(ledger: Ledger, tenants: list[str], concurrency: int, seconds: float) -> tuple[int, float]:
    """Pairs done and the seconds they took, `concurrency` workers back to back."""
    done = 0
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        tenant = tenants[index % len(tenants)]
        scope = ledger_pb2.BudgetScope(tenant_id=tenant)
        while time.perf_counter() < deadline:
            request_id = uuid.uuid4().hex
            held = await ledger.reserve(
                ledger_pb2.ReserveRequest(request_id=request_id, scope=scope, amount_micros=5_000)
            )
            (result,) = await ledger.commit_many([_commit(tenant, request_id, held.reservation_id)])
            if result.duplicate or result.charged_micros <= 0:
                raise RuntimeError(f"unexpected commit result {result}")
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return done, time.perf_counter() - started


async def _bench(seconds: float, redis_url: str | None) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="switchyard-bench-ledger-") as tmp:
        workdir = Path(tmp)
        stores: list[tuple[str, BudgetStore]] = [("in-memory", MemoryBudgetStore())]
        if redis_url:
            client = open_redis(redis_url, client_name="switchyard-bench-ledger")
            prefix = f"sy-bench-ledger-{uuid.uuid4().hex[:8]}"
            try:
                await client.ping()
                stores.append(("Redis", RedisBudgetStore(client, prefix=prefix, owns_client=False)))
            except (RedisError, OSError) as exc:
                notes.append(
                    f"Redis at {redis_url} did not answer ({type(exc).__name__}): its rows are skipped."
                )
        for name, store in stores:
            ledger, tenants = await _ledger(store, workdir)
            await _run(ledger, tenants, 4, min(1.0, seconds / 4))  # warm-up
            for concurrency in CONCURRENCY:
                pairs, took = await _run(ledger, tenants, concurrency, seconds)
                rows.append(Row(name, concurrency, pairs, took))
            await ledger.alerts.aclose()
            await ledger.history.database.close()
        if redis_url and len(stores) > 1:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
            for start in range(0, len(keys), 500):
                await client.delete(*keys[start : start + 500])
            await client.aclose()
    return rows, notes


def markdown(rows: list[Row]) -> str:
    lines = [
        "| budget backend | pairs in flight | reserve+commit pairs/s | mean per pair (ms) | pairs |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        mean_ms = row.seconds / row.pairs * 1000 * row.concurrency if row.pairs else float("nan")
        lines.append(
            f"| {row.backend} | {row.concurrency} | {row.per_second:,.0f} | {mean_ms:.2f} | {row.pairs:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row (default 5)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", DEFAULT_REDIS_URL))
    args = parser.parse_args(argv)
    if args.seconds <= 0:
        print("bench.ledger: --seconds must be positive", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        rows, notes = asyncio.run(_bench(args.seconds, args.redis_url or None))
    else:
        rows, notes = uvloop.run(_bench(args.seconds, args.redis_url or None))
    print(markdown(rows))
    for note in notes:
        print(f"\n{note}")
    print("\nUsage rows in SQLite (a temporary file); one process, one event loop (uvloop).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
