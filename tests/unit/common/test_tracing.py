from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from switchyard.common import tracing
from tests.support.otlp import OtlpReceiver

SERVICE = "test.v1.EchoService"


def _identity(b: bytes) -> bytes:
    return b


async def _unary(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    if request == b"abort":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    if request == b"boom":
        raise ValueError("kaboom")
    seen = dict(context.invocation_metadata() or ())
    with tracing.get_tracer("test").start_as_current_span("child"):
        trace_id = tracing.current_trace_id() or ""
    return b"|".join([request, trace_id.encode(), str(seen.get("authorization", "")).encode()])


async def _stream(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield (tracing.current_trace_id() or "").encode()
        await asyncio.sleep(0)
    if request == b"abort":
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "out of budget")
    if request == b"forever":
        while True:
            await asyncio.sleep(0.01)
            yield b"tick"


def _handlers() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                _unary, request_deserializer=_identity, response_serializer=_identity
            ),
            "Stream": grpc.unary_stream_rpc_method_handler(
                _stream, request_deserializer=_identity, response_serializer=_identity
            ),
        },
    )


class _Env:
    def __init__(self, server: grpc.aio.Server, channel: grpc.aio.Channel, target: str) -> None:
        self.server = server
        self.channel = channel
        self.target = target
        self.echo = channel.unary_unary(
            f"/{SERVICE}/Echo", request_serializer=_identity, response_deserializer=_identity
        )
        self.stream = channel.unary_stream(
            f"/{SERVICE}/Stream", request_serializer=_identity, response_deserializer=_identity
        )


