"""OpenAI-compatible translation as pure functions: presets and options, request bodies per
preset, refusals naming the field, stream decoding of each server's chunks (usage where
each puts it, reasoning fields, in-stream errors), the error table and rate-limit headers.
No network."""

from __future__ import annotations

import time
from typing import Any

import grpc
import orjson
import pytest

from switchyard.adapters.base import SseEvent, SseParser
from switchyard.adapters.vendors import load_translator
from switchyard.adapters.vendors.openai_compatible import (
    FEATURES,
    PRESET_NAMES,
    PRESETS,
    OpenAICompatibleStreamDecoder,
    OpenAICompatibleTranslator,
    resolve_settings,
)
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2, provider_pb2

KEY = "sk-test-0123456789abcdef"
PROMPT = "secret prompt text"


def translator(preset: str = "generic", key: str | None = KEY, **options: Any) -> OpenAICompatibleTranslator:
    provider = Provider(
        vendor="openai_compatible", base_url="http://127.0.0.1:1/v1", options={"preset": preset, **options}
    )
    return OpenAICompatibleTranslator(f"{preset}-main", provider, key)


def text(value: str) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(text=value)


def user(*parts: common_pb2.ContentPart, name: str = "") -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts, name=name)


def generate_request(**chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault("messages", [user(text(PROMPT))])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider="p", upstream_model="some-model"
    )


def body_of(preset: str, **chat: Any) -> dict[str, Any]:
    built = translator(preset).build_request(generate_request(**chat))
    assert built.body is not None
    return dict(built.body)


WEATHER = common_pb2.Tool(
    name="get_weather", parameters_json_schema='{"type":"object","properties":{"city":{"type":"string"}}}'
)


# --------------------------------------------------------------------------- #
# presets and options
# --------------------------------------------------------------------------- #


def test_translator_table_has_openai_compatible() -> None:
    assert load_translator("openai_compatible") is OpenAICompatibleTranslator
    assert set(PRESETS) == set(PRESET_NAMES)


@pytest.mark.parametrize(
    ("preset", "max_tokens_field", "stream_usage", "cached", "reasoning", "missing", "stop", "auth"),
    [
        ("generic", "max_tokens", "include_usage", "prompt_tokens_details.cached_tokens", "reasoning_content",
         set(), 4, "bearer"),
        ("groq", "max_completion_tokens", "x_groq", "prompt_tokens_details.cached_tokens", "reasoning",
         {"names"}, 4, "bearer"),
        ("xai", "max_completion_tokens", "include_usage", "prompt_tokens_details.cached_tokens",
         "reasoning_content", set(), None, "bearer"),
        ("deepseek", "max_tokens", "include_usage", "prompt_cache_hit_tokens", "reasoning_content",
         {"vision", "image_urls", "json_schema", "seed", "end_user"}, 16, "bearer"),
        ("together", "max_tokens", "final_chunk", "none", "reasoning", {"end_user"}, None, "bearer"),
        ("vllm", "max_tokens", "include_usage", "prompt_tokens_details.cached_tokens", "reasoning",
         {"end_user"}, None, "bearer"),
        ("ollama", "max_tokens", "include_usage", "none", "reasoning",
         {"tool_choice", "named_tool_choice", "image_urls", "end_user", "names"}, None, "none"),
        ("llamacpp", "max_tokens", "include_usage", "none", "reasoning_content",
         {"named_tool_choice", "end_user", "names"}, None, "bearer"),
    ],
)  # fmt: skip
def test_preset_values(
    preset: str,
    max_tokens_field: str,
    stream_usage: str,
    cached: str,
    reasoning: str,
    missing: set[str],
    stop: int | None,
    auth: str,
) -> None:
    settings = resolve_settings("p", {"preset": preset})
    assert (settings.preset, settings.max_tokens_field, settings.stream_usage) == (
        preset,
        max_tokens_field,
        stream_usage,
    )
    assert (settings.cached_tokens_field, settings.reasoning_field) == (cached, reasoning)
    assert set(FEATURES) - settings.supports == missing
    assert (settings.max_stop_sequences, settings.auth) == (stop, auth)


