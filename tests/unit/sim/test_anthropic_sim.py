"""Anthropic simulator tests, driven through the official ``anthropic`` SDK.

Using the real SDK as the client keeps the simulator from drifting away from
the wire format the SDK (and so the real API) uses.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import anthropic
import httpx
import httpx2  # the anthropic SDK's HTTP client
import pytest
import pytest_asyncio

from switchyard.sim.anthropic import prompt_tokens
from switchyard.sim.faults import RunningSimulator, start_simulator

KEY = "sk-ant-sim-test-key"
MODEL = "claude-sonnet-4-6"
SYSTEM = "You are terse."
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me about switchyards, please."}]

WEATHER_TOOL: dict[str, Any] = {
    "name": "get_weather",
    "description": "Weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["c", "f"]},
            "optional": {"type": "string"},
        },
        "required": ["city", "days", "unit"],
    },
}
TIME_TOOL: dict[str, Any] = {
    "name": "get_time",
    "input_schema": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
}
TOOLS: Any = [WEATHER_TOOL, TIME_TOOL]
EXPECTED_WEATHER_ARGS = {"city": "example", "days": 1, "unit": "c"}


def knobs_header(**knobs: Any) -> dict[str, str]:
    """Per-request knob override header."""
    return {"x-sim-knobs": json.dumps(knobs)}


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("anthropic", port=0, api_key=KEY)
    try:
        yield running
    finally:
        await running.close()


@pytest_asyncio.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(base_url=sim.base_url, api_key=KEY, max_retries=0, timeout=10)
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


def raw_headers(**extra: str) -> dict[str, str]:
    return {"x-api-key": KEY, "anthropic-version": "2023-06-01", **extra}


def sse_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every event in a raw SSE body."""
    events = []
    for chunk in body.split("\n\n"):
        if not chunk.strip():
            continue
        name, data = chunk.split("\n", 1)
        assert name.startswith("event: ") and data.startswith("data: ")
        events.append((name[7:], json.loads(data[6:])))
    return events


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


async def test_base_url_is_the_server_root(sim: RunningSimulator) -> None:
    assert sim.base_url == sim.root_url  # like https://api.anthropic.com


async def test_non_streaming_text(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model=MODEL, max_tokens=200, system=SYSTEM, messages=MESSAGES)
    assert message.id.startswith("msg_01")
    assert (message.type, message.role, message.model) == ("message", "assistant", MODEL)
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert len(message.content) == 1 and message.content[0].type == "text"
    text = message.content[0].text
    assert len(text.split()) >= 5 and "switchyards" not in text.lower()
    # 3 + ceil(14/4) system + (3 + ceil(34/4)) for the message = 3 + 4 + 12
    assert message.usage.input_tokens == prompt_tokens({"system": SYSTEM, "messages": MESSAGES}) == 19
    assert message.usage.output_tokens == math.ceil(len(text) / 4)
    assert message.usage.cache_read_input_tokens == 0 and message.usage.cache_creation_input_tokens == 0

    again = await client.messages.create(model=MODEL, max_tokens=200, system=SYSTEM, messages=MESSAGES)
    assert again.content[0].type == "text" and again.content[0].text == text  # deterministic
    assert again.id != message.id
    other = await client.messages.create(model=MODEL, max_tokens=200, system="Be verbose.", messages=MESSAGES)
    assert other.content[0].type == "text" and other.content[0].text != text  # the system prompt counts


