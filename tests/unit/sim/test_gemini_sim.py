"""Gemini simulator tests, driven through the official ``google-genai`` SDK.

Using the real SDK as the client keeps the simulator from drifting away from the wire
format the SDK (and so the real API) uses. The SDK's converters drop fields they do not
know, so raw bodies are also validated against the SDK's own pydantic types, which forbid
unknown fields.
"""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
import pytest_asyncio
from google import genai
from google.genai import errors, types

from switchyard.sim.faults import RunningSimulator, start_simulator
from switchyard.sim.gemini import API_PREFIX, MODELS, prompt_tokens

KEY = "AIzaSy-sim-test-key"
MODEL = "gemini-2.5-flash"
PROMPT = "Tell me about switchyards, please."
SYSTEM = "You are terse."

WEATHER = types.FunctionDeclaration(
    name="get_weather",
    description="Weather for a city.",
    parameters_json_schema={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["c", "f"]},
        },
        "required": ["city", "days", "unit"],
    },
)
# The OpenAPI-subset form (`parameters`, upper-case types) is read too.
TIME = types.FunctionDeclaration(
    name="get_time",
    parameters=types.Schema(
        type=types.Type.OBJECT, properties={"tz": types.Schema(type=types.Type.STRING)}, required=["tz"]
    ),
)
TOOLS = [types.Tool(function_declarations=[WEATHER, TIME])]
NO_AFC = types.AutomaticFunctionCallingConfig(disable=True)


def knobs(**values: Any) -> types.HttpOptions:
    """Per-request knob override header."""
    return types.HttpOptions(headers={"x-sim-knobs": json.dumps(values)})


def config(**fields: Any) -> types.GenerateContentConfig:
    fields.setdefault("system_instruction", SYSTEM)
    return types.GenerateContentConfig(**fields)


def sdk(sim: RunningSimulator, key: str = KEY) -> genai.Client:
    """The SDK pointed at the simulator, SDK retries off (one attempt)."""
    return genai.Client(
        api_key=key,
        http_options=types.HttpOptions(
            base_url=sim.root_url,
            api_version="v1beta",
            retry_options=types.HttpRetryOptions(attempts=1),
            timeout=10_000,
        ),
    )


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("gemini", port=0, api_key=KEY)
    try:
        yield running
    finally:
        await running.close()


@pytest_asyncio.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[genai.client.AsyncClient]:
    aio = sdk(sim).aio
    try:
        yield aio
    finally:
        await aio.aclose()


async def raw_post(
    sim: RunningSimulator, action: str, body: object, model: str = MODEL, **headers: str
) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{sim.base_url}/models/{model}:{action}", json=body, headers={"x-goog-api-key": KEY, **headers}
        )


async def get_stats(sim: RunningSimulator) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        response = await http.get(sim.root_url + "/_sim/stats")
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


def sse_events(text: str) -> list[dict[str, Any]]:
    assert text.endswith("\r\n\r\n")
    events = [e for e in text.split("\r\n\r\n") if e]
    assert all(e.startswith("data: ") for e in events)
    return [json.loads(e[6:]) for e in events]


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


