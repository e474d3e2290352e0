"""A vendor answer's events on the `Generate` stream: packed per read, unpacked in order.

The adapter sends everything one read of the vendor's body decoded as one
`GenerateResponse`: the first event, the rest in its `then`. A caller sees the events in
order, as if each had been a message of its own, through `unpack` (one message) or
`each_event` (a whole call).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Sequence

from switchyard.v1 import provider_pb2


def pack(events: Sequence[provider_pb2.GenerateResponse]) -> provider_pb2.GenerateResponse:
    """One message carrying `events` (at least one), in order."""
    first = events[0]
    if len(events) > 1:
        first.then.extend(events[1:])
    return first


def unpack(message: provider_pb2.GenerateResponse) -> Sequence[provider_pb2.GenerateResponse]:
    """The events `message` carries, in order: itself, then its `then`."""
    if not message.then:
        return (message,)
    return (message, *message.then)


async def each_event(
    messages: AsyncIterable[provider_pb2.GenerateResponse],
) -> AsyncIterator[provider_pb2.GenerateResponse]:
    """Every event of a `Generate` call, in order."""
    async for message in messages:
        for event in unpack(message):
            yield event
