"""Cohere simulator tests, driven through the official ``cohere`` SDK (``AsyncClientV2``).

Using the real SDK as the client keeps the simulator from drifting away from the wire
format the SDK (and so the real API) uses.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import cohere
import httpx
import orjson
import pytest
import pytest_asyncio
from cohere.core.api_error import ApiError

from switchyard.sim.cohere import MODELS, PREAMBLE_TOKENS, THINKING_TEXT, token_counts
from switchyard.sim.faults import RunningSimulator, start_simulator

KEY = "co-sim-test-key"
MODEL = "command-a-03-2025"
MESSAGES: list[Any] = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about switchyards, please."},
]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME_TOOL: Any = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}


JSON_OBJECT: Any = {"type": "json_object"}
THINKING_OFF: Any = {"type": "disabled"}


def knobs(**values: Any) -> Any:
    """Per-request knob override, as SDK request options."""
    return {"additional_headers": {"x-sim-knobs": json.dumps(values)}}


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("cohere", port=0, api_key=KEY)
    try:
        yield running
    finally:
        await running.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


def sdk_client(sim: RunningSimulator, http: httpx.AsyncClient, key: str = KEY) -> cohere.AsyncClientV2:
    # The SDK joins "v2/chat" onto base_url by concatenation; max_retries=0 disables retries.
    return cohere.AsyncClientV2(
        api_key=key, base_url=sim.base_url, max_retries=0, timeout=10, httpx_client=http
    )


@pytest_asyncio.fixture
async def client(sim: RunningSimulator, http: httpx.AsyncClient) -> cohere.AsyncClientV2:
    return sdk_client(sim, http)


async def stats(sim: RunningSimulator) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(sim.root_url + "/_sim/stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


async def raw_post(sim: RunningSimulator, body: object, key: str = KEY) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            sim.base_url + "/v2/chat", content=orjson.dumps(body), headers={"Authorization": f"Bearer {key}"}
        )


def test_base_url_is_the_server_root(sim: RunningSimulator) -> None:
    assert sim.base_url == sim.root_url  # like "https://api.cohere.com"


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_unary_text_and_usage(client: cohere.AsyncClientV2) -> None:
    response = await client.chat(model=MODEL, messages=MESSAGES)
    assert response.finish_reason == "COMPLETE"
    assert response.id and len(response.id) == 36
    assert response.message.content is not None
    (item,) = response.message.content
    assert item.type == "text"
    text = item.text
    assert len(text.split()) >= 5 and "switchyards" not in text.lower()
    usage = response.usage
    assert usage is not None and usage.tokens is not None and usage.billed_units is not None
    tokens, billed = token_counts(MESSAGES)
    assert (usage.tokens.input_tokens, usage.billed_units.input_tokens) == (tokens, billed)
    assert tokens == PREAMBLE_TOKENS + 2 * 2 + math.ceil(14 / 4) + math.ceil(34 / 4)
    assert usage.tokens.output_tokens == usage.billed_units.output_tokens == math.ceil(len(text) / 4)
    assert usage.cached_tokens == 0
    again = await client.chat(model=MODEL, messages=MESSAGES)
    assert again.message.content is not None and again.message.content[0].type == "text"
    assert again.message.content[0].text == text  # deterministic per messages
    assert again.id != response.id


@pytest.mark.asyncio
async def test_streaming_text_matches_unary(client: cohere.AsyncClientV2) -> None:
    plain = await client.chat(model=MODEL, messages=MESSAGES)
    events = [event async for event in client.chat_stream(model=MODEL, messages=MESSAGES)]
    kinds = [event.type for event in events]
    assert kinds[0] == "message-start" and kinds[1] == "content-start"
    assert kinds[-2:] == ["content-end", "message-end"]
    assert kinds.count("content-delta") == 8  # default knob chunks=8
    text = "".join(
        e.delta.message.content.text or ""
        for e in events
        if e.type == "content-delta" and e.delta and e.delta.message and e.delta.message.content
    )
    assert plain.message.content is not None and plain.message.content[0].type == "text"
    assert text == plain.message.content[0].text
    end = events[-1]
    assert end.type == "message-end" and end.delta is not None
    assert end.delta.finish_reason == "COMPLETE" and end.delta.error is None
    assert end.delta.usage is not None and end.delta.usage.tokens is not None
    assert plain.usage is not None and plain.usage.tokens is not None
    assert end.delta.usage.tokens.output_tokens == plain.usage.tokens.output_tokens


@pytest.mark.asyncio
async def test_sse_event_names_repeat_the_type(sim: RunningSimulator) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True}
    response = await raw_post(sim, body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert len(response.headers["x-debug-trace-id"]) == 32
    assert int(response.headers["x-trial-endpoint-call-remaining"]) < int(
        response.headers["x-trial-endpoint-call-limit"]
    )
    blocks = [block for block in response.text.split("\n\n") if block]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        assert json.loads(data_line[6:])["type"] == event_line[7:]
    assert json.loads(blocks[-1].split("\n")[1][6:])["type"] == "message-end"  # nothing follows it


@pytest.mark.asyncio
async def test_fixed_text_cached_tokens_and_thinking(client: cohere.AsyncClientV2) -> None:
    opts = knobs(text="Hello there.", cached_tokens=5, reasoning_tokens=7, chunks=2)
    events = [e async for e in client.chat_stream(model=MODELS[1], messages=MESSAGES, request_options=opts)]
    starts = [e for e in events if e.type == "content-start"]
    assert [
        e.delta.message.content.type
        for e in starts
        if e.delta and e.delta.message and e.delta.message.content
    ] == [
        "thinking",
        "text",
    ]
    deltas = [
        e.delta.message.content for e in events if e.type == "content-delta" and e.delta and e.delta.message
    ]
    assert "".join(c.thinking or "" for c in deltas if c) == THINKING_TEXT
    assert "".join(c.text or "" for c in deltas if c) == "Hello there."
    end = events[-1]
    assert end.type == "message-end" and end.delta is not None and end.delta.usage is not None
    assert end.delta.usage.cached_tokens == 5
    assert end.delta.usage.tokens is not None and end.delta.usage.tokens.output_tokens == 3 + 7
    # Thinking off: no thinking block.
    response = await client.chat(
        model=MODELS[1], messages=MESSAGES, thinking=THINKING_OFF, request_options=opts
    )
    assert response.message.content is not None
    assert [item.type for item in response.message.content] == ["text"]


@pytest.mark.asyncio
async def test_streamed_tool_call(client: cohere.AsyncClientV2) -> None:
    events = [
        e
        async for e in client.chat_stream(
            model=MODEL,
            messages=MESSAGES,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice="REQUIRED",
            request_options=knobs(chunks=4),
        )
    ]
    kinds = [e.type for e in events]
    assert kinds[0] == "message-start" and "tool-plan-delta" in kinds
    assert kinds.index("tool-plan-delta") < kinds.index("tool-call-start")
    assert kinds.count("tool-call-delta") == 4 and kinds[-2:] == ["tool-call-end", "message-end"]
    start = next(e for e in events if e.type == "tool-call-start")
    assert start.delta is not None and start.delta.message is not None
    call = start.delta.message.tool_calls
    assert call is not None and call.function is not None
    assert call.function.name == "get_weather" and call.id.startswith("get_weather_")
    fragments = [
        e.delta.message.tool_calls.function.arguments or ""
        for e in events
        if e.type == "tool-call-delta"
        and e.delta
        and e.delta.message
        and e.delta.message.tool_calls
        and e.delta.message.tool_calls.function
    ]
    assert json.loads("".join(fragments)) == {"city": "example", "days": 1}
    end = events[-1]
    assert end.type == "message-end" and end.delta is not None and end.delta.finish_reason == "TOOL_CALL"
    none = await client.chat(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="NONE")
    assert none.finish_reason == "COMPLETE" and not none.message.tool_calls
    unary = await client.chat(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], tool_choice="REQUIRED")
    assert unary.finish_reason == "TOOL_CALL" and unary.message.tool_calls
    assert unary.message.tool_plan and unary.message.tool_calls[0].function is not None
    assert unary.message.tool_calls[0].function.name == "get_weather"


@pytest.mark.asyncio
async def test_tool_round_trip_history_is_accepted(client: cohere.AsyncClientV2) -> None:
    history: list[Any] = [
        *MESSAGES,
        {
            "role": "assistant",
            "tool_plan": "I will look it up.",
            "tool_calls": [
                {
                    "id": "get_weather_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "get_weather_1", "content": [{"type": "text", "text": '{"t":3}'}]},
    ]
    response = await client.chat(model=MODEL, messages=history, tools=[WEATHER_TOOL])
    assert response.finish_reason == "COMPLETE"
    orphan = [*MESSAGES, {"role": "tool", "tool_call_id": "nope", "content": "{}"}]
    with pytest.raises(cohere.BadRequestError):
        await client.chat(model=MODEL, messages=orphan)


@pytest.mark.asyncio
async def test_json_modes_and_max_tokens(client: cohere.AsyncClientV2) -> None:
    plain = await client.chat(model=MODEL, messages=MESSAGES, response_format=JSON_OBJECT)
    assert plain.message.content is not None and plain.message.content[0].type == "text"
    assert isinstance(json.loads(plain.message.content[0].text), dict)
    schema: Any = {"type": "json_object", "json_schema": WEATHER_TOOL["function"]["parameters"]}
    typed = await client.chat(model=MODEL, messages=MESSAGES, response_format=schema)
    assert typed.message.content is not None and typed.message.content[0].type == "text"
    assert json.loads(typed.message.content[0].text) == {"city": "example", "days": 1}
    short = await client.chat(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert short.finish_reason == "MAX_TOKENS"
    assert short.message.content is not None and short.message.content[0].type == "text"
    assert len(short.message.content[0].text) <= 8
    with pytest.raises(cohere.BadRequestError) as caught:
        await client.chat(model=MODEL, messages=MESSAGES, tools=[WEATHER_TOOL], response_format=JSON_OBJECT)
    assert "response_format" in caught.value.body["message"]


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_http_errors_raise_the_sdk_classes(client: cohere.AsyncClientV2) -> None:
    for status, error_class in (
        (400, cohere.BadRequestError),
        (403, cohere.ForbiddenError),
        (404, cohere.NotFoundError),
        (422, cohere.UnprocessableEntityError),
        (498, cohere.InvalidTokenError),
        (499, cohere.ClientClosedRequestError),
        (500, cohere.InternalServerError),
        (503, cohere.ServiceUnavailableError),
        (504, cohere.GatewayTimeoutError),
    ):
        with pytest.raises(error_class) as caught:
            await client.chat(model=MODEL, messages=MESSAGES, request_options=knobs(status=status))
        assert caught.value.status_code == status
        assert set(caught.value.body) == {"id", "message"}
    with pytest.raises(ApiError) as billing:
        await client.chat(model=MODEL, messages=MESSAGES, request_options=knobs(status=402))
    assert billing.value.status_code == 402 and "billing" in billing.value.body["message"]
    with pytest.raises(cohere.BadRequestError) as context:
        await client.chat(
            model=MODEL, messages=MESSAGES, request_options=knobs(status=400, error_code="too_many_tokens")
        )
    assert context.value.body["message"].startswith("too many tokens:")


@pytest.mark.asyncio
async def test_rate_limit(client: cohere.AsyncClientV2) -> None:
    with pytest.raises(cohere.TooManyRequestsError) as caught:
        await client.chat(
            model=MODEL,
            messages=MESSAGES,
            request_options=knobs(status=429, retry_after_s=2.5, ratelimit={"remaining_requests": 0}),
        )
    error = caught.value
    assert error.status_code == 429
    assert error.headers is not None
    assert error.headers["retry-after"] == "3"
    assert error.headers["x-trial-endpoint-call-remaining"] == "0"
    assert "per minute request limit" in error.body["message"]
    with pytest.raises(cohere.TooManyRequestsError) as trial:
        async for _ in client.chat_stream(
            model=MODEL, messages=MESSAGES, request_options=knobs(status=429, error_code="trial_key")
        ):
            pass
    assert trial.value.body["message"].startswith("You are using a Trial key")


@pytest.mark.asyncio
async def test_wrong_or_missing_key(sim: RunningSimulator, http: httpx.AsyncClient) -> None:
    wrong = sdk_client(sim, http, key="nope")
    with pytest.raises(cohere.UnauthorizedError) as caught:
        await wrong.chat(model=MODEL, messages=MESSAGES)
    assert caught.value.body["message"] == "invalid api token"
    with pytest.raises(cohere.UnauthorizedError):
        await wrong.models.list()
    bare = await http.post(sim.base_url + "/v2/chat", json={"model": MODEL, "messages": MESSAGES})
    assert (bare.status_code, bare.json()["message"]) == (401, "no api key supplied")
    assert (await stats(sim))["requests"] == 2  # both refused chats were counted


@pytest.mark.asyncio
async def test_in_stream_error(client: cohere.AsyncClientV2, sim: RunningSimulator) -> None:
    events = [
        e
        async for e in client.chat_stream(
            model=MODEL, messages=MESSAGES, request_options=knobs(chunks=6, error_after_chunks=3, status=500)
        )
    ]
    assert [e.type for e in events] == ["message-start", "content-start", "content-delta", "message-end"]
    end = events[-1]
    assert end.type == "message-end" and end.delta is not None
    assert end.delta.finish_reason == "ERROR" and end.delta.error and end.delta.usage is None
    timeout = [
        e
        async for e in client.chat_stream(
            model=MODEL, messages=MESSAGES, request_options=knobs(error_after_chunks=1, status=504)
        )
    ]
    last = timeout[-1]
    assert last.type == "message-end" and last.delta is not None and last.delta.finish_reason == "TIMEOUT"
    assert (await stats(sim))["errors"] == 2


@pytest.mark.asyncio
async def test_malformed_event_and_the_stream_ends(
    client: cohere.AsyncClientV2,
) -> None:
    # The SDK logs the JSON error and builds a placeholder event from the raw SSE fields
    # (no id, no delta); the answer then ends without a message-end.
    events = [
        e
        async for e in client.chat_stream(
            model=MODEL, messages=MESSAGES, request_options=knobs(chunks=6, malformed_after_chunks=3)
        )
    ]
    assert [e.type for e in events[:3]] == ["message-start", "content-start", "content-delta"]
    assert len(events) == 4
    broken = events[3]
    assert not getattr(broken, "id", None) and getattr(broken, "delta", None) is None
    assert all(e.type != "message-end" for e in events)


# --------------------------------------------------------------------------- #
# request validation
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("change", "status", "needle"),
    [
        ({"top_p": 0.5}, 422, "parameter 'top_p' is not a valid field"),
        ({"user": "u-1"}, 422, "parameter 'user' is not a valid field"),
        (
            {"tools": [{**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}]},
            422,
            "'strict'",
        ),
        ({"messages": [{"role": "user", "content": "hi", "name": "ada"}]}, 422, "'name'"),
        ({"model": None}, 400, "model"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "developer", "content": "x"}]}, 400, "role"),
        (
            {"messages": [{"role": "system", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            400,
            "image_url",
        ),
        ({"tool_choice": "REQUIRED"}, 400, "tool_choice"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, 400, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "parameters"),
        ({"stop_sequences": list("abcdef")}, 400, "stop_sequences"),
        ({"p": 1.0}, 400, "p must be"),
        ({"response_format": {"type": "json_schema"}}, 400, "response_format"),
        ({"safety_mode": "LENIENT"}, 400, "safety_mode"),
    ],
)
async def test_invalid_requests(
    sim: RunningSimulator, change: dict[str, Any], status: int, needle: str
) -> None:
    response = await raw_post(sim, {"model": MODEL, "messages": MESSAGES, **change})
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"id", "message"} and needle in body["message"]


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #


@pytest.mark.asyncio
async def test_models_list_is_not_a_chat_request(client: cohere.AsyncClientV2, sim: RunningSimulator) -> None:
    listed = await client.models.list()
    assert [model.name for model in listed.models] == list(MODELS)
    assert all(model.endpoints == ["chat"] and model.context_length for model in listed.models)
    assert listed.next_page_token is None
    chat_only = await client.models.list(endpoint="chat")
    assert len(chat_only.models) == len(MODELS)
    assert (await client.models.list(endpoint="rerank")).models == []
    one = await client.models.get(MODEL)
    assert one.name == MODEL
    with pytest.raises(cohere.NotFoundError):
        await client.models.get("no-such-model")
    assert (await stats(sim))["requests"] == 0