async def test_non_streaming_text(client: genai.client.AsyncClient, sim: RunningSimulator) -> None:
    response = await client.models.generate_content(model=MODEL, contents=PROMPT, config=config())
    assert response.model_version == MODEL
    assert response.response_id and len(response.response_id) == 23
    candidate = (response.candidates or [])[0]
    assert candidate.finish_reason == types.FinishReason.STOP
    assert candidate.content is not None and candidate.content.role == "model"
    text = response.text
    assert text and len(text.split()) >= 5 and "switchyards" not in text.lower()
    usage = response.usage_metadata
    assert usage is not None
    # ceil(len(PROMPT) / 4) + ceil(len(SYSTEM) / 4) = 9 + 4
    assert usage.prompt_token_count == 13
    assert usage.candidates_token_count == math.ceil(len(text) / 4)
    assert usage.total_token_count == 13 + usage.candidates_token_count
    assert usage.cached_content_token_count is None and usage.thoughts_token_count is None

    again = await client.models.generate_content(model=MODEL, contents=PROMPT, config=config())
    assert again.text == text and again.response_id != response.response_id
    other = await client.models.generate_content(model=MODEL, contents="something else", config=config())
    assert other.text != text

    raw = await raw_post(
        sim, "generateContent", {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    )
    assert raw.headers["content-type"].startswith("application/json")
    types.GenerateContentResponse.model_validate(raw.json())  # no field the SDK does not know


async def test_usage_knobs_and_thought_summaries(client: genai.client.AsyncClient) -> None:
    response = await client.models.generate_content(
        model="gemini-2.5-pro",
        contents=PROMPT,
        config=config(http_options=knobs(text="Hello there.", cached_tokens=5, reasoning_tokens=7)),
    )
    assert response.text == "Hello there."
    usage = response.usage_metadata
    assert usage is not None
    assert (usage.cached_content_token_count, usage.thoughts_token_count, usage.candidates_token_count) == (
        5,
        7,
        3,
    )
    assert usage.total_token_count == 13 + 3 + 7
    # Asked for, the thought summary is a `thought` part before the answer.
    thinking = await client.models.generate_content(
        model="gemini-2.5-pro",
        contents=PROMPT,
        config=config(
            thinking_config=types.ThinkingConfig(include_thoughts=True),
            http_options=knobs(text="Hello there.", reasoning_tokens=7),
        ),
    )
    parts = (thinking.candidates or [])[0].content.parts or []  # type: ignore[union-attr]
    assert [bool(p.thought) for p in parts] == [True, False]
    assert thinking.text == "Hello there."


async def test_streaming_matches_non_streaming(client: genai.client.AsyncClient) -> None:
    plain = await client.models.generate_content(model=MODEL, contents=PROMPT, config=config())
    chunks = [
        c
        async for c in await client.models.generate_content_stream(
            model=MODEL, contents=PROMPT, config=config()
        )
    ]
    assert len(chunks) == 8  # default knob chunks=8, the last one also finishing
    assert "".join(c.text or "" for c in chunks) == plain.text
    assert len({c.response_id for c in chunks}) == 1
    assert [c.candidates[0].finish_reason for c in chunks][-2:] == [None, types.FinishReason.STOP]  # type: ignore[index]
    final = chunks[-1].usage_metadata
    assert final is not None and plain.usage_metadata is not None
    assert final.candidates_token_count == plain.usage_metadata.candidates_token_count
    assert all(c.usage_metadata and c.usage_metadata.prompt_token_count == 13 for c in chunks)


async def test_raw_sse_framing(sim: RunningSimulator) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}
    async with httpx.AsyncClient() as http:
        url = f"{sim.base_url}/models/{MODEL}:streamGenerateContent"
        response = await http.post(
            url,
            params={"alt": "sse"},
            json=body,
            headers={"x-goog-api-key": KEY, "x-sim-knobs": '{"chunks": 3}'},
        )
        no_alt = await http.post(url, json=body, headers={"x-goog-api-key": KEY})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert len(events) == 3 and "[DONE]" not in response.text
    for event in events:
        types.GenerateContentResponse.model_validate(event)
    assert "finishReason" not in events[0]["candidates"][0]
    assert events[-1]["candidates"][0]["finishReason"] == "STOP"
    assert events[-1]["usageMetadata"]["totalTokenCount"] > events[0]["usageMetadata"]["promptTokenCount"]
    # No rate-limit or request-id headers: Gemini sends neither.
    assert not [h for h in response.headers if h.startswith("x-ratelimit") or h == "x-request-id"]
    assert response.headers["server-timing"].startswith("gfet4t7; dur=")
    assert no_alt.status_code == 400  # this simulator streams only with alt=sse


