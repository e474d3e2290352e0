"""The OpenAI HTTP front's translations, both ways, with no network.

OpenAI JSON -> ChatRequest (every parameter, and a 400 naming the parameter for what it
refuses); ChatChunks -> `chat.completion` / `chat.completion.chunk` objects, checked against
the official SDK's own types; SwitchyardError -> HTTP status, headers and OpenAI's error body.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

import grpc
import orjson
import pytest
from openai.types import Model as OpenAIModel
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from switchyard.common.catalog import load_catalog
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.edge.openai_http import (
    CompletionTranslator,
    OpenAIRequestError,
    error_response_parts,
    model_object,
    openai_param,
    parse_chat_request,
)
from switchyard.edge.validate import validate_chat_request
from switchyard.v1 import common_pb2

PNG = b"\x89PNG\r\n\x1a\nnot-really-an-image"

FULL_BODY: dict[str, Any] = {
    "model": "openai/gpt-4o-mini",
    "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "system", "content": [{"type": "text", "text": "Answer in English."}]},
        {
            "role": "user",
            "name": "ada",
            "content": [
                {"type": "text", "text": "What is in these pictures?"},
                {
                    "type": "image_url",
                    "image_url": {
                        "url": "data:image/png;base64," + base64.b64encode(PNG).decode(),
                        "detail": "low",
                    },
                },
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "look", "arguments": '{"zoom":2}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "a cat"},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "look",
                "description": "Look closer.",
                "parameters": {"type": "object", "properties": {"zoom": {"type": "integer"}}},
                "strict": True,
            },
        }
    ],
    "tool_choice": {"type": "function", "function": {"name": "look"}},
    "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "animal", "schema": {"type": "object"}, "strict": True},
    },
    "max_completion_tokens": 300,
    "temperature": 0.2,
    "top_p": 0.9,
    "stop": ["END", "STOP"],
    "seed": 7,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "user": "end-user-1",
    "metadata": {"team": "search"},
    "n": 1,
    "logprobs": False,
    "parallel_tool_calls": True,
    "store": False,
    "stream": True,
    "stream_options": {"include_usage": True},
    "switchyard": {
        "routing": {"preference": "ROUTING_PREFERENCE_COST", "region": "us"},
        "cache": {"mode": "CACHE_MODE_SKIP"},
        "conversation_id": "conv-9",
    },
}


def test_every_supported_parameter_lands_in_the_chat_request() -> None:
    call = parse_chat_request(
        FULL_BODY,
        {"x-request-id": "req-abc", "x-switchyard-priority": "High", "x-switchyard-timeout-ms": "2500"},
    )
    request = call.request
    assert (call.stream, call.include_usage, call.timeout_s) == (True, True, 2.5)
    assert (request.request_id, request.model) == ("req-abc", "openai/gpt-4o-mini")

    roles = [m.role for m in request.messages]
    assert roles == [
        common_pb2.ROLE_SYSTEM,
        common_pb2.ROLE_SYSTEM,
        common_pb2.ROLE_USER,
        common_pb2.ROLE_ASSISTANT,
        common_pb2.ROLE_TOOL,
    ]
    assert request.messages[0].parts[0].text == "Be brief."
    assert request.messages[1].parts[0].text == "Answer in English."
    user = request.messages[2]
    assert user.name == "ada" and user.parts[0].text == "What is in these pictures?"
    inline, linked = user.parts[1].image, user.parts[2].image
    assert (inline.data, inline.mime_type, inline.url, inline.detail) == (
        PNG,
        "image/png",
        "",
        common_pb2.IMAGE_DETAIL_LOW,
    )
    assert (linked.url, linked.data) == ("https://example.com/cat.jpg", b"")
    assistant = request.messages[3]
    assert not assistant.parts
    assert [(c.id, c.name, c.arguments_json) for c in assistant.tool_calls] == [
        ("call_1", "look", '{"zoom":2}')
    ]
    assert (request.messages[4].tool_call_id, request.messages[4].parts[0].text) == ("call_1", "a cat")

    (tool,) = request.tools
    assert (tool.name, tool.description, tool.strict) == ("look", "Look closer.", True)
    assert orjson.loads(tool.parameters_json_schema) == FULL_BODY["tools"][0]["function"]["parameters"]
    assert (request.tool_choice.mode, request.tool_choice.tool_name) == (
        common_pb2.TOOL_CHOICE_MODE_TOOL,
        "look",
    )
    fmt = request.response_format
    assert (fmt.type, fmt.schema_name, orjson.loads(fmt.json_schema), fmt.strict) == (
        common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        "animal",
        {"type": "object"},
        True,
    )

    sampling = request.sampling
    assert sampling.max_output_tokens == 300
    assert (sampling.temperature, sampling.top_p, sampling.seed) == (0.2, 0.9, 7)
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -0.5)
    assert list(sampling.stop_sequences) == ["END", "STOP"]

    assert request.metadata.end_user == "end-user-1"
    assert dict(request.metadata.tags) == {"team": "search"}
    assert request.metadata.conversation_id == "conv-9"
    assert request.routing.preference == common_pb2.ROUTING_PREFERENCE_COST
    assert (request.routing.region, request.routing.priority) == ("us", common_pb2.PRIORITY_HIGH)
    assert request.cache.mode == common_pb2.CACHE_MODE_SKIP
    # The translation is one the pipeline accepts as is.
    validate_chat_request(request)


def minimal(**extra: Any) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (minimal(), (None, (), False)),
        (minimal(max_tokens=20, stop="END"), (20, ("END",), False)),
        (minimal(response_format={"type": "json_object"}, stream=False), (None, (), False)),
        (minimal(stream=True), (None, (), True)),
    ],
    ids=["minimal", "legacy-max-tokens-and-stop-string", "json-object", "stream-without-usage"],
)
def test_simple_forms(body: dict[str, Any], expected: tuple[int | None, tuple[str, ...], bool]) -> None:
    call = parse_chat_request(body, {})
    sampling = call.request.sampling
    cap = sampling.max_output_tokens if sampling.HasField("max_output_tokens") else None
    assert (cap, tuple(sampling.stop_sequences), call.stream) == expected
    assert not call.include_usage
    assert len(call.request.request_id) == 32, "a request id is generated when none is given"
    if "response_format" in body:
        assert call.request.response_format.type == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    assert call.max_tokens_param == ("max_tokens" if "max_tokens" in body else "max_completion_tokens")


def with_message(message: dict[str, Any]) -> dict[str, Any]:
    return minimal(messages=[message])


def test_generated_request_ids_differ() -> None:
    assert (
        parse_chat_request(minimal(), {}).request.request_id
        != parse_chat_request(minimal(), {}).request.request_id
    )


@pytest.mark.parametrize(
    ("body", "headers", "param", "code"),
    [
        (minimal(foo=1), {}, "foo", "unknown_parameter"),
        (minimal(n=2), {}, "n", "unsupported_value"),
        (minimal(logprobs=True), {}, "logprobs", "unsupported_parameter"),
        (minimal(parallel_tool_calls=False), {}, "parallel_tool_calls", "unsupported_parameter"),
        (minimal(reasoning_effort="high"), {}, "reasoning_effort", "unsupported_parameter"),
        (minimal(logit_bias={"50256": -100}), {}, "logit_bias", "unsupported_parameter"),
        (minimal(stream_options={"include_usage": True}), {}, "stream_options", "invalid_value"),
        (
            minimal(stream=True, stream_options={"include_usage": "yes"}),
            {},
            "stream_options.include_usage",
            "invalid_type",
        ),
        (minimal(stream=True, stream_options={"chunk": 1}), {}, "stream_options.chunk", "unknown_parameter"),
        (minimal(temperature="hot"), {}, "temperature", "invalid_type"),
        (minimal(temperature=True), {}, "temperature", "invalid_type"),
        (minimal(seed=1.5), {}, "seed", "invalid_type"),
        (minimal(max_tokens=-1), {}, "max_tokens", "invalid_value"),
        (minimal(max_tokens=5, max_completion_tokens=5), {}, "max_tokens", "invalid_value"),
        (minimal(presence_penalty=3), {}, "presence_penalty", "invalid_value"),
        (minimal(stop=[1]), {}, "stop[0]", "invalid_type"),
        (minimal(metadata={"k": 1}), {}, "metadata.k", "invalid_type"),
        (minimal(model=""), {}, "model", "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}]}, {}, "model", "missing_required_parameter"),
        ({"model": "auto"}, {}, "messages", "missing_required_parameter"),
        (minimal(messages={}), {}, "messages", "invalid_type"),
        (with_message({"role": "robot", "content": "x"}), {}, "messages[0].role", "invalid_value"),
        (with_message({"content": "x"}), {}, "messages[0].role", "missing_required_parameter"),
        (
            with_message({"role": "user", "content": "x", "tool_call_id": "c"}),
            {},
            "messages[0].tool_call_id",
            "unknown_parameter",
        ),
        (
            with_message({"role": "tool", "content": "x"}),
            {},
            "messages[0].tool_call_id",
            "missing_required_parameter",
        ),
        (with_message({"role": "system", "content": 3}), {}, "messages[0].content", "invalid_type"),
        (
            with_message({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}),
            {},
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        (
            with_message(
                {"role": "system", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}
            ),
            {},
            "messages[0].content[0].type",
            "invalid_value",
        ),
        (
            with_message(
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!"}}],
                }
            ),
            {},
            "messages[0].content[0].image_url.url",
            "invalid_value",
        ),
        (
            with_message(
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}
            ),
            {},
            "messages[0].content[0].image_url.url",
            "invalid_value",
        ),
        (
            with_message(
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x", "detail": "max"}}],
                }
            ),
            {},
            "messages[0].content[0].image_url.detail",
            "invalid_value",
        ),
        (
            with_message({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}),
            {},
            "messages[0].function_call",
            "unsupported_parameter",
        ),
        (
            with_message(
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}],
                }
            ),
            {},
            "messages[0].tool_calls[0].function.arguments",
            "missing_required_parameter",
        ),
        (
            minimal(tools=[{"type": "custom", "custom": {"name": "x"}}]),
            {},
            "tools[0].type",
            "unsupported_value",
        ),
        (
            minimal(tools=[{"type": "function", "function": {"name": "f", "parameters": []}}]),
            {},
            "tools[0].function.parameters",
            "invalid_type",
        ),
        (minimal(tool_choice="sometimes"), {}, "tool_choice", "invalid_value"),
        (minimal(response_format={"type": "yaml"}), {}, "response_format.type", "invalid_value"),
        (
            minimal(
                response_format={"type": "json_schema", "json_schema": {"name": "a", "description": "d"}}
            ),
            {},
            "response_format.json_schema.description",
            "unsupported_parameter",
        ),
        (minimal(switchyard={"routing": {"priority": "URGENT"}}), {}, "switchyard.routing", "invalid_value"),
        (minimal(switchyard={"budget": 1}), {}, "switchyard.budget", "unknown_parameter"),
        (minimal(), {"x-switchyard-priority": "urgent"}, "x-switchyard-priority", "invalid_value"),
        (minimal(), {"x-switchyard-timeout-ms": "-5"}, "x-switchyard-timeout-ms", "invalid_value"),
        (minimal(), {"x-request-id": "has spaces"}, "x-request-id", "invalid_value"),
        ([1, 2], {}, None, "invalid_type"),
    ],
)
def test_refusals_name_the_parameter(
    body: Any, headers: dict[str, str], param: str | None, code: str
) -> None:
    with pytest.raises(OpenAIRequestError) as caught:
        parse_chat_request(body, headers)
    status, _, error_body = error_response_parts(caught.value)
    assert status == 400
    assert error_body["error"]["param"] == param
    assert error_body["error"]["code"] == code
    assert error_body["error"]["type"] == "invalid_request_error"


def test_refusal_messages_never_quote_the_prompt() -> None:
    secret = "my private prompt text"
    body = with_message({"role": "user", "content": [{"type": "text", "text": secret, "extra": secret}]})
    with pytest.raises(OpenAIRequestError) as caught:
        parse_chat_request(body, {})
    assert caught.value.param == "messages[0].content[0].extra"
    assert secret not in caught.value.message


def test_defaults_of_unsupported_parameters_are_accepted() -> None:
    body = minimal(
        n=1,
        logprobs=False,
        parallel_tool_calls=True,
        store=False,
        service_tier="auto",
        modalities=["text"],
        logit_bias={},
        audio=None,
        stream=True,
        stream_options={"include_usage": False, "include_obfuscation": False},
    )
    call = parse_chat_request(body, {})
    assert call.stream and not call.include_usage


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ("sampling.temperature", "temperature"),
        ("sampling.top_p", "top_p"),
        ("sampling.max_output_tokens", "max_completion_tokens"),
        ("sampling.stop_sequences", "stop"),
        ("messages", "messages"),
        ("messages[2].parts", "messages[2].content"),
        ("messages[2].parts[1]", "messages[2].content[1]"),
        ("messages[2].parts[1].image", "messages[2].content[1].image_url"),
        ("messages[0].role", "messages[0].role"),
        ("messages[3].tool_call_id", "messages[3].tool_call_id"),
        ("tools[1].name", "tools[1].function.name"),
        ("tools[0].parameters_json_schema", "tools[0].function.parameters"),
        ("tool_choice.tool_name", "tool_choice"),
        ("tool_choice.mode", "tool_choice"),
        ("response_format.json_schema", "response_format.json_schema"),
        ("metadata.end_user", "user"),
        ("model", "model"),
    ],
)
def test_pipeline_field_paths_become_openai_params(field: str, param: str) -> None:
    assert openai_param(field) == param


def test_pipeline_validation_errors_name_the_openai_param() -> None:
    # The same request, refused by the pipeline's validation (shared by both skins).
    call = parse_chat_request(minimal(temperature=5, max_tokens=0), {})
    with pytest.raises(SwitchyardError) as caught:
        validate_chat_request(call.request)
    status, _, body = error_response_parts(caught.value, call.max_tokens_param)
    assert (status, body["error"]["param"], body["error"]["code"]) == (400, "temperature", "invalid_value")

    call = parse_chat_request(minimal(max_tokens=0), {})
    with pytest.raises(SwitchyardError) as caught:
        validate_chat_request(call.request)
    _, _, body = error_response_parts(caught.value, call.max_tokens_param)
    assert body["error"]["param"] == "max_tokens", "errors name the parameter the caller used"

    call = parse_chat_request(with_message({"role": "user", "content": "   "}), {})
    with pytest.raises(SwitchyardError) as caught:
        validate_chat_request(call.request)
    _, _, body = error_response_parts(caught.value)
    assert body["error"]["param"] == "messages[0].content"


# -- errors ------------------------------------------------------------------------------------


def err(code: grpc.StatusCode, reason: Reason, **kwargs: Any) -> SwitchyardError:
    return SwitchyardError(code, reason, "what went wrong", **kwargs)


@pytest.mark.parametrize(
    ("error", "status", "code", "kind", "param"),
    [
        (
            invalid("temperature must be between 0 and 2", "sampling.temperature"),
            400,
            "invalid_value",
            "invalid_request_error",
            "temperature",
        ),
        (
            err(grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG),
            400,
            "context_length_exceeded",
            "invalid_request_error",
            "messages",
        ),
        (
            invalid("unknown model or alias 'x'", "model", model="x"),
            404,
            "model_not_found",
            "invalid_request_error",
            "model",
        ),
        (
            err(grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED),
            401,
            "invalid_api_key",
            "invalid_request_error",
            None,
        ),
        (
            err(grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED),
            403,
            "permission_denied",
            "invalid_request_error",
            None,
        ),
        (
            err(grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND, metadata={"model": "m"}),
            404,
            "model_not_found",
            "invalid_request_error",
            None,
        ),
        (
            err(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, retry_after_s=1.2),
            429,
            "rate_limit_exceeded",
            "requests",
            None,
        ),
        (
            err(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BUDGET_EXCEEDED),
            429,
            "insufficient_quota",
            "insufficient_quota",
            None,
        ),
        (
            err(grpc.StatusCode.UNAVAILABLE, Reason.ALL_ATTEMPTS_FAILED),
            503,
            "all_attempts_failed",
            "server_error",
            None,
        ),
        (err(grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT), 504, "timeout", "server_error", None),
        (
            err(grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_ROUTE),
            400,
            "no_route",
            "invalid_request_error",
            None,
        ),
        (
            err(grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
            502,
            "auth_failed",
            "server_error",
            None,
        ),
        (
            err(grpc.StatusCode.UNIMPLEMENTED, Reason.NOT_IMPLEMENTED),
            501,
            "not_implemented",
            "server_error",
            None,
        ),
        (err(grpc.StatusCode.INTERNAL, Reason.INTERNAL), 500, "internal", "server_error", None),
        (err(grpc.StatusCode.DATA_LOSS, Reason.INTERNAL), 500, "internal", "server_error", None),
    ],
)
def test_errors_map_to_http_status_and_openai_codes(
    error: SwitchyardError, status: int, code: str, kind: str, param: str | None
) -> None:
    got_status, _, body = error_response_parts(error)
    assert got_status == status
    assert body["error"]["code"] == code
    assert body["error"]["type"] == kind
    assert body["error"]["param"] == param
    assert body["error"]["message"] == error.message
    assert body["error"]["switchyard"]["reason"] == error.reason.value


def test_retry_headers() -> None:
    _, headers, _ = error_response_parts(
        err(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, retry_after_s=1.2)
    )
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("2", "1200")
    assert "x-should-retry" not in headers
    _, headers, _ = error_response_parts(err(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BUDGET_EXCEEDED))
    assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    _, headers, body = error_response_parts(
        err(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, metadata={"quota": "exhausted"})
    )
    assert headers["x-should-retry"] == "false" and body["error"]["code"] == "insufficient_quota"
    _, headers, _ = error_response_parts(err(grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED))
    assert headers["www-authenticate"] == "Bearer"


def test_error_metadata_travels_beside_openais_fields() -> None:
    error = err(
        grpc.StatusCode.UNAVAILABLE,
        Reason.ALL_ATTEMPTS_FAILED,
        metadata={"attempt_1": "openai/gpt-4o-mini@openai: PROVIDER_UNAVAILABLE"},
    )
    _, _, body = error_response_parts(error)
    assert body["error"]["switchyard"] == {
        "reason": "ALL_ATTEMPTS_FAILED",
        "metadata": {"attempt_1": "openai/gpt-4o-mini@openai: PROVIDER_UNAVAILABLE"},
    }


# -- response: chunks -> OpenAI objects ---------------------------------------------------------


def routing(model: str, attempt: int = 1) -> common_pb2.ChatChunk:
    return common_pb2.ChatChunk(
        routing=common_pb2.RoutingInfo(model=model, provider="openai", attempt=attempt)
    )


def text(value: str) -> common_pb2.ChatChunk:
    return common_pb2.ChatChunk(delta=common_pb2.Delta(text=value))


def tool(index: int, arguments: str, call_id: str = "", name: str = "") -> common_pb2.ChatChunk:
    fragment = common_pb2.ToolCallDelta(index=index, id=call_id, name=name, arguments_fragment=arguments)
    return common_pb2.ChatChunk(delta=common_pb2.Delta(tool_calls=[fragment]))


USAGE = common_pb2.ChatChunk(
    usage=common_pb2.Usage(input_tokens=20, output_tokens=9, cached_input_tokens=4, reasoning_tokens=2)
)


def done(finish: common_pb2.FinishReason.ValueType, cost: int = 1234) -> common_pb2.ChatChunk:
    return common_pb2.ChatChunk(
        done=common_pb2.Done(
            finish_reason=finish,
            cost_micros=cost,
            cache_status=common_pb2.CACHE_STATUS_BYPASS,
            request_id="r1",
            attempts=[common_pb2.AttemptSummary(attempt=1), common_pb2.AttemptSummary(attempt=2)],
        )
    )


def feed_all(translator: CompletionTranslator, chunks: list[common_pb2.ChatChunk]) -> list[dict[str, Any]]:
    return [event for chunk in chunks for event in translator.feed(chunk)]


def stream_of(include_usage: bool, chunks: list[common_pb2.ChatChunk]) -> list[dict[str, Any]]:
    translator = CompletionTranslator(
        request_id="r1", requested_model="fast", include_usage=include_usage, created=1_700_000_000
    )
    events = feed_all(translator, chunks)
    assert translator.finished
    return events


def test_stream_chunks_are_what_openai_sends() -> None:
    events = stream_of(
        True,
        [
            routing("openai/gpt-4o-mini"),
            routing("openai/gpt-4.1-mini", attempt=2),
            text("Hel"),
            text("lo"),
            USAGE,
            done(common_pb2.FINISH_REASON_STOP),
        ],
    )
    envelope = {
        "id": "chatcmpl-r1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "openai/gpt-4.1-mini",
        "system_fingerprint": None,
    }

    def choice(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            **envelope,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            "usage": None,
        }

    assert events[:4] == [
        choice({"role": "assistant", "content": "", "refusal": None}),
        choice({"content": "Hel"}),
        choice({"content": "lo"}),
        choice({}, "stop"),
    ]
    assert events[4] == {
        **envelope,
        "choices": [],
        "usage": {
            "prompt_tokens": 20,
            "completion_tokens": 9,
            "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 4, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 2,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        "switchyard": {
            "request_id": "r1",
            "model": "openai/gpt-4.1-mini",
            "provider": "openai",
            "cost_micros": 1234,
            "saved_micros": 0,
            "cache_status": "bypass",
            "usage_estimated": False,
            "attempts": 2,
        },
    }
    assert len(events) == 5
    for event in events:
        ChatCompletionChunk.model_validate(event)  # the SDK's own type accepts every chunk


def test_stream_without_usage_puts_the_cost_on_the_finish_chunk() -> None:
    events = stream_of(
        False, [routing("openai/gpt-4o-mini"), text("Hi"), USAGE, done(common_pb2.FINISH_REASON_LENGTH)]
    )
    assert all(event["choices"] for event in events) and all("usage" not in event for event in events)
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "length"
    assert last["switchyard"]["cost_micros"] == 1234
    assert "switchyard" not in events[0]


def test_tool_call_fragments_carry_id_type_and_name_on_the_first_fragment_only() -> None:
    events = stream_of(
        False,
        [
            routing("openai/gpt-4o-mini"),
            tool(0, '{"ci', call_id="call_a", name="weather"),
            tool(0, 'ty":"Oslo"}'),
            tool(1, "{}", call_id="call_b", name="time"),
            USAGE,
            done(common_pb2.FINISH_REASON_TOOL_CALLS),
        ],
    )
    deltas = [event["choices"][0]["delta"] for event in events]
    assert deltas[0]["role"] == "assistant"
    assert deltas[1:4] == [
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"ci'},
                }
            ]
        },
        {"tool_calls": [{"index": 0, "function": {"arguments": 'ty":"Oslo"}'}}]},
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "time", "arguments": "{}"},
                }
            ]
        },
    ]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_a_tool_call_without_a_vendor_id_gets_one() -> None:
    translator = CompletionTranslator(request_id="r", requested_model="auto", streaming=False)
    feed_all(
        translator,
        [routing("openai/gpt-4o"), tool(0, "{}", name="f"), done(common_pb2.FINISH_REASON_UNSPECIFIED)],
    )
    completion = translator.completion()
    (call,) = completion["choices"][0]["message"]["tool_calls"]
    assert call["id"].startswith("call_") and len(call["id"]) > len("call_")
    assert completion["choices"][0]["finish_reason"] == "tool_calls", (
        "unspecified with tool calls means tool_calls"
    )


def test_whole_completion() -> None:
    translator = CompletionTranslator(request_id="r1", requested_model="fast", streaming=False, created=5)
    events = feed_all(
        translator,
        [
            routing("openai/gpt-4o-mini"),
            common_pb2.ChatChunk(delta=common_pb2.Delta(reasoning_text="thinking")),
            text("The answer"),
            text(" is 4."),
            USAGE,
            done(common_pb2.FINISH_REASON_STOP, cost=77),
        ],
    )
    assert events == [], "a whole answer produces no chunks"
    completion = translator.completion()
    parsed = ChatCompletion.model_validate(completion)
    assert parsed.id == "chatcmpl-r1" and parsed.object == "chat.completion" and parsed.created == 5
    assert parsed.model == "openai/gpt-4o-mini"
    message = parsed.choices[0].message
    assert (message.role, message.content, message.tool_calls) == ("assistant", "The answer is 4.", None)
    assert completion["choices"][0]["message"]["reasoning_content"] == "thinking"
    assert parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None and parsed.usage.total_tokens == 29
    assert (
        parsed.usage.prompt_tokens_details is not None
        and parsed.usage.prompt_tokens_details.cached_tokens == 4
    )
    details = parsed.usage.completion_tokens_details
    assert details is not None and details.reasoning_tokens == 2
    assert completion["switchyard"]["cost_micros"] == 77


def test_whole_tool_call_answer_has_null_content() -> None:
    translator = CompletionTranslator(request_id="r", requested_model="auto", streaming=False)
    feed_all(
        translator,
        [
            routing("openai/gpt-4o"),
            tool(0, '{"a":', "call_x", "f"),
            tool(0, "1}"),
            USAGE,
            done(common_pb2.FINISH_REASON_TOOL_CALLS),
        ],
    )
    parsed = ChatCompletion.model_validate(translator.completion())
    message = parsed.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None
    (call,) = message.tool_calls
    assert (call.id, call.type) == ("call_x", "function")
    assert call.function.name == "f" and orjson.loads(call.function.arguments) == {"a": 1}


def test_missing_usage_is_reported_as_estimated() -> None:
    translator = CompletionTranslator(request_id="r", requested_model="auto", streaming=False)
    feed_all(translator, [routing("openai/gpt-4o"), text("x"), done(common_pb2.FINISH_REASON_STOP)])
    assert translator.completion()["switchyard"]["usage_estimated"] is True


def test_a_provider_error_finish_is_an_error_not_a_stop() -> None:
    translator = CompletionTranslator(request_id="r", requested_model="auto")
    feed_all(translator, [routing("openai/gpt-4o"), text("partial")])
    with pytest.raises(SwitchyardError) as caught:
        translator.feed(done(common_pb2.FINISH_REASON_ERROR))
    assert caught.value.reason is Reason.PROVIDER_UNAVAILABLE


def test_nothing_is_emitted_before_the_first_output() -> None:
    translator = CompletionTranslator(request_id="r", requested_model="auto")
    assert translator.feed(routing("openai/gpt-4o")) == [] and not translator.started
    assert translator.feed(common_pb2.ChatChunk(delta=common_pb2.Delta())) == [], "empty deltas are skipped"
    assert len(translator.feed(text("a"))) == 2 and translator.started


def test_model_objects_match_the_sdk_type() -> None:
    catalog = load_catalog(None)
    model = catalog.models[0]
    obj = model_object(model, catalog)
    parsed = OpenAIModel.model_validate(copy.deepcopy(obj))
    assert (parsed.id, parsed.object, parsed.owned_by) == (model.id, "model", model.provider)
    assert obj["switchyard"]["context_window_tokens"] == model.context_window
