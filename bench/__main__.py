"""Command line: `python -m bench [--smoke] [--duration-s S] [--out DIR]`.

Starts the local mesh with simulated vendors, runs the load generator in its own process,
writes `latest.json` / `latest.md` (and a timestamped copy of each) under `--out`, and
prints the markdown table. `--smoke` uses tiny counts (about 10 s in all) so that
`make test` keeps the harness working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from bench import harness, report

DEFAULT_OUT = Path(__file__).resolve().parent / "results"
UNARY_CONCURRENCY = (1, 16, 64)  # the last one is the saturation point
STREAM_CONCURRENCY = (1, 32)  # the time-to-first-token targets are set at 1 and 32 streams


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    report.run_arguments(
        parser,
        smoke="tiny counts (~10 s), to check the harness works",
        duration="measured seconds per phase (default 8; smoke 0.4)",
        out=DEFAULT_OUT,
    )
    parser.add_argument(
        "--litellm",
        choices=("auto", "on", "off"),
        default="auto",
        help="compare with a LiteLLM proxy (auto: when `make bench-litellm` installed it; never in --smoke)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; returns the process exit code."""
    args = _parser().parse_args(argv)
    duration_s = args.duration_s if args.duration_s is not None else (0.4 if args.smoke else 8.0)
    if duration_s <= 0:
        print("bench: --duration-s must be positive", file=sys.stderr)
        return 2
    warmup_s = 0.1 if args.smoke else min(1.0, duration_s / 4)
    # Smoke: enough calls for the CPU counters (10 ms ticks) to move, still about 10 s in all.
    max_requests = 2_000 if args.smoke else 200_000
    config = {"duration_s": duration_s, "warmup_s": warmup_s, "max_requests": max_requests}
    installed = harness.LITELLM_BIN.exists()
    if args.litellm == "on" and not installed:
        print(f"bench: no LiteLLM at {harness.LITELLM_BIN}: run `make bench-litellm`", file=sys.stderr)
        return 2
    compare = args.litellm == "on" or (args.litellm == "auto" and installed and not args.smoke)
    data = asyncio.run(
        harness.run(
            duration_s=duration_s,
            warmup_s=warmup_s,
            max_requests=max_requests,
            unary_concurrency=UNARY_CONCURRENCY,
            stream_concurrency=STREAM_CONCURRENCY,
            compare_litellm=compare,
            idle_streams=50 if args.smoke else harness.IDLE_STREAMS,
        )
    )
    result = report.build(data, smoke=args.smoke, config=config)
    json_path, md_path = report.write(result, args.out)
    print(report.markdown(result))
    print(f"wrote {json_path} and {md_path} ({result['wall_s']} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
