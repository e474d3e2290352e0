"""Command line: ``python -m switchyard.sim VENDOR [--host H] [--port P]``.

Prints exactly one line, ``listening http://HOST:PORT``, once the socket is
bound, then serves until SIGTERM/SIGINT and exits 0. Vendors come from the
:data:`switchyard.sim.faults.SIMULATORS` table (one row per vendor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

from switchyard.sim.faults import SIMULATORS, FaultKnobs, KnobError, start_simulator


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="switchyard sim",
        description="Run a vendor API simulator (for tests, demos and benchmarks).",
    )
    parser.add_argument("vendor", choices=sorted(SIMULATORS), help="which vendor API to simulate")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="port to bind; 0 picks a free one (default 0)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' on API requests",
    )
    parser.add_argument("--knobs", default=None, help="start-up fault knobs as a JSON object")
    return parser


async def _serve(vendor: str, host: str, port: int, knobs: FaultKnobs | None, api_key: str | None) -> int:
    sim = await start_simulator(vendor, host=host, port=port, knobs=knobs, api_key=api_key)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        display_host = f"[{sim.host}]" if ":" in sim.host else sim.host
        sys.stdout.write(f"listening http://{display_host}:{sim.port}\n")
        sys.stdout.flush()
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(sig)
        await sim.close()
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (faster baseline for benchmarks), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    """Run the simulator CLI; returns the process exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help / usage errors: return the code instead of exiting
        return exc.code if isinstance(exc.code, int) else 2
    knobs: FaultKnobs | None = None
    if args.knobs:
        try:
            knobs = FaultKnobs.from_json(args.knobs)
        except KnobError as exc:
            sys.stderr.write(f"switchyard sim: invalid --knobs: {exc}\n")
            return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            return runner.run(_serve(args.vendor, args.host, args.port, knobs, args.api_key))
    except KeyboardInterrupt:
        return 0
    except OSError as exc:
        sys.stderr.write(f"switchyard sim: cannot listen on {args.host}:{args.port}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
