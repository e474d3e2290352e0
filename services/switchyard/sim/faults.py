"""Vendor-neutral fault/behaviour knobs and plumbing shared by every simulator.

Everything here is independent of any one vendor's wire format:

* :class:`FaultKnobs` / :class:`RateLimitKnobs` -- the behaviour knobs, loadable
  from JSON with unknown fields rejected (:class:`KnobError`).
* :class:`SimControl` -- per-server state: server-wide knobs, the one-shot knob
  script, request statistics and the rate-limit window.
* :func:`add_control_routes` -- the ``/_sim/*`` control endpoints.
* helpers for deterministic answers (:func:`deterministic_text`,
  :func:`split_text`, :func:`example_for_schema`, :func:`approx_text_tokens`,
  :func:`format_duration`).
* :func:`serve_app` / :func:`start_simulator` / :class:`RunningSimulator` to run
  a simulator in-process, and the :data:`SIMULATORS` vendor table.

Knob precedence for one chat request (highest first): the ``x-sim-knobs``
request header, the next queued ``/_sim/script`` entry, the server-wide knobs
(``/_sim/knobs``), the knobs the server was built with. Each layer overlays only
the fields it names.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, cast

import orjson
from aiohttp import web

__all__ = [
    "CONTROL_KEY",
    "DEFAULT_KNOBS",
    "KNOBS_HEADER",
    "KNOB_FIELDS",
    "SIMULATORS",
    "FaultKnobs",
    "KnobError",
    "RateLimitKnobs",
    "RateLimitSnapshot",
    "RunningSimulator",
    "SimControl",
    "SimStats",
    "SimulatorModule",
    "add_control_routes",
    "approx_text_tokens",
    "deterministic_text",
    "example_for_schema",
    "format_duration",
    "load_simulator",
    "seed_bytes",
    "serve_app",
    "sleep_ms",
    "split_text",
    "start_simulator",
]

#: Vendor name -> module implementing it. A vendor module exposes
#: ``build_app(knobs, *, api_key) -> web.Application`` and ``API_PREFIX``.
#: Adding a vendor simulator is one row here.
SIMULATORS: dict[str, str] = {
    "openai": "switchyard.sim.openai",
    "anthropic": "switchyard.sim.anthropic",
    "gemini": "switchyard.sim.gemini",
    "mistral": "switchyard.sim.mistral",
    "cohere": "switchyard.sim.cohere",
    "openai_compatible": "switchyard.sim.openai_compatible",
}

#: Header carrying a JSON knob object that overrides knobs for one request.
KNOBS_HEADER = "x-sim-knobs"

#: Length of the fixed rate-limit window, in seconds.
RATELIMIT_WINDOW_S = 60.0


class KnobError(ValueError):
    """A knob object is invalid (unknown field, wrong type or out of range)."""

    def __init__(self, message: str, field_name: str | None = None) -> None:
        super().__init__(message)
        self.field_name = field_name


# --------------------------------------------------------------------------- #
# value validators
# --------------------------------------------------------------------------- #


def _int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise KnobError(f"knob {name!r} must be an integer, got {value!r}", name)
    if value < minimum:
        raise KnobError(f"knob {name!r} must be >= {minimum}, got {value}", name)
    return value


def _opt_int(name: str, value: object, minimum: int = 0) -> int | None:
    return None if value is None else _int(name, value, minimum)


def _num(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise KnobError(f"knob {name!r} must be a number, got {value!r}", name)
    if not math.isfinite(value) or value < 0:
        raise KnobError(f"knob {name!r} must be a finite number >= 0, got {value}", name)
    return float(value)


def _opt_num(name: str, value: object) -> float | None:
    return None if value is None else _num(name, value)


def _opt_str(name: str, value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise KnobError(f"knob {name!r} must be a string or null, got {value!r}", name)


def _bool(name: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    raise KnobError(f"knob {name!r} must be a boolean, got {value!r}", name)


def _status(name: str, value: object) -> int | None:
    status = _opt_int(name, value)
    if status is not None and not 400 <= status <= 599:
        raise KnobError(f"knob {name!r} must be an HTTP error status 400-599, got {status}", name)
    return status


def _duration(name: str, value: object) -> str | None:
    """Accept a duration string ("6m0s") as is, or seconds as a number."""
    if value is None or isinstance(value, str):
        return value
    return format_duration(_num(name, value))


def _check_object(what: str, data: object) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise KnobError(f"{what} must be a JSON object, got {type(data).__name__}")
    return cast(Mapping[str, object], data)


def _check_unknown(what: str, data: Mapping[str, object], known: frozenset[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise KnobError(
            f"unknown {what} field(s): {', '.join(unknown)}; known fields: {', '.join(sorted(known))}",
            unknown[0],
        )


# --------------------------------------------------------------------------- #
# knobs
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class RateLimitKnobs:
    """Rate-limit figures reported in the vendor's rate-limit headers.

    ``remaining_*`` left as ``None`` means "count down": the simulator keeps a
    fixed 60 s window and decrements remaining requests by one and remaining
    tokens by the request's prompt tokens on every chat request. ``reset_*``
    left as ``None`` means "time left in that window". Durations are strings
    like ``"1s"``, ``"6m0s"``, ``"120ms"`` (numbers are taken as seconds).
    """

    limit_requests: int = 10_000
    remaining_requests: int | None = None
    limit_tokens: int = 30_000_000
    remaining_tokens: int | None = None
    reset_requests: str | None = None
    reset_tokens: str | None = None

    @classmethod
    def from_dict(cls, data: object) -> RateLimitKnobs:
        """Build from a JSON object; unknown fields raise :class:`KnobError`."""
        obj = _check_object("ratelimit", data)
        _check_unknown("ratelimit", obj, _RATELIMIT_FIELDS)
        kwargs: dict[str, Any] = {}
        for key, value in obj.items():
            kwargs[key] = _RATELIMIT_VALIDATORS[key](f"ratelimit.{key}", value)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)


_RATELIMIT_VALIDATORS: dict[str, Callable[[str, object], object]] = {
    "limit_requests": lambda n, v: _int(n, v, 1),
    "remaining_requests": _opt_int,
    "limit_tokens": lambda n, v: _int(n, v, 1),
    "remaining_tokens": _opt_int,
    "reset_requests": _duration,
    "reset_tokens": _duration,
}
_RATELIMIT_FIELDS = frozenset(f.name for f in dataclasses.fields(RateLimitKnobs))
assert _RATELIMIT_FIELDS == frozenset(_RATELIMIT_VALIDATORS)


def _ratelimit(name: str, value: object) -> RateLimitKnobs | None:
    return None if value is None else RateLimitKnobs.from_dict(value)


@dataclass(frozen=True, slots=True)
class FaultKnobs:
    """Behaviour and fault knobs for a simulated vendor endpoint.

    Delays and chunking:
      * ``first_byte_delay_ms`` -- sleep before the response headers are sent.
      * ``chunk_delay_ms`` -- sleep between streamed chunks.
      * ``chunks`` -- number of content (or tool-argument) deltas the answer is
        split into when streaming (>= 1).

    Answer shape:
      * ``text`` -- fixed answer text (default: deterministic words derived from
        a hash of the request messages).
      * ``tool_call`` -- answer with a tool call when the request offers tools
        (vendors may also force it, e.g. OpenAI ``tool_choice: "required"``).
      * ``finish_reason`` -- override the vendor's finish/stop reason.
      * ``cached_tokens`` / ``reasoning_tokens`` -- reported usage details.

    Failures:
      * ``status`` -- answer with this HTTP error status (400-599) and the
        vendor's error body for it. With ``error_after_chunks`` on a streamed
        request it instead selects the in-stream error (HTTP status stays 200).
      * ``error_code`` / ``error_message`` -- override the error's code / text.
      * ``retry_after_s`` -- send ``retry-after`` (whole seconds, rounded up)
        on error responses, plus ``retry-after-ms`` when fractional.
      * ``error_after_chunks`` -- after N stream chunks send an in-stream error
        event and end the stream (streaming only).
      * ``malformed_after_chunks`` -- after N chunks send a syntactically broken
        ``data:`` line and end the stream (streaming only).
      * ``drop_after_chunks`` -- after N chunks close the TCP connection without
        finishing the body; non-streaming requests are dropped before any
        response byte.
      * ``ratelimit`` -- figures for the rate-limit headers (see
        :class:`RateLimitKnobs`); ``None`` uses the defaults.

    "N chunks" counts every streamed chunk event already sent, including the
    vendor's opening (role) chunk and closing chunks; 0 means before the first.
    """

    first_byte_delay_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    chunks: int = 8
    text: str | None = None
    status: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    retry_after_s: float | None = None
    error_after_chunks: int | None = None
    malformed_after_chunks: int | None = None
    drop_after_chunks: int | None = None
    ratelimit: RateLimitKnobs | None = None
    tool_call: bool = False
    finish_reason: str | None = None
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_dict(cls, data: object, base: FaultKnobs | None = None) -> FaultKnobs:
        """Overlay the fields named in JSON object ``data`` on ``base``.

        ``base`` defaults to ``FaultKnobs()``. Unknown fields, wrong types and
        out-of-range values raise :class:`KnobError` naming the field.
        """
        obj = _check_object("knobs", data)
        _check_unknown("knob", obj, KNOB_FIELDS)
        changes: dict[str, Any] = {}
        for key, value in obj.items():
            changes[key] = _KNOB_VALIDATORS[key](key, value)
        if base is None:
            return cls(**changes)
        return dataclasses.replace(base, **changes) if changes else base

    @classmethod
    def from_json(cls, raw: str | bytes, base: FaultKnobs | None = None) -> FaultKnobs:
        """Parse a JSON document and overlay it on ``base`` (see :meth:`from_dict`)."""
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise KnobError(f"knobs are not valid JSON: {exc}") from None
        return cls.from_dict(data, base)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of every knob."""
        return dataclasses.asdict(self)


