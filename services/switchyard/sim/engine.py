"""The vendor-neutral engine of a simulator: one chat request, start to finish.

A vendor simulator is a `Dialect` (its wire format: how a request is read, how an answer,
an error, a stream and a malformed event are written, which headers go with them) plus a
`build_app` that routes its endpoints to `ChatEngine.handle`. Everything that is the same
for every vendor lives here once, so every simulator obeys the knobs of
`switchyard.sim.faults.FaultKnobs` the same way:

* statistics: requests, completed, errors, disconnects (the client went away before the
  answer was finished), deliberately dropped connections, requests in flight;
* knob resolution (header, script, server knobs), latency to first byte, per-chunk delay;
* the answer itself (`plan_answer`): deterministic text or a fixed one, a tool call with
  arguments that satisfy the tool's schema, JSON for JSON modes, truncation at
  `max_tokens` (4 characters per token), usage with cached and reasoning tokens;
* faults: an HTTP error status (with `retry-after`), an error event after N stream frames,
  a malformed event after N frames, a connection dropped after N frames (or before any
  byte for a non-streamed request). The earliest cut wins; ties go to drop, error,
  malformed.

"N frames" counts every event of the vendor's stream already sent, including opening and
closing events that carry no text; 0 means before the first.
"""

from __future__ import annotations

import asyncio
import math
import random
import string
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import orjson
from aiohttp import web

from switchyard.sim.faults import (
    KNOBS_HEADER,
    FaultKnobs,
    KnobError,
    RateLimitSnapshot,
    SimControl,
    add_control_routes,
    approx_text_tokens,
    deterministic_text,
    example_for_schema,
    sleep_ms,
    split_text,
)

__all__ = [
    "Answer",
    "CallContext",
    "ChatCall",
    "ChatEngine",
    "Dialect",
    "Reply",
    "ToolSpec",
    "build_simulator_app",
    "json_reply",
    "new_id",
    "plan_answer",
    "sse",
]

_ID_ALPHABET = string.ascii_letters + string.digits
_rng = random.Random()
# Request bodies up to this size are accepted (images arrive inline as base64).
MAX_BODY_BYTES = 64 * 1024 * 1024


def new_id(prefix: str, length: int, alphabet: str = _ID_ALPHABET) -> str:
    """`prefix` followed by `length` random characters of `alphabet`."""
    return prefix + "".join(_rng.choices(alphabet, k=length))


def sse(data: object, event: str | None = None) -> bytes:
    """One server-sent event: an optional `event:` line, then `data:` with `data` as JSON."""
    payload = b"data: " + orjson.dumps(data) + b"\n\n"
    return b"event: " + event.encode() + b"\n" + payload if event is not None else payload


# --------------------------------------------------------------------------- #
# what a dialect reads and writes
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A function the request offers: its name and its JSON-schema parameters."""

    name: str
    parameters: object = None


@dataclass(frozen=True, slots=True)
class ChatCall:
    """What a dialect understood of one valid chat request, in vendor-neutral terms.

    `tool_choice`: None or "auto" -- the model calls the first tool only when the
    `tool_call` knob says so; "none" -- never; "required" -- the first tool; any other
    value -- the tool of that name. `json_mode` "object" answers a JSON object, "schema"
    an instance of `json_schema`. `max_tokens` truncates the answer (finish "length").
    `seed` determines the default answer text (the same request gets the same answer).
    `extra` carries anything else the dialect needs when writing the answer.
    """

    model: str
    stream: bool
    prompt_tokens: int
    seed: bytes
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | None = None
    json_mode: Literal["object", "schema"] | None = None
    json_schema: object = None
    max_tokens: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Answer:
    """The simulated model's answer, before any vendor formatting.

    `finish` is "stop", "length" or "tool_calls", or the `finish_reason` knob verbatim
    (a dialect maps the first three to its own words and passes anything else through).
    `output_tokens` counts visible and reasoning tokens; `cached_tokens` is part of
    `prompt_tokens`.
    """

    text: str | None
    tool_name: str | None
    tool_arguments: str | None
    finish: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int
    reasoning_tokens: int

    def text_pieces(self, chunks: int) -> list[str]:
        """The text split into `chunks` streamed deltas."""
        return split_text(self.text or "", chunks)

    def argument_pieces(self, chunks: int) -> list[str]:
        """The tool call's arguments JSON split into `chunks` streamed fragments."""
        return split_text(self.tool_arguments or "", chunks)

    @property
    def visible_tokens(self) -> int:
        return self.output_tokens - self.reasoning_tokens


