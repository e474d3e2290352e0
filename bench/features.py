"""Command line: `python -m bench.features [--smoke] [--duration-s S] [--out DIR]`.

What each feature of the request path costs: the bench mesh (`harness.start_mesh`) is started
once per configuration -- every feature on, then each of tracing, the cache, budgets and
in-flight dedup off in turn, then all four off -- and each run measures unary calls through the
edge at concurrency 1 (added latency against the direct path, measured in the same run) and at
saturation (64 concurrent: requests per second and CPU per request of every process). A
feature's cost is the difference it makes against the run with every feature on. API-key auth,
rate limits and routing stay on throughout: they are local checks on the edge, with no switch.

Writes `features-latest.{json,md}` and a timestamped copy of each under `--out` (next to the
mesh's report) and prints the markdown. Like every figure of `make bench`, these are measured,
never asserted; `--smoke` (two configurations, tiny counts) only keeps the harness working.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench import harness, report
from bench.load import LoadConfig, PathName, Phase
from switchyard.local_mesh import SIM_API_KEY

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
SATURATION = 64
# (path, concurrency) of each phase of a configuration's run, in order.
# The figures of a row that are the mean of its rounds.
FIGURES: Final = (
    "c1_added_p50_ms",
    "c1_added_p99_ms",
    "c1_direct_p50_ms",
    "c1_edge_p50_ms",
    "c1_gateway_cpu_ms",
    "saturation_rps",
    "saturation_gateway_cpu_ms",
)
PHASES: tuple[tuple[PathName, int], ...] = (("direct", 1), ("edge", 1), ("edge", SATURATION))


@dataclass(frozen=True)
class Config:
    """One way to run the mesh: its name, whether it traces, and what its children's
    environment adds."""

    name: str
    tracing: bool = True
    env: dict[str, str] = field(default_factory=dict)


# Each switch, as the feature it turns off; `ALL_OFF` turns off every one of them.
SWITCHES: tuple[Config, ...] = (
    Config("tracing off", tracing=False),
    Config("cache off", env={"SWITCHYARD_EDGE_CACHE": "false"}),
    Config("budgets off", env={"SWITCHYARD_EDGE_BUDGETS": "false"}),
    Config("dedup off", env={"SWITCHYARD_EDGE_DEDUP": "false"}),
)
ALL_ON = Config("every feature on")
ALL_OFF = Config("all four off", tracing=False, env={k: v for c in SWITCHES for k, v in c.env.items()})
CONFIGS: tuple[Config, ...] = (ALL_ON, *SWITCHES, ALL_OFF)


async def _measure_config(
    config: Config,
    sink: harness.OtlpSink,
    cores: tuple[int | None, int | None],
    duration_s: float,
    warmup_s: float,
) -> dict[str, Any]:
    """Start the mesh as `config` says, measure direct and edge at c=1 and the edge at saturation."""
    mesh_core, load_core = cores
    log_dir = Path(tempfile.mkdtemp(prefix="switchyard-bench-features-"))
    try:
        with (log_dir / "mesh.log").open("w") as log:
            mesh = await harness.start_mesh(log, sink.endpoint if config.tracing else None, config.env)
            load: harness.LoadGenerator | None = None
            try:
                sim_root = mesh.plan.simulator_urls["openai"]
                assert mesh.plan.envoy_target is not None
                await harness.set_knobs(sim_root, harness.UNARY_KNOBS)
                with harness.pinned_to(load_core):
                    load = harness.LoadGenerator(
                        LoadConfig(
                            sim_root,
                            SIM_API_KEY,
                            mesh.plan.edge_target,
                            load_core,
                            mesh.plan.envoy_target,
                        )
                    )
                await load.ready()
                phases = [
                    report.PhaseStats.of(
                        await harness.measure(
                            load, mesh, Phase(path, "unary", c, duration_s, 200_000), warmup_s
                        )
                    )
                    for path, c in PHASES
                ]
                mesh.check_unchanged()
            finally:
                if load is not None:
                    await load.close()
                await mesh.supervisor.stop(grace_s=2)
    except BaseException:
        print(f"bench.features: the mesh's log is kept in {log_dir / 'mesh.log'}", file=sys.stderr)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    direct, edge, saturated = phases
    return {
        "name": config.name,
        "tracing": config.tracing,
        "env": config.env,
        "c1_added_p50_ms": edge.p50_ms - direct.p50_ms,
        "c1_added_p99_ms": edge.p99_ms - direct.p99_ms,
        "c1_direct_p50_ms": direct.p50_ms,
        "c1_edge_p50_ms": edge.p50_ms,
        "c1_gateway_cpu_ms": edge.gateway_cpu_s() / edge.calls * 1000,
        "saturation_rps": saturated.calls_per_s,
        "saturation_gateway_cpu_ms": saturated.gateway_cpu_s() / saturated.calls * 1000,
        "saturation_cpu_ms_by_process": {
            name: seconds / saturated.calls * 1000
            for name, seconds in sorted(saturated.mesh_cpu_s.items(), key=report.by_value)
            if seconds > 0
        },
        "errors": direct.errors + edge.errors + saturated.errors,
        "calls": {"direct_c1": direct.calls, "edge_c1": edge.calls, "edge_saturation": saturated.calls},
    }


async def collect(
    configs: tuple[Config, ...], duration_s: float, warmup_s: float, rounds: int
) -> dict[str, Any]:
    """Measure every configuration in turn, `rounds` times over (interleaved, so a machine that
    slows down for a minute weighs on every configuration alike); the mesh of each is gone
    before the next starts. Each row holds the mean of its rounds and every round's figures."""
    cores = harness.plan_placement()
    sink = harness.OtlpSink()
    runs: dict[str, list[dict[str, Any]]] = {config.name: [] for config in configs}
    with harness.pinned_to(cores[0]):
        await sink.start()
        try:
            for _ in range(rounds):
                for config in configs:
                    runs[config.name].append(await _measure_config(config, sink, cores, duration_s, warmup_s))
        finally:
            await sink.stop()
    rows = [_mean_of(measured) for measured in runs.values()]
    return {
        "label": report.machine_label(),
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "rounds": rounds,
        "rows": rows,
    }


