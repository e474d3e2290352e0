"""The OpenAI-compatible simulator, every preset driven through the official ``openai`` SDK
(what these servers are used with), so no preset drifts into a private dialect; raw HTTP
only where the SDK hides the wire (SSE comments, field placement)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from switchyard.sim.faults import RunningSimulator, start_simulator
from switchyard.sim.openai_compatible import API_PREFIX, PRESETS, REASONING_TEXT, preset_base_url

KEY = "sk-sim-compat-key-0123"
MESSAGES: Any = [{"role": "user", "content": "Tell me about switchyards, please."}]
TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
INCLUDE_USAGE = ("xai", "deepseek", "vllm", "ollama", "llamacpp", "generic")
MODEL = {
    "groq": "llama-3.3-70b-versatile",
    "xai": "grok-3-mini",
    "deepseek": "deepseek-chat",
    "together": "meta-llama/Llama-3.3-70B-Instruct-Turbo",
    "vllm": "Qwen/Qwen3-8B",
    "ollama": "llama3.2:latest",
    "llamacpp": "ggml-org/gemma-3-1b-it-GGUF",
    "generic": "gpt-4o-mini",
}


def knobs(**values: Any) -> dict[str, str]:
    return {"x-sim-knobs": json.dumps(values)}


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("openai_compatible", port=0, api_key=KEY)
    try:
        yield running
    finally:
        await running.close()


def sdk(sim: RunningSimulator, preset: str, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=preset_base_url(sim.root_url, preset), api_key=key, max_retries=0, timeout=10
    )


async def post(sim: RunningSimulator, preset: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.post(
            f"{sim.root_url}/{preset}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}", **headers},
        )


def extra(obj: Any, name: str) -> Any:
    """A field the SDK's types do not declare (kept by its models as extra)."""
    return (obj.model_extra or {}).get(name)


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


async def test_default_base_url_is_the_generic_server(sim: RunningSimulator) -> None:
    assert sim.base_url == sim.root_url + API_PREFIX == preset_base_url(sim.root_url, "generic")
    with pytest.raises(ValueError, match="unknown preset 'openrouter'"):
        preset_base_url(sim.root_url, "openrouter")
    client = openai.AsyncOpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0)
    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.id.startswith("chatcmpl-") and completion.choices[0].message.content
    await client.close()


