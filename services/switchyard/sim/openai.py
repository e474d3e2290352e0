"""OpenAI Chat Completions simulator (aiohttp).

Speaks the documented ``/v1/chat/completions`` wire format -- JSON and SSE
streaming -- closely enough that the official ``openai`` SDK parses it, with
:class:`~switchyard.sim.faults.FaultKnobs` to inject latency and failures.

Endpoints: ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{model}`` and the ``/_sim/*`` control endpoints (see
:func:`switchyard.sim.faults.add_control_routes`).

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
"""

from __future__ import annotations

import asyncio
import math
import random
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson
from aiohttp import web

from switchyard.sim.faults import (
    KNOBS_HEADER,
    FaultKnobs,
    KnobError,
    RateLimitSnapshot,
    RunningSimulator,
    SimControl,
    add_control_routes,
    approx_text_tokens,
    deterministic_text,
    example_for_schema,
    seed_bytes,
    sleep_ms,
    split_text,
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

SYSTEM_FINGERPRINT = "fp_5w1tchy4rd"
MAX_CONTEXT_TOKENS = 128_000
OPENAI_VERSION = "2020-10-01"
_ORG = "org-switchyard-sim"
_ID_ALPHABET = string.ascii_letters + string.digits
_rng = random.Random()

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


def _choose_tool(body: Mapping[str, Any], knobs: FaultKnobs) -> Mapping[str, Any] | None:
    """The function the simulated model calls, or None for a text answer."""
    tools = body.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
    ]
    if not functions:
        return None
    choice = body.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        for candidate in functions:
            if candidate.get("name") == name:
                return cast(Mapping[str, Any], candidate)
        return cast(Mapping[str, Any], functions[0])
    if choice == "required" or knobs.tool_call:
        return cast(Mapping[str, Any], functions[0])
    return None


def _answer_text(body: Mapping[str, Any], knobs: FaultKnobs) -> str:
    if knobs.text is not None:
        return knobs.text
    fmt = body.get("response_format")
    fmt_type = fmt.get("type") if isinstance(fmt, dict) else None
    if fmt_type == "json_schema":
        spec = fmt.get("json_schema") if isinstance(fmt, dict) else None
        schema = spec.get("schema") if isinstance(spec, dict) else None
        return orjson.dumps(example_for_schema(schema if schema is not None else {"type": "object"})).decode()
    text = deterministic_text(seed_bytes(body.get("messages")))
    if fmt_type == "json_object":
        return orjson.dumps({"answer": text}).decode()
    return text


def _new_id(prefix: str, length: int) -> str:
    return prefix + "".join(_rng.choices(_ID_ALPHABET, k=length))


@dataclass(slots=True)
class _Answer:
    """The simulated model's answer to one request."""

    content: str | None
    tool_name: str | None
    tool_arguments: str | None
    finish_reason: str
    usage: dict[str, object]


