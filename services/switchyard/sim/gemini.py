"""Google Gemini API simulator (aiohttp), on the vendor-neutral engine.

Speaks the Generative Language API's ``v1beta`` wire format -- ``generateContent`` JSON
and ``streamGenerateContent?alt=sse`` streaming -- closely enough that the official
``google-genai`` SDK parses it, with :class:`~switchyard.sim.faults.FaultKnobs` to inject
latency and failures.

Endpoints (``API_PREFIX`` is ``/v1beta``, so the SDK's ``base_url`` is the server root
with ``api_version="v1beta"``, and a catalog provider's ``base_url`` is root + prefix):
``POST /v1beta/models/{model}:generateContent``,
``POST /v1beta/models/{model}:streamGenerateContent?alt=sse``, ``GET /v1beta/models``
(``pageSize``, ``pageToken``), ``GET /v1beta/models/{model}`` and the ``/_sim/*`` control
endpoints.

Wire-format notes (what the real API does, mirrored here):

* Auth: ``x-goog-api-key`` (or the ``key`` query parameter). A wrong key is HTTP 400
  ``INVALID_ARGUMENT`` "API key not valid" with an ``ErrorInfo`` detail, reason
  ``API_KEY_INVALID``; no key is HTTP 403 ``PERMISSION_DENIED``.
* Errors are ``{"error": {"code", "message", "status", "details"}}`` with google.rpc
  canonical statuses. A 429 is ``RESOURCE_EXHAUSTED`` with ``Help``, ``QuotaFailure`` and
  (when ``retry_after_s`` is set) ``RetryInfo {"retryDelay": "3s"}`` details; the retry
  delay is in the body, not in a ``retry-after`` header. A prompt over the context window
  is a plain 400 ``INVALID_ARGUMENT`` whose message says the input token count "exceeds
  the maximum number of tokens allowed". The ``error_code`` knob is either a canonical
  status name (``FAILED_PRECONDITION``: overrides ``status``), ``API_KEY_INVALID`` (the
  wrong-key body) or any other ``ErrorInfo`` reason; ``error_message`` replaces the text.
* Request validation: unknown fields are refused the way the proto JSON parser does
  ("Invalid JSON payload received. Unknown name ..."), snake_case and lowerCamelCase both
  accepted; ``contents`` must be a non-empty list of ``{role: user|model, parts}`` with
  non-empty ``parts``, each part holding exactly one of its data fields; function calls
  and responses need a name, ``args`` / ``response`` are objects; at most five stop
  sequences; ``parameters`` and ``parametersJsonSchema`` (and ``responseSchema`` and
  ``responseJsonSchema``) are mutually exclusive, and a response schema needs
  ``responseMimeType: application/json``. For ``gemini-3*`` models, the first function
  call of each model step in the current turn must carry a ``thoughtSignature`` (the
  documented placeholder ``skip_thought_signature_validator`` passes).
* Streams are ``data: <GenerateContentResponse>`` events separated by CRLF CRLF, with no
  end marker: each event has ``candidates[0].content {role: "model", parts}``,
  ``usageMetadata``, ``modelVersion`` and ``responseId``; the last adds ``finishReason``
  and the final usage. A function call arrives whole in one part (``functionCall {name,
  args}``, no ``id``; Gemini 3 models add a ``thoughtSignature`` to the part), and its
  finish reason is ``STOP``. With ``thinkingConfig.includeThoughts`` and
  ``reasoning_tokens`` set, a thought-summary part (``thought: true``) comes first. An
  error after the stream started is ``data: {"error": {...}}`` and the stream ends.
* No rate-limit or request-id headers; responses carry ``server-timing`` like Google's
  front end does.

Token accounting is a deterministic approximation, not a tokenizer:
``promptTokenCount = sum over system and content parts of ceil(chars / 4)`` (text; for a
function call or response its name and JSON), plus 258 per inline or file part (Gemini's
count for a small image), plus ``ceil(chars / 4)`` of the tools' JSON, at least 1;
``candidatesTokenCount = ceil(len(answer) / 4)``; ``thoughtsTokenCount`` is the
``reasoning_tokens`` knob and ``cachedContentTokenCount`` the ``cached_tokens`` knob.
``maxOutputTokens`` truncates the answer to ``4 * N`` characters with ``MAX_TOKENS``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any, Literal

import orjson
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

#: Path prefix of the API (a catalog ``base_url`` is ``http://host:port/v1beta``).
API_PREFIX = "/v1beta"
API_VERSION = "v1beta"

#: Models listed by ``GET /v1beta/models`` (any model name is accepted for generation).
MODELS: tuple[str, ...] = (
    "gemini-2.0-flash",
    "gemini-2.0-flash-lite",
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-pro",
    "gemini-3-flash-preview",
    "gemini-3-pro-preview",
)

MAX_INPUT_TOKENS = 1_048_576
MAX_OUTPUT_TOKENS = 65_536
MAX_STOP_SEQUENCES = 5
IMAGE_TOKENS = 258
DEFAULT_PAGE_SIZE = 50
_INT32 = (-(2**31), 2**31 - 1)
_FRAME_END = b"\r\n\r\n"

# --------------------------------------------------------------------------- #
# error bodies
# --------------------------------------------------------------------------- #

_TYPE = "type.googleapis.com/google.rpc."

#: HTTP status -> (canonical status, message template)
_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: (
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login "
        "cookie or other valid authentication credential.",
    ),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: (
        "NOT_FOUND",
        "models/{model} is not found for API version v1beta, or is not supported for "
        "generateContent. Call ListModels to see the list of available models and their "
        "supported methods.",
    ),
    409: ("ABORTED", "The operation was aborted."),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    ),
    499: ("CANCELLED", "The operation was cancelled."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    501: ("UNIMPLEMENTED", "Method not found."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "The request timed out. Please try again."),
}

_CANONICAL = frozenset(
    {
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    }
)

_STATUS_MESSAGES: dict[str, str] = {
    "FAILED_PRECONDITION": "User location is not supported for the API use.",
}

_API_KEY_INVALID = "API key not valid. Please pass a valid API key."
_NO_API_KEY = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)


def _status_name(status: int) -> str:
    if status in _STATUS_ERRORS:
        return _STATUS_ERRORS[status][0]
    if status == 408:
        return "DEADLINE_EXCEEDED"
    return "FAILED_PRECONDITION" if status < 500 else "UNAVAILABLE" if status == 502 else "UNKNOWN"


def _error(code: int, status: str, message: str, details: list[object] | None = None) -> dict[str, object]:
    error: dict[str, object] = {"code": code, "message": message, "status": status}
    if details:
        error["details"] = details
    return {"error": error}


def _error_info(reason: str) -> dict[str, object]:
    return {
        "@type": _TYPE + "ErrorInfo",
        "reason": reason,
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    }


def _api_key_invalid() -> dict[str, object]:
    return _error(
        400,
        "INVALID_ARGUMENT",
        _API_KEY_INVALID,
        [
            _error_info("API_KEY_INVALID"),
            {"@type": _TYPE + "LocalizedMessage", "locale": "en-US", "message": _API_KEY_INVALID},
        ],
    )


def _bad_request(message: str, field: str | None = None) -> dict[str, object]:
    violation: dict[str, str] = {"description": message}
    if field:
        violation["field"] = field
    return _error(
        400, "INVALID_ARGUMENT", message, [{"@type": _TYPE + "BadRequest", "fieldViolations": [violation]}]
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.9f}".rstrip("0").rstrip(".") + "s"


def error_body(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    model: str = "gemini-2.5-flash",
    retry_after_s: float | None = None,
) -> dict[str, object]:
    """Gemini's JSON error body for HTTP ``status``.

    ``code`` is a canonical status name (overrides ``status``), ``API_KEY_INVALID`` (the
    wrong-key body) or any other ``ErrorInfo`` reason; ``message`` replaces the text.
    """
    if code == "API_KEY_INVALID":
        body = _api_key_invalid()
        inner = body["error"]
        assert isinstance(inner, dict)
        inner["code"] = status
        if message is not None:
            inner["message"] = message
        return body
    name = _status_name(status)
    template = _STATUS_ERRORS.get(status, (name, f"Simulated HTTP {status} error."))[1]
    details: list[object] = []
    if code is not None:
        if code in _CANONICAL:
            name = code
            template = _STATUS_MESSAGES.get(code, template)
        else:
            details.append(_error_info(code))
    if status == 429:
        details.append(
            {
                "@type": _TYPE + "Help",
                "links": [
                    {
                        "description": "Learn more about Gemini API quotas",
                        "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                    }
                ],
            }
        )
        details.append(
            {
                "@type": _TYPE + "QuotaFailure",
                "violations": [
                    {
                        "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                        "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                        "quotaDimensions": {"location": "global", "model": model},
                        "quotaValue": "1000",
                    }
                ],
            }
        )
    if retry_after_s is not None:
        details.append({"@type": _TYPE + "RetryInfo", "retryDelay": _duration(retry_after_s)})
    text = message if message is not None else template.format(model=model)
    return _error(status, name, text, details)


# --------------------------------------------------------------------------- #
# request validation
# --------------------------------------------------------------------------- #

_TOP_FIELDS = frozenset(
    {
        "model",
        "contents",
        "systemInstruction",
        "tools",
        "toolConfig",
        "generationConfig",
        "safetySettings",
        "cachedContent",
        "serviceTier",
        "store",
    }
)
_CONTENT_FIELDS = frozenset({"role", "parts"})
_PART_DATA = (
    "text",
    "inlineData",
    "fileData",
    "functionCall",
    "functionResponse",
    "executableCode",
    "codeExecutionResult",
)
_PART_FIELDS = frozenset(
    {*_PART_DATA, "thought", "thoughtSignature", "videoMetadata", "mediaResolution", "partMetadata"}
)
_BLOB_FIELDS = frozenset({"mimeType", "data"})
_FILE_FIELDS = frozenset({"mimeType", "fileUri", "displayName"})
_CALL_FIELDS = frozenset({"id", "name", "args"})
_RESPONSE_FIELDS = frozenset({"id", "name", "response", "parts", "willContinue", "scheduling"})
_MEDIA_FIELDS = frozenset({"level"})
_MEDIA_LEVELS = frozenset(
    {
        "MEDIA_RESOLUTION_UNSPECIFIED",
        "MEDIA_RESOLUTION_LOW",
        "MEDIA_RESOLUTION_MEDIUM",
        "MEDIA_RESOLUTION_HIGH",
        "MEDIA_RESOLUTION_ULTRA_HIGH",
    }
)
_TOOL_FIELDS = frozenset(
    {
        "functionDeclarations",
        "googleSearch",
        "googleSearchRetrieval",
        "codeExecution",
        "urlContext",
        "computerUse",
        "fileSearch",
        "googleMaps",
    }
)
_DECLARATION_FIELDS = frozenset(
    {
        "name",
        "description",
        "parameters",
        "parametersJsonSchema",
        "response",
        "responseJsonSchema",
        "behavior",
    }
)
_TOOL_CONFIG_FIELDS = frozenset({"functionCallingConfig", "retrievalConfig"})
_CALLING_FIELDS = frozenset({"mode", "allowedFunctionNames"})
_CALLING_MODES = frozenset({"MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"})
_GENERATION_FIELDS = frozenset(
    {
        "stopSequences",
        "responseMimeType",
        "responseSchema",
        "responseJsonSchema",
        "responseModalities",
        "candidateCount",
        "maxOutputTokens",
        "temperature",
        "topP",
        "topK",
        "seed",
        "presencePenalty",
        "frequencyPenalty",
        "responseLogprobs",
        "logprobs",
        "enableEnhancedCivicAnswers",
        "speechConfig",
        "thinkingConfig",
        "imageConfig",
        "mediaResolution",
    }
)
_MIME_TYPES = frozenset({"text/plain", "application/json", "text/x.enum"})
_FUNCTION_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")


class _Invalid(Exception):
    """A request the real API would refuse with 400 INVALID_ARGUMENT."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def _camel(key: str) -> str:
    """The lowerCamelCase name of a proto JSON field (both spellings are accepted)."""
    head, *rest = key.split("_")
    return head + "".join(word[:1].upper() + word[1:] for word in rest)


