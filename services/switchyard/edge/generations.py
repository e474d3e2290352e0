"""Generations on long-lived `GenerateFrames` calls: the adapter hop as messages, not calls.

A call of its own costs both sides several times what a message on an open call does, and
the adapter hop is on every request. So an edge keeps up to `STREAMS_PER_TARGET` streams
open per adapter target, opened when first needed and used in turn (through Envoy each
stream may reach another replica of the adapter). A generation is a `start` message under
an id of this edge's choosing; the adapter's answers come back under that id, the last one
holding `done` or an `error`; `cancel()` sends a `cancel` (the adapter closes the upstream).

* Each stream is a `MuxCall` (one writer task, one reader task); the reader hands each
  answer to its generation's queue.
* When a stream fails, every generation waiting on it fails UNAVAILABLE (reason
  DEPENDENCY_UNAVAILABLE, as a call to an adapter that is down), and the next generation
  opens another stream. A generation's own failure comes as its `error` message.
  A stream nobody used for `STREAM_IDLE_S` is opened afresh (a proxy may have ended it).
* A stream older than its maximum age (`STREAM_MAX_AGE_S`, jittered per stream) is retired:
  its slot's next generation opens a fresh stream (through Envoy, perhaps to a replica added
  since), and the old one ends by itself once the generations on it are over, so scaling
  the adapters out reaches busy edges too. Ending a retired stream fails nothing; a retired
  stream that fails before then fails what waits on it, as any stream does.
* The caller's deadline is the generation's: sent to the adapter, and kept here too (the
  answer is then DEADLINE_EXCEEDED, reason TIMEOUT, and the generation is cancelled) by one
  timer per generation, set when it first waits: answers cost no timer each.
* Failures are raised as `SwitchyardError`s.
* Each message carries every request waiting when it is written, and the adapter answers
  likewise (`GenerateFrames`): a busy stream costs one message where it cost many. Under
  concurrency a frame of starts may wait briefly for company (`hold`), and a start joins the
  frame in the making rather than the next stream in turn.
* An adapter without GenerateFrames (UNIMPLEMENTED: an older build) gets generations on
  `GenerateStream`, a message each; one without that either is called with `Generate`, for
  this generation and every later one.
* Answers wait in the generation's inbox until the caller reads them: a slow reader never
  holds up the other generations on the stream (answers are bounded by max tokens).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, Protocol

import grpc
from opentelemetry.trace import Span

from switchyard.common import answer_events, tracing
from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error, from_status
from switchyard.common.logging import get_logger
from switchyard.common.multiplex import FrameHold
from switchyard.edge.mux import STREAM_MAX_AGE_S, BidiCall, MuxCall
from switchyard.v1 import provider_pb2

log = get_logger(__name__)

STREAMS_PER_TARGET: Final = 4
STREAM_IDLE_S: Final = 60.0
GENERATE_METHOD: Final = "/switchyard.v1.ProviderAdapterService/Generate"


class AdapterCalls(Protocol):
    """What generations call on an adapter (a `ProviderAdapterServiceStub` fits)."""

    def GenerateFrames(
        self,
    ) -> BidiCall[provider_pb2.GenerateFramesRequest, provider_pb2.GenerateFramesResponse]: ...

    def GenerateStream(
        self,
    ) -> BidiCall[provider_pb2.GenerateStreamRequest, provider_pb2.GenerateStreamResponse]: ...

    def Generate(
        self, request: provider_pb2.GenerateRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryStreamCall[provider_pb2.GenerateRequest, provider_pb2.GenerateResponse]: ...


class _Lost:
    """What a generation's queue gets when its stream failed."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Expired:
    """What a generation's inbox gets when its deadline passes."""

    __slots__ = ()


_EXPIRED: Final = _Expired()

_Answer = provider_pb2.GenerateStreamResponse | _Lost | _Expired


class _Inbox:
    """A generation's answers, in order, for its one reader (lighter than an `asyncio.Queue`:
    every answer of every generation passes through one)."""

    __slots__ = ("items", "_waiter")

    def __init__(self) -> None:
        self.items: deque[_Answer] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: _Answer) -> None:
        self.items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> _Answer:
        while not self.items:
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return self.items.popleft()


class _Stream:
    """One GenerateFrames (or GenerateStream) call (a `MuxCall`) and the generations waiting on it."""

    def __init__(
        self, stub: AdapterCalls, *, framed: bool, now: float, max_age_s: float, hold: FrameHold | None
    ) -> None:
        self.waiting: dict[int, _Inbox] = {}
        self.retired = False
        """Past its age (or idle): no new generation goes on it; it ends once none waits."""
        self.framed = framed
        self.mux: MuxCall[provider_pb2.GenerateStreamRequest, provider_pb2.GenerateStreamResponse] = MuxCall(
            stub.GenerateFrames() if framed else stub.GenerateStream(),
            deliver=self._deliver,
            lost=self._lost,
            name="adapter-generations",
            now=now,
            max_age_s=max_age_s,
            pack=_frame if framed else None,
            unpack=_answers if framed else None,
            hold=hold,
        )

    def _deliver(self, response: provider_pb2.GenerateStreamResponse) -> None:
        waiting = self.waiting.get(response.id)
        if waiting is not None:
            waiting.put(response)

    def _lost(self, error: BaseException) -> None:
        """Every generation waiting on the call gets `error`."""
        waiting, self.waiting = self.waiting, {}
        for inbox in waiting.values():
            inbox.put(_Lost(error))

    def retire(self) -> None:
        """Take no new generation; end the call once none waits (at once if none does)."""
        self.retired = True
        self.settle()

    def settle(self) -> None:
        """A generation left `waiting`: a retired stream ends when it was the last."""
        if self.retired and not self.waiting:
            self.mux.end()


