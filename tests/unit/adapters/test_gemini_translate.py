"""Gemini translation as pure functions: request building, stream decoding, the error
table and headers. No network."""

from __future__ import annotations

import base64
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.base import SseEvent, SseParser
from switchyard.adapters.vendors import load_translator
from switchyard.adapters.vendors.gemini import (
    THOUGHT_SIGNATURE_PLACEHOLDER,
    GeminiStreamDecoder,
    GeminiTranslator,
)
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.v1 import common_pb2, provider_pb2

KEY = "AIzaSy-test-0123456789abcdef"
PROMPT = "secret prompt text"
MODEL = "gemini-2.5-flash"


def translator(**options: Any) -> GeminiTranslator:
    provider = Provider(
        vendor="gemini", base_url="https://generativelanguage.googleapis.com/v1beta", options=options
    )
    return GeminiTranslator("gemini-main", provider, KEY)


def text(value: str) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(text=value)


def image(**fields: Any) -> common_pb2.ContentPart:
    return common_pb2.ContentPart(image=common_pb2.ImagePart(**fields))


def user(*parts: common_pb2.ContentPart) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts)


def assistant(
    *parts: common_pb2.ContentPart, calls: tuple[common_pb2.ToolCall, ...] = ()
) -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=parts, tool_calls=calls)


def tool_result(call_id: str, value: str, name: str = "") -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_TOOL, tool_call_id=call_id, parts=[text(value)], name=name)


def call(call_id: str, name: str = "get_weather", arguments: str = '{"city":"Oslo"}') -> common_pb2.ToolCall:
    return common_pb2.ToolCall(id=call_id, name=name, arguments_json=arguments)


def generate_request(model: str = MODEL, **chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault("messages", [user(text(PROMPT))])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider="gemini-main", upstream_model=model
    )


def body_of(t: GeminiTranslator | None = None, **chat: Any) -> dict[str, Any]:
    built = (t or translator()).build_request(generate_request(**chat))
    assert built.body is not None
    return dict(built.body)


def refused(field: str, t: GeminiTranslator | None = None, **chat: Any) -> SwitchyardError:
    with pytest.raises(SwitchyardError) as caught:
        (t or translator()).build_request(generate_request(**chat))
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == Reason.INVALID_REQUEST
    assert error.metadata["field"] == field
    assert PROMPT not in error.message
    return error


# --------------------------------------------------------------------------- #
# request
# --------------------------------------------------------------------------- #


def test_translator_table_has_gemini() -> None:
    assert load_translator("gemini") is GeminiTranslator


