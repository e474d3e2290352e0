"""OpenAI-compatible servers simulator (aiohttp): one process, every preset.

The dialect is chosen by the first path segment, so one simulator serves all the presets
of `switchyard.adapters.vendors.openai_compatible`: a provider whose `base_url` is
``http://host:port/<preset>/v1`` talks to that preset's server. ``API_PREFIX`` is
``/generic/v1`` (an OpenAI-like server), so ``RunningSimulator.base_url`` works as is.

Endpoints, for each preset in ``PRESETS``: ``POST /<preset>/v1/chat/completions``,
``GET /<preset>/v1/models``, ``GET /<preset>/v1/models/{model}``; plus ``/_sim/*`` (knobs
and stats are shared by every preset).

What each preset does differently (see the adapter module for the sources):

* generic -- exactly the OpenAI simulator's wire format (``switchyard.sim.openai``).
* groq -- usage in ``x_groq.usage`` of the finish chunk (``x_groq.id`` on the first and
  final chunk), plus a ``choices: []`` usage chunk only with ``stream_options``; usage
  carries ``queue_time`` / ``prompt_time`` / ``completion_time`` / ``total_time``;
  ``delta.reasoning``; 400 for ``logprobs``, ``logit_bias``, ``top_logprobs``, ``n`` != 1
  and ``messages[].name``; errors ``{"error": {message, type, code}}`` (429 type
  ``tokens``, 498 ``capacity_exceeded``, context ``context_length_exceeded``);
  ``x-request-id`` and OpenAI's ``x-ratelimit-*`` headers.
* xai -- errors ``{"code": "<gRPC status text>", "error": "<message>"}`` (in streams too),
  a wrong key is a 400 "Incorrect API key provided", a missing one a 401; ids are UUIDs;
  ``delta.reasoning_content``; usage with OpenAI's details; no rate-limit headers.
* deepseek -- ``max_tokens`` only; usage with ``prompt_cache_hit_tokens`` /
  ``prompt_cache_miss_tokens`` (and ``prompt_tokens_details``); ``delta.reasoning_content``;
  a ``: keep-alive`` comment before the first chunk; 422 for non-text content parts, 400
  for ``json_schema``; a context overflow is a 400 whose code is ``invalid_request_error``;
  402 insufficient balance; no rate-limit headers.
* together -- ``max_tokens`` only; ``stream_options`` ignored: every chunk has
  ``"usage": null`` except the finish chunk, which carries the usage (no details);
  ``delta.reasoning``; ids like ``8f1c2d3e4a5b6c7d-EWR``; ``x-ratelimit-{limit,remaining,
  reset}`` (requests, reset in seconds) and ``x-tokenlimit-{limit,remaining}``; a context
  overflow says "`inputs` tokens + `max_new_tokens` must be <= N".
* vllm -- ``delta.reasoning``; usage with ``prompt_tokens_details`` but no completion
  details; errors ``{"error": {message, type: "BadRequestError", param, code: <int>}}``
  (in streams too); ``--api-key`` answers 401 ``{"error": "Unauthorized"}``.
* ollama -- ``max_tokens`` only; ``tool_choice`` ignored; images only as ``data:`` URLs
  (400 "invalid image input" otherwise); every delta repeats ``role``; a tool call arrives
  whole in one chunk; usage without details in a ``choices: []`` chunk only with
  ``include_usage``; ``delta.reasoning``; errors ``{"error": {message, type, param, code:
  null}}``; no authentication.
* llamacpp -- ``n_predict`` / ``max_completion_tokens`` / ``max_tokens``; ``tool_choice``
  only as a string (an object is ignored, as llama.cpp's ``json_value`` does); usage
  without details, in a ``choices: []`` chunk with ``include_usage``; ``timings`` on the
  last chunk; ``delta.reasoning_content``; errors ``{"error": {code: <int>, message,
  type}}``, ``exceed_context_size_error`` for a context overflow.

Token accounting, answers and faults are the shared engine's (``switchyard.sim.engine``)
and the OpenAI simulator's (``prompt_tokens``). Reasoning: when the ``reasoning_tokens``
knob is set, the answer starts with a reasoning delta (``REASONING_TEXT``) in the
preset's reasoning field. Not modelled: the exact wording of every vendor message and an
in-stream error format for Groq or xAI beyond the shapes above (none is documented).
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from aiohttp import web

from switchyard.sim.engine import (
    Answer,
    CallContext,
    ChatCall,
    Reply,
    build_simulator_app,
    json_reply,
    new_id,
    sse,
)
from switchyard.sim.faults import FaultKnobs, RateLimitSnapshot, RunningSimulator, start_simulator
from switchyard.sim.openai import OpenAIDialect, error_body, usage_object

__all__ = [
    "API_PREFIX",
    "PRESETS",
    "REASONING_TEXT",
    "RunningSimulator",
    "build_app",
    "preset_base_url",
    "start_simulator",
]

#: The presets served, each under ``/<preset>/v1``.
PRESETS: Final = ("groq", "xai", "deepseek", "together", "vllm", "ollama", "llamacpp", "generic")
#: Path prefix of the default (generic, OpenAI-like) server.
API_PREFIX: Final = "/generic/v1"
#: The reasoning delta sent before the answer when the ``reasoning_tokens`` knob is set.
REASONING_TEXT: Final = "Weighing the question before answering."

_HEX = "0123456789abcdef"
_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_PRESET_PATTERN = "{preset:" + "|".join(PRESETS) + "}"

ErrorStyle = Literal["openai", "groq", "xai", "deepseek", "together", "vllm", "ollama", "llamacpp"]
UsageStyle = Literal["openai", "groq", "deepseek", "vllm", "minimal"]
UsagePlace = Literal["include_usage", "final_chunk", "x_groq"]


@dataclass(frozen=True, slots=True)
class Profile:
    """How one preset's server behaves (see the module docstring)."""

    name: str
    models: tuple[str, ...]
    owned_by: str
    output_fields: tuple[str, ...]
    usage_place: UsagePlace
    usage_style: UsageStyle
    reasoning_field: str
    request_id_prefix: str | None
    ratelimit: Literal["openai", "together", "none"]
    system_fingerprint: str | None
    null_usage: bool
    """Chunks without usage carry ``"usage": null`` (OpenAI with include_usage, Together)."""