def _chosen_tool(call: ChatCall, knobs: FaultKnobs) -> ToolSpec | None:
    if not call.tools or call.tool_choice == "none":
        return None
    if call.tool_choice in (None, "auto"):
        return call.tools[0] if knobs.tool_call else None
    if call.tool_choice == "required":
        return call.tools[0]
    return next((tool for tool in call.tools if tool.name == call.tool_choice), call.tools[0])


def plan_answer(call: ChatCall, knobs: FaultKnobs) -> Answer:
    """The answer to `call` under `knobs` (see `ChatCall` for how each field counts)."""
    tool = _chosen_tool(call, knobs)
    text: str | None = None
    arguments: str | None = None
    if tool is not None:
        schema = tool.parameters if tool.parameters is not None else {"type": "object"}
        arguments = orjson.dumps(example_for_schema(schema)).decode()
        visible = approx_text_tokens(tool.name + arguments)
        finish = "tool_calls"
    else:
        if knobs.text is not None:
            text = knobs.text
        elif call.json_mode == "schema":
            schema = call.json_schema if call.json_schema is not None else {"type": "object"}
            text = orjson.dumps(example_for_schema(schema)).decode()
        elif call.json_mode == "object":
            text = orjson.dumps({"answer": deterministic_text(call.seed)}).decode()
        else:
            text = deterministic_text(call.seed)
        visible = approx_text_tokens(text)
        finish = "stop"
        if call.max_tokens is not None and visible > call.max_tokens:
            text = text[: call.max_tokens * 4]
            visible = approx_text_tokens(text)
            finish = "length"
    if knobs.finish_reason is not None:
        finish = knobs.finish_reason
    return Answer(
        text=text,
        tool_name=tool.name if tool is not None else None,
        tool_arguments=arguments,
        finish=finish,
        prompt_tokens=call.prompt_tokens,
        output_tokens=visible + knobs.reasoning_tokens,
        cached_tokens=min(knobs.cached_tokens, call.prompt_tokens),
        reasoning_tokens=knobs.reasoning_tokens,
    )


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole (non-streamed) response: status, JSON body and extra headers."""

    status: int
    body: object
    headers: Mapping[str, str] = field(default_factory=dict)


def json_reply(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(body), content_type="application/json", headers=dict(headers or {})
    )


@dataclass(slots=True)
class CallContext:
    """Per-request facts a dialect writes into headers and bodies."""

    request_id: str
    started: float
    created: int
    request: web.Request
    response_id: str = ""

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)


class Dialect(ABC):
    """One vendor's wire format, as the simulator speaks it."""

    request_id_prefix: ClassVar[str] = "req_"
    request_id_length: ClassVar[int] = 24
    stream_content_type: ClassVar[str] = "text/event-stream"

    def __init__(self, api_key: str | None) -> None:
        self.api_key = api_key

    def new_context(self, request: web.Request) -> CallContext:
        return CallContext(
            request_id=new_id(self.request_id_prefix, self.request_id_length),
            started=time.perf_counter(),
            created=int(time.time()),
            request=request,
        )

    @abstractmethod
    def check_auth(self, request: web.Request, ctx: CallContext) -> Reply | None:
        """The vendor's authentication error, or None when the key is right (or unchecked)."""

    def start_read(self, request: web.Request) -> tuple[dict[str, str], web.Response | None]:
        """The start of a read that is not a chat call (a models list): the response
        headers, and the vendor's authentication error reply when the key is wrong."""
        ctx = self.new_context(request)
        headers = self.headers(ctx, None)
        auth = self.check_auth(request, ctx)
        return headers, None if auth is None else json_reply(auth.status, auth.body, headers)

    @abstractmethod
    def parse(self, body: object, ctx: CallContext) -> ChatCall | Reply:
        """The call a request body (parsed JSON, None when unparsable) asks for, or the
        vendor's validation error for it."""

    @abstractmethod
    def error(self, status: int, knobs: FaultKnobs, call: ChatCall | None, ctx: CallContext) -> Reply:
        """The vendor's error response for HTTP `status` (`knobs.error_code` and
        `error_message` override its code and text)."""

    @abstractmethod
    def headers(self, ctx: CallContext, snap: RateLimitSnapshot | None) -> dict[str, str]:
        """Headers of every response: request id, rate-limit figures when `snap` is set."""

    def knob_error(self, message: str, knob: str | None) -> Reply:
        """The 400 for a bad `x-sim-knobs` header, in the vendor's error shape if it wants."""
        return Reply(400, {"error": {"message": message, "param": knob, "code": "invalid_sim_knobs"}})

    def retry_headers(self, retry_after_s: float) -> dict[str, str]:
        """`retry-after` in whole seconds (rounded up), as HTTP defines it."""
        return {"retry-after": str(math.ceil(retry_after_s))}

    @abstractmethod
    def completion(self, call: ChatCall, answer: Answer, ctx: CallContext) -> object:
        """The JSON body of a non-streamed answer."""

    @abstractmethod
    def stream_frames(self, call: ChatCall, answer: Answer, ctx: CallContext, chunks: int) -> list[bytes]:
        """Every event of a streamed answer, the vendor's closing events included."""

    def stream_end(self, call: ChatCall, ctx: CallContext) -> bytes:
        """Bytes after the last frame of a complete stream (OpenAI's `[DONE]`); none by default."""
        return b""

    @abstractmethod
    def stream_error(self, status: int, knobs: FaultKnobs, call: ChatCall, ctx: CallContext) -> bytes:
        """The vendor's in-stream error event for a failure that HTTP would give `status`."""

    @abstractmethod
    def malformed(self, ctx: CallContext) -> bytes:
        """A broken event: a `data:` line whose JSON is cut off."""