def test_options_override_the_preset() -> None:
    settings = resolve_settings(
        "p",
        {
            "preset": "vllm",
            "max_tokens_field": "max_completion_tokens",
            "stream_usage": "none",
            "cached_tokens_field": "none",
            "reasoning_field": "reasoning_content",
            "supports": ["tools"],
            "max_stop_sequences": 2,
            "auth": "none",
            "system_role": "developer",
            "probe": "completion",
        },
    )
    assert settings.max_tokens_field == "max_completion_tokens"
    assert settings.stream_usage == "none"
    assert settings.reasoning_field == "reasoning_content"
    assert settings.supports == frozenset({"tools"})
    assert (settings.max_stop_sequences, settings.auth) == (2, "none")
    assert resolve_settings("p", {}).preset == "generic"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"preset": "openrouter"}, "options.preset must be one of groq, xai"),
        ({"preset": ["groq"]}, "options.preset must be one of groq, xai"),
        ({"usage": "final"}, "unknown option(s) usage"),
        ({"stream_usage": "sometimes"}, "options.stream_usage must be one of include_usage"),
        ({"max_tokens_field": "max_new_tokens"}, "options.max_tokens_field"),
        ({"supports": ["tools", "telepathy"]}, "unknown feature(s) telepathy"),
        ({"supports": "tools"}, "options.supports must be a list"),
        ({"auth": "basic"}, "options.auth must be one of bearer, none"),
        ({"reasoning_field": "Reasoning Text"}, "options.reasoning_field must be a field name"),
        ({"cached_tokens_field": ""}, "options.cached_tokens_field"),
        ({"max_stop_sequences": 0}, "options.max_stop_sequences"),
        ({"system_role": "admin"}, "options.system_role"),
    ],
)
def test_bad_options_fail_at_start(options: dict[str, Any], message: str) -> None:
    provider = Provider(vendor="openai_compatible", base_url="http://127.0.0.1:1/v1", options=options)
    with pytest.raises(ValueError) as caught:
        OpenAICompatibleTranslator("local-llm", provider, None)
    assert message in str(caught.value)
    assert "'local-llm'" in str(caught.value)


# --------------------------------------------------------------------------- #
# request
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("preset", "field", "stream_options"),
    [
        ("generic", "max_tokens", {"include_usage": True}),
        ("groq", "max_completion_tokens", None),
        ("xai", "max_completion_tokens", {"include_usage": True}),
        ("deepseek", "max_tokens", {"include_usage": True}),
        ("together", "max_tokens", None),
        ("vllm", "max_tokens", {"include_usage": True}),
        ("ollama", "max_tokens", {"include_usage": True}),
        ("llamacpp", "max_tokens", {"include_usage": True}),
    ],
)
def test_body_per_preset(preset: str, field: str, stream_options: dict[str, bool] | None) -> None:
    body = body_of(preset, sampling=common_pb2.SamplingParams(max_output_tokens=7, temperature=0.5))
    assert body[field] == 7
    assert set(body) & {"max_tokens", "max_completion_tokens"} == {field}
    assert body["stream"] is True
    assert body.get("stream_options") == stream_options
    assert body["messages"] == [{"role": "user", "content": PROMPT}]
    assert body["temperature"] == 0.5


def test_auth_modes() -> None:
    assert translator("groq").build_request(generate_request()).headers["Authorization"] == f"Bearer {KEY}"
    ollama = translator("ollama")
    assert "Authorization" not in ollama.build_request(generate_request()).headers
    assert "Authorization" not in ollama.models_request().headers
    assert "Authorization" not in translator("vllm", key=None).build_request(generate_request()).headers
    assert "Authorization" not in translator("groq", auth="none").build_request(generate_request()).headers
    assert KEY not in repr(translator("groq")) and "groq" in repr(translator("groq"))