async def test_streamed_function_call_arrives_whole(client: genai.client.AsyncClient) -> None:
    any_mode = types.ToolConfig(
        function_calling_config=types.FunctionCallingConfig(mode=types.FunctionCallingConfigMode.ANY)
    )
    stream = await client.models.generate_content_stream(
        model=MODEL,
        contents=PROMPT,
        config=config(
            tools=TOOLS, tool_config=any_mode, automatic_function_calling=NO_AFC, http_options=knobs(chunks=5)
        ),
    )
    chunks = [c async for c in stream]
    assert len(chunks) == 1
    calls = chunks[0].function_calls or []
    assert [(c.name, c.args, c.id) for c in calls] == [
        ("get_weather", {"city": "example", "days": 1, "unit": "c"}, None)
    ]
    assert chunks[0].candidates[0].finish_reason == types.FinishReason.STOP  # type: ignore[index]
    part = chunks[0].candidates[0].content.parts[0]  # type: ignore[index, union-attr]
    assert part.thought_signature is None
    # Gemini 3 signs its function calls.
    signed = await client.models.generate_content(
        model="gemini-3-flash-preview",
        contents=PROMPT,
        config=config(tools=TOOLS, tool_config=any_mode, automatic_function_calling=NO_AFC),
    )
    signed_part = signed.candidates[0].content.parts[0]  # type: ignore[index, union-attr]
    assert signed_part.function_call is not None and signed_part.thought_signature


async def test_function_calling_modes(client: genai.client.AsyncClient) -> None:
    def mode(name: str, allowed: list[str] | None = None) -> types.ToolConfig:
        return types.ToolConfig(
            function_calling_config=types.FunctionCallingConfig(mode=name, allowed_function_names=allowed)  # type: ignore[arg-type]
        )

    async def calls(tool_config: types.ToolConfig | None, **knob: Any) -> list[str]:
        response = await client.models.generate_content(
            model=MODEL,
            contents=PROMPT,
            config=config(
                tools=TOOLS,
                tool_config=tool_config,
                automatic_function_calling=NO_AFC,
                http_options=knobs(**knob),
            ),
        )
        return [c.name or "" for c in response.function_calls or []]

    assert await calls(mode("ANY", ["get_time"])) == ["get_time"]
    named = await client.models.generate_content(
        model=MODEL,
        contents=PROMPT,
        config=config(tools=TOOLS, tool_config=mode("ANY", ["get_time"]), automatic_function_calling=NO_AFC),
    )
    assert named.function_calls and named.function_calls[0].args == {"tz": "example"}
    assert await calls(None) == []
    assert await calls(mode("AUTO")) == []
    assert await calls(mode("VALIDATED"), tool_call=True) == ["get_weather"]
    assert await calls(mode("AUTO"), tool_call=True) == ["get_weather"]
    assert await calls(mode("NONE"), tool_call=True) == []
    with pytest.raises(errors.ClientError) as info:
        await calls(mode("AUTO", ["get_time"]))
    assert info.value.code == 400


async def test_multi_turn_with_function_response(
    client: genai.client.AsyncClient, sim: RunningSimulator
) -> None:
    contents = [
        types.Content(role="user", parts=[types.Part(text=PROMPT)]),
        types.Content(
            role="model",
            parts=[
                types.Part(
                    function_call=types.FunctionCall(name="get_weather", args={"city": "Oslo"}, id="c1"),
                    thought_signature=b"skip_thought_signature_validator",
                )
            ],
        ),
        types.Content(
            role="user",
            parts=[
                types.Part(
                    function_response=types.FunctionResponse(name="get_weather", id="c1", response={"t": 3})
                )
            ],
        ),
    ]
    response = await client.models.generate_content(
        model=MODEL, contents=contents, config=config(tools=TOOLS)
    )
    assert response.text

    # Gemini 3 wants the signature on the first call of each step of the current turn.
    def history(signature: str | None, *, later_question: bool = False) -> dict[str, object]:
        call_part: dict[str, object] = {"functionCall": {"name": "get_weather", "args": {}}}
        if signature is not None:
            call_part["thoughtSignature"] = signature
        contents: list[object] = [
            {"role": "user", "parts": [{"text": "weather?"}]},
            {
                "role": "model",
                "parts": [{"text": "Checking."}, call_part, {"functionCall": {"name": "get_time"}}],
            },
            {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {}}}]},
        ]
        if later_question:
            contents += [
                {"role": "model", "parts": [{"text": "3 degrees"}]},
                {"role": "user", "parts": [{"text": "ok"}]},
            ]
        return {"contents": contents}

    unsigned = await raw_post(sim, "generateContent", history(None), model="gemini-3-pro-preview")
    assert unsigned.status_code == 400 and "thought_signature" in unsigned.json()["error"]["message"]
    for body in (history("skip_thought_signature_validator"), history(None, later_question=True)):
        assert (await raw_post(sim, "generateContent", body, model="gemini-3-pro-preview")).status_code == 200
    assert (await raw_post(sim, "generateContent", history(None))).status_code == 200  # not Gemini 3
    bad = {"contents": [{"role": "user", "parts": [{"functionResponse": {"response": {}}}]}]}
    refused = await raw_post(sim, "generateContent", bad)
    assert refused.status_code == 400 and "Name cannot be empty" in refused.json()["error"]["message"]


