"""Mistral AI chat completions simulator (aiohttp), on the shared engine.

Speaks ``POST /v1/chat/completions`` (JSON and SSE) and ``GET /v1/models`` closely enough
that the official ``mistralai`` SDK parses it (``Mistral(server_url=<root>)``: the SDK's
paths carry the ``/v1`` prefix), with :class:`~switchyard.sim.faults.FaultKnobs` for
latency and failures. What the real API does, mirrored here (see the translator's module
docstring for the sources):

* Requests are validated like the API does it, in two layers. The request schema (a 422
  ``{"detail": [{"type", "loc", "msg", "input"}]}``): required ``model`` and ``messages``,
  types, roles, and *no unknown field* (``extra_forbidden``: ``stream_options``, ``user``,
  ``seed``, ``max_completion_tokens``, a ``name`` on a user message...). Then the
  conversation, as ``mistral-common`` validates it for serving (a 400): at least one
  message, a lone message is user or system, the last one is user or tool (or an
  assistant with ``prefix: true``), roles follow each other as Mistral allows, tool-call
  ids are nine letters or digits, function names 1-64 of ``[A-Za-z0-9_-]``.
* Errors: ``{"object": "error", "message", "type", "param", "code", "raw_status_code"}``
  with Mistral's numeric string codes; ``error_code`` selects one (``3051`` the
  context-window message, ``1500`` an unknown model, ``3810`` a model out of capacity,
  ``1300`` rate limited, ``1910`` a model outside the plan, ``3800`` unavailable). A wrong
  key gets the gateway's 401 ``{"detail": "Invalid API Key"}``, a missing one
  ``{"message": "No API key found in request", "request_id"}``; 404 and 422 are FastAPI's
  ``{"detail": ...}``.
* Streams: ``data: <chat.completion.chunk>`` events ending with ``data: [DONE]``. The
  first chunk is ``delta {"role": "assistant", "content": ""}``; text follows as string
  deltas; with reasoning tokens a ``thinking`` content chunk comes first; a tool call
  arrives whole in one delta (nine-character id, name and complete arguments, no
  ``index``) and that chunk also finishes; the last chunk carries ``finish_reason`` and
  ``usage`` (``prompt_tokens_details.cached_tokens``; reasoning tokens are only counted
  in ``completion_tokens``). A failure mid-stream is a chunk finishing with ``error``,
  then ``[DONE]`` (Mistral cannot say "rate limited" inside a stream).
* Headers: ``mistral-correlation-id`` and ``x-kong-request-id`` (UUIDv7 text),
  ``x-ratelimit-{limit,remaining}-req-minute`` and
  ``x-ratelimit-{limit,remaining}-tokens-minute`` (no reset header), ``retry-after`` on
  errors when the knob asks for it.

Token accounting is the OpenAI simulator's approximation (``prompt_tokens`` there).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final, Literal

from aiohttp import web

from switchyard.sim.engine import (
    Answer,
    CallContext,
    ChatCall,
    Dialect,
    Reply,
    ToolSpec,
    build_simulator_app,
    json_reply,
    new_id,
    sse,
)
from switchyard.sim.faults import (
    FaultKnobs,
    RateLimitSnapshot,
    RunningSimulator,
    deterministic_text,
    seed_bytes,
    start_simulator,
)
from switchyard.sim.openai import prompt_tokens

__all__ = [
    "API_PREFIX",
    "MAX_CONTEXT_TOKENS",
    "MODELS",
    "RunningSimulator",
    "build_app",
    "error_body",
    "start_simulator",
]

#: Path prefix of the API (catalog base URL ``https://api.mistral.ai/v1``).
API_PREFIX = "/v1"

#: Models listed by ``GET /v1/models`` (any model name is accepted for chat).
MODELS: tuple[str, ...] = (
    "mistral-small-latest",
    "mistral-medium-latest",
    "mistral-large-latest",
    "magistral-small-latest",
    "magistral-medium-latest",
    "ministral-8b-latest",
    "codestral-latest",
    "pixtral-large-latest",
)
MAX_CONTEXT_TOKENS = 131_072
_CREATED = 1_735_689_600

# Top-level fields of `ChatCompletionRequest` / `ChatCompletionStreamRequest` (SDK models).
_REQUEST_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "temperature",
        "top_p",
        "max_tokens",
        "stream",
        "stop",
        "random_seed",
        "metadata",
        "response_format",
        "tools",
        "tool_choice",
        "presence_penalty",
        "frequency_penalty",
        "min_tokens",
        "repetition_penalty",
        "top_k",
        "logprobs",
        "top_logprobs",
        "prompt_logprobs",
        "top_prompt_logprobs",
        "n",
        "prediction",
        "parallel_tool_calls",
        "reasoning_effort",
        "prompt_mode",
        "guardrails",
        "prompt_cache_key",
        "service_tier",
        "safe_prompt",
    }
)
# Fields of each message model, by role (`SystemMessage`, `UserMessage`, ...).
_MESSAGE_FIELDS: Final[dict[str, frozenset[str]]] = {
    "system": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    "assistant": frozenset({"role", "content", "tool_calls", "prefix"}),
    "tool": frozenset({"role", "content", "tool_call_id", "name"}),
}
_CHUNK_TYPES: Final = frozenset(
    {
        "text",
        "image_url",
        "document_url",
        "reference",
        "file",
        "thinking",
        "input_audio",
        "resource",
        "resource_link",
    }
)
_TOOL_CHOICES: Final = ("auto", "none", "any", "required")
_FORMAT_TYPES: Final = ("text", "json_object", "json_schema")
_FLOAT_FIELDS: Final = ("temperature", "top_p", "presence_penalty", "frequency_penalty")
_INT_FIELDS: Final = ("max_tokens", "random_seed")
_BOOL_FIELDS: Final = ("stream", "safe_prompt", "parallel_tool_calls")
_CALL_ID: Final = re.compile(r"[A-Za-z0-9]{9}")
_FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Which role may follow which (`mistral-common`, `_validate_message_order`).
_NEXT_ROLES: Final[dict[str, frozenset[str]]] = {
    "system": frozenset({"user", "assistant", "system"}),
    "user": frozenset({"assistant", "system", "user"}),
    "assistant": frozenset({"assistant", "user", "tool"}),
    "tool": frozenset({"assistant", "tool"}),
}

# --------------------------------------------------------------------------- #
# error bodies
# --------------------------------------------------------------------------- #

#: status -> (type, code, message)
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated error)."),
    403: ("tier_not_allowed", "1910", "This model is not available in your subscription tier"),
    429: ("rate_limited", "1300", "Rate limit exceeded"),
    500: ("internal_server_error", None, "Internal server error."),
    503: ("internal_server_error", "3800", "Service unavailable."),
}
#: code -> (status-independent type, message template)
_CODE_ERRORS: dict[str, tuple[str, str]] = {
    "3051": (
        "invalid_request_invalid_args",
        "Prompt contains {prompt_tokens} tokens and 0 draft tokens, too large for model with "
        + str(MAX_CONTEXT_TOKENS)
        + " maximum context length",
    ),
    "3230": (
        "invalid_request_message_order",
        "Expected last role User or Tool (or Assistant with prefix True) for serving but got assistant",
    ),
    "1500": ("invalid_model", "Invalid model: {model}"),
    "1300": ("rate_limited", "Rate limit exceeded"),
    "1910": ("tier_not_allowed", "This model is not available in your subscription tier"),
    "3800": ("internal_server_error", "Service unavailable."),
    "3810": ("engine_max_pending_tokens", "Capacity exceeded for this model."),
}


def error_body(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    model: str = "mistral-small-latest",
    prompt_tokens: int = 0,
) -> dict[str, object]:
    """Mistral's JSON error body for ``status`` (``code`` picks a known error's type and
    message; ``message`` overrides the text). 401, 404 and 422 are not in this shape: see
    `gateway_error`."""
    err_type, err_code, text = _STATUS_ERRORS.get(
        status,
        ("invalid_request_error", None, f"Simulated HTTP {status} error.")
        if status < 500
        else ("internal_server_error", None, "Internal server error."),
    )
    if code is not None:
        err_code = code
        if code in _CODE_ERRORS:
            err_type, text = _CODE_ERRORS[code]
    if message is None:
        message = text.format(model=model, prompt_tokens=max(prompt_tokens, MAX_CONTEXT_TOKENS + 1))
    return {
        "object": "error",
        "message": message,
        "type": err_type,
        "param": None,
        "code": err_code,
        "raw_status_code": status,
    }


def gateway_error(status: int, message: str | None = None) -> dict[str, object]:
    """The body of a 401, 404 or 422, which Mistral's gateway and FastAPI write."""
    if status == 401:
        return {"detail": message or "Invalid API Key"}
    if status == 422:
        detail = _detail(
            "extra_forbidden", ["body", "simulated"], message or "Extra inputs are not permitted", True
        )
        return {"detail": [detail]}
    return {"detail": message or "Not Found"}


