"""The vendor-neutral machinery of a provider adapter.

A vendor is supported by one `Translator` (in `switchyard.adapters.vendors`) with a small
interface: unified request in, vendor HTTP request out; vendor SSE events (or a whole JSON
body) in, unified `GenerateResponse` events out; vendor HTTP error in, `SwitchyardError`
out; response headers in, `RateLimitHeadroom` out. Everything else lives here once:

* `SseParser` -- an incremental `text/event-stream` parser (bytes in, events out).
* `ProviderClient` -- one pooled HTTP client per provider (an `aiohttp.ClientSession`, or an
  `httpx.AsyncClient` for a provider with `http2: true`, behind one small transport
  interface), the streaming call with its connect / first-byte / idle timeouts, the mapping
  of transport failures to statuses, closing the upstream the moment the caller goes away,
  and the provider probe.
* Small shared helpers: Go-style durations, `retry-after`, token estimates, error metadata.

Nothing here logs per chunk or holds prompt text beyond the call that needs it; error
messages and metadata never carry prompts, completions or keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import math
import os
import re
import ssl
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, ClassVar, Final, Protocol

import aiohttp
import aiohttp.http_exceptions
import grpc
import httpx
import orjson
import yarl
from google.protobuf import timestamp_pb2

from switchyard.common.catalog import Provider
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.common.idle import IdleDeadline
from switchyard.v1 import common_pb2, provider_pb2

# Error bodies are only read for their code and type; a vendor never needs more than this.
ERROR_BODY_LIMIT: Final = 64 * 1024
# Embeddings: texts per call, and the largest answer read (2,048 vectors of 3,072 floats as JSON).
MAX_EMBED_INPUTS: Final = 2_048
MAX_EMBED_BODY: Final = 256 * 1024 * 1024
# A non-streamed (JSON) answer, when a vendor ignores `stream: true`.
JSON_BODY_LIMIT: Final = 16 * 1024 * 1024
# One SSE event larger than this is a broken or hostile upstream, not an answer.
MAX_EVENT_BYTES: Final = 8 * 1024 * 1024
# After the vendor's end marker, how long to wait for the body's end so the connection
# can go back to the pool (the caller already has `done` by then).
DRAIN_TIMEOUT_S: Final = 0.5
# Estimates when a vendor reports no usage: ~4 characters per token (OpenAI's rule of
# thumb for English) and a flat 85 tokens per image (OpenAI's low-detail image cost).
CHARS_PER_TOKEN: Final = 4
IMAGE_TOKENS_ESTIMATE: Final = 85
# A 429 without any hint of when to come back: wait this long.
DEFAULT_RATE_LIMIT_RETRY_S: Final = 1.0
_UINT32_MAX: Final = 2**32 - 1
PROBE_MODES: Final = ("models", "completion")


# --------------------------------------------------------------------------- #
# Server-sent events
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class SseEvent:
    """One dispatched server-sent event: its `data` lines joined by LF, as bytes."""

    data: bytes
    event: str | None = None
    id: str | None = None


class SseError(ValueError):
    """The byte stream cannot be a valid event stream (for example an oversized event)."""


class SseParser:
    """Incremental `text/event-stream` parser (WHATWG HTML, "server-sent events").

    Feed it the body's chunks as they arrive; it returns the events each chunk completes.
    Lines end in CRLF, LF or CR, and a line may be split anywhere across chunks (including
    between the CR and LF of one CRLF). `data:` lines accumulate (joined by LF), `event:`
    and `id:` set the event's type and id, lines starting with `:` are comments, unknown
    fields and `retry:` are ignored, and a blank line dispatches the event; a blank line
    with no data dispatches nothing. Data stays bytes so JSON payloads are parsed once,
    straight from the wire, by the translator.
    """

    __slots__ = (
        "_buffer",
        "_data",
        "_data_size",
        "_event",
        "_id",
        "_max_event_bytes",
        "_skip_lf",
        "_started",
    )

    def __init__(self, max_event_bytes: int = MAX_EVENT_BYTES) -> None:
        self._buffer = b""
        self._skip_lf = False
        self._started = False
        self._data: list[bytes] = []
        self._data_size = 0
        self._event: str | None = None
        self._id: str | None = None
        self._max_event_bytes = max_event_bytes

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events completed by `chunk` (possibly none)."""
        if not chunk:
            return []
        if self._skip_lf:
            # The previous chunk ended in CR: an LF here is the second half of that CRLF.
            self._skip_lf = False
            if chunk[0] == 0x0A:
                chunk = chunk[1:]
                if not chunk:
                    return []
        if not self._started:
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        buffer = self._buffer + chunk if self._buffer else chunk
        lines = buffer.splitlines()
        last = buffer[-1]
        if last == 0x0A or last == 0x0D:
            self._buffer = b""
            self._skip_lf = last == 0x0D
        else:
            self._buffer = lines.pop()
            if len(self._buffer) + self._data_size > self._max_event_bytes:
                raise SseError("event exceeds the size limit")
        events: list[SseEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[SseEvent]:
        """At a clean end of the body: the last event, if the server omitted its blank line.

        The standard discards such an event; some servers end the body right after the
        last `data:` line, and losing their end marker would turn a complete answer into
        an error, so it is dispatched.
        """
        events: list[SseEvent] = []
        if self._buffer:
            line, self._buffer = self._buffer, b""
            self._line(line, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SseEvent]) -> None:
        if not line:
            if self._data:
                data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
                events.append(SseEvent(data, self._event, self._id))
            self._data = []
            self._data_size = 0
            self._event = None
            return
        if line[0] == 0x3A:  # ":" -- a comment (keep-alive)
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value)
            self._data_size += len(value) + 1
            if self._data_size > self._max_event_bytes:
                raise SseError("event exceeds the size limit")
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            if b"\x00" not in value:
                self._id = value.decode("utf-8", "replace")