def _mean_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration's row: the mean of its rounds' figures, the spread of requests per
    second, errors and calls summed, and the rounds themselves."""
    first = runs[0]
    row = {key: first[key] for key in ("name", "tracing", "env")}
    for key in FIGURES:
        row[key] = statistics.fmean(run[key] for run in runs)
    processes = {name for run in runs for name in run["saturation_cpu_ms_by_process"]}
    by_process = {
        name: statistics.fmean(run["saturation_cpu_ms_by_process"].get(name, 0.0) for run in runs)
        for name in processes
    }
    row["saturation_cpu_ms_by_process"] = dict(sorted(by_process.items(), key=report.by_value))
    row["saturation_rps_range"] = [
        min(r["saturation_rps"] for r in runs),
        max(r["saturation_rps"] for r in runs),
    ]
    row["errors"] = sum(run["errors"] for run in runs)
    row["calls"] = {key: sum(run["calls"][key] for run in runs) for key in first["calls"]}
    row["rounds"] = runs
    return row


def costs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What turning each configuration's features off saved against every feature on (the first
    row): CPU per request at saturation, added latency at c=1, and requests per second gained."""
    base = rows[0]
    return [
        {
            "name": row["name"],
            "saved_cpu_ms": base["saturation_gateway_cpu_ms"] - row["saturation_gateway_cpu_ms"],
            "saved_c1_p50_ms": base["c1_added_p50_ms"] - row["c1_added_p50_ms"],
            "rps_ratio": row["saturation_rps"] / base["saturation_rps"],
        }
        for row in rows[1:]
    ]


