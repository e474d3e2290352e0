"""The edge's OpenAI-compatible HTTP front: `POST /v1/chat/completions` and `GET /v1/models`.

One code path, two skins: a chat completion is translated to the unified `ChatRequest`, run
through the same `stream_chat` callable the gRPC methods use (admission, then
`ChatPipeline.stream`), and its `ChatChunk`s are translated back into OpenAI's own shapes:
a `chat.completion` object, or `chat.completion.chunk` server-sent events exactly as OpenAI
sends them (a role chunk, content and tool-call deltas, the finish-reason chunk, with
`stream_options.include_usage` a usage chunk with `choices: []`, then `data: [DONE]`).

Errors use OpenAI's body `{"error": {"message", "type", "param", "code"}}`. An error before
the first byte gets the HTTP status of its gRPC code (the table Envoy's transcoder uses, so
both skins agree through the ingress) and `retry-after` / `retry-after-ms` when waiting helps;
`code` is OpenAI's own code where one exists (`context_length_exceeded`,
`rate_limit_exceeded`, `insufficient_quota`, `invalid_api_key`, `model_not_found`, ...) and
otherwise the `ErrorInfo` reason in lower case. `param` names the OpenAI parameter (the
proto field path of a validation error is translated back). An error after the first byte
is one `data: {"error": {...}}` event, then the stream ends without `[DONE]`, as OpenAI does.
The response headers are held back until the first output (so a failover before the first
token still ends in a clean HTTP error and the headers name the model that answered).

Switchyard extensions (all optional):

* request header `x-request-id`: the request id, and the idempotency key (a retried request
  with the same id is charged once); generated when absent (Envoy always sets one); echoed
  in the response header and as the completion id `chatcmpl-<request id>`.
* request header `x-switchyard-priority`: `low`, `normal`, `high` or `critical`.
* request header `x-switchyard-timeout-ms`: a deadline for the whole answer.
* request body `switchyard`: `{"routing": RoutingHints, "cache": CachePolicy,
  "conversation_id": str}`, the two messages in their proto JSON form (as the REST
  transcoder takes them), for example `{"routing": {"preference": "ROUTING_PREFERENCE_COST"}}`.
  The OpenAI SDK sends it with `extra_body={"switchyard": {...}}`.
* response headers `x-switchyard-model`, `x-switchyard-provider` (the catalog model and
  provider that answered), and on whole answers `x-switchyard-cost-micros` and
  `x-switchyard-cache-status`. A stream's cost is known only at its end, so the last chunk
  (the usage chunk with `include_usage`, else the finish-reason chunk) carries a `switchyard`
  object: request id, model, provider, `cost_micros`, `saved_micros`, `cache_status`,
  `usage_estimated`, `attempts`. Whole answers carry the same object in their body.
* `delta.reasoning_content` / `message.reasoning_content` carry reasoning text for vendors
  that expose it (the field OpenAI-compatible reasoning servers use).
* `GET /v1/models` entries carry the catalog entry as `switchyard` (the `ModelInfo` proto JSON).

Parameters OpenAI documents but the unified request cannot carry are refused with a 400
naming them (`unsupported_parameter` / `unsupported_value`) unless they hold their default
(`n: 1`, `logprobs: false`, `parallel_tool_calls: true`, `store: false`, ...); unknown
parameters are refused as `unknown_parameter`.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import grpc
import orjson
from aiohttp import web
from google.protobuf import json_format
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind

from switchyard.common import tracing
from switchyard.common.catalog import Catalog, Model
from switchyard.common.catalog_proto import model_info
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.server import MAX_MESSAGE_BYTES
from switchyard.edge.gateway import Authenticate
from switchyard.edge.pipeline import Caller
from switchyard.v1 import common_pb2

__all__ = [
    "Authenticate",
    "ChatCall",
    "CompletionTranslator",
    "OpenAIHttpServer",
    "OpenAIRequestError",
    "StreamChat",
    "build_openai_app",
    "error_response_parts",
    "openai_param",
    "parse_chat_request",
    "start_openai_http",
]

log = get_logger(__name__)
_tracer = tracing.get_tracer("switchyard.http")

JsonObject = dict[str, Any]

REQUEST_ID_HEADER: Final = "x-request-id"
PRIORITY_HEADER: Final = "x-switchyard-priority"
TIMEOUT_HEADER: Final = "x-switchyard-timeout-ms"
MODEL_HEADER: Final = "x-switchyard-model"
PROVIDER_HEADER: Final = "x-switchyard-provider"
COST_HEADER: Final = "x-switchyard-cost-micros"
CACHE_HEADER: Final = "x-switchyard-cache-status"

_REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")
_UINT32_MAX: Final = 2**32 - 1
_INT64_MAX: Final = 2**63 - 1
# OpenAI's limits on `metadata`.
_METADATA_MAX_PAIRS: Final = 16
_METADATA_MAX_KEY: Final = 64
_METADATA_MAX_VALUE: Final = 512


class StreamChat(Protocol):
    """The one chat entry point the front calls: admission, then `ChatPipeline.stream`."""

    def __call__(
        self, request: common_pb2.ChatRequest, caller: Caller, *, timeout_s: float | None
    ) -> AsyncIterator[common_pb2.ChatChunk]: ...


# -- errors ------------------------------------------------------------------------------------


class OpenAIRequestError(SwitchyardError):
    """A request body OpenAI's API would refuse: INVALID_ARGUMENT with OpenAI's `param` and `code`."""

    def __init__(self, message: str, param: str | None, openai_code: str) -> None:
        super().__init__(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.INVALID_REQUEST,
            message,
            metadata={"field": param} if param else None,
        )
        self.param = param
        self.openai_code = openai_code


def _type_error(param: str, expected: str, value: object) -> OpenAIRequestError:
    return OpenAIRequestError(
        f"Invalid type for '{param}': expected {expected}, but got {_json_type(value)} instead.",
        param,
        "invalid_type",
    )


def _value_error(param: str, message: str) -> OpenAIRequestError:
    return OpenAIRequestError(f"Invalid value for '{param}': {message}", param, "invalid_value")


def _unknown(param: str) -> OpenAIRequestError:
    return OpenAIRequestError(f"Unknown parameter: '{param}'.", param, "unknown_parameter")


def _unsupported(param: str, what: str = "") -> OpenAIRequestError:
    detail = f" {what}" if what else ""
    return OpenAIRequestError(
        f"Unsupported parameter: '{param}' is not supported by this gateway{detail}.",
        param,
        "unsupported_parameter",
    )


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


# gRPC code -> HTTP status: the mapping Envoy's gRPC-JSON transcoder applies (google.rpc.Code).
_HTTP_STATUS: Final = {
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

# OpenAI's own codes for the same failures.
_OPENAI_CODES: Final = {
    Reason.CONTEXT_TOO_LONG: "context_length_exceeded",
    Reason.RATE_LIMITED: "rate_limit_exceeded",
    Reason.BUDGET_EXCEEDED: "insufficient_quota",
    Reason.UNAUTHENTICATED: "invalid_api_key",
    Reason.INVALID_REQUEST: "invalid_value",
    Reason.CONTENT_FILTERED: "content_policy_violation",
}

# Failures waiting cannot fix: the SDKs retry 429 and 5xx unless told not to.
_NOT_RETRYABLE: Final = frozenset({Reason.BUDGET_EXCEEDED, Reason.NOT_IMPLEMENTED})


def _is_unknown_model(error: SwitchyardError) -> bool:
    # The planner refuses an unknown model as INVALID_ARGUMENT on field `model`, naming it in
    # metadata `model`; OpenAI answers that with 404 `model_not_found`.
    return (
        error.reason is Reason.INVALID_REQUEST
        and error.metadata.get("field") == "model"
        and "model" in error.metadata
    )


def _http_status(error: SwitchyardError) -> int:
    if error.reason is Reason.AUTH_FAILED:
        # The provider refused the gateway's own key: not the caller's fault.
        return 502
    if _is_unknown_model(error):
        return 404
    return _HTTP_STATUS.get(error.code, 500)


def _openai_code(error: SwitchyardError) -> str:
    if isinstance(error, OpenAIRequestError):
        return error.openai_code
    if _is_unknown_model(error) or (error.reason is Reason.NOT_FOUND and "model" in error.metadata):
        return "model_not_found"
    if error.reason is Reason.RATE_LIMITED and error.metadata.get("quota") == "exhausted":
        return "insufficient_quota"
    return _OPENAI_CODES.get(error.reason, error.reason.value.lower())


def _error_type(status: int, code: str) -> str:
    if code == "insufficient_quota":
        return "insufficient_quota"
    if status == 429:
        return "requests"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_object(error: SwitchyardError, max_tokens_param: str = "max_completion_tokens") -> JsonObject:
    """OpenAI's `error` object for `error`, with the Switchyard reason and metadata beside it."""
    status = _http_status(error)
    code = _openai_code(error)
    if isinstance(error, OpenAIRequestError):
        param = error.param
    elif error.reason is Reason.CONTEXT_TOO_LONG:
        param = "messages"
    else:
        raw = error.metadata.get("field")
        param = openai_param(raw, max_tokens_param) if raw else None
    extension: JsonObject = {"reason": error.reason.value}
    metadata = {k: v for k, v in error.metadata.items() if k != "field"}
    if metadata:
        extension["metadata"] = metadata
    return {
        "message": error.message,
        "type": _error_type(status, code),
        "param": param,
        "code": code,
        "switchyard": extension,
    }


