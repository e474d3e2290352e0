"""Anthropic translation as pure functions: request building, stream decoding, the error
table and rate-limit headers. No network."""

from __future__ import annotations

import base64
import time
from datetime import UTC, datetime
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.base import SseEvent, SseParser
from switchyard.adapters.vendors import load_translator
from switchyard.adapters.vendors.anthropic import AnthropicStreamDecoder, AnthropicTranslator
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2, provider_pb2

KEY = "sk-ant-test-0123456789abcdef"
PROMPT = "secret prompt text"
MODEL = "claude-sonnet-4-6"


def translator(**options: Any) -> AnthropicTranslator:
    provider = Provider(vendor="anthropic", base_url="https://api.anthropic.com", options=options)
    return AnthropicTranslator("anthropic-main", provider, KEY)


def text(value: str) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(text=value)


def user(*parts: common_pb2.ContentPart) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts)


def msg(role: common_pb2.Role.ValueType, *parts: str, **fields: Any) -> common_pb2.Message:
    return common_pb2.Message(role=role, parts=[text(p) for p in parts], **fields)


def generate_request(**chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault("messages", [user(text(PROMPT))])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider="anthropic-main", upstream_model=MODEL
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


def test_translator_table_has_anthropic() -> None:
    assert load_translator("anthropic") is AnthropicTranslator


def test_minimal_request() -> None:
    built = translator().build_request(generate_request())
    assert (built.method, built.path) == ("POST", "/v1/messages")
    assert built.headers["x-api-key"] == KEY
    assert built.headers["anthropic-version"] == "2023-06-01"
    assert built.headers["content-type"] == "application/json"
    assert "Authorization" not in built.headers
    assert built.body == {
        "model": MODEL,
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": True,
    }


def test_default_max_tokens_option() -> None:
    built = translator(default_max_tokens=1024).build_request(generate_request())
    assert built.body is not None and built.body["max_tokens"] == 1024
    for bad in (0, -5, "many", True):
        with pytest.raises(ValueError, match="default_max_tokens"):
            translator(default_max_tokens=bad)


def test_key_and_prompt_stay_out_of_reprs() -> None:
    t = translator()
    built = t.build_request(generate_request())
    assert KEY not in repr(built) and PROMPT not in repr(built)
    assert KEY not in repr(t)


def test_no_key_no_key_header() -> None:
    provider = Provider(vendor="anthropic", base_url="http://127.0.0.1:1")
    built = AnthropicTranslator("local", provider, None).build_request(generate_request())
    assert "x-api-key" not in built.headers


def test_models_request() -> None:
    built = translator().models_request()
    assert (built.method, built.path, built.body) == ("GET", "/v1/models", None)
    assert built.headers["x-api-key"] == KEY and built.headers["anthropic-version"] == "2023-06-01"
    assert "content-type" not in built.headers


def test_system_messages_become_the_top_level_system() -> None:
    one = body_of(messages=[msg(common_pb2.ROLE_SYSTEM, "be brief"), user(text("hi"))])
    assert one["system"] == "be brief"
    assert one["messages"] == [{"role": "user", "content": "hi"}]
    several = body_of(
        messages=[
            msg(common_pb2.ROLE_SYSTEM, "rule one", "rule two"),
            user(text("hi")),
            msg(common_pb2.ROLE_SYSTEM, "rule three"),
        ]
    )
    assert several["system"] == [
        {"type": "text", "text": "rule one"},
        {"type": "text", "text": "rule two"},
        {"type": "text", "text": "rule three"},
    ]
    assert "system" not in body_of()


def test_conversation_with_tool_round_trip() -> None:
    messages = [
        msg(common_pb2.ROLE_USER, "weather in Oslo and Rome?"),
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT,
            parts=[text("Checking.")],
            tool_calls=[
                common_pb2.ToolCall(id="toolu_1", name="get_weather", arguments_json='{"city":"Oslo"}'),
                common_pb2.ToolCall(id="toolu_2", name="get_weather", arguments_json=""),
            ],
        ),
        msg(common_pb2.ROLE_TOOL, '{"temp":3}', tool_call_id="toolu_1"),
        msg(common_pb2.ROLE_TOOL, tool_call_id="toolu_2"),
        msg(common_pb2.ROLE_USER, "and tomorrow?"),
        msg(common_pb2.ROLE_ASSISTANT, "3 degrees"),
    ]
    assert body_of(messages=messages)["messages"] == [
        {"role": "user", "content": "weather in Oslo and Rome?"},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_weather", "input": {}},
            ],
        },
        {
            # Both tool answers and the next user message merge into one user turn.
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": '{"temp":3}'},
                {"type": "tool_result", "tool_use_id": "toolu_2"},
                {"type": "text", "text": "and tomorrow?"},
            ],
        },
        {"role": "assistant", "content": "3 degrees"},
    ]


