"""The first real request, end to end: real processes, real gRPC, the OpenAI simulator.

client ─▶ edge.ChatStream ─▶ router.Plan ─▶ adapter-openai.Generate ─▶ OpenAI simulator
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from switchyard.common.catalog import load_catalog
from switchyard.common.errors import Reason, from_rpc_error
from switchyard.common.money import TokenCounts, cost_micros
from switchyard.ledger.pricing import estimate_cost
from switchyard.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    gateway_pb2,
    ledger_pb2,
    ledger_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)
from tests.conftest import Mesh, SimControl
from tests.support.otlp import OtlpReceiver


def chat_request(
    text: str = "Say hello to the mesh.", model: str = "openai/gpt-4o-mini"
) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=model)
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    return request


async def stream_all(mesh: Mesh, request: common_pb2.ChatRequest) -> list[common_pb2.ChatChunk]:
    return [chunk async for chunk in mesh.gateway().ChatStream(request, timeout=30)]


def kinds(chunks: list[common_pb2.ChatChunk]) -> list[str]:
    return [str(c.WhichOneof("event")) for c in chunks]


def expected_cost(model_id: str, usage: common_pb2.Usage) -> int:
    model = load_catalog(None).model(model_id)
    assert model is not None
    tokens = TokenCounts(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        reasoning_tokens=usage.reasoning_tokens,
    )
    return cost_micros(tokens, model.prices.unit_prices())


async def test_stream_routing_then_deltas_then_usage_and_done(mesh: Mesh, openai_sim: SimControl) -> None:
    await openai_sim.knobs(chunks=6, text="one two three four five six seven eight")
    chunks = await stream_all(mesh, chat_request())
    sequence = kinds(chunks)
    assert sequence[0] == "routing"
    assert sequence[-2:] == ["usage", "done"]
    assert set(sequence[1:-2]) == {"delta"} and len(sequence[1:-2]) >= 2, "text must arrive in several deltas"
    routing = chunks[0].routing
    assert (routing.model, routing.provider, routing.attempt) == ("openai/gpt-4o-mini", "openai", 1)
    assert routing.reason == "requested model"
    text = "".join(c.delta.text for c in chunks if c.WhichOneof("event") == "delta")
    assert text == "one two three four five six seven eight"
    usage = chunks[-2].usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and not usage.estimated
    done = chunks[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.cost_micros == expected_cost("openai/gpt-4o-mini", usage) > 0
    assert done.request_id
    assert [(a.attempt, a.error_reason) for a in done.attempts] == [(1, "")]
    # The simulator really received the vendor's wire format from the adapter.
    last = (await openai_sim.stats())["last_request"]
    assert last["model"] == "gpt-4o-mini"
    assert last["stream"] is True and last["stream_options"] == {"include_usage": True}


async def test_unary_chat_matches_stream(mesh: Mesh, openai_sim: SimControl) -> None:
    request = chat_request("What is the capital of France?")
    streamed = "".join(c.delta.text for c in await stream_all(mesh, request))
    response: gateway_pb2.ChatResponse = await mesh.gateway().Chat(request, timeout=30)
    assert "".join(p.text for p in response.message.parts) == streamed != ""
    assert response.message.role == common_pb2.ROLE_ASSISTANT
    assert response.routing.model == "openai/gpt-4o-mini"
    assert response.cost_micros == expected_cost("openai/gpt-4o-mini", response.usage)


async def test_alias_resolves_and_request_id_is_kept(mesh: Mesh, openai_sim: SimControl) -> None:
    request = chat_request(model="smart")
    request.request_id = "req-alias-1"
    chunks = await stream_all(mesh, request)
    assert chunks[0].routing.model == "openai/gpt-4o"
    assert chunks[0].routing.reason == "alias 'smart'"
    assert chunks[-1].done.request_id == "req-alias-1"
    assert (await openai_sim.stats())["last_request"]["model"] == "gpt-4o"


async def test_tool_call_streams_in_fragments_and_reassembles(mesh: Mesh, openai_sim: SimControl) -> None:
    request = chat_request("What's the weather in Paris?")
    request.tools.add(
        name="get_weather",
        description="Weather for a city",
        parameters_json_schema='{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}',
    )
    request.tool_choice.mode = common_pb2.TOOL_CHOICE_MODE_REQUIRED
    chunks = await stream_all(mesh, request)
    fragments = [f for c in chunks if c.WhichOneof("event") == "delta" for f in c.delta.tool_calls]
    assert len(fragments) >= 2, "arguments should arrive in several fragments"
    response: gateway_pb2.ChatResponse = await mesh.gateway().Chat(request, timeout=30)
    assert response.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    [call] = response.message.tool_calls
    assert call.name == "get_weather" and call.id
    import json

    assert "city" in json.loads(call.arguments_json)


async def test_failover_to_fallback_before_first_token(mesh: Mesh, openai_sim: SimControl) -> None:
    await openai_sim.script({"status": 503})
    chunks = await stream_all(mesh, chat_request())
    routings = [c.routing for c in chunks if c.WhichOneof("event") == "routing"]
    assert [(r.model, r.attempt) for r in routings] == [("openai/gpt-4o-mini", 1), ("openai/gpt-4.1-mini", 2)]
    assert routings[1].reason == "fallback of openai/gpt-4o-mini"
    done = chunks[-1].done
    assert [(a.model, a.error_reason) for a in done.attempts] == [
        ("openai/gpt-4o-mini", "PROVIDER_OVERLOADED"),
        ("openai/gpt-4.1-mini", ""),
    ]
    assert done.cost_micros == expected_cost("openai/gpt-4.1-mini", chunks[-2].usage)


async def test_all_attempts_fail_with_one_error_listing_them(mesh: Mesh, openai_sim: SimControl) -> None:
    await openai_sim.knobs(status=429, retry_after_s=7)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.gateway().Chat(chat_request(), timeout=30)
    error = from_rpc_error(caught.value)
    assert error.code is grpc.StatusCode.UNAVAILABLE
    assert error.reason is Reason.ALL_ATTEMPTS_FAILED
    assert error.metadata == {
        "attempt_1": "openai/gpt-4o-mini@openai: RATE_LIMITED",
        "attempt_2": "openai/gpt-4.1-mini@openai: RATE_LIMITED",
    }
    assert error.retry_after_s == pytest.approx(7)


async def test_failure_after_first_token_ends_stream_without_repeating(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(chunks=6, error_after_chunks=2)
    received: list[common_pb2.ChatChunk] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in mesh.gateway().ChatStream(chat_request(), timeout=30):
            received.append(chunk)
    error = from_rpc_error(caught.value)
    assert error.reason is Reason.STREAM_INTERRUPTED
    assert [c.routing.attempt for c in received if c.WhichOneof("event") == "routing"] == [1]
    assert sum(1 for c in received if c.WhichOneof("event") == "delta") >= 1
    assert (await openai_sim.stats())["requests"] == 1, "no second attempt after text was sent"


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("messages"), "messages"),
        (lambda r: r.messages[0].parts[0].__setattr__("text", "   "), "messages[0].parts"),
        (lambda r: r.messages[0].__setattr__("role", common_pb2.ROLE_UNSPECIFIED), "messages[0].role"),
        (lambda r: r.__setattr__("model", "nope/not-a-model"), "model"),
        (lambda r: r.sampling.__setattr__("temperature", 3.5), "sampling.temperature"),
    ],
)
async def test_bad_input_is_invalid_argument_naming_the_field(
    mesh: Mesh, openai_sim: SimControl, mutate: object, field: str
) -> None:
    request = chat_request()
    mutate(request)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.gateway().Chat(request, timeout=10)
    error = from_rpc_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == field
    assert (await openai_sim.stats())["requests"] == 0, "a bad request must cost nothing"


async def test_list_models_pages_through_the_catalog(mesh: Mesh) -> None:
    gateway = mesh.gateway()
    first = await gateway.ListModels(gateway_pb2.ListModelsRequest(page_size=3), timeout=5)
    second = await gateway.ListModels(
        gateway_pb2.ListModelsRequest(page_size=3, page_token=first.next_page_token), timeout=5
    )
    ids = [m.id for m in first.models] + [m.id for m in second.models]
    assert ids == [m.id for m in load_catalog(None).models]
    assert second.next_page_token == ""
    mini = first.models[0]
    assert mini.pricing.input_micros_per_million == 150_000
    assert common_pb2.CAPABILITY_TOOLS in mini.capabilities


async def test_a_cache_lookup_without_a_tenant_is_invalid(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.target("cache")) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await cache_pb2_grpc.CacheServiceStub(channel).Lookup(cache_pb2.LookupRequest(), timeout=5)
    error = from_rpc_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == "tenant_id"


async def test_every_service_serves_health_and_reflection(mesh: Mesh) -> None:
    expected = {
        "edge": "switchyard.v1.GatewayService",
        "router": "switchyard.v1.RouterService",
        "ledger": "switchyard.v1.CostLedgerService",
        "health": "switchyard.v1.HealthMonitorService",
        "cache": "switchyard.v1.CacheService",
        "adapter-openai": "switchyard.v1.ProviderAdapterService",
    }
    for child, service in expected.items():
        async with grpc.aio.insecure_channel(mesh.target(child)) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
            assert health.status == health_pb2.HealthCheckResponse.SERVING, child
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            responses = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
            listed = [s.name async for r in responses for s in r.list_services_response.service]
            assert service in listed, child


async def test_router_plan_rpc_lists_model_then_fallbacks(mesh: Mesh) -> None:
    async with grpc.aio.insecure_channel(mesh.target("router")) as channel:
        plan = await router_pb2_grpc.RouterServiceStub(channel).Plan(
            router_pb2.PlanRequest(request=chat_request(model="openai/o4-mini"), tenant_id="default"),
            timeout=5,
        )
    assert [(c.model, c.upstream_model, c.vendor) for c in plan.candidates] == [
        ("openai/o4-mini", "o4-mini", "openai"),
        ("openai/gpt-4o", "gpt-4o", "openai"),
    ]


async def test_one_request_is_one_trace_across_processes(
    mesh: Mesh, openai_sim: SimControl, otlp: OtlpReceiver
) -> None:
    request = chat_request("Trace this one request.")
    request.request_id = "trace-me-1"
    # The caller starts the trace (W3C traceparent), so this request's spans are told apart
    # from every other test's in the session-wide receiver.
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    await mesh.gateway().Chat(request, metadata=(("traceparent", traceparent),), timeout=30)

    def services_in_trace(spans: list) -> set[str]:  # type: ignore[type-arg]
        return {s.service_name for s in spans if s.trace_id == trace_id and s.kind == "SERVER"}

    wanted = {"switchyard-edge", "switchyard-adapter-openai"}
    spans = await otlp.wait_for(lambda s: wanted <= services_in_trace(s), timeout=15)
    # The plan is made at the edge: the only synchronous hop of a request is edge -> adapter.
    assert services_in_trace(spans) == wanted
    in_trace = {s.span_id: s for s in spans if s.trace_id == trace_id}
    for span in in_trace.values():
        if span.service_name != "switchyard-edge" and span.kind == "SERVER":
            parent = in_trace.get(span.parent_span_id)
            assert parent is not None and parent.kind == "CLIENT", span.name
            assert parent.service_name == "switchyard-edge"
    # Prompts never reach span attributes.
    assert not any("Trace this" in str(s.attributes) for s in in_trace.values())
    assert any(
        s.name == "switchyard.v1.GatewayService/Chat" and s.kind == "SERVER" for s in in_trace.values()
    )


async def test_concurrent_requests_all_succeed(mesh: Mesh, openai_sim: SimControl) -> None:
    results = await asyncio.gather(
        *(mesh.gateway().Chat(chat_request(f"question {i}"), timeout=30) for i in range(20))
    )
    assert all(r.finish_reason == common_pb2.FINISH_REASON_STOP for r in results)
    assert (await openai_sim.stats())["requests"] == 20


async def test_a_failed_candidate_is_retried_after_its_retry_after(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    # Both candidates answer 429 once; the third attempt goes back to the first candidate,
    # after the vendor's retry-after (0.3 s), and succeeds.
    await openai_sim.script({"status": 429, "retry_after_s": 0.3}, {"status": 429, "retry_after_s": 0.3})
    started = asyncio.get_running_loop().time()
    response = await mesh.gateway().Chat(chat_request(), timeout=30)
    waited = asyncio.get_running_loop().time() - started
    # Which candidates are tried depends on what the mesh learnt from earlier tests (a model a
    # vendor rate-limited may still be avoided): two refusals, then an answer.
    assert [a.error_reason for a in response.attempts] == ["RATE_LIMITED", "RATE_LIMITED", ""]
    assert waited >= 0.3, "the vendor's retry-after was not honoured"
    assert (await openai_sim.stats())["requests"] == 3


async def test_model_limits_are_checked_before_any_cost(mesh: Mesh, openai_sim: SimControl) -> None:
    too_much_output = chat_request()
    too_much_output.sampling.max_output_tokens = 16_385
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.gateway().Chat(too_much_output, timeout=10)
    error = from_rpc_error(caught.value)
    assert (error.reason, error.metadata["field"]) == (Reason.INVALID_REQUEST, "sampling.max_output_tokens")
    assert error.metadata["limit"] == "16384"
    long_prompt = chat_request("word " * 130_000)  # about 130k tokens
    long_prompt.sampling.max_output_tokens = 16_000
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.gateway().Chat(long_prompt, timeout=10)
    error = from_rpc_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG)
    assert error.metadata["context_window"] == "128000"
    assert error.metadata["max_output_tokens"] == "16000"
    assert int(error.metadata["prompt_tokens"]) + 16_000 > 128_000
    assert "word word" not in error.message
    assert (await openai_sim.stats())["requests"] == 0


async def test_identical_concurrent_requests_share_one_upstream_call(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(chunks=5, chunk_delay_ms=60)
    calls = [mesh.gateway().Chat(chat_request("the same question"), timeout=30) for _ in range(6)]
    responses = await asyncio.gather(*calls)
    assert (await openai_sim.stats())["requests"] == 1
    assert len({r.message.parts[0].text for r in responses}) == 1
    statuses = sorted(r.cache_status for r in responses)
    assert statuses.count(common_pb2.CACHE_STATUS_DEDUPLICATED) == 5
    leader = next(r for r in responses if r.cache_status != common_pb2.CACHE_STATUS_DEDUPLICATED)
    assert leader.cost_micros > 0
    assert all(
        r.cost_micros == 0 and r.saved_micros == leader.cost_micros for r in responses if r is not leader
    )
    assert len({r.request_id for r in responses}) == 6


async def test_count_tokens_and_estimate_cost_answer_locally(mesh: Mesh) -> None:
    request = chat_request("How many tokens is this sentence?")
    request.sampling.max_output_tokens = 100
    counted = await mesh.gateway().CountTokens(gateway_pb2.CountTokensRequest(request=request), timeout=10)
    assert counted.model == "openai/gpt-4o-mini"
    assert counted.input_tokens > 7  # the sentence plus the chat format's per-message overhead
    estimate = await mesh.gateway().EstimateCost(gateway_pb2.EstimateCostRequest(request=request), timeout=10)
    assert estimate.model == "openai/gpt-4o-mini" and estimate.max_output_tokens == 100
    assert estimate.input_tokens == counted.input_tokens
    assert 0 < estimate.expected_cost_micros <= estimate.worst_case_cost_micros
    unknown = chat_request()
    unknown.model = "nobody/no-model"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await mesh.gateway().CountTokens(gateway_pb2.CountTokensRequest(request=unknown), timeout=10)
    assert from_rpc_error(caught.value).reason is Reason.INVALID_REQUEST


async def test_each_answer_is_recorded_once_and_reported_in_get_usage(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    end_user = f"user-{uuid.uuid4().hex[:8]}"
    responses = []
    for _ in range(3):
        request = chat_request(f"usage question {uuid.uuid4()}")
        request.metadata.end_user = end_user
        responses.append(await mesh.gateway().Chat(request, timeout=30))
    cost = sum(r.cost_micros for r in responses)
    assert cost > 0
    asked = gateway_pb2.GetUsageRequest(
        tenant_id="someone-else",  # ignored: a caller sees its own tenant only
        end_user=end_user,
        group_by=[gateway_pb2.USAGE_DIMENSION_MODEL],
    )
    for _ in range(100):  # the edge's outbox commits after the answer, off the caller's path
        report = await mesh.gateway().GetUsage(asked, timeout=10)
        if report.totals.requests >= 3:
            break
        await asyncio.sleep(0.1)
    assert report.totals.requests == 3
    assert report.totals.cost_micros == cost
    (bucket,) = report.buckets
    assert bucket.key["model"] == "openai/gpt-4o-mini" and bucket.totals.requests == 3


async def test_a_budget_change_is_pushed_to_the_edge(mesh: Mesh, openai_sim: SimControl) -> None:
    # The edge follows the ledger's WatchBudgets: a budget made, then deleted, applies at once
    # (its fallback, polling, would take up to 5 s). Propagation is printed (`-s`).
    ledger = ledger_pb2_grpc.CostLedgerServiceStub(grpc.aio.insecure_channel(mesh.target("ledger")))
    end_user = f"user-{uuid.uuid4().hex[:8]}"
    tiny = ledger_pb2.Budget(
        budget_id=f"default:{end_user}",
        scope=ledger_pb2.BudgetScope(tenant_id="default", end_user=end_user),
        window=ledger_pb2.BUDGET_WINDOW_DAILY,
        enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
        limit_micros=1,  # below any request's worst case
    )
    request = chat_request("budget push question")
    request.metadata.end_user = end_user
    await mesh.gateway().Chat(request, timeout=30)  # the edge has its directory already

    async def refused() -> bool:
        try:
            await mesh.gateway().Chat(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            assert from_rpc_error(exc).reason is Reason.BUDGET_EXCEEDED, exc
            return True
        return False

    async def until(wanted: bool) -> float:
        started = time.monotonic()
        async with asyncio.timeout(3):
            while True:
                if await refused() == wanted:
                    return time.monotonic() - started
                await asyncio.sleep(0.02)

    await ledger.SetBudget(ledger_pb2.SetBudgetRequest(budget=tiny, actor="test"), timeout=10)
    made = await until(True)
    await ledger.DeleteBudget(
        ledger_pb2.DeleteBudgetRequest(budget_id=tiny.budget_id, actor="test"), timeout=10
    )
    deleted = await until(False)
    print(f"budget made reached the edge in {made * 1000:.0f} ms, deleted in {deleted * 1000:.0f} ms")


async def test_a_lowered_limit_binds_an_edge_that_holds_a_lease(mesh: Mesh, openai_sim: SimControl) -> None:
    """A hard limit is lowered below what the lease an edge holds still allows: what the edge
    admits from then on fits in what the new limit leaves, and beyond it requests are refused.

    The invariant asserted: spend admitted before the change (S0) stands as admitted, and the
    total committed never exceeds max(new limit, S0) -- here the new limit, set above S0. It
    holds because the ledger grants only while spent + held + grant <= the limit, the old
    lease stays held until the edge returns it (so S0 is counted, committed or not), and the
    edge admits nothing on a lease of an older budget version. Between the change and the edge
    hearing of it (a push, milliseconds), the edge cannot know and may still admit on the old
    lease; such requests count as admitted before the change, so the test waits for the edge to
    give the old lease back before it sends more.
    """
    ledger = ledger_pb2_grpc.CostLedgerServiceStub(grpc.aio.insecure_channel(mesh.target("ledger")))
    model = load_catalog(None).model("openai/gpt-4o-mini")
    assert model is not None
    end_user = f"user-{uuid.uuid4().hex[:8]}"
    numbers = iter(range(100, 1000))  # three digits: one token each, so every request costs alike at worst

    def request() -> common_pb2.ChatRequest:
        asked = chat_request(f"lowered limit question {next(numbers)}, briefly")
        asked.metadata.end_user = end_user
        asked.sampling.max_output_tokens = 64
        return asked

    def worst(asked: common_pb2.ChatRequest) -> int:
        return estimate_cost(asked, model, at=datetime.now(UTC)).worst_case_cost_micros

    async def state() -> ledger_pb2.Budget:
        listed: ledger_pb2.ListBudgetsResponse = await ledger.ListBudgets(
            ledger_pb2.ListBudgetsRequest(tenant_id="default"), timeout=10
        )
        (found,) = [b for b in listed.budgets if b.budget_id == wanted.budget_id]
        return found

    async def until(check: Callable[[ledger_pb2.Budget], bool], what: str) -> ledger_pb2.Budget:
        for _ in range(200):
            found = await state()
            if check(found):
                return found
            await asyncio.sleep(0.025)
        raise AssertionError(f"{what}: {await state()}")

    per_request = worst(request())
    wanted = ledger_pb2.Budget(
        budget_id=f"default:{end_user}:lowered",
        scope=ledger_pb2.BudgetScope(tenant_id="default", end_user=end_user),
        window=ledger_pb2.BUDGET_WINDOW_DAILY,
        enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
        limit_micros=100 * per_request,
    )
    await ledger.SetBudget(ledger_pb2.SetBudgetRequest(budget=wanted, actor="test"), timeout=10)
    before = [await mesh.gateway().Chat(request(), timeout=30) for _ in range(2)]
    spent_before = sum(r.cost_micros for r in before)
    held = await until(lambda b: b.spent_micros == spent_before, "the commits did not arrive")
    new_limit = spent_before + 3 * per_request
    # The edge's lease allows more than the new limit will leave: it must not be used for that.
    assert held.held_micros > new_limit - spent_before

    wanted.limit_micros = new_limit
    await ledger.SetBudget(ledger_pb2.SetBudgetRequest(budget=wanted, actor="test"), timeout=10)
    await until(lambda b: b.held_micros == 0, "the edge did not give its stale lease back")
    after: list[int] = []
    refusal = None
    for _ in range(50):
        asked = request()
        try:
            after.append((await mesh.gateway().Chat(asked, timeout=30)).cost_micros)
        except grpc.aio.AioRpcError as exc:
            refusal = from_rpc_error(exc)
            break
    assert refusal is not None, "requests beyond the new limit were admitted"
    assert (refusal.code, refusal.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BUDGET_EXCEEDED)
    assert refusal.metadata["budget_id"] == wanted.budget_id
    assert refusal.metadata["limit_micros"] == str(new_limit)
    assert refusal.metadata["requested_micros"] == str(worst(asked))
    assert after, "the new limit left room for requests"
    final = await until(lambda b: b.spent_micros == spent_before + sum(after), "the commits did not arrive")
    assert final.spent_micros <= new_limit
    await ledger.DeleteBudget(
        ledger_pb2.DeleteBudgetRequest(budget_id=wanted.budget_id, actor="test"), timeout=10
    )