async def test_streaming_matches_non_streaming(client: anthropic.AsyncAnthropic) -> None:
    plain = await client.messages.create(model=MODEL, max_tokens=200, messages=MESSAGES)
    stream = await client.messages.create(model=MODEL, max_tokens=200, messages=MESSAGES, stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds == (
        ["message_start", "content_block_start"]
        + ["content_block_delta"] * 8  # default knob chunks=8
        + ["content_block_stop", "message_delta", "message_stop"]
    )
    start = events[0]
    assert start.type == "message_start"
    assert start.message.content == [] and start.message.stop_reason is None
    assert start.message.usage.input_tokens == plain.usage.input_tokens
    text = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert plain.content[0].type == "text" and text == plain.content[0].text
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == plain.usage.output_tokens
    assert delta.usage.input_tokens == plain.usage.input_tokens


async def test_stream_helper_accumulates_text(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        extra_headers=knobs_header(text="Hello there.", chunks=3),
    ) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == "Hello there." and len(pieces) == 3
    assert final.content[0].type == "text" and final.content[0].text == "Hello there."
    assert final.usage.output_tokens == 3


async def test_raw_sse_framing(sim: RunningSimulator) -> None:
    body = {"model": MODEL, "max_tokens": 100, "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient() as http:
        resp = await http.post(sim.base_url + "/v1/messages", json=body, headers=raw_headers())
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["request-id"].startswith("req_")
    events = sse_events(resp.text)
    assert all(name == data["type"] for name, data in events)
    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert "[DONE]" not in resp.text


async def test_tool_call_streamed_in_fragments(client: anthropic.AsyncAnthropic) -> None:
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "any"},
        stream=True,
        extra_headers=knobs_header(chunks=5),
    )
    events = [event async for event in stream]
    starts = [e for e in events if e.type == "content_block_start"]
    assert len(starts) == 1
    head = starts[0].content_block
    assert head.type == "tool_use"
    assert head.id.startswith("toolu_01") and head.name == "get_weather" and head.input == {}
    fragments = [
        e.delta.partial_json
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "input_json_delta"
    ]
    assert fragments[0] == "" and len(fragments) == 6  # an empty first fragment, then 5
    assert json.loads("".join(fragments)) == EXPECTED_WEATHER_ARGS
    assert events[-2].type == "message_delta" and events[-2].delta.stop_reason == "tool_use"

    async with client.messages.stream(
        model=MODEL, max_tokens=200, messages=MESSAGES, tools=TOOLS, tool_choice={"type": "any"}
    ) as helper:
        final = await helper.get_final_message()
    block = final.content[0]
    assert block.type == "tool_use" and block.input == EXPECTED_WEATHER_ARGS


async def test_tool_choice_rules(client: anthropic.AsyncAnthropic) -> None:
    named = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_time"},
    )
    assert named.stop_reason == "tool_use"
    block = named.content[0]
    assert block.type == "tool_use" and block.name == "get_time" and block.input == {"tz": "example"}

    auto = await client.messages.create(model=MODEL, max_tokens=200, messages=MESSAGES, tools=TOOLS)
    assert auto.stop_reason == "end_turn" and auto.content[0].type == "text"

    knob = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        tools=TOOLS,
        extra_headers=knobs_header(tool_call=True),
    )
    assert knob.content[0].type == "tool_use" and knob.content[0].name == "get_weather"

    none = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        tools=TOOLS,
        tool_choice={"type": "none"},
        extra_headers=knobs_header(tool_call=True),
    )
    assert none.content[0].type == "text"


async def test_tool_round_trip_is_accepted(client: anthropic.AsyncAnthropic) -> None:
    messages: Any = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {"city": "Oslo"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01A", "content": '{"temp": 3}'},
                {"type": "text", "text": "Thanks!"},
            ],
        },
    ]
    answer = await client.messages.create(model=MODEL, max_tokens=200, messages=messages, tools=TOOLS)
    assert answer.content[0].type == "text"