def test_minimal_request() -> None:
    built = translator().build_request(generate_request())
    assert (built.method, built.path) == ("POST", "/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
    assert built.headers["x-goog-api-key"] == KEY
    assert "Authorization" not in built.headers
    assert built.headers["Accept"] == "text/event-stream"
    assert built.body == {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}


def test_path_joins_the_versioned_base_url() -> None:
    built = translator().build_request(generate_request())
    client = httpx.Client(base_url="https://generativelanguage.googleapis.com/v1beta")
    url = client.build_request(built.method, built.path).url
    assert str(url) == (
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    )
    assert url.params["alt"] == "sse"


def test_model_resource_names() -> None:
    t = translator()
    assert t.build_request(generate_request("models/gemini-2.5-pro")).path.startswith(
        "/models/gemini-2.5-pro:"
    )
    assert t.build_request(generate_request("tunedModels/my-model-7")).path.startswith(
        "/tunedModels/my-model-7:"
    )
    for bad in ("../admin", "gemini?alt=json", "models/a/b", "gemini 2", "x:generateContent"):
        with pytest.raises(SwitchyardError) as caught:
            t.build_request(generate_request(bad))
        assert caught.value.metadata["field"] == "upstream_model"


def test_key_and_prompt_stay_out_of_reprs() -> None:
    t = translator()
    built = t.build_request(generate_request())
    assert KEY not in repr(built) and PROMPT not in repr(built)
    assert KEY not in repr(t)


def test_no_key_no_key_header() -> None:
    provider = Provider(vendor="gemini", base_url="http://127.0.0.1:1/v1beta")
    built = GeminiTranslator("local", provider, None).build_request(generate_request())
    assert "x-goog-api-key" not in built.headers


def test_models_request() -> None:
    built = translator().models_request()
    assert (built.method, built.path, built.body) == ("GET", "/models?pageSize=1", None)
    assert built.headers["x-goog-api-key"] == KEY and "Content-Type" not in built.headers


def test_options_are_validated() -> None:
    with pytest.raises(ValueError, match="thought_signatures"):
        translator(thought_signatures="keep")
    with pytest.raises(ValueError, match="end_user"):
        translator(end_user="drop")


def test_system_roles_and_tool_round_trip() -> None:
    messages = [
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("be brief")]),
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("be kind")]),
        user(text("weather in Oslo and Rome?")),
        assistant(text("Checking."), calls=(call("c1"), call("c2", arguments='{"city":"Rome"}'))),
        tool_result("c1", '{"temp":3}'),
        tool_result("c2", "sunny, 24 degrees"),
        assistant(text("Oslo 3, Rome 24.")),
        user(text("thanks")),
    ]
    body = body_of(messages=messages)
    assert body["systemInstruction"] == {"parts": [{"text": "be brief"}, {"text": "be kind"}]}
    assert body["contents"] == [
        {"role": "user", "parts": [{"text": "weather in Oslo and Rome?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Checking."},
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"},
                    "thoughtSignature": THOUGHT_SIGNATURE_PLACEHOLDER,
                },
                {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}, "id": "c2"}},
            ],
        },
        # Consecutive tool answers go back in one user turn.
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 3}, "id": "c1"}},
                {
                    "functionResponse": {
                        "name": "get_weather",
                        "response": {"output": "sunny, 24 degrees"},
                        "id": "c2",
                    }
                },
            ],
        },
        {"role": "model", "parts": [{"text": "Oslo 3, Rome 24."}]},
        {"role": "user", "parts": [{"text": "thanks"}]},
    ]


def test_tool_call_without_id_or_arguments() -> None:
    messages = [
        user(text("go")),
        assistant(calls=(common_pb2.ToolCall(name="noop"),)),
        tool_result("", "done", name="noop"),
    ]
    # A tool message must name its call even when the call had no id.
    refused("messages[2].tool_call_id", messages=messages)
    messages[2] = tool_result("x", "done", name="noop")
    contents = body_of(messages=messages)["contents"]
    assert contents[1]["parts"][0]["functionCall"] == {"name": "noop", "args": {}}
    # No call with that id: the message's own name is the function's.
    assert contents[2]["parts"][0]["functionResponse"] == {
        "name": "noop",
        "response": {"output": "done"},
        "id": "x",
    }


def test_tool_result_needs_its_function_name() -> None:
    refused("messages[1].tool_call_id", messages=[user(text("x")), tool_result("unknown", "42")])
    messages = [user(text("x")), assistant(calls=(call("c1"),)), tool_result("c1", "42", name="other")]
    refused("messages[2].name", messages=messages)
    messages[2] = tool_result("c1", "42", name="get_weather")
    assert body_of(messages=messages)["contents"][2]["parts"][0]["functionResponse"]["name"] == "get_weather"


def test_thought_signature_modes() -> None:
    messages = [user(text("x")), assistant(calls=(call("c1"),)), tool_result("c1", "{}")]
    omitted = body_of(translator(thought_signatures="omit"), messages=messages)["contents"][1]["parts"][0]
    assert "thoughtSignature" not in omitted
    signature = base64.b64encode(b"opaque-signature-bytes").decode()
    embedded = [
        user(text("x")),
        assistant(calls=(call(f"c1~{signature}"),)),
        tool_result(f"c1~{signature}", "{}"),
    ]
    contents = body_of(translator(thought_signatures="embed"), messages=embedded)["contents"]
    assert contents[1]["parts"][0] == {
        "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"},
        "thoughtSignature": signature,
    }
    assert contents[2]["parts"][0]["functionResponse"]["id"] == "c1"
    # No signature in the id: the placeholder stands in, on the first call only.
    unsigned = [user(text("x")), assistant(calls=(call("c1"), call("c2")))]
    parts = body_of(translator(thought_signatures="embed"), messages=unsigned)["contents"][1]["parts"]
    assert [part.get("thoughtSignature") for part in parts] == [THOUGHT_SIGNATURE_PLACEHOLDER, None]
    # Outside "embed" mode an id is opaque, separator and all.
    plain = body_of(messages=embedded)["contents"][1]["parts"][0]
    assert plain["functionCall"]["id"] == f"c1~{signature}"
    assert plain["thoughtSignature"] == THOUGHT_SIGNATURE_PLACEHOLDER