_KNOB_VALIDATORS: dict[str, Callable[[str, object], object]] = {
    "first_byte_delay_ms": _num,
    "chunk_delay_ms": _num,
    "chunks": lambda n, v: _int(n, v, 1),
    "text": _opt_str,
    "status": _status,
    "error_code": _opt_str,
    "error_message": _opt_str,
    "retry_after_s": _opt_num,
    "error_after_chunks": _opt_int,
    "malformed_after_chunks": _opt_int,
    "drop_after_chunks": _opt_int,
    "ratelimit": _ratelimit,
    "tool_call": _bool,
    "finish_reason": _opt_str,
    "cached_tokens": _int,
    "reasoning_tokens": _int,
}
#: Names of every :class:`FaultKnobs` field.
KNOB_FIELDS = frozenset(f.name for f in dataclasses.fields(FaultKnobs))
assert KNOB_FIELDS == frozenset(_KNOB_VALIDATORS)

DEFAULT_KNOBS = FaultKnobs()


# --------------------------------------------------------------------------- #
# server state
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class SimStats:
    """Counters for chat requests served by one simulator.

    ``requests`` every chat request received; ``completed`` answers fully
    sent (non-streaming success returned, or stream ended normally);
    ``errors`` error answers (HTTP error status, in-stream error, malformed
    line); ``disconnects`` requests abandoned by the client before the answer
    was finished; ``dropped`` connections the simulator cut on purpose
    (``drop_after_chunks``); ``active`` requests in flight; ``last_request``
    the last request body (parsed JSON, ``None`` if unparsable).
    """

    requests: int = 0
    completed: int = 0
    errors: int = 0
    disconnects: int = 0
    dropped: int = 0
    active: int = 0
    last_request: object = None

    def to_dict(self) -> dict[str, object]:
        """JSON-ready dict of the counters."""
        return {
            "requests": self.requests,
            "completed": self.completed,
            "errors": self.errors,
            "disconnects": self.disconnects,
            "dropped": self.dropped,
            "active": self.active,
            "last_request": self.last_request,
        }


