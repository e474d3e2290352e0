"""The edge's use of the response cache: a miss is answered by the providers and stored off the
path, a hit is replayed and recorded at no cost, a cache that is down is a miss.

The cache is the real `CacheServicer` on a `MemoryStore`, called in process; the providers
are a fixed answer with a routing chunk, deltas (one with a tool-call fragment), usage and done.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.common.catalog import load_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.settings import Settings
from switchyard.edge import cache as edge_cache_module
from switchyard.edge.admission import AdmissionController
from switchyard.edge.cache import EdgeCache
from switchyard.edge.gateway import EdgeGateway, RateLimit
from switchyard.edge.mux import Arrivals, CompanyHold
from switchyard.edge.pipeline import Caller, ChatPipeline
from switchyard.v1 import cache_pb2, common_pb2, ledger_pb2
from tests.support.frames import Framed

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


class InProcessLookups:
    """A LookupStream call answered by the servicer in process."""

    def __init__(self, owner: InProcess) -> None:
        self.owner = owner
        self.answers: asyncio.Queue[cache_pb2.LookupStreamResponse | None] = asyncio.Queue()
        self.cancelled = False

    async def write(self, request: cache_pb2.LookupStreamRequest) -> None:
        # As grpc.aio does: a write on a finished call is refused, and an interrupted write
        # cancels the whole call.
        if self.cancelled:
            raise asyncio.InvalidStateError("RPC already finished.")
        try:
            await asyncio.sleep(self.owner.write_delay_s)
        except asyncio.CancelledError:
            self.cancel()
            raise
        if self.owner.down:
            self.answers.put_nowait(None)  # the stream breaks
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        if request.id == 0:  # the edge's word: it wants the presence (the call follows it)
            if request.want_presence:
                self.owner.servicer.presence.follow(self)
            return
        self.owner.lookups += 1
        try:
            lookup = await self.owner.servicer.lookup(request.lookup)
        except SwitchyardError as exc:
            failed = cache_pb2.LookupStreamResponse(id=request.id, error=exc.to_status_proto())
            self.answers.put_nowait(failed)
            return
        self.answers.put_nowait(cache_pb2.LookupStreamResponse(id=request.id, lookup=lookup))

    async def done_writing(self) -> None:
        self.cancel()  # the edge ended the call: nothing more comes

    @property
    def ended(self) -> bool:
        return self.cancelled

    def send(self, response: cache_pb2.LookupStreamResponse) -> None:
        """The servicer's presence, to the edge."""
        self.answers.put_nowait(response)

    def __aiter__(self) -> InProcessLookups:
        return self

    async def __anext__(self) -> cache_pb2.LookupStreamResponse:
        answer = await self.answers.get()
        if answer is None:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())
        return answer

    def cancel(self) -> bool:
        self.cancelled = True
        self.answers.put_nowait(None)
        return True


class InProcess:
    """A `CacheServicer` called like a stub; `down` makes every call fail as UNAVAILABLE."""

    def __init__(self, servicer: CacheServicer) -> None:
        self.servicer = servicer
        self.down = False
        self.batches: list[int] = []
        self.offers: list[cache_pb2.StoreRequest] = []
        self.streams = 0
        self.framed: list[Framed] = []
        self.write_delay_s = 0.0
        self.lookups = 0
        """Lookups that reached the cache."""

    def _check(self) -> None:
        if self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata())

    def LookupFrames(self) -> Framed:
        self.streams += 1
        self.framed.append(Framed(InProcessLookups(self), cache_pb2.LookupFramesResponse))
        return self.framed[-1]

    def LookupStream(self) -> InProcessLookups:
        raise AssertionError("lookups go on LookupFrames")

    async def StoreMany(
        self, request: cache_pb2.StoreManyRequest, *, timeout: float | None = None
    ) -> cache_pb2.StoreManyResponse:
        self._check()
        self.batches.append(len(request.stores))
        self.offers.extend(request.stores)
        return await self.servicer.StoreMany(request, None)  # type: ignore[arg-type]


async def _caller(authorization: str | None) -> Caller:
    return Caller("acme")


async def _no_limit(caller: Caller, model: object, tokens: int) -> None:
    return None


