"""The OpenAI adapter end to end: a real gRPC server in front of the OpenAI simulator.

Each test drives the simulator's knobs and asserts what a caller of
`ProviderAdapterService` relies on: events in order and as they arrive, exactly one usage
before done, the error class of each vendor failure, and that the upstream is closed
when the caller goes away.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import orjson
import pytest

from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error
from switchyard.v1 import common_pb2, provider_pb2, provider_pb2_grpc

from .conftest import SIM_KEY, WRONG_KEY, AdapterHandle, SimHandle

PROMPT = "Tell me about harbors, please."
ANSWER = "Harbors shelter ships from storms and let cargo move between sea and land."
SCHEMA = (
    '{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},'
    '"required":["city","days"]}'
)
WEATHER = common_pb2.Tool(name="get_weather", description="Forecast", parameters_json_schema=SCHEMA)


def request(
    provider: str = "openai", model: str = "gpt-4o-mini", **chat: Any
) -> provider_pb2.GenerateRequest:
    chat.setdefault(
        "messages",
        [common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)])],
    )
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider=provider, upstream_model=model
    )


async def collect(
    stub: provider_pb2_grpc.ProviderAdapterServiceStub, req: provider_pb2.GenerateRequest
) -> list[provider_pb2.GenerateResponse]:
    return [event async for event in stub.Generate(req, timeout=15)]


async def failure(
    stub: provider_pb2_grpc.ProviderAdapterServiceStub, req: provider_pb2.GenerateRequest
) -> tuple[SwitchyardError, list[provider_pb2.GenerateResponse]]:
    """The error a call ends with, and the events that arrived before it."""
    received: list[provider_pb2.GenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stub.Generate(req, timeout=15):
            received.append(event)
    return from_rpc_error(caught.value), received


def kinds(events: list[provider_pb2.GenerateResponse]) -> list[str]:
    return [str(event.WhichOneof("event")) for event in events]


def assert_well_formed(events: list[provider_pb2.GenerateResponse]) -> None:
    """Deltas, then exactly one usage, then done -- nothing after."""
    shape = kinds(events)
    assert shape[-2:] == ["usage", "done"]
    assert shape.count("usage") == 1 and shape.count("done") == 1
    assert set(shape[:-2]) <= {"delta"}


def assert_clean(error: SwitchyardError) -> None:
    """No prompt, vendor message or key in what reaches the caller."""
    shown = error.message + " " + " ".join(f"{k}={v}" for k, v in error.metadata.items())
    for leak in (
        PROMPT,
        SIM_KEY,
        WRONG_KEY,
        "sk-",
        "Rate limit reached",
        "Incorrect API key",
        "maximum context",
    ):
        assert leak not in shown


async def wait_for(predicate: Any, sim: SimHandle, timeout_s: float = 3.0) -> dict[str, Any]:
    """Poll the simulator's stats until `predicate(stats)` holds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await sim.stats()
        if predicate(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- #
# success paths
# --------------------------------------------------------------------------- #


async def test_streams_text_incrementally(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, chunks=6, chunk_delay_ms=80)
    arrivals: list[float] = []
    events: list[provider_pb2.GenerateResponse] = []
    async for event in adapter.stub.Generate(request(), timeout=15):
        arrivals.append(time.monotonic())
        events.append(event)
    assert_well_formed(events)
    deltas = [i for i, e in enumerate(events) if e.HasField("delta")]
    assert len(deltas) == 6
    assert "".join(events[i].delta.text for i in deltas) == ANSWER
    # Deltas are forwarded as the vendor sends them, not buffered to the end.
    assert arrivals[deltas[-1]] - arrivals[deltas[0]] >= 0.3
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.vendor_request_id.startswith("req_")
    assert done.vendor_model == "gpt-4o-mini"
    assert done.headroom.limit_requests == 10_000
    assert done.headroom.HasField("remaining_tokens")
    assert done.headroom.requests_reset_at.seconds > 0
    usage = events[-2].usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and not usage.estimated
    sent = (await openai_sim.stats())["last_request"]
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [{"role": "user", "content": PROMPT}]


async def test_sampling_reaches_the_vendor(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    sampling = common_pb2.SamplingParams(max_output_tokens=3, temperature=0.2, seed=7, stop_sequences=["END"])
    events = await collect(
        adapter.stub, request(sampling=sampling, metadata=common_pb2.RequestMetadata(end_user="u-1"))
    )
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    sent = (await openai_sim.stats())["last_request"]
    assert sent["max_completion_tokens"] == 3 and "max_tokens" not in sent
    assert (sent["temperature"], sent["seed"], sent["stop"], sent["user"]) == (0.2, 7, ["END"], "u-1")


async def test_tool_call_fragments_reassemble(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(chunks=5)
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    events = await collect(adapter.stub, request(tools=[WEATHER], tool_choice=choice))
    assert_well_formed(events)
    calls = [call for e in events if e.HasField("delta") for call in e.delta.tool_calls]
    assert len(calls) >= 5
    assert calls[0].id.startswith("call_") and calls[0].name == "get_weather"
    assert all(call.index == 0 for call in calls)
    assert all(not call.id and not call.name for call in calls[1:])
    arguments = orjson.loads("".join(call.arguments_fragment for call in calls))
    assert arguments == {"city": "example", "days": 1}
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    sent = (await openai_sim.stats())["last_request"]
    assert sent["tool_choice"] == "required"
    assert sent["tools"][0]["function"]["parameters"] == orjson.loads(SCHEMA)


async def test_json_modes(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    json_object = common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    events = await collect(adapter.stub, request(response_format=json_object))
    assert isinstance(orjson.loads("".join(e.delta.text for e in events if e.HasField("delta"))), dict)
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="forecast",
        json_schema=SCHEMA,
        strict=True,
    )
    events = await collect(adapter.stub, request(response_format=schema))
    answer = orjson.loads("".join(e.delta.text for e in events if e.HasField("delta")))
    assert set(answer) == {"city", "days"}
    sent = (await openai_sim.stats())["last_request"]
    assert sent["response_format"]["json_schema"]["name"] == "forecast"
    assert sent["response_format"]["json_schema"]["strict"] is True


async def test_usage_with_cached_and_reasoning_tokens(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, cached_tokens=4, reasoning_tokens=7)
    events = await collect(adapter.stub, request(model="o4-mini"))
    assert_well_formed(events)
    usage = events[-2].usage
    assert usage.cached_input_tokens == 4
    assert usage.reasoning_tokens == 7
    assert usage.output_tokens == (len(ANSWER) + 3) // 4 + 7
    assert not usage.estimated


async def test_concurrent_streams(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, chunks=4, chunk_delay_ms=20)
    results = await asyncio.gather(*(collect(adapter.stub, request()) for _ in range(20)))
    for events in results:
        assert_well_formed(events)
        assert "".join(e.delta.text for e in events if e.HasField("delta")) == ANSWER
    assert (await openai_sim.stats())["completed"] == 20


# --------------------------------------------------------------------------- #
# vendor errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("knobs", "code", "reason"),
    [
        (
            {"status": 400, "error_code": "context_length_exceeded"},
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        ({"status": 400}, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        ({"status": 404}, grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
        ({"status": 500}, grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        ({"status": 502}, grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        ({"status": 503}, grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        ({"status": 504}, grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
        ({"status": 403}, grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
    ],
)
async def test_http_errors(
    adapter: AdapterHandle,
    openai_sim: SimHandle,
    knobs: dict[str, Any],
    code: grpc.StatusCode,
    reason: Reason,
) -> None:
    await openai_sim.knobs(**knobs)
    error, received = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (code, reason)
    assert received == []
    assert error.metadata["provider"] == "openai"
    assert error.metadata["vendor"] == "openai"
    assert error.metadata["http_status"] == str(knobs["status"])
    assert error.metadata["vendor_request_id"].startswith("req_")
    assert_clean(error)


async def test_rate_limited_with_retry_info(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(status=429, retry_after_s=3, ratelimit={"remaining_requests": 0})
    error, _ = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.retry_after_s == 3.0
    assert error.metadata["vendor_code"] == "rate_limit_exceeded"
    assert error.metadata["remaining_requests"] == "0"
    assert "remaining_tokens" in error.metadata
    assert_clean(error)


async def test_insufficient_quota_is_not_retryable_later(
    adapter: AdapterHandle, openai_sim: SimHandle
) -> None:
    await openai_sim.knobs(status=429, error_code="insufficient_quota", retry_after_s=3)
    error, _ = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.metadata["quota"] == "exhausted"
    assert error.retry_after_s is None


async def test_wrong_key_is_auth_failed(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    error, _ = await failure(adapter.stub, request(provider="openai-badkey"))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED)
    assert error.metadata["http_status"] == "401"
    assert error.metadata["vendor_code"] == "invalid_api_key"
    assert_clean(error)


async def test_mid_stream_error(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, chunks=6, error_after_chunks=3, status=500)
    error, received = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["in_stream"] == "true"
    assert kinds(received) == ["delta", "delta"]  # role chunk, then two content chunks
    assert_clean(error)


async def test_mid_stream_rate_limit(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(chunks=6, error_after_chunks=2, status=429)
    error, _ = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)


async def test_malformed_event_then_next_call_succeeds(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, chunks=6, malformed_after_chunks=3)
    error, received = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert "not valid JSON" in error.message
    assert kinds(received) == ["delta", "delta"]
    assert_clean(error)
    await openai_sim.knobs(text=ANSWER)
    events = await collect(adapter.stub, request())
    assert "".join(e.delta.text for e in events if e.HasField("delta")) == ANSWER


async def test_dropped_connection(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(text=ANSWER, chunks=6, drop_after_chunks=3)
    error, received = await failure(adapter.stub, request())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["phase"] == "stream"
    assert kinds(received) == ["delta", "delta"]
    assert (await openai_sim.stats())["dropped"] == 1


async def test_connect_failure(adapter: AdapterHandle) -> None:
    error, _ = await failure(adapter.stub, request(provider="openai-dead"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["phase"] == "connect"


# --------------------------------------------------------------------------- #
# timeouts and cancellation
# --------------------------------------------------------------------------- #


async def test_slow_first_byte_times_out(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(first_byte_delay_ms=2000)
    started = time.monotonic()
    error, _ = await failure(adapter.stub, request(provider="openai-slow"))
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert error.metadata["phase"] == "first_byte"
    assert time.monotonic() - started < 1.5
    stats = await wait_for(lambda s: s["disconnects"] == 1, openai_sim)
    assert stats["disconnects"] == 1


async def test_idle_gap_times_out(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(chunks=6, chunk_delay_ms=1000)
    error, received = await failure(adapter.stub, request(provider="openai-slow"))
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert error.metadata["phase"] == "idle"
    assert kinds(received) == []  # the role chunk carries no delta


async def test_slow_consumer_is_not_an_idle_timeout(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    # The idle deadline covers waiting on the vendor, not the caller's own pace.
    await openai_sim.knobs(text=ANSWER, chunks=4)
    events: list[provider_pb2.GenerateResponse] = []
    async for event in adapter.stub.Generate(request(provider="openai-slow"), timeout=15):
        events.append(event)
        await asyncio.sleep(0.15)
    assert_well_formed(events)


async def test_cancellation_closes_the_upstream(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    await openai_sim.knobs(chunks=40, chunk_delay_ms=100)
    call = adapter.stub.Generate(request(), timeout=30)
    received = 0
    async for event in call:
        if event.HasField("delta"):
            received += 1
            if received == 2:
                break
    call.cancel()
    cancelled_at = time.monotonic()
    stats = await wait_for(lambda s: s["disconnects"] == 1 and s["active"] == 0, openai_sim)
    assert stats["disconnects"] == 1 and stats["active"] == 0
    assert stats["completed"] == 0
    assert time.monotonic() - cancelled_at < 1.0


# --------------------------------------------------------------------------- #
# validation, probe, capabilities
# --------------------------------------------------------------------------- #


async def test_unknown_provider_is_not_found(adapter: AdapterHandle) -> None:
    error, _ = await failure(adapter.stub, request(provider="nope"))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND)
    error, _ = await failure(adapter.stub, request(provider="anthropic"))
    assert error.reason == Reason.NOT_FOUND  # another vendor's provider


async def test_untranslatable_request_never_reaches_the_vendor(
    adapter: AdapterHandle, openai_sim: SimHandle
) -> None:
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"\x89PNG"))
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[image])
    error, _ = await failure(adapter.stub, request(messages=[message]))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == "messages[0].parts[0].image.mime_type"
    assert (await openai_sim.stats())["requests"] == 0


async def test_probe(adapter: AdapterHandle, openai_sim: SimHandle) -> None:
    ok = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai"), timeout=10)
    assert ok.ok and not ok.error_reason
    assert (await openai_sim.stats())["requests"] == 0  # GET /models, not a completion
    completion = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai-probe"), timeout=10)
    assert completion.ok
    assert completion.headroom.limit_tokens == 30_000_000
    sent = (await openai_sim.stats())["last_request"]
    assert sent["max_completion_tokens"] == 1
    bad_key = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai-badkey"), timeout=10)
    assert (bad_key.ok, bad_key.error_reason) == (False, "AUTH_FAILED")
    dead = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai-dead"), timeout=10)
    assert (dead.ok, dead.error_reason) == (False, "PROVIDER_UNAVAILABLE")
    await openai_sim.knobs(status=503)
    overloaded = await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="openai-probe"), timeout=10)
    assert (overloaded.ok, overloaded.error_reason) == (False, "PROVIDER_OVERLOADED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await adapter.stub.Probe(provider_pb2.ProbeRequest(provider="nope"), timeout=10)
    assert from_rpc_error(caught.value).reason == Reason.NOT_FOUND


async def test_capabilities(adapter: AdapterHandle) -> None:
    every = await adapter.stub.Capabilities(provider_pb2.CapabilitiesRequest(), timeout=10)
    assert every.vendor == "openai"
    assert list(every.providers) == ["openai", "openai-badkey", "openai-dead", "openai-probe", "openai-slow"]
    ids = [model.id for model in every.models]
    assert ids == ["openai/gpt-4o-mini", "openai/o4-mini", "slow/gpt-4o-mini", "probe/gpt-4o-mini"]
    mini = every.models[0]
    assert mini.vendor == "openai" and mini.upstream_model == "gpt-4o-mini" and mini.region == "us"
    assert mini.pricing.input_micros_per_million == 150_000
    assert mini.pricing.cached_input_micros_per_million == 75_000
    assert common_pb2.CAPABILITY_VISION in mini.capabilities
    assert list(mini.aliases) == ["mini"]
    assert every.models[1].category == common_pb2.MODEL_CATEGORY_REASONING
    one = await adapter.stub.Capabilities(provider_pb2.CapabilitiesRequest(provider="openai"), timeout=10)
    assert list(one.providers) == ["openai"]
    assert [model.id for model in one.models] == ["openai/gpt-4o-mini", "openai/o4-mini"]