PROFILES: Final[Mapping[str, Profile]] = {
    "generic": Profile(
        "generic", ("gpt-4o-mini", "o4-mini"), "system", ("max_completion_tokens", "max_tokens"),
        "include_usage", "openai", "reasoning_content", "req_", "openai", "fp_5w1tchy4rd", True,
    ),
    "groq": Profile(
        "groq", ("llama-3.3-70b-versatile", "openai/gpt-oss-20b", "qwen/qwen3-32b"), "Meta",
        ("max_completion_tokens", "max_tokens"), "x_groq", "groq", "reasoning", "req_", "openai",
        "fp_3884478861", False,
    ),
    "xai": Profile(
        "xai", ("grok-3", "grok-3-mini", "grok-4"), "xai", ("max_completion_tokens", "max_tokens"),
        "include_usage", "openai", "reasoning_content", None, "none", "fp_0d42a4eb3d", True,
    ),
    "deepseek": Profile(
        "deepseek", ("deepseek-chat", "deepseek-reasoner"), "deepseek", ("max_tokens",),
        "include_usage", "deepseek", "reasoning_content", None, "none", "fp_eaab8d114b_prod0820", True,
    ),
    "together": Profile(
        "together", ("meta-llama/Llama-3.3-70B-Instruct-Turbo", "deepseek-ai/DeepSeek-R1"), "together",
        ("max_tokens",), "final_chunk", "minimal", "reasoning", None, "together", None, True,
    ),
    "vllm": Profile(
        "vllm", ("Qwen/Qwen3-8B", "meta-llama/Llama-3.1-8B-Instruct"), "vllm",
        ("max_completion_tokens", "max_tokens"), "include_usage", "vllm", "reasoning", None, "none", None,
        False,
    ),
    "ollama": Profile(
        "ollama", ("llama3.2:latest", "qwen3:8b"), "library", ("max_tokens",), "include_usage", "minimal",
        "reasoning", None, "none", "fp_ollama", False,
    ),
    "llamacpp": Profile(
        "llamacpp", ("ggml-org/gemma-3-1b-it-GGUF", "Qwen3-8B-Q4_K_M.gguf"), "llamacpp",
        ("n_predict", "max_completion_tokens", "max_tokens"), "include_usage", "minimal",
        "reasoning_content", None, "none", "b6497-cd08fc3e", False,
    ),
}  # fmt: skip
assert tuple(sorted(PROFILES)) == tuple(sorted(PRESETS))