def _detail(kind: str, loc: list[str | int], msg: str, value: object) -> dict[str, object]:
    """One pydantic validation error as FastAPI reports it."""
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def _uuid7() -> str:
    """A UUIDv7 (48-bit millisecond time, then random bits), as Mistral's ids look."""
    value = int(time.time() * 1000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return str(uuid.UUID(int=value))


# --------------------------------------------------------------------------- #
# request validation
# --------------------------------------------------------------------------- #


def _schema_errors(body: Mapping[str, Any]) -> list[dict[str, object]]:
    """The 422 validation errors of a request body (empty when it is well-formed)."""
    errors: list[dict[str, object]] = []
    for key in body:
        if key not in _REQUEST_FIELDS:
            errors.append(
                _detail("extra_forbidden", ["body", key], "Extra inputs are not permitted", body[key])
            )
    model = body.get("model")
    if "model" not in body:
        errors.append(_detail("missing", ["body", "model"], "Field required", dict(body)))
    elif not isinstance(model, str):
        errors.append(_detail("string_type", ["body", "model"], "Input should be a valid string", model))
    messages = body.get("messages")
    if "messages" not in body:
        errors.append(_detail("missing", ["body", "messages"], "Field required", dict(body)))
    elif not isinstance(messages, list):
        errors.append(_detail("list_type", ["body", "messages"], "Input should be a valid list", messages))
    else:
        for i, message in enumerate(messages):
            errors.extend(_message_errors(message, ["body", "messages", i]))
    for name in _FLOAT_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            errors.append(_detail("float_type", ["body", name], "Input should be a valid number", value))
    for name in _INT_FIELDS:
        value = body.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            errors.append(_detail("int_type", ["body", name], "Input should be a valid integer", value))
    for name in _BOOL_FIELDS:
        value = body.get(name)
        if value is not None and not isinstance(value, bool):
            errors.append(_detail("bool_type", ["body", name], "Input should be a valid boolean", value))
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        errors.append(_detail("string_type", ["body", "stop"], "Input should be a valid string", stop))
    errors.extend(_tool_errors(body.get("tools"), body.get("tool_choice")))
    errors.extend(_format_errors(body.get("response_format")))
    return errors


def _message_errors(message: object, loc: list[str | int]) -> list[dict[str, object]]:
    if not isinstance(message, dict):
        return [
            _detail("model_attributes_type", loc, "Input should be a valid dictionary or object", message)
        ]
    role = message.get("role")
    fields = _MESSAGE_FIELDS.get(role) if isinstance(role, str) else None
    if fields is None or not isinstance(role, str):
        return [
            _detail(
                "union_tag_invalid",
                loc,
                "Input tag does not match any of the expected tags: 'assistant', 'system', 'tool', 'user'",
                message,
            )
        ]
    loc = [*loc, role]
    errors = [
        _detail("extra_forbidden", [*loc, key], "Extra inputs are not permitted", message[key])
        for key in message
        if key not in fields
    ]
    if role != "assistant" and "content" not in message:
        errors.append(_detail("missing", [*loc, "content"], "Field required", message))
    content = message.get("content")
    if isinstance(content, list):
        for j, chunk in enumerate(content):
            errors.extend(_chunk_errors(chunk, [*loc, "content", j]))
    elif content is not None and not isinstance(content, str):
        errors.append(_detail("string_type", [*loc, "content"], "Input should be a valid string", content))
    calls = message.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            errors.append(_detail("list_type", [*loc, "tool_calls"], "Input should be a valid list", calls))
        else:
            for j, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    errors.append(
                        _detail("missing", [*loc, "tool_calls", j, "function"], "Field required", call)
                    )
                elif not isinstance(function.get("arguments"), (str, dict)):
                    errors.append(
                        _detail(
                            "string_type",
                            [*loc, "tool_calls", j, "function", "arguments"],
                            "Input should be a valid string",
                            function.get("arguments"),
                        )
                    )
    return errors


def _chunk_errors(chunk: object, loc: list[str | int]) -> list[dict[str, object]]:
    kind = chunk.get("type") if isinstance(chunk, dict) else None
    if not isinstance(chunk, dict) or kind not in _CHUNK_TYPES:
        return [_detail("union_tag_invalid", loc, "Input tag does not match any of the expected tags", chunk)]
    if kind == "text" and not isinstance(chunk.get("text"), str):
        return [
            _detail(
                "string_type", [*loc, "text", "text"], "Input should be a valid string", chunk.get("text")
            )
        ]
    if kind == "image_url":
        image = chunk.get("image_url")
        if not (isinstance(image, str) or (isinstance(image, dict) and isinstance(image.get("url"), str))):
            return [
                _detail(
                    "string_type", [*loc, "image_url", "image_url"], "Input should be a valid string", image
                )
            ]
        extra = [key for key in chunk if key not in ("type", "image_url")]
        if isinstance(image, dict):
            extra += [f"image_url.{key}" for key in image if key not in ("url", "detail")]
        return [
            _detail("extra_forbidden", [*loc, key], "Extra inputs are not permitted", None) for key in extra
        ]
    return []


def _tool_errors(tools: object, choice: object) -> list[dict[str, object]]:
    errors: list[dict[str, object]] = []
    if tools is not None:
        if not isinstance(tools, list):
            return [_detail("list_type", ["body", "tools"], "Input should be a valid list", tools)]
        for i, tool in enumerate(tools):
            loc: list[str | int] = ["body", "tools", i]
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or tool.get("type", "function") != "function":
                errors.append(_detail("literal_error", [*loc, "type"], "Input should be 'function'", tool))
            elif not isinstance(function, dict) or not isinstance(function.get("name"), str):
                errors.append(_detail("missing", [*loc, "function", "name"], "Field required", tool))
            elif not isinstance(function.get("parameters"), dict):
                errors.append(
                    _detail("missing", [*loc, "function", "parameters"], "Field required", function)
                )
    if choice is None or (isinstance(choice, str) and choice in _TOOL_CHOICES):
        return errors
    if isinstance(choice, dict):
        function = choice.get("function")
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            return errors
    errors.append(
        _detail(
            "enum", ["body", "tool_choice"], "Input should be 'auto', 'none', 'any' or 'required'", choice
        )
    )
    return errors


def _format_errors(fmt: object) -> list[dict[str, object]]:
    if fmt is None:
        return []
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if not isinstance(fmt, dict) or kind not in _FORMAT_TYPES:
        return [
            _detail(
                "enum",
                ["body", "response_format", "type"],
                "Input should be 'text', 'json_object' or 'json_schema'",
                fmt,
            )
        ]
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("name"), str)
            or not isinstance(spec.get("schema"), dict)
        ):
            return [_detail("missing", ["body", "response_format", "json_schema"], "Field required", spec)]
    return []


