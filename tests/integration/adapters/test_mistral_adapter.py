"""Mistral's own wire details through the adapter (the shared behaviour is in
`test_adapter_table.py`): what the request body carries, how ids, reasoning and headroom
come back, and the errors only Mistral has."""

from __future__ import annotations

import re
import uuid

import grpc
import orjson
import pytest

from switchyard.common.errors import Reason
from switchyard.v1 import common_pb2, provider_pb2

from .cases import CASES
from .conftest import VendorEnv
from .support import ANSWER, PROMPT, SCHEMA, WEATHER, assert_clean, collect, failure, request, text_of

MISTRAL = next(case for case in CASES if case.vendor == "mistral")
# The table's module-scoped environment, for the Mistral row only.
pytestmark = pytest.mark.parametrize("vendor_env", [MISTRAL], indirect=True, ids=["mistral"])
CALL_ID = re.compile(r"[A-Za-z0-9]{9}")


def ask(
    env: VendorEnv, suffix: str = "", model: str = MISTRAL.model, **chat: object
) -> provider_pb2.GenerateRequest:
    return request(env.provider(suffix), model, **chat)


async def test_streamed_request_body_ids_and_headroom(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER)
    events = await collect(env.adapter.stub, ask(env))
    done = events[-1].done
    assert uuid.UUID(done.vendor_request_id).version == 7  # mistral-correlation-id
    assert done.vendor_model == MISTRAL.model
    assert (done.headroom.limit_requests, done.headroom.limit_tokens) == (10_000, 30_000_000)
    assert done.headroom.HasField("remaining_requests") and done.headroom.HasField("remaining_tokens")
    assert not done.headroom.HasField("requests_reset_at")  # Mistral sends no reset
    sent = (await env.sim.stats())["last_request"]
    assert sent == {"model": MISTRAL.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True}


async def test_sampling_uses_mistral_names(env: VendorEnv) -> None:
    sampling = common_pb2.SamplingParams(max_output_tokens=3, temperature=0.2, seed=7, stop_sequences=["END"])
    await collect(env.adapter.stub, ask(env, sampling=sampling))
    sent = (await env.sim.stats())["last_request"]
    assert (sent["max_tokens"], sent["temperature"], sent["random_seed"], sent["stop"]) == (
        3,
        0.2,
        7,
        ["END"],
    )
    assert not {"seed", "max_completion_tokens", "stream_options", "user"} & set(sent)


async def test_tools_choice_and_schema_reach_the_vendor(env: VendorEnv) -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    events = await collect(env.adapter.stub, ask(env, tools=[WEATHER], tool_choice=choice))
    sent = (await env.sim.stats())["last_request"]
    assert sent["tool_choice"] == "any"
    assert sent["tools"][0]["function"]["parameters"] == orjson.loads(SCHEMA)
    calls = [call for event in events if event.HasField("delta") for call in event.delta.tool_calls]
    assert len(calls) == 1  # Mistral sends the call whole
    assert CALL_ID.fullmatch(calls[0].id) and calls[0].name == "get_weather"
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="forecast",
        json_schema=SCHEMA,
        strict=True,
    )
    await collect(env.adapter.stub, ask(env, response_format=schema))
    sent = (await env.sim.stats())["last_request"]
    assert sent["response_format"]["json_schema"] == {
        "name": "forecast",
        "schema": orjson.loads(SCHEMA),
        "strict": True,
    }


async def test_history_with_foreign_call_ids_is_accepted(env: VendorEnv) -> None:
    # The simulator, like Mistral, answers 400 to ids that are not nine letters or digits.
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)]),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            tool_calls=[
                common_pb2.ToolCall(id="call_9xY2", name="get_weather", arguments_json='{"city":"Oslo"}')
            ],
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL,
            tool_call_id="call_9xY2",
            parts=[common_pb2.ContentPart(text='{"t":3}')],
        ),
    ]
    events = await collect(env.adapter.stub, ask(env, messages=messages, tools=[WEATHER]))
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP
    sent = (await env.sim.stats())["last_request"]["messages"]
    mapped = sent[1]["tool_calls"][0]["id"]
    assert CALL_ID.fullmatch(mapped) and sent[2]["tool_call_id"] == mapped
    assert sent[2]["name"] == "get_weather"


async def test_untranslatable_requests_never_reach_the_vendor(env: VendorEnv) -> None:
    trailing = [
        common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)]),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=[common_pb2.ContentPart(text="Sure,")]),
    ]
    for chat, field in (
        ({"metadata": common_pb2.RequestMetadata(end_user="u-1")}, "metadata.end_user"),
        ({"messages": trailing}, "messages[1].role"),
    ):
        error, _ = await failure(env.adapter.stub, ask(env, **chat))
        assert (error.code, error.reason, error.metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            field,
        )
    assert (await env.sim.stats())["requests"] == 0


async def test_thinking_is_reasoning_and_reasoning_tokens_are_not_reported(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, reasoning_tokens=5, cached_tokens=3)
    events = await collect(env.adapter.stub, ask(env, model=MISTRAL.reasoning_model))
    reasoning = "".join(event.delta.reasoning_text for event in events if event.HasField("delta"))
    assert reasoning and text_of(events) == ANSWER
    usage = events[-2].usage
    assert (usage.reasoning_tokens, usage.cached_input_tokens, usage.estimated) == (0, 3, False)
    assert usage.output_tokens == -(-len(ANSWER) // 4) + 5  # thinking is billed as output


async def test_mistral_only_errors(env: VendorEnv) -> None:
    await env.sim.knobs(status=429, error_code="3810", retry_after_s=2)
    error, _ = await failure(env.adapter.stub, ask(env))
    assert (error.code, error.reason, error.retry_after_s) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.PROVIDER_OVERLOADED,
        2.0,
    )
    assert (error.metadata["vendor_code"], error.metadata["vendor_type"]) == (
        "3810",
        "engine_max_pending_tokens",
    )
    assert uuid.UUID(error.metadata["vendor_request_id"]).version == 7
    await env.sim.knobs(status=400, error_code="3051")
    error, _ = await failure(env.adapter.stub, ask(env))
    assert error.reason == Reason.CONTEXT_TOO_LONG and "131072" not in error.message
    assert_clean(error)
    error, _ = await failure(env.adapter.stub, ask(env, "-badkey"))
    assert error.reason == Reason.AUTH_FAILED and "vendor_code" not in error.metadata


async def test_in_stream_failures(env: VendorEnv) -> None:
    for status in (500, 429):  # a 429 cannot be told inside a Mistral stream
        await env.sim.knobs(text=ANSWER, chunks=4, error_after_chunks=2, status=status)
        error, received = await failure(env.adapter.stub, ask(env))
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
        assert (error.metadata["in_stream"], error.metadata["finish_reason"]) == ("true", "error")
        assert ANSWER.startswith(text_of(received)) and text_of(received)


async def test_probe_uses_models_list_or_one_token(env: VendorEnv) -> None:
    ok = await env.adapter.stub.Probe(provider_pb2.ProbeRequest(provider=env.provider()), timeout=10)
    assert ok.ok and (await env.sim.stats())["requests"] == 0  # GET /models is not a chat request
    completion = await env.adapter.stub.Probe(
        provider_pb2.ProbeRequest(provider=env.provider("-probe")), timeout=10
    )
    assert completion.ok and completion.headroom.limit_requests == 10_000
    assert (await env.sim.stats())["last_request"]["max_tokens"] == 1
