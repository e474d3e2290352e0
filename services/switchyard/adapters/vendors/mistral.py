"""Mistral AI chat completions: the unified request to `POST /chat/completions`, its SSE
stream (or JSON answer) back to unified events, and its errors and rate-limit headers.

The wire format is Mistral's own (API reference "Chat Completion", the `mistralai` SDK's
`ChatCompletionStreamRequest`, `CompletionChunk`, `UsageInfo` models, and the request
validator of `mistral-common`); its chunks and its error table are close enough to
OpenAI's that `OpenAITranslator` / `OpenAIStreamDecoder` carry the shared parts and this
module overrides what differs:

* Base URL `https://api.mistral.ai/v1`, `Authorization: Bearer <key>`, `GET /models`.
* Request: `model`, `messages` -- `system` (text or text chunks), `user` (a string or
  chunks `{"type": "text", "text"}` / `{"type": "image_url", "image_url": "<https or data
  URL>"}`, the object form `{"url", "detail"}` when a detail is asked for), `assistant`
  (`content` and/or `tool_calls [{id, type: function, function: {name, arguments}}]`),
  `tool` (`tool_call_id`, optional `name`, `content`); no message but `tool` takes a `name`
  (unknown fields are a 422 `extra_forbidden`). `tools [{type: function, function: {name,
  description, parameters, strict}}]` (`parameters` is required), `tool_choice` (`auto`,
  `none`, `any` -- `required` is its alias -- or `{"type": "function", "function":
  {"name"}}`), `response_format` (`text`, `json_object`, `json_schema {name, schema,
  strict}`), `max_tokens`, `temperature`, `top_p`, `stop`, `random_seed`,
  `presence_penalty`, `frequency_penalty`, `safe_prompt`, `parallel_tool_calls`,
  `stream`. There is no `stream_options` (rejected as an extra field): usage always
  arrives. There is no end-user field, so `metadata.end_user` is refused.
* Mistral's validator (`mistral-common`, serving mode) requires tool-call ids of exactly
  nine letters or digits and a conversation that ends with a user or tool message.
  Ids from another vendor (`call_...`) are mapped to nine base-62 characters derived
  from a hash of the id -- the same id always gives the same result, so an assistant
  call and the tool answer that names it stay paired; a trailing assistant message is
  refused (its only Mistral form, `prefix: true`, means "continue this text").
* Stream: `data: <chat.completion.chunk>` events ending with `data: [DONE]`. `delta.content`
  is a string, or a list of chunks in which `{"type": "thinking", "thinking": [text
  chunks]}` is reasoning (magistral and other reasoning models) and `{"type": "text"}` is
  answer text. A tool call arrives whole in one delta (`id` of nine characters,
  `function.name`, `function.arguments` complete -- no `index`). The last chunk carries
  `finish_reason` (`stop`, `length`, `model_length`, `tool_calls`, `error`) together with
  `usage {prompt_tokens, completion_tokens, total_tokens, prompt_tokens_details:
  {cached_tokens}}` (older answers: `num_cached_tokens`). Reasoning tokens are part of
  `completion_tokens` and are not reported separately. A failure after the stream started
  is a chunk whose `finish_reason` is `error`.
* Errors: `{"object": "error", "message", "type", "param", "code", "raw_status_code"}`
  with numeric string codes (`1300` rate_limited, `1500` invalid_model -- an unknown model
  is a 400 --, `1910` tier_not_allowed, `3051` invalid_request_invalid_args -- including
  "Prompt contains N tokens ... too large for model with M maximum context length" --,
  `3230` invalid_request_message_order, `3800` service unavailable, `3810`
  engine_max_pending_tokens -- a 429 that means the model is out of capacity, not that
  the account is over its limit); request-schema errors are a 422 `{"detail": [{"type",
  "loc", "msg", "input"}]}`; the gateway answers a bad key with a 401 whose body is only
  prose (`{"detail": "Invalid API Key"}`, `{"message": "Unauthorized", ...}`). Messages
  can quote the prompt: they are read only to recognise the context-window one, and never
  forwarded.
* Headers: `mistral-correlation-id` (older: `x-kong-request-id`);
  `x-ratelimit-{limit,remaining}-req-minute`, `x-ratelimit-{limit,remaining}-tokens-minute`
  (monthly token figures beside them have no place in the headroom); older accounts send
  `x-ratelimitbysize-{limit,remaining}-minute` and `ratelimitbysize-{limit,remaining,reset}`
  (reset in seconds); `retry-after` on some 429s.
"""

