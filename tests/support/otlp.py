"""In-process OTLP/gRPC trace receiver for tests.

    async with OtlpReceiver() as rx:
        configure_tracing("test", endpoint=rx.endpoint)
        ...
        await asyncio.to_thread(force_flush)   # exporter is sync: keep the loop free
        spans = await rx.wait_for(lambda s: len(s) >= 2, timeout=5)

The receiver is a ``grpc.aio`` server on 127.0.0.1 (ephemeral port) served
from the test's event loop, so anything that exports to it synchronously must
run off the loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpReceiver", "ReceivedSpan"]


@dataclass(frozen=True)
class ReceivedSpan:
    trace_id: str  # 32 lowercase hex chars
    span_id: str  # 16 lowercase hex chars
    parent_span_id: str  # "" for root spans
    name: str
    service_name: str  # resource attribute service.name
    kind: str  # "SERVER", "CLIENT", "INTERNAL", "PRODUCER", "CONSUMER", "UNSPECIFIED"
    attributes: dict[str, Any] = field(default_factory=dict)
    status_code: str = "UNSET"  # "UNSET", "OK", "ERROR"
    status_message: str = ""


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in kvs}


def _strip(prefix: str, name: str) -> str:
    return name[len(prefix) :] if name.startswith(prefix) else name


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: list[ReceivedSpan]) -> None:
        self._sink = sink

    async def Export(
        self,
        request: trace_service_pb2.ExportTraceServiceRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service_name = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self._sink.append(
                        ReceivedSpan(
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            name=span.name,
                            service_name=service_name,
                            kind=_strip("SPAN_KIND_", trace_pb2.Span.SpanKind.Name(span.kind)),
                            attributes=_attributes(span.attributes),
                            status_code=_strip(
                                "STATUS_CODE_", trace_pb2.Status.StatusCode.Name(span.status.code)
                            ),
                            status_message=span.status.message,
                        )
                    )
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """Async context manager running an OTLP/gRPC TraceService on 127.0.0.1:0."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        if not self.port:
            raise RuntimeError("OtlpReceiver is not started")
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self.spans), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._server = server

    async def stop(self, grace: float | None = None) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    async def __aenter__(self) -> OtlpReceiver:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def wait_for(
        self,
        predicate: Callable[[list[ReceivedSpan]], bool],
        timeout: float = 5.0,
        interval: float = 0.02,
    ) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` is true; returns a snapshot of the spans.

        Raises ``TimeoutError`` (listing what was received) after *timeout* s.
        """
        deadline = time.monotonic() + timeout
        while True:
            snapshot = list(self.spans)
            if predicate(snapshot):
                return snapshot
            if time.monotonic() >= deadline:
                names = [(s.service_name, s.name, s.kind) for s in snapshot]
                raise TimeoutError(f"OTLP receiver: predicate not met in {timeout}s; got {names}")
            await asyncio.sleep(interval)
