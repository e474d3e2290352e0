"""The commit outbox against a fake ledger on a real SQLite file: durable before sent, sent over
one stream, each commit acknowledged once, nothing lost to a ledger outage or a restart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from switchyard.common.errors import shutting_down
from switchyard.common.sql import Database, open_database
from switchyard.edge import outbox as outbox_module
from switchyard.edge.outbox import CommitOutbox
from switchyard.v1 import ledger_pb2


class FakeStream:
    """One CommitStream call: answers each batch, or fails as told."""

    def __init__(self, ledger: FakeLedger) -> None:
        self.ledger = ledger
        self.cancelled = False
        self.unread_at_cancel = 0
        self._answers: asyncio.Queue[ledger_pb2.CommitManyResponse | object] = asyncio.Queue()
        # The ledger ended this call cleanly (a replica draining): reads say EOF.
        self.ended = False
        self.refused = ledger.refuse_streams > 0  # a draining replica refuses new calls
        ledger.refuse_streams -= self.refused

    def end(self) -> None:
        self.ended = True
        self._answers.put_nowait(grpc.aio.EOF)

    async def write(self, request: ledger_pb2.CommitManyRequest) -> None:
        if self.ended:
            raise asyncio.InvalidStateError("RPC already finished.")
        if self.refused:
            return  # the refusal comes with the read
        if self.ledger.end_on_next_batch:  # arrived after the ledger stopped reading: not charged
            self.ledger.end_on_next_batch = False
            self.end()
            return
        if self.ledger.down or self.cancelled:
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
            )
        results = []
        for commit in request.commits:
            request_id = commit.record.request_id
            duplicate = request_id in self.ledger.charged
            self.ledger.charged.setdefault(request_id, 0)
            self.ledger.charged[request_id] += 0 if duplicate else 1
            results.append(ledger_pb2.CommitResponse(request_id=request_id, duplicate=duplicate))
        self.ledger.batches.append(len(request.commits))
        self._answers.put_nowait(ledger_pb2.CommitManyResponse(results=results))

    async def read(self) -> ledger_pb2.CommitManyResponse | object:
        if self.refused:
            refusal = shutting_down("ledger")
            raise grpc.aio.AioRpcError(
                refusal.code,
                grpc.aio.Metadata(),
                grpc.aio.Metadata(*refusal.trailing_metadata()),
                refusal.message,
            )
        answer = await self._answers.get()
        if self.ledger.lose_answers:  # charged, but the answer never arrives
            self.ledger.lose_answers -= 1
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "cut"
            )
        return answer

    def cancel(self) -> bool:
        self.cancelled = True
        self.unread_at_cancel = self._answers.qsize()  # answers the outbox never read
        return True


class FakeLedger:
    def __init__(self) -> None:
        self.down = False
        self.lose_answers = 0
        # A draining ledger: the next batch arrives on a stream it has stopped reading, and
        # this many new streams are refused as shutting down.
        self.end_on_next_batch = False
        self.refuse_streams = 0
        self.streams: list[FakeStream] = []
        self.batches: list[int] = []
        self.charged: dict[str, int] = {}  # request id -> times charged (exactly once: 1)

    def CommitStream(self) -> FakeStream:
        stream = FakeStream(self)
        self.streams.append(stream)
        return stream


def commit(n: int) -> ledger_pb2.CommitRequest:
    return ledger_pb2.CommitRequest(
        record=ledger_pb2.UsageRecord(request_id=f"req-{n}", scope=ledger_pb2.BudgetScope(tenant_id="acme"))
    )


@pytest.fixture
async def database(tmp_path: Path) -> AsyncIterator[Database]:
    db = await open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    yield db
    await db.close()


async def rows(database: Database) -> int:
    found = await database.fetch_one("SELECT COUNT(*) AS n FROM commit_outbox")
    assert found is not None
    return int(found["n"])


async def test_commits_go_over_one_stream_each_once_and_leave_the_table(database: Database) -> None:
    ledger = FakeLedger()
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    for n in range(5):
        outbox.add(commit(n))
    await outbox.flush(timeout_s=2)
    for n in range(5, 8):
        outbox.add(commit(n))
    await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert ledger.charged == {f"req-{n}": 1 for n in range(8)}
    assert len(ledger.streams) == 1 and sum(ledger.batches) == 8
    assert await rows(database) == 0 and outbox.sent == 8


async def test_commits_are_durable_at_once_and_sent_together(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Light traffic: one commit every few milliseconds. Each is in the table within a batch
    # interval, and the ledger gets them in one send per send interval, not one send each.
    monkeypatch.setattr(outbox_module, "SEND_INTERVAL_S", 1.0)
    ledger = FakeLedger()
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    for n in range(4):
        outbox.add(commit(n))
        for _ in range(100):  # written within a few batch intervals
            await asyncio.sleep(outbox_module.BATCH_INTERVAL_S)
            if await rows(database) == n + 1:
                break
        assert outbox.pending == 0 and await rows(database) == n + 1
    assert ledger.batches == []  # written, not sent yet
    await outbox.flush(timeout_s=2)
    assert ledger.batches == [4] and ledger.charged == {f"req-{n}": 1 for n in range(4)}
    outbox.add(commit(4))
    await outbox.aclose()  # closing sends at once
    assert ledger.batches == [4, 1] and await rows(database) == 0


async def test_a_ledger_outage_keeps_commits_in_the_table_until_it_answers(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "RETRY_BASE_S", 0.01)
    ledger = FakeLedger()
    ledger.down = True
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    for n in range(3):
        outbox.add(commit(n))
    await asyncio.sleep(0.1)
    assert await rows(database) == 3 and ledger.charged == {}  # durable, not sent
    assert all(stream.cancelled for stream in ledger.streams)  # each failed stream dropped
    ledger.down = False
    await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert ledger.charged == {f"req-{n}": 1 for n in range(3)} and await rows(database) == 0


async def test_an_answer_lost_on_the_way_back_is_sent_again_and_charged_once(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "RETRY_BASE_S", 0.01)
    ledger = FakeLedger()
    ledger.lose_answers = 1
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    for n in range(3):
        outbox.add(commit(n))
    await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert sum(ledger.batches) == 6 and len(ledger.streams) == 2  # all sent twice, on a new stream
    assert ledger.charged == {f"req-{n}": 1 for n in range(3)} and await rows(database) == 0


async def test_what_a_stopped_edge_left_is_sent_by_the_next_one(database: Database) -> None:
    ledger = FakeLedger()
    ledger.down = True
    first = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    first.start()
    for n in range(4):
        first.add(commit(n))
    await first.aclose(timeout_s=0.2)  # the ledger is away: the commits stay in the table
    assert await rows(database) == 4 and ledger.charged == {}
    ledger.down = False
    again = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    again.start()  # the same edge back: its rows go first
    await again.flush(timeout_s=2)
    await again.aclose()
    assert ledger.charged == {f"req-{n}": 1 for n in range(4)} and await rows(database) == 0


async def test_what_a_dead_edge_left_is_sent_by_another_once_it_is_orphaned(database: Database) -> None:
    ledger = FakeLedger()
    ledger.down = True
    dead = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    dead.start()
    for n in range(4):
        dead.add(commit(n))
    await dead.aclose(timeout_s=0.2)  # never comes back: its commits stay in the shared table
    assert await rows(database) == 4
    ledger.down = False
    # Another edge, live: rows younger than its orphan delay may still be their edge's to send.
    live = await CommitOutbox.open(database, ledger, "edge-2")  # type: ignore[arg-type]
    live.start()
    live.add(commit(10))
    await live.flush(timeout_s=2)  # its first cycle swept the table too
    await live.aclose()
    assert ledger.charged == {"req-10": 1} and await rows(database) == 4
    # Once they are older than the orphan delay (here a millisecond), another edge sends them.
    adopter = await CommitOutbox.open(database, ledger, "edge-3", orphan_after_s=0.001)  # type: ignore[arg-type]
    adopter.start()
    for _ in range(200):
        if await rows(database) == 0:
            break
        await asyncio.sleep(0.01)
    await adopter.aclose()
    assert ledger.charged == {"req-10": 1, **{f"req-{n}": 1 for n in range(4)}}
    assert await rows(database) == 0


async def test_a_stream_left_idle_is_opened_afresh(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "STREAM_IDLE_S", 0.0)  # every batch finds it idle
    ledger = FakeLedger()
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    for n in range(2):
        outbox.add(commit(n))
        await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert len(ledger.streams) == 2 and ledger.streams[0].cancelled
    assert ledger.charged == {"req-0": 1, "req-1": 1}


async def test_a_stream_past_its_age_is_replaced_between_batches_losing_nothing(database: Database) -> None:
    # Busy, never idle: without an age the stream would stay on the ledger replica it first
    # reached. With it, a batch finds its stream past the age and opens another, after the
    # old one's last answer was read.
    ledger = FakeLedger()
    outbox = await CommitOutbox.open(database, ledger, "edge-1", stream_max_age_s=0.0)  # type: ignore[arg-type]
    outbox.start()
    for n in range(3):
        outbox.add(commit(n))
        await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert len(ledger.streams) >= 3
    assert all(s.cancelled and s.unread_at_cancel == 0 for s in ledger.streams)
    assert ledger.charged == {f"req-{n}": 1 for n in range(3)}
    assert await rows(database) == 0 and outbox.sent == 3


class RecordingLog:
    """Stands in for the module's structlog logger."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def info(self, event: str, **fields: object) -> None:
        self.events.append(("info", event))

    def warning(self, event: str, **fields: object) -> None:
        self.events.append(("warning", event))


