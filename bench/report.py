"""Turn raw timings into figures, and figures into a labelled markdown table and a JSON file.

Ratios first (through the edge / direct), absolute numbers beside them. Added latency is
"through the edge minus direct" at the same percentile, both measured in the same run
against the same simulator. Whatever this harness does not measure yet is listed as
UNMEASURED with the issue that owns it, never estimated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.harness import (
    LITELLM_CHILD,
    SIM_CHILD,
    STREAM_KNOBS,
    TRACE_SAMPLE_RATIO,
    UNARY_KNOBS,
    Measured,
    RunData,
)
from bench.load import GRPC_CLIENT, HTTP_CLIENT, Mode, PathName

REPO = Path(__file__).resolve().parents[1]

UNMEASURED: tuple[tuple[str, str], ...] = ()
LITELLM_UNMEASURED = (
    "LiteLLM proxy on the same simulator, same cores (make bench installs it; not in this run)"
)
# Above this share of a core used by other processes during a phase, the report warns.
NOISY = 0.2
# (mode, figure-key prefix, row name) for the latency rows.
ROWS: tuple[tuple[Mode, str, str], ...] = (
    ("unary", "unary", "Unary latency"),
    ("stream", "ttft", "Time to first token"),
    ("cached", "cache_hit", "Cache hit latency (vs a direct completion)"),
)
# The paths through Envoy's ingress: (path, name in the report), measured unary and streaming.
ENVOY_PATHS: tuple[tuple[PathName, str], ...] = (
    ("envoy", "Envoy → edge, gRPC stubs"),
    ("envoy_http", "Envoy → edge's OpenAI front, the OpenAI SDK's wire format"),
)


def percentile_ms(values_ns: Sequence[int], q: float) -> float:
    """The q-th percentile (0-100, linear interpolation between ranks) of `values_ns`, in ms."""
    ordered = sorted(values_ns)
    if not ordered:
        return math.nan
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (rank - low)) / 1e6


@dataclass(frozen=True)
class PhaseStats:
    """One phase as plain numbers; latency is the whole call (unary) or time to first token (stream)."""

    path: PathName
    mode: Mode
    concurrency: int
    calls: int
    errors: int
    first_error: str
    elapsed_s: float
    calls_per_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    stream_total_p50_ms: float | None
    client_cpu_s: float
    client_busy: float
    mesh_cpu_s: dict[str, float]
    # Share of one core used by processes outside this run, and stolen by the hypervisor.
    other_busy: float
    steal_busy: float

    @classmethod
    def of(cls, m: Measured) -> PhaseStats:
        """Summarize one measured phase."""
        r = m.result
        elapsed = max(r.elapsed_s, 1e-9)
        return cls(
            path=r.phase.path,
            mode=r.phase.mode,
            concurrency=r.phase.concurrency,
            calls=len(r.latencies_ns),
            errors=r.errors,
            first_error=r.first_error,
            elapsed_s=r.elapsed_s,
            calls_per_s=len(r.latencies_ns) / elapsed,
            p50_ms=percentile_ms(r.latencies_ns, 50),
            p90_ms=percentile_ms(r.latencies_ns, 90),
            p99_ms=percentile_ms(r.latencies_ns, 99),
            max_ms=max(r.latencies_ns) / 1e6,
            stream_total_p50_ms=percentile_ms(r.totals_ns, 50) if r.totals_ns else None,
            client_cpu_s=r.client_cpu_s,
            client_busy=r.client_cpu_s / elapsed,
            mesh_cpu_s=m.mesh_cpu_s,
            other_busy=m.other_cpu_s / elapsed,
            steal_busy=m.steal_cpu_s / elapsed,
        )

    def gateway_cpu_s(self) -> float:
        """CPU seconds of the gateway on this phase's path: LiteLLM's processes for the
        LiteLLM path, else every mesh process but the simulator."""
        if self.path == "litellm":
            return self.mesh_cpu_s[LITELLM_CHILD]
        return sum(
            v for name, v in self.mesh_cpu_s.items() if not name.startswith("sim-") and name != LITELLM_CHILD
        )

    def per_1k(self, seconds: float) -> float:
        """`seconds` spread over this phase's calls, per 1,000 calls."""
        return seconds / self.calls * 1000


def _find(phases: Sequence[PhaseStats], path: PathName, mode: Mode, concurrency: int) -> PhaseStats:
    for phase in phases:
        if (phase.path, phase.mode, phase.concurrency) == (path, mode, concurrency):
            return phase
    raise KeyError((path, mode, concurrency))