def error_response_parts(
    error: SwitchyardError, max_tokens_param: str = "max_completion_tokens"
) -> tuple[int, dict[str, str], JsonObject]:
    """HTTP status, headers and body for an error answered before the first byte."""
    status = _http_status(error)
    headers: dict[str, str] = {}
    if error.retry_after_s is not None:
        delay = max(0.0, error.retry_after_s)
        headers["retry-after"] = str(math.ceil(delay))
        headers["retry-after-ms"] = str(round(delay * 1000))
    if error.reason in _NOT_RETRYABLE or error.metadata.get("quota") == "exhausted":
        headers["x-should-retry"] = "false"
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    return status, headers, {"error": error_object(error, max_tokens_param)}


_PARAM_RULES: Final = (
    (re.compile(r"^sampling\.max_output_tokens$"), None),
    (re.compile(r"^sampling\.stop_sequences$"), "stop"),
    (re.compile(r"^sampling\.(\w+)$"), r"\1"),
    (re.compile(r"^metadata\.end_user$"), "user"),
    (re.compile(r"^metadata\.tags.*$"), "metadata"),
    (re.compile(r"^tool_choice\..*$"), "tool_choice"),
    (re.compile(r"^response_format\.(schema_name|json_schema|strict)$"), r"response_format.json_schema"),
    (re.compile(r"^response_format\..*$"), "response_format"),
    (re.compile(r"^(messages\[\d+\])\.parts\[(\d+)\]\.image.*$"), r"\1.content[\2].image_url"),
    (re.compile(r"^(messages\[\d+\])\.parts(\[\d+\])?$"), r"\1.content\2"),
    (re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])\.arguments_json$"), r"\1.function.arguments"),
    (re.compile(r"^(messages\[\d+\]\.tool_calls\[\d+\])\.name$"), r"\1.function.name"),
    (re.compile(r"^(tools\[\d+\])\.parameters_json_schema$"), r"\1.function.parameters"),
    (re.compile(r"^(tools\[\d+\])\.(name|description|strict)$"), r"\1.function.\2"),
)


def openai_param(field_path: str, max_tokens_param: str = "max_completion_tokens") -> str:
    """The OpenAI parameter for a `ChatRequest` field path (`sampling.top_p` -> `top_p`).

    Messages and tools translate one to one, so their indices carry over.
    """
    for pattern, replacement in _PARAM_RULES:
        match = pattern.match(field_path)
        if match is not None:
            return max_tokens_param if replacement is None else match.expand(replacement)
    return field_path