# --------------------------------------------------------------------------- #
# the engine
# --------------------------------------------------------------------------- #


@dataclass(slots=True)
class _Flight:
    """Bookkeeping for one in-flight chat request."""

    settled: bool = False  # outcome already counted in stats


def _drop_connection(request: web.Request) -> None:
    """Close the TCP connection now (buffered bytes are flushed, then FIN)."""
    transport = request.transport
    if transport is not None:
        transport.close()


class ChatEngine:
    """Runs chat requests for one dialect against one `SimControl`."""

    def __init__(self, dialect: Dialect, control: SimControl) -> None:
        self.dialect = dialect
        self.control = control

    def _error(self, reply: Reply, ctx: CallContext, snap: RateLimitSnapshot | None) -> web.Response:
        self.control.stats.errors += 1
        return json_reply(reply.status, reply.body, {**self.dialect.headers(ctx, snap), **reply.headers})

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A chat request, streamed or not; counts a disconnect when the client goes away."""
        stats = self.control.stats
        stats.requests += 1
        stats.active += 1
        flight = _Flight()
        try:
            return await self._handle(request, flight)
        except asyncio.CancelledError:
            if not flight.settled:
                self.control.stats.disconnects += 1
            raise
        finally:
            self.control.stats.active -= 1

    async def _handle(self, request: web.Request, flight: _Flight) -> web.StreamResponse:
        control, dialect = self.control, self.dialect
        ctx = dialect.new_context(request)
        raw = await request.read()
        body: object
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = None
        control.stats.last_request = body
        auth = dialect.check_auth(request, ctx)
        if auth is not None:
            flight.settled = True
            return self._error(auth, ctx, None)
        try:
            knobs = control.knobs_for_request(request.headers.get(KNOBS_HEADER))
        except KnobError as exc:
            flight.settled = True
            reply = dialect.knob_error(f"Invalid {KNOBS_HEADER} header: {exc}", exc.field_name)
            return self._error(reply, ctx, None)
        await sleep_ms(knobs.first_byte_delay_ms)
        parsed = dialect.parse(body, ctx)
        snap = control.ratelimit(knobs, parsed.prompt_tokens if isinstance(parsed, ChatCall) else 0)
        if isinstance(parsed, Reply):
            flight.settled = True
            return self._error(parsed, ctx, snap)
        call = parsed
        if knobs.status is not None and not (call.stream and knobs.error_after_chunks is not None):
            flight.settled = True
            reply = dialect.error(knobs.status, knobs, call, ctx)
            if knobs.retry_after_s is not None:
                reply = Reply(
                    reply.status, reply.body, {**reply.headers, **dialect.retry_headers(knobs.retry_after_s)}
                )
            return self._error(reply, ctx, snap)
        if knobs.drop_after_chunks is not None and not call.stream:
            flight.settled = True
            control.stats.dropped += 1
            _drop_connection(request)
            return web.Response(status=500)  # never delivered
        answer = plan_answer(call, knobs)
        if not call.stream:
            flight.settled = True
            control.stats.completed += 1
            return json_reply(200, dialect.completion(call, answer, ctx), dialect.headers(ctx, snap))
        return await self._stream(request, flight, knobs, call, answer, ctx, snap)

    async def _stream(
        self,
        request: web.Request,
        flight: _Flight,
        knobs: FaultKnobs,
        call: ChatCall,
        answer: Answer,
        ctx: CallContext,
        snap: RateLimitSnapshot,
    ) -> web.StreamResponse:
        control, dialect = self.control, self.dialect
        frames = dialect.stream_frames(call, answer, ctx, knobs.chunks)
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
        response = web.StreamResponse(status=200, headers=dialect.headers(ctx, snap))
        response.content_type = dialect.stream_content_type
        response.charset = "utf-8"
        delay = knobs.chunk_delay_ms
        try:
            await response.prepare(request)
            sent = frames[:cut]
            end = dialect.stream_end(call, ctx) if not fault else b""
            if delay <= 0:
                if sent or end:
                    await response.write(b"".join(sent) + end)
            else:
                for i, frame in enumerate(sent):
                    if i:
                        await sleep_ms(delay)
                    await response.write(frame)
                if end:  # the end marker follows the last frame at once
                    await response.write(end)
            if fault and cut:
                await sleep_ms(delay)
            if fault == "drop":
                flight.settled = True
                control.stats.dropped += 1
                _drop_connection(request)
                return response
            if fault == "error":
                status = knobs.status if knobs.status is not None else 500
                await response.write(dialect.stream_error(status, knobs, call, ctx))
            elif fault == "malformed":
                await response.write(dialect.malformed(ctx))
            await response.write_eof()
        except ConnectionError:
            if not flight.settled:
                flight.settled = True
                control.stats.disconnects += 1
            return response
        flight.settled = True
        if fault:
            control.stats.errors += 1
        else:
            control.stats.completed += 1
        return response


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_simulator_app(
    dialect: Dialect,
    knobs: FaultKnobs | None,
    chat_routes: list[str],
    other_routes: Mapping[tuple[str, str], Handler] | None = None,
) -> web.Application:
    """An aiohttp app serving `dialect`: chat on every path of `chat_routes` (POST), the
    `other_routes` ((method, path) -> handler, such as a models list) and `/_sim/*`."""
    control = SimControl(knobs)
    engine = ChatEngine(dialect, control)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    for path in chat_routes:
        app.router.add_post(path, engine.handle)
    for (method, path), handler in (other_routes or {}).items():
        app.router.add_route(method, path, handler)
    add_control_routes(app, control)
    return app