# --------------------------------------------------------------------------- #
# The translator interface
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class VendorRequest:
    """An HTTP request for a vendor: method, path relative to the provider's base URL,
    headers (which hold the API key, hence kept out of `repr`) and a JSON body."""

    method: str
    path: str
    headers: Mapping[str, str] = field(repr=False)
    body: Mapping[str, Any] | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class StreamOutcome:
    """How a vendor's answer ended: usage (reported or estimated), finish reason and ids."""

    usage: common_pb2.Usage
    finish_reason: common_pb2.FinishReason.ValueType
    vendor_request_id: str
    vendor_model: str


class StreamDecoder(ABC):
    """The per-call state of decoding one vendor answer into unified events.

    `on_event` (streamed) or `on_body` (a whole JSON answer) return the deltas in order;
    the vendor's usage, finish reason and ids are kept for `outcome`, which the caller
    turns into exactly one `usage` and one `done` event. Both raise `SwitchyardError` for
    an in-stream vendor error or an event they cannot parse.
    """

    finished: bool = False
    """True once the vendor's end-of-answer marker has been seen."""

    @abstractmethod
    def on_event(self, event: SseEvent) -> list[provider_pb2.GenerateResponse]:
        """The unified events for one server-sent event."""

    @abstractmethod
    def on_body(self, body: bytes) -> list[provider_pb2.GenerateResponse]:
        """The unified events for a whole (non-streamed) JSON answer; sets `finished`."""

    def on_eof(self) -> None:
        """The body ended cleanly; raise if the answer is incomplete.

        By default only the vendor's end marker makes an answer complete; a vendor whose
        streams may legitimately end without one overrides this.
        """
        if not self.finished:
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.PROVIDER_UNAVAILABLE,
                "the provider ended the stream before the answer was complete",
            )

    @abstractmethod
    def outcome(self) -> StreamOutcome:
        """Usage (estimated when the vendor sent none), finish reason, vendor id and model."""


class Translator(ABC):
    """One vendor's wire format, bound to one configured provider.

    Implementations live in `switchyard.adapters.vendors`, one file per vendor, and are
    registered by one row in `TRANSLATORS`. They hold no per-call state (that lives in the
    `StreamDecoder` from `new_decoder`) and do no I/O.
    """

    vendor: ClassVar[str]

    def __init__(self, provider_name: str, provider: Provider, api_key: str | None) -> None:
        self.provider_name = provider_name
        self.provider = provider
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(provider={self.provider_name!r})"

    @abstractmethod
    def build_request(self, request: provider_pb2.GenerateRequest) -> VendorRequest:
        """The vendor request for a unified one; raises INVALID_ARGUMENT naming any field
        the vendor cannot take (never silently dropping it)."""

    @abstractmethod
    def new_decoder(self, request: provider_pb2.GenerateRequest) -> StreamDecoder:
        """Fresh decoding state for one call of `request`."""

    @abstractmethod
    def map_error(self, status: int, headers: Mapping[str, str], body: bytes) -> SwitchyardError:
        """The unified error for a vendor HTTP error. `headers` looks names up
        case-insensitively (aiohttp's `CIMultiDictProxy` or `httpx.Headers`)."""

    @abstractmethod
    def headroom(self, headers: Mapping[str, str]) -> common_pb2.RateLimitHeadroom | None:
        """Rate-limit headroom from response headers; None when the vendor sent none."""

    @abstractmethod
    def models_request(self) -> VendorRequest:
        """The cheapest authenticated read, used by the default probe (list models)."""

    def request_id(self, headers: Mapping[str, str]) -> str:
        """The vendor's request id from response headers, for support tickets."""
        return headers.get("x-request-id", "")

    def embeddings_request(self, request: provider_pb2.EmbedRequest) -> VendorRequest:
        """The vendor request for embeddings; vendors whose embeddings are not spoken here
        answer UNIMPLEMENTED."""
        raise SwitchyardError(
            grpc.StatusCode.UNIMPLEMENTED,
            Reason.NOT_IMPLEMENTED,
            f"the {self.vendor} adapter does not serve embeddings",
            metadata={"provider": self.provider_name, "vendor": self.vendor},
        )

    def parse_embeddings(self, body: bytes, count: int) -> provider_pb2.EmbedResponse:
        """The unified answer for the vendor's embeddings body (`count` inputs were sent)."""
        raise SwitchyardError(
            grpc.StatusCode.UNIMPLEMENTED,
            Reason.NOT_IMPLEMENTED,
            f"the {self.vendor} adapter does not serve embeddings",
            metadata={"provider": self.provider_name, "vendor": self.vendor},
        )

    # -- shared helpers for implementations ---------------------------------
    def request_id_metadata(self, headers: Mapping[str, str]) -> dict[str, str]:
        """`vendor_request_id` (sanitised) when the vendor sent a request id; else empty."""
        request_id = self.request_id(headers)
        return {"vendor_request_id": safe_code(request_id)} if request_id else {}

    def error_metadata(
        self,
        http_status: int,
        vendor_code: str = "",
        headroom: common_pb2.RateLimitHeadroom | None = None,
        **extra: str,
    ) -> dict[str, str]:
        """ErrorInfo metadata every adapter error carries (never prompt text or keys)."""
        metadata = {"provider": self.provider_name, "vendor": self.vendor, "http_status": str(http_status)}
        if vendor_code:
            metadata["vendor_code"] = vendor_code
        if headroom is not None:
            metadata.update(headroom_metadata(headroom))
        metadata.update(extra)
        return metadata

    def protocol_error(self, what: str) -> SwitchyardError:
        """UNAVAILABLE / UPSTREAM_PROTOCOL_ERROR; `what` describes the problem, never the
        offending bytes (they may hold completion text)."""
        return SwitchyardError(
            grpc.StatusCode.UNAVAILABLE,
            Reason.UPSTREAM_PROTOCOL_ERROR,
            f"provider {self.provider_name!r} sent {what}",
            metadata={"provider": self.provider_name, "vendor": self.vendor},
        )