def test_tool_results_go_first_in_a_merged_user_turn() -> None:
    messages = [
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(id="t1", name="f")]
        ),
        msg(common_pb2.ROLE_USER, "by the way"),
        msg(common_pb2.ROLE_TOOL, "done", tool_call_id="t1"),
    ]
    assert body_of(messages=messages)["messages"][1]["content"] == [
        {"type": "tool_result", "tool_use_id": "t1", "content": "done"},
        {"type": "text", "text": "by the way"},
    ]


def test_consecutive_user_messages_merge() -> None:
    body = body_of(messages=[msg(common_pb2.ROLE_USER, "a"), msg(common_pb2.ROLE_USER, "b", "c")])
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b"},
                {"type": "text", "text": "c"},
            ],
        }
    ]


def test_images_by_url_data_url_and_inline_bytes() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    encoded = base64.b64encode(png).decode()
    message = user(
        text("what is this?"),
        common_pb2.ContentPart(
            image=common_pb2.ImagePart(url="https://x.test/a.jpg", detail=common_pb2.IMAGE_DETAIL_AUTO)
        ),
        common_pb2.ContentPart(image=common_pb2.ImagePart(data=png, mime_type="image/png")),
        common_pb2.ContentPart(image=common_pb2.ImagePart(url=f"data:image/webp;base64,{encoded}")),
    )
    assert body_of(messages=[message])["messages"][0]["content"] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": encoded}},
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp", "data": encoded}},
    ]


def test_tool_result_with_an_image() -> None:
    messages = [
        common_pb2.Message(
            role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(id="t1", name="shot")]
        ),
        common_pb2.Message(
            role=common_pb2.ROLE_TOOL,
            tool_call_id="t1",
            parts=[
                text("here"),
                common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://x.test/s.png")),
            ],
        ),
    ]
    assert body_of(messages=messages)["messages"][1]["content"] == [
        {
            "type": "tool_result",
            "tool_use_id": "t1",
            "content": [
                {"type": "text", "text": "here"},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/s.png"}},
            ],
        }
    ]


def image(**fields: Any) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(image=common_pb2.ImagePart(**fields))


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (user(image(data=b"x")), "messages[0].parts[0].image.mime_type"),
        (user(image(data=b"x", mime_type="image/tiff")), "messages[0].parts[0].image.mime_type"),
        (user(image(url="data:image/bmp;base64,AAAA")), "messages[0].parts[0].image.url"),
        (user(image(url="data:image/png,rawbytes")), "messages[0].parts[0].image.url"),
        (user(image(url="data:image/png;base64,@@@")), "messages[0].parts[0].image.url"),
        (user(image()), "messages[0].parts[0].image.url"),
        (user(image(url="https://x", data=b"x", mime_type="image/png")), "messages[0].parts[0].image.data"),
        (
            user(image(url="https://x", detail=common_pb2.IMAGE_DETAIL_LOW)),
            "messages[0].parts[0].image.detail",
        ),
        (
            common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[image(url="https://x")]),
            "messages[0].parts[0].image",
        ),
        (
            common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=[image(url="https://x")]),
            "messages[0].parts[0].image",
        ),
        (common_pb2.Message(parts=[text("x")]), "messages[0].role"),
        (msg(common_pb2.ROLE_USER, "x", name="ada"), "messages[0].name"),
        (msg(common_pb2.ROLE_TOOL, "x"), "messages[0].tool_call_id"),
        (msg(common_pb2.ROLE_TOOL, "x", tool_call_id="c", name="n"), "messages[0].name"),
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
        (
            common_pb2.Message(
                role=common_pb2.ROLE_ASSISTANT,
                tool_calls=[common_pb2.ToolCall(id="c", name="f", arguments_json='{"city": ')],
            ),
            "messages[0].tool_calls[0].arguments_json",
        ),
        (
            common_pb2.Message(
                role=common_pb2.ROLE_ASSISTANT,
                tool_calls=[common_pb2.ToolCall(id="c", name="f", arguments_json="[1, 2]")],
            ),
            "messages[0].tool_calls[0].arguments_json",
        ),
        (msg(common_pb2.ROLE_USER, ""), "messages[0].parts"),
        (msg(common_pb2.ROLE_SYSTEM), "messages[0].parts"),
    ],
)
def test_messages_the_vendor_cannot_take_are_refused(message: common_pb2.Message, field: str) -> None:
    refused(field, messages=[message])


