"""OpenAI translation as pure functions: request building, stream decoding, the error
table and rate-limit headers. No network."""

from __future__ import annotations

import base64
import time
from email.utils import formatdate
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.base import (
    SseEvent,
    SseParser,
    estimate_prompt_tokens,
    parse_duration,
    parse_retry_after,
)
from switchyard.adapters.vendors import TRANSLATORS, load_translator
from switchyard.adapters.vendors.openai import OpenAIStreamDecoder, OpenAITranslator
from switchyard.common.catalog import VENDORS, Provider
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2, provider_pb2

KEY = "sk-test-0123456789abcdef"
PROMPT = "secret prompt text"


def translator(**options: Any) -> OpenAITranslator:
    provider = Provider(vendor="openai", base_url="https://api.openai.com/v1", options=options)
    return OpenAITranslator("openai-main", provider, KEY)


def text(value: str) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(text=value)


def user(*parts: common_pb2.ContentPart) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts)


def generate_request(**chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault("messages", [user(text(PROMPT))])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider="openai-main", upstream_model="gpt-4o-mini"
    )


def body_of(**chat: Any) -> dict[str, Any]:
    built = translator().build_request(generate_request(**chat))
    assert built.body is not None
    return dict(built.body)


def refused(field: str, **chat: Any) -> SwitchyardError:
    with pytest.raises(SwitchyardError) as caught:
        translator().build_request(generate_request(**chat))
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == Reason.INVALID_REQUEST
    assert error.metadata["field"] == field
    return error


# --------------------------------------------------------------------------- #
# request
# --------------------------------------------------------------------------- #


def test_translator_table_has_openai() -> None:
    assert load_translator("openai") is OpenAITranslator
    with pytest.raises(ValueError, match="no adapter for vendor 'nope'"):
        load_translator("nope")
    assert set(TRANSLATORS) == set(VENDORS)


def test_minimal_request() -> None:
    built = translator().build_request(generate_request())
    assert (built.method, built.path) == ("POST", "/chat/completions")
    assert built.headers["Authorization"] == f"Bearer {KEY}"
    assert built.headers["Accept"] == "text/event-stream"
    assert built.body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_key_and_prompt_stay_out_of_reprs() -> None:
    t = translator()
    built = t.build_request(generate_request())
    assert KEY not in repr(built) and PROMPT not in repr(built)
    assert KEY not in repr(t)


def test_no_key_no_authorization_header() -> None:
    provider = Provider(vendor="openai", base_url="http://127.0.0.1:1/v1")
    built = OpenAITranslator("local", provider, None).build_request(generate_request())
    assert "Authorization" not in built.headers


def test_roles_and_conversation_with_tool_round_trip() -> None:
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("be brief")]),
        common_pb2.Message(role=common_pb2.ROLE_USER, parts=[text("weather?")], name="ada"),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            tool_calls=[
                common_pb2.ToolCall(id="call_1", name="get_weather", arguments_json='{"city":"Oslo"}')
            ],
        ),
        common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id="call_1", parts=[text('{"temp":3}')]),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=[text("3 degrees")]),
    ]
    assert body_of(messages=messages)["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?", "name": "ada"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp":3}'},
        {"role": "assistant", "content": "3 degrees"},
    ]


def test_developer_role_option() -> None:
    built = translator(system_role="developer").build_request(
        generate_request(messages=[common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("rules")])])
    )
    assert built.body is not None
    assert built.body["messages"] == [{"role": "developer", "content": "rules"}]
    with pytest.raises(ValueError, match="system_role"):
        translator(system_role="boss")


def test_several_text_parts_become_text_parts() -> None:
    messages = [common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("a"), text("b")])]
    assert body_of(messages=messages)["messages"][0]["content"] == [
        {"type": "text", "text": "a"},
        {"type": "text", "text": "b"},
    ]


