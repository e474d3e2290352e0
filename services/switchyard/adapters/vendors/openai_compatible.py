"""OpenAI-compatible providers: Groq, xAI, DeepSeek, Together, vLLM, Ollama, llama.cpp.

They all speak OpenAI's Chat Completions (`POST /chat/completions`, `data:` chunks ending
with `data: [DONE]`, `{"error": {...}}` bodies), so the request translation, the chunk
decoding and the error table are the OpenAI translator's (`openai.py`). What differs is
configured per provider in the catalog's `provider.options` -- never by forking the code:

* `preset` -- `groq | xai | deepseek | together | vllm | ollama | llamacpp | generic`
  (default `generic`): the defaults for every setting below.
* `max_tokens_field` -- `max_tokens` or `max_completion_tokens`: the field that caps
  generated tokens.
* `stream_usage` -- where a stream reports usage:
  `include_usage` -- send `stream_options: {include_usage: true}`; usage arrives in a
  trailing chunk (normally `choices: []`);
  `final_chunk` -- send no `stream_options`; usage arrives on the chunk with the
  `finish_reason`;
  `x_groq` -- send no `stream_options`; usage arrives in `x_groq.usage` of the last chunk;
  `none` -- the server never reports usage in streams: send nothing, estimate (~4
  characters per token) and mark the usage `estimated`.
  Whatever the mode, a top-level `usage` that does arrive is used (the last one wins),
  and a stream without any usage is estimated and marked `estimated`.
* `cached_tokens_field` -- dotted path, inside the usage object, of the cached prompt
  tokens (`prompt_tokens_details.cached_tokens`, DeepSeek's `prompt_cache_hit_tokens`), or
  `none` when the server reports none.
* `reasoning_field` -- the delta / message field holding reasoning text (`reasoning_content`
  or `reasoning`), surfaced as `Delta.reasoning_text` and never as answer text; `none`
  when the server has no such field.
* `supports` -- the features the server honours, a list of: `tools` (tool definitions and
  tool-call history), `tool_choice` (modes NONE and REQUIRED), `named_tool_choice` (mode
  TOOL), `vision` (image parts), `image_urls` (images by http(s) URL, not only inline
  data), `json_object`, `json_schema`, `seed`, `end_user` (the `user` field), `penalties`
  (presence and frequency), `names` (participant names on messages). A request using a
  feature not listed is refused with INVALID_ARGUMENT naming the field -- never sent to a
  server that would reject it or, worse, silently ignore it.
* `max_stop_sequences` -- at most this many stop sequences (an integer, or null for no
  limit checked here).
* `auth` -- `bearer` (`Authorization: Bearer <key>` when a key is configured) or `none`
  (never send the key, for local servers without authentication).
* `system_role` -- `system` or `developer` (as for OpenAI); `probe` -- see `ProviderClient`.

An unknown option, preset, feature or value fails at adapter start with a message naming
it. Presets (values, then where each fact comes from):

| preset   | max tokens field      | stream usage  | cached tokens           | reasoning         | stop |
|----------|-----------------------|---------------|-------------------------|-------------------|------|
| generic  | max_tokens            | include_usage | details (1)             | reasoning_content | 4    |
| groq     | max_completion_tokens | x_groq        | details (1)             | reasoning         | 4    |
| xai      | max_completion_tokens | include_usage | details (1)             | reasoning_content | --   |
| deepseek | max_tokens            | include_usage | prompt_cache_hit_tokens | reasoning_content | 16   |
| together | max_tokens            | final_chunk   | none                    | reasoning         | --   |
| vllm     | max_tokens            | include_usage | details (1)             | reasoning         | --   |
| ollama   | max_tokens            | include_usage | none                    | reasoning         | --   |
| llamacpp | max_tokens            | include_usage | none                    | reasoning_content | --   |

(1) `prompt_tokens_details.cached_tokens`. `auth` is `bearer` except for ollama (`none`).
Every preset supports every feature except: generic, xai -- none missing; groq --
`names`; deepseek -- `vision`, `image_urls`, `json_schema`, `seed`, `end_user`; together,
vllm -- `end_user`; ollama -- `tool_choice`, `named_tool_choice`, `image_urls`,
`end_user`, `names`; llamacpp -- `named_tool_choice`, `end_user`, `names`. Where each
fact comes from:

* generic: OpenAI's documented chunk and usage shapes; `max_tokens` because every
  compatible server accepts it (many reject or ignore `max_completion_tokens`); OpenAI's
  limit of four stop sequences.
* groq: console.groq.com/docs/openai -- `logprobs`, `logit_bias`, `top_logprobs`,
  `messages[].name` and `n` != 1 are answered with 400; the Groq SDK's
  `ChatCompletionChunk` carries `x_groq` with `id` (first and final chunk) and `usage`
  (final chunk), `delta.reasoning` (with `reasoning_format: parsed`), and a top-level
  `usage` only with `stream_options`; `max_tokens` is deprecated for
  `max_completion_tokens`; errors in OpenAI's shape (429 `type` "tokens"/"requests", code
  `rate_limit_exceeded`; 498 `capacity_exceeded` for the flex tier);
  console.groq.com/docs/rate-limits -- OpenAI's `x-ratelimit-*` headers, `retry-after` on
  429.
* xai: docs.x.ai debugging -- a wrong key is a 400 (a missing one a 401) with body
  `{"code": "<gRPC status text>", "error": "<message>"}` (e.g. "Client specified an
  invalid argument"); `max_completion_tokens`; `delta.reasoning_content` and
  `completion_tokens_details.reasoning_tokens` (grok-3-mini).
* deepseek: api-docs.deepseek.com (create chat completion, error codes, context caching,
  reasoning model) -- `max_tokens`, `stream_options.include_usage`, usage
  `prompt_cache_hit_tokens` + `prompt_cache_miss_tokens` (their sum is `prompt_tokens`),
  `delta.reasoning_content`; text-only user content, `response_format` only `text` /
  `json_object`, no `seed` or `user`, up to 16 stop sequences; 402 insufficient balance,
  422 invalid parameters, 503 overloaded; a context overflow is a 400 whose code is just
  `invalid_request_error` ("This model's maximum context length is ..."); `: keep-alive`
  comments while queued; no rate-limit headers.
* together: docs.together.ai (streaming) -- chunks carry `usage: null` until the last one,
  which has the `finish_reason` and the usage; `max_tokens`; rate limits in
  `x-ratelimit-{limit,remaining,reset}` (requests) and `x-tokenlimit-{limit,remaining}`;
  a context overflow says "`inputs` tokens + `max_new_tokens` must be <= N".
* vllm: `vllm/entrypoints/openai` (protocol, serving_chat) -- `DeltaMessage.reasoning`
  (formerly `reasoning_content`), `stream_options.include_usage` (+
  `continuous_usage_stats`), `prompt_tokens_details.cached_tokens` with
  `--enable-prompt-tokens-details`, both max-token fields (`max_tokens` kept for older
  versions); `ErrorResponse {"error": {message, type: "BadRequestError", param, code:
  <HTTP status as int>}}` also inside streams; `user` is accepted but unused; `--api-key`
  answers 401 `{"error": "Unauthorized"}`.
* ollama: `openai/openai.go` -- `ChatCompletionRequest` has `max_tokens` (no
  `max_completion_tokens`), `seed`, `stop`, penalties, `response_format` (`json_object`,
  `json_schema`), `tools`, `stream_options` -- but no `tool_choice` and no `user`; images
  only as `data:image/...;base64` URLs; `delta.reasoning`; usage without details, in a
  `choices: []` chunk only with `include_usage` (`middleware/openai.go`); errors `{"error":
  {message, type, param, code: null}}`; no authentication.
* llamacpp: `tools/server` (`server-task.cpp`, `server-common.cpp`) -- `n_predict` from
  `max_completion_tokens` or `max_tokens`; the usage-only `choices: []` chunk only with
  `include_usage` (builds before Aug 2025 put usage on the finish chunk unasked; both are
  read); usage without details; `delta.reasoning_content`; `tool_choice` only as
  "auto" / "none" / "required"; errors `{"error": {code: <int>, message, type}}` with type
  `exceed_context_size_error` for a context overflow; optional `--api-key`.

Errors the OpenAI table does not know are mapped here: 402 (a prepaid balance is empty)
is RESOURCE_EXHAUSTED / RATE_LIMITED with `quota=exhausted` and no RetryInfo (like OpenAI's
`insufficient_quota`); 498 (Groq flex capacity) is UNAVAILABLE / PROVIDER_OVERLOADED; a
context overflow is recognised by code or type (`context_length_exceeded`,
`exceed_context_size_error`) or, for servers that give none, by a few fixed phrases of
the message ("maximum context length", ...); xAI's wrong-key 400 by "incorrect api key".
The message is only searched for those phrases: it is never copied into an error.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import grpc

from switchyard.adapters.base import (
    DEFAULT_RATE_LIMIT_RETRY_S,
    VendorRequest,
    clamp_uint32,
    parse_count,
    parse_error_body,
    parse_retry_after,
    safe_code,
    timestamp_at,
)
from switchyard.adapters.vendors.openai import (
    OpenAIStreamDecoder,
    OpenAITranslator,
    reset_of_exhausted_limit,
)
from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.v1 import common_pb2, provider_pb2

PRESET_NAMES: Final = ("groq", "xai", "deepseek", "together", "vllm", "ollama", "llamacpp", "generic")
FEATURES: Final = (
    "tools",
    "tool_choice",
    "named_tool_choice",
    "vision",
    "image_urls",
    "json_object",
    "json_schema",
    "seed",
    "end_user",
    "penalties",
    "names",
)
STREAM_USAGE_MODES: Final = ("include_usage", "final_chunk", "x_groq", "none")
MAX_TOKENS_FIELDS: Final = ("max_tokens", "max_completion_tokens")
AUTH_MODES: Final = ("bearer", "none")
OPTION_NAMES: Final = frozenset(
    {
        "preset",
        "max_tokens_field",
        "stream_usage",
        "cached_tokens_field",
        "reasoning_field",
        "supports",
        "max_stop_sequences",
        "auth",
        "system_role",
        "probe",
    }
)

# Codes or types that mean "the prompt does not fit the context window".
_CONTEXT_CODES: Final = frozenset({"context_length_exceeded", "exceed_context_size_error"})
# For servers whose context-overflow error has no such code: fixed phrases of the message
# (lowercased). The message is searched, never copied.
_CONTEXT_PHRASES: Final = (
    "maximum context length",  # OpenAI wording, reused by DeepSeek and vLLM
    "maximum prompt length",  # xAI
    "exceeds the available context size",  # llama.cpp
    "`inputs` tokens + `max_new_tokens`",  # Together (TGI wording)
    "exceeds the context length",  # Ollama
)
_AUTH_PHRASES: Final = ("incorrect api key",)  # xAI answers a wrong key with 400
# xAI's `code` is the text of a gRPC status; the HTTP status each one stands for.
_GRPC_TEXT_STATUS: Final = {
    "client specified an invalid argument": 400,
    "the request does not have valid authentication credentials for the operation": 401,
    "the caller does not have permission to execute the specified operation": 403,
    "some requested entity was not found": 404,
    "some resource has been exhausted": 429,
    "internal error": 500,
    "the service is currently unavailable": 503,
    "deadline expired before operation could complete": 504,
}
_IDENTIFIER_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_.")


@dataclass(frozen=True, slots=True)
class CompatSettings:
    """The resolved settings of one OpenAI-compatible provider (a preset plus overrides)."""

    preset: str
    max_tokens_field: str
    stream_usage: str
    cached_tokens_field: str
    reasoning_field: str
    supports: frozenset[str]
    max_stop_sequences: int | None
    auth: str


_ALL: Final = frozenset(FEATURES)

PRESETS: Final[Mapping[str, CompatSettings]] = {
    "generic": CompatSettings(
        "generic",
        "max_tokens",
        "include_usage",
        "prompt_tokens_details.cached_tokens",
        "reasoning_content",
        _ALL,
        4,
        "bearer",
    ),
    "groq": CompatSettings(
        "groq",
        "max_completion_tokens",
        "x_groq",
        "prompt_tokens_details.cached_tokens",
        "reasoning",
        _ALL - {"names"},
        4,
        "bearer",
    ),
    "xai": CompatSettings(
        "xai",
        "max_completion_tokens",
        "include_usage",
        "prompt_tokens_details.cached_tokens",
        "reasoning_content",
        _ALL,
        None,
        "bearer",
    ),
    "deepseek": CompatSettings(
        "deepseek",
        "max_tokens",
        "include_usage",
        "prompt_cache_hit_tokens",
        "reasoning_content",
        _ALL - {"vision", "image_urls", "json_schema", "seed", "end_user"},
        16,
        "bearer",
    ),
    "together": CompatSettings(
        "together", "max_tokens", "final_chunk", "none", "reasoning", _ALL - {"end_user"}, None, "bearer"
    ),
    "vllm": CompatSettings(
        "vllm",
        "max_tokens",
        "include_usage",
        "prompt_tokens_details.cached_tokens",
        "reasoning",
        _ALL - {"end_user"},
        None,
        "bearer",
    ),
    "ollama": CompatSettings(
        "ollama",
        "max_tokens",
        "include_usage",
        "none",
        "reasoning",
        _ALL - {"tool_choice", "named_tool_choice", "image_urls", "end_user", "names"},
        None,
        "none",
    ),
    "llamacpp": CompatSettings(
        "llamacpp",
        "max_tokens",
        "include_usage",
        "none",
        "reasoning_content",
        _ALL - {"named_tool_choice", "end_user", "names"},
        None,
        "bearer",
    ),
}
assert tuple(sorted(PRESETS)) == tuple(sorted(PRESET_NAMES))


def resolve_settings(provider_name: str, options: Mapping[str, Any]) -> CompatSettings:
    """The settings of a provider from its `options`: the preset's, overridden one by one.

    Raises ValueError naming the provider and the offending option for an unknown option,
    preset, feature or value.
    """
    where = f"provider {provider_name!r}"
    unknown = sorted(str(key) for key in options if key not in OPTION_NAMES)
    if unknown:
        raise ValueError(
            f"{where}: unknown option(s) {', '.join(unknown)} for vendor openai_compatible; "
            f"known: {', '.join(sorted(OPTION_NAMES))}"
        )
    preset_name = options.get("preset", "generic")
    if not isinstance(preset_name, str) or preset_name not in PRESETS:
        raise ValueError(
            f"{where}: options.preset must be one of {', '.join(PRESET_NAMES)}, not {preset_name!r}"
        )
    preset = PRESETS[preset_name]

    def choice(name: str, allowed: tuple[str, ...], default: str) -> str:
        value = options.get(name, default)
        if value not in allowed:
            raise ValueError(f"{where}: options.{name} must be one of {', '.join(allowed)}, not {value!r}")
        return str(value)

    def identifier(name: str, default: str) -> str:
        value = options.get(name, default)
        if not isinstance(value, str) or not value or not set(value) <= _IDENTIFIER_CHARS:
            raise ValueError(
                f"{where}: options.{name} must be a field name (lowercase letters, digits, '_', "
                f"'.' for nesting) or 'none', not {value!r}"
            )
        return value

    supports = preset.supports
    if "supports" in options:
        listed = options["supports"]
        if not isinstance(listed, (list, tuple)) or not all(isinstance(item, str) for item in listed):
            raise ValueError(f"{where}: options.supports must be a list of feature names")
        wrong = sorted(set(listed) - _ALL)
        if wrong:
            raise ValueError(
                f"{where}: options.supports has unknown feature(s) {', '.join(wrong)}; "
                f"known: {', '.join(FEATURES)}"
            )
        supports = frozenset(listed)
    max_stop = preset.max_stop_sequences
    if "max_stop_sequences" in options:
        raw = options["max_stop_sequences"]
        if raw is not None and (isinstance(raw, bool) or not isinstance(raw, int) or raw < 1):
            raise ValueError(f"{where}: options.max_stop_sequences must be a positive integer or null")
        max_stop = raw
    return CompatSettings(
        preset=preset.preset,
        max_tokens_field=choice("max_tokens_field", MAX_TOKENS_FIELDS, preset.max_tokens_field),
        stream_usage=choice("stream_usage", STREAM_USAGE_MODES, preset.stream_usage),
        cached_tokens_field=identifier("cached_tokens_field", preset.cached_tokens_field),
        reasoning_field=identifier("reasoning_field", preset.reasoning_field),
        supports=supports,
        max_stop_sequences=max_stop,
        auth=choice("auth", AUTH_MODES, preset.auth),
    )


class OpenAICompatibleTranslator(OpenAITranslator):
    """Chat Completions for one OpenAI-compatible provider, shaped by its settings."""

    vendor: ClassVar[str] = "openai_compatible"

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        settings = resolve_settings(provider_name, provider.options)
        super().__init__(provider_name, provider, api_key if settings.auth == "bearer" else None)
        self.settings = settings

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider_name!r}, preset={self.settings.preset!r})"

    # -- request ----------------------------------------------------------------
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The streaming request; features the server does not honour are refused first."""
        self._refuse_unsupported(request.request)
        built = super().build_request(request)
        if built.body is None or "tool_choice" in self.settings.supports or "tool_choice" not in built.body:
            return built
        # Only AUTO gets here (other modes were refused): it is what such a server does
        # anyway, so the field it would not understand is left out.
        body = dict(built.body)
        del body["tool_choice"]
        return VendorRequest(built.method, built.path, built.headers, body)

    def stream_options(self) -> dict[str, Any] | None:
        """`{include_usage: true}` only where usage has to be asked for."""
        return {"include_usage": True} if self.settings.stream_usage == "include_usage" else None

    def output_limit_field(self) -> str:
        return self.settings.max_tokens_field

    def stop_sequence_limit(self) -> int | None:
        return None  # checked (with this provider's limit) in `_refuse_unsupported`

    def _unsupported(self, what: str, field: str) -> SwitchyardError:
        return invalid(
            f"provider {self.provider_name!r} ({self.settings.preset}) does not support {what}",
            field,
            preset=self.settings.preset,
        )

    def _refuse_unsupported(self, chat: common_pb2.ChatRequest) -> None:
        supports = self.settings.supports
        for i, message in enumerate(chat.messages):
            where = f"messages[{i}]"
            if message.name and "names" not in supports and message.role != common_pb2.ROLE_TOOL:
                raise self._unsupported("participant names", f"{where}.name")
            if "tools" not in supports:
                if message.tool_calls:
                    raise self._unsupported("tool calls", f"{where}.tool_calls")
                if message.tool_call_id:
                    raise self._unsupported("tool results", f"{where}.tool_call_id")
            for j, part in enumerate(message.parts):
                if not part.HasField("image"):
                    continue
                if "vision" not in supports:
                    raise self._unsupported("images", f"{where}.parts[{j}].image")
                url = part.image.url
                if url and not url.startswith("data:") and "image_urls" not in supports:
                    raise self._unsupported("images by URL (send the bytes)", f"{where}.parts[{j}].image.url")
        if chat.tools and "tools" not in supports:
            raise self._unsupported("tools", "tools")
        if chat.HasField("tool_choice"):
            mode = chat.tool_choice.mode
            if mode == common_pb2.TOOL_CHOICE_MODE_TOOL and "named_tool_choice" not in supports:
                raise self._unsupported("forcing a named tool", "tool_choice.mode")
            if (
                mode in (common_pb2.TOOL_CHOICE_MODE_NONE, common_pb2.TOOL_CHOICE_MODE_REQUIRED)
                and "tool_choice" not in supports
            ):
                raise self._unsupported("tool choice modes other than auto", "tool_choice.mode")
        if chat.HasField("response_format"):
            kind = chat.response_format.type
            if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT and "json_object" not in supports:
                raise self._unsupported("JSON mode", "response_format")
            if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA and "json_schema" not in supports:
                raise self._unsupported("JSON schema output", "response_format.json_schema")
        if chat.HasField("sampling"):
            sampling = chat.sampling
            if sampling.HasField("seed") and "seed" not in supports:
                raise self._unsupported("a seed", "sampling.seed")
            if "penalties" not in supports:
                if sampling.HasField("presence_penalty"):
                    raise self._unsupported("a presence penalty", "sampling.presence_penalty")
                if sampling.HasField("frequency_penalty"):
                    raise self._unsupported("a frequency penalty", "sampling.frequency_penalty")
            limit = self.settings.max_stop_sequences
            if limit is not None and len(sampling.stop_sequences) > limit:
                raise invalid(
                    f"provider {self.provider_name!r} ({self.settings.preset}) accepts at most "
                    f"{limit} stop sequences",
                    "sampling.stop_sequences",
                )
        if chat.metadata.end_user and "end_user" not in supports:
            raise self._unsupported("an end-user id", "metadata.end_user")

    # -- response -----------------------------------------------------------------
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> OpenAICompatibleStreamDecoder:
        return OpenAICompatibleStreamDecoder(self, request.request)

    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """OpenAI's `x-ratelimit-*` headers, plus the unsuffixed request figures
        (`x-ratelimit-{limit,remaining}`, `x-ratelimit-reset` in seconds) and
        `x-tokenlimit-{limit,remaining}` some servers (Together) send instead."""
        headroom = super().headroom(headers)
        found = headroom is not None
        result = headroom if headroom is not None else common_pb2.RateLimitHeadroom()
        now = time.time()
        limit_requests = parse_count(headers, "x-ratelimit-limit")
        if limit_requests is not None and not result.HasField("limit_requests"):
            result.limit_requests = clamp_uint32(limit_requests)
            found = True
        remaining_requests = parse_count(headers, "x-ratelimit-remaining")
        if remaining_requests is not None and not result.HasField("remaining_requests"):
            result.remaining_requests = clamp_uint32(remaining_requests)
            found = True
        limit_tokens = parse_count(headers, "x-tokenlimit-limit")
        if limit_tokens is not None and not result.HasField("limit_tokens"):
            result.limit_tokens = clamp_uint32(limit_tokens)
            found = True
        remaining_tokens = parse_count(headers, "x-tokenlimit-remaining")
        if remaining_tokens is not None and not result.HasField("remaining_tokens"):
            result.remaining_tokens = clamp_uint32(remaining_tokens)
            found = True
        reset = _seconds(headers.get("x-ratelimit-reset"))
        if reset is not None and not result.HasField("requests_reset_at"):
            result.requests_reset_at.CopyFrom(timestamp_at(now + reset))
            found = True
        if not found:
            return None
        if not result.HasField("observed_at"):
            result.observed_at.CopyFrom(timestamp_at(now))
        return result

    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for an HTTP error answer, whatever its body's shape."""
        parsed = parse_error_body(body)
        code, kind, hint, _declared = _read_error(
            parsed.get("error") if isinstance(parsed, dict) else None, parsed
        )
        retry_after = parse_retry_after(headers)
        if retry_after is None and status == 429:
            retry_after = reset_of_exhausted_limit(headers)
            if retry_after is None and parse_count(headers, "x-ratelimit-remaining") == 0:
                retry_after = _seconds(headers.get("x-ratelimit-reset"))
        extra = self.request_id_metadata(headers)
        return self.error_for(
            status, code, kind, headroom=self.headroom(headers), retry_after_s=retry_after, hint=hint, **extra
        )

    def stream_error(self, error: object) -> SwitchyardError:
        """An error inside a 200 stream: `{"error": {...}}` (with an int `code` on vLLM and
        llama.cpp), xAI's `{"code", "error"}`, or Groq's `x_groq.error` text."""
        if isinstance(error, dict) and isinstance(error.get("error"), str):
            code, kind, hint, declared = _read_error(error["error"], error)  # xAI's flat shape
        else:
            code, kind, hint, declared = _read_error(error, None)
        if declared is None and hint:
            declared = 400  # a context overflow or a wrong key, known by its message
        status = declared or self.stream_error_status({"code": code, "type": kind})
        return self.error_for(status, code, kind, hint=hint, in_stream="true")

    def error_for(
        self,
        status: int,
        code: str,
        kind: str,
        *,
        headroom: common_pb2.RateLimitHeadroom | None = None,
        retry_after_s: float | None = None,
        hint: str = "",
        **extra: str,
    ) -> SwitchyardError:
        """OpenAI's table (see `OpenAITranslator.error_for`), plus 402, 498, context
        overflows known by type or message, and xAI's wrong-key 400."""
        label = f"HTTP {status}" + (f" ({code or kind})" if code or kind else "")
        where = f"provider {self.provider_name!r}"
        if status == 402:
            metadata = self._metadata(status, code, kind, headroom, extra)
            metadata["quota"] = "exhausted"
            return SwitchyardError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                Reason.RATE_LIMITED,
                f"{where} refused the request: the account's balance is exhausted ({label})",
                metadata=metadata,
            )
        if status == 498:
            return SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.PROVIDER_OVERLOADED,
                f"{where} has no capacity for the request ({label})",
                metadata=self._metadata(status, code, kind, headroom, extra),
                retry_after_s=retry_after_s if retry_after_s is not None else DEFAULT_RATE_LIMIT_RETRY_S,
            )
        if status == 400 and hint == "auth":
            return SwitchyardError(
                grpc.StatusCode.FAILED_PRECONDITION,
                Reason.AUTH_FAILED,
                f"{where} rejected the configured credentials ({label})",
                metadata=self._metadata(status, code, kind, headroom, extra),
            )
        if status in (400, 413, 422) and (
            hint == "context" or code in _CONTEXT_CODES or kind in _CONTEXT_CODES
        ):
            return SwitchyardError(
                grpc.StatusCode.INVALID_ARGUMENT,
                Reason.CONTEXT_TOO_LONG,
                f"the prompt and output limit exceed the model's context window ({label})",
                metadata=self._metadata(status, code, kind, headroom, extra),
            )
        return super().error_for(status, code, kind, headroom=headroom, retry_after_s=retry_after_s, **extra)

    def _metadata(
        self,
        status: int,
        code: str,
        kind: str,
        headroom: common_pb2.RateLimitHeadroom | None,
        extra: Mapping[str, str],
    ) -> dict[str, str]:
        metadata = self.error_metadata(status, code or kind, headroom, **extra)
        if kind and kind != code:
            metadata["vendor_type"] = kind
        return metadata