def test_supported_features_are_sent() -> None:
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    body = body_of(
        "llamacpp",
        tools=[WEATHER],
        tool_choice=choice,
        sampling=common_pb2.SamplingParams(seed=3, stop_sequences=["a", "b", "c", "d", "e"]),
    )
    assert body["tool_choice"] == "required" and body["seed"] == 3
    assert body["stop"] == ["a", "b", "c", "d", "e"]  # no limit of four for llama.cpp
    groq = body_of("groq", metadata=common_pb2.RequestMetadata(end_user="u-1"))
    assert groq["user"] == "u-1"
    deepseek = body_of(
        "deepseek",
        messages=[user(text("hi"), name="ada")],
        response_format=common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    )
    assert deepseek["messages"][0]["name"] == "ada"
    assert deepseek["response_format"] == {"type": "json_object"}


def test_ollama_auto_tool_choice_is_left_out_and_inline_images_pass() -> None:
    auto = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_AUTO)
    body = body_of("ollama", tools=[WEATHER], tool_choice=auto)
    assert "tool_choice" not in body and body["tools"][0]["function"]["name"] == "get_weather"
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"\x89PNG", mime_type="image/png"))
    content = body_of("ollama", messages=[user(text("what is it?"), image)])["messages"][0]["content"]
    assert content[1]["image_url"]["url"].startswith("data:image/png;base64,")


_IMAGE_URL = common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://example.com/cat.png"))
_REQUIRED = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
_NAMED = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")


@pytest.mark.parametrize(
    ("preset", "options", "chat", "field"),
    [
        (
            "deepseek",
            {},
            {"messages": [user(text("look at this"), _IMAGE_URL)]},
            "messages[0].parts[1].image",
        ),
        ("ollama", {}, {"messages": [user(_IMAGE_URL)]}, "messages[0].parts[0].image.url"),
        ("groq", {}, {"messages": [user(text("hi"), name="ada")]}, "messages[0].name"),
        ("ollama", {}, {"tools": [WEATHER], "tool_choice": _REQUIRED}, "tool_choice.mode"),
        ("llamacpp", {}, {"tools": [WEATHER], "tool_choice": _NAMED}, "tool_choice.mode"),
        (
            "deepseek",
            {},
            {
                "response_format": common_pb2.ResponseFormat(
                    type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema='{"type":"object"}'
                )
            },
            "response_format.json_schema",
        ),
        (
            "generic",
            {"supports": ["tools"]},
            {"response_format": common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)},
            "response_format",
        ),
        ("deepseek", {}, {"sampling": common_pb2.SamplingParams(seed=1)}, "sampling.seed"),
        ("vllm", {}, {"metadata": common_pb2.RequestMetadata(end_user="u-1")}, "metadata.end_user"),
        ("generic", {"supports": []}, {"tools": [WEATHER]}, "tools"),
        (
            "generic",
            {"supports": ["json_object"]},
            {
                "messages": [
                    common_pb2.Message(
                        role=common_pb2.ROLE_ASSISTANT,
                        tool_calls=[common_pb2.ToolCall(id="c1", name="f", arguments_json="{}")],
                    )
                ]
            },
            "messages[0].tool_calls",
        ),
        (
            "generic",
            {"supports": ["tools"]},
            {"sampling": common_pb2.SamplingParams(presence_penalty=0.5)},
            "sampling.presence_penalty",
        ),
        (
            "deepseek",
            {},
            {"sampling": common_pb2.SamplingParams(stop_sequences=[str(i) for i in range(17)])},
            "sampling.stop_sequences",
        ),
        (
            "together",
            {"max_stop_sequences": 1},
            {"sampling": common_pb2.SamplingParams(stop_sequences=["a", "b"])},
            "sampling.stop_sequences",
        ),
    ],
)
def test_unsupported_features_are_refused_naming_the_field(
    preset: str, options: dict[str, Any], chat: dict[str, Any], field: str
) -> None:
    with pytest.raises(SwitchyardError) as caught:
        translator(preset, **options).build_request(generate_request(**chat))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == field
    assert PROMPT not in error.message and "look at this" not in error.message


# --------------------------------------------------------------------------- #
# stream decoding
# --------------------------------------------------------------------------- #


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "served-model",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
    }
    body.update(extra)
    return b"data: " + orjson.dumps(body) + b"\n\n"