class GenerationStreams:
    """Generations to one adapter target over a few shared GenerateStream calls.

    `max_age_s` is how long a stream takes new generations (see the module's docstring);
    `clock` is the monotonic clock it is measured on. `hold` lets a frame of starts wait for
    company (`switchyard.edge.mux.CompanyHold`); while one is in the making, the next start
    joins it rather than going to the next stream in turn.
    """

    def __init__(
        self,
        stub: AdapterCalls,
        *,
        streams: int = STREAMS_PER_TARGET,
        max_age_s: float = STREAM_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        hold: FrameHold | None = None,
    ) -> None:
        self.stub = stub
        self._hold = hold
        self._streams: list[_Stream | None] = [None] * max(1, streams)
        self._retired: list[_Stream] = []  # retired, maybe still open: `close` ends them too
        self._turn = 0
        self._next_id = 0
        self._max_age_s = max_age_s
        self.clock = clock
        self.framed = True
        """The adapter serves GenerateFrames (until it answers UNIMPLEMENTED)."""
        self.unary = False
        """The adapter has neither GenerateFrames nor GenerateStream: generations call Generate."""

    def generate(self, request: provider_pb2.GenerateRequest, *, timeout_s: float) -> Generation:
        """Start a generation; iterate the result for its `GenerateResponse` messages."""
        return Generation(self, request, time.monotonic() + timeout_s)

    def _stream(self, now: float) -> _Stream:
        stream = self._streams[self._turn]
        if stream is None or not stream.mux.queued:  # no frame in the making: the next in turn
            self._turn = (self._turn + 1) % len(self._streams)
            stream = self._streams[self._turn]
        if stream is not None and stream.mux.open:
            if now < stream.mux.retire_at and (stream.waiting or now - stream.mux.used <= STREAM_IDLE_S):
                return stream
            self._retire(stream)
        stream = self._streams[self._turn] = _Stream(
            self.stub, framed=self.framed, now=now, max_age_s=self._max_age_s, hold=self._hold
        )
        return stream

    def _retire(self, stream: _Stream) -> None:
        """Old or idle: the slot gets a fresh stream, this one ends when its work is over."""
        stream.retire()
        self._retired = [s for s in self._retired if s.mux.open]
        if stream.mux.open:
            self._retired.append(stream)

    def _start(
        self, request: provider_pb2.GenerateRequest, timeout_s: float, traceparent: str
    ) -> tuple[_Stream, int, _Inbox]:
        self._next_id += 1
        now = self.clock()
        stream = self._stream(now)
        inbox = stream.waiting[self._next_id] = _Inbox()
        stream.mux.send(
            provider_pb2.GenerateStreamRequest(
                id=self._next_id,
                start=request,
                traceparent=traceparent,
                timeout_ms=max(1, int(timeout_s * 1000)),
            ),
            now,
        )
        return stream, self._next_id, inbox

    def close(self) -> None:
        """End every stream, retired ones included (generations still waiting fail)."""
        for stream in (*self._streams, *self._retired):
            if stream is not None:
                stream.mux.fail(ConnectionError("closed"))
        self._streams = [None] * len(self._streams)
        self._retired = []


