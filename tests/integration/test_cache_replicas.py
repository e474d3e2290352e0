"""Cache replicas on one Redis: an answer stored through one is found through another, exactly
or as a paraphrase, and a replica started later rebuilds its semantic index from the feed.
Real `switchyard serve cache` processes over real gRPC, a real Redis."""

from __future__ import annotations

import uuid
from pathlib import Path

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