def test_no_messages_no_model_and_system_only_are_refused() -> None:
    refused("messages", messages=[])
    refused("messages", messages=[msg(common_pb2.ROLE_SYSTEM, "rules only")])
    with pytest.raises(SwitchyardError) as caught:
        translator().build_request(provider_pb2.GenerateRequest(request=generate_request().request))
    assert caught.value.metadata["field"] == "upstream_model"


def test_refusals_never_echo_the_prompt() -> None:
    bad = common_pb2.ToolCall(id="c", name="f", arguments_json=f'{{"q": "{PROMPT}"')
    error = refused(
        "messages[0].tool_calls[0].arguments_json",
        messages=[common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[bad])],
    )
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)


SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
WEATHER = common_pb2.Tool(
    name="get_weather", description="Weather now", parameters_json_schema=SCHEMA, strict=True
)


def test_tools_and_tool_choice_modes() -> None:
    body = body_of(tools=[WEATHER, common_pb2.Tool(name="noop")])
    assert body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather now",
            "input_schema": orjson.loads(SCHEMA),
            "strict": True,
        },
        {"name": "noop", "input_schema": {"type": "object"}},
    ]
    assert "tool_choice" not in body
    for mode, expected in (
        (common_pb2.TOOL_CHOICE_MODE_AUTO, {"type": "auto"}),
        (common_pb2.TOOL_CHOICE_MODE_NONE, {"type": "none"}),
        (common_pb2.TOOL_CHOICE_MODE_REQUIRED, {"type": "any"}),
    ):
        choice = common_pb2.ToolChoice(mode=mode)
        assert body_of(tools=[WEATHER], tool_choice=choice)["tool_choice"] == expected
    named = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")
    assert body_of(tools=[WEATHER], tool_choice=named)["tool_choice"] == {
        "type": "tool",
        "name": "get_weather",
    }


def test_bad_tools_and_choices_are_refused() -> None:
    for schema in ("{nope", "[1]", '{"type":"string"}', '{"properties":{}}'):
        refused(
            "tools[0].parameters_json_schema",
            tools=[common_pb2.Tool(name="f", parameters_json_schema=schema)],
        )
    refused("tools[0].name", tools=[common_pb2.Tool(description="nameless")])
    refused("tool_choice", tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED))
    refused("tool_choice.mode", tool_choice=common_pb2.ToolChoice(tool_name="get_weather"))
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
    schema = fmt(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="city", json_schema=SCHEMA, strict=True
    )
    assert body_of(response_format=schema)["output_config"] == {
        "format": {"type": "json_schema", "schema": orjson.loads(SCHEMA)}
    }
    assert "output_config" not in body_of(response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_TEXT))
    assert "output_config" not in body_of(response_format=fmt())
    refused("response_format", response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT))
    refused(
        "response_format.json_schema", response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
    )
    refused(
        "response_format.json_schema",
        response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[]"),
    )