# --------------------------------------------------------------------------- #
# Shared helpers
# --------------------------------------------------------------------------- #

_SAFE_CODE = re.compile(r"[^A-Za-z0-9_.:-]")
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def http_status_class(
    status: int, where: str, label: str, retry_after_s: float | None
) -> tuple[grpc.StatusCode, Reason, str, float | None] | None:
    """What the statuses every vendor uses alike mean: 404, 408/504, 503/529 and other 5xx.

    Returns (gRPC code, reason, message, retry-after) or None for any other status, which the
    vendor's own error table decides. `where` names the provider, `label` the status and code.
    """
    if status == 404:
        return (
            grpc.StatusCode.NOT_FOUND,
            Reason.NOT_FOUND,
            f"{where} does not know the model or endpoint ({label})",
            None,
        )
    if status in (408, 504):
        return grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT, f"{where} timed out ({label})", None
    if status in (503, 529):
        return (
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_OVERLOADED,
            f"{where} is overloaded ({label})",
            retry_after_s,
        )
    if status >= 500:
        return (
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            f"{where} failed ({label})",
            retry_after_s,
        )
    return None


def require_model_and_messages(request: provider_pb2.GenerateRequest) -> common_pb2.ChatRequest:
    """The chat of `request`, once it names an upstream model and holds a message."""
    if not request.upstream_model:
        raise invalid("the upstream model is required", "upstream_model")
    if not request.request.messages:
        raise invalid("at least one message is required", "messages")
    return request.request


def safe_code(value: object) -> str:
    """A vendor error code or type made safe for metadata: short, no free text."""
    if not isinstance(value, str) or not value:
        return ""
    return _SAFE_CODE.sub("_", value[:64])


