"""Google Gemini API (Generative Language API, API-key auth): the unified request to
`POST /models/{model}:streamGenerateContent?alt=sse`, its SSE stream (or JSON answer)
back to unified events, and its errors.

The provider's `base_url` is the versioned API root,
`https://generativelanguage.googleapis.com/v1beta`; every path here is relative to it.
Wire format as documented in the Gemini API reference (models.generateContent /
models.streamGenerateContent, Content, Part, Tool, ToolConfig, GenerationConfig,
GenerateContentResponse, UsageMetadata; "Troubleshooting" for the error table; "Thought
signatures"; "Media resolution") and as the official `google-genai` SDK writes and reads it:

* Auth: the key in the `x-goog-api-key` header.
* Request: `contents [{role: "user" | "model", parts}]` where a part is `text`,
  `inlineData {mimeType, data (base64)}`, `fileData {mimeType, fileUri}` (URLs),
  `functionCall {id, name, args (an object)}` or `functionResponse {id, name, response
  (an object)}`; a part may carry `thoughtSignature` and, on Gemini 3, `mediaResolution
  {level}`. `systemInstruction {parts}`; `tools [{functionDeclarations [{name,
  description, parametersJsonSchema}]}]` (`parametersJsonSchema` takes any JSON Schema,
  `parameters` only Google's OpenAPI subset); `toolConfig.functionCallingConfig {mode:
  AUTO | ANY | NONE | VALIDATED, allowedFunctionNames}`; `generationConfig
  {maxOutputTokens, temperature, topP, stopSequences (at most 5), seed (int32),
  presencePenalty, frequencyPenalty, responseMimeType, responseJsonSchema}`. The model is
  in the URL, not the body.
* Stream: `data: <GenerateContentResponse>` events (CRLF-separated), no end marker: the
  body just ends. Each event has `candidates[0].content.parts` (text, `thought: true`
  thought-summary text, or a whole `functionCall` -- calls are never split across
  events), the last one `candidates[0].finishReason`; `usageMetadata` (cumulative, so the
  last one counts) with `promptTokenCount` (cached tokens included),
  `cachedContentTokenCount`, `candidatesTokenCount`, `thoughtsTokenCount`,
  `toolUsePromptTokenCount`; `modelVersion`; `responseId`. A blocked prompt answers
  `promptFeedback.blockReason` and no candidates. An error after the stream started
  arrives as `data: {"error": {...}}`. With `alt=sse` missing, or from a server that
  ignored it, the answer is JSON: one response object or an array of them.
* Errors: `{"error": {"code": <HTTP status>, "message", "status": "INVALID_ARGUMENT" |
  "FAILED_PRECONDITION" | "PERMISSION_DENIED" | "NOT_FOUND" | "RESOURCE_EXHAUSTED" |
  "INTERNAL" | "UNAVAILABLE" | "DEADLINE_EXCEEDED" ..., "details": [{"@type":
  "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", ...},
  {"@type": ".../google.rpc.RetryInfo", "retryDelay": "30s"}, {"@type":
  ".../google.rpc.QuotaFailure", "violations": [{"quotaId", ...}]}]}}`. A wrong key is
  HTTP 400 INVALID_ARGUMENT with ErrorInfo reason API_KEY_INVALID; a prompt over the
  context window is HTTP 400 INVALID_ARGUMENT whose message says the input token count
  "exceeds the maximum number of tokens allowed" (it has no code of its own, so the
  message is read for that phrase and never forwarded). Only `status`, the ErrorInfo
  `reason` and the QuotaFailure `quotaId` reach metadata.
* Headers: none for rate limits and no request id (the body's `responseId` is used).

What cannot be translated is refused with INVALID_ARGUMENT naming the field:

* `metadata.end_user`: Gemini has no end-user field (nothing like OpenAI's `user` or
  Anthropic's `metadata.user_id`). Dropping it silently would hide from the caller that
  the vendor cannot attribute abuse to the end user, so it is refused unless the
  provider sets `options.end_user: "omit"`, an operator's explicit decision to send such
  requests without it.
* Message `name` (no participant names; on a tool message it may name the function).
* System messages after the conversation started (`systemInstruction` precedes all
  contents), images in system and tool messages, more than five stop sequences, a seed
  outside int32, a tool result whose call (and so function name) cannot be found.

Tool calls: Gemini rarely gives a call an id; one it does not give is generated
(`call_<hex>`) and echoed back as `functionCall.id` / `functionResponse.id`, which the API
accepts. Gemini 3 models require the `thoughtSignature` of a function call to be sent back
with it, and the unified `ToolCall` has no field for it. Provider option
`thought_signatures` decides: "placeholder" (default) sends the documented
`skip_thought_signature_validator` placeholder on the first call of each model turn
(Google's recommendation for histories whose signatures are not available); "embed"
appends the real signature to the emitted call id (`<id>~<signature>`; callers echo the id
back unchanged) and restores it on the way back, falling back to the placeholder for a
first call that carries none; "omit" sends none. `Tool.strict` asks for
constrained decoding: mode VALIDATED where the caller left the choice to the model (ANY
already constrains).
"""