async def test_usage_with_cache_reads_and_thinking(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        extra_headers=knobs_header(text="Hello there.", cached_tokens=5, reasoning_tokens=7),
    )
    total_prompt = prompt_tokens({"messages": MESSAGES})
    assert message.usage.input_tokens == total_prompt - 5  # uncached only
    assert message.usage.cache_read_input_tokens == 5
    assert message.usage.output_tokens == 3 + 7  # ceil(12/4) visible + thinking
    assert message.usage.output_tokens_details is not None
    assert message.usage.output_tokens_details.thinking_tokens == 7
    assert [block.type for block in message.content] == ["thinking", "text"]

    async with client.messages.stream(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        extra_headers=knobs_header(text="Hello there.", cached_tokens=5, reasoning_tokens=7),
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "thinking" in kinds and "signature" in kinds
    thinking = final.content[0]
    assert thinking.type == "thinking" and thinking.thinking and thinking.signature
    assert final.usage.output_tokens == 10 and final.usage.cache_read_input_tokens == 5
    assert final.usage.output_tokens_details is not None
    assert final.usage.output_tokens_details.thinking_tokens == 7


async def test_structured_output(client: anthropic.AsyncAnthropic) -> None:
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
        },
        "required": ["name", "age", "tags", "address"],
        "additionalProperties": False,
    }
    message = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    block = message.content[0]
    assert block.type == "text"
    assert json.loads(block.text) == {"name": "example", "age": 1, "tags": [], "address": {"zip": "example"}}


async def test_max_tokens_and_stop_sequences(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model=MODEL, max_tokens=3, messages=MESSAGES)
    assert message.stop_reason == "max_tokens"
    assert message.content[0].type == "text" and 0 < len(message.content[0].text) <= 12
    assert message.usage.output_tokens == 3

    stopped = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        stop_sequences=["END", "there"],
        extra_headers=knobs_header(text="Hello there. END"),
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", "there")
    assert stopped.content[0].type == "text" and stopped.content[0].text == "Hello "

    stream = await client.messages.create(
        model=MODEL,
        max_tokens=200,
        messages=MESSAGES,
        stop_sequences=["END"],
        stream=True,
        extra_headers=knobs_header(text="One two END three"),
    )
    events = [event async for event in stream]
    text = "".join(
        e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta"
    )
    assert text == "One two "
    final_delta = events[-2]
    assert final_delta.type == "message_delta"
    assert (final_delta.delta.stop_reason, final_delta.delta.stop_sequence) == ("stop_sequence", "END")


async def test_finish_reason_override(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(
        model=MODEL, max_tokens=200, messages=MESSAGES, extra_headers=knobs_header(finish_reason="refusal")
    )
    assert message.stop_reason == "refusal"


async def test_models_list(client: anthropic.AsyncAnthropic, sim: RunningSimulator) -> None:
    page = await client.models.list()
    ids = [model.id for model in page.data]
    assert MODEL in ids and all(model.type == "model" for model in page.data)
    model = await client.models.retrieve("claude-haiku-4-5")
    assert (model.id, model.display_name) == ("claude-haiku-4-5", "Claude Haiku 4.5")
    assert model.max_input_tokens == 200_000
    with pytest.raises(anthropic.NotFoundError) as info:
        await client.models.retrieve("claude-nope")
    assert info.value.type == "not_found_error"
    assert (await get_stats(sim))["requests"] == 0  # the models list is not a chat request


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("knobs", "exc_type", "status", "err_type"),
    [
        ({"status": 400}, anthropic.BadRequestError, 400, "invalid_request_error"),
        ({"status": 401}, anthropic.AuthenticationError, 401, "authentication_error"),
        ({"status": 402}, anthropic.PaymentRequiredError, 402, "billing_error"),
        ({"status": 403}, anthropic.PermissionDeniedError, 403, "permission_error"),
        ({"status": 404}, anthropic.NotFoundError, 404, "not_found_error"),
        ({"status": 413}, anthropic.ContentTooLargeError, 413, "request_too_large"),
        ({"status": 429}, anthropic.RateLimitError, 429, "rate_limit_error"),
        ({"status": 500}, anthropic.InternalServerError, 500, "api_error"),
        ({"status": 504}, anthropic.GatewayTimeoutError, 504, "timeout_error"),
        ({"status": 529}, anthropic.OverloadedError, 529, "overloaded_error"),
        (
            {"status": 500, "error_code": "overloaded_error"},
            anthropic.InternalServerError,
            500,
            "overloaded_error",
        ),
    ],
)
async def test_http_errors_raise_the_sdk_classes(
    client: anthropic.AsyncAnthropic,
    knobs: dict[str, Any],
    exc_type: type[anthropic.APIStatusError],
    status: int,
    err_type: str,
) -> None:
    with pytest.raises(exc_type) as info:
        await client.messages.create(
            model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers=knobs_header(**knobs)
        )
    error = info.value
    assert error.status_code == status
    assert error.type == err_type
    assert error.request_id is not None and error.request_id.startswith("req_")
    assert isinstance(error.body, dict) and error.body["type"] == "error"
    assert error.body["request_id"] == error.request_id


