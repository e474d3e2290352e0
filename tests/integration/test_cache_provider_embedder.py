"""The semantic cache with a provider's embedding model: the whole mesh, the cache service taking
question vectors from the OpenAI simulator's `/v1/embeddings` through the real adapter's `Embed`
(`SWITCHYARD_CACHE_EMBEDDER=provider:openai/text-embedding-3-small`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.conftest import Mesh, SimControl, running_mesh
from tests.support.otlp import OtlpReceiver

EMBEDDER = "provider:openai/text-embedding-3-small"


@pytest.fixture(scope="module")
async def embedder_mesh(otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    env = {"SWITCHYARD_CACHE_EMBEDDER": EMBEDDER, "SWITCHYARD_EDGE_DEDUP": "false"}
    async with running_mesh(otlp, tmp_path_factory.mktemp("embedder-mesh"), env=env) as mesh:
        yield mesh


def question(text: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    request.sampling.temperature = 0.0
    return request


async def test_paraphrases_match_with_the_providers_vectors(embedder_mesh: Mesh) -> None:
    sim = SimControl(embedder_mesh.plan.simulator_urls["openai"])
    try:
        cache = cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(embedder_mesh.target("cache")))
        capabilities = await cache.GetCapabilities(cache_pb2.GetCapabilitiesRequest(), timeout=5)
        assert (capabilities.semantic, capabilities.embedder) == (True, EMBEDDER)
        await sim.reset()
        gateway = embedder_mesh.gateway()
        first = await gateway.Chat(question("How do I reset my password?"), timeout=30)
        assert first.cache_status == common_pb2.CACHE_STATUS_MISS
        async with asyncio.timeout(5):  # the answer is stored off the caller's path
            while True:
                stats = await cache.GetStats(cache_pb2.GetStatsRequest(tenant_id="default"), timeout=5)
                if stats.entries >= 1:
                    break
                await asyncio.sleep(0.02)
        hit = await gateway.Chat(question("How do I reset my password, please?"), timeout=30)
        assert hit.cache_status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
        assert hit.cache_similarity >= 0.85 and hit.message == first.message
        sim_stats = await sim.stats()
        # One chat completion; the questions' vectors came from the same simulator.
        assert sim_stats["requests"] >= 2 and sim_stats["last_request"]["model"] == "text-embedding-3-small"
    finally:
        await sim.close()
