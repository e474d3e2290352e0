"""Anthropic Messages API: the unified request to `POST /v1/messages`, its SSE stream (or
JSON answer) back to unified events, and its errors and rate-limit headers.

Wire format as documented in Anthropic's API reference (Messages, Streaming Messages,
Structured outputs, Errors, Rate limits, Versions) and as typed by the official Python SDK
(`anthropic`: `MessageCreateParams`, `RawMessageStreamEvent`, `Usage`, `ErrorResponse`):

* Request (`anthropic-version: 2023-06-01`, key in `x-api-key`): `model`, `max_tokens`
  (required), top-level `system` (a string or text blocks; system messages are not a
  message role), `messages` alternating `user` / `assistant` (consecutive turns of one role
  are merged here), content blocks `text`, `image` (`source` `{type: base64, media_type,
  data}` or `{type: url, url}`; jpeg, png, gif, webp), assistant `tool_use` blocks (`id`,
  `name`, `input` as a JSON object) and user `tool_result` blocks (`tool_use_id`, `content`),
  which must come first in their user turn; `tools [{name, description, input_schema,
  strict}]`, `tool_choice {type: auto|any|tool|none, name}`, `output_config: {format: {type:
  json_schema, schema}}` (structured outputs, generally available, no beta header),
  `stop_sequences`, `temperature` (0-1), `top_p`, `metadata.user_id`, `stream: true`.
  Anthropic has no `seed`, no presence or frequency penalty and no "any JSON object" mode
  (a structured-output schema must close every object with `additionalProperties: false`),
  so those are refused naming the field. A JSON schema's name has no Anthropic field (the
  format carries only the schema) and `strict: false` cannot loosen constrained decoding;
  neither changes what a valid answer is.
* Stream: named events `message_start` (the message with empty content and the input
  usage), per content block `content_block_start` (`text`, `thinking`, or `tool_use` with
  `id`, `name` and an empty `input`), `content_block_delta` (`text_delta`,
  `input_json_delta.partial_json`, `thinking_delta`, `signature_delta`, `citations_delta`)
  and `content_block_stop`; `message_delta` (`delta.stop_reason`, cumulative `usage`), then
  `message_stop`; `ping` at any time; `error` (`{"type": "error", "error": {type,
  message}}`) for a failure after the stream started. Unknown event types are ignored, as
  the versioning policy asks.
* Usage: `input_tokens` counts only uncached prompt tokens; the total prompt is
  `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`.
  `output_tokens` includes thinking, broken down in `output_tokens_details.thinking_tokens`.
* Errors: `{"type": "error", "error": {"type", "message", "details": {"error_code"}},
  "request_id"}`; 400 invalid_request_error, 401 authentication_error, 402 billing_error,
  403 permission_error, 404 not_found_error, 413 request_too_large, 429 rate_limit_error,
  500 api_error, 504 timeout_error, 529 overloaded_error. A prompt beyond the context window
  is a 400 whose message says "prompt is too long: N tokens > M maximum" (or "input length
  and `max_tokens` exceed context limit: ..."): the message is read only to classify it and
  is never forwarded, since it may quote the prompt.
* Headers: `request-id`; `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-
  {limit,remaining,reset}` with resets as RFC 3339 timestamps; `retry-after` in seconds.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, ClassVar, Final

import grpc
import orjson

from switchyard.adapters.base import (
    DEFAULT_RATE_LIMIT_RETRY_S,
    SseEvent,
    StreamDecoder,
    StreamOutcome,
    Translator,
    VendorRequest,
    clamp_uint32,
    estimated_usage,
    finish_headroom,
    http_status_class,
    parse_count,
    parse_error_body,
    parse_retry_after,
    require_model_and_messages,
    safe_code,
    timestamp_at,
)
from switchyard.adapters.vendors.common import json_object, json_schema_of, tool_choice_mode
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.v1 import common_pb2, provider_pb2

MESSAGES_PATH: Final = "/v1/messages"
MODELS_PATH: Final = "/v1/models"
API_VERSION: Final = "2023-06-01"
# `max_tokens` is required by Anthropic; without one in the request, this is sent (the
# provider option `default_max_tokens` overrides it).
DEFAULT_MAX_TOKENS: Final = 4096
# The image types Anthropic accepts (Vision: "Supported image formats").
IMAGE_MEDIA_TYPES: Final = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
_DATA_URL = re.compile(r"^data:([^;,]+);base64,(.*)$", re.DOTALL)

_FINISH_REASONS: Final[dict[str, common_pb2.FinishReason.ValueType]] = {
    "end_turn": common_pb2.FINISH_REASON_STOP,
    "stop_sequence": common_pb2.FINISH_REASON_STOP,
    "max_tokens": common_pb2.FINISH_REASON_LENGTH,
    # The answer ran into the context window: cut short like a max_tokens stop.
    "model_context_window_exceeded": common_pb2.FINISH_REASON_LENGTH,
    # A long server-tool turn paused; the answer is incomplete and may be continued.
    "pause_turn": common_pb2.FINISH_REASON_LENGTH,
    "tool_use": common_pb2.FINISH_REASON_TOOL_CALLS,
    "refusal": common_pb2.FINISH_REASON_CONTENT_FILTER,
}

_TOOL_CHOICE: Final[dict[common_pb2.ToolChoiceMode.ValueType, str]] = {
    common_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    common_pb2.TOOL_CHOICE_MODE_NONE: "none",
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: "any",
}

# An in-stream error has no HTTP status; the status its error type gets as an HTTP error.
_STATUS_BY_TYPE: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

# `error.details.error_code` values of a 429 that mean a spend limit was reached: waiting
# a minute does not help (see the SDK's ContractSpendLimitReachedError and
# EnforcedSpendLimitReachedError).
_SPEND_LIMIT_CODES: Final = frozenset({"contract_spend_limit_reached", "enforced_spend_limit_reached"})
# A 400 whose code says the provider's account itself is disabled (OrganizationOnHoldError).
_ACCOUNT_CODES: Final = frozenset({"organization_on_hold"})
# The documented wordings of a prompt that does not fit the context window (lowercased,
# backticks removed).
_CONTEXT_MESSAGES: Final = ("prompt is too long", "input length and max_tokens exceed context limit")
_RATE_LIMIT_FAMILIES: Final = ("requests", "tokens", "input-tokens", "output-tokens")


class AnthropicTranslator(Translator):
    """The Anthropic Messages API for one configured provider.

    Provider options: `default_max_tokens` -- the `max_tokens` sent when a request sets no
    output limit (Anthropic requires one); default 4096.
    """

    vendor: ClassVar[str] = "anthropic"

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        super().__init__(provider_name, provider, api_key)
        default_max = provider.options.get("default_max_tokens", DEFAULT_MAX_TOKENS)
        if isinstance(default_max, bool) or not isinstance(default_max, int) or default_max <= 0:
            raise ValueError(
                f"provider {provider_name!r}: options.default_max_tokens must be a positive integer"
            )
        self._default_max_tokens = default_max
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            "anthropic-version": API_VERSION,
        }
        if api_key:
            headers["x-api-key"] = api_key
        self._headers: Mapping[str, str] = headers

    # -- request ----------------------------------------------------------------
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The streaming `POST /v1/messages` request for `request`."""
        chat = require_model_and_messages(request)
        system, messages = _conversation(chat.messages)
        if not messages:
            raise invalid("Anthropic needs at least one user or assistant message", "messages")
        body: dict[str, Any] = {"model": request.upstream_model, "max_tokens": self._default_max_tokens}
        if system is not None:
            body["system"] = system
        body["messages"] = messages
        if chat.tools:
            body["tools"] = [_tool(tool, i) for i, tool in enumerate(chat.tools)]
        if chat.HasField("tool_choice"):
            choice = _tool_choice(chat)
            if choice is not None:
                body["tool_choice"] = choice
        if chat.HasField("response_format"):
            output_format = _output_format(chat.response_format)
            if output_format is not None:
                body["output_config"] = {"format": output_format}
        if chat.HasField("sampling"):
            _sampling(chat.sampling, body)
        if chat.metadata.end_user:
            body["metadata"] = {"user_id": chat.metadata.end_user}
        body["stream"] = True
        return VendorRequest("POST", MESSAGES_PATH, self._headers, body)

    def models_request(self) -> VendorRequest:
        """`GET /v1/models`: authenticated, free, and fast."""
        return VendorRequest(
            "GET", MODELS_PATH, {k: v for k, v in self._headers.items() if k != "content-type"}
        )

    def request_id(self, headers: Mapping[str, str]) -> str:
        """Anthropic's `request-id` header (`req_...`)."""
        return headers.get("request-id", "")

    # -- response -----------------------------------------------------------------
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> AnthropicStreamDecoder:
        """Decoding state for one message."""
        return AnthropicStreamDecoder(self, request.request)

    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """`anthropic-ratelimit-*` and `retry-after` headers as headroom.

        Tokens come from the `tokens` family (the most restrictive limit in effect), or from
        `input-tokens` when a response carries only that one.
        """
        now = time.time()
        headroom = common_pb2.RateLimitHeadroom()
        found = False
        token_family = "tokens" if _has_family(headers, "tokens") else "input-tokens"
        for family, kind in (("requests", "requests"), (token_family, "tokens")):
            limit = parse_count(headers, f"anthropic-ratelimit-{family}-limit")
            if limit is not None:
                setattr(headroom, f"limit_{kind}", limit)
                found = True
            remaining = parse_count(headers, f"anthropic-ratelimit-{family}-remaining")
            if remaining is not None:
                setattr(headroom, f"remaining_{kind}", remaining)
                found = True
            reset = _parse_rfc3339(headers.get(f"anthropic-ratelimit-{family}-reset"))
            if reset is not None:
                getattr(headroom, f"{kind}_reset_at").CopyFrom(timestamp_at(reset))
                found = True
        return finish_headroom(headroom, headers, now, found=found)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for an HTTP error answer (see `error_for`)."""
        parsed = parse_error_body(body)
        error = parsed.get("error") if isinstance(parsed, dict) else None
        headroom = self.headroom(headers)
        retry_after = parse_retry_after(headers)
        if retry_after is None and status == 429:
            retry_after = _reset_of_exhausted_limit(headers)
        extra = {}
        request_id = self.request_id(headers)
        if not request_id and isinstance(parsed, dict) and isinstance(parsed.get("request_id"), str):
            request_id = parsed["request_id"]
        if request_id:
            extra["vendor_request_id"] = safe_code(request_id)
        return self.error_for(status, error, headroom=headroom, retry_after_s=retry_after, **extra)

    def stream_error(self, error: object) -> SwitchyardError:
        """The unified error for an `error` event inside a 200 stream."""
        kind = safe_code(error.get("type")) if isinstance(error, dict) else ""
        return self.error_for(_STATUS_BY_TYPE.get(kind, 500), error, in_stream="true")

    def error_for(
        self,
        status: int,
        error: object,
        *,
        headroom: common_pb2.RateLimitHeadroom | None = None,
        retry_after_s: float | None = None,
        **extra: str,
    ) -> SwitchyardError:
        """The error table: vendor HTTP status plus error type and code to code and reason.

        The same choices as OpenAI's table wherever the meaning is the same: 401/403 are
        FAILED_PRECONDITION / AUTH_FAILED (the provider's key is wrong, not the caller's);
        529 `overloaded_error` joins 503 as UNAVAILABLE / PROVIDER_OVERLOADED; a 402
        `billing_error` and a 429 for a reached spend limit are RESOURCE_EXHAUSTED /
        RATE_LIMITED with `quota=exhausted` and no RetryInfo, like OpenAI's
        `insufficient_quota`: waiting does not refill the account, another provider may
        serve the request.
        """
        kind, code = _type_and_code(error)
        metadata = self.error_metadata(status, code or kind, headroom, **extra)
        if kind and code:
            metadata["vendor_type"] = kind
        label = f"HTTP {status}" + (f" ({code or kind})" if code or kind else "")
        where = f"provider {self.provider_name!r}"
        retry: float | None = None
        if status == 402 or (status == 429 and code in _SPEND_LIMIT_CODES):
            grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = Reason.RATE_LIMITED
            metadata["quota"] = "exhausted"
            message = f"{where} refused the request: the account's spend or credit is exhausted ({label})"
        elif status == 429:
            grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = Reason.RATE_LIMITED
            retry = retry_after_s if retry_after_s is not None else DEFAULT_RATE_LIMIT_RETRY_S
            message = f"{where} rate-limited the request ({label})"
        elif status in (401, 403) or code in _ACCOUNT_CODES:
            grpc_code = grpc.StatusCode.FAILED_PRECONDITION
            reason = Reason.AUTH_FAILED
            message = f"{where} rejected the configured credentials ({label})"
        elif (shared := http_status_class(status, where, label, retry_after_s)) is not None:
            grpc_code, reason, message, retry = shared
        elif status == 400 and _is_context_overflow(error):
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.CONTEXT_TOO_LONG
            message = f"the prompt and output limit exceed the model's context window ({label})"
        else:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.INVALID_REQUEST
            message = f"{where} rejected the request ({label})"
        return SwitchyardError(grpc_code, reason, message, metadata=metadata, retry_after_s=retry)


class AnthropicStreamDecoder(StreamDecoder):
    """Messages stream events (or one whole message) to unified events."""

    def __init__(self, translator: AnthropicTranslator, chat: common_pb2.ChatRequest) -> None:
        self._translator = translator
        self._chat = chat
        self.finished = False
        self._finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self._message_id = ""
        self._model = ""
        # Usage as Anthropic counts it; normalised in `outcome`.
        self._usage_seen = False
        self._input = 0
        self._cache_read = 0
        self._cache_write = 0
        self._output = 0
        self._thinking = 0
        # Content block index -> position of its tool call among this answer's tool calls.
        self._tool_calls: dict[int, int] = {}
        # Only for the estimate when no usage arrives; counting is cheaper than keeping text.
        self._output_chars = 0

    def on_event(self, event: SseEvent) -> list[provider_pb2.GenerateResponse]:
        """Deltas of one named event; `message_stop` finishes; `error` raises."""
        data = event.data
        if self.finished or not data or data.isspace():
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("an event that is not valid JSON") from None
        if not isinstance(payload, dict):
            raise self._translator.protocol_error("an event that is not a JSON object")
        kind = payload.get("type")
        if kind == "error" or event.event == "error":
            raise self._translator.stream_error(payload.get("error"))
        if kind == "content_block_delta":
            return self._block_delta(payload)
        if kind == "content_block_start":
            return self._block_start(payload)
        if kind == "message_start":
            message = payload.get("message")
            if not isinstance(message, dict):
                raise self._translator.protocol_error("a message_start without a message object")
            self._message_head(message)
            self._read_usage(message.get("usage"))
        elif kind == "message_delta":
            delta = payload.get("delta")
            if not isinstance(delta, dict):
                raise self._translator.protocol_error("a message_delta without a delta object")
            self._stop_reason(delta.get("stop_reason"))
            self._read_usage(payload.get("usage"))
        elif kind == "message_stop":
            self.finished = True
        # `ping`, `content_block_stop` and event types added later carry nothing for us.
        return []

    def on_body(self, body: bytes) -> list[provider_pb2.GenerateResponse]:
        """Deltas of a whole `message` object (a server that ignored `stream`)."""
        try:
            message = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("a body that is not valid JSON") from None
        if not isinstance(message, dict):
            raise self._translator.protocol_error("a body that is not a JSON object")
        if message.get("type") == "error":
            raise self._translator.stream_error(message.get("error"))
        self._message_head(message)
        content = message.get("content") or []
        if not isinstance(content, list):
            raise self._translator.protocol_error("message content that is not a list")
        events: list[provider_pb2.GenerateResponse] = []
        for index, block in enumerate(content):
            events.extend(self._block_start({"index": index, "content_block": block}, whole=True))
        self._stop_reason(message.get("stop_reason"))
        self._read_usage(message.get("usage"))
        self.finished = True
        return events

    def outcome(self) -> StreamOutcome:
        """Usage normalised (input includes cached and cache-written tokens; estimated at
        ~4 characters per token when Anthropic sent none), finish reason, message id, model."""
        if self._usage_seen:
            usage = common_pb2.Usage(
                input_tokens=clamp_uint32(self._input + self._cache_read + self._cache_write),
                output_tokens=clamp_uint32(self._output),
                cached_input_tokens=clamp_uint32(self._cache_read),
                reasoning_tokens=clamp_uint32(self._thinking),
                cache_write_input_tokens=clamp_uint32(self._cache_write),
            )
        else:
            usage = estimated_usage(self._chat, self._output_chars)
        return StreamOutcome(usage, self._finish, self._message_id, self._model)

    # -- pieces -------------------------------------------------------------------
    def _message_head(self, message: dict[str, Any]) -> None:
        if not self._message_id:
            self._message_id = self._text(message.get("id"))
        if not self._model:
            self._model = self._text(message.get("model"))

    def _stop_reason(self, value: object) -> None:
        if value is None:
            return
        if not isinstance(value, str):
            raise self._translator.protocol_error("a stop reason that is not a string")
        self._finish = _FINISH_REASONS.get(value, common_pb2.FINISH_REASON_UNSPECIFIED)

    def _block_start(
        self, payload: dict[str, Any], whole: bool = False
    ) -> list[provider_pb2.GenerateResponse]:
        index = self._index(payload)
        block = payload.get("content_block")
        if not isinstance(block, dict):
            raise self._translator.protocol_error("a content block that is not a JSON object")
        kind = block.get("type")
        out = common_pb2.Delta()
        if kind == "text":
            out.text = self._text(block.get("text"))
            self._output_chars += len(out.text)
        elif kind == "thinking":
            out.reasoning_text = self._text(block.get("thinking"))
            self._output_chars += len(out.reasoning_text)
        elif kind == "tool_use":
            position = len(self._tool_calls)
            self._tool_calls[index] = position
            call_id, name = self._text(block.get("id")), self._text(block.get("name"))
            if not call_id or not name:
                raise self._translator.protocol_error("a tool call without its id or name")
            arguments = ""
            tool_input = block.get("input")
            # Streams open a tool call with an empty input and send it in deltas; a whole
            # message (or a server that sends the input at once) carries it here.
            if tool_input:
                if not isinstance(tool_input, dict):
                    raise self._translator.protocol_error("a tool input that is not a JSON object")
                arguments = orjson.dumps(tool_input).decode()
            elif whole:
                arguments = "{}"
            self._output_chars += len(name) + len(arguments)
            out.tool_calls.add(index=position, id=call_id, name=name, arguments_fragment=arguments)
        # Redacted thinking and server-tool blocks (never requested) carry no text for us.
        if not (out.text or out.reasoning_text or out.tool_calls):
            return []
        return [provider_pb2.GenerateResponse(delta=out)]

    def _block_delta(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        index = self._index(payload)
        delta = payload.get("delta")
        if not isinstance(delta, dict):
            raise self._translator.protocol_error("a content block delta that is not a JSON object")
        kind = delta.get("type")
        out = common_pb2.Delta()
        if kind == "text_delta":
            out.text = self._text(delta.get("text"))
            self._output_chars += len(out.text)
        elif kind == "thinking_delta":
            out.reasoning_text = self._text(delta.get("thinking"))
            self._output_chars += len(out.reasoning_text)
        elif kind == "input_json_delta":
            position = self._tool_calls.get(index)
            if position is None:
                raise self._translator.protocol_error(
                    "tool input for a content block that is not a tool call"
                )
            fragment = self._text(delta.get("partial_json"))
            if not fragment:
                return []
            self._output_chars += len(fragment)
            out.tool_calls.add(index=position, arguments_fragment=fragment)
        # `signature_delta` and `citations_delta` add nothing to the unified answer.
        if not (out.text or out.reasoning_text or out.tool_calls):
            return []
        return [provider_pb2.GenerateResponse(delta=out)]

    def _index(self, payload: dict[str, Any]) -> int:
        index = payload.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise self._translator.protocol_error("a content block with an invalid index")
        return index

    def _read_usage(self, usage: object) -> None:
        """Take the counts present; `message_delta` repeats them cumulatively."""
        if usage is None:
            return
        if not isinstance(usage, dict):
            raise self._translator.protocol_error("usage that is not a JSON object")
        self._usage_seen = True
        for key, attribute in (
            ("input_tokens", "_input"),
            ("cache_read_input_tokens", "_cache_read"),
            ("cache_creation_input_tokens", "_cache_write"),
            ("output_tokens", "_output"),
        ):
            value = usage.get(key)
            if value is not None:
                setattr(self, attribute, self._count(value))
        details = usage.get("output_tokens_details")
        if details is not None:
            if not isinstance(details, dict):
                raise self._translator.protocol_error("output token details that are not a JSON object")
            thinking = details.get("thinking_tokens")
            if thinking is not None:
                self._thinking = self._count(thinking)

    def _text(self, value: object) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise self._translator.protocol_error("a text field that is not a string")

    def _count(self, value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return clamp_uint32(value)
        raise self._translator.protocol_error("a token count that is not an integer")


# --------------------------------------------------------------------------- #
# request pieces
# --------------------------------------------------------------------------- #


def _conversation(
    messages: Iterable[common_pb2.Message],
) -> tuple[str | list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """Top-level `system` and the alternating user / assistant turns.

    System messages become the top-level system prompt, in order (Anthropic has no system
    role). Tool answers become `tool_result` blocks of a user turn. Consecutive messages
    that land on the same role are merged into one turn, with `tool_result` blocks first
    as Anthropic requires.
    """
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.role
        if role == common_pb2.ROLE_UNSPECIFIED:
            raise invalid("the message role is required", f"{where}.role")
        if message.name:
            raise invalid("Anthropic messages carry no participant name", f"{where}.name")
        if message.tool_calls and role != common_pb2.ROLE_ASSISTANT:
            raise invalid("only assistant messages carry tool calls", f"{where}.tool_calls")
        if message.tool_call_id and role != common_pb2.ROLE_TOOL:
            raise invalid("only tool messages answer a tool call", f"{where}.tool_call_id")
        if role == common_pb2.ROLE_SYSTEM:
            blocks = _text_blocks(message, where, "system")
            if not blocks:
                raise invalid("a system message needs text", f"{where}.parts")
            system.extend(blocks)
            continue
        if role == common_pb2.ROLE_USER:
            turn_role, blocks = "user", _user_blocks(message, where)
        elif role == common_pb2.ROLE_ASSISTANT:
            turn_role, blocks = "assistant", _assistant_blocks(message, where)
        elif role == common_pb2.ROLE_TOOL:
            turn_role, blocks = "user", [_tool_result(message, where)]
        else:
            raise invalid("unknown message role", f"{where}.role")
        if not blocks:
            raise invalid("Anthropic does not accept an empty message", f"{where}.parts")
        if turns and turns[-1]["role"] == turn_role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": turn_role, "content": blocks})
    for turn in turns:
        content: list[dict[str, Any]] = turn["content"]
        results = [block for block in content if block["type"] == "tool_result"]
        if results and len(results) != len(content):
            content = results + [block for block in content if block["type"] != "tool_result"]
        turn["content"] = (
            content[0]["text"] if len(content) == 1 and content[0]["type"] == "text" else content
        )
    if not system:
        return None, turns
    if len(system) == 1:
        return system[0]["text"], turns
    return system, turns


def _text_blocks(message: common_pb2.Message, where: str, role: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(message.parts):
        if part.HasField("image"):
            raise invalid(f"Anthropic {role} messages cannot hold images", f"{where}.parts[{i}].image")
        # An empty text block is refused by Anthropic and adds nothing: leave it out.
        if part.text:
            blocks.append({"type": "text", "text": part.text})
    return blocks


def _user_blocks(message: common_pb2.Message, where: str) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for i, part in enumerate(message.parts):
        if part.HasField("image"):
            blocks.append(_image(part.image, f"{where}.parts[{i}].image"))
        elif part.text:
            blocks.append({"type": "text", "text": part.text})
    return blocks


def _assistant_blocks(message: common_pb2.Message, where: str) -> list[dict[str, Any]]:
    blocks = _text_blocks(message, where, "assistant")
    for i, call in enumerate(message.tool_calls):
        blocks.append(_tool_use(call, f"{where}.tool_calls[{i}]"))
    return blocks


def _tool_result(message: common_pb2.Message, where: str) -> dict[str, Any]:
    if not message.tool_call_id:
        raise invalid("a tool message must name the call it answers", f"{where}.tool_call_id")
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.tool_call_id}
    content = _user_blocks(message, where)
    if len(content) == 1 and content[0]["type"] == "text":
        block["content"] = content[0]["text"]
    elif content:
        block["content"] = content
    return block


def _tool_use(call: common_pb2.ToolCall, where: str) -> dict[str, Any]:
    if not call.id:
        raise invalid("a tool call needs its id", f"{where}.id")
    if not call.name:
        raise invalid("a tool call needs its name", f"{where}.name")
    arguments: object = {}
    if call.arguments_json:
        try:
            arguments = orjson.loads(call.arguments_json)
        except orjson.JSONDecodeError:
            raise invalid("the arguments are not valid JSON", f"{where}.arguments_json") from None
        if not isinstance(arguments, dict):
            raise invalid("Anthropic tool inputs must be JSON objects", f"{where}.arguments_json")
    return {"type": "tool_use", "id": call.id, "name": call.name, "input": arguments}


def _image(image: common_pb2.ImagePart, where: str) -> dict[str, Any]:
    if image.detail in (common_pb2.IMAGE_DETAIL_LOW, common_pb2.IMAGE_DETAIL_HIGH):
        raise invalid("Anthropic has no image detail setting", f"{where}.detail")
    if image.url and image.data:
        raise invalid("an image has either a URL or inline data, not both", f"{where}.data")
    if image.data:
        media_type = image.mime_type
        if not media_type:
            raise invalid("inline image data needs its MIME type", f"{where}.mime_type")
        data = base64.b64encode(image.data).decode("ascii")
        field = f"{where}.mime_type"
    elif image.url.startswith("data:"):
        match = _DATA_URL.match(image.url)
        if match is None:
            raise invalid("a data URL image must be base64-encoded", f"{where}.url")
        media_type, data = match.group(1), match.group(2)
        try:
            base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("the data URL holds invalid base64", f"{where}.url") from None
        field = f"{where}.url"
    elif image.url:
        return {"type": "image", "source": {"type": "url", "url": image.url}}
    else:
        raise invalid("an image needs a URL or inline data", f"{where}.url")
    if media_type not in IMAGE_MEDIA_TYPES:
        raise invalid("Anthropic accepts JPEG, PNG, GIF and WebP images only", field)
    return {"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}


def _tool(tool: common_pb2.Tool, index: int) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not tool.name:
        raise invalid("a tool needs a name", f"{where}.name")
    schema: dict[str, Any] = {"type": "object"}
    if tool.parameters_json_schema:
        schema = json_object(tool.parameters_json_schema, f"{where}.parameters_json_schema")
        if schema.get("type") != "object":
            raise invalid(
                "Anthropic tool input schemas must have type object", f"{where}.parameters_json_schema"
            )
    out: dict[str, Any] = {"name": tool.name}
    if tool.description:
        out["description"] = tool.description
    out["input_schema"] = schema
    if tool.strict:
        out["strict"] = True
    return out


def _tool_choice(chat: common_pb2.ChatRequest) -> dict[str, Any] | None:
    mode = tool_choice_mode(chat)
    if mode is None:
        return None
    if mode == common_pb2.TOOL_CHOICE_MODE_TOOL:
        return {"type": "tool", "name": chat.tool_choice.tool_name}
    named = _TOOL_CHOICE.get(mode)
    if named is None:
        raise invalid("unknown tool choice mode", "tool_choice.mode")
    return {"type": named}


def _output_format(response_format: common_pb2.ResponseFormat) -> dict[str, Any] | None:
    kind = response_format.type
    if kind in (common_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED, common_pb2.RESPONSE_FORMAT_TYPE_TEXT):
        return None
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        raise invalid(
            "Anthropic has no free-form JSON object mode; ask for a JSON schema instead", "response_format"
        )
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        return {"type": "json_schema", "schema": json_schema_of(response_format)}
    raise invalid("unknown response format type", "response_format.type")


def _sampling(sampling: common_pb2.SamplingParams, body: dict[str, Any]) -> None:
    if sampling.HasField("seed"):
        raise invalid("Anthropic has no sampling seed", "sampling.seed")
    if sampling.HasField("presence_penalty"):
        raise invalid("Anthropic has no presence penalty", "sampling.presence_penalty")
    if sampling.HasField("frequency_penalty"):
        raise invalid("Anthropic has no frequency penalty", "sampling.frequency_penalty")
    if sampling.HasField("max_output_tokens"):
        body["max_tokens"] = sampling.max_output_tokens
    if sampling.HasField("temperature"):
        if not 0.0 <= sampling.temperature <= 1.0:
            raise invalid("Anthropic temperatures range from 0 to 1", "sampling.temperature")
        body["temperature"] = sampling.temperature
    if sampling.HasField("top_p"):
        if not 0.0 <= sampling.top_p <= 1.0:
            raise invalid("top_p ranges from 0 to 1", "sampling.top_p")
        body["top_p"] = sampling.top_p
    if sampling.stop_sequences:
        if any(not stop for stop in sampling.stop_sequences):
            raise invalid("stop sequences must not be empty", "sampling.stop_sequences")
        body["stop_sequences"] = list(sampling.stop_sequences)


# --------------------------------------------------------------------------- #
# error and header pieces
# --------------------------------------------------------------------------- #


def _type_and_code(error: object) -> tuple[str, str]:
    """The error's `type` and `details.error_code`, sanitised; the message is not read."""
    if not isinstance(error, dict):
        return "", ""
    details = error.get("details")
    code = safe_code(details.get("error_code")) if isinstance(details, dict) else ""
    return safe_code(error.get("type")), code