async def test_context_too_long_messages(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            extra_headers=knobs_header(status=400, error_code="prompt_too_long"),
        )
    assert info.value.type == "invalid_request_error" and info.value.error_code is None
    assert info.value.api_message is not None
    assert info.value.api_message.startswith("prompt is too long: ")
    assert info.value.api_message.endswith(" tokens > 200000 maximum")
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            extra_headers=knobs_header(status=400, error_code="context_limit_exceeded"),
        )
    assert info.value.api_message is not None
    assert info.value.api_message.startswith("input length and `max_tokens` exceed context limit: ")


async def test_detail_error_codes(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            extra_headers=knobs_header(status=429, error_code="enforced_spend_limit_reached"),
        )
    assert type(info.value).__name__ == "EnforcedSpendLimitReachedError"
    assert info.value.error_code == "enforced_spend_limit_reached"
    assert info.value.type == "rate_limit_error"


async def test_rate_limit_headers_and_retry_after(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=MESSAGES,
            extra_headers=knobs_header(status=429, retry_after_s=2.5, ratelimit={"remaining_requests": 0}),
        )
    headers = info.value.response.headers
    assert headers["retry-after"] == "3"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"

    first = await client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    second = await client.messages.with_raw_response.create(model=MODEL, max_tokens=100, messages=MESSAGES)
    for raw in (first, second):
        for family in ("requests", "tokens", "input-tokens", "output-tokens"):
            assert int(raw.headers[f"anthropic-ratelimit-{family}-limit"]) > 0
            assert int(raw.headers[f"anthropic-ratelimit-{family}-remaining"]) >= 0
            reset = datetime.fromisoformat(raw.headers[f"anthropic-ratelimit-{family}-reset"])
            assert reset.tzinfo is not None and 0 <= reset.timestamp() - time.time() <= 61
        assert raw.headers["request-id"].startswith("req_")
    assert int(second.headers["anthropic-ratelimit-requests-remaining"]) == (
        int(first.headers["anthropic-ratelimit-requests-remaining"]) - 1
    )
    assert int(second.headers["anthropic-ratelimit-tokens-remaining"]) == (
        int(first.headers["anthropic-ratelimit-tokens-remaining"]) - prompt_tokens({"messages": MESSAGES})
    )
    assert (await first.parse()).content

    fixed = await client.messages.with_raw_response.create(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        extra_headers=knobs_header(
            ratelimit={"limit_requests": 50, "remaining_requests": 3, "reset_requests": 360}
        ),
    )
    assert fixed.headers["anthropic-ratelimit-requests-limit"] == "50"
    assert fixed.headers["anthropic-ratelimit-requests-remaining"] == "3"
    fixed_reset = datetime.fromisoformat(fixed.headers["anthropic-ratelimit-requests-reset"]).timestamp()
    assert 358 <= fixed_reset - time.time() <= 361