def data(obj: object) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"
OPENAI_USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 9,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 4},
}
MINIMAL_USAGE = {"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29}


def decode(
    preset: str, stream: bytes, request: provider_pb2.GenerateRequest | None = None, **options: Any
) -> tuple[list[Any], OpenAICompatibleStreamDecoder]:
    decoder = translator(preset, **options).new_decoder(request or generate_request())
    parser = SseParser()
    out: list[Any] = []
    for event in parser.feed(stream):
        out.extend(decoder.on_event(event))
    for event in parser.close():
        out.extend(decoder.on_event(event))
    return out, decoder


def test_groq_usage_in_x_groq() -> None:
    stream = (
        chunk({"role": "assistant", "content": ""}, x_groq={"id": "req_01abc"})
        + chunk({"content": "Hi"})
        + chunk({}, "stop", x_groq={"id": "req_01abc", "usage": {**OPENAI_USAGE, "queue_time": 0.01}})
        + DONE
    )
    events, decoder = decode("groq", stream)
    assert [e.delta.text for e in events] == ["Hi"]
    assert decoder.outcome().usage == common_pb2.Usage(
        input_tokens=20, output_tokens=9, cached_input_tokens=8, reasoning_tokens=4
    )


def test_together_usage_on_the_finish_chunk() -> None:
    stream = (
        chunk({"role": "assistant", "content": ""}, usage=None)
        + chunk({"content": "Hi"}, usage=None)
        + chunk({}, "length", usage=MINIMAL_USAGE)
        + DONE
    )
    _, decoder = decode("together", stream)
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert outcome.usage == common_pb2.Usage(input_tokens=20, output_tokens=9)


def test_deepseek_cache_hits_and_reasoning_content() -> None:
    usage = {
        "prompt_tokens": 30,
        "completion_tokens": 12,
        "total_tokens": 42,
        "prompt_cache_hit_tokens": 24,
        "prompt_cache_miss_tokens": 6,
        "completion_tokens_details": {"reasoning_tokens": 5},
    }
    stream = (
        b": keep-alive\n\n"
        + chunk({"role": "assistant", "content": ""})
        + chunk({"reasoning_content": "Let me think."})
        + chunk({"content": "Answer."})
        + chunk({}, "stop")
        + data({"id": "x", "choices": [], "usage": usage})
        + DONE
    )
    events, decoder = decode("deepseek", stream)
    assert [(e.delta.reasoning_text, e.delta.text) for e in events] == [
        ("Let me think.", ""),
        ("", "Answer."),
    ]
    assert decoder.outcome().usage == common_pb2.Usage(
        input_tokens=30, output_tokens=12, cached_input_tokens=24, reasoning_tokens=5
    )


def test_reasoning_field_is_never_answer_text() -> None:
    stream = (
        chunk({"reasoning": "vllm thinks"})
        + chunk({"reasoning_content": "old name"})
        + chunk({"content": "A"})
    )
    events, _ = decode("vllm", stream)
    assert [(e.delta.reasoning_text, e.delta.text) for e in events] == [("vllm thinks", ""), ("", "A")]
    events, _ = decode("vllm", stream, reasoning_field="reasoning_content")
    assert [(e.delta.reasoning_text, e.delta.text) for e in events] == [("old name", ""), ("", "A")]
    events, _ = decode("generic", stream, reasoning_field="none")
    assert [(e.delta.reasoning_text, e.delta.text) for e in events] == [("", "A")]


def test_llamacpp_usage_on_the_finish_chunk_of_older_builds_is_read() -> None:
    stream = (
        chunk({"content": "Hi"})
        + chunk({}, "stop", usage=MINIMAL_USAGE, timings={"prompt_n": 20, "predicted_n": 9})
        + DONE
    )
    _, decoder = decode("llamacpp", stream)
    assert decoder.outcome().usage == common_pb2.Usage(input_tokens=20, output_tokens=9)


def test_no_usage_is_estimated_and_marked() -> None:
    request = generate_request(messages=[user(text("x" * 40))])
    _, decoder = decode(
        "generic", chunk({"content": "y" * 10}) + chunk({}, "stop") + DONE, request, stream_usage="none"
    )
    usage = decoder.outcome().usage
    assert usage.estimated and (usage.input_tokens, usage.output_tokens) == (10, 3)


def test_ollama_whole_tool_call_in_one_chunk() -> None:
    call = {
        "id": "call_ab12cd34",
        "index": 0,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    stream = chunk({"role": "assistant", "content": "", "tool_calls": [call]}) + chunk(
        {"role": "assistant", "content": ""}, "tool_calls"
    )
    events, decoder = decode("ollama", stream + DONE)
    calls = [c for e in events for c in e.delta.tool_calls]
    assert [(c.id, c.name, c.arguments_fragment) for c in calls] == [
        ("call_ab12cd34", "get_weather", '{"city":"Oslo"}')
    ]
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize(
    ("preset", "event", "code", "reason"),
    [
        (
            "vllm",
            {"error": {"message": f"x {PROMPT}", "type": "RateLimitError", "param": None, "code": 429}},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
        ),
        (
            "llamacpp",
            {"error": {"code": 500, "message": PROMPT, "type": "server_error"}},
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
        ),
        (
            "llamacpp",
            {"error": {"code": 400, "message": "request exceeds", "type": "exceed_context_size_error"}},
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        (
            "xai",
            {"code": "Some resource has been exhausted", "error": f"Too many requests {PROMPT}"},
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
        ),
        (
            "groq",
            {"id": "c", "choices": [], "x_groq": {"id": "req_1", "error": f"stopped: {PROMPT}"}},
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
        ),
        (
            "deepseek",
            {"error": {"message": "This model's maximum context length is 65536 tokens.", "type": "x"}},
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
    ],
)
def test_in_stream_errors(preset: str, event: dict[str, Any], code: grpc.StatusCode, reason: Reason) -> None:
    decoder = translator(preset).new_decoder(generate_request())
    decoder.on_event(SseEvent(chunk({"content": "partial"})[6:-2]))
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(event)))
    error = caught.value
    assert (error.code, error.reason) == (code, reason)
    assert error.metadata["in_stream"] == "true"
    assert error.metadata["vendor"] == "openai_compatible"
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)


def test_malformed_event_is_a_protocol_error() -> None:
    decoder = translator("together").new_decoder(generate_request())
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(b'{"choices":[{"delta":{"content":"' + PROMPT.encode()))
    assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR
    assert PROMPT not in caught.value.message