class Generation:
    """One generation: iterate it for the adapter's messages (the last holds `done`); a
    failure is raised as a `SwitchyardError`, as `from_rpc_error` reads a Generate call's.
    `cancel()` stops it when it is not over."""

    def __init__(
        self, owner: GenerationStreams, request: provider_pb2.GenerateRequest, deadline: float
    ) -> None:
        self._owner = owner
        self._request = request
        self._deadline = deadline
        self._span: Span | None = None
        self._stream: _Stream | None = None
        self._id = 0
        self._inbox: _Inbox | None = None
        self._expiry: asyncio.TimerHandle | None = None
        self._call: (
            grpc.aio.UnaryStreamCall[provider_pb2.GenerateRequest, provider_pb2.GenerateResponse] | None
        ) = None
        self._received = False
        self._over = False
        self._traceparent = ""
        if owner.unary:
            self._call_generate()
        else:
            # The call's own CLIENT span (Generate's channel interceptor starts one otherwise).
            self._span, self._traceparent = tracing.start_client_span(GENERATE_METHOD)
            self._stream, self._id, self._inbox = owner._start(request, self._remaining(), self._traceparent)

    def _remaining(self) -> float:
        return max(0.001, self._deadline - time.monotonic())

    def _call_generate(self) -> None:
        self._stop_timer()  # the call keeps the deadline itself
        self._call = self._owner.stub.Generate(self._request, timeout=self._remaining())

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> provider_pb2.GenerateResponse:
        if self._over:
            raise StopAsyncIteration
        if self._call is not None:
            return await self._next_from_call()
        inbox = self._inbox
        assert inbox is not None
        if not inbox.items and self._expiry is None:
            self._expiry = asyncio.get_running_loop().call_later(
                self._deadline - time.monotonic(), self._expire
            )
        answer = await inbox.get()
        if answer is _EXPIRED:
            self.cancel()
            raise SwitchyardError(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                Reason.TIMEOUT,
                "the adapter did not answer within the deadline",
                metadata={"provider": self._request.provider},
            ) from None
        if isinstance(answer, _Lost):
            error = answer.error
            if (
                not self._received
                and isinstance(error, grpc.aio.AioRpcError)
                and error.code() is grpc.StatusCode.UNIMPLEMENTED
            ):
                owner = self._owner
                if self._stream is not None and self._stream.framed:
                    # An older adapter: the same generation again, on GenerateStream.
                    if owner.framed:
                        log.info("adapter_without_generate_frames", provider=self._request.provider)
                    owner.framed = False
                    self._forget()
                    self._stream, self._id, self._inbox = owner._start(
                        self._request, self._remaining(), self._traceparent
                    )
                    return await self.__anext__()
                if not self._owner.unary:
                    log.info("adapter_without_generate_stream", provider=self._request.provider)
                self._owner.unary = True
                self._forget()
                self._end_span(grpc.StatusCode.UNIMPLEMENTED)
                self._call_generate()
                return await self._next_from_call()
            # The stream, not the generation, failed (the adapter went away, a proxy reset the
            # call): the adapter is unavailable to this generation, as a refused call would be.
            self._forget()
            cause = error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__
            raise self._failed(
                SwitchyardError(
                    grpc.StatusCode.UNAVAILABLE,
                    Reason.DEPENDENCY_UNAVAILABLE,
                    "the stream to the adapter was lost",
                    metadata={"provider": self._request.provider, "cause": cause},
                )
            )
        assert not isinstance(answer, _Expired)
        self._received = True
        if answer.HasField("error"):
            self._forget()
            raise self._failed(from_status(answer.error))
        message = answer.events
        if answer_events.unpack(message)[-1].HasField("done"):
            self._forget()
            self._finish(grpc.StatusCode.OK)
        return message

    async def _next_from_call(self) -> provider_pb2.GenerateResponse:
        assert self._call is not None
        try:
            message: provider_pb2.GenerateResponse = await anext(aiter(self._call))
        except StopAsyncIteration:
            self._finish(grpc.StatusCode.OK)
            raise
        except grpc.aio.AioRpcError as exc:
            raise self._failed(from_rpc_error(exc)) from None
        self._received = True
        return message

    def _expire(self) -> None:
        """The deadline passed: the reader gets that after the answers that came before it."""
        self._expiry = None
        if self._inbox is not None and not self._over:
            self._inbox.put(_EXPIRED)

    def _stop_timer(self) -> None:
        expiry, self._expiry = self._expiry, None
        if expiry is not None:
            expiry.cancel()

    def _forget(self) -> None:
        stream = self._stream
        if stream is not None:
            stream.waiting.pop(self._id, None)
            if stream.retired:
                stream.settle()

    def _failed(self, error: SwitchyardError) -> SwitchyardError:
        self._finish(error.code, error.message)
        return error

    def _finish(self, code: grpc.StatusCode, details: str | None = None) -> None:
        """The generation is over: end its span with `code`."""
        self._over = True
        self._stop_timer()
        self._end_span(code, details)

    def _end_span(self, code: grpc.StatusCode, details: str | None = None) -> None:
        span, self._span = self._span, None
        if span is not None:
            tracing.end_client_span(span, code, details)

    def cancel(self) -> None:
        """Stop the generation if it is not over (the adapter closes its upstream)."""
        if self._over:
            return
        self._finish(grpc.StatusCode.CANCELLED)
        if self._call is not None:
            self._call.cancel()
            return
        stream = self._stream
        if stream is not None and stream.waiting.pop(self._id, None) is not None and stream.mux.open:
            stream.mux.send(provider_pb2.GenerateStreamRequest(id=self._id, cancel=True), self._owner.clock())
            if stream.retired:
                stream.settle()  # after the cancel is queued: it is written before the call ends


def _frame(items: list[provider_pb2.GenerateStreamRequest]) -> provider_pb2.GenerateFramesRequest:
    return provider_pb2.GenerateFramesRequest(items=items)


def _answers(frame: provider_pb2.GenerateFramesResponse) -> Iterable[provider_pb2.GenerateStreamResponse]:
    return frame.items
