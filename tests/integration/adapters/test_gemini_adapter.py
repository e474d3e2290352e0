"""Gemini's own wire details through the adapter (the shared behaviour is in
`test_adapter_table.py`): what the request body carries, Gemini-only errors and metadata,
the ids Gemini reports, and tool-call history going back to the vendor."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import orjson
import pytest

from switchyard.common.errors import Reason
from switchyard.v1 import common_pb2, provider_pb2

from .cases import CASES
from .conftest import SimHandle, VendorEnv, start_vendor_env
from .support import ANSWER, PROMPT, SCHEMA, WEATHER, assert_clean, collect, failure
from .support import request as generic_request

MODEL = "gemini-2.5-flash"


@pytest.fixture(scope="module")
async def gemini_env() -> AsyncIterator[VendorEnv]:
    case = next(case for case in CASES if case.vendor == "gemini")
    async for env in start_vendor_env(case):
        yield env


@pytest.fixture
async def sim(gemini_env: VendorEnv) -> SimHandle:
    await gemini_env.sim.reset()
    return gemini_env.sim


def request(provider: str = "gemini", model: str = MODEL, **chat: object) -> provider_pb2.GenerateRequest:
    return generic_request(provider, model, **chat)


async def last_request(sim: SimHandle) -> dict[str, object]:
    sent: dict[str, object] = (await sim.stats())["last_request"]
    return sent


async def test_streamed_request_body_and_ids(gemini_env: VendorEnv, sim: SimHandle) -> None:
    await sim.knobs(text=ANSWER)
    events = await collect(gemini_env.adapter.stub, request())
    done = events[-1].done
    # No request-id header: the id is the body's responseId.
    assert len(done.vendor_request_id) == 23
    assert done.vendor_model == MODEL
    assert not done.HasField("headroom")
    # The model and the streaming choice are in the URL, not the body.
    assert await last_request(sim) == {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}


async def test_sampling_and_system_reach_the_vendor(gemini_env: VendorEnv, sim: SimHandle) -> None:
    sampling = common_pb2.SamplingParams(
        max_output_tokens=3, temperature=0.2, top_p=0.5, seed=7, stop_sequences=["END"], presence_penalty=0.1
    )
    system = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[common_pb2.ContentPart(text="be brief")])
    ask = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)])
    events = await collect(gemini_env.adapter.stub, request(messages=[system, ask], sampling=sampling))
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    sent = await last_request(sim)
    assert sent["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert sent["generationConfig"] == {
        "maxOutputTokens": 3,
        "temperature": 0.2,
        "topP": 0.5,
        "seed": 7,
        "stopSequences": ["END"],
        "presencePenalty": pytest.approx(0.1),
    }


async def test_tools_and_formats_reach_the_vendor(gemini_env: VendorEnv, sim: SimHandle) -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")
    events = await collect(gemini_env.adapter.stub, request(tools=[WEATHER], tool_choice=choice))
    call = events[0].delta.tool_calls[0]
    assert call.id.startswith("call_") and "~" not in call.id
    sent = await last_request(sim)
    assert sent["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Forecast",
                    "parametersJsonSchema": orjson.loads(SCHEMA),
                }
            ]
        }
    ]
    assert sent["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="forecast",
        json_schema=SCHEMA,
        strict=True,
    )
    await collect(gemini_env.adapter.stub, request(response_format=schema))
    config = (await last_request(sim))["generationConfig"]
    assert config == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {**orjson.loads(SCHEMA), "title": "forecast"},
    }


async def test_tool_history_goes_back_to_the_vendor(gemini_env: VendorEnv, sim: SimHandle) -> None:
    stub = gemini_env.adapter.stub
    required = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    first = await collect(
        stub, request(model="gemini-3-flash-preview", tools=[WEATHER], tool_choice=required)
    )
    call = first[0].delta.tool_calls[0]
    history = [
        common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)]),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            tool_calls=[
                common_pb2.ToolCall(id=call.id, name=call.name, arguments_json=call.arguments_fragment)
            ],
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL,
            tool_call_id=call.id,
            parts=[common_pb2.ContentPart(text='{"temp": 3}')],
        ),
    ]
    await sim.knobs(text=ANSWER)
    events = await collect(stub, request(model="gemini-3-flash-preview", messages=history, tools=[WEATHER]))
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == ANSWER
    contents = (await last_request(sim))["contents"]
    assert contents == [
        {"role": "user", "parts": [{"text": PROMPT}]},
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {
                        "name": "get_weather",
                        "args": {"city": "example", "days": 1},
                        "id": call.id,
                    },
                    "thoughtSignature": "skip_thought_signature_validator",
                }
            ],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"temp": 3}, "id": call.id}}],
        },
    ]


async def test_gemini_error_metadata(gemini_env: VendorEnv, sim: SimHandle) -> None:
    stub = gemini_env.adapter.stub
    error, _ = await failure(stub, request(provider="gemini-badkey"))
    assert (error.metadata["vendor_code"], error.metadata["vendor_reason"]) == (
        "INVALID_ARGUMENT",
        "API_KEY_INVALID",
    )
    assert_clean(error)
    await sim.knobs(status=429, retry_after_s=4)
    error, _ = await failure(stub, request())
    assert error.retry_after_s == 4.0
    assert error.metadata["quota_id"] == "GenerateRequestsPerMinutePerProjectPerModel"
    assert_clean(error)
    await sim.knobs(
        status=400,
        error_message="The input token count (9) exceeds the maximum number of tokens allowed (1).",
    )
    error, _ = await failure(stub, request())
    assert error.reason == Reason.CONTEXT_TOO_LONG
    assert "token count" not in error.message


async def test_mid_stream_rate_limit_carries_its_retry_delay(gemini_env: VendorEnv, sim: SimHandle) -> None:
    await sim.knobs(text=ANSWER, chunks=6, error_after_chunks=2, status=429, retry_after_s=5)
    error, received = await failure(gemini_env.adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert (error.metadata["in_stream"], error.retry_after_s) == ("true", 5.0)
    assert len(received) == 2


async def test_malformed_event_is_named(gemini_env: VendorEnv, sim: SimHandle) -> None:
    await sim.knobs(text=ANSWER, chunks=6, malformed_after_chunks=3)
    error, _ = await failure(gemini_env.adapter.stub, request())
    assert error.reason == Reason.UPSTREAM_PROTOCOL_ERROR
    assert "not valid JSON" in error.message


async def test_untranslatable_requests_never_reach_the_vendor(gemini_env: VendorEnv, sim: SimHandle) -> None:
    stub = gemini_env.adapter.stub
    error, _ = await failure(stub, request(metadata=common_pb2.RequestMetadata(end_user="u-1")))
    assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "metadata.end_user")
    orphan = common_pb2.Message(
        role=common_pb2.ROLE_TOOL, tool_call_id="call_x", parts=[common_pb2.ContentPart(text="42")]
    )
    ask = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)])
    error, _ = await failure(stub, request(messages=[ask, orphan]))
    assert error.metadata["field"] == "messages[1].tool_call_id"
    assert (await sim.stats())["requests"] == 0


async def test_probe_uses_models_list_or_one_token(gemini_env: VendorEnv, sim: SimHandle) -> None:
    stub = gemini_env.adapter.stub
    ok = await stub.Probe(provider_pb2.ProbeRequest(provider="gemini"), timeout=10)
    assert ok.ok and not ok.HasField("headroom")
    assert (await sim.stats())["requests"] == 0  # GET /models, not a generation
    completion = await stub.Probe(provider_pb2.ProbeRequest(provider="gemini-probe"), timeout=10)
    assert completion.ok
    assert (await last_request(sim))["generationConfig"] == {"maxOutputTokens": 1}
