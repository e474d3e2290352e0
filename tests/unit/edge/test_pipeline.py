"""The pipeline's reports to the health monitor: one outcome per attempt, failed or not, with
what the attempt measured; and its ledger commits, with the estimates the edge made. The vendor
hop is real: the OpenAI adapter as a `grpc.aio` server on a loopback port, in front of the
in-process OpenAI simulator (and a closed port)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

import grpc
import orjson

from switchyard.adapters.service import build_adapter
from switchyard.common.catalog import Catalog, parse_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.ports import free_port
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.common.settings import Settings
from switchyard.edge.pipeline import Caller, ChatPipeline, collect
from switchyard.ledger.pricing import estimate_cost
from switchyard.ledger.tokens import count_prompt_tokens
from switchyard.sim.faults import FaultKnobs, RateLimitKnobs, start_simulator
from switchyard.v1 import common_pb2, gateway_pb2, health_pb2, ledger_pb2, provider_pb2_grpc

SIM_KEY = "sk-sim-pipeline-test-key"
ANSWER = "Harbors shelter ships from storms and let cargo move between sea and land."
# Fixed rate-limit figures the simulator reports, so the success's headroom can be checked.
REMAINING_REQUESTS = 4_321
REMAINING_TOKENS = 765_432


def catalog_text(sim_url: str, dead_port: int) -> str:
    timeouts = {"connect_ms": 1000, "first_byte_ms": 5000, "idle_ms": 5000}
    model = {
        "upstream_model": "gpt-4o-mini",
        "context_window": 128000,
        "max_output_tokens": 1000,
        "prices": {"input": "1", "output": "2"},
    }
    return orjson.dumps(
        {
            "providers": {
                # Nothing listens there: every attempt fails before its first token.
                "down": {
                    "vendor": "openai",
                    "base_url": f"http://127.0.0.1:{dead_port}/v1",
                    "timeouts": timeouts,
                },
                "up": {"vendor": "openai", "base_url": sim_url, "timeouts": timeouts},
            },
            "models": [
                {"id": "down/m", "provider": "down", "fallbacks": ["up/m"], **model},
                # Dearer than down/m, so the plan's predicted costs of the two differ.
                {"id": "up/m", "provider": "up", **model, "prices": {"input": "3", "output": "5"}},
                # A model that may write 2 tokens at most (the simulator writes on regardless).
                {"id": "up/terse", "provider": "up", **model, "max_output_tokens": 2},
            ],
        }
    ).decode()


@dataclass
class Edge:
    pipeline: ChatPipeline
    reported: list[health_pb2.AttemptOutcome]
    committed: list[ledger_pb2.CommitRequest]
    catalog: Catalog


@asynccontextmanager
async def edge(text: str = ANSWER) -> AsyncIterator[Edge]:
    """A pipeline reporting into a list, its adapter a real gRPC server before the simulator."""
    knobs = FaultKnobs(
        text=text,
        chunks=4,
        first_byte_delay_ms=20,
        chunk_delay_ms=5,
        ratelimit=RateLimitKnobs(remaining_requests=REMAINING_REQUESTS, remaining_tokens=REMAINING_TOKENS),
    )
    sim = await start_simulator("openai", port=0, knobs=knobs, api_key=SIM_KEY)
    catalog = parse_catalog(catalog_text(sim.base_url, free_port()))
    keys = {"SWITCHYARD_PROVIDER_DOWN_API_KEY": SIM_KEY, "SWITCHYARD_PROVIDER_UP_API_KEY": SIM_KEY}
    servicer = build_adapter(catalog, "openai", keys)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channels = ChannelPool()
    settings = Settings.from_env({"SWITCHYARD_ADAPTER_OPENAI_TARGET": f"127.0.0.1:{port}"})
    reported: list[health_pb2.AttemptOutcome] = []
    committed: list[ledger_pb2.CommitRequest] = []
    pipeline = ChatPipeline(settings, catalog, channels, report=reported.append, record=committed.append)
    try:
        yield Edge(pipeline, reported, committed, catalog)
    finally:
        pipeline.close()
        await channels.close()
        await server.stop(grace=None)
        await servicer.aclose()
        await sim.close()


def ask(model: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=model, request_id=f"req-{model.replace('/', '-')}")
    request.messages.add(
        role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Tell me about harbors.")]
    )
    return request


async def answer(pipeline: ChatPipeline, request: common_pb2.ChatRequest) -> gateway_pb2.ChatResponse:
    return await collect(pipeline.stream(request, Caller("t"), timeout_s=15))


def assert_measured_success(outcome: health_pb2.AttemptOutcome, response: gateway_pb2.ChatResponse) -> None:
    assert (outcome.success, outcome.error_reason) == (True, "")
    assert response.usage.output_tokens > 0
    assert (outcome.input_tokens, outcome.output_tokens) == (
        response.usage.input_tokens,
        response.usage.output_tokens,
    )
    # The simulator holds its headers back a while: the first token comes after some time,
    # and the rest of the answer after it.
    assert 0 < outcome.time_to_first_token_ms <= outcome.total_latency_ms
    assert outcome.output_tokens_per_second > 0
    assert (outcome.headroom.remaining_requests, outcome.headroom.remaining_tokens) == (
        REMAINING_REQUESTS,
        REMAINING_TOKENS,
    )
    assert outcome.HasField("finished_at")


async def test_a_successful_request_reports_its_latency_first_token_and_output() -> None:
    async with edge() as running:
        response = await answer(running.pipeline, ask("up/m"))
        assert response.message.parts[0].text == ANSWER
        [outcome] = running.reported
        assert (outcome.provider, outcome.model, outcome.request_id) == ("up", "up/m", "req-up-m")
        assert_measured_success(outcome, response)


async def test_a_failover_reports_the_failed_attempt_and_the_one_that_answered() -> None:
    async with edge() as running:
        response = await answer(running.pipeline, ask("down/m"))
        assert response.message.parts[0].text == ANSWER
        assert [(a.model, a.provider, a.error_reason) for a in response.attempts] == [
            ("down/m", "down", "PROVIDER_UNAVAILABLE"),
            ("up/m", "up", ""),
        ]
        failed, answered = running.reported
        assert (failed.provider, failed.model, failed.request_id) == ("down", "down/m", "req-down-m")
        assert (failed.success, failed.error_reason) == (False, "PROVIDER_UNAVAILABLE")
        # It failed before its first token, and produced nothing.
        assert (failed.time_to_first_token_ms, failed.output_tokens, failed.output_tokens_per_second) == (
            0,
            0,
            0,
        )
        assert (answered.provider, answered.model, answered.request_id) == ("up", "up/m", "req-down-m")
        assert_measured_success(answered, response)


async def test_the_ledger_row_keeps_the_cost_the_plan_predicted_for_the_model_that_answered() -> None:
    async with edge() as running:
        pipeline = running.pipeline
        request = ask("down/m")
        caller = Caller("t")
        # As the gateway does: the prompt counted (for the requested model) before planning.
        prompt = count_prompt_tokens(request, running.catalog.model("down/m"))
        planned = {c.model: c.predicted_cost_micros for c in pipeline.plan(request, caller, prompt.tokens)}
        # $3 in, $5 out per 1M on up/m, 256 output tokens expected: exact in micro-USD.
        assert planned["up/m"] == 3 * prompt.tokens + 1_280
        assert planned["down/m"] != planned["up/m"]

        response = await collect(pipeline.stream(request, caller, timeout_s=15, prompt=prompt))
        assert [a.model for a in response.attempts] == ["down/m", "up/m"]
        [commit] = running.committed
        row = commit.record
        assert (row.model, row.status, row.estimated_input_tokens) == ("up/m", "ok", prompt.tokens)
        assert row.estimated_cost_micros == planned["up/m"]
        assert row.cost_micros == response.cost_micros > 0
        # The same expected cost the ledger's Estimate gives for up/m (no volume discount here).
        up = running.catalog.model("up/m")
        assert up is not None
        expected = estimate_cost(request, up, at=datetime.now(UTC), prompt=prompt).expected_cost_micros
        assert row.estimated_cost_micros == expected

        # Without a prompt count the plan priced no prompt: no cost estimate is recorded.
        await collect(pipeline.stream(ask("up/m"), caller, timeout_s=15))
        assert running.committed[-1].record.estimated_cost_micros == 0


TIERED_CATALOG = """
providers:
  up: {vendor: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  - id: up/m
    provider: up
    upstream_model: m
    context_window: 128000
    max_output_tokens: 1000
    prices:
      input: "1"
      output: "1"
      volume_tiers: [{above_monthly_tokens: 1000, discount_percent: "50"}]
"""


def test_the_edges_volume_discount_starts_afresh_when_the_month_turns() -> None:
    catalog = parse_catalog(TIERED_CATALOG)
    pipeline = ChatPipeline(Settings.from_env({}), catalog, ChannelPool())
    usage = common_pb2.Usage(input_tokens=1_000, output_tokens=1_000)
    assert pipeline._cost("acme", "up/m", usage) == 2_000  # the first 2,000 tokens: list price
    assert pipeline._cost("acme", "up/m", usage) == 1_000  # past 1,000 this month: half
    # The ledger says the tenant is far into the tier, for a request finished this month...
    commit = ledger_pb2.CommitRequest(record=ledger_pb2.UsageRecord(model="up/m"))
    commit.record.scope.tenant_id = "other"
    commit.record.finished_at.FromDatetime(datetime.now(UTC))
    pipeline.observe_commit(commit, ledger_pb2.CommitResponse(month_tokens=50_000))
    assert pipeline._cost("other", "up/m", usage) == 1_000
    # ... but an answer about a request priced last month no longer counts.
    commit.record.scope.tenant_id = "late"
    commit.record.finished_at.FromDatetime(datetime(2020, 1, 31, 23, 59, tzinfo=UTC))
    pipeline.observe_commit(commit, ledger_pb2.CommitResponse(month_tokens=50_000))
    assert pipeline._cost("late", "up/m", usage) == 2_000
    # The month turns (as if the edge had last priced in an earlier one): volumes start over.
    pipeline._month -= 1
    assert pipeline._cost("acme", "up/m", usage) == 2_000
    assert pipeline._cost("other", "up/m", usage) == 2_000


async def test_an_answer_cut_short_is_charged_no_more_output_than_its_hold_covered() -> None:
    """A stream cancelled after its first text is charged an estimate of what was sent (4
    characters a token), never more output tokens than the model allows: its budget hold
    covered that much and no more."""
    async with edge() as running:
        request = ask("up/terse")
        chunks = running.pipeline.stream(request, Caller("t"), timeout_s=15)
        sent = ""
        async for chunk in chunks:
            sent += chunk.delta.text
            if len(sent) > 8:
                break
        await chunks.aclose()
        (commit,) = running.committed
        usage = commit.record.usage
        assert -(-len(sent) // 4) > 2  # the estimate alone would pass the cap
        assert (usage.estimated, usage.output_tokens, commit.record.status) == (True, 2, "CANCELLED")