from __future__ import annotations

import hashlib
import re
import string
import time
from collections.abc import Mapping
from typing import Any, ClassVar, Final

import grpc
import orjson

from switchyard.adapters.base import (
    VendorRequest,
    finish_headroom,
    parse_count,
    parse_duration,
    parse_error_body,
    parse_retry_after,
    require_model_and_messages,
    safe_code,
    timestamp_at,
)
from switchyard.adapters.vendors.common import (
    IMAGE_DETAIL,
    SamplingFields,
    chat_response_format,
    function_tool,
    function_tool_call,
    function_tool_choice,
    image_source_url,
    put_sampling,
    text_content,
    user_content,
)
from switchyard.adapters.vendors.openai import OpenAIStreamDecoder, OpenAITranslator
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.v1 import common_pb2, provider_pb2

CHAT_PATH: Final = "/chat/completions"
# `mistral-common`: tool-call ids are nine letters or digits; function (and tool message)
# names are 1-64 letters, digits, '_' or '-'.
_CALL_ID: Final = re.compile(r"[A-Za-z0-9]{9}")
_FUNCTION_NAME: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_BASE62: Final = string.ascii_letters + string.digits
# Matched at the start of a 400's message, which is Mistral's own sentence; the prompt
# never comes before it.
_CONTEXT_TOO_LONG: Final = re.compile(
    r"Prompt contains \d+ tokens.*too large for model with \d+ maximum context length", re.DOTALL
)
_EMPTY_PARAMETERS: Final[dict[str, Any]] = {"type": "object", "properties": {}}

_TOOL_CHOICE: Final[dict[common_pb2.ToolChoiceMode.ValueType, str]] = {
    common_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    common_pb2.TOOL_CHOICE_MODE_NONE: "none",
    # Mistral's own word; `required` is accepted as its alias.
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: "any",
}

_ROLE_NAMES: Final[dict[common_pb2.Role.ValueType, str]] = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}

# An error inside a 200 stream (or a body without `raw_status_code`) has no HTTP status;
# infer the one the same failure gets as an HTTP error, from its code first, then its type.
_STATUS_BY_CODE: Final = {
    "1300": 429,
    "1500": 400,
    "1910": 403,
    "3051": 400,
    "3230": 400,
    "3800": 503,
    "3810": 429,
}
_STATUS_BY_TYPE: Final = {
    "rate_limited": 429,
    "engine_max_pending_tokens": 429,
    "invalid_model": 400,
    "tier_not_allowed": 403,
    "invalid_request_error": 400,
    "invalid_request_invalid_args": 400,
    "invalid_request_message_order": 400,
    "internal_server_error": 500,
    "service_unavailable": 503,
}
_MODEL_NOT_FOUND: Final = frozenset({"1500", "invalid_model"})
_MODEL_AT_CAPACITY: Final = frozenset({"3810", "engine_max_pending_tokens"})


def mistral_call_id(call_id: str) -> str:
    """`call_id` if Mistral accepts it (nine letters or digits), else nine base-62
    characters derived from its hash: stable, so a call and its answer stay paired."""
    if _CALL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.blake2b(call_id.encode(), digest_size=16).digest(), "big")
    chars = []
    for _ in range(9):
        number, digit = divmod(number, 62)
        chars.append(_BASE62[digit])
    return "".join(chars)