def test_images() -> None:
    png = b"\x89PNG\r\n\x1a\nfake"
    message = user(
        text("what is this?"),
        image(data=png, mime_type="image/png", detail=common_pb2.IMAGE_DETAIL_HIGH),
        image(url="https://x.test/a.jpg", mime_type="image/jpeg", detail=common_pb2.IMAGE_DETAIL_LOW),
        image(url="gs://bucket/b.png"),
        image(url="data:image/webp;base64,UklGRg==", detail=common_pb2.IMAGE_DETAIL_AUTO),
    )
    parts = body_of(messages=[message])["contents"][0]["parts"]
    assert parts == [
        {"text": "what is this?"},
        {
            "inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()},
            "mediaResolution": {"level": "MEDIA_RESOLUTION_HIGH"},
        },
        {
            "fileData": {"fileUri": "https://x.test/a.jpg", "mimeType": "image/jpeg"},
            "mediaResolution": {"level": "MEDIA_RESOLUTION_LOW"},
        },
        {"fileData": {"fileUri": "gs://bucket/b.png"}},
        {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
    ]


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (user(image(data=b"x")), "messages[0].parts[0].image.mime_type"),
        (user(image()), "messages[0].parts[0].image.url"),
        (user(image(url="https://x", data=b"x", mime_type="image/png")), "messages[0].parts[0].image.data"),
        (user(image(url="ftp://x/a.png")), "messages[0].parts[0].image.url"),
        (user(image(url="data:image/png,rawbytes")), "messages[0].parts[0].image.url"),
        (user(), "messages[0].parts"),
        (common_pb2.Message(role=common_pb2.ROLE_ASSISTANT), "messages[0].parts"),
        (common_pb2.Message(parts=[text("x")]), "messages[0].role"),
        (common_pb2.Message(role=common_pb2.ROLE_USER, parts=[text("x")], name="ada"), "messages[0].name"),
        (
            common_pb2.Message(role=common_pb2.ROLE_USER, tool_calls=[common_pb2.ToolCall(id="c", name="f")]),
            "messages[0].tool_calls",
        ),
        (common_pb2.Message(role=common_pb2.ROLE_USER, tool_call_id="c"), "messages[0].tool_call_id"),
        (common_pb2.Message(role=common_pb2.ROLE_TOOL, parts=[text("x")]), "messages[0].tool_call_id"),
        (assistant(calls=(common_pb2.ToolCall(id="c"),)), "messages[0].tool_calls[0].name"),
        (assistant(calls=(call("c", arguments="[1]"),)), "messages[0].tool_calls[0].arguments_json"),
        (assistant(calls=(call("c", arguments="{nope"),)), "messages[0].tool_calls[0].arguments_json"),
    ],
)
def test_messages_gemini_cannot_take_are_refused(message: common_pb2.Message, field: str) -> None:
    refused(field, messages=[message])


def test_system_and_tool_message_limits() -> None:
    refused("messages", messages=[])
    refused("messages", messages=[common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("only")])])
    late_system = [user(text("hi")), common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[text("rules")])]
    refused("messages[1].role", messages=late_system)
    system_image = common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[image(url="https://x/a.png")])
    refused("messages[0].parts[0].image", messages=[system_image, user(text("x"))])
    tool_image = common_pb2.Message(
        role=common_pb2.ROLE_TOOL, tool_call_id="c1", parts=[image(url="https://x/a.png")]
    )
    refused(
        "messages[2].parts[0].image", messages=[user(text("x")), assistant(calls=(call("c1"),)), tool_image]
    )
    with pytest.raises(SwitchyardError) as caught:
        translator().build_request(provider_pb2.GenerateRequest(request=generate_request().request))
    assert caught.value.metadata["field"] == "upstream_model"


