"""The CacheService's erasure of one end user: `Invalidate` with `tenant_id` and `end_user`.

The servicer is called in process on a `MemoryStore` (the store contract for the end-user index
runs on memory and Redis in tests/integration/test_cache_store_redis.py), with the real local
embedder where paraphrases matter.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from switchyard.cache.embed import Embedder, load_local_embedder
from switchyard.cache.keys import cache_key
from switchyard.cache.semantic import SemanticIndex
from switchyard.cache.service import CacheServicer
from switchyard.cache.store import MemoryStore
from switchyard.cache.vectors import IndexedQuestion, RemovedQuestions, VectorFeed, VectorRecord
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import configure_logging, reset_logging
from switchyard.v1 import cache_pb2, common_pb2

MODEL = "openai/gpt-4o-mini"
QUESTION = "What is the capital of France?"
PARAPHRASE = "Which city is the capital of France?"
OTHER = "Give me a recipe for banana bread."


def ask(text: str, *, metadata_end_user: str = "") -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=MODEL)
    request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.sampling.temperature = 0.0
    request.metadata.end_user = metadata_end_user
    return request


def offer(
    text: str, end_user: str = "", *, tenant: str = "acme", metadata_end_user: str = ""
) -> cache_pb2.StoreRequest:
    answer = cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text=f"answer to {text}")],
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=MODEL,
        provider="openai",
        cost_micros=100,
    )
    return cache_pb2.StoreRequest(
        tenant_id=tenant,
        request=ask(text, metadata_end_user=metadata_end_user),
        model=MODEL,
        answer=answer,
        end_user=end_user,
    )


async def store(servicer: CacheServicer, *offers: cache_pb2.StoreRequest) -> None:
    reply = await servicer.StoreMany(cache_pb2.StoreManyRequest(stores=offers), None)  # type: ignore[arg-type]
    assert all(result.admitted for result in reply.results)


async def status(servicer: CacheServicer, text: str, tenant: str = "acme") -> int:
    reply = await servicer.Lookup(
        cache_pb2.LookupRequest(tenant_id=tenant, request=ask(text), model=MODEL),
        None,  # type: ignore[arg-type]
    )
    return reply.status


async def erase(servicer: CacheServicer, tenant: str, end_user: str, **filters: str) -> int:
    request = cache_pb2.InvalidateRequest(tenant_id=tenant, end_user=end_user, **filters)
    reply = await servicer.Invalidate(request, None)  # type: ignore[arg-type]
    return reply.removed


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("test", stream=stream)
    yield stream
    reset_logging()


async def test_an_end_user_needs_the_tenant() -> None:
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000))
    await store(servicer, offer("q1", "alice"))
    with pytest.raises(SwitchyardError) as caught:
        await servicer.Invalidate(cache_pb2.InvalidateRequest(end_user="alice"), None)  # type: ignore[arg-type]
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == "tenant_id"
    # Not even with another filter: an end user is only ever erased within a tenant.
    with pytest.raises(SwitchyardError) as caught:
        await servicer.Invalidate(
            cache_pb2.InvalidateRequest(end_user="alice", model=MODEL),
            None,  # type: ignore[arg-type]
        )
    assert caught.value.metadata["field"] == "tenant_id"
    assert await status(servicer, "q1") == common_pb2.CACHE_STATUS_HIT_EXACT


async def test_invalidate_removes_the_end_users_entries_only_and_counts_them(log_stream: io.StringIO) -> None:
    store_ = MemoryStore(max_bytes=1_000_000)
    servicer = CacheServicer(store_)
    await store(
        servicer,
        offer("q1", "alice"),
        # An older edge that does not fill `end_user`: the request's own metadata counts.
        offer("q2", metadata_end_user="alice"),
        offer("q3", "bob"),
        offer("q4"),
        offer("q5", "alice", tenant="beta"),
    )
    assert await erase(servicer, "acme", "alice") == 2
    assert [await status(servicer, q) for q in ("q1", "q2", "q3", "q4")] == [
        common_pb2.CACHE_STATUS_MISS,
        common_pb2.CACHE_STATUS_MISS,
        common_pb2.CACHE_STATUS_HIT_EXACT,
        common_pb2.CACHE_STATUS_HIT_EXACT,
    ]
    assert await status(servicer, "q5", "beta") == common_pb2.CACHE_STATUS_HIT_EXACT
    assert await erase(servicer, "acme", "alice") == 0  # idempotent
    assert await erase(servicer, "acme", "carol") == 0
    # Other filters narrow it.
    await store(servicer, offer("q6", "bob"))
    assert await erase(servicer, "acme", "bob", key_pattern=cache_key("acme", ask("q6"), MODEL)) == 1
    assert await status(servicer, "q3") == common_pb2.CACHE_STATUS_HIT_EXACT
    assert await erase(servicer, "acme", "bob", model="other/model") == 0
    assert await erase(servicer, "acme", "bob", model=MODEL) == 1
    # The store keeps a keyed hash of the end user, the logs not even that.
    held = await store_.get(cache_key("acme", ask("q4"), MODEL))
    assert held is not None and held.end_user_hash == ""
    events = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.strip()]
    erasures = [e for e in events if e["event"] == "cache_invalidated"]
    assert [e["removed"] for e in erasures] == [2, 0, 0, 1, 0, 1]
    assert "alice" not in log_stream.getvalue() and "bob" not in log_stream.getvalue()


@pytest.fixture(scope="module")
def embedder() -> Iterator[Embedder]:
    loaded = load_local_embedder()
    assert loaded is not None, "the semantic extra is part of the dev install"
    yield loaded


async def test_the_end_users_questions_leave_the_semantic_index(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=index)
    await store(servicer, offer(QUESTION, "alice"), offer(OTHER, "bob"))
    assert len(index) == 2
    assert await status(servicer, PARAPHRASE) == common_pb2.CACHE_STATUS_HIT_SEMANTIC

    assert await erase(servicer, "acme", "alice") == 1
    assert len(index) == 1  # removed at once, not when a lookup stumbles on it
    assert await status(servicer, PARAPHRASE) == common_pb2.CACHE_STATUS_MISS
    assert await status(servicer, QUESTION) == common_pb2.CACHE_STATUS_MISS
    assert await status(servicer, OTHER) == common_pb2.CACHE_STATUS_HIT_EXACT


class RecordingFeed(VectorFeed):
    """The replicas' feed, kept in a list; its purge can be made to fail."""

    def __init__(self) -> None:  # no Redis
        self.records: list[VectorRecord] = []
        self.purges = 0
        self.down = False

    async def publish(self, record: VectorRecord) -> None:
        if self.down:
            raise SwitchyardError(grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE, "down")
        self.records.append(record)

    async def purge_removed(self) -> int:
        if self.down:
            raise SwitchyardError(grpc.StatusCode.UNAVAILABLE, Reason.DEPENDENCY_UNAVAILABLE, "down")
        self.purges += 1
        return 0

    async def history(self) -> list[VectorRecord]:
        return list(self.records)

    def subscribe(self) -> AsyncIterator[VectorRecord]:
        raise NotImplementedError