class MistralTranslator(OpenAITranslator):
    """Mistral chat completions for one configured provider.

    Provider options: `safe_prompt` (bool) -- Mistral prepends its safety system prompt;
    `parallel_tool_calls` (bool) -- sent with requests that offer tools. `system_role` is
    OpenAI's option; Mistral only knows "system".
    """

    vendor: ClassVar[str] = "mistral"

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        options = provider.options
        if str(options.get("system_role", "system")) != "system":
            raise ValueError(f"provider {provider_name!r}: Mistral has no system role but 'system'")
        self._flags: dict[str, bool] = {}
        for option in ("safe_prompt", "parallel_tool_calls"):
            value = options.get(option)
            if value is None:
                continue
            if not isinstance(value, bool):
                raise ValueError(f"provider {provider_name!r}: options.{option} must be true or false")
            self._flags[option] = value
        super().__init__(provider_name, provider, api_key)

    # -- request ----------------------------------------------------------------
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The `POST /chat/completions` streaming request for `request`."""
        chat = require_model_and_messages(request)
        if chat.metadata.end_user:
            raise invalid("Mistral has no end-user field", "metadata.end_user")
        body: dict[str, Any] = {"model": request.upstream_model, "messages": _messages(chat)}
        if chat.tools:
            body["tools"] = [_tool(tool, i) for i, tool in enumerate(chat.tools)]
            if "parallel_tool_calls" in self._flags:
                body["parallel_tool_calls"] = self._flags["parallel_tool_calls"]
        if chat.HasField("tool_choice"):
            choice = _tool_choice(chat)
            if choice is not None:
                body["tool_choice"] = choice
        if chat.HasField("response_format"):
            response_format = _response_format(chat.response_format)
            if response_format is not None:
                body["response_format"] = response_format
        if chat.HasField("sampling"):
            _sampling(chat.sampling, body)
        if "safe_prompt" in self._flags:
            body["safe_prompt"] = self._flags["safe_prompt"]
        body["stream"] = True
        return VendorRequest("POST", CHAT_PATH, self._headers, body)

    # -- response -----------------------------------------------------------------
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> MistralStreamDecoder:
        """Decoding state for one chat completion."""
        return MistralStreamDecoder(self, request.request)

    def request_id(self, headers: Mapping[str, str]) -> str:
        """`mistral-correlation-id`, or the gateway's `x-kong-request-id`."""
        return headers.get("mistral-correlation-id") or headers.get("x-kong-request-id", "")

    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """Per-minute request and token figures (current and older header names) and
        `retry-after` as headroom; the older token reset (seconds) becomes a timestamp."""
        now = time.time()
        headroom = common_pb2.RateLimitHeadroom()
        found = False
        for attribute, names in (
            ("limit_requests", ("x-ratelimit-limit-req-minute",)),
            ("remaining_requests", ("x-ratelimit-remaining-req-minute",)),
            (
                "limit_tokens",
                (
                    "x-ratelimit-limit-tokens-minute",
                    "x-ratelimitbysize-limit-minute",
                    "ratelimitbysize-limit",
                ),
            ),
            (
                "remaining_tokens",
                (
                    "x-ratelimit-remaining-tokens-minute",
                    "x-ratelimitbysize-remaining-minute",
                    "ratelimitbysize-remaining",
                ),
            ),
        ):
            value = _first_count(headers, names)
            if value is not None:
                setattr(headroom, attribute, value)
                found = True
        reset = _token_reset(headers)
        if reset is not None:
            headroom.tokens_reset_at.CopyFrom(timestamp_at(now + reset))
            found = True
        return finish_headroom(headroom, headers, now, found=found)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for an HTTP error answer (see `mistral_error`)."""
        parsed = parse_error_body(body)
        code, kind, message = _error_fields(parsed)
        retry_after = parse_retry_after(headers)
        if retry_after is None and status == 429:
            retry_after = _token_reset(headers)
        extra = self.request_id_metadata(headers)
        return self.mistral_error(
            status,
            code,
            kind,
            context_too_long=status == 400 and _CONTEXT_TOO_LONG.match(message) is not None,
            quota_exhausted=status == 429 and _quota_exhausted(headers),
            headroom=self.headroom(headers),
            retry_after_s=retry_after,
            **extra,
        )

    def stream_error(self, error: object) -> SwitchyardError:
        """The unified error for a failure inside a 200 stream: a chunk whose finish reason
        is `error`, or an `{"object": "error", ...}` event."""
        if isinstance(error, dict) and "choices" in error:
            # A chunk that finished with `error`: Mistral says nothing more about why.
            return self.error_for(500, "", "", in_stream="true", finish_reason="error")
        code, kind, message = _error_fields(error)
        status = _STATUS_BY_CODE.get(code) or _STATUS_BY_TYPE.get(kind) or 500
        if isinstance(error, dict):
            declared = error.get("raw_status_code")
            if isinstance(declared, int) and not isinstance(declared, bool) and 400 <= declared <= 599:
                status = declared
        return self.mistral_error(
            status,
            code,
            kind,
            context_too_long=status == 400 and _CONTEXT_TOO_LONG.match(message) is not None,
            in_stream="true",
        )

    def mistral_error(
        self,
        status: int,
        code: str,
        kind: str,
        *,
        context_too_long: bool = False,
        quota_exhausted: bool = False,
        headroom: common_pb2.RateLimitHeadroom | None = None,
        retry_after_s: float | None = None,
        **extra: str,
    ) -> SwitchyardError:
        """Mistral's departures from the shared error table (`OpenAITranslator.error_for`,
        used for everything else):

        * a 400 naming the context window is INVALID_ARGUMENT / CONTEXT_TOO_LONG;
        * a 400 `invalid_model` (code 1500) is Mistral's "no such model": NOT_FOUND;
        * a 429 `engine_max_pending_tokens` (code 3810) means the model is out of
          capacity for everyone: UNAVAILABLE / PROVIDER_OVERLOADED;
        * a 429 while the account's allowance is zero (a plan without the model) or its
          monthly tokens are spent is RATE_LIMITED with `quota=exhausted` and no RetryInfo.
        """
        label = f"HTTP {status}" + (f" ({code or kind})" if code or kind else "")
        where = f"provider {self.provider_name!r}"
        grpc_code: grpc.StatusCode | None = None
        reason = Reason.INVALID_REQUEST
        message = ""
        retry: float | None = None
        if status == 400 and context_too_long:
            grpc_code, reason = grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG
            message = f"the prompt and output limit exceed the model's context window ({label})"
        elif status == 400 and (code in _MODEL_NOT_FOUND or kind in _MODEL_NOT_FOUND):
            grpc_code, reason = grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND
            message = f"{where} does not know the model ({label})"
        elif status == 429 and (code in _MODEL_AT_CAPACITY or kind in _MODEL_AT_CAPACITY):
            grpc_code, reason = grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED
            retry = retry_after_s
            message = f"{where} has no capacity for the model ({label})"
        elif status == 429 and quota_exhausted:
            grpc_code, reason = grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED
            extra["quota"] = "exhausted"
            message = f"{where} refused the request: the account's allowance is exhausted ({label})"
        if grpc_code is None:
            return self.error_for(status, code, kind, headroom=headroom, retry_after_s=retry_after_s, **extra)
        metadata = self.error_metadata(status, code or kind, headroom, **extra)
        if kind and kind != code:
            metadata["vendor_type"] = kind
        return SwitchyardError(grpc_code, reason, message, metadata=metadata, retry_after_s=retry)


class MistralStreamDecoder(OpenAIStreamDecoder):
    """Mistral chunks, brought to OpenAI's shape before OpenAI's decoding: content chunk
    lists become text and reasoning, whole tool calls get their positions, `model_length`
    is `length`, and a chunk finishing with `error` (or an error object) raises."""

    def __init__(self, translator: MistralTranslator, chat: common_pb2.ChatRequest) -> None:
        super().__init__(translator, chat)
        self._tool_calls_seen = 0

    def error_of(self, chunk: dict[str, Any]) -> object:
        """Mistral's error object is the event itself: `{"object": "error", ...}`."""
        return chunk if chunk.get("object") == "error" else None

    def cached_tokens_of(self, usage: dict[str, Any], prompt_details: dict[str, Any]) -> object:
        """`prompt_tokens_details.cached_tokens`, or the older `num_cached_tokens`."""
        cached = prompt_details.get("cached_tokens")
        return cached if cached is not None else usage.get("num_cached_tokens")

    def _chunk(self, chunk: dict[str, Any], key: str) -> list[provider_pb2.GenerateResponse]:
        choices = chunk.get("choices")
        if isinstance(choices, list):
            normalized: list[object] = []
            for choice in choices:
                if isinstance(choice, dict) and choice.get("index", 0) == 0:
                    finish = choice.get("finish_reason")
                    if finish == "error":
                        raise self._translator.stream_error(chunk)
                    if finish == "model_length":
                        choice = {**choice, "finish_reason": "length"}
                    delta = choice.get(key)
                    if isinstance(delta, dict):
                        choice = {**choice, key: self._openai_delta(delta)}
                normalized.append(choice)
            chunk = {**chunk, "choices": normalized}
        return super()._chunk(chunk, key)

    def _openai_delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        """`delta` (or a whole message) with content chunks split into `content` and
        `reasoning_content` strings and each tool call given its `index`."""
        out = dict(delta)
        content = delta.get("content")
        if isinstance(content, list):
            texts: list[str] = []
            thoughts: list[str] = []
            for part in content:
                if not isinstance(part, dict):
                    raise self._translator.protocol_error("a content chunk that is not a JSON object")
                kind = part.get("type")
                if kind == "text":
                    texts.append(self._text(part.get("text")))
                elif kind == "thinking":
                    thoughts.extend(self._thinking(part.get("thinking")))
                # Other chunks (references, images) are not answer text.
            out["content"] = "".join(texts)
            if thoughts:
                out["reasoning_content"] = "".join(thoughts)
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            out["tool_calls"] = [self._indexed(call) for call in calls]
        return out

    def _thinking(self, thinking: object) -> list[str]:
        if thinking is None:
            return []
        if not isinstance(thinking, list):
            raise self._translator.protocol_error("thinking that is not a list")
        return [
            self._text(part.get("text"))
            for part in thinking
            if isinstance(part, dict) and part.get("type") == "text"
        ]

    def _indexed(self, call: object) -> object:
        """A tool call with its `index` (Mistral sends whole calls without one) and its
        arguments as JSON text (the SDK also allows an object)."""
        if not isinstance(call, dict):
            return call
        out = dict(call)
        index = call.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            if call.get("id"):
                self._tool_calls_seen = max(self._tool_calls_seen, index + 1)
        elif call.get("id"):
            out["index"] = self._tool_calls_seen
            self._tool_calls_seen += 1
        else:
            out["index"] = max(self._tool_calls_seen - 1, 0)
        function = call.get("function")
        if isinstance(function, dict) and isinstance(function.get("arguments"), dict):
            out["function"] = {**function, "arguments": orjson.dumps(function["arguments"]).decode()}
        return out