def test_sampling_and_end_user() -> None:
    body = body_of(
        sampling=common_pb2.SamplingParams(
            temperature=0.0, top_p=0.9, max_output_tokens=256, stop_sequences=["END", "STOP"]
        ),
        metadata=common_pb2.RequestMetadata(end_user="user-123", tags={"team": "a"}),
    )
    assert {k: body[k] for k in body if k not in ("model", "messages")} == {
        "max_tokens": 256,
        "temperature": 0.0,
        "top_p": 0.9,
        "stop_sequences": ["END", "STOP"],
        "metadata": {"user_id": "user-123"},
        "stream": True,
    }


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        (common_pb2.SamplingParams(seed=42), "sampling.seed"),
        (common_pb2.SamplingParams(presence_penalty=0.5), "sampling.presence_penalty"),
        (common_pb2.SamplingParams(frequency_penalty=-0.5), "sampling.frequency_penalty"),
        (common_pb2.SamplingParams(temperature=1.5), "sampling.temperature"),
        (common_pb2.SamplingParams(temperature=float("nan")), "sampling.temperature"),
        (common_pb2.SamplingParams(top_p=1.2), "sampling.top_p"),
        (common_pb2.SamplingParams(stop_sequences=["ok", ""]), "sampling.stop_sequences"),
    ],
)
def test_sampling_without_a_faithful_translation_is_refused(
    sampling: common_pb2.SamplingParams, field: str
) -> None:
    refused(field, sampling=sampling)


# --------------------------------------------------------------------------- #
# stream decoding
# --------------------------------------------------------------------------- #


def event(kind: str, **data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def message_start(**usage: Any) -> bytes:
    message: dict[str, Any] = {
        "id": "msg_01abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-6-20260101",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage or {"input_tokens": 20, "output_tokens": 1},
    }
    return event("message_start", message=message)


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return event("content_block_start", index=index, content_block=block)


def block_delta(index: int, **delta: Any) -> bytes:
    return event("content_block_delta", index=index, delta=delta)


def message_end(stop_reason: str = "end_turn", **usage: Any) -> bytes:
    return event(
        "message_delta",
        delta={"stop_reason": stop_reason, "stop_sequence": None},
        usage=usage or {"output_tokens": 9},
    ) + event("message_stop")


def decode(
    stream: bytes, request: provider_pb2.GenerateRequest | None = None
) -> tuple[list[Any], AnthropicStreamDecoder]:
    decoder = translator().new_decoder(request or generate_request())
    parser = SseParser()
    out: list[Any] = []
    for sse_event in parser.feed(stream):
        out.extend(decoder.on_event(sse_event))
    return out, decoder


def test_text_stream() -> None:
    stream = (
        message_start()
        + block_start(0, {"type": "text", "text": ""})
        + event("ping")
        + block_delta(0, type="text_delta", text="Hel")
        + block_delta(0, type="text_delta", text="lo")
        + event("content_block_stop", index=0)
        + message_end()
    )
    events, decoder = decode(stream)
    assert [e.delta.text for e in events] == ["Hel", "lo"]
    assert decoder.finished
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_STOP
    assert outcome.usage == common_pb2.Usage(input_tokens=20, output_tokens=9)
    assert (outcome.vendor_request_id, outcome.vendor_model) == ("msg_01abc", "claude-sonnet-4-6-20260101")


def test_usage_includes_cache_reads_and_writes_and_thinking() -> None:
    stream = (
        message_start(
            input_tokens=10, cache_read_input_tokens=100, cache_creation_input_tokens=30, output_tokens=1
        )
        + block_start(0, {"type": "thinking", "thinking": "", "signature": ""})
        + block_delta(0, type="thinking_delta", thinking="let me see")
        + block_delta(0, type="signature_delta", signature="EqSig")
        + event("content_block_stop", index=0)
        + block_start(1, {"type": "text", "text": ""})
        + block_delta(1, type="text_delta", text="ok")
        + message_end(
            input_tokens=10,
            cache_read_input_tokens=100,
            cache_creation_input_tokens=30,
            output_tokens=50,
            output_tokens_details={"thinking_tokens": 40},
        )
    )
    events, decoder = decode(stream)
    assert [(e.delta.reasoning_text, e.delta.text) for e in events] == [("let me see", ""), ("", "ok")]
    assert decoder.outcome().usage == common_pb2.Usage(
        input_tokens=140,
        output_tokens=50,
        cached_input_tokens=100,
        reasoning_tokens=40,
        cache_write_input_tokens=30,
    )


def test_message_delta_counts_are_cumulative_and_partial() -> None:
    _, decoder = decode(
        message_start(input_tokens=12, cache_read_input_tokens=None, output_tokens=1)
        + message_end(output_tokens=7)
    )
    assert decoder.outcome().usage == common_pb2.Usage(input_tokens=12, output_tokens=7)


def test_tool_call_fragments_reassemble() -> None:
    stream = (
        message_start()
        + block_start(0, {"type": "text", "text": "Let me check."})
        + event("content_block_stop", index=0)
        + block_start(1, {"type": "tool_use", "id": "toolu_01A", "name": "get_weather", "input": {}})
        + block_delta(1, type="input_json_delta", partial_json="")
        + block_delta(1, type="input_json_delta", partial_json='{"ci')
        + block_delta(1, type="input_json_delta", partial_json='ty":"Oslo"}')
        + event("content_block_stop", index=1)
        + block_start(2, {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}})
        + block_delta(2, type="input_json_delta", partial_json='{"tz":"UTC"}')
        + message_end("tool_use")
    )
    events, decoder = decode(stream)
    assert events[0].delta.text == "Let me check."
    calls = [call for e in events for call in e.delta.tool_calls]
    assert [(c.index, c.id, c.name) for c in calls] == [
        (0, "toolu_01A", "get_weather"),
        (0, "", ""),
        (0, "", ""),
        (1, "toolu_01B", "get_time"),
        (1, "", ""),
    ]
    first = "".join(c.arguments_fragment for c in calls if c.index == 0)
    assert orjson.loads(first) == {"city": "Oslo"}
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


