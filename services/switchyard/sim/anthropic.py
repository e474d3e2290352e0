"""Anthropic Messages API simulator (aiohttp).

Speaks the documented ``/v1/messages`` wire format -- JSON and SSE streaming --
closely enough that the official ``anthropic`` SDK parses it, with
:class:`~switchyard.sim.faults.FaultKnobs` to inject latency and failures.

Endpoints: ``POST /v1/messages``, ``GET /v1/models``, ``GET /v1/models/{model_id}``
and the ``/_sim/*`` control endpoints. The SDK's ``base_url`` is the server root
(``API_PREFIX`` is empty), like ``https://api.anthropic.com``.

Wire-format notes (what the real API does, mirrored here):

* Every request needs ``anthropic-version`` (``2023-06-01``, or ``2026-10-21``
  which the 2.x SDKs send and which refuses ``temperature``, ``top_p`` and
  ``top_k``) and the key in ``x-api-key`` (or ``Authorization: Bearer``, which
  the 2.x SDKs send; ``x-api-key`` wins when both are present).
* Validation mirrors the API's 400s: unknown top-level fields ("Extra inputs are
  not permitted"), ``model`` / ``max_tokens`` / ``messages`` required, roles only
  ``user`` / ``assistant`` (a ``system`` role is refused: the system prompt is the
  top-level ``system``), non-empty text blocks, image sources, ``tool_use`` only
  from the assistant with an object ``input``, every ``tool_use`` answered by a
  ``tool_result`` in the next user turn (results first), tools, ``tool_choice``
  and ``output_config.format``. Consecutive turns of one role are combined, as
  the API documents.
* Errors are ``{"type": "error", "error": {"type", "message"[, "details":
  {"error_code"}]}, "request_id"}``; the status picks the type (400
  invalid_request_error, 401 authentication_error, 402 billing_error, 403
  permission_error, 404 not_found_error, 413 request_too_large, 429
  rate_limit_error, 500 api_error, 504 timeout_error, 529 overloaded_error).
  The ``error_code`` knob names an error type (``overloaded_error``), a
  ``details.error_code`` (``enforced_spend_limit_reached``), or one of the two
  documented context-window messages: ``prompt_too_long`` ("prompt is too long:
  N tokens > 200000 maximum") or ``context_limit_exceeded`` ("input length and
  `max_tokens` exceed context limit: ...").
* Streams are named events: ``message_start`` (empty content, input usage),
  per block ``content_block_start`` / ``content_block_delta`` /
  ``content_block_stop`` (a ``ping`` follows the first block's start), then
  ``message_delta`` (``stop_reason``, cumulative usage) and ``message_stop``.
  Text arrives as ``text_delta``; a tool call as a ``tool_use`` block with empty
  ``input`` then ``input_json_delta`` fragments (the first one empty); with the
  ``reasoning_tokens`` knob a ``thinking`` block (``thinking_delta``,
  ``signature_delta``) comes first. An error after the stream started is
  ``event: error`` with the error object and the stream ends.
* Responses carry ``request-id`` and ``anthropic-ratelimit-{requests,tokens,
  input-tokens,output-tokens}-{limit,remaining,reset}`` with resets as RFC 3339
  timestamps (``tokens`` and ``input-tokens`` both show the knob's token figures;
  output tokens are not counted).

Token accounting is a deterministic approximation, not a tokenizer:
``prompt_tokens = 3 + system + sum over messages of (3 + content) + tools``
where text counts ``ceil(chars / 4)``, an image 85, a ``tool_use`` its name and
input JSON, a ``tool_result`` its content, and a tool its name, description and
schema JSON. ``usage.input_tokens`` excludes the ``cached_tokens`` knob, which
is reported as ``cache_read_input_tokens``; ``output_tokens =
ceil(len(answer) / 4) + reasoning_tokens``, with the reasoning share in
``output_tokens_details.thinking_tokens``. ``max_tokens`` truncates the answer
to ``4 * N`` characters (stop reason ``max_tokens``); a stop sequence in the
answer cuts it there (``stop_sequence``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal

import orjson
from aiohttp import web

from switchyard.adapters.base import parse_duration
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
    deterministic_text,
    seed_bytes,
    start_simulator,
)

__all__ = [
    "API_PREFIX",
    "MODELS",
    "RunningSimulator",
    "build_app",
    "error_body",
    "prompt_tokens",
    "start_simulator",
]

#: Path prefix of the API: none, the SDK ``base_url`` is the server root.
API_PREFIX = ""

#: Models listed by ``GET /v1/models`` (any model name is accepted for chat).
MODELS: tuple[tuple[str, str], ...] = (
    ("claude-opus-4-7", "Claude Opus 4.7"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6"),
    ("claude-haiku-4-5", "Claude Haiku 4.5"),
    ("claude-opus-4-5", "Claude Opus 4.5"),
    ("claude-sonnet-4-5", "Claude Sonnet 4.5"),
)

MAX_CONTEXT_TOKENS: Final = 200_000
MAX_OUTPUT_TOKENS: Final = 64_000
IMAGE_TOKENS: Final = 85
#: ``anthropic-version`` values the simulator accepts.
API_VERSIONS: Final = ("2023-06-01", "2026-10-21")
#: The version that no longer accepts sampling parameters.
_NO_SAMPLING_VERSION: Final = "2026-10-21"
_SAMPLING_FIELDS: Final = ("temperature", "top_p", "top_k")
_ORG_ID: Final = "5w1tc4y4-rd00-4000-8000-000000000000"
_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")

#: Top-level request fields the Messages API knows (anything else is refused).
KNOWN_FIELDS: Final = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "metadata",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        "service_tier",
        "container",
        "inference_geo",
        "cache_control",
        "speed",
        "diagnostics",
        "user_profile_id",
        "workspace_id",
    }
)

# --------------------------------------------------------------------------- #
# error bodies
# --------------------------------------------------------------------------- #

ERROR_TYPES: Final = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "conflict_error",
        "request_too_large",
        "rate_limit_error",
        "api_error",
        "timeout_error",
        "overloaded_error",
    }
)

_TYPE_BY_STATUS: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_MESSAGE_BY_TYPE: Final = {
    "invalid_request_error": "Invalid request (simulated error).",
    "authentication_error": "invalid x-api-key",
    "billing_error": (
        "Your credit balance is too low to access the Anthropic API. "
        "Please go to Plans & Billing to upgrade or purchase credits."
    ),
    "permission_error": "Your API key does not have permission to use the specified resource.",
    "not_found_error": "model: {model}",
    "conflict_error": "The request conflicts with the current state of the resource.",
    "request_too_large": "Request exceeds the maximum allowed number of bytes.",
    "rate_limit_error": (
        "This request would exceed the rate limit for your organization (" + _ORG_ID + ") of {limit} "
        "requests per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. "
        "You can see the response headers for current usage."
    ),
    "api_error": "Internal server error",
    "timeout_error": "Request timed out",
    "overloaded_error": "Overloaded",
}

#: ``error_code`` knob values that produce Anthropic's context-window messages.
CONTEXT_CODES: Final = {
    "prompt_too_long": "prompt is too long: {tokens} tokens > {maximum} maximum",
    "context_limit_exceeded": (
        "input length and `max_tokens` exceed context limit: {prompt} + {max_tokens} > {maximum}, "
        "decrease input length or `max_tokens` and try again"
    ),
}


def error_body(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    model: str = "claude-sonnet-4-6",
    prompt_tokens: int = 0,
    max_tokens: int = 0,
    limit_requests: int = 10_000,
    request_id: str | None = None,
) -> dict[str, object]:
    """Anthropic's JSON error body for ``status``.

    ``code`` (the ``error_code`` knob) names an error type, one of
    :data:`CONTEXT_CODES`, or else a ``details.error_code``; ``message`` overrides
    the text.
    """
    kind = _TYPE_BY_STATUS.get(status) or ("api_error" if status >= 500 else "invalid_request_error")
    template = _MESSAGE_BY_TYPE[kind]
    details: dict[str, str] | None = None
    if code in CONTEXT_CODES:
        kind, template = "invalid_request_error", CONTEXT_CODES[code]
    elif code in ERROR_TYPES:
        kind, template = code, _MESSAGE_BY_TYPE[code]
    elif code:
        details = {"error_code": code}
    if message is None:
        message = template.format(
            model=model,
            limit=limit_requests,
            tokens=MAX_CONTEXT_TOKENS + prompt_tokens,
            prompt=MAX_CONTEXT_TOKENS - max_tokens + prompt_tokens,
            max_tokens=max_tokens,
            maximum=MAX_CONTEXT_TOKENS,
        )
    error: dict[str, object] = {"type": kind, "message": message}
    if details is not None:
        error["details"] = details
    body: dict[str, object] = {"type": "error", "error": error}
    if request_id is not None:
        body["request_id"] = request_id
    return body


def _invalid(message: str, ctx: CallContext | None = None) -> Reply:
    return Reply(
        400,
        error_body(400, message=message, request_id=ctx.request_id if ctx is not None else None),
    )


# --------------------------------------------------------------------------- #
# request helpers
# --------------------------------------------------------------------------- #


def _block_tokens(block: object) -> int:
    if not isinstance(block, dict):
        return 0
    kind = block.get("type")
    if kind == "text":
        text = block.get("text")
        return approx_text_tokens(text) if isinstance(text, str) else 0
    if kind == "image":
        return IMAGE_TOKENS
    if kind == "tool_use":
        return approx_text_tokens(str(block.get("name", "")) + orjson.dumps(block.get("input")).decode())
    if kind == "tool_result":
        return _content_tokens(block.get("content"))
    return 0


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return approx_text_tokens(content)
    if isinstance(content, list):
        return sum(_block_tokens(block) for block in content)
    return 0


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """Deterministic prompt-token estimate (see the module docstring)."""
    total = 3 + _content_tokens(body.get("system"))
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        total += 3 + (_content_tokens(message.get("content")) if isinstance(message, dict) else 0)
    tools = body.get("tools")
    for tool in tools if isinstance(tools, list) else ():
        if isinstance(tool, dict):
            schema = orjson.dumps(tool.get("input_schema")).decode()
            total += approx_text_tokens(str(tool.get("name", "")) + str(tool.get("description", "")) + schema)
    return total


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_image(block: dict[str, Any], where: str) -> str | None:
    source = block.get("source")
    if not isinstance(source, dict):
        return f"{where}.source: Field required"
    kind = source.get("type")
    if kind == "base64":
        if source.get("media_type") not in _MEDIA_TYPES:
            return (
                f"{where}.source.base64.media_type: Input should be 'image/jpeg', 'image/png', "
                "'image/gif' or 'image/webp'"
            )
        if not isinstance(source.get("data"), str) or not source["data"]:
            return f"{where}.source.base64.data: Field required"
        return None
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return f"{where}.source.url.url: Input should be a valid URL"
        return None
    return f"{where}.source: Input tag {kind!r} found using 'type' does not match any of the expected tags"


def _check_text(block: dict[str, Any], where: str) -> str | None:
    text = block.get("text")
    if not isinstance(text, str):
        return f"{where}.text: Input should be a valid string"
    if not text:
        return "messages: text content blocks must be non-empty"
    return None


def _check_block(block: object, where: str, role: str) -> str | None:
    if not isinstance(block, dict):
        return f"{where}: Input should be a valid dictionary"
    kind = block.get("type")
    if kind == "text":
        return _check_text(block, where)
    if kind == "image":
        return _check_image(block, where)
    if kind == "tool_use":
        if role != "assistant":
            return f"{where}: `tool_use` blocks can only be in `assistant` messages"
        for key in ("id", "name"):
            if not isinstance(block.get(key), str) or not block[key]:
                return f"{where}.{key}: Field required"
        if not isinstance(block.get("input"), dict):
            return f"{where}.input: Input should be a valid dictionary"
        return None
    if kind == "tool_result":
        if role != "user":
            return f"{where}: `tool_result` blocks can only be in `user` messages"
        if not isinstance(block.get("tool_use_id"), str) or not block["tool_use_id"]:
            return f"{where}.tool_use_id: Field required"
        content = block.get("content")
        if content is None or isinstance(content, str):
            return None
        if not isinstance(content, list):
            return f"{where}.content: Input should be a valid string or list"
        for j, part in enumerate(content):
            inner = f"{where}.content.{j}"
            if not isinstance(part, dict) or part.get("type") not in ("text", "image"):
                return f"{inner}: Input should be a text or image block"
            problem = _check_text(part, inner) if part["type"] == "text" else _check_image(part, inner)
            if problem is not None:
                return problem
        return None
    if kind in ("thinking", "redacted_thinking", "document", "search_result"):
        return None
    return f"{where}: Input tag {kind!r} found using 'type' does not match any of the expected tags"


def _blocks(content: str | list[Any]) -> list[Any]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else list(content)


def _check_messages(messages: object) -> str | None:
    if messages is None:
        return "messages: Field required"
    if not isinstance(messages, list):
        return "messages: Input should be a valid list"
    if not messages:
        return "messages: at least one message is required"
    turns: list[tuple[str, list[Any], int]] = []  # role, blocks, index of the first message
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            return f"{where}: Input should be a valid dictionary"
        role = message.get("role")
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level `system` '
                'parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            return f"{where}.role: Input should be 'user' or 'assistant'"
        content = message.get("content")
        if not isinstance(content, (str, list)):
            return (
                f"{where}.content: Field required"
                if content is None
                else f"{where}.content: Input should be a valid list"
            )
        if isinstance(content, str) and not content:
            return "messages: text content blocks must be non-empty"
        if isinstance(content, list) and not content:
            return (
                f"{where}: all messages must have non-empty content except for the optional final "
                "assistant message"
            )
        for j, block in enumerate(_blocks(content)):
            problem = _check_block(block, f"{where}.content.{j}", role)
            if problem is not None:
                return problem
        # Consecutive turns of one role are combined into one turn.
        if turns and turns[-1][0] == role:
            turns[-1][1].extend(_blocks(content))
        else:
            turns.append((role, _blocks(content), i))
    return _check_tool_pairs(turns)


def _check_tool_pairs(turns: list[tuple[str, list[Any], int]]) -> str | None:
    """Every `tool_use` answered in the next (user) turn, results first; no stray results."""
    for position, (role, blocks, first) in enumerate(turns):
        if role == "assistant":
            ids = [b["id"] for b in blocks if b.get("type") == "tool_use"]
            if not ids:
                continue
            following = turns[position + 1][1] if position + 1 < len(turns) else []
            answered = {b["tool_use_id"] for b in following if b.get("type") == "tool_result"}
            missing = [tool_id for tool_id in ids if tool_id not in answered]
            if missing:
                return (
                    f"messages.{first}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message."
                )
            continue
        kinds = [b.get("type") for b in blocks]
        if "tool_result" not in kinds:
            continue
        if any(kind != "tool_result" for kind in kinds[: kinds.count("tool_result")]):
            return f"messages.{first}: `tool_result` blocks must come first in the content of a user message"
        previous = turns[position - 1][1] if position > 0 else []
        known = {b["id"] for b in previous if b.get("type") == "tool_use"}
        for block in blocks:
            if block.get("type") == "tool_result" and block["tool_use_id"] not in known:
                return (
                    f"messages.{first}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block['tool_use_id']}. Each `tool_result` block must have a corresponding "
                    "`tool_use` block in the previous message."
                )
    return None


def _check_tools(body: Mapping[str, Any]) -> str | None:
    tools = body.get("tools")
    names: list[str] = []
    if tools is not None:
        if not isinstance(tools, list):
            return "tools: Input should be a valid list"
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict):
                return f"tools.{i}: Input should be a valid dictionary"
            name = tool.get("name")
            if not isinstance(name, str) or not _TOOL_NAME.match(name):
                return f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
            schema = tool.get("input_schema")
            if not isinstance(schema, dict):
                return f"tools.{i}.custom.input_schema: Field required"
            if schema.get("type") != "object":
                return f"tools.{i}.custom.input_schema.type: Input should be 'object'"
            names.append(name)
    choice = body.get("tool_choice")
    if choice is None:
        return None
    if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
        return "tool_choice: Input tag found using 'type' does not match any of the expected tags"
    if choice["type"] == "tool":
        name = choice.get("name")
        if not isinstance(name, str):
            return "tool_choice.tool.name: Field required"
        if name not in names:
            return f"tool_choice: Tool '{name}' not found in provided tools"
    return None


def _check_format(body: Mapping[str, Any]) -> str | None:
    for key, spec in (
        ("output_config", body.get("output_config")),
        ("output_format", body.get("output_format")),
    ):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            return f"{key}: Input should be a valid dictionary"
        fmt = spec.get("format") if key == "output_config" else spec
        where = f"{key}.format" if key == "output_config" else key
        if fmt is None:
            continue
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            return f"{where}.type: Input should be 'json_schema'"
        if not isinstance(fmt.get("schema"), dict):
            return f"{where}.schema: Field required"
    return None


def _check_scalars(body: Mapping[str, Any]) -> str | None:
    model = body.get("model")
    if model is None:
        return "model: Field required"
    if not isinstance(model, str) or not model:
        return "model: Input should be a valid string"
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        return "max_tokens: Field required"
    if not _is_int(max_tokens):
        return "max_tokens: Input should be a valid integer"
    if max_tokens < 0:
        return "max_tokens: Input should be greater than or equal to 0"
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list):
            return "system: Input should be a valid string or list"
        for i, block in enumerate(system):
            if not isinstance(block, dict) or block.get("type") != "text":
                return f"system.{i}: Input should be a text block"
            problem = _check_text(block, f"system.{i}")
            if problem is not None:
                return problem
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (not _is_number(value) or not 0 <= value <= 1):
            return f"{key}: Input should be less than or equal to 1"
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < 0):
        return "top_k: Input should be a valid integer"
    stops = body.get("stop_sequences")
    if stops is not None and (not isinstance(stops, list) or not all(isinstance(s, str) for s in stops)):
        return "stop_sequences: Input should be a valid list of strings"
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            return "metadata: Input should be a valid dictionary"
        for key in metadata:
            if key != "user_id":
                return f"metadata.{key}: Extra inputs are not permitted"
        if metadata.get("user_id") is not None and not isinstance(metadata["user_id"], str):
            return "metadata.user_id: Input should be a valid string"
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return "stream: Input should be a valid boolean"
    return None


def _validate(body: Mapping[str, Any], version: str) -> str | None:
    """Anthropic's 400 message for an invalid request body, else None."""
    for key in body:
        if key not in KNOWN_FIELDS or (version == _NO_SAMPLING_VERSION and key in _SAMPLING_FIELDS):
            return f"{key}: Extra inputs are not permitted"
    return (
        _check_scalars(body)
        or _check_messages(body.get("messages"))
        or _check_tools(body)
        or _check_format(body)
    )