from __future__ import annotations

import base64
import math
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
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
    parse_duration,
    parse_error_body,
    parse_retry_after,
    safe_code,
)
from switchyard.adapters.vendors.common import (
    SamplingFields,
    json_object,
    json_schema_of,
    put_sampling,
    tool_choice_mode,
)
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.v1 import common_pb2, provider_pb2

STREAM_ACTION: Final = ":streamGenerateContent?alt=sse"
# The probe only needs an authenticated answer; one model is the smallest page.
MODELS_PATH: Final = "/models?pageSize=1"
API_KEY_HEADER: Final = "x-goog-api-key"
MAX_STOP_SEQUENCES: Final = 5
INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1
# Google's documented placeholder for a function call whose thought signature is unknown.
THOUGHT_SIGNATURE_PLACEHOLDER: Final = "skip_thought_signature_validator"
# Separates a call id from an embedded thought signature ("~" is not in base64).
SIGNATURE_SEPARATOR: Final = "~"
THOUGHT_SIGNATURE_MODES: Final = ("placeholder", "embed", "omit")
END_USER_MODES: Final = ("refuse", "omit")

# A model id (`gemini-2.5-flash`) or resource name (`models/...`, `tunedModels/...`):
# nothing that could change the request path or add a query.
_MODEL_NAME = re.compile(r"^(?:(?:models|tunedModels)/)?[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# FunctionDeclaration.name: a letter or underscore, then letters, digits, `_.:-`; <= 128.
_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")
_DATA_URL = re.compile(r"^data:([^;,]+);base64,(.*)$", re.DOTALL)
# The only sign of a prompt over the context window: "The input token count (N) exceeds
# the maximum number of tokens allowed (M)."
_CONTEXT_TOO_LONG = re.compile(r"exceeds the maximum number of tokens", re.IGNORECASE)

_FINISH_REASONS: Final[dict[str, common_pb2.FinishReason.ValueType]] = {
    "STOP": common_pb2.FINISH_REASON_STOP,
    "MAX_TOKENS": common_pb2.FINISH_REASON_LENGTH,
    # Stopped at the per-request token limit; the answer can be continued.
    "CONTINUATION": common_pb2.FINISH_REASON_LENGTH,
    "SAFETY": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "RECITATION": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "LANGUAGE": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "BLOCKLIST": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "PROHIBITED_CONTENT": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "SPII": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "IMAGE_SAFETY": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "IMAGE_PROHIBITED_CONTENT": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "IMAGE_RECITATION": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "ESCALATION": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "PUP_LIMITED_DISABLED": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "MODEL_ARMOR": common_pb2.FINISH_REASON_CONTENT_FILTER,
    # The model produced something unusable: a broken or unexpected function call.
    "MALFORMED_FUNCTION_CALL": common_pb2.FINISH_REASON_ERROR,
    "UNEXPECTED_TOOL_CALL": common_pb2.FINISH_REASON_ERROR,
    "TOO_MANY_TOOL_CALLS": common_pb2.FINISH_REASON_ERROR,
    "MISSING_THOUGHT_SIGNATURE": common_pb2.FINISH_REASON_ERROR,
    "MALFORMED_RESPONSE": common_pb2.FINISH_REASON_ERROR,
}

_TOOL_MODES: Final[dict[common_pb2.ToolChoiceMode.ValueType, str]] = {
    common_pb2.TOOL_CHOICE_MODE_AUTO: "AUTO",
    common_pb2.TOOL_CHOICE_MODE_NONE: "NONE",
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: "ANY",
    common_pb2.TOOL_CHOICE_MODE_TOOL: "ANY",
}

_MEDIA_RESOLUTION: Final[dict[common_pb2.ImageDetail.ValueType, str]] = {
    common_pb2.IMAGE_DETAIL_LOW: "MEDIA_RESOLUTION_LOW",
    common_pb2.IMAGE_DETAIL_HIGH: "MEDIA_RESOLUTION_HIGH",
}

# google.rpc canonical codes -> the HTTP status Google maps them to; for an in-stream
# error that names its status but not its code.
_HTTP_STATUS_OF: Final = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}

