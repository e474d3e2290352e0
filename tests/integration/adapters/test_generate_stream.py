"""Generations multiplexed on `GenerateFrames`, end to end: the edge's `GenerationStreams`
against the real adapter over gRPC, in front of the OpenAI simulator.

Each generation gets its own answer, whole and in order, on a shared call; one cancelled,
failed or timed out generation leaves the others alone; an adapter without GenerateFrames is
called on GenerateStream, one without either with Generate; a lost stream fails its
generations as an unavailable adapter would.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.adapters.service import build_adapter
from switchyard.common.answer_events import unpack
from switchyard.common.catalog import parse_catalog
from switchyard.common.errors import Reason, SwitchyardError, from_status
from switchyard.common.ports import free_port
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.edge.generations import Generation, GenerationStreams
from switchyard.v1 import provider_pb2, provider_pb2_grpc

from .conftest import VendorEnv, key_env, table_catalog
from .support import ANSWER, assert_well_formed, request, text_of, wait_for


class CountingStub:
    """The adapter's stub, counting the calls the generations open."""

    def __init__(self, stub: provider_pb2_grpc.ProviderAdapterServiceStub) -> None:
        self.stub = stub
        self.frames = 0
        self.streams = 0
        self.unary = 0

    def GenerateFrames(self) -> object:
        self.frames += 1
        return self.stub.GenerateFrames()

    def GenerateStream(self) -> object:
        self.streams += 1
        return self.stub.GenerateStream()

    def Generate(self, req: provider_pb2.GenerateRequest, *, timeout: float | None = None) -> object:
        self.unary += 1
        return self.stub.Generate(req, timeout=timeout)


def ask(env: VendorEnv, provider: str | None = None) -> provider_pb2.GenerateRequest:
    return request(provider or env.provider(), env.case.model)


async def events(generation: Generation) -> list[provider_pb2.GenerateResponse]:
    return [event async for message in generation for event in unpack(message)]


async def test_generations_share_one_call_and_each_gets_its_own_answer(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=5, chunk_delay_ms=20)
    stub = CountingStub(openai_env.adapter.stub)
    generations = GenerationStreams(stub, streams=1)  # type: ignore[arg-type]
    try:
        answers = await asyncio.gather(
            *(events(generations.generate(ask(openai_env), timeout_s=10)) for _ in range(6))
        )
    finally:
        generations.close()
    for answer in answers:
        assert_well_formed(answer)
        assert text_of(answer) == ANSWER
    assert (stub.frames, stub.streams, stub.unary) == (1, 0, 0)
    assert (await openai_env.sim.stats())["completed"] == 6


async def test_calls_are_opened_in_turn_up_to_the_limit(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    stub = CountingStub(openai_env.adapter.stub)
    generations = GenerationStreams(stub, streams=3)  # type: ignore[arg-type]
    try:
        for _ in range(7):
            assert text_of(await events(generations.generate(ask(openai_env), timeout_s=10)))
    finally:
        generations.close()
    assert stub.frames == 3


async def test_a_cancelled_generation_closes_its_upstream_and_spares_the_others(
    openai_env: VendorEnv,
) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=12, chunk_delay_ms=40)
    generations = GenerationStreams(openai_env.adapter.stub, streams=1)  # type: ignore[arg-type]
    try:
        other = asyncio.create_task(events(generations.generate(ask(openai_env), timeout_s=10)))
        cancelled = generations.generate(ask(openai_env), timeout_s=10)
        deltas = 0
        async for message in cancelled:
            deltas += sum(1 for e in unpack(message) if e.HasField("delta"))
            if deltas >= 2:
                break
        cancelled.cancel()
        stats = await wait_for(lambda s: s["disconnects"] == 1, openai_env.sim)
        assert stats["disconnects"] == 1
        answer = await other
    finally:
        generations.close()
    assert_well_formed(answer)
    assert text_of(answer) == ANSWER
    assert [m async for m in cancelled] == []  # over: nothing more comes
    stats = await wait_for(lambda s: s["active"] == 0, openai_env.sim)
    assert (stats["completed"], stats["disconnects"], stats["active"]) == (1, 1, 0)


