"""OpenAI Chat Completions and Embeddings simulator (aiohttp).

Speaks the documented ``/v1/chat/completions`` wire format -- JSON and SSE
streaming -- and ``/v1/embeddings`` closely enough that the official ``openai``
SDK parses it, with :class:`~switchyard.sim.faults.FaultKnobs` to inject latency
and failures.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/embeddings``,
``GET /v1/models``, ``GET /v1/models/{model}`` and the ``/_sim/*`` control
endpoints (see :func:`switchyard.sim.faults.add_control_routes`).

Wire-format notes (what the real API does, mirrored here):

* Errors are ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
  status; 429s use ``type`` ``"requests"``/``"tokens"`` and code
  ``rate_limit_exceeded`` (or type+code ``insufficient_quota``).
* Streams are ``data: <chunk json>\\n\\n`` events ending with ``data: [DONE]``.
  The first chunk carries ``delta.role = "assistant"``; the last choice chunk
  has an empty delta and the ``finish_reason``. With
  ``stream_options.include_usage`` every chunk has ``"usage": null`` and one
  extra chunk with ``"choices": []`` and the usage precedes ``[DONE]``.
* Streamed tool calls: the first delta has ``tool_calls[0]`` with ``index``,
  ``id``, ``type`` and ``function.name`` and ``arguments: ""``; later deltas
  carry only ``index`` and ``function.arguments`` fragments.
* An error after the stream started is sent as ``data: {"error": {...}}`` (no
  ``event:`` line) and the stream then ends without ``[DONE]``; the SDK raises
  ``openai.APIError`` for it.
* Every chat response carries ``x-request-id``, ``openai-processing-ms``,
  ``openai-version`` and the ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}``
  headers (resets as Go durations: ``"6ms"``, ``"1s"``, ``"6m0s"``).

Token accounting is a deterministic approximation, not a tokenizer:
``prompt_tokens = 3 + sum over messages of (3 + ceil(chars / 4))`` where chars
counts text content (string or text parts), ``name`` and tool-call names and
arguments, and every non-text content part counts 85 tokens;
``completion_tokens = ceil(len(answer) / 4) + reasoning_tokens`` (for a tool
call, the answer is its name plus its arguments JSON). ``max_tokens`` /
``max_completion_tokens`` truncate the answer to ``4 * N`` characters with
finish_reason ``length``.

Embeddings (``POST /v1/embeddings``):

* Request ``{"model", "input", "encoding_format"?, "dimensions"?, "user"?}``.
  ``input`` is a string, a list of strings, a token array (list of ints) or a
  list of token arrays; a token array is embedded as the text of its ids joined
  by spaces. At most 2048 inputs, each at most 8192 tokens, 300,000 in all.
  ``model`` must be one of :data:`EMBEDDING_MODELS` (404 ``model_not_found``
  otherwise, as for ``GET /v1/models/{model}``); chat accepts any model name.
  ``dimensions`` (>= 1, at most the model's size) only for ``text-embedding-3-*``.
* Invalid requests are 400 ``invalid_request_error`` with ``param`` naming the
  field. An empty string, an empty list or an empty token array is refused with
  the real API's ``'$.input' is invalid`` message (where the real API sends
  ``param: null`` for that and for "This model does not support specifying
  dimensions.", the simulator names the field).
* Response ``{"object": "list", "data": [{"object": "embedding", "index",
  "embedding"}], "model", "usage": {"prompt_tokens", "total_tokens"}}``; the
  embedding is a list of float32 values or, with ``encoding_format: "base64"``
  (what the SDK asks for by default), the base64 of their little-endian bytes.
* Vectors (:func:`embedding_vector`) are deterministic feature hashing, mildly
  semantic: every lower-cased word adds +-1 at a blake2b-chosen index, every
  character 3-gram of the space-padded word adds +-0.2, the sum is
  L2-normalised and rounded to float32. The same text always gets the same
  vector (whatever the model); texts sharing most words have a high cosine
  similarity, texts sharing none a low one. A shortened vector (``dimensions``)
  is hashed into that many dimensions, so it is not a prefix of the full one.
* Tokens (:func:`embedding_tokens`) are counted, not tokenized: every word
  (``\\w+``) and every other non-space character is one token, at least one per
  input; a token array counts its length.
* The request is one API call for the engine, like a chat request: it consumes
  knobs (``x-sim-knobs``, script entries), counts in ``/_sim/stats`` and the
  rate-limit window (with its prompt tokens), and ``status``,
  ``retry_after_s``, ``first_byte_delay_ms``, ``drop_after_chunks`` and the
  error overrides apply as for a non-streamed chat request.
"""