@pytest.mark.parametrize("how", ["ended_between_batches", "ended_under_the_batch"])
async def test_a_stream_a_draining_ledger_ended_is_replaced_at_once_and_its_batch_sent_again(
    database: Database, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    # A ledger replica shutting down answers the batch it is committing, then ends the stream:
    # the next batch finds the call over (or arrives unread and gets EOF). It goes out again
    # at once on a new stream -- to another replica, through the proxy -- charged once, and
    # nothing is logged as a failure or waits out a retry.
    log = RecordingLog()
    monkeypatch.setattr(outbox_module, "log", log)
    monkeypatch.setattr(outbox_module, "RETRY_BASE_S", 30.0)  # a retry would outlast the test
    ledger = FakeLedger()
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    outbox.add(commit(0))
    await outbox.flush(timeout_s=2)
    if how == "ended_between_batches":
        ledger.streams[0].end()
    else:
        ledger.end_on_next_batch = True
    for n in range(1, 4):
        outbox.add(commit(n))
    await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert ledger.charged == {f"req-{n}": 1 for n in range(4)} and await rows(database) == 0
    assert len(ledger.streams) == 2 and ledger.batches == [1, 3]
    assert log.events == [("info", "commit_stream_ended")]


async def test_a_ledger_refusing_as_shutting_down_is_retried_without_a_warning(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = RecordingLog()
    monkeypatch.setattr(outbox_module, "log", log)
    monkeypatch.setattr(outbox_module, "RETRY_BASE_S", 0.01)
    ledger = FakeLedger()
    ledger.refuse_streams = 1
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    for n in range(2):
        outbox.add(commit(n))
    await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert ledger.charged == {"req-0": 1, "req-1": 1} and await rows(database) == 0
    assert log.events == [("info", "outbox_send_deferred")]


async def test_a_fresh_stream_ended_at_once_is_not_retried_in_a_loop(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a stream that was already open gets the immediate second try: a new one that ends
    # too means no replica takes the batch now, so the outbox backs off (rows stay).
    log = RecordingLog()
    monkeypatch.setattr(outbox_module, "log", log)
    monkeypatch.setattr(outbox_module, "RETRY_BASE_S", 0.01)
    ledger = FakeLedger()
    ledger.end_on_next_batch = True
    outbox = await CommitOutbox.open(database, ledger, "edge-1")  # type: ignore[arg-type]
    outbox.start()
    outbox.add(commit(0))
    await outbox.flush(timeout_s=2)
    await outbox.aclose()
    assert ledger.charged == {"req-0": 1} and await rows(database) == 0
    assert len(ledger.streams) == 2
    assert log.events == [("info", "outbox_send_deferred")]