SCHEMA = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
WEATHER = common_pb2.Tool(name="get_weather", description="Weather now", parameters_json_schema=SCHEMA)


def test_tools_and_tool_choice_modes() -> None:
    body = body_of(tools=[WEATHER, common_pb2.Tool(name="noop")])
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather now",
                    "parametersJsonSchema": orjson.loads(SCHEMA),
                },
                {"name": "noop"},
            ]
        }
    ]
    assert "toolConfig" not in body
    for mode, expected in (
        (common_pb2.TOOL_CHOICE_MODE_AUTO, "AUTO"),
        (common_pb2.TOOL_CHOICE_MODE_NONE, "NONE"),
        (common_pb2.TOOL_CHOICE_MODE_REQUIRED, "ANY"),
    ):
        config = body_of(tools=[WEATHER], tool_choice=common_pb2.ToolChoice(mode=mode))["toolConfig"]
        assert config == {"functionCallingConfig": {"mode": expected}}
    named = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather")
    assert body_of(tools=[WEATHER], tool_choice=named)["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }


def test_strict_tools_ask_for_validated_calls() -> None:
    strict = common_pb2.Tool(name="get_weather", parameters_json_schema=SCHEMA, strict=True)
    assert body_of(tools=[strict])["toolConfig"] == {"functionCallingConfig": {"mode": "VALIDATED"}}
    auto = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_AUTO)
    assert (
        body_of(tools=[strict], tool_choice=auto)["toolConfig"]["functionCallingConfig"]["mode"]
        == "VALIDATED"
    )
    required = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    assert (
        body_of(tools=[strict], tool_choice=required)["toolConfig"]["functionCallingConfig"]["mode"] == "ANY"
    )


def test_bad_tools_and_choices_are_refused() -> None:
    refused(
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="{nope")]
    )
    refused(
        "tools[0].parameters_json_schema", tools=[common_pb2.Tool(name="f", parameters_json_schema="[1]")]
    )
    refused("tools[0].name", tools=[common_pb2.Tool(description="nameless")])
    refused("tools[1].name", tools=[WEATHER, common_pb2.Tool(name="9lives")])
    refused("tools[0].name", tools=[common_pb2.Tool(name="has space")])
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
    refused(
        "tool_choice.mode",
        tools=[WEATHER],
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_AUTO, tool_name="get_weather"),
    )
    refused("tool_choice.mode", tools=[WEATHER], tool_choice=common_pb2.ToolChoice(tool_name="get_weather"))


def test_response_formats() -> None:
    fmt = common_pb2.ResponseFormat
    assert body_of(response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT))[
        "generationConfig"
    ] == {"responseMimeType": "application/json"}
    assert body_of(response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_TEXT))["generationConfig"] == {
        "responseMimeType": "text/plain"
    }
    assert "generationConfig" not in body_of(response_format=fmt())
    schema = fmt(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="city", json_schema=SCHEMA, strict=True
    )
    assert body_of(response_format=schema)["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {**orjson.loads(SCHEMA), "title": "city"},
    }
    unnamed = fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema=SCHEMA)
    assert "title" not in body_of(response_format=unnamed)["generationConfig"]["responseJsonSchema"]
    titled = '{"title":"city","type":"object"}'
    same = fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="city", json_schema=titled)
    assert body_of(response_format=same)["generationConfig"]["responseJsonSchema"]["title"] == "city"
    refused(
        "response_format.schema_name",
        response_format=fmt(
            type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="town", json_schema=titled
        ),
    )
    refused(
        "response_format.json_schema", response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA)
    )
    refused(
        "response_format.json_schema",
        response_format=fmt(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="[]"),
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
            frequency_penalty=-0.5,
        ),
        metadata=common_pb2.RequestMetadata(conversation_id="conv-1", tags={"team": "a"}),
    )
    assert body["generationConfig"] == {
        "temperature": 0.0,
        "topP": 0.9,
        "maxOutputTokens": 256,
        "stopSequences": ["END", "STOP"],
        "seed": 42,
        "presencePenalty": 0.5,
        "frequencyPenalty": -0.5,
    }
    refused("sampling.stop_sequences", sampling=common_pb2.SamplingParams(stop_sequences=list("abcdef")))
    refused("sampling.seed", sampling=common_pb2.SamplingParams(seed=2**31))
    refused("sampling.seed", sampling=common_pb2.SamplingParams(seed=-(2**31) - 1))
    assert body_of(sampling=common_pb2.SamplingParams(seed=-(2**31)))["generationConfig"]["seed"] == -(2**31)


