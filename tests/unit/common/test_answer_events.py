"""Packing a vendor answer's events into `Generate` messages and back keeps them whole and in order."""

from __future__ import annotations

from collections.abc import AsyncIterator

from switchyard.common.answer_events import each_event, pack, unpack
from switchyard.v1 import common_pb2, provider_pb2


def answer() -> list[provider_pb2.GenerateResponse]:
    return [
        provider_pb2.GenerateResponse(delta=common_pb2.Delta(text="Hel")),
        provider_pb2.GenerateResponse(delta=common_pb2.Delta(text="lo")),
        provider_pb2.GenerateResponse(usage=common_pb2.Usage(input_tokens=3, output_tokens=2)),
        provider_pb2.GenerateResponse(done=provider_pb2.GenerateDone(vendor_model="m")),
    ]


def test_one_event_is_sent_as_is() -> None:
    (event,) = answer()[:1]
    message = pack([event])
    assert message is event and not message.then
    assert list(unpack(message)) == [event]


def test_events_packed_together_unpack_in_order() -> None:
    message = pack(answer())
    assert len(message.then) == 3
    wire = provider_pb2.GenerateResponse.FromString(message.SerializeToString())
    unpacked = unpack(wire)
    assert [e.WhichOneof("event") for e in unpacked] == ["delta", "delta", "usage", "done"]
    assert [e.delta.text for e in unpacked[:2]] == ["Hel", "lo"]
    assert unpacked[2].usage.output_tokens == 2 and unpacked[3].done.vendor_model == "m"


async def test_each_event_flattens_a_call() -> None:
    async def call() -> AsyncIterator[provider_pb2.GenerateResponse]:
        events = answer()
        yield pack(events[:1])
        yield pack(events[1:])

    kinds = [e.WhichOneof("event") async for e in each_event(call())]
    assert kinds == ["delta", "delta", "usage", "done"]
