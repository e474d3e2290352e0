"""The CacheService: exact-match answers by tenant, model and request, cost-aware, with replay.

* `Lookup` computes the entry key (cache/keys.py) and reads the tiered store (an in-process
  LRU in front of Redis, or of memory alone); a hit returns the answer as it was streamed,
  with what it saves;
* `Store` takes an answer the edge got from a provider: finished answers only (stop, length
  or tool calls; never an error or a filtered answer), TTL by the kind of question
  (cache/ttl.py) unless the caller set one, admission and eviction by value (cache/store.py);
* `Invalidate` removes by tenant, model or key glob (at least one of them);
* `GetStats` counts lookups, hits and savings per tenant, with lookup latency percentiles;
* `GetCapabilities` says what this cache does: exact matching and streaming replay. Semantic
  matching needs an embedder, which this build does not configure, so it says so.

Every request names its tenant; entries never cross tenants (the tenant leads the key).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Final

import grpc
from google.protobuf import timestamp_pb2

from switchyard.cache.keys import cache_key
from switchyard.cache.store import CacheEntry, CacheStore, build_store
from switchyard.cache.ttl import classify_ttl
from switchyard.common.errors import invalid
from switchyard.common.logging import get_logger
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2

__all__ = ["MAX_ANSWER_BYTES", "CacheServicer", "CacheStats", "build"]

log = get_logger(__name__)

SERVICE_NAME: Final = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
# An answer larger than this is not cached (it would crowd out many smaller ones).
MAX_ANSWER_BYTES: Final = 4 * 1024 * 1024
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
    saved_micros: int = 0


class CacheStats:
    """Lookup counters per tenant and recent lookup latencies (this replica's)."""

    def __init__(self) -> None:
        self._tenants: dict[str, _TenantStats] = {}
        self._latencies_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)

    def lookup(self, tenant_id: str, *, hit: bool, saved_micros: int, latency_ms: float) -> None:
        """Count one lookup."""
        stats = self._tenants.setdefault(tenant_id, _TenantStats())
        stats.lookups += 1
        if hit:
            stats.exact_hits += 1
            stats.saved_micros += saved_micros
        self._latencies_ms.append(latency_ms)

    def response(self, tenant_id: str) -> cache_pb2.GetStatsResponse:
        """The counters of one tenant, or of all when `tenant_id` is empty."""
        chosen = [self._tenants[tenant_id]] if tenant_id in self._tenants else []
        if not tenant_id:
            chosen = list(self._tenants.values())
        ordered = sorted(self._latencies_ms)
        return cache_pb2.GetStatsResponse(
            lookups=sum(s.lookups for s in chosen),
            exact_hits=sum(s.exact_hits for s in chosen),
            saved_micros=sum(s.saved_micros for s in chosen),
            p50_lookup_ms=_rank(ordered, 50),
            p99_lookup_ms=_rank(ordered, 99),
        )


def _rank(ordered: list[float], percent: int) -> float:
    if not ordered:
        return 0.0
    return ordered[max(1, -(-percent * len(ordered) // 100)) - 1]


def _require(tenant_id: str, model: str, request: common_pb2.ChatRequest) -> None:
    if not tenant_id.strip():
        raise invalid("a cache request names its tenant", "tenant_id")
    if not model.strip():
        raise invalid("a cache request names the catalog model (or auto)", "model")
    if not request.messages:
        raise invalid("a request needs at least one message", "request.messages")


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Lookup, Store, Invalidate, GetStats and GetCapabilities on one store."""

    def __init__(self, store: CacheStore, *, ttl_overrides: dict[str, int] | None = None) -> None:
        self._store = store
        self._ttl_overrides = ttl_overrides
        self.stats = CacheStats()

    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.LookupResponse:
        """A cached answer for the request, if one is stored and fresh."""
        _require(request.tenant_id, request.model, request.request)
        started = time.perf_counter()
        entry = await self._store.get(cache_key(request.tenant_id, request.request, request.model))
        latency_ms = (time.perf_counter() - started) * 1000
        saved = entry.cost_micros if entry is not None else 0
        self.stats.lookup(request.tenant_id, hit=entry is not None, saved_micros=saved, latency_ms=latency_ms)
        if entry is None:
            return cache_pb2.LookupResponse(status=common_pb2.CACHE_STATUS_MISS)
        return cache_pb2.LookupResponse(
            status=common_pb2.CACHE_STATUS_HIT_EXACT,
            answer=cache_pb2.CachedAnswer.FromString(entry.payload),
            saved_micros=saved,
            stored_at=_timestamp(entry.stored_at),
        )

    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.StoreResponse:
        """Offer an answer; finished answers of a bounded size are admitted by value."""
        _require(request.tenant_id, request.model, request.request)
        answer = request.answer
        if answer.finish_reason not in _STORABLE:
            return cache_pb2.StoreResponse(admitted=False, reason="only finished answers are cached")
        if answer.cost_micros < 0:
            raise invalid("an answer's cost is at least 0", "answer.cost_micros")
        payload = answer.SerializeToString(deterministic=True)
        if len(payload) > MAX_ANSWER_BYTES:
            return cache_pb2.StoreResponse(admitted=False, reason=f"answer above {MAX_ANSWER_BYTES} bytes")
        decision = classify_ttl(request.request, overrides=self._ttl_overrides)
        now = time.time()
        entry = CacheEntry(
            key=cache_key(request.tenant_id, request.request, request.model),
            tenant_id=request.tenant_id,
            model=request.model,
            payload=payload,
            cost_micros=answer.cost_micros,
            stored_at=now,
            expires_at=now + decision.ttl_s,
        )
        admitted = await self._store.put(entry)
        return cache_pb2.StoreResponse(
            admitted=admitted,
            ttl_seconds=decision.ttl_s if admitted else 0,
            reason=decision.kind if admitted else "not admitted: worth less than what it would evict",
        )

    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: grpc.aio.ServicerContext
    ) -> cache_pb2.InvalidateResponse:
        """Remove the entries matching every filter given (at least one)."""
        if not (request.tenant_id or request.model or request.key_pattern):
            raise invalid("name a tenant, a model or a key pattern to invalidate", "tenant_id")
        removed = await self._store.invalidate(
            tenant_id=request.tenant_id, model=request.model, key_pattern=request.key_pattern
        )
        log.info("cache_invalidated", tenant=request.tenant_id, model=request.model, removed=removed)
        return cache_pb2.InvalidateResponse(removed=removed)

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
        """Exact matching and streaming replay; semantic matching is off without an embedder."""
        return cache_pb2.GetCapabilitiesResponse(
            exact=True, semantic=False, embedder=SEMANTIC_OFF, streaming_replay=True
        )


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def build(settings: Settings) -> ServiceParts:
    """The cache's bindings: a tiered store on Redis when `redis_url` is set, in memory otherwise."""
    store = build_store(
        settings.redis_url, max_bytes=settings.cache_max_bytes, l1_entries=settings.cache_l1_entries
    )
    servicer = CacheServicer(store)
    return ServiceParts(
        [
            ServiceBinding(
                SERVICE_NAME,
                lambda server: cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server),
            )
        ],
        close=store.close,
    )