def _fields(obj: object, where: str, known: frozenset[str]) -> dict[str, Any]:
    """`obj` with its keys in lowerCamelCase; unknown names refused like the proto parser."""
    if not isinstance(obj, dict):
        raise _Invalid(f"Invalid value at '{where}' ({type(obj).__name__}), expected a JSON object.", where)
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = _camel(str(key))
        if name not in known:
            raise _Invalid(
                f"Invalid JSON payload received. Unknown name \"{key}\" at '{where}': Cannot find field.",
                where,
            )
        out[name] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_bytes(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise _Invalid(f"Invalid value at '{where}' (TYPE_BYTES), expected a base64 string.", where)
    try:
        base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
    except (binascii.Error, ValueError):
        raise _Invalid(f"Invalid value at '{where}' (TYPE_BYTES), Base64 decoding failed.", where) from None


def _check_part(part: object, where: str) -> None:
    fields = _fields(part, where, _PART_FIELDS)
    present = [name for name in _PART_DATA if name in fields]
    if not present:
        raise _Invalid(f"* {where}: required oneof field 'data' must have one initialized field", where)
    if len(present) > 1:
        raise _Invalid(
            f"Invalid JSON payload received. Oneof field 'data' is already set at '{where}'.", where
        )
    if "text" in fields and not isinstance(fields["text"], str):
        raise _Invalid(f"Invalid value at '{where}.text' (TYPE_STRING)", f"{where}.text")
    if "inlineData" in fields:
        blob = _fields(fields["inlineData"], f"{where}.inline_data", _BLOB_FIELDS)
        if not isinstance(blob.get("mimeType"), str) or not blob["mimeType"]:
            raise _Invalid(f"* {where}.inline_data.mime_type: must be specified", where)
        _check_bytes(blob.get("data"), f"{where}.inline_data.data")
    if "fileData" in fields:
        file_data = _fields(fields["fileData"], f"{where}.file_data", _FILE_FIELDS)
        if not isinstance(file_data.get("fileUri"), str) or not file_data["fileUri"]:
            raise _Invalid(f"* {where}.file_data.file_uri: must be specified", where)
    if "functionCall" in fields:
        call = _fields(fields["functionCall"], f"{where}.function_call", _CALL_FIELDS)
        if not isinstance(call.get("name"), str) or not call["name"]:
            raise _Invalid(f"* {where}.function_call.name: Name cannot be empty.", where)
        if "args" in call and not isinstance(call["args"], dict):
            raise _Invalid(f"Invalid value at '{where}.function_call.args' (google.protobuf.Struct)")
    if "functionResponse" in fields:
        response = _fields(fields["functionResponse"], f"{where}.function_response", _RESPONSE_FIELDS)
        if not isinstance(response.get("name"), str) or not response["name"]:
            raise _Invalid(f"* {where}.function_response.name: Name cannot be empty.", where)
        if not isinstance(response.get("response"), dict):
            raise _Invalid(f"Invalid value at '{where}.function_response.response' (google.protobuf.Struct)")
    if "thoughtSignature" in fields:
        _check_bytes(fields["thoughtSignature"], f"{where}.thought_signature")
    if "thought" in fields and not isinstance(fields["thought"], bool):
        raise _Invalid(f"Invalid value at '{where}.thought' (TYPE_BOOL)")
    if "mediaResolution" in fields:
        media = _fields(fields["mediaResolution"], f"{where}.media_resolution", _MEDIA_FIELDS)
        if media.get("level") not in _MEDIA_LEVELS:
            raise _Invalid(
                f"Invalid value at '{where}.media_resolution.level' (type.googleapis.com/MediaResolution)"
            )


def _check_content(content: object, where: str, *, system: bool = False) -> list[Any]:
    fields = _fields(content, where, _CONTENT_FIELDS)
    role = fields.get("role")
    if not system and role not in (None, "", "user", "model"):
        raise _Invalid("Please use a valid role: user, model.", f"{where}.role")
    parts = fields.get("parts")
    if not isinstance(parts, list) or not parts:
        raise _Invalid(f"* GenerateContentRequest.{where}.parts: contents.parts must not be empty.", where)
    for i, part in enumerate(parts):
        _check_part(part, f"{where}.parts[{i}]")
    return parts


def _check_tools(tools: object) -> list[tuple[str, object]]:
    if not isinstance(tools, list):
        raise _Invalid("Invalid value at 'tools', expected a list.", "tools")
    declared: list[tuple[str, object]] = []
    for i, tool in enumerate(tools):
        fields = _fields(tool, f"tools[{i}]", _TOOL_FIELDS)
        declarations = fields.get("functionDeclarations", [])
        if not isinstance(declarations, list):
            raise _Invalid(f"Invalid value at 'tools[{i}].function_declarations', expected a list.")
        for j, declaration in enumerate(declarations):
            where = f"tools[{i}].function_declarations[{j}]"
            decl = _fields(declaration, where, _DECLARATION_FIELDS)
            name = decl.get("name")
            if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
                raise _Invalid(
                    f"* GenerateContentRequest.{where}.name: Invalid function name. Must start with a letter "
                    "or an underscore. Must be alphameric (a-z, A-Z, 0-9), underscores (_), dots (.), colons "
                    "(:), or dashes (-), with a maximum length of 128.",
                    f"{where}.name",
                )
            if "parameters" in decl and "parametersJsonSchema" in decl:
                raise _Invalid(
                    f"* GenerateContentRequest.{where}: parameters and parameters_json_schema are mutually "
                    "exclusive.",
                    where,
                )
            schema = decl.get("parametersJsonSchema", decl.get("parameters"))
            if schema is not None and not isinstance(schema, dict):
                raise _Invalid(f"Invalid value at '{where}.parameters_json_schema', expected an object.")
            declared.append((name, _lower_types(schema) if "parameters" in decl else schema))
    return declared


def _check_tool_config(config: object, names: list[str]) -> str | None:
    """The engine's tool choice for `toolConfig`."""
    fields = _fields(config, "tool_config", _TOOL_CONFIG_FIELDS)
    calling = fields.get("functionCallingConfig")
    if calling is None:
        return None
    calling_fields = _fields(calling, "tool_config.function_calling_config", _CALLING_FIELDS)
    mode = calling_fields.get("mode", "MODE_UNSPECIFIED")
    if mode not in _CALLING_MODES:
        raise _Invalid(
            f"Invalid value at 'tool_config.function_calling_config.mode' (type.googleapis.com/"
            f'google.ai.generativelanguage.v1beta.FunctionCallingConfig.Mode), "{mode}"'
        )
    allowed = calling_fields.get("allowedFunctionNames", [])
    if not isinstance(allowed, list) or not all(isinstance(n, str) for n in allowed):
        raise _Invalid("Invalid value at 'tool_config.function_calling_config.allowed_function_names'.")
    if allowed and mode not in ("ANY", "VALIDATED"):
        raise _Invalid(
            "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: "
            "allowed_function_names is only allowed when function calling mode is ANY or VALIDATED."
        )
    for name in allowed:
        if name not in names:
            raise _Invalid(
                "* GenerateContentRequest.tool_config.function_calling_config.allowed_function_names: "
                f"function name {name} is not found in the function declarations."
            )
    if mode == "NONE":
        return "none"
    if mode == "ANY":
        return str(allowed[0]) if allowed else "required"
    return "auto"


def _check_generation(config: object) -> dict[str, Any]:
    fields = _fields(config, "generation_config", _GENERATION_FIELDS)
    for name in ("maxOutputTokens", "candidateCount", "topK", "seed"):
        if name in fields and not _is_int(fields[name]):
            raise _Invalid(f"Invalid value at 'generation_config.{name}' (TYPE_INT32)")
    for name in ("temperature", "topP", "presencePenalty", "frequencyPenalty"):
        if name in fields and not _is_number(fields[name]):
            raise _Invalid(f"Invalid value at 'generation_config.{name}' (TYPE_FLOAT)")
    if "seed" in fields and not _INT32[0] <= fields["seed"] <= _INT32[1]:
        raise _Invalid("Invalid value at 'generation_config.seed' (TYPE_INT32), out of range")
    if "temperature" in fields and not 0 <= fields["temperature"] <= 2:
        raise _Invalid(
            "* GenerateContentRequest.generation_config.temperature: temperature must be between 0 and 2."
        )
    if "topP" in fields and not 0 <= fields["topP"] <= 1:
        raise _Invalid("* GenerateContentRequest.generation_config.top_p: top_p must be between 0 and 1.")
    stops = fields.get("stopSequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _Invalid("Invalid value at 'generation_config.stop_sequences', expected a list of strings.")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise _Invalid(
            "* GenerateContentRequest.generation_config.stop_sequences: the number of stop sequences "
            f"must not exceed {MAX_STOP_SEQUENCES}."
        )
    mime = fields.get("responseMimeType")
    if mime is not None and mime not in _MIME_TYPES:
        raise _Invalid(
            "* GenerateContentRequest.generation_config.response_mime_type: allowed mimetypes are "
            "`text/plain`, `application/json`, `application/xml`, `application/yaml` and `text/x.enum`."
        )
    if "responseSchema" in fields and "responseJsonSchema" in fields:
        raise _Invalid(
            "* GenerateContentRequest.generation_config: response_schema and response_json_schema are "
            "mutually exclusive."
        )
    if ("responseSchema" in fields or "responseJsonSchema" in fields) and mime not in (
        "application/json",
        "text/x.enum",
    ):
        raise _Invalid(
            "* GenerateContentRequest.generation_config.response_mime_type: response_mime_type must be "
            "application/json or text/x.enum when a response schema is set."
        )
    return fields


def _lower_types(schema: object) -> object:
    """Google's OpenAPI-subset schema ("type": "OBJECT") as plain JSON Schema."""
    if isinstance(schema, list):
        return [_lower_types(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: value.lower() if key == "type" and isinstance(value, str) else _lower_types(value)
        for key, value in schema.items()
    }


def _part_tokens(part: Mapping[str, Any]) -> int:
    text = part.get("text")
    if isinstance(text, str):
        return approx_text_tokens(text)
    for key in ("functionCall", "function_call", "functionResponse", "function_response"):
        value = part.get(key)
        if isinstance(value, dict):
            return approx_text_tokens(orjson.dumps(value).decode())
    return IMAGE_TOKENS


def prompt_tokens(body: Mapping[str, Any]) -> int:
    """Deterministic prompt-token estimate (see the module docstring)."""
    total = 0
    contents = list(body.get("contents") or [])
    system = body.get("systemInstruction") or body.get("system_instruction")
    if isinstance(system, dict):
        contents.append(system)
    for content in contents:
        parts = content.get("parts") if isinstance(content, dict) else None
        for part in parts if isinstance(parts, list) else ():
            if isinstance(part, dict):
                total += _part_tokens(part)
    tools = body.get("tools")
    if tools:
        total += approx_text_tokens(orjson.dumps(tools).decode())
    return max(1, total)


def _check_signatures(contents: list[Any]) -> None:
    """Gemini 3's rule: in the current turn (the model steps after the last user message
    that is not only function responses), the first function call of each step carries
    a `thoughtSignature`."""
    start = 0
    for i, content in enumerate(contents):
        parts = content.get("parts") or []
        if content.get("role") != "model" and any(
            "functionResponse" not in part and "function_response" not in part for part in parts
        ):
            start = i + 1
    for i in range(start, len(contents)):
        content = contents[i]
        if content.get("role") != "model":
            continue
        for j, part in enumerate(content.get("parts") or []):
            call = part.get("functionCall") or part.get("function_call")
            if call is None:
                continue
            if not (part.get("thoughtSignature") or part.get("thought_signature")):
                raise _Invalid(
                    "Function call is missing a thought_signature in functionCall parts. This is required "
                    "for tools to work correctly, and missing thought_signature may lead to degraded model "
                    f"performance. Additional data, function call `default_api:{call.get('name')}` , "
                    f"position {j + 1}. Please refer to "
                    "https://ai.google.dev/gemini-api/docs/thought-signatures for more details.",
                    f"contents[{i}].parts[{j}]",
                )
            break  # only a step's first call is signed


def validate(
    body: object, model: str = ""
) -> tuple[dict[str, Any], list[tuple[str, object]], str | None, dict[str, Any]]:
    """The request's fields, declared functions, tool choice and generation config, or
    `_Invalid` for what the real API refuses."""
    if not isinstance(body, dict):
        raise _Invalid("Invalid JSON payload received. Expected an object.")
    fields = _fields(body, "GenerateContentRequest", _TOP_FIELDS)
    contents = fields.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _Invalid("* GenerateContentRequest.contents: contents is not specified", "contents")
    for i, content in enumerate(contents):
        _check_content(content, f"contents[{i}]")
    if model.startswith("gemini-3"):
        _check_signatures(contents)
    if "systemInstruction" in fields:
        _check_content(fields["systemInstruction"], "system_instruction", system=True)
    declared = _check_tools(fields["tools"]) if "tools" in fields else []
    choice = None
    if "toolConfig" in fields:
        choice = _check_tool_config(fields["toolConfig"], [name for name, _ in declared])
    generation = _check_generation(fields["generationConfig"]) if "generationConfig" in fields else {}
    return fields, declared, choice, generation


# --------------------------------------------------------------------------- #
# the dialect
# --------------------------------------------------------------------------- #


def _signature() -> str:
    return base64.b64encode(new_id("sig", 45).encode()).decode()


def _finish(answer: Answer) -> str:
    return {"stop": "STOP", "length": "MAX_TOKENS", "tool_calls": "STOP"}.get(answer.finish, answer.finish)


def usage_metadata(answer: Answer, *, visible_tokens: int | None = None) -> dict[str, object]:
    """Gemini's `usageMetadata` for an answer (or for the part of it streamed so far)."""
    candidates = answer.visible_tokens if visible_tokens is None else visible_tokens
    usage: dict[str, object] = {
        "promptTokenCount": answer.prompt_tokens,
        "candidatesTokenCount": candidates,
        "totalTokenCount": answer.prompt_tokens + candidates + answer.reasoning_tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": answer.prompt_tokens}],
    }
    if answer.cached_tokens:
        usage["cachedContentTokenCount"] = answer.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": answer.cached_tokens}]
    if answer.reasoning_tokens:
        usage["thoughtsTokenCount"] = answer.reasoning_tokens
    return usage


class GeminiDialect(Dialect):
    """The Generative Language API as Google speaks it."""

    request_id_prefix = ""
    request_id_length = 23

    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        if self.api_key is None:
            return None
        presented = request.headers.get("x-goog-api-key") or request.query.get("key")
        if presented == self.api_key:
            return None
        if not presented:
            return Reply(403, _error(403, "PERMISSION_DENIED", _NO_API_KEY))
        return Reply(400, _api_key_invalid())

    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        target = ctx.request.match_info.get("target", "")
        model, _, action = target.partition(":")
        if action not in ("generateContent", "streamGenerateContent"):
            return Reply(404, _error(404, "NOT_FOUND", f"Method not found: {action or target}."))
        stream = action == "streamGenerateContent"
        if stream and ctx.request.query.get("alt") != "sse":
            # The real API then streams a JSON array; this simulator speaks SSE only.
            return Reply(400, _bad_request("This simulator streams with alt=sse only.", "alt"))
        if body is None:
            return Reply(400, _bad_request("Invalid JSON payload received. Unexpected token."))
        name = model.removeprefix("models/")
        try:
            fields, declared, choice, generation = validate(body, name)
        except _Invalid as exc:
            return Reply(400, _bad_request(exc.message, exc.field))
        json_mode: Literal["object", "schema"] | None = None
        json_schema: object = None
        if generation.get("responseMimeType") == "application/json":
            if "responseJsonSchema" in generation:
                json_mode, json_schema = "schema", generation["responseJsonSchema"]
            elif "responseSchema" in generation:
                json_mode, json_schema = "schema", _lower_types(generation["responseSchema"])
            else:
                json_mode = "object"
        limit = generation.get("maxOutputTokens")
        thinking = generation.get("thinkingConfig")
        include_thoughts = isinstance(thinking, dict) and (
            thinking.get("includeThoughts") is True or thinking.get("include_thoughts") is True
        )
        ctx.response_id = new_id("", 23)
        return ChatCall(
            model=name,
            stream=stream,
            prompt_tokens=prompt_tokens(fields),
            seed=seed_bytes(fields["contents"]),
            tools=tuple(ToolSpec(tool_name, schema) for tool_name, schema in declared),
            tool_choice=choice,
            json_mode=json_mode,
            json_schema=json_schema,
            max_tokens=limit
            if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0
            else None,
            extra={"include_thoughts": include_thoughts, "signed": name.startswith("gemini-3")},
        )

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        return Reply(status, self._error_body(status, knobs, call))

    def _error_body(self, status: int, knobs: FaultKnobs, call: ChatCall | None) -> dict[str, object]:
        return error_body(
            status,
            code=knobs.error_code,
            message=knobs.error_message,
            model=call.model if call is not None else "gemini-2.5-flash",
            retry_after_s=knobs.retry_after_s,
        )

    def knob_error(self, message: str, knob: str | None) -> Reply:
        return Reply(400, _bad_request(message, knob))

    def retry_headers(self, retry_after_s: float) -> dict[str, str]:
        # Gemini says when to come back in the body's RetryInfo, never in a header.
        return {}

    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        # No rate-limit or request-id headers: Gemini sends neither.
        return {
            "server": "scaffolding on HTTPServer2",
            "server-timing": f"gfet4t7; dur={ctx.elapsed_ms()}",
            "x-content-type-options": "nosniff",
        }

    def _response(
        self, call: ChatCall, ctx: CallContext, parts: list[object] | None, usage: object, finish: str | None
    ) -> dict[str, object]:
        candidate: dict[str, object] = {"content": {"parts": parts or [], "role": "model"}, "index": 0}
        if parts is None:
            candidate["content"] = {"role": "model"}
        if finish is not None:
            candidate["finishReason"] = finish
        return {
            "candidates": [candidate],
            "usageMetadata": usage,
            "modelVersion": call.model,
            "responseId": ctx.response_id,
        }

    def _call_part(self, call: ChatCall, answer: Answer) -> dict[str, object]:
        part: dict[str, object] = {
            "functionCall": {"name": answer.tool_name, "args": orjson.loads(answer.tool_arguments or "{}")}
        }
        if call.extra.get("signed"):
            part["thoughtSignature"] = _signature()
        return part

    def _thought_part(self, call: ChatCall, answer: Answer) -> dict[str, object] | None:
        if not call.extra.get("include_thoughts") or not answer.reasoning_tokens:
            return None
        return {"text": "**Thinking** " + deterministic_text(call.seed + b"thought", 6, 10), "thought": True}

    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        parts: list[object] = []
        thought = self._thought_part(call, answer)
        if thought is not None:
            parts.append(thought)
        if answer.tool_name is not None:
            parts.append(self._call_part(call, answer))
        elif answer.text:
            parts.append({"text": answer.text})
        return self._response(call, ctx, parts or None, usage_metadata(answer), _finish(answer))

    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        def frame(obj: object) -> bytes:
            return b"data: " + orjson.dumps(obj) + _FRAME_END

        frames: list[bytes] = []
        thought = self._thought_part(call, answer)
        if thought is not None:
            frames.append(
                frame(self._response(call, ctx, [thought], usage_metadata(answer, visible_tokens=0), None))
            )
        final = usage_metadata(answer)
        if answer.tool_name is not None:
            # A function call is never split: one part, and the turn ends with it.
            frames.append(
                frame(self._response(call, ctx, [self._call_part(call, answer)], final, _finish(answer)))
            )
            return frames
        pieces = answer.text_pieces(chunks)
        if not pieces:
            frames.append(frame(self._response(call, ctx, None, final, _finish(answer))))
            return frames
        sent = ""
        for i, piece in enumerate(pieces):
            sent += piece
            last = i == len(pieces) - 1
            usage = final if last else usage_metadata(answer, visible_tokens=approx_text_tokens(sent))
            frames.append(
                frame(self._response(call, ctx, [{"text": piece}], usage, _finish(answer) if last else None))
            )
        return frames

    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        return b"data: " + orjson.dumps(self._error_body(status, knobs, call)) + _FRAME_END

    def malformed(self, ctx: CallContext) -> bytes:
        return b'data: {"candidates": [{"content": {"parts": [{"text": "' + _FRAME_END

    # -- models ----------------------------------------------------------------
    async def list_models(self, request: web.Request) -> web.Response:
        """`GET /v1beta/models` with `pageSize` and `pageToken`."""
        headers, refused = self.start_read(request)
        if refused is not None:
            return refused
        try:
            size = int(request.query.get("pageSize", DEFAULT_PAGE_SIZE))
            start = int(request.query.get("pageToken") or 0)
        except ValueError:
            return json_reply(400, _bad_request("Invalid page size or token."), headers)
        size = DEFAULT_PAGE_SIZE if size <= 0 else min(size, 1000)
        page = MODELS[start : start + size]
        body: dict[str, object] = {"models": [_model_obj(m) for m in page]}
        if start + size < len(MODELS):
            body["nextPageToken"] = str(start + size)
        return json_reply(200, body, headers)

    async def get_model(self, request: web.Request) -> web.Response:
        """`GET /v1beta/models/{model}`."""
        headers, refused = self.start_read(request)
        if refused is not None:
            return refused
        wanted = request.match_info["target"]
        if wanted not in MODELS:
            message = f"models/{wanted} is not found for API version v1beta."
            return json_reply(404, _error(404, "NOT_FOUND", message), headers)
        return json_reply(200, _model_obj(wanted), headers)


def _model_obj(model: str) -> dict[str, object]:
    return {
        "name": f"models/{model}",
        "version": "001",
        "displayName": model.replace("-", " ").title(),
        "description": f"Simulated {model}.",
        "inputTokenLimit": MAX_INPUT_TOKENS,
        "outputTokenLimit": MAX_OUTPUT_TOKENS,
        "supportedGenerationMethods": ["generateContent", "countTokens", "createCachedContent"],
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": not model.startswith("gemini-2.0"),
    }


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The Gemini simulator application.

    `knobs` are the start-up (and `DELETE /_sim/knobs` reset) knobs; with `api_key` set,
    API requests must send `x-goog-api-key: <api_key>` (or `?key=`).
    """
    dialect = GeminiDialect(api_key)
    # `{target}` is `<model>:<action>`: aiohttp cannot split a variable from a literal
    # `:action` suffix, so the dialect splits it.
    return build_simulator_app(
        dialect,
        knobs,
        [API_PREFIX + "/models/{target}"],
        {
            ("GET", API_PREFIX + "/models"): dialect.list_models,
            ("GET", API_PREFIX + "/models/{target}"): dialect.get_model,
        },
    )