def edge(
    providers: Providers,
    cache: InProcess,
    records: list[ledger_pb2.CommitRequest],
    *,
    rate_limit: RateLimit = _no_limit,
    arrivals: Arrivals | None = None,
    presence: bool = False,
) -> EdgeGateway:
    """An edge on `cache`; with `arrivals`, its lookups are held for company (up to 60 s);
    with `presence`, it answers sure misses itself when alone."""
    hold = CompanyHold(60.0, arrivals, "lookups") if arrivals is not None else None
    return EdgeGateway(
        CATALOG,
        providers,
        authenticate=_caller,
        rate_limit=rate_limit,
        admission=AdmissionController(4, max_queue=4, queue_timeout_s=1),
        dedup=None,
        record=records.append,
        # Offers go at once here (no gathering), so a test sees its store right after the answer.
        cache=EdgeCache(
            cache,
            max_temperature=0.0,
            lookup_timeout_s=1,
            store_timeout_s=1,
            store_linger_s=0,
            hold=hold,
            presence=presence,
        ),
        arrivals=arrivals,
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


async def test_an_offer_carries_the_requests_end_user_so_an_erasure_finds_the_answer() -> None:
    providers = Providers()
    servicer, cache = cache_pair()
    gateway = edge(providers, cache, [])
    hers = question()
    hers.metadata.end_user = "alice"
    await answer(gateway, hers)
    assert [offer.end_user for offer in cache.offers] == ["alice"]
    erased = await servicer.Invalidate(
        cache_pb2.InvalidateRequest(tenant_id="acme", end_user="alice"),
        None,  # type: ignore[arg-type]
    )
    assert erased.removed == 1
    again = await answer(gateway, hers)
    assert again[-1].done.cache_status == common_pb2.CACHE_STATUS_MISS and providers.calls == 2
    # A request with no end user is offered with none.
    anonymous = question()
    anonymous.messages[0].parts[0].text = "Capital of Spain?"
    await answer(gateway, anonymous)
    assert [offer.end_user for offer in cache.offers] == ["alice", "alice", ""]


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


def offer_of(text: str) -> tuple[common_pb2.ChatRequest, cache_pb2.CachedAnswer]:
    request = question()
    request.messages[0].parts[0].text = text
    answer = cache_pb2.CachedAnswer(finish_reason=common_pb2.FINISH_REASON_STOP, model=MODEL, cost_micros=5)
    answer.deltas.add(text=f"answer to {text}")
    return request, answer


async def entries(servicer: CacheServicer) -> int:
    reply = await servicer.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"), None)  # type: ignore[arg-type]
    return reply.entries


def offer(edge_cache: EdgeCache, text: str) -> None:
    request, answer = offer_of(text)
    edge_cache.offer("acme", request, MODEL, answer)


async def test_offers_are_gathered_into_one_call_and_flushed_on_close() -> None:
    servicer, cache = cache_pair()
    edge_cache = EdgeCache(
        cache, max_temperature=0.0, lookup_timeout_s=1, store_timeout_s=1, store_linger_s=0.05
    )
    for n in range(3):
        offer(edge_cache, f"question {n}")
    await asyncio.sleep(0.1)
    assert cache.batches == [3]
    assert (await entries(servicer)) == 3
    # What waits when the edge stops goes at once, without the wait.
    offer(edge_cache, "last one")
    await asyncio.wait_for(edge_cache.aclose(), timeout=0.04)
    assert cache.batches == [3, 1]


async def test_offers_beyond_the_queue_are_dropped_and_a_cache_outage_loses_only_its_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(edge_cache_module, "STORE_QUEUE", 2)
    servicer, cache = cache_pair()
    edge_cache = EdgeCache(
        cache, max_temperature=0.0, lookup_timeout_s=1, store_timeout_s=1, store_linger_s=0.01
    )
    cache.down = True
    for n in range(3):
        offer(edge_cache, f"question {n}")
    await asyncio.sleep(0.05)
    assert (await entries(servicer)) == 0  # two sent while down, the third dropped
    cache.down = False
    offer(edge_cache, "after")
    await edge_cache.aclose()
    assert cache.batches == [1] and (await entries(servicer)) == 1


async def test_store_many_checks_every_offer_before_storing_any() -> None:
    servicer, _ = cache_pair()
    good, bad = offer_of("fine"), offer_of("negative")
    bad[1].cost_micros = -1
    stores = [
        cache_pb2.StoreRequest(tenant_id="acme", request=request, model=MODEL, answer=answer)
        for request, answer in (good, bad)
    ]
    with pytest.raises(SwitchyardError) as caught:
        await servicer.StoreMany(cache_pb2.StoreManyRequest(stores=stores), None)  # type: ignore[arg-type]
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.metadata["field"] == "stores[1].answer.cost_micros"
    assert (await entries(servicer)) == 0
    stores[1].answer.cost_micros = 0
    unfinished = cache_pb2.StoreRequest()
    unfinished.CopyFrom(stores[0])
    unfinished.answer.finish_reason = common_pb2.FINISH_REASON_CONTENT_FILTER
    stores.append(unfinished)
    reply = await servicer.StoreMany(cache_pb2.StoreManyRequest(stores=stores), None)  # type: ignore[arg-type]
    assert [r.admitted for r in reply.results] == [True, True, False]


async def test_lookups_share_one_stream_and_a_refused_one_is_a_miss() -> None:
    providers = Providers()
    servicer, cache = cache_pair()
    gateway = edge(providers, cache, [])
    for _ in range(3):
        await answer(gateway, question())
    assert cache.streams == 1 and providers.calls == 1
    edge_cache = EdgeCache(cache, max_temperature=0.0, lookup_timeout_s=1, store_timeout_s=1)
    bad = question()
    bad.cache.semantic_threshold = 2.0  # the cache refuses it: the edge takes it for a miss
    assert await edge_cache.lookup("acme", bad, MODEL) is None
    assert await edge_cache.lookup("acme", question(), MODEL) is not None  # the stream went on
    await edge_cache.aclose()


async def test_a_lookup_that_times_out_is_a_miss_and_the_stream_goes_on() -> None:
    _, cache = cache_pair()
    edge_cache = EdgeCache(cache, max_temperature=0.0, lookup_timeout_s=0.02, store_timeout_s=1)
    cache.write_delay_s = 0.05  # the write itself outlasts the caller's wait
    slow = [edge_cache.lookup("acme", question(), MODEL) for _ in range(5)]
    assert await asyncio.gather(*slow) == [None] * 5
    cache.write_delay_s = 0.0
    await asyncio.sleep(0.3)  # the late answers arrive and are dropped
    assert await edge_cache.lookup("acme", question(), MODEL) is None  # a miss, answered
    assert cache.streams == 1  # never broken by the callers that gave up
    await edge_cache.aclose()


async def test_a_broken_lookup_stream_fails_what_waits_and_the_next_lookup_opens_another() -> None:
    _, cache = cache_pair()
    edge_cache = EdgeCache(cache, max_temperature=0.0, lookup_timeout_s=1, store_timeout_s=1)
    assert await edge_cache.lookup("acme", question(), MODEL) is None
    cache.down = True
    assert await edge_cache.lookup("acme", question(), MODEL) is None  # the stream breaks: a miss
    cache.down = False
    await answer(edge(Providers(), cache, []), question())  # stores the answer on its own edge
    assert await edge_cache.lookup("acme", question(), MODEL) is not None
    assert cache.streams >= 2
    await edge_cache.aclose()


async def test_on_a_busy_edge_a_lookup_waits_for_the_ones_on_their_way_and_never_for_nobody() -> None:
    providers = Providers()
    servicer, cache = cache_pair()
    arrivals = Arrivals()
    # The rate limiter's time for each request, in order; the last one it refuses.
    delays = [0.0, 0.0, 0.05, 0.0, 0.05]
    calls = 0

    async def rate_limit(caller: Caller, model: object, tokens: int) -> None:
        nonlocal calls
        calls += 1
        index = calls - 1
        await asyncio.sleep(delays[index])
        if index == len(delays) - 1:
            raise SwitchyardError(grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED, "slow down")

    gateway = edge(providers, cache, [], rate_limit=rate_limit, arrivals=arrivals)

    def asking(text: str) -> common_pb2.ChatRequest:
        request = question()
        request.messages[0].parts[0].text = text
        return request

    async with asyncio.timeout(10):  # a frame held for nobody would wait 60 s
        await answer(gateway, asking("alone"))  # opens the lookup stream: one lookup, at once
        # The second waits for the third (held 50 ms by the rate limiter) and they go together.
        await asyncio.gather(answer(gateway, asking("one")), answer(gateway, asking("two")))
        # Refused before its lookup: the lookup held for it goes as soon as it is refused.
        three, four = await asyncio.gather(
            answer(gateway, asking("three")), answer(gateway, asking("four")), return_exceptions=True
        )
    assert isinstance(four, SwitchyardError), four
    assert not isinstance(three, BaseException), three
    assert cache.framed[0].sizes == [1, 2, 1]
    assert (arrivals.lookups, arrivals.starts) == (0, 0)
    assert servicer.stats.response("acme").lookups == 4 and providers.calls == 4


async def test_a_request_alone_spares_the_lookup_of_a_sure_miss_and_concurrent_ones_ask() -> None:
    providers = Providers()
    servicer, cache = cache_pair()

    async def rate_limit(caller: Caller, model: object, tokens: int) -> None:
        await asyncio.sleep(0)  # as a shared limiter's round trip: others are admitted meanwhile

    gateway = edge(providers, cache, [], rate_limit=rate_limit, presence=True)

    def asking(text: str) -> common_pb2.ChatRequest:
        request = question()
        request.messages[0].parts[0].text = text
        return request

    await answer(gateway, asking("first"))  # asks: its call's presence comes before its answer
    assert cache.lookups == 1
    await answer(gateway, asking("second"))  # alone, and not in the cache: answered at the edge
    assert cache.lookups == 1
    hit = await answer(gateway, asking("first"))  # stored: asked, and a hit
    assert hit[-1].done.cache_status == common_pb2.CACHE_STATUS_HIT_EXACT
    assert cache.lookups == 2
    # Two in flight at once: each lookup travels with the other, so both are asked.
    await asyncio.gather(answer(gateway, asking("third")), answer(gateway, asking("fourth")))
    assert cache.lookups == 4
    assert providers.calls == 4