def markdown(result: dict[str, Any]) -> str:
    """The report as markdown: the machine, one row per configuration, then what each saves."""
    label, rows = result["label"], result["rows"]
    commit = label["git_commit"] + (" (with uncommitted changes)" if label["git_dirty"] else "")
    lines = [
        f"# Switchyard feature costs, {label['date']}",
        "",
        f"- Machine: {label['cpu_model']}, {label['cores']} cores; Python {label['python']}, "
        f"grpcio {label['grpcio']}; commit {commit}.",
        "- The bench mesh (every process on one core, the load generator on the other), started once "
        f"per row and round; {result['rounds']} round(s), interleaved, each figure the mean of the "
        f"rounds (requests per second: the rounds' range in brackets); unary calls, "
        f"{result['duration_s']:g} s per phase after {result['warmup_s']:g} s of warm-up. Added "
        "latency is the edge minus the direct path at concurrency 1, in the same run; saturation "
        f"is {SATURATION} concurrent calls. CPU per request counts every gateway process (all but "
        "the simulator).",
        "- Auth, rate limits and routing are on in every row (local checks at the edge).",
        "- Costs do not add up: a feature changes how requests gather into shared messages and "
        "wake-ups at saturation (a cache lookup gathers the generation starts behind it, say), so "
        "turning one off can move the other processes' cost either way. Read the rows, not sums.",
        "",
        report.row(
            "Configuration",
            "Added p50, c=1",
            "Added p99, c=1",
            "Requests/s, c=64",
            "CPU ms/request, c=64",
            "CPU ms/request, c=1",
            "By process, c=64 (ms/request)",
        ),
        report.row("---", "---:", "---:", "---:", "---:", "---:", "---"),
    ]
    for row in rows:
        by_process = ", ".join(f"{name} {ms:.2f}" for name, ms in row["saturation_cpu_ms_by_process"].items())
        lo, hi = row["saturation_rps_range"]
        lines.append(
            report.row(
                row["name"],
                f"+{row['c1_added_p50_ms']:.2f} ms",
                f"+{row['c1_added_p99_ms']:.2f} ms",
                f"{row['saturation_rps']:.0f}/s ({lo:.0f}–{hi:.0f})",
                f"{row['saturation_gateway_cpu_ms']:.2f}",
                f"{row['c1_gateway_cpu_ms']:.2f}",
                by_process + (f"; {row['errors']} errors" if row["errors"] else ""),
            )
        )
    lines += [
        "",
        "## What turning features off saves (against every feature on)",
        "",
        report.row(
            "Off",
            "CPU ms/request saved, c=64",
            "Added p50 saved, c=1",
            "Requests/s, c=64, × every feature on",
        ),
        report.row("---", "---:", "---:", "---:"),
    ]
    lines += [
        report.row(
            c["name"], f"{c['saved_cpu_ms']:.2f}", f"{c['saved_c1_p50_ms']:.2f} ms", f"{c['rps_ratio']:.2f}×"
        )
        for c in costs(rows)
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure the configurations and write their report; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.features", description=__doc__.split("\n\n")[0])
    report.run_arguments(
        parser,
        smoke="two configurations, tiny counts (checks the harness)",
        duration="measured seconds per phase (default 5; smoke 0.4)",
        out=DEFAULT_OUT,
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="times over every configuration (default 2; smoke 1)"
    )
    args = parser.parse_args(argv)
    duration_s = args.duration_s if args.duration_s is not None else (0.4 if args.smoke else 5.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.smoke else 2)
    if duration_s <= 0 or rounds < 1:
        print("bench.features: --duration-s must be positive and --rounds at least 1", file=sys.stderr)
        return 2
    configs = (ALL_ON, ALL_OFF) if args.smoke else CONFIGS
    result = asyncio.run(collect(configs, duration_s, 0.1 if args.smoke else 1.0, rounds))
    result["smoke"] = args.smoke
    json_path, md_path = report.write_named(result, markdown(result), args.out, "features")
    print(markdown(result))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