def _pair(phases: Sequence[PhaseStats], mode: Mode, concurrency: int) -> tuple[PhaseStats, PhaseStats]:
    return _find(phases, "direct", mode, concurrency), _find(phases, "edge", mode, concurrency)


def _levels(phases: Sequence[PhaseStats], mode: Mode) -> list[int]:
    return sorted({p.concurrency for p in phases if p.mode == mode})


def build(data: RunData, *, smoke: bool, config: dict[str, Any]) -> dict[str, Any]:
    """The whole report as JSON-ready data: label, config, placement, figures, added, phases, unmeasured.

    `figures` holds measured, positive numbers only (absolute values and edge/direct ratios);
    `added` holds the differences (edge minus direct, in ms) at the same percentile.
    """
    phases = [PhaseStats.of(m) for m in data.measured]
    figures: dict[str, float] = {}
    added: dict[str, float] = {}
    for mode, prefix, _ in ROWS:
        for c in _levels(phases, mode):
            direct, edge = _pair(phases, mode, c)
            for q in ("p50", "p99"):
                d, e = getattr(direct, f"{q}_ms"), getattr(edge, f"{q}_ms")
                figures[f"{prefix}_c{c}_{q}_ratio"] = e / d
                figures[f"{prefix}_c{c}_{q}_ms_direct"] = d
                figures[f"{prefix}_c{c}_{q}_ms_edge"] = e
                added[f"{prefix}_c{c}_{q}_added_ms"] = e - d
    top = _levels(phases, "unary")[-1]
    sat_direct, sat_edge = _pair(phases, "unary", top)
    figures["saturation_rps_ratio"] = sat_edge.calls_per_s / sat_direct.calls_per_s
    figures["saturation_rps_direct"] = sat_direct.calls_per_s
    figures["saturation_rps_edge"] = sat_edge.calls_per_s
    figures["cpu_s_per_1k_unary_gateway"] = sat_edge.per_1k(sat_edge.gateway_cpu_s())
    for name, phase in (("direct", sat_direct), ("edge", sat_edge)):
        figures[f"cpu_s_per_1k_unary_sim_{name}"] = phase.per_1k(phase.mesh_cpu_s[SIM_CHILD])
        figures[f"cpu_s_per_1k_unary_client_{name}"] = phase.per_1k(phase.client_cpu_s)
    for path, _ in ENVOY_PATHS:
        for mode, prefix, _ in ROWS[:2]:
            for c in _levels(phases, mode):
                direct, through = _find(phases, "direct", mode, c), _find(phases, path, mode, c)
                for q in ("p50", "p99"):
                    d, e = getattr(direct, f"{q}_ms"), getattr(through, f"{q}_ms")
                    figures[f"{path}_{prefix}_c{c}_{q}_ratio"] = e / d
                    figures[f"{path}_{prefix}_c{c}_{q}_ms"] = e
                    added[f"{path}_{prefix}_c{c}_{q}_added_ms"] = e - d
        saturated = _find(phases, path, "unary", top)
        figures[f"{path}_saturation_rps_ratio"] = saturated.calls_per_s / sat_direct.calls_per_s
        figures[f"{path}_saturation_rps"] = saturated.calls_per_s
        figures[f"{path}_cpu_s_per_1k_unary_gateway"] = saturated.per_1k(saturated.gateway_cpu_s())
    litellm = any(p.path == "litellm" for p in phases)
    if litellm:
        for mode, prefix, _ in ROWS[:2]:
            for c in _levels(phases, mode):
                direct, through = _find(phases, "direct", mode, c), _find(phases, "litellm", mode, c)
                edge = _find(phases, "edge", mode, c)
                for q in ("p50", "p99"):
                    d, e, ours = (getattr(x, f"{q}_ms") for x in (direct, through, edge))
                    figures[f"litellm_{prefix}_c{c}_{q}_ms"] = e
                    figures[f"litellm_{prefix}_c{c}_{q}_ratio"] = e / d
                    added[f"litellm_{prefix}_c{c}_{q}_added_ms"] = e - d
                    # How much less the edge adds than LiteLLM does (> 1: the edge adds less).
                    if ours - d > 0:
                        figures[f"litellm_{prefix}_c{c}_{q}_added_vs_edge"] = (e - d) / (ours - d)
        saturated = _find(phases, "litellm", "unary", top)
        figures["litellm_saturation_rps"] = saturated.calls_per_s
        figures["edge_vs_litellm_saturation_rps_ratio"] = sat_edge.calls_per_s / saturated.calls_per_s
        figures["litellm_cpu_s_per_1k_unary"] = saturated.per_1k(saturated.gateway_cpu_s())
    stream_edge = _find(phases, "edge", "stream", _levels(phases, "stream")[-1])
    figures["cpu_s_per_1k_streams_gateway"] = stream_edge.per_1k(stream_edge.gateway_cpu_s())
    figures["rss_mib_gateway_total"] = sum(
        kib / 1024
        for name, kib in data.rss_kib.items()
        if not name.startswith("sim-") and name != LITELLM_CHILD
    )

    def gateway_mib(rss: dict[str, int]) -> float:
        return (
            sum(kib for name, kib in rss.items() if not name.startswith("sim-") and name != LITELLM_CHILD)
            / 1024
        )

    if data.idle_open:
        figures["rss_mib_gateway_idle_streams"] = gateway_mib(data.idle_rss_kib)
        figures["idle_streams_open"] = data.idle_open
        grown = gateway_mib(data.idle_rss_kib) - gateway_mib(data.idle_rss_before_kib)
        if grown > 0:
            figures["rss_kib_per_idle_stream"] = grown * 1024 / data.idle_open
    if LITELLM_CHILD in data.rss_kib:
        figures["rss_mib_litellm"] = data.rss_kib[LITELLM_CHILD] / 1024
    figures["rss_mib_simulator"] = data.rss_kib[SIM_CHILD] / 1024
    return {
        "label": machine_label(),
        "smoke": smoke,
        "config": {
            **config,
            "saturation_concurrency": top,
            "simulator_knobs_unary": UNARY_KNOBS,
            "simulator_knobs_stream": STREAM_KNOBS,
            "direct_client": HTTP_CLIENT,
            "edge_client": GRPC_CLIENT,
            "envoy_clients": f"gRPC: {GRPC_CLIENT}; OpenAI HTTP: {HTTP_CLIENT}",
            "client_event_loop": "uvloop",
            "mesh": "switchyard run's plan: simulated vendors, free ports, Envoy in front (services call "
            "each other directly), logs to a temp file; every feature on: API-key auth, rate limits "
            "(a generous tier, checked on every request), an exact cache lookup on every gateway request "
            "(temperature 0, each prompt new: a miss, then the answer stored; a request the edge serves "
            "alone has its sure miss answered at the edge from the key presence the cache pushes; "
            "semantic matching off, "
            "its embedding is measured by `python -m bench.cache`), a hard daily budget on "
            "the tenant (held against the edge's lease, committed to the ledger), routing, and "
            f"tracing at {TRACE_SAMPLE_RATIO:.0%} sampling exported over OTLP "
            f"({data.spans_exported:,} spans in the run)",
        },
        "placement": dataclasses.asdict(data.placement) | {"mesh_processes": list(data.mesh_children)},
        "figures": figures,
        "added": added,
        # Where the CPU goes through the edge at saturation; some processes are 0 on this path.
        "cpu_s_per_1k_unary_edge_by_process": {
            name: round(sat_edge.per_1k(seconds), 3) for name, seconds in sat_edge.mesh_cpu_s.items()
        },
        "rss_mib": {name: round(kib / 1024, 1) for name, kib in data.rss_kib.items()},
        "idle_streams": {
            "asked": data.idle_asked,
            "open": data.idle_open,
            "errors": data.idle_errors,
            "rss_mib_before": {name: round(kib / 1024, 1) for name, kib in data.idle_rss_before_kib.items()},
            "rss_mib_held": {name: round(kib / 1024, 1) for name, kib in data.idle_rss_kib.items()},
        },
        "phases": [dataclasses.asdict(p) for p in phases],
        "unmeasured": [{"figure": f, "issues": i, "value": "UNMEASURED"} for f, i in UNMEASURED]
        + ([] if litellm else [{"figure": LITELLM_UNMEASURED, "issues": "#9", "value": "UNMEASURED"}]),
        "wall_s": round(data.wall_s, 1),
    }


