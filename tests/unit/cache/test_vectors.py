"""The wire form of indexed questions and tombstones on the replicas' shared feed."""

from __future__ import annotations

import struct

import pytest

from switchyard.cache.vectors import IndexedQuestion, RemovedQuestions, build_vector_feed, decode, encode


def test_a_question_round_trips_with_its_literals_and_vector() -> None:
    vector = struct.pack("<4f", 0.5, -0.5, 0.5, -0.5)
    question = IndexedQuestion("acme/m/abc", "scope-1", frozenset({"1234", "3pm"}), vector)
    assert decode(encode(question)) == question
    bare = IndexedQuestion("k", "s", frozenset(), vector)
    assert decode(encode(bare)) == bare


def test_a_question_with_its_expiry_and_end_user_round_trips() -> None:
    vector = struct.pack("<4f", 0.5, -0.5, 0.5, -0.5)
    question = IndexedQuestion("acme/m/abc", "scope-1", frozenset({"3pm"}), vector, 1_700_000_300.5, "h" * 64)
    assert decode(encode(question)) == question
    anonymous = IndexedQuestion("acme/m/abc", "scope-1", frozenset(), vector, expires_at=1_700_000_300.0)
    assert decode(encode(anonymous)) == anonymous


@pytest.mark.parametrize(
    "tombstone",
    [
        RemovedQuestions(("acme/m/1", "acme/m/ü"), "h" * 64),
        RemovedQuestions(("acme/m/1",)),
        RemovedQuestions((), "h" * 64),
    ],
    ids=["keys and end user", "keys", "end user"],
)
def test_a_tombstone_round_trips(tombstone: RemovedQuestions) -> None:
    assert decode(encode(tombstone)) == tombstone


def legacy_decode(data: bytes) -> IndexedQuestion:
    """What a replica from before expiries and tombstones decodes (its `decode`)."""
    key_length, scope_length, literals_length = struct.unpack_from("<III", data)
    at = 12
    key = data[at : at + key_length].decode()
    at += key_length
    scope = data[at : at + scope_length].decode()
    at += scope_length
    joined = data[at : at + literals_length].decode()
    at += literals_length
    vector = data[at:]
    if len(vector) % 4 or not vector or not key or not scope:
        raise ValueError("not an indexed question")
    literals = frozenset(joined.split("\x1e")) if joined else frozenset()
    return IndexedQuestion(key, scope, literals, vector)


def test_replicas_of_the_first_form_skip_the_new_ones_and_theirs_still_decode() -> None:
    vector = b"\x00" * 16
    for record in (
        IndexedQuestion("acme/m/abc", "scope-1", frozenset(), vector, 1_700_000_300.0, "h"),
        RemovedQuestions(("acme/m/abc",), "h"),
    ):
        with pytest.raises((ValueError, struct.error)):
            legacy_decode(encode(record))
    old = IndexedQuestion("acme/m/abc", "scope-1", frozenset({"1234"}), vector)
    assert legacy_decode(encode(old)) == old
    assert decode(encode(old)) == old


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 12,
        encode(IndexedQuestion("k", "s", frozenset(), b"\x00" * 4))[:-1],
        encode(IndexedQuestion("k", "s", frozenset(), b"\x00" * 4, 1.0, "h"))[:-1],
        encode(RemovedQuestions(("acme/m/1",), "h"))[:-1],
        struct.pack("<III", 0, 0, 9),
    ],
    ids=["empty", "no texts", "torn vector", "torn tagged vector", "torn tombstone", "unknown kind"],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises((ValueError, struct.error)):
        decode(data)


def test_without_redis_there_is_nothing_to_share() -> None:
    assert build_vector_feed(None) is None and build_vector_feed("") is None