class OpenAICompatibleStreamDecoder(OpenAIStreamDecoder):
    """OpenAI's chunk decoding, reading usage, cached tokens, reasoning and in-stream
    errors where this provider puts them."""

    def __init__(self, translator: OpenAICompatibleTranslator, chat: common_pb2.ChatRequest) -> None:
        super().__init__(translator, chat)
        self._settings = translator.settings

    def error_of(self, chunk: dict[str, Any]) -> object:
        error = chunk.get("error")
        if error is not None:
            # xAI's flat `{"code": "...", "error": "..."}`: the whole object is the error.
            return chunk if isinstance(error, str) else error
        x_groq = chunk.get("x_groq")
        if isinstance(x_groq, dict):
            groq_error = x_groq.get("error")
            if groq_error:
                return groq_error
        return None

    def usage_of(self, chunk: dict[str, Any]) -> object:
        if self._settings.stream_usage == "x_groq":
            x_groq = chunk.get("x_groq")
            if isinstance(x_groq, dict) and x_groq.get("usage"):
                return x_groq["usage"]
        return chunk.get("usage")

    def reasoning_of(self, delta: dict[str, Any]) -> object:
        field = self._settings.reasoning_field
        return None if field == "none" else delta.get(field)

    def cached_tokens_of(self, usage: dict[str, Any], prompt_details: dict[str, Any]) -> object:
        path = self._settings.cached_tokens_field
        if path == "none":
            return None
        value: object = usage
        for key in path.split("."):
            if not isinstance(value, dict):
                return None
            value = value.get(key)
        return value


