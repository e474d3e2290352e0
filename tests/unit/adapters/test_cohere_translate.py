"""Cohere translation as pure functions: request building, stream decoding, the error
table and rate-limit headers. No network."""

from __future__ import annotations

import base64
import time
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.base import SseParser
from switchyard.adapters.vendors import load_translator
from switchyard.adapters.vendors.cohere import CohereStreamDecoder, CohereTranslator, message_code
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2, provider_pb2

KEY = "co-test-0123456789abcdef"
PROMPT = "secret prompt text"
MODEL = "command-a-03-2025"


def translator(**options: Any) -> CohereTranslator:
    provider = Provider(vendor="cohere", base_url="https://api.cohere.com", options=options)
    return CohereTranslator("cohere-main", provider, KEY)


def text(value: str) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(text=value)


def user(*parts: common_pb2.ContentPart) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts)


def generate_request(**chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault("messages", [user(text(PROMPT))])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider="cohere-main", upstream_model=MODEL
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
    assert PROMPT not in error.message
    return error


# --------------------------------------------------------------------------- #
# request
# --------------------------------------------------------------------------- #


def test_translator_table_has_cohere() -> None:
    assert load_translator("cohere") is CohereTranslator


def test_minimal_request() -> None:
    built = translator().build_request(generate_request())
    assert (built.method, built.path) == ("POST", "/v2/chat")
    assert built.headers["Authorization"] == f"Bearer {KEY}"
    assert built.headers["Accept"] == "text/event-stream"
    assert built.body == {"model": MODEL, "messages": [{"role": "user", "content": PROMPT}], "stream": True}


def test_key_and_prompt_stay_out_of_reprs() -> None:
    t = translator()
    built = t.build_request(generate_request())
    assert KEY not in repr(built) and PROMPT not in repr(built)
    assert KEY not in repr(t)


def test_no_key_no_authorization_header() -> None:
    provider = Provider(vendor="cohere", base_url="http://127.0.0.1:1")
    built = CohereTranslator("local", provider, None).build_request(generate_request())
    assert "Authorization" not in built.headers


def test_models_request_for_the_probe() -> None:
    built = translator().models_request()
    assert (built.method, built.path, built.body) == ("GET", "/v1/models", None)
    assert built.headers["Authorization"] == f"Bearer {KEY}"
    assert "Content-Type" not in built.headers


def test_roles_and_conversation_with_tool_round_trip() -> None:
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("be brief")]),
        user(text("weather?")),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            parts=[text("I will look it up.")],
            tool_calls=[
                common_pb2.ToolCall(id="get_weather_1", name="get_weather", arguments_json='{"city":"Oslo"}'),
                common_pb2.ToolCall(id="get_time_2", name="get_time"),
            ],
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL, tool_call_id="get_weather_1", parts=[text('{"temp":3}')]
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL, tool_call_id="get_time_2", parts=[text("12:00"), text("CET")]
        ),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=[text("3 degrees")]),
    ]
    assert body_of(messages=messages)["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "tool_plan": "I will look it up.",
            "tool_calls": [
                {
                    "id": "get_weather_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                },
                {"id": "get_time_2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "get_weather_1", "content": '{"temp":3}'},
        {
            "role": "tool",
            "tool_call_id": "get_time_2",
            "content": [{"type": "text", "text": "12:00"}, {"type": "text", "text": "CET"}],
        },
        {"role": "assistant", "content": "3 degrees"},
    ]


def test_tool_calls_without_text_carry_no_tool_plan() -> None:
    message = common_pb2.Message(
        role=common_pb2.ROLE_ASSISTANT,
        tool_calls=[common_pb2.ToolCall(id="c1", name="f", arguments_json="{}")],
    )
    sent = body_of(messages=[user(text("x")), message])["messages"][1]
    assert "tool_plan" not in sent and "content" not in sent


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
            image=common_pb2.ImagePart(url="https://x.test/a.jpg", detail=common_pb2.IMAGE_DETAIL_LOW)
        ),
        common_pb2.ContentPart(image=common_pb2.ImagePart(data=png, mime_type="image/png")),
    )
    assert body_of(messages=[message])["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg", "detail": "low"}},
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
        (
            common_pb2.Message(
                role=common_pb2.ROLE_TOOL,
                tool_call_id="c",
                parts=[common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://x"))],
            ),
            "messages[0].parts[0].image",
        ),
        (common_pb2.Message(parts=[text("x")]), "messages[0].role"),
        (common_pb2.Message(role=common_pb2.ROLE_USER, name="ada", parts=[text("x")]), "messages[0].name"),
        (common_pb2.Message(role=common_pb2.ROLE_TOOL, parts=[text("x")]), "messages[0].tool_call_id"),
        (
            common_pb2.Message(role=common_pb2.ROLE_USER, tool_calls=[common_pb2.ToolCall(id="c", name="f")]),
            "messages[0].tool_calls",
        ),
        (common_pb2.Message(role=common_pb2.ROLE_USER, tool_call_id="c"), "messages[0].tool_call_id"),
        (
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(name="f")]),
            "messages[0].tool_calls[0].id",
        ),
        (
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(id="c")]),
            "messages[0].tool_calls[0].name",
        ),
        (common_pb2.Message(role=common_pb2.ROLE_ASSISTANT), "messages[0].parts"),
    ],
)
def test_messages_the_vendor_cannot_take_are_refused(message: common_pb2.Message, field: str) -> None:
    refused(field, messages=[message])