def test_end_user_is_refused_unless_the_provider_omits_it() -> None:
    metadata = common_pb2.RequestMetadata(end_user="user-123")
    error = refused("metadata.end_user", metadata=metadata)
    assert "user-123" not in error.message
    body = body_of(translator(end_user="omit"), metadata=metadata)
    assert "user-123" not in orjson.dumps(body).decode()


# --------------------------------------------------------------------------- #
# stream decoding
# --------------------------------------------------------------------------- #


def response(
    parts: list[dict[str, Any]] | None = None,
    finish: str | None = None,
    usage: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": parts or [], "role": "model"}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    body: dict[str, Any] = {
        "candidates": [candidate],
        "modelVersion": "gemini-2.5-flash",
        "responseId": "qpc2afWVFJK4vr0Pq6WiyAU",
    }
    if usage is not None:
        body["usageMetadata"] = usage
    body.update(extra)
    return body


def event(body: object) -> bytes:
    return b"data: " + orjson.dumps(body) + b"\r\n\r\n"


USAGE = {
    "promptTokenCount": 20,
    "candidatesTokenCount": 5,
    "totalTokenCount": 44,
    "cachedContentTokenCount": 8,
    "thoughtsTokenCount": 12,
    "toolUsePromptTokenCount": 7,
}


def decode(
    stream: bytes, request: provider_pb2.GenerateRequest | None = None, t: GeminiTranslator | None = None
) -> tuple[list[provider_pb2.GenerateResponse], GeminiStreamDecoder]:
    decoder = (t or translator()).new_decoder(request or generate_request())
    parser = SseParser()
    out: list[provider_pb2.GenerateResponse] = []
    # Fed in small pieces, so CRLFs and events split across chunks.
    for i in range(0, len(stream), 7):
        for parsed in parser.feed(stream[i : i + 7]):
            out.extend(decoder.on_event(parsed))
    for parsed in parser.close():
        out.extend(decoder.on_event(parsed))
    return out, decoder


def test_text_stream_with_usage() -> None:
    partial = {"promptTokenCount": 20, "candidatesTokenCount": 2, "totalTokenCount": 22}
    stream = (
        event(response([{"text": "Hel"}], usage=partial))
        + event(response([{"text": "lo"}], usage=partial))
        + event(response([{"text": "!"}], "STOP", usage=USAGE))
    )
    events, decoder = decode(stream)
    assert [e.delta.text for e in events] == ["Hel", "lo", "!"]
    assert not decoder.finished
    decoder.on_eof()
    assert decoder.finished
    outcome = decoder.outcome()
    assert outcome.finish_reason == common_pb2.FINISH_REASON_STOP
    assert outcome.usage == common_pb2.Usage(
        input_tokens=27, output_tokens=17, cached_input_tokens=8, reasoning_tokens=12
    )
    assert (outcome.vendor_request_id, outcome.vendor_model) == (
        "qpc2afWVFJK4vr0Pq6WiyAU",
        "gemini-2.5-flash",
    )


def test_thought_parts_are_reasoning_not_text() -> None:
    stream = event(response([{"text": "Pondering.", "thought": True}, {"text": "Answer."}], "STOP"))
    events, _ = decode(stream)
    assert len(events) == 1
    assert (events[0].delta.reasoning_text, events[0].delta.text) == ("Pondering.", "Answer.")
    # A signature-only part is not content.
    empty, _ = decode(event(response([{"text": "", "thoughtSignature": "c2ln"}])))
    assert empty == []