@pytest.mark.parametrize("preset", PRESETS)
async def test_non_streamed_answer(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    completion = await client.chat.completions.create(
        model=MODEL[preset], messages=MESSAGES, extra_headers=knobs(cached_tokens=3, reasoning_tokens=2)
    )
    await client.close()
    assert completion.object == "chat.completion" and completion.model == MODEL[preset]
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "stop" and message.content
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 3
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if preset != "generic":  # the generic server is OpenAI's, which streams no reasoning text
        field = {"groq": "reasoning", "together": "reasoning", "vllm": "reasoning", "ollama": "reasoning"}
        assert extra(message, field.get(preset, "reasoning_content")) == REASONING_TEXT
    details = usage.prompt_tokens_details
    if preset in ("groq", "xai", "generic", "deepseek", "vllm"):
        assert details is not None and details.cached_tokens == 3
    else:
        assert details is None
    if preset == "deepseek":
        assert (extra(usage, "prompt_cache_hit_tokens"), extra(usage, "prompt_cache_miss_tokens")) == (
            3,
            usage.prompt_tokens - 3,
        )
        assert len(completion.id) == 36  # a UUID
    if preset == "groq":
        assert extra(completion, "x_groq")["id"].startswith("req_")
        assert extra(usage, "queue_time") is not None
    if preset == "together":
        assert completion.id.endswith("-EWR")
    if preset == "llamacpp":
        assert extra(completion, "timings")["predicted_n"] == usage.completion_tokens


@pytest.mark.parametrize("preset", PRESETS)
async def test_stream_puts_usage_where_the_preset_does(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    asked = await client.chat.completions.create(
        model=MODEL[preset],
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers=knobs(text="Harbors shelter ships.", chunks=3),
    )
    chunks = [chunk async for chunk in asked]
    unasked = await client.chat.completions.create(
        model=MODEL[preset],
        messages=MESSAGES,
        stream=True,
        extra_headers=knobs(text="Harbors shelter ships."),
    )
    plain = [chunk async for chunk in unasked]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Harbors shelter ships."
    assert len({c.id for c in chunks}) == 1
    finish = next(c for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finish.choices[0].finish_reason == "stop"
    with_usage = [c for c in chunks if c.usage is not None]
    if preset in INCLUDE_USAGE:
        # asked: one trailing usage-only chunk; not asked: no usage anywhere
        assert with_usage == [chunks[-1]] and chunks[-1].choices == []
        assert all(c.usage is None for c in plain)
    elif preset == "together":
        # the finish chunk carries the usage, asked or not; no usage-only chunk
        assert with_usage == [finish] and all(c.choices for c in chunks)
        assert [c for c in plain if c.usage is not None] == [plain[-1]]
    else:  # groq: x_groq.usage on the finish chunk; a usage-only chunk only when asked
        trailing = chunks[-1].usage
        assert with_usage == [chunks[-1]] and chunks[-1].choices == [] and trailing is not None
        assert extra(finish, "x_groq")["usage"]["total_tokens"] == trailing.total_tokens
        assert extra(plain[0], "x_groq")["id"] == extra(plain[-1], "x_groq")["id"]
        assert (
            all(c.usage is None for c in plain) and extra(plain[-1], "x_groq")["usage"]["prompt_tokens"] > 0
        )
    usage = with_usage[0].usage
    assert usage is not None and usage.completion_tokens == 6  # ceil(22 / 4)


@pytest.mark.parametrize("preset", PRESETS)
async def test_streamed_tool_call(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    # Ollama has no tool_choice: the model decides (the `tool_call` knob makes it call)
    stream = await client.chat.completions.create(
        model=MODEL[preset],
        messages=MESSAGES,
        tools=[TOOL],
        tool_choice="required",
        stream=True,
        extra_headers=knobs(chunks=4, tool_call=preset == "ollama"),
    )
    chunks = [chunk async for chunk in stream]
    await client.close()
    calls = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert calls[0].id and calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join(call.function.arguments or "" for call in calls if call.function)
    assert json.loads(arguments) == {"city": "example", "days": 1}
    assert len(calls) == (1 if preset == "ollama" else 5)  # Ollama sends a call whole
    assert chunks[-1].choices == [] or chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("preset", PRESETS)
async def test_json_mode(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    completion = await client.chat.completions.create(
        model=MODEL[preset], messages=MESSAGES, response_format={"type": "json_object"}
    )
    await client.close()
    assert isinstance(json.loads(completion.choices[0].message.content or ""), dict)


@pytest.mark.parametrize("preset", PRESETS)
async def test_models_list(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    page = await client.models.list()
    ids = [model.id for model in page.data]
    assert MODEL[preset] in ids
    assert (await client.models.retrieve(MODEL[preset])).id == MODEL[preset]
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("no-such-model")
    await client.close()
    assert sim.control.stats.requests == 0  # the models list is not a chat request


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("preset", PRESETS)
async def test_http_errors_raise_the_sdk_classes(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    cases: list[tuple[dict[str, Any], type[openai.APIStatusError], int]] = [
        ({"status": 400}, openai.BadRequestError, 400),
        ({"status": 404}, openai.NotFoundError, 404),
        ({"status": 500}, openai.InternalServerError, 500),
        ({"status": 503}, openai.InternalServerError, 503),
        ({"status": 429, "retry_after_s": 2}, openai.RateLimitError, 429),
    ]
    for knob, exc_type, status in cases:
        with pytest.raises(exc_type) as caught:
            await client.chat.completions.create(
                model=MODEL[preset], messages=MESSAGES, extra_headers=knobs(**knob)
            )
        assert caught.value.status_code == status
        if status == 429:
            assert caught.value.response.headers["retry-after"] == "2"
    await client.close()


CONTEXT_SHAPES = {
    "generic": ("error", "code", "context_length_exceeded"),
    "groq": ("error", "code", "context_length_exceeded"),
    "deepseek": ("error", "message", "maximum context length"),
    "together": ("error", "message", "`inputs` tokens + `max_new_tokens`"),
    "vllm": ("error", "message", "maximum context length"),
    "ollama": ("error", "message", "exceeds the context length"),
    "llamacpp": ("error", "type", "exceed_context_size_error"),
}


@pytest.mark.parametrize("preset", PRESETS)
async def test_context_overflow_in_the_presets_words(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model=MODEL[preset],
            messages=MESSAGES,
            extra_headers=knobs(status=400, error_code="context_length_exceeded"),
        )
    await client.close()
    body = caught.value.response.json()
    if preset == "xai":
        assert set(body) == {"code", "error"} and "maximum prompt length" in body["error"]
        return
    outer, key, expected = CONTEXT_SHAPES[preset]
    assert expected in str(body[outer][key])
    if preset in ("vllm", "llamacpp"):
        assert body["error"]["code"] == 400  # the HTTP status, as an integer


@pytest.mark.parametrize("preset", PRESETS)
async def test_in_stream_error(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset)
    stream = await client.chat.completions.create(
        model=MODEL[preset],
        messages=MESSAGES,
        stream=True,
        extra_headers=knobs(chunks=6, error_after_chunks=2, status=429),
    )
    received = 0
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            received += 1
    await client.close()
    assert not isinstance(caught.value, openai.APIStatusError)
    assert received == 2
    assert sim.control.stats.errors == 1


@pytest.mark.parametrize("preset", PRESETS)
async def test_wrong_key(sim: RunningSimulator, preset: str) -> None:
    client = sdk(sim, preset, key="sk-wrong-key-999999")
    if preset == "ollama":  # no authentication at all
        assert (await client.chat.completions.create(model=MODEL[preset], messages=MESSAGES)).choices
    elif preset == "xai":  # a wrong key is a 400 there
        with pytest.raises(openai.BadRequestError) as bad:
            await client.chat.completions.create(model=MODEL[preset], messages=MESSAGES)
        assert "Incorrect API key provided" in str(bad.value.body)
        assert "sk-wrong-key-999999" not in str(bad.value.body)
    else:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model=MODEL[preset], messages=MESSAGES)
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    await client.close()


# --------------------------------------------------------------------------- #
# request validation and fields each server honours
# --------------------------------------------------------------------------- #


async def test_requests_the_real_servers_reject(sim: RunningSimulator) -> None:
    groq = sdk(sim, "groq")
    with pytest.raises(openai.BadRequestError) as caught:
        await groq.chat.completions.create(
            model=MODEL["groq"], messages=[{"role": "user", "content": "hi", "name": "ada"}]
        )
    assert "'name' is unsupported" in str(caught.value.body)
    with pytest.raises(openai.BadRequestError):
        await groq.chat.completions.create(model=MODEL["groq"], messages=MESSAGES, logprobs=True)
    with pytest.raises(openai.BadRequestError):
        await groq.chat.completions.create(model=MODEL["groq"], messages=MESSAGES, n=2)
    await groq.close()
    image: Any = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
    ]
    deepseek = sdk(sim, "deepseek")
    with pytest.raises(openai.UnprocessableEntityError):
        await deepseek.chat.completions.create(
            model=MODEL["deepseek"], messages=[{"role": "user", "content": image}]
        )
    schema: Any = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError):
        await deepseek.chat.completions.create(
            model=MODEL["deepseek"], messages=MESSAGES, response_format=schema
        )
    await deepseek.close()
    ollama = sdk(sim, "ollama")
    with pytest.raises(openai.BadRequestError) as caught:
        await ollama.chat.completions.create(
            model=MODEL["ollama"], messages=[{"role": "user", "content": image}]
        )
    assert "invalid image input" in str(caught.value.body)
    inline: Any = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    ok = await ollama.chat.completions.create(
        model=MODEL["ollama"], messages=[{"role": "user", "content": inline}]
    )
    assert ok.choices[0].message.content
    await ollama.close()


@pytest.mark.parametrize(
    ("preset", "field", "honoured"),
    [
        ("ollama", "max_tokens", True),
        ("ollama", "max_completion_tokens", False),
        ("deepseek", "max_completion_tokens", False),
        ("together", "max_tokens", True),
        ("llamacpp", "n_predict", True),
        ("llamacpp", "max_completion_tokens", True),
        ("groq", "max_completion_tokens", True),
        ("vllm", "max_tokens", True),
    ],
)
async def test_output_cap_fields(sim: RunningSimulator, preset: str, field: str, honoured: bool) -> None:
    response = await post(sim, preset, {"model": MODEL[preset], "messages": MESSAGES, field: 2})
    choice = response.json()["choices"][0]
    assert (choice["finish_reason"] == "length") is honoured
    assert (len(choice["message"]["content"]) <= 8) is honoured


async def test_tool_choice_ignored_where_the_server_has_none(sim: RunningSimulator) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for preset, choice in (("ollama", "required"), ("llamacpp", named)):
        response = await post(
            sim,
            preset,
            {"model": MODEL[preset], "messages": MESSAGES, "tools": [TOOL], "tool_choice": choice},
        )
        message = response.json()["choices"][0]["message"]
        assert "tool_calls" not in message and message["content"]
    forced = await post(
        sim, "llamacpp", {"model": "m", "messages": MESSAGES, "tools": [TOOL], "tool_choice": "required"}
    )
    assert forced.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


async def test_raw_framing_details(sim: RunningSimulator) -> None:
    body = {"model": "m", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    deepseek = await post(sim, "deepseek", body)
    assert deepseek.text.startswith(": keep-alive\n\n")
    assert deepseek.headers["content-type"].startswith("text/event-stream")
    assert "x-ratelimit-limit-requests" not in deepseek.headers
    together = await post(sim, "together", body)
    events = [json.loads(e[6:]) for e in together.text.split("\n\n") if e.startswith("data: {")]
    assert [e["usage"] is None for e in events] == [True] * (len(events) - 1) + [False]
    assert together.headers["x-ratelimit-remaining"].isdigit() and together.headers["x-tokenlimit-limit"]
    assert together.text.endswith("data: [DONE]\n\n")
    llamacpp = await post(sim, "llamacpp", body)
    last = [json.loads(e[6:]) for e in llamacpp.text.split("\n\n") if e.startswith("data: {")][-1]
    assert (
        last["choices"] == []
        and "timings" in last
        and set(last["usage"])
        == {
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
        }
    )
    groq = await post(sim, "groq", body)
    assert groq.headers["x-request-id"].startswith("req_") and groq.headers["x-ratelimit-reset-requests"]
    vllm_error = await post(sim, "vllm", body, **knobs(error_after_chunks=1, status=500))
    error = json.loads(vllm_error.text.split("\n\n")[1][6:])["error"]
    assert error["code"] == 500 and error["type"] == "InternalServerError"
