"""Command line: `python -m bench.scale [--out DIR] [--quick]`.

The scale curves of the benchmark in one labelled report: local planning at 10 / 100 / 1,000
models (`bench.plan`), exact and semantic cache lookups at 1,000 / 100,000 entries
(`bench.cache`), and ledger reserve+commit pairs per second on the in-memory and the Redis
budget backends (`bench.ledger`). Writes `scale-latest.{json,md}` and a timestamped copy of each
under `--out`, next to the mesh's report, and prints the markdown. Each part can still be run on
its own (`python -m bench.plan`, ...). `--quick` uses small counts to check the report builds.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any

from bench import cache, ledger, plan, report

DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _reference(samples: int) -> dict[str, float]:
    """A fixed pure-Python workload timed like the planner: how fast this machine was just now."""
    p50, p99 = plan.measure(plan.fixed_work, samples, warmup=max(200, samples // 10))
    return {"p50_us": p50, "p99_us": p99}


def collect(*, quick: bool, redis_url: str | None) -> dict[str, Any]:
    """Run the three scale benchmarks and return their figures, labelled with the machine."""
    plans, lookups, seconds = (200, 200, 0.3) if quick else (5_000, 5_000, 5.0)
    plan_sizes, cache_sizes = ([10, 100], [1_000]) if quick else ([10, 100, 1_000], [1_000, 100_000])
    label = report.machine_label()
    planning = plan.run(plan_sizes, plans)
    planning_reference = _reference(plans)
    lookups_report = cache.run(cache_sizes, lookups, redis_url, semantic=not quick)
    ledger_rows, ledger_notes = cache._run_loop(ledger._bench(seconds, redis_url))
    return {
        "label": label,
        "quick": quick,
        "planning": {"rows": planning, "reference": planning_reference, "plans_per_row": plans},
        "cache": {**dataclasses.asdict(lookups_report), "lookups_per_row": lookups},
        "ledger": {
            "rows": [{**dataclasses.asdict(row), "per_second": row.per_second} for row in ledger_rows],
            "notes": ledger_notes,
            "seconds_per_row": seconds,
        },
    }


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown: the machine first, then one table per curve."""
    label = result["label"]
    ref = result["planning"]["reference"]
    parts = [
        f"# Switchyard scale curves, {label['date']}",
        "",
        f"- Machine: {label['cpu_model']}, {label['cores']} cores; Python {label['python']}; "
        f"commit {label['git_commit']}{' (with local changes)' if label['git_dirty'] else ''}.",
        f"- Machine reference (a fixed pure-Python workload timed like a plan): "
        f"p50 {ref['p50_us']:.1f} µs, p99 {ref['p99_us']:.1f} µs.",
    ]
    if result["quick"]:
        parts.append("- Quick run (`--quick`): small counts; the numbers mean nothing.")
    parts += [
        "",
        f"## Local planning ({result['planning']['plans_per_row']:,} timed plans per row)",
        "",
        plan.markdown(result["planning"]["rows"]),
        "",
        f"## Cache lookups ({result['cache']['lookups_per_row']:,} timed lookups per row)",
        "",
        cache.markdown(result["cache"]["rows"]),
        "",
        cache.fills_text(result["cache"]["fills"]),
        *result["cache"]["notes"],
        result["cache"]["semantic"],
        "",
        f"## Ledger reserve+commit ({result['ledger']['seconds_per_row']} s per row; usage rows in SQLite)",
        "",
        ledger.markdown([ledger.Row(**_row_fields(row)) for row in result["ledger"]["rows"]]),
        *result["ledger"]["notes"],
    ]
    return "\n".join(parts).rstrip() + "\n"


def _row_fields(row: dict[str, Any]) -> dict[str, Any]:
    return {name: row[name] for name in ("backend", "concurrency", "pairs", "seconds")}


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write scale-latest.{json,md} and a timestamped copy of each under `out`."""
    return report.write_named(result, markdown(result), out, "scale")


def main(argv: list[str] | None = None) -> int:
    """Run the scale benchmarks and write their report; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="output directory (default bench/results)"
    )
    parser.add_argument("--quick", action="store_true", help="small counts, to check the report builds")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL", cache.DEFAULT_REDIS_URL),
        help="Redis for the tiered cache and the Redis budget rows ('' to skip them)",
    )
    args = parser.parse_args(argv)
    result = collect(quick=args.quick, redis_url=args.redis_url or None)
    json_path, md_path = write(result, args.out)
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