def test_function_calls_arrive_whole_with_generated_ids() -> None:
    signature = base64.b64encode(b"opaque").decode()
    stream = event(
        response(
            [
                {
                    "functionCall": {"name": "get_weather", "args": {"city": "Tokyo"}},
                    "thoughtSignature": signature,
                },
                {"functionCall": {"name": "get_time", "id": "fc-7"}},
            ],
            "STOP",
            usage=USAGE,
        )
    )
    events, decoder = decode(stream)
    calls = [c for e in events for c in e.delta.tool_calls]
    assert [(c.index, c.name) for c in calls] == [(0, "get_weather"), (1, "get_time")]
    assert calls[0].id.startswith("call_") and len(calls[0].id) > len("call_")
    assert calls[1].id == "fc-7"
    assert orjson.loads(calls[0].arguments_fragment) == {"city": "Tokyo"}
    assert calls[1].arguments_fragment == "{}"
    decoder.on_eof()
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    again, _ = decode(stream)
    assert again[0].delta.tool_calls[0].id != calls[0].id


def test_embedded_signature_round_trips() -> None:
    t = translator(thought_signatures="embed")
    signature = base64.b64encode(b"opaque-bytes").decode()
    stream = event(
        response(
            [{"functionCall": {"name": "get_weather", "args": {}}, "thoughtSignature": signature}], "STOP"
        )
    )
    events, _ = decode(stream, t=t)
    emitted = events[0].delta.tool_calls[0]
    assert emitted.id.endswith("~" + signature)
    messages = [
        user(text("x")),
        assistant(calls=(common_pb2.ToolCall(id=emitted.id, name=emitted.name, arguments_json="{}"),)),
        tool_result(emitted.id, "{}"),
    ]
    contents = body_of(t, messages=messages)["contents"]
    assert contents[1]["parts"][0]["thoughtSignature"] == signature
    assert contents[1]["parts"][0]["functionCall"]["id"] == emitted.id.split("~")[0]


@pytest.mark.parametrize(
    ("finish", "expected"),
    [
        ("STOP", common_pb2.FINISH_REASON_STOP),
        ("MAX_TOKENS", common_pb2.FINISH_REASON_LENGTH),
        ("SAFETY", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("RECITATION", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("BLOCKLIST", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("PROHIBITED_CONTENT", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("SPII", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("MALFORMED_FUNCTION_CALL", common_pb2.FINISH_REASON_ERROR),
        ("UNEXPECTED_TOOL_CALL", common_pb2.FINISH_REASON_ERROR),
        ("OTHER", common_pb2.FINISH_REASON_UNSPECIFIED),
        ("SOMETHING_NEW", common_pb2.FINISH_REASON_UNSPECIFIED),
    ],
)
def test_finish_reasons(finish: str, expected: int) -> None:
    _, decoder = decode(event(response([{"text": "x"}], finish)))
    decoder.on_eof()  # any finish reason makes the end complete
    assert decoder.outcome().finish_reason == expected


def test_missing_usage_is_estimated_from_characters() -> None:
    request = generate_request(messages=[user(text("x" * 40))])
    _, decoder = decode(event(response([{"text": "y" * 10}], "STOP")), request)
    usage = decoder.outcome().usage
    assert usage.estimated
    assert (usage.input_tokens, usage.output_tokens) == (10, 3)


def test_eof_without_a_finish_reason_is_incomplete() -> None:
    _, cut = decode(event(response([{"text": "partial"}])))
    with pytest.raises(SwitchyardError) as caught:
        cut.on_eof()
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.PROVIDER_UNAVAILABLE,
    )


def test_stray_candidates_are_ignored() -> None:
    body = response([{"text": "mine"}], "STOP")
    body["candidates"].append({"content": {"parts": [{"text": "other"}]}, "index": 1, "finishReason": "STOP"})
    events, _ = decode(event(body))
    assert [e.delta.text for e in events] == ["mine"]


def test_blocked_prompt_is_content_filtered() -> None:
    blocked = {
        "promptFeedback": {"blockReason": "PROHIBITED_CONTENT"},
        "usageMetadata": {"promptTokenCount": 9},
    }
    with pytest.raises(SwitchyardError) as caught:
        decode(event(blocked))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTENT_FILTERED)
    assert error.metadata["vendor_code"] == "PROHIBITED_CONTENT"
    assert error.metadata["vendor"] == "gemini"


@pytest.mark.parametrize(
    "data",
    [
        b'{"candidates":[{"content":{"parts":[{"text":"' + PROMPT.encode(),
        b"[1,2]",
        b'{"candidates":[{"content":{"parts":[{"text":5}]}}]}',
        b'{"candidates":{"x":1}}',
        b'{"candidates":[{"content":{"parts":{"text":"x"}}}]}',
        b'{"candidates":[{"content":{"parts":[{"functionCall":{"args":{}}}]}}]}',
        b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":"{}"}}]}}]}',
        b'{"candidates":[{"finishReason":3}]}',
        b'{"usageMetadata":{"promptTokenCount":"9"}}',
    ],
)
def test_malformed_events_are_protocol_errors_without_their_content(data: bytes) -> None:
    decoder = translator().new_decoder(generate_request())
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(data))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)


def test_in_stream_errors_map_like_http() -> None:
    decoder = translator().new_decoder(generate_request())
    internal = {"error": {"code": 500, "message": f"bad: {PROMPT}", "status": "INTERNAL"}}
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(internal)))
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert (error.metadata["in_stream"], error.metadata["http_status"]) == ("true", "500")
    assert error.metadata["vendor_code"] == "INTERNAL"
    assert PROMPT not in error.message and PROMPT not in str(error.metadata)
    limited = {
        "error": {
            "code": 429,
            "message": "slow down",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "12s"}],
        }
    }
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(orjson.dumps(limited)))
    assert caught.value.reason == Reason.RATE_LIMITED and caught.value.retry_after_s == 12.0
    # Only the status name: its HTTP status is inferred.
    with pytest.raises(SwitchyardError) as caught:
        decoder.on_event(SseEvent(b'{"error": {"status": "UNAVAILABLE"}}'))
    assert caught.value.reason == Reason.PROVIDER_OVERLOADED
    assert caught.value.metadata["http_status"] == "503"