@dataclass(frozen=True, slots=True)
class RateLimitSnapshot:
    """Rate-limit figures for one response, ready to render as headers."""

    limit_requests: int
    remaining_requests: int
    reset_requests: str
    limit_tokens: int
    remaining_tokens: int
    reset_tokens: str


class SimControl:
    """Mutable state of one simulator: knobs, script queue, stats, rate limits."""

    def __init__(self, knobs: FaultKnobs | None = None) -> None:
        self.initial_knobs: FaultKnobs = knobs if knobs is not None else DEFAULT_KNOBS
        self.knobs: FaultKnobs = self.initial_knobs
        self.script: deque[Mapping[str, object]] = deque()
        self.stats = SimStats()
        self._window_start = 0.0
        self._window_requests = 0
        self._window_tokens = 0

    # -- knobs --------------------------------------------------------------
    def set_knobs(self, data: object) -> FaultKnobs:
        """Replace the server-wide knobs (fields not named get defaults)."""
        self.knobs = FaultKnobs.from_dict(data, self.initial_knobs)
        return self.knobs

    def reset(self) -> None:
        """Restore the start-up knobs, clear the script and the rate-limit window."""
        self.knobs = self.initial_knobs
        self.script.clear()
        self._window_start = 0.0
        self._window_requests = 0
        self._window_tokens = 0

    def set_script(self, data: object) -> int:
        """Queue one knob overlay per following chat request (replaces the queue)."""
        if not isinstance(data, list):
            raise KnobError(f"script must be a JSON list of knob objects, got {type(data).__name__}")
        entries: list[Mapping[str, object]] = []
        for i, entry in enumerate(data):
            try:
                FaultKnobs.from_dict(entry)  # validate now, apply later
            except KnobError as exc:
                raise KnobError(f"script[{i}]: {exc}", exc.field_name) from None
            entries.append(cast(Mapping[str, object], entry))
        self.script = deque(entries)
        return len(entries)

    def knobs_for_request(self, header: str | None) -> FaultKnobs:
        """Effective knobs for one chat request; consumes one script entry.

        Vendors call this once per chat request that passed authentication and
        JSON parsing (so a rejected key does not eat a scripted entry).

        ``header`` is the raw ``x-sim-knobs`` value; a bad one raises
        :class:`KnobError` (the script entry is consumed anyway).
        """
        knobs = self.knobs
        if self.script:
            knobs = FaultKnobs.from_dict(self.script.popleft(), knobs)
        if header:
            knobs = FaultKnobs.from_json(header, knobs)
        return knobs

    # -- rate limits ----------------------------------------------------------
    def ratelimit(self, knobs: FaultKnobs, tokens: int) -> RateLimitSnapshot:
        """Account one request of ``tokens`` tokens; return header figures.

        Uses a fixed 60 s window that starts at the first request after it
        expires; remaining counts never go below zero.
        """
        rl = knobs.ratelimit if knobs.ratelimit is not None else _DEFAULT_RATELIMIT
        now = time.monotonic()
        elapsed = now - self._window_start
        if self._window_requests == 0 or elapsed >= RATELIMIT_WINDOW_S:
            self._window_start = now
            self._window_requests = 0
            self._window_tokens = 0
            elapsed = 0.0
        self._window_requests += 1
        self._window_tokens += tokens
        left = format_duration(max(0.0, RATELIMIT_WINDOW_S - elapsed))
        rem_req = rl.remaining_requests
        if rem_req is None:
            rem_req = max(0, rl.limit_requests - self._window_requests)
        rem_tok = rl.remaining_tokens
        if rem_tok is None:
            rem_tok = max(0, rl.limit_tokens - self._window_tokens)
        return RateLimitSnapshot(
            limit_requests=rl.limit_requests,
            remaining_requests=rem_req,
            reset_requests=rl.reset_requests if rl.reset_requests is not None else left,
            limit_tokens=rl.limit_tokens,
            remaining_tokens=rem_tok,
            reset_tokens=rl.reset_tokens if rl.reset_tokens is not None else left,
        )