# --------------------------------------------------------------------------- #
# request pieces
# --------------------------------------------------------------------------- #


def _messages(chat: common_pb2.ChatRequest) -> list[dict[str, Any]]:
    # Tool names by (Mistral) call id, from the assistant calls seen so far: a tool
    # answer without a name gets the name of the call it answers.
    names: dict[str, str] = {}
    out = [_message(message, i, names) for i, message in enumerate(chat.messages)]
    last = len(chat.messages) - 1
    if chat.messages[last].role == common_pb2.ROLE_ASSISTANT:
        raise invalid(
            "Mistral needs the conversation to end with a user or tool message", f"messages[{last}].role"
        )
    return out


def _message(message: common_pb2.Message, index: int, names: dict[str, str]) -> dict[str, Any]:
    where = f"messages[{index}]"
    role = _ROLE_NAMES.get(message.role)
    if role is None:
        raise invalid("the message role is required", f"{where}.role")
    if message.tool_calls and role != "assistant":
        raise invalid("only assistant messages carry tool calls", f"{where}.tool_calls")
    if message.tool_call_id and role != "tool":
        raise invalid("only tool messages answer a tool call", f"{where}.tool_call_id")
    if message.name and role != "tool":
        raise invalid(f"Mistral {role} messages take no name", f"{where}.name")
    if role == "user":
        return {"role": "user", "content": _user_content(message, where)}
    if role == "system":
        return {"role": "system", "content": _text_content(message, where, role)}
    if role == "assistant":
        if not message.parts and not message.tool_calls:
            raise invalid("an assistant message needs text or tool calls", f"{where}.parts")
        out: dict[str, Any] = {"role": "assistant"}
        if message.parts:
            out["content"] = _text_content(message, where, role)
        if message.tool_calls:
            out["tool_calls"] = [
                _tool_call(call, f"{where}.tool_calls[{i}]", names)
                for i, call in enumerate(message.tool_calls)
            ]
        return out
    if not message.tool_call_id:
        raise invalid("a tool message must name the call it answers", f"{where}.tool_call_id")
    call_id = mistral_call_id(message.tool_call_id)
    out = {"role": "tool", "tool_call_id": call_id, "content": _text_content(message, where, role)}
    name = message.name or names.get(call_id, "")
    if name:
        if not _FUNCTION_NAME.fullmatch(name):
            raise invalid("Mistral names are 1-64 letters, digits, '_' or '-'", f"{where}.name")
        out["name"] = name
    return out


