"""OpenTelemetry tracing for every Switchyard service.

Usage::

    configure_tracing("router")            # on if OTEL_EXPORTER_OTLP_ENDPOINT is set
    server = grpc.aio.server(interceptors=server_interceptors())
    channel = grpc.aio.insecure_channel(target, interceptors=client_interceptors())
    ...
    shutdown_tracing()                     # on graceful shutdown (bounded, ~5 s)

Design notes:

* Tracing is OFF unless an OTLP endpoint is given (argument or
  ``OTEL_EXPORTER_OTLP_ENDPOINT``). When off nothing is installed:
  :func:`client_interceptors` / :func:`server_interceptors` return ``[]``,
  :class:`TracingServerInterceptor` hands back the original handler, and
  :func:`get_tracer` yields no-op spans.
* The SDK ``TracerProvider`` is kept in this module (not in the OpenTelemetry
  global, which can only be set once per process), so tracing can be
  reconfigured -- tests do this. Tracers from :func:`get_tracer` resolve the
  current provider on every span start, so module-level tracers are fine.
  The global *propagator* is set to W3C TraceContext.
* grpc.aio client interceptors are bound at channel creation: channels created
  before :func:`configure_tracing` are not traced.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import re
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from types import MappingProxyType
from typing import Any, TypeVar

import grpc
import grpc.aio
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import (
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util import types as otel_types
from opentelemetry.util._decorator import _agnosticcontextmanager

from switchyard.common.settings import trace_sample_ratio

__all__ = [
    "TracingServerInterceptor",
    "client_interceptors",
    "configure_tracing",
    "current_trace_id",
    "force_flush",
    "get_tracer",
    "inject_metadata",
    "server_interceptors",
    "shutdown_tracing",
    "tracing_enabled",
]

ENDPOINT_ENV = "OTEL_EXPORTER_OTLP_ENDPOINT"
SAMPLER_ARG_ENV = "OTEL_TRACES_SAMPLER_ARG"
SERVICE_PREFIX = "switchyard-"
SHUTDOWN_TIMEOUT_S = 5.0

_PROPAGATOR = TraceContextTextMapPropagator()
_PROPAGATION_KEYS = frozenset({"traceparent", "tracestate"})
_STATUS_BY_INT: dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}
# A version-00 `traceparent` whose flags leave the sampled bit clear.
_MAX_WRAPPED_METHODS = 1024
_UNSAMPLED_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f][02468ace])")

_T = TypeVar("_T")


class _State:
    def __init__(self) -> None:
        self.provider: TracerProvider | None = None
        self.tracers: dict[str, trace.Tracer] = {}
        self.lock = threading.Lock()


_STATE = _State()
_NOOP_TRACER = trace.NoOpTracer()


# --------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------


def _sample_ratio(sample_ratio: float | None) -> float:
    if sample_ratio is None:
        return trace_sample_ratio(os.environ)
    return min(1.0, max(0.0, sample_ratio))


def configure_tracing(
    service: str,
    *,
    endpoint: str | None = None,
    sample_ratio: float | None = None,
    exporter: SpanExporter | None = None,
) -> bool:
    """Turn tracing on for *service* (resource ``service.name=switchyard-<service>``).

    *endpoint* defaults to ``$OTEL_EXPORTER_OTLP_ENDPOINT`` (e.g.
    ``http://127.0.0.1:4317``); OTLP/gRPC, insecure for ``http://``. If neither
    an endpoint nor an *exporter* is given, tracing stays OFF and ``False`` is
    returned. *sample_ratio* defaults to ``$OTEL_TRACES_SAMPLER_ARG`` or 1.0
    (``ParentBased(TraceIdRatioBased)``).

    *exporter* replaces the OTLP exporter (tests use an ``InMemorySpanExporter``;
    spans still go through a ``BatchSpanProcessor``, so call
    :func:`force_flush` before asserting).

    Calling again replaces (and shuts down) the previous provider.
    """
    if exporter is None:
        if endpoint is None:
            endpoint = os.environ.get(ENDPOINT_ENV, "")
        endpoint = endpoint.strip()
        if not endpoint:
            return False
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))

    provider = TracerProvider(
        resource=Resource.create({"service.name": f"{SERVICE_PREFIX}{service}"}),
        sampler=ParentBased(TraceIdRatioBased(_sample_ratio(sample_ratio))),
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    propagate.set_global_textmap(_PROPAGATOR)

    with _STATE.lock:
        old, _STATE.provider = _STATE.provider, provider
        _STATE.tracers = {}
    if old is not None:
        _run_bounded(old.shutdown, SHUTDOWN_TIMEOUT_S)
    return True


def tracing_enabled() -> bool:
    """True between a successful :func:`configure_tracing` and :func:`shutdown_tracing`."""
    return _STATE.provider is not None


def _run_bounded(fn: Callable[[], object], timeout: float) -> bool:
    """Run a possibly-blocking SDK call in a daemon thread, waiting at most *timeout*."""
    done = threading.Event()

    def target() -> None:
        try:
            fn()
        finally:
            done.set()

    threading.Thread(target=target, name="switchyard-otel-flush", daemon=True).start()
    return done.wait(timeout)


def force_flush(timeout: float = SHUTDOWN_TIMEOUT_S) -> bool:
    """Export pending spans; blocks the calling thread up to *timeout* seconds.

    If the collector is served from the current event loop (tests), call it
    via ``await asyncio.to_thread(force_flush)``.
    """
    provider = _STATE.provider
    if provider is None:
        return True
    return _run_bounded(provider.force_flush, timeout)


def shutdown_tracing(timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Flush and shut down the provider; tracing is OFF afterwards.

    Blocks at most *timeout* seconds even if the collector is gone (the SDK's
    own shutdown may retry for longer; it is left to finish in a daemon thread).
    """
    with _STATE.lock:
        provider, _STATE.provider = _STATE.provider, None
        _STATE.tracers = {}
    if provider is not None:
        _run_bounded(provider.shutdown, timeout)


# --------------------------------------------------------------------------
# Tracers
# --------------------------------------------------------------------------


def _resolve_tracer(name: str) -> trace.Tracer:
    provider = _STATE.provider
    if provider is None:
        return _NOOP_TRACER
    tracer = _STATE.tracers.get(name)
    if tracer is None:
        tracer = _STATE.tracers.setdefault(name, provider.get_tracer(name))
    return tracer


class _SwitchyardTracer(trace.Tracer):
    """Tracer that resolves the currently configured provider at span start."""

    def __init__(self, name: str) -> None:
        self._name = name

    def start_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: otel_types.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> Span:
        return _resolve_tracer(self._name).start_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            links=links,
            start_time=start_time,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        )

    @_agnosticcontextmanager
    def start_as_current_span(
        self,
        name: str,
        context: Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: otel_types.Attributes = None,
        links: Sequence[trace.Link] | None = None,
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[Span]:
        with _resolve_tracer(self._name).start_as_current_span(
            name,
            context=context,
            kind=kind,
            attributes=attributes,
            links=links,
            start_time=start_time,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
            end_on_exit=end_on_exit,
        ) as span:
            yield span


def get_tracer(name: str = "switchyard") -> trace.Tracer:
    """Tracer bound to the current configuration (no-op while tracing is off)."""
    return _SwitchyardTracer(name)


_RPC_TRACER = _SwitchyardTracer("switchyard.grpc")


def current_trace_id() -> str | None:
    """Lowercase hex trace id of the current valid span, else ``None``."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else None


def current_traceparent() -> str:
    """The W3C ``traceparent`` of the current span, or "" when there is none (tracing off).

    For work that leaves the request (a batched ledger commit) but belongs in its trace."""
    if _STATE.provider is None:
        return ""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def record_span_in(
    traceparent: str,
    name: str,
    *,
    start_time_ns: int,
    attributes: otel_types.Attributes = None,
    tracer_name: str = "switchyard",
    kind: SpanKind = SpanKind.INTERNAL,
    code: grpc.StatusCode | None = None,
    details: str | None = None,
) -> None:
    """Record a finished span (INTERNAL unless told), from `start_time_ns` to now, as a child
    of `traceparent`; with `code`, the gRPC status of the work it stands for (an RPC carried as
    a message on a shared stream is recorded as a SERVER span with its status).

    Nothing happens when tracing is off or `traceparent` is empty, unsampled or malformed."""
    if _STATE.provider is None or not traceparent or _UNSAMPLED_TRACEPARENT.fullmatch(traceparent):
        return
    parent = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(parent).get_span_context().is_valid:
        return
    span = _resolve_tracer(tracer_name).start_span(
        name, context=parent, kind=kind, attributes=attributes, start_time=start_time_ns
    )
    if code is None:
        span.end()
    else:
        _finish_span(span, code, details)


def rpc_span_attributes(full_method: str) -> Mapping[str, str]:
    """The `rpc.*` attributes of a span for `/package.Service/Method`."""
    return _method_info(full_method)[1]


def start_client_span(full_method: str) -> tuple[Span | None, str]:
    """For an RPC carried as a message on a shared stream (`/package.Service/Method`): its
    CLIENT span, as the client interceptor would start for a call of its own, and the
    `traceparent` to send with the message. No span when tracing is off ("" then) or the
    current trace is not sampled (its own traceparent then); end a span with `end_client_span`."""
    if _STATE.provider is None:
        return None, ""
    current = trace.get_current_span().get_span_context()
    if current.is_valid and not current.trace_flags.sampled:
        return None, _traceparent_of(current)
    name, attributes = _method_info(full_method)
    span = _RPC_TRACER.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    context = span.get_span_context()
    if not span.is_recording():
        return None, _traceparent_of(context) if context.is_valid else ""
    return span, _traceparent_of(context)


def end_client_span(span: Span, code: grpc.StatusCode, details: str | None = None) -> None:
    """End a span from `start_client_span` with the status its RPC ended with."""
    _finish_span(span, code, details)


def _traceparent_of(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def inject_metadata(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Return *metadata* plus W3C ``traceparent``/``tracestate`` for the current
    span (replacing any existing ones). Unchanged copy when there is no valid span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    if not carrier:
        return list(metadata)
    return [(k, v) for k, v in metadata if k.lower() not in _PROPAGATION_KEYS] + list(carrier.items())


# --------------------------------------------------------------------------
# Shared gRPC helpers
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def _method_info(full_method: str) -> tuple[str, Mapping[str, str]]:
    """Span name ("pkg.Svc/Method") and rpc.* attributes for "/pkg.Svc/Method"."""
    name = full_method.lstrip("/")
    service, _, method = name.rpartition("/")
    attributes = MappingProxyType({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
    return name, attributes


def _as_status(code: object) -> grpc.StatusCode | None:
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return _STATUS_BY_INT.get(code, grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.UNKNOWN


def _finish_span(
    span: Span,
    code: grpc.StatusCode,
    details: str | None = None,
    exc: BaseException | None = None,
) -> None:
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code is not grpc.StatusCode.OK:
        description = f"{code.name}: {details}" if details else code.name
        span.set_status(Status(StatusCode.ERROR, description))
    if exc is not None:
        span.record_exception(exc)
    span.end()


# --------------------------------------------------------------------------
# Server side
# --------------------------------------------------------------------------


def _extract_parent(metadata: Sequence[tuple[str, Any]] | None) -> Context:
    carrier: dict[str, str] = {}
    for key, value in metadata or ():
        if key in _PROPAGATION_KEYS and isinstance(value, str):
            carrier[key] = value
    return _PROPAGATOR.extract(carrier) if carrier else Context()


def _server_outcome(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException | None
) -> tuple[grpc.StatusCode, str | None, BaseException | None]:
    """Final (status, details, exception-to-record) of a server RPC."""
    try:
        code = _as_status(context.code())
        details = context.details()
    except Exception:  # pragma: no cover - defensive; context API is stable
        code, details = None, None
    if exc is None:
        return code or grpc.StatusCode.OK, details, None
    if isinstance(exc, grpc.aio.AbortError):
        return code or grpc.StatusCode.UNKNOWN, details, None
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        if code is None or code is grpc.StatusCode.OK:
            code = grpc.StatusCode.CANCELLED
        return code, details, None
    return grpc.StatusCode.UNKNOWN, f"{type(exc).__name__}: {exc}", exc


def _unsampled_parent(metadata: Sequence[tuple[str, Any]] | None) -> Context | None:
    """The context of a caller whose `traceparent` says "not sampled", else None.

    The fast path for most requests at a low sampling ratio: nothing is recorded for them, so
    no span is started at all; the caller's span context (ids, flags, tracestate) is made current
    as it is, for logs and for the calls this handler makes. Anything else (sampled, malformed,
    absent) takes the SDK's path."""
    traceparent = tracestate = None
    for key, value in metadata or ():
        if key == "traceparent":
            traceparent = value
        elif key == "tracestate":
            tracestate = value
    if not isinstance(traceparent, str):
        return None
    match = _UNSAMPLED_TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    trace_id, span_id = int(match[1], 16), int(match[2], 16)
    if not trace_id or not span_id:
        return None
    state = TraceState.from_header([tracestate]) if isinstance(tracestate, str) and tracestate else None
    parent = SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(match[3], 16)), trace_state=state
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _start_server_span(
    method: str, context: grpc.aio.ServicerContext[Any, Any]
) -> tuple[Span | None, Context]:
    """The server span and the context to run the handler in; no span for an unsampled caller."""
    metadata = context.invocation_metadata()
    unsampled = _unsampled_parent(metadata)
    if unsampled is not None:
        return None, unsampled
    name, attributes = _method_info(method)
    parent = _extract_parent(metadata)
    span = _RPC_TRACER.start_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
    return span, trace.set_span_in_context(span, parent)