@pytest.mark.parametrize(
    ("stop_reason", "expected"),
    [
        ("end_turn", common_pb2.FINISH_REASON_STOP),
        ("stop_sequence", common_pb2.FINISH_REASON_STOP),
        ("max_tokens", common_pb2.FINISH_REASON_LENGTH),
        ("model_context_window_exceeded", common_pb2.FINISH_REASON_LENGTH),
        ("pause_turn", common_pb2.FINISH_REASON_LENGTH),
        ("tool_use", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("refusal", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("something_new", common_pb2.FINISH_REASON_UNSPECIFIED),
    ],
)
def test_stop_reasons(stop_reason: str, expected: int) -> None:
    _, decoder = decode(message_start() + message_end(stop_reason))
    assert decoder.outcome().finish_reason == expected


def test_unknown_events_and_blocks_are_ignored() -> None:
    stream = (
        message_start()
        + event("brand_new_event", payload={"x": 1})
        + block_start(0, {"type": "redacted_thinking", "data": "opaque"})
        + block_start(1, {"type": "text", "text": ""})
        + block_delta(1, type="citations_delta", citation={"type": "char_location"})
        + block_delta(1, type="text_delta", text="fine")
        + message_end()
    )
    events, decoder = decode(stream)
    assert [e.delta.text for e in events] == ["fine"]
    assert decoder.finished


def test_missing_usage_is_estimated_from_characters() -> None:
    request = generate_request(messages=[user(text("x" * 40))])
    stream = (
        event("message_start", message={"id": "msg_1", "model": MODEL, "content": []})
        + block_start(0, {"type": "text", "text": ""})
        + block_delta(0, type="text_delta", text="y" * 10)
        + event("message_delta", delta={"stop_reason": "end_turn"})
        + event("message_stop")
    )
    _, decoder = decode(stream, request)
    usage = decoder.outcome().usage
    assert usage.estimated
    assert (usage.input_tokens, usage.output_tokens) == (10, 3)


@pytest.mark.parametrize(
    "data",
    [
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"' + PROMPT.encode(),
        b"[1,2]",
        b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":5}}',
        b'{"type":"content_block_delta","index":-1,"delta":{"type":"text_delta","text":"x"}}',
        b'{"type":"content_block_delta","index":0,"delta":"text"}',
        b'{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{"}}',
        b'{"type":"content_block_start","index":0,"content_block":{"type":"tool_use","input":{}}}',
        b'{"type":"message_start","message":"hello"}',
        b'{"type":"message_delta","delta":{"stop_reason":3}}',
        b'{"type":"message_delta","delta":{},"usage":{"output_tokens":"many"}}',
    ],
)
def test_malformed_events_are_protocol_errors_without_their_content(data: bytes) -> None:
    decoder = translator().new_decoder(generate_request())
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(data, "content_block_delta"))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)