def _answer(body: Mapping[str, Any], knobs: FaultKnobs, n_prompt: int) -> _Answer:
    tool = _choose_tool(body, knobs)
    content: str | None = None
    tool_name: str | None = None
    tool_args: str | None = None
    if tool is not None:
        tool_name = str(tool.get("name", ""))
        tool_args = orjson.dumps(example_for_schema(tool.get("parameters", {"type": "object"}))).decode()
        visible = approx_text_tokens(tool_name + tool_args)
        finish = "tool_calls"
    else:
        content = _answer_text(body, knobs)
        visible = approx_text_tokens(content)
        finish = "stop"
        limit = body.get("max_completion_tokens")
        if limit is None:
            limit = body.get("max_tokens")
        if isinstance(limit, int) and not isinstance(limit, bool) and limit >= 0 and visible > limit:
            content = content[: limit * 4]
            visible = approx_text_tokens(content)
            finish = "length"
    if knobs.finish_reason is not None:
        finish = knobs.finish_reason
    completion = visible + knobs.reasoning_tokens
    usage: dict[str, object] = {
        "prompt_tokens": n_prompt,
        "completion_tokens": completion,
        "total_tokens": n_prompt + completion,
        "prompt_tokens_details": {
            "cached_tokens": min(knobs.cached_tokens, n_prompt),
            "audio_tokens": 0,
        },
        "completion_tokens_details": {
            "reasoning_tokens": knobs.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    return _Answer(content, tool_name, tool_args, finish, usage)


def _validate(body: Mapping[str, Any]) -> dict[str, object] | None:
    """OpenAI-style 400 body for an invalid request, else None."""
    model = body.get("model")
    if model is None:
        return _invalid(
            "Missing required parameter: 'model'.",
            "model",
            "missing_required_parameter",
        )
    if not isinstance(model, str) or not model:
        return _invalid(
            f"Invalid type for 'model': expected a non-empty string, but got {type(model).__name__} instead.",
            "model",
            "invalid_type",
        )
    messages = body.get("messages")
    if messages is None:
        return _invalid(
            "Missing required parameter: 'messages'.",
            "messages",
            "missing_required_parameter",
        )
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
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            "stream_options",
            None,
        )
    return None


@dataclass(slots=True)
class _Flight:
    """Bookkeeping for one in-flight chat request."""

    settled: bool = False  # outcome already counted in stats


# --------------------------------------------------------------------------- #
# the server
# --------------------------------------------------------------------------- #


class _OpenAISimulator:
    """Request handlers bound to one :class:`SimControl`."""

    def __init__(self, control: SimControl, api_key: str | None) -> None:
        self.control = control
        self.api_key = api_key
        self._expected_auth = f"Bearer {api_key}" if api_key is not None else None

    # -- helpers ------------------------------------------------------------
    def _auth_error(self, request: web.Request) -> dict[str, object] | None:
        if self._expected_auth is None:
            return None
        header = request.headers.get("Authorization")
        if header == self._expected_auth:
            return None
        if not header:
            return _invalid(_NO_API_KEY, None, "invalid_api_key")
        presented = header[7:] if header.startswith("Bearer ") else header
        return error_body(401, api_key=presented)

    @staticmethod
    def _headers(
        request_id: str,
        started: float,
        snap: RateLimitSnapshot | None,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        headers = {
            "x-request-id": request_id,
            "openai-organization": _ORG,
            "openai-processing-ms": str(int((time.perf_counter() - started) * 1000)),
            "openai-version": OPENAI_VERSION,
        }
        if snap is not None:
            headers["x-ratelimit-limit-requests"] = str(snap.limit_requests)
            headers["x-ratelimit-limit-tokens"] = str(snap.limit_tokens)
            headers["x-ratelimit-remaining-requests"] = str(snap.remaining_requests)
            headers["x-ratelimit-remaining-tokens"] = str(snap.remaining_tokens)
            headers["x-ratelimit-reset-requests"] = snap.reset_requests
            headers["x-ratelimit-reset-tokens"] = snap.reset_tokens
        if extra:
            headers.update(extra)
        return headers

    def _error(
        self,
        status: int,
        body: Mapping[str, object],
        request_id: str,
        started: float,
        snap: RateLimitSnapshot | None,
        retry_after_s: float | None = None,
    ) -> web.Response:
        self.control.stats.errors += 1
        extra: dict[str, str] = {}
        if retry_after_s is not None:
            # retry-after is whole seconds (HTTP); a fractional value is also
            # sent exactly as retry-after-ms, which the OpenAI SDKs prefer.
            extra["retry-after"] = str(math.ceil(retry_after_s))
            if not float(retry_after_s).is_integer():
                extra["retry-after-ms"] = str(round(retry_after_s * 1000))
        return web.Response(
            status=status,
            body=orjson.dumps(body),
            content_type="application/json",
            headers=self._headers(request_id, started, snap, extra),
        )

    # -- handlers -----------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """``GET /v1/models`` and ``GET /v1/models/{model}``."""
        request_id = _new_id("req_", 32)
        started = time.perf_counter()
        auth = self._auth_error(request)
        if auth is not None:
            return web.Response(
                status=401,
                body=orjson.dumps(auth),
                content_type="application/json",
                headers=self._headers(request_id, started, None),
            )
        wanted = request.match_info.get("model")
        if wanted is not None:
            if wanted not in MODELS:
                return web.Response(
                    status=404,
                    body=orjson.dumps(error_body(404, model=wanted)),
                    content_type="application/json",
                    headers=self._headers(request_id, started, None),
                )
            payload: object = _model_obj(wanted)
        else:
            payload = {"object": "list", "data": [_model_obj(m) for m in MODELS]}
        return web.Response(
            body=orjson.dumps(payload),
            content_type="application/json",
            headers=self._headers(request_id, started, None),
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/chat/completions``; counts disconnects when cancelled."""
        control = self.control
        control.stats.requests += 1
        control.stats.active += 1
        flight = _Flight()
        try:
            return await self._chat(request, flight)
        except asyncio.CancelledError:
            if not flight.settled:
                control.stats.disconnects += 1
            raise
        finally:
            control.stats.active -= 1

    async def _chat(self, request: web.Request, flight: _Flight) -> web.StreamResponse:
        control = self.control
        started = time.perf_counter()
        request_id = _new_id("req_", 32)
        raw = await request.read()
        body: object
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        control.stats.last_request = body

        auth = self._auth_error(request)
        if auth is not None:
            flight.settled = True
            return self._error(401, auth, request_id, started, None)
        if not isinstance(body, dict):
            flight.settled = True
            err = (
                _BAD_JSON
                if body is None
                else _invalid("Invalid request body: expected a JSON object.", None, None)
            )
            return self._error(400, err, request_id, started, None)

        try:
            knobs = control.knobs_for_request(request.headers.get(KNOBS_HEADER))
        except KnobError as exc:
            flight.settled = True
            return self._error(
                400,
                _invalid(
                    f"Invalid {KNOBS_HEADER} header: {exc}",
                    exc.field_name,
                    "invalid_sim_knobs",
                ),
                request_id,
                started,
                None,
            )

        await sleep_ms(knobs.first_byte_delay_ms)

        invalid = _validate(body)
        n_prompt = prompt_tokens(body["messages"]) if invalid is None else 0
        snap = control.ratelimit(knobs, n_prompt)
        if invalid is not None:
            flight.settled = True
            return self._error(400, invalid, request_id, started, snap)

        model = str(body["model"])
        stream = body.get("stream") is True
        if knobs.status is not None and not (stream and knobs.error_after_chunks is not None):
            flight.settled = True
            err = error_body(
                knobs.status,
                code=knobs.error_code,
                message=knobs.error_message,
                model=model,
                prompt_tokens=n_prompt,
                retry_after_s=knobs.retry_after_s,
                limit_requests=snap.limit_requests,
                api_key=self.api_key or "sk-sim",
            )
            return self._error(knobs.status, err, request_id, started, snap, knobs.retry_after_s)

        if knobs.drop_after_chunks is not None and not stream:
            flight.settled = True
            control.stats.dropped += 1
            _drop_connection(request)
            return web.Response(status=500)  # never delivered

        answer = _answer(body, knobs, n_prompt)
        completion_id = _new_id("chatcmpl-", 29)
        created = int(time.time())
        if not stream:
            flight.settled = True
            control.stats.completed += 1
            return web.Response(
                body=orjson.dumps(_completion(completion_id, created, model, answer)),
                content_type="application/json",
                headers=self._headers(request_id, started, snap),
            )
        return await self._stream(
            request,
            flight,
            knobs,
            body,
            answer,
            completion_id,
            created,
            request_id,
            started,
            snap,
            n_prompt,
        )

    async def _stream(
        self,
        request: web.Request,
        flight: _Flight,
        knobs: FaultKnobs,
        body: Mapping[str, Any],
        answer: _Answer,
        completion_id: str,
        created: int,
        request_id: str,
        started: float,
        snap: RateLimitSnapshot,
        n_prompt: int,
    ) -> web.StreamResponse:
        control = self.control
        stream_options = body.get("stream_options")
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        frames = _stream_frames(
            completion_id,
            created,
            str(body["model"]),
            answer,
            knobs.chunks,
            include_usage,
        )

        # Which fault (if any) cuts the stream, and after how many frames;
        # the earliest wins, ties go to drop, then error, then malformed.
        cut, fault = len(frames) + 1, ""
        for kind, after in (
            ("drop", knobs.drop_after_chunks),
            ("error", knobs.error_after_chunks),
            ("malformed", knobs.malformed_after_chunks),
        ):
            if after is not None and min(after, len(frames)) < cut:
                cut, fault = min(after, len(frames)), kind
        if not fault:
            cut = len(frames)

        resp = web.StreamResponse(status=200, headers=self._headers(request_id, started, snap))
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        delay = knobs.chunk_delay_ms
        try:
            await resp.prepare(request)
            sent = frames[:cut]
            if not fault:
                sent = [*sent, b"data: [DONE]\n\n"]
            if delay <= 0:
                if sent:
                    await resp.write(b"".join(sent))
            else:
                for i, frame in enumerate(sent):
                    if i and i < cut:  # [DONE] follows the last chunk immediately
                        await sleep_ms(delay)
                    await resp.write(frame)
            if fault and cut:
                await sleep_ms(delay)
            if fault == "drop":
                flight.settled = True
                control.stats.dropped += 1
                _drop_connection(request)
                return resp
            if fault == "error":
                status = knobs.status if knobs.status is not None else 500
                err = error_body(
                    status,
                    code=knobs.error_code,
                    message=knobs.error_message,
                    model=str(body["model"]),
                    prompt_tokens=n_prompt,
                    retry_after_s=knobs.retry_after_s,
                    limit_requests=snap.limit_requests,
                )
                await resp.write(b"data: " + orjson.dumps(err) + b"\n\n")
            elif fault == "malformed":
                await resp.write(
                    b'data: {"id":"'
                    + completion_id.encode()
                    + b'","object":"chat.completion.chunk","choices":[{"index":0,'
                    b'"delta":{"content":"\n\n'
                )
            await resp.write_eof()
        except ConnectionError:
            if not flight.settled:
                flight.settled = True
                control.stats.disconnects += 1
            return resp
        flight.settled = True
        if fault:
            control.stats.errors += 1
        else:
            control.stats.completed += 1
        return resp


def _drop_connection(request: web.Request) -> None:
    """Close the TCP connection now (buffered bytes are flushed, then FIN)."""
    transport = request.transport
    if transport is not None:
        transport.close()


def _model_obj(model: str) -> dict[str, object]:
    return {
        "id": model,
        "object": "model",
        "created": 1_715_367_049,
        "owned_by": "system",
    }


def _completion(completion_id: str, created: int, model: str, answer: _Answer) -> dict[str, object]:
    message: dict[str, object] = {
        "role": "assistant",
        "content": answer.content,
        "refusal": None,
        "annotations": [],
    }
    if answer.tool_name is not None:
        message["tool_calls"] = [
            {
                "id": _new_id("call_", 24),
                "type": "function",
                "function": {
                    "name": answer.tool_name,
                    "arguments": answer.tool_arguments,
                },
            }
        ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage,
        "service_tier": "default",
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }


def _stream_frames(
    completion_id: str,
    created: int,
    model: str,
    answer: _Answer,
    chunks: int,
    include_usage: bool,
) -> list[bytes]:
    """Every ``data:`` event of the stream except ``[DONE]``."""

    def frame(delta: dict[str, object], finish: str | None = None) -> bytes:
        obj: dict[str, object] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if include_usage:
            obj["usage"] = None
        return b"data: " + orjson.dumps(obj) + b"\n\n"

    frames: list[bytes] = []
    if answer.tool_name is not None:
        call_header = {
            "index": 0,
            "id": _new_id("call_", 24),
            "type": "function",
            "function": {"name": answer.tool_name, "arguments": ""},
        }
        frames.append(
            frame(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [call_header],
                    "refusal": None,
                }
            )
        )
        for fragment in split_text(answer.tool_arguments or "", chunks):
            frames.append(frame({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
    else:
        frames.append(frame({"role": "assistant", "content": "", "refusal": None}))
        for piece in split_text(answer.content or "", chunks):
            frames.append(frame({"content": piece}))
    frames.append(frame({}, answer.finish_reason))
    if include_usage:
        usage_obj = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [],
            "usage": answer.usage,
        }
        frames.append(b"data: " + orjson.dumps(usage_obj) + b"\n\n")
    return frames


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The OpenAI simulator application.

    ``knobs`` are the start-up (and ``DELETE /_sim/knobs`` reset) knobs;
    with ``api_key`` set, API requests must send ``Authorization: Bearer <api_key>``.
    Serve it with :func:`switchyard.sim.faults.serve_app` (handler cancellation
    on) so client disconnects are noticed while the handler sleeps.
    """
    control = SimControl(knobs)
    sim = _OpenAISimulator(control, api_key)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post(API_PREFIX + "/chat/completions", sim.chat)
    app.router.add_get(API_PREFIX + "/models", sim.models)
    app.router.add_get(API_PREFIX + "/models/{model}", sim.models)
    add_control_routes(app, control)
    return app
