"""The edge's commit outbox: every finished request reaches the ledger exactly once, durably.

The client's last chunk never waits for the ledger. A finished request's commit is put in
a memory buffer (no I/O); a writer task then, in batches:

1. writes the batch to the `commit_outbox` table (one transaction), every few milliseconds
   -- from here on the usage survives this process dying: whichever edge starts next, or
   any live edge once the rows are older than `orphan_after_s`, sends them;
2. sends what it wrote to the ledger on its commit stream, gathered for up to
   `SEND_INTERVAL_S` (each commit is idempotent by request id, so sending a row twice --
   after a crash between the send and the delete, or from two edges picking up the same
   orphan -- charges it once). Fewer, larger sends are what keeps the ledger's cost per
   request low when traffic is light. The stream is replaced when idle or past
   `STREAM_MAX_AGE_S` (between batches, when nothing is on it), so ledger replicas added by
   a scale-out get a share of busy edges' commits too;
3. deletes the rows the ledger acknowledged.

A batch the ledger refuses as invalid (INVALID_ARGUMENT; the edge validates what it commits, so
this takes a bug or a version skew) is sent again one commit at a time, and a commit refused
alone is set aside in the table (`attempts` = -1, logged with its request id) instead of
holding back every commit behind it.

If the ledger is unreachable, rows stay in the table and are retried with backoff; the
edge keeps serving. A ledger shutting down answers the batch it is committing and ends the
stream cleanly: a batch it did not answer is sent again at once on a new stream (through the
proxy, to another replica), and that is logged at info, not as a failure. What is lost if
the process is killed: only the commits still in the memory buffer, at most one batch
interval (a few milliseconds); a graceful stop writes and sends them first. Their budget
holds are then given back by the ledger when the leases' `settle_by` passes, so a lost
commit never leaks budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import grpc

from switchyard.common.errors import is_shutting_down
from switchyard.common.logging import get_logger
from switchyard.common.sql import Database, Migration
from switchyard.edge.mux import STREAM_MAX_AGE_JITTER
from switchyard.v1 import ledger_pb2

log = get_logger(__name__)

COMPONENT: Final = "outbox"
MIGRATIONS: Final = (
    Migration(
        1,
        "commit outbox",
        sqlite=(
            """CREATE TABLE commit_outbox (
                request_id TEXT PRIMARY KEY,
                holder_id TEXT NOT NULL,
                payload BLOB NOT NULL,
                created_at_ms BIGINT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX commit_outbox_created ON commit_outbox (created_at_ms)",
        ),
        postgresql=(
            """CREATE TABLE commit_outbox (
                request_id TEXT PRIMARY KEY,
                holder_id TEXT NOT NULL,
                payload BYTEA NOT NULL,
                created_at_ms BIGINT NOT NULL,
                attempts INTEGER NOT NULL DEFAULT 0
            )""",
            "CREATE INDEX commit_outbox_created ON commit_outbox (created_at_ms)",
        ),
    ),
)

BATCH_SIZE: Final = 256
# The writer wakes at most this often under load, so a batch gathers what arrived meanwhile.
BATCH_INTERVAL_S: Final = 0.005
# Written rows are sent to the ledger once the oldest has waited this long (or a batch is full).
SEND_INTERVAL_S: Final = 0.02
# Rows another edge wrote this long ago are treated as that edge's orphans and sent by us.
ORPHAN_AFTER_S: Final = 60.0
# A commit stream unused this long is opened afresh (a proxy may have ended it for idleness).
STREAM_IDLE_S: Final = 60.0
# ... and one older than this (jittered) too, so a ledger replica added since gets a share.
STREAM_MAX_AGE_S: Final = 30.0
# `attempts` of a row the ledger refused as invalid: kept for an operator, never resent.
REFUSED: Final = -1
RETRY_BASE_S: Final = 0.5
RETRY_CAP_S: Final = 30.0


class CommitCall(Protocol):
    """One open `CommitStream` call."""

    async def write(self, request: ledger_pb2.CommitManyRequest) -> None: ...

    async def read(self) -> ledger_pb2.CommitManyResponse | object: ...

    def cancel(self) -> bool: ...


class LedgerCommits(Protocol):
    """What the outbox calls on the ledger (a `CostLedgerServiceStub` fits)."""

    def CommitStream(self) -> CommitCall: ...


CommitResult = Callable[[ledger_pb2.CommitRequest, ledger_pb2.CommitResponse], None]


class CommitStreamEnded(ConnectionError):
    """The ledger ended the commit stream without answering the batch (a replica shutting
    down does, once the batch it was committing is answered): the batch was not committed."""