def test_whole_json_bodies() -> None:
    one = response([{"text": "whole"}], "STOP", usage=USAGE)
    decoder = translator().new_decoder(generate_request())
    events = decoder.on_body(orjson.dumps(one))
    assert decoder.finished and events[0].delta.text == "whole"
    assert decoder.outcome().usage.cached_input_tokens == 8
    # streamGenerateContent without alt=sse: a JSON array of responses.
    array = [response([{"text": "a"}]), response([{"text": "b"}], "MAX_TOKENS", usage=USAGE)]
    decoder = translator().new_decoder(generate_request())
    assert [e.delta.text for e in decoder.on_body(orjson.dumps(array))] == ["a", "b"]
    assert decoder.outcome().finish_reason == common_pb2.FINISH_REASON_LENGTH
    with pytest.raises(SwitchyardError) as caught:
        translator().new_decoder(generate_request()).on_body(orjson.dumps([response([{"text": "cut"}])]))
    assert caught.value.reason == Reason.PROVIDER_UNAVAILABLE
    with pytest.raises(SwitchyardError) as caught:
        translator().new_decoder(generate_request()).on_body(b"<html>")
    assert caught.value.reason == Reason.UPSTREAM_PROTOCOL_ERROR


# --------------------------------------------------------------------------- #
# errors and headers
# --------------------------------------------------------------------------- #


def error_body(
    code: int, status: str, message: str = f"echo: {PROMPT}", details: list[Any] | None = None
) -> bytes:
    error: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        error["details"] = details
    return orjson.dumps({"error": error})


def error_info(reason: str) -> dict[str, Any]:
    return {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "googleapis.com"}