def _conversation_error(body: Mapping[str, Any]) -> dict[str, object] | None:
    """The 400 `mistral-common` gives a conversation it cannot serve, else None."""
    messages: list[dict[str, Any]] = body["messages"]

    def structure(text: str) -> dict[str, object]:
        return error_body(400, code="3230", message=text)

    def invalid_args(text: str) -> dict[str, object]:
        return error_body(400, code="3051", message=text)

    if not messages:
        return structure("Conversation must have at least one message")
    roles = [str(message["role"]) for message in messages]
    if len(messages) == 1 and roles[0] not in ("user", "system"):
        return structure("Conversation must start with a user message or system message")
    last = messages[-1]
    if len(messages) > 1 and roles[-1] not in ("user", "tool") and not last.get("prefix"):
        return structure(
            f"Expected last role User or Tool (or Assistant with prefix True) for serving but got {roles[-1]}"
        )
    for previous, current in zip(roles, roles[1:], strict=False):
        if current not in _NEXT_ROLES[previous]:
            return structure(f"Unexpected role '{current}' after role '{previous}'")
    for message in messages:
        for call in message.get("tool_calls") or ():
            call_id = str(call.get("id", "null"))
            if not _CALL_ID.fullmatch(call_id):
                return invalid_args(
                    f"Tool call id was {call_id} but must be a-z, A-Z, 0-9, with a length of 9."
                )
            if not _FUNCTION_NAME.fullmatch(call["function"]["name"]):
                return invalid_args("Function name must be a-z, A-Z, 0-9, or contain underscores and dashes.")
        if message["role"] == "assistant" and not message.get("content") and not message.get("tool_calls"):
            return invalid_args("Assistant message must have either content or tool_calls.")
        if message["role"] == "tool":
            answered = message.get("tool_call_id")
            if not isinstance(answered, str) or not _CALL_ID.fullmatch(answered):
                return invalid_args(
                    f"Tool call id was {answered} but must be a-z, A-Z, 0-9, with a length of 9."
                )
    for tool in body.get("tools") or ():
        if not _FUNCTION_NAME.fullmatch(tool["function"]["name"]):
            return invalid_args("Function name must be a-z, A-Z, 0-9, or contain underscores and dashes.")
    return None


