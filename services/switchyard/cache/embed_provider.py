"""Embeddings from a provider's embedding model, through its adapter (`ProviderAdapterService.Embed`).

Chosen with `SWITCHYARD_CACHE_EMBEDDER=provider:<provider>/<model>` (for example
`provider:openai/text-embedding-3-small`): the provider is a catalog provider, the model its
name at the vendor. Vectors are normalised here (cosine similarity is then a dot product, as
with the local embedder). The vector size is the model's own unless
`SWITCHYARD_CACHE_EMBEDDER_DIMENSIONS` asks for fewer; it is learnt from the first answer.
What these calls cost is the operator's, not a tenant's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, Protocol

import grpc

from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error
from switchyard.v1 import provider_pb2

if TYPE_CHECKING:
    import numpy
    from numpy.typing import NDArray

__all__ = ["PROVIDER_PREFIX", "ProviderEmbedder", "parse_embedder_setting"]

PROVIDER_PREFIX: Final = "provider:"


class EmbedCalls(Protocol):
    """What the embedder calls on an adapter (a `ProviderAdapterServiceStub` fits)."""

    async def Embed(
        self, request: provider_pb2.EmbedRequest, *, timeout: float | None = None
    ) -> provider_pb2.EmbedResponse: ...


def parse_embedder_setting(value: str) -> tuple[str, str] | None:
    """(provider, model) for "provider:<provider>/<model>", None for "local"; ValueError else."""
    if value == "local":
        return None
    if value.startswith(PROVIDER_PREFIX):
        provider, _, model = value.removeprefix(PROVIDER_PREFIX).partition("/")
        if provider and model:
            return provider, model
    raise ValueError(f"the cache embedder is 'local' or 'provider:<provider>/<model>', not {value!r}")


class ProviderEmbedder:
    """An `Embedder` whose vectors come from a provider (asynchronously: `aembed`)."""

    def __init__(
        self, adapter: EmbedCalls, provider: str, model: str, *, dimensions: int = 0, timeout_s: float = 10.0
    ) -> None:
        self.name = f"{PROVIDER_PREFIX}{provider}/{model}"
        self.dimensions = dimensions
        self._adapter = adapter
        self._provider = provider
        self._model = model
        self._asked_dimensions = dimensions
        self._timeout_s = timeout_s

    def embed(self, texts: Sequence[str]) -> NDArray[numpy.float32]:
        """Not available synchronously: the vectors come over the network (use `aembed`)."""
        raise TypeError("ProviderEmbedder embeds asynchronously: await aembed(texts)")

    async def aembed(self, texts: Sequence[str]) -> NDArray[numpy.float32]:
        """Unit vectors of `texts`, one row each (raises SwitchyardError when the adapter fails)."""
        import numpy

        try:
            response = await self._adapter.Embed(
                provider_pb2.EmbedRequest(
                    provider=self._provider,
                    upstream_model=self._model,
                    inputs=list(texts),
                    dimensions=self._asked_dimensions,
                ),
                timeout=self._timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        vectors = numpy.array([list(e.values) for e in response.embeddings], dtype=numpy.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(texts) or vectors.shape[1] == 0:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.UPSTREAM_PROTOCOL_ERROR,
                f"{self.name} answered {vectors.shape[0]} vectors for {len(texts)} texts",
            )
        if self.dimensions and vectors.shape[1] != self.dimensions:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.UPSTREAM_PROTOCOL_ERROR,
                f"{self.name} changed its vector size from {self.dimensions} to {vectors.shape[1]}",
            )
        self.dimensions = int(vectors.shape[1])
        norms = numpy.linalg.norm(vectors, axis=1, keepdims=True)
        result: NDArray[numpy.float32] = vectors / numpy.maximum(norms, 1e-12)
        return result