# --------------------------------------------------------------------------- #
# errors and headers
# --------------------------------------------------------------------------- #


def openai_error(message: str, kind: str, code: object = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})


@pytest.mark.parametrize(
    ("preset", "status", "body", "code", "reason", "vendor_code"),
    [
        (
            "deepseek",
            402,
            openai_error("Insufficient Balance", "unknown_error", "invalid_request_error"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
            "invalid_request_error",
        ),
        (
            "deepseek",
            400,
            openai_error(
                f"This model's maximum context length is 131072 tokens. {PROMPT}",
                "invalid_request_error",
                "invalid_request_error",
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "invalid_request_error",
        ),
        (
            "deepseek",
            422,
            openai_error("Invalid parameters", "invalid_request_error", "invalid_request_error"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "invalid_request_error",
        ),
        (
            "groq",
            498,
            openai_error("Flex tier capacity exceeded", "capacity_exceeded", "capacity_exceeded"),
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_OVERLOADED,
            "capacity_exceeded",
        ),
        (
            "groq",
            400,
            openai_error("Please reduce the length", "invalid_request_error", "context_length_exceeded"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "context_length_exceeded",
        ),
        (
            "xai",
            400,
            orjson.dumps(
                {
                    "code": "Client specified an invalid argument",
                    "error": f"Incorrect API key provided: {KEY[:4]}***. You can obtain one.",
                }
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
            "Client_specified_an_invalid_argument",
        ),
        (
            "xai",
            400,
            orjson.dumps(
                {
                    "code": "Client specified an invalid argument",
                    "error": "This model's maximum prompt length is 131072 but the request contains "
                    "140000 tokens.",
                }
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "Client_specified_an_invalid_argument",
        ),
        (
            "xai",
            404,
            orjson.dumps({"code": "Some requested entity was not found", "error": "no model"}),
            grpc.StatusCode.NOT_FOUND,
            Reason.NOT_FOUND,
            "Some_requested_entity_was_not_found",
        ),
        (
            "vllm",
            401,
            orjson.dumps({"error": "Unauthorized"}),
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
            "",
        ),
        (
            "vllm",
            400,
            openai_error("This model's maximum context length is 32768 tokens.", "BadRequestError", 400),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "BadRequestError",
        ),
        (
            "llamacpp",
            400,
            orjson.dumps(
                {
                    "error": {
                        "code": 400,
                        "message": "too big",
                        "type": "exceed_context_size_error",
                        "n_ctx": 4096,
                    }
                }
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "exceed_context_size_error",
        ),
        (
            "llamacpp",
            503,
            orjson.dumps({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}),
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_OVERLOADED,
            "unavailable_error",
        ),
        (
            "together",
            400,
            openai_error(
                "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 8193",
                "invalid_request_error",
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "invalid_request_error",
        ),
        (
            "ollama",
            404,
            openai_error('model "llama3" not found, try pulling it first', "not_found_error"),
            grpc.StatusCode.NOT_FOUND,
            Reason.NOT_FOUND,
            "not_found_error",
        ),
        (
            "ollama",
            400,
            openai_error(f"invalid image input {PROMPT}", "invalid_request_error"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "invalid_request_error",
        ),
        (
            "generic",
            500,
            b"<html>bad gateway</html>",
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            "",
        ),
        (
            "generic",
            422,
            orjson.dumps({"detail": "maximum context length is 10"}),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "",
        ),
    ],
)
def test_error_table(
    preset: str, status: int, body: bytes, code: grpc.StatusCode, reason: Reason, vendor_code: str
) -> None:
    error = translator(preset).map_error(status, {}, body)
    assert (error.code, error.reason) == (code, reason)
    assert error.metadata["http_status"] == str(status)
    assert error.metadata.get("vendor_code", "") == vendor_code
    shown = error.message + str(error.metadata)
    assert PROMPT not in shown and KEY[:4] not in shown and "Incorrect" not in shown


def test_balance_exhausted_is_not_retryable_later() -> None:
    error = translator("deepseek").map_error(
        402, {"retry-after": "5"}, openai_error("Insufficient Balance", "x")
    )
    assert error.metadata["quota"] == "exhausted" and error.retry_after_s is None


def test_together_headroom_and_rate_limit_retry() -> None:
    headers = {
        "x-ratelimit-limit": "60",
        "x-ratelimit-remaining": "0",
        "x-ratelimit-reset": "7",
        "x-tokenlimit-limit": "180000",
        "x-tokenlimit-remaining": "1200",
    }
    before = time.time()
    headroom = translator("together").headroom(headers)
    assert headroom is not None
    assert (headroom.limit_requests, headroom.remaining_requests) == (60, 0)
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (180000, 1200)
    assert before + 6 <= headroom.requests_reset_at.seconds <= time.time() + 8
    error = translator("together").map_error(
        429, headers, openai_error("slow", "rate_limit_error", "rate_limit_exceeded")
    )
    assert (error.code, error.reason, error.retry_after_s) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        7.0,
    )
    assert error.metadata["remaining_requests"] == "0"


def test_openai_style_headroom_and_none() -> None:
    headers = {
        "x-ratelimit-limit-requests": "14400",
        "x-ratelimit-remaining-requests": "14399",
        "x-ratelimit-reset-requests": "6s",
    }
    headroom = translator("groq").headroom(headers)
    assert headroom is not None and (headroom.limit_requests, headroom.remaining_requests) == (14400, 14399)
    assert translator("ollama").headroom({}) is None
    assert translator("vllm").request_id({"x-request-id": "abc"}) == "abc"
