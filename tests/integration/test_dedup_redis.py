"""In-flight dedup contract: the same cases on one process's table and on two replicas sharing Redis.

The `replicas` fixture gives either one `InflightDedup` (every "replica" is the same table: one
process) or two `RedisDedup` tables on separate Redis connections with one key prefix (two edge
processes sharing one Redis). Requests are spread over both, so on Redis every case crosses
replicas. The Redis-only cases at the end cover what only a shared backend has: a leader that
dies, heartbeats through a slow first token, keys released and expiring, and Redis unreachable.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

import grpc
import pytest
from redis.asyncio import Redis

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import configure_logging, reset_logging
from switchyard.common.ports import free_port
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.edge.dedup import InflightDedup, request_key
from switchyard.edge.dedup_redis import RedisDedup
from switchyard.v1 import common_pb2

FAST = RedisOptions(connect_timeout_s=0.2, socket_timeout_s=0.5, pool_timeout_s=0.2)


def chat(text: str = "hello") -> common_pb2.ChatRequest:
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    return common_pb2.ChatRequest(model="openai/gpt-4o-mini", messages=[message])


def new_key(tenant: str = "t", text: str = "hello") -> str:
    """A dedup key no other test uses (the memory table is per test, Redis prefixes too; this is
    belt and braces for keys that outlive a test in Redis)."""
    return request_key(tenant, chat(f"{text} {uuid.uuid4().hex}"))


class Upstream:
    """A stand-in pipeline: counts calls and closes, sends one delta per permit, then `done`."""

    def __init__(self, chunks: int = 3, first_delay_s: float = 0.0) -> None:
        self.calls = 0
        self.closed = 0
        self.chunks = chunks
        self.first_delay_s = first_delay_s
        self.permits = asyncio.Semaphore(0)

    def allow(self, n: int = 100) -> None:
        for _ in range(n):
            self.permits.release()

    async def source(self) -> AsyncIterator[common_pb2.ChatChunk]:
        self.calls += 1
        try:
            await asyncio.sleep(self.first_delay_s)
            for i in range(self.chunks):
                await self.permits.acquire()
                yield common_pb2.ChatChunk(delta=common_pb2.Delta(text=f"t{i} "))
            yield common_pb2.ChatChunk(done=common_pb2.Done(cost_micros=42, request_id="leader"))
        finally:
            self.closed += 1


async def drain(stream: AsyncIterator[common_pb2.ChatChunk]) -> list[common_pb2.ChatChunk]:
    return [chunk async for chunk in stream]


def text(chunks: list[common_pb2.ChatChunk]) -> str:
    return "".join(c.delta.text for c in chunks)


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@dataclass
class Replicas:
    """The tables under test: `replicas[i]` is "replica i" (the same table, in memory)."""

    name: str
    tables: tuple[InflightDedup | RedisDedup, ...]
    inspector: Redis | None = None
    prefix: str = ""

    def __getitem__(self, i: int) -> InflightDedup | RedisDedup:
        return self.tables[i % len(self.tables)]

    @property
    def shared(self) -> int:
        return sum(table.shared for table in self.tables)

    async def flights(self) -> int:
        """Flights still registered: in the local tables, or as flight keys in Redis."""
        if self.inspector is None:
            return sum(len(table) for table in self.tables if isinstance(table, InflightDedup))
        return len([key async for key in self.inspector.scan_iter(match=f"{self.prefix}flight:*")])

    async def idle(self) -> bool:
        return await self.flights() == 0

    async def unfollowed(self) -> bool:
        """Whether no follower is counted as reading a flight (always, in memory: no such thing)."""
        if self.inspector is None:
            return True
        total = 0
        async for key in self.inspector.scan_iter(match=f"{self.prefix}joined:*"):
            total += int(await self.inspector.get(key) or 0)
        return total == 0


@pytest.fixture
async def redis_pair(redis_url: str) -> AsyncIterator[Replicas]:
    prefix = f"test:{uuid.uuid4().hex}:"
    tables = tuple(
        RedisDedup(open_redis(redis_url), key_prefix=prefix, lease_s=1.0, owns_client=True) for _ in range(2)
    )
    inspector = open_redis(redis_url)
    try:
        yield Replicas("redis", tables, inspector, prefix)
    finally:
        for table in tables:
            await table.aclose()
        await inspector.aclose()


# Synchronous so that it may pull the (async) Redis fixtures only for the Redis case.
@pytest.fixture(params=["memory", "redis"])
def replicas(request: pytest.FixtureRequest) -> Iterator[Replicas]:
    if request.param == "memory":
        yield Replicas("memory", (InflightDedup(),))
        return
    pair: Replicas = request.getfixturevalue("redis_pair")
    yield pair
    # Every contract case must have gone through Redis, never the direct fallback.
    assert all(isinstance(t, RedisDedup) and t.backend_failures == 0 for t in pair.tables)


# --- the contract, on both backends ---------------------------------------------------------


async def test_identical_requests_across_replicas_share_one_upstream_call(replicas: Replicas) -> None:
    upstream = Upstream()
    key = new_key()
    n = 10
    tasks = [asyncio.create_task(drain(replicas[i].stream(key, f"r{i}", upstream.source))) for i in range(n)]
    await eventually(lambda: replicas.shared == n - 1)
    upstream.allow()
    results = await asyncio.gather(*tasks)

    assert upstream.calls == 1 and upstream.closed == 1
    assert [text(chunks) for chunks in results] == ["t0 t1 t2 "] * n
    assert all([c.WhichOneof("event") for c in chunks] == ["delta"] * 3 + ["done"] for chunks in results)
    dones = [chunks[-1].done for chunks in results]
    charged = [d for d in dones if d.cost_micros]
    assert len(charged) == 1
    assert (charged[0].cost_micros, charged[0].request_id) == (42, "leader")
    assert charged[0].cache_status != common_pb2.CACHE_STATUS_DEDUPLICATED
    joiners = {i: d for i, d in enumerate(dones) if not d.cost_micros}
    assert len(joiners) == n - 1
    for i, done in joiners.items():
        assert (done.cost_micros, done.saved_micros) == (0, 42)
        assert done.cache_status == common_pb2.CACHE_STATUS_DEDUPLICATED
        assert done.request_id == f"r{i}"

    # A finished flight is forgotten: the next identical request calls upstream again.
    await eventually(replicas.idle)
    await drain(replicas[1].stream(key, "later", upstream.source))
    assert upstream.calls == 2


async def test_a_late_joiner_on_another_replica_replays_what_it_missed(replicas: Replicas) -> None:
    upstream = Upstream(chunks=4)
    key = new_key()
    first = replicas[0].stream(key, "r0", upstream.source)
    upstream.allow(2)
    received = [await anext(first), await anext(first)]
    late = asyncio.create_task(drain(replicas[1].stream(key, "r1", upstream.source)))
    await eventually(lambda: replicas.shared == 1)
    upstream.allow()
    received.extend(await drain(first))
    late_chunks = await late
    assert text(late_chunks) == text(received) == "t0 t1 t2 t3 "
    assert late_chunks[-1].done.request_id == "r1" and late_chunks[-1].done.saved_micros == 42
    assert upstream.calls == 1


async def test_different_tenants_or_requests_are_not_merged(replicas: Replicas) -> None:
    upstream = Upstream()
    upstream.allow()
    keys = [
        request_key("t1", chat("same")),
        request_key("t2", chat("same")),
        request_key("t1", chat("other")),
    ]
    results = await asyncio.gather(
        *(drain(replicas[i].stream(key, f"r{i}", upstream.source)) for i, key in enumerate(keys))
    )
    assert upstream.calls == 3 and replicas.shared == 0
    for chunks in results:
        assert text(chunks) == "t0 t1 t2 "
        assert chunks[-1].done.cost_micros == 42
        assert chunks[-1].done.cache_status != common_pb2.CACHE_STATUS_DEDUPLICATED


async def test_an_error_reaches_every_waiter_on_every_replica(replicas: Replicas) -> None:
    key = new_key()
    fail = asyncio.Event()
    calls = 0

    async def failing() -> AsyncIterator[common_pb2.ChatChunk]:
        nonlocal calls
        calls += 1
        yield common_pb2.ChatChunk(delta=common_pb2.Delta(text="partial"))
        await fail.wait()
        raise SwitchyardError(
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            "the provider is down",
            metadata={"provider": "openai"},
            retry_after_s=1.5,
        )

    async def expect_error(i: int) -> tuple[list[str], SwitchyardError]:
        seen: list[str] = []
        with pytest.raises(SwitchyardError) as info:
            async for chunk in replicas[i].stream(key, f"r{i}", failing):
                seen.append(chunk.delta.text)
        return seen, info.value

    tasks = [asyncio.create_task(expect_error(i)) for i in range(4)]
    await eventually(lambda: replicas.shared == 3)
    fail.set()
    results = await asyncio.gather(*tasks)
    assert calls == 1
    for seen, error in results:
        assert seen == ["partial"]
        assert (error.code, error.reason, error.message) == (
            grpc.StatusCode.UNAVAILABLE,
            Reason.PROVIDER_UNAVAILABLE,
            "the provider is down",
        )
        assert error.metadata == {"provider": "openai"} and error.retry_after_s == 1.5


async def test_waiters_that_leave_do_not_cancel_the_others(replicas: Replicas) -> None:
    upstream = Upstream()
    key = new_key()
    leader = asyncio.create_task(drain(replicas[0].stream(key, "r0", upstream.source)))
    await eventually(lambda: upstream.calls == 1)
    others = [
        asyncio.create_task(drain(replicas[i].stream(key, f"r{i}", upstream.source))) for i in (1, 2, 3)
    ]
    await eventually(lambda: replicas.shared == 3)
    upstream.allow(1)
    await asyncio.sleep(0.05)
    # The leader's own caller and one waiter on the other replica go away.
    leader.cancel()
    others[0].cancel()
    await asyncio.gather(leader, others[0], return_exceptions=True)
    upstream.allow()
    staying = await asyncio.gather(*others[1:])
    assert [text(chunks) for chunks in staying] == ["t0 t1 t2 "] * 2
    assert upstream.calls == 1 and upstream.closed == 1


async def test_the_flight_outlives_its_leader_while_another_replica_follows(replicas: Replicas) -> None:
    upstream = Upstream()
    key = new_key()
    leader = asyncio.create_task(drain(replicas[0].stream(key, "r0", upstream.source)))
    await eventually(lambda: upstream.calls == 1)
    follower = asyncio.create_task(drain(replicas[1].stream(key, "r1", upstream.source)))
    await eventually(lambda: replicas.shared == 1)
    leader.cancel()
    await asyncio.gather(leader, return_exceptions=True)
    await asyncio.sleep(0.05)  # leave time for a (wrong) abandonment to land
    assert upstream.closed == 0
    upstream.allow()
    chunks = await follower
    assert text(chunks) == "t0 t1 t2 " and chunks[-1].done.request_id == "r1"
    assert upstream.calls == 1 and upstream.closed == 1


async def test_the_last_waiter_leaving_closes_the_upstream(replicas: Replicas) -> None:
    upstream = Upstream()
    key = new_key()
    leader = asyncio.create_task(drain(replicas[0].stream(key, "r0", upstream.source)))
    await eventually(lambda: upstream.calls == 1)
    follower = asyncio.create_task(drain(replicas[1].stream(key, "r1", upstream.source)))
    await eventually(lambda: replicas.shared == 1)
    follower.cancel()
    await asyncio.gather(follower, return_exceptions=True)
    await eventually(replicas.unfollowed)
    assert upstream.closed == 0  # the leader's caller is still there
    leader.cancel()
    await asyncio.gather(leader, return_exceptions=True)
    await eventually(lambda: upstream.closed == 1)
    await eventually(replicas.idle)
    # Nothing is left in flight: the next identical request calls upstream afresh.
    upstream.allow()
    chunks = await drain(replicas[1].stream(key, "r2", upstream.source))
    assert text(chunks) == "t0 t1 t2 " and chunks[-1].done.cost_micros == 42
    assert upstream.calls == 2


# --- Redis only -----------------------------------------------------------------------------


class CuttableProxy:
    """A TCP proxy in front of Redis. `cut()` drops its connections and refuses new ones: from
    Redis, what a replica that died looks like (its lease is no longer renewed)."""

    def __init__(self, redis_url: str) -> None:
        parsed = urlparse(redis_url)
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self._cut = False

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection(self._host, self._port)
        self._writers += [writer, up_writer]
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer), return_exceptions=True)

    async def cut(self) -> None:
        self._cut = True
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@pytest.fixture
async def dying_and_survivor(redis_url: str) -> AsyncIterator[tuple[RedisDedup, RedisDedup, CuttableProxy]]:
    """Two replicas with a 0.3 s lease; the first reaches Redis through a proxy the test can cut."""
    prefix = f"test:{uuid.uuid4().hex}:"
    proxy = CuttableProxy(redis_url)
    proxy_url = await proxy.start()
    dying = RedisDedup(open_redis(proxy_url, options=FAST), key_prefix=prefix, lease_s=0.3, owns_client=True)
    survivor = RedisDedup(open_redis(redis_url), key_prefix=prefix, lease_s=0.3, owns_client=True)
    try:
        yield dying, survivor, proxy
    finally:
        await proxy.cut()
        await dying.aclose()
        await survivor.aclose()


async def test_a_follower_that_has_yielded_nothing_survives_its_leader_dying(
    dying_and_survivor: tuple[RedisDedup, RedisDedup, CuttableProxy],
) -> None:
    dying, survivor, proxy = dying_and_survivor
    key = new_key()
    hung, upstream = Upstream(), Upstream()  # the dying replica's upstream never answers
    leader = asyncio.create_task(drain(dying.stream(key, "a", hung.source)))
    await eventually(lambda: hung.calls == 1)
    follower = asyncio.create_task(drain(survivor.stream(key, "b", upstream.source)))
    await eventually(lambda: survivor.followed == 1)

    await proxy.cut()  # the leader's process "dies": no more renewals, no end entry
    leader.cancel()
    await asyncio.gather(leader, return_exceptions=True)
    upstream.allow()
    chunks = await asyncio.wait_for(follower, 5.0)
    # The follower took over: it called upstream itself, so it is the one charged.
    assert text(chunks) == "t0 t1 t2 " and chunks[-1].done.cost_micros == 42
    assert upstream.calls == 1 and survivor.backend_failures == 0


async def test_a_follower_that_has_streamed_is_interrupted_when_its_leader_dies(
    dying_and_survivor: tuple[RedisDedup, RedisDedup, CuttableProxy],
) -> None:
    dying, survivor, proxy = dying_and_survivor
    key = new_key()
    hung, upstream = Upstream(), Upstream()
    hung.allow(1)  # one delta, then nothing
    leader = asyncio.create_task(drain(dying.stream(key, "a", hung.source)))
    await eventually(lambda: hung.calls == 1)
    follower = survivor.stream(key, "b", upstream.source)
    first = await asyncio.wait_for(anext(follower), 5.0)
    assert first.delta.text == "t0 "

    await proxy.cut()
    leader.cancel()
    await asyncio.gather(leader, return_exceptions=True)
    with pytest.raises(SwitchyardError) as info:
        await asyncio.wait_for(anext(follower), 5.0)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.reason == Reason.STREAM_INTERRUPTED
    assert upstream.calls == 0  # never a second copy of text already sent
    await follower.aclose()


async def test_heartbeats_keep_followers_through_a_slow_first_token(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    tables = [
        RedisDedup(open_redis(redis_url), key_prefix=prefix, lease_s=0.3, owns_client=True) for _ in range(2)
    ]
    try:
        upstream = Upstream(first_delay_s=1.0)  # more than three leases before the first chunk
        upstream.allow()
        key = new_key()
        results = await asyncio.gather(
            drain(tables[0].stream(key, "r0", upstream.source)),
            drain(tables[1].stream(key, "r1", upstream.source)),
        )
        assert upstream.calls == 1
        assert [text(chunks) for chunks in results] == ["t0 t1 t2 "] * 2
        assert sorted(chunks[-1].done.cost_micros for chunks in results) == [0, 42]
    finally:
        for table in tables:
            await table.aclose()


async def test_a_leader_shutting_down_lets_its_followers_take_over_at_once(redis_url: str) -> None:
    prefix = f"test:{uuid.uuid4().hex}:"
    leaving = RedisDedup(open_redis(redis_url), key_prefix=prefix, lease_s=10.0, owns_client=True)
    staying = RedisDedup(open_redis(redis_url), key_prefix=prefix, lease_s=10.0, owns_client=True)
    try:
        hung, upstream = Upstream(), Upstream()
        key = new_key()
        leader = asyncio.create_task(drain(leaving.stream(key, "a", hung.source)))
        await eventually(lambda: hung.calls == 1)
        follower = asyncio.create_task(drain(staying.stream(key, "b", upstream.source)))
        await eventually(lambda: staying.followed == 1)
        upstream.allow()
        started = time.monotonic()
        await leaving.aclose()
        chunks = await asyncio.wait_for(follower, 5.0)
        assert time.monotonic() - started < 2.0  # not a 10 s lease
        assert text(chunks) == "t0 t1 t2 " and upstream.calls == 1 and hung.closed == 1
        await asyncio.gather(leader, return_exceptions=True)
    finally:
        await leaving.aclose()
        await staying.aclose()


async def test_a_flight_releases_its_key_and_its_stream_expires(redis_pair: Replicas) -> None:
    upstream = Upstream()
    upstream.allow()
    key = new_key()
    await asyncio.gather(*(drain(redis_pair[i].stream(key, f"r{i}", upstream.source)) for i in range(2)))
    inspector = redis_pair.inspector
    assert inspector is not None
    await eventually(redis_pair.idle)
    streams = [k async for k in inspector.scan_iter(match=f"{redis_pair.prefix}chunks:*")]
    assert len(streams) == 1
    assert 0 < await inspector.pttl(streams[0]) <= 60_000
    entries = await inspector.xrange(streams[0]) or []
    fields = [f for _, f in entries if f is not None]
    assert [f[b"end"] for f in fields if b"end" in f] == [b"ok"]
    assert len([f for f in fields if b"c" in f]) == 4  # three deltas and done


async def test_an_unexpected_error_reaches_followers_without_its_text(redis_pair: Replicas) -> None:
    key = new_key()
    fail = asyncio.Event()
    calls = 0

    async def broken() -> AsyncIterator[common_pb2.ChatChunk]:
        nonlocal calls
        calls += 1
        await fail.wait()
        raise RuntimeError("a prompt fragment that must not travel")
        yield common_pb2.ChatChunk()  # pragma: no cover - makes this an async generator

    leader = asyncio.create_task(drain(redis_pair[0].stream(key, "r0", broken)))
    await eventually(lambda: calls == 1)
    follower = asyncio.create_task(drain(redis_pair[1].stream(key, "r1", broken)))
    await eventually(lambda: redis_pair.shared == 1)
    fail.set()
    with pytest.raises(RuntimeError):
        await leader
    with pytest.raises(SwitchyardError) as info:
        await follower
    assert info.value.code == grpc.StatusCode.INTERNAL and info.value.reason == Reason.INTERNAL
    assert "prompt" not in info.value.message


class SteppedClock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging("test", stream=stream)
    yield stream
    reset_logging()


async def test_unreachable_redis_still_answers_every_request(log_stream: io.StringIO) -> None:
    clock = SteppedClock()
    client = open_redis(f"redis://127.0.0.1:{free_port()}/0", options=FAST)
    table = RedisDedup(client, key_prefix="test:", owns_client=True, monotonic=clock)
    try:
        upstream = Upstream()
        upstream.allow()
        key = new_key()
        results = await asyncio.gather(
            *(drain(table.stream(key, f"r{i}", upstream.source)) for i in range(3))
        )
        assert [text(chunks) for chunks in results] == ["t0 t1 t2 "] * 3
        assert upstream.calls == 1  # identical requests in this process still share one call
        assert table.backend_failures == 1
        # Within the cooldown Redis is not tried; after it, it is (and fails again, quietly).
        assert text(await drain(table.stream(key, "r3", upstream.source))) == "t0 t1 t2 "
        assert table.backend_failures == 1
        clock.now += 1.5
        assert text(await drain(table.stream(key, "r4", upstream.source))) == "t0 t1 t2 "
        assert table.backend_failures == 2 and upstream.calls == 3
    finally:
        await table.aclose()
    events = [json.loads(line) for line in log_stream.getvalue().splitlines() if line.strip()]
    failures = [e for e in events if e["event"] == "dedup_backend_failed"]
    assert len(failures) == 1 and failures[0]["level"] == "warning"
