"""Anthropic's own wire details through the adapter (the shared behaviour is in
`test_adapter_table.py`): what the request body carries -- checked by the simulator's
validation of Anthropic's rules --, Anthropic-only statuses and error codes, and the ids,
usage and headroom Anthropic reports."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest

from switchyard.common.errors import Reason
from switchyard.v1 import common_pb2, provider_pb2

from .cases import CASES
from .conftest import SimHandle, VendorEnv, start_vendor_env
from .support import ANSWER, PROMPT, SCHEMA, WEATHER, assert_clean, collect, failure
from .support import request as generic_request

MODEL = "claude-haiku-4-5"


@pytest.fixture(scope="module")
async def anthropic_env() -> AsyncIterator[VendorEnv]:
    case = next(case for case in CASES if case.vendor == "anthropic")
    async for env in start_vendor_env(case):
        yield env


@pytest.fixture
async def env(anthropic_env: VendorEnv) -> VendorEnv:
    await anthropic_env.sim.reset()
    return anthropic_env


def request(provider: str = "anthropic", model: str = MODEL, **chat: object) -> provider_pb2.GenerateRequest:
    return generic_request(provider, model, **chat)


def msg(role: common_pb2.Role.ValueType, *texts: str, **fields: Any) -> common_pb2.Message:
    return common_pb2.Message(role=role, parts=[common_pb2.ContentPart(text=t) for t in texts], **fields)


async def last_request(sim: SimHandle) -> dict[str, object]:
    sent: dict[str, object] = (await sim.stats())["last_request"]
    return sent


async def test_streamed_request_body_and_headroom(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER)
    events = await collect(env.adapter.stub, request())
    done = events[-1].done
    assert done.vendor_request_id.startswith("req_")
    assert done.vendor_model == MODEL
    assert done.headroom.limit_requests == 10_000 and done.headroom.limit_tokens == 30_000_000
    assert done.headroom.HasField("remaining_tokens")
    assert time.time() - 1 <= done.headroom.requests_reset_at.seconds <= time.time() + 61
    assert await last_request(env.sim) == {
        "model": MODEL,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    }


async def test_sampling_reaches_the_vendor(env: VendorEnv) -> None:
    sampling = common_pb2.SamplingParams(
        max_output_tokens=3, temperature=0.2, top_p=0.9, stop_sequences=["END"]
    )
    events = await collect(
        env.adapter.stub, request(sampling=sampling, metadata=common_pb2.RequestMetadata(end_user="u-1"))
    )
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    sent = await last_request(env.sim)
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (3, 0.2, 0.9)
    assert (sent["stop_sequences"], sent["metadata"]) == (["END"], {"user_id": "u-1"})


async def test_stop_sequence_is_a_stop(env: VendorEnv) -> None:
    await env.sim.knobs(text="Harbors shelter ships. END of answer.")
    sampling = common_pb2.SamplingParams(stop_sequences=["END"])
    events = await collect(env.adapter.stub, request(sampling=sampling))
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == "Harbors shelter ships. "
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_tools_and_formats_reach_the_vendor(env: VendorEnv) -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")
    await collect(env.adapter.stub, request(tools=[WEATHER], tool_choice=choice))
    sent = await last_request(env.sim)
    assert sent["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert sent["tools"] == [
        {"name": "get_weather", "description": "Forecast", "input_schema": orjson.loads(SCHEMA)}
    ]
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="forecast",
        json_schema=SCHEMA,
        strict=True,
    )
    await collect(env.adapter.stub, request(response_format=schema))
    sent = await last_request(env.sim)
    assert sent["output_config"] == {"format": {"type": "json_schema", "schema": orjson.loads(SCHEMA)}}


async def test_multi_turn_history_passes_the_vendor_rules(env: VendorEnv) -> None:
    # The simulator enforces Anthropic's rules: no system role, every tool_use answered by
    # a tool_result first in the next user turn, non-empty text, valid image sources.
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"\x89PNG fake", mime_type="image/png"))
    messages = [
        msg(common_pb2.ROLE_SYSTEM, "Be brief."),
        common_pb2.Message(
            role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Weather here?"), image]
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            parts=[common_pb2.ContentPart(text="Checking two cities.")],
            tool_calls=[
                common_pb2.ToolCall(
                    id="toolu_01A", name="get_weather", arguments_json='{"city":"Oslo","days":1}'
                ),
                common_pb2.ToolCall(
                    id="toolu_01B", name="get_weather", arguments_json='{"city":"Rome","days":1}'
                ),
            ],
        ),
        msg(common_pb2.ROLE_TOOL, '{"temp": 3}', tool_call_id="toolu_01A"),
        msg(common_pb2.ROLE_TOOL, '{"temp": 19}', tool_call_id="toolu_01B"),
        msg(common_pb2.ROLE_USER, "Which is warmer?"),
    ]
    await env.sim.knobs(text=ANSWER)
    events = await collect(env.adapter.stub, request(messages=messages, tools=[WEATHER]))
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == ANSWER
    sent = await last_request(env.sim)
    assert sent["system"] == "Be brief."
    turns = sent["messages"]
    assert isinstance(turns, list)
    assert [turn["role"] for turn in turns] == ["user", "assistant", "user"]
    assert [block["type"] for block in turns[2]["content"]] == ["tool_result", "tool_result", "text"]


async def test_tool_call_arrives_with_its_toolu_id(env: VendorEnv) -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    events = await collect(env.adapter.stub, request(tools=[WEATHER], tool_choice=choice))
    calls = [call for e in events if e.HasField("delta") for call in e.delta.tool_calls]
    assert calls[0].id.startswith("toolu_01") and calls[0].name == "get_weather"
    assert orjson.loads("".join(c.arguments_fragment for c in calls)) == {"city": "example", "days": 1}
    assert (await last_request(env.sim))["tool_choice"] == {"type": "any"}


async def test_cache_and_thinking_usage(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, cached_tokens=4, reasoning_tokens=7)
    events = await collect(env.adapter.stub, request())
    reasoning = "".join(e.delta.reasoning_text for e in events if e.HasField("delta"))
    assert reasoning  # the thinking block arrives as reasoning text
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == ANSWER
    usage = events[-2].usage
    # Anthropic's input_tokens excludes cache reads; the unified count includes them.
    prompt = 3 + 3 + (len(PROMPT) + 3) // 4
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_input_tokens) == (prompt, 4, 0)
    assert usage.reasoning_tokens == 7 and usage.output_tokens == (len(ANSWER) + 3) // 4 + 7


async def test_error_metadata_carries_request_id_and_type(env: VendorEnv) -> None:
    await env.sim.knobs(status=500)
    error, _ = await failure(env.adapter.stub, request())
    assert error.metadata["vendor_request_id"].startswith("req_")
    assert error.metadata["vendor_code"] == "api_error"
    error, _ = await failure(env.adapter.stub, request(provider="anthropic-badkey"))
    assert error.metadata["vendor_code"] == "authentication_error"
    assert_clean(error)


async def test_prompt_too_long_is_classified_without_the_message(env: VendorEnv) -> None:
    await env.sim.knobs(status=400, error_code="prompt_too_long")
    error, _ = await failure(env.adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG)
    assert error.metadata["vendor_code"] == "invalid_request_error"
    shown = error.message + str(error.metadata)
    assert "prompt is too long" not in shown and "maximum" not in shown


@pytest.mark.parametrize(
    "knobs",
    [
        {"status": 402, "retry_after_s": 3},
        {"status": 429, "error_code": "enforced_spend_limit_reached", "retry_after_s": 3},
    ],
)
async def test_exhausted_spend_is_not_retryable_later(env: VendorEnv, knobs: dict[str, object]) -> None:
    await env.sim.knobs(**knobs)
    error, _ = await failure(env.adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.metadata["quota"] == "exhausted"
    assert error.retry_after_s is None
    assert_clean(error)


async def test_overloaded_529_and_in_stream(env: VendorEnv) -> None:
    await env.sim.knobs(status=529, retry_after_s=2)
    error, _ = await failure(env.adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED)
    assert (error.metadata["http_status"], error.retry_after_s) == ("529", 2.0)
    await env.sim.knobs(text=ANSWER, chunks=6, error_after_chunks=5, status=529)
    error, received = await failure(env.adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED)
    assert error.metadata["in_stream"] == "true" and error.metadata["vendor_code"] == "overloaded_error"
    assert received and ANSWER.startswith("".join(e.delta.text for e in received))


async def test_untranslatable_request_never_reaches_the_vendor(env: VendorEnv) -> None:
    for chat, field in (
        ({"sampling": common_pb2.SamplingParams(seed=7)}, "sampling.seed"),
        ({"sampling": common_pb2.SamplingParams(presence_penalty=0.1)}, "sampling.presence_penalty"),
        (
            {"response_format": common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)},
            "response_format",
        ),
        (
            {
                "messages": [
                    common_pb2.Message(
                        role=common_pb2.ROLE_ASSISTANT,
                        tool_calls=[common_pb2.ToolCall(id="t", name="f", arguments_json="{oops")],
                    )
                ]
            },
            "messages[0].tool_calls[0].arguments_json",
        ),
    ):
        error, _ = await failure(env.adapter.stub, request(**chat))
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
        assert error.metadata["field"] == field
    assert (await env.sim.stats())["requests"] == 0


async def test_probe_uses_models_list_or_one_token(env: VendorEnv) -> None:
    ok = await env.adapter.stub.Probe(provider_pb2.ProbeRequest(provider="anthropic"), timeout=10)
    assert ok.ok
    assert (await env.sim.stats())["requests"] == 0  # GET /v1/models, not a message
    completion = await env.adapter.stub.Probe(
        provider_pb2.ProbeRequest(provider="anthropic-probe"), timeout=10
    )
    assert completion.ok and completion.headroom.limit_tokens == 30_000_000
    assert (await last_request(env.sim))["max_tokens"] == 1
