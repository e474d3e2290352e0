"""OpenAI simulator tests, driven through the official ``openai`` SDK.

Using the real SDK as the client keeps the simulator from drifting away from
the wire format the SDK (and so the real API) uses.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

import switchyard
from switchyard.sim.faults import (
    FaultKnobs,
    KnobError,
    RunningSimulator,
    example_for_schema,
    format_duration,
    split_text,
    start_simulator,
)
from switchyard.sim.openai import prompt_tokens

MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about switchyards, please."},
]

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "temp": {"type": "number"},
                "metric": {"type": "boolean"},
                "hours": {"type": "array", "items": {"type": "integer"}},
                "extra": {"type": "object"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "optional": {"type": "string"},
            },
            "required": ["city", "days", "temp", "metric", "hours", "extra", "unit"],
        },
    },
}
TIME_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
TOOLS: Any = [WEATHER_TOOL, TIME_TOOL]
EXPECTED_WEATHER_ARGS = {
    "city": "example",
    "days": 1,
    "temp": 1,
    "metric": True,
    "hours": [],
    "extra": {},
    "unit": "c",
}


def function_of(call: Any) -> Any:
    """``call.function`` (typed loosely: newer SDKs union function and custom tool calls)."""
    return call.function


def knobs_header(**knobs: Any) -> dict[str, str]:
    """Per-request knob override header."""
    return {"x-sim-knobs": json.dumps(knobs)}


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("openai", port=0)
    try:
        yield running
    finally:
        await running.close()


@pytest_asyncio.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test-key", max_retries=0, timeout=10)
    try:
        yield sdk
    finally:
        await sdk.close()


async def get_stats(sim: RunningSimulator) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        resp = await http.get(sim.root_url + "/_sim/stats")
        resp.raise_for_status()
        data: dict[str, Any] = resp.json()
        return data


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_non_streaming_text(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.id.startswith("chatcmpl-")
    assert completion.object == "chat.completion"
    assert completion.model == "gpt-4o-mini"
    assert completion.system_fingerprint
    assert completion.created > 0
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    text = choice.message.content
    assert text and len(text.split()) >= 5
    assert "switchyards" not in text.lower()
    usage = completion.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens(MESSAGES)
    # 3 + (3 + ceil(14/4)) + (3 + ceil(34/4)) = 3 + 7 + 12
    assert usage.prompt_tokens == 22
    assert usage.completion_tokens == math.ceil(len(text) / 4)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0

    again = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert again.choices[0].message.content == text  # deterministic per messages
    assert again.id != completion.id
    other = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "something else"}]
    )
    assert other.choices[0].message.content != text


@pytest.mark.asyncio
async def test_fixed_text_and_usage_knobs(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="o3-mini",
        messages=MESSAGES,
        extra_headers=knobs_header(text="Hello there.", cached_tokens=5, reasoning_tokens=7),
    )
    assert completion.choices[0].message.content == "Hello there."
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == 3 + 7  # ceil(12/4) visible + reasoning
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 5
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 7


@pytest.mark.asyncio
async def test_streaming_matches_non_streaming_with_usage(client: openai.AsyncOpenAI) -> None:
    plain = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) == 8  # default knob chunks=8
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    # last choice chunk carries finish_reason, then the usage-only chunk
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert plain.usage is not None
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.asyncio
async def test_streaming_without_usage_and_chunk_count(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=knobs_header(chunks=3)
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)  # no usage chunk without include_usage
    assert sum(1 for c in chunks if c.choices[0].delta.content) == 3
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.asyncio
async def test_raw_sse_framing(sim: RunningSimulator) -> None:
    body = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient() as http:
        resp = await http.post(sim.base_url + "/chat/completions", json=body)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = [e for e in resp.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert first["usage"] is None
    usage_chunk = json.loads(events[-2][6:])
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["total_tokens"] > 0


@pytest.mark.asyncio
async def test_tool_call_streamed_in_fragments(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice="required",
        stream=True,
        extra_headers=knobs_header(chunks=5),
    )
    chunks = [chunk async for chunk in stream]
    first = chunks[0].choices[0].delta
    assert first.role == "assistant"
    assert first.tool_calls is not None
    head = first.tool_calls[0]
    assert head.index == 0
    assert head.id is not None and head.id.startswith("call_")
    assert head.type == "function"
    assert head.function is not None and head.function.name == "get_weather"
    assert head.function.arguments == ""
    fragments: list[str] = []
    for chunk in chunks[1:]:
        delta = chunk.choices[0].delta
        if delta.tool_calls:
            call = delta.tool_calls[0]
            assert call.index == 0 and call.id is None
            assert call.function is not None and call.function.arguments
            fragments.append(call.function.arguments)
    assert len(fragments) == 5
    assert json.loads("".join(fragments)) == EXPECTED_WEATHER_ARGS
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.asyncio
async def test_tool_choice_rules(client: openai.AsyncOpenAI) -> None:
    tools = TOOLS
    named = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert function_of(call).name == "get_time"
    assert json.loads(function_of(call).arguments) == {"tz": "example"}

    auto = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=tools)
    assert auto.choices[0].message.tool_calls is None
    assert auto.choices[0].finish_reason == "stop"

    knob = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=tools, extra_headers=knobs_header(tool_call=True)
    )
    assert knob.choices[0].message.tool_calls is not None
    assert function_of(knob.choices[0].message.tool_calls[0]).name == "get_weather"

    none = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        tools=tools,
        tool_choice="none",
        extra_headers=knobs_header(tool_call=True),
    )
    assert none.choices[0].message.tool_calls is None

    no_tools = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers=knobs_header(tool_call=True)
    )
    assert no_tools.choices[0].message.tool_calls is None


@pytest.mark.asyncio
async def test_json_response_formats(client: openai.AsyncOpenAI) -> None:
    obj = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, response_format={"type": "json_object"}
    )
    parsed = json.loads(obj.choices[0].message.content or "")
    assert isinstance(parsed, dict) and isinstance(parsed["answer"], str)

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "string"}},
                "required": ["zip"],
                "additionalProperties": False,
            },
            "nickname": {"type": ["string", "null"]},
        },
        "required": ["name", "age", "tags", "address", "nickname"],
        "additionalProperties": False,
    }
    structured = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": schema, "strict": True},
        },
    )
    data = json.loads(structured.choices[0].message.content or "")
    assert data == {
        "name": "example",
        "age": 1,
        "tags": [],
        "address": {"zip": "example"},
        "nickname": "example",
    }


@pytest.mark.asyncio
async def test_max_tokens_truncates_with_length(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3)
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is not None and 0 < len(choice.message.content) <= 12
    assert completion.usage is not None and completion.usage.completion_tokens == 3

    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_completion_tokens=2, stream=True
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert 0 < len(text) <= 8
    assert chunks[-1].choices[0].finish_reason == "length"


@pytest.mark.asyncio
async def test_finish_reason_override(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers=knobs_header(finish_reason="content_filter")
    )
    assert completion.choices[0].finish_reason == "content_filter"


@pytest.mark.asyncio
async def test_models_list(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    ids = [m.id for m in page.data]
    assert "gpt-4o" in ids and all(m.object == "model" for m in page.data)
    model = await client.models.retrieve("gpt-4o-mini")
    assert model.id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("knobs", "exc_type", "status", "code", "err_type"),
    [
        ({"status": 400}, openai.BadRequestError, 400, None, "invalid_request_error"),
        (
            {"status": 400, "error_code": "context_length_exceeded"},
            openai.BadRequestError,
            400,
            "context_length_exceeded",
            "invalid_request_error",
        ),
        ({"status": 401}, openai.AuthenticationError, 401, "invalid_api_key", "invalid_request_error"),
        ({"status": 403}, openai.PermissionDeniedError, 403, "unsupported_country_region_territory", None),
        ({"status": 404}, openai.NotFoundError, 404, "model_not_found", "invalid_request_error"),
        ({"status": 429, "retry_after_s": 7}, openai.RateLimitError, 429, "rate_limit_exceeded", "requests"),
        (
            {"status": 429, "error_code": "insufficient_quota"},
            openai.RateLimitError,
            429,
            "insufficient_quota",
            "insufficient_quota",
        ),
        ({"status": 500}, openai.InternalServerError, 500, None, "server_error"),
        ({"status": 503, "retry_after_s": 2}, openai.InternalServerError, 503, "server_is_overloaded", None),
    ],
)
async def test_error_status_maps_to_sdk_exception(
    client: openai.AsyncOpenAI,
    knobs: dict[str, Any],
    exc_type: type[openai.APIStatusError],
    status: int,
    code: str | None,
    err_type: str | None,
) -> None:
    with pytest.raises(exc_type) as info:
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers=knobs_header(**knobs)
        )
    err = info.value
    assert err.status_code == status
    assert err.code == code
    if err_type is not None:
        assert err.type == err_type
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    assert err.message
    assert err.request_id and err.request_id.startswith("req_")
    assert err.response.headers["x-ratelimit-limit-requests"]
    if code == "context_length_exceeded":
        assert err.param == "messages"
        assert "maximum context length" in str(err.message)
    if "retry_after_s" in knobs:
        assert err.response.headers["retry-after"] == str(knobs["retry_after_s"])
    else:
        assert "retry-after" not in err.response.headers


@pytest.mark.asyncio
async def test_error_message_override(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers=knobs_header(status=400, error_code="custom_code", error_message="nope"),
        )
    assert info.value.code == "custom_code"
    assert isinstance(info.value.body, dict) and info.value.body["message"] == "nope"


@pytest.mark.asyncio
async def test_request_validation(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="gpt-4o", messages=[])
    assert info.value.param == "messages" and info.value.code == "empty_array"

    async with httpx.AsyncClient() as http:
        url = sim.base_url + "/chat/completions"
        missing_model = await http.post(url, json={"messages": MESSAGES})
        assert missing_model.status_code == 400
        assert missing_model.json()["error"]["param"] == "model"
        assert missing_model.json()["error"]["type"] == "invalid_request_error"
        missing_messages = await http.post(url, json={"model": "gpt-4o"})
        assert missing_messages.json()["error"]["param"] == "messages"
        bad_json = await http.post(url, content=b"{not json", headers={"content-type": "application/json"})
        assert bad_json.status_code == 400 and bad_json.json()["error"]["param"] is None
        stream_opts = await http.post(
            url, json={"model": "gpt-4o", "messages": MESSAGES, "stream_options": {"include_usage": True}}
        )
        assert stream_opts.status_code == 400
        assert stream_opts.json()["error"]["param"] == "stream_options"


@pytest.mark.asyncio
async def test_api_key_enforced() -> None:
    running = await start_simulator("openai", api_key="sk-right-key-123456")
    try:
        wrong = openai.AsyncOpenAI(base_url=running.base_url, api_key="sk-wrong-key-000000", max_retries=0)
        right = openai.AsyncOpenAI(base_url=running.base_url, api_key="sk-right-key-123456", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            await wrong.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert info.value.code == "invalid_api_key"
        assert "sk-wrong-key-000000" not in str(info.value.message)  # key is masked
        ok = await right.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert ok.choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        async with httpx.AsyncClient() as http:
            resp = await http.post(
                running.base_url + "/chat/completions", json={"model": "m", "messages": MESSAGES}
            )
            assert resp.status_code == 401
            assert resp.json()["error"]["code"] == "invalid_api_key"
        await wrong.close()
        await right.close()
    finally:
        await running.close()


@pytest.mark.asyncio
async def test_in_stream_error_raises_api_error(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=knobs_header(error_after_chunks=3)
    )
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert not isinstance(info.value, openai.APIStatusError)
    assert len(received) == 3
    assert isinstance(info.value.body, dict) and info.value.body["type"] == "server_error"

    # selected error (status 429 inside a 200 stream), raw framing: no [DONE]
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            sim.base_url + "/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers=knobs_header(error_after_chunks=1, status=429),
        )
    assert resp.status_code == 200
    events = [e for e in resp.text.split("\n\n") if e]
    assert len(events) == 2
    assert json.loads(events[-1][6:])["error"]["code"] == "rate_limit_exceeded"
    assert "[DONE]" not in resp.text
    stats = await get_stats(sim)
    assert stats["errors"] == 2


@pytest.mark.asyncio
async def test_malformed_line(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=knobs_header(malformed_after_chunks=2)
    )
    count = 0
    with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK's SSE parser
        async for _ in stream:
            count += 1
    assert count == 2


@pytest.mark.asyncio
async def test_drop_after_chunks(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_headers=knobs_header(drop_after_chunks=2)
    )
    count = 0
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            count += 1
    assert count == 2
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers=knobs_header(drop_after_chunks=0)
        )
    stats = await get_stats(sim)
    assert stats["dropped"] == 2 and stats["disconnects"] == 0 and stats["active"] == 0


@pytest.mark.asyncio
async def test_script_first_fails_then_succeeds(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.post(sim.root_url + "/_sim/script", json=[{"status": 503, "retry_after_s": 0}, {}])
        assert resp.status_code == 200 and resp.json()["script_pending"] == 2
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    ok = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert ok.choices[0].message.content

    # the SDK's own retry sees the scripted failure and then the success
    async with httpx.AsyncClient() as http:
        await http.post(sim.root_url + "/_sim/stats/reset")
        await http.post(sim.root_url + "/_sim/script", json=[{"status": 503, "retry_after_s": 0.01}])
    retrying = client.with_options(max_retries=2)
    ok = await retrying.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert ok.choices[0].message.content
    stats = await get_stats(sim)
    assert stats["requests"] == 2 and stats["errors"] == 1 and stats["completed"] == 1


@pytest.mark.asyncio
async def test_control_knobs_endpoints(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    async with httpx.AsyncClient() as http:
        bad = await http.post(sim.root_url + "/_sim/knobs", json={"chunks": 2, "bogus": 1})
        assert bad.status_code == 400
        assert "bogus" in bad.json()["error"]["message"] and bad.json()["error"]["param"] == "bogus"
        wrong_type = await http.post(sim.root_url + "/_sim/knobs", json={"chunks": "two"})
        assert wrong_type.status_code == 400
        bad_script = await http.post(sim.root_url + "/_sim/script", json=[{}, {"nope": True}])
        assert bad_script.status_code == 400 and "script[1]" in bad_script.json()["error"]["message"]

        ok = await http.post(sim.root_url + "/_sim/knobs", json={"text": "Fixed answer."})
        assert ok.status_code == 200 and ok.json()["knobs"]["text"] == "Fixed answer."
        completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert completion.choices[0].message.content == "Fixed answer."
        # header overlays server-wide knobs field by field
        headed = await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=1, extra_headers=knobs_header(finish_reason="stop")
        )
        assert headed.choices[0].message.content == "Fixe" and headed.choices[0].finish_reason == "stop"

        reset = await http.delete(sim.root_url + "/_sim/knobs")
        assert reset.json()["knobs"] == FaultKnobs().to_dict()
        completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert completion.choices[0].message.content != "Fixed answer."

    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, extra_headers={"x-sim-knobs": '{"chunkz": 1}'}
        )
    assert info.value.code == "invalid_sim_knobs"


@pytest.mark.asyncio
async def test_ratelimit_headers(client: openai.AsyncOpenAI) -> None:
    first = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    second = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    for raw in (first, second):
        for name in ("requests", "tokens"):
            assert int(raw.headers[f"x-ratelimit-limit-{name}"]) > 0
            assert int(raw.headers[f"x-ratelimit-remaining-{name}"]) >= 0
            reset = raw.headers[f"x-ratelimit-reset-{name}"]
            assert reset.endswith("s") and reset[0].isdigit()
        assert raw.headers["x-request-id"].startswith("req_")
    assert int(second.headers["x-ratelimit-remaining-requests"]) == (
        int(first.headers["x-ratelimit-remaining-requests"]) - 1
    )
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == (
        int(first.headers["x-ratelimit-remaining-tokens"]) - prompt_tokens(MESSAGES)
    )
    assert first.parse().choices[0].message.content

    fixed = await client.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers=knobs_header(
            ratelimit={
                "limit_requests": 500,
                "remaining_requests": 3,
                "limit_tokens": 30000,
                "remaining_tokens": 120,
                "reset_requests": "120ms",
                "reset_tokens": 360,
            }
        ),
    )
    assert fixed.headers["x-ratelimit-limit-requests"] == "500"
    assert fixed.headers["x-ratelimit-remaining-requests"] == "3"
    assert fixed.headers["x-ratelimit-limit-tokens"] == "30000"
    assert fixed.headers["x-ratelimit-remaining-tokens"] == "120"
    assert fixed.headers["x-ratelimit-reset-requests"] == "120ms"
    assert fixed.headers["x-ratelimit-reset-tokens"] == "6m0s"


# --------------------------------------------------------------------------- #
# timing, cancellation, stats
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_delays(client: openai.AsyncOpenAI) -> None:
    started = time.perf_counter()
    await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_headers=knobs_header(first_byte_delay_ms=150)
    )
    assert time.perf_counter() - started >= 0.15

    started = time.perf_counter()
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_headers=knobs_header(chunks=4, chunk_delay_ms=40),
    )
    arrivals = [time.perf_counter() - started async for _ in stream]
    # 6 chunks (role, 4 content, finish) -> 5 gaps of 40 ms
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 0.18


@pytest.mark.asyncio
async def test_stats_count_client_disconnect_mid_stream(sim: RunningSimulator) -> None:
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient() as http:
        async with http.stream(
            "POST",
            sim.base_url + "/chat/completions",
            json=body,
            headers=knobs_header(chunks=50, chunk_delay_ms=50),
        ) as resp:
            assert resp.status_code == 200
            async for _ in resp.aiter_bytes():
                break  # got the first chunk; now hang up
        stats = await get_stats(sim)
        assert stats["active"] in (0, 1)
    deadline = time.monotonic() + 5
    while True:
        stats = await get_stats(sim)
        if stats["disconnects"] == 1 and stats["active"] == 0:
            break
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.02)
    assert stats["requests"] == 1 and stats["completed"] == 0
    assert stats["last_request"] == body

    # a disconnect while waiting for the first byte is noticed too
    async with httpx.AsyncClient(timeout=0.1) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                sim.base_url + "/chat/completions", json=body, headers=knobs_header(first_byte_delay_ms=5000)
            )
    deadline = time.monotonic() + 5
    while (stats := await get_stats(sim))["disconnects"] != 2:
        assert time.monotonic() < deadline, stats
        await asyncio.sleep(0.02)
    assert stats["active"] == 0

    async with httpx.AsyncClient() as http:
        reset = await http.post(sim.root_url + "/_sim/stats/reset")
    assert reset.json()["requests"] == 0 and reset.json()["disconnects"] == 0


def test_cli_subprocess_starts_serves_and_stops() -> None:
    services_dir = str(Path(switchyard.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (services_dir, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(
        [sys.executable, "-m", "switchyard.sim", "openai", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening http://127.0.0.1:"), line
        root = line.split()[1]
        port = int(root.rsplit(":", 1)[1])
        assert port > 0
        with openai.OpenAI(base_url=root + "/v1", api_key="sk-x", max_retries=0) as sdk:
            completion = sdk.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert completion.choices[0].message.content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout.read() == ""  # exactly one line on stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


# --------------------------------------------------------------------------- #
# vendor-neutral helpers
# --------------------------------------------------------------------------- #


def test_knob_parsing() -> None:
    knobs = FaultKnobs.from_dict({"chunks": 3, "ratelimit": {"limit_requests": 5, "reset_requests": 1.5}})
    assert knobs.chunks == 3 and knobs.ratelimit is not None
    assert knobs.ratelimit.reset_requests == "1.5s"
    overlay = FaultKnobs.from_dict({"text": "x"}, knobs)
    assert overlay.chunks == 3 and overlay.text == "x"
    bad: object
    for bad in ({"chunks": 0}, {"chunks": True}, {"status": 200}, {"first_byte_delay_ms": -1}, {"x": 1}, []):
        with pytest.raises(KnobError):
            FaultKnobs.from_dict(bad)
    with pytest.raises(KnobError) as info:
        FaultKnobs.from_dict({"ratelimit": {"limit": 1}})
    assert info.value.field_name == "limit"
    assert FaultKnobs.from_json(json.dumps(FaultKnobs().to_dict())) == FaultKnobs()


def test_format_duration() -> None:
    assert format_duration(0.12) == "120ms"
    assert format_duration(0.0) == "0ms"
    assert format_duration(1) == "1s"
    assert format_duration(17.28) == "17.28s"
    assert format_duration(360) == "6m0s"
    assert format_duration(3723) == "1h2m3s"


def test_split_text_and_schema_examples() -> None:
    text = "one two three four five"
    for parts in range(1, 30):
        pieces = split_text(text, parts)
        assert "".join(pieces) == text
        assert all(pieces) and len(pieces) == min(parts, len(text))
    assert split_text("", 4) == []
    assert example_for_schema({"type": "object", "properties": {"a": {"type": "number"}}}) == {"a": 1}
    assert example_for_schema({"anyOf": [{"type": "boolean"}, {"type": "null"}]}) is True
    assert example_for_schema({"type": "string", "const": "k"}) == "k"
