"""Mistral simulator tests, driven through the official ``mistralai`` SDK.

The SDK parses every answer into its own models (``ChatCompletionResponse``,
``CompletionEvent``, ``ModelList``) and raises its own exceptions, so the simulator cannot
drift into a private dialect. SDK retries are off (``RetryConfig("none", ...)``).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import pytest
from mistralai.client import Mistral, errors, models
from mistralai.client.utils import BackoffStrategy, RetryConfig

from switchyard.sim.faults import RunningSimulator, start_simulator
from switchyard.sim.mistral import MAX_CONTEXT_TOKENS
from switchyard.sim.openai import prompt_tokens

KEY = "sim-mistral-key-0123456789"
MESSAGES: Any = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Tell me about switchyards, please."},
]
WEATHER: Any = {
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
TIME: Any = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
    },
}
CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
NO_RETRIES = RetryConfig("none", BackoffStrategy(1, 1, 1.0, 1), False)


def knobs(**values: Any) -> dict[str, str]:
    return {"x-sim-knobs": json.dumps(values)}


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("mistral", port=0, api_key=KEY)
    try:
        yield running
    finally:
        await running.close()


@pytest.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[Mistral]:
    # The SDK's paths carry `/v1`: its server URL is the simulator's root.
    async with Mistral(
        api_key=KEY, server_url=sim.root_url, retry_config=NO_RETRIES, timeout_ms=10_000
    ) as sdk:
        yield sdk


async def chunks_of(stream: Any) -> list[models.CompletionChunk]:
    return [event.data async for event in stream]


def text_of(chunks: list[models.CompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content for c in chunks if isinstance(c.choices[0].delta.content, str))


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


async def test_unary_text_and_usage(client: Mistral) -> None:
    response = await client.chat.complete_async(model="mistral-small-latest", messages=MESSAGES)
    assert re.fullmatch(r"[0-9a-f]{32}", response.id)
    assert (response.object, response.model) == ("chat.completion", "mistral-small-latest")
    choice = response.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message is not None and isinstance(choice.message.content, str)
    text = choice.message.content
    assert len(text.split()) >= 5 and "switchyards" not in text.lower()
    assert response.usage.prompt_tokens == prompt_tokens(MESSAGES) == 22
    assert response.usage.completion_tokens == -(-len(text) // 4)
    assert response.usage.total_tokens == 22 + response.usage.completion_tokens
    assert response.usage.additional_properties["prompt_tokens_details"] == {"cached_tokens": 0}
    again = await client.chat.complete_async(model="mistral-small-latest", messages=MESSAGES)
    assert again.choices[0].message is not None and again.choices[0].message.content == text


async def test_streaming_text_with_usage_on_the_last_chunk(client: Mistral) -> None:
    plain = await client.chat.complete_async(model="mistral-small-latest", messages=MESSAGES)
    chunks = await chunks_of(await client.chat.stream_async(model="mistral-small-latest", messages=MESSAGES))
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)
    assert (chunks[0].choices[0].delta.role, chunks[0].choices[0].delta.content) == ("assistant", "")
    assert sum(1 for c in chunks[1:-1] if c.choices[0].delta.content) == 8  # default chunks=8
    assert plain.choices[0].message is not None
    assert text_of(chunks) == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == "stop" and last.choices[0].delta.content == ""
    assert last.usage is not None and last.usage.prompt_tokens == plain.usage.prompt_tokens
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert all(c.usage is None and c.choices[0].finish_reason is None for c in chunks[:-1])


async def test_raw_sse_framing(sim: RunningSimulator) -> None:
    body = {"model": "mistral-small-latest", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
        response = await http.post(sim.base_url + "/chat/completions", json=body, headers=knobs(chunks=2))
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    first, last = json.loads(events[0][6:]), json.loads(events[-2][6:])
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "usage" not in first
    assert last["choices"][0]["finish_reason"] == "stop" and last["usage"]["total_tokens"] > 0
    assert len(events) == 5  # role, 2 pieces, finish+usage, [DONE]


async def test_streamed_tool_call_arrives_whole(client: Mistral) -> None:
    stream = await client.chat.stream_async(
        model="mistral-small-latest",
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice="any",
        http_headers=knobs(chunks=5),
    )
    chunks = await chunks_of(stream)
    assert len(chunks) == 2  # the role chunk, then the whole call with finish and usage
    delta = chunks[1].choices[0].delta
    assert isinstance(delta.tool_calls, list) and len(delta.tool_calls) == 1
    call = delta.tool_calls[0]
    assert CALL_ID.fullmatch(call.id or "")
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, str)
    assert json.loads(call.function.arguments) == {"city": "example", "days": 1}
    assert chunks[1].choices[0].finish_reason == "tool_calls" and chunks[1].usage is not None


async def test_tool_choice_rules(client: Mistral) -> None:
    named = await client.chat.complete_async(
        model="mistral-small-latest",
        messages=MESSAGES,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    message = named.choices[0].message
    assert named.choices[0].finish_reason == "tool_calls" and message is not None
    assert isinstance(message.tool_calls, list) and message.tool_calls[0].function.name == "get_time"
    assert CALL_ID.fullmatch(message.tool_calls[0].id or "")
    required = await client.chat.complete_async(
        model="mistral-small-latest", messages=MESSAGES, tools=[WEATHER], tool_choice="required"
    )
    assert required.choices[0].finish_reason == "tool_calls"
    auto = await client.chat.complete_async(model="mistral-small-latest", messages=MESSAGES, tools=[WEATHER])
    assert auto.choices[0].message is not None and not auto.choices[0].message.tool_calls
    none = await client.chat.complete_async(
        model="mistral-small-latest",
        messages=MESSAGES,
        tools=[WEATHER],
        tool_choice="none",
        http_headers=knobs(tool_call=True),
    )
    assert none.choices[0].finish_reason == "stop"


async def test_tool_round_trip_is_accepted(client: Mistral) -> None:
    call_id = "aB3dE5gH9"
    history: Any = [
        *MESSAGES,
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz":"UTC"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": "get_time", "content": "12:00"},
    ]
    answer = await client.chat.complete_async(model="mistral-small-latest", messages=history, tools=[TIME])
    assert answer.choices[0].finish_reason == "stop"


async def test_reasoning_and_cached_usage(client: Mistral) -> None:
    headers = knobs(text="Four.", cached_tokens=5, reasoning_tokens=7)
    unary = await client.chat.complete_async(
        model="magistral-medium-latest", messages=MESSAGES, http_headers=headers
    )
    message = unary.choices[0].message
    assert message is not None and isinstance(message.content, list)
    thinking, text = message.content
    assert isinstance(thinking, models.ThinkChunk) and isinstance(text, models.TextChunk)
    assert text.text == "Four."
    # Reasoning tokens are inside completion_tokens and not reported on their own.
    assert unary.usage.completion_tokens == 2 + 7
    assert "completion_tokens_details" not in unary.usage.additional_properties
    assert unary.usage.additional_properties["prompt_tokens_details"] == {"cached_tokens": 5}
    chunks = await chunks_of(
        await client.chat.stream_async(
            model="magistral-medium-latest", messages=MESSAGES, http_headers=headers
        )
    )
    thought = chunks[1].choices[0].delta.content
    assert isinstance(thought, list) and isinstance(thought[0], models.ThinkChunk)
    assert text_of(chunks) == "Four."
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 9


async def test_json_modes(client: Mistral) -> None:
    obj = await client.chat.complete_async(
        model="mistral-small-latest", messages=MESSAGES, response_format={"type": "json_object"}
    )
    assert obj.choices[0].message is not None and isinstance(obj.choices[0].message.content, str)
    assert isinstance(json.loads(obj.choices[0].message.content)["answer"], str)
    schema: dict[str, Any] = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    structured = await client.chat.complete_async(
        model="mistral-small-latest",
        messages=MESSAGES,
        response_format=models.ResponseFormat(
            type="json_schema", json_schema=models.JSONSchema(name="n", schema_definition=schema, strict=True)
        ),
    )
    assert structured.choices[0].message is not None
    assert json.loads(str(structured.choices[0].message.content)) == {"n": 1}


async def test_max_tokens_finishes_with_length(client: Mistral) -> None:
    answer = await client.chat.complete_async(model="mistral-small-latest", messages=MESSAGES, max_tokens=3)
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 3
    chunks = await chunks_of(
        await client.chat.stream_async(model="mistral-small-latest", messages=MESSAGES, max_tokens=2)
    )
    assert 0 < len(text_of(chunks)) <= 8 and chunks[-1].choices[0].finish_reason == "length"


async def test_models_list_and_retrieve(client: Mistral) -> None:
    listed = await client.models.list_async()
    assert listed.data is not None
    ids = [card.id for card in listed.data if isinstance(card, models.BaseModelCard)]
    assert "mistral-small-latest" in ids and "magistral-medium-latest" in ids
    card = await client.models.retrieve_async(model_id="magistral-medium-latest")
    assert isinstance(card, models.BaseModelCard) and card.capabilities.reasoning
    with pytest.raises(errors.SDKError) as caught:
        await client.models.retrieve_async(model_id="no-such-model")
    assert caught.value.status_code == 404


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("values", "status", "kind", "code"),
    [
        ({"status": 400}, 400, "invalid_request_error", None),
        ({"status": 400, "error_code": "3051"}, 400, "invalid_request_invalid_args", "3051"),
        ({"status": 400, "error_code": "1500"}, 400, "invalid_model", "1500"),
        ({"status": 403}, 403, "tier_not_allowed", "1910"),
        ({"status": 429, "retry_after_s": 7}, 429, "rate_limited", "1300"),
        ({"status": 429, "error_code": "3810"}, 429, "engine_max_pending_tokens", "3810"),
        ({"status": 500}, 500, "internal_server_error", None),
        ({"status": 503}, 503, "internal_server_error", "3800"),
    ],
)
async def test_http_errors_raise_the_sdk_error(
    client: Mistral, values: dict[str, Any], status: int, kind: str, code: str | None
) -> None:
    with pytest.raises(errors.SDKError) as caught:
        await client.chat.complete_async(
            model="mistral-small-latest", messages=MESSAGES, http_headers=knobs(**values)
        )
    error = caught.value
    assert error.status_code == status
    body = json.loads(error.body)
    assert (body["object"], body["type"], body["code"], body["raw_status_code"]) == (
        "error",
        kind,
        code,
        status,
    )
    assert set(body) == {"object", "message", "type", "param", "code", "raw_status_code"}
    assert uuid.UUID(error.headers["mistral-correlation-id"]).version == 7
    assert int(error.headers["x-ratelimit-limit-req-minute"]) > 0
    if code == "3051":
        assert re.fullmatch(
            rf"Prompt contains \d+ tokens and 0 draft tokens, too large for model with {MAX_CONTEXT_TOKENS} "
            r"maximum context length",
            body["message"],
        )
    if "retry_after_s" in values:
        assert error.headers["retry-after"] == "7"
    else:
        assert "retry-after" not in error.headers


async def test_rate_limit_in_streaming_call(client: Mistral) -> None:
    with pytest.raises(errors.SDKError) as caught:
        await client.chat.stream_async(
            model="mistral-small-latest",
            messages=MESSAGES,
            http_headers=knobs(status=429, ratelimit={"remaining_requests": 0}),
        )
    assert caught.value.status_code == 429
    assert caught.value.headers["x-ratelimit-remaining-req-minute"] == "0"


async def test_validation_errors(client: Mistral, sim: RunningSimulator) -> None:
    with pytest.raises(errors.HTTPValidationError) as caught:
        await client.chat.complete_async(
            model="mistral-small-latest", messages=MESSAGES, http_headers=knobs(status=422)
        )
    assert caught.value.data.detail is not None and caught.value.data.detail[0].type == "extra_forbidden"
    url = sim.base_url + "/chat/completions"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
        options = await http.post(
            url,
            json={
                "model": "m",
                "messages": MESSAGES,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        named = await http.post(
            url, json={"model": "m", "messages": [{"role": "user", "content": "x", "name": "a"}]}
        )
        missing = await http.post(url, json={"messages": MESSAGES, "seed": 1})
        bad_json = await http.post(url, content=b"{nope", headers={"content-type": "application/json"})
    assert options.status_code == 422
    assert options.json()["detail"][0]["loc"] == ["body", "stream_options"]
    assert named.status_code == 422 and named.json()["detail"][0]["loc"] == [
        "body",
        "messages",
        0,
        "user",
        "name",
    ]
    assert {(d["type"], d["loc"][-1]) for d in missing.json()["detail"]} == {
        ("extra_forbidden", "seed"),
        ("missing", "model"),
    }
    assert bad_json.status_code == 422 and bad_json.json()["detail"][0]["type"] == "json_invalid"


async def test_conversation_rules_are_400s(client: Mistral) -> None:
    trailing: Any = [*MESSAGES, {"role": "assistant", "content": "Sure."}]
    with pytest.raises(errors.SDKError) as caught:
        await client.chat.complete_async(model="mistral-small-latest", messages=trailing)
    assert caught.value.status_code == 400
    assert json.loads(caught.value.body)["code"] == "3230"
    foreign_id: Any = [
        *MESSAGES,
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_abc123", "function": {"name": "get_time", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "call_abc123", "content": "12:00"},
    ]
    with pytest.raises(errors.SDKError) as caught:
        await client.chat.complete_async(model="mistral-small-latest", messages=foreign_id, tools=[TIME])
    body = json.loads(caught.value.body)
    assert (caught.value.status_code, body["code"]) == (400, "3051")
    assert "with a length of 9" in body["message"]


async def test_api_key_enforced(sim: RunningSimulator) -> None:
    async with Mistral(api_key="wrong-key", server_url=sim.root_url, retry_config=NO_RETRIES) as wrong:
        with pytest.raises(errors.SDKError) as caught:
            await wrong.chat.complete_async(model="mistral-small-latest", messages=MESSAGES)
        assert caught.value.status_code == 401
        assert json.loads(caught.value.body) == {"detail": "Invalid API Key"}
        with pytest.raises(errors.SDKError) as caught:
            await wrong.models.list_async()
        assert caught.value.status_code == 401
    async with httpx.AsyncClient() as http:
        anonymous = await http.post(
            sim.base_url + "/chat/completions", json={"model": "m", "messages": MESSAGES}
        )
    assert anonymous.status_code == 401
    assert anonymous.json()["message"] == "No API key found in request"


async def test_in_stream_error_is_a_chunk_finishing_with_error(
    client: Mistral, sim: RunningSimulator
) -> None:
    chunks = await chunks_of(
        await client.chat.stream_async(
            model="mistral-small-latest", messages=MESSAGES, http_headers=knobs(error_after_chunks=3)
        )
    )
    assert len(chunks) == 4
    assert [c.choices[0].finish_reason for c in chunks] == [None, None, None, "error"]
    # Even a 429 cannot be said inside a stream: the chunk is the same, then [DONE].
    body = {"model": "mistral-small-latest", "messages": MESSAGES, "stream": True}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
        response = await http.post(
            sim.base_url + "/chat/completions", json=body, headers=knobs(error_after_chunks=1, status=429)
        )
    events = [e for e in response.text.split("\n\n") if e]
    assert response.status_code == 200 and events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "error"
    async with httpx.AsyncClient() as http:
        stats = (await http.get(sim.root_url + "/_sim/stats")).json()
    assert stats["errors"] == 2 and stats["completed"] == 0


async def test_malformed_event_and_dropped_connection(client: Mistral) -> None:
    received = 0
    with pytest.raises(errors.ResponseValidationError):
        async for _ in await client.chat.stream_async(
            model="mistral-small-latest", messages=MESSAGES, http_headers=knobs(malformed_after_chunks=2)
        ):
            received += 1
    assert received == 2
    received = 0
    with pytest.raises(httpx2.RemoteProtocolError):
        async for _ in await client.chat.stream_async(
            model="mistral-small-latest", messages=MESSAGES, http_headers=knobs(drop_after_chunks=2)
        ):
            received += 1
    assert received == 2


async def test_rate_limit_and_request_id_headers(client: Mistral, sim: RunningSimulator) -> None:
    body = {"model": "mistral-small-latest", "messages": MESSAGES}
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}) as http:
        first = await http.post(sim.base_url + "/chat/completions", json=body)
        second = await http.post(sim.base_url + "/chat/completions", json=body)
    for response in (first, second):
        assert uuid.UUID(response.headers["mistral-correlation-id"]).version == 7
        assert uuid.UUID(response.headers["x-kong-request-id"]).version == 7
        assert not any(name.startswith("x-ratelimit-reset") for name in response.headers)
    assert int(second.headers["x-ratelimit-remaining-req-minute"]) == (
        int(first.headers["x-ratelimit-remaining-req-minute"]) - 1
    )
    assert int(second.headers["x-ratelimit-remaining-tokens-minute"]) == (
        int(first.headers["x-ratelimit-remaining-tokens-minute"]) - prompt_tokens(MESSAGES)
    )
    fixed = knobs(
        status=500,
        ratelimit={
            "limit_requests": 60,
            "remaining_requests": 59,
            "limit_tokens": 50000,
            "remaining_tokens": 47196,
        },
    )
    with pytest.raises(errors.SDKError) as caught:
        await client.chat.complete_async(model="mistral-small-latest", messages=MESSAGES, http_headers=fixed)
    headers = caught.value.headers
    assert (headers["x-ratelimit-limit-req-minute"], headers["x-ratelimit-remaining-req-minute"]) == (
        "60",
        "59",
    )
    assert headers["x-ratelimit-limit-tokens-minute"] == "50000"
    assert headers["x-ratelimit-remaining-tokens-minute"] == "47196"