async def test_json_modes(client: genai.client.AsyncClient) -> None:
    obj = await client.models.generate_content(
        model=MODEL, contents=PROMPT, config=config(response_mime_type="application/json")
    )
    parsed = json.loads(obj.text or "")
    assert isinstance(parsed, dict) and isinstance(parsed["answer"], str)
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "tags": {"type": "array"}},
        "required": ["name", "age", "tags"],
    }
    structured = await client.models.generate_content(
        model=MODEL,
        contents=PROMPT,
        config=config(response_mime_type="application/json", response_json_schema=schema),
    )
    assert json.loads(structured.text or "") == {"name": "example", "age": 1, "tags": []}
    with pytest.raises(errors.ClientError) as info:
        await client.models.generate_content(
            model=MODEL, contents=PROMPT, config=config(response_json_schema=schema)
        )
    assert info.value.status == "INVALID_ARGUMENT"


async def test_max_output_tokens_truncates(client: genai.client.AsyncClient) -> None:
    response = await client.models.generate_content(
        model=MODEL, contents=PROMPT, config=config(max_output_tokens=3)
    )
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert response.text and 0 < len(response.text) <= 12
    assert response.usage_metadata and response.usage_metadata.candidates_token_count == 3
    stream = await client.models.generate_content_stream(
        model=MODEL, contents=PROMPT, config=config(max_output_tokens=2)
    )
    chunks = [c async for c in stream]
    assert 0 < len("".join(c.text or "" for c in chunks)) <= 8
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS  # type: ignore[index]


async def test_finish_reason_override(client: genai.client.AsyncClient) -> None:
    response = await client.models.generate_content(
        model=MODEL, contents=PROMPT, config=config(http_options=knobs(finish_reason="SAFETY"))
    )
    assert response.candidates and response.candidates[0].finish_reason == types.FinishReason.SAFETY


