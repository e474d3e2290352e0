"""The edge's use of the response cache: a miss is answered by the providers and stored off the
path, a hit is replayed and recorded at no cost, a cache that is down is a miss.

The cache is the real `CacheServicer` on a `MemoryStore`, called in process; the providers
are a fixed answer with a routing chunk, deltas (one with a tool-call fragment), usage and done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.common.catalog import load_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.settings import Settings
from switchyard.edge.admission import AdmissionController
from switchyard.edge.cache import EdgeCache
from switchyard.edge.gateway import EdgeGateway
from switchyard.edge.pipeline import Caller, ChatPipeline
from switchyard.v1 import cache_pb2, common_pb2, ledger_pb2

CATALOG = load_catalog()
MODEL = "openai/gpt-4o-mini"


class Providers(ChatPipeline):
    """The pipeline with the vendors replaced by one fixed answer; counts its calls."""

    def __init__(self, *, finish: int = common_pb2.FINISH_REASON_STOP) -> None:
        super().__init__(Settings.from_env({}), CATALOG, ChannelPool())
        self.calls = 0
        self.finish = finish

    async def stream(  # type: ignore[override]
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        *,
        cache_status: int = common_pb2.CACHE_STATUS_BYPASS,
        **_: object,
    ) -> AsyncIterator[common_pb2.ChatChunk]:
        self.calls += 1
        yield common_pb2.ChatChunk(
            routing=common_pb2.RoutingInfo(
                model=MODEL, provider="openai", attempt=1, reason="requested model"
            )
        )
        yield common_pb2.ChatChunk(delta=common_pb2.Delta(text="Paris"))
        yield common_pb2.ChatChunk(
            delta=common_pb2.Delta(
                tool_calls=[common_pb2.ToolCallDelta(index=0, id="c1", name="f", arguments_fragment='{"a"')]
            )
        )
        yield common_pb2.ChatChunk(usage=common_pb2.Usage(input_tokens=10, output_tokens=3))
        yield common_pb2.ChatChunk(
            done=common_pb2.Done(
                request_id=request.request_id,
                finish_reason=self.finish,  # type: ignore[arg-type]
                cost_micros=42,
                cache_status=cache_status,  # type: ignore[arg-type]
            )
        )


class InProcess:
    """A `CacheServicer` called like a stub; `down` makes every call fail as UNAVAILABLE."""

    def __init__(self, servicer: CacheServicer) -> None:
        self.servicer = servicer
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    async def Lookup(
        self, request: cache_pb2.LookupRequest, *, timeout: float | None = None
    ) -> cache_pb2.LookupResponse:
        self._check()
        return await self.servicer.Lookup(request, None)  # type: ignore[arg-type]

    async def Store(
        self, request: cache_pb2.StoreRequest, *, timeout: float | None = None
    ) -> cache_pb2.StoreResponse:
        self._check()
        return await self.servicer.Store(request, None)  # type: ignore[arg-type]


async def _caller(authorization: str | None) -> Caller:
    return Caller("acme")


async def _no_limit(caller: Caller, model: object, tokens: int) -> None:
    return None


def edge(providers: Providers, cache: InProcess, records: list[ledger_pb2.CommitRequest]) -> EdgeGateway:
    return EdgeGateway(
        CATALOG,
        providers,
        authenticate=_caller,
        rate_limit=_no_limit,
        admission=AdmissionController(4, max_queue=4, queue_timeout_s=1),
        dedup=None,
        record=records.append,
        cache=EdgeCache(cache, max_temperature=0.0, lookup_timeout_s=1, store_timeout_s=1),
    )


def question(temperature: float | None = 0.0) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Capital of France?")])
    if temperature is not None:
        request.sampling.temperature = temperature
    return request


async def answer(gateway: EdgeGateway, request: common_pb2.ChatRequest) -> list[common_pb2.ChatChunk]:
    chunks = [chunk async for chunk in gateway.stream_as(request, Caller("acme"), timeout_s=5)]
    for _ in range(5):  # let the background store run
        await asyncio.sleep(0)
    return chunks


def cache_pair() -> tuple[CacheServicer, InProcess]:
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000))
    return servicer, InProcess(servicer)


async def test_a_miss_is_stored_and_the_next_ask_is_replayed_at_no_cost() -> None:
    providers = Providers()
    servicer, cache = cache_pair()
    records: list[ledger_pb2.CommitRequest] = []
    gateway = edge(providers, cache, records)
    first = await answer(gateway, question())
    assert first[-1].done.cache_status == common_pb2.CACHE_STATUS_MISS
    second = await answer(gateway, question())
    assert providers.calls == 1
    assert [c.delta for c in second if c.HasField("delta")] == [c.delta for c in first if c.HasField("delta")]
    done = second[-1].done
    assert (done.cache_status, done.cost_micros, done.saved_micros) == (
        common_pb2.CACHE_STATUS_HIT_EXACT,
        0,
        42,
    )
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert second[0].routing.reason == "cache" and second[0].routing.model == MODEL
    # The hit's ledger row: no cost, the saving, the model that made the answer.
    assert len(records) == 1
    row = records[0].record
    assert (row.cost_micros, row.cache_saved_micros, row.cache_status) == (
        0,
        42,
        common_pb2.CACHE_STATUS_HIT_EXACT,
    )
    assert (row.model, row.scope.tenant_id, row.usage.output_tokens) == (MODEL, "acme", 3)
    stats = servicer.stats.response("acme")
    assert (stats.lookups, stats.exact_hits, stats.saved_micros) == (2, 1, 42)


async def test_a_request_that_is_not_deterministic_never_touches_the_cache() -> None:
    providers = Providers()
    servicer, cache = cache_pair()
    gateway = edge(providers, cache, [])
    first = await answer(gateway, question(temperature=None))
    await answer(gateway, question(temperature=None))
    assert providers.calls == 2
    assert first[-1].done.cache_status == common_pb2.CACHE_STATUS_BYPASS
    assert servicer.stats.response("acme").lookups == 0


async def test_an_unfinished_answer_is_not_stored() -> None:
    providers = Providers(finish=common_pb2.FINISH_REASON_CONTENT_FILTER)
    _, cache = cache_pair()
    gateway = edge(providers, cache, [])
    await answer(gateway, question())
    second = await answer(gateway, question())
    assert providers.calls == 2
    assert second[-1].done.cache_status == common_pb2.CACHE_STATUS_MISS


async def test_a_cache_that_is_down_is_a_miss_and_recovers() -> None:
    providers = Providers()
    _, cache = cache_pair()
    cache.down = True
    gateway = edge(providers, cache, [])
    down = await answer(gateway, question())
    assert down[-1].done.cache_status == common_pb2.CACHE_STATUS_MISS
    assert providers.calls == 1
    cache.down = False
    await answer(gateway, question())  # stored now
    hit = await answer(gateway, question())
    assert hit[-1].done.cache_status == common_pb2.CACHE_STATUS_HIT_EXACT
    assert providers.calls == 2