@pytest.mark.parametrize(
    ("status", "body", "grpc_code", "reason"),
    [
        (400, error_body(400, "INVALID_ARGUMENT"), grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        (
            400,
            error_body(
                400,
                "INVALID_ARGUMENT",
                "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        (
            400,
            error_body(400, "INVALID_ARGUMENT", "API key not valid.", [error_info("API_KEY_INVALID")]),
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (
            400,
            error_body(400, "FAILED_PRECONDITION", "User location is not supported for the API use."),
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (401, error_body(401, "UNAUTHENTICATED"), grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
        (403, error_body(403, "PERMISSION_DENIED"), grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
        (
            403,
            error_body(403, "PERMISSION_DENIED", details=[error_info("SERVICE_DISABLED")]),
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (404, error_body(404, "NOT_FOUND"), grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
        (408, error_body(408, "DEADLINE_EXCEEDED"), grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
        (429, error_body(429, "RESOURCE_EXHAUSTED"), grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        (500, error_body(500, "INTERNAL"), grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        (502, error_body(502, "UNAVAILABLE"), grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        (503, error_body(503, "UNAVAILABLE"), grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        (504, error_body(504, "DEADLINE_EXCEEDED"), grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
    ],
)
def test_error_table(status: int, body: bytes, grpc_code: grpc.StatusCode, reason: Reason) -> None:
    error = translator().map_error(status, httpx.Headers(), body)
    assert (error.code, error.reason) == (grpc_code, reason)
    assert error.metadata["provider"] == "gemini-main"
    assert error.metadata["vendor"] == "gemini"
    assert error.metadata["http_status"] == str(status)
    assert error.metadata["vendor_code"] == orjson.loads(body)["error"]["status"]
    for leak in (PROMPT, KEY, "echo", "token count", "API key", "location"):
        assert leak not in error.message
        assert all(leak not in value for value in error.metadata.values())


def test_error_metadata_names_reason_and_quota() -> None:
    quota = {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [{"quotaMetric": "m", "quotaId": "GenerateRequestsPerDayPerProjectPerModel-FreeTier"}],
    }
    error = translator().map_error(
        429,
        httpx.Headers(),
        error_body(429, "RESOURCE_EXHAUSTED", details=[error_info("RATE_LIMIT_EXCEEDED"), quota]),
    )
    assert error.metadata["vendor_reason"] == "RATE_LIMIT_EXCEEDED"
    assert error.metadata["quota_id"] == "GenerateRequestsPerDayPerProjectPerModel-FreeTier"


def test_unparsable_or_wrapped_error_bodies() -> None:
    error = translator().map_error(502, httpx.Headers(), b"<html>Error 502 (Server Error)!!1</html>")
    assert error.reason == Reason.PROVIDER_UNAVAILABLE and "vendor_code" not in error.metadata
    wrapped = b"[" + error_body(400, "INVALID_ARGUMENT", "x", [error_info("API_KEY_INVALID")]) + b"]"
    assert translator().map_error(400, httpx.Headers(), wrapped).reason == Reason.AUTH_FAILED


def test_retry_delay_sources() -> None:
    t = translator()

    def retry_info(delay: object) -> bytes:
        detail = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}
        return error_body(429, "RESOURCE_EXHAUSTED", details=[detail])

    assert t.map_error(429, httpx.Headers(), retry_info("30s")).retry_after_s == 30.0
    assert t.map_error(429, httpx.Headers(), retry_info("47.434392449s")).retry_after_s == pytest.approx(
        47.434392449
    )
    assert (
        t.map_error(429, httpx.Headers(), retry_info({"seconds": "2", "nanos": 500000000})).retry_after_s
        == 2.5
    )
    # A header, should one come, wins over the body.
    assert t.map_error(429, httpx.Headers({"retry-after": "7"}), retry_info("30s")).retry_after_s == 7.0
    assert t.map_error(429, httpx.Headers(), retry_info("soon")).retry_after_s == 1.0
    assert t.map_error(429, httpx.Headers(), b"").retry_after_s == 1.0
    unavailable = error_body(
        503,
        "UNAVAILABLE",
        details=[{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "3s"}],
    )
    assert t.map_error(503, httpx.Headers(), unavailable).retry_after_s == 3.0
    assert t.map_error(400, httpx.Headers({"retry-after": "3"}), b"").retry_after_s is None


def test_headroom_only_from_retry_after() -> None:
    t = translator()
    assert t.headroom(httpx.Headers({"content-type": "text/event-stream"})) is None
    headroom = t.headroom(httpx.Headers({"retry-after": "2"}))
    assert headroom is not None and headroom.retry_after_ms == 2000
    assert headroom.observed_at.seconds > 0
    assert not headroom.HasField("remaining_requests")