async def test_models(client: genai.client.AsyncClient, sim: RunningSimulator) -> None:
    names = [m.name async for m in await client.models.list(config={"page_size": 3})]
    assert names == [f"models/{m}" for m in MODELS]  # three pages, followed by the SDK
    model = await client.models.get(model=MODEL)
    assert model.name == f"models/{MODEL}" and model.input_token_limit == 1_048_576
    assert model.supported_actions and "generateContent" in model.supported_actions
    with pytest.raises(errors.ClientError) as info:
        await client.models.get(model="gemini-0")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    assert (await get_stats(sim))["requests"] == 0  # not chat requests


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("knob", "exc_type", "code", "status"),
    [
        ({"status": 400}, errors.ClientError, 400, "INVALID_ARGUMENT"),
        (
            {"status": 400, "error_code": "FAILED_PRECONDITION"},
            errors.ClientError,
            400,
            "FAILED_PRECONDITION",
        ),
        ({"status": 403}, errors.ClientError, 403, "PERMISSION_DENIED"),
        ({"status": 404}, errors.ClientError, 404, "NOT_FOUND"),
        ({"status": 429, "retry_after_s": 7}, errors.ClientError, 429, "RESOURCE_EXHAUSTED"),
        ({"status": 500}, errors.ServerError, 500, "INTERNAL"),
        ({"status": 503, "retry_after_s": 2}, errors.ServerError, 503, "UNAVAILABLE"),
        ({"status": 504}, errors.ServerError, 504, "DEADLINE_EXCEEDED"),
    ],
)
async def test_error_status_maps_to_sdk_exception(
    client: genai.client.AsyncClient,
    knob: dict[str, Any],
    exc_type: type[errors.APIError],
    code: int,
    status: str,
) -> None:
    with pytest.raises(exc_type) as info:
        await client.models.generate_content(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(**knob))
        )
    error = info.value
    assert (error.code, error.status) == (code, status)
    assert error.message
    assert set(error.details["error"]) <= {"code", "message", "status", "details"}
    details = error.details["error"].get("details", [])
    retry = [d["retryDelay"] for d in details if d["@type"].endswith("google.rpc.RetryInfo")]
    assert retry == ([f"{knob['retry_after_s']}s"] if "retry_after_s" in knob else [])
    if code == 429:
        assert any(d["@type"].endswith("google.rpc.QuotaFailure") for d in details)
    assert "retry-after" not in error.response.headers


async def test_context_too_long_and_custom_messages(client: genai.client.AsyncClient) -> None:
    message = "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
    with pytest.raises(errors.ClientError) as info:
        await client.models.generate_content(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(status=400, error_message=message))
        )
    assert (info.value.status, info.value.message) == ("INVALID_ARGUMENT", message)
    with pytest.raises(errors.ClientError) as info:
        await client.models.generate_content(
            model=MODEL,
            contents=PROMPT,
            config=config(http_options=knobs(status=403, error_code="SERVICE_DISABLED")),
        )
    reasons = [d.get("reason") for d in info.value.details["error"]["details"]]
    assert (info.value.status, reasons) == ("PERMISSION_DENIED", ["SERVICE_DISABLED"])


async def test_api_key_enforced(sim: RunningSimulator) -> None:
    wrong = sdk(sim, key="AIzaSy-wrong-key").aio
    try:
        with pytest.raises(errors.ClientError) as info:
            await wrong.models.generate_content(model=MODEL, contents=PROMPT)
        error = info.value
        assert (error.code, error.status) == (400, "INVALID_ARGUMENT")
        assert error.message == "API key not valid. Please pass a valid API key."
        assert [d.get("reason") for d in error.details["error"]["details"]][0] == "API_KEY_INVALID"
        with pytest.raises(errors.ClientError):
            await wrong.models.list()
    finally:
        await wrong.aclose()
    async with httpx.AsyncClient() as http:
        missing = await http.post(f"{sim.base_url}/models/{MODEL}:generateContent", json={"contents": []})
        by_query = await http.post(
            f"{sim.base_url}/models/{MODEL}:generateContent",
            params={"key": KEY},
            json={"contents": [{"parts": [{"text": "hi"}]}]},
        )
    assert (missing.status_code, missing.json()["error"]["status"]) == (403, "PERMISSION_DENIED")
    assert by_query.status_code == 200