def test_no_messages_and_no_model_are_refused() -> None:
    refused("messages", messages=[])
    with pytest.raises(SwitchyardError) as caught:
        translator().build_request(provider_pb2.GenerateRequest(request=generate_request().request))
    assert caught.value.metadata["field"] == "upstream_model"


def test_end_user_is_refused_not_dropped() -> None:
    refused("metadata.end_user", metadata=common_pb2.RequestMetadata(end_user="user-123"))
    # Tags and conversation ids are Switchyard's own and never go to a vendor.
    body = body_of(metadata=common_pb2.RequestMetadata(conversation_id="c1", tags={"team": "a"}))
    assert set(body) == {"model", "messages", "stream"}


SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
WEATHER = common_pb2.Tool(name="get_weather", description="Weather now", parameters_json_schema=SCHEMA)
NOOP = common_pb2.Tool(name="noop")


def test_tools_and_tool_choice_modes() -> None:
    body = body_of(tools=[WEATHER, NOOP])
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather now",
                "parameters": orjson.loads(SCHEMA),
            },
        },
        {
            "type": "function",
            "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}},
        },
    ]
    assert "tool_choice" not in body and "strict_tools" not in body
    auto = body_of(tools=[WEATHER], tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_AUTO))
    assert "tool_choice" not in auto and len(auto["tools"]) == 1
    for mode, expected in (
        (common_pb2.TOOL_CHOICE_MODE_NONE, "NONE"),
        (common_pb2.TOOL_CHOICE_MODE_REQUIRED, "REQUIRED"),
    ):
        sent = body_of(tools=[WEATHER, NOOP], tool_choice=common_pb2.ToolChoice(mode=mode))
        assert (sent["tool_choice"], len(sent["tools"])) == (expected, 2)


def test_a_named_tool_is_required_with_only_that_tool_offered() -> None:
    named = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="noop")
    body = body_of(tools=[WEATHER, NOOP], tool_choice=named)
    assert body["tool_choice"] == "REQUIRED"
    assert [tool["function"]["name"] for tool in body["tools"]] == ["noop"]


def test_strict_tools_is_per_request() -> None:
    strict = common_pb2.Tool(name="get_weather", parameters_json_schema=SCHEMA, strict=True)
    body = body_of(tools=[strict, NOOP])
    assert body["strict_tools"] is True
    assert all("strict" not in tool["function"] for tool in body["tools"])


def test_bad_tools_and_choices_are_refused() -> None:
    refused(
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="{nope")]
    )
    refused(
        "tools[1].parameters_json_schema",
        tools=[NOOP, common_pb2.Tool(name="f", parameters_json_schema="[1]")],
    )
    refused("tools[0].name", tools=[common_pb2.Tool(description="nameless")])
    refused("tool_choice", tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED))
    refused("tool_choice.mode", tools=[WEATHER], tool_choice=common_pb2.ToolChoice(tool_name="get_weather"))
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
    assert "response_format" not in body_of(response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_TEXT))
    assert "response_format" not in body_of(response_format=fmt())
    schema = fmt(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="city", json_schema=SCHEMA, strict=True
    )
    assert body_of(response_format=schema)["response_format"] == {
        "type": "json_object",
        "json_schema": orjson.loads(SCHEMA),
    }
    refused(
        "response_format.json_schema", response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
    )
    refused(
        "response_format.json_schema",
        response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[]"),
    )
    # Documented: response_format cannot be combined with tools.
    refused(
        "response_format",
        tools=[WEATHER],
        response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
    )
    assert "response_format" not in body_of(
        tools=[WEATHER], response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_TEXT)
    )


