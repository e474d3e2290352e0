"""The response cache through the whole mesh: real edge, real cache service, real simulator.

A deterministic request (temperature 0) asked twice reaches the provider once; the second
answer is replayed from the cache, streamed or not, tool calls included, at no cost and with
its saving; a paraphrase is answered too, with its similarity. The caller's policy is
honoured (skip, refresh, use), and tenants never share. Each test asks its own question; the
tests of exact matching set the semantic threshold to 1 (their questions share a template,
close enough to match each other semantically), the semantic test asks about another topic.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import grpc

from switchyard.common.errors import from_status
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, SimControl
from tests.support.auth import keyed_channel
from tests.support.mesh_keys import create_key

MODEL = "openai/gpt-4o-mini"


def question(text: str = "", *, temperature: float | None = 0.0, mode: int = 0) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    words = text or f"What is the capital of country number {uuid.uuid4().hex[:8]}?"
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=words)])
    if temperature is not None:
        request.sampling.temperature = temperature
    request.cache.mode = mode  # type: ignore[assignment]
    request.cache.semantic_threshold = 1.0
    return request


async def stored(mesh: Mesh, tenant: str, entries: int) -> None:
    """Wait until the cache holds `entries` entries of `tenant` (stores happen off the path)."""
    cache = cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(mesh.target("cache")))
    async with asyncio.timeout(5):
        while True:
            stats = await cache.GetStats(cache_pb2.GetStatsRequest(tenant_id=tenant), timeout=5)
            if stats.entries >= entries:
                return
            await asyncio.sleep(0.02)


async def entries_of(mesh: Mesh, tenant: str) -> int:
    cache = cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(mesh.target("cache")))
    return (await cache.GetStats(cache_pb2.GetStatsRequest(tenant_id=tenant), timeout=5)).entries


async def test_a_deterministic_question_asked_twice_reaches_the_provider_once(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    gateway = mesh.gateway()
    before = await entries_of(mesh, "default")
    request = question()
    first = await gateway.Chat(request, timeout=30)
    assert first.cache_status == common_pb2.CACHE_STATUS_MISS
    assert first.cost_micros > 0
    await stored(mesh, "default", before + 1)

    again = await gateway.Chat(request, timeout=30)
    assert again.cache_status == common_pb2.CACHE_STATUS_HIT_EXACT
    assert again.message.parts[0].text == first.message.parts[0].text
    assert again.cost_micros == 0
    assert again.saved_micros == first.cost_micros
    assert (again.routing.model, again.routing.provider, again.routing.reason) == (MODEL, "openai", "cache")
    assert again.usage.output_tokens == first.usage.output_tokens
    assert again.request_id != first.request_id
    assert (await openai_sim.stats())["requests"] == 1


async def test_a_cached_tool_call_answer_replays_as_a_stream_with_its_structure(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(tool_call=True, chunks=4)
    request = question("What is the weather in Paris? Use the tool.")
    tool = request.tools.add(name="get_weather", description="The weather in a city")
    tool.parameters_json_schema = json.dumps(
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    )
    before = await entries_of(mesh, "default")
    original = [chunk async for chunk in mesh.gateway().ChatStream(request, timeout=30)]
    await stored(mesh, "default", before + 1)
    replayed = [chunk async for chunk in mesh.gateway().ChatStream(request, timeout=30)]

    def deltas(chunks: list[common_pb2.ChatChunk]) -> list[common_pb2.Delta]:
        return [chunk.delta for chunk in chunks if chunk.HasField("delta")]

    assert deltas(replayed) == deltas(original)
    assert any(delta.tool_calls for delta in deltas(replayed))
    assert [c.WhichOneof("event") for c in replayed][-2:] == ["usage", "done"]
    done = replayed[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert done.cache_status == common_pb2.CACHE_STATUS_HIT_EXACT
    assert (await openai_sim.stats())["requests"] == 1


async def test_skip_refresh_and_use_are_honoured(mesh: Mesh, openai_sim: SimControl) -> None:
    gateway = mesh.gateway()
    text = f"Name the largest planet, please ({uuid.uuid4().hex[:8]})."
    before = await entries_of(mesh, "default")
    skipped = await gateway.Chat(question(text, mode=common_pb2.CACHE_MODE_SKIP), timeout=30)
    assert skipped.cache_status == common_pb2.CACHE_STATUS_BYPASS
    await asyncio.sleep(0.2)
    assert await entries_of(mesh, "default") == before  # skip stores nothing

    await gateway.Chat(question(text), timeout=30)
    await stored(mesh, "default", before + 1)
    refreshed = await gateway.Chat(question(text, mode=common_pb2.CACHE_MODE_REFRESH), timeout=30)
    assert refreshed.cache_status == common_pb2.CACHE_STATUS_REFRESHED
    assert (await openai_sim.stats())["requests"] == 3

    # USE serves the entry even to a request whose sampling alone would not be cached.
    warm = await gateway.Chat(question(text, temperature=0.0, mode=common_pb2.CACHE_MODE_USE), timeout=30)
    assert warm.cache_status == common_pb2.CACHE_STATUS_HIT_EXACT
    assert (await openai_sim.stats())["requests"] == 3
    # Without a temperature (the vendor's default varies the answer) the cache stays out.
    varied = await gateway.Chat(question(text, temperature=None), timeout=30)
    assert varied.cache_status == common_pb2.CACHE_STATUS_BYPASS
    assert (await openai_sim.stats())["requests"] == 4


async def test_one_tenants_answer_is_never_served_to_another(mesh: Mesh, openai_sim: SimControl) -> None:
    request = question()
    before = await entries_of(mesh, "default")
    await mesh.gateway().Chat(request, timeout=30)
    await stored(mesh, "default", before + 1)
    key = await create_key(mesh, "trial")
    async with keyed_channel(mesh.edge_target, key) as channel:
        other = await gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request, timeout=30)
    assert other.cache_status == common_pb2.CACHE_STATUS_MISS
    assert (await openai_sim.stats())["requests"] == 2


async def test_a_paraphrase_is_answered_from_the_cache_with_its_similarity(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    cache = cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(mesh.target("cache")))
    capabilities = await cache.GetCapabilities(cache_pb2.GetCapabilitiesRequest(), timeout=5)
    assert capabilities.semantic and capabilities.embedder == "local:all-MiniLM-L6-v2"
    gateway = mesh.gateway()
    asked = question("How many moons does Jupiter have?")
    asked.cache.ClearField("semantic_threshold")
    before = await entries_of(mesh, "default")
    first = await gateway.Chat(asked, timeout=30)
    assert first.cache_status == common_pb2.CACHE_STATUS_MISS
    await stored(mesh, "default", before + 1)

    paraphrase = question("What is the number of moons of Jupiter?")
    paraphrase.cache.ClearField("semantic_threshold")
    hit = await gateway.Chat(paraphrase, timeout=30)
    assert hit.cache_status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
    assert 0.85 <= hit.cache_similarity < 1.0
    assert hit.message.parts[0].text == first.message.parts[0].text
    assert (hit.cost_micros, hit.saved_micros) == (0, first.cost_micros)
    different = question("How many moons does Saturn have?")
    different.cache.ClearField("semantic_threshold")
    assert (await gateway.Chat(different, timeout=30)).cache_status == common_pb2.CACHE_STATUS_MISS
    assert (await openai_sim.stats())["requests"] == 2


async def test_the_lookup_stream_answers_each_lookup_by_id_and_goes_on_after_a_refusal(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    asked = question()
    before = await entries_of(mesh, "default")
    await mesh.gateway().Chat(asked, timeout=30)  # a miss, then stored
    await stored(mesh, "default", before + 1)
    cache = cache_pb2_grpc.CacheServiceStub(grpc.aio.insecure_channel(mesh.target("cache")))
    call = cache.LookupStream()
    lookups = {
        7: cache_pb2.LookupRequest(tenant_id="default", request=asked, model=MODEL),
        8: cache_pb2.LookupRequest(tenant_id="", request=asked, model=MODEL),  # refused
        9: cache_pb2.LookupRequest(tenant_id="default", request=question(), model=MODEL),
    }
    try:
        for ask_id, lookup in lookups.items():
            await call.write(cache_pb2.LookupStreamRequest(id=ask_id, lookup=lookup))
        answers = {}
        async with asyncio.timeout(10):
            while len(answers) < 3:
                answer = await call.read()
                answers[answer.id] = answer
    finally:
        call.cancel()
    assert answers[7].lookup.status == common_pb2.CACHE_STATUS_HIT_EXACT
    assert answers[9].lookup.status == common_pb2.CACHE_STATUS_MISS
    refusal = from_status(answers[8].error)
    assert (refusal.code, refusal.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "tenant_id")
