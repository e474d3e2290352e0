"""Frames held for company on a busy edge (`CompanyHold`, `Arrivals`): a lookup or a generation
start waits for the ones of requests on their way, never for nobody.

The far sides are fakes that record each frame written (`Framed.sizes`); every hold here is
60 s, so a frame that waited for nobody would time the test out rather than pass.
"""

from __future__ import annotations

import asyncio

from switchyard.edge.generations import GenerationStreams
from switchyard.edge.mux import Arrivals, CompanyHold
from tests.unit.edge.test_stream_retirement import FakeAdapter, ask, starts, until

LONG_S = 60.0


def test_an_arrival_leaves_each_count_once_and_leaving_takes_what_it_had_not() -> None:
    arrivals = Arrivals()
    first, second = arrivals.arrive(), arrivals.arrive()
    assert (arrivals.lookups, arrivals.starts) == (2, 2)
    first.looked_up()
    first.looked_up()
    assert (arrivals.lookups, arrivals.starts) == (1, 2)
    first.started()
    first.left()
    assert (arrivals.lookups, arrivals.starts) == (1, 1)
    second.left()  # it ended (an error, say) before either step
    second.started()
    assert (arrivals.lookups, arrivals.starts) == (0, 0)


def test_a_hold_lasts_while_someone_is_coming_and_zero_turns_it_off() -> None:
    arrivals = Arrivals()
    hold = CompanyHold(0.005, arrivals, "lookups")
    assert hold() == 0.0
    arrival = arrivals.arrive()
    assert hold() == 0.005
    arrival.looked_up()
    assert hold() == 0.0
    arrivals.arrive()
    assert CompanyHold(0.0, arrivals, "lookups")() == 0.0


async def test_a_start_waits_for_one_on_its_way_and_they_share_a_stream_and_a_message() -> None:
    adapter, arrivals = FakeAdapter(), Arrivals()
    generations = GenerationStreams(
        adapter,  # type: ignore[arg-type]
        streams=2,
        hold=CompanyHold(LONG_S, arrivals, "starts"),
    )
    try:
        # A lone request's start goes at once (and opens the stream).
        arrivals.arrive().started()
        generations.generate(ask(), timeout_s=30)
        await until(lambda: bool(adapter.calls) and starts(adapter.calls[0]) == [1])
        # Its answer is in; the next start goes to the other stream in turn, opening it.
        arrivals.arrive().started()
        generations.generate(ask(), timeout_s=30)
        await until(lambda: len(adapter.calls) == 2 and starts(adapter.calls[1]) == [2])
        # Two requests on their way: the first start (back on the first stream) waits...
        first, second = arrivals.arrive(), arrivals.arrive()
        first.started()
        generations.generate(ask(), timeout_s=30)
        for _ in range(10):
            await asyncio.sleep(0)
        assert starts(adapter.calls[0]) == [1]
        # ... for the second, which joins its frame rather than the next stream in turn.
        second.started()
        generations.generate(ask(), timeout_s=30)
        await until(lambda: starts(adapter.calls[0]) == [1, 3, 4])
        assert len(adapter.calls) == 2 and adapter.framed[0].sizes == [1, 2]
        assert starts(adapter.calls[1]) == [2]
    finally:
        generations.close()


async def test_a_held_start_goes_as_soon_as_the_request_it_waits_for_goes_another_way() -> None:
    adapter, arrivals = FakeAdapter(), Arrivals()
    generations = GenerationStreams(
        adapter,  # type: ignore[arg-type]
        streams=1,
        hold=CompanyHold(LONG_S, arrivals, "starts"),
    )
    try:
        arrivals.arrive().started()
        generations.generate(ask(), timeout_s=30)
        await until(lambda: bool(adapter.calls) and starts(adapter.calls[0]) == [1])
        first, second = arrivals.arrive(), arrivals.arrive()
        first.started()
        generations.generate(ask(), timeout_s=30)
        for _ in range(10):
            await asyncio.sleep(0)
        assert starts(adapter.calls[0]) == [1]  # held for the second request
        second.left()  # a cache hit, say: it will start nothing
        await until(lambda: starts(adapter.calls[0]) == [1, 2])
        assert adapter.framed[0].sizes == [1, 1]
    finally:
        generations.close()