# ErrorInfo reasons (domain googleapis.com) that mean the configured key or project is
# wrong, whatever HTTP status carries them (a bad key is a 400).
_AUTH_REASONS: Final = frozenset(
    {
        "API_KEY_INVALID",
        "API_KEY_EXPIRED",
        "API_KEY_SERVICE_BLOCKED",
        "API_KEY_HTTP_REFERRER_BLOCKED",
        "API_KEY_IP_ADDRESS_BLOCKED",
        "API_KEY_ANDROID_APP_BLOCKED",
        "API_KEY_IOS_APP_BLOCKED",
        "SERVICE_DISABLED",
        "CONSUMER_INVALID",
        "CONSUMER_SUSPENDED",
        "BILLING_DISABLED",
        "ACCESS_TOKEN_EXPIRED",
        "ACCESS_TOKEN_SCOPE_INSUFFICIENT",
    }
)

_ERROR_INFO: Final = "type.googleapis.com/google.rpc.ErrorInfo"
_RETRY_INFO: Final = "type.googleapis.com/google.rpc.RetryInfo"
_QUOTA_FAILURE: Final = "type.googleapis.com/google.rpc.QuotaFailure"


class GeminiTranslator(Translator):
    """The Gemini API for one configured provider.

    Provider options: `thought_signatures` -- "placeholder" (default), "embed" or "omit"
    (see the module docstring); `end_user` -- "refuse" (default) or "omit".
    """

    vendor: ClassVar[str] = "gemini"

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        super().__init__(provider_name, provider, api_key)
        signatures = str(provider.options.get("thought_signatures", "placeholder"))
        if signatures not in THOUGHT_SIGNATURE_MODES:
            raise ValueError(
                f"provider {provider_name!r}: options.thought_signatures must be one of "
                f"{', '.join(THOUGHT_SIGNATURE_MODES)}"
            )
        end_user = str(provider.options.get("end_user", "refuse"))
        if end_user not in END_USER_MODES:
            raise ValueError(
                f"provider {provider_name!r}: options.end_user must be one of {', '.join(END_USER_MODES)}"
            )
        self.thought_signatures = signatures
        self._omit_end_user = end_user == "omit"
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            headers[API_KEY_HEADER] = api_key
        self._headers: Mapping[str, str] = headers

    # -- request ----------------------------------------------------------------
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The `streamGenerateContent?alt=sse` request for `request`."""
        chat = request.request
        model = request.upstream_model
        if not model:
            raise invalid("the upstream model is required", "upstream_model")
        if not _MODEL_NAME.match(model):
            raise invalid("not a Gemini model name", "upstream_model")
        if not chat.messages:
            raise invalid("at least one message is required", "messages")
        if chat.metadata.end_user and not self._omit_end_user:
            raise invalid(
                "Gemini has no end-user field; the provider must set options.end_user to 'omit' "
                "to send such requests without it",
                "metadata.end_user",
            )
        system, contents = self._contents(chat.messages)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        if chat.tools:
            body["tools"] = [{"functionDeclarations": [_declaration(t, i) for i, t in enumerate(chat.tools)]}]
        tool_config = _tool_config(chat)
        if tool_config is not None:
            body["toolConfig"] = tool_config
        generation: dict[str, Any] = {}
        if chat.HasField("response_format"):
            _response_format(chat.response_format, generation)
        if chat.HasField("sampling"):
            _sampling(chat.sampling, generation)
        if generation:
            body["generationConfig"] = generation
        resource = model if "/" in model else f"models/{model}"
        return VendorRequest("POST", f"/{resource}{STREAM_ACTION}", self._headers, body)

    def models_request(self) -> VendorRequest:
        """`GET /models?pageSize=1`: authenticated, free, and fast."""
        return VendorRequest(
            "GET", MODELS_PATH, {k: v for k, v in self._headers.items() if k != "Content-Type"}
        )

    def _contents(self, messages: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """System instruction parts and the contents, from the unified messages."""
        system: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        # The content collecting the answers of consecutive tool messages (Gemini wants the
        # responses to one turn's calls together, in one user turn).
        tool_answers: dict[str, Any] | None = None
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            role = message.role
            if role == common_pb2.ROLE_UNSPECIFIED:
                raise invalid("the message role is required", f"{where}.role")
            if message.tool_calls and role != common_pb2.ROLE_ASSISTANT:
                raise invalid("only assistant messages carry tool calls", f"{where}.tool_calls")
            if message.tool_call_id and role != common_pb2.ROLE_TOOL:
                raise invalid("only tool messages answer a tool call", f"{where}.tool_call_id")
            if message.name and role != common_pb2.ROLE_TOOL:
                raise invalid("Gemini messages take no participant name", f"{where}.name")
            if role == common_pb2.ROLE_SYSTEM:
                if contents:
                    raise invalid(
                        "Gemini takes system instructions only before the conversation", f"{where}.role"
                    )
                system.extend(_text_parts(message, where, "system"))
                continue
            if role == common_pb2.ROLE_TOOL:
                part = self._function_response(messages, index)
                if tool_answers is None:
                    tool_answers = {"role": "user", "parts": []}
                    contents.append(tool_answers)
                tool_answers["parts"].append(part)
                continue
            tool_answers = None
            if role == common_pb2.ROLE_USER:
                parts = [_user_part(part, f"{where}.parts[{i}]") for i, part in enumerate(message.parts)]
                if not parts:
                    raise invalid("a user message needs content", f"{where}.parts")
                contents.append({"role": "user", "parts": parts})
            elif role == common_pb2.ROLE_ASSISTANT:
                parts = [_user_part(part, f"{where}.parts[{i}]") for i, part in enumerate(message.parts)]
                parts.extend(self._function_calls(message, where))
                if not parts:
                    raise invalid("an assistant message needs content or tool calls", f"{where}.parts")
                contents.append({"role": "model", "parts": parts})
            else:
                raise invalid("unknown message role", f"{where}.role")
        if not contents:
            raise invalid("Gemini needs at least one user or assistant message", "messages")
        return system, contents

    def _function_calls(self, message: common_pb2.Message, where: str) -> list[dict[str, Any]]:
        parts: list[dict[str, Any]] = []
        for i, call in enumerate(message.tool_calls):
            at = f"{where}.tool_calls[{i}]"
            if not call.name:
                raise invalid("a tool call needs its name", f"{at}.name")
            args = json_object(call.arguments_json, f"{at}.arguments_json") if call.arguments_json else {}
            call_id, signature = self._split_id(call.id)
            function_call: dict[str, Any] = {"name": call.name, "args": args}
            if call_id:
                function_call["id"] = call_id
            part: dict[str, Any] = {"functionCall": function_call}
            if signature:
                part["thoughtSignature"] = signature
            elif i == 0 and self.thought_signatures != "omit":
                # Gemini signs the first call of a turn (a parallel call's parts carry none);
                # without the real signature, the documented placeholder stands in.
                part["thoughtSignature"] = THOUGHT_SIGNATURE_PLACEHOLDER
            parts.append(part)
        return parts

    def _function_response(self, messages: Any, index: int) -> dict[str, Any]:
        message = messages[index]
        where = f"messages[{index}]"
        if not message.tool_call_id:
            raise invalid("a tool message must name the call it answers", f"{where}.tool_call_id")
        name = _called_function(messages, index, message.tool_call_id)
        if name is None:
            if not message.name:
                raise invalid(
                    "no earlier assistant tool call has this id, so the function's name is unknown",
                    f"{where}.tool_call_id",
                )
            name = message.name
        elif message.name and message.name != name:
            raise invalid("the name differs from the answered call's function", f"{where}.name")
        text = "".join(part.text for part in _text_only(message, where, "tool"))
        call_id, _ = self._split_id(message.tool_call_id)
        response: dict[str, Any] = {"name": name, "response": _response_object(text)}
        if call_id:
            response["id"] = call_id
        return {"functionResponse": response}

    def _split_id(self, call_id: str) -> tuple[str, str]:
        """The Gemini call id and, in "embed" mode, the signature appended to it."""
        if self.thought_signatures != "embed" or SIGNATURE_SEPARATOR not in call_id:
            return call_id, ""
        base, _, signature = call_id.rpartition(SIGNATURE_SEPARATOR)
        return base, signature

    # -- response -----------------------------------------------------------------
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> GeminiStreamDecoder:
        """Decoding state for one generation."""
        return GeminiStreamDecoder(self, request.request)

    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """Gemini sends no rate-limit headers; only a `retry-after`, should one appear."""
        return finish_headroom(common_pb2.RateLimitHeadroom(), headers, time.time(), found=False)

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for an HTTP error answer (see `error_for`)."""
        parsed = parse_error_body(body)
        if isinstance(parsed, list) and len(parsed) == 1:
            parsed = parsed[0]
        error = parsed.get("error") if isinstance(parsed, dict) else None
        facts = _error_facts(error)
        retry_after = parse_retry_after(headers)
        if retry_after is None:
            retry_after = facts.retry_delay_s
        extra = self.request_id_metadata(headers)
        return self.error_for(
            status, facts, headroom=self.headroom(headers), retry_after_s=retry_after, **extra
        )

    def stream_error(self, error: object) -> SwitchyardError:
        """The unified error for a `{"error": {...}}` event inside a 200 stream."""
        facts = _error_facts(error)
        status = _HTTP_STATUS_OF.get(facts.status, 500)
        code = error.get("code") if isinstance(error, dict) else None
        if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
            status = code
        return self.error_for(status, facts, retry_after_s=facts.retry_delay_s, in_stream="true")

    def error_for(
        self,
        status: int,
        facts: ErrorFacts,
        *,
        headroom: common_pb2.RateLimitHeadroom | None = None,
        retry_after_s: float | None = None,
        **extra: str,
    ) -> SwitchyardError:
        """The error table: HTTP status, canonical status and ErrorInfo reason to code and
        reason -- the same choices as OpenAI's table where the meaning is the same.

        A bad key (400 with reason API_KEY_INVALID), 401, 403 and a 400
        FAILED_PRECONDITION (the free tier or the API is not available in the caller's
        region, billing is off) are FAILED_PRECONDITION / AUTH_FAILED: the provider's
        account, not the request, must be fixed. A 400 whose message says the input
        exceeds the token limit is CONTEXT_TOO_LONG.
        """
        metadata = self.error_metadata(status, facts.status, headroom, **extra)
        if facts.reason:
            metadata["vendor_reason"] = facts.reason
        if facts.quota_id:
            metadata["quota_id"] = facts.quota_id
        label = f"HTTP {status}" + (f" ({facts.status})" if facts.status else "")
        where = f"provider {self.provider_name!r}"
        retry: float | None = None
        if status == 429:
            grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
            reason = Reason.RATE_LIMITED
            retry = retry_after_s if retry_after_s is not None else DEFAULT_RATE_LIMIT_RETRY_S
            message = f"{where} rate-limited the request ({label})"
        elif (
            status in (401, 403)
            or facts.reason in _AUTH_REASONS
            or (status == 400 and facts.status == "FAILED_PRECONDITION")
        ):
            grpc_code = grpc.StatusCode.FAILED_PRECONDITION
            reason = Reason.AUTH_FAILED
            message = f"{where} rejected the configured credentials or account ({label})"
        elif (shared := http_status_class(status, where, label, retry_after_s)) is not None:
            grpc_code, reason, message, retry = shared
        elif facts.context_too_long:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.CONTEXT_TOO_LONG
            message = f"the prompt exceeds the model's input token limit ({label})"
        else:
            grpc_code = grpc.StatusCode.INVALID_ARGUMENT
            reason = Reason.INVALID_REQUEST
            message = f"{where} rejected the request ({label})"
        return SwitchyardError(grpc_code, reason, message, metadata=metadata, retry_after_s=retry)

    def blocked_prompt(self, block_reason: str) -> SwitchyardError:
        """INVALID_ARGUMENT / CONTENT_FILTERED for `promptFeedback.blockReason`."""
        return SwitchyardError(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTENT_FILTERED,
            f"provider {self.provider_name!r} refused the prompt (blocked: {block_reason})",
            metadata=self.error_metadata(200, block_reason),
        )


