"""The `switchyard` command: serve one service, run the whole mesh, chat with it.

    switchyard serve edge|router|ledger|health|cache
    switchyard serve adapter --vendor openai
    switchyard run                      # the whole mesh on this machine
    switchyard chat "hello" --stream    # a client of the edge
    switchyard erase-end-user --tenant acme --end-user alice   # GDPR: the ledger, then the cache
    switchyard sim openai --port 0      # a vendor simulator
    switchyard envoy --upstream edge=host:50051 ...   # Envoy for these upstreams (the chart's)
    switchyard healthcheck              # exit 0 when the local service is SERVING

Expected failures (a bad catalog, an unreachable edge, an empty prompt) print one clear
line on stderr and exit non-zero; they never print a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from switchyard.common.catalog import VENDORS, CatalogError
from switchyard.common.settings import LOCAL_DEV_KEY, SERVICES, Settings, SettingsError


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `switchyard` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        result: int = args.handler(args)
        return result
    except (CatalogError, SettingsError) as exc:
        print(f"switchyard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="switchyard", description="A gRPC-native LLM gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="start one service")
    serve.add_argument("service", choices=SERVICES)
    serve.add_argument("--vendor", choices=VENDORS, help="the vendor an adapter speaks (serve adapter only)")
    serve.add_argument("--host", help="address to listen on (default SWITCHYARD_HOST or 127.0.0.1)")
    serve.add_argument(
        "--port", type=int, help="port to listen on (default SWITCHYARD_PORT or the service's)"
    )
    serve.set_defaults(handler=_serve)

    run = commands.add_parser("run", help="start the whole mesh on this machine")
    run.add_argument("--free-ports", action="store_true", help="pick free ports instead of the defaults")
    run.add_argument("--simulate", action="store_true", help="use simulated vendors even when keys are set")
    run.add_argument(
        "--via-envoy",
        action="store_true",
        help="services call each other through Envoy's mesh listener, as in a cluster",
    )
    run.add_argument("--ready-timeout", type=float, default=60.0, help="seconds to wait for every service")
    run.set_defaults(handler=_run)

    chat = commands.add_parser("chat", help="send a prompt to the edge and print the answer")
    chat.add_argument("prompt")
    chat.add_argument("--model", default="", help="vendor/model, an alias, or auto (default: the catalog's)")
    chat.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    chat.add_argument("--system", default="", help="a system prompt")
    chat.add_argument("--max-tokens", type=int, help="upper bound on generated tokens")
    chat.add_argument("--temperature", type=float)
    chat.add_argument(
        "--target",
        default=os.environ.get("SWITCHYARD_TARGET", "127.0.0.1:8080"),
        help="the Envoy ingress or the edge (default SWITCHYARD_TARGET or 127.0.0.1:8080)",
    )
    chat.add_argument(
        "--api-key",
        default=os.environ.get("SWITCHYARD_API_KEY", LOCAL_DEV_KEY),
        help="default SWITCHYARD_API_KEY, else the key `switchyard run` prints",
    )
    chat.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    chat.set_defaults(handler=_chat)

    from switchyard.keys_cli import register as register_keys

    register_keys(commands)

    from switchyard.erasure_cli import register as register_erasure

    register_erasure(commands)

    from switchyard.envoy_config import register as register_envoy
    from switchyard.healthcheck import register as register_healthcheck

    register_envoy(commands)
    register_healthcheck(commands)

    sim = commands.add_parser("sim", help="start a vendor simulator", add_help=False)
    sim.add_argument("rest", nargs=argparse.REMAINDER)
    sim.set_defaults(handler=_sim)
    return parser


def _run_async(factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.run(factory())
    result: int = uvloop.run(factory())
    return result


def _serve(args: argparse.Namespace) -> int:
    from switchyard.common.logging import configure_logging
    from switchyard.common.server import serve
    from switchyard.common.tracing import configure_tracing, shutdown_tracing

    if args.service == "adapter" and not args.vendor:
        print("switchyard: error: serve adapter needs --vendor", file=sys.stderr)
        return 2
    if args.service != "adapter" and args.vendor:
        print("switchyard: error: --vendor applies to serve adapter only", file=sys.stderr)
        return 2
    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    settings = Settings.from_env(**overrides)
    label = f"adapter-{args.vendor}" if args.vendor else args.service
    configure_logging(label, level=settings.log_level, json=settings.log_json)
    settings.catalog  # noqa: B018 - fail fast on a bad catalog, before binding a port

    async def main() -> int:
        configure_tracing(label, endpoint=settings.otel_endpoint)
        # Built inside the loop: grpc.aio channels bind to the loop that exists when they are made.
        parts = _build_parts(args.service, args.vendor, settings)
        closers = [parts.close] if parts.close else []
        try:
            if parts.start is not None:
                await parts.start()
            await serve(
                label,
                parts.bindings,
                host=settings.host,
                port=settings.port_for(args.service, args.vendor),
                grace_s=settings.shutdown_grace_s,
                on_shutdown=closers,
                on_drain=[parts.drain] if parts.drain else [],
            )
        except OSError as exc:
            print(f"switchyard: error: {label}: {exc}", file=sys.stderr)
            return 1
        finally:
            shutdown_tracing()
        return 0

    return _run_async(main)


def _build_parts(service: str, vendor: str | None, settings: Settings) -> Any:
    if service == "adapter":
        from switchyard.adapters.service import adapter_parts

        return adapter_parts(settings, vendor or "openai")
    builders = {
        "edge": "switchyard.edge.service",
        "router": "switchyard.router.service",
        "ledger": "switchyard.ledger.service",
        "health": "switchyard.health.service",
        "cache": "switchyard.cache.service",
    }
    import importlib

    return importlib.import_module(builders[service]).build(settings)


def _run(args: argparse.Namespace) -> int:
    from switchyard.local_mesh import run_mesh

    return _run_async(
        lambda: run_mesh(
            free_ports=args.free_ports,
            simulate=args.simulate,
            via_envoy=args.via_envoy,
            ready_timeout_s=args.ready_timeout,
        )
    )


def _chat(args: argparse.Namespace) -> int:
    from switchyard.chat_client import chat

    return _run_async(lambda: chat(args))


def _sim(args: argparse.Namespace) -> int:
    from switchyard.sim.__main__ import main as sim_main

    return sim_main(list(args.rest))


if __name__ == "__main__":
    sys.exit(main())
