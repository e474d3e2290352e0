"""Mistral translation as pure functions: request building, stream decoding, the error
table and rate-limit headers. No network. Recorded chunks follow real Mistral answers
(a text stream, a whole tool call, magistral's thinking chunks)."""

from __future__ import annotations

import base64
import re
import time
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.base import SseEvent, SseParser
from switchyard.adapters.vendors import load_translator
from switchyard.adapters.vendors.mistral import MistralStreamDecoder, MistralTranslator, mistral_call_id
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2, provider_pb2

KEY = "mistral-test-key-0123456789"
PROMPT = "secret prompt text"
SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
WEATHER = common_pb2.Tool(name="get_weather", description="Weather now", parameters_json_schema=SCHEMA)


def translator(**options: Any) -> MistralTranslator:
    provider = Provider(vendor="mistral", base_url="https://api.mistral.ai/v1", options=options)
    return MistralTranslator("mistral-main", provider, KEY)


def text(value: str) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(text=value)


def user(*parts: common_pb2.ContentPart) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts)


def generate_request(**chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault("messages", [user(text(PROMPT))])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider="mistral-main", upstream_model="mistral-small-latest"
    )


def body_of(t: MistralTranslator | None = None, **chat: Any) -> dict[str, Any]:
    built = (t or translator()).build_request(generate_request(**chat))
    assert built.body is not None
    return dict(built.body)


def refused(field: str, **chat: Any) -> SwitchyardError:
    with pytest.raises(SwitchyardError) as caught:
        translator().build_request(generate_request(**chat))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == field
    assert PROMPT not in error.message
    return error


# --------------------------------------------------------------------------- #
# request
# --------------------------------------------------------------------------- #


def test_translator_table_has_mistral() -> None:
    assert load_translator("mistral") is MistralTranslator


def test_minimal_request_has_no_stream_options() -> None:
    built = translator().build_request(generate_request())
    assert (built.method, built.path) == ("POST", "/chat/completions")
    assert built.headers["Authorization"] == f"Bearer {KEY}"
    assert built.headers["Accept"] == "text/event-stream"
    assert built.body == {
        "model": "mistral-small-latest",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    }
    assert KEY not in repr(built) and PROMPT not in repr(built)
    models = translator().models_request()
    assert (models.method, models.path, models.body) == ("GET", "/models", None)
    assert models.headers["Authorization"] == f"Bearer {KEY}"


def test_provider_options() -> None:
    body = body_of(translator(safe_prompt=True, parallel_tool_calls=False), tools=[WEATHER])
    assert (body["safe_prompt"], body["parallel_tool_calls"]) == (True, False)
    assert "parallel_tool_calls" not in body_of(translator(parallel_tool_calls=False))
    with pytest.raises(ValueError, match="system role"):
        translator(system_role="developer")
    with pytest.raises(ValueError, match="safe_prompt"):
        translator(safe_prompt="yes")