@pytest.mark.parametrize(
    ("kind", "grpc_code", "reason"),
    [
        ("overloaded_error", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        ("api_error", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        ("rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        ("timeout_error", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
        ("invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        ("something_new", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
    ],
)
def test_in_stream_error_maps_like_http(kind: str, grpc_code: grpc.StatusCode, reason: Reason) -> None:
    _, decoder = decode(message_start())
    payload = {"type": "error", "error": {"type": kind, "message": f"bad: {PROMPT}"}}
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(payload), "error"))
    error = caught.value
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["in_stream"] == "true"
    assert error.metadata["vendor_code"] == kind
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)


def test_in_stream_prompt_too_long_is_context_too_long() -> None:
    decoder = translator().new_decoder(generate_request())
    payload = {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "prompt is too long: 201234 tokens > 200000 maximum",
        },
    }
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(payload), "error"))
    assert caught.value.reason == Reason.CONTEXT_TOO_LONG


def test_events_after_message_stop_are_ignored_and_eof_rules() -> None:
    events, decoder = decode(
        message_start()
        + message_end()
        + block_start(0, {"type": "text", "text": ""})
        + block_delta(0, type="text_delta", text="late")
    )
    assert decoder.finished and events == []
    decoder.on_eof()
    _, cut = decode(
        message_start()
        + block_start(0, {"type": "text", "text": ""})
        + block_delta(0, type="text_delta", text="x")
    )
    with pytest.raises(SwitchyardError) as caught:
        cut.on_eof()
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE
    _, no_stop = decode(message_start() + event("message_delta", delta={"stop_reason": "end_turn"}))
    with pytest.raises(SwitchyardError):
        no_stop.on_eof()  # only message_stop completes an Anthropic stream


def test_non_streamed_body() -> None:
    message = {
        "id": "msg_02",
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "Calling."},
            {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {"a": 1}},
            {"type": "tool_use", "id": "toolu_10", "name": "g", "input": {}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {"input_tokens": 5, "cache_read_input_tokens": 8, "output_tokens": 12},
    }
    decoder = translator().new_decoder(generate_request())
    events = decoder.on_body(orjson.dumps(message))
    assert decoder.finished
    assert [e.delta.reasoning_text for e in events][0] == "hmm"
    assert events[1].delta.text == "Calling."
    calls = [c for e in events for c in e.delta.tool_calls]
    assert [(c.index, c.id, c.name, c.arguments_fragment) for c in calls] == [
        (0, "toolu_9", "f", '{"a":1}'),
        (1, "toolu_10", "g", "{}"),
    ]
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert outcome.usage == common_pb2.Usage(input_tokens=13, output_tokens=12, cached_input_tokens=8)
    error_body = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(SwitchyardError) as caught:
        translator().new_decoder(generate_request()).on_body(orjson.dumps(error_body))
    assert caught.value.reason == Reason.PROVIDER_OVERLOADED
    with pytest.raises(SwitchyardError) as caught:
        translator().new_decoder(generate_request()).on_body(b"<html>")
    assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------- #
# errors and headers
# --------------------------------------------------------------------------- #


