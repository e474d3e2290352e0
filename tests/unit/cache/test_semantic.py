"""Semantic matching with the real local embedder: paraphrases hit within a scope, nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from switchyard.cache.embed import Embedder, load_local_embedder
from switchyard.cache.keys import cache_key
from switchyard.cache.semantic import SemanticIndex, literals_of, question_text, scope_of
from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.v1 import cache_pb2, common_pb2

QUESTION = "What is the capital of France?"
PARAPHRASE = "Which city is the capital of France?"
OTHER = "Give me a recipe for banana bread."
MODEL = "openai/gpt-4o-mini"


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    loaded = load_local_embedder()
    assert loaded is not None, "the semantic extra is part of the dev install"
    yield loaded


def ask(text: str, *, system: str = "", temperature: float = 0.0) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    if system:
        request.messages.add(role=common_pb2.ROLE_SYSTEM).parts.add(text=system)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = temperature
    return request


def test_the_question_is_the_last_user_message() -> None:
    request = ask("first question")
    request.messages.add(role=common_pb2.ROLE_ASSISTANT).parts.add(text="an answer")
    assert question_text(request) == ""
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text="  the follow-up ")
    assert question_text(request) == "the follow-up"


def test_the_scope_is_everything_but_the_wording() -> None:
    base = scope_of("acme", ask(QUESTION), MODEL)
    assert scope_of("acme", ask(PARAPHRASE), MODEL) == base
    assert scope_of("other", ask(QUESTION), MODEL) != base
    assert scope_of("acme", ask(QUESTION), "openai/gpt-4.1-mini") != base
    assert scope_of("acme", ask(QUESTION, system="Answer in French."), MODEL) != base
    assert scope_of("acme", ask(QUESTION, temperature=0.1), MODEL) != base


def test_the_index_finds_a_paraphrase_above_the_threshold_only(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    scope = scope_of("acme", ask(QUESTION), MODEL)
    vectors = index.embed([QUESTION, PARAPHRASE, OTHER])
    index.add(scope, "k-question", vectors[0])
    match = index.search(scope, vectors[1], 0.85)
    assert match is not None and match.key == "k-question"
    assert 0.85 <= match.similarity < 1.0
    assert index.search(scope, vectors[2], 0.85) is None
    assert index.search(scope, vectors[1], 0.999) is None
    assert index.search(scope_of("other", ask(QUESTION), MODEL), vectors[1], 0.5) is None
    index.remove("k-question")
    assert index.search(scope, vectors[0], 0.5) is None and len(index) == 0


def test_remove_where_forgets_the_matching_keys(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    vector = index.embed([QUESTION])[0]
    index.add("s1", "acme/m/1", vector)
    index.add("s2", "other/m/2", vector)
    assert index.remove_where(lambda key: key.startswith("acme/")) == 1
    assert index.search("s1", vector, 0.5) is None
    assert index.search("s2", vector, 0.5) is not None


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_expired_questions_leave_when_the_next_is_indexed(embedder: Embedder) -> None:
    clock = Clock()
    index = SemanticIndex(embedder, clock=clock)
    vector = index.embed([QUESTION])[0]
    index.add("s1", "acme/m/short", vector, expires_at=clock.now + 300)
    index.add("s1", "acme/m/long", vector, expires_at=clock.now + 3_600)
    index.add("s2", "acme/m/unknown", vector)  # no expiry known: stays until a lookup misses it
    clock.now += 301
    assert len(index) == 3  # nothing runs in the background
    index.add("s3", "acme/m/new", vector, expires_at=clock.now + 60)
    assert len(index) == 3
    match = index.search("s1", vector, 0.5)
    assert match is not None and match.key == "acme/m/long"
    clock.now += 3_600
    assert index.drop_expired() == 2  # long and new
    assert len(index) == 1 and index.search("s2", vector, 0.5) is not None


def test_a_question_stored_again_keeps_its_new_expiry(embedder: Embedder) -> None:
    clock = Clock()
    index = SemanticIndex(embedder, clock=clock)
    vector = index.embed([QUESTION])[0]
    index.add("s1", "acme/m/1", vector, expires_at=clock.now + 10)
    index.add("s1", "acme/m/1", vector, expires_at=clock.now + 1_000)  # refreshed
    clock.now += 11
    assert index.drop_expired() == 0 and len(index) == 1


def test_an_end_users_questions_leave_together(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    vector = index.embed([QUESTION])[0]
    index.add("s1", "acme/m/1", vector, end_user_hash="h-alice")
    index.add("s2", "acme/m/2", vector, end_user_hash="h-alice")
    index.add("s1", "acme/m/3", vector, end_user_hash="h-bob")
    index.add("s1", "acme/m/4", vector)
    # Stored again for someone else: no longer the first end user's question.
    index.add("s2", "acme/m/2", vector, end_user_hash="h-bob")
    assert index.remove_end_user("h-alice") == 1
    assert index.remove_end_user("h-alice") == 0
    assert len(index) == 3
    index.remove("acme/m/3")
    assert index.remove_end_user("h-bob") == 1
    assert len(index) == 1


def answer(text: str = "Paris.") -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text=text)],
        usage=common_pb2.Usage(input_tokens=9, output_tokens=2),
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=MODEL,
        provider="openai",
        cost_micros=120,
    )


async def lookup(
    servicer: CacheServicer, tenant: str, request: common_pb2.ChatRequest
) -> cache_pb2.LookupResponse:
    return await servicer.Lookup(
        cache_pb2.LookupRequest(tenant_id=tenant, request=request, model=MODEL), None
    )  # type: ignore[arg-type]


async def test_the_service_answers_a_paraphrase_within_its_scope_and_reports_the_similarity(
    embedder: Embedder,
) -> None:
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=SemanticIndex(embedder))
    stored = await servicer.Store(
        cache_pb2.StoreRequest(tenant_id="acme", request=ask(QUESTION), model=MODEL, answer=answer()),
        None,  # type: ignore[arg-type]
    )
    assert stored.admitted

    hit = await lookup(servicer, "acme", ask(PARAPHRASE))
    assert hit.status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
    assert 0.85 <= hit.similarity < 1.0
    assert (hit.answer.deltas[0].text, hit.saved_micros) == ("Paris.", 120)
    exact = await lookup(servicer, "acme", ask(QUESTION))
    assert (exact.status, exact.similarity) == (common_pb2.CACHE_STATUS_HIT_EXACT, 1.0)

    misses = [
        await lookup(servicer, "acme", ask(OTHER)),
        await lookup(servicer, "other-tenant", ask(PARAPHRASE)),
        await lookup(servicer, "acme", ask(PARAPHRASE, system="Answer in French.")),
        await lookup(servicer, "acme", ask(PARAPHRASE, temperature=0.2)),
    ]
    assert [m.status for m in misses] == [common_pb2.CACHE_STATUS_MISS] * 4
    strict = ask(PARAPHRASE)
    strict.cache.semantic_threshold = 0.999
    assert (await lookup(servicer, "acme", strict)).status == common_pb2.CACHE_STATUS_MISS

    stats = servicer.stats.response("acme")
    assert (stats.lookups, stats.exact_hits, stats.semantic_hits, stats.saved_micros) == (
        6,
        1,
        1,
        240,
    )  # the other tenant's lookup is its own
    capabilities = await servicer.GetCapabilities(cache_pb2.GetCapabilitiesRequest(), None)  # type: ignore[arg-type]
    assert capabilities.semantic and capabilities.embedder == embedder.name


async def test_invalidated_and_evicted_entries_leave_the_semantic_index(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    store = MemoryStore(max_bytes=1_000_000)
    servicer = CacheServicer(store, semantic=index)
    request = cache_pb2.StoreRequest(tenant_id="acme", request=ask(QUESTION), model=MODEL, answer=answer())
    await servicer.Store(request, None)  # type: ignore[arg-type]
    assert len(index) == 1
    await servicer.Invalidate(cache_pb2.InvalidateRequest(tenant_id="acme"), None)  # type: ignore[arg-type]
    assert len(index) == 0
    assert (await lookup(servicer, "acme", ask(PARAPHRASE))).status == common_pb2.CACHE_STATUS_MISS

    # An entry gone from the store behind the index's back is dropped at its next match.
    await servicer.Store(request, None)  # type: ignore[arg-type]
    await store.invalidate(key_pattern=cache_key("acme", ask(QUESTION), MODEL))
    assert (await lookup(servicer, "acme", ask(PARAPHRASE))).status == common_pb2.CACHE_STATUS_MISS
    assert len(index) == 0


async def test_a_bad_caller_threshold_is_invalid(embedder: Embedder) -> None:
    from switchyard.common.errors import SwitchyardError

    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=SemanticIndex(embedder))
    request = ask(PARAPHRASE)
    request.cache.semantic_threshold = 1.5
    with pytest.raises(SwitchyardError) as caught:
        await lookup(servicer, "acme", request)
    assert caught.value.metadata["field"] == "request.cache.semantic_threshold"


def test_questions_that_differ_in_a_number_or_id_are_never_paraphrases(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    first = "What is the capital of country number 1a2b3c4d?"
    second = "What is the capital of country number 9f8e7d6c?"
    vectors = index.embed([first, second])
    assert float(vectors[0] @ vectors[1]) > 0.85  # close enough to fool the embedding alone
    index.add("s", "k-1a2b3c4d", vectors[0], literals_of(first))
    assert index.search("s", vectors[1], 0.85, literals_of(second)) is None
    same = "Which is the capital of country number 1a2b3c4d?"
    match = index.search("s", index.embed([same])[0], 0.85, literals_of(same))
    assert match is not None and match.key == "k-1a2b3c4d"
    assert literals_of("Meet at 3pm on 2026-12-03") == frozenset({"3pm", "2026", "12", "03"})


async def test_a_tenants_threshold_applies_to_its_lookups_only(embedder: Embedder) -> None:
    servicer = CacheServicer(
        MemoryStore(max_bytes=1_000_000),
        semantic=SemanticIndex(embedder),
        tenant_thresholds={"strict": 0.999},
    )
    for tenant in ("strict", "acme"):
        await servicer.Store(
            cache_pb2.StoreRequest(tenant_id=tenant, request=ask(QUESTION), model=MODEL, answer=answer()),
            None,  # type: ignore[arg-type]
        )
    assert (await lookup(servicer, "strict", ask(PARAPHRASE))).status == common_pb2.CACHE_STATUS_MISS
    assert (await lookup(servicer, "acme", ask(PARAPHRASE))).status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
    # The caller's own threshold still wins over its tenant's.
    lenient = ask(PARAPHRASE)
    lenient.cache.semantic_threshold = 0.8
    assert (await lookup(servicer, "strict", lenient)).status == common_pb2.CACHE_STATUS_HIT_SEMANTIC


async def test_the_service_never_answers_a_question_about_another_number(embedder: Embedder) -> None:
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=SemanticIndex(embedder))
    first = "What is the capital of country number 1a2b3c4d?"
    await servicer.Store(
        cache_pb2.StoreRequest(tenant_id="acme", request=ask(first), model=MODEL, answer=answer()),
        None,  # type: ignore[arg-type]
    )
    other = await lookup(servicer, "acme", ask("What is the capital of country number 9f8e7d6c?"))
    assert other.status == common_pb2.CACHE_STATUS_MISS
    same = await lookup(servicer, "acme", ask("Which is the capital of country number 1a2b3c4d?"))
    assert same.status == common_pb2.CACHE_STATUS_HIT_SEMANTIC