def parse_duration(text: str) -> float | None:
    """Seconds in a Go-style duration ("1s", "6m0s", "120ms", "1h2m3.5s") or a bare
    number of seconds; None when it is neither."""
    text = text.strip()
    if not text:
        return None
    with contextlib.suppress(ValueError):  # not a number: an HTTP date, parsed below
        seconds = float(text)
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    total = 0.0
    pos = 0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    return total if pos == len(text) else None


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `retry-after` (seconds or an HTTP date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            millis = float(raw_ms)
        except ValueError:
            millis = -1.0
        if math.isfinite(millis) and millis >= 0:
            return millis / 1000.0
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        current = time.time() if now is None else now
        return max(0.0, when.timestamp() - current)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def parse_error_body(body: bytes) -> object:
    """An error answer's body as JSON; None when it is empty or not JSON."""
    try:
        return orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None


def put_counts(
    headroom: common_pb2.RateLimitHeadroom,
    headers: Mapping[str, str],
    fields: tuple[tuple[str, str], ...],
) -> bool:
    """Each (header, headroom attribute) count that is present, into `headroom`; whether any was."""
    found = False
    for name, attribute in fields:
        value = parse_count(headers, name)
        if value is not None:
            setattr(headroom, attribute, value)
            found = True
    return found


def finish_headroom(
    headroom: common_pb2.RateLimitHeadroom, headers: Mapping[str, str], now: float, *, found: bool
) -> common_pb2.RateLimitHeadroom | None:
    """`headroom` plus `retry-after`, observed at `now`; None when neither `found` (the
    vendor's own figures) nor `retry-after` gave it anything."""
    retry_after = parse_retry_after(headers, now)
    if retry_after is not None:
        headroom.retry_after_ms = clamp_uint32(round(retry_after * 1000))
        found = True
    if not found:
        return None
    headroom.observed_at.CopyFrom(timestamp_at(now))
    return headroom


def parse_count(headers: Mapping[str, str], name: str) -> int | None:
    """A non-negative integer header, or None when absent or not a number."""
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        return None
    return value if value >= 0 else None


def timestamp_at(seconds: float) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp for a UNIX time in seconds."""
    whole = math.floor(seconds)
    return timestamp_pb2.Timestamp(seconds=whole, nanos=int((seconds - whole) * 1e9))


def headroom_metadata(headroom: common_pb2.RateLimitHeadroom) -> dict[str, str]:
    """The remaining allowance as ErrorInfo metadata, so a refused call still reports it."""
    metadata: dict[str, str] = {}
    if headroom.HasField("remaining_requests"):
        metadata["remaining_requests"] = str(headroom.remaining_requests)
    if headroom.HasField("remaining_tokens"):
        metadata["remaining_tokens"] = str(headroom.remaining_tokens)
    return metadata


def clamp_uint32(value: int) -> int:
    """`value` bounded to the range of a proto uint32."""
    return 0 if value < 0 else min(value, _UINT32_MAX)


def estimate_tokens(chars: int) -> int:
    """Token estimate for `chars` characters of text: ceil(chars / 4)."""
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_prompt_tokens(chat: common_pb2.ChatRequest) -> int:
    """Estimated prompt tokens: ceil(chars / 4) over message text, names, tool calls and
    tool definitions, plus 85 per image. Only used when a vendor reports no usage."""
    chars = 0
    images = 0
    for message in chat.messages:
        chars += len(message.name)
        for part in message.parts:
            if part.HasField("image"):
                images += 1
            else:
                chars += len(part.text)
        for call in message.tool_calls:
            chars += len(call.name) + len(call.arguments_json)
    for tool in chat.tools:
        chars += len(tool.name) + len(tool.description) + len(tool.parameters_json_schema)
    return estimate_tokens(chars) + images * IMAGE_TOKENS_ESTIMATE


def estimated_usage(chat: common_pb2.ChatRequest, output_chars: int) -> common_pb2.Usage:
    """Usage marked `estimated` for an answer whose vendor reported none."""
    return common_pb2.Usage(
        input_tokens=clamp_uint32(estimate_prompt_tokens(chat)),
        output_tokens=clamp_uint32(estimate_tokens(output_chars)),
        estimated=True,
    )


# --------------------------------------------------------------------------- #
# Transports: aiohttp (HTTP/1.1, the default) and httpx (HTTP/2)
# --------------------------------------------------------------------------- #

# Distinct request paths whose joined URL is kept per provider (a path per model at most).
_URL_CACHE_LIMIT: Final = 1_024


class _Failure(enum.Enum):
    """What kind of transport failure a `_TransportError` is, whichever library raised it."""

    POOL = "pool"  # no free pooled connection within connect_ms
    CONNECT_TIMEOUT = "connect_timeout"  # opening a connection took longer than connect_ms
    TIMEOUT = "timeout"  # any other transport timeout (a backstop)
    CONNECT = "connect"  # refused, DNS, TLS
    DECODE = "decode"  # a body that could not be decoded (bad gzip, unknown encoding)
    OTHER = "other"  # anything else: the connection lost, a broken response


class _TransportError(Exception):
    """A transport failure, classified. Its cause's text is never forwarded (it can hold URLs)."""

    def __init__(self, failure: _Failure, error_type: str) -> None:
        super().__init__(failure.value)
        self.failure = failure
        self.error_type = error_type


class _Response(ABC):
    """A vendor response whose headers have arrived and whose body is still unread.

    `close()` must be called exactly once: it returns the connection to the pool when the
    body was read to its end and closes it otherwise, which stops a vendor still generating.
    """

    __slots__ = ()

    status: int
    headers: Mapping[str, str]  # case-insensitive

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def is_json(self) -> bool:
        return self.headers.get("content-type", "").startswith("application/json")

    @abstractmethod
    def chunks(self) -> AsyncIterator[bytes]:
        """The body's decoded chunks as they arrive (one iterator per response); a failure
        raises `_TransportError`."""

    async def read_capped(self, limit: int) -> bytes:
        """The body, or its first `limit` bytes (the rest is not needed to classify it)."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self.chunks():
            parts.append(chunk)
            size += len(chunk)
            if size >= limit:
                break
        return b"".join(parts)[:limit]

    @abstractmethod
    async def close(self) -> None:
        """Release the connection (body read to its end) or close it (anything else)."""


class _Transport(Protocol):
    """One provider's pooled HTTP client: `path` is relative to the provider's base URL."""

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], content: bytes | None
    ) -> _Response: ...

    async def aclose(self) -> None: ...


def join_url(base_url: str, path: str) -> str:
    """The URL of `path` under `base_url`, joined as httpx joins a client's `base_url` and a
    relative request URL: the base path gets a trailing `/`, `path` loses its leading `/`,
    and the merged path is normalised (dot segments resolved) and percent-encoded. `path`
    may carry a query (`...:streamGenerateContent?alt=sse`)."""
    base = httpx.URL(base_url)
    if not base.raw_path.endswith(b"/"):
        base = base.copy_with(raw_path=base.raw_path + b"/")
    relative = httpx.URL(path)
    if not relative.is_relative_url:
        return str(relative)
    return str(base.copy_with(raw_path=base.raw_path + relative.raw_path.lstrip(b"/")))


def env_proxy(base_url: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The proxy the environment names for `base_url`: `HTTPS_PROXY` / `HTTP_PROXY` (either
    case) by its scheme, unless `NO_PROXY` covers its host; as httpx and curl read them."""
    env = os.environ if environ is None else environ
    parts = urllib.parse.urlsplit(base_url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    proxy = (
        env.get(f"{scheme}_proxy")
        or env.get(f"{scheme.upper()}_PROXY")
        or env.get("all_proxy")
        or env.get("ALL_PROXY")
    )
    if not proxy or not host:
        return None
    for entry in (env.get("no_proxy") or env.get("NO_PROXY") or "").split(","):
        entry = entry.strip().lower().lstrip(".")
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return None
    return proxy


def _aiohttp_failure(exc: aiohttp.ClientError) -> _TransportError:
    kind = type(exc).__name__
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return _TransportError(_Failure.CONNECT_TIMEOUT, kind)
    if isinstance(exc, aiohttp.ServerTimeoutError):
        return _TransportError(_Failure.TIMEOUT, kind)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return _TransportError(_Failure.CONNECT, kind)
    if isinstance(exc, aiohttp.ClientPayloadError) and isinstance(
        exc.__cause__, aiohttp.http_exceptions.ContentEncodingError
    ):
        return _TransportError(_Failure.DECODE, kind)
    return _TransportError(_Failure.OTHER, kind)


class _AiohttpResponse(_Response):
    __slots__ = ("_content", "_response", "_slots", "headers", "status")

    def __init__(self, response: aiohttp.ClientResponse, slots: asyncio.Semaphore) -> None:
        self.status = response.status
        self.headers = response.headers
        self._response = response
        self._content = response.content
        self._slots: asyncio.Semaphore | None = slots

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        # `readany` is what `content.iter_any()` calls: whatever has arrived, b"" at the end.
        try:
            chunk = await self._content.readany()
        except aiohttp.ClientError as exc:
            raise _aiohttp_failure(exc) from exc
        if not chunk:
            raise StopAsyncIteration
        return chunk

    async def close(self) -> None:
        if self._slots is None:
            return
        if self._content.at_eof():
            self._response.release()
        else:
            self._response.close()
        # The connector slot is free again (both calls above are synchronous).
        self._slots.release()
        self._slots = None


class _AiohttpTransport:
    """HTTP/1.1 over one `aiohttp.ClientSession`, opened on first use in the running loop.

    The pool wait is bounded here, by a semaphore of `max_connections` slots acquired
    within connect_ms (UNAVAILABLE / OVERLOADED when it is not), and released only once the
    response has given its connection back; so aiohttp's own pool (of the same size) never
    makes a request wait, and its `connect` timeout bounds DNS, TCP and TLS alone.
    """

    def __init__(self, base_url: str, max_connections: int, connect_s: float) -> None:
        self._base_url = base_url
        self._max_connections = max_connections
        # The CAs httpx trusts (certifi, or SSL_CERT_FILE / SSL_CERT_DIR), as before; loaded
        # here, not in the event loop.
        self._ssl: ssl.SSLContext | bool = (
            httpx.create_ssl_context() if base_url.lower().startswith("https:") else True
        )
        self._connect_s = connect_s
        # Read once: aiohttp's own trust_env reads the environment (and ~/.netrc) on every
        # request, which costs more than the rest of the call.
        self._proxy = env_proxy(base_url)
        self._urls: dict[str, yarl.URL] = {}
        self._session: aiohttp.ClientSession | None = None
        self._slots = asyncio.Semaphore(max_connections)
        self._closed = False

    def _open(self) -> aiohttp.ClientSession:
        if self._closed:
            raise RuntimeError("the provider client is closed")
        connector = aiohttp.TCPConnector(limit=self._max_connections, ssl=self._ssl)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self._connect_s, sock_connect=self._connect_s, sock_read=None
            ),
            cookie_jar=aiohttp.DummyCookieJar(),
            # HTTP(S)_PROXY and NO_PROXY are honoured, as they were with httpx.
            trust_env=False,
            auto_decompress=True,
            raise_for_status=False,
            # Send the translator's headers; never invent a content type for a body.
            skip_auto_headers=("Content-Type",),
        )
        return self._session

    def _url(self, path: str) -> yarl.URL:
        url = self._urls.get(path)
        if url is None:
            if len(self._urls) >= _URL_CACHE_LIMIT:
                self._urls.clear()
            url = self._urls[path] = yarl.URL(join_url(self._base_url, path), encoded=True)
        return url

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], content: bytes | None
    ) -> _Response:
        session = self._session if self._session is not None else self._open()
        url = self._url(path)
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(self._connect_s):
                    await slots.acquire()
            except TimeoutError:
                raise _TransportError(_Failure.POOL, "PoolTimeout") from None
        else:
            await slots.acquire()
        try:
            response = await session.request(
                method, url, headers=headers, data=content, allow_redirects=False, proxy=self._proxy
            )
        except aiohttp.ClientError as exc:
            slots.release()
            raise _aiohttp_failure(exc) from exc
        except BaseException:
            slots.release()
            raise
        return _AiohttpResponse(response, slots)

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()