def test_conversation_with_a_foreign_tool_round_trip() -> None:
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("be brief"), text("be kind")]),
        user(text("weather?")),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            parts=[text("Let me look.")],
            tool_calls=[
                common_pb2.ToolCall(id="call_Zx81ab", name="get_weather", arguments_json='{"city":"Oslo"}'),
                common_pb2.ToolCall(id="aB3dE5gH9", name="get_time"),
            ],
        ),
        common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id="call_Zx81ab", parts=[text('{"t":3}')]),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL, tool_call_id="aB3dE5gH9", name="clock", parts=[text("12")]
        ),
    ]
    mapped = mistral_call_id("call_Zx81ab")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", mapped) and mapped == mistral_call_id("call_Zx81ab")
    assert body_of(messages=messages)["messages"] == [
        {
            "role": "system",
            "content": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        },
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": mapped,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
                {"id": "aB3dE5gH9", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        # The answer's name comes from the call it answers, unless it brings its own.
        {"role": "tool", "tool_call_id": mapped, "content": '{"t":3}', "name": "get_weather"},
        {"role": "tool", "tool_call_id": "aB3dE5gH9", "content": "12", "name": "clock"},
    ]


def test_call_ids_are_kept_or_mapped() -> None:
    assert mistral_call_id("aB3dE5gH9") == "aB3dE5gH9"
    ids = {mistral_call_id(f"call_{i}") for i in range(200)}
    assert len(ids) == 200 and all(re.fullmatch(r"[A-Za-z0-9]{9}", i) for i in ids)


def test_images_by_url_inline_and_with_detail() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    message = user(
        text("what is this?"),
        common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://x.test/a.jpg")),
        common_pb2.ContentPart(image=common_pb2.ImagePart(data=png, mime_type="image/png")),
        common_pb2.ContentPart(
            image=common_pb2.ImagePart(url="https://x.test/b.jpg", detail=common_pb2.IMAGE_DETAIL_LOW)
        ),
    )
    assert body_of(messages=[message])["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": "https://x.test/a.jpg"},
        {"type": "image_url", "image_url": "data:image/png;base64," + base64.b64encode(png).decode()},
        {"type": "image_url", "image_url": {"url": "https://x.test/b.jpg", "detail": "low"}},
    ]


ANSWERED_CALL = common_pb2.Message(
    role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(id="aB3dE5gH9", name="f")]
)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([common_pb2.Message(role=common_pb2.ROLE_USER, name="ada", parts=[text("x")])], "messages[0].name"),
        ([common_pb2.Message(role=common_pb2.ROLE_SYSTEM, name="s", parts=[text("x")])], "messages[0].name"),
        (
            [user(text("x")), common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=[text("Sure")])],
            "messages[1].role",
        ),
        (
            [user(text("x")), common_pb2.Message(role=common_pb2.ROLE_ASSISTANT), user(text("y"))],
            "messages[1].parts",
        ),
        (
            [
                common_pb2.Message(
                    role=common_pb2.ROLE_SYSTEM,
                    parts=[common_pb2.ContentPart(image=common_pb2.ImagePart(url="u"))],
                )
            ],
            "messages[0].parts[0].image",
        ),
        (
            [
                user(text("x")),
                ANSWERED_CALL,
                common_pb2.Message(
                    role=common_pb2.ROLE_TOOL,
                    tool_call_id="aB3dE5gH9",
                    parts=[common_pb2.ContentPart(image=common_pb2.ImagePart(url="u"))],
                ),
            ],
            "messages[2].parts[0].image",
        ),
        (
            [user(text("x")), common_pb2.Message(role=common_pb2.ROLE_TOOL, parts=[text("r")])],
            "messages[1].tool_call_id",
        ),
        (
            [
                user(text("x")),
                ANSWERED_CALL,
                common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id="aB3dE5gH9", name="bad name"),
            ],
            "messages[2].name",
        ),
        (
            [
                common_pb2.Message(
                    role=common_pb2.ROLE_USER, tool_calls=[common_pb2.ToolCall(id="c", name="f")]
                )
            ],
            "messages[0].tool_calls",
        ),
        ([common_pb2.Message(role=common_pb2.ROLE_USER, tool_call_id="c")], "messages[0].tool_call_id"),
        ([common_pb2.Message(parts=[text("x")])], "messages[0].role"),
        (
            [
                user(text("x")),
                common_pb2.Message(
                    role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(name="f")]
                ),
                user(text("y")),
            ],
            "messages[1].tool_calls[0].id",
        ),
        (
            [
                user(text("x")),
                common_pb2.Message(
                    role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(id="c", name="a.b")]
                ),
                user(text("y")),
            ],
            "messages[1].tool_calls[0].name",
        ),
        (
            [user(common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"x")))],
            "messages[0].parts[0].image.mime_type",
        ),
        ([user(common_pb2.ContentPart(image=common_pb2.ImagePart()))], "messages[0].parts[0].image.url"),
    ],
)
def test_messages_mistral_cannot_take_are_refused(messages: list[common_pb2.Message], field: str) -> None:
    refused(field, messages=messages)


