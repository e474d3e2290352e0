"""In-flight dedup across edge replicas: one upstream call per flight, its chunks shared through Redis.

`RedisDedup` has the interface of `InflightDedup` (`Dedup`) and keeps one in front of Redis:
identical requests in one process still meet in that table without touching Redis, and only
the first of them (the local flight) takes part in the shared protocol below.

Protocol. Keys (`{key}` is a Redis hash tag, so a flight's keys share one slot):

    <prefix>flight:{key}               the flight id of the running flight (PX: the lease)
    <prefix>chunks:{key}:<flight id>   a Stream: the flight's chunks, heartbeats, then one end entry
    <prefix>joined:{key}:<flight id>   how many followers on other replicas are reading it

* Claim (one Lua script, one round trip): if no flight key exists, set it to a new flight id
  with the lease (`SET NX PX`, as a script so that the next step is atomic with it) and lead;
  else increment that flight's `joined` counter and follow it.
* The leader runs `source()` in a task of its own and hands each chunk to its local waiters at
  once; a publisher task appends the chunks to the stream (XADD, pipelined, `MAXLEN ~`, each
  with its sequence number) behind them, so Redis never delays the leader's own stream. Every
  `lease / 3` the publisher renews the lease (only while the flight key still holds its id) and
  adds a heartbeat entry. At the end it adds the end entry — `ok`, or `error` with the
  `SwitchyardError` (code, reason, message, metadata, retry delay) as JSON — and deletes the
  flight key if it is still its own (compare-and-delete in the same script). Chunk streams
  expire `stream_ttl_s` after their last write.
* A follower reads the stream from its start (XREAD BLOCK), yields joiner copies of the chunks
  (`as_joiner`: its own request id, cost 0, the cost as saving, `DEDUPLICATED`) and re-raises an
  equivalent `SwitchyardError` from an error end. The leader charges the one upstream call; the
  ledger never hears of the followers' requests, so the cost is recorded once.

Failures.
* Leader gone: a follower that reads nothing at all (no chunk, no heartbeat) for longer than the
  lease, or an `abandoned` end, or a gap in the sequence numbers (entries trimmed or lost), stops
  following. With nothing yielded yet it claims again (usually leading: the dead leader's key has
  expired by then) or finally runs `source()` itself, so the request still gets its answer; with
  chunks already yielded it raises `UNAVAILABLE` / `STREAM_INTERRUPTED` rather than send text
  twice. Heartbeats are what let a live leader keep its followers through a long wait for the
  first token, and what make "no entry for a lease" mean "the leader is dead".
* Cancellation: a follower that goes away stops reading and decrements `joined`. When the
  leader's local waiters have all gone, the flight is abandoned (upstream closed, an `abandoned`
  end written, the key deleted) only if `joined` is 0, atomically in one script; otherwise it
  runs to completion for the followers. A claim that comes after the abandonment finds no key.
* Redis errors never fail a request: a claim that fails runs `source()` directly (behind the
  local table), logs `dedup_backend_failed` once per outage and skips Redis for
  `failure_cooldown_s`; a publisher that fails stops publishing (its followers then time out as
  above) while the leader's own waiters carry on.

Followers block on XREAD for at most `block_s` at a time (under the client's socket timeout;
0.5 s from `open_redis`), so each blocked follower holds one pooled connection meanwhile.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.edge.dedup import ChunkSource, InflightDedup, as_joiner
from switchyard.v1 import common_pb2

__all__ = ["DEDUP_REDIS_OPTIONS", "RedisDedup", "open_dedup_redis"]

_log = get_logger(__name__)

_REDIS_ERRORS: Final = (RedisError, OSError)
# A follower whose leader vanished claims again at most this often before running source() itself.
_MAX_CLAIMS: Final = 3
_READ_COUNT: Final = 512

DEDUP_REDIS_OPTIONS: Final = RedisOptions(max_connections=256)
"""A larger pool than the default: every following flight holds a connection while it blocks."""

# Stream entry fields.
_SEQ: Final = b"n"
_CHUNK: Final = b"c"
_END: Final = b"end"
_ERROR: Final = b"e"
_OK: Final = "ok"
_FAILED: Final = "error"
_ABANDONED: Final = "abandoned"
_INTERNAL_MESSAGE: Final = "the shared upstream call failed"

# KEYS[1] flight key. ARGV: new flight id, lease ms, joined key prefix, ttl ms.
# Returns {1, id} when the caller leads the new flight, {0, id} when it joined a running one.
_CLAIM_SCRIPT: Final = """
local current = redis.call('GET', KEYS[1])
if not current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1]}
end
local joined = ARGV[3] .. current
redis.call('INCR', joined)
redis.call('PEXPIRE', joined, ARGV[4])
return {0, current}
"""

# KEYS: flight, chunks, joined. ARGV: flight id, lease ms, ttl ms, maxlen.
# Extends the lease while the key is still this flight's; always adds a heartbeat.
_RENEW_SCRIPT: Final = """
local mine = redis.call('GET', KEYS[1]) == ARGV[1]
if mine then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'h', '')
redis.call('PEXPIRE', KEYS[2], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[3])
if mine then return 1 end
return 0
"""

# KEYS: flight, chunks, joined. ARGV: flight id, ttl ms, maxlen, only if nobody joined (0/1),
# outcome, error JSON. Writes the end entry and deletes the flight key if it is still this
# flight's; with ARGV[4] = 1 does nothing (returns 0) while a follower is reading.
_END_SCRIPT: Final = """
if ARGV[4] == '1' and tonumber(redis.call('GET', KEYS[3]) or '0') > 0 then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'end', ARGV[5], 'e', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def open_dedup_redis(url: str) -> Redis:
    """A Redis client sized for `RedisDedup` (see `DEDUP_REDIS_OPTIONS`)."""
    return open_redis(url, options=DEDUP_REDIS_OPTIONS, client_name="switchyard-edge-dedup")