def _httpx_failure(exc: httpx.HTTPError) -> _TransportError:
    kind = type(exc).__name__
    if isinstance(exc, httpx.PoolTimeout):
        return _TransportError(_Failure.POOL, kind)
    if isinstance(exc, httpx.ConnectTimeout):
        return _TransportError(_Failure.CONNECT_TIMEOUT, kind)
    if isinstance(exc, httpx.TimeoutException):
        return _TransportError(_Failure.TIMEOUT, kind)
    if isinstance(exc, httpx.ConnectError):
        return _TransportError(_Failure.CONNECT, kind)
    if isinstance(exc, httpx.DecodingError):
        return _TransportError(_Failure.DECODE, kind)
    return _TransportError(_Failure.OTHER, kind)


class _HttpxResponse(_Response):
    __slots__ = ("_response", "_stream", "headers", "status")

    def __init__(self, response: httpx.Response) -> None:
        self.status = response.status_code
        self.headers = response.headers
        self._response = response
        self._stream: AsyncIterator[bytes] | None = None

    def chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._stream is None:
            self._stream = self._response.aiter_bytes()
        try:
            return await anext(self._stream)
        except httpx.HTTPError as exc:
            raise _httpx_failure(exc) from exc

    async def close(self) -> None:
        # Close the byte iterator explicitly rather than leaving it to the garbage collector;
        # closing an unfinished response closes its connection.
        aclose = getattr(self._stream, "aclose", None)
        if aclose is not None:
            await aclose()
        await self._response.aclose()