def test_sampling() -> None:
    body = body_of(
        sampling=common_pb2.SamplingParams(
            temperature=0.0,
            top_p=0.9,
            max_output_tokens=256,
            stop_sequences=["END", "STOP"],
            seed=42,
            presence_penalty=0.5,
            frequency_penalty=0.25,
        )
    )
    assert {k: body[k] for k in body if k not in ("model", "messages")} == {
        "temperature": 0.0,
        "p": 0.9,
        "max_tokens": 256,
        "stop_sequences": ["END", "STOP"],
        "seed": 42,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "stream": True,
    }
    assert body_of(sampling=common_pb2.SamplingParams(stop_sequences=list("abcde")))[
        "stop_sequences"
    ] == list("abcde")
    refused("sampling.stop_sequences", sampling=common_pb2.SamplingParams(stop_sequences=list("abcdef")))


def test_safety_mode_option() -> None:
    built = translator(safety_mode="STRICT").build_request(generate_request())
    assert built.body is not None and built.body["safety_mode"] == "STRICT"
    with pytest.raises(ValueError, match="safety_mode"):
        translator(safety_mode="lenient")


# --------------------------------------------------------------------------- #
# stream decoding
# --------------------------------------------------------------------------- #


def ev(kind: str, **fields: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **fields}) + b"\n\n"


def message_start(message_id: str = "msg-1") -> bytes:
    return ev(
        "message-start",
        id=message_id,
        delta={
            "message": {
                "role": "assistant",
                "content": [],
                "tool_plan": "",
                "tool_calls": [],
                "citations": [],
            }
        },
    )


def content_start(index: int = 0, kind: str = "text") -> bytes:
    return ev("content-start", index=index, delta={"message": {"content": {"type": kind, kind: ""}}})


def content_delta(piece: str, index: int = 0, kind: str = "text") -> bytes:
    return ev("content-delta", index=index, delta={"message": {"content": {kind: piece}}})


USAGE = {
    "billed_units": {"input_tokens": 12, "output_tokens": 9},
    "tokens": {"input_tokens": 30, "output_tokens": 9},
    "cached_tokens": 8,
}


def message_end(finish: str = "COMPLETE", usage: object = USAGE, **delta: Any) -> bytes:
    body: dict[str, Any] = {"finish_reason": finish, **delta}
    if usage is not None:
        body["usage"] = usage
    return ev("message-end", delta=body)


def decode(
    stream: bytes, request: provider_pb2.GenerateRequest | None = None
) -> tuple[list[provider_pb2.GenerateResponse], CohereStreamDecoder]:
    decoder = translator().new_decoder(request or generate_request())
    out: list[provider_pb2.GenerateResponse] = []
    for event in SseParser().feed(stream):
        out.extend(decoder.on_event(event))
    return out, decoder


def test_text_stream_uses_tokens_not_billed_units() -> None:
    stream = (
        message_start()
        + content_start()
        + content_delta("Hel")
        + content_delta("lo")
        + ev(
            "citation-start", index=0, delta={"message": {"citations": {"start": 0, "end": 3, "text": "Hel"}}}
        )
        + ev("citation-end", index=0)
        + ev("content-end", index=0)
        + message_end()
    )
    events, decoder = decode(stream)
    assert [e.delta.text for e in events] == ["Hel", "lo"]
    assert all(not e.delta.reasoning_text for e in events)
    assert decoder.finished
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_STOP
    assert outcome.usage == common_pb2.Usage(input_tokens=30, output_tokens=9, cached_input_tokens=8)
    # Cohere does not name the answering model: the model asked for is reported.
    assert (outcome.vendor_request_id, outcome.vendor_model) == ("msg-1", MODEL)


def test_thinking_is_reasoning_not_text() -> None:
    stream = (
        message_start()
        + content_start(0, "thinking")
        + content_delta("Let me think.", 0, "thinking")
        + ev("content-end", index=0)
        + content_start(1)
        + content_delta("Answer.", 1)
        + ev("content-end", index=1)
        + message_end()
    )
    events, _ = decode(stream)
    assert [(e.delta.text, e.delta.reasoning_text) for e in events] == [
        ("", "Let me think."),
        ("Answer.", ""),
    ]


