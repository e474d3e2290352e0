"""Planner speed: `python -m bench.plan [--plans N] [--sizes 10,100,1000]`.

Builds synthetic catalogs (several providers, mixed categories, a health entry with a latency
fit for every model, some breakers open and some rate-limit headroom low, a tenant with three
routing rules), then times `Planner.plan` one call at a time with `time.perf_counter_ns` after
a warm-up, for an explicit-model request and an `auto` request, and the table build. Prints a
markdown table. Targets: p99 < 100 µs at 100 models, < 1 ms at 1,000; a 1,000-model table in
well under 100 ms.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf import timestamp_pb2

from switchyard.common.catalog import Catalog
from switchyard.router.plan import Planner
from switchyard.router.table import RoutingTable, build_snapshot
from switchyard.v1 import common_pb2, health_pb2

NOW = datetime(2030, 1, 1, tzinfo=UTC)
PROVIDERS = 8
CATEGORIES = ("small", "large", "reasoning")
TARGET_P99_US = {100: 100.0, 1_000: 1_000.0}


def model_id(n: int) -> str:
    """The id of the n-th synthetic model."""
    return f"v{n % PROVIDERS}/m{n}"


def synthetic_catalog(size: int) -> Catalog:
    """`size` models over `PROVIDERS` providers, categories and prices mixed deterministically."""
    providers = {
        f"p{i}": {
            "vendor": "openai_compatible",
            "base_url": f"http://127.0.0.1:{9000 + i}/v1",
            "region": "eu" if i % 3 == 0 else "us",
            "free_tier": i == PROVIDERS - 1,
        }
        for i in range(PROVIDERS)
    }
    models: list[dict[str, Any]] = []
    for n in range(size):
        category = CATEGORIES[n % 3]
        capabilities = ["streaming", "tools"] if n % 4 else ["streaming"]
        if category == "reasoning":
            capabilities.append("reasoning")
        models.append(
            {
                "id": model_id(n),
                "provider": f"p{n % PROVIDERS}",
                "upstream_model": f"m{n}",
                "context_window": 8_000 * (1 + n % 16),
                "max_output_tokens": 4_096,
                "prices": {"input": f"0.{1 + n % 9}", "output": f"{1 + n % 7}.5"},
                "capabilities": capabilities,
                "category": category,
                "quality": 50 + (n * 7) % 50,
                "aliases": [f"alias{n}"] if n % 10 == 0 else [],
                "fallbacks": [model_id((n + 1) % size)] if size > 1 else [],
            }
        )
    rules = [
        {"name": "big-spenders", "when": {"estimated_cost_above_usd": "5"}, "then": {"exclude": ["v0/m0"]}},
        {
            "name": "search-team",
            "when": {"tags": {"team": "search"}},
            "then": {"prefer": [model_id(1 % size)]},
        },
        {"name": "code-cap", "when": {"task_type": ["code"]}, "then": {"cap_cost_per_million_usd": "20"}},
    ]
    return Catalog.model_validate(
        {
            "providers": providers,
            "models": models,
            "default_model": "v0/m0",
            "tenants": {"bench": {"tier": "pro", "routing_rules": rules}},
        }
    )


def synthetic_health(catalog: Catalog) -> list[health_pb2.ModelHealth]:
    """One entry per model: a latency fit, an error rate, a few open breakers, some low headroom."""
    reset = timestamp_pb2.Timestamp()
    reset.FromDatetime(NOW + timedelta(seconds=30))
    entries = []
    for n, model in enumerate(catalog.models):
        entry = health_pb2.ModelHealth(
            provider=model.provider,
            model=model.id,
            status=health_pb2.HEALTH_STATUS_HEALTHY,
            breaker=health_pb2.BREAKER_STATE_OPEN if n % 17 == 5 else health_pb2.BREAKER_STATE_CLOSED,
            ewma_latency_ms=300.0 + (n * 37) % 2_000,
            error_rate=(n % 5) / 100,
            output_tokens_per_second=40.0 + n % 60,
            samples=100 + n,
            latency_base_ms=200.0 + (n * 13) % 900,
            latency_ms_per_input_token=0.02,
            latency_ms_per_output_token=4.0 + n % 5,
            latency_fit_samples=60,
            latency_prediction_error=0.1,
        )
        if n % 11 == 3:
            entry.headroom.limit_requests = 1_000
            entry.headroom.remaining_requests = 5
            entry.headroom.requests_reset_at.CopyFrom(reset)
        entries.append(entry)
    return entries


def request(model: str, task: int) -> common_pb2.ChatRequest:
    """A typical short chat request."""
    return common_pb2.ChatRequest(
        model=model,
        messages=[
            common_pb2.Message(
                role=common_pb2.ROLE_USER,
                parts=[
                    common_pb2.ContentPart(text="Please explain how a circuit breaker protects a service.")
                ],
            )
        ],
        routing=common_pb2.RoutingHints(task_type=task),  # type: ignore[arg-type]
    )


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    """(p50, p99) in microseconds, nearest rank."""
    ordered = sorted(samples_ns)
    p50 = ordered[max(0, round(0.50 * len(ordered)) - 1)]
    p99 = ordered[max(0, round(0.99 * len(ordered)) - 1)]
    return p50 / 1_000, p99 / 1_000


def measure(call: Callable[[], object], plans: int, warmup: int) -> tuple[float, float]:
    """p50 and p99 of `call`, timed one call at a time."""
    for _ in range(warmup):
        call()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(plans):
        start = clock()
        call()
        samples.append(clock() - start)
    return percentiles(samples)


def fixed_work(n: int = 1_000) -> int:
    """A fixed pure-Python workload (about as long as planning on 100 models), timed like a
    plan: its p99 / p50 shows how much of a tail this machine adds to any equal piece of work."""
    total = 0
    for i in range(n):
        total += i * i
    return total


def run(sizes: list[int], plans: int) -> list[dict[str, Any]]:
    """Measure every size; one result row per (size, request kind)."""
    rows: list[dict[str, Any]] = []
    for size in sizes:
        catalog = synthetic_catalog(size)
        health = synthetic_health(catalog)
        builds = []
        for version in range(1, 6):
            start = time.perf_counter_ns()
            table = RoutingTable.from_snapshot(
                build_snapshot(catalog, version=version, health=health, now=NOW)
            )
            builds.append(time.perf_counter_ns() - start)
        build_ms = statistics.median(builds) / 1e6
        planner = Planner(table)
        explicit = request(catalog.models[size // 2].id, common_pb2.TASK_TYPE_UNSPECIFIED)
        auto = request("auto", common_pb2.TASK_TYPE_UNSPECIFIED)
        for kind, chat in (("explicit", explicit), ("auto", auto)):
            plan = planner.plan(chat, tenant_id="bench", input_tokens=200, now=NOW)

            def call(chat: common_pb2.ChatRequest = chat, planner: Planner = planner) -> object:
                return planner.plan(chat, tenant_id="bench", input_tokens=200, now=NOW)

            p50, p99 = measure(call, plans, warmup=max(200, plans // 10))
            rows.append(
                {
                    "models": size,
                    "request": kind,
                    "p50_us": p50,
                    "p99_us": p99,
                    "target_us": TARGET_P99_US.get(size),
                    "table_ms": build_ms,
                    "candidates": len(plan.candidates),
                }
            )
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = [
        "| models | request | plan p50 (µs) | plan p99 (µs) | p99 target (µs) | table build (ms) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        target = row["target_us"]
        verdict = (
            ""
            if target is None
            else (f"< {target:,.0f} ✓" if row["p99_us"] < target else f"< {target:,.0f} ✗")
        )
        lines.append(
            f"| {row['models']:,} | {row['request']} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {verdict} "
            f"| {row['table_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the planner benchmark; returns the process exit code (1 when a target is missed)."""
    parser = argparse.ArgumentParser(prog="python -m bench.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--plans", type=int, default=5_000, help="timed plans per case (default 5000)")
    parser.add_argument("--sizes", default="10,100,1000", help="catalog sizes (default 10,100,1000)")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size]
    if args.plans <= 0 or not sizes or min(sizes) <= 0:
        print("bench.plan: --plans and --sizes must be positive", file=sys.stderr)
        return 2
    rows = run(sizes, args.plans)
    print(markdown(rows))
    p50, p99 = measure(fixed_work, args.plans, warmup=max(200, args.plans // 10))
    print(
        f"\nMachine reference, a fixed pure-Python workload timed the same way: "
        f"p50 {p50:.1f} µs, p99 {p99:.1f} µs"
    )
    missed = [r for r in rows if r["target_us"] is not None and r["p99_us"] >= r["target_us"]]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
