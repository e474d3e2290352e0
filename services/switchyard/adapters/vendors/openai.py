"""OpenAI Chat Completions: the unified request to `POST /chat/completions`, its SSE
stream (or JSON answer) back to unified events, and its errors and rate-limit headers.

Wire format as documented in OpenAI's API reference (Create chat completion, the chat
completion chunk object, Error codes, Rate limits):

* Request: `model`, `messages` (system -- or developer --, user with text and
  `image_url {url, detail}` parts, assistant with `tool_calls`, tool with
  `tool_call_id`), `tools [{type: function, function: {name, description, parameters,
  strict}}]`, `tool_choice`, `response_format` (`json_object` or `json_schema {name,
  schema, strict}`), `stop`, `max_completion_tokens` (`max_tokens` is deprecated and
  refused by o-series reasoning models), `temperature`, `top_p`, `seed`,
  `presence_penalty`, `frequency_penalty`, `user`, `stream: true` and
  `stream_options: {include_usage: true}`.
* Stream: `data: <chunk>` events; `choices[0].delta` carries `content`, `refusal`,
  `reasoning_content` (OpenAI-compatible reasoning servers) and `tool_calls` fragments
  (`index`, then `id` and `function.name` on a call's first fragment, `function.arguments`
  pieces after); `finish_reason` arrives on the last choice chunk; with `include_usage` a
  final chunk with `choices: []` carries `usage`; `data: [DONE]` ends the stream. An error
  after the stream started arrives as `data: {"error": {...}}`.
* Errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status. The
  message may quote the prompt, so only `code` and `type` are kept.
* Headers: `x-request-id`; `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` with
  resets as Go durations ("1s", "6m0s", "120ms"); `retry-after` / `retry-after-ms`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
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
    parse_duration,
    parse_error_body,
    parse_retry_after,
    put_counts,
    require_model_and_messages,
    safe_code,
    timestamp_at,
)
from switchyard.adapters.vendors.common import (
    SamplingFields,
    chat_response_format,
    function_tool,
    function_tool_call,
    function_tool_choice,
    put_sampling,
    text_content,
    user_content,
)
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.v1 import common_pb2, provider_pb2

CHAT_PATH: Final = "/chat/completions"
MODELS_PATH: Final = "/models"
EMBEDDINGS_PATH: Final = "/embeddings"
# OpenAI accepts at most four stop sequences; refusing more here names the field.
MAX_STOP_SEQUENCES: Final = 4
_DONE: Final = b"[DONE]"

_FINISH_REASONS: Final[dict[str, common_pb2.FinishReason.ValueType]] = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    # The legacy single-function form of a tool call.
    "function_call": common_pb2.FINISH_REASON_TOOL_CALLS,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
}

_TOOL_CHOICE: Final[dict[common_pb2.ToolChoiceMode.ValueType, str]] = {
    common_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    common_pb2.TOOL_CHOICE_MODE_NONE: "none",
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}

# 400 codes that mean "the content was refused" rather than "the request is malformed":
# `invalid_prompt` is what reasoning models answer for a prompt flagged by moderation,
# `content_policy_violation` OpenAI's general code, `content_filter` Azure OpenAI's.
_CONTENT_POLICY_CODES: Final = frozenset({"content_policy_violation", "content_filter", "invalid_prompt"})

# An in-stream error has no HTTP status; infer the one the same failure gets as an HTTP
# error, from its code first, then its type.
_STATUS_BY_CODE: Final = {
    "context_length_exceeded": 400,
    "invalid_prompt": 400,
    "content_policy_violation": 400,
    "content_filter": 400,
    "invalid_api_key": 401,
    "unsupported_country_region_territory": 403,
    "model_not_found": 404,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "server_is_overloaded": 503,
    "slow_down": 503,
}
_STATUS_BY_TYPE: Final = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "request_forbidden": 403,
    "not_found_error": 404,
    "requests": 429,
    "tokens": 429,
    "rate_limit_error": 429,
    "insufficient_quota": 429,
    "server_error": 500,
    "api_error": 500,
    "service_unavailable_error": 503,
    "overloaded_error": 503,
}


class OpenAITranslator(Translator):
    """OpenAI Chat Completions for one configured provider.

    Provider options: `system_role` -- "system" (default) or "developer" -- names the role
    system messages are sent with (OpenAI treats both alike for o-series models; some
    deployments want the newer name).
    """

    vendor: ClassVar[str] = "openai"
    # OpenAI's current name for the output cap; `max_tokens` is refused by o-series models.
    max_tokens_field: ClassVar[str] = "max_completion_tokens"
    # `user` is documented (OpenAI now suggests `safety_identifier` for the same purpose).
    end_user_field: ClassVar[str] = "user"

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        super().__init__(provider_name, provider, api_key)
        system_role = str(provider.options.get("system_role", "system"))
        if system_role not in ("system", "developer"):
            raise ValueError(
                f"provider {provider_name!r}: options.system_role must be 'system' or 'developer'"
            )
        self._system_role = system_role
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._headers: Mapping[str, str] = headers

    # -- request ----------------------------------------------------------------
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The `POST /chat/completions` streaming request for `request`."""
        chat = require_model_and_messages(request)
        body: dict[str, Any] = {
            "model": request.upstream_model,
            "messages": [self._message(message, i) for i, message in enumerate(chat.messages)],
        }
        if chat.tools:
            body["tools"] = [function_tool(tool, i) for i, tool in enumerate(chat.tools)]
        if chat.HasField("tool_choice"):
            choice = _tool_choice(chat)
            if choice is not None:
                body["tool_choice"] = choice
        if chat.HasField("response_format"):
            response_format = chat_response_format(chat.response_format)
            if response_format is not None:
                body["response_format"] = response_format
        if chat.HasField("sampling"):
            self._sampling(chat.sampling, body)
        if chat.metadata.end_user:
            body[self.end_user_field] = chat.metadata.end_user
        body["stream"] = True
        stream_options = self.stream_options()
        if stream_options is not None:
            body["stream_options"] = stream_options
        return VendorRequest("POST", CHAT_PATH, self._headers, body)

    # -- hooks for OpenAI-compatible vendors (OpenAI's own answers below) -------------
    def stream_options(self) -> dict[str, Any] | None:
        """`stream_options` of a streamed request; None sends none. OpenAI reports usage
        in a last chunk only when asked with `include_usage`."""
        return {"include_usage": True}

    def output_limit_field(self) -> str:
        """The body field that caps generated tokens (`max_tokens_field` by default)."""
        return self.max_tokens_field

    def stop_sequence_limit(self) -> int | None:
        """At most this many stop sequences are sent; None checks no limit here."""
        return MAX_STOP_SEQUENCES

    def embeddings_request(self, request: provider_pb2.EmbedRequest) -> VendorRequest:
        """`POST /embeddings` with float vectors (`dimensions` only when asked for)."""
        body: dict[str, Any] = {
            "model": request.upstream_model,
            "input": list(request.inputs),
            "encoding_format": "float",
        }
        if request.dimensions:
            body["dimensions"] = request.dimensions
        headers = {k: v for k, v in self._headers.items() if k != "Accept"}
        return VendorRequest("POST", EMBEDDINGS_PATH, {**headers, "Accept": "application/json"}, body)

    def parse_embeddings(self, body: bytes, count: int) -> provider_pb2.EmbedResponse:
        """`{"data": [{"index", "embedding"}], "usage": {"prompt_tokens"}}`, put in input order;
        anything else (a missing or extra index, a vector that is not numbers) is a protocol error."""
        try:
            parsed = orjson.loads(body)
            data = parsed["data"]
            vectors: dict[int, list[float]] = {}
            for item in data:
                index = int(item["index"])
                values = item["embedding"]
                if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
                    raise ValueError("embedding is not a list of numbers")
                vectors[index] = values
            if sorted(vectors) != list(range(count)):
                raise ValueError("embeddings do not match the inputs")
            prompt_tokens = int((parsed.get("usage") or {}).get("prompt_tokens", 0))
        except (ValueError, KeyError, TypeError) as exc:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.UPSTREAM_PROTOCOL_ERROR,
                f"{self.provider_name} sent embeddings this adapter cannot read",
                metadata={"provider": self.provider_name, "detail": type(exc).__name__},
            ) from None
        return provider_pb2.EmbedResponse(
            embeddings=[provider_pb2.Embedding(values=vectors[i]) for i in range(count)],
            usage=common_pb2.Usage(input_tokens=max(0, prompt_tokens)),
        )

    def models_request(self) -> VendorRequest:
        """`GET /models`: authenticated, free, and fast."""
        return VendorRequest(
            "GET", MODELS_PATH, {k: v for k, v in self._headers.items() if k != "Content-Type"}
        )

    def _message(self, message: common_pb2.Message, index: int) -> dict[str, Any]:
        where = f"messages[{index}]"
        role = message.role
        if role == common_pb2.ROLE_UNSPECIFIED:
            raise invalid("the message role is required", f"{where}.role")
        if message.tool_calls and role != common_pb2.ROLE_ASSISTANT:
            raise invalid("only assistant messages carry tool calls", f"{where}.tool_calls")
        if message.tool_call_id and role != common_pb2.ROLE_TOOL:
            raise invalid("only tool messages answer a tool call", f"{where}.tool_call_id")
        out: dict[str, Any]
        if role == common_pb2.ROLE_USER:
            out = {"role": "user", "content": user_content(message, where)}
        elif role == common_pb2.ROLE_SYSTEM:
            out = {"role": self._system_role, "content": _text_content(message, where, "system")}
        elif role == common_pb2.ROLE_ASSISTANT:
            out = {"role": "assistant"}
            content = _text_content(message, where, "assistant") if message.parts else None
            if message.tool_calls:
                out["content"] = content
                out["tool_calls"] = [
                    function_tool_call(call, f"{where}.tool_calls[{i}]")
                    for i, call in enumerate(message.tool_calls)
                ]
            else:
                out["content"] = content if content is not None else ""
        elif role == common_pb2.ROLE_TOOL:
            if not message.tool_call_id:
                raise invalid("a tool message must name the call it answers", f"{where}.tool_call_id")
            if message.name:
                raise invalid("OpenAI tool messages take no name", f"{where}.name")
            out = {
                "role": "tool",
                "tool_call_id": message.tool_call_id,
                "content": _text_content(message, where, "tool"),
            }
        else:
            raise invalid("unknown message role", f"{where}.role")
        if message.name:
            out["name"] = message.name
        return out

    def _sampling(self, sampling: common_pb2.SamplingParams, body: dict[str, Any]) -> None:
        put_sampling(
            sampling,
            body,
            SamplingFields(max_output_tokens=self.output_limit_field()),
            vendor="OpenAI",
            max_stop_sequences=self.stop_sequence_limit(),
        )

    # -- response -----------------------------------------------------------------
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> OpenAIStreamDecoder:
        """Decoding state for one chat completion."""
        return OpenAIStreamDecoder(self, request.request)

    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """`x-ratelimit-*` and `retry-after` headers as headroom; resets become timestamps."""
        now = time.time()
        headroom = common_pb2.RateLimitHeadroom()
        found = put_counts(
            headroom,
            headers,
            (
                ("x-ratelimit-limit-requests", "limit_requests"),
                ("x-ratelimit-remaining-requests", "remaining_requests"),
                ("x-ratelimit-limit-tokens", "limit_tokens"),
                ("x-ratelimit-remaining-tokens", "remaining_tokens"),
            ),
        )
        for name, attribute in (
            ("x-ratelimit-reset-requests", "requests_reset_at"),
            ("x-ratelimit-reset-tokens", "tokens_reset_at"),
        ):
            raw = headers.get(name)
            seconds = parse_duration(raw) if raw else None
            if seconds is not None:
                getattr(headroom, attribute).CopyFrom(timestamp_at(now + seconds))
                found = True
        return finish_headroom(headroom, headers, now, found=found)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for an HTTP error answer (see `error_for`)."""
        error: object = None
        parsed = parse_error_body(body)
        if isinstance(parsed, dict):
            error = parsed.get("error")
        code, kind = _code_and_type(error)
        headroom = self.headroom(headers)
        retry_after = parse_retry_after(headers)
        if retry_after is None and status == 429:
            retry_after = reset_of_exhausted_limit(headers)
        extra = self.request_id_metadata(headers)
        return self.error_for(status, code, kind, headroom=headroom, retry_after_s=retry_after, **extra)

    def stream_error(self, error: object) -> SwitchyardError:
        """The unified error for a `{"error": {...}}` event inside a 200 stream."""
        code, kind = _code_and_type(error)
        return self.error_for(self.stream_error_status(error), code, kind, in_stream="true")

    def stream_error_status(self, error: object) -> int:
        """The HTTP status the failure of an in-stream error would have had: a declared
        `status` / `status_code`, else inferred from its code, then its type, else 500."""
        code, kind = _code_and_type(error)
        status = _STATUS_BY_CODE.get(code) or _STATUS_BY_TYPE.get(kind) or 500
        if isinstance(error, dict):
            declared = error.get("status") or error.get("status_code")
            if isinstance(declared, int) and 400 <= declared <= 599:
                status = declared
        return status

    def error_for(
        self,
        status: int,
        code: str,
        kind: str,
        *,
        headroom: common_pb2.RateLimitHeadroom | None = None,
        retry_after_s: float | None = None,
        **extra: str,
    ) -> SwitchyardError:
        """The error table: vendor HTTP status plus error code/type to code and reason.

        401/403 map to FAILED_PRECONDITION / AUTH_FAILED: the caller's credentials are
        fine (UNAUTHENTICATED or PERMISSION_DENIED would blame them), the provider's key
        is wrong, and retrying the same provider cannot help until an operator fixes it.
        A 429 `insufficient_quota` is RESOURCE_EXHAUSTED / RATE_LIMITED with metadata
        `quota=exhausted` and no RetryInfo: waiting does not refill a billing quota, but
        another provider may still serve the request.
        """
        metadata = self.error_metadata(status, code or kind, headroom, **extra)
        if kind and kind != code:
            metadata["vendor_type"] = kind
        label = f"HTTP {status}" + (f" ({code or kind})" if code or kind else "")
        where = f"provider {self.provider_name!r}"
        retry: float | None = None
        if status == 429:
            grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = Reason.RATE_LIMITED
            if code == "insufficient_quota" or kind == "insufficient_quota":
                metadata["quota"] = "exhausted"
                message = f"{where} refused the request: the account's quota is exhausted ({label})"
            else:
                retry = retry_after_s if retry_after_s is not None else DEFAULT_RATE_LIMIT_RETRY_S
                message = f"{where} rate-limited the request ({label})"
        elif status in (401, 403):
            grpc_code = grpc.StatusCode.FAILED_PRECONDITION
            reason = Reason.AUTH_FAILED
            message = f"{where} rejected the configured credentials ({label})"
        elif (shared := http_status_class(status, where, label, retry_after_s)) is not None:
            grpc_code, reason, message, retry = shared
        elif code == "context_length_exceeded":
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.CONTEXT_TOO_LONG
            message = f"the prompt and output limit exceed the model's context window ({label})"
        elif code in _CONTENT_POLICY_CODES:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.CONTENT_FILTERED
            message = f"{where} refused the content ({label})"
        else:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.INVALID_REQUEST
            message = f"{where} rejected the request ({label})"
        return SwitchyardError(grpc_code, reason, message, metadata=metadata, retry_after_s=retry)


class OpenAIStreamDecoder(StreamDecoder):
    """Chat completion chunks (or one chat completion) to unified events."""

    def __init__(self, translator: OpenAITranslator, chat: common_pb2.ChatRequest) -> None:
        self._translator = translator
        self._chat = chat
        self.finished = False
        self._usage: common_pb2.Usage | None = None
        self._finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self._response_id = ""
        self._model = ""
        # Only for the estimate when no usage arrives; counting is cheaper than keeping text.
        self._output_chars = 0

    def on_event(self, event: SseEvent) -> list[provider_pb2.GenerateResponse]:
        """Deltas of one `data:` event; `[DONE]` finishes; an error event raises."""
        data = event.data
        if data == _DONE:
            self.finished = True
            return []
        if self.finished or not data or data.isspace():
            return []
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("an event that is not valid JSON") from None
        if not isinstance(chunk, dict):
            raise self._translator.protocol_error("an event that is not a JSON object")
        error = self.error_of(chunk)
        if error is not None:
            raise self._translator.stream_error(error)
        return self._chunk(chunk, "delta")

    def on_body(self, body: bytes) -> list[provider_pb2.GenerateResponse]:
        """Deltas of a whole `chat.completion` object (a server that ignored `stream`)."""
        try:
            completion = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("a body that is not valid JSON") from None
        if not isinstance(completion, dict):
            raise self._translator.protocol_error("a body that is not a JSON object")
        error = self.error_of(completion)
        if error is not None:
            raise self._translator.stream_error(error)
        events = self._chunk(completion, "message")
        self.finished = True
        return events

    def on_eof(self) -> None:
        """A clean end without `[DONE]` is complete only if a finish reason arrived
        (some OpenAI-compatible servers omit the marker)."""
        if self._finish == common_pb2.FINISH_REASON_UNSPECIFIED:
            super().on_eof()
        self.finished = True

    def outcome(self) -> StreamOutcome:
        """Usage (estimated at ~4 characters per token when OpenAI sent none), finish
        reason, completion id and model."""
        usage = self._usage if self._usage is not None else estimated_usage(self._chat, self._output_chars)
        return StreamOutcome(usage, self._finish, self._response_id, self._model)

    # -- hooks for OpenAI-compatible vendors (OpenAI's own places below) --------------
    def error_of(self, chunk: dict[str, Any]) -> object:
        """The in-stream error a chunk (or a whole answer) carries; None when it has none."""
        return chunk.get("error")

    def usage_of(self, chunk: dict[str, Any]) -> object:
        """The usage object a chunk (or a whole answer) carries; None or {} when it has none."""
        return chunk.get("usage")

    def reasoning_of(self, delta: dict[str, Any]) -> object:
        """Reasoning text of a delta (not answer text): `reasoning_content` or `reasoning`."""
        return delta.get("reasoning_content") or delta.get("reasoning")

    def cached_tokens_of(self, usage: dict[str, Any], prompt_details: dict[str, Any]) -> object:
        """Cached prompt tokens of a usage object: `prompt_tokens_details.cached_tokens`."""
        return prompt_details.get("cached_tokens")

    def _chunk(self, chunk: dict[str, Any], key: str) -> list[provider_pb2.GenerateResponse]:
        if not self._response_id:
            response_id = chunk.get("id")
            if isinstance(response_id, str):
                self._response_id = response_id
        if not self._model:
            model = chunk.get("model")
            if isinstance(model, str):
                self._model = model
        usage = self.usage_of(chunk)
        if usage:
            self._usage = self._read_usage(usage)
        choices = chunk.get("choices")
        if not choices:
            return []
        if not isinstance(choices, list):
            raise self._translator.protocol_error("a chunk whose choices are not a list")
        events: list[provider_pb2.GenerateResponse] = []
        for choice in choices:
            if not isinstance(choice, dict):
                raise self._translator.protocol_error("a choice that is not a JSON object")
            # We never ask for n > 1; a stray other choice is not part of this answer.
            if choice.get("index", 0) != 0:
                continue
            finish = choice.get("finish_reason")
            if finish is not None:
                if not isinstance(finish, str):
                    raise self._translator.protocol_error("a finish reason that is not a string")
                self._finish = _FINISH_REASONS.get(finish, common_pb2.FINISH_REASON_UNSPECIFIED)
            delta = choice.get(key)
            if delta:
                event = self._delta(delta)
                if event is not None:
                    events.append(event)
        return events

    def _delta(self, delta: object) -> provider_pb2.GenerateResponse | None:
        if not isinstance(delta, dict):
            raise self._translator.protocol_error("a delta that is not a JSON object")
        content = delta.get("content")
        refusal = delta.get("refusal")
        reasoning = self.reasoning_of(delta)
        tool_calls = delta.get("tool_calls")
        if not (content or refusal or reasoning or tool_calls):
            return None
        out = common_pb2.Delta()
        text = self._text(content)
        if refusal:
            # The unified Delta has no refusal channel; the refusal is the model's answer.
            text += self._text(refusal)
        if text:
            out.text = text
            self._output_chars += len(text)
        if reasoning:
            reasoning_text = self._text(reasoning)
            out.reasoning_text = reasoning_text
            self._output_chars += len(reasoning_text)
        if tool_calls:
            if not isinstance(tool_calls, list):
                raise self._translator.protocol_error("tool calls that are not a list")
            for position, call in enumerate(tool_calls):
                self._tool_call(call, position, out)
        return provider_pb2.GenerateResponse(delta=out)

    def _tool_call(self, call: object, position: int, out: common_pb2.Delta) -> None:
        if not isinstance(call, dict):
            raise self._translator.protocol_error("a tool call that is not a JSON object")
        function = call.get("function") or {}
        if not isinstance(function, dict):
            raise self._translator.protocol_error("a tool call whose function is not a JSON object")
        index = call.get("index", position)
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise self._translator.protocol_error("a tool call with an invalid index")
        arguments = self._text(function.get("arguments"))
        self._output_chars += len(arguments)
        out.tool_calls.add(
            index=clamp_uint32(index),
            id=self._text(call.get("id")),
            name=self._text(function.get("name")),
            arguments_fragment=arguments,
        )

    def _text(self, value: object) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise self._translator.protocol_error("a text field that is not a string")

    def _read_usage(self, usage: object) -> common_pb2.Usage:
        if not isinstance(usage, dict):
            raise self._translator.protocol_error("usage that is not a JSON object")
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        if not isinstance(prompt_details, dict) or not isinstance(completion_details, dict):
            raise self._translator.protocol_error("usage details that are not JSON objects")
        return common_pb2.Usage(
            input_tokens=self._count(usage.get("prompt_tokens")),
            output_tokens=self._count(usage.get("completion_tokens")),
            cached_input_tokens=self._count(self.cached_tokens_of(usage, prompt_details)),
            reasoning_tokens=self._count(completion_details.get("reasoning_tokens")),
        )

    def _count(self, value: object) -> int:
        if value is None:
            return 0
        if isinstance(value, int) and not isinstance(value, bool):
            return clamp_uint32(value)
        raise self._translator.protocol_error("a token count that is not an integer")


# --------------------------------------------------------------------------- #
# request pieces
# --------------------------------------------------------------------------- #


def _text_content(message: common_pb2.Message, where: str, role: str) -> str | list[dict[str, str]]:
    """Content of a text-only message: a string, or text parts when there are several."""
    return text_content(message, where, role, "OpenAI")


def _tool_choice(chat: common_pb2.ChatRequest) -> str | dict[str, Any] | None:
    return function_tool_choice(chat, _TOOL_CHOICE)


# --------------------------------------------------------------------------- #
# error pieces
# --------------------------------------------------------------------------- #


def _code_and_type(error: object) -> tuple[str, str]:
    """The vendor's error `code` and `type`, sanitised; the message is never read."""
    if not isinstance(error, dict):
        return "", ""
    return safe_code(error.get("code")), safe_code(error.get("type"))


def reset_of_exhausted_limit(headers: Mapping[str, str]) -> float | None:
    """For a 429 without `retry-after`: when the exhausted limit resets."""
    waits: list[float] = []
    for kind in ("requests", "tokens"):
        if parse_count(headers, f"x-ratelimit-remaining-{kind}") == 0:
            raw = headers.get(f"x-ratelimit-reset-{kind}")
            seconds = parse_duration(raw) if raw else None
            if seconds is not None:
                waits.append(seconds)
    return max(waits) if waits else None


# The former private name, kept for callers that used it.
_reset_of_exhausted_limit = reset_of_exhausted_limit