async def test_a_failed_generation_fails_alone(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=4, chunk_delay_ms=30)
    generations = GenerationStreams(openai_env.adapter.stub, streams=1)  # type: ignore[arg-type]
    try:
        good = asyncio.create_task(events(generations.generate(ask(openai_env), timeout_s=10)))
        with pytest.raises(SwitchyardError) as caught:
            await events(generations.generate(ask(openai_env, "no-such-provider"), timeout_s=10))
        answer = await good
    finally:
        generations.close()
    assert caught.value.code is grpc.StatusCode.NOT_FOUND
    assert caught.value.reason is Reason.NOT_FOUND
    assert text_of(answer) == ANSWER


async def test_the_callers_deadline_ends_the_generation(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=6, chunk_delay_ms=300)
    generations = GenerationStreams(openai_env.adapter.stub, streams=1)  # type: ignore[arg-type]
    try:
        with pytest.raises(SwitchyardError) as caught:
            await events(generations.generate(ask(openai_env), timeout_s=0.5))
        stats = await wait_for(lambda s: s["disconnects"] == 1 and s["active"] == 0, openai_env.sim)
        # The stream is still good for the next generation.
        await openai_env.sim.knobs(text=ANSWER, chunks=2)
        assert text_of(await events(generations.generate(ask(openai_env), timeout_s=10))) == ANSWER
    finally:
        generations.close()
    assert (caught.value.code, caught.value.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert (stats["disconnects"], stats["completed"]) == (1, 0)


async def serve(servicer: provider_pb2_grpc.ProviderAdapterServiceServicer) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


class OlderAdapter(provider_pb2_grpc.ProviderAdapterServiceServicer):
    """An adapter build from before GenerateStream: Generate only (the rest UNIMPLEMENTED)."""

    def __init__(self, env: VendorEnv) -> None:
        self._env = env

    def Generate(
        self, request: provider_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[provider_pb2.GenerateResponse]:
        return self._env.adapter.servicer.Generate(request, context)


async def test_an_adapter_without_generate_stream_is_called_with_generate(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=3)
    server, port = await serve(OlderAdapter(openai_env))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = CountingStub(provider_pb2_grpc.ProviderAdapterServiceStub(channel))
    generations = GenerationStreams(stub, streams=1)  # type: ignore[arg-type]
    try:
        first = await events(generations.generate(ask(openai_env), timeout_s=10))
        second = await events(generations.generate(ask(openai_env), timeout_s=10))
    finally:
        generations.close()
        await channel.close()
        await server.stop(grace=None)
    assert text_of(first) == text_of(second) == ANSWER
    assert_well_formed(second)
    assert generations.unary and (stub.frames, stub.streams, stub.unary) == (1, 1, 2)


class StreamOnlyAdapter(OlderAdapter):
    """An adapter build from before GenerateFrames: GenerateStream, a message each."""

    def GenerateStream(
        self,
        requests: AsyncIterator[provider_pb2.GenerateStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[provider_pb2.GenerateStreamResponse]:
        return self._env.adapter.servicer.GenerateStream(requests, context)


async def test_an_adapter_without_generate_frames_is_called_on_generate_stream(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=3)
    server, port = await serve(StreamOnlyAdapter(openai_env))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    stub = CountingStub(provider_pb2_grpc.ProviderAdapterServiceStub(channel))
    generations = GenerationStreams(stub, streams=1)  # type: ignore[arg-type]
    try:
        first = await events(generations.generate(ask(openai_env), timeout_s=10))
        both = await asyncio.gather(
            *(events(generations.generate(ask(openai_env), timeout_s=10)) for _ in range(2))
        )
    finally:
        generations.close()
        await channel.close()
        await server.stop(grace=None)
    for answer in (first, *both):
        assert text_of(answer) == ANSWER
        assert_well_formed(answer)
    assert not generations.framed and not generations.unary
    assert (stub.frames, stub.streams, stub.unary) == (1, 1, 0)


async def test_a_frame_of_several_generations_is_answered_in_frames(openai_env: VendorEnv) -> None:
    # Three starts in one message: each answer comes back whole under its id, and answers
    # ready together share a message.
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=4, chunk_delay_ms=20)
    call = openai_env.adapter.stub.GenerateFrames()
    frame = provider_pb2.GenerateFramesRequest(
        items=[
            provider_pb2.GenerateStreamRequest(id=i, start=ask(openai_env), timeout_ms=10_000)
            for i in (1, 2, 3)
        ]
    )
    answers: dict[int, list[provider_pb2.GenerateResponse]] = {1: [], 2: [], 3: []}
    shared = 0
    try:
        await call.write(frame)
        async with asyncio.timeout(10):
            while not all(a and a[-1].HasField("done") for a in answers.values()):
                message = await call.read()
                shared += len(message.items) > 1
                for item in message.items:
                    assert not item.HasField("error")
                    answers[item.id].extend(unpack(item.events))
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
    finally:
        call.cancel()
    for answer in answers.values():
        assert_well_formed(answer)
        assert text_of(answer) == ANSWER
    assert shared, "answers ready together travel in one message"


async def test_a_lost_stream_fails_its_generations_as_an_unavailable_adapter(openai_env: VendorEnv) -> None:
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=20, chunk_delay_ms=100)
    server, port = await serve(openai_env.adapter.servicer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    generations = GenerationStreams(provider_pb2_grpc.ProviderAdapterServiceStub(channel), streams=1)  # type: ignore[arg-type]
    try:
        generation = generations.generate(ask(openai_env), timeout_s=10)
        first = await anext(generation)
        assert first.HasField("delta") or any(e.HasField("delta") for e in unpack(first))
        await server.stop(grace=None)  # the adapter goes away mid-answer
        with pytest.raises(SwitchyardError) as caught:
            async for _ in generation:
                continue
        # The next generation opens another stream, which finds no adapter either.
        with pytest.raises(SwitchyardError) as again:
            await events(generations.generate(ask(openai_env), timeout_s=5))
    finally:
        generations.close()
        await channel.close()
    assert (caught.value.code, caught.value.reason) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
    )
    assert again.value.code is grpc.StatusCode.UNAVAILABLE
    await wait_for(lambda s: s["active"] == 0, openai_env.sim)


async def test_a_draining_adapter_finishes_its_generations_and_takes_no_new_ones(
    openai_env: VendorEnv,
) -> None:
    # Shutdown begins: the generation running on the stream is answered in full, a new one
    # is refused UNAVAILABLE (the edge tries elsewhere), and the stream then ends by itself,
    # well within the grace period instead of being cut at its end.
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=6, chunk_delay_ms=60)
    case = openai_env.case
    catalog = parse_catalog(
        table_catalog(case, openai_env.sim.sim.base_url + case.base_url_suffix, free_port())
    )
    servicer = build_adapter(catalog, case.vendor, key_env(case))
    server, port = await serve(servicer)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = provider_pb2_grpc.ProviderAdapterServiceStub(channel).GenerateStream()
    try:
        await call.write(provider_pb2.GenerateStreamRequest(id=1, start=ask(openai_env), timeout_ms=10_000))
        first = await call.read()
        assert first.id == 1 and not first.HasField("error")
        servicer.drain()
        await call.write(provider_pb2.GenerateStreamRequest(id=2, start=ask(openai_env), timeout_ms=10_000))
        answers: dict[int, list[provider_pb2.GenerateStreamResponse]] = {1: [first], 2: []}
        async with asyncio.timeout(5):
            while (response := await call.read()) is not grpc.aio.EOF:  # ends once 1 is done
                answers[response.id].append(response)
        assert await call.code() is grpc.StatusCode.OK
    finally:
        await channel.close()
        await server.stop(grace=None)
        await servicer.aclose()
    whole = [e for r in answers[1] for e in unpack(r.events)]
    assert_well_formed(whole)
    assert text_of(whole) == ANSWER
    (refused,) = answers[2]
    error = from_status(refused.error)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE)


