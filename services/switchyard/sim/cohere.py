"""Cohere Chat API v2 simulator (aiohttp).

Speaks the documented ``POST /v2/chat`` wire format -- JSON and SSE streaming --
closely enough that the official ``cohere`` SDK (``cohere.ClientV2`` /
``AsyncClientV2``) parses it, with :class:`~switchyard.sim.faults.FaultKnobs`
to inject latency and failures. The SDK's base URL is the server root
(``http://host:port``): it joins ``v2/chat`` and ``v1/models`` onto it.

Endpoints: ``POST /v2/chat``, ``GET /v1/models``, ``GET /v1/models/{model}``
and the ``/_sim/*`` control endpoints (see
:func:`switchyard.sim.faults.add_control_routes`).

Wire-format notes (what the real API does, mirrored here):

* Requests are validated like Cohere does: an unknown field anywhere in the
  body, a message or a tool definition is a 422 ``unknown field: parameter
  '<name>' is not a valid field``; missing or mistyped fields are 400
  ``invalid request: ...``; ``tool_choice`` is ``REQUIRED`` or ``NONE`` and
  needs ``tools``; ``response_format`` (``text`` or ``json_object`` with an
  optional ``json_schema``) cannot be combined with ``tools``; at most five
  ``stop_sequences``; a tool message must answer an earlier tool call.
* Errors are ``{"id": <uuid>, "message": <text>}`` with the HTTP status; there
  are no error codes. The ``error_code`` knob picks a documented message
  instead: ``too_many_tokens`` (400, the prompt exceeds the context window) or
  ``trial_key`` (429, the trial key's per-minute limit).
* Streams are ``event: <type>`` / ``data: <json>`` events, the JSON's ``type``
  repeating the event name: ``message-start`` (the message ``id``), a
  ``thinking`` content block when reasoning tokens are asked for,
  ``content-start`` / ``content-delta`` / ``content-end`` for the text, or
  ``tool-plan-delta`` then ``tool-call-start`` / ``tool-call-delta`` /
  ``tool-call-end`` for a tool call, and a final ``message-end`` with
  ``finish_reason`` (``COMPLETE``, ``MAX_TOKENS``, ``TOOL_CALL``; the
  ``finish_reason`` knob verbatim) and ``usage``. Nothing follows it.
* An error after the stream started is a ``message-end`` whose
  ``finish_reason`` is ``ERROR`` (``TIMEOUT`` for a 504 or 408) and whose
  ``delta.error`` holds the message; Cohere has no status or code in a stream.
* Every chat response carries ``x-debug-trace-id``; with rate-limit figures,
  ``x-trial-endpoint-call-limit`` / ``x-trial-endpoint-call-remaining`` (the
  per-minute request limit of a trial key) and ``x-endpoint-monthly-call-limit``.

Token accounting is a deterministic approximation, not a tokenizer:
``billed_units.input_tokens = sum over messages of ceil(chars / 4)`` (text
content, tool plans, tool-call names and arguments; 85 per image) and
``tokens.input_tokens`` adds Cohere's own preamble, ``16 + 2`` per message;
``output_tokens = ceil(len(answer) / 4) + reasoning_tokens`` (for a tool call,
the answer is its name plus its arguments JSON); ``cached_tokens`` is the
knob. ``max_tokens`` truncates the answer to ``4 * N`` characters with
finish_reason ``MAX_TOKENS``.
"""

from __future__ import annotations

import string
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Literal

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
    approx_text_tokens,
    seed_bytes,
    split_text,
    start_simulator,
)

__all__ = [
    "API_PREFIX",
    "MODELS",
    "RunningSimulator",
    "build_app",
    "error_body",
    "start_simulator",
    "token_counts",
]

#: Path prefix of the API: none (the SDK ``base_url`` is ``http://host:port``).
API_PREFIX = ""

