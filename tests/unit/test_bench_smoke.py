"""Smoke run of the benchmark harness: it starts, measures every path and writes its report.

Only checks that the harness works (exit 0, every figure present and a positive number);
it never asserts a timing target. Real numbers come from `make bench`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import STREAM_CONCURRENCY, UNARY_CONCURRENCY

REPO = Path(__file__).resolve().parents[2]


def run_bench(module: str, *args: str) -> None:
    """Run `python -m <module> <args>` from the repository (no vendor keys passed on); it must
    exit 0 within two minutes."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-4000:]


def test_bench_smoke_writes_a_complete_report(tmp_path: Path) -> None:
    run_bench("bench", "--smoke", "--out", str(tmp_path))
    report = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.md").read_text().startswith("# Switchyard bench")
    assert report["smoke"] is True
    assert {"cpu_model", "cores", "python", "grpcio", "git_commit", "date"} <= report["label"].keys()

    figures = report["figures"]
    expected = {
        f"{prefix}_c{c}_{q}_{kind}"
        for prefix, levels in (
            ("unary", UNARY_CONCURRENCY),
            ("ttft", STREAM_CONCURRENCY),
            ("cache_hit", STREAM_CONCURRENCY),  # cache hits are measured at the stream levels
        )
        for c in levels
        for q in ("p50", "p99")
        for kind in ("ratio", "ms_direct", "ms_edge")
    } | {
        "saturation_rps_ratio",
        "saturation_rps_direct",
        "saturation_rps_edge",
        "cpu_s_per_1k_unary_gateway",
        "cpu_s_per_1k_unary_sim_direct",
        "cpu_s_per_1k_unary_sim_edge",
        "cpu_s_per_1k_unary_client_direct",
        "cpu_s_per_1k_unary_client_edge",
        "cpu_s_per_1k_streams_gateway",
        "rss_mib_gateway_total",
        "rss_mib_simulator",
    }
    expected |= {
        f"{path}_{prefix}_c{c}_{q}_{kind}"
        for path in ("envoy", "envoy_http")
        for prefix, levels in (("unary", UNARY_CONCURRENCY), ("ttft", STREAM_CONCURRENCY))
        for c in levels
        for q in ("p50", "p99")
        for kind in ("ratio", "ms")
    } | {
        f"{path}_{name}"
        for path in ("envoy", "envoy_http")
        for name in ("saturation_rps_ratio", "saturation_rps", "cpu_s_per_1k_unary_gateway")
    }
    assert expected <= figures.keys()
    not_positive = {k: v for k, v in figures.items() if not (isinstance(v, int | float) and v > 0)}
    assert not not_positive
    # Added latency is a difference (edge minus direct): present and finite, sign not asserted.
    # Edge: (3 unary + 2 streaming + 2 cache-hit levels) x (p50, p99); each Envoy path:
    # (3 unary + 2 streaming levels) x (p50, p99).
    assert len(report["added"]) == 14 + 2 * 10
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in report["added"].values())
    assert all(p["errors"] == 0 for p in report["phases"])
    assert {u["value"] for u in report["unmeasured"]} == {"UNMEASURED"}


def test_planner_bench_runs_every_size_and_request_kind() -> None:
    from bench import plan as plan_bench

    rows = plan_bench.run([10, 100], plans=20)
    assert [(row["models"], row["request"]) for row in rows] == [
        (10, "explicit"),
        (10, "auto"),
        (100, "explicit"),
        (100, "auto"),
    ]
    for row in rows:
        assert 0 < row["p50_us"] <= row["p99_us"] and row["table_ms"] > 0
        assert row["candidates"] == 3
    table = plan_bench.markdown(rows)
    assert table.count("\n") == 1 + len(rows) and "| 100 | auto |" in table


def test_cache_bench_measures_memory_hits_and_misses() -> None:
    from bench import cache as cache_bench

    report = cache_bench.run([100], lookups=20)  # no Redis URL: the memory rows only
    assert [(row["entries"], row["store"], row["lookup"]) for row in report.rows] == [
        (100, "memory", "exact hit"),
        (100, "memory", "exact miss"),
        (0, "local MiniLM", "embed one question"),
        (100, "usearch, one scope", "nearest-neighbour search"),
    ]
    for row in report.rows:
        assert 0 < row["p50_us"] <= row["p99_us"]
    assert [(f["entries"], f["store"], f["added"]) for f in report.fills] == [(100, "memory", 100)]
    assert report.fills[0]["seconds"] > 0
    assert report.semantic.startswith("Semantic lookup = an exact miss + one embedding + one search")
    table = cache_bench.markdown(report.rows)
    assert table.count("\n") == 1 + len(report.rows) and "| 100 | memory | exact miss |" in table


def test_ledger_bench_charges_every_pair_on_both_budget_backends(redis_url: str) -> None:
    import asyncio

    from bench import ledger as ledger_bench

    rows, notes = asyncio.run(ledger_bench._bench(0.2, redis_url))
    assert notes == []
    assert [(row.backend, row.concurrency) for row in rows] == [
        ("in-memory", 1),
        ("in-memory", 16),
        ("Redis", 1),
        ("Redis", 16),
    ]
    assert all(row.pairs > 0 and row.per_second > 0 for row in rows)
    table = ledger_bench.markdown(rows)
    assert table.count("\n") == 1 + len(rows) and "| Redis | 16 |" in table


def test_scale_curves_write_one_labelled_report(tmp_path: Path) -> None:
    run_bench("bench.scale", "--quick", "--out", str(tmp_path))
    report = json.loads((tmp_path / "scale-latest.json").read_text())
    assert {"cpu_model", "cores", "python", "git_commit", "date"} <= report["label"].keys()
    assert {row["models"] for row in report["planning"]["rows"]} == {10, 100}
    assert all(row["p99_us"] >= row["p50_us"] > 0 for row in report["planning"]["rows"])
    assert {row["lookup"] for row in report["cache"]["rows"]} >= {"exact hit", "exact miss"}
    assert {row["backend"] for row in report["ledger"]["rows"]} >= {"in-memory"}
    assert all(row["pairs"] > 0 for row in report["ledger"]["rows"])
    text = (tmp_path / "scale-latest.md").read_text()
    assert text.startswith("# Switchyard scale curves")
    assert "## Local planning" in text and "## Cache lookups" in text and "## Ledger reserve+commit" in text


def test_bench_features_smoke_writes_a_row_per_configuration(tmp_path: Path) -> None:
    run_bench("bench.features", "--smoke", "--out", str(tmp_path))
    result = json.loads((tmp_path / "features-latest.json").read_text())
    assert (tmp_path / "features-latest.md").read_text().startswith("# Switchyard feature costs")
    assert result["smoke"] is True
    rows = {row["name"]: row for row in result["rows"]}
    assert list(rows) == ["every feature on", "all four off"]
    for row in rows.values():
        assert row["errors"] == 0
        assert row["saturation_rps"] > 0 and row["saturation_gateway_cpu_ms"] > 0
        assert all(calls > 0 for calls in row["calls"].values())
    # The switches took: with the cache and budgets off, those services did (next to) no work
    # per request; with them on, every request made them work.
    on, off = rows["every feature on"], rows["all four off"]

    def served(row: dict[str, Any]) -> float:
        by_process = row["saturation_cpu_ms_by_process"]
        return float(by_process.get("cache", 0.0) + by_process.get("ledger", 0.0))

    assert served(on) > 0
    assert served(off) < served(on) / 2
    assert off["tracing"] is False and on["tracing"] is True