def _tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return ()
    return tuple(ToolSpec(str(t["name"]), t.get("input_schema")) for t in tools if isinstance(t, dict))


def _tool_choice(choice: object) -> str | None:
    """auto / none / required (`any`), or the name a `{"type": "tool"}` choice forces."""
    if not isinstance(choice, dict):
        return None
    kind = choice.get("type")
    if kind == "tool":
        return str(choice.get("name"))
    return {"auto": "auto", "any": "required", "none": "none"}.get(str(kind))


def _json_mode(body: Mapping[str, Any]) -> tuple[Literal["schema"] | None, object]:
    config = body.get("output_config")
    fmt = config.get("format") if isinstance(config, dict) else None
    if fmt is None:
        fmt = body.get("output_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        return "schema", fmt.get("schema")
    return None, None


# --------------------------------------------------------------------------- #
# answer helpers
# --------------------------------------------------------------------------- #


def _stop_at_sequence(call: ChatCall, answer: Answer) -> tuple[Answer, str | None]:
    """The answer cut at the first stop sequence it contains (stop reason `stop_sequence`)."""
    stops = call.extra.get("stop_sequences") or ()
    text = answer.text
    if not text or answer.tool_name is not None or answer.finish not in ("stop", "length"):
        return answer, None
    hits = [(text.find(stop), stop) for stop in stops if stop and stop in text]
    if not hits:
        return answer, None
    position, stop = min(hits)
    cut = text[:position]
    visible = approx_text_tokens(cut)
    replaced = dataclasses.replace(
        answer, text=cut, finish="stop_sequence", output_tokens=visible + answer.reasoning_tokens
    )
    return replaced, stop


def _stop_reason(finish: str) -> str:
    return {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}.get(finish, finish)


def _usage(answer: Answer, output_tokens: int) -> dict[str, object]:
    usage: dict[str, object] = {
        "input_tokens": answer.prompt_tokens - answer.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": answer.cached_tokens,
        "output_tokens": output_tokens,
    }
    if answer.reasoning_tokens:
        usage["output_tokens_details"] = {"thinking_tokens": answer.reasoning_tokens}
    return usage


def _thinking_text(call: ChatCall) -> str:
    return deterministic_text(call.seed + b"/thinking", 6, 10)


def _rfc3339_after(duration: str, now: float) -> str:
    """The moment `duration` (Go style, e.g. "6m0s") from `now`, as an RFC 3339 timestamp
    in whole seconds, rounded up so it never comes early."""
    seconds = parse_duration(duration) or 0.0
    return datetime.fromtimestamp(math.ceil(now + seconds), tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --------------------------------------------------------------------------- #
# the dialect
# --------------------------------------------------------------------------- #


class AnthropicDialect(Dialect):
    """The Messages API as Anthropic speaks it."""

    request_id_prefix = "req_011C"
    request_id_length = 22

    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        if self.api_key is None:
            return None
        key = request.headers.get("x-api-key")
        if key is None:
            authorization = request.headers.get("Authorization", "")
            key = authorization[7:] if authorization.startswith("Bearer ") else None
        if key == self.api_key:
            return None
        message = "x-api-key header is required" if key is None else "invalid x-api-key"
        return Reply(401, error_body(401, message=message, request_id=ctx.request_id))

    def _version(self, request: web.Request, ctx: CallContext) -> tuple[str, Reply | None]:
        version = request.headers.get("anthropic-version")
        if not version:
            return "", _invalid("anthropic-version: header is required", ctx)
        if version not in API_VERSIONS:
            return "", _invalid(f"anthropic-version: invalid version {version!r}", ctx)
        return version, None

    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        version, problem = self._version(ctx.request, ctx)
        if problem is not None:
            return problem
        if body is None:
            return _invalid("There was an issue with your request body: it is not valid JSON.", ctx)
        if not isinstance(body, dict):
            return _invalid("There was an issue with your request body: expected a JSON object.", ctx)
        message = _validate(body, version)
        if message is not None:
            return _invalid(message, ctx)
        json_mode, json_schema = _json_mode(body)
        ctx.response_id = new_id("msg_01", 22)
        return ChatCall(
            model=str(body["model"]),
            stream=body.get("stream") is True,
            prompt_tokens=prompt_tokens(body),
            seed=seed_bytes({"system": body.get("system"), "messages": body["messages"]}),
            tools=_tools(body),
            tool_choice=_tool_choice(body.get("tool_choice")),
            json_mode=json_mode,
            json_schema=json_schema,
            max_tokens=body["max_tokens"],
            extra={"stop_sequences": tuple(body.get("stop_sequences") or ())},
        )

    def _error_body(
        self, status: int, knobs: FaultKnobs, call: ChatCall | None, request_id: str | None
    ) -> dict[str, object]:
        rl = knobs.ratelimit
        return error_body(
            status,
            code=knobs.error_code,
            message=knobs.error_message,
            model=call.model if call is not None else "claude-sonnet-4-6",
            prompt_tokens=call.prompt_tokens if call is not None else 0,
            max_tokens=(call.max_tokens or 0) if call is not None else 0,
            limit_requests=rl.limit_requests if rl is not None else 10_000,
            request_id=request_id,
        )

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        return Reply(status, self._error_body(status, knobs, call, ctx.request_id))

    def knob_error(self, message: str, knob: str | None) -> Reply:
        return Reply(400, error_body(400, code="invalid_sim_knobs", message=message))

    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        headers = {"request-id": ctx.request_id, "anthropic-organization-id": _ORG_ID}
        if snap is not None:
            now = time.time()
            prefix = "anthropic-ratelimit-"
            headers[prefix + "requests-limit"] = str(snap.limit_requests)
            headers[prefix + "requests-remaining"] = str(snap.remaining_requests)
            headers[prefix + "requests-reset"] = _rfc3339_after(snap.reset_requests, now)
            tokens_reset = _rfc3339_after(snap.reset_tokens, now)
            for family in ("tokens", "input-tokens"):
                headers[f"{prefix}{family}-limit"] = str(snap.limit_tokens)
                headers[f"{prefix}{family}-remaining"] = str(snap.remaining_tokens)
                headers[f"{prefix}{family}-reset"] = tokens_reset
            headers[prefix + "output-tokens-limit"] = str(snap.limit_tokens)
            headers[prefix + "output-tokens-remaining"] = str(snap.limit_tokens)
            headers[prefix + "output-tokens-reset"] = tokens_reset
        return headers

    def _message(
        self, call: ChatCall, ctx: CallContext, content: list[object], usage: object
    ) -> dict[str, Any]:
        return {
            "id": ctx.response_id,
            "type": "message",
            "role": "assistant",
            "model": call.model,
            "content": content,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }

    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        answer, stop = _stop_at_sequence(call, answer)
        content: list[object] = []
        if answer.reasoning_tokens:
            content.append(
                {"type": "thinking", "thinking": _thinking_text(call), "signature": new_id("Eq", 86)}
            )
        if answer.text:
            content.append({"type": "text", "text": answer.text})
        if answer.tool_name is not None:
            content.append(
                {
                    "type": "tool_use",
                    "id": new_id("toolu_01", 22),
                    "name": answer.tool_name,
                    "input": orjson.loads(answer.tool_arguments or "{}"),
                }
            )
        message = self._message(
            call, ctx, content, {**_usage(answer, answer.output_tokens), "service_tier": "standard"}
        )
        message["stop_reason"] = _stop_reason(answer.finish)
        message["stop_sequence"] = stop
        return message

    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        answer, stop = _stop_at_sequence(call, answer)
        start_usage = {**_usage(answer, 1), "service_tier": "standard"}
        start_usage.pop("output_tokens_details", None)
        frames = [
            sse(
                {"type": "message_start", "message": self._message(call, ctx, [], start_usage)},
                "message_start",
            )
        ]
        index = 0

        def block(content_block: dict[str, object], deltas: list[dict[str, object]]) -> None:
            nonlocal index
            frames.append(
                sse(
                    {"type": "content_block_start", "index": index, "content_block": content_block},
                    "content_block_start",
                )
            )
            if index == 0:
                frames.append(sse({"type": "ping"}, "ping"))
            for delta in deltas:
                frames.append(
                    sse(
                        {"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"
                    )
                )
            frames.append(sse({"type": "content_block_stop", "index": index}, "content_block_stop"))
            index += 1

        if answer.reasoning_tokens:
            block(
                {"type": "thinking", "thinking": "", "signature": ""},
                [
                    {"type": "thinking_delta", "thinking": _thinking_text(call)},
                    {"type": "signature_delta", "signature": new_id("Eq", 86)},
                ],
            )
        if answer.tool_name is not None:
            head: dict[str, object] = {
                "type": "tool_use",
                "id": new_id("toolu_01", 22),
                "name": answer.tool_name,
                "input": {},
            }
            pieces = [""] + answer.argument_pieces(chunks)
            block(head, [{"type": "input_json_delta", "partial_json": piece} for piece in pieces])
        elif answer.text:
            block(
                {"type": "text", "text": ""},
                [{"type": "text_delta", "text": piece} for piece in answer.text_pieces(chunks)],
            )
        frames.append(
            sse(
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": _stop_reason(answer.finish), "stop_sequence": stop},
                    "usage": _usage(answer, answer.output_tokens),
                },
                "message_delta",
            )
        )
        frames.append(sse({"type": "message_stop"}, "message_stop"))
        return frames

    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        # The documented in-stream error: `event: error` with the error object, no request id.
        return sse(self._error_body(status, knobs, call, None), "error")

    def malformed(self, ctx: CallContext) -> bytes:
        return (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"\n\n'
        )

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models` and `GET /v1/models/{model_id}`."""
        ctx = self.new_context(request)
        headers = self.headers(ctx, None)
        problem = self.check_auth(request, ctx) or self._version(request, ctx)[1]
        if problem is not None:
            return json_reply(problem.status, problem.body, headers)
        wanted = request.match_info.get("model_id")
        if wanted is None:
            data = [_model_obj(model_id, name) for model_id, name in MODELS]
            body = {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}
            return json_reply(200, body, headers)
        for model_id, name in MODELS:
            if model_id == wanted:
                return json_reply(200, _model_obj(model_id, name), headers)
        return json_reply(404, error_body(404, model=wanted, request_id=ctx.request_id), headers)


def _model_obj(model_id: str, name: str) -> dict[str, object]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": name,
        "created_at": "2025-10-15T00:00:00Z",
        "lifecycle": "active",
        "max_input_tokens": MAX_CONTEXT_TOKENS,
        "max_tokens": MAX_OUTPUT_TOKENS,
    }


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The Anthropic simulator application.

    `knobs` are the start-up (and `DELETE /_sim/knobs` reset) knobs; with `api_key` set,
    API requests must send it in `x-api-key` (or `Authorization: Bearer`). Serve it with
    `switchyard.sim.faults.serve_app` (handler cancellation on) so client disconnects are
    noticed while the handler sleeps.
    """
    dialect = AnthropicDialect(api_key)
    return build_simulator_app(
        dialect,
        knobs,
        [API_PREFIX + "/v1/messages"],
        {
            ("GET", API_PREFIX + "/v1/models"): dialect.models,
            ("GET", API_PREFIX + "/v1/models/{model_id}"): dialect.models,
        },
    )