from __future__ import annotations

import base64
import hashlib
import math
import re
import sys
from array import array
from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from aiohttp import web

from switchyard.sim.engine import (
    Answer,
    CallContext,
    ChatCall,
    ChatEngine,
    Dialect,
    Reply,
    ToolSpec,
    build_simulator_app,
    json_reply,
    new_id,
    sse,
)
from switchyard.sim.faults import (
    CONTROL_KEY,
    FaultKnobs,
    RateLimitSnapshot,
    RunningSimulator,
    approx_text_tokens,
    seed_bytes,
    start_simulator,
)

__all__ = [
    "API_PREFIX",
    "EMBEDDING_MODELS",
    "MODELS",
    "RunningSimulator",
    "build_app",
    "embedding_tokens",
    "embedding_vector",
    "error_body",
    "prompt_tokens",
    "start_simulator",
]

#: Path prefix of the API (the SDK ``base_url`` is ``http://host:port/v1``).
API_PREFIX = "/v1"

#: Models listed by ``GET /v1/models`` (any model name is accepted for chat).
MODELS: tuple[str, ...] = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "gpt-4.1-nano",
    "o3-mini",
    "o4-mini",
)

#: Embedding models served by ``POST /v1/embeddings`` (and listed), with their vector sizes.
EMBEDDING_MODELS: Final[Mapping[str, int]] = {
    "text-embedding-3-small": 1536,
    "text-embedding-3-large": 3072,
    "text-embedding-ada-002": 1536,
}
#: Embedding limits of the real API: tokens per input, inputs and tokens per request.
EMBEDDING_MAX_INPUT_TOKENS = 8192
EMBEDDING_MAX_INPUTS = 2048
EMBEDDING_MAX_REQUEST_TOKENS = 300_000

SYSTEM_FINGERPRINT = "fp_5w1tchy4rd"
MAX_CONTEXT_TOKENS = 128_000
OPENAI_VERSION = "2020-10-01"
_ORG = "org-switchyard-sim"

# --------------------------------------------------------------------------- #
# error bodies
# --------------------------------------------------------------------------- #

_SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"

#: status -> (type, code, message template)
_STATUS_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated error)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Incorrect API key provided: {key}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
    ),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    429: (
        "requests",
        "rate_limit_exceeded",
        "Rate limit reached for {model} in organization " + _ORG + " on requests per min (RPM): "
        "Limit {limit}, Used {limit}, Requested 1. Please try again in {retry}. "
        "Visit https://platform.openai.com/account/rate-limits to learn more.",
    ),
    500: ("server_error", None, _SERVER_ERROR_MESSAGE),
    503: (
        "service_unavailable_error",
        "server_is_overloaded",
        "Our servers are currently overloaded. Please try again later.",
    ),
}

#: code -> (type, param, message template); used when ``error_code`` names one.
_CODE_ERRORS: dict[str, tuple[str, str | None, str]] = {
    "context_length_exceeded": (
        "invalid_request_error",
        "messages",
        "This model's maximum context length is " + str(MAX_CONTEXT_TOKENS) + " tokens. However, your "
        "messages resulted in {prompt_tokens} tokens. "
        "Please reduce the length of the messages.",
    ),
    "insufficient_quota": (
        "insufficient_quota",
        None,
        "You exceeded your current quota, please check your plan and billing details. "
        "For more "
        "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
    ),
    "rate_limit_exceeded": ("requests", None, _STATUS_ERRORS[429][2]),
    "invalid_api_key": ("invalid_request_error", None, _STATUS_ERRORS[401][2]),
    "model_not_found": ("invalid_request_error", None, _STATUS_ERRORS[404][2]),
    "server_is_overloaded": ("service_unavailable_error", None, _STATUS_ERRORS[503][2]),
}


