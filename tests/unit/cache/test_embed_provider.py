"""Question vectors from a provider's embedding model, through its adapter's `Embed`.

The adapter is stood in for by an object with the stub's `Embed`; its vectors come from the
real local model, so paraphrases match through this embedder as they would through a vendor's.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from switchyard.cache.embed import Embedder, load_local_embedder
from switchyard.cache.embed_provider import ProviderEmbedder, parse_embedder_setting
from switchyard.cache.semantic import SemanticIndex
from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import cache_pb2, common_pb2, provider_pb2

MODEL = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def local() -> Iterator[Embedder]:
    loaded = load_local_embedder()
    assert loaded is not None
    yield loaded


class Adapter:
    """The adapter's `Embed`, answering with the local model's vectors scaled by 3 (not unit)."""

    def __init__(self, local: Embedder) -> None:
        self.local = local
        self.calls: list[provider_pb2.EmbedRequest] = []
        self.down = False
        self.extra = 0

    async def Embed(
        self, request: provider_pb2.EmbedRequest, *, timeout: float | None = None
    ) -> provider_pb2.EmbedResponse:
        self.calls.append(request)
        if self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        vectors = self.local.embed(list(request.inputs) + ["extra"] * self.extra) * 3
        return provider_pb2.EmbedResponse(
            embeddings=[provider_pb2.Embedding(values=row.tolist()) for row in vectors],
            usage=common_pb2.Usage(input_tokens=7),
        )


def test_the_setting_names_local_or_a_provider_and_model() -> None:
    assert parse_embedder_setting("local") is None
    assert parse_embedder_setting("provider:openai/text-embedding-3-small") == (
        "openai",
        "text-embedding-3-small",
    )
    for bad in ("openai", "provider:openai", "provider:/m", "provider:"):
        with pytest.raises(ValueError, match="local"):
            parse_embedder_setting(bad)


async def test_vectors_are_normalised_and_the_size_is_learnt(local: Embedder) -> None:
    adapter = Adapter(local)
    embedder = ProviderEmbedder(adapter, "openai", "text-embedding-3-small", dimensions=0)
    assert embedder.dimensions == 0 and embedder.name == "provider:openai/text-embedding-3-small"
    vectors = await embedder.aembed(["hello there", "general kenobi"])
    assert vectors.shape == (2, 384) and embedder.dimensions == 384
    assert abs(float(vectors[0] @ vectors[0]) - 1.0) < 1e-5
    sent = adapter.calls[0]
    assert (sent.provider, sent.upstream_model, list(sent.inputs)) == (
        "openai",
        "text-embedding-3-small",
        ["hello there", "general kenobi"],
    )
    with pytest.raises(TypeError):
        embedder.embed(["sync"])


async def test_a_wrong_answer_or_a_failed_call_is_a_switchyard_error(local: Embedder) -> None:
    adapter = Adapter(local)
    embedder = ProviderEmbedder(adapter, "openai", "m", dimensions=384)
    adapter.extra = 1
    with pytest.raises(SwitchyardError) as wrong:
        await embedder.aembed(["one"])
    assert wrong.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR
    adapter.extra = 0
    adapter.down = True
    with pytest.raises(SwitchyardError) as down:
        await embedder.aembed(["one"])
    assert down.value.code == grpc.StatusCode.UNAVAILABLE
    sized = ProviderEmbedder(adapter, "openai", "m", dimensions=256)
    adapter.down = False
    with pytest.raises(SwitchyardError, match="vector size"):
        await sized.aembed(["one"])


def ask(text: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    return request


async def test_the_cache_matches_paraphrases_with_it_and_falls_back_to_exact_when_it_fails(
    local: Embedder,
) -> None:
    adapter = Adapter(local)
    embedder = ProviderEmbedder(adapter, "openai", "text-embedding-3-small")
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=SemanticIndex(embedder))
    answer = cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text="Paris.")], finish_reason=common_pb2.FINISH_REASON_STOP, cost_micros=9
    )
    store = cache_pb2.StoreRequest(
        tenant_id="acme", request=ask("What is the capital of France?"), model=MODEL
    )
    store.answer.CopyFrom(answer)
    assert (await servicer.Store(store, None)).admitted  # type: ignore[arg-type]
    paraphrase = cache_pb2.LookupRequest(
        tenant_id="acme", request=ask("Which city is the capital of France?"), model=MODEL
    )
    hit = await servicer.Lookup(paraphrase, None)  # type: ignore[arg-type]
    assert hit.status == common_pb2.CACHE_STATUS_HIT_SEMANTIC and hit.similarity >= 0.85
    capabilities = await servicer.GetCapabilities(cache_pb2.GetCapabilitiesRequest(), None)  # type: ignore[arg-type]
    assert capabilities.embedder == "provider:openai/text-embedding-3-small"

    adapter.down = True
    again = cache_pb2.LookupRequest(
        tenant_id="acme", request=ask("Capital city of France, please?"), model=MODEL
    )
    assert (await servicer.Lookup(again, None)).status == common_pb2.CACHE_STATUS_MISS  # type: ignore[arg-type]
    exact = cache_pb2.LookupRequest(
        tenant_id="acme", request=ask("What is the capital of France?"), model=MODEL
    )
    assert (await servicer.Lookup(exact, None)).status == common_pb2.CACHE_STATUS_HIT_EXACT  # type: ignore[arg-type]