def test_end_user_is_refused_and_other_metadata_ignored() -> None:
    error = refused("metadata.end_user", metadata=common_pb2.RequestMetadata(end_user="user-123"))
    assert "end-user" in error.message
    body = body_of(metadata=common_pb2.RequestMetadata(tags={"team": "a"}, conversation_id="c1"))
    assert set(body) == {"model", "messages", "stream"}


def test_tools_and_tool_choice() -> None:
    body = body_of(
        tools=[
            common_pb2.Tool(name="noop"),
            common_pb2.Tool(name="w", parameters_json_schema=SCHEMA, strict=True),
        ]
    )
    assert body["tools"] == [
        {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        },
        {"type": "function", "function": {"name": "w", "parameters": orjson.loads(SCHEMA), "strict": True}},
    ]
    assert "tool_choice" not in body
    for mode, expected in (
        (common_pb2.TOOL_CHOICE_MODE_AUTO, "auto"),
        (common_pb2.TOOL_CHOICE_MODE_NONE, "none"),
        (common_pb2.TOOL_CHOICE_MODE_REQUIRED, "any"),
    ):
        assert (
            body_of(tools=[WEATHER], tool_choice=common_pb2.ToolChoice(mode=mode))["tool_choice"] == expected
        )
    named = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")
    assert body_of(tools=[WEATHER], tool_choice=named)["tool_choice"] == {
        "type": "function",
        "function": {"name": "get_weather"},
    }


def test_bad_tools_and_choices_are_refused() -> None:
    refused(
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="{no")]
    )
    refused(
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="[1]")]
    )
    refused("tools[0].name", tools=[common_pb2.Tool(description="nameless")])
    refused("tools[0].name", tools=[common_pb2.Tool(name="get weather")])
    refused("tool_choice", tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED))
    refused(
        "tool_choice.tool_name",
        tools=[WEATHER],
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="other"),
    )
    refused("tool_choice.mode", tools=[WEATHER], tool_choice=common_pb2.ToolChoice(tool_name="get_weather"))


def test_response_formats() -> None:
    fmt = common_pb2.ResponseFormat
    assert body_of(response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT))[
        "response_format"
    ] == {"type": "json_object"}
    assert body_of(response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_TEXT))["response_format"] == {
        "type": "text"
    }
    assert "response_format" not in body_of(response_format=fmt())
    schema = fmt(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="city", json_schema=SCHEMA, strict=True
    )
    assert body_of(response_format=schema)["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "city", "schema": orjson.loads(SCHEMA), "strict": True},
    }
    unnamed = fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=SCHEMA)
    assert body_of(response_format=unnamed)["response_format"]["json_schema"] == {
        "name": "response",
        "schema": orjson.loads(SCHEMA),
    }
    refused(
        "response_format.json_schema", response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
    )
    refused(
        "response_format.json_schema",
        response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[]"),
    )


def test_sampling_uses_mistral_names() -> None:
    body = body_of(
        sampling=common_pb2.SamplingParams(
            temperature=0.0,
            top_p=0.9,
            max_output_tokens=256,
            stop_sequences=["a", "b", "c", "d", "e"],
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
        )
    )
    assert {k: body[k] for k in body if k not in ("model", "messages")} == {
        "temperature": 0.0,
        "top_p": 0.9,
        "max_tokens": 256,
        "stop": ["a", "b", "c", "d", "e"],
        "random_seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "stream": True,
    }