def error_body(
    status: int,
    *,
    code: str | None = None,
    message: str | None = None,
    model: str = "gpt-4o",
    prompt_tokens: int = 0,
    retry_after_s: float | None = None,
    limit_requests: int = 10_000,
    api_key: str = "sk-sim",
) -> dict[str, object]:
    """OpenAI's JSON error body for ``status``.

    ``code`` overrides the error code (known codes such as
    ``context_length_exceeded`` also bring their own type, param and message);
    ``message`` overrides the text.
    """
    if status in _STATUS_ERRORS:
        err_type, err_code, template = _STATUS_ERRORS[status]
    elif status < 500:
        err_type, err_code, template = (
            "invalid_request_error",
            None,
            f"Simulated HTTP {status} error.",
        )
    else:
        err_type, err_code, template = "server_error", None, _SERVER_ERROR_MESSAGE
    param: str | None = None
    if code is not None:
        err_code = code
        if code in _CODE_ERRORS:
            err_type, param, template = _CODE_ERRORS[code]
    if message is None:
        retry = f"{retry_after_s:g}s" if retry_after_s is not None else "1s"
        message = template.format(
            model=model,
            prompt_tokens=prompt_tokens,
            retry=retry,
            limit=limit_requests,
            key=_mask_key(api_key),
        )
    return {
        "error": {
            "message": message,
            "type": err_type,
            "param": param,
            "code": err_code,
        }
    }


def _mask_key(key: str) -> str:
    if len(key) <= 8:
        return key[:2] + "*" * max(0, len(key) - 2)
    return key[:3] + "*" * (len(key) - 7) + key[-4:]


def _invalid(message: str, param: str | None, code: str | None) -> dict[str, object]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": code,
        }
    }


_BAD_JSON = _invalid(
    "We could not parse the JSON body of your request. (HINT: This likely means you "
    "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, "
    "but what was sent was not valid JSON. If you have trouble figuring out how to "
    "fix this, please contact us through our help center at help.openai.com.)",
    None,
    None,
)
_NO_API_KEY = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer "
    "auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from "
    "https://platform.openai.com/account/api-keys."
)

# --------------------------------------------------------------------------- #
# request helpers
# --------------------------------------------------------------------------- #


def _content_tokens(content: object) -> int:
    if isinstance(content, str):
        return approx_text_tokens(content)
    if isinstance(content, list):
        total = 0
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            total += approx_text_tokens(text) if isinstance(text, str) else 85
        return total
    return 0


def prompt_tokens(messages: list[Any]) -> int:
    """Deterministic prompt-token estimate.

    ``3 + sum(3 + ceil(chars / 4))`` over the messages (see the module docstring).
    """
    total = 3
    for message in messages:
        total += 3
        if not isinstance(message, dict):
            continue
        total += _content_tokens(message.get("content"))
        name = message.get("name")
        if isinstance(name, str):
            total += approx_text_tokens(name)
        tool_calls = message.get("tool_calls")
        if isinstance(tool_calls, list):
            for call in tool_calls:
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict):
                    total += approx_text_tokens(str(fn.get("name", "")) + str(fn.get("arguments", "")))
    return total


def _tools(body: Mapping[str, Any]) -> tuple[ToolSpec, ...]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return ()
    return tuple(
        ToolSpec(str(t["function"].get("name", "")), t["function"].get("parameters"))
        for t in tools
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
    )


def _tool_choice(choice: object) -> str | None:
    """`none` / `auto` / `required`, or the name a `{"type": "function", ...}` choice forces."""
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        return str(name) if name else "required"
    return choice if isinstance(choice, str) else None


def _json_mode(body: Mapping[str, Any]) -> tuple[Literal["object", "schema"] | None, object]:
    fmt = body.get("response_format")
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        return "schema", spec.get("schema") if isinstance(spec, dict) else None
    if kind == "json_object":
        return "object", None
    return None, None


def _validate(body: Mapping[str, Any]) -> dict[str, object] | None:
    """OpenAI-style 400 body for an invalid request, else None."""
    model = body.get("model")
    if model is None:
        return _invalid("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        return _invalid(
            f"Invalid type for 'model': expected a non-empty string, but got {type(model).__name__} instead.",
            "model",
            "invalid_type",
        )
    messages = body.get("messages")
    if messages is None:
        return _invalid("Missing required parameter: 'messages'.", "messages", "missing_required_parameter")
    if not isinstance(messages, list):
        return _invalid(
            f"Invalid type for 'messages': expected an array, but got {type(messages).__name__} instead.",
            "messages",
            "invalid_type",
        )
    if not messages:
        return _invalid(
            "Invalid 'messages': empty array. Expected an array with minimum length 1, "
            "but got an empty array instead.",
            "messages",
            "empty_array",
        )
    if body.get("stream_options") is not None and body.get("stream") is not True:
        return _invalid(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.", "stream_options", None
        )
    return None