#: Models listed by ``GET /v1/models`` (any model name is accepted for chat).
MODELS: tuple[str, ...] = (
    "command-a-03-2025",
    "command-a-reasoning-08-2025",
    "command-a-vision-07-2025",
    "command-r-plus-08-2024",
    "command-r-08-2024",
    "command-r7b-12-2024",
)

MAX_CONTEXT_TOKENS = 256_000
MAX_STOP_SEQUENCES = 5
MONTHLY_CALL_LIMIT = 1000
PREAMBLE_TOKENS = 16
MESSAGE_OVERHEAD_TOKENS = 2
IMAGE_TOKENS = 85
THINKING_TEXT = "Weighing what the question asks before answering."

_HEX = string.hexdigits[:16]
_ID_ALPHABET = string.ascii_lowercase + string.digits
_DOCS = "https://docs.cohere.com/reference/chat"

_BODY_FIELDS = frozenset(
    {
        "model",
        "messages",
        "tools",
        "strict_tools",
        "documents",
        "citation_options",
        "response_format",
        "safety_mode",
        "max_tokens",
        "stop_sequences",
        "temperature",
        "seed",
        "frequency_penalty",
        "presence_penalty",
        "k",
        "p",
        "logprobs",
        "tool_choice",
        "thinking",
        "priority",
        "stream",
    }
)
_MESSAGE_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content"}),
    "user": frozenset({"role", "content"}),
    "assistant": frozenset({"role", "content", "tool_plan", "tool_calls", "citations"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
_PART_FIELDS: dict[str, frozenset[str]] = {
    "text": frozenset({"type", "text"}),
    "image_url": frozenset({"type", "image_url"}),
    "thinking": frozenset({"type", "thinking"}),
    "document": frozenset({"type", "document"}),
}
# The content part types each role accepts.
_ROLE_PARTS: dict[str, frozenset[str]] = {
    "system": frozenset({"text"}),
    "user": frozenset({"text", "image_url"}),
    "assistant": frozenset({"text", "thinking"}),
    "tool": frozenset({"text", "document"}),
}

# --------------------------------------------------------------------------- #
# error bodies
# --------------------------------------------------------------------------- #

#: status -> message template.
_STATUS_MESSAGES: dict[int, str] = {
    400: "invalid request: simulated error.",
    401: "invalid api token",
    402: (
        "Please add or update your payment method at https://dashboard.cohere.com/billing?tab=payment "
        "to continue: your account has reached its billing limit."
    ),
    403: "You do not have access to this resource.",
    404: (
        "model '{model}' not found, make sure the correct model ID was used and that you have "
        "access to the model."
    ),
    422: "invalid request: the request could not be processed.",
    429: "You are past the per minute request limit, please wait and try again later.",
    498: "invalid token",
    499: "request cancelled",
    500: "internal server error, this has been reported to our developers",
    501: "not implemented",
    503: "service unavailable, please try again later",
    504: "gateway timeout",
}

#: error_code knob -> (message template); Cohere errors carry messages, not codes.
_CODE_MESSAGES: dict[str, str] = {
    "too_many_tokens": (
        "too many tokens: total number of tokens in the prompt cannot exceed "
        + str(MAX_CONTEXT_TOKENS)
        + " - received {prompt_tokens}. Try using a shorter prompt, or enabling prompt truncating. "
        "See https://docs.cohere.com/reference/generate for more details."
    ),
    "trial_key": (
        "You are using a Trial key, which is limited to {limit} API calls / minute. You can continue "
        "to use the Trial key for free or upgrade to a Production key with higher rate limits at "
        "'https://dashboard.cohere.com/api-keys'. Contact us on 'https://discord.gg/XW44jPfYJu' or "
        "email us at support@cohere.com with any questions"
    ),
}


def error_body(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    model: str = "command-a-03-2025",
    prompt_tokens: int = 0,
    limit_requests: int = 20,
) -> dict[str, object]:
    """Cohere's JSON error body for ``status``: ``{"id", "message"}``.

    ``code`` picks a documented message (see ``_CODE_MESSAGES``); ``message``
    overrides the text.
    """
    if message is None:
        template = _CODE_MESSAGES.get(code or "") or _STATUS_MESSAGES.get(status)
        if template is None:
            template = f"simulated HTTP {status} error"
        message = template.format(model=model, prompt_tokens=prompt_tokens, limit=limit_requests)
    return {"id": str(uuid.uuid4()), "message": message}


def _problem(message: str) -> dict[str, object]:
    return {"id": str(uuid.uuid4()), "message": message}


def _invalid(message: str) -> Reply:
    return Reply(400, _problem(f"invalid request: {message}"))


def _unknown_field(name: str) -> Reply:
    return Reply(
        422,
        _problem(
            f"unknown field: parameter '{name}' is not a valid field. "
            f"For proper usage, please refer to {_DOCS}"
        ),
    )


# --------------------------------------------------------------------------- #
# request validation
# --------------------------------------------------------------------------- #


def _unknown(obj: Mapping[str, Any], known: frozenset[str]) -> Reply | None:
    extra = sorted(str(key) for key in obj if key not in known)
    return _unknown_field(extra[0]) if extra else None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parts(content: object, role: str, where: str) -> Reply | None:
    """Validate a message's content: a string or a list of the role's part types."""
    if isinstance(content, str):
        return None
    if not isinstance(content, list):
        return _invalid(f"{where}.content must be a string or a list of content blocks")
    for i, part in enumerate(content):
        if not isinstance(part, dict):
            return _invalid(f"{where}.content[{i}] must be an object")
        kind = part.get("type")
        if kind not in _ROLE_PARTS[role]:
            return _invalid(f"{where}.content[{i}]: type {kind!r} is not supported in a {role} message")
        unknown = _unknown(part, _PART_FIELDS[str(kind)])
        if unknown is not None:
            return unknown
        if kind == "text" and not isinstance(part.get("text"), str):
            return _invalid(f"{where}.content[{i}].text must be a string")
        if kind == "thinking" and not isinstance(part.get("thinking"), str):
            return _invalid(f"{where}.content[{i}].thinking must be a string")
        if kind == "image_url":
            image = part.get("image_url")
            if not isinstance(image, dict) or not isinstance(image.get("url"), str):
                return _invalid(f"{where}.content[{i}].image_url.url must be a string")
            unknown = _unknown(image, frozenset({"url", "detail"}))
            if unknown is not None:
                return unknown
            if image.get("detail", "auto") not in ("auto", "low", "high"):
                return _invalid(f"{where}.content[{i}].image_url.detail must be auto, low or high")
        if kind == "document" and not isinstance(part.get("document"), dict):
            return _invalid(f"{where}.content[{i}].document must be an object")
    return None


def _tool_calls(calls: object, where: str, seen: set[str]) -> Reply | None:
    if not isinstance(calls, list):
        return _invalid(f"{where}.tool_calls must be a list")
    for i, call in enumerate(calls):
        if not isinstance(call, dict):
            return _invalid(f"{where}.tool_calls[{i}] must be an object")
        unknown = _unknown(call, frozenset({"id", "type", "function"}))
        if unknown is not None:
            return unknown
        function = call.get("function")
        if not isinstance(call.get("id"), str) or call.get("type", "function") != "function":
            return _invalid(f"{where}.tool_calls[{i}] needs an id and type 'function'")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return _invalid(f"{where}.tool_calls[{i}].function.name must be a string")
        unknown = _unknown(function, frozenset({"name", "arguments"}))
        if unknown is not None:
            return unknown
        if not isinstance(function.get("arguments", ""), str):
            return _invalid(f"{where}.tool_calls[{i}].function.arguments must be a JSON string")
        seen.add(call["id"])
    return None


def _messages(messages: object) -> Reply | None:
    if not isinstance(messages, list) or not messages:
        return _invalid("messages must be a non-empty list")
    seen_calls: set[str] = set()
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            return _invalid(f"{where} must be an object")
        role = message.get("role")
        if role not in _MESSAGE_FIELDS:
            return _invalid(f"{where}.role must be one of system, user, assistant, tool")
        unknown = _unknown(message, _MESSAGE_FIELDS[role])
        if unknown is not None:
            return unknown
        if role == "assistant":
            if "content" not in message and "tool_calls" not in message:
                return _invalid(f"{where}: an assistant message needs content or tool_calls")
            if not isinstance(message.get("tool_plan", ""), str):
                return _invalid(f"{where}.tool_plan must be a string")
            if "tool_calls" in message:
                problem = _tool_calls(message["tool_calls"], where, seen_calls)
                if problem is not None:
                    return problem
            if "content" in message:
                problem = _parts(message["content"], role, where)
                if problem is not None:
                    return problem
            continue
        if "content" not in message:
            return _invalid(f"{where}.content is required")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                return _invalid(f"{where}.tool_call_id must be a string")
            if call_id not in seen_calls:
                return _invalid(f"{where}.tool_call_id does not answer an earlier tool call")
        problem = _parts(message["content"], role, where)
        if problem is not None:
            return problem
    return None


def _tools(tools: object) -> tuple[tuple[ToolSpec, ...], Reply | None]:
    if not isinstance(tools, list):
        return (), _invalid("tools must be a list")
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            return (), _invalid(f"tools[{i}] must be an object")
        unknown = _unknown(tool, frozenset({"type", "function"}))
        if unknown is not None:
            return (), unknown
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            return (), _invalid(f"tools[{i}] must be a function tool")
        unknown = _unknown(function, frozenset({"name", "description", "parameters"}))
        if unknown is not None:
            return (), unknown
        name = function.get("name")
        if not isinstance(name, str) or not name:
            return (), _invalid(f"tools[{i}].function.name must be a non-empty string")
        parameters = function.get("parameters")
        if not isinstance(parameters, dict):
            return (), _invalid(f"tools[{i}].function.parameters must be a JSON schema object")
        specs.append(ToolSpec(name, parameters))
    return tuple(specs), None


def _response_format(
    fmt: object,
) -> tuple[Literal["object", "schema"] | None, object, Reply | None]:
    if not isinstance(fmt, dict):
        return None, None, _invalid("response_format must be an object")
    kind = fmt.get("type")
    if kind == "text":
        unknown = _unknown(fmt, frozenset({"type"}))
        if unknown is not None:
            return None, None, _invalid("json_schema must not be specified when the type is text")
        return None, None, None
    if kind != "json_object":
        return None, None, _invalid("response_format.type must be text or json_object")
    unknown = _unknown(fmt, frozenset({"type", "json_schema"}))
    if unknown is not None:
        return None, None, unknown
    schema = fmt.get("json_schema")
    if schema is None:
        return "object", None, None
    if not isinstance(schema, dict):
        return None, None, _invalid("response_format.json_schema must be an object")
    return "schema", schema, None


def _sampling(body: Mapping[str, Any]) -> Reply | None:
    checks: tuple[tuple[str, bool, str], ...] = (
        ("temperature", _is_number(body.get("temperature")) and body["temperature"] >= 0, "a number >= 0"),
        ("p", _is_number(body.get("p")) and 0.01 <= body["p"] <= 0.99, "a number between 0.01 and 0.99"),
        ("k", _is_int(body.get("k")) and 0 <= body["k"] <= 500, "an integer between 0 and 500"),
        ("max_tokens", _is_int(body.get("max_tokens")) and body["max_tokens"] >= 1, "an integer >= 1"),
        ("seed", _is_int(body.get("seed")), "an integer"),
        (
            "frequency_penalty",
            _is_number(body.get("frequency_penalty")) and 0 <= body["frequency_penalty"] <= 1,
            "a number between 0 and 1",
        ),
        (
            "presence_penalty",
            _is_number(body.get("presence_penalty")) and 0 <= body["presence_penalty"] <= 1,
            "a number between 0 and 1",
        ),
        ("stream", isinstance(body.get("stream"), bool), "a boolean"),
        ("strict_tools", isinstance(body.get("strict_tools"), bool), "a boolean"),
        (
            "safety_mode",
            body.get("safety_mode") in ("CONTEXTUAL", "STRICT", "OFF"),
            "CONTEXTUAL, STRICT or OFF",
        ),
    )
    for name, ok, expected in checks:
        if name in body and body[name] is not None and not ok:
            return _invalid(f"{name} must be {expected}")
    stops = body.get("stop_sequences")
    if stops is not None:
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            return _invalid("stop_sequences must be a list of strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            return _invalid(
                f"stop_sequences can have at most {MAX_STOP_SEQUENCES} items - received {len(stops)}"
            )
    return None


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return approx_text_tokens(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict):
                continue
            text = part.get("text", part.get("thinking"))
            total += approx_text_tokens(text) if isinstance(text, str) else IMAGE_TOKENS
    return total


def token_counts(messages: list[Any]) -> tuple[int, int]:
    """``(tokens.input_tokens, billed_units.input_tokens)`` for ``messages`` (see the module
    docstring)."""
    billed = 0
    for message in messages:
        if not isinstance(message, dict):
            continue
        billed += _content_tokens(message.get("content"))
        plan = message.get("tool_plan")
        if isinstance(plan, str):
            billed += approx_text_tokens(plan)
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            for call in calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    billed += approx_text_tokens(str(fn.get("name", "")) + str(fn.get("arguments", "")))
    return PREAMBLE_TOKENS + MESSAGE_OVERHEAD_TOKENS * len(messages) + billed, billed


def usage_object(answer: Answer, billed_input: int) -> dict[str, object]:
    """Cohere's `usage` object for an answer."""
    return {
        "billed_units": {"input_tokens": billed_input, "output_tokens": answer.output_tokens},
        "tokens": {"input_tokens": answer.prompt_tokens, "output_tokens": answer.output_tokens},
        "cached_tokens": answer.cached_tokens,
    }


_FINISH: dict[str, str] = {"stop": "COMPLETE", "length": "MAX_TOKENS", "tool_calls": "TOOL_CALL"}


def _finish(answer: Answer) -> str:
    return _FINISH.get(answer.finish, answer.finish)


# --------------------------------------------------------------------------- #
# the dialect
# --------------------------------------------------------------------------- #


class CohereDialect(Dialect):
    """Chat API v2 as Cohere speaks it."""

    request_id_length = 32

    def new_context(self, request: web.Request) -> CallContext:
        ctx = super().new_context(request)
        ctx.request_id = new_id("", self.request_id_length, _HEX)  # like x-debug-trace-id
        return ctx

    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        if self.api_key is None:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and token == self.api_key:
            return None
        if not header:
            return Reply(401, _problem("no api key supplied"))
        return Reply(401, error_body(401))

    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        if not isinstance(body, dict):
            return _invalid("the request body must be a JSON object")
        unknown = _unknown(body, _BODY_FIELDS)
        if unknown is not None:
            return unknown
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return _invalid("model must be specified")
        problem = _messages(body.get("messages"))
        if problem is None:
            problem = _sampling(body)
        if problem is not None:
            return problem
        tools: tuple[ToolSpec, ...] = ()
        if body.get("tools") is not None:
            tools, problem = _tools(body["tools"])
            if problem is not None:
                return problem
        choice = body.get("tool_choice")
        if choice is not None:
            if choice not in ("REQUIRED", "NONE"):
                return _invalid("tool_choice must be REQUIRED or NONE")
            if not tools:
                return _invalid("tool_choice requires tools to be specified")
        json_mode: Literal["object", "schema"] | None = None
        json_schema: object = None
        if body.get("response_format") is not None:
            json_mode, json_schema, problem = _response_format(body["response_format"])
            if problem is not None:
                return problem
            if json_mode is not None and tools:
                return _invalid("response_format is not supported with tools")
        thinking = body.get("thinking")
        thinking_off = isinstance(thinking, dict) and thinking.get("type") == "disabled"
        messages: list[Any] = body["messages"]
        prompt, billed = token_counts(messages)
        limit = body.get("max_tokens")
        ctx.response_id = str(uuid.uuid4())
        return ChatCall(
            model=model,
            stream=body.get("stream") is True,
            prompt_tokens=prompt,
            seed=seed_bytes(messages),
            tools=tools,
            tool_choice={"REQUIRED": "required", "NONE": "none"}.get(str(choice)) if choice else None,
            json_mode=json_mode,
            json_schema=json_schema,
            max_tokens=limit if _is_int(limit) else None,
            extra={"billed_input": billed, "thinking": not thinking_off},
        )

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        return Reply(status, self._error_body(status, knobs, call))

    def _error_body(self, status: int, knobs: FaultKnobs, call: ChatCall | None) -> dict[str, object]:
        rl = knobs.ratelimit
        return error_body(
            status,
            code=knobs.error_code,
            message=knobs.error_message,
            model=call.model if call is not None else MODELS[0],
            prompt_tokens=call.prompt_tokens if call is not None else 0,
            limit_requests=rl.limit_requests if rl is not None else 20,
        )

    def knob_error(self, message: str, knob: str | None) -> Reply:
        return Reply(400, _problem(message))

    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        headers = {
            "x-debug-trace-id": ctx.request_id,
            "access-control-expose-headers": "X-Debug-Trace-ID",
            "x-envoy-upstream-service-time": str(ctx.elapsed_ms()),
        }
        if snap is not None:
            headers["x-endpoint-monthly-call-limit"] = str(MONTHLY_CALL_LIMIT)
            headers["x-trial-endpoint-call-limit"] = str(snap.limit_requests)
            headers["x-trial-endpoint-call-remaining"] = str(snap.remaining_requests)
        return headers

    def _thinks(self, call: ChatCall, answer: Answer) -> bool:
        return answer.reasoning_tokens > 0 and answer.text is not None and bool(call.extra.get("thinking"))

    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        message: dict[str, object] = {"role": "assistant"}
        if answer.tool_name is not None:
            message["tool_plan"] = _tool_plan(answer.tool_name)
            message["tool_calls"] = [
                {
                    "id": _tool_call_id(answer.tool_name),
                    "type": "function",
                    "function": {"name": answer.tool_name, "arguments": answer.tool_arguments},
                }
            ]
        else:
            content: list[dict[str, str]] = []
            if self._thinks(call, answer):
                content.append({"type": "thinking", "thinking": THINKING_TEXT})
            content.append({"type": "text", "text": answer.text or ""})
            message["content"] = content
        return {
            "id": ctx.response_id,
            "finish_reason": _finish(answer),
            "message": message,
            "usage": usage_object(answer, int(call.extra.get("billed_input", 0))),
        }

    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        def frame(data: dict[str, object]) -> bytes:
            return sse(data, str(data["type"]))

        frames = [
            frame(
                {
                    "id": ctx.response_id,
                    "type": "message-start",
                    "delta": {
                        "message": {
                            "role": "assistant",
                            "content": [],
                            "tool_plan": "",
                            "tool_calls": [],
                            "citations": [],
                        }
                    },
                }
            )
        ]
        if answer.tool_name is not None:
            for piece in split_text(_tool_plan(answer.tool_name), 2):
                frames.append(frame({"type": "tool-plan-delta", "delta": {"message": {"tool_plan": piece}}}))
            start = {
                "id": _tool_call_id(answer.tool_name),
                "type": "function",
                "function": {"name": answer.tool_name, "arguments": ""},
            }
            frames.append(
                frame({"type": "tool-call-start", "index": 0, "delta": {"message": {"tool_calls": start}}})
            )
            for piece in answer.argument_pieces(chunks):
                fragment = {"function": {"arguments": piece}}
                frames.append(
                    frame(
                        {
                            "type": "tool-call-delta",
                            "index": 0,
                            "delta": {"message": {"tool_calls": fragment}},
                        }
                    )
                )
            frames.append(frame({"type": "tool-call-end", "index": 0}))
        else:
            index = 0
            if self._thinks(call, answer):
                frames.extend(_block(index, "thinking", [THINKING_TEXT], frame))
                index += 1
            frames.extend(_block(index, "text", answer.text_pieces(chunks), frame))
        usage = usage_object(answer, int(call.extra.get("billed_input", 0)))
        frames.append(
            frame({"type": "message-end", "delta": {"finish_reason": _finish(answer), "usage": usage}})
        )
        return frames

    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        # Cohere reports a failed generation as the final event, with a message and no code.
        message = self._error_body(status, knobs, call)["message"]
        finish = "TIMEOUT" if status in (408, 504) else "ERROR"
        return sse(
            {"type": "message-end", "delta": {"error": message, "finish_reason": finish}}, "message-end"
        )

    def malformed(self, ctx: CallContext) -> bytes:
        return (
            b'event: content-delta\ndata: {"type":"content-delta","index":0,'
            b'"delta":{"message":{"content":{"text":"\n\n'
        )

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models` and `GET /v1/models/{model}`."""
        headers, refused = self.start_read(request)
        if refused is not None:
            return refused
        wanted = request.match_info.get("model")
        if wanted is None:
            endpoint = request.query.get("endpoint")
            models = [_model_obj(m) for m in MODELS if not endpoint or endpoint in _ENDPOINTS]
            return json_reply(200, {"models": models, "next_page_token": None}, headers)
        if wanted not in MODELS:
            return json_reply(404, error_body(404, model=wanted), headers)
        return json_reply(200, _model_obj(wanted), headers)


def _block(
    index: int, kind: str, pieces: list[str], frame: Callable[[dict[str, object]], bytes]
) -> list[bytes]:
    """One content block: content-start, a content-delta per piece, content-end."""
    frames: list[bytes] = [
        frame(
            {
                "type": "content-start",
                "index": index,
                "delta": {"message": {"content": {"type": kind, kind: ""}}},
            }
        )
    ]
    for piece in pieces:
        frames.append(
            frame({"type": "content-delta", "index": index, "delta": {"message": {"content": {kind: piece}}}})
        )
    frames.append(frame({"type": "content-end", "index": index}))
    return frames


def _tool_plan(tool_name: str) -> str:
    return f"I will use the {tool_name} tool to answer."


def _tool_call_id(tool_name: str) -> str:
    return new_id(f"{tool_name}_", 12, _ID_ALPHABET)


_ENDPOINTS = ("chat",)


def _model_obj(model: str) -> dict[str, object]:
    endpoints = list(_ENDPOINTS)
    features = ["tools", "strict_tools", "json_mode", "json_schema", "safety_modes"]
    if "vision" in model:
        features.append("vision")
    if "reasoning" in model:
        features.append("reasoning")
    return {
        "name": model,
        "is_deprecated": False,
        "endpoints": endpoints,
        "finetuned": False,
        "context_length": MAX_CONTEXT_TOKENS,
        "tokenizer_url": f"https://storage.googleapis.com/cohere-public/tokenizers/{model}.json",
        "default_endpoints": [],
        "features": features,
    }


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The Cohere simulator application.

    `knobs` are the start-up (and `DELETE /_sim/knobs` reset) knobs; with `api_key` set,
    API requests must send `Authorization: Bearer <api_key>`. Serve it with
    `switchyard.sim.faults.serve_app` (handler cancellation on) so client disconnects are
    noticed while the handler sleeps.
    """
    dialect = CohereDialect(api_key)
    return build_simulator_app(
        dialect,
        knobs,
        [API_PREFIX + "/v2/chat"],
        {
            ("GET", API_PREFIX + "/v1/models"): dialect.models,
            ("GET", API_PREFIX + "/v1/models/{model}"): dialect.models,
        },
    )
