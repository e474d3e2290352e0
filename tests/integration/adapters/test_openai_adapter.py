"""OpenAI's own wire details through the adapter (the shared behaviour is in
`test_adapter_table.py`): what the request body carries, OpenAI-only error codes, and
the ids and headroom OpenAI reports."""

from __future__ import annotations

import grpc
import pytest

from switchyard.common.errors import Reason, from_rpc_error
from switchyard.v1 import common_pb2, provider_pb2

from .conftest import AdapterHandle, SimHandle
from .support import ANSWER, PROMPT, SCHEMA, WEATHER, assert_clean, collect, failure
from .support import request as generic_request


def request(
    provider: str = "openai", model: str = "gpt-4o-mini", **chat: object
) -> provider_pb2.GenerateRequest:
    return generic_request(provider, model, **chat)


async def test_streamed_request_body_and_headroom(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER)
    events = await collect(adapter.stub, request())
    done = events[-1].done
    assert done.vendor_request_id.startswith("req_")
    assert done.vendor_model == "gpt-4o-mini"
    assert done.headroom.limit_requests == 10_000
    assert done.headroom.HasField("remaining_tokens")
    assert done.headroom.requests_reset_at.seconds > 0
    sent = (await openai_sim.stats())["last_request"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "user", "content": PROMPT}]


async def test_sampling_reaches_the_vendor(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    sampling = common_pb2.SamplingParams(max_output_tokens=3, temperature=0.2, seed=7, stop_sequences=["END"])
    await collect(
        adapter.stub, request(sampling=sampling, metadata=common_pb2.RequestMetadata(end_user="u-1"))
    )
    sent = (await openai_sim.stats())["last_request"]
    assert sent["max_completion_tokens"] == 3 and "max_tokens" not in sent
    assert (sent["temperature"], sent["seed"], sent["stop"], sent["user"]) == (0.2, 7, ["END"], "u-1")


async def test_tools_and_formats_reach_the_vendor(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    await collect(adapter.stub, request(tools=[WEATHER], tool_choice=choice))
    sent = (await openai_sim.stats())["last_request"]
    assert sent["tool_choice"] == "required"
    assert sent["tools"][0]["function"]["parameters"] == __import__("orjson").loads(SCHEMA)
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="forecast",
        json_schema=SCHEMA,
        strict=True,
    )
    await collect(adapter.stub, request(response_format=schema))
    sent = (await openai_sim.stats())["last_request"]
    assert sent["response_format"]["json_schema"]["name"] == "forecast"
    assert sent["response_format"]["json_schema"]["strict"] is True


async def test_error_metadata_carries_request_id(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(status=500)
    error, _ = await failure(adapter.stub, request())
    assert error.metadata["vendor_request_id"].startswith("req_")
    error, _ = await failure(adapter.stub, request(provider="openai-badkey"))
    assert error.metadata["vendor_code"] == "invalid_api_key"
    assert_clean(error)


async def test_insufficient_quota_is_not_retryable_later(
    adapter: AdapterHandle, openai_sim: SimHandle
) -> None:
    await openai_sim.knobs(status=429, error_code="insufficient_quota", retry_after_s=3)
    error, _ = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.metadata["quota"] == "exhausted"
    assert error.retry_after_s is None


async def test_malformed_event_is_named(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, chunks=6, malformed_after_chunks=3)
    error, _ = await failure(adapter.stub, request())
    assert error.reason == Reason.UPSTREAM_PROTOCOL_ERROR
    assert "not valid JSON" in error.message


async def test_untranslatable_request_never_reaches_the_vendor(
    adapter: AdapterHandle, openai_sim: SimHandle
) -> None:
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"\x89PNG"))
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[image])
    error, _ = await failure(adapter.stub, request(messages=[message]))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == "messages[0].parts[0].image.mime_type"
    assert (await openai_sim.stats())["requests"] == 0


async def test_probe_uses_models_list_or_one_token(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    ok = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai"), timeout=10)
    assert ok.ok
    assert (await openai_sim.stats())["requests"] == 0  # GET /models, not a completion
    completion = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai-probe"), timeout=10)
    assert completion.ok and completion.headroom.limit_tokens == 30_000_000
    assert (await openai_sim.stats())["last_request"]["max_completion_tokens"] == 1


async def test_capabilities_carry_catalog_details(adapter: AdapterHandle) -> None:
    one = await adapter.stub.Capabilities(provider_pb2.CapabilitiesRequest(provider="openai"), timeout=10)
    mini = one.models[0]
    assert (mini.vendor, mini.upstream_model, mini.region) == ("openai", "gpt-4o-mini", "us")
    assert mini.pricing.input_micros_per_million == 1_000_000
    assert mini.pricing.cached_input_micros_per_million == 500_000
    assert common_pb2.CAPABILITY_TOOLS in mini.capabilities
    assert one.models[1].category == common_pb2.MODEL_CATEGORY_REASONING


async def test_embeddings_through_the_adapter(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    embed = provider_pb2.EmbedRequest(
        provider="openai",
        upstream_model="text-embedding-3-small",
        inputs=["reset my password", "reset password"],
    )
    response = await adapter.stub.Embed(embed, timeout=10)
    assert [len(e.values) for e in response.embeddings] == [1536, 1536]
    assert response.usage.input_tokens == 5 and response.vendor_request_id.startswith("req_")
    first, second = (list(e.values) for e in response.embeddings)
    assert sum(a * b for a, b in zip(first, second, strict=True)) > 0.5  # shared words, close vectors
    sent = (await openai_sim.stats())["last_request"]
    assert sent == {"model": "text-embedding-3-small", "input": embed.inputs[:], "encoding_format": "float"}

    embed.dimensions = 64
    assert len((await adapter.stub.Embed(embed, timeout=10)).embeddings[0].values) == 64

    await openai_sim.knobs(status=500)
    with pytest.raises(grpc.aio.AioRpcError) as down:
        await adapter.stub.Embed(embed, timeout=10)
    assert from_rpc_error(down.value).reason == Reason.PROVIDER_UNAVAILABLE
    await openai_sim.knobs()
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await adapter.stub.Embed(
            provider_pb2.EmbedRequest(provider="openai", upstream_model="gpt-4o", inputs=["x"]), timeout=10
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await adapter.stub.Embed(
            provider_pb2.EmbedRequest(
                provider="openai", upstream_model="text-embedding-3-small", inputs=[" "]
            ),
            timeout=10,
        )
    error = from_rpc_error(empty.value)
    assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "inputs[0]")
