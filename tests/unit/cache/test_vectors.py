"""The wire form of an indexed question on the replicas' shared feed."""

from __future__ import annotations

import struct

import pytest

from switchyard.cache.vectors import IndexedQuestion, build_vector_feed, decode, encode


def test_a_question_round_trips_with_its_literals_and_vector() -> None:
    vector = struct.pack("<4f", 0.5, -0.5, 0.5, -0.5)
    question = IndexedQuestion("acme/m/abc", "scope-1", frozenset({"1234", "3pm"}), vector)
    assert decode(encode(question)) == question
    bare = IndexedQuestion("k", "s", frozenset(), vector)
    assert decode(encode(bare)) == bare


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 12, encode(IndexedQuestion("k", "s", frozenset(), b"\x00" * 4))[:-1]],
    ids=["empty", "no texts", "torn vector"],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises((ValueError, struct.error)):
        decode(data)


def test_without_redis_there_is_nothing_to_share() -> None:
    assert build_vector_feed(None) is None and build_vector_feed("") is None