def questions(feed: RecordingFeed) -> list[IndexedQuestion]:
    return [r for r in feed.records if isinstance(r, IndexedQuestion)]


async def test_an_erasure_sends_every_replica_a_tombstone_and_purges_the_feed(embedder: Embedder) -> None:
    feed = RecordingFeed()
    store_ = MemoryStore(max_bytes=1_000_000)
    servicer = CacheServicer(store_, semantic=SemanticIndex(embedder), vectors=feed)
    await store(servicer, offer(QUESTION, "alice"), offer(OTHER, "bob"))
    alice, bob = questions(feed)
    alice_hash = await store_.end_user_digest("acme", "alice")
    # What the feed carries lets any replica age a question out and erase it.
    assert alice.end_user_hash == alice_hash and bob.end_user_hash not in ("", alice_hash)
    assert alice.expires_at > 0 and alice.key == cache_key("acme", ask(QUESTION), MODEL)

    # Another replica, following the feed.
    other_index = SemanticIndex(embedder)
    other = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=other_index)
    for record in feed.records:
        other.apply(record)
    assert len(other_index) == 2

    assert await erase(servicer, "acme", "alice") == 1
    assert feed.records[-1] == RemovedQuestions((alice.key,), alice_hash) and feed.purges == 1
    other.apply(feed.records[-1])
    assert len(other_index) == 1
    assert other_index.search(bob.scope, other_index.embed([OTHER])[0], 0.9) is not None

    # A replica that starts now: a question its history names in a later tombstone is not indexed.
    late_index = SemanticIndex(embedder)
    late = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=late_index, vectors=feed)
    await late.rebuild_index()
    assert len(late_index) == 1

    # Idempotent: nothing left in the store, the tombstone by hash and the purge all the same.
    assert await erase(servicer, "acme", "alice") == 0
    assert feed.records[-1] == RemovedQuestions((), alice_hash) and feed.purges == 2


async def test_a_narrowed_erasure_names_only_the_keys_it_removed(embedder: Embedder) -> None:
    feed = RecordingFeed()
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=SemanticIndex(embedder), vectors=feed)
    await store(servicer, offer(QUESTION, "alice"), offer(OTHER, "alice"))
    key = cache_key("acme", ask(QUESTION), MODEL)
    assert await erase(servicer, "acme", "alice", key_pattern=key) == 1
    assert feed.records[-1] == RemovedQuestions((key,))
    assert await erase(servicer, "acme", "alice", model="other/model") == 0
    assert feed.records[-1] == RemovedQuestions((key,)) and feed.purges == 2  # nothing to tombstone


async def test_a_feed_that_is_down_is_unavailable_and_erasing_again_finishes(embedder: Embedder) -> None:
    feed = RecordingFeed()
    store_ = MemoryStore(max_bytes=1_000_000)
    servicer = CacheServicer(store_, semantic=SemanticIndex(embedder), vectors=feed)
    await store(servicer, offer(QUESTION, "alice"))
    feed.down = True
    with pytest.raises(SwitchyardError) as caught:
        await erase(servicer, "acme", "alice")
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert await status(servicer, QUESTION) == common_pb2.CACHE_STATUS_MISS  # the store's part is done
    feed.down = False
    assert await erase(servicer, "acme", "alice") == 0
    # The end user's hash finds what the first attempt left on the feed.
    assert feed.records[-1] == RemovedQuestions((), await store_.end_user_digest("acme", "alice"))
    assert feed.purges == 1


async def test_expired_questions_of_the_feed_are_not_indexed(embedder: Embedder) -> None:
    index = SemanticIndex(embedder)
    servicer = CacheServicer(MemoryStore(max_bytes=1_000_000), semantic=index)
    vector = index.embed([QUESTION])[0].tobytes()
    servicer.apply(IndexedQuestion("acme/m/1", "s", frozenset(), vector, expires_at=1.0))
    servicer.apply(IndexedQuestion("acme/m/2", "s", frozenset(), vector))  # expiry unknown
    assert len(index) == 1
