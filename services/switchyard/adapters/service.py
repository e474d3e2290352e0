"""The `ProviderAdapterService` servicer: thin -- proto in, `ProviderClient` call, proto out.

One adapter process serves one vendor wire format and every catalog provider that uses
it (several accounts or regions may share a format). Failures are raised as
`SwitchyardError`; the server's error interceptor turns them into rich statuses.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Final

import grpc
from opentelemetry.trace import SpanKind

from switchyard.adapters.base import ProviderClient
from switchyard.adapters.vendors import load_translator
from switchyard.common import answer_events, tracing
from switchyard.common.catalog import Catalog, provider_api_key, provider_base_url
from switchyard.common.catalog_proto import model_info
from switchyard.common.errors import Reason, SwitchyardError, invalid, shutting_down
from switchyard.common.logging import get_logger
from switchyard.common.multiplex import Multiplexer, Multiplexers
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.v1 import provider_pb2, provider_pb2_grpc

log = get_logger(__name__)

SERVICE_NAME = provider_pb2.DESCRIPTOR.services_by_name["ProviderAdapterService"].full_name


# Generations one GenerateStream call runs at once; past it the call stops reading (HTTP/2
# flow control then holds the caller back) until one finishes.
MAX_STREAMED_GENERATIONS: Final = 1024
GENERATE_METHOD: Final = f"/{SERVICE_NAME}/Generate"
_SHUTTING_DOWN: Final = shutting_down("adapter")


def _log_failure(request: provider_pb2.GenerateRequest, exc: SwitchyardError) -> None:
    """One line per failed generation (never per chunk); the metadata is prompt-free by design."""
    log.warning(
        "generate_failed",
        provider=request.provider,
        reason=exc.reason.value,
        status=exc.code.name,
        http_status=exc.metadata.get("http_status"),
        vendor_code=exc.metadata.get("vendor_code"),
        phase=exc.metadata.get("phase"),
    )


class ProviderAdapterServicer(provider_pb2_grpc.ProviderAdapterServiceServicer):
    """Generate, Probe and Capabilities for the providers of one vendor."""

    def __init__(self, vendor: str, catalog: Catalog, clients: Mapping[str, ProviderClient]) -> None:
        self.vendor = vendor
        self._catalog = catalog
        self._clients = dict(clients)
        self._streams: Multiplexers[
            provider_pb2.GenerateStreamRequest, provider_pb2.GenerateStreamResponse
        ] = Multiplexers(MAX_STREAMED_GENERATIONS)

    async def aclose(self) -> None:
        """Close every provider's connection pool."""
        for client in self._clients.values():
            await client.aclose()

    def _client(self, provider: str) -> ProviderClient:
        if not provider:
            raise invalid("the provider is required", "provider")
        client = self._clients.get(provider)
        if client is None:
            raise SwitchyardError(
                grpc.StatusCode.NOT_FOUND,
                Reason.NOT_FOUND,
                f"the {self.vendor} adapter serves no provider named {provider!r}",
                metadata={"provider": provider, "vendor": self.vendor},
            )
        return client

    async def Generate(
        self, request: provider_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[provider_pb2.GenerateResponse]:
        """Stream the vendor's answer as it arrives: deltas, one usage, then done; what one
        read of the vendor's body decoded goes as one message (`answer_events.pack`)."""
        stream = self._client(request.provider).generate_batches(request)
        try:
            async for batch in stream:
                yield answer_events.pack(batch)
        except SwitchyardError as exc:
            _log_failure(request, exc)
            raise
        finally:
            # Closing at once (not at garbage collection) is what closes the upstream
            # connection when the caller cancels.
            await stream.aclose()

    async def GenerateStream(
        self,
        requests: AsyncIterator[provider_pb2.GenerateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[provider_pb2.GenerateStreamResponse]:
        """Generations multiplexed on one call: each `start` runs as Generate would, its
        messages sent under its id as they come; a `cancel` stops one. When the caller ends
        the call, its generations still running are stopped."""
        async for reply in self._streams.serve(requests, self._on_item):
            yield reply

    async def GenerateFrames(
        self,
        frames: AsyncIterator[provider_pb2.GenerateFramesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[provider_pb2.GenerateFramesResponse]:
        """GenerateStream with several requests, and answers, to a message."""
        async for answers in self._streams.serve_frames(frames, _items, self._on_item):
            yield provider_pb2.GenerateFramesResponse(items=answers)

    async def _on_item(
        self,
        mux: Multiplexer[provider_pb2.GenerateStreamRequest, provider_pb2.GenerateStreamResponse],
        item: provider_pb2.GenerateStreamRequest,
    ) -> None:
        action = item.WhichOneof("action")
        if action == "cancel":
            mux.cancel(item.id)
        elif action == "start":
            refusal = (
                _SHUTTING_DOWN
                if mux.draining
                else invalid("a generation with this id is running", "id")
                if mux.running(item.id)
                else None
            )
            if refusal is not None:
                mux.send(provider_pb2.GenerateStreamResponse(id=item.id, error=refusal.to_status_proto()))
            else:
                await mux.start(item.id, self._generate_one(item, mux.send))

    def drain(self) -> None:
        """Shutdown begins: generation streams take no new generation (each is answered
        UNAVAILABLE, so the caller tries elsewhere) and end once their running ones are done."""
        self._streams.drain()

    async def _generate_one(
        self,
        item: provider_pb2.GenerateStreamRequest,
        send: Callable[[provider_pb2.GenerateStreamResponse], None],
    ) -> None:
        """One generation of a GenerateStream call, answered through `send`."""
        started = time.time_ns()
        request = item.start
        code, details = grpc.StatusCode.OK, None
        done = False  # once `done` is sent, nothing more goes out for this id
        failure: SwitchyardError | None = None
        try:
            async with asyncio.timeout(item.timeout_ms / 1000 if item.timeout_ms else None):
                stream = self._client(request.provider).generate_batches(request)
                try:
                    async for batch in stream:
                        done = batch[-1].HasField("done")
                        send(
                            provider_pb2.GenerateStreamResponse(id=item.id, events=answer_events.pack(batch))
                        )
                finally:
                    await stream.aclose()
        except SwitchyardError as exc:
            _log_failure(request, exc)
            failure = exc
        except TimeoutError:
            failure = SwitchyardError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.TIMEOUT,
                "the caller's deadline for the generation passed",
                metadata={"provider": request.provider},
            )
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # a bug: logged, answered as INTERNAL, the stream goes on
            log.error(
                "generate_failed_internal",
                provider=request.provider,
                error_type=type(exc).__name__,
                exc_info=exc,
            )
            failure = SwitchyardError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")
        finally:
            if failure is not None:
                code, details = failure.code, failure.message
                if not done:
                    send(provider_pb2.GenerateStreamResponse(id=item.id, error=failure.to_status_proto()))
            if item.traceparent:
                tracing.record_span_in(
                    item.traceparent,
                    GENERATE_METHOD[1:],
                    start_time_ns=started,
                    tracer_name="switchyard.grpc",
                    kind=SpanKind.SERVER,
                    attributes=tracing.rpc_span_attributes(GENERATE_METHOD),
                    code=code,
                    details=details,
                )

    async def Probe(
        self, request: provider_pb2.ProbeRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.ProbeResponse:
        """Whether the provider answers; a provider failure is reported, not raised."""
        return await self._client(request.provider).probe()

    async def Embed(
        self, request: provider_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.EmbedResponse:
        """Vectors for texts from the provider's embedding model."""
        return await self._client(request.provider).embed(request)

    async def Capabilities(
        self, request: provider_pb2.CapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> provider_pb2.CapabilitiesResponse:
        """The catalog models of the providers this adapter serves (or of one of them)."""
        providers = [self._client(request.provider).name] if request.provider else sorted(self._clients)
        wanted = set(providers)
        models = [
            model_info(model, self._catalog) for model in self._catalog.models if model.provider in wanted
        ]
        return provider_pb2.CapabilitiesResponse(vendor=self.vendor, providers=providers, models=models)


def build_adapter(
    catalog: Catalog, vendor: str, environ: Mapping[str, str] | None = None
) -> ProviderAdapterServicer:
    """The servicer for `vendor`, with one `ProviderClient` per catalog provider of that
    vendor (keys and base URLs from the environment, see `switchyard.common.catalog`)."""
    factory = load_translator(vendor)
    clients: dict[str, ProviderClient] = {}
    for name, provider in catalog.providers.items():
        if provider.vendor != vendor:
            continue
        api_key = provider_api_key(name, provider, environ)
        if not api_key:
            # Allowed (local simulators need none); the vendor's 401 will say AUTH_FAILED.
            log.warning("provider_key_missing", provider=name, vendor=vendor)
        probe_model = next((m.upstream_model for m in catalog.models if m.provider == name), None)
        clients[name] = ProviderClient(
            name,
            provider,
            factory(name, provider, api_key),
            base_url=provider_base_url(name, provider, environ),
            probe_model=probe_model,
        )
    log.info("adapter_configured", vendor=vendor, providers=sorted(clients))
    return ProviderAdapterServicer(vendor, catalog, clients)


def adapter_parts(settings: Settings, vendor: str) -> ServiceParts:
    """The `ProviderAdapterService` for `vendor`: its binding, the drain of its generation
    streams when shutdown begins, and the close of its HTTP clients at the end."""
    servicer = build_adapter(settings.catalog, vendor)

    def register(server: grpc.aio.Server) -> None:
        provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)

    return ServiceParts(
        [ServiceBinding(name=SERVICE_NAME, register=register)], servicer.aclose, drain=servicer.drain
    )


def _items(frame: provider_pb2.GenerateFramesRequest) -> Iterable[provider_pb2.GenerateStreamRequest]:
    return frame.items
