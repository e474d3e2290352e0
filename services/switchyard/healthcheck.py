"""`switchyard healthcheck`: ask a server's standard gRPC health service whether it is SERVING.

    switchyard healthcheck [--target HOST:PORT] [--service NAME] [--timeout SECONDS]

The image's HEALTHCHECK runs it. The target defaults to 127.0.0.1 and `SWITCHYARD_PORT` (50051
when unset), the service to "" (the server as a whole), the timeout to 2 seconds. It makes one
`grpc.health.v1.Health/Check` call over a plain insecure channel and prints one line: `SERVING`
on stdout and exit 0, or the status (`NOT_SERVING`) or the gRPC error code (`UNAVAILABLE` when
nothing listens, `NOT_FOUND` for an unknown service, `DEADLINE_EXCEEDED` on timeout) with the
target on stderr and exit 1. It never prints a traceback, and never exits 2 (which Docker
reserves) for a failed check.

Also runnable as `python -m switchyard.healthcheck ...`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Final

PROG = "switchyard healthcheck"
DESCRIPTION = "Check a server's gRPC health service; exit 0 only when it is SERVING."
DEFAULT_PORT: Final = 50051
DEFAULT_TIMEOUT_S: Final = 2.0


class HealthcheckError(Exception):
    """The check cannot run as configured (for example SWITCHYARD_PORT is not a port)."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `healthcheck` to the `switchyard` command's subparsers; its handler is `run`."""
    parser = commands.add_parser("healthcheck", help="check a server's gRPC health", description=DESCRIPTION)
    add_arguments(parser)
    parser.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m switchyard.healthcheck ...`: the same as `switchyard healthcheck ...`."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `healthcheck` options under `parser`."""
    parser.add_argument(
        "--target",
        help=f"HOST:PORT of the server (default 127.0.0.1:$SWITCHYARD_PORT, else 127.0.0.1:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--service", default="", help='the service name to check (default "": the server as a whole)'
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT_S,
        help=f"deadline in seconds (default {DEFAULT_TIMEOUT_S:g})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the parsed check; returns the exit status (0 SERVING, 1 anything else)."""
    try:
        target: str = args.target or default_target(os.environ)
    except HealthcheckError as exc:
        return _fail(str(exc))
    return check(target, service=args.service, timeout_s=args.timeout)


def default_target(environ: Mapping[str, str]) -> str:
    """127.0.0.1 and SWITCHYARD_PORT, or the edge's default port when it is unset or empty."""
    raw = environ.get("SWITCHYARD_PORT", "").strip()
    if not raw:
        return f"127.0.0.1:{DEFAULT_PORT}"
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port <= 65535:
        raise HealthcheckError(f"SWITCHYARD_PORT must be a port number (1-65535), got {raw!r}")
    return f"127.0.0.1:{port}"


def check(target: str, *, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """One Health/Check call to `target` for `service`; prints one line and returns 0 or 1."""
    # grpc loads only when a check runs, so that registering `healthcheck` costs the other
    # `switchyard` commands nothing.
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    where = target if not service else f"{target} service {service!r}"
    try:
        # No proxy from the environment: the check is about this container's own server.
        with grpc.insecure_channel(target, options=[("grpc.enable_http_proxy", 0)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        name = code.name if code is not None else "UNKNOWN"
        details = exc.details() if isinstance(exc, grpc.Call) else None
        return _fail(f"{name}: {where}" + (f": {_one_line(details)}" if details else ""))
    except Exception as exc:  # a malformed target and the like: one line, never a traceback
        return _fail(f"ERROR: {where}: {type(exc).__name__}: {_one_line(str(exc))}")
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
    if response.status != health_pb2.HealthCheckResponse.SERVING:
        return _fail(f"{status}: {where}")
    print(f"SERVING: {where}")
    return 0


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds above 0: {text!r}")
    return value


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