# --------------------------------------------------------------------------- #
# stream decoding
# --------------------------------------------------------------------------- #


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "b5810ef13dbb4811a20d34e1393d8431",
        "object": "chat.completion.chunk",
        "created": 1787865810,
        "model": "mistral-small-latest",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    body.update(extra)
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = {
    "prompt_tokens": 19,
    "total_tokens": 21,
    "completion_tokens": 2,
    "prompt_tokens_details": {"cached_tokens": 8},
    "service_tier": "standard",
}
DONE = b"data: [DONE]\n\n"


def decode(
    stream: bytes, request: provider_pb2.GenerateRequest | None = None
) -> tuple[list[Any], MistralStreamDecoder]:
    decoder = translator().new_decoder(request or generate_request())
    events: list[Any] = []
    for event in SseParser().feed(stream):
        events.extend(decoder.on_event(event))
    return events, decoder


def test_text_stream_with_usage_on_the_finishing_chunk() -> None:
    stream = (
        chunk({"role": "assistant", "content": ""})
        + chunk({"content": "O"})
        + chunk({"content": "K"})
        + chunk({"content": ""}, "stop", usage=USAGE)
        + DONE
    )
    events, decoder = decode(stream)
    assert [e.delta.text for e in events] == ["O", "K"]
    assert decoder.finished
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_STOP
    assert outcome.usage == common_pb2.Usage(input_tokens=19, output_tokens=2, cached_input_tokens=8)
    assert (outcome.vendor_request_id, outcome.vendor_model) == (
        "b5810ef13dbb4811a20d34e1393d8431",
        "mistral-small-latest",
    )


def test_whole_tool_call_in_one_delta() -> None:
    call = {"id": "gSIMJiOkT", "function": {"name": "weather", "arguments": '{"location": "San Francisco"}'}}
    stream = (
        chunk({"role": "assistant", "content": ""})
        + chunk({"content": None, "tool_calls": [call]}, "tool_calls", usage=USAGE)
        + DONE
    )
    events, decoder = decode(stream)
    calls = [c for e in events for c in e.delta.tool_calls]
    assert len(calls) == 1
    assert (calls[0].index, calls[0].id, calls[0].name) == (0, "gSIMJiOkT", "weather")
    assert orjson.loads(calls[0].arguments_fragment) == {"location": "San Francisco"}
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


def test_calls_in_separate_chunks_get_their_own_index_and_object_arguments_become_json() -> None:
    first = {"id": "aaaaaaaa1", "function": {"name": "f", "arguments": {"a": 1}}}
    second = {"id": "bbbbbbbb2", "function": {"name": "g", "arguments": "{}"}}
    events, _ = decode(chunk({"tool_calls": [first]}) + chunk({"tool_calls": [second]}, "tool_calls"))
    calls = [c for e in events for c in e.delta.tool_calls]
    assert [(c.index, c.id, c.arguments_fragment) for c in calls] == [
        (0, "aaaaaaaa1", '{"a":1}'),
        (1, "bbbbbbbb2", "{}"),
    ]


def test_thinking_chunks_are_reasoning_not_answer_text() -> None:
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "2+2 is basic."}]}
    stream = (
        chunk({"role": "assistant", "content": [thinking]})
        + chunk({"content": [{"type": "text", "text": "2 + 2 = 4"}]})
        + chunk({"content": [{"type": "reference", "reference_ids": [1]}]})
        + chunk(
            {"content": ""}, "stop", usage={"prompt_tokens": 10, "total_tokens": 56, "completion_tokens": 46}
        )
        + DONE
    )
    events, decoder = decode(stream)
    assert [(e.delta.reasoning_text, e.delta.text) for e in events] == [
        ("2+2 is basic.", ""),
        ("", "2 + 2 = 4"),
    ]
    # Mistral does not report reasoning tokens: none are invented.
    assert decoder.outcome().usage == common_pb2.Usage(input_tokens=10, output_tokens=46)


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("stop", common_pb2.FINISH_REASON_STOP),
        ("length", common_pb2.FINISH_REASON_LENGTH),
        ("model_length", common_pb2.FINISH_REASON_LENGTH),
        ("tool_calls", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("something_new", common_pb2.FINISH_REASON_UNSPECIFIED),
    ],
)
def test_finish_reasons(finish: str, expected: int) -> None:
    _, decoder = decode(chunk({"content": ""}, finish) + DONE)
    assert decoder.outcome().finish_reason == expected