class CountedReplica(provider_pb2_grpc.ProviderAdapterServiceServicer):
    """One replica of the adapter: the real servicer, counting the generations it starts."""

    def __init__(self, servicer: provider_pb2_grpc.ProviderAdapterServiceServicer) -> None:
        self._servicer = servicer
        self.started = 0

    async def GenerateFrames(
        self,
        frames: AsyncIterator[provider_pb2.GenerateFramesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[provider_pb2.GenerateFramesResponse]:
        async def counted() -> AsyncIterator[provider_pb2.GenerateFramesRequest]:
            async for frame in frames:
                self.started += sum(item.HasField("start") for item in frame.items)
                yield frame

        async for reply in self._servicer.GenerateFrames(counted(), context):
            yield reply


class Balancer:
    """Each new call goes to the next replica, as through Envoy; `replicas` may grow."""

    def __init__(self, *replicas: provider_pb2_grpc.ProviderAdapterServiceStub) -> None:
        self.replicas = list(replicas)
        self.calls: list[grpc.aio.StreamStreamCall] = []

    def GenerateFrames(self) -> object:
        call = self.replicas[len(self.calls) % len(self.replicas)].GenerateFrames()
        self.calls.append(call)
        return call


async def test_streams_past_their_age_move_to_a_replica_added_under_load(openai_env: VendorEnv) -> None:
    # Busy generations never leave a stream idle; retired by age, the streams reach the
    # replica added mid-run, every answer arrives whole, and each old call ends cleanly
    # (the adapter finishes it once the edge closed its side: OK, not cancelled).
    await openai_env.sim.reset()
    await openai_env.sim.knobs(text=ANSWER, chunks=4, chunk_delay_ms=20)
    first, added = CountedReplica(openai_env.adapter.servicer), CountedReplica(openai_env.adapter.servicer)
    (server_a, port_a), (server_b, port_b) = await serve(first), await serve(added)
    channel_a = grpc.aio.insecure_channel(f"127.0.0.1:{port_a}")
    channel_b = grpc.aio.insecure_channel(f"127.0.0.1:{port_b}")
    stub = Balancer(provider_pb2_grpc.ProviderAdapterServiceStub(channel_a))
    generations = GenerationStreams(stub, streams=2, max_age_s=0.2)  # type: ignore[arg-type]
    answers: list[list[provider_pb2.GenerateResponse]] = []

    async def load(until: float) -> None:
        while asyncio.get_running_loop().time() < until:
            answers.append(await events(generations.generate(ask(openai_env), timeout_s=10)))

    async def run_for(seconds: float) -> None:
        until = asyncio.get_running_loop().time() + seconds
        await asyncio.gather(*(load(until) for _ in range(4)))

    try:
        await run_for(0.3)
        assert added.started == 0
        stub.replicas.append(provider_pb2_grpc.ProviderAdapterServiceStub(channel_b))  # scale out
        before = first.started
        await run_for(0.8)
        current = {stream.mux.call for stream in generations._streams if stream is not None}
        retired = [call for call in stub.calls if call not in current]
        async with asyncio.timeout(5):  # each ends once its last answer is out
            codes = {await call.code() for call in retired}
    finally:
        generations.close()
        await channel_a.close()
        await channel_b.close()
        await server_a.stop(grace=None)
        await server_b.stop(grace=None)
    for answer in answers:
        assert_well_formed(answer)
        assert text_of(answer) == ANSWER
    assert added.started > 0 and first.started > before  # both replicas share the load
    assert first.started + added.started == len(answers)
    assert len(stub.calls) > 4 and retired
    assert codes == {grpc.StatusCode.OK}
    assert (await openai_env.sim.stats())["completed"] == len(answers)