def _git(*args: str) -> str:
    try:
        done = subprocess.run(("git", *args), cwd=REPO, capture_output=True, text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def machine_label() -> dict[str, Any]:
    """CPU model, core count, versions, git commit and date of this run."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _ms(value: float) -> str:
    return f"{value:.2f} ms" if value < 100 else f"{value:.0f} ms"


def _knobs(knobs: dict[str, Any]) -> str:
    return (
        f"{knobs['chunks']} chunk(s) {knobs['chunk_delay_ms']} ms apart, "
        f"{knobs['first_byte_delay_ms']} ms to first byte"
    )


def by_value(item: tuple[str, float]) -> float:
    return -item[1]


def _cores(cores: Sequence[int]) -> str:
    return ", ".join(str(c) for c in cores)


def row(*cells: str) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown: label, edge-vs-direct table, cost table, UNMEASURED rows."""
    label, config, place = report["label"], report["config"], report["placement"]
    fig, added = report["figures"], report["added"]
    phases = [PhaseStats(**p) for p in report["phases"]]
    commit = label["git_commit"] + (" (with uncommitted changes)" if label["git_dirty"] else "")
    pinned = "" if place["pinned"] else " (not pinned: fewer than 2 cores available)"
    lines = [f"# Switchyard bench, {label['date']}", ""]
    if report["smoke"]:
        lines += ["**SMOKE RUN: tiny counts; these numbers only show that the harness works.**", ""]
    noisiest = max(phases, key=lambda p: p.other_busy)
    if noisiest.other_busy > NOISY:
        lines += [
            f"**Noisy machine: processes outside this run used up to {noisiest.other_busy:.0%} of a core "
            f"during a measured phase ({noisiest.path} {noisiest.mode} c={noisiest.concurrency}); "
            "rerun on a quiet machine before trusting these numbers.**",
            "",
        ]
    lines += [
        f"- Machine: {label['cpu_model']}, {label['cores']} cores; Python {label['python']}, "
        f"grpcio {label['grpcio']}; commit {commit}.",
        f"- Placement{pinned}: the mesh ({', '.join(place['mesh_processes'])}, and the supervisor) "
        f"on core(s) {_cores(place['mesh_cores'])}; the load generator on core(s) "
        f"{_cores(place['loadgen_cores'])}.",
        f"- Clients, in the load generator on {config['client_event_loop']}: direct = "
        f"{config['direct_client']}; through the edge = {config['edge_client']}.",
        f"- Upstream: the OpenAI simulator. Unary: {_knobs(config['simulator_knobs_unary'])}. "
        f"Streaming: {_knobs(config['simulator_knobs_stream'])}. The edge's adapter always streams "
        "from the vendor; the direct unary call is a plain JSON completion.",
        f"- Mesh: {config['mesh']}. Each phase: {config['warmup_s']} s warm-up, then up to "
        f"{config['duration_s']} s or {config['max_requests']:,} calls; direct and edge interleaved.",
        "",
        "## Through the edge vs direct",
        "",
        row(
            "Figure",
            "Edge / direct",
            "Added by the edge",
            "Direct",
            "Through the edge",
            "Calls (direct / edge)",
        ),
        "|---|---:|---:|---:|---:|---:|",
    ]
    top = config["saturation_concurrency"]
    for mode, prefix, name in ROWS:
        for c in _levels(phases, mode):
            direct, edge = _pair(phases, mode, c)
            for q in ("p50", "p99"):
                key = f"{prefix}_c{c}_{q}"
                lines.append(
                    row(
                        f"{name} {q}, c={c}" + (" (saturation)" if mode == "unary" and c == top else ""),
                        f"{fig[key + '_ratio']:.2f}×",
                        f"{added[key + '_added_ms']:+.2f} ms",
                        _ms(fig[key + "_ms_direct"]),
                        _ms(fig[key + "_ms_edge"]),
                        f"{direct.calls:,} / {edge.calls:,}",
                    )
                )
    sat_direct, sat_edge = _pair(phases, "unary", top)
    stream_c = _levels(phases, "stream")[-1]
    lines += [
        row(
            f"Requests/s at saturation (unary, c={top})",
            f"{fig['saturation_rps_ratio']:.2f}×",
            "",
            f"{fig['saturation_rps_direct']:,.0f}/s",
            f"{fig['saturation_rps_edge']:,.0f}/s",
            f"{sat_direct.calls:,} / {sat_edge.calls:,}",
        ),
        "",
    ]
    for phase in (sat_direct, sat_edge):
        if phase.client_busy > 0.9:
            lines.append(
                f"Note: the load generator kept its core {phase.client_busy:.0%} busy on the {phase.path} "
                f"path at c={top}, so that path's requests/s is bounded by the client (a lower bound)."
            )
    lines += ["", "## Through Envoy vs direct", ""]
    lines += [
        row("Figure", "Through Envoy / direct", "Added", "Direct", "Through Envoy", "Calls"),
        "|---|---:|---:|---:|---:|---:|",
    ]
    for path, path_name in ENVOY_PATHS:
        for mode, prefix, name in ROWS[:2]:
            for c in _levels(phases, mode):
                through = _find(phases, path, mode, c)
                for q in ("p50", "p99"):
                    key = f"{path}_{prefix}_c{c}_{q}"
                    lines.append(
                        row(
                            f"{path_name}: {name.lower()} {q}, c={c}",
                            f"{fig[key + '_ratio']:.2f}×",
                            f"{added[key + '_added_ms']:+.2f} ms",
                            _ms(fig[f"{prefix}_c{c}_{q}_ms_direct"]),
                            _ms(fig[key + "_ms"]),
                            f"{through.calls:,}",
                        )
                    )
        lines.append(
            row(
                f"{path_name}: requests/s at saturation (unary, c={top})",
                f"{fig[path + '_saturation_rps_ratio']:.2f}×",
                "",
                f"{fig['saturation_rps_direct']:,.0f}/s",
                f"{fig[path + '_saturation_rps']:,.0f}/s",
                "",
            )
        )
        lines.append(
            row(
                f"{path_name}: CPU s per 1,000 unary requests, gateway processes with Envoy, c={top}",
                "",
                "",
                "",
                f"{fig[path + '_cpu_s_per_1k_unary_gateway']:.3f}",
                "",
            )
        )
    if any(p.path == "litellm" for p in phases):
        lines += ["", "## Switchyard vs LiteLLM", ""]
        lines += [
            "LiteLLM proxy (`bench/litellm/requirements.txt`, one model pointed at the same simulator, no "
            "database, telemetry off, a master key) with as many workers as the mesh has cores, on those "
            "cores; the OpenAI wire format by the same aiohttp client as the direct path.",
            "",
            row(
                "Figure",
                "Added by LiteLLM",
                "Added by the edge",
                "LiteLLM adds / the edge adds",
                "Through LiteLLM",
                "Calls",
            ),
            "|---|---:|---:|---:|---:|---:|",
        ]
        for mode, prefix, name in ROWS[:2]:
            for c in _levels(phases, mode):
                through = _find(phases, "litellm", mode, c)
                for q in ("p50", "p99"):
                    key = f"{prefix}_c{c}_{q}"
                    versus = fig.get(f"litellm_{key}_added_vs_edge")
                    lines.append(
                        row(
                            f"{name} {q}, c={c}",
                            f"{added['litellm_' + key + '_added_ms']:+.2f} ms",
                            f"{added[key + '_added_ms']:+.2f} ms",
                            f"{versus:.2f}×" if versus is not None else "",
                            _ms(fig[f"litellm_{key}_ms"]),
                            f"{through.calls:,}",
                        )
                    )
        lines += [
            row(
                f"Requests/s at saturation (unary, c={top}): edge / LiteLLM",
                f"{fig['litellm_saturation_rps']:,.0f}/s",
                f"{fig['saturation_rps_edge']:,.0f}/s",
                f"edge {fig['edge_vs_litellm_saturation_rps_ratio']:.2f}× LiteLLM",
                "",
                "",
            ),
            row(
                f"CPU s per 1,000 unary requests, c={top}: LiteLLM / the mesh",
                f"{fig['litellm_cpu_s_per_1k_unary']:.3f}",
                f"{fig['cpu_s_per_1k_unary_gateway']:.3f}",
                "",
                "",
                "",
            ),
        ]
    lines += [
        "",
        "## Cost",
        "",
        "| Figure | Value |",
        "|---|---:|",
        row(
            f"CPU s per 1,000 unary requests, gateway processes (all but the simulator), c={top}",
            f"{fig['cpu_s_per_1k_unary_gateway']:.3f}",
        ),
        row(
            f"… by process (through the edge, c={top})",
            ", ".join(
                f"{name} {value:.3f}"
                for name, value in sorted(report["cpu_s_per_1k_unary_edge_by_process"].items(), key=by_value)
            ),
        ),
        row(
            "CPU s per 1,000 unary requests, simulator: direct / through the edge",
            f"{fig['cpu_s_per_1k_unary_sim_direct']:.3f} / {fig['cpu_s_per_1k_unary_sim_edge']:.3f}",
        ),
        row(
            "CPU s per 1,000 unary requests, load-generator client: direct / through the edge",
            f"{fig['cpu_s_per_1k_unary_client_direct']:.3f} / {fig['cpu_s_per_1k_unary_client_edge']:.3f}",
        ),
        row(
            "Load generator busy at saturation (share of its core): direct / through the edge",
            f"{sat_direct.client_busy:.0%} / {sat_edge.client_busy:.0%}",
        ),
        row(
            f"CPU s per 1,000 streams (20 chunks), gateway processes, c={stream_c}",
            f"{fig['cpu_s_per_1k_streams_gateway']:.3f}",
        ),
        row(
            "Resident memory (VmRSS) after the run, gateway processes total",
            f"{fig['rss_mib_gateway_total']:.0f} MiB",
        ),
        row(
            "Resident memory per process (MiB)",
            ", ".join(f"{name} {mib:.0f}" for name, mib in report["rss_mib"].items()),
        ),
        _idle_row(report),
        row(
            "Noise: busiest phase for processes outside this run (share of one core); most stolen",
            f"{noisiest.other_busy:.0%} ({noisiest.path} {noisiest.mode} c={noisiest.concurrency}); "
            f"{max(p.steal_busy for p in phases):.0%}",
        ),
        "",
        "Planning, cache lookups and the ledger are measured on their own, by `make bench` after this"
        " report (`python -m bench.scale`, in `scale-latest.md`): planning at 10 / 100 / 1,000 models,"
        " cache lookups at 1,000 / 100,000 entries (exact and semantic), reserve+commit pairs per"
        " second (in-memory and Redis budgets).",
        "",
    ]
    if report["unmeasured"]:
        lines += [
            "## Not measured yet",
            "",
            "| Figure | Value | Owner |",
            "|---|---|---|",
            *(row(u["figure"], u["value"], u["issues"]) for u in report["unmeasured"]),
            "",
        ]
    failed = [p for p in phases if p.errors]
    if failed:
        lines += ["## Errors", ""]
        lines += [
            f"- {p.path} {p.mode} c={p.concurrency}: {p.errors} failed; first: {p.first_error}"
            for p in failed
        ]
        lines.append("")
    return "\n".join(lines)


def _idle_row(report: dict[str, Any]) -> str:
    idle, fig = report["idle_streams"], report["figures"]
    name = f"Resident memory with {idle['asked']:,} open idle streams (edge, gRPC), gateway processes"
    if not idle["open"]:
        return row(name, f"none stayed open ({idle['errors'] or 'no error reported'})")
    per = fig.get("rss_kib_per_idle_stream")
    value = f"{fig['rss_mib_gateway_idle_streams']:.0f} MiB"
    value += f" ({idle['open']:,} open; +{per:.0f} KiB per stream)" if per else f" ({idle['open']:,} open)"
    if idle["errors"]:
        value += f"; {idle['errors']}"
    return row(name, value)


def run_arguments(parser: argparse.ArgumentParser, *, smoke: str, duration: str, out: Path) -> None:
    """Add the options every mesh benchmark takes: `--smoke` (its help `smoke`), `--duration-s`
    (its help `duration`) and `--out` (default `out`)."""
    parser.add_argument("--smoke", action="store_true", help=smoke)
    parser.add_argument("--duration-s", type=float, default=None, help=duration)
    parser.add_argument("--out", type=Path, default=out, help="output directory (default bench/results)")


def write(report: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write latest.{json,md} and a timestamped copy of each under `out`; return the latest pair."""
    return write_named(report, markdown(report), out, "bench", latest="latest")


def write_named(
    result: dict[str, Any], text: str, out: Path, name: str, *, latest: str | None = None
) -> tuple[Path, Path]:
    """Write `result` as JSON and `text` as markdown under `out`, as `<latest>.{json,md}` (default
    `<name>-latest`) and a copy named `<name>-<date of its label>`; return the latest pair."""
    out.mkdir(parents=True, exist_ok=True)
    payload = json.dumps(result, indent=2) + "\n"
    stamp = result["label"]["date"].replace(":", "").replace("-", "")
    latest = latest or f"{name}-latest"
    for base in (latest, f"{name}-{stamp}"):
        (out / f"{base}.json").write_text(payload)
        (out / f"{base}.md").write_text(text)
    return out / f"{latest}.json", out / f"{latest}.md"
