"""A framed call (`LookupFrames`, `GenerateFrames`) over a fake that speaks one item per message."""

from __future__ import annotations

from typing import Any


class Framed:
    """Frames written reach `call` item by item; its answers come back one to a frame."""

    def __init__(self, call: Any, answers: type[Any]) -> None:
        self.call = call
        self._answers = answers
        self.sizes: list[int] = []
        """The number of items of each frame written, in order."""

    async def write(self, frame: Any) -> None:
        self.sizes.append(len(frame.items))
        for item in frame.items:
            await self.call.write(item)

    async def done_writing(self) -> None:
        await self.call.done_writing()

    def __aiter__(self) -> Framed:
        return self

    async def __anext__(self) -> Any:
        return self._answers(items=[await anext(self.call)])

    def cancel(self) -> bool:
        result: bool = self.call.cancel()
        return result