# Text of the gRPC status xAI puts in `code`, by HTTP status.
_XAI_CODES: Final = {
    400: "Client specified an invalid argument",
    401: "The request does not have valid authentication credentials for the operation",
    403: "The caller does not have permission to execute the specified operation",
    404: "Some requested entity was not found",
    429: "Some resource has been exhausted",
    500: "Internal error",
    503: "The service is currently unavailable",
    504: "Deadline expired before operation could complete",
}
_VLLM_TYPES: Final = {
    400: "BadRequestError",
    401: "UnauthorizedError",
    404: "NotFoundError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
_LLAMACPP_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    501: "not_supported_error",
    503: "unavailable_error",
}
_GROQ_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated error)."),
    401: ("invalid_request_error", "invalid_api_key", "Invalid API Key"),
    403: ("permission_error", "permission_denied", "Forbidden"),
    404: (
        "invalid_request_error",
        "model_not_found",
        "The model `{model}` does not exist or you do not have access to it.",
    ),
    413: ("invalid_request_error", "request_too_large", "Request Entity Too Large"),
    429: (
        "tokens",
        "rate_limit_exceeded",
        "Rate limit reached for model `{model}` in organization `org_sim` service tier `on_demand` on "
        "tokens per minute (TPM): Limit 6000, Used 6000, Requested 120. Please try again in {retry}.",
    ),
    498: ("capacity_exceeded", "capacity_exceeded", "Flex tier capacity exceeded. Please try again later."),
    500: ("internal_server_error", None, "Internal Server Error"),
    503: ("internal_server_error", "service_unavailable", "Service Unavailable"),
}  # fmt: skip
_DEEPSEEK_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request (simulated error)."),
    401: ("authentication_error", "Authentication Fails, Your api key: ****{key} is invalid"),
    402: ("unknown_error", "Insufficient Balance"),
    422: ("invalid_request_error", "Invalid parameters (simulated error)."),
    429: ("rate_limit_error", "Rate Limit Reached"),
    500: ("api_error", "Server Error"),
    503: ("api_error", "Server Overloaded"),
}
_TOGETHER_ERRORS: Final[dict[int, tuple[str, str | None, str]]] = {
    400: ("invalid_request_error", None, "Invalid request (simulated error)."),
    401: (
        "invalid_request_error",
        "invalid_api_key",
        "Invalid API key provided. You can find your API key at https://api.together.xyz/settings/api-keys.",
    ),
    404: (
        "invalid_request_error",
        "model_not_found",
        "Unable to access model {model}. Please visit https://api.together.ai/models to view the list "
        "of supported models.",
    ),
    429: (
        "rate_limit_error",
        "rate_limit_exceeded",
        "You have reached the rate limit specific to this model.",
    ),
    500: ("server_error", None, "Internal server error."),
    503: ("server_error", "service_unavailable", "The server is overloaded, please try again later."),
}
_CONTEXT_CODE: Final = "context_length_exceeded"


def _profile(ctx_or_request: CallContext | web.Request) -> Profile:
    request = ctx_or_request.request if isinstance(ctx_or_request, CallContext) else ctx_or_request
    return PROFILES[request.match_info.get("preset", "generic")]


def _mask(key: str) -> str:
    return key[:2] + "***" + key[-2:] if len(key) > 6 else "***"