def _wrap_unary_behavior(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]],
    method: str,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Coroutine[Any, Any, Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        span, span_ctx = _start_server_span(method, context)
        token = otel_context.attach(span_ctx)
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            if span is not None:
                _finish_span(span, *_server_outcome(context, exc))
            raise
        finally:
            otel_context.detach(token)
        if span is not None:
            _finish_span(span, *_server_outcome(context, None))
        return response

    return traced


def _wrap_stream_behavior(
    behavior: Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]],
    method: str,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        span, span_ctx = _start_server_span(method, context)
        responses = behavior(request, context)
        error: BaseException | None = None
        try:
            while True:
                # The span is current only while handler code runs, never across
                # our own yield: the generator may be finalized from another task.
                token = otel_context.attach(span_ctx)
                try:
                    item = await anext(responses)
                except StopAsyncIteration:
                    break
                finally:
                    otel_context.detach(token)
                yield item
        except BaseException as exc:  # incl. GeneratorExit / CancelledError
            error = exc
            raise
        finally:
            try:
                aclose = getattr(responses, "aclose", None)
                if error is not None and aclose is not None:
                    token = otel_context.attach(span_ctx)
                    try:
                        await aclose()
                    finally:
                        otel_context.detach(token)
            finally:
                if span is not None:
                    _finish_span(span, *_server_outcome(context, error))

    return traced


class TracingServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc,unused-ignore]
    """SERVER span per RPC, parented on the caller's W3C ``traceparent``.

    Wraps async unary-unary and unary-stream handlers (coroutine or
    async-generator behaviours); client-streaming handlers and sync behaviours
    pass through unchanged, as does everything while tracing is off.
    """

    def __init__(self) -> None:
        # method -> (the handler as registered, it wrapped): wrapped once, not on every call.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or _STATE.provider is None or handler.request_streaming:
            return handler
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _traced_handler(handler, method)
        if len(self._wrapped) < _MAX_WRAPPED_METHODS:
            self._wrapped[method] = (handler, wrapped)
        return wrapped


def _traced_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour in a server span (unchanged when it cannot be wrapped)."""
    if handler.response_streaming:
        stream_behavior = handler.unary_stream
        wrapped_stream: Callable[..., Any]
        if inspect.isasyncgenfunction(stream_behavior):
            wrapped_stream = _wrap_stream_behavior(stream_behavior, method)
        elif inspect.iscoroutinefunction(stream_behavior):  # context.write() style
            wrapped_stream = _wrap_unary_behavior(stream_behavior, method)
        else:
            return handler
        return grpc.unary_stream_rpc_method_handler(
            wrapped_stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
    behavior = handler.unary_unary
    if not inspect.iscoroutinefunction(behavior):
        return handler
    return grpc.unary_unary_rpc_method_handler(
        _wrap_unary_behavior(behavior, method),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """Interceptors for ``grpc.aio.server(interceptors=...)``; ``[]`` when off."""
    return [TracingServerInterceptor()] if _STATE.provider is not None else []


# --------------------------------------------------------------------------
# Client side
# --------------------------------------------------------------------------


def _now(awaitable: Coroutine[Any, Any, _T]) -> tuple[bool, _T | None]:
    """Run *awaitable* to completion synchronously if it finishes without
    suspending (true for a finished call's ``code()``/``details()``)."""
    try:
        awaitable.send(None)
    except StopIteration as stop:
        return True, stop.value
    except BaseException:
        return False, None
    awaitable.close()
    return False, None


async def _finish_client_span_later(span: Span, call: grpc.aio.Call) -> None:
    try:
        code, details = await call.code(), await call.details()
    except BaseException:  # pragma: no cover - defensive
        code, details = grpc.StatusCode.UNKNOWN, None
    _finish_span(span, code, details)


def _on_client_done(span: Span, call: grpc.aio.Call) -> None:
    if call.cancelled():
        _finish_span(span, grpc.StatusCode.CANCELLED)
        return
    ok, code = _now(call.code())
    if ok and code is not None:
        details = _now(call.details())[1] if code is not grpc.StatusCode.OK else None
        _finish_span(span, code, details)
        return
    # Status not synchronously available (unexpected): resolve it on the loop.
    try:
        asyncio.get_running_loop().create_task(_finish_client_span_later(span, call))
    except RuntimeError:  # pragma: no cover - no loop; end without status
        span.end()


def _with_trace_context(
    details: grpc.aio.ClientCallDetails, context: SpanContext
) -> grpc.aio.ClientCallDetails:
    """`details` whose metadata carries `context` as `traceparent` (and `tracestate`)."""
    carrier = [("traceparent", _traceparent_of(context))]
    if context.trace_state:
        carrier.append(("tracestate", context.trace_state.to_header()))
    return _with_propagation(details, carrier)


def _with_propagation(
    details: grpc.aio.ClientCallDetails, carrier: Iterable[tuple[str, str]]
) -> grpc.aio.ClientCallDetails:
    """`details` with `carrier` in place of any trace headers its metadata had."""
    metadata = grpc.aio.Metadata(
        *((k, v) for k, v in (details.metadata or ()) if k not in _PROPAGATION_KEYS), *carrier
    )
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _ClientTracing:
    @staticmethod
    def _start(
        details: grpc.aio.ClientCallDetails,
    ) -> tuple[Span, Context, grpc.aio.ClientCallDetails]:
        raw = details.method
        full = raw.decode() if isinstance(raw, bytes) else str(raw)
        name, attributes = _method_info(full)
        span = _RPC_TRACER.start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
        ctx = trace.set_span_in_context(span)
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=ctx)
        return span, ctx, _with_propagation(details, carrier.items())

    async def _intercept(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if _STATE.provider is None:
            return await continuation(client_call_details, request)
        current = trace.get_current_span().get_span_context()
        if current.is_valid and not current.trace_flags.sampled:
            # Nothing is recorded in this trace: pass its context on, start no span.
            return await continuation(_with_trace_context(client_call_details, current), request)
        span, ctx, details = self._start(client_call_details)
        token = otel_context.attach(ctx)  # visible to downstream interceptors
        try:
            call = await continuation(details, request)
        except BaseException as exc:
            code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
            if isinstance(exc, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            _finish_span(span, code or grpc.StatusCode.UNKNOWN, None, exc)
            raise
        finally:
            otel_context.detach(token)
        if not span.is_recording():
            return call
        if isinstance(call, grpc.aio.Call):
            call.add_done_callback(lambda c: _on_client_done(span, c))
        else:  # a downstream interceptor returned a plain response/iterator
            _finish_span(span, grpc.StatusCode.OK)
        return call


class _UnaryUnaryClientInterceptor(_ClientTracing, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc,unused-ignore]
    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)


class _UnaryStreamClientInterceptor(_ClientTracing, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc,unused-ignore]
    async def intercept_unary_stream(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        return await self._intercept(continuation, client_call_details, request)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio.insecure_channel(target, interceptors=...)``.

    CLIENT span per unary-unary / unary-stream call (ended when the call
    completes, errs or is cancelled) and ``traceparent`` injected into the
    outgoing metadata, existing entries preserved. ``[]`` while tracing is off.
    """
    if _STATE.provider is None:
        return []
    return [_UnaryUnaryClientInterceptor(), _UnaryStreamClientInterceptor()]