class GeminiStreamDecoder(StreamDecoder):
    """GenerateContentResponse events (or a whole response) to unified events."""

    def __init__(self, translator: GeminiTranslator, chat: common_pb2.ChatRequest) -> None:
        self._translator = translator
        self._chat = chat
        self.finished = False
        self._usage: common_pb2.Usage | None = None
        self._finish: common_pb2.FinishReason.ValueType = common_pb2.FINISH_REASON_UNSPECIFIED
        self._finish_seen = False
        self._response_id = ""
        self._model = ""
        self._tool_calls = 0
        # Only for the estimate when no usage arrives; counting is cheaper than keeping text.
        self._output_chars = 0

    def on_event(self, event: SseEvent) -> list[provider_pb2.GenerateResponse]:
        """Deltas of one `data:` event; an error event raises."""
        data = event.data
        if not data or data.isspace():
            return []
        try:
            response = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("an event that is not valid JSON") from None
        if not isinstance(response, dict):
            raise self._translator.protocol_error("an event that is not a JSON object")
        return self._response(response)

    def on_body(self, body: bytes) -> list[provider_pb2.GenerateResponse]:
        """Deltas of a whole answer: one GenerateContentResponse or an array of them."""
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._translator.protocol_error("a body that is not valid JSON") from None
        responses = parsed if isinstance(parsed, list) else [parsed]
        events: list[provider_pb2.GenerateResponse] = []
        for response in responses:
            if not isinstance(response, dict):
                raise self._translator.protocol_error("a body that is not a JSON object")
            events.extend(self._response(response))
        self.on_eof()
        return events

    def on_eof(self) -> None:
        """Gemini streams have no end marker: a clean end is complete once a finish reason
        arrived, and incomplete (the connection was cut short) without one."""
        if not self._finish_seen:
            super().on_eof()
        self.finished = True

    def outcome(self) -> StreamOutcome:
        """Usage (estimated at ~4 characters per token when Gemini sent none), finish
        reason (STOP with a function call is TOOL_CALLS), response id and model version."""
        usage = self._usage if self._usage is not None else estimated_usage(self._chat, self._output_chars)
        finish = self._finish
        if finish == common_pb2.FINISH_REASON_STOP and self._tool_calls:
            finish = common_pb2.FINISH_REASON_TOOL_CALLS
        return StreamOutcome(usage, finish, self._response_id, self._model)

    def _response(self, response: dict[str, Any]) -> list[provider_pb2.GenerateResponse]:
        error = response.get("error")
        if error is not None:
            raise self._translator.stream_error(error)
        if not self._response_id:
            self._response_id = self._text(response.get("responseId"))
        if not self._model:
            self._model = self._text(response.get("modelVersion"))
        usage = response.get("usageMetadata")
        if usage:
            self._usage = self._read_usage(usage)
        feedback = response.get("promptFeedback")
        if feedback is not None:
            if not isinstance(feedback, dict):
                raise self._translator.protocol_error("prompt feedback that is not a JSON object")
            block = feedback.get("blockReason")
            if block and block != "BLOCKED_REASON_UNSPECIFIED":
                raise self._translator.blocked_prompt(safe_code(block))
        candidates = response.get("candidates")
        if not candidates:
            return []
        if not isinstance(candidates, list):
            raise self._translator.protocol_error("candidates that are not a list")
        events: list[provider_pb2.GenerateResponse] = []
        for candidate in candidates:
            if not isinstance(candidate, dict):
                raise self._translator.protocol_error("a candidate that is not a JSON object")
            # We never ask for more than one candidate; a stray other one is not this answer.
            if candidate.get("index", 0) != 0:
                continue
            content = candidate.get("content")
            if content is not None:
                if not isinstance(content, dict):
                    raise self._translator.protocol_error("content that is not a JSON object")
                delta = self._parts(content.get("parts"))
                if delta is not None:
                    events.append(provider_pb2.GenerateResponse(delta=delta))
            finish = candidate.get("finishReason")
            if finish is not None:
                if not isinstance(finish, str):
                    raise self._translator.protocol_error("a finish reason that is not a string")
                self._finish_seen = True
                self._finish = _FINISH_REASONS.get(finish, common_pb2.FINISH_REASON_UNSPECIFIED)
        return events

    def _parts(self, parts: object) -> common_pb2.Delta | None:
        if parts is None:
            return None
        if not isinstance(parts, list):
            raise self._translator.protocol_error("parts that are not a list")
        out = common_pb2.Delta()
        found = False
        for part in parts:
            if not isinstance(part, dict):
                raise self._translator.protocol_error("a part that is not a JSON object")
            text = self._text(part.get("text"))
            if text:
                found = True
                self._output_chars += len(text)
                if part.get("thought") is True:
                    # A thought summary: reasoning, never answer text.
                    out.reasoning_text += text
                else:
                    out.text += text
            call = part.get("functionCall")
            if call is not None:
                found = True
                self._function_call(call, part.get("thoughtSignature"), out)
        return out if found else None

    def _function_call(self, call: object, signature: object, out: common_pb2.Delta) -> None:
        if not isinstance(call, dict):
            raise self._translator.protocol_error("a function call that is not a JSON object")
        name = self._text(call.get("name"))
        if not name:
            raise self._translator.protocol_error("a function call without a name")
        args = call.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            raise self._translator.protocol_error("function call arguments that are not a JSON object")
        call_id = self._text(call.get("id")) or f"call_{secrets.token_hex(12)}"
        if self._translator.thought_signatures == "embed" and isinstance(signature, str) and signature:
            call_id += SIGNATURE_SEPARATOR + signature
        arguments = orjson.dumps(args).decode()
        self._output_chars += len(name) + len(arguments)
        # Gemini sends a call whole: one fragment with id, name and all arguments.
        out.tool_calls.add(
            index=clamp_uint32(self._tool_calls), id=call_id, name=name, arguments_fragment=arguments
        )
        self._tool_calls += 1

    def _text(self, value: object) -> str:
        if isinstance(value, str):
            return value
        if value is None:
            return ""
        raise self._translator.protocol_error("a text field that is not a string")

    def _read_usage(self, usage: object) -> common_pb2.Usage:
        if not isinstance(usage, dict):
            raise self._translator.protocol_error("usage metadata that is not a JSON object")
        prompt = self._count(usage.get("promptTokenCount"))
        tool_prompt = self._count(usage.get("toolUsePromptTokenCount"))
        candidates = self._count(usage.get("candidatesTokenCount"))
        thoughts = self._count(usage.get("thoughtsTokenCount"))
        return common_pb2.Usage(
            input_tokens=clamp_uint32(prompt + tool_prompt),
            output_tokens=clamp_uint32(candidates + thoughts),
            cached_input_tokens=self._count(usage.get("cachedContentTokenCount")),
            reasoning_tokens=thoughts,
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


def _text_only(message: common_pb2.Message, where: str, role: str) -> list[common_pb2.ContentPart]:
    for i, part in enumerate(message.parts):
        if part.HasField("image"):
            raise invalid(f"Gemini {role} messages cannot hold images", f"{where}.parts[{i}].image")
    return list(message.parts)


def _text_parts(message: common_pb2.Message, where: str, role: str) -> list[dict[str, Any]]:
    return [{"text": part.text} for part in _text_only(message, where, role)]


def _user_part(part: common_pb2.ContentPart, where: str) -> dict[str, Any]:
    if part.HasField("image"):
        return _image_part(part.image, f"{where}.image")
    return {"text": part.text}


def _image_part(image: common_pb2.ImagePart, where: str) -> dict[str, Any]:
    if image.url and image.data:
        raise invalid("an image has either a URL or inline data, not both", f"{where}.data")
    out: dict[str, Any]
    if image.data:
        if not image.mime_type:
            raise invalid("inline image data needs its MIME type", f"{where}.mime_type")
        out = {
            "inlineData": {"mimeType": image.mime_type, "data": base64.b64encode(image.data).decode("ascii")}
        }
    elif image.url.startswith("data:"):
        match = _DATA_URL.match(image.url)
        if match is None:
            raise invalid("a data URL must be base64: data:<type>;base64,<data>", f"{where}.url")
        mime_type, data = match.groups()
        out = {"inlineData": {"mimeType": mime_type, "data": data}}
    elif image.url:
        if not image.url.startswith(("https://", "http://", "gs://")):
            raise invalid("an image URL must be https, http, gs or data", f"{where}.url")
        file_data = {"fileUri": image.url}
        if image.mime_type:
            file_data["mimeType"] = image.mime_type
        out = {"fileData": file_data}
    else:
        raise invalid("an image needs a URL or inline data", f"{where}.url")
    level = _MEDIA_RESOLUTION.get(image.detail)
    if level is not None:
        # Per-part media resolution (Gemini 3 and later); AUTO is the model's default.
        out["mediaResolution"] = {"level": level}
    return out


def _called_function(messages: Any, index: int, call_id: str) -> str | None:
    """The function name of the latest assistant tool call before `index` with `call_id`."""
    for earlier in range(index - 1, -1, -1):
        message = messages[earlier]
        if message.role != common_pb2.ROLE_ASSISTANT:
            continue
        for call in message.tool_calls:
            if call.id == call_id:
                return str(call.name)
    return None


def _response_object(text: str) -> dict[str, Any]:
    """`functionResponse.response` for a tool's text: a JSON object as it is, anything
    else under "output" (the key Gemini documents for a function's output)."""
    try:
        value = orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        return value
    return {"output": text}


def _declaration(tool: common_pb2.Tool, index: int) -> dict[str, Any]:
    where = f"tools[{index}]"
    if not tool.name:
        raise invalid("a tool needs a name", f"{where}.name")
    if not _FUNCTION_NAME.match(tool.name):
        raise invalid(
            "a Gemini function name starts with a letter or '_' and holds at most 128 letters, "
            "digits, '_', '.', ':' or '-'",
            f"{where}.name",
        )
    declaration: dict[str, Any] = {"name": tool.name}
    if tool.description:
        declaration["description"] = tool.description
    if tool.parameters_json_schema:
        declaration["parametersJsonSchema"] = json_object(
            tool.parameters_json_schema, f"{where}.parameters_json_schema"
        )
    return declaration


def _tool_config(chat: common_pb2.ChatRequest) -> dict[str, Any] | None:
    strict = any(tool.strict for tool in chat.tools)
    choice = chat.tool_choice
    mode = tool_choice_mode(chat) if chat.HasField("tool_choice") else None
    if mode is None:
        return {"functionCallingConfig": {"mode": "VALIDATED"}} if strict else None
    named = _TOOL_MODES.get(mode)
    if named is None:
        raise invalid("unknown tool choice mode", "tool_choice.mode")
    config: dict[str, Any] = {"mode": "VALIDATED" if named == "AUTO" and strict else named}
    if mode == common_pb2.TOOL_CHOICE_MODE_TOOL:
        config["allowedFunctionNames"] = [choice.tool_name]
    elif choice.tool_name:
        raise invalid("tool_name needs mode TOOL", "tool_choice.mode")
    return {"functionCallingConfig": config}


def _response_format(response_format: common_pb2.ResponseFormat, generation: dict[str, Any]) -> None:
    kind = response_format.type
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED:
        return
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_TEXT:
        generation["responseMimeType"] = "text/plain"
    elif kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        generation["responseMimeType"] = "application/json"
    elif kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        schema = json_schema_of(response_format)
        name = response_format.schema_name
        if name:
            # Gemini has no schema name; JSON Schema's own label for it is `title`.
            title = schema.setdefault("title", name)
            if title != name:
                raise invalid(
                    "the schema's title differs from the schema name, and Gemini takes only one",
                    "response_format.schema_name",
                )
        # Gemini always decodes to the schema (constrained decoding), so `strict` holds.
        generation["responseMimeType"] = "application/json"
        generation["responseJsonSchema"] = schema
    else:
        raise invalid("unknown response format type", "response_format.type")


_SAMPLING_FIELDS: Final = SamplingFields(
    top_p="topP",
    max_output_tokens="maxOutputTokens",
    stop_sequences="stopSequences",
    presence_penalty="presencePenalty",
    frequency_penalty="frequencyPenalty",
)


def _sampling(sampling: common_pb2.SamplingParams, generation: dict[str, Any]) -> None:
    put_sampling(
        sampling,
        generation,
        _SAMPLING_FIELDS,
        vendor="Gemini",
        max_stop_sequences=MAX_STOP_SEQUENCES,
        check_seed=_check_seed,
    )


def _check_seed(seed: int) -> None:
    if not INT32_MIN <= seed <= INT32_MAX:
        raise invalid("Gemini takes a 32-bit seed", "sampling.seed")


# --------------------------------------------------------------------------- #
# error pieces
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class ErrorFacts:
    """What an error body says, minus its message: the canonical status, the ErrorInfo
    reason, the first QuotaFailure quota id, the RetryInfo delay and whether the message
    is the context-window one (the message itself is never kept)."""

    status: str = ""
    reason: str = ""
    quota_id: str = ""
    retry_delay_s: float | None = None
    context_too_long: bool = False


def _error_facts(error: object) -> ErrorFacts:
    if not isinstance(error, dict):
        return ErrorFacts()
    reason = quota_id = ""
    retry_delay: float | None = None
    details = error.get("details")
    for detail in details if isinstance(details, list) else ():
        if not isinstance(detail, dict):
            continue
        kind = detail.get("@type")
        if kind == _ERROR_INFO and not reason:
            reason = safe_code(detail.get("reason"))
        elif kind == _RETRY_INFO and retry_delay is None:
            raw = detail.get("retryDelay")
            if isinstance(raw, str):
                retry_delay = parse_duration(raw)
            elif isinstance(raw, dict):
                # The proto form of a Duration, should a server send it.
                seconds, nanos = raw.get("seconds", 0), raw.get("nanos", 0)
                if isinstance(seconds, (int, str)) and isinstance(nanos, int):
                    try:
                        value = float(seconds) + nanos / 1e9
                    except ValueError:
                        value = math.nan
                    retry_delay = value if math.isfinite(value) and value >= 0 else None
        elif kind == _QUOTA_FAILURE and not quota_id:
            violations = detail.get("violations")
            if isinstance(violations, list) and violations and isinstance(violations[0], dict):
                quota_id = safe_code(violations[0].get("quotaId"))
    message = error.get("message")
    return ErrorFacts(
        status=safe_code(error.get("status")),
        reason=reason,
        quota_id=quota_id,
        retry_delay_s=retry_delay,
        context_too_long=isinstance(message, str) and _CONTEXT_TOO_LONG.search(message) is not None,
    )