def test_older_cached_token_field_and_missing_usage() -> None:
    _, decoder = decode(
        chunk(
            {"content": ""},
            "stop",
            usage={"prompt_tokens": 9, "completion_tokens": 1, "num_cached_tokens": 4},
        )
    )
    assert decoder.outcome().usage.cached_input_tokens == 4
    request = generate_request(messages=[user(text("x" * 40))])
    _, decoder = decode(chunk({"content": "y" * 10}) + chunk({"content": ""}, "stop") + DONE, request)
    usage = decoder.outcome().usage
    assert usage.estimated and (usage.input_tokens, usage.output_tokens) == (10, 3)


def test_a_chunk_finishing_with_error_raises() -> None:
    decoder = translator().new_decoder(generate_request())
    assert decoder.on_event(SseEvent(chunk({"content": "partial"})[6:-2]))[0].delta.text == "partial"
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(chunk({"content": ""}, "error")[6:-2]))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert (error.metadata["in_stream"], error.metadata["finish_reason"]) == ("true", "error")


def test_an_error_object_in_the_stream_maps_like_http() -> None:
    decoder = translator().new_decoder(generate_request())
    capacity = {
        "object": "error",
        "message": f"busy: {PROMPT}",
        "type": "engine_max_pending_tokens",
        "code": "3810",
    }
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(capacity)))
    assert caught.value.reason == Reason.PROVIDER_OVERLOADED
    assert caught.value.metadata["in_stream"] == "true"
    assert PROMPT not in caught.value.message and PROMPT not in str(caught.value.metadata)
    limited = {"object": "error", "message": "Rate limit exceeded", "type": "rate_limited", "code": "1300"}
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(limited)))
    assert (caught.value.reason, caught.value.metadata["http_status"]) == (Reason.RATE_LIMITED, "429")


def test_malformed_events_are_protocol_errors_without_their_content() -> None:
    decoder = translator().new_decoder(generate_request())
    for data in (
        b'{"choices":[{"delta":{"content":"' + PROMPT.encode(),
        b'{"choices":[{"index":0,"delta":{"content":["' + PROMPT.encode() + b'"]}}]}',
        b'{"choices":[{"index":0,"delta":{"content":[{"type":"thinking","thinking":"x"}]}}]}',
        b'{"choices":[{"index":0,"delta":{"content":5}}]}',
    ):
        with pytest.raises(SwitchyardError) as caught:
            decoder.on_event(SseEvent(data))
        assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR
        assert PROMPT not in caught.value.message


def test_eof_rules_and_events_after_done() -> None:
    _, done = decode(DONE + chunk({"content": "late"}))
    assert done.finished
    _, cut = decode(chunk({"content": "partial"}))
    with pytest.raises(SwitchyardError) as caught:
        cut.on_eof()
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE
    _, no_marker = decode(chunk({"content": "ok"}) + chunk({"content": ""}, "stop"))
    no_marker.on_eof()


