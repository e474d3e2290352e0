"""The `ProviderAdapterService` servicer: thin -- proto in, `ProviderClient` call, proto out.

One adapter process serves one vendor wire format and every catalog provider that uses
it (several accounts or regions may share a format). Failures are raised as
`SwitchyardError`; the server's error interceptor turns them into rich statuses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping

import grpc

from switchyard.adapters.base import ProviderClient
from switchyard.adapters.vendors import load_translator
from switchyard.common import answer_events
from switchyard.common.catalog import Catalog, provider_api_key, provider_base_url
from switchyard.common.catalog_proto import model_info
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.common.logging import get_logger
from switchyard.common.server import ServiceBinding
from switchyard.common.settings import Settings
from switchyard.v1 import provider_pb2, provider_pb2_grpc

log = get_logger(__name__)

SERVICE_NAME = provider_pb2.DESCRIPTOR.services_by_name["ProviderAdapterService"].full_name


class ProviderAdapterServicer(provider_pb2_grpc.ProviderAdapterServiceServicer):
    """Generate, Probe and Capabilities for the providers of one vendor."""

    def __init__(self, vendor: str, catalog: Catalog, clients: Mapping[str, ProviderClient]) -> None:
        self.vendor = vendor
        self._catalog = catalog
        self._clients = dict(clients)

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
            # One line per failed call (never per chunk); the metadata is prompt-free by design.
            log.warning(
                "generate_failed",
                provider=request.provider,
                reason=exc.reason.value,
                status=exc.code.name,
                http_status=exc.metadata.get("http_status"),
                vendor_code=exc.metadata.get("vendor_code"),
                phase=exc.metadata.get("phase"),
            )
            raise
        finally:
            # Closing at once (not at garbage collection) is what closes the upstream
            # connection when the caller cancels.
            await stream.aclose()

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


def adapter_bindings(
    settings: Settings, vendor: str
) -> tuple[list[ServiceBinding], Callable[[], Awaitable[None]]]:
    """The `ProviderAdapterService` binding for `vendor` and the coroutine that closes its
    HTTP clients on shutdown."""
    servicer = build_adapter(settings.catalog, vendor)

    def register(server: grpc.aio.Server) -> None:
        provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)

    return [ServiceBinding(name=SERVICE_NAME, register=register)], servicer.aclose