class _HttpxTransport:
    """HTTP/2 (for providers with `http2: true`) over one pooled `httpx.AsyncClient`."""

    def __init__(
        self, base_url: str, max_connections: int, connect_s: float, first_byte_s: float, idle_s: float
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url,
            http2=True,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # The first-byte and idle deadlines are enforced around each wait (in
            # `ProviderClient`); httpx's read timeout is only a backstop.
            timeout=httpx.Timeout(
                connect=connect_s, read=max(first_byte_s, idle_s), write=first_byte_s, pool=connect_s
            ),
            follow_redirects=False,
        )

    async def send(
        self, method: str, path: str, headers: Mapping[str, str], content: bytes | None
    ) -> _Response:
        request = self._http.build_request(method, path, headers=headers, content=content)
        try:
            return _HttpxResponse(await self._http.send(request, stream=True))
        except httpx.HTTPError as exc:
            raise _httpx_failure(exc) from exc

    async def aclose(self) -> None:
        await self._http.aclose()


# --------------------------------------------------------------------------- #
# The HTTP client of one provider
# --------------------------------------------------------------------------- #


class ProviderClient:
    """One configured provider: its translator and its pooled HTTP client -- aiohttp for
    HTTP/1.1, or httpx for a provider with `http2: true` (aiohttp has no HTTP/2).

    Timeouts come from the provider's config: `connect_ms` bounds opening a connection
    (and waiting for a free one in the pool); `first_byte_ms` bounds the time from sending
    the request to the response headers and the first event; `idle_ms` bounds every gap
    between body chunks after that. Time the caller spends consuming events is not
    counted: the deadlines only run while waiting on the vendor. Request paths are joined
    to the base URL as httpx joins `base_url` and a relative URL (see `join_url`).
    """

    def __init__(
        self,
        name: str,
        provider: Provider,
        translator: Translator,
        *,
        base_url: str,
        probe_model: str | None = None,
    ) -> None:
        probe_mode = str(provider.options.get("probe", "models"))
        if probe_mode not in PROBE_MODES:
            raise ValueError(f"provider {name!r}: options.probe must be one of {', '.join(PROBE_MODES)}")
        self.name = name
        self.provider = provider
        self.translator = translator
        self._probe_mode = probe_mode
        self._probe_model = probe_model
        timeouts = provider.timeouts
        self._connect_s = timeouts.connect_ms / 1000.0
        self._first_byte_s = timeouts.first_byte_ms / 1000.0
        self._idle_s = timeouts.idle_ms / 1000.0
        # Neither transport touches the event loop before its first request, so the client
        # can be built outside one.
        self._http: _Transport = (
            _HttpxTransport(
                base_url, provider.max_connections, self._connect_s, self._first_byte_s, self._idle_s
            )
            if provider.http2
            else _AiohttpTransport(base_url, provider.max_connections, self._connect_s)
        )

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self._http.aclose()

    async def _send(self, vendor_request: VendorRequest) -> _Response:
        content = orjson.dumps(vendor_request.body) if vendor_request.body is not None else None
        return await self._http.send(
            vendor_request.method, vendor_request.path, vendor_request.headers, content
        )

    def _error(self, code: grpc.StatusCode, reason: Reason, message: str, **extra: str) -> SwitchyardError:
        metadata = {"provider": self.name, "vendor": self.translator.vendor, **extra}
        return SwitchyardError(code, reason, f"provider {self.name!r}: {message}", metadata=metadata)

    def _transport_error(self, exc: _TransportError, phase: str) -> SwitchyardError:
        # The exception text is not forwarded: it can hold URLs, and it tells the
        # caller nothing the reason and phase do not.
        failure, kind = exc.failure, exc.error_type
        if failure is _Failure.POOL:
            return self._error(
                grpc.StatusCode.UNAVAILABLE,
                Reason.OVERLOADED,
                "no free connection in the pool within the connect timeout",
                phase=phase,
                error_type=kind,
            )
        if failure is _Failure.CONNECT_TIMEOUT or failure is _Failure.TIMEOUT:
            phase = "connect" if failure is _Failure.CONNECT_TIMEOUT else phase
            return self._error(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.TIMEOUT,
                f"{phase} timed out",
                phase=phase,
                error_type=kind,
            )
        if failure is _Failure.CONNECT:
            return self._error(
                grpc.StatusCode.UNAVAILABLE,
                Reason.PROVIDER_UNAVAILABLE,
                "could not connect",
                phase="connect",
                error_type=kind,
            )
        if failure is _Failure.DECODE:
            return self._error(
                grpc.StatusCode.UNAVAILABLE,
                Reason.UPSTREAM_PROTOCOL_ERROR,
                "sent a body that could not be decoded",
                phase=phase,
                error_type=kind,
            )
        return self._error(
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            "the connection was lost" if phase == "stream" else "the request failed",
            phase=phase,
            error_type=kind,
        )

    def _timeout(self, phase: str, limit_s: float) -> SwitchyardError:
        return self._error(
            grpc.StatusCode.DEADLINE_EXCEEDED,
            Reason.TIMEOUT,
            f"no {'first event' if phase == 'first_byte' else 'data'} within {round(limit_s * 1000)} ms",
            phase=phase,
            timeout_ms=str(round(limit_s * 1000)),
        )

    async def generate(
        self, request: provider_pb2.GenerateRequest
    ) -> AsyncGenerator[provider_pb2.GenerateResponse, None]:
        """Call the vendor and yield unified events one by one as they arrive: deltas, then
        exactly one `usage`, then `done` (`generate_batches`, flattened)."""
        batches = self.generate_batches(request)
        try:
            async for batch in batches:
                for event in batch:
                    yield event
        finally:
            await batches.aclose()

    async def generate_batches(
        self, request: provider_pb2.GenerateRequest
    ) -> AsyncGenerator[list[provider_pb2.GenerateResponse], None]:
        """Call the vendor and yield unified events as they arrive, as lists: each list is
        what one read of the vendor's body decoded (never empty), yielded before waiting
        for the next read; the last list ends with exactly one `usage`, then `done`. Raises
        `SwitchyardError` for every failure, after yielding the events decoded ahead of it.

        Closing this generator (the gRPC caller cancelled) closes the upstream response at
        once, which aborts the vendor's generation.
        """
        translator = self.translator
        vendor_request = translator.build_request(request)
        decoder = translator.new_decoder(request)
        parser = SseParser()
        response: _Response | None = None
        body_stream: AsyncIterator[bytes] | None = None
        reading = False
        body: bytes | None = None
        events: list[SseEvent] = []
        ready: list[provider_pb2.GenerateResponse] = []
        idle: IdleDeadline | None = None
        try:
            try:
                async with asyncio.timeout(self._first_byte_s):
                    response = await self._send(vendor_request)
                    if not response.is_success:
                        body = await response.read_capped(ERROR_BODY_LIMIT)
                        raise translator.map_error(response.status, response.headers, body)
                    headroom = translator.headroom(response.headers)
                    vendor_request_id = translator.request_id(response.headers)
                    if response.is_json:
                        body = await response.read_capped(JSON_BODY_LIMIT)
                    else:
                        body_stream = response.chunks()
                        reading = True
                        while not events:
                            chunk = await anext(body_stream, None)
                            if chunk is None:
                                reading = False
                                break
                            events = parser.feed(chunk)
            except TimeoutError:
                raise self._timeout("first_byte", self._first_byte_s) from None
            except _TransportError as exc:
                raise self._transport_error(exc, "first_byte") from None
            except SseError:
                raise translator.protocol_error("an oversized event") from None
            # Decoded outside the first-byte deadline. `list.extend` keeps what a decoder
            # yielded before raising, so the deltas ahead of an in-stream error in the same
            # read still reach the caller, ahead of the error.
            try:
                if body is not None:
                    ready.extend(decoder.on_body(body))
                for event in events:
                    ready.extend(decoder.on_event(event))
                idle_s = self._idle_s
                idle = IdleDeadline(idle_s)  # one timer for every read, not one each
                while reading and not decoder.finished and body_stream is not None:
                    if ready:
                        yield ready
                        ready = []
                    try:
                        with idle:
                            chunk = await anext(body_stream)
                        events = parser.feed(chunk)
                    except StopAsyncIteration:
                        reading = False
                        break
                    except TimeoutError:
                        raise self._timeout("idle", idle_s) from None
                    except _TransportError as exc:
                        raise self._transport_error(exc, "stream") from None
                    except SseError:
                        raise translator.protocol_error("an oversized event") from None
                    for event in events:
                        ready.extend(decoder.on_event(event))
                if not decoder.finished:
                    for event in parser.close():
                        ready.extend(decoder.on_event(event))
                    decoder.on_eof()
            except SwitchyardError:
                if ready:
                    yield ready
                raise
            outcome = decoder.outcome()
            ready.append(provider_pb2.GenerateResponse(usage=outcome.usage))
            done = provider_pb2.GenerateDone(
                finish_reason=outcome.finish_reason,
                vendor_request_id=vendor_request_id or outcome.vendor_request_id,
                vendor_model=outcome.vendor_model,
            )
            if headroom is not None:
                done.headroom.CopyFrom(headroom)
            ready.append(provider_pb2.GenerateResponse(done=done))
            yield ready
            if reading and body_stream is not None:
                await _drain(body_stream)
        finally:
            if idle is not None:
                idle.close()
            # Runs on success, on error and when the caller goes away: closing the response
            # of an unfinished body closes its connection, so the vendor stops generating.
            if response is not None:
                await response.close()

    async def probe(self) -> provider_pb2.ProbeResponse:
        """Prove the provider answers; a provider failure is the answer, never raised."""
        started = time.perf_counter()
        headroom: common_pb2.RateLimitHeadroom | None = None
        error: SwitchyardError | None = None
        try:
            if self._probe_mode == "completion" and self._probe_model:
                headroom = await self._probe_completion(self._probe_model)
            else:
                headroom, error = await self._probe_models()
        except SwitchyardError as exc:
            error = exc
        latency_ms = clamp_uint32(round((time.perf_counter() - started) * 1000))
        result = provider_pb2.ProbeResponse(
            ok=error is None, latency_ms=latency_ms, error_reason=error.reason.value if error else ""
        )
        if headroom is not None:
            result.headroom.CopyFrom(headroom)
        return result

    async def embed(self, request: provider_pb2.EmbedRequest) -> provider_pb2.EmbedResponse:
        """Vectors for `request.inputs` from the vendor's embedding model."""
        if not request.upstream_model:
            raise invalid("the embedding model is required", "upstream_model")
        if not request.inputs or len(request.inputs) > MAX_EMBED_INPUTS:
            raise invalid(f"between 1 and {MAX_EMBED_INPUTS} inputs", "inputs")
        for index, text in enumerate(request.inputs):
            if not text.strip():
                raise invalid("an input is not empty", f"inputs[{index}]")
        vendor_request = self.translator.embeddings_request(request)
        try:
            async with asyncio.timeout(self._first_byte_s + self._idle_s):
                response = await self._send(vendor_request)
                try:
                    body = await response.read_capped(MAX_EMBED_BODY)
                finally:
                    await response.close()
        except TimeoutError:
            raise self._timeout("first_byte", self._first_byte_s) from None
        except _TransportError as exc:
            raise self._transport_error(exc, "first_byte") from None
        if not response.is_success:
            raise self.translator.map_error(response.status, response.headers, body)
        result = self.translator.parse_embeddings(body, len(request.inputs))
        result.vendor_request_id = self.translator.request_id(response.headers)
        return result

    async def _probe_models(self) -> tuple[common_pb2.RateLimitHeadroom | None, SwitchyardError | None]:
        vendor_request = self.translator.models_request()
        try:
            async with asyncio.timeout(self._first_byte_s):
                response = await self._send(vendor_request)
                try:
                    body = await response.read_capped(ERROR_BODY_LIMIT)
                finally:
                    await response.close()
        except TimeoutError:
            return None, self._timeout("first_byte", self._first_byte_s)
        except _TransportError as exc:
            return None, self._transport_error(exc, "first_byte")
        headroom = self.translator.headroom(response.headers)
        if not response.is_success:
            return headroom, self.translator.map_error(response.status, response.headers, body)
        return headroom, None

    async def _probe_completion(self, upstream_model: str) -> common_pb2.RateLimitHeadroom | None:
        chat = common_pb2.ChatRequest(
            messages=[
                common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="ping")]),
            ],
            sampling=common_pb2.SamplingParams(max_output_tokens=1),
        )
        request = provider_pb2.GenerateRequest(
            request=chat, provider=self.name, upstream_model=upstream_model
        )
        headroom: common_pb2.RateLimitHeadroom | None = None
        async for event in self.generate(request):
            if event.HasField("done") and event.done.HasField("headroom"):
                headroom = event.done.headroom
        return headroom


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows the end marker so the connection can be reused; give up quietly
    (the connection is then closed instead) if the server lingers or fails."""
    try:
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in chunks:
                continue
    except (TimeoutError, _TransportError):
        return