def _text_content(message: common_pb2.Message, where: str, role: str) -> str | list[dict[str, str]]:
    """A text-only message: one string, or text chunks when there are several parts."""
    return text_content(message, where, role, "Mistral")


def _user_content(message: common_pb2.Message, where: str) -> str | list[dict[str, Any]]:
    return user_content(message, where, _image_url)


def _image_url(image: common_pb2.ImagePart, where: str) -> str | dict[str, str]:
    """The URL (https or `data:`) as a string, or `{url, detail}` when a detail is set."""
    url = image_source_url(image, where)
    detail = IMAGE_DETAIL.get(image.detail)
    return {"url": url, "detail": detail} if detail is not None else url


def _tool_call(call: common_pb2.ToolCall, where: str, names: dict[str, str]) -> dict[str, Any]:
    out = function_tool_call(call, where)
    if not _FUNCTION_NAME.fullmatch(call.name):
        raise invalid("Mistral function names are 1-64 letters, digits, '_' or '-'", f"{where}.name")
    call_id = mistral_call_id(call.id)
    names[call_id] = call.name
    out["id"] = call_id
    return out


def _tool(tool: common_pb2.Tool, index: int) -> dict[str, Any]:
    if tool.name and not _FUNCTION_NAME.fullmatch(tool.name):
        raise invalid("Mistral function names are 1-64 letters, digits, '_' or '-'", f"tools[{index}].name")
    # `parameters` is required by Mistral; a tool without arguments takes an empty object.
    return function_tool(tool, index, default_parameters=_EMPTY_PARAMETERS)