async def _start_env(server_interceptors: list[grpc.aio.ServerInterceptor]) -> _Env:
    server = grpc.aio.server(interceptors=server_interceptors)
    server.add_generic_rpc_handlers((_handlers(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=tracing.client_interceptors())
    return _Env(server, channel, f"127.0.0.1:{port}")


async def _stop_env(env: _Env) -> None:
    await env.channel.close()
    await env.server.stop(None)


@pytest.fixture(autouse=True)
def _reset_tracing(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(tracing.ENDPOINT_ENV, raising=False)
    monkeypatch.delenv(tracing.SAMPLER_ARG_ENV, raising=False)
    tracing.shutdown_tracing()
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    exp = InMemorySpanExporter()
    assert tracing.configure_tracing("test", exporter=exp) is True
    return exp


def _finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    assert tracing.force_flush()
    return list(exporter.get_finished_spans())


async def _wait_spans(exporter: InMemorySpanExporter, n: int) -> list[ReadableSpan]:
    for _ in range(200):
        spans = _finished(exporter)
        if len(spans) >= n:
            return spans
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} spans, got {[s.name for s in _finished(exporter)]}")


def _one(spans: list[ReadableSpan], kind: SpanKind, name: str) -> ReadableSpan:
    found = [s for s in spans if s.kind == kind and s.name == name]
    assert len(found) == 1, [(s.name, s.kind) for s in spans]
    return found[0]


def _hex(trace_id: int) -> str:
    return format(trace_id, "032x")


@pytest.mark.asyncio
async def test_unary_client_and_server_spans_share_trace(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        reply = await env.echo(b"hi", metadata=(("authorization", "Bearer abc"),))
    finally:
        await _stop_env(env)

    spans = await _wait_spans(exporter, 3)
    name = f"{SERVICE}/Echo"
    client = _one(spans, SpanKind.CLIENT, name)
    server = _one(spans, SpanKind.SERVER, name)
    child = _one(spans, SpanKind.INTERNAL, "child")

    assert client.context is not None and server.context is not None and child.context is not None
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.parent.is_remote
    assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert client.parent is None

    # handler saw the span as current, and existing metadata was preserved
    request, trace_id, auth = reply.split(b"|")
    assert request == b"hi"
    assert trace_id.decode() == _hex(client.context.trace_id)
    assert auth == b"Bearer abc"

    for span in (client, server):
        assert span.attributes is not None
        assert span.attributes["rpc.system"] == "grpc"
        assert span.attributes["rpc.service"] == SERVICE
        assert span.attributes["rpc.method"] == "Echo"
        assert span.attributes["rpc.grpc.status_code"] == 0
        assert span.status.status_code is StatusCode.UNSET
    assert server.resource.attributes["service.name"] == "switchyard-test"


@pytest.mark.asyncio
async def test_server_stream_spans(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        items = [item async for item in env.stream(b"go")]
    finally:
        await _stop_env(env)

    spans = await _wait_spans(exporter, 2)
    name = f"{SERVICE}/Stream"
    client = _one(spans, SpanKind.CLIENT, name)
    server = _one(spans, SpanKind.SERVER, name)
    assert client.context is not None and server.context is not None
    assert server.context.trace_id == client.context.trace_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert items == [_hex(client.context.trace_id).encode()] * 3
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == 0
    # the server span covers the whole stream
    assert server.end_time is not None and server.start_time is not None
    assert client.end_time is not None and client.end_time >= server.start_time


@pytest.mark.asyncio
async def test_aborted_unary_marks_spans_error(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.echo(b"abort")
    finally:
        await _stop_env(env)
    assert err.value.code() is grpc.StatusCode.NOT_FOUND

    spans = await _wait_spans(exporter, 2)
    name = f"{SERVICE}/Echo"
    for kind in (SpanKind.SERVER, SpanKind.CLIENT):
        span = _one(spans, kind, name)
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert "no such thing" in (span.status.description or "")


@pytest.mark.asyncio
async def test_handler_exception_marks_server_span_error(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await env.echo(b"boom")
    finally:
        await _stop_env(env)
    assert err.value.code() is grpc.StatusCode.UNKNOWN

    spans = await _wait_spans(exporter, 2)
    server = _one(spans, SpanKind.SERVER, f"{SERVICE}/Echo")
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]
    assert any(e.name == "exception" for e in server.events)


@pytest.mark.asyncio
async def test_aborted_stream_marks_server_span_error(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in env.stream(b"abort"):
                pass
    finally:
        await _stop_env(env)
    assert err.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    spans = await _wait_spans(exporter, 2)
    for kind in (SpanKind.SERVER, SpanKind.CLIENT):
        span = _one(spans, kind, f"{SERVICE}/Stream")
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert span.attributes["rpc.grpc.status_code"] == code


@pytest.mark.asyncio
async def test_cancelled_stream_ends_both_spans(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        call = env.stream(b"forever")
        async for item in call:
            if item == b"tick":
                break
        call.cancel()
        spans = await _wait_spans(exporter, 2)
    finally:
        await _stop_env(env)

    for kind in (SpanKind.SERVER, SpanKind.CLIENT):
        span = _one(spans, kind, f"{SERVICE}/Stream")
        assert span.status.status_code is StatusCode.ERROR
        assert span.attributes is not None
        assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]


@pytest.mark.asyncio
async def test_tracing_off_installs_nothing() -> None:
    assert tracing.configure_tracing("test") is False
    assert tracing.configure_tracing("test", endpoint="") is False
    assert not tracing.tracing_enabled()
    assert tracing.client_interceptors() == []
    assert tracing.server_interceptors() == []
    assert tracing.inject_metadata([("authorization", "x")]) == [("authorization", "x")]

    original = grpc.unary_unary_rpc_method_handler(_unary)
    details: Any = SimpleNamespace(method=f"/{SERVICE}/Echo", invocation_metadata=())

    async def continuation(_: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return original

    returned = await tracing.TracingServerInterceptor().intercept_service(continuation, details)
    assert returned is original

    with tracing.get_tracer().start_as_current_span("noop") as span:
        assert not span.is_recording()
        assert tracing.current_trace_id() is None

    # the full path still works without any interceptor
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        reply = await env.echo(b"hi")
    finally:
        await _stop_env(env)
    assert reply == b"hi||"


@pytest.mark.asyncio
async def test_inject_metadata_and_current_trace_id(exporter: InMemorySpanExporter) -> None:
    with tracing.get_tracer().start_as_current_span("outer") as span:
        trace_id = tracing.current_trace_id()
        md = tracing.inject_metadata([("authorization", "Bearer x"), ("traceparent", "stale")])
    assert trace_id == _hex(span.get_span_context().trace_id)
    keys = [k for k, _ in md]
    assert keys.count("traceparent") == 1 and "authorization" in keys
    traceparent = dict(md)["traceparent"]
    assert traceparent.split("-")[1] == trace_id
    assert traceparent.split("-")[2] == format(span.get_span_context().span_id, "016x")


@pytest.mark.asyncio
async def test_client_span_parented_on_current_span(exporter: InMemorySpanExporter) -> None:
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        with tracing.get_tracer().start_as_current_span("caller") as caller:
            await env.echo(b"hi")
    finally:
        await _stop_env(env)
    spans = await _wait_spans(exporter, 4)
    client = _one(spans, SpanKind.CLIENT, f"{SERVICE}/Echo")
    assert client.parent is not None
    assert client.parent.span_id == caller.get_span_context().span_id


@pytest.mark.asyncio
async def test_sample_ratio_zero_records_nothing_but_propagates() -> None:
    exp = InMemorySpanExporter()
    assert tracing.configure_tracing("test", exporter=exp, sample_ratio=0.0)
    env = await _start_env([tracing.TracingServerInterceptor()])
    try:
        reply = await env.echo(b"hi")
    finally:
        await _stop_env(env)
    assert _finished(exp) == []
    # context still flows (not sampled, but valid ids are propagated)
    assert len(reply.split(b"|")[1]) == 32


@pytest.mark.asyncio
async def test_end_to_end_otlp_export() -> None:
    async with OtlpReceiver() as rx:
        assert tracing.configure_tracing("test", endpoint=rx.endpoint) is True
        env = await _start_env(tracing.server_interceptors())
        try:
            await env.echo(b"hi")
            items = [item async for item in env.stream(b"go")]
        finally:
            await _stop_env(env)
        assert len(items) == 3
        # The OTLP exporter is synchronous and the receiver lives on this loop.
        assert await asyncio.to_thread(tracing.force_flush)
        spans = await rx.wait_for(lambda s: len(s) >= 5, timeout=5.0)
        await asyncio.to_thread(tracing.shutdown_tracing)

    assert {s.service_name for s in spans} == {"switchyard-test"}
    by_trace: dict[str, list[str]] = {}
    for s in spans:
        by_trace.setdefault(s.trace_id, []).append(s.kind)
    assert len(by_trace) == 2  # one trace per RPC
    for span_ids in by_trace.values():
        assert "CLIENT" in span_ids and "SERVER" in span_ids

    for method in ("Echo", "Stream"):
        client = next(s for s in spans if s.kind == "CLIENT" and s.name.endswith(method))
        server = next(s for s in spans if s.kind == "SERVER" and s.name.endswith(method))
        assert server.trace_id == client.trace_id
        assert server.parent_span_id == client.span_id
        assert client.parent_span_id == ""
        assert server.attributes["rpc.system"] == "grpc"
        assert server.attributes["rpc.method"] == method
        assert server.status_code != "ERROR"


@pytest.mark.asyncio
async def test_shutdown_is_bounded_when_collector_is_gone() -> None:
    import time

    # Nothing listens on this port.
    assert tracing.configure_tracing("test", endpoint="http://127.0.0.1:9")
    with tracing.get_tracer().start_as_current_span("orphan"):
        pass
    started = time.monotonic()
    await asyncio.to_thread(tracing.shutdown_tracing, 0.5)
    assert time.monotonic() - started < 1.5
    assert not tracing.tracing_enabled()


@pytest.mark.asyncio
async def test_an_unsampled_caller_gets_no_spans_and_its_context_flows_on(
    exporter: InMemorySpanExporter,
) -> None:
    # A caller that decided "not sampled": the server starts no span (fast path), runs the
    # handler in the caller's trace, and the calls it makes carry that trace on, still unsampled.
    trace_id, span_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    env = await _start_env([tracing.TracingServerInterceptor()])
    # A caller of another process: no client interceptor of ours, its own headers.
    plain = grpc.aio.insecure_channel(env.target)
    echo = plain.unary_unary(f"/{SERVICE}/Echo")
    try:
        metadata = (("traceparent", f"00-{trace_id}-{span_id}-00"), ("tracestate", "vendor=x"))
        reply = await echo(b"hi", metadata=metadata)
        assert _finished(exporter) == []
        # Sampled or malformed headers take the SDK's path: spans are recorded.
        sampled = await echo(b"hi", metadata=(("traceparent", f"00-{trace_id}-{span_id}-01"),))
        malformed = await echo(b"hi", metadata=(("traceparent", f"00-{trace_id}-{span_id}-0x"),))
    finally:
        await plain.close()
        await _stop_env(env)
    assert reply.split(b"|")[1] == trace_id.encode()
    assert sampled.split(b"|")[1] == trace_id.encode()
    assert malformed.split(b"|")[1] not in (b"", trace_id.encode())  # a new root
    spans = await _wait_spans(exporter, 4)
    assert {_hex(s.context.trace_id) for s in spans if s.name == "child"} == {
        trace_id,
        malformed.split(b"|")[1].decode(),
    }


@pytest.mark.asyncio
async def test_an_unsampled_current_span_is_passed_on_without_a_client_span() -> None:
    exp = InMemorySpanExporter()
    assert tracing.configure_tracing("test", exporter=exp, sample_ratio=0.0)
    seen: list[dict[str, str]] = []

    async def echo_metadata(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        seen.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        return request

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(echo_metadata)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=tracing.client_interceptors())
    try:
        with tracing.get_tracer().start_as_current_span("unsampled root") as root:
            await channel.unary_unary(f"/{SERVICE}/Echo")(b"x", metadata=(("traceparent", "stale"),))
    finally:
        await channel.close()
        await server.stop(None)
    context = root.get_span_context()
    assert not context.trace_flags.sampled
    flags = f"{context.trace_flags:02x}"
    assert seen[0]["traceparent"] == f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags}"
    assert _finished(exp) == []