def test_images_by_url_and_inline_bytes() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    message = user(
        text("what is this?"),
        common_pb2.ContentPart(
            image=common_pb2.ImagePart(url="https://x.test/a.jpg", detail=common_pb2.IMAGE_DETAIL_HIGH)
        ),
        common_pb2.ContentPart(image=common_pb2.ImagePart(data=png, mime_type="image/png")),
    )
    content = body_of(messages=[message])["messages"][0]["content"]
    assert content == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg", "detail": "high"}},
        {
            "type": "image_url",
            "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()},
        },
    ]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (
            user(common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"x"))),
            "messages[0].parts[0].image.mime_type",
        ),
        (user(common_pb2.ContentPart(image=common_pb2.ImagePart())), "messages[0].parts[0].image.url"),
        (
            user(
                common_pb2.ContentPart(
                    image=common_pb2.ImagePart(url="https://x", data=b"x", mime_type="image/png")
                )
            ),
            "messages[0].parts[0].image.data",
        ),
        (
            common_pb2.Message(
                role=common_pb2.ROLE_SYSTEM,
                parts=[common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://x"))],
            ),
            "messages[0].parts[0].image",
        ),
        (common_pb2.Message(parts=[text("x")]), "messages[0].role"),
        (common_pb2.Message(role=common_pb2.ROLE_TOOL, parts=[text("x")]), "messages[0].tool_call_id"),
        (
            common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id="c", name="n", parts=[text("x")]),
            "messages[0].name",
        ),
        (
            common_pb2.Message(role=common_pb2.ROLE_USER, tool_calls=[common_pb2.ToolCall(id="c", name="f")]),
            "messages[0].tool_calls",
        ),
        (common_pb2.Message(role=common_pb2.ROLE_USER, tool_call_id="c"), "messages[0].tool_call_id"),
        (
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(name="f")]),
            "messages[0].tool_calls[0].id",
        ),
    ],
)
def test_messages_the_vendor_cannot_take_are_refused(message: common_pb2.Message, field: str) -> None:
    refused(field, messages=[message])


def test_no_messages_and_no_model_are_refused() -> None:
    refused("messages", messages=[])
    with pytest.raises(SwitchyardError) as caught:
        translator().build_request(provider_pb2.GenerateRequest(request=generate_request().request))
    assert caught.value.metadata["field"] == "upstream_model"


SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
WEATHER = common_pb2.Tool(
    name="get_weather", description="Weather now", parameters_json_schema=SCHEMA, strict=True
)


def test_tools_and_tool_choice_modes() -> None:
    body = body_of(tools=[WEATHER, common_pb2.Tool(name="noop")])
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather now",
                "parameters": orjson.loads(SCHEMA),
                "strict": True,
            },
        },
        {"type": "function", "function": {"name": "noop"}},
    ]
    assert "tool_choice" not in body
    for mode, expected in (
        (common_pb2.TOOL_CHOICE_MODE_AUTO, "auto"),
        (common_pb2.TOOL_CHOICE_MODE_NONE, "none"),
        (common_pb2.TOOL_CHOICE_MODE_REQUIRED, "required"),
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
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="{nope")]
    )
    refused(
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="[1]")]
    )
    refused("tools[0].name", tools=[common_pb2.Tool(description="nameless")])
    refused("tool_choice", tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED))
    refused(
        "tool_choice.tool_name",
        tools=[WEATHER],
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="other"),
    )
    refused(
        "tool_choice.tool_name",
        tools=[WEATHER],
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL),
    )


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
    assert body_of(response_format=unnamed)["response_format"]["json_schema"]["name"] == "response"
    refused(
        "response_format.json_schema", response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
    )
    refused(
        "response_format.schema_name",
        response_format=fmt(
            type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="bad name", json_schema=SCHEMA
        ),
    )


def test_sampling_and_end_user() -> None:
    body = body_of(
        sampling=common_pb2.SamplingParams(
            temperature=0.0,
            top_p=0.9,
            max_output_tokens=256,
            stop_sequences=["END", "STOP"],
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
        ),
        metadata=common_pb2.RequestMetadata(end_user="user-123", tags={"team": "a"}),
    )
    assert {k: body[k] for k in body if k not in ("model", "messages")} == {
        "temperature": 0.0,
        "top_p": 0.9,
        "max_completion_tokens": 256,
        "stop": ["END", "STOP"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "user": "user-123",
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    assert "max_tokens" not in body
    refused(
        "sampling.stop_sequences",
        sampling=common_pb2.SamplingParams(stop_sequences=["a", "b", "c", "d", "e"]),
    )


# --------------------------------------------------------------------------- #
# stream decoding
# --------------------------------------------------------------------------- #


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}],
        "usage": None,
    }
    body.update(extra)
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = {
    "prompt_tokens": 20,
    "completion_tokens": 9,
    "total_tokens": 29,
    "prompt_tokens_details": {"cached_tokens": 8},
    "completion_tokens_details": {"reasoning_tokens": 4},
}
USAGE_CHUNK = b"data: " + orjson.dumps({"id": "chatcmpl-1", "choices": [], "usage": USAGE}) + b"\n\n"


