"""The admission controller: slots, priority order under overload, shedding."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.edge.admission import AdmissionController, rank
from switchyard.v1 import common_pb2

LOW = rank(common_pb2.PRIORITY_LOW, "master")
NORMAL_FREE = rank(common_pb2.PRIORITY_NORMAL, "free")
NORMAL_MASTER = rank(common_pb2.PRIORITY_UNSPECIFIED, "master")
HIGH_FREE = rank(common_pb2.PRIORITY_HIGH, "free")


async def hold(
    controller: AdmissionController, request_rank: tuple[int, int], release: asyncio.Event
) -> None:
    async with controller.slot(request_rank):
        await release.wait()


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_rank_orders_request_priority_before_tier() -> None:
    assert HIGH_FREE > NORMAL_MASTER > NORMAL_FREE > LOW
    assert rank(common_pb2.PRIORITY_NORMAL, "unknown-tier") < NORMAL_FREE


async def test_admits_up_to_the_limit_then_queues_by_rank() -> None:
    controller = AdmissionController(2, max_queue=10, queue_timeout_s=5)
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(controller, NORMAL_FREE, release)) for _ in range(2)]
    await settle()
    assert controller.in_flight == 2
    order: list[str] = []

    async def wait(name: str, request_rank: tuple[int, int]) -> None:
        async with controller.slot(request_rank):
            order.append(name)

    waiters = [
        asyncio.create_task(wait("normal-free", NORMAL_FREE)),
        asyncio.create_task(wait("high-free", HIGH_FREE)),
        asyncio.create_task(wait("normal-master", NORMAL_MASTER)),
    ]
    await settle()
    assert controller.queued == 3 and order == []
    release.set()
    await asyncio.gather(*holders, *waiters)
    assert order == ["high-free", "normal-master", "normal-free"]
    assert controller.in_flight == 0 and controller.queued == 0


async def test_low_priority_is_shed_early() -> None:
    controller = AdmissionController(5, max_queue=10, queue_timeout_s=5, shed_low_at=0.6)
    release = asyncio.Event()
    holders = [asyncio.create_task(hold(controller, NORMAL_FREE, release)) for _ in range(3)]
    await settle()
    with pytest.raises(SwitchyardError) as caught:
        async with controller.slot(LOW):
            raise AssertionError("a low-priority request was admitted at 60 % load")
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.OVERLOADED)
    assert error.retry_after_s is not None and error.retry_after_s > 0
    assert error.metadata["shed"] == "low_priority"
    async with controller.slot(NORMAL_FREE):  # normal work still gets the free slots
        assert controller.in_flight == 4
    release.set()
    await asyncio.gather(*holders)
    assert controller.shed == 1


async def test_full_queue_displaces_the_worst_waiter() -> None:
    controller = AdmissionController(1, max_queue=1, queue_timeout_s=5)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(controller, NORMAL_FREE, release))
    await settle()
    worse = asyncio.create_task(hold(controller, NORMAL_FREE, release))
    await settle()
    better = asyncio.create_task(hold(controller, HIGH_FREE, release))
    await settle()
    with pytest.raises(SwitchyardError) as caught:
        await worse
    assert caught.value.metadata["shed"] == "displaced"
    with pytest.raises(SwitchyardError) as refused:  # no one waiting ranks below it
        async with controller.slot(NORMAL_FREE):
            raise AssertionError("admitted past a full queue")
    assert refused.value.metadata["shed"] == "queue_full"
    release.set()
    await asyncio.gather(holder, better)
    assert controller.in_flight == 0


async def test_queue_timeout_and_cancelled_waiters_leak_no_slot() -> None:
    controller = AdmissionController(1, max_queue=5, queue_timeout_s=0.05)
    release = asyncio.Event()
    holder = asyncio.create_task(hold(controller, NORMAL_FREE, release))
    await settle()
    with pytest.raises(SwitchyardError) as caught:
        async with controller.slot(NORMAL_FREE):
            raise AssertionError("admitted while full")
    assert caught.value.metadata["shed"] == "queue_timeout"
    cancelled = asyncio.create_task(hold(controller, NORMAL_FREE, release))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    release.set()
    await holder
    assert controller.in_flight == 0
    async with controller.slot(NORMAL_FREE):
        assert controller.in_flight == 1
