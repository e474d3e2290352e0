"""A replica's key presence: what the calls following it are sent, and when it says nothing."""

from __future__ import annotations

from switchyard.cache.presence import SEMANTIC_ON, KeyPresence, announcement, fingerprint
from switchyard.v1 import cache_pb2


class Call:
    """A call following the presence: keeps what it is sent, as an edge would read it."""

    def __init__(self) -> None:
        self.ended = False
        self.sent: list[cache_pb2.KeyPresence] = []

    def send(self, response: cache_pb2.LookupStreamResponse) -> None:
        assert response.id == 0 and response.HasField("presence")
        self.sent.append(response.presence)

    @property
    def known(self) -> set[int] | None:
        """The keys an edge would take as present after all it was sent (None: it asks all)."""
        known: set[int] | None = None
        for presence in self.sent:
            if presence.off:
                known = None
            elif presence.complete:
                known = set(presence.keys)
            elif known is not None:
                known.update(presence.keys)
        return known


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


def test_a_fingerprint_is_64_bits_and_names_one_key() -> None:
    a, b = fingerprint("acme/openai%2Fgpt-4o/ab12"), fingerprint("acme/openai%2Fgpt-4o/ab13")
    assert a == fingerprint("acme/openai%2Fgpt-4o/ab12")
    assert a != b
    assert 0 <= a < 2**64 and 0 <= b < 2**64
    assert announcement("acme/m/ab", 1_700_000_000_123) == b"1700000000123:acme/m/ab"


def test_a_call_gets_every_live_key_then_only_the_new_ones() -> None:
    clock = Clock()
    presence = KeyPresence(clock=clock)
    presence.add([(1, 1_010.0), (2, 1_001.0)])
    clock.now = 1_002.0  # key 2 has expired
    call = Call()
    presence.follow(call)
    assert call.sent[0].complete and call.known == {1}  # a snapshot drops what expired
    presence.add([(3, 1_050.0), (1, 1_020.0)])  # 1 is known: only its expiry moves
    assert [list(p.keys) for p in call.sent[1:]] == [[3]]
    presence.add([(2, 1_060.0)])  # stored again after it expired: new to the call
    assert call.known == {1, 2, 3}
    presence.add([(1, 1_030.0)])
    assert len(call.sent) == 3  # nothing new, nothing sent


def test_a_key_the_presence_dropped_as_expired_is_sent_again_when_stored_again() -> None:
    clock = Clock()
    presence = KeyPresence(clock=clock)
    call = Call()
    presence.follow(call)
    presence.add([(7, 1_001.0)])
    clock.now = 1_005.0
    presence.load([])  # a reload prunes 7 (expired), and the call is sent the lot again
    assert call.known == set()
    presence.add([(7, 1_100.0)])
    assert call.known == {7}


def test_with_semantic_matching_on_no_lookup_is_sure_to_miss() -> None:
    presence = KeyPresence(off=SEMANTIC_ON)
    call = Call()
    presence.follow(call)
    presence.add([(1, 2e9)])
    assert [p.off for p in call.sent] == [SEMANTIC_ON]
    assert call.known is None
    assert len(presence) == 0


def test_a_replica_that_lost_its_peers_says_so_until_it_has_reloaded() -> None:
    presence = KeyPresence(down="loading")
    call = Call()
    presence.follow(call)
    assert call.known is None and call.sent[0].off == "loading"
    presence.add([(1, 2e9)])  # kept for later, not sent while down
    assert len(call.sent) == 1
    presence.load([(2, 2e9)])
    assert call.known == {1, 2}
    presence.lost("out of reach")
    presence.lost("out of reach")  # told once
    assert call.known is None and [p.off for p in call.sent[-1:]] == ["out of reach"]
    assert len(call.sent) == 3
    presence.add([(3, 2e9)])
    presence.load([])
    assert call.known == {1, 2, 3}


def test_past_its_bound_the_presence_turns_off_for_good() -> None:
    presence = KeyPresence(max_keys=3)
    call = Call()
    presence.follow(call)
    presence.load([(k, 2e9) for k in range(4)])
    assert call.known is None and "more than" in call.sent[-1].off
    presence.load([(9, 2e9)])
    presence.add([(10, 2e9)])
    assert call.known is None and len(presence) == 0


def test_a_call_that_ended_is_sent_nothing_more() -> None:
    presence = KeyPresence()
    gone, staying = Call(), Call()
    presence.follow(gone)
    presence.follow(staying)
    gone.ended = True
    presence.add([(1, 2e9)])
    assert len(gone.sent) == 1 and staying.known == {1}