def decode(
    stream: bytes, request: provider_pb2.GenerateRequest | None = None
) -> tuple[list[Any], OpenAIStreamDecoder]:
    decoder = translator().new_decoder(request or generate_request())
    parser = SseParser()
    out: list[Any] = []
    for event in parser.feed(stream):
        out.extend(decoder.on_event(event))
    return out, decoder


def test_text_stream() -> None:
    stream = (
        chunk({"role": "assistant", "content": "", "refusal": None})
        + chunk({"content": "Hel"})
        + chunk({"content": "lo"})
        + chunk({}, "stop")
        + USAGE_CHUNK
        + b"data: [DONE]\n\n"
    )
    events, decoder = decode(stream)
    assert [e.delta.text for e in events] == ["Hel", "lo"]
    assert decoder.finished
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_STOP
    assert outcome.usage == common_pb2.Usage(
        input_tokens=20, output_tokens=9, cached_input_tokens=8, reasoning_tokens=4
    )
    assert (outcome.vendor_request_id, outcome.vendor_model) == ("chatcmpl-1", "gpt-4o-mini-2024-07-18")


def test_tool_call_fragments_reassemble() -> None:
    stream = (
        chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_9",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            }
        )
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]})
        + chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]})
        + chunk({}, "tool_calls")
        + b"data: [DONE]\n\n"
    )
    events, decoder = decode(stream)
    calls = [call for e in events for call in e.delta.tool_calls]
    assert calls[0].id == "call_9" and calls[0].name == "get_weather"
    assert all(call.index == 0 for call in calls)
    assert orjson.loads("".join(call.arguments_fragment for call in calls)) == {"city": "Oslo"}
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


def test_reasoning_and_refusal() -> None:
    events, _ = decode(
        chunk({"reasoning_content": "thinking"}) + chunk({"refusal": "I can't help with that."})
    )
    assert events[0].delta.reasoning_text == "thinking"
    assert events[1].delta.text == "I can't help with that."


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("stop", common_pb2.FINISH_REASON_STOP),
        ("length", common_pb2.FINISH_REASON_LENGTH),
        ("tool_calls", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("function_call", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("content_filter", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("something_new", common_pb2.FINISH_REASON_UNSPECIFIED),
    ],
)
def test_finish_reasons(finish: str, expected: int) -> None:
    _, decoder = decode(chunk({}, finish) + b"data: [DONE]\n\n")
    assert decoder.outcome().finish_reason == expected


def test_missing_usage_is_estimated_from_characters() -> None:
    request = generate_request(messages=[user(text("x" * 40))])
    _, decoder = decode(chunk({"content": "y" * 10}) + chunk({}, "stop") + b"data: [DONE]\n\n", request)
    usage = decoder.outcome().usage
    assert usage.estimated
    assert (usage.input_tokens, usage.output_tokens) == (10, 3)
    assert estimate_prompt_tokens(
        common_pb2.ChatRequest(
            messages=[user(text("abcd"), common_pb2.ContentPart(image=common_pb2.ImagePart(url="u")))]
        )
    ) == (1 + 85)


def test_malformed_event_is_a_protocol_error_without_its_content() -> None:
    decoder = translator().new_decoder(generate_request())
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(b'{"choices":[{"delta":{"content":"' + PROMPT.encode()))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)
    with pytest.raises(SwitchyardError):
        decoder.on_event(SseEvent(b'{"choices":[{"index":0,"delta":{"content":5}}]}'))
    with pytest.raises(SwitchyardError):
        decoder.on_event(SseEvent(b"[1,2]"))


def test_in_stream_error_maps_like_http() -> None:
    decoder = translator().new_decoder(generate_request())
    error_event = {
        "error": {"message": f"bad: {PROMPT}", "type": "server_error", "param": None, "code": None}
    }
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(error_event)))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["in_stream"] == "true"
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)
    rate = {"error": {"message": "slow down", "type": "tokens", "code": "rate_limit_exceeded"}}
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(rate)))
    assert caught.value.reason == Reason.RATE_LIMITED