# -- request: OpenAI JSON -> ChatRequest --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChatCall:
    """A chat completion request, translated."""

    request: common_pb2.ChatRequest
    stream: bool
    include_usage: bool
    timeout_s: float | None
    # The name the caller used for the output cap, so errors about it name the same parameter.
    max_tokens_param: str


# Parameters translated into the ChatRequest.
_TRANSLATED: Final = frozenset(
    {
        "model",
        "messages",
        "tools",
        "tool_choice",
        "response_format",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "user",
        "safety_identifier",
        "metadata",
        "n",
        "stream",
        "stream_options",
        "switchyard",
    }
)

# Parameters the unified request cannot carry: accepted only at their default (or null).
_DEFAULT_ONLY: Final[dict[str, tuple[object, ...]]] = {
    "logprobs": (False,),
    "parallel_tool_calls": (True,),
    "store": (False,),
    "service_tier": ("auto", "default"),
    "modalities": (["text"],),
    "logit_bias": ({},),
    "top_logprobs": (),
    "reasoning_effort": (),
    "verbosity": (),
    "audio": (),
    "prediction": (),
    "web_search_options": (),
    "prompt_cache_key": (),
    "functions": (),
    "function_call": (),
}

_ROLES: Final = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
_MESSAGE_KEYS: Final = {
    "system": frozenset({"role", "content", "name"}),
    "developer": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "tool_calls", "refusal", "audio", "function_call"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
_DETAILS: Final = {
    "low": common_pb2.IMAGE_DETAIL_LOW,
    "high": common_pb2.IMAGE_DETAIL_HIGH,
    "auto": common_pb2.IMAGE_DETAIL_AUTO,
}
_TOOL_CHOICES: Final = {
    "auto": common_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": common_pb2.TOOL_CHOICE_MODE_NONE,
    "required": common_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
_PRIORITIES: Final = {
    "low": common_pb2.PRIORITY_LOW,
    "normal": common_pb2.PRIORITY_NORMAL,
    "high": common_pb2.PRIORITY_HIGH,
    "critical": common_pb2.PRIORITY_CRITICAL,
}


def parse_chat_request(body: object, headers: Mapping[str, str]) -> ChatCall:
    """Translate a `POST /v1/chat/completions` body (parsed JSON) and its headers.

    Raises `OpenAIRequestError` naming the first bad parameter. Value ranges the pipeline
    checks for every skin (temperature, top_p, ...) are left to it.
    """
    if not isinstance(body, dict):
        raise OpenAIRequestError(
            f"Invalid type for the request body: expected an object, but got {_json_type(body)} instead.",
            None,
            "invalid_type",
        )
    obj: dict[str, Any] = body
    for key, value in obj.items():
        if key in _TRANSLATED:
            continue
        if key not in _DEFAULT_ONLY:
            raise _unknown(key)
        if value is not None and not any(
            type(value) is type(ok) and value == ok for ok in _DEFAULT_ONLY[key]
        ):
            raise _unsupported(key)
    request = common_pb2.ChatRequest()
    if "model" not in obj or obj["model"] is None:
        raise OpenAIRequestError(
            "Missing required parameter: 'model'.", "model", "missing_required_parameter"
        )
    request.model = _string(obj["model"], "model")
    if not request.model.strip():
        raise _value_error("model", "expected a model id, an alias or 'auto'.")
    messages = obj.get("messages")
    if messages is None:
        raise OpenAIRequestError(
            "Missing required parameter: 'messages'.", "messages", "missing_required_parameter"
        )
    for index, raw in enumerate(_array(messages, "messages")):
        request.messages.append(_message(raw, f"messages[{index}]"))
    _tools(obj, request)
    _response_format(obj.get("response_format"), request)
    max_tokens_param = _sampling(obj, request.sampling)
    _end_user_and_tags(obj, request)
    n = obj.get("n")
    if n is not None and _integer(n, "n") != 1:
        raise OpenAIRequestError(
            "Unsupported value: 'n' must be 1: this gateway returns one choice.", "n", "unsupported_value"
        )
    stream = obj.get("stream")
    streaming = stream is not None and _boolean(stream, "stream")
    include_usage = False
    options = obj.get("stream_options")
    if options is not None:
        if not streaming:
            raise OpenAIRequestError(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
                "invalid_value",
            )
        options = _object(options, "stream_options")
        _check_keys(options, frozenset({"include_usage", "include_obfuscation"}), "stream_options")
        usage = options.get("include_usage")
        include_usage = usage is not None and _boolean(usage, "stream_options.include_usage")
        if options.get("include_obfuscation") is not None:
            # Obfuscation pads chunks against side channels; this gateway sends none, so both values hold.
            _boolean(options["include_obfuscation"], "stream_options.include_obfuscation")
    _extension(obj.get("switchyard"), request)
    timeout_s = _headers(headers, request)
    return ChatCall(
        request=request,
        stream=streaming,
        include_usage=include_usage,
        timeout_s=timeout_s,
        max_tokens_param=max_tokens_param,
    )


def _headers(headers: Mapping[str, str], request: common_pb2.ChatRequest) -> float | None:
    request_id = headers.get(REQUEST_ID_HEADER)
    if request_id is not None:
        if not _REQUEST_ID.match(request_id):
            raise OpenAIRequestError(
                f"the {REQUEST_ID_HEADER} header must be 1-128 printable ASCII characters without spaces",
                REQUEST_ID_HEADER,
                "invalid_value",
            )
        request.request_id = request_id
    else:
        request.request_id = uuid.uuid4().hex
    priority = headers.get(PRIORITY_HEADER)
    if priority is not None:
        value = _PRIORITIES.get(priority.strip().lower())
        if value is None:
            raise OpenAIRequestError(
                f"the {PRIORITY_HEADER} header must be one of {', '.join(_PRIORITIES)}",
                PRIORITY_HEADER,
                "invalid_value",
            )
        request.routing.priority = value
    timeout = headers.get(TIMEOUT_HEADER)
    if timeout is None:
        return None
    if not timeout.strip().isdigit() or int(timeout) <= 0:
        raise OpenAIRequestError(
            f"the {TIMEOUT_HEADER} header must be a positive whole number of milliseconds",
            TIMEOUT_HEADER,
            "invalid_value",
        )
    return int(timeout) / 1000


def _message(raw: object, where: str) -> common_pb2.Message:
    obj = _object(raw, where)
    role_name = _string(obj.get("role"), f"{where}.role")
    role = _ROLES.get(role_name)
    if role is None:
        raise _value_error(f"{where}.role", f"expected one of {', '.join(_ROLES)}.")
    _check_keys(obj, _MESSAGE_KEYS[role_name], where)
    for key in ("audio", "function_call"):
        if obj.get(key) is not None:
            raise _unsupported(f"{where}.{key}")
    message = common_pb2.Message(role=role)
    if obj.get("name") is not None:
        message.name = _string(obj["name"], f"{where}.name")
    content = obj.get("content")
    if role_name == "user":
        _user_content(content, message, f"{where}.content")
    elif role_name == "assistant":
        if content is not None:
            _text_content(content, message, f"{where}.content", allow_refusal=True)
        refusal = obj.get("refusal")
        if refusal is not None and _string(refusal, f"{where}.refusal") and not message.parts:
            message.parts.add(text=refusal)
        if obj.get("tool_calls") is not None:
            for index, call in enumerate(_array(obj["tool_calls"], f"{where}.tool_calls")):
                message.tool_calls.append(_tool_call(call, f"{where}.tool_calls[{index}]"))
    else:
        _text_content(content, message, f"{where}.content", allow_refusal=False)
    if role_name == "tool":
        call_id = obj.get("tool_call_id")
        if call_id is None:
            raise OpenAIRequestError(
                f"Missing required parameter: '{where}.tool_call_id'.",
                f"{where}.tool_call_id",
                "missing_required_parameter",
            )
        message.tool_call_id = _string(call_id, f"{where}.tool_call_id")
    return message


def _text_content(content: object, message: common_pb2.Message, where: str, *, allow_refusal: bool) -> None:
    if isinstance(content, str):
        message.parts.add(text=content)
        return
    kinds = ("text", "refusal") if allow_refusal else ("text",)
    for index, raw in enumerate(_array(content, where, expected="a string or an array")):
        path = f"{where}[{index}]"
        part = _object(raw, path)
        kind = _string(part.get("type"), f"{path}.type")
        if kind not in kinds:
            raise OpenAIRequestError(
                f"Invalid value for '{path}.type': expected one of {', '.join(kinds)}.",
                f"{path}.type",
                "invalid_value",
            )
        _check_keys(part, frozenset({"type", kind}), path)
        message.parts.add(text=_string(part.get(kind), f"{path}.{kind}"))


def _user_content(content: object, message: common_pb2.Message, where: str) -> None:
    if isinstance(content, str):
        message.parts.add(text=content)
        return
    for index, raw in enumerate(_array(content, where, expected="a string or an array")):
        path = f"{where}[{index}]"
        part = _object(raw, path)
        kind = _string(part.get("type"), f"{path}.type")
        if kind == "text":
            _check_keys(part, frozenset({"type", "text"}), path)
            message.parts.add(text=_string(part.get("text"), f"{path}.text"))
        elif kind == "image_url":
            _check_keys(part, frozenset({"type", "image_url"}), path)
            message.parts.add(image=_image(part.get("image_url"), f"{path}.image_url"))
        elif kind in ("input_audio", "file"):
            raise OpenAIRequestError(
                f"Unsupported value: '{path}.type' {kind!r} is not supported by this gateway.",
                f"{path}.type",
                "unsupported_value",
            )
        else:
            raise _value_error(f"{path}.type", "expected one of text, image_url.")


def _image(raw: object, where: str) -> common_pb2.ImagePart:
    obj = _object(raw, where)
    _check_keys(obj, frozenset({"url", "detail"}), where)
    url = _string(obj.get("url"), f"{where}.url")
    image = common_pb2.ImagePart()
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        mime, _, encoding = header[len("data:") :].partition(";")
        if not comma or encoding != "base64" or not mime.startswith("image/"):
            raise _value_error(f"{where}.url", "a data URL must look like data:image/<type>;base64,<data>.")
        try:
            image.data = base64.b64decode(payload, validate=True)
        except binascii.Error:
            raise _value_error(f"{where}.url", "the data URL is not valid base64.") from None
        image.mime_type = mime
    elif url.startswith(("https://", "http://")):
        image.url = url
    else:
        raise _value_error(f"{where}.url", "expected an http(s) URL or a base64 data URL.")
    detail = obj.get("detail")
    if detail is not None:
        value = _DETAILS.get(_string(detail, f"{where}.detail"))
        if value is None:
            raise _value_error(f"{where}.detail", "expected one of low, high, auto.")
        image.detail = value
    return image


def _tool_call(raw: object, where: str) -> common_pb2.ToolCall:
    obj = _object(raw, where)
    _check_keys(obj, frozenset({"id", "type", "function"}), where)
    kind = obj.get("type", "function")
    if kind != "function":
        raise _value_error(f"{where}.type", "expected 'function'.")
    function = _object(obj.get("function"), f"{where}.function")
    _check_keys(function, frozenset({"name", "arguments"}), f"{where}.function")
    return common_pb2.ToolCall(
        id=_string(obj.get("id"), f"{where}.id"),
        name=_string(function.get("name"), f"{where}.function.name"),
        arguments_json=_string(function.get("arguments"), f"{where}.function.arguments"),
    )


def _tools(obj: Mapping[str, Any], request: common_pb2.ChatRequest) -> None:
    tools = obj.get("tools")
    if tools is not None:
        for index, raw in enumerate(_array(tools, "tools")):
            where = f"tools[{index}]"
            tool = _object(raw, where)
            if tool.get("type") != "function":
                raise OpenAIRequestError(
                    f"Unsupported value: '{where}.type' must be 'function' on this gateway.",
                    f"{where}.type",
                    "unsupported_value",
                )
            _check_keys(tool, frozenset({"type", "function"}), where)
            function = _object(tool.get("function"), f"{where}.function")
            _check_keys(
                function, frozenset({"name", "description", "parameters", "strict"}), f"{where}.function"
            )
            out = request.tools.add(name=_string(function.get("name"), f"{where}.function.name"))
            if function.get("description") is not None:
                out.description = _string(function["description"], f"{where}.function.description")
            if function.get("parameters") is not None:
                parameters = _object(function["parameters"], f"{where}.function.parameters")
                out.parameters_json_schema = orjson.dumps(parameters).decode()
            if function.get("strict") is not None:
                out.strict = _boolean(function["strict"], f"{where}.function.strict")
    choice = obj.get("tool_choice")
    if choice is None:
        return
    if isinstance(choice, str):
        mode = _TOOL_CHOICES.get(choice)
        if mode is None:
            raise _value_error("tool_choice", "expected none, auto, required or a function.")
        request.tool_choice.mode = mode
        return
    named = _object(choice, "tool_choice")
    if named.get("type") != "function":
        raise OpenAIRequestError(
            "Unsupported value: 'tool_choice.type' must be 'function' on this gateway.",
            "tool_choice.type",
            "unsupported_value",
        )
    _check_keys(named, frozenset({"type", "function"}), "tool_choice")
    function = _object(named.get("function"), "tool_choice.function")
    _check_keys(function, frozenset({"name"}), "tool_choice.function")
    request.tool_choice.mode = common_pb2.TOOL_CHOICE_MODE_TOOL
    request.tool_choice.tool_name = _string(function.get("name"), "tool_choice.function.name")


def _response_format(raw: object, request: common_pb2.ChatRequest) -> None:
    if raw is None:
        return
    obj = _object(raw, "response_format")
    kind = _string(obj.get("type"), "response_format.type")
    fmt = request.response_format
    if kind == "text":
        _check_keys(obj, frozenset({"type"}), "response_format")
        fmt.type = common_pb2.RESPONSE_FORMAT_TYPE_TEXT
    elif kind == "json_object":
        _check_keys(obj, frozenset({"type"}), "response_format")
        fmt.type = common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT
    elif kind == "json_schema":
        _check_keys(obj, frozenset({"type", "json_schema"}), "response_format")
        spec = _object(obj.get("json_schema"), "response_format.json_schema")
        where = "response_format.json_schema"
        _check_keys(spec, frozenset({"name", "schema", "strict", "description"}), where)
        if spec.get("description") is not None:
            raise _unsupported(f"{where}.description")
        fmt.type = common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
        fmt.schema_name = _string(spec.get("name"), f"{where}.name")
        if spec.get("schema") is not None:
            fmt.json_schema = orjson.dumps(_object(spec["schema"], f"{where}.schema")).decode()
        if spec.get("strict") is not None:
            fmt.strict = _boolean(spec["strict"], f"{where}.strict")
    else:
        raise _value_error("response_format.type", "expected one of text, json_object, json_schema.")


def _sampling(obj: Mapping[str, Any], sampling: common_pb2.SamplingParams) -> str:
    """Fill `sampling`; return the name the caller used for the output cap."""
    for name in ("temperature", "top_p"):
        if obj.get(name) is not None:
            setattr(sampling, name, _number(obj[name], name))
    for name in ("presence_penalty", "frequency_penalty"):
        if obj.get(name) is not None:
            value = _number(obj[name], name)
            if not -2.0 <= value <= 2.0:
                raise _value_error(name, "expected a number between -2 and 2.")
            setattr(sampling, name, value)
    caps = [name for name in ("max_completion_tokens", "max_tokens") if obj.get(name) is not None]
    if len(caps) == 2:
        raise OpenAIRequestError(
            "max_tokens and max_completion_tokens are the same setting: send only max_completion_tokens.",
            "max_tokens",
            "invalid_value",
        )
    max_tokens_param = caps[0] if caps else "max_completion_tokens"
    if caps:
        cap = _integer(obj[max_tokens_param], max_tokens_param)
        if not 0 <= cap <= _UINT32_MAX:
            raise _value_error(max_tokens_param, "expected a positive integer.")
        sampling.max_output_tokens = cap
    stop = obj.get("stop")
    if isinstance(stop, str):
        sampling.stop_sequences.append(stop)
    elif stop is not None:
        for index, item in enumerate(_array(stop, "stop", expected="a string or an array")):
            sampling.stop_sequences.append(_string(item, f"stop[{index}]"))
    if obj.get("seed") is not None:
        seed = _integer(obj["seed"], "seed")
        if not -_INT64_MAX - 1 <= seed <= _INT64_MAX:
            raise _value_error("seed", "expected a 64-bit integer.")
        sampling.seed = seed
    return max_tokens_param


def _end_user_and_tags(obj: Mapping[str, Any], request: common_pb2.ChatRequest) -> None:
    # `safety_identifier` is OpenAI's newer name for what `user` is used for.
    for name in ("user", "safety_identifier"):
        if obj.get(name) is not None:
            request.metadata.end_user = _string(obj[name], name)
    tags = obj.get("metadata")
    if tags is None:
        return
    pairs = _object(tags, "metadata")
    if len(pairs) > _METADATA_MAX_PAIRS:
        raise _value_error("metadata", f"at most {_METADATA_MAX_PAIRS} key-value pairs.")
    for key, value in pairs.items():
        if len(key) > _METADATA_MAX_KEY:
            raise _value_error("metadata", f"keys are at most {_METADATA_MAX_KEY} characters.")
        text = _string(value, f"metadata.{key}")
        if len(text) > _METADATA_MAX_VALUE:
            raise _value_error(f"metadata.{key}", f"values are at most {_METADATA_MAX_VALUE} characters.")
        request.metadata.tags[key] = text


def _extension(raw: object, request: common_pb2.ChatRequest) -> None:
    if raw is None:
        return
    obj = _object(raw, "switchyard")
    _check_keys(obj, frozenset({"routing", "cache", "conversation_id"}), "switchyard")
    for name in ("routing", "cache"):
        if obj.get(name) is None:
            continue
        try:
            json_format.ParseDict(_object(obj[name], f"switchyard.{name}"), getattr(request, name))
        except json_format.ParseError as exc:
            raise _value_error(f"switchyard.{name}", str(exc)) from None
    if obj.get("conversation_id") is not None:
        request.metadata.conversation_id = _string(obj["conversation_id"], "switchyard.conversation_id")


def _check_keys(obj: Mapping[str, Any], allowed: frozenset[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise _unknown(f"{where}.{key}")


def _object(value: object, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _type_error(param, "an object", value)
    return value


def _array(value: object, param: str, *, expected: str = "an array") -> list[Any]:
    if not isinstance(value, list):
        raise _type_error(param, expected, value)
    return value


def _string(value: object, param: str) -> str:
    if value is None:
        raise OpenAIRequestError(
            f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
        )
    if not isinstance(value, str):
        raise _type_error(param, "a string", value)
    return value


def _boolean(value: object, param: str) -> bool:
    if not isinstance(value, bool):
        raise _type_error(param, "a boolean", value)
    return value


def _integer(value: object, param: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(param, "an integer", value)
    return value


def _number(value: object, param: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _type_error(param, "a number", value)
    return float(value)


# -- response: ChatChunks -> OpenAI JSON --------------------------------------------------------

_FINISH_REASONS: Final = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
}
_CACHE_STATUS: Final = {
    common_pb2.CACHE_STATUS_UNSPECIFIED: "bypass",
    common_pb2.CACHE_STATUS_BYPASS: "bypass",
    common_pb2.CACHE_STATUS_MISS: "miss",
    common_pb2.CACHE_STATUS_HIT_EXACT: "hit_exact",
    common_pb2.CACHE_STATUS_HIT_SEMANTIC: "hit_semantic",
    common_pb2.CACHE_STATUS_REFRESHED: "refreshed",
}


def usage_object(usage: common_pb2.Usage) -> JsonObject:
    """OpenAI's `usage` for unified token counts."""
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_input_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": usage.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


@dataclass(slots=True)
class _ToolCallState:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


class CompletionTranslator:
    """`ChatChunk`s in; `chat.completion.chunk` objects out, or one `chat.completion` at the end.

    Feed every chunk to `feed`; it returns the chunk objects to send now (none while only
    routing is known). After the `done` event, `completion()` is the whole answer.
    """

    def __init__(
        self,
        *,
        request_id: str,
        requested_model: str,
        include_usage: bool = False,
        streaming: bool = True,
        created: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.completion_id = f"chatcmpl-{request_id}"
        self.created = int(time.time()) if created is None else created
        self.model = requested_model
        self.provider = ""
        self._include_usage = include_usage
        self._streaming = streaming
        self._started = False
        self._text: list[str] = []
        self._reasoning: list[str] = []
        self._calls: dict[int, _ToolCallState] = {}
        self._usage: common_pb2.Usage | None = None
        self._done: common_pb2.Done | None = None
        self._attempts = 0

    @property
    def started(self) -> bool:
        """Whether any output chunk has been produced (the HTTP headers are committed then)."""
        return self._started

    @property
    def finished(self) -> bool:
        """Whether the `done` event has arrived."""
        return self._done is not None

    @property
    def usage(self) -> common_pb2.Usage | None:
        """The token counts, once the `usage` event has arrived."""
        return self._usage

    def feed(self, chunk: common_pb2.ChatChunk) -> list[JsonObject]:
        """The chunk objects `chunk` turns into (always empty when not streaming)."""
        kind = chunk.WhichOneof("event")
        if kind == "routing":
            self.model = chunk.routing.model or self.model
            self.provider = chunk.routing.provider
            self._attempts = max(self._attempts, chunk.routing.attempt)
            return []
        if kind == "delta":
            return self._delta(chunk.delta)
        if kind == "usage":
            self._usage = chunk.usage
            return []
        if kind == "done":
            return self._finish(chunk.done)
        return []

    def _delta(self, delta: common_pb2.Delta) -> list[JsonObject]:
        out: JsonObject = {}
        if delta.text:
            self._text.append(delta.text)
            out["content"] = delta.text
        if delta.reasoning_text:
            self._reasoning.append(delta.reasoning_text)
            out["reasoning_content"] = delta.reasoning_text
        fragments: list[JsonObject] = []
        for fragment in delta.tool_calls:
            call = self._calls.get(fragment.index)
            if call is None:
                call = _ToolCallState(id=fragment.id or f"call_{uuid.uuid4().hex[:24]}", name=fragment.name)
                self._calls[fragment.index] = call
                fragments.append(
                    {
                        "index": fragment.index,
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": fragment.arguments_fragment},
                    }
                )
            else:
                fragments.append(
                    {"index": fragment.index, "function": {"arguments": fragment.arguments_fragment}}
                )
            call.arguments.append(fragment.arguments_fragment)
        if fragments:
            out["tool_calls"] = fragments
        if not out or not self._streaming:
            return []
        return [*self._opening(), self._chunk(out, None)]

    def _opening(self) -> list[JsonObject]:
        if self._started:
            return []
        self._started = True
        return (
            [self._chunk({"role": "assistant", "content": "", "refusal": None}, None)]
            if self._streaming
            else []
        )

    def _finish(self, done: common_pb2.Done) -> list[JsonObject]:
        if done.finish_reason == common_pb2.FINISH_REASON_ERROR:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.PROVIDER_UNAVAILABLE,
                "the provider ended the answer with an error",
                metadata={"model": self.model, "provider": self.provider},
            )
        self._done = done
        if not self._streaming:
            self._started = True
            return []
        chunks = [*self._opening(), self._chunk({}, self.finish_reason)]
        if self._include_usage:
            chunks.append(
                {**self._envelope([]), "usage": usage_object(self._usage or common_pb2.Usage(estimated=True))}
            )
        chunks[-1]["switchyard"] = self.extension()
        return chunks

    @property
    def finish_reason(self) -> str:
        """OpenAI's finish reason for the answer so far."""
        reason = _FINISH_REASONS.get(self._done.finish_reason) if self._done is not None else None
        if reason is not None:
            return reason
        return "tool_calls" if self._calls else "stop"

    def _envelope(self, choices: list[JsonObject]) -> JsonObject:
        return {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def _chunk(self, delta: JsonObject, finish_reason: str | None) -> JsonObject:
        chunk = self._envelope(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def extension(self) -> JsonObject:
        """The `switchyard` object: who answered, what it cost (micro-USD), cache status."""
        done = self._done or common_pb2.Done()
        usage = self._usage
        return {
            "request_id": done.request_id or self.request_id,
            "model": self.model,
            "provider": self.provider,
            "cost_micros": done.cost_micros,
            "saved_micros": done.saved_micros,
            "cache_status": _CACHE_STATUS.get(done.cache_status, "bypass"),
            "usage_estimated": usage is None or usage.estimated,
            "attempts": len(done.attempts) or self._attempts,
        }

    def completion(self) -> JsonObject:
        """The whole `chat.completion` (call after the `done` event)."""
        message: JsonObject = {"role": "assistant", "content": "".join(self._text), "refusal": None}
        if self._calls:
            message["content"] = message["content"] or None
            message["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.name, "arguments": "".join(call.arguments)},
                }
                for _, call in sorted(self._calls.items())
            ]
        if self._reasoning:
            message["reasoning_content"] = "".join(self._reasoning)
        return {
            "id": self.completion_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
            "choices": [
                {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish_reason}
            ],
            "usage": usage_object(self._usage or common_pb2.Usage(estimated=True)),
            "switchyard": self.extension(),
        }


def model_object(model: Model, catalog: Catalog) -> JsonObject:
    """OpenAI's `model` object for a catalog model, with the catalog entry as `switchyard`."""
    return {
        "id": model.id,
        "object": "model",
        # The catalog records no release dates.
        "created": 0,
        "owned_by": model.provider,
        "switchyard": json_format.MessageToDict(model_info(model, catalog), preserving_proto_field_name=True),
    }


# -- the HTTP app -------------------------------------------------------------------------------


def _sse(obj: JsonObject) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _json(status: int, body: JsonObject, headers: Mapping[str, str]) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=headers
    )


def _internal(exc: BaseException) -> SwitchyardError:
    """A bug, as INTERNAL: logged with its traceback, answered without internals."""
    trace_id = tracing.current_trace_id()
    log.error("openai_http_handler_failed", error_type=type(exc).__name__, exc_info=exc)
    return SwitchyardError(
        grpc.StatusCode.INTERNAL,
        Reason.INTERNAL,
        "internal error",
        metadata={"trace_id": trace_id} if trace_id else None,
    )


def _error_json(
    error: SwitchyardError, request_id: str | None, max_tokens_param: str = "max_completion_tokens"
) -> web.Response:
    """An error answered before the first byte: its HTTP status, headers and OpenAI's body."""
    status, headers, body = error_response_parts(error, max_tokens_param)
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    _log_refused(error, status, request_id)
    return _json(status, body, headers)


_HTTP_CODES: Final = {404: "unknown_url", 405: "method_not_allowed", 413: "request_too_large"}


class _OpenAIFront:
    """The app's handlers and middleware, bound to the chat entry point, the key check and the catalog."""

    def __init__(self, stream_chat: StreamChat, authenticate: Authenticate, catalog: Catalog) -> None:
        self._stream_chat = stream_chat
        self._authenticate = authenticate
        self._catalog = catalog

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A server span per request (parented on `traceparent`) and every error in OpenAI's shape."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        with _tracer.start_as_current_span(
            f"{request.method} {route}",
            context=propagate.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": request.method, "http.route": route, "url.path": request.path},
        ) as span:
            response = await self._answer(request, handler)
            span.set_attribute("http.response.status_code", response.status)
            return response

    async def _answer(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            message = f"Invalid URL ({request.method} {request.path})" if exc.status == 404 else exc.reason
            code = _HTTP_CODES.get(exc.status, f"http_{exc.status}")
            body = {
                "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
            }
            return _json(exc.status, body, {k: v for k, v in exc.headers.items() if k.lower() == "allow"})
        except SwitchyardError as exc:
            return _error_json(exc, None)
        except Exception as exc:
            return _error_json(_internal(exc), None)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """`POST /v1/chat/completions`; errors before the first byte are answered here, with
        the request id and the parameter names the caller used."""
        given_id = request.headers.get(REQUEST_ID_HEADER)
        request_id = given_id if given_id is not None and _REQUEST_ID.match(given_id) else None
        max_tokens_param = "max_completion_tokens"
        try:
            caller = await self._authenticate(request.headers.get("Authorization"))
            try:
                body = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                raise OpenAIRequestError(
                    "We could not parse the JSON body of your request: it must be a JSON object.",
                    None,
                    "invalid_json",
                ) from None
            call = parse_chat_request(body, request.headers)
            request_id, max_tokens_param = call.request.request_id, call.max_tokens_param
            return await self._complete(request, call, caller)
        except SwitchyardError as exc:
            return _error_json(exc, request_id, max_tokens_param)
        except ConnectionResetError:
            raise  # the client is gone: nobody to answer
        except Exception as exc:
            return _error_json(_internal(exc), request_id, max_tokens_param)

    async def _complete(self, request: web.Request, call: ChatCall, caller: Caller) -> web.StreamResponse:
        chat = call.request
        span = trace.get_current_span()
        span.set_attribute("gen_ai.operation.name", "chat")
        span.set_attribute("gen_ai.request.model", chat.model)
        span.set_attribute("switchyard.request_id", chat.request_id)
        translator = CompletionTranslator(
            request_id=chat.request_id,
            requested_model=chat.model,
            include_usage=call.include_usage,
            streaming=call.stream,
        )
        chunks = self._stream_chat(chat, caller, timeout_s=call.timeout_s)
        try:
            if call.stream:
                return await self._stream(request, call, chunks, translator)
            async for chunk in chunks:
                translator.feed(chunk)
            if not translator.finished:
                raise SwitchyardError(
                    grpc.StatusCode.INTERNAL, Reason.INTERNAL, "the answer ended without its last event"
                )
            completion = translator.completion()
            _record_outcome(span, translator)
            return _json(200, completion, self._answer_headers(translator, whole=True))
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _stream(
        self,
        request: web.Request,
        call: ChatCall,
        chunks: AsyncIterator[common_pb2.ChatChunk],
        translator: CompletionTranslator,
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            async for chunk in chunks:
                events = translator.feed(chunk)
                if not events:
                    continue
                if response is None:
                    # Headers wait for the first output: until then a failure is a plain HTTP error.
                    response = web.StreamResponse(
                        status=200, headers=self._answer_headers(translator, whole=False)
                    )
                    await response.prepare(request)
                await response.write(b"".join(_sse(event) for event in events))
            if response is None or not translator.finished:
                raise SwitchyardError(
                    grpc.StatusCode.INTERNAL, Reason.INTERNAL, "the answer ended without its last event"
                )
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            _record_outcome(trace.get_current_span(), translator)
            return response
        except ConnectionResetError:
            log.info("openai_stream_client_gone", request_id=translator.request_id)
            raise
        except Exception as exc:
            if response is None:
                raise
            error = exc if isinstance(exc, SwitchyardError) else _internal(exc)
            _log_refused(error, _http_status(error), translator.request_id, after_first_byte=True)
            await response.write(_sse({"error": error_object(error, call.max_tokens_param)}))
            await response.write_eof()
            return response

    @staticmethod
    def _answer_headers(translator: CompletionTranslator, *, whole: bool) -> dict[str, str]:
        headers = {
            REQUEST_ID_HEADER: translator.request_id,
            MODEL_HEADER: translator.model,
            PROVIDER_HEADER: translator.provider,
        }
        if whole:
            extension = translator.extension()
            headers[COST_HEADER] = str(extension["cost_micros"])
            headers[CACHE_HEADER] = str(extension["cache_status"])
        else:
            headers.update(
                {
                    "Content-Type": "text/event-stream; charset=utf-8",
                    "Cache-Control": "no-cache",
                    # Tells any buffering proxy (nginx) to pass each event on at once.
                    "X-Accel-Buffering": "no",
                }
            )
        return headers

    async def list_models(self, request: web.Request) -> web.Response:
        """`GET /v1/models`: the catalog models the caller may use."""
        caller = await self._authenticate(request.headers.get("Authorization"))
        data = [model_object(m, self._catalog) for m in self._catalog.models if _allowed(caller, m.id)]
        return _json(200, {"object": "list", "data": data}, {})

    async def retrieve_model(self, request: web.Request) -> web.Response:
        """`GET /v1/models/{model}`: one model by id or alias."""
        caller = await self._authenticate(request.headers.get("Authorization"))
        name = request.match_info["model"]
        model = self._catalog.resolve(name)
        if model is None or not _allowed(caller, model.id):
            raise SwitchyardError(
                grpc.StatusCode.NOT_FOUND,
                Reason.NOT_FOUND,
                f"The model '{name[:200]}' does not exist or you do not have access to it.",
                metadata={"model": name[:200]},
            )
        return _json(200, model_object(model, self._catalog), {})


def _allowed(caller: Caller, model_id: str) -> bool:
    return caller.allowed_models is None or model_id in caller.allowed_models


def _record_outcome(span: trace.Span, translator: CompletionTranslator) -> None:
    span.set_attribute("gen_ai.response.model", translator.model)
    span.set_attribute("gen_ai.response.finish_reasons", [translator.finish_reason])
    usage = translator.usage
    if usage is not None:
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)


def _log_refused(
    error: SwitchyardError, status: int, request_id: str | None, *, after_first_byte: bool = False
) -> None:
    log.info(
        "openai_http_error_sent",
        status=status,
        reason=error.reason.value,
        request_id=request_id,
        after_first_byte=after_first_byte,
    )


def build_openai_app(
    *, stream_chat: StreamChat, authenticate: Authenticate, catalog: Catalog
) -> web.Application:
    """The OpenAI-compatible app: `POST /v1/chat/completions`, `GET /v1/models[/{model}]`.

    `stream_chat` is the one chat entry point (admission, then `ChatPipeline.stream`);
    `authenticate` gets the raw `Authorization` header. Serve it with `start_openai_http`
    (client disconnects must cancel handlers, so the pipeline stops at once).
    """
    front = _OpenAIFront(stream_chat, authenticate, catalog)
    # Images travel inline as data URLs: allow bodies as large as a gRPC message.
    app = web.Application(middlewares=[front.middleware], client_max_size=MAX_MESSAGE_BYTES)
    app.router.add_post("/v1/chat/completions", front.chat_completions)
    app.router.add_get("/v1/models", front.list_models)
    app.router.add_get("/v1/models/{model:.+}", front.retrieve_model)
    return app


@dataclass
class OpenAIHttpServer:
    """A started OpenAI HTTP front and its bound port."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        """The root URL (the SDK's `base_url` is this plus `/v1`)."""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening, give in-flight answers the grace period, then cancel the rest."""
        await self.runner.cleanup()


async def start_openai_http(
    app: web.Application, host: str, port: int, *, grace_s: float = 10.0
) -> OpenAIHttpServer:
    """Serve `app` on `host:port` (0 picks a free port); raises OSError when the port is taken.

    Handlers are cancelled when their client disconnects, which closes the pipeline's
    stream and cancels the upstream call at once.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=grace_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = int(runner.addresses[0][1])
    log.info("openai_http_started", host=host, port=bound)
    return OpenAIHttpServer(runner=runner, host=host, port=bound)