def _tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    return tuple(
        ToolSpec(str(tool["function"]["name"]), tool["function"]["parameters"])
        for tool in body.get("tools") or ()
    )


def _tool_choice(choice: object) -> str | None:
    """The engine's `tool_choice`: `any` (or `required`) forces a call; a named function
    forces that one."""
    if isinstance(choice, dict):
        return str(choice["function"]["name"])
    if choice in ("any", "required"):
        return "required"
    return choice if isinstance(choice, str) else None


def _json_mode(body: Mapping[str, Any]) -> tuple[Literal["object", "schema"] | None, object]:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema" and isinstance(fmt, dict):
        return "schema", fmt["json_schema"]["schema"]
    if kind == "json_object":
        return "object", None
    return None, None


def usage_object(answer: Answer) -> dict[str, object]:
    """Mistral's `usage`: reasoning tokens are part of `completion_tokens`, not reported."""
    return {
        "prompt_tokens": answer.prompt_tokens,
        "total_tokens": answer.prompt_tokens + answer.output_tokens,
        "completion_tokens": answer.output_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
    }


# --------------------------------------------------------------------------- #
# the dialect
# --------------------------------------------------------------------------- #


class MistralDialect(Dialect):
    """Chat completions as Mistral speaks them."""

    def __init__(self, api_key: str | None) -> None:
        super().__init__(api_key)
        self._expected_auth = f"Bearer {api_key}" if api_key is not None else None

    def new_context(self, request: web.Request) -> CallContext:
        return CallContext(
            request_id=_uuid7(), started=time.perf_counter(), created=int(time.time()), request=request
        )

    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        if self._expected_auth is None:
            return None
        header = request.headers.get("Authorization")
        if header == self._expected_auth:
            return None
        if not header:
            return Reply(401, {"message": "No API key found in request", "request_id": ctx.request_id})
        return Reply(401, gateway_error(401))

    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        if body is None:
            detail = _detail("json_invalid", ["body", 0], "JSON decode error", {})
            return Reply(422, {"detail": [detail]})
        if not isinstance(body, dict):
            detail = _detail(
                "model_attributes_type", ["body"], "Input should be a valid dictionary or object", body
            )
            return Reply(422, {"detail": [detail]})
        errors = _schema_errors(body)
        if errors:
            return Reply(422, {"detail": errors})
        problem = _conversation_error(body)
        if problem is not None:
            return Reply(400, problem)
        json_mode, json_schema = _json_mode(body)
        limit = body.get("max_tokens")
        ctx.response_id = uuid.uuid4().hex
        return ChatCall(
            model=str(body["model"]),
            stream=body.get("stream") is True,
            prompt_tokens=prompt_tokens(body["messages"]),
            seed=seed_bytes(body["messages"]),
            tools=_tools(body),
            tool_choice=_tool_choice(body.get("tool_choice")),
            json_mode=json_mode,
            json_schema=json_schema,
            max_tokens=limit if isinstance(limit, int) and limit >= 0 else None,
        )

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        if status in (401, 404, 422) and knobs.error_code is None:
            return Reply(status, gateway_error(status, knobs.error_message))
        return Reply(status, self._error_body(status, knobs, call))

    def _error_body(self, status: int, knobs: FaultKnobs, call: ChatCall | None) -> dict[str, object]:
        return error_body(
            status,
            code=knobs.error_code,
            message=knobs.error_message,
            model=call.model if call is not None else "mistral-small-latest",
            prompt_tokens=call.prompt_tokens if call is not None else 0,
        )

    def knob_error(self, message: str, knob: str | None) -> Reply:
        body = error_body(400, code=None, message=message)
        return Reply(400, {**body, "type": "invalid_sim_knobs", "param": knob})

    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        elapsed = str(ctx.elapsed_ms())
        headers = {
            "mistral-correlation-id": ctx.request_id,
            "x-kong-request-id": _uuid7(),
            "x-envoy-upstream-service-time": elapsed,
            "x-kong-upstream-latency": elapsed,
            "x-kong-proxy-latency": "1",
        }
        if snap is not None:
            headers["x-ratelimit-limit-req-minute"] = str(snap.limit_requests)
            headers["x-ratelimit-remaining-req-minute"] = str(snap.remaining_requests)
            headers["x-ratelimit-limit-tokens-minute"] = str(snap.limit_tokens)
            headers["x-ratelimit-remaining-tokens-minute"] = str(snap.remaining_tokens)
        return headers

    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        message: dict[str, object] = {"role": "assistant"}
        if answer.tool_name is not None:
            message["tool_calls"] = [_whole_call(answer)]
        else:
            message["tool_calls"] = None
            if answer.reasoning_tokens:
                message["content"] = [
                    {
                        "type": "thinking",
                        "thinking": [{"type": "text", "text": _thoughts(call)}],
                        "closed": True,
                    },
                    {"type": "text", "text": answer.text or ""},
                ]
            else:
                message["content"] = answer.text
        return {
            "id": ctx.response_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": call.model,
            "choices": [{"index": 0, "finish_reason": answer.finish, "message": message, "logprobs": None}],
            "usage": usage_object(answer),
        }

    def _chunk(
        self, call: ChatCall, ctx: CallContext, delta: dict[str, object], finish: str | None
    ) -> dict[str, Any]:
        return {
            "id": ctx.response_id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": call.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
        }

    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        frames = [sse(self._chunk(call, ctx, {"role": "assistant", "content": ""}, None))]
        if answer.tool_name is not None:
            last = self._chunk(
                call, ctx, {"content": None, "tool_calls": [_whole_call(answer)]}, answer.finish
            )
            return [*frames, sse({**last, "usage": usage_object(answer)})]
        if answer.reasoning_tokens:
            thinking = {"type": "thinking", "thinking": [{"type": "text", "text": _thoughts(call)}]}
            frames.append(sse(self._chunk(call, ctx, {"content": [thinking]}, None)))
        for piece in answer.text_pieces(chunks):
            frames.append(sse(self._chunk(call, ctx, {"content": piece}, None)))
        last = self._chunk(call, ctx, {"content": ""}, answer.finish)
        frames.append(sse({**last, "usage": usage_object(answer)}))
        return frames

    def stream_end(self, call: ChatCall, ctx: CallContext) -> bytes:
        return b"data: [DONE]\n\n"

    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        # Mistral reports a failed generation as a chunk finishing with `error`; it has no
        # in-stream error object, so the status (even 429) cannot be told to the client.
        return sse(self._chunk(call, ctx, {"content": ""}, "error")) + self.stream_end(call, ctx)

    def malformed(self, ctx: CallContext) -> bytes:
        return (
            b'data: {"id":"' + ctx.response_id.encode() + b'","object":"chat.completion.chunk",'
            b'"choices":[{"index":0,"delta":{"content":"\n\n'
        )

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models` and `GET /v1/models/{model_id}` (not chat requests)."""
        headers, refused = self.start_read(request)
        if refused is not None:
            return refused
        wanted = request.match_info.get("model_id")
        if wanted is None:
            return json_reply(200, {"object": "list", "data": [_model_card(m) for m in MODELS]}, headers)
        if wanted not in MODELS:
            return json_reply(404, gateway_error(404), headers)
        return json_reply(200, _model_card(wanted), headers)


def _whole_call(answer: Answer) -> dict[str, object]:
    """A tool call as Mistral sends it: whole, with a nine-character id and no index."""
    return {"id": new_id("", 9), "function": {"name": answer.tool_name, "arguments": answer.tool_arguments}}


def _thoughts(call: ChatCall) -> str:
    """Deterministic reasoning text for a reasoning answer."""
    return deterministic_text(call.seed + b"/thinking")


def _model_card(model: str) -> dict[str, object]:
    reasoning = model.startswith("magistral")
    return {
        "id": model,
        "object": "model",
        "created": _CREATED,
        "owned_by": "mistralai",
        "capabilities": {
            "completion_chat": True,
            "completion_fim": model.startswith("codestral"),
            "function_calling": True,
            "fine_tuning": False,
            "vision": not reasoning and not model.startswith("codestral"),
            "reasoning": reasoning,
            "classification": False,
        },
        "name": model,
        "description": f"Simulated {model}",
        "max_context_length": MAX_CONTEXT_TOKENS,
        "aliases": [],
        "deprecation": None,
        "default_model_temperature": 0.7 if reasoning else 0.3,
        "type": "base",
    }


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The Mistral simulator application.

    `knobs` are the start-up (and `DELETE /_sim/knobs` reset) knobs; with `api_key` set,
    API requests must send `Authorization: Bearer <api_key>`.
    """
    dialect = MistralDialect(api_key)
    return build_simulator_app(
        dialect,
        knobs,
        [API_PREFIX + "/chat/completions"],
        {
            ("GET", API_PREFIX + "/models"): dialect.models,
            ("GET", API_PREFIX + "/models/{model_id}"): dialect.models,
        },
    )
