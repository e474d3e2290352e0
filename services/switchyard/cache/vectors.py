"""Sharing the semantic index between cache replicas.

Each replica keeps its own approximate-nearest-neighbour index (cache/semantic.py). When
replicas share a Redis store, every question one of them indexes is also published on a Redis
stream (`VECTOR_STREAM`, common/redis_stream.py) with its entry key, scope, literals, vector,
expiry and the keyed hash of its end user (cache/store.py; never the id); every replica
follows the stream, so a paraphrase stored through one replica is found through any other,
and a replica that starts rebuilds its index from the stream's history (about the last
`STREAM_MAXLEN` questions) before it serves, skipping expired ones. Entries that have expired
or been evicted since are found missing in the store at lookup and dropped from the index
then, or when their expiry passes.

Erasure. The stream keeps what a replica needs to index a question, words of it included, so
an end user's erasure reaches it too: the erasing replica publishes a tombstone
(`RemovedQuestions`: the removed keys and, for a whole end user, their hash) that every
following replica applies to its index, then `purge_removed` scans the stream newest first, in
pages, and deletes (XDEL) every question older than a tombstone naming its key or its end
user, so a replica that starts later never indexes it. The scan covers every tombstone still
on the stream, so a purge that failed half way is finished by the next one (a retried erasure).

Wire form (field `b` of a stream entry): a header of three little-endian u32. A question is
written `(0, 0, 1)`, then its expiry (f64 wall seconds) and its end user's hash, then the first
form below; a tombstone `(0, 0, 2)`, then the end user's hash and the keys. Questions written
before expiries were shared have the first form alone: the lengths of key, scope and literals
(key and scope never empty), those texts and the vector (float32). Replicas of that time skip
the other two forms as foreign entries (their key is empty).

Without Redis there is one replica and nothing to share: `build_vector_feed` returns None.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final, TypeAlias

import grpc
from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.common.redis_stream import READ_BLOCK_MS, RedisStreamFeed

__all__ = [
    "STREAM_MAXLEN",
    "VECTOR_STREAM",
    "IndexedQuestion",
    "RemovedQuestions",
    "VectorFeed",
    "VectorRecord",
    "build_vector_feed",
    "decode",
    "encode",
]

log = get_logger(__name__)

VECTOR_STREAM: Final = "switchyard:cache:vectors"
# Bounds a new replica's rebuild: indexing 100,000 questions takes about 20 s on 2 cores.
STREAM_MAXLEN: Final = 100_000
# Entries read per XREVRANGE of a purge: about 160 KB with 384-dimension vectors, whose reply
# holds the event loop about 10 ms (a purge of 100,000 entries takes about 5 s, 2 cores).
PURGE_PAGE: Final = 100
_HEADER: Final = struct.Struct("<III")
_LENGTH: Final = struct.Struct("<I")
_EXPIRY: Final = struct.Struct("<d")
_QUESTION: Final = 1
_REMOVED: Final = 2
_LITERAL_SEPARATOR: Final = "\x1e"
_FIELD: Final = b"b"
_OPTIONS: Final = RedisOptions(max_connections=8, socket_timeout_s=READ_BLOCK_MS / 1000 + 2.0)


@dataclass(frozen=True, slots=True)
class IndexedQuestion:
    """What a replica needs to index a stored question: its entry key, scope, literals and
    unit vector (float32 bytes); its entry's expiry (wall seconds, 0 when unknown) and the
    keyed hash of its end user ("" for none), so it can be aged out and erased."""

    key: str
    scope: str
    literals: frozenset[str]
    vector: bytes
    expires_at: float = 0.0
    end_user_hash: str = ""


@dataclass(frozen=True, slots=True)
class RemovedQuestions:
    """A tombstone: the keys of removed entries and, when a whole end user was erased, their
    hash; every replica drops those questions from its index, and a purge from the stream."""

    keys: tuple[str, ...] = ()
    end_user_hash: str = ""


VectorRecord: TypeAlias = IndexedQuestion | RemovedQuestions


def encode(record: VectorRecord) -> bytes:
    """The wire form of a question or a tombstone (module doc)."""
    if isinstance(record, RemovedQuestions):
        return _HEADER.pack(0, 0, _REMOVED) + _texts(record.end_user_hash, *record.keys)
    texts = [
        record.key.encode(),
        record.scope.encode(),
        _LITERAL_SEPARATOR.join(sorted(record.literals)).encode(),
    ]
    plain = _HEADER.pack(*(len(text) for text in texts)) + b"".join(texts) + record.vector
    if not record.expires_at and not record.end_user_hash:
        return plain
    tagged = _HEADER.pack(0, 0, _QUESTION) + _EXPIRY.pack(record.expires_at)
    return tagged + _texts(record.end_user_hash) + plain


def decode(data: bytes) -> VectorRecord:
    """The question or tombstone `encode` wrote (raises ValueError or struct.error on anything
    else)."""
    key_length, scope_length, kind = _HEADER.unpack_from(data)
    if key_length or scope_length:
        return _plain_question(data)
    at = _HEADER.size
    if kind == _QUESTION:
        (expires_at,) = _EXPIRY.unpack_from(data, at)
        (end_user_hash,), at = _read_texts(data, at + _EXPIRY.size, 1)
        plain = _plain_question(data[at:])
        return IndexedQuestion(
            plain.key, plain.scope, plain.literals, plain.vector, expires_at, end_user_hash
        )
    if kind == _REMOVED:
        texts, at = _read_texts(data, at)
        if at != len(data) or not texts:
            raise ValueError("not a tombstone")
        return RemovedQuestions(tuple(texts[1:]), texts[0])
    raise ValueError("not an indexed question")


def _plain_question(data: bytes) -> IndexedQuestion:
    key_length, scope_length, literals_length = _HEADER.unpack_from(data)
    at = _HEADER.size
    key = data[at : at + key_length].decode()
    at += key_length
    scope = data[at : at + scope_length].decode()
    at += scope_length
    joined = data[at : at + literals_length].decode()
    at += literals_length
    vector = data[at:]
    if len(vector) % 4 or not vector or not key or not scope:
        raise ValueError("not an indexed question")
    literals = frozenset(joined.split(_LITERAL_SEPARATOR)) if joined else frozenset()
    return IndexedQuestion(key, scope, literals, vector)


def _texts(*texts: str) -> bytes:
    """Length-prefixed UTF-8 texts."""
    return b"".join(_LENGTH.pack(len(raw)) + raw for raw in (text.encode() for text in texts))


def _read_texts(data: bytes, at: int, count: int | None = None) -> tuple[list[str], int]:
    """`count` length-prefixed texts from `at` (None: up to the end), and where they end."""
    texts: list[str] = []
    while (count is None and at < len(data)) or (count is not None and len(texts) < count):
        (length,) = _LENGTH.unpack_from(data, at)
        at += _LENGTH.size
        if at + length > len(data):
            raise ValueError("a text runs past the end")
        texts.append(data[at : at + length].decode())
        at += length
    return texts, at


class VectorFeed:
    """The replicas' shared stream of indexed questions and tombstones (module doc)."""

    def __init__(
        self,
        client: Redis,
        *,
        stream: str = VECTOR_STREAM,
        maxlen: int = STREAM_MAXLEN,
        page: int = PURGE_PAGE,
    ) -> None:
        self._client = client
        self._stream = stream
        self._page = page
        self._feed: RedisStreamFeed[VectorRecord] = RedisStreamFeed(
            client, stream=stream, maxlen=maxlen, encode=encode, decode=decode, name="cache vectors"
        )
        # One purge at a time per replica: each scans the whole stream.
        self._purging = asyncio.Lock()

    async def publish(self, record: VectorRecord) -> None:
        """Add a question or a tombstone (raises UNAVAILABLE when Redis is)."""
        await self._feed.publish(record)

    async def history(self) -> list[VectorRecord]:
        """What the stream holds, oldest first; `subscribe` goes on from its end."""
        return await self._feed.history()

    def subscribe(self) -> AsyncIterator[VectorRecord]:
        """Every record after the end of `history`."""
        return self._feed.subscribe()

    async def purge_removed(self) -> int:
        """Delete every question older than a tombstone that names it; how many went (raises
        UNAVAILABLE when Redis is down: the next purge finishes the job).

        Pages of `PURGE_PAGE` entries, newest first, each an await: a purge of the whole
        stream (up to `STREAM_MAXLEN` entries) holds the event loop about 10 ms at a time, and
        Redis one page read or one XDEL at a time."""
        async with self._purging:
            try:
                return await self._purge()
            except (RedisError, OSError) as exc:
                log.warning("cache_vectors_purge_failed", error=type(exc).__name__)
                raise SwitchyardError(
                    grpc.StatusCode.UNAVAILABLE,
                    Reason.DEPENDENCY_UNAVAILABLE,
                    "the cache vectors feed is unavailable: erase again to finish",
                    retry_after_s=1.0,
                ) from exc

    async def _purge(self) -> int:
        keys: set[str] = set()
        end_users: set[str] = set()
        deleted = scanned = 0
        upper: bytes | str = "+"
        while True:
            page = _entries(await self._client.xrevrange(self._stream, upper, "-", count=self._page))
            doomed: list[bytes] = []
            for entry_id, fields in page:
                try:
                    record = decode(fields[_FIELD])
                except Exception:  # a foreign or corrupt entry: not ours to delete
                    continue
                if isinstance(record, RemovedQuestions):
                    keys.update(record.keys)
                    if record.end_user_hash:
                        end_users.add(record.end_user_hash)
                elif record.key in keys or (record.end_user_hash and record.end_user_hash in end_users):
                    doomed.append(entry_id)
            scanned += len(page)
            if doomed:
                deleted += int(await self._client.xdel(self._stream, *doomed))
            if len(page) < self._page:
                break
            upper = b"(" + page[-1][0]
        log.info("cache_vectors_purged", scanned=scanned, deleted=deleted)
        return deleted

    async def close(self) -> None:
        """Stop the readers and close the client."""
        await self._feed.close()


def _entries(reply: object) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The (id, fields) pairs of an XREVRANGE reply."""
    return [(entry_id, fields) for entry_id, fields in reply] if isinstance(reply, list) else []


def build_vector_feed(redis_url: str | None) -> VectorFeed | None:
    """The replicas' shared feed of indexed questions, or None without Redis."""
    if not redis_url:
        return None
    client = open_redis(redis_url, options=_OPTIONS, client_name="switchyard-cache-vectors")
    return VectorFeed(client)