async def test_in_stream_error(client: anthropic.AsyncAnthropic, sim: RunningSimulator) -> None:
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        stream=True,
        extra_headers=knobs_header(error_after_chunks=4, status=529),
    )
    received: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        async for event in stream:
            received.append(event.type)
    # The `ping` (frame 3) is swallowed by the SDK.
    assert received == ["message_start", "content_block_start", "content_block_delta"]
    assert info.value.status_code == 200  # the error arrived inside a 200 stream
    assert isinstance(info.value.body, dict)
    assert info.value.body == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }

    async with httpx.AsyncClient() as http:
        resp = await http.post(
            sim.base_url + "/v1/messages",
            json={"model": MODEL, "max_tokens": 100, "messages": MESSAGES, "stream": True},
            headers=raw_headers(**knobs_header(error_after_chunks=1)),
        )
    events = sse_events(resp.text)
    assert [name for name, _ in events] == ["message_start", "error"]
    assert events[-1][1]["error"]["type"] == "api_error"
    assert (await get_stats(sim))["errors"] == 2


async def test_malformed_event(client: anthropic.AsyncAnthropic) -> None:
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        stream=True,
        extra_headers=knobs_header(malformed_after_chunks=4),
    )
    count = 0
    with pytest.raises(ValueError):  # json.JSONDecodeError from the SDK's event parsing
        async for _ in stream:
            count += 1
    assert count == 3


async def test_dropped_connection(client: anthropic.AsyncAnthropic, sim: RunningSimulator) -> None:
    stream = await client.messages.create(
        model=MODEL,
        max_tokens=100,
        messages=MESSAGES,
        stream=True,
        extra_headers=knobs_header(drop_after_chunks=4),
    )
    # A body cut mid-stream: older SDKs let their HTTP client's error through, newer ones wrap it
    # in a connection error whose cause it is.
    with pytest.raises((httpx2.RemoteProtocolError, anthropic.APIConnectionError)) as info:
        async for _ in stream:
            pass
    cut = info.value if isinstance(info.value, httpx2.RemoteProtocolError) else info.value.__cause__
    assert isinstance(cut, httpx2.RemoteProtocolError), repr(info.value)
    with pytest.raises(anthropic.APIConnectionError):
        await client.messages.create(
            model=MODEL, max_tokens=100, messages=MESSAGES, extra_headers=knobs_header(drop_after_chunks=0)
        )
    stats = await get_stats(sim)
    assert stats["dropped"] == 2 and stats["active"] == 0


