"""The edge's side of the response cache: look up before planning, replay a hit, store a miss.

The lookup is the one extra hop a cacheable request may take (DESIGN.md): bounded by
`cache_lookup_timeout_s`, and a cache that is slow or down is a miss, never an error (logged
once per outage). Storing happens after the answer, off the caller's path: offers are
gathered for `STORE_LINGER_S` and sent together (`StoreMany`), one call where there would have
been several (each call costs far more CPU than the entries it carries); at most
`STORE_QUEUE` wait, beyond that an offer is dropped (the cache is best effort).

Lookups travel as messages on one long-lived `LookupFrames` call (`StreamedLookups`; several
to a message when several wait), retired by age like the edge's other multiplexed calls
(`switchyard.edge.mux`): past `STREAM_MAX_AGE_S` the next lookup opens a fresh call, so cache
replicas added by a scale-out get lookups from busy edges too, and the old call ends once its
lookups are answered. A cache without `LookupFrames` (UNIMPLEMENTED: an older build) gets
them on `LookupStream`, a message each, from then on.
Stores go on `StoreMany` calls of their own, each free to reach any replica.

With `presence`, each `LookupFrames` call asks the replica it reaches for the keys it can
answer (cache/presence.py): once they have come, the lookup of a request the edge serves
alone whose key is not among them is answered as a miss here, sparing the hop (the cache
counts these lookups from the reports the edge sends each `SKIP_REPORT_S`). A call past its
age asks again, so no presence older than a call is used. A key stored moments ago may be
missed by a lookup racing its announcement, as it would by a lookup racing the store
itself; what this edge stored it knows as soon as the cache has answered the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Final, Protocol

import grpc

from switchyard.cache.keys import AUTO, CacheDecision, cache_decision, cache_key
from switchyard.cache.presence import fingerprint
from switchyard.common.errors import SwitchyardError, from_status
from switchyard.common.logging import get_logger
from switchyard.common.multiplex import FrameHold
from switchyard.common.tracing import current_traceparent
from switchyard.edge.mux import STREAM_MAX_AGE_S, BidiCall, MuxCall
from switchyard.v1 import cache_pb2, common_pb2

__all__ = ["AnswerRecorder", "EdgeCache", "StreamedLookups", "replay"]

log = get_logger(__name__)

CACHE_REASON: Final = "cache"
# How long offers are gathered before they are sent, how many go in one call, how many may wait.
STORE_LINGER_S: Final = 0.02
STORE_BATCH: Final = 64
STORE_QUEUE: Final = 1024
# Lookups answered here as misses are reported to the cache this often (when there are any).
SKIP_REPORT_S: Final = 1.0


class CacheCalls(Protocol):
    """What the edge calls on the cache (a `CacheServiceStub` fits)."""

    def LookupFrames(self) -> BidiCall[cache_pb2.LookupFramesRequest, cache_pb2.LookupFramesResponse]: ...

    def LookupStream(self) -> BidiCall[cache_pb2.LookupStreamRequest, cache_pb2.LookupStreamResponse]: ...

    async def StoreMany(
        self, request: cache_pb2.StoreManyRequest, *, timeout: float | None = None
    ) -> cache_pb2.StoreManyResponse: ...


class EdgeCache:
    """Lookups and stores for one edge, with the outage logging."""

    def __init__(
        self,
        stub: CacheCalls,
        *,
        max_temperature: float,
        lookup_timeout_s: float,
        store_timeout_s: float,
        store_linger_s: float = STORE_LINGER_S,
        hold: FrameHold | None = None,
        presence: bool = False,
    ) -> None:
        self._stub = stub
        self._max_temperature = max_temperature
        self._lookup_timeout_s = lookup_timeout_s
        self._store_timeout_s = store_timeout_s
        self._store_linger_s = store_linger_s
        self._down = False
        self._lookups = StreamedLookups(stub, hold=hold, presence=presence)
        self._offers: list[cache_pb2.StoreRequest] = []
        self._writer: asyncio.Task[None] | None = None
        self._flush = asyncio.Event()  # set when the edge stops: send without gathering
        self._dropping = False

    def decide(self, request: common_pb2.ChatRequest) -> CacheDecision:
        """What the cache may do for `request`."""
        return cache_decision(request, self._max_temperature)

    async def lookup(
        self, tenant_id: str, request: common_pb2.ChatRequest, model: str, *, alone: bool = True
    ) -> cache_pb2.LookupResponse | None:
        """The hit for `request`, or None (a miss, or the cache could not answer in time).

        `alone`: the request is the only one the edge serves, so a lookup the presence says
        will miss is answered here. Under concurrency it is asked anyway: it travels in a
        frame with others' lookups for a fraction of a message, and the answers, coming
        together, gather those requests into one frame of generation starts, which saves
        more than the hop costs (measured on the bench mesh, unary at 16 concurrent: 455
        req/s asking, 406 answering sure misses here)."""
        lookup = cache_pb2.LookupRequest(tenant_id=tenant_id, request=request, model=model or AUTO)
        lookups = self._lookups
        if alone and lookups.presence and lookups.skip(lookup):
            return None
        try:
            response = await lookups.ask(lookup, timeout_s=self._lookup_timeout_s)
        except (grpc.aio.AioRpcError, TimeoutError, ConnectionError, SwitchyardError) as exc:
            self._outage("lookup", exc)
            return None
        except Exception as exc:  # a slow or broken cache is a miss, never the caller's error
            log.error("cache_lookup_failed", error_type=type(exc).__name__, exc_info=exc)
            return None
        self._back()
        if response.status not in (common_pb2.CACHE_STATUS_HIT_EXACT, common_pb2.CACHE_STATUS_HIT_SEMANTIC):
            return None
        return response

    def offer(
        self, tenant_id: str, request: common_pb2.ChatRequest, model: str, answer: cache_pb2.CachedAnswer
    ) -> None:
        """Queue `answer` to be stored with the next batch (failures are logged, not raised),
        with the request's end user: the cache files the entry under a keyed hash of it, so an
        erasure of that end user removes it."""
        if len(self._offers) >= STORE_QUEUE:
            if not self._dropping:
                self._dropping = True
                log.warning("cache_offers_dropped", waiting=len(self._offers))
            return
        self._dropping = False
        self._offers.append(
            cache_pb2.StoreRequest(
                tenant_id=tenant_id,
                request=request,
                model=model or AUTO,
                answer=answer,
                end_user=request.metadata.end_user,
            )
        )
        if self._writer is None or self._writer.done():
            self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._offers:
            if self._store_linger_s > 0 and len(self._offers) < STORE_BATCH and not self._flush.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._flush.wait(), self._store_linger_s)
            batch, self._offers = self._offers[:STORE_BATCH], self._offers[STORE_BATCH:]
            try:
                stored = await self._stub.StoreMany(
                    cache_pb2.StoreManyRequest(stores=batch), timeout=self._store_timeout_s
                )
            except (grpc.aio.AioRpcError, TimeoutError) as exc:
                self._outage("store", exc)
                continue
            self._back()
            if self._lookups.presence:  # known here now, whether or not its announcement has come
                self._lookups.admitted(
                    store for store, result in zip(batch, stored.results, strict=False) if result.admitted
                )

    async def aclose(self) -> None:
        """Send what waits (within the store timeout), then stop."""
        self._lookups.close()
        self._flush.set()
        writer = self._writer
        if writer is None:
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(writer), self._store_timeout_s)
        writer.cancel()

    def _outage(self, step: str, exc: BaseException) -> None:
        if not self._down:
            self._down = True
            if isinstance(exc, grpc.aio.AioRpcError):
                status = exc.code().name
            elif isinstance(exc, SwitchyardError):
                status = exc.code.name
            elif isinstance(exc, TimeoutError):
                status = "DEADLINE_EXCEEDED"
            else:
                status = "UNAVAILABLE"
            log.warning("cache_unavailable", step=step, status=status)

    def _back(self) -> None:
        if self._down:
            self._down = False
            log.info("cache_available")


class _LookupCall:
    """One `LookupFrames` (or `LookupStream`) call (a `MuxCall`) and the lookups waiting on it."""

    def __init__(
        self,
        stub: CacheCalls,
        *,
        framed: bool,
        now: float,
        max_age_s: float,
        hold: FrameHold | None,
        presence: bool = False,
    ) -> None:
        self.waiting: dict[int, asyncio.Future[cache_pb2.LookupStreamResponse]] = {}
        self.present: set[int] | None = None
        """The fingerprints of the keys the replica holds (asked for with `presence`), once
        they have come; None: unknown, every lookup asks."""
        self.retired = False
        """Past its age: no new lookup goes on it; it ends once none waits."""
        self.framed = framed
        self.mux: MuxCall[cache_pb2.LookupStreamRequest, cache_pb2.LookupStreamResponse] = MuxCall(
            stub.LookupFrames() if framed else stub.LookupStream(),
            deliver=self._deliver,
            lost=self._lost,
            name="cache-lookups",
            now=now,
            max_age_s=max_age_s,
            pack=_lookup_frame if framed else None,
            unpack=_lookup_answers if framed else None,
            hold=hold,
        )
        if presence and framed:
            self.mux.send(cache_pb2.LookupStreamRequest(want_presence=True), now)

    def _deliver(self, response: cache_pb2.LookupStreamResponse) -> None:
        if response.id == 0:  # the presence (or an older cache refusing the word it was sent)
            if response.HasField("presence"):
                self._presence(response.presence)
            return
        waiting = self.waiting.pop(response.id, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(response)

    def _presence(self, presence: cache_pb2.KeyPresence) -> None:
        if presence.off:
            self.present = None
        elif presence.complete:
            self.present = set(presence.keys)
        elif self.present is not None:
            self.present.update(presence.keys)

    def _lost(self, error: BaseException) -> None:
        """The call is over: fail what waits on it (lookups not written yet included)."""
        waiting, self.waiting = self.waiting, {}
        unframed = self.framed and _unimplemented(error)
        for future in waiting.values():
            if not future.done():
                future.set_exception(
                    _FramesUnimplemented()
                    if unframed
                    else ConnectionError(f"lookup stream lost ({type(error).__name__})")
                )

    def forget(self, ask_id: int) -> None:
        """The lookup under `ask_id` is over (answered or not); a retired call ends after its last."""
        self.waiting.pop(ask_id, None)
        if self.retired and not self.waiting:
            self.mux.end()

    def retire(self) -> None:
        """Take no new lookup; end the call once none waits (at once if none does)."""
        self.retired = True
        if not self.waiting:
            self.mux.end()


class StreamedLookups:
    """Lookups multiplexed on one `LookupStream` call (a `MuxCall`), opened when needed.

    Each answer goes to the lookup with its id. When the call fails, every lookup waiting on
    it fails and the next one opens another call. A call older than `max_age_s` (jittered,
    see `switchyard.edge.mux`) is retired: the next lookup opens a fresh call (through Envoy,
    perhaps to a cache replica added since), and the old one ends, quietly, once the lookups
    on it are over. `clock` is the monotonic clock the age is measured on; `hold` lets a
    frame of lookups wait for company (`switchyard.edge.mux.CompanyHold`); `presence` asks
    each call for the keys its replica holds, so that `skip` can answer sure misses here.
    """

    def __init__(
        self,
        stub: CacheCalls,
        *,
        max_age_s: float = STREAM_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        hold: FrameHold | None = None,
        presence: bool = False,
    ) -> None:
        self._stub = stub
        self._hold = hold
        self.presence = presence
        """Calls ask for the presence, and `skip` uses it."""
        self._skipped: dict[str, int] = {}
        """The lookups answered here as misses since the last report, by tenant."""
        self._report: asyncio.TimerHandle | None = None
        self._max_age_s = max_age_s
        self._clock = clock
        self._call: _LookupCall | None = None
        self._retired: list[_LookupCall] = []  # retired, maybe still open: `close` ends them too
        self._next_id = 0
        self.framed = True
        """The cache serves LookupFrames (until it answers UNIMPLEMENTED)."""

    async def ask(self, lookup: cache_pb2.LookupRequest, *, timeout_s: float) -> cache_pb2.LookupResponse:
        """The answer to `lookup`; raises what the cache answered, or why no answer came."""
        try:
            return await self._ask(lookup, timeout_s)
        except _FramesUnimplemented:
            if self.framed:
                log.info("cache_without_lookup_frames")
                self.framed = False
            return await self._ask(lookup, timeout_s)

    async def _ask(self, lookup: cache_pb2.LookupRequest, timeout_s: float) -> cache_pb2.LookupResponse:
        self._next_id += 1
        ask_id = self._next_id
        answer: asyncio.Future[cache_pb2.LookupStreamResponse] = asyncio.get_running_loop().create_future()
        now = self._clock()
        call = self._call
        if call is None or not call.mux.open or now >= call.mux.retire_at:
            if call is not None and call.mux.open:
                self._retire(call)
            call = self._call = _LookupCall(
                self._stub,
                framed=self.framed,
                now=now,
                max_age_s=self._max_age_s,
                hold=self._hold,
                presence=self.presence,
            )
        call.waiting[ask_id] = answer
        call.mux.send(
            cache_pb2.LookupStreamRequest(id=ask_id, lookup=lookup, traceparent=current_traceparent()), now
        )
        try:
            async with asyncio.timeout(timeout_s):
                response = await answer
        finally:
            call.forget(ask_id)
        if response.HasField("error"):
            raise from_status(response.error)
        return response.lookup

    def skip(self, lookup: cache_pb2.LookupRequest) -> bool:
        """Whether the presence of the current call says `lookup` would miss (then it is counted
        for the next report, and need not be asked)."""
        call = self._call
        if (
            call is None
            or call.present is None
            or not call.mux.open
            or self._clock() >= call.mux.retire_at  # asking retires it: a fresh presence comes
        ):
            return False
        if fingerprint(cache_key(lookup.tenant_id, lookup.request, lookup.model)) in call.present:
            return False
        skipped = self._skipped
        skipped[lookup.tenant_id] = skipped.get(lookup.tenant_id, 0) + 1
        if self._report is None:
            self._report = asyncio.get_running_loop().call_later(SKIP_REPORT_S, self._send_report)
        return True

    def admitted(self, stores: Iterable[cache_pb2.StoreRequest]) -> None:
        """The cache admitted `stores`: the current call's presence takes their keys at once
        (at worst a lookup asked in vain, if the call reaches another replica)."""
        call = self._call
        if call is not None and call.present is not None:
            call.present.update(fingerprint(cache_key(s.tenant_id, s.request, s.model)) for s in stores)

    def _send_report(self) -> None:
        """Tell the cache how many lookups were answered here (on the current call; if none is
        open, at the next report)."""
        self._report = None
        call = self._call
        skipped = self._skipped
        if not skipped:
            return
        if call is None or not call.mux.open or call.mux.ending:
            self._report = asyncio.get_running_loop().call_later(SKIP_REPORT_S, self._send_report)
            return
        call.mux.send(cache_pb2.LookupStreamRequest(skipped=skipped))
        self._skipped = {}

    def _retire(self, call: _LookupCall) -> None:
        call.retire()
        self._retired = [c for c in self._retired if c.mux.open]
        if call.mux.open:
            self._retired.append(call)

    def close(self) -> None:
        """End the stream, retired ones included (lookups still waiting fail; skipped lookups
        not yet reported go uncounted)."""
        if self._report is not None:
            self._report.cancel()
            self._report = None
        for call in (self._call, *self._retired):
            if call is not None:
                call.mux.fail(ConnectionError("closed"))
        self._call = None
        self._retired = []


class _FramesUnimplemented(Exception):
    """The cache has no LookupFrames: the lookup is asked again on LookupStream."""


def _unimplemented(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() is grpc.StatusCode.UNIMPLEMENTED


def _lookup_frame(items: list[cache_pb2.LookupStreamRequest]) -> cache_pb2.LookupFramesRequest:
    return cache_pb2.LookupFramesRequest(items=items)


def _lookup_answers(frame: cache_pb2.LookupFramesResponse) -> Iterable[cache_pb2.LookupStreamResponse]:
    return frame.items


async def replay(
    hit: cache_pb2.LookupResponse, request_id: str
) -> AsyncGenerator[common_pb2.ChatChunk, None]:
    """The chunks of a cached answer, as a provider's answer would arrive."""
    answer = hit.answer
    yield common_pb2.ChatChunk(
        routing=common_pb2.RoutingInfo(
            model=answer.model, provider=answer.provider, attempt=0, reason=CACHE_REASON
        )
    )
    for delta in answer.deltas:
        yield common_pb2.ChatChunk(delta=delta)
    yield common_pb2.ChatChunk(usage=answer.usage)
    yield common_pb2.ChatChunk(
        done=common_pb2.Done(
            request_id=request_id,
            finish_reason=answer.finish_reason,
            cost_micros=0,
            cache_status=hit.status,
            saved_micros=hit.saved_micros,
            cache_similarity=hit.similarity,
        )
    )