def test_non_streamed_body_with_thinking_content() -> None:
    completion = {
        "id": "ef8044c3360843bdb1f55527e6c004fd",
        "object": "chat.completion",
        "model": "mistral-large-4",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {
                    "role": "assistant",
                    "tool_calls": None,
                    "content": [
                        {
                            "type": "thinking",
                            "thinking": [{"type": "text", "text": "count the r's"}],
                            "closed": True,
                        },
                        {"type": "text", "text": "3"},
                    ],
                },
            }
        ],
        "usage": {
            "prompt_tokens": 26,
            "total_tokens": 138,
            "completion_tokens": 112,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
    decoder = translator().new_decoder(generate_request())
    events = decoder.on_body(orjson.dumps(completion))
    assert decoder.finished
    assert (events[0].delta.reasoning_text, events[0].delta.text) == ("count the r's", "3")
    assert decoder.outcome().usage == common_pb2.Usage(input_tokens=26, output_tokens=112)


# --------------------------------------------------------------------------- #
# errors and headers
# --------------------------------------------------------------------------- #

CONTEXT = (
    "Prompt contains 160907 tokens and 0 draft tokens, too large for model with 131072 maximum context length"
)


def mistral_error(kind: str, code: str | None, message: str = f"echo: {PROMPT}", status: int = 400) -> bytes:
    return orjson.dumps(
        {
            "object": "error",
            "message": message,
            "type": kind,
            "param": None,
            "code": code,
            "raw_status_code": status,
        }
    )


@pytest.mark.parametrize(
    ("status", "body", "grpc_code", "reason", "vendor_code"),
    [
        (
            400,
            mistral_error("invalid_request_error", None),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "invalid_request_error",
        ),
        (
            400,
            mistral_error("invalid_request_invalid_args", "3051", CONTEXT),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "3051",
        ),
        (
            400,
            mistral_error("invalid_request_invalid_args", "3051"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "3051",
        ),
        (
            400,
            mistral_error("invalid_request_invalid_args", "3051", f"{PROMPT}: {CONTEXT}"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "3051",
        ),
        (
            400,
            mistral_error("invalid_model", "1500", "Invalid model: nope"),
            grpc.StatusCode.NOT_FOUND,
            Reason.NOT_FOUND,
            "1500",
        ),
        (
            400,
            mistral_error("invalid_request_message_order", "3230"),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "3230",
        ),
        (401, b'{"detail":"Invalid API Key"}', grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED, None),
        (
            401,
            b'{"message":"Unauthorized","request_id":"abc"}',
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
            None,
        ),
        (
            403,
            mistral_error("tier_not_allowed", "1910", status=403),
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
            "1910",
        ),
        (404, b'{"detail":"Not Found"}', grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND, None),
        (
            422,
            orjson.dumps(
                {"detail": [{"type": "extra_forbidden", "loc": ["body", "x"], "msg": "m", "input": PROMPT}]}
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "extra_forbidden",
        ),
        (
            422,
            orjson.dumps(
                {
                    "object": "error",
                    "message": {"detail": [{"type": "float_type", "msg": PROMPT}]},
                    "type": "invalid_request_error",
                    "code": None,
                }
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "invalid_request_error",
        ),
        (
            429,
            mistral_error("rate_limited", "1300", status=429),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
            "1300",
        ),
        (
            429,
            mistral_error("engine_max_pending_tokens", "3810", status=429),
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_OVERLOADED,
            "3810",
        ),
        (
            500,
            mistral_error("internal_server_error", None, status=500),
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            "internal_server_error",
        ),
        (502, b"<html>Bad gateway</html>", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, None),
        (
            503,
            mistral_error("internal_server_error", "3800", status=503),
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_OVERLOADED,
            "3800",
        ),
        (504, b"", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT, None),
    ],
)
def test_error_table(
    status: int, body: bytes, grpc_code: grpc.StatusCode, reason: Reason, vendor_code: str | None
) -> None:
    headers = httpx.Headers({"mistral-correlation-id": "019c6f45-6523-7b29-a0d1-2e9d64650277"})
    error = translator().map_error(status, headers, body)
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["provider"] == "mistral-main" and error.metadata["vendor"] == "mistral"
    assert error.metadata["http_status"] == str(status)
    assert error.metadata.get("vendor_code") == vendor_code
    assert error.metadata["vendor_request_id"] == "019c6f45-6523-7b29-a0d1-2e9d64650277"
    for leak in (PROMPT, KEY, "echo", "Invalid API Key", "Unauthorized", "160907"):
        assert leak not in error.message
        assert all(leak not in value for value in error.metadata.values())


def test_retry_after_and_exhausted_allowances() -> None:
    t = translator()
    limited = mistral_error("rate_limited", "1300", status=429)
    assert t.map_error(429, httpx.Headers({"retry-after": "7"}), limited).retry_after_s == 7.0
    assert t.map_error(429, httpx.Headers({"ratelimitbysize-reset": "28"}), limited).retry_after_s == 28.0
    assert t.map_error(429, httpx.Headers(), limited).retry_after_s == 1.0
    for headers in (
        {"x-ratelimit-limit-req-minute": "0", "x-ratelimit-remaining-req-minute": "0", "retry-after": "7"},
        {"x-ratelimit-remaining-tokens-month": "0"},
    ):
        error = t.map_error(429, httpx.Headers(headers), limited)
        assert (error.reason, error.retry_after_s, error.metadata["quota"]) == (
            Reason.RATE_LIMITED,
            None,
            "exhausted",
        )
    busy = t.map_error(
        429, httpx.Headers({"retry-after": "2"}), mistral_error("engine_max_pending_tokens", "3810")
    )
    assert busy.retry_after_s == 2.0 and "quota" not in busy.metadata
    assert t.map_error(503, httpx.Headers({"retry-after": "3"}), b"").retry_after_s == 3.0
    assert t.map_error(400, httpx.Headers({"retry-after": "3"}), b"").retry_after_s is None


def test_headroom_from_current_headers() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-req-minute": "60",
            "x-ratelimit-remaining-req-minute": "59",
            "x-ratelimit-limit-tokens-minute": "50000",
            "x-ratelimit-remaining-tokens-minute": "47196",
            "x-ratelimit-limit-tokens-month": "4000000",
            "x-ratelimit-remaining-tokens-month": "3950246",
        }
    )
    before = time.time()
    headroom = translator().headroom(headers)
    assert headroom is not None
    assert (headroom.limit_requests, headroom.remaining_requests) == (60, 59)
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (50000, 47196)
    assert not headroom.HasField("tokens_reset_at") and not headroom.retry_after_ms
    assert before - 1 <= headroom.observed_at.seconds <= time.time() + 1
    assert translator().headroom(httpx.Headers({"content-type": "text/event-stream"})) is None


def test_headroom_from_older_headers_and_error_metadata() -> None:
    headers = httpx.Headers(
        {
            "ratelimitbysize-limit": "500000",
            "ratelimitbysize-remaining": "467993",
            "ratelimitbysize-reset": "40",
            "ratelimitbysize-query-cost": "32007",
            "x-ratelimitbysize-limit-minute": "500000",
            "x-ratelimitbysize-remaining-minute": "467000",
            "retry-after": "5",
        }
    )
    headroom = translator().headroom(headers)
    assert headroom is not None
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (500000, 467000)
    assert not headroom.HasField("remaining_requests")
    observed = headroom.observed_at.seconds + headroom.observed_at.nanos / 1e9
    reset = headroom.tokens_reset_at.seconds + headroom.tokens_reset_at.nanos / 1e9
    assert reset - observed == pytest.approx(40, abs=0.01)
    assert headroom.retry_after_ms == 5000
    error = translator().map_error(429, headers, mistral_error("rate_limited", "1300", status=429))
    assert error.metadata["remaining_tokens"] == "467000" and "remaining_requests" not in error.metadata


def test_request_id_prefers_the_correlation_id() -> None:
    t = translator()
    assert t.request_id(httpx.Headers({"x-kong-request-id": "k", "mistral-correlation-id": "c"})) == "c"
    assert t.request_id(httpx.Headers({"x-kong-request-id": "k"})) == "k"
    assert t.request_id(httpx.Headers()) == ""