@dataclass(frozen=True, slots=True)
class _FlightKeys:
    flight: str
    chunks: str
    joined: str

    @property
    def all(self) -> list[str]:
        return [self.flight, self.chunks, self.joined]


@dataclass(frozen=True, slots=True)
class _Claim:
    leader: bool
    flight_id: str


@dataclass(slots=True, eq=False)  # identity semantics: leads live in a set
class _Lead:
    """A flight this replica leads: the upstream's chunks, for the local waiters and the publisher."""

    id: str
    keys: _FlightKeys
    chunks: list[common_pb2.ChatChunk] = field(default_factory=list)
    error: BaseException | None = None
    finished: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    upstream: asyncio.Task[None] | None = None
    publisher: asyncio.Task[None] | None = None
    publishing: bool = True  # False once a write failed: the followers will give up on this flight


@dataclass(slots=True)
class _Following:
    yielded: int = 0
    ended: bool = False  # the leader's `ok` end was read


class RedisDedup:
    """In-flight dedup shared by every edge replica using one Redis (see the module docstring).

    `lease_s` bounds how long followers wait on a leader that died; `stream_ttl_s` how long a
    chunk stream outlives its last write; `stream_maxlen` how many entries a stream keeps (a
    longer answer makes late followers fall back, never read a gap). `monotonic` is for tests.
    """

    def __init__(
        self,
        client: Redis,
        *,
        key_prefix: str = "switchyard:dedup:",
        lease_s: float = 10.0,
        stream_ttl_s: float = 60.0,
        stream_maxlen: int = 50_000,
        block_s: float = 0.2,
        failure_cooldown_s: float = 1.0,
        owns_client: bool = False,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if lease_s < 0.05:
            raise ValueError("lease_s must be at least 50 ms")
        if stream_ttl_s < lease_s:
            raise ValueError("stream_ttl_s must be at least lease_s")
        if stream_maxlen < 1:
            raise ValueError("stream_maxlen must be positive")
        if block_s <= 0:
            raise ValueError("block_s must be positive")
        self._client = client
        self._claim_script = client.register_script(_CLAIM_SCRIPT)
        self._renew_script = client.register_script(_RENEW_SCRIPT)
        self._end_script = client.register_script(_END_SCRIPT)
        self._prefix = key_prefix
        self._lease_s = lease_s
        self._lease_ms = max(1, round(lease_s * 1000))
        self._renew_s = lease_s / 3
        self._ttl_ms = round(stream_ttl_s * 1000)
        self._maxlen = stream_maxlen
        # Wake at least a few times per lease, so a dead leader is noticed soon after it expires.
        self._block_ms = max(1, round(min(block_s, lease_s / 4) * 1000))
        self._cooldown_s = failure_cooldown_s
        self._owns_client = owns_client
        self._monotonic = monotonic
        self._local = InflightDedup()
        self._leads: set[_Lead] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._down_until: float | None = None
        self._closing = False
        self.followed = 0
        """Local flights that followed a flight led elsewhere instead of calling upstream."""
        self.backend_failures = 0
        """Redis calls that failed (a counter for metrics)."""

    @property
    def shared(self) -> int:
        """How many requests did not call upstream themselves: joined here or followed (stats/tests)."""
        return self._local.shared + self.followed

    def stream(
        self, key: str, request_id: str, source: ChunkSource
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The chunks of `source()` for the request `request_id`, shared with every identical
        request in flight under `key` on any replica."""

        def shared_source() -> AsyncGenerator[common_pb2.ChatChunk, None]:
            # Only the first request of the local flight gets here, so its request id is the one
            # a followed `done` carries; the local table relabels it for the others.
            return self._shared(key, request_id, source)

        return self._local.stream(key, request_id, shared_source)

    async def aclose(self) -> None:
        """End the flights this replica still leads (followers fall back at once), cancel its
        tasks, and close the client if this table opened it. A second call does nothing."""
        if self._closing:
            return
        self._closing = True
        for lead in list(self._leads):
            if not lead.finished and lead.publishing and not self._down():
                try:
                    await self._end(lead.keys, lead.id, _ABANDONED, "", only_if_alone=False)
                except _REDIS_ERRORS as exc:
                    self._failed(exc)
        await self._local.aclose()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._owns_client:
            await self._client.aclose()

    # --- one local flight ----------------------------------------------------------------------

    async def _shared(
        self, key: str, request_id: str, source: ChunkSource
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        followed = False
        for _ in range(_MAX_CLAIMS):
            claim = await self._claim(key)
            if claim is None:
                break
            keys = self._keys(key, claim.flight_id)
            if claim.leader:
                async with aclosing(self._lead(keys, claim.flight_id, source)) as chunks:
                    async for chunk in chunks:
                        yield chunk
                return
            if not followed:
                followed = True
                self.followed += 1
            following = _Following()
            async with aclosing(self._follow(keys, request_id, following)) as chunks:
                async for chunk in chunks:
                    yield chunk
            if following.ended:
                return
            if following.yielded:
                _log.warning("dedup_leader_lost", flight=claim.flight_id, action="interrupted")
                raise SwitchyardError(
                    grpc.StatusCode.UNAVAILABLE,
                    Reason.STREAM_INTERRUPTED,
                    "the shared upstream call was lost mid-stream; retry the request",
                )
            _log.info("dedup_leader_lost", flight=claim.flight_id, action="claim_again")
        async with aclosing(_direct(source)) as chunks:
            async for chunk in chunks:
                yield chunk

    def _keys(self, key: str, flight_id: str) -> _FlightKeys:
        tag = "{" + key + "}"
        return _FlightKeys(
            flight=f"{self._prefix}flight:{tag}",
            chunks=f"{self._prefix}chunks:{tag}:{flight_id}",
            joined=f"{self._prefix}joined:{tag}:{flight_id}",
        )

    async def _claim(self, key: str) -> _Claim | None:
        """Lead a new flight or join the running one; None: Redis is unusable, go direct."""
        if self._down():
            return None
        tag = "{" + key + "}"
        args: list[str | int] = [
            uuid.uuid4().hex,
            self._lease_ms,
            f"{self._prefix}joined:{tag}:",
            self._ttl_ms,
        ]
        try:
            raw = await self._claim_script(keys=[f"{self._prefix}flight:{tag}"], args=args)
        except _REDIS_ERRORS as exc:
            _raise_if_cancelled()
            self._failed(exc)
            return None
        if not isinstance(raw, list) or len(raw) != 2 or not isinstance(raw[1], bytes):
            self._failed(RedisError("unexpected reply from the dedup claim script"))
            return None
        self._recovered()
        claim = _Claim(leader=int(raw[0]) == 1, flight_id=raw[1].decode())
        if _cancelled() and claim.leader:
            # Cancelled while claiming: give the flight up at once rather than leave its key to expire.
            await self._end(
                self._keys(key, claim.flight_id), claim.flight_id, _ABANDONED, "", only_if_alone=False
            )
        _raise_if_cancelled()
        return claim

    # --- leading -------------------------------------------------------------------------------

    async def _lead(
        self, keys: _FlightKeys, flight_id: str, source: ChunkSource
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        lead = _Lead(flight_id, keys)
        self._leads.add(lead)
        lead.upstream = self._spawn(self._run_upstream(lead, source), f"dedup-upstream-{flight_id[:8]}")
        lead.publisher = self._spawn(self._publish(lead), f"dedup-publish-{flight_id[:8]}")
        position = 0
        try:
            while True:
                while position < len(lead.chunks):
                    chunk = lead.chunks[position]
                    position += 1
                    yield chunk
                if lead.finished:
                    if lead.error is not None:
                        raise lead.error
                    return
                lead.changed.clear()
                await lead.changed.wait()
        finally:
            if not lead.finished:
                await self._leave(lead)

    async def _run_upstream(self, lead: _Lead, source: ChunkSource) -> None:
        chunks = source()
        try:
            async for chunk in chunks:
                lead.chunks.append(chunk)
                lead.changed.set()
        except asyncio.CancelledError:
            lead.error = asyncio.CancelledError()
            raise
        except Exception as exc:  # every waiter, here and on other replicas, gets the same error
            lead.error = exc
        finally:
            closer = getattr(chunks, "aclose", None)
            if closer is not None:
                await closer()
            lead.finished = True
            self._leads.discard(lead)
            lead.changed.set()

    async def _publish(self, lead: _Lead) -> None:
        """Append the lead's chunks to its stream, renew its lease, then write its end."""
        published = 0
        renew_at = self._monotonic() + self._renew_s
        try:
            while True:
                if self._monotonic() >= renew_at:
                    await self._renew_script(
                        keys=lead.keys.all, args=[lead.id, self._lease_ms, self._ttl_ms, self._maxlen]
                    )
                    _raise_if_cancelled()
                    renew_at = self._monotonic() + self._renew_s
                elif published < len(lead.chunks):
                    batch = lead.chunks[published:]
                    await self._append(lead, published, batch)
                    _raise_if_cancelled()
                    published += len(batch)
                elif lead.finished:
                    outcome, error = _encode_end(lead.error)
                    await self._end(lead.keys, lead.id, outcome, error, only_if_alone=False)
                    return
                else:
                    lead.changed.clear()
                    try:
                        await asyncio.wait_for(lead.changed.wait(), renew_at - self._monotonic())
                    except TimeoutError:
                        continue
        except _REDIS_ERRORS as exc:
            _raise_if_cancelled()
            lead.publishing = False
            self._failed(exc)

    async def _append(self, lead: _Lead, first: int, batch: list[common_pb2.ChatChunk]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for seq, chunk in enumerate(batch, start=first):
                pipe.xadd(
                    lead.keys.chunks,
                    {_SEQ: seq, _CHUNK: chunk.SerializeToString()},
                    maxlen=self._maxlen,
                    approximate=True,
                )
            pipe.pexpire(lead.keys.chunks, self._ttl_ms)
            await pipe.execute()

    async def _end(
        self, keys: _FlightKeys, flight_id: str, outcome: str, error: str, *, only_if_alone: bool
    ) -> bool:
        """Write the end entry and release the flight key; False: a follower is reading, nothing done."""
        args: list[str | int] = [flight_id, self._ttl_ms, self._maxlen, int(only_if_alone), outcome, error]
        return bool(await self._end_script(keys=keys.all, args=args))

    async def _leave(self, lead: _Lead) -> None:
        """The lead's local waiters have all gone: abandon the flight unless a follower reads it."""
        abandon = True
        if lead.publishing and not self._closing and not self._down():
            try:
                abandon = await self._end(lead.keys, lead.id, _ABANDONED, "", only_if_alone=True)
            except _REDIS_ERRORS as exc:
                self._failed(exc)
        if abandon:
            for task in (lead.upstream, lead.publisher):
                if task is not None:
                    task.cancel()
        else:
            _log.debug("dedup_flight_kept_for_followers", flight=lead.id)

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- following -----------------------------------------------------------------------------

    async def _follow(
        self, keys: _FlightKeys, request_id: str, following: _Following
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """Yield joiner copies of a flight's chunks; return early (not `ended`) if its leader is gone."""
        last_id: bytes | str = "0-0"
        expected = 0
        seen_at = self._monotonic()
        left = True  # still set in `finally`: the caller went away while reading
        try:
            while True:
                try:
                    reply = await self._client.xread(
                        {keys.chunks: last_id}, count=_READ_COUNT, block=self._block_ms
                    )
                except _REDIS_ERRORS as exc:
                    _raise_if_cancelled()
                    self._failed(exc)
                    reply = None
                    await asyncio.sleep(self._block_ms / 1000)
                _raise_if_cancelled()
                for entry_id, fields in _entries(reply):
                    last_id = entry_id
                    seen_at = self._monotonic()
                    if _END in fields:
                        left = False
                        outcome = fields[_END].decode()
                        if outcome == _OK:
                            following.ended = True
                        elif outcome == _FAILED:
                            following.ended = True
                            raise _decode_error(fields.get(_ERROR, b""))
                        return
                    if _CHUNK not in fields:
                        continue  # a heartbeat: the leader is alive
                    try:
                        if int(fields[_SEQ]) != expected:
                            left = False
                            return  # a gap: entries were trimmed or lost
                        chunk = common_pb2.ChatChunk.FromString(fields[_CHUNK])
                    except (KeyError, ValueError, DecodeError):
                        left = False
                        return
                    expected += 1
                    following.yielded += 1
                    yield as_joiner(chunk, request_id)
                if self._monotonic() - seen_at > self._lease_s:
                    left = False
                    return
        finally:
            if left:
                await self._unjoin(keys)

    async def _unjoin(self, keys: _FlightKeys) -> None:
        """Tell the leader this follower stopped reading (best effort: a missed one only keeps
        the flight running to its end)."""
        try:
            await self._client.decr(keys.joined)
        except _REDIS_ERRORS as exc:
            self._failed(exc)

    # --- Redis health --------------------------------------------------------------------------

    def _down(self) -> bool:
        return self._down_until is not None and self._monotonic() < self._down_until

    def _failed(self, exc: BaseException) -> None:
        self.backend_failures += 1
        if self._down_until is None:
            _log.warning("dedup_backend_failed", error=type(exc).__name__, fallback="direct")
        self._down_until = self._monotonic() + self._cooldown_s

    def _recovered(self) -> None:
        if self._down_until is not None:
            self._down_until = None
            _log.info("dedup_backend_recovered", failures=self.backend_failures)


def _cancelled() -> bool:
    """Whether the current task has been asked to stop (and has not acknowledged it)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _raise_if_cancelled() -> None:
    """Honour a cancellation that a Redis call swallowed.

    redis-py (8.x, Python 3.11) can lose a task's cancellation that lands while a command is in
    flight: the command returns (or fails) normally. The task still counts the request
    (`Task.cancelling()`), so the normal paths check it after each Redis call; cleanup paths,
    which run after a cancellation was delivered, do not.
    """
    if _cancelled():
        raise asyncio.CancelledError()


async def _direct(source: ChunkSource) -> AsyncGenerator[common_pb2.ChatChunk, None]:
    """`source()` on its own, closed when the caller stops early."""
    chunks = source()
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        closer = getattr(chunks, "aclose", None)
        if closer is not None:
            await closer()


def _entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD reply (RESP2: a list of [stream, entries]; RESP3: a map)."""
    if isinstance(reply, dict):
        streams = list(reply.values())
    elif isinstance(reply, list):
        streams = [item[1] for item in reply]
    else:
        return []
    return [(entry_id, fields) for entries in streams for entry_id, fields in entries]


def _encode_end(error: BaseException | None) -> tuple[str, str]:
    """The end entry for a flight that ended with `error` (None: it completed)."""
    if error is None:
        return _OK, ""
    if isinstance(error, asyncio.CancelledError):
        return _ABANDONED, ""
    if isinstance(error, SwitchyardError):
        payload: dict[str, object] = {
            "code": error.code.name,
            "reason": error.reason.value,
            "message": error.message,
            "metadata": error.metadata,
            "retry_after_s": error.retry_after_s,
        }
    else:
        # Anything else is a bug upstream; its text may hold anything, so only the kind travels.
        payload = {"code": "INTERNAL", "reason": Reason.INTERNAL.value, "message": _INTERNAL_MESSAGE}
    return _FAILED, json.dumps(payload)


def _decode_error(raw: bytes) -> SwitchyardError:
    """The `SwitchyardError` a follower raises for the leader's error end."""
    try:
        data = json.loads(raw)
        code = grpc.StatusCode[data["code"]]
        reason = Reason(data["reason"])
        message = str(data["message"])
        metadata = {str(k): str(v) for k, v in (data.get("metadata") or {}).items()}
        retry = data.get("retry_after_s")
        retry_after_s = float(retry) if retry is not None else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return SwitchyardError(grpc.StatusCode.INTERNAL, Reason.INTERNAL, _INTERNAL_MESSAGE)
    return SwitchyardError(code, reason, message, metadata=metadata, retry_after_s=retry_after_s)