def usage_object(answer: Answer) -> dict[str, object]:
    """OpenAI's `usage` object for an answer."""
    return {
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.output_tokens,
        "total_tokens": answer.prompt_tokens + answer.output_tokens,
        "prompt_tokens_details": {"cached_tokens": answer.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": answer.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


# --------------------------------------------------------------------------- #
# the dialect
# --------------------------------------------------------------------------- #


class OpenAIDialect(Dialect):
    """Chat Completions as OpenAI speaks it."""

    request_id_prefix = "req_"
    request_id_length = 32

    def __init__(self, api_key: str | None) -> None:
        super().__init__(api_key)
        self._expected_auth = f"Bearer {api_key}" if api_key is not None else None

    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        if self._expected_auth is None:
            return None
        header = request.headers.get("Authorization")
        if header == self._expected_auth:
            return None
        if not header:
            return Reply(401, _invalid(_NO_API_KEY, None, "invalid_api_key"))
        presented = header[7:] if header.startswith("Bearer ") else header
        return Reply(401, error_body(401, api_key=presented))

    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        if not isinstance(body, dict):
            return _not_an_object(body)
        problem = _validate(body)
        if problem is not None:
            return Reply(400, problem)
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        json_mode, json_schema = _json_mode(body)
        stream_options = body.get("stream_options")
        ctx.response_id = new_id("chatcmpl-", 29)
        return ChatCall(
            model=str(body["model"]),
            stream=body.get("stream") is True,
            prompt_tokens=prompt_tokens(body["messages"]),
            seed=seed_bytes(body.get("messages")),
            tools=_tools(body),
            tool_choice=_tool_choice(body.get("tool_choice")),
            json_mode=json_mode,
            json_schema=json_schema,
            max_tokens=limit
            if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0
            else None,
            extra={
                "include_usage": isinstance(stream_options, dict)
                and stream_options.get("include_usage") is True
            },
        )

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        return Reply(status, self._error_body(status, knobs, call))

    def _error_body(self, status: int, knobs: FaultKnobs, call: ChatCall | None) -> dict[str, object]:
        rl = knobs.ratelimit
        return error_body(
            status,
            code=knobs.error_code,
            message=knobs.error_message,
            model=call.model if call is not None else "gpt-4o",
            prompt_tokens=call.prompt_tokens if call is not None else 0,
            retry_after_s=knobs.retry_after_s,
            limit_requests=rl.limit_requests if rl is not None else 10_000,
            api_key=self.api_key or "sk-sim",
        )

    def knob_error(self, message: str, knob: str | None) -> Reply:
        return Reply(400, _invalid(message, knob, "invalid_sim_knobs"))

    def retry_headers(self, retry_after_s: float) -> dict[str, str]:
        # retry-after is whole seconds (HTTP); a fractional value is also sent exactly
        # as retry-after-ms, which the OpenAI SDKs prefer.
        headers = {"retry-after": str(math.ceil(retry_after_s))}
        if not float(retry_after_s).is_integer():
            headers["retry-after-ms"] = str(round(retry_after_s * 1000))
        return headers

    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        headers = {
            "x-request-id": ctx.request_id,
            "openai-organization": _ORG,
            "openai-processing-ms": str(ctx.elapsed_ms()),
            "openai-version": OPENAI_VERSION,
        }
        if snap is not None:
            headers["x-ratelimit-limit-requests"] = str(snap.limit_requests)
            headers["x-ratelimit-limit-tokens"] = str(snap.limit_tokens)
            headers["x-ratelimit-remaining-requests"] = str(snap.remaining_requests)
            headers["x-ratelimit-remaining-tokens"] = str(snap.remaining_tokens)
            headers["x-ratelimit-reset-requests"] = snap.reset_requests
            headers["x-ratelimit-reset-tokens"] = snap.reset_tokens
        return headers

    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        message: dict[str, object] = {
            "role": "assistant",
            "content": answer.text,
            "refusal": None,
            "annotations": [],
        }
        if answer.tool_name is not None:
            message["tool_calls"] = [
                {
                    "id": new_id("call_", 24),
                    "type": "function",
                    "function": {"name": answer.tool_name, "arguments": answer.tool_arguments},
                }
            ]
        return {
            "id": ctx.response_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}],
            "usage": usage_object(answer),
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }

    def _chunk(self, call: ChatCall, ctx: CallContext, choices: list[object]) -> dict[str, object]:
        return {
            "id": ctx.response_id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": call.model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        include_usage = bool(call.extra.get("include_usage"))

        def frame(delta: dict[str, object], finish: str | None = None) -> bytes:
            obj = self._chunk(
                call, ctx, [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
            )
            if include_usage:
                obj["usage"] = None
            return sse(obj)

        frames: list[bytes] = []
        if answer.tool_name is not None:
            header = {
                "index": 0,
                "id": new_id("call_", 24),
                "type": "function",
                "function": {"name": answer.tool_name, "arguments": ""},
            }
            frames.append(
                frame({"role": "assistant", "content": None, "tool_calls": [header], "refusal": None})
            )
            for fragment in answer.argument_pieces(chunks):
                frames.append(frame({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
        else:
            frames.append(frame({"role": "assistant", "content": "", "refusal": None}))
            for piece in answer.text_pieces(chunks):
                frames.append(frame({"content": piece}))
        frames.append(frame({}, answer.finish))
        if include_usage:
            frames.append(sse({**self._chunk(call, ctx, []), "usage": usage_object(answer)}))
        return frames

    def stream_end(self, call: ChatCall, ctx: CallContext) -> bytes:
        return b"data: [DONE]\n\n"

    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        # OpenAI sends a mid-stream error as a bare `data:` event (no `event:` line).
        return sse(self._error_body(status, knobs, call))

    def malformed(self, ctx: CallContext) -> bytes:
        return (
            b'data: {"id":"' + ctx.response_id.encode() + b'","object":"chat.completion.chunk",'
            b'"choices":[{"index":0,"delta":{"content":"\n\n'
        )

    async def models(self, request: web.Request) -> web.Response:
        """`GET /v1/models` and `GET /v1/models/{model}`."""
        headers, refused = self.start_read(request)
        if refused is not None:
            return refused
        wanted = request.match_info.get("model")
        listed = (*MODELS, *EMBEDDING_MODELS)
        if wanted is None:
            return json_reply(200, {"object": "list", "data": [_model_obj(m) for m in listed]}, headers)
        if wanted not in listed:
            return json_reply(404, error_body(404, model=wanted), headers)
        return json_reply(200, _model_obj(wanted), headers)


def _model_obj(model: str) -> dict[str, object]:
    return {"id": model, "object": "model", "created": 1_715_367_049, "owned_by": "system"}


# --------------------------------------------------------------------------- #
# embeddings
# --------------------------------------------------------------------------- #

#: Weight of each character 3-gram feature (a word feature weighs 1).
NGRAM_WEIGHT = 0.2
#: Largest token id of the real API's tokenizer (cl100k_base).
_MAX_TOKEN_ID = 100_257
_WORD_RE = re.compile(r"\w+")
_TOKEN_RE = re.compile(r"\w+|[^\w\s]")
_INVALID_INPUT = (
    "'$.input' is invalid. Please check the API reference: https://platform.openai.com/docs/api-reference."
)
_ENCODINGS = ("float", "base64")


def _feature_hash(feature: bytes) -> int:
    return int.from_bytes(
        hashlib.blake2b(feature, digest_size=8, person=b"switchyard-emb").digest(), "little"
    )


def _raw_vector(text: str, dimensions: int) -> list[float]:
    """The L2-normalised float64 vector of `text` (see the module docstring)."""
    vector = [0.0] * dimensions

    def add(feature: bytes, weight: float) -> None:
        h = _feature_hash(feature)
        vector[h % dimensions] += weight if (h >> 40) & 1 else -weight

    for word in _WORD_RE.findall(text.lower()):
        add(b"w\0" + word.encode(), 1.0)
        padded = f" {word} "
        for i in range(len(padded) - 2):
            add(b"g\0" + padded[i : i + 3].encode(), NGRAM_WEIGHT)
    norm = math.sqrt(math.fsum(v * v for v in vector))
    if norm < 1e-9:  # no words (or features that cancelled out): one text-specific axis
        vector = [0.0] * dimensions
        vector[_feature_hash(b"t\0" + text.encode()) % dimensions] = 1.0
        return vector
    return [v / norm for v in vector]


def _float32(vector: list[float]) -> array[float]:
    return array("f", vector)


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """The embedding the simulator sends for `text` with `dimensions` values: float32
    values (as Python floats) of unit L2 norm, the same for the same text every time."""
    if dimensions < 1:
        raise ValueError(f"dimensions must be >= 1, got {dimensions}")
    return _float32(_raw_vector(text, dimensions)).tolist()


def embedding_tokens(text: str) -> int:
    """Approximate token count of one text input: words (``\\w+``) plus other non-space
    characters, at least 1."""
    return max(1, len(_TOKEN_RE.findall(text)))


def _base64_vector(vector: array[float]) -> str:
    if sys.byteorder != "little":
        vector = array("f", vector)
        vector.byteswap()
    return base64.b64encode(vector.tobytes()).decode("ascii")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _token_array(value: list[Any]) -> str | None:
    """The text a non-empty token array stands for, None when it is not one."""
    if not value or not all(_is_int(t) and 0 <= t <= _MAX_TOKEN_ID for t in value):
        return None
    return " ".join(str(t) for t in value)


def _embedding_inputs(value: object) -> list[tuple[str, int]] | dict[str, object]:
    """(text, tokens) per input, or the 400 body for an invalid ``input``."""
    if value is None:
        return _invalid("Missing required parameter: 'input'.", "input", "missing_required_parameter")
    if isinstance(value, str):
        return [(value, embedding_tokens(value))] if value else _invalid(_INVALID_INPUT, "input", None)
    if not isinstance(value, list):
        return _invalid(
            f"Invalid type for 'input': expected a string or an array, but got {type(value).__name__} "
            "instead.",
            "input",
            "invalid_type",
        )
    if not value:
        return _invalid(_INVALID_INPUT, "input", None)
    inputs: list[tuple[str, int]]
    if all(isinstance(item, str) for item in value):
        if any(not item for item in value):
            return _invalid(_INVALID_INPUT, "input", None)
        inputs = [(item, embedding_tokens(item)) for item in value]
    elif all(_is_int(item) for item in value):
        text = _token_array(value)
        if text is None:
            return _invalid(_INVALID_INPUT, "input", None)
        inputs = [(text, len(value))]
    elif all(isinstance(item, list) for item in value):
        inputs = []
        for item in value:
            text = _token_array(item)
            if text is None:
                return _invalid(_INVALID_INPUT, "input", None)
            inputs.append((text, len(item)))
    else:
        return _invalid(_INVALID_INPUT, "input", None)
    if len(inputs) > EMBEDDING_MAX_INPUTS:
        return _invalid(
            f"Invalid 'input': array too long. Expected an array with maximum length "
            f"{EMBEDDING_MAX_INPUTS}, but got an array with length {len(inputs)} instead.",
            "input",
            "array_above_max_length",
        )
    return inputs


def _bad_request(message: str, param: str | None, code: str | None = None) -> Reply:
    return Reply(400, _invalid(message, param, code))


def _embedding_call(body: Mapping[str, Any]) -> ChatCall | Reply:
    """The embeddings request as a (never streamed) call, or its 400 / 404 reply."""
    model = body.get("model")
    if model is None:
        return _bad_request("Missing required parameter: 'model'.", "model", "missing_required_parameter")
    if not isinstance(model, str) or not model:
        got = type(model).__name__
        return _bad_request(
            f"Invalid type for 'model': expected a non-empty string, but got {got} instead.",
            "model",
            "invalid_type",
        )
    inputs = _embedding_inputs(body.get("input"))
    if isinstance(inputs, dict):
        return Reply(400, inputs)
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in _ENCODINGS:
        return _bad_request(
            f"Invalid value: {encoding!r}. Supported values are: 'float' and 'base64'.",
            "encoding_format",
            "invalid_value",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not _is_int(dimensions):
            got = type(dimensions).__name__
            return _bad_request(
                f"Invalid type for 'dimensions': expected an integer, but got {got} instead.",
                "dimensions",
                "invalid_type",
            )
        if dimensions < 1:
            return _bad_request(
                "Invalid 'dimensions': integer below minimum value. Expected a value >= 1, "
                f"but got {dimensions} instead.",
                "dimensions",
                "integer_below_min_value",
            )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        return _bad_request(
            f"Invalid type for 'user': expected a string, but got {type(user).__name__} instead.",
            "user",
            "invalid_type",
        )
    size = EMBEDDING_MODELS.get(model)
    if size is None:
        return Reply(404, error_body(404, model=model))
    if dimensions is not None:
        if not model.startswith("text-embedding-3-"):
            return _bad_request("This model does not support specifying dimensions.", "dimensions")
        if dimensions > size:
            return _bad_request(
                f"Invalid 'dimensions': integer above maximum value. Expected a value <= {size}, "
                f"but got {dimensions} instead.",
                "dimensions",
                "integer_above_max_value",
            )
    for i, (_, tokens) in enumerate(inputs):
        if tokens > EMBEDDING_MAX_INPUT_TOKENS:
            return _bad_request(
                f"Invalid 'input[{i}]': maximum input length is {EMBEDDING_MAX_INPUT_TOKENS} tokens.", "input"
            )
    total = sum(tokens for _, tokens in inputs)
    if total > EMBEDDING_MAX_REQUEST_TOKENS:
        return _bad_request(
            f"Requested {total} tokens, max {EMBEDDING_MAX_REQUEST_TOKENS} tokens per request",
            "input",
            "max_tokens_per_request",
        )
    return ChatCall(
        model=model,
        stream=False,
        prompt_tokens=total,
        seed=b"",
        extra={
            "texts": tuple(text for text, _ in inputs),
            "encoding_format": encoding,
            "dimensions": dimensions if dimensions is not None else size,
        },
    )


def _not_an_object(body: object) -> Reply:
    """OpenAI's 400 for a body that is not JSON (None) or not a JSON object."""
    if body is None:
        return Reply(400, _BAD_JSON)
    return Reply(400, _invalid("Invalid request body: expected a JSON object.", None, None))


class OpenAIEmbeddingsDialect(OpenAIDialect):
    """``POST /v1/embeddings`` as OpenAI speaks it.

    The shared engine runs it like a non-streamed chat request (auth, knobs, delays,
    faults, stats, rate limits); only reading the request and writing the answer differ.
    """

    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        if not isinstance(body, dict):
            return _not_an_object(body)
        return _embedding_call(body)

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        reply = super().error(status, knobs, call, ctx)
        if knobs.error_code == "context_length_exceeded" and knobs.error_message is None:
            # The embeddings endpoint words a too-long input the completions way.
            tokens = call.prompt_tokens if call is not None else 0
            message = (
                f"This model's maximum context length is {EMBEDDING_MAX_INPUT_TOKENS} tokens, however you "
                f"requested {tokens} tokens ({tokens} in your prompt; 0 for the completion). "
                "Please reduce your prompt; or completion length."
            )
            return Reply(reply.status, _invalid(message, None, knobs.error_code), reply.headers)
        return reply

    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        dimensions = int(call.extra["dimensions"])
        as_base64 = call.extra["encoding_format"] == "base64"
        texts: Sequence[str] = call.extra["texts"]
        data: list[dict[str, object]] = []
        for index, text in enumerate(texts):
            vector = _float32(_raw_vector(text, dimensions))
            embedding: object = _base64_vector(vector) if as_base64 else vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        return {
            "object": "list",
            "data": data,
            "model": call.model,
            "usage": {"prompt_tokens": call.prompt_tokens, "total_tokens": call.prompt_tokens},
        }


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The OpenAI simulator application.

    `knobs` are the start-up (and `DELETE /_sim/knobs` reset) knobs; with `api_key` set,
    API requests must send `Authorization: Bearer <api_key>`. Serve it with
    `switchyard.sim.faults.serve_app` (handler cancellation on) so client disconnects are
    noticed while the handler sleeps.
    """
    dialect = OpenAIDialect(api_key)
    app = build_simulator_app(
        dialect,
        knobs,
        [API_PREFIX + "/chat/completions"],
        {
            ("GET", API_PREFIX + "/models"): dialect.models,
            ("GET", API_PREFIX + "/models/{model}"): dialect.models,
        },
    )
    # Embeddings run through the same engine and control (knobs, script, stats, rate limits).
    embeddings = ChatEngine(OpenAIEmbeddingsDialect(api_key), app[CONTROL_KEY])
    app.router.add_post(API_PREFIX + "/embeddings", embeddings.handle)
    return app