class AnswerRecorder:
    """Collects a streamed answer's chunks into a `CachedAnswer` (deltas kept as streamed);
    with `keep_deltas` False, only its routing, usage and done (what a request's bookkeeping
    needs when the answer is not kept)."""

    def __init__(self, *, keep_deltas: bool = True) -> None:
        self.keep_deltas = keep_deltas
        self.deltas: list[common_pb2.Delta] = []
        self.routing: common_pb2.RoutingInfo | None = None
        self.usage: common_pb2.Usage | None = None
        self.done: common_pb2.Done | None = None

    def see(self, chunk: common_pb2.ChatChunk) -> str | None:
        """Note one chunk; returns its kind (`ChatChunk.event`'s field name)."""
        kind = chunk.WhichOneof("event")
        if kind == "delta":
            if self.keep_deltas:
                self.deltas.append(chunk.delta)
        elif kind == "routing":
            self.routing = chunk.routing
        elif kind == "usage":
            self.usage = chunk.usage
        elif kind == "done":
            self.done = chunk.done
        return kind

    def answer(self) -> cache_pb2.CachedAnswer | None:
        """The whole answer, or None when it did not finish (no done, or a shared copy)."""
        done = self.done
        if done is None or self.routing is None or done.cache_status == common_pb2.CACHE_STATUS_DEDUPLICATED:
            return None
        return cache_pb2.CachedAnswer(
            deltas=self.deltas,
            usage=self.usage,
            finish_reason=done.finish_reason,
            model=self.routing.model,
            provider=self.routing.provider,
            cost_micros=done.cost_micros,
        )
