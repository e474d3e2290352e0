"""Cohere's own wire details through the adapter (the shared behaviour is in
`test_adapter_table.py`): what the request body carries, what is refused before it is
sent, Cohere-only statuses, and the ids, reasoning and headroom Cohere reports."""

from __future__ import annotations

import grpc
import orjson
import pytest

from switchyard.common.errors import Reason
from switchyard.v1 import common_pb2, provider_pb2

from .cases import CASES
from .conftest import VendorEnv
from .support import (
    ANSWER,
    PROMPT,
    SCHEMA,
    WEATHER,
    assert_clean,
    assert_well_formed,
    collect,
    failure,
    text_of,
)
from .support import request as generic_request

COHERE = next(case for case in CASES if case.vendor == "cohere")

# The table's module-scoped environment, for the Cohere row only.
pytestmark = pytest.mark.parametrize("vendor_env", [COHERE], ids=["cohere"], indirect=True, scope="module")


def request(env: VendorEnv, suffix: str = "", **chat: object) -> provider_pb2.GenerateRequest:
    return generic_request(env.provider(suffix), COHERE.model, **chat)


async def test_streamed_request_body_ids_and_headroom(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER)
    events = await collect(env.adapter.stub, request(env))
    assert_well_formed(events)
    done = events[-1].done
    # x-debug-trace-id: 32 hex digits.
    assert len(done.vendor_request_id) == 32 and int(done.vendor_request_id, 16) >= 0
    assert done.vendor_model == COHERE.model
    assert done.headroom.limit_requests == 10_000
    assert done.headroom.remaining_requests == 9_999
    assert not done.headroom.HasField("remaining_tokens")
    sent = (await env.sim.stats())["last_request"]
    assert sent == {"model": COHERE.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True}


async def test_sampling_reaches_the_vendor_and_end_user_is_refused(env: VendorEnv) -> None:
    sampling = common_pb2.SamplingParams(
        max_output_tokens=3, temperature=0.2, top_p=0.5, seed=7, stop_sequences=["END"], frequency_penalty=0.1
    )
    await collect(env.adapter.stub, request(env, sampling=sampling))
    sent = (await env.sim.stats())["last_request"]
    assert (sent["max_tokens"], sent["temperature"], sent["p"], sent["seed"]) == (3, 0.2, 0.5, 7)
    assert (sent["stop_sequences"], sent["frequency_penalty"]) == (["END"], 0.1)
    await env.sim.reset()
    error, _ = await failure(
        env.adapter.stub, request(env, metadata=common_pb2.RequestMetadata(end_user="u-1"))
    )
    assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "metadata.end_user")
    assert (await env.sim.stats())["requests"] == 0


async def test_tools_and_formats_reach_the_vendor(env: VendorEnv) -> None:
    strict = common_pb2.Tool(name="get_weather", parameters_json_schema=SCHEMA, strict=True)
    other = common_pb2.Tool(name="get_time")
    named = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")
    events = await collect(env.adapter.stub, request(env, tools=[other, strict], tool_choice=named))
    sent = (await env.sim.stats())["last_request"]
    assert (sent["tool_choice"], sent["strict_tools"]) == ("REQUIRED", True)
    assert [tool["function"] for tool in sent["tools"]] == [
        {"name": "get_weather", "parameters": orjson.loads(SCHEMA)}
    ]
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="forecast", json_schema=SCHEMA
    )
    await collect(env.adapter.stub, request(env, response_format=schema))
    sent = (await env.sim.stats())["last_request"]
    assert sent["response_format"] == {"type": "json_object", "json_schema": orjson.loads(SCHEMA)}


async def test_tool_plan_and_thinking_are_reasoning_not_text(env: VendorEnv) -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    events = await collect(env.adapter.stub, request(env, tools=[WEATHER], tool_choice=choice))
    assert text_of(events) == ""
    plan = "".join(e.delta.reasoning_text for e in events if e.HasField("delta"))
    assert plan.startswith("I will use the get_weather tool")
    await env.sim.knobs(text=ANSWER, reasoning_tokens=5)
    thought = await collect(
        env.adapter.stub,
        generic_request(env.provider(), COHERE.reasoning_model),
    )
    assert text_of(thought) == ANSWER
    assert "".join(e.delta.reasoning_text for e in thought if e.HasField("delta"))
    usage = thought[-2].usage
    assert usage.reasoning_tokens == 0 and usage.output_tokens >= 5  # Cohere reports no split


async def test_tool_round_trip_is_accepted_by_the_vendor(env: VendorEnv) -> None:
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)]),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            parts=[common_pb2.ContentPart(text="Checking the forecast.")],
            tool_calls=[common_pb2.ToolCall(id="get_weather_x1", name="get_weather", arguments_json="{}")],
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL,
            tool_call_id="get_weather_x1",
            parts=[common_pb2.ContentPart(text='{"temp": 3}')],
        ),
    ]
    await env.sim.knobs(text=ANSWER)
    events = await collect(env.adapter.stub, request(env, messages=messages, tools=[WEATHER]))
    assert text_of(events) == ANSWER
    sent = (await env.sim.stats())["last_request"]
    assert sent["messages"][1]["tool_plan"] == "Checking the forecast."
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": "get_weather_x1", "content": '{"temp": 3}'}


async def test_error_metadata_and_cohere_only_statuses(env: VendorEnv) -> None:
    await env.sim.knobs(status=500)
    error, _ = await failure(env.adapter.stub, request(env))
    assert len(error.metadata["vendor_request_id"]) == 32
    assert error.metadata["vendor_error_id"]
    error, _ = await failure(env.adapter.stub, request(env, "-badkey"))
    assert error.metadata["vendor_code"] == "invalid_api_token"
    assert_clean(error)
    await env.sim.knobs(status=402, retry_after_s=3)
    billing, _ = await failure(env.adapter.stub, request(env))
    assert (billing.code, billing.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert billing.metadata["quota"] == "exhausted" and billing.retry_after_s is None
    await env.sim.knobs(status=400, error_code="too_many_tokens")
    context, _ = await failure(env.adapter.stub, request(env))
    assert context.metadata["vendor_code"] == "too_many_tokens"
    assert_clean(context)


async def test_in_stream_timeout(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, error_after_chunks=3, status=504)
    error, received = await failure(env.adapter.stub, request(env))
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert (error.metadata["in_stream"], error.metadata["vendor_code"]) == ("true", "TIMEOUT")
    assert ANSWER.startswith(text_of(received))
    assert_clean(error)


async def test_malformed_event_is_named(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, malformed_after_chunks=3)
    error, _ = await failure(env.adapter.stub, request(env))
    assert error.reason == Reason.UPSTREAM_PROTOCOL_ERROR
    assert "not valid JSON" in error.message


async def test_probe_uses_models_list_or_one_token(env: VendorEnv) -> None:
    ok = await env.adapter.stub.Probe(provider_pb2.ProbeRequest(provider=env.provider()), timeout=10)
    assert ok.ok
    assert (await env.sim.stats())["requests"] == 0  # GET /v1/models, not a chat
    completion = await env.adapter.stub.Probe(
        provider_pb2.ProbeRequest(provider=env.provider("-probe")), timeout=10
    )
    assert completion.ok and completion.headroom.limit_requests == 10_000
    assert (await env.sim.stats())["last_request"]["max_tokens"] == 1