def _tool_choice(chat: common_pb2.ChatRequest) -> str | dict[str, Any] | None:
    return function_tool_choice(chat, _TOOL_CHOICE)


def _response_format(response_format: common_pb2.ResponseFormat) -> dict[str, Any] | None:
    # Mistral takes any schema name.
    return chat_response_format(response_format, check_schema_name=False)


_SAMPLING_FIELDS: Final = SamplingFields(seed="random_seed")


def _sampling(sampling: common_pb2.SamplingParams, body: dict[str, Any]) -> None:
    put_sampling(sampling, body, _SAMPLING_FIELDS, vendor="Mistral")


# --------------------------------------------------------------------------- #
# response pieces
# --------------------------------------------------------------------------- #


def _error_fields(body: object) -> tuple[str, str, str]:
    """The error's code and type (sanitised) and Mistral's message (only ever matched
    against `_CONTEXT_TOO_LONG`, never forwarded). A 422's first validation error type
    stands in for the type."""
    if not isinstance(body, dict):
        return "", "", ""
    code = body.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        code = str(code)
    kind = body.get("type")
    message = body.get("message")
    detail = body.get("detail")
    if isinstance(message, dict):  # an older 422: the validation errors inside `message`
        detail = message.get("detail")
    if not kind and isinstance(detail, list) and detail and isinstance(detail[0], dict):
        kind = detail[0].get("type")
    return safe_code(code), safe_code(kind), message if isinstance(message, str) else ""


def _first_count(headers: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        value = parse_count(headers, name)
        if value is not None:
            return value
    return None


def _token_reset(headers: Mapping[str, str]) -> float | None:
    """Seconds until the (older) token window resets, from `ratelimitbysize-reset`."""
    raw = headers.get("ratelimitbysize-reset")
    return parse_duration(raw) if raw else None


def _quota_exhausted(headers: Mapping[str, str]) -> bool:
    """A 429 that waiting cannot fix: no requests allowed at all on this plan, or the
    month's tokens spent."""
    return (
        parse_count(headers, "x-ratelimit-limit-req-minute") == 0
        or parse_count(headers, "x-ratelimit-remaining-tokens-month") == 0
    )