def error_body(kind: str, message: str = f"echo: {PROMPT}", code: str | None = None) -> bytes:
    error: dict[str, Any] = {"type": kind, "message": message}
    if code is not None:
        error["details"] = {"error_code": code}
    return orjson.dumps({"type": "error", "error": error, "request_id": "req_body"})


@pytest.mark.parametrize(
    ("status", "kind", "message", "grpc_code", "reason"),
    [
        (400, "invalid_request_error", "bad", grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        (
            400,
            "invalid_request_error",
            "prompt is too long: 205000 tokens > 200000 maximum",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        (
            400,
            "invalid_request_error",
            "input length and `max_tokens` exceed context limit: 198000 + 4096 > 200000, decrease input "
            "length or `max_tokens` and try again",
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        (
            401,
            "authentication_error",
            "invalid x-api-key",
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (403, "permission_error", "no", grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
        (404, "not_found_error", "model: x", grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
        (413, "request_too_large", "big", grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        (429, "rate_limit_error", "slow", grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        (402, "billing_error", "credit", grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        (500, "api_error", "oops", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        (502, "api_error", "oops", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        (503, "api_error", "oops", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        (529, "overloaded_error", "Overloaded", grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        (504, "timeout_error", "slow", grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
    ],
)
def test_error_table(
    status: int, kind: str, message: str, grpc_code: grpc.StatusCode, reason: Reason
) -> None:
    body = error_body(kind, message + f" {PROMPT}")
    error = translator().map_error(status, httpx.Headers({"request-id": "req_1"}), body)
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["provider"] == "anthropic-main"
    assert error.metadata["vendor"] == "anthropic"
    assert error.metadata["http_status"] == str(status)
    assert error.metadata["vendor_code"] == kind
    assert error.metadata["vendor_request_id"] == "req_1"
    for leak in (PROMPT, KEY, "echo", "too long", "x-api-key"):
        assert leak not in error.message
        assert all(leak not in value for value in error.metadata.values())


def test_context_wording_only_counts_on_a_400() -> None:
    body = error_body("api_error", "prompt is too long: 1 tokens > 0 maximum")
    assert translator().map_error(500, httpx.Headers(), body).reason == Reason.PROVIDER_UNAVAILABLE


def test_detail_codes() -> None:
    t = translator()
    spend = t.map_error(
        429,
        httpx.Headers({"retry-after": "7"}),
        error_body("rate_limit_error", code="enforced_spend_limit_reached"),
    )
    assert spend.reason == Reason.RATE_LIMITED and spend.retry_after_s is None
    assert spend.metadata["quota"] == "exhausted"
    assert (spend.metadata["vendor_code"], spend.metadata["vendor_type"]) == (
        "enforced_spend_limit_reached",
        "rate_limit_error",
    )
    ramp = t.map_error(
        429, httpx.Headers({"retry-after": "7"}), error_body("rate_limit_error", code="ramp_limit_exceeded")
    )
    assert ramp.retry_after_s == 7.0 and "quota" not in ramp.metadata
    on_hold = t.map_error(
        400, httpx.Headers(), error_body("invalid_request_error", code="organization_on_hold")
    )
    assert (on_hold.code, on_hold.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED)
    billing = t.map_error(402, httpx.Headers({"retry-after": "7"}), error_body("billing_error"))
    assert billing.retry_after_s is None and billing.metadata["quota"] == "exhausted"


def test_unparsable_error_body_still_maps_by_status() -> None:
    error = translator().map_error(502, httpx.Headers(), b"<html>Bad gateway</html>")
    assert error.reason == Reason.PROVIDER_UNAVAILABLE and "vendor_code" not in error.metadata
    from_body = translator().map_error(500, httpx.Headers(), error_body("api_error"))
    assert from_body.metadata["vendor_request_id"] == "req_body"


def rfc3339(seconds_from_now: float) -> str:
    return datetime.fromtimestamp(time.time() + seconds_from_now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_rate_limit_retry_after_sources() -> None:
    t = translator()
    body = error_body("rate_limit_error")
    assert t.map_error(429, httpx.Headers({"retry-after": "7"}), body).retry_after_s == 7.0
    exhausted = httpx.Headers(
        {
            "anthropic-ratelimit-requests-remaining": "5",
            "anthropic-ratelimit-requests-reset": rfc3339(5),
            "anthropic-ratelimit-output-tokens-remaining": "0",
            "anthropic-ratelimit-output-tokens-reset": rfc3339(40),
        }
    )
    waited = t.map_error(429, exhausted, body).retry_after_s
    assert waited is not None and 38 <= waited <= 40
    assert t.map_error(429, httpx.Headers(), body).retry_after_s == 1.0
    assert t.map_error(529, httpx.Headers({"retry-after": "3"}), b"").retry_after_s == 3.0
    assert t.map_error(400, httpx.Headers({"retry-after": "3"}), b"").retry_after_s is None


def test_error_carries_remaining_headroom() -> None:
    headers = httpx.Headers(
        {"anthropic-ratelimit-requests-remaining": "0", "anthropic-ratelimit-tokens-remaining": "1234"}
    )
    error = translator().map_error(429, headers, error_body("rate_limit_error"))
    assert error.metadata["remaining_requests"] == "0"
    assert error.metadata["remaining_tokens"] == "1234"


def test_headroom_from_headers() -> None:
    headers = httpx.Headers(
        {
            "anthropic-ratelimit-requests-limit": "4000",
            "anthropic-ratelimit-requests-remaining": "3999",
            "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:05Z",
            "anthropic-ratelimit-tokens-limit": "480000",
            "anthropic-ratelimit-tokens-remaining": "479000",
            "anthropic-ratelimit-tokens-reset": "2026-01-01T00:01:00.500+00:00",
            "anthropic-ratelimit-input-tokens-limit": "400000",
            "anthropic-ratelimit-input-tokens-remaining": "1",
            "retry-after": "2",
        }
    )
    before = time.time()
    headroom = translator().headroom(headers)
    assert headroom is not None
    assert (headroom.limit_requests, headroom.remaining_requests) == (4000, 3999)
    # `tokens` is the most restrictive combined figure; it wins over input-tokens.
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (480000, 479000)
    new_year = datetime(2026, 1, 1, tzinfo=UTC).timestamp()
    assert headroom.requests_reset_at.seconds == new_year + 5
    assert (headroom.tokens_reset_at.seconds, headroom.tokens_reset_at.nanos) == (new_year + 60, 500_000_000)
    assert headroom.retry_after_ms == 2000
    observed = headroom.observed_at.seconds + headroom.observed_at.nanos / 1e9
    assert before - 1 <= observed <= time.time() + 1
    assert translator().headroom(httpx.Headers({"content-type": "text/event-stream"})) is None


def test_headroom_falls_back_to_input_tokens_and_skips_bad_values() -> None:
    headers = httpx.Headers(
        {
            "anthropic-ratelimit-input-tokens-limit": "400000",
            "anthropic-ratelimit-input-tokens-remaining": "399000",
            "anthropic-ratelimit-input-tokens-reset": "not a time",
            "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:05",  # no zone: ambiguous
            "anthropic-ratelimit-requests-remaining": "-1",
        }
    )
    headroom = translator().headroom(headers)
    assert headroom is not None
    assert (headroom.limit_tokens, headroom.remaining_tokens) == (400000, 399000)
    assert not headroom.HasField("remaining_requests")
    assert not headroom.HasField("requests_reset_at") and not headroom.HasField("tokens_reset_at")


def test_request_id_header() -> None:
    t = translator()
    assert t.request_id(httpx.Headers({"request-id": "req_011CX"})) == "req_011CX"
    assert t.request_id(httpx.Headers({"x-request-id": "other"})) == ""


def test_embeddings_are_not_spoken_for_this_vendor() -> None:
    request = provider_pb2.EmbedRequest(provider="p", upstream_model="m", inputs=["a"])
    with pytest.raises(SwitchyardError) as caught:
        translator().embeddings_request(request)
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.UNIMPLEMENTED, Reason.NOT_IMPLEMENTED)
