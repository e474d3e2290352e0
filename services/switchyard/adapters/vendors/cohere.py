"""Cohere Chat API v2: the unified request to `POST /v2/chat`, its SSE stream (or JSON
answer) back to unified events, and its errors and rate-limit headers.

Wire format as documented in Cohere's API reference (Chat v2, "Streaming Responses",
"Errors", "API Keys and Rate Limits") and as the official `cohere` Python SDK (7.x,
`cohere.v2`, `cohere.types`) reads and writes it:

* Base URL `https://api.cohere.com` (the SDK joins `v2/chat`, `v1/models` onto it), auth
  `Authorization: Bearer <key>`.
* Request: `model`, `messages` -- `system` (string or text parts), `user` (string or
  `text` / `image_url {url, detail}` parts), `assistant` (`content` string or text parts,
  `tool_plan`, `tool_calls [{id, type: function, function: {name, arguments}}]`), `tool`
  (`tool_call_id`, `content` string or text parts) --, `tools [{type: function, function:
  {name, description, parameters}}]` (no per-tool `strict`: the request-level
  `strict_tools` instead; Cohere answers an unknown field with 422), `tool_choice`
  (`"REQUIRED"` / `"NONE"`; its absence is "auto"), `response_format` (`{"type":
  "text"}`, `{"type": "json_object"}` or `{"type": "json_object", "json_schema": {...}}`,
  documented as not combinable with `tools`), `max_tokens`, `temperature`, `p` (top-p),
  `k`, `seed`, `stop_sequences` (at most 5), `frequency_penalty`, `presence_penalty`,
  `safety_mode` (`CONTEXTUAL` / `STRICT` / `OFF`), `stream: true`. There is no end-user
  field.
* Stream: `event: <type>` / `data: <json>` events whose `type` repeats the event name:
  `message-start` (`id`), `content-start` / `content-delta` / `content-end` (a content
  block at `index`; `delta.message.content.text`, or `.thinking` for a reasoning block),
  `tool-plan-delta` (`delta.message.tool_plan`: the model's plan before calling tools --
  not answer text), `tool-call-start` (`delta.message.tool_calls {id, type, function:
  {name, arguments}}`), `tool-call-delta` (`delta.message.tool_calls.function.arguments`
  fragments), `tool-call-end`, `citation-start` / `citation-end`, `debug`, and one final
  `message-end` with `delta.finish_reason` (`COMPLETE`, `STOP_SEQUENCE`, `MAX_TOKENS`,
  `TOOL_CALL`, `ERROR`, `TIMEOUT`), `delta.usage {billed_units {input_tokens,
  output_tokens}, tokens {input_tokens, output_tokens}, cached_tokens}` and, for a failed
  generation, `delta.error` (free text). The `index` of content and tool-call events is a
  position among all blocks of the message, so tool calls are renumbered from 0 here.
* Errors: `{"id": ..., "message": ...}` (older answers: `{"message": ...}`) with the
  HTTP status: 400 (a message starting "too many tokens" for a prompt over the context
  window), 401, 402 (billing limit reached), 403, 404, 422 (unknown or invalid field), 429,
  498 (invalid token), 499 (request cancelled), 500, 501, 503, 504. There are no error
  codes; the message may quote the prompt, so it is only matched against a few known
  prefixes and never forwarded.
* Headers: `x-debug-trace-id` (the trace Cohere support asks for; the request id here),
  `x-trial-endpoint-call-limit` / `x-trial-endpoint-call-remaining` (requests per minute,
  sent for trial keys), `x-endpoint-monthly-call-limit`, `retry-after` when present.

Usage is `tokens` (what the model consumed) rather than `billed_units` (which leaves out
Cohere's own preamble), `cached_tokens` being the part of the input that hit the cache.
Cohere reports no reasoning-token count, so `reasoning_tokens` stays 0 even when a
reasoning model streams thinking (which is sent as `reasoning_text`, never as text).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
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
    parse_error_body,
    parse_retry_after,
    put_counts,
    require_model_and_messages,
    safe_code,
)
from switchyard.adapters.vendors.common import (
    SamplingFields,
    function_tool,
    function_tool_call,
    json_schema_of,
    put_sampling,
    text_content,
    text_parts,
    tool_choice_mode,
    user_content,
)
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.v1 import common_pb2, provider_pb2

CHAT_PATH: Final = "/v2/chat"
MODELS_PATH: Final = "/v1/models"
# Cohere accepts at most five stop sequences; refusing more here names the field.
MAX_STOP_SEQUENCES: Final = 5
SAFETY_MODES: Final = ("CONTEXTUAL", "STRICT", "OFF")
REQUEST_ID_HEADER: Final = "x-debug-trace-id"
_DONE: Final = b"[DONE]"
# An object schema with no parameters: Cohere requires `parameters` on every function.
_NO_PARAMETERS: Final[dict[str, Any]] = {"type": "object", "properties": {}}

_FINISH_REASONS: Final[dict[str, common_pb2.FinishReason.ValueType]] = {
    "COMPLETE": common_pb2.FINISH_REASON_STOP,
    "STOP_SEQUENCE": common_pb2.FINISH_REASON_STOP,
    "MAX_TOKENS": common_pb2.FINISH_REASON_LENGTH,
    "TOOL_CALL": common_pb2.FINISH_REASON_TOOL_CALLS,
}
# Finish reasons that mean the generation failed: raised as errors, not answers.
_FAILED_FINISH: Final = frozenset({"ERROR", "TIMEOUT"})

# Cohere's error bodies carry no code, only a message that may quote the prompt. These
# documented message prefixes (compared in lower case) are turned into a fixed code; the
# message itself is never kept.
_MESSAGE_CODES: Final = (
    ("too many tokens", "too_many_tokens"),
    ("unknown field", "unknown_field"),
    ("invalid request", "invalid_request"),
    ("invalid api token", "invalid_api_token"),
    ("no api key supplied", "no_api_key"),
)
_CONTEXT_TOO_LONG_CODES: Final = frozenset({"too_many_tokens"})


class CohereTranslator(Translator):
    """Cohere Chat API v2 for one configured provider.

    Provider options: `safety_mode` -- "CONTEXTUAL", "STRICT" or "OFF" -- is sent as
    Cohere's `safety_mode` on every request (unset: Cohere's default, CONTEXTUAL).
    """

    vendor: ClassVar[str] = "cohere"

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        super().__init__(provider_name, provider, api_key)
        safety_mode = provider.options.get("safety_mode")
        if safety_mode is not None and safety_mode not in SAFETY_MODES:
            raise ValueError(
                f"provider {provider_name!r}: options.safety_mode must be one of {', '.join(SAFETY_MODES)}"
            )
        self._safety_mode: str | None = safety_mode
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers: Mapping[str, str] = headers

    # -- request ----------------------------------------------------------------
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The streaming `POST /v2/chat` request for `request`."""
        chat = require_model_and_messages(request)
        if chat.metadata.end_user:
            raise invalid("Cohere's Chat API has no end-user field", "metadata.end_user")
        body: dict[str, Any] = {
            "model": request.upstream_model,
            "messages": [_message(message, i) for i, message in enumerate(chat.messages)],
        }
        offered = list(range(len(chat.tools)))
        if chat.HasField("tool_choice"):
            choice, offered = _tool_choice(chat)
            if choice is not None:
                body["tool_choice"] = choice
        if offered:
            body["tools"] = [_tool(chat.tools[i], i) for i in offered]
            if any(chat.tools[i].strict for i in offered):
                # Cohere's strictness is per request: asked for one tool, it holds for all.
                body["strict_tools"] = True
        if chat.HasField("response_format"):
            response_format = _response_format(chat.response_format)
            if response_format is not None:
                if chat.tools:
                    raise invalid(
                        "Cohere does not combine a JSON response format with tools", "response_format"
                    )
                body["response_format"] = response_format
        if chat.HasField("sampling"):
            _sampling(chat.sampling, body)
        if self._safety_mode is not None:
            body["safety_mode"] = self._safety_mode
        body["stream"] = True
        return VendorRequest("POST", CHAT_PATH, self._headers, body)

    def models_request(self) -> VendorRequest:
        """`GET /v1/models`: authenticated, free, and fast."""
        return VendorRequest(
            "GET", MODELS_PATH, {k: v for k, v in self._headers.items() if k != "Content-Type"}
        )

    # -- response -----------------------------------------------------------------
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> CohereStreamDecoder:
        """Decoding state for one chat call."""
        return CohereStreamDecoder(self, request)

    def request_id(self, headers: Mapping[str, str]) -> str:
        """Cohere's `x-debug-trace-id` (it sends no `x-request-id`)."""
        return headers.get(REQUEST_ID_HEADER, "")

    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """The per-minute call limit and what remains of it (`x-trial-endpoint-call-*`),
        and `retry-after`. Cohere sends no token figures and no reset times."""
        now = time.time()
        headroom = common_pb2.RateLimitHeadroom()
        found = put_counts(
            headroom,
            headers,
            (
                ("x-trial-endpoint-call-limit", "limit_requests"),
                ("x-trial-endpoint-call-remaining", "remaining_requests"),
            ),
        )
        return finish_headroom(headroom, headers, now, found=found)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for an HTTP error answer (see `error_for`)."""
        parsed = parse_error_body(body)
        code = ""
        extra: dict[str, str] = {}
        if isinstance(parsed, dict):
            code = message_code(parsed.get("message"))
            error_id = safe_code(parsed.get("id"))
            if error_id:
                extra["vendor_error_id"] = error_id
        extra.update(self.request_id_metadata(headers))
        return self.error_for(
            status, code, headroom=self.headroom(headers), retry_after_s=parse_retry_after(headers), **extra
        )

    def stream_error(self, finish_reason: str) -> SwitchyardError:
        """The unified error for a `message-end` whose finish reason is ERROR or TIMEOUT.

        The accompanying `delta.error` is free text and is not read."""
        metadata = {"provider": self.provider_name, "vendor": self.vendor, "in_stream": "true"}
        metadata["vendor_code"] = safe_code(finish_reason)
        where = f"provider {self.provider_name!r}"
        if finish_reason == "TIMEOUT":
            return SwitchyardError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.TIMEOUT,
                f"{where} timed out during generation (finish reason TIMEOUT)",
                metadata=metadata,
            )
        return SwitchyardError(
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            f"{where} failed during generation (finish reason {safe_code(finish_reason) or 'ERROR'})",
            metadata=metadata,
        )

    def error_for(
        self,
        status: int,
        code: str,
        *,
        headroom: common_pb2.RateLimitHeadroom | None = None,
        retry_after_s: float | None = None,
        **extra: str,
    ) -> SwitchyardError:
        """The error table: HTTP status (plus the code of a known message) to code and reason.

        The same choices as OpenAI's table where the meaning is the same. Cohere-only:
        402 (the account's billing limit is reached) is RESOURCE_EXHAUSTED / RATE_LIMITED
        with `quota=exhausted` and no RetryInfo, like OpenAI's `insufficient_quota`; 498
        (invalid token) is AUTH_FAILED like 401; 499 (Cohere cancelled the request -- we
        had not) is PROVIDER_UNAVAILABLE, worth another attempt; 422 (unknown or invalid
        field) is INVALID_REQUEST; a 400 whose message starts "too many tokens" is
        CONTEXT_TOO_LONG.
        """
        metadata = self.error_metadata(status, code, headroom, **extra)
        label = f"HTTP {status}" + (f" ({code})" if code else "")
        where = f"provider {self.provider_name!r}"
        retry: float | None = None
        if status == 429:
            grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = Reason.RATE_LIMITED
            retry = retry_after_s if retry_after_s is not None else DEFAULT_RATE_LIMIT_RETRY_S
            message = f"{where} rate-limited the request ({label})"
        elif status == 402:
            grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = Reason.RATE_LIMITED
            metadata["quota"] = "exhausted"
            message = f"{where} refused the request: the account's billing limit is reached ({label})"
        elif status in (401, 403, 498):
            grpc_code = grpc.StatusCode.FAILED_PRECONDITION
            reason = Reason.AUTH_FAILED
            message = f"{where} rejected the configured credentials ({label})"
        elif status == 499:
            grpc_code = grpc.StatusCode.UNAVAILABLE
            reason = Reason.PROVIDER_UNAVAILABLE
            retry = retry_after_s
            message = f"{where} cancelled the request ({label})"
        elif (shared := http_status_class(status, where, label, retry_after_s)) is not None:
            grpc_code, reason, message, retry = shared
        elif code in _CONTEXT_TOO_LONG_CODES:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.CONTEXT_TOO_LONG
            message = f"the prompt and output limit exceed the model's context window ({label})"
        else:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.INVALID_REQUEST
            message = f"{where} rejected the request ({label})"
        return SwitchyardError(grpc_code, reason, message, metadata=metadata, retry_after_s=retry)


def message_code(message: object) -> str:
    """A fixed code for a Cohere error message with a known prefix; "" otherwise.

    The message is free text that may quote the prompt: only its beginning is compared,
    and nothing of it is returned."""
    if not isinstance(message, str):
        return ""
    head = message[:64].lstrip().lower()
    for prefix, code in _MESSAGE_CODES:
        if head.startswith(prefix):
            return code
    return ""


_Handler = Callable[["CohereStreamDecoder", dict[str, Any]], list[provider_pb2.GenerateResponse]]


class CohereStreamDecoder(StreamDecoder):
    """Chat v2 stream events (or one chat response) to unified events."""

    def __init__(self, translator: CohereTranslator, request: provider_pb2.GenerateRequest) -> None:
        self._translator = translator
        self._chat = request.request
        # Cohere does not name the answering model; the one asked for is what answered.
        self._model = request.upstream_model
        self.finished = False
        self._usage: common_pb2.Usage | None = None
        self._finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self._response_id = ""
        # Content block index -> "text" / "thinking"; Cohere block index -> our call index.
        self._blocks: dict[int, str] = {}
        self._calls: dict[int, int] = {}
        # Only for the estimate when no usage arrives; counting is cheaper than keeping text.
        self._output_chars = 0

    def on_event(self, event: SseEvent) -> list[provider_pb2.GenerateResponse]:
        """Deltas of one event; `message-end` finishes; a failed generation raises."""
        data = event.data
        if data == _DONE:
            return []
        if self.finished or not data or data.isspace():
            return []
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("an event that is not valid JSON") from None
        if not isinstance(payload, dict):
            raise self._translator.protocol_error("an event that is not a JSON object")
        kind = payload.get("type", event.event)
        if not isinstance(kind, str):
            raise self._translator.protocol_error("an event whose type is not a string")
        handler = self._HANDLERS.get(kind)
        if handler is None:  # citations, debug and types added later carry no answer
            return []
        return handler(self, payload)

    def on_body(self, body: bytes) -> list[provider_pb2.GenerateResponse]:
        """Deltas of a whole chat response (a server that ignored `stream`)."""
        try:
            response = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("a body that is not valid JSON") from None
        if not isinstance(response, dict):
            raise self._translator.protocol_error("a body that is not a JSON object")
        self._set_id(response.get("id"))
        message = _object(response.get("message"), self._translator, "a message that is not a JSON object")
        out = common_pb2.Delta()
        content = message.get("content") or []
        if not isinstance(content, list):
            raise self._translator.protocol_error("message content that is not a list")
        for item in content:
            item = _object(item, self._translator, "a content item that is not a JSON object")
            if item.get("type") == "thinking":
                out.reasoning_text += self._text(item.get("thinking"))
            else:
                out.text += self._text(item.get("text"))
        tool_plan = self._text(message.get("tool_plan"))
        if tool_plan:
            out.reasoning_text += tool_plan
        calls = message.get("tool_calls") or []
        if not isinstance(calls, list):
            raise self._translator.protocol_error("tool calls that are not a list")
        for position, call in enumerate(calls):
            call = _object(call, self._translator, "a tool call that is not a JSON object")
            function = _object(
                call.get("function") or {}, self._translator, "a function that is not an object"
            )
            out.tool_calls.add(
                index=position,
                id=self._text(call.get("id")),
                name=self._text(function.get("name")),
                arguments_fragment=self._text(function.get("arguments")),
            )
        self._output_chars += len(out.text) + len(out.reasoning_text)
        self._output_chars += sum(len(call.arguments_fragment) for call in out.tool_calls)
        self._end(response.get("finish_reason"), response.get("usage"), response.get("error"))
        if not (out.text or out.reasoning_text or out.tool_calls):
            return []
        return [provider_pb2.GenerateResponse(delta=out)]

    def outcome(self) -> StreamOutcome:
        """Usage (estimated at ~4 characters per token when Cohere sent none), finish
        reason, message id and model."""
        usage = self._usage if self._usage is not None else estimated_usage(self._chat, self._output_chars)
        return StreamOutcome(usage, self._finish, self._response_id, self._model)

    # -- one handler per event type ------------------------------------------------
    def _message_start(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        self._set_id(payload.get("id"))
        return []

    def _content_start(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        content = self._content(payload)
        kind = content.get("type")
        self._blocks[self._index(payload)] = "thinking" if kind == "thinking" else "text"
        return self._content_delta(payload)

    def _content_delta(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        content = self._content(payload)
        thinking = self._text(content.get("thinking"))
        text = self._text(content.get("text"))
        if self._blocks.get(self._index(payload)) == "thinking" and not thinking:
            thinking, text = text, ""
        if not (text or thinking):
            return []
        self._output_chars += len(text) + len(thinking)
        return [provider_pb2.GenerateResponse(delta=common_pb2.Delta(text=text, reasoning_text=thinking))]

    def _tool_plan_delta(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        # The model's plan before it calls tools: reasoning, not the answer.
        plan = self._text(self._message(payload).get("tool_plan"))
        if not plan:
            return []
        self._output_chars += len(plan)
        return [provider_pb2.GenerateResponse(delta=common_pb2.Delta(reasoning_text=plan))]

    def _tool_call_start(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        call = self._call(payload)
        function = _object(call.get("function") or {}, self._translator, "a function that is not an object")
        index = len(self._calls)
        self._calls[self._index(payload)] = index
        arguments = self._text(function.get("arguments"))
        name = self._text(function.get("name"))
        self._output_chars += len(arguments) + len(name)
        delta = common_pb2.Delta()
        delta.tool_calls.add(
            index=index, id=self._text(call.get("id")), name=name, arguments_fragment=arguments
        )
        return [provider_pb2.GenerateResponse(delta=delta)]

    def _tool_call_delta(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        call = self._call(payload)
        function = _object(call.get("function") or {}, self._translator, "a function that is not an object")
        arguments = self._text(function.get("arguments"))
        if not arguments:
            return []
        index = self._calls.get(self._index(payload))
        if index is None:
            if not self._calls:
                raise self._translator.protocol_error("tool-call arguments for a call that never started")
            index = len(self._calls) - 1  # an unmatched block index: the call being written
        self._output_chars += len(arguments)
        delta = common_pb2.Delta()
        delta.tool_calls.add(index=index, arguments_fragment=arguments)
        return [provider_pb2.GenerateResponse(delta=delta)]

    def _message_end(self, payload: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        self._set_id(payload.get("id"))
        delta = _object(payload.get("delta") or {}, self._translator, "a delta that is not a JSON object")
        self._end(delta.get("finish_reason"), delta.get("usage"), delta.get("error"))
        return []

    _HANDLERS: ClassVar[dict[str, _Handler]] = {
        "message-start": _message_start,
        "content-start": _content_start,
        "content-delta": _content_delta,
        "tool-plan-delta": _tool_plan_delta,
        "tool-call-start": _tool_call_start,
        "tool-call-delta": _tool_call_delta,
        "message-end": _message_end,
    }

    # -- pieces ----------------------------------------------------------------------
    def _end(self, finish: object, usage: object, error: object = None) -> None:
        if finish is not None and not isinstance(finish, str):
            raise self._translator.protocol_error("a finish reason that is not a string")
        if finish in _FAILED_FINISH:
            raise self._translator.stream_error(str(finish))
        if error:  # an error reported with any other finish reason is still a failure
            raise self._translator.stream_error("ERROR")
        self._finish = _FINISH_REASONS.get(finish or "", common_pb2.FINISH_REASON_UNSPECIFIED)
        if usage is not None:
            self._usage = self._read_usage(usage)
        self.finished = True

    def _set_id(self, value: object) -> None:
        if not self._response_id and isinstance(value, str):
            self._response_id = value

    def _message(self, payload: dict[str, Any]) -> dict[str, Any]:
        delta = _object(payload.get("delta") or {}, self._translator, "a delta that is not a JSON object")
        return _object(delta.get("message") or {}, self._translator, "a message that is not a JSON object")

    def _content(self, payload: dict[str, Any]) -> dict[str, Any]:
        return _object(
            self._message(payload).get("content") or {}, self._translator, "content that is not a JSON object"
        )

    def _call(self, payload: dict[str, Any]) -> dict[str, Any]:
        return _object(
            self._message(payload).get("tool_calls") or {},
            self._translator,
            "a tool call that is not an object",
        )

    def _index(self, payload: dict[str, Any]) -> int:
        index = payload.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise self._translator.protocol_error("an event with an invalid index")
        return index

    def _text(self, value: object) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise self._translator.protocol_error("a text field that is not a string")

    def _read_usage(self, usage: object) -> common_pb2.Usage | None:
        usage = _object(usage, self._translator, "usage that is not a JSON object")
        # `tokens` is what the model consumed; `billed_units` only when it is missing.
        counts = usage.get("tokens") or usage.get("billed_units")
        if counts is None:
            return None
        counts = _object(counts, self._translator, "token counts that are not a JSON object")
        return common_pb2.Usage(
            input_tokens=self._count(counts.get("input_tokens")),
            output_tokens=self._count(counts.get("output_tokens")),
            cached_input_tokens=self._count(usage.get("cached_tokens")),
        )

    def _count(self, value: object) -> int:
        if value is None:
            return 0
        # The SDK types counts as numbers; JSON integers may arrive as 12.0.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return clamp_uint32(value)
        raise self._translator.protocol_error("a token count that is not an integer")


def _object(value: object, translator: CohereTranslator, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise translator.protocol_error(what)
    return value


# --------------------------------------------------------------------------- #
# request pieces
# --------------------------------------------------------------------------- #


def _message(message: common_pb2.Message, index: int) -> dict[str, Any]:
    where = f"messages[{index}]"
    role = message.role
    if role == common_pb2.ROLE_UNSPECIFIED:
        raise invalid("the message role is required", f"{where}.role")
    if message.name:
        raise invalid("Cohere messages take no participant name", f"{where}.name")
    if message.tool_calls and role != common_pb2.ROLE_ASSISTANT:
        raise invalid("only assistant messages carry tool calls", f"{where}.tool_calls")
    if message.tool_call_id and role != common_pb2.ROLE_TOOL:
        raise invalid("only tool messages answer a tool call", f"{where}.tool_call_id")
    if role == common_pb2.ROLE_USER:
        return {"role": "user", "content": user_content(message, where)}
    if role == common_pb2.ROLE_SYSTEM:
        return {"role": "system", "content": _text_content(message, where, "system")}
    if role == common_pb2.ROLE_ASSISTANT:
        return _assistant(message, where)
    if role == common_pb2.ROLE_TOOL:
        if not message.tool_call_id:
            raise invalid("a tool message must name the call it answers", f"{where}.tool_call_id")
        return {
            "role": "tool",
            "tool_call_id": message.tool_call_id,
            "content": _text_content(message, where, "tool"),
        }
    raise invalid("unknown message role", f"{where}.role")


def _assistant(message: common_pb2.Message, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"role": "assistant"}
    if message.tool_calls:
        if message.parts:
            # Text an assistant wrote before calling tools is what Cohere calls its tool plan.
            out["tool_plan"] = "".join(_texts(message, where, "assistant"))
        out["tool_calls"] = [
            function_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(message.tool_calls)
        ]
        return out
    if not message.parts:
        raise invalid("an assistant message needs text or tool calls", f"{where}.parts")
    out["content"] = _text_content(message, where, "assistant")
    return out


def _texts(message: common_pb2.Message, where: str, role: str) -> list[str]:
    return text_parts(message, where, role, "Cohere")


def _text_content(message: common_pb2.Message, where: str, role: str) -> str | list[dict[str, str]]:
    """Content of a text-only message: a string, or text parts when there are several."""
    return text_content(message, where, role, "Cohere")


def _tool(tool: common_pb2.Tool, index: int) -> dict[str, Any]:
    # Cohere requires `parameters` and has no per-tool `strict` (see `strict_tools`).
    return function_tool(tool, index, default_parameters=_NO_PARAMETERS, send_strict=False)


def _tool_choice(chat: common_pb2.ChatRequest) -> tuple[str | None, list[int]]:
    """Cohere's `tool_choice` and the positions of the tools to send.

    Cohere has REQUIRED and NONE, and no way to name one tool: "call this tool" is sent as
    REQUIRED with that tool alone, which leaves the model exactly that choice.
    """
    mode = tool_choice_mode(chat)
    tools = list(range(len(chat.tools)))
    if mode is None or mode == common_pb2.TOOL_CHOICE_MODE_AUTO:
        return None, tools  # AUTO is Cohere's default when tools are given
    if mode == common_pb2.TOOL_CHOICE_MODE_NONE:
        return "NONE", tools
    if mode == common_pb2.TOOL_CHOICE_MODE_REQUIRED:
        return "REQUIRED", tools
    if mode == common_pb2.TOOL_CHOICE_MODE_TOOL:
        return "REQUIRED", [i for i in tools if chat.tools[i].name == chat.tool_choice.tool_name][:1]
    raise invalid("unknown tool choice mode", "tool_choice.mode")


def _response_format(response_format: common_pb2.ResponseFormat) -> dict[str, Any] | None:
    kind = response_format.type
    if kind in (common_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED, common_pb2.RESPONSE_FORMAT_TYPE_TEXT):
        return None  # plain text is Cohere's default
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return {"type": "json_object"}
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        # Cohere's schema has no name and is always enforced (constrained decoding), so
        # `schema_name` has nothing to travel in and `strict` is always honoured.
        return {"type": "json_object", "json_schema": json_schema_of(response_format)}
    raise invalid("unknown response format type", "response_format.type")


_SAMPLING_FIELDS: Final = SamplingFields(top_p="p", stop_sequences="stop_sequences")


def _sampling(sampling: common_pb2.SamplingParams, body: dict[str, Any]) -> None:
    put_sampling(sampling, body, _SAMPLING_FIELDS, vendor="Cohere", max_stop_sequences=MAX_STOP_SEQUENCES)