_DEFAULT_RATELIMIT = RateLimitKnobs()

#: Application key under which every simulator app stores its :class:`SimControl`.
CONTROL_KEY: web.AppKey[SimControl] = web.AppKey("switchyard_sim_control", SimControl)


# --------------------------------------------------------------------------- #
# control endpoints
# --------------------------------------------------------------------------- #


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _control_error(exc: KnobError) -> web.Response:
    return _json(
        {
            "error": {
                "message": str(exc),
                "type": "invalid_sim_knobs",
                "param": exc.field_name,
                "code": None,
            }
        },
        status=400,
    )


async def _read_json(request: web.Request) -> object:
    raw = await request.read()
    try:
        return orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError as exc:
        raise KnobError(f"body is not valid JSON: {exc}") from None


def add_control_routes(app: web.Application, control: SimControl) -> None:
    """Register the ``/_sim/*`` control endpoints and store ``control`` in ``app``.

    * ``GET /_sim/knobs`` -- current server-wide knobs and queued script length.
    * ``POST /_sim/knobs`` -- JSON object replaces the server-wide knobs.
    * ``DELETE /_sim/knobs`` -- restore start-up knobs, clear script and
      rate-limit window.
    * ``POST /_sim/script`` -- JSON list of knob objects, one per following
      chat request (overlaid on the server-wide knobs); replaces the queue.
    * ``DELETE /_sim/script`` -- clear the queue.
    * ``GET /_sim/stats`` / ``POST /_sim/stats/reset`` -- request counters.
    """
    app[CONTROL_KEY] = control

    def state() -> dict[str, object]:
        return {"knobs": control.knobs.to_dict(), "script_pending": len(control.script)}

    async def get_knobs(request: web.Request) -> web.Response:
        return _json(state())

    async def post_knobs(request: web.Request) -> web.Response:
        try:
            control.set_knobs(await _read_json(request))
        except KnobError as exc:
            return _control_error(exc)
        return _json(state())

    async def delete_knobs(request: web.Request) -> web.Response:
        control.reset()
        return _json(state())

    async def post_script(request: web.Request) -> web.Response:
        try:
            control.set_script(await _read_json(request))
        except KnobError as exc:
            return _control_error(exc)
        return _json(state())

    async def delete_script(request: web.Request) -> web.Response:
        control.script.clear()
        return _json(state())

    async def get_stats(request: web.Request) -> web.Response:
        return _json(control.stats.to_dict())

    async def reset_stats(request: web.Request) -> web.Response:
        active = control.stats.active
        control.stats = SimStats(active=active)
        return _json(control.stats.to_dict())

    app.router.add_get("/_sim/knobs", get_knobs)
    app.router.add_post("/_sim/knobs", post_knobs)
    app.router.add_delete("/_sim/knobs", delete_knobs)
    app.router.add_post("/_sim/script", post_script)
    app.router.add_delete("/_sim/script", delete_script)
    app.router.add_get("/_sim/stats", get_stats)
    app.router.add_post("/_sim/stats/reset", reset_stats)