def test_events_after_done_are_ignored_and_eof_rules() -> None:
    _, decoder = decode(b"data: [DONE]\n\n" + chunk({"content": "late"}))
    assert decoder.finished
    _, cut = decode(chunk({"content": "partial"}))
    with pytest.raises(SwitchyardError) as caught:
        cut.on_eof()
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE
    _, no_marker = decode(chunk({"content": "ok"}) + chunk({}, "stop"))
    no_marker.on_eof()  # a finish reason makes a marker-less end complete


def test_non_streamed_body() -> None:
    completion = {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": USAGE,
    }
    decoder = translator().new_decoder(generate_request())
    events = decoder.on_body(orjson.dumps(completion))
    assert decoder.finished
    assert events[0].delta.tool_calls[0].name == "f"
    assert decoder.outcome().usage.cached_input_tokens == 8


# --------------------------------------------------------------------------- #
# errors and headers
# --------------------------------------------------------------------------- #


def error_body(code: str | None, kind: str = "invalid_request_error") -> bytes:
    return orjson.dumps(
        {"error": {"message": f"echo: {PROMPT}", "type": kind, "param": "messages", "code": code}}
    )


@pytest.mark.parametrize(
    ("status", "code", "kind", "grpc_code", "reason"),
    [
        (400, None, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        (
            400,
            "context_length_exceeded",
            "invalid_request_error",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        (
            400,
            "content_policy_violation",
            "invalid_request_error",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTENT_FILTERED,
        ),
        (
            400,
            "invalid_prompt",
            "invalid_request_error",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTENT_FILTERED,
        ),
        (
            401,
            "invalid_api_key",
            "invalid_request_error",
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (
            403,
            "unsupported_country_region_territory",
            "request_forbidden",
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (404, "model_not_found", "invalid_request_error", grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
        (408, None, "timeout", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
        (422, None, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        (429, "rate_limit_exceeded", "requests", grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        (
            429,
            "insufficient_quota",
            "insufficient_quota",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
        ),
        (500, None, "server_error", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        (502, None, "server_error", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        (
            503,
            "server_is_overloaded",
            "service_unavailable_error",
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_OVERLOADED,
        ),
        (529, None, "overloaded_error", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        (504, None, "server_error", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
    ],
)
def test_error_table(
    status: int, code: str | None, kind: str, grpc_code: grpc.StatusCode, reason: Reason
) -> None:
    error = translator().map_error(status, httpx.Headers({"x-request-id": "req_1"}), error_body(code, kind))
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["provider"] == "openai-main"
    assert error.metadata["vendor"] == "openai"
    assert error.metadata["http_status"] == str(status)
    assert error.metadata["vendor_code"] == (code or kind)
    assert error.metadata["vendor_request_id"] == "req_1"
    for leak in (PROMPT, KEY, "echo"):
        assert leak not in error.message
        assert all(leak not in value for value in error.metadata.values())


def test_unparsable_error_body_still_maps_by_status() -> None:
    error = translator().map_error(502, httpx.Headers(), b"<html>Bad gateway</html>")
    assert error.reason == Reason.PROVIDER_UNAVAILABLE and "vendor_code" not in error.metadata


def test_rate_limit_retry_after_sources() -> None:
    t = translator()
    body = error_body("rate_limit_exceeded", "requests")
    assert t.map_error(429, httpx.Headers({"retry-after": "7"}), body).retry_after_s == 7.0
    assert (
        t.map_error(429, httpx.Headers({"retry-after-ms": "1500", "retry-after": "2"}), body).retry_after_s
        == 1.5
    )
    future = formatdate(time.time() + 30, usegmt=True)
    from_date = t.map_error(429, httpx.Headers({"retry-after": future}), body).retry_after_s
    assert from_date is not None and 28 <= from_date <= 30
    exhausted = httpx.Headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s"})
    assert t.map_error(429, exhausted, body).retry_after_s == 360.0
    assert t.map_error(429, httpx.Headers(), body).retry_after_s == 1.0
    quota = t.map_error(
        429, httpx.Headers({"retry-after": "7"}), error_body("insufficient_quota", "insufficient_quota")
    )
    assert quota.retry_after_s is None and quota.metadata["quota"] == "exhausted"
    assert t.map_error(503, httpx.Headers({"retry-after": "3"}), b"").retry_after_s == 3.0
    assert t.map_error(400, httpx.Headers({"retry-after": "3"}), b"").retry_after_s is None


def test_error_carries_remaining_headroom() -> None:
    headers = httpx.Headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "1234"})
    error = translator().map_error(429, headers, error_body("rate_limit_exceeded", "tokens"))
    assert error.metadata["remaining_requests"] == "0"
    assert error.metadata["remaining_tokens"] == "1234"


def test_headroom_from_headers() -> None:
    headers = httpx.Headers(
        {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-limit-tokens": "30000000",
            "x-ratelimit-remaining-tokens": "29999980",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-reset-tokens": "1h2m3.5s",
        }
    )
    before = time.time()
    headroom = translator().headroom(headers)
    assert headroom is not None
    assert (headroom.limit_requests, headroom.remaining_requests) == (10000, 9999)
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (30000000, 29999980)
    observed = headroom.observed_at.seconds + headroom.observed_at.nanos / 1e9
    assert before - 1 <= observed <= time.time() + 1
    tokens_reset = headroom.tokens_reset_at.seconds + headroom.tokens_reset_at.nanos / 1e9
    assert tokens_reset - observed == pytest.approx(3723.5, abs=0.01)
    assert not headroom.retry_after_ms
    assert translator().headroom(httpx.Headers({"content-type": "text/event-stream"})) is None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("120ms", 0.12),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("1.5", 1.5),
        ("250us", 0.00025),
        ("", None),
        ("soon", None),
        ("1x", None),
        ("-1", None),
        ("s1", None),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    parsed = parse_duration(text)
    if seconds is None:
        assert parsed is None
    else:
        assert parsed == pytest.approx(seconds)


def test_parse_retry_after_rejects_garbage() -> None:
    assert parse_retry_after(httpx.Headers({"retry-after": "whenever"})) is None
    assert parse_retry_after(httpx.Headers({"retry-after": "-3"})) is None
    assert parse_retry_after(httpx.Headers({"retry-after-ms": "x", "retry-after": "2"})) == 2.0


# --- embeddings ---------------------------------------------------------------------------------


def test_embeddings_are_asked_for_as_floats_with_the_size_only_when_given() -> None:
    request = provider_pb2.EmbedRequest(
        provider="openai-main", upstream_model="text-embedding-3-small", inputs=["a", "b"]
    )
    built = translator().embeddings_request(request)
    assert (built.method, built.path) == ("POST", "/embeddings")
    assert built.body == {"model": "text-embedding-3-small", "input": ["a", "b"], "encoding_format": "float"}
    assert built.headers["Authorization"] == f"Bearer {KEY}" and built.headers["Accept"] == "application/json"
    request.dimensions = 256
    assert translator().embeddings_request(request).body["dimensions"] == 256  # type: ignore[index]


def test_embeddings_come_back_in_input_order_with_their_usage() -> None:
    body = (
        b'{"object":"list","data":[{"object":"embedding","index":1,"embedding":[0.5,-1]},'
        b'{"object":"embedding","index":0,"embedding":[1,2.5]}],"model":"m",'
        b'"usage":{"prompt_tokens":4,"total_tokens":4}}'
    )
    parsed = translator().parse_embeddings(body, 2)
    assert [list(e.values) for e in parsed.embeddings] == [[1.0, 2.5], [0.5, -1.0]]
    assert parsed.usage.input_tokens == 4


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"data":[{"index":0,"embedding":[1]}]}',
        b'{"data":[{"index":0,"embedding":[1]},{"index":0,"embedding":[2]}]}',
        b'{"data":[{"index":0,"embedding":"AAAA"},{"index":1,"embedding":[1]}]}',
        b'{"object":"list"}',
    ],
    ids=["not json", "too few", "index twice", "base64 not asked for", "no data"],
)
def test_embeddings_that_do_not_match_the_inputs_are_a_protocol_error(body: bytes) -> None:
    with pytest.raises(SwitchyardError) as caught:
        translator().parse_embeddings(body, 2)
    assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR
    assert b"AAAA" not in caught.value.message.encode()