# --------------------------------------------------------------------------- #
# error pieces
# --------------------------------------------------------------------------- #


def _read_error(error: object, envelope: object) -> tuple[str, str, str, int | None]:
    """(code, type, hint, declared status) of an error object: OpenAI's `{message, type,
    param, code}` (code a string, or an int HTTP status on vLLM and llama.cpp), a bare
    string (vLLM's "Unauthorized", Groq's `x_groq.error`), or xAI's `{"code": "<gRPC
    status text>", "error": "<message>"}` passed as `envelope`. The hint is "context" or
    "auth" when the message says so; the message itself is not kept."""
    code = kind = ""
    declared: int | None = None
    message: object = None
    if isinstance(error, dict):
        raw_code = error.get("code")
        if isinstance(raw_code, int) and not isinstance(raw_code, bool):
            declared = raw_code if 400 <= raw_code <= 599 else None
        else:
            code = safe_code(raw_code)
        kind = safe_code(error.get("type"))
        for key in ("status", "status_code"):
            value = error.get(key)
            if declared is None and isinstance(value, int) and 400 <= value <= 599:
                declared = value
        message = error.get("message")
    elif isinstance(error, str):
        message = error
        if isinstance(envelope, dict) and isinstance(envelope.get("code"), str):
            text = envelope["code"]
            code = safe_code(text)
            declared = _GRPC_TEXT_STATUS.get(text.strip().lower())
    elif isinstance(envelope, dict):
        message = envelope.get("detail") if isinstance(envelope.get("detail"), str) else None
    return code, kind, _hint(message), declared


def _hint(message: object) -> str:
    if not isinstance(message, str) or not message:
        return ""
    text = message[:4096].lower()
    if any(phrase in text for phrase in _CONTEXT_PHRASES):
        return "context"
    if any(phrase in text for phrase in _AUTH_PHRASES):
        return "auth"
    return ""


def _seconds(raw: str | None) -> float | None:
    """A non-negative number of seconds, or None."""
    if not raw:
        return None
    try:
        value = float(raw.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