async def test_request_validation(sim: RunningSimulator) -> None:
    async def refused(
        body: object, fragment: str, action: str = "generateContent", model: str = MODEL
    ) -> None:
        response = await raw_post(sim, action, body, model=model)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["status"] == "INVALID_ARGUMENT" and fragment in error["message"]

    text = [{"role": "user", "parts": [{"text": "hi"}]}]
    await refused({"contents": []}, "contents is not specified")
    await refused({"contents": text, "temperture": 1}, 'Unknown name "temperture"')
    await refused({"contents": text, "generationConfig": {"systemInstruction": {}}}, "Unknown name")
    await refused({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]}, "valid role")
    await refused({"contents": [{"role": "user", "parts": []}]}, "must not be empty")
    await refused({"contents": [{"parts": [{"text": "x", "inlineData": {}}]}]}, "already set")
    await refused(
        {"contents": [{"parts": [{"inlineData": {"mimeType": "image/png", "data": "%%"}}]}]}, "Base64"
    )
    await refused({"contents": text, "generationConfig": {"stopSequences": list("abcdef")}}, "stop sequences")
    await refused({"contents": text, "generationConfig": {"maxOutputTokens": "many"}}, "TYPE_INT32")
    await refused({"contents": text, "generationConfig": {"seed": 2**31}}, "seed")
    both = {"name": "f", "parameters": {"type": "OBJECT"}, "parametersJsonSchema": {"type": "object"}}
    await refused({"contents": text, "tools": [{"functionDeclarations": [both]}]}, "mutually exclusive")
    await refused(
        {"contents": text, "tools": [{"functionDeclarations": [{"name": "9x"}]}]}, "Invalid function name"
    )
    response = await raw_post(
        sim, "generateContent", {"contents": text}, model="gemini-2.5-flash:countEverything"
    )
    assert response.status_code == 404
    # snake_case spellings are accepted, as by the real proto JSON parser.
    ok = await raw_post(
        sim,
        "generateContent",
        {
            "contents": text,
            "generation_config": {"max_output_tokens": 2},
            "system_instruction": {"parts": [{"text": "x"}]},
        },
    )
    assert ok.status_code == 200 and ok.json()["candidates"][0]["finishReason"] == "MAX_TOKENS"


async def test_in_stream_errors_raise_sdk_errors(
    client: genai.client.AsyncClient, sim: RunningSimulator
) -> None:
    received: list[str] = []
    with pytest.raises(errors.ServerError) as info:
        async for chunk in await client.models.generate_content_stream(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(error_after_chunks=3))
        ):
            received.append(chunk.text or "")
    assert len(received) == 3 and info.value.code == 500 and info.value.status == "INTERNAL"
    with pytest.raises(errors.ClientError) as limited:
        async for _ in await client.models.generate_content_stream(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(error_after_chunks=1, status=429))
        ):
            pass
    assert (limited.value.code, limited.value.status) == (429, "RESOURCE_EXHAUSTED")
    response = await raw_post(
        sim,
        "streamGenerateContent?alt=sse",
        {"contents": [{"parts": [{"text": "hi"}]}]},
        **{"x-sim-knobs": '{"error_after_chunks": 1}'},
    )
    events = sse_events(response.text)
    assert response.status_code == 200 and len(events) == 2
    assert events[-1]["error"]["code"] == 500 and list(events[-1]) == ["error"]
    assert (await get_stats(sim))["errors"] == 3


async def test_malformed_event_and_dropped_connection(
    client: genai.client.AsyncClient, sim: RunningSimulator
) -> None:
    count = 0
    with pytest.raises(errors.UnknownApiResponseError):
        async for _ in await client.models.generate_content_stream(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(malformed_after_chunks=2))
        ):
            count += 1
    assert count == 2
    count = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        async for _ in await client.models.generate_content_stream(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(drop_after_chunks=2))
        ):
            count += 1
    assert count == 2
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.models.generate_content(
            model=MODEL, contents=PROMPT, config=config(http_options=knobs(drop_after_chunks=0))
        )
    stats = await get_stats(sim)
    assert stats["dropped"] == 2 and stats["active"] == 0


def test_prompt_token_estimate() -> None:
    body = {
        "systemInstruction": {"parts": [{"text": "abcd"}]},
        "contents": [
            {
                "role": "user",
                "parts": [{"text": "abcdefgh"}, {"inlineData": {"mimeType": "image/png", "data": ""}}],
            },
            {"role": "model", "parts": [{"functionCall": {"name": "f", "args": {}}}]},
        ],
    }
    # 1 + 2 + 258 (image) + ceil(len('{"name":"f","args":{}}') / 4)
    assert prompt_tokens(body) == 1 + 2 + 258 + 6
    assert prompt_tokens({"contents": []}) == 1
    assert API_PREFIX == "/v1beta"