# --------------------------------------------------------------------------- #
# deterministic content helpers
# --------------------------------------------------------------------------- #

_WORDS: tuple[str, ...] = tuple(
    """
    amber harbor signal quiet river lantern copper meadow switch yard engine
    orbit cedar pixel velvet summit thread canyon beacon glacier marble
    compass harvest ember falcon willow prism tundra anchor cobalt drift
    fable garnet horizon island jasper kernel lagoon mosaic nectar onyx
    pepper quartz ripple saffron timber umber vertex walnut xenon yonder
    zephyr bridge circuit delta echo forest gravel hollow ivory jungle
    kettle linen mirror
    """.split()
)


def deterministic_text(seed: bytes, min_words: int = 12, max_words: int = 24) -> str:
    """A sentence of pseudo-random words fully determined by ``seed``.

    Used as the default answer: derived from a hash of the request messages, so
    identical requests get identical answers, without echoing the prompt.
    """
    digest = hashlib.blake2b(seed, digest_size=32).digest()
    count = min_words + digest[0] % (max_words - min_words + 1)
    while len(digest) < count + 1:
        digest += hashlib.blake2b(digest, digest_size=32).digest()
    words = [_WORDS[b % len(_WORDS)] for b in digest[1 : count + 1]]
    words[0] = words[0].capitalize()
    return " ".join(words) + "."