async def test_api_key_and_version(sim: RunningSimulator) -> None:
    wrong = anthropic.AsyncAnthropic(base_url=sim.base_url, api_key="sk-ant-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as info:
        await wrong.messages.create(model=MODEL, max_tokens=10, messages=MESSAGES)
    assert info.value.type == "authentication_error"
    assert "sk-ant-wrong" not in str(info.value)
    with pytest.raises(anthropic.AuthenticationError):
        await wrong.models.list()
    await wrong.close()
    url = sim.base_url + "/v1/messages"
    body = {"model": MODEL, "max_tokens": 10, "messages": MESSAGES}
    async with httpx.AsyncClient() as http:
        ok = await http.post(url, json=body, headers=raw_headers())  # x-api-key, as the API documents
        assert ok.status_code == 200 and ok.json()["type"] == "message"
        missing = await http.post(url, json=body, headers={"anthropic-version": "2023-06-01"})
        assert missing.status_code == 401
        assert missing.json()["error"] == {
            "type": "authentication_error",
            "message": "x-api-key header is required",
        }
        no_version = await http.post(url, json=body, headers={"x-api-key": KEY})
        assert no_version.status_code == 400 and "anthropic-version" in no_version.json()["error"]["message"]
        bad_version = await http.post(
            url, json=body, headers=raw_headers(**{"anthropic-version": "1999-01-01"})
        )
        assert bad_version.status_code == 400


async def test_sampling_parameters_depend_on_the_version(client: anthropic.AsyncAnthropic) -> None:
    # The 2.x SDK sends anthropic-version 2026-10-21, which refuses sampling parameters...
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_body={"temperature": 0.5}
        )
    assert info.value.api_message == "temperature: Extra inputs are not permitted"
    # ...while 2023-06-01 takes them.
    message = await client.messages.create(
        model=MODEL,
        max_tokens=10,
        messages=MESSAGES,
        extra_body={"temperature": 0.5, "top_p": 0.9},
        extra_headers={"anthropic-version": "2023-06-01"},
    )
    assert message.content


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": MESSAGES}, "max_tokens: Field required"),
        ({"max_tokens": 10}, "messages: Field required"),
        ({"max_tokens": 10, "messages": []}, "at least one message"),
        ({"max_tokens": 10, "messages": MESSAGES, "seed": 1}, "seed: Extra inputs are not permitted"),
        (
            {"max_tokens": 10, "messages": [{"role": "system", "content": "x"}, *MESSAGES]},
            'Unexpected role "system"',
        ),
        ({"max_tokens": 10, "messages": [{"role": "user", "content": ""}]}, "must be non-empty"),
        ({"max_tokens": 10, "messages": MESSAGES, "temperature": 1.5}, "temperature"),
        (
            {"max_tokens": 10, "messages": MESSAGES, "metadata": {"user_id": "u", "tags": {}}},
            "metadata.tags: Extra inputs are not permitted",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    *MESSAGES,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                ],
            },
            "`tool_use` ids were found without `tool_result` blocks immediately after: t1",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "tool_result", "tool_use_id": "t9", "content": "x"}],
                    }
                ],
            },
            "unexpected `tool_use_id` found in `tool_result` blocks: t9",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    *MESSAGES,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}],
                    },
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "first"},
                            {"type": "tool_result", "tool_use_id": "t1"},
                        ],
                    },
                ],
            },
            "`tool_result` blocks must come first",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    *MESSAGES,
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": "{}"}],
                    },
                ],
            },
            "input: Input should be a valid dictionary",
        ),
        (
            {
                "max_tokens": 10,
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image",
                                "source": {"type": "base64", "media_type": "image/bmp", "data": "AA"},
                            }
                        ],
                    }
                ],
            },
            "media_type",
        ),
        (
            {
                "max_tokens": 10,
                "messages": MESSAGES,
                "tools": [{"name": "f", "input_schema": {"type": "string"}}],
            },
            "input_schema.type",
        ),
        (
            {
                "max_tokens": 10,
                "messages": MESSAGES,
                "tools": [TIME_TOOL],
                "tool_choice": {"type": "tool", "name": "x"},
            },
            "Tool 'x' not found",
        ),
        (
            {"max_tokens": 10, "messages": MESSAGES, "output_config": {"format": {"type": "json_object"}}},
            "output_config.format.type",
        ),
    ],
)
async def test_request_validation(sim: RunningSimulator, body: dict[str, Any], fragment: str) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.post(
            sim.base_url + "/v1/messages", json={"model": MODEL, **body}, headers=raw_headers()
        )
    assert resp.status_code == 400
    payload = resp.json()
    assert payload["type"] == "error" and payload["error"]["type"] == "invalid_request_error"
    assert fragment in payload["error"]["message"]
    assert payload["request_id"] == resp.headers["request-id"]


async def test_consecutive_turns_of_one_role_are_combined(client: anthropic.AsyncAnthropic) -> None:
    messages: Any = [
        {"role": "user", "content": "one"},
        {"role": "user", "content": [{"type": "text", "text": "two"}]},
    ]
    message = await client.messages.create(model=MODEL, max_tokens=100, messages=messages)
    assert message.stop_reason == "end_turn"


async def test_bad_knobs_header(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, extra_headers={"x-sim-knobs": '{"chunkz": 1}'}
        )
    assert info.value.error_code == "invalid_sim_knobs"


async def test_sdk_retry_sees_the_scripted_failure_then_succeeds(
    client: anthropic.AsyncAnthropic, sim: RunningSimulator
) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.post(sim.root_url + "/_sim/script", json=[{"status": 529, "retry_after_s": 0}])
        assert resp.status_code == 200
    message = await client.with_options(max_retries=2).messages.create(
        model=MODEL, max_tokens=10, messages=MESSAGES
    )
    assert message.content
    stats = await get_stats(sim)
    assert stats["requests"] == 2 and stats["errors"] == 1 and stats["completed"] == 1
