"""The adapter test table: the same cases against every vendor's adapter and simulator.

Each test runs once per row of `cases/` (a real gRPC adapter in front of that vendor's
simulator), drives the simulator with vendor-neutral knobs and asserts what a caller of
`ProviderAdapterService` relies on whatever the vendor: events in order and as they
arrive, exactly one usage before done, the error class of each vendor failure, and that
the upstream is closed when the caller goes away. Where vendors legitimately differ, the
row says how (`cases.VendorCase`).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import orjson
import pytest

from switchyard.common.answer_events import each_event, unpack
from switchyard.common.errors import Reason
from switchyard.v1 import common_pb2, provider_pb2

from .conftest import VendorEnv
from .support import (
    ANSWER,
    SCHEMA,
    WEATHER,
    assert_clean,
    assert_well_formed,
    collect,
    failure,
    kinds,
    request,
    text_of,
    wait_for,
)


def ask(
    env: VendorEnv, suffix: str = "", model: str | None = None, **chat: object
) -> provider_pb2.GenerateRequest:
    return request(env.provider(suffix), model or env.case.model, **chat)


# --------------------------------------------------------------------------- #
# success paths
# --------------------------------------------------------------------------- #


async def test_streams_text_incrementally(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, chunk_delay_ms=80)
    arrivals: list[float] = []
    events: list[provider_pb2.GenerateResponse] = []
    async for event in each_event(env.adapter.stub.Generate(ask(env), timeout=15)):
        arrivals.append(time.monotonic())
        events.append(event)
    assert_well_formed(events)
    deltas = [i for i, e in enumerate(events) if e.HasField("delta") and e.delta.text]
    assert len(deltas) == 6
    assert text_of(events) == ANSWER
    # Deltas are forwarded as the vendor sends them, not buffered to the end.
    assert arrivals[deltas[-1]] - arrivals[deltas[0]] >= 0.3
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.vendor_model.startswith(env.case.model)
    if env.case.request_id_prefix:
        assert done.vendor_request_id.startswith(env.case.request_id_prefix)
    if env.case.headroom:
        assert done.headroom.HasField("remaining_requests") or done.headroom.HasField("remaining_tokens")
    usage = events[-2].usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0 and not usage.estimated


async def test_max_tokens_stops_with_length(env: VendorEnv) -> None:
    sampling = common_pb2.SamplingParams(max_output_tokens=3, stop_sequences=["END"])
    events = await collect(env.adapter.stub, ask(env, sampling=sampling))
    assert_well_formed(events)
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert 0 < len(text_of(events)) <= 12


async def test_tool_call_fragments_reassemble(env: VendorEnv) -> None:
    await env.sim.knobs(chunks=5)
    choice = common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
    events = await collect(env.adapter.stub, ask(env, tools=[WEATHER], tool_choice=choice))
    assert_well_formed(events)
    calls = [call for e in events if e.HasField("delta") for call in e.delta.tool_calls]
    assert len(calls) >= env.case.min_tool_fragments
    assert calls[0].name == "get_weather"
    assert calls[0].id.startswith(env.case.tool_call_id_prefix)
    if env.case.tool_call_id_prefix:
        assert calls[0].id
    assert all(call.index == 0 for call in calls)
    assert all(not call.id and not call.name for call in calls[1:])
    arguments = orjson.loads("".join(call.arguments_fragment for call in calls))
    assert arguments == {"city": "example", "days": 1}
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


async def test_json_object_mode(env: VendorEnv) -> None:
    json_object = common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    if not env.case.json_object:
        error, _ = await failure(env.adapter.stub, ask(env, response_format=json_object))
        assert (error.code, error.metadata["field"]) == (grpc.StatusCode.INVALID_ARGUMENT, "response_format")
        assert (await env.sim.stats())["requests"] == 0
        return
    events = await collect(env.adapter.stub, ask(env, response_format=json_object))
    assert isinstance(orjson.loads(text_of(events)), dict)


async def test_json_schema_mode(env: VendorEnv) -> None:
    schema = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="forecast",
        json_schema=SCHEMA,
        strict=True,
    )
    if not env.case.json_schema:
        error, _ = await failure(env.adapter.stub, ask(env, response_format=schema))
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.metadata["field"].startswith("response_format")
        assert (await env.sim.stats())["requests"] == 0
        return
    events = await collect(env.adapter.stub, ask(env, response_format=schema))
    assert set(orjson.loads(text_of(events))) == {"city", "days"}


async def test_usage_on_the_final_chunk(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, cached_tokens=4, reasoning_tokens=7)
    events = await collect(env.adapter.stub, ask(env, model=env.case.reasoning_model))
    assert_well_formed(events)
    usage = events[-2].usage
    assert not usage.estimated
    assert usage.input_tokens >= 4 and usage.output_tokens > 0
    if env.case.reports_cached:
        assert usage.cached_input_tokens == 4
    if env.case.reports_reasoning:
        assert usage.reasoning_tokens == 7
        assert usage.output_tokens >= 7 + 1


async def test_concurrent_streams(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=4, chunk_delay_ms=20)
    results = await asyncio.gather(*(collect(env.adapter.stub, ask(env)) for _ in range(20)))
    for events in results:
        assert_well_formed(events)
        assert text_of(events) == ANSWER
    assert (await env.sim.stats())["completed"] == 20


# --------------------------------------------------------------------------- #
# vendor errors
# --------------------------------------------------------------------------- #


async def test_http_errors(env: VendorEnv) -> None:
    rows = [({"status": status}, code, reason) for status, code, reason in env.case.statuses()]
    rows.append((env.case.context_too_long, grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG))
    rows.extend(env.case.extra_errors)
    for knobs, code, reason in rows:
        await env.sim.knobs(**knobs)
        error, received = await failure(env.adapter.stub, ask(env))
        assert (knobs, error.code, error.reason) == (knobs, code, reason)
        assert received == []
        assert error.metadata["provider"] == env.provider()
        assert error.metadata["vendor"] == env.case.vendor
        assert error.metadata["http_status"] == str(knobs["status"])
        assert_clean(error)


async def test_rate_limited_with_retry_info(env: VendorEnv) -> None:
    await env.sim.knobs(status=429, retry_after_s=3, ratelimit={"remaining_requests": 0})
    error, _ = await failure(env.adapter.stub, ask(env))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.retry_after_s == 3.0
    if env.case.rate_limit_code:
        assert error.metadata["vendor_code"] == env.case.rate_limit_code
    if env.case.headroom:
        assert error.metadata["remaining_requests"] == "0"
    assert_clean(error)


async def test_wrong_key_is_auth_failed(env: VendorEnv) -> None:
    error, _ = await failure(env.adapter.stub, ask(env, "-badkey"))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED)
    assert error.metadata["http_status"] == str(env.case.auth_failed_status)
    assert_clean(error)


async def test_mid_stream_error(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, error_after_chunks=3, status=500)
    error, received = await failure(env.adapter.stub, ask(env))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["in_stream"] == "true"
    assert set(kinds(received)) <= {"delta"}
    assert ANSWER.startswith(text_of(received)) and text_of(received) != ANSWER
    assert_clean(error)


async def test_mid_stream_rate_limit(env: VendorEnv) -> None:
    if not env.case.in_stream_rate_limit:
        pytest.skip(f"{env.case.vendor} reports no rate limit inside a stream")
    await env.sim.knobs(chunks=6, error_after_chunks=2, status=429)
    error, _ = await failure(env.adapter.stub, ask(env))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.metadata["in_stream"] == "true"


async def test_malformed_event_then_next_call_succeeds(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, malformed_after_chunks=3)
    error, received = await failure(env.adapter.stub, ask(env))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert set(kinds(received)) <= {"delta"}
    assert ANSWER.startswith(text_of(received))
    assert_clean(error)
    await env.sim.knobs(text=ANSWER)
    assert text_of(await collect(env.adapter.stub, ask(env))) == ANSWER


async def test_dropped_connection(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, drop_after_chunks=3)
    error, received = await failure(env.adapter.stub, ask(env))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["phase"] == "stream"
    assert ANSWER.startswith(text_of(received)) and text_of(received) != ANSWER
    assert (await env.sim.stats())["dropped"] == 1


async def test_connect_failure(env: VendorEnv) -> None:
    error, _ = await failure(env.adapter.stub, ask(env, "-dead"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["phase"] == "connect"


# --------------------------------------------------------------------------- #
# timeouts and cancellation
# --------------------------------------------------------------------------- #


async def test_slow_first_byte_times_out(env: VendorEnv) -> None:
    await env.sim.knobs(first_byte_delay_ms=2000)
    started = time.monotonic()
    error, _ = await failure(env.adapter.stub, ask(env, "-slow"))
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert error.metadata["phase"] == "first_byte"
    assert time.monotonic() - started < 1.5
    stats = await wait_for(lambda s: s["disconnects"] == 1, env.sim)
    assert stats["disconnects"] == 1


async def test_idle_gap_times_out(env: VendorEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, chunk_delay_ms=1000)
    error, received = await failure(env.adapter.stub, ask(env, "-slow"))
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert error.metadata["phase"] == "idle"
    assert text_of(received) != ANSWER


async def test_events_read_together_travel_as_one_message(env: VendorEnv) -> None:
    # A one-chunk answer: what one read decoded goes as one message (usage and done always
    # share the last one), and unpacked the events are the same, in order.
    await env.sim.knobs(text=ANSWER, chunks=1)
    messages = [m async for m in env.adapter.stub.Generate(ask(env), timeout=15)]
    events = [e for m in messages for e in unpack(m)]
    assert_well_formed(events)
    assert text_of(events) == ANSWER
    assert kinds(list(unpack(messages[-1])))[-2:] == ["usage", "done"]
    assert len(messages) < len(events)
    assert all(not e.then for m in messages for e in m.then)


async def test_slow_consumer_is_not_an_idle_timeout(env: VendorEnv) -> None:
    # The idle deadline covers waiting on the vendor, not the caller's own pace.
    await env.sim.knobs(text=ANSWER, chunks=4)
    events: list[provider_pb2.GenerateResponse] = []
    async for event in each_event(env.adapter.stub.Generate(ask(env, "-slow"), timeout=15)):
        events.append(event)
        await asyncio.sleep(0.15)
    assert_well_formed(events)


async def test_cancellation_closes_the_upstream(env: VendorEnv) -> None:
    await env.sim.knobs(chunks=40, chunk_delay_ms=100)
    call = env.adapter.stub.Generate(ask(env), timeout=30)
    received = 0
    async for event in each_event(call):
        if event.HasField("delta"):
            received += 1
            if received == 2:
                break
    call.cancel()
    cancelled_at = time.monotonic()
    stats = await wait_for(lambda s: s["disconnects"] == 1 and s["active"] == 0, env.sim)
    assert stats["disconnects"] == 1 and stats["active"] == 0
    assert stats["completed"] == 0
    assert time.monotonic() - cancelled_at < 1.0


# --------------------------------------------------------------------------- #
# routing, probe, capabilities
# --------------------------------------------------------------------------- #


async def test_unknown_provider_is_not_found(env: VendorEnv) -> None:
    for provider in (
        "nope",
        next(p for p in env.adapter.servicer._catalog.providers if p.startswith("other-")),
    ):
        error, _ = await failure(env.adapter.stub, request(provider, env.case.model))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND)


async def test_probe(env: VendorEnv) -> None:
    stub = env.adapter.stub
    ok = await stub.Probe(provider_pb2.ProbeRequest(provider=env.provider()), timeout=10)
    assert ok.ok and not ok.error_reason
    completion = await stub.Probe(provider_pb2.ProbeRequest(provider=env.provider("-probe")), timeout=10)
    assert completion.ok
    assert (await env.sim.stats())["requests"] == 1  # only the completion probe generates
    bad_key = await stub.Probe(provider_pb2.ProbeRequest(provider=env.provider("-badkey")), timeout=10)
    assert (bad_key.ok, bad_key.error_reason) == (False, "AUTH_FAILED")
    dead = await stub.Probe(provider_pb2.ProbeRequest(provider=env.provider("-dead")), timeout=10)
    assert (dead.ok, dead.error_reason) == (False, "PROVIDER_UNAVAILABLE")
    await env.sim.knobs(status=503)
    down = await stub.Probe(provider_pb2.ProbeRequest(provider=env.provider("-probe")), timeout=10)
    assert not down.ok
    assert down.error_reason == {status: reason for status, _, reason in env.case.statuses()}[503].value


async def test_capabilities(env: VendorEnv) -> None:
    every = await env.adapter.stub.Capabilities(provider_pb2.CapabilitiesRequest(), timeout=10)
    assert every.vendor == env.case.vendor
    assert list(every.providers) == sorted(
        env.provider(suffix) for suffix in ("", "-slow", "-probe", "-badkey", "-dead")
    )
    one = await env.adapter.stub.Capabilities(
        provider_pb2.CapabilitiesRequest(provider=env.provider()), timeout=10
    )
    assert [model.id for model in one.models] == [
        f"main/{env.case.model}",
        f"reasoning/{env.case.reasoning_model}",
    ]
    assert all(model.vendor == env.case.vendor for model in one.models)
