"""Cache replicas on one Redis: an answer stored through one is found through another, exactly
or as a paraphrase, and a replica started later rebuilds its semantic index from the feed;
with exact matching only, each pushes the keys of the shared store to the edges. Real
`switchyard serve cache` processes over real gRPC, a real Redis."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

from switchyard.edge.cache import StreamedLookups
from switchyard.v1 import cache_pb2, cache_pb2_grpc, common_pb2
from tests.support.service_process import running_service

MODEL = "openai/gpt-4o-mini"


def cache_env(redis_url: str) -> dict[str, str]:
    return {
        "REDIS_URL": redis_url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": "",
        "SWITCHYARD_CATALOG": "",
        "SWITCHYARD_LOG_FORMAT": "json",
        "SWITCHYARD_SHUTDOWN_GRACE_S": "2",
    }


def ask(text: str) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    return request


def answer(text: str) -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text=text)],
        usage=common_pb2.Usage(input_tokens=8, output_tokens=3),
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=MODEL,
        provider="openai",
        cost_micros=75,
    )


async def test_replicas_share_entries_and_paraphrases_and_a_late_one_rebuilds(
    redis_url: str, tmp_path: Path
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    env = cache_env(redis_url)
    async with (
        running_service("cache", env, tmp_path / "a.log") as first_channel,
        running_service("cache", env, tmp_path / "b.log") as second_channel,
    ):
        first = cache_pb2_grpc.CacheServiceStub(first_channel)
        second = cache_pb2_grpc.CacheServiceStub(second_channel)
        stored = await first.Store(
            cache_pb2.StoreRequest(
                tenant_id=tenant,
                request=ask("How do I reset my password?"),
                model=MODEL,
                answer=answer("Click."),
            ),
            timeout=10,
        )
        assert stored.admitted
        exact = await second.Lookup(
            cache_pb2.LookupRequest(
                tenant_id=tenant, request=ask("How do I reset my password?"), model=MODEL
            ),
            timeout=10,
        )
        assert exact.status == common_pb2.CACHE_STATUS_HIT_EXACT
        assert exact.answer.deltas[0].text == "Click."

        paraphrase = cache_pb2.LookupRequest(
            tenant_id=tenant, request=ask("How can I reset my password?"), model=MODEL
        )
        found = None
        for _ in range(50):  # the vector reaches the other replica through the feed
            found = await second.Lookup(paraphrase, timeout=10)
            if found.status == common_pb2.CACHE_STATUS_HIT_SEMANTIC:
                break
        assert found is not None and found.status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
        assert found.similarity >= 0.85 and found.saved_micros == 75

        async with running_service("cache", env, tmp_path / "c.log") as late_channel:
            late = cache_pb2_grpc.CacheServiceStub(late_channel)
            rebuilt = await late.Lookup(paraphrase, timeout=10)
            assert rebuilt.status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
            other = await late.Lookup(
                cache_pb2.LookupRequest(
                    tenant_id="someone-else", request=ask("How can I reset my password?"), model=MODEL
                ),
                timeout=10,
            )
            assert other.status == common_pb2.CACHE_STATUS_MISS


async def test_exact_only_replicas_push_each_others_keys_to_the_edges(redis_url: str, tmp_path: Path) -> None:
    """With semantic matching off, an edge answers sure misses itself from the presence its
    replica pushes; a key stored through another replica, or before a replica started, is
    vouched for (so it is looked up, and hits)."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    env = {**cache_env(redis_url), "SWITCHYARD_CACHE_SEMANTIC": "false"}

    def lookup(text: str) -> cache_pb2.LookupRequest:
        return cache_pb2.LookupRequest(tenant_id=tenant, request=ask(text), model=MODEL)

    async def store(stub: cache_pb2_grpc.CacheServiceStub, text: str) -> None:
        request = cache_pb2.StoreRequest(
            tenant_id=tenant, request=ask(text), model=MODEL, answer=answer("Yes.")
        )
        assert (await stub.Store(request, timeout=10)).admitted

    async with (
        running_service("cache", env, tmp_path / "a.log") as first_channel,
        running_service("cache", env, tmp_path / "b.log") as second_channel,
    ):
        second = cache_pb2_grpc.CacheServiceStub(second_channel)
        await store(second, "Stored before any edge asked?")
        edge = StreamedLookups(cache_pb2_grpc.CacheServiceStub(first_channel), presence=True)
        try:
            # The first lookup's call asks for the presence, which comes before its answer.
            assert (
                await edge.ask(lookup("Never stored?"), timeout_s=10)
            ).status == common_pb2.CACHE_STATUS_MISS
            assert edge.skip(lookup("Never stored either?"))
            assert not edge.skip(lookup("Stored before any edge asked?"))
            await store(second, "Stored through the other replica?")
            async with asyncio.timeout(10):  # announced on Redis, followed by the first replica
                while True:
                    if not edge.skip(lookup("Stored through the other replica?")):
                        break
                    await asyncio.sleep(0.01)
            found = await edge.ask(lookup("Stored through the other replica?"), timeout_s=10)
            assert found.status == common_pb2.CACHE_STATUS_HIT_EXACT
        finally:
            edge.close()

        async with running_service("cache", env, tmp_path / "c.log") as late_channel:
            late = StreamedLookups(cache_pb2_grpc.CacheServiceStub(late_channel), presence=True)
            try:
                await late.ask(lookup("Never stored?"), timeout_s=10)
                assert late.skip(lookup("Never stored at all?"))
                assert not late.skip(lookup("Stored before any edge asked?"))
                assert not late.skip(lookup("Stored through the other replica?"))
            finally:
                late.close()
