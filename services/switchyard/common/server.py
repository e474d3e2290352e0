"""The gRPC server bootstrap every service uses.

`build_server` makes a `grpc.aio` server with the standard health service, server
reflection and the cross-cutting interceptors (tracing, then error mapping); `serve` runs
it until SIGTERM/SIGINT and then shuts down gracefully: long-lived streams are drained
(`ServiceParts.drain`: they end once their work is done), health flips to NOT_SERVING, new
calls are refused, in-flight calls get `shutdown_grace_s` to finish, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from switchyard.common import tracing
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger

log = get_logger(__name__)

# Message size bound for every server and channel: large prompts with images fit.
MAX_MESSAGE_BYTES: Final = 32 * 1024 * 1024

SERVER_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.so_reuseport", 0),
)


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to serve: its full name and how to add its servicer to a server."""

    name: str
    register: Callable[[grpc.aio.Server], None]


@dataclass(frozen=True)
class ServiceParts:
    """What a service contributes to a server: its bindings and what to close on shutdown."""

    bindings: Sequence[ServiceBinding]
    close: Callable[[], Awaitable[None]] | None = None
    # Awaited before the server binds its port (and so before it reports SERVING).
    start: Callable[[], Awaitable[None]] | None = None
    # Called when shutdown begins, before in-flight calls get their grace period: long-lived
    # calls stop taking new work and end once their work is done.
    drain: Callable[[], None] | None = None


class ErrorInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Turns exceptions raised by handlers into rich gRPC statuses.

    A `SwitchyardError` becomes its status with ErrorInfo/RetryInfo details. Anything else
    is a bug: it is logged (type and traceback, never arguments) and returned as INTERNAL
    with reason INTERNAL, so no handler can crash the process or leak internals.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                _wrap_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, SwitchyardError):
        error = exc
    else:
        trace_id = tracing.current_trace_id() or ""
        log.error("handler_failed", method=method, error_type=type(exc).__name__, exc_info=exc)
        error = SwitchyardError(
            grpc.StatusCode.INTERNAL,
            Reason.INTERNAL,
            "internal error",
            metadata={"trace_id": trace_id} if trace_id else None,
        )
    await context.abort(error.code, error.message, trailing_metadata=error.trailing_metadata())


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)
            raise  # unreachable: abort raises

    return unary


def _wrap_stream(
    behavior: Callable[..., AsyncGenerator[Any, None]], method: str
) -> Callable[..., AsyncIterator[Any]]:
    async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        iterator = behavior(request, context)
        try:
            async for item in iterator:
                yield item
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:
            await _abort(context, exc, method)
        finally:
            await iterator.aclose()

    return stream


@dataclass
class RunningServer:
    """A started server, its bound port and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: tuple[str, ...]

    async def stop(self, grace_s: float) -> None:
        """Flip health to NOT_SERVING, then drain in-flight calls for up to `grace_s`."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def build_server(
    bindings: Sequence[ServiceBinding],
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Create, bind and start a server for `bindings`; port 0 picks a free port.

    Health reports SERVING for each service and for the server as a whole ("") once started.
    """
    interceptors: list[grpc.aio.ServerInterceptor] = tracing.server_interceptors()
    interceptors.append(ErrorInterceptor())
    interceptors.extend(extra_interceptors)
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    for binding in bindings:
        binding.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(b.name for b in bindings)
    reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError:  # grpcio reports a failed bind as RuntimeError
        bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {host}:{port}: the address is in use or unavailable")
    await server.start()
    for name in (*names, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, port=bound, health=health_servicer, service_names=names)


async def serve(
    service: str,
    bindings: Sequence[ServiceBinding],
    *,
    host: str,
    port: int,
    grace_s: float,
    on_started: Callable[[RunningServer], Awaitable[None]] | None = None,
    on_shutdown: Sequence[Callable[[], Awaitable[None]]] = (),
    on_drain: Sequence[Callable[[], None]] = (),
) -> None:
    """Run a service until SIGTERM or SIGINT, then shut down gracefully and return: `on_drain`
    first, then in-flight calls get `grace_s`, then `on_shutdown`."""
    running = await build_server(bindings, host=host, port=port)
    log.info(
        "server_started", service=service, host=host, port=running.port, services=list(running.service_names)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_started is not None:
            await on_started(running)
        await stop.wait()
        log.info("server_stopping", service=service, grace_s=grace_s)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for drain in on_drain:
            drain()
        await running.stop(grace_s)
        for close in on_shutdown:
            await close()
        log.info("server_stopped", service=service)