def test_tool_plan_and_tool_calls_renumbered_from_zero() -> None:
    stream = (
        message_start()
        + ev("tool-plan-delta", delta={"message": {"tool_plan": "I will check "}})
        + ev("tool-plan-delta", delta={"message": {"tool_plan": "two things."}})
        + ev(
            "tool-call-start",
            index=1,
            delta={
                "message": {
                    "tool_calls": {
                        "id": "get_weather_a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                }
            },
        )
        + ev(
            "tool-call-delta", index=1, delta={"message": {"tool_calls": {"function": {"arguments": '{"ci'}}}}
        )
        + ev(
            "tool-call-delta",
            index=1,
            delta={"message": {"tool_calls": {"function": {"arguments": 'ty":"Oslo"}'}}}},
        )
        + ev("tool-call-end", index=1)
        + ev(
            "tool-call-start",
            index=2,
            delta={
                "message": {
                    "tool_calls": {
                        "id": "get_time_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": "{}"},
                    }
                }
            },
        )
        + ev("tool-call-end", index=2)
        + message_end("TOOL_CALL")
    )
    events, decoder = decode(stream)
    assert "".join(e.delta.reasoning_text for e in events) == "I will check two things."
    assert all(not e.delta.text for e in events)
    calls = [call for e in events for call in e.delta.tool_calls]
    assert [(c.index, c.id, c.name) for c in calls] == [
        (0, "get_weather_a", "get_weather"),
        (0, "", ""),
        (0, "", ""),
        (1, "get_time_b", "get_time"),
    ]
    first = "".join(c.arguments_fragment for c in calls if c.index == 0)
    assert orjson.loads(first) == {"city": "Oslo"}
    assert calls[-1].arguments_fragment == "{}"
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


def test_tool_arguments_without_a_started_call_are_a_protocol_error() -> None:
    stream = message_start() + ev(
        "tool-call-delta", index=0, delta={"message": {"tool_calls": {"function": {"arguments": "{}"}}}}
    )
    with pytest.raises(SwitchyardError) as caught:
        decode(stream)
    assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("COMPLETE", common_pb2.FINISH_REASON_STOP),
        ("STOP_SEQUENCE", common_pb2.FINISH_REASON_STOP),
        ("MAX_TOKENS", common_pb2.FINISH_REASON_LENGTH),
        ("TOOL_CALL", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("SOMETHING_NEW", common_pb2.FINISH_REASON_UNSPECIFIED),
    ],
)
def test_finish_reasons(finish: str, expected: int) -> None:
    _, decoder = decode(message_start() + message_end(finish))
    assert decoder.outcome().finish_reason == expected


@pytest.mark.parametrize(
    ("finish", "grpc_code", "reason"),
    [
        ("ERROR", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        ("TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
    ],
)
def test_failed_generation_in_stream_is_an_error_without_its_text(
    finish: str, grpc_code: grpc.StatusCode, reason: Reason
) -> None:
    stream = (
        message_start()
        + content_start()
        + content_delta("partial")
        + message_end(finish, usage=None, error=f"failed on: {PROMPT}")
    )
    decoder = translator().new_decoder(generate_request())
    events = SseParser().feed(stream)
    for event in events[:-1]:
        decoder.on_event(event)
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(events[-1])
    error = caught.value
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["in_stream"] == "true"
    assert error.metadata["vendor_code"] == finish
    assert error.metadata["vendor"] == "cohere"
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)


def test_an_error_with_another_finish_reason_still_fails() -> None:
    with pytest.raises(SwitchyardError) as caught:
        decode(message_start() + message_end("COMPLETE", error="generation failed"))
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE
    assert caught.value.metadata["vendor_code"] == "ERROR"
    _, decoder = decode(message_start() + message_end("COMPLETE", error=None))
    assert decoder.finished


def test_usage_fallbacks() -> None:
    billed_only = {"billed_units": {"input_tokens": 12.0, "output_tokens": 9.0}}
    _, decoder = decode(message_start() + message_end(usage=billed_only))
    assert decoder.outcome().usage == common_pb2.Usage(input_tokens=12, output_tokens=9)
    request = generate_request(messages=[user(text("x" * 40))])
    _, bare = decode(message_start() + content_delta("y" * 10) + message_end(usage=None), request)
    usage = bare.outcome().usage
    assert usage.estimated and (usage.input_tokens, usage.output_tokens) == (10, 3)
    with pytest.raises(SwitchyardError):
        decode(message_start() + message_end(usage={"tokens": {"input_tokens": "many"}}))
    with pytest.raises(SwitchyardError):
        decode(message_start() + message_end(usage={"tokens": {"input_tokens": 1.5}}))


def test_malformed_events_are_protocol_errors_without_their_content() -> None:
    decoder = translator().new_decoder(generate_request())
    parser = SseParser()
    (event,) = parser.feed(
        b'event: content-delta\ndata: {"type":"content-delta","delta":{"message":{"content":{"text":"'
        + PROMPT.encode()
        + b"\n\n"
    )
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(event)
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert "not valid JSON" in error.message
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)
    for bad in (
        content_delta("ok").replace(b'"ok"', b"5"),
        ev("content-delta", delta="nope"),
        b"data: [1,2]\n\n",
        b'data: {"type": 7}\n\n',
        ev("tool-call-start", index=-1, delta={"message": {"tool_calls": {"id": "x"}}}),
    ):
        with pytest.raises(SwitchyardError) as caught:
            decode(message_start() + bad)
        assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR


def test_event_name_is_used_when_type_is_missing_and_unknown_types_are_skipped() -> None:
    untyped = b'event: content-delta\ndata: {"delta":{"message":{"content":{"text":"hi"}}}}\n\n'
    events, _ = decode(message_start() + untyped + ev("debug", prompt="internal") + ev("brand-new", x=1))
    assert [e.delta.text for e in events] == ["hi"]


def test_end_marker_and_eof_rules() -> None:
    _, decoder = decode(message_start() + message_end() + content_delta("late") + b"data: [DONE]\n\n")
    assert decoder.finished
    decoder.on_eof()
    _, cut = decode(message_start() + content_delta("partial") + b"data: [DONE]\n\n")
    assert not cut.finished
    with pytest.raises(SwitchyardError) as caught:
        cut.on_eof()
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE


def test_non_streamed_body() -> None:
    response = {
        "id": "msg-2",
        "finish_reason": "TOOL_CALL",
        "message": {
            "role": "assistant",
            "tool_plan": "I will call f.",
            "tool_calls": [{"id": "f_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
        },
        "usage": USAGE,
    }
    decoder = translator().new_decoder(generate_request())
    (event,) = decoder.on_body(orjson.dumps(response))
    assert decoder.finished
    assert (event.delta.text, event.delta.reasoning_text) == ("", "I will call f.")
    assert [(c.index, c.id, c.name, c.arguments_fragment) for c in event.delta.tool_calls] == [
        (0, "f_1", "f", "{}")
    ]
    outcome = decoder.outcome()
    assert (outcome.finish_reason, outcome.vendor_request_id) == (
        common_pb2.FINISH_REASON_TOOL_CALLS,
        "msg-2",
    )
    assert outcome.usage.cached_input_tokens == 8
    text_answer = {
        "id": "msg-3",
        "finish_reason": "COMPLETE",
        "message": {
            "role": "assistant",
            "content": [{"type": "thinking", "thinking": "hm"}, {"type": "text", "text": "Hi."}],
        },
    }
    decoder = translator().new_decoder(generate_request())
    (event,) = decoder.on_body(orjson.dumps(text_answer))
    assert (event.delta.text, event.delta.reasoning_text) == ("Hi.", "hm")
    assert decoder.outcome().usage.estimated
    failed = {"id": "m", "finish_reason": "ERROR", "message": {"role": "assistant"}}
    with pytest.raises(SwitchyardError) as caught:
        translator().new_decoder(generate_request()).on_body(orjson.dumps(failed))
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE
    with pytest.raises(SwitchyardError) as caught:
        translator().new_decoder(generate_request()).on_body(b"<html>")
    assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------- #
# errors and headers
# --------------------------------------------------------------------------- #


def error_body(message: str) -> bytes:
    return orjson.dumps({"id": "0f1e2d3c-aaaa-bbbb-cccc-000000000001", "message": message})


@pytest.mark.parametrize(
    ("status", "message", "grpc_code", "reason", "code"),
    [
        (
            400,
            f"invalid request: bad turn {PROMPT}",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "invalid_request",
        ),
        (
            400,
            f"too many tokens: the prompt cannot exceed 4081 - received 4292 {PROMPT}",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            "too_many_tokens",
        ),
        (
            401,
            "invalid api token",
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
            "invalid_api_token",
        ),
        (402, "Please add a payment method", grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, ""),
        (403, "forbidden", grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED, ""),
        (404, f"model '{PROMPT}' not found", grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND, ""),
        (
            422,
            "unknown field: parameter 'strict' is not a valid field",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            "unknown_field",
        ),
        (
            429,
            "You are past the per minute request limit",
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            Reason.RATE_LIMITED,
            "",
        ),
        (498, "invalid token", grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED, ""),
        (499, "request cancelled", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, ""),
        (500, "internal server error", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, ""),
        (501, "not implemented", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, ""),
        (502, "bad gateway", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, ""),
        (503, "service unavailable", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED, ""),
        (504, "gateway timeout", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT, ""),
        (408, "request timeout", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT, ""),
    ],
)
def test_error_table(
    status: int, message: str, grpc_code: grpc.StatusCode, reason: Reason, code: str
) -> None:
    headers = httpx.Headers({"x-debug-trace-id": "6e0f777a5f86c8b5453bf374fd3fadbd"})
    error = translator().map_error(status, headers, error_body(message))
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["provider"] == "cohere-main"
    assert error.metadata["vendor"] == "cohere"
    assert error.metadata["http_status"] == str(status)
    assert error.metadata.get("vendor_code", "") == code
    assert error.metadata["vendor_request_id"] == "6e0f777a5f86c8b5453bf374fd3fadbd"
    assert error.metadata["vendor_error_id"] == "0f1e2d3c-aaaa-bbbb-cccc-000000000001"
    for leak in (PROMPT, KEY, message):
        assert leak not in error.message
        assert all(leak not in value for value in error.metadata.values())


def test_unparsable_error_body_still_maps_by_status() -> None:
    error = translator().map_error(502, httpx.Headers(), b"<html>Bad gateway</html>")
    assert error.reason == Reason.PROVIDER_UNAVAILABLE
    assert "vendor_code" not in error.metadata and "vendor_request_id" not in error.metadata
    legacy = translator().map_error(400, httpx.Headers(), orjson.dumps({"message": "too many tokens: x"}))
    assert legacy.reason == Reason.CONTEXT_TOO_LONG and "vendor_error_id" not in legacy.metadata


def test_retry_after_and_billing_limit() -> None:
    t = translator()
    body = error_body("You are past the per minute request limit")
    assert t.map_error(429, httpx.Headers({"retry-after": "7"}), body).retry_after_s == 7.0
    assert t.map_error(429, httpx.Headers(), body).retry_after_s == 1.0
    billing = t.map_error(402, httpx.Headers({"retry-after": "7"}), error_body("add a payment method"))
    assert billing.retry_after_s is None and billing.metadata["quota"] == "exhausted"
    assert t.map_error(503, httpx.Headers({"retry-after": "3"}), b"").retry_after_s == 3.0
    assert t.map_error(400, httpx.Headers({"retry-after": "3"}), b"").retry_after_s is None


def test_message_codes_only_from_known_prefixes() -> None:
    assert message_code("  Too Many Tokens: size limit exceeded") == "too_many_tokens"
    assert message_code("no api key supplied") == "no_api_key"
    assert message_code(f"{PROMPT} too many tokens") == ""
    assert message_code(None) == message_code(42) == ""


def test_headroom_from_headers() -> None:
    headers = httpx.Headers(
        {
            "x-trial-endpoint-call-limit": "40",
            "x-trial-endpoint-call-remaining": "39",
            "x-endpoint-monthly-call-limit": "1000",
        }
    )
    before = time.time()
    headroom = translator().headroom(headers)
    assert headroom is not None
    assert (headroom.limit_requests, headroom.remaining_requests) == (40, 39)
    assert not headroom.HasField("limit_tokens") and not headroom.HasField("remaining_tokens")
    assert not headroom.HasField("requests_reset_at")
    observed = headroom.observed_at.seconds + headroom.observed_at.nanos / 1e9
    assert before - 1 <= observed <= time.time() + 1
    assert not headroom.retry_after_ms
    limited = translator().headroom(
        httpx.Headers({"x-trial-endpoint-call-remaining": "0", "retry-after": "2"})
    )
    assert limited is not None and (limited.remaining_requests, limited.retry_after_ms) == (0, 2000)
    error = translator().map_error(429, httpx.Headers({"x-trial-endpoint-call-remaining": "0"}), b"")
    assert error.metadata["remaining_requests"] == "0"
    assert translator().headroom(httpx.Headers({"content-type": "text/event-stream"})) is None


def test_request_id_is_the_debug_trace_id() -> None:
    t = translator()
    assert t.request_id(httpx.Headers({"X-Debug-Trace-Id": "abc123"})) == "abc123"
    assert t.request_id(httpx.Headers({"x-request-id": "req_1"})) == ""