def _duration_seconds(text: str) -> int:
    """Whole seconds (rounded up) of a Go duration such as "59.5s", "6m0s" or "120ms"."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    total = sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text))
    return math.ceil(total)


# --------------------------------------------------------------------------- #
# bodies
# --------------------------------------------------------------------------- #


def _usage(profile: Profile, answer: Answer) -> dict[str, object]:
    prompt, output = answer.prompt_tokens, answer.output_tokens
    base: dict[str, object] = {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
    }
    if profile.usage_style == "openai":
        return usage_object(answer)
    if profile.usage_style == "groq":
        return {
            **usage_object(answer),
            "queue_time": 0.012,
            "prompt_time": round(prompt / 20000, 6),
            "completion_time": round(output / 500, 6),
            "total_time": round(prompt / 20000 + output / 500, 6),
        }
    if profile.usage_style == "deepseek":
        return {
            **base,
            "prompt_tokens_details": {"cached_tokens": answer.cached_tokens},
            "prompt_cache_hit_tokens": answer.cached_tokens,
            "prompt_cache_miss_tokens": prompt - answer.cached_tokens,
            "completion_tokens_details": {"reasoning_tokens": answer.reasoning_tokens},
        }
    if profile.usage_style == "vllm":
        return {**base, "prompt_tokens_details": {"cached_tokens": answer.cached_tokens}}
    return base


def _timings(answer: Answer) -> dict[str, object]:
    """llama.cpp's `timings` object."""
    return {
        "cache_n": answer.cached_tokens,
        "prompt_n": answer.prompt_tokens - answer.cached_tokens,
        "prompt_ms": 12.5,
        "predicted_n": answer.output_tokens,
        "predicted_ms": 40.0,
    }