class CommitOutbox:
    """Durable, batched, exactly-once delivery of commits from one edge to the ledger."""

    def __init__(
        self,
        db: Database,
        ledger: LedgerCommits,
        holder_id: str,
        *,
        call_timeout_s: float = 5.0,
        on_result: CommitResult | None = None,
        orphan_after_s: float = ORPHAN_AFTER_S,
        stream_max_age_s: float = STREAM_MAX_AGE_S,
    ) -> None:
        self._db = db
        self._ledger = ledger
        self._holder = holder_id
        self._timeout = call_timeout_s
        self._on_result = on_result
        self._orphan_after_ms = int(orphan_after_s * 1000)
        self._buffer: list[ledger_pb2.CommitRequest] = []
        # Written to the table, not yet sent; the oldest was written at `_unsent_since`.
        self._unsent: list[ledger_pb2.CommitRequest] = []
        self._unsent_since = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._failures = 0
        self._next_sweep = 0.0
        # The open CommitStream (a batch on it costs a fraction of a call), or None.
        self._stream: CommitCall | None = None
        self._stream_used = 0.0
        self._stream_retire_at = 0.0
        self._stream_max_age_s = stream_max_age_s
        self.sent = 0
        """Commits the ledger acknowledged (for stats and tests)."""
        self.refused = 0
        """Commits the ledger refused as invalid, set aside in the table."""

    @classmethod
    async def open(
        cls, db: Database, ledger: LedgerCommits, holder_id: str, **options: object
    ) -> CommitOutbox:
        """Migrate the outbox table and return an outbox (call `start` to run it)."""
        await db.migrate(COMPONENT, MIGRATIONS)
        return cls(db, ledger, holder_id, **options)  # type: ignore[arg-type]

    def start(self) -> None:
        """Run the writer; rows left by an earlier run of this edge are sent first."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="commit-outbox")

    def add(self, commit: ledger_pb2.CommitRequest) -> None:
        """Queue one finished request's commit. Never blocks, never raises."""
        self._buffer.append(commit)
        self._wake.set()

    @property
    def pending(self) -> int:
        """Commits not yet written to the table."""
        return len(self._buffer)

    async def _run(self) -> None:
        while True:
            if not self._buffer and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self._idle_for())
            self._wake.clear()
            try:
                await self._cycle()
                self._failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep serving; the rows are safe in the table
                self._failures += 1
                delay = min(RETRY_CAP_S, RETRY_BASE_S * 2 ** min(self._failures - 1, 10))
                if _ledger_going_away(exc):  # a replica draining: not a failure of ours or its
                    log.info("outbox_send_deferred", cause="ledger_shutting_down", retry_in_s=delay)
                else:
                    log.warning("outbox_send_failed", error=type(exc).__name__, retry_in_s=delay)
                if self._closing:
                    return
                await asyncio.sleep(delay)
                self._next_sweep = 0.0
                continue
            if self._closing and not self._buffer and not self._unsent:
                return
            await asyncio.sleep(BATCH_INTERVAL_S)

    def _idle_for(self) -> float:
        """How long the writer may wait for new commits: until the next sweep, or until the
        written rows are due to be sent."""
        now = time.monotonic()
        wait = max(0.05, self._next_sweep - now)
        if self._unsent:
            wait = min(wait, max(0.0, self._unsent_since + SEND_INTERVAL_S - now))
        return wait

    async def _cycle(self) -> None:
        batch, self._buffer = self._buffer[:BATCH_SIZE], self._buffer[BATCH_SIZE:]
        if batch:
            await self._write(batch)
            if not self._unsent:
                self._unsent_since = time.monotonic()
            self._unsent.extend(batch)
        if self._unsent and (
            self._closing
            or len(self._unsent) >= BATCH_SIZE
            or time.monotonic() - self._unsent_since >= SEND_INTERVAL_S
        ):
            # On failure the rows stay in the table and the sweep sends them.
            sending, self._unsent = self._unsent[:BATCH_SIZE], self._unsent[BATCH_SIZE:]
            self._unsent_since = time.monotonic()
            await self._send(sending)
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + (1.0 if self._failures == 0 else RETRY_BASE_S)
            await self._sweep()

    async def _write(self, batch: Sequence[ledger_pb2.CommitRequest]) -> None:
        now = _now_ms()
        rows = [(c.record.request_id, self._holder, c.SerializeToString(), now) for c in batch]
        try:
            # One transaction (for SQLite, one trip to its thread).
            await self._db.executemany(
                "INSERT INTO commit_outbox (request_id, holder_id, payload, created_at_ms)"
                " VALUES (?, ?, ?, ?) ON CONFLICT (request_id) DO NOTHING",
                rows,
            )
        except BaseException:
            self._buffer[:0] = batch  # not durable yet: keep them for the next try
            raise

    async def _send(self, batch: Sequence[ledger_pb2.CommitRequest]) -> None:
        try:
            response = await self._exchange(ledger_pb2.CommitManyRequest(commits=batch))
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
            # One commit the ledger refuses must not hold back the rest for ever: each is sent
            # on its own, and one refused alone is set aside (kept in the table, never resent).
            if len(batch) == 1:
                await self._set_aside(batch[0].record.request_id)
                return
            for commit in batch:
                await self._send([commit])
            return
        done = [c.record.request_id for c in batch]
        await self._forget(done)
        self.sent += len(batch)
        if self._on_result is not None:
            for commit, result in zip(batch, response.results, strict=False):
                self._on_result(commit, result)

    async def _exchange(self, request: ledger_pb2.CommitManyRequest) -> ledger_pb2.CommitManyResponse:
        """One batch and its answer over the stream, opened when needed; on any failure the
        stream is dropped (the next batch opens another) and the failure raised. A stream
        idle or past its age is dropped before the batch: between batches nothing is on it.

        A stream the ledger had ended cleanly (a replica shutting down ends its streams) left
        the batch uncommitted: it is sent once more, at once, on a new stream."""
        now = time.monotonic()
        if self._stream is not None and (
            now >= self._stream_retire_at or now - self._stream_used > STREAM_IDLE_S
        ):
            self._drop_stream()
        reused = self._stream is not None
        try:
            return await self._exchange_once(request)
        except CommitStreamEnded:
            if not reused:
                raise
        log.info("commit_stream_ended", commits=len(request.commits))
        return await self._exchange_once(request)

    async def _exchange_once(self, request: ledger_pb2.CommitManyRequest) -> ledger_pb2.CommitManyResponse:
        now = time.monotonic()
        stream = self._stream
        if stream is None:
            stream = self._stream = self._ledger.CommitStream()
            self._stream_retire_at = now + self._stream_max_age_s * random.uniform(
                1.0, 1.0 + STREAM_MAX_AGE_JITTER
            )
        self._stream_used = now
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    await stream.write(request)
                except asyncio.InvalidStateError:
                    pass  # the call had already ended: reading it says how (EOF: cleanly)
                response = await stream.read()
        except BaseException:
            self._drop_stream()
            raise
        if not isinstance(response, ledger_pb2.CommitManyResponse):  # the ledger ended the stream
            self._drop_stream()
            raise CommitStreamEnded("the ledger ended the commit stream without answering the batch")
        return response

    def _drop_stream(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
            self._stream = None

    async def _sweep(self) -> None:
        """Send rows a failed send or an earlier (or dead) edge left in the table."""
        cutoff = _now_ms() - self._orphan_after_ms
        rows = await self._db.fetch_all(
            "SELECT request_id, payload FROM commit_outbox"
            " WHERE (holder_id = ? OR created_at_ms < ?) AND attempts >= 0 ORDER BY created_at_ms LIMIT ?",
            (self._holder, cutoff, BATCH_SIZE),
        )
        pending = {c.record.request_id for c in (*self._buffer, *self._unsent)}
        batch = [
            ledger_pb2.CommitRequest.FromString(bytes(row["payload"]))
            for row in rows
            if row["request_id"] not in pending
        ]
        if batch:
            await self._send(batch)
            if len(rows) == BATCH_SIZE:
                self._next_sweep = 0.0

    async def _set_aside(self, request_id: str) -> None:
        """Keep a commit the ledger refused as invalid in the table for an operator, out of
        every sweep (`attempts` -1): sending it again would be refused again."""
        log.error("outbox_commit_refused", request_id=request_id)
        await self._db.execute(
            "UPDATE commit_outbox SET attempts = ? WHERE request_id = ?", (REFUSED, request_id)
        )
        self.refused += 1

    async def _forget(self, request_ids: Sequence[str]) -> None:
        await self._db.executemany(
            "DELETE FROM commit_outbox WHERE request_id = ?", [(r,) for r in request_ids]
        )

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until every queued commit has been acknowledged (or `timeout_s` passes)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._buffer:
                left = await self._db.fetch_one(
                    "SELECT COUNT(*) AS n FROM commit_outbox WHERE holder_id = ? AND attempts >= 0",
                    (self._holder,),
                )
                if left is None or int(left["n"]) == 0:
                    return
                self._next_sweep = 0.0
            self._wake.set()
            await asyncio.sleep(0.01)

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Write what is buffered, try once to send it, and stop."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), timeout=timeout_s)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
            except Exception as exc:
                log.warning("outbox_close_failed", error=type(exc).__name__)
        if self._buffer:  # the writer could not take them: make them durable at least
            batch, self._buffer = self._buffer, []
            with contextlib.suppress(Exception):
                await self._write(batch)
        self._drop_stream()


def _now_ms() -> int:
    return int(time.time() * 1000)


def _ledger_going_away(exc: Exception) -> bool:
    """Whether a send failed because the ledger replica is shutting down (it ended the stream,
    or refused a new one as shutting down) rather than because it failed."""
    if isinstance(exc, CommitStreamEnded):
        return True
    return isinstance(exc, grpc.aio.AioRpcError) and is_shutting_down(exc)