def _is_context_overflow(error: object) -> bool:
    """Whether a 400's message is Anthropic's "prompt is too long" (only this verdict
    leaves here: the message itself may quote the prompt)."""
    if not isinstance(error, dict):
        return False
    message = error.get("message")
    if not isinstance(message, str):
        return False
    text = message[:512].lower().replace("`", "")
    return any(phrase in text for phrase in _CONTEXT_MESSAGES)


def _parse_rfc3339(value: str | None) -> float | None:
    """UNIX seconds of an RFC 3339 timestamp with a time zone, else None."""
    if not value:
        return None
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.timestamp()


def _has_family(headers: Mapping[str, str], family: str) -> bool:
    return any(
        headers.get(f"anthropic-ratelimit-{family}-{field}") is not None
        for field in ("limit", "remaining", "reset")
    )


def _reset_of_exhausted_limit(headers: Mapping[str, str]) -> float | None:
    """For a 429 without `retry-after`: seconds until the exhausted limit resets."""
    now = time.time()
    waits: list[float] = []
    for family in _RATE_LIMIT_FAMILIES:
        if parse_count(headers, f"anthropic-ratelimit-{family}-remaining") == 0:
            reset = _parse_rfc3339(headers.get(f"anthropic-ratelimit-{family}-reset"))
            if reset is not None:
                waits.append(max(0.0, reset - now))
    return max(waits) if waits else None
