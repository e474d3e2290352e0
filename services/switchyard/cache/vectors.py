"""Sharing the semantic index between cache replicas.

Each replica keeps its own approximate-nearest-neighbour index (cache/semantic.py). When
replicas share a Redis store, every question one of them indexes is also published on a Redis
stream (`VECTOR_STREAM`, common/redis_stream.py) with its entry key, scope, literals and
vector; every replica follows the stream, so a paraphrase stored through one replica is found
through any other, and a replica that starts rebuilds its index from the stream's history
(about the last `STREAM_MAXLEN` questions) before it serves. Entries that have expired or
been evicted since are found missing in the store at lookup and dropped from the index then.

Without Redis there is one replica and nothing to share: `build_vector_feed` returns None.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.common.redis_stream import READ_BLOCK_MS, RedisStreamFeed

__all__ = ["STREAM_MAXLEN", "VECTOR_STREAM", "IndexedQuestion", "build_vector_feed", "decode", "encode"]

VECTOR_STREAM: Final = "switchyard:cache:vectors"
# Bounds a new replica's rebuild: indexing 100,000 questions takes about 20 s on 2 cores.
STREAM_MAXLEN: Final = 100_000
_HEADER: Final = struct.Struct("<III")
_LITERAL_SEPARATOR: Final = "\x1e"
_OPTIONS: Final = RedisOptions(max_connections=8, socket_timeout_s=READ_BLOCK_MS / 1000 + 2.0)


@dataclass(frozen=True, slots=True)
class IndexedQuestion:
    """What a replica needs to index a stored question: its entry key, scope, literals and
    unit vector (float32 bytes)."""

    key: str
    scope: str
    literals: frozenset[str]
    vector: bytes


def encode(question: IndexedQuestion) -> bytes:
    """Lengths of the three texts, the texts (UTF-8), then the vector's bytes."""
    texts = [
        question.key.encode(),
        question.scope.encode(),
        _LITERAL_SEPARATOR.join(sorted(question.literals)).encode(),
    ]
    return _HEADER.pack(*(len(text) for text in texts)) + b"".join(texts) + question.vector


def decode(data: bytes) -> IndexedQuestion:
    """The question `encode` wrote (raises ValueError or struct.error on anything else)."""
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


def build_vector_feed(redis_url: str | None) -> RedisStreamFeed[IndexedQuestion] | None:
    """The replicas' shared feed of indexed questions, or None without Redis."""
    if not redis_url:
        return None
    client = open_redis(redis_url, options=_OPTIONS, client_name="switchyard-cache-vectors")
    return RedisStreamFeed(
        client, stream=VECTOR_STREAM, maxlen=STREAM_MAXLEN, encode=encode, decode=decode, name="cache vectors"
    )