def split_text(text: str, parts: int) -> list[str]:
    """Split ``text`` into at most ``parts`` non-empty pieces joining back to it.

    Splits on word boundaries when there are enough words (each piece but the
    first starts with its space), otherwise on characters.
    """
    if not text:
        return []
    parts = max(1, min(parts, len(text)))
    if parts == 1:
        return [text]
    words = text.split(" ")
    if len(words) >= parts:
        pieces: list[str] = []
        start = 0
        for i in range(parts):
            end = (i + 1) * len(words) // parts
            chunk = " ".join(words[start:end])
            pieces.append(chunk if i == 0 else " " + chunk)
            start = end
        return pieces
    return [text[i * len(text) // parts : (i + 1) * len(text) // parts] for i in range(parts)]


def example_for_schema(schema: object, depth: int = 0) -> object:
    """A value that satisfies simple JSON schemas.

    Objects get every ``required`` property (every property when ``required``
    is absent) filled recursively; leaves by type: string ``"example"``, number
    ``1``, integer ``1``, boolean ``true``, array ``[]``, object ``{}``, null.
    ``const`` and the first ``enum`` value win; ``anyOf``/``oneOf`` use their
    first branch.
    """
    if not isinstance(schema, dict) or depth > 16:
        return {}
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for key in ("anyOf", "oneOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return example_for_schema(branches[0], depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    if kind == "string":
        return "example"
    if kind in ("number", "integer"):
        return 1
    if kind == "boolean":
        return True
    if kind == "array":
        return []
    if kind == "null":
        return None
    if kind == "object":
        props = schema.get("properties")
        if not isinstance(props, dict):
            return {}
        required = schema.get("required")
        names = [n for n in required if isinstance(n, str)] if isinstance(required, list) else list(props)
        return {name: example_for_schema(props.get(name, {}), depth + 1) for name in names}
    return {}


def approx_text_tokens(text: str) -> int:
    """Token estimate for ``text``: ``ceil(len(text) / 4)`` characters."""
    return (len(text) + 3) // 4


def format_duration(seconds: float) -> str:
    """Go-style duration as in rate-limit reset headers.

    Examples: ``120ms``, ``1s``, ``17.5s``, ``6m0s``, ``1h2m3s``.
    """
    if seconds < 1.0:
        return f"{round(seconds * 1000)}ms"
    total_ms = round(seconds * 1000)
    hours, rem_ms = divmod(total_ms, 3_600_000)
    minutes, rem_ms = divmod(rem_ms, 60_000)
    secs = rem_ms / 1000
    sec_text = f"{secs:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{sec_text}s"
    if minutes:
        return f"{minutes}m{sec_text}s"
    return f"{sec_text}s"


# --------------------------------------------------------------------------- #
# running a simulator
# --------------------------------------------------------------------------- #


class SimulatorModule(Protocol):
    """What a vendor module listed in :data:`SIMULATORS` provides."""

    API_PREFIX: str

    def build_app(self, knobs: FaultKnobs | None = None, *, api_key: str | None = None) -> web.Application:
        """Build the vendor's aiohttp application."""
        ...


class RunningSimulator:
    """A simulator serving on a local port; ``await close()`` to stop it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, api_prefix: str) -> None:
        self._runner = runner
        self.host = host
        self.port = port
        self.api_prefix = api_prefix

    @property
    def root_url(self) -> str:
        """``http://HOST:PORT`` (control endpoints live under ``/_sim/``)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The vendor SDK base URL, e.g. ``http://127.0.0.1:PORT/v1``."""
        return self.root_url + self.api_prefix

    @property
    def app(self) -> web.Application:
        """The served aiohttp application."""
        return self._runner.app

    @property
    def control(self) -> SimControl:
        """In-process access to knobs, script and stats."""
        return self._runner.app[CONTROL_KEY]

    async def close(self) -> None:
        """Stop listening and cancel in-flight requests."""
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningSimulator:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


async def serve_app(
    app: web.Application,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    api_prefix: str = "",
) -> RunningSimulator:
    """Serve ``app`` on ``host:port`` (0 = pick a free port).

    Handlers are cancelled when their client disconnects (so simulators can
    count disconnects promptly) and shutdown waits at most 1 s for them.
    """
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return RunningSimulator(runner, host, bound_port, api_prefix)


def load_simulator(vendor: str) -> SimulatorModule:
    """Import the module for ``vendor`` from :data:`SIMULATORS`."""
    try:
        module_name = SIMULATORS[vendor]
    except KeyError:
        raise ValueError(
            f"unknown simulator vendor {vendor!r}; known: {', '.join(sorted(SIMULATORS))}"
        ) from None
    return cast(SimulatorModule, importlib.import_module(module_name))


async def start_simulator(
    vendor: str = "openai",
    host: str = "127.0.0.1",
    port: int = 0,
    knobs: FaultKnobs | None = None,
    api_key: str | None = None,
) -> RunningSimulator:
    """Start the ``vendor`` simulator in-process; returns once it is listening."""
    module = load_simulator(vendor)
    app = module.build_app(knobs, api_key=api_key)
    return await serve_app(app, host, port, api_prefix=module.API_PREFIX)


async def sleep_ms(ms: float) -> None:
    """``asyncio.sleep`` for ``ms`` milliseconds; no-op (no yield) when 0."""
    if ms > 0:
        await asyncio.sleep(ms / 1000.0)


def seed_bytes(value: object) -> bytes:
    """Stable bytes for hashing a JSON-like value (sorted keys)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return repr(value).encode()