class CompatibleDialect(OpenAIDialect):
    """Chat Completions as each preset's server speaks it (the preset comes from the path)."""

    # -- auth --------------------------------------------------------------------------
    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        profile = _profile(request)
        if profile.name == "generic":
            return super().check_auth(request, ctx)
        if self.api_key is None or profile.name == "ollama":
            return None
        header = request.headers.get("Authorization", "")
        if header == f"Bearer {self.api_key}":
            return None
        presented = header[7:] if header.startswith("Bearer ") else header
        if profile.name == "xai":
            if not presented:
                return Reply(401, {"code": _XAI_CODES[401], "error": "No API key provided."})
            message = f"Incorrect API key provided: {_mask(presented)}. You can obtain an API key from https://console.x.ai."
            return Reply(400, {"code": _XAI_CODES[400], "error": message})
        if profile.name == "vllm":
            return Reply(401, {"error": "Unauthorized"})
        return Reply(401, self._preset_error_body(profile, 401, None, None, None, 0, presented or "none"))

    # -- request -----------------------------------------------------------------------
    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        profile = _profile(ctx)
        if profile.name == "generic":
            return super().parse(body, ctx)
        if isinstance(body, dict):
            refused = self._refuse(profile, body)
            if refused is not None:
                return refused
        parsed = super().parse(body, ctx)
        if isinstance(parsed, Reply):
            inner = parsed.body.get("error") if isinstance(parsed.body, dict) else None
            message = inner.get("message") if isinstance(inner, dict) else None
            param = inner.get("param") if isinstance(inner, dict) else None
            return self._reply(profile, parsed.status, str(message or "Invalid request."), param)
        limit = next(
            (
                body[name]
                for name in profile.output_fields
                if isinstance(body, dict)
                and isinstance(body.get(name), int)
                and not isinstance(body.get(name), bool)
                and body[name] >= 0
            ),
            None,
        )
        tool_choice = parsed.tool_choice
        if profile.name == "ollama":
            tool_choice = None  # Ollama's request has no tool_choice: the model decides
        elif (
            profile.name == "llamacpp"
            and isinstance(body, dict)
            and not isinstance(body.get("tool_choice"), str)
        ):
            tool_choice = None  # an object fails llama.cpp's string read and falls back to "auto"
        ctx.response_id = self._response_id(profile)
        return dataclasses.replace(parsed, max_tokens=limit, tool_choice=tool_choice)

    def _refuse(self, profile: Profile, body: dict[str, Any]) -> Reply | None:
        """What the real server rejects before answering."""
        messages = body.get("messages")
        messages = messages if isinstance(messages, list) else []
        if profile.name == "groq":
            for name in ("logprobs", "logit_bias", "top_logprobs"):
                if body.get(name) not in (None, False):
                    return self._reply(profile, 400, f"`{name}` is not supported with this model", name)
            if body.get("n") not in (None, 1):
                return self._reply(profile, 400, "'n' : number must be at most 1", "n")
            for i, message in enumerate(messages):
                if isinstance(message, dict) and "name" in message and message.get("role") != "tool":
                    where = f"messages.{i}.name"
                    return self._reply(profile, 400, f"'{where}' : property 'name' is unsupported", where)
        if profile.name == "deepseek":
            fmt = body.get("response_format")
            if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
                return self._reply(
                    profile, 400, "This response_format type is unavailable now", "response_format"
                )
            for i, message in enumerate(messages):
                content = message.get("content") if isinstance(message, dict) else None
                for part in content if isinstance(content, list) else []:
                    if isinstance(part, dict) and part.get("type") != "text":
                        text = (
                            f"Failed to deserialize the JSON body into the target type: messages[{i}]: "
                            f"unknown variant `{part.get('type')}`, expected `text`"
                        )
                        return self._reply(profile, 422, text, None)
        if profile.name == "ollama":
            for message in messages:
                content = message.get("content") if isinstance(message, dict) else None
                for part in content if isinstance(content, list) else []:
                    image = part.get("image_url") if isinstance(part, dict) else None
                    url = image.get("url") if isinstance(image, dict) else image
                    if part.get("type") == "image_url" and not (
                        isinstance(url, str) and url.startswith("data:")
                    ):
                        return self._reply(profile, 400, "invalid image input", None)
        return None

    def _response_id(self, profile: Profile) -> str:
        if profile.name in ("xai", "deepseek"):
            return str(uuid.uuid4())
        if profile.name == "together":
            return new_id("", 16, _HEX) + "-EWR"
        if profile.name == "ollama":
            return new_id("chatcmpl-", 3, "0123456789")
        if profile.name == "vllm":
            return new_id("chatcmpl-", 32, _HEX)
        return new_id("chatcmpl-", 29 if profile.name == "groq" else 32, _ALNUM)

    def _tool_call_id(self, profile: Profile) -> str:
        if profile.name == "vllm":
            return new_id("chatcmpl-tool-", 32, _HEX)
        if profile.name == "llamacpp":
            return new_id("", 32, _ALNUM)
        if profile.name == "deepseek":
            return new_id("call_0_", 36, _HEX)
        if profile.name == "ollama":
            return new_id("call_", 8, _ALNUM.lower())
        return new_id("call_", 24, _ALNUM)

    # -- errors ------------------------------------------------------------------------
    def _reply(self, profile: Profile, status: int, message: str, param: object) -> Reply:
        return Reply(
            status, self._preset_error_body(profile, status, None, message, param, 0, self.api_key or "none")
        )

    def _preset_error_body(
        self,
        profile: Profile,
        status: int,
        code: str | None,
        message: str | None,
        param: object,
        prompt_tokens: int,
        key: str,
        model: str = "",
        retry_after_s: float | None = None,
    ) -> dict[str, object]:
        """The preset's error body for `status`; `code` "context_length_exceeded" makes it
        the preset's context-overflow error, another code replaces its code (or type)."""
        model = model or profile.models[0]
        context = code == _CONTEXT_CODE
        kind: str
        err_code: str | None
        text: str
        retry = f"{retry_after_s:g}s" if retry_after_s is not None else "1s"
        name = profile.name
        if name == "xai":
            text = (
                f"This model's maximum prompt length is 131072 but the request contains {prompt_tokens} "
                "tokens."
                if context
                else "Invalid request (simulated error)."
                if status < 500
                else "Internal error (simulated)."
            )
            xai_code = _XAI_CODES.get(status) or (_XAI_CODES[500] if status >= 500 else _XAI_CODES[400])
            return {"code": code if code and not context else xai_code, "error": message or text}
        if name == "vllm":
            text = (
                f"This model's maximum context length is 32768 tokens. However, your request has "
                f"{prompt_tokens} input tokens. Please reduce the length of the input messages."
                if context
                else f"Simulated HTTP {status} error."
            )
            kind = (
                code
                if code and not context
                else _VLLM_TYPES.get(status, "BadRequestError" if status < 500 else "InternalServerError")
            )
            return {"error": {"message": message or text, "type": kind, "param": param, "code": status}}
        if name == "llamacpp":
            if context:
                error: dict[str, object] = {
                    "code": status,
                    "message": message
                    or f"request ({prompt_tokens} tokens) exceeds the available context size (4096 tokens), "
                    "try increasing it",
                    "type": "exceed_context_size_error",
                    "n_prompt_tokens": prompt_tokens,
                    "n_ctx": 4096,
                }
                return {"error": error}
            kind = code or _LLAMACPP_TYPES.get(
                status, "invalid_request_error" if status < 500 else "server_error"
            )
            text = {401: "Invalid API Key", 503: "Loading model"}.get(
                status, f"Simulated HTTP {status} error."
            )
            return {"error": {"code": status, "message": message or text, "type": kind}}
        if name == "ollama":
            kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
            text = (
                "the input length exceeds the context length"
                if context
                else f'model "{model}" not found, try pulling it first'
                if status == 404
                else f"Simulated HTTP {status} error."
            )
            return {
                "error": {
                    "message": message or text,
                    "type": kind,
                    "param": param,
                    "code": None if context else code,
                }
            }
        if name == "groq":
            if context:
                kind, err_code, text = (
                    "invalid_request_error",
                    _CONTEXT_CODE,
                    "Please reduce the length of the messages or completion.",
                )
            else:
                default = ("invalid_request_error", None, f"Simulated HTTP {status} error.")
                if status >= 500:
                    default = ("internal_server_error", None, "Internal Server Error")
                kind, err_code, text = _GROQ_ERRORS.get(status, default)
                err_code = code or err_code
            return {
                "error": {
                    "message": message or text.format(model=model, retry=retry),
                    "type": kind,
                    "code": err_code,
                }
            }
        if name == "deepseek":
            if context:
                kind, text = (
                    "invalid_request_error",
                    f"This model's maximum context length is 131072 tokens. However, you requested "
                    f"{prompt_tokens} tokens ({prompt_tokens} in the messages, 0 in the completion). "
                    "Please reduce the length of the messages or completion.",
                )
            else:
                kind, text = _DEEPSEEK_ERRORS.get(
                    status,
                    (
                        "invalid_request_error" if status < 500 else "api_error",
                        f"Simulated HTTP {status} error.",
                    ),
                )
            return {
                "error": {
                    "message": message or text.format(key=key[-4:]),
                    "type": kind,
                    "param": param,
                    "code": code if code and not context else "invalid_request_error",
                }
            }
        if name == "together":
            if context:
                kind, err_code, text = (
                    "invalid_request_error",
                    None,
                    f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= 131073. Given: "
                    f"{prompt_tokens + 131000} `inputs` tokens and 512 `max_new_tokens`",
                )
                param = "max_tokens"
            else:
                default = (
                    "invalid_request_error" if status < 500 else "server_error",
                    None,
                    f"Simulated HTTP {status} error.",
                )
                kind, err_code, text = _TOGETHER_ERRORS.get(status, default)
                err_code = code or err_code
            return {
                "error": {
                    "message": message or text.format(model=model),
                    "type": kind,
                    "param": param,
                    "code": err_code,
                }
            }
        return error_body(
            status, code=code, message=message, model=model, prompt_tokens=prompt_tokens, api_key=key
        )

    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        profile = _profile(ctx)
        if profile.name == "generic":
            return super().error(status, knobs, call, ctx)
        return Reply(status, self._knob_error_body(profile, status, knobs, call))

    def _knob_error_body(
        self, profile: Profile, status: int, knobs: FaultKnobs, call: ChatCall | None
    ) -> dict[str, object]:
        return self._preset_error_body(
            profile,
            status,
            knobs.error_code,
            knobs.error_message,
            "messages" if knobs.error_code == _CONTEXT_CODE else None,
            call.prompt_tokens if call is not None else 0,
            self.api_key or "none",
            call.model if call is not None else "",
            knobs.retry_after_s,
        )

    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        profile = _profile(ctx)
        if profile.name == "generic":
            return super().stream_error(status, knobs, call, ctx)
        body = self._knob_error_body(profile, status, knobs, call)
        return sse(body)  # xAI's flat body as is; the others are already `{"error": {...}}`

    # -- headers -----------------------------------------------------------------------
    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        profile = _profile(ctx)
        if profile.name == "generic":
            return super().headers(ctx, snap)
        headers: dict[str, str] = {}
        if profile.request_id_prefix is not None:
            headers["x-request-id"] = profile.request_id_prefix + ctx.request_id[-26:]
        if profile.name == "groq":
            headers["x-groq-region"] = "us-east-1"
        if snap is None:
            return headers
        if profile.ratelimit == "openai":
            headers["x-ratelimit-limit-requests"] = str(snap.limit_requests)
            headers["x-ratelimit-limit-tokens"] = str(snap.limit_tokens)
            headers["x-ratelimit-remaining-requests"] = str(snap.remaining_requests)
            headers["x-ratelimit-remaining-tokens"] = str(snap.remaining_tokens)
            headers["x-ratelimit-reset-requests"] = snap.reset_requests
            headers["x-ratelimit-reset-tokens"] = snap.reset_tokens
        elif profile.ratelimit == "together":
            headers["x-ratelimit-limit"] = str(snap.limit_requests)
            headers["x-ratelimit-remaining"] = str(snap.remaining_requests)
            headers["x-ratelimit-reset"] = str(_duration_seconds(snap.reset_requests))
            headers["x-tokenlimit-limit"] = str(snap.limit_tokens)
            headers["x-tokenlimit-remaining"] = str(snap.remaining_tokens)
        return headers

    # -- answers -----------------------------------------------------------------------
    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        profile = _profile(ctx)
        if profile.name == "generic":
            return super().completion(call, answer, ctx)
        message: dict[str, object] = {"role": "assistant", "content": answer.text or ""}
        if answer.reasoning_tokens:
            message[profile.reasoning_field] = REASONING_TEXT
        if answer.tool_name is not None:
            message["tool_calls"] = [
                {
                    "id": self._tool_call_id(profile),
                    "type": "function",
                    "function": {"name": answer.tool_name, "arguments": answer.tool_arguments},
                }
            ]
        completion: dict[str, object] = {
            "id": ctx.response_id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": call.model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": answer.finish}],
            "usage": _usage(profile, answer),
        }
        if profile.system_fingerprint is not None:
            completion["system_fingerprint"] = profile.system_fingerprint
        if profile.name == "groq":
            completion["x_groq"] = {"id": "req_" + ctx.request_id[-26:]}
        if profile.name == "llamacpp":
            completion["timings"] = _timings(answer)
        return completion

    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        profile = _profile(ctx)
        if profile.name == "generic":
            return super().stream_frames(call, answer, ctx, chunks)
        include_usage = bool(call.extra.get("include_usage"))
        groq_id = {"id": "req_" + ctx.request_id[-26:]}

        def chunk(choices: list[object]) -> dict[str, object]:
            obj: dict[str, object] = {
                "id": ctx.response_id,
                "object": "chat.completion.chunk",
                "created": ctx.created,
                "model": call.model,
            }
            if profile.system_fingerprint is not None:
                obj["system_fingerprint"] = profile.system_fingerprint
            obj["choices"] = choices
            if profile.null_usage and (include_usage or profile.usage_place == "final_chunk"):
                obj["usage"] = None
            return obj

        def delta(content: dict[str, object], finish: str | None = None) -> dict[str, object]:
            if profile.name == "ollama":
                content = {"role": "assistant", "content": "", **content}
            choice: dict[str, object] = {
                "index": 0,
                "delta": content,
                "logprobs": None,
                "finish_reason": finish,
            }
            if profile.name == "vllm":
                choice["stop_reason"] = None
            return chunk([choice])

        objects: list[dict[str, object]] = []
        if answer.tool_name is not None and profile.name == "ollama":
            # Ollama sends a call whole, arguments included, in one chunk.
            call_obj = {
                "id": self._tool_call_id(profile),
                "index": 0,
                "type": "function",
                "function": {"name": answer.tool_name, "arguments": answer.tool_arguments},
            }
            objects.append(delta({"tool_calls": [call_obj]}))
        elif answer.tool_name is not None:
            head = {
                "index": 0,
                "id": self._tool_call_id(profile),
                "type": "function",
                "function": {"name": answer.tool_name, "arguments": ""},
            }
            objects.append(delta({"role": "assistant", "content": None, "tool_calls": [head]}))
            for fragment in answer.argument_pieces(chunks):
                objects.append(delta({"tool_calls": [{"index": 0, "function": {"arguments": fragment}}]}))
        else:
            objects.append(delta({"role": "assistant", "content": ""}))
            if answer.reasoning_tokens:
                objects.append(delta({profile.reasoning_field: REASONING_TEXT}))
            for piece in answer.text_pieces(chunks):
                objects.append(delta({"content": piece}))
        if answer.tool_name is not None and answer.reasoning_tokens:
            objects.insert(1, delta({profile.reasoning_field: REASONING_TEXT}))
        finish = delta({"content": ""} if profile.name == "vllm" else {}, answer.finish)
        if profile.usage_place == "final_chunk":
            finish["usage"] = _usage(profile, answer)
        if profile.usage_place == "x_groq":
            objects[0]["x_groq"] = groq_id
            finish["x_groq"] = {**groq_id, "usage": _usage(profile, answer)}
        objects.append(finish)
        if include_usage and profile.usage_place in ("include_usage", "x_groq"):
            usage_chunk = chunk([])
            usage_chunk["usage"] = _usage(profile, answer)
            objects.append(usage_chunk)
        if profile.name == "llamacpp":
            objects[-1]["timings"] = _timings(answer)
        frames = [sse(obj) for obj in objects]
        if profile.name == "deepseek":
            frames[0] = b": keep-alive\n\n" + frames[0]
        return frames

    # -- models ------------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        """`GET /<preset>/v1/models` and `GET /<preset>/v1/models/{model}`."""
        profile = _profile(request)
        if profile.name == "generic":
            return await super().models(request)
        ctx = self.new_context(request)
        headers = self.headers(ctx, None)
        auth = self.check_auth(request, ctx)
        if auth is not None:
            return json_reply(auth.status, auth.body, headers)
        created = 1_735_689_600
        objects = [
            {"id": m, "object": "model", "created": created, "owned_by": profile.owned_by}
            for m in profile.models
        ]
        wanted = request.match_info.get("model")
        if wanted is None:
            return json_reply(200, {"object": "list", "data": objects}, headers)
        found = next((obj for obj in objects if obj["id"] == wanted), None)
        if found is None:
            body = self._preset_error_body(profile, 404, None, None, None, 0, self.api_key or "none", wanted)
            return json_reply(404, body, headers)
        return json_reply(200, found, headers)


def preset_base_url(root_url: str, preset: str) -> str:
    """The base URL a catalog provider of `preset` uses: ``<root_url>/<preset>/v1``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    return f"{root_url.rstrip('/')}/{preset}/v1"


def provider_base_url(root_url: str, options: Mapping[str, object]) -> str:
    """The base URL `switchyard run` gives a provider with these catalog `options`: its preset's."""
    return preset_base_url(root_url, str(options.get("preset", "generic")))


def build_app(knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
    """The simulator of every preset, each under ``/<preset>/v1``.

    `knobs` are the start-up knobs (shared by all presets); with `api_key` set, requests
    must send `Authorization: Bearer <api_key>` -- except to Ollama, which has no
    authentication. Serve with `switchyard.sim.faults.serve_app` (handler cancellation on).
    """
    dialect = CompatibleDialect(api_key)
    prefix = "/" + _PRESET_PATTERN + "/v1"
    return build_simulator_app(
        dialect,
        knobs,
        [prefix + "/chat/completions"],
        {
            ("GET", prefix + "/models"): dialect.models,
            ("GET", prefix + "/models/{model}"): dialect.models,
        },
    )
