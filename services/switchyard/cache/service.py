"""The CacheService: answers by tenant, model and request, exact or semantic, cost-aware, replayed.

* `Lookup` computes the entry key (cache/keys.py) and reads the tiered store (an in-process
  LRU in front of Redis, or of memory alone); without an exact entry, a paraphrase of a
  cached question in the same scope may answer (cache/semantic.py), its similarity reported;
* `Store` takes an answer the edge got from a provider: finished answers only (stop, length
  or tool calls; never an error or a filtered answer), TTL by the kind of question
  (cache/ttl.py) unless the caller set one, admission and eviction by value (cache/store.py);
  its question is embedded and indexed for semantic matching;
* `Invalidate` removes by tenant, model or key glob (at least one of them), or the entries of
  one end user of a tenant (an erasure): each entry keeps a keyed hash of the end user whose
  request produced it (the offer's `end_user`, else its request's `metadata.end_user`), never
  the id, and the store indexes entries by it; with Redis, the erasure also reaches the other
  replicas' semantic indexes and the vector feed they share (cache/vectors.py);
* `LookupFrames` calls that ask (`want_presence`) are sent the fingerprints of the keys this
  replica can answer, then each key as it is admitted here or, with Redis, by a peer
  (cache/presence.py), so an edge answers a lookup sure to miss itself; it reports how many
  it answered (`skipped`);
* `GetStats` counts lookups (those the edges answered from the presence as misses), exact and
  semantic hits and savings per tenant, with lookup latency percentiles (of the lookups this
  replica answered);
* `GetCapabilities` says what this cache does: exact matching and streaming replay always,
  semantic matching when the local embedder is installed (the `semantic` extra) and on.

Every request names its tenant; entries never cross tenants (the tenant leads the key and the
semantic scope).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import grpc
from redis.exceptions import RedisError

from switchyard.cache.embed import Embedder, load_local_embedder, unavailable_reason
from switchyard.cache.embed_provider import ProviderEmbedder, parse_embedder_setting
from switchyard.cache.keys import cache_key, key_matches
from switchyard.cache.presence import (
    LOADING,
    PRESENT_STREAM_MAXLEN,
    SEMANTIC_ON,
    KeyPresence,
    build_presence_feed,
    fingerprint,
)
from switchyard.cache.semantic import DEFAULT_THRESHOLD, SemanticIndex, literals_of, question_text, scope_of
from switchyard.cache.store import REDIS_PREFIX, CacheEntry, CacheStore, build_store
from switchyard.cache.ttl import classify_ttl
from switchyard.cache.vectors import (
    IndexedQuestion,
    RemovedQuestions,
    VectorFeed,
    VectorRecord,
    build_vector_feed,
)
from switchyard.common import tracing
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError, invalid, shutting_down
from switchyard.common.logging import get_logger
from switchyard.common.multiplex import Multiplexer, Multiplexers
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.common.tasks import cancel_all
from switchyard.common.timestamps import timestamp_of
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2, provider_pb2_grpc

__all__ = ["MAX_ANSWER_BYTES", "CacheServicer", "CacheStats", "build"]

log = get_logger(__name__)

SERVICE_NAME: Final = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
# An answer larger than this is not cached (it would crowd out many smaller ones).
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
# Lookups of one stream in progress at once (a semantic one waits for its embedding).
MAX_STREAMED_LOOKUPS: Final = 256
_SHUTTING_DOWN: Final = shutting_down("cache")
# Lookup latencies kept for the percentiles.
LATENCY_SAMPLES: Final = 10_000
SEMANTIC_OFF: Final = "none: semantic matching needs an embedder, and none is configured"
_STORABLE: Final = frozenset(
    {common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_TOOL_CALLS}
)


@dataclass(slots=True)
class _TenantStats:
    lookups: int = 0
    exact_hits: int = 0
    semantic_hits: int = 0
    saved_micros: int = 0


class CacheStats:
    """Lookup counters per tenant and recent lookup latencies (this replica's)."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantStats] = {}
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def lookup(self, tenant_id: str, *, status: int, saved_micros: int, latency_ms: float) -> None:
        """Count one lookup."""
        stats = self._tenants.setdefault(tenant_id, _TenantStats())
        stats.lookups += 1
        if status == common_pb2.CACHE_STATUS_HIT_EXACT:
            stats.exact_hits += 1
        elif status == common_pb2.CACHE_STATUS_HIT_SEMANTIC:
            stats.semantic_hits += 1
        stats.saved_micros += saved_micros
        self._latencies_ms.append(latency_ms)

    def skipped(self, tenant_id: str, lookups: int) -> None:
        """Count lookups an edge answered as misses from the presence (no latency here)."""
        self._tenants.setdefault(tenant_id, _TenantStats()).lookups += lookups

    def response(self, tenant_id: str) -> cache_pb2.GetStatsResponse:
        """The counters of one tenant, or of all when `tenant_id` is empty."""
        chosen = [self._tenants[tenant_id]] if tenant_id in self._tenants else []
        if not tenant_id:
            chosen = list(self._tenants.values())
        ordered = sorted(self._latencies_ms)
        return cache_pb2.GetStatsResponse(
            lookups=sum(s.lookups for s in chosen),
            exact_hits=sum(s.exact_hits for s in chosen),
            semantic_hits=sum(s.semantic_hits for s in chosen),
            saved_micros=sum(s.saved_micros for s in chosen),
            p50_lookup_ms=_rank(ordered, 50),
            p99_lookup_ms=_rank(ordered, 99),
        )


def _rank(ordered: list[float], percent: int) -> float:
    if not ordered:
        return 0.0
    return ordered[max(1, -(-percent * len(ordered) // 100)) - 1]


def _require(tenant_id: str, model: str, request: common_pb2.ChatRequest, at: str = "") -> None:
    """The fields every cache call needs; `at` prefixes the field paths (an item of a batch)."""
    if not tenant_id.strip():
        raise invalid("a cache request names its tenant", f"{at}tenant_id")
    if not model.strip():
        raise invalid("a cache request names the catalog model (or auto)", f"{at}model")
    if not request.messages:
        raise invalid("a request needs at least one message", f"{at}request.messages")


def _check_store(request: cache_pb2.StoreRequest, at: str = "") -> None:
    _require(request.tenant_id, request.model, request.request, at)
    if request.answer.cost_micros < 0:
        raise invalid("an answer's cost is at least 0", f"{at}answer.cost_micros")


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Lookup, Store, Invalidate, GetStats and GetCapabilities on one store."""

    def __init__(
        self,
        store: CacheStore,
        *,
        ttl_overrides: dict[str, int] | None = None,
        semantic: SemanticIndex | None = None,
        semantic_threshold: float = DEFAULT_THRESHOLD,
        semantic_off_reason: str = SEMANTIC_OFF,
        vectors: VectorFeed | None = None,
        tenant_thresholds: Mapping[str, float] | None = None,
        presence: KeyPresence | None = None,
    ) -> None:
        self._store = store
        self.presence = (
            presence if presence is not None else KeyPresence(off=SEMANTIC_ON if semantic is not None else "")
        )
        """The keys this replica can answer, for the edges (a peer's admissions come by `PresenceFeed`)."""
        self._vectors = vectors
        self._tenant_thresholds = dict(tenant_thresholds or {})
        self._ttl_overrides = ttl_overrides
        self._semantic = semantic
        self._threshold = semantic_threshold
        self._semantic_off_reason = semantic_off_reason
        self.stats = CacheStats()
        self._lookup_streams: Multiplexers[cache_pb2.LookupStreamRequest, cache_pb2.LookupStreamResponse] = (
            Multiplexers(MAX_STREAMED_LOOKUPS)
        )

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        """A cached answer for the request, if one is stored and fresh."""
        return await self.lookup(request)

    async def LookupStream(
        self, requests: AsyncIterator[cache_pb2.LookupStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.LookupStreamResponse]:
        """Lookups as they come, each answered when ready (with its id), errors included."""
        async for reply in self._lookup_streams.serve(requests, self._on_lookup):
            yield reply

    async def LookupFrames(
        self, frames: AsyncIterator[cache_pb2.LookupFramesRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cache_pb2.LookupFramesResponse]:
        """LookupStream with several lookups, and answers, to a message."""
        async for answers in self._lookup_streams.serve_frames(frames, _lookup_items, self._on_lookup):
            yield cache_pb2.LookupFramesResponse(items=answers)

    async def _on_lookup(
        self,
        mux: Multiplexer[cache_pb2.LookupStreamRequest, cache_pb2.LookupStreamResponse],
        item: cache_pb2.LookupStreamRequest,
    ) -> None:
        if item.id == 0:  # word from the caller, not a lookup
            if item.want_presence:
                self.presence.follow(mux)
            for tenant_id, lookups in item.skipped.items():
                self.stats.skipped(tenant_id, lookups)
        elif mux.draining:  # the caller takes it as a miss
            mux.send(cache_pb2.LookupStreamResponse(id=item.id, error=_SHUTTING_DOWN.to_status_proto()))
        else:
            await mux.start(item.id, self._answer_lookup(mux, item))

    async def _answer_lookup(
        self,
        mux: Multiplexer[cache_pb2.LookupStreamRequest, cache_pb2.LookupStreamResponse],
        item: cache_pb2.LookupStreamRequest,
    ) -> None:
        started = time.time_ns()
        try:
            reply = cache_pb2.LookupStreamResponse(id=item.id, lookup=await self.lookup(item.lookup))
        except SwitchyardError as exc:
            reply = cache_pb2.LookupStreamResponse(id=item.id, error=exc.to_status_proto())
        except Exception as exc:  # a bug: logged, answered as INTERNAL, the stream goes on
            log.error("lookup_failed", error_type=type(exc).__name__, exc_info=exc)
            failure = SwitchyardError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, "internal error")
            reply = cache_pb2.LookupStreamResponse(id=item.id, error=failure.to_status_proto())
        if item.traceparent:
            tracing.record_span_in(
                item.traceparent,
                "switchyard.cache/lookup",
                start_time_ns=started,
                tracer_name="switchyard.cache",
                attributes={"switchyard.cache_status": common_pb2.CacheStatus.Name(reply.lookup.status)},
            )
        mux.send(reply)

    def drain(self) -> None:
        """Shutdown begins: lookup streams take no new lookup and end once theirs are answered."""
        self._lookup_streams.drain()

    async def lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        """What Lookup answers (raises SwitchyardError for a request it refuses)."""
        _require(request.tenant_id, request.model, request.request)
        if request.request.cache.HasField("semantic_threshold"):
            wanted = request.request.cache.semantic_threshold
            if not 0.0 < wanted <= 1.0:
                raise invalid(
                    "a semantic threshold is above 0 and at most 1", "request.cache.semantic_threshold"
                )
        started = time.perf_counter()
        key = cache_key(request.tenant_id, request.request, request.model)
        entry = await self._store.get(key)
        status, similarity = common_pb2.CACHE_STATUS_HIT_EXACT, 1.0
        if entry is None:
            entry, similarity = await self._semantic_lookup(request)
            status = common_pb2.CACHE_STATUS_HIT_SEMANTIC
        latency_ms = (time.perf_counter() - started) * 1000
        if entry is None:
            self.stats.lookup(
                request.tenant_id, status=common_pb2.CACHE_STATUS_MISS, saved_micros=0, latency_ms=latency_ms
            )
            return cache_pb2.LookupResponse(status=common_pb2.CACHE_STATUS_MISS)
        saved = entry.cost_micros
        self.stats.lookup(request.tenant_id, status=status, saved_micros=saved, latency_ms=latency_ms)
        return cache_pb2.LookupResponse(
            status=status,
            answer=cache_pb2.CachedAnswer.FromString(entry.payload),
            similarity=similarity,
            saved_micros=saved,
            stored_at=timestamp_of(entry.stored_at),
        )

    async def _semantic_lookup(self, request: cache_pb2.LookupRequest) -> tuple[CacheEntry | None, float]:
        """The entry of the nearest paraphrase in the request's scope, with its similarity."""
        semantic = self._semantic
        text = question_text(request.request)
        if semantic is None or not text:
            return None, 0.0
        cache = request.request.cache
        threshold = (
            cache.semantic_threshold
            if cache.HasField("semantic_threshold")
            else self._tenant_thresholds.get(request.tenant_id, self._threshold)
        )
        try:
            vector = await semantic.vector_of(text)
        except SwitchyardError as exc:  # the embedder is unavailable: an exact-only lookup
            self._embedder_down(exc)
            return None, 0.0
        scope = scope_of(request.tenant_id, request.request, request.model)
        match = semantic.search(scope, vector, threshold, literals_of(text))
        if match is None:
            return None, 0.0
        entry = await self._store.get(match.key)
        if entry is None:  # expired or evicted since it was indexed
            semantic.remove(match.key)
            return None, 0.0
        return entry, match.similarity

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        """Offer an answer; finished answers of a bounded size are admitted by value."""
        _check_store(request)
        return await self._store_checked(request)

    async def StoreMany(
        self, request: cache_pb2.StoreManyRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreManyResponse:
        """Offer several answers, each decided as by Store; all checked before any is stored."""
        for index, store in enumerate(request.stores):
            _check_store(store, f"stores[{index}].")
        return cache_pb2.StoreManyResponse(results=[await self._store_checked(s) for s in request.stores])

    async def _store_checked(self, request: cache_pb2.StoreRequest) -> cache_pb2.StoreResponse:
        answer = request.answer
        if answer.finish_reason not in _STORABLE:
            return cache_pb2.StoreResponse(admitted=False, reason="only finished answers are cached")
        payload = answer.SerializeToString(deterministic=True)
        if len(payload) > MAX_ANSWER_BYTES:
            return cache_pb2.StoreResponse(admitted=False, reason=f"answer above {MAX_ANSWER_BYTES} bytes")
        decision = classify_ttl(request.request, overrides=self._ttl_overrides)
        end_user = request.end_user or request.request.metadata.end_user
        end_user_hash = await self._store.end_user_digest(request.tenant_id, end_user) if end_user else ""
        now = time.time()
        entry = CacheEntry(
            key=cache_key(request.tenant_id, request.request, request.model),
            tenant_id=request.tenant_id,
            model=request.model,
            payload=payload,
            cost_micros=answer.cost_micros,
            stored_at=now,
            expires_at=now + decision.ttl_s,
            end_user_hash=end_user_hash,
        )
        admitted = await self._store.put(entry)
        if admitted:
            self.presence.add(((fingerprint(entry.key), entry.expires_at),))
        text = question_text(request.request)
        if admitted and self._semantic is not None and text:
            try:
                vector = await self._semantic.vector_of(text)
            except SwitchyardError as exc:  # stored, but not matched as a paraphrase
                self._embedder_down(exc)
                return cache_pb2.StoreResponse(
                    admitted=True, ttl_seconds=decision.ttl_s, reason=decision.kind
                )
            indexed = IndexedQuestion(
                entry.key,
                scope_of(request.tenant_id, request.request, request.model),
                literals_of(text),
                vector.tobytes(),
                expires_at=entry.expires_at,
                end_user_hash=entry.end_user_hash,
            )
            self.index(indexed)
            if self._vectors is not None:
                try:
                    await self._vectors.publish(indexed)
                except SwitchyardError:  # the answer is stored; other replicas just will not match it
                    log.warning("cache_vector_unshared")
        return cache_pb2.StoreResponse(
            admitted=admitted,
            ttl_seconds=decision.ttl_s if admitted else 0,
            reason=decision.kind if admitted else "not admitted: worth less than what it would evict",
        )

    def _embedder_down(self, exc: SwitchyardError) -> None:
        log.warning("cache_embedder_failed", reason=exc.reason.value, status=exc.code.name)

    def index(self, question: IndexedQuestion) -> None:
        """Add a stored question to this replica's semantic index (from Store or the feed),
        unless its entry has expired."""
        if self._semantic is None:
            return
        if question.expires_at and question.expires_at <= time.time():
            return
        import numpy

        vector = numpy.frombuffer(question.vector, dtype=numpy.float32)
        if vector.shape != (self._semantic.embedder.dimensions,):
            log.warning("cache_vector_skipped", reason="dimensions")
            return
        self._semantic.add(
            question.scope,
            question.key,
            vector,
            question.literals,
            expires_at=question.expires_at,
            end_user_hash=question.end_user_hash,
        )

    def apply(self, record: VectorRecord) -> None:
        """Index a question of the feed, or drop the questions a tombstone names."""
        if isinstance(record, IndexedQuestion):
            self.index(record)
        elif self._semantic is not None:
            for key in record.keys:
                self._semantic.remove(key)
            if record.end_user_hash:
                self._semantic.remove_end_user(record.end_user_hash)

    async def rebuild_index(self) -> None:
        """Index what the replicas stored before this one started (the feed's history, its
        tombstones applied); later `follow_vectors` picks up from where this ended."""
        if self._vectors is None or self._semantic is None:
            return
        try:
            history = await self._vectors.history()
        except (RedisError, OSError) as exc:  # serve anyway: the index fills as answers are stored
            log.warning("cache_semantic_rebuild_failed", error=type(exc).__name__)
            return
        for record in history:
            self.apply(record)
        log.info("cache_semantic_rebuilt", questions=len(self._semantic))

    async def follow_vectors(self) -> None:
        """Index what the other replicas store, and drop what they erase, as it comes."""
        if self._vectors is None or self._semantic is None:
            return
        async for record in self._vectors.subscribe():
            self.apply(record)

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.InvalidateResponse:
        """Remove the entries matching every filter given (at least one; an end user with the
        tenant)."""
        if request.end_user:
            if not request.tenant_id:
                raise invalid("an end user's entries are removed within a tenant: name it", "tenant_id")
            return await self._invalidate_end_user(request)
        if not (request.tenant_id or request.model or request.key_pattern):
            raise invalid("name a tenant, a model or a key pattern to invalidate", "tenant_id")
        removed = await self._store.invalidate(
            tenant_id=request.tenant_id, model=request.model, key_pattern=request.key_pattern
        )
        if self._semantic is not None:
            self._semantic.remove_where(
                lambda key: key_matches(
                    key, tenant_id=request.tenant_id, model=request.model, key_pattern=request.key_pattern
                )
            )
        log.info("cache_invalidated", tenant=request.tenant_id, model=request.model, removed=removed)
        return cache_pb2.InvalidateResponse(removed=removed)

    async def _invalidate_end_user(
        self, request: cache_pb2.InvalidateRequest
    ) -> cache_pb2.InvalidateResponse:
        """The entries of one end user, from the store (L1 included), this replica's semantic
        index and, with Redis, the replicas' vector feed: a tombstone every replica applies to
        its index, then a purge of the feed's copies of the questions (cache/vectors.py).
        Other replicas' L1 copies age out within seconds. A failure to reach the feed is
        UNAVAILABLE once the store's part is done: erasing again finishes the rest."""
        digest = await self._store.end_user_digest(request.tenant_id, request.end_user)
        keys = await self._store.invalidate_end_user(
            request.tenant_id, digest, model=request.model, key_pattern=request.key_pattern
        )
        # A whole end user's questions go by their hash too: expired entries' questions, and
        # those whose entries an earlier attempt removed, are no longer in the store's index.
        whole = not (request.model or request.key_pattern)
        if self._semantic is not None:
            for key in keys:
                self._semantic.remove(key)
            if whole:
                self._semantic.remove_end_user(digest)
        # Never the end user's id: the log says an end user's entries went, not whose.
        log.info(
            "cache_invalidated",
            tenant=request.tenant_id,
            model=request.model,
            end_user=True,
            removed=len(keys),
        )
        if self._vectors is not None:
            tombstone = RemovedQuestions(tuple(keys), digest if whole else "")
            if tombstone.keys or tombstone.end_user_hash:
                await self._vectors.publish(tombstone)
            await self._vectors.purge_removed()  # every tombstone's, so it also finishes a failed one
        return cache_pb2.InvalidateResponse(removed=len(keys))

    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetStatsResponse:
        """Lookups, hits and savings (this replica's counters) with the store's sizes."""
        response = self.stats.response(request.tenant_id)
        sizes = await self._store.stats(request.tenant_id)
        response.entries = sizes.entries
        response.memory_bytes = sizes.bytes
        return response

    async def GetCapabilities(
        self, request: cache_pb2.GetCapabilitiesRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.GetCapabilitiesResponse:
        """Exact matching and streaming replay; semantic matching when an embedder is loaded."""
        semantic = self._semantic
        return cache_pb2.GetCapabilitiesResponse(
            exact=True,
            semantic=semantic is not None,
            embedder=semantic.embedder.name if semantic is not None else self._semantic_off_reason,
            streaming_replay=True,
        )


def _embedder(settings: Settings, channels: ChannelPool) -> Embedder | str:
    """The configured embedder, or why there is none."""
    chosen = parse_embedder_setting(settings.cache_embedder)
    if chosen is None:
        # One BLAS thread: embedding a question is small matrix work, and BLAS threads
        # competing with the event loop for the cores slow it down more than they help.
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        local = load_local_embedder()
        return local if local is not None else f"none: {unavailable_reason()}"
    provider_name, model = chosen
    provider = settings.catalog.providers.get(provider_name)
    if provider is None:
        return f"none: the catalog has no provider {provider_name!r} for SWITCHYARD_CACHE_EMBEDDER"
    adapter = provider_pb2_grpc.ProviderAdapterServiceStub(
        channels.get(settings.adapter_target(provider.vendor))
    )
    return ProviderEmbedder(
        adapter,
        provider_name,
        model,
        dimensions=settings.cache_embedder_dimensions,
        timeout_s=settings.cache_lookup_timeout_s,
    )


def semantic_warm_up_failed(exc: SwitchyardError) -> None:
    """The embedder did not answer at start: paraphrases match once it does."""
    log.warning("cache_semantic_warm_up_failed", reason=exc.reason.value, status=exc.code.name)


def build(settings: Settings) -> ServiceParts:
    """The cache's bindings: a tiered store on Redis when `redis_url` is set, in memory otherwise;
    semantic matching with the local embedder when it is installed and not switched off."""
    erasure_key = settings.ledger_erasure_key
    store = build_store(
        settings.redis_url,
        max_bytes=settings.cache_max_bytes,
        l1_entries=settings.cache_l1_entries,
        end_user_key=erasure_key.encode() if erasure_key else None,
        announce=PRESENT_STREAM_MAXLEN,
    )
    semantic: SemanticIndex | None = None
    off = "off: SWITCHYARD_CACHE_SEMANTIC is false"
    channels = ChannelPool(default_timeout_s=settings.call_timeout_s)
    if settings.cache_semantic:
        embedder = _embedder(settings, channels)
        if isinstance(embedder, str):
            off = embedder
        else:
            semantic = SemanticIndex(embedder)
    log.info(
        "cache_semantic",
        on=semantic is not None,
        embedder=semantic.embedder.name if semantic is not None else off,
    )
    # Even with semantic matching off here: an erasure still purges what other replicas shared.
    vectors = build_vector_feed(settings.redis_url)
    # With semantic matching on, a paraphrase may answer: no lookup is sure to miss.
    announcements = build_presence_feed(settings.redis_url, REDIS_PREFIX) if semantic is None else None
    servicer = CacheServicer(
        store,
        semantic=semantic,
        semantic_threshold=settings.cache_semantic_threshold,
        semantic_off_reason=off,
        vectors=vectors,
        tenant_thresholds={
            name: tenant.semantic_threshold
            for name, tenant in settings.catalog.tenants.items()
            if tenant.semantic_threshold is not None
        },
    )
    presence = servicer.presence
    if announcements is not None:  # the shared store's keys: until they are read, ask every lookup
        presence.lost(LOADING)
    tasks: list[asyncio.Task[None]] = []

    async def start() -> None:
        if semantic is not None:
            # Load the model's weights (or learn a provider's vector size) before serving.
            try:
                await semantic.vector_of("warm up")
            except SwitchyardError as exc:
                semantic_warm_up_failed(exc)
        if vectors is not None and semantic is not None:
            await servicer.rebuild_index()  # before serving: a new replica starts complete
            tasks.append(asyncio.create_task(servicer.follow_vectors(), name="cache-vectors"))
        if announcements is not None:  # the keys present, before serving; then the peers'
            await announcements.start(presence)

    async def close() -> None:
        await cancel_all(tasks)
        if vectors is not None:
            await vectors.close()
        if announcements is not None:
            await announcements.close()
        await store.close()
        await channels.close()

    return ServiceParts(
        [
            ServiceBinding(
                SERVICE_NAME,
                lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
            )
        ],
        close=close,
        start=start,
        drain=servicer.drain,
    )


def _lookup_items(frame: cache_pb2.LookupFramesRequest) -> Iterable[cache_pb2.LookupStreamRequest]:
    return frame.items
