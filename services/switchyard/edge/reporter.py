"""The edge's outcome reporter: every attempt's outcome reaches the health monitor, batched,
off the request path.

The pipeline calls `add` (no I/O: an append to a bounded buffer); a background task sends
what gathered every `interval_s` in one `HealthMonitorService.Report` call. Health data is a
statistic, not money: when the monitor cannot be reached the batch is kept and retried with
backoff while the buffer has room, and the oldest outcomes are dropped (and counted) once it
is full, so an edge without a health monitor never grows without bound or slows down.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Mapping
from typing import Final, Protocol

import grpc
from google.protobuf import timestamp_pb2

from switchyard.common.errors import SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.timestamps import set_now
from switchyard.v1 import common_pb2, health_pb2

log = get_logger(__name__)

MAX_BUFFERED: Final = 10_000
MAX_BATCH: Final = 1_000
RETRY_CAP_S: Final = 30.0


class HealthReports(Protocol):
    """What the reporter calls on the health monitor (a `HealthMonitorServiceStub` fits)."""

    def Report(
        self, request: health_pb2.ReportRequest, *, timeout: float | None = None
    ) -> grpc.aio.UnaryUnaryCall[health_pb2.ReportRequest, health_pb2.ReportResponse]: ...


def outcome(
    *,
    provider: str,
    model: str,
    request_id: str,
    error: SwitchyardError | None,
    first_token_s: float | None,
    total_s: float,
    usage: common_pb2.Usage | None = None,
    headroom: common_pb2.RateLimitHeadroom | None = None,
    region: str = "",
    predicted_latency_ms: int = 0,
) -> health_pb2.AttemptOutcome:
    """One attempt's outcome as the health monitor takes it.

    `region` is the reporting edge's, `predicted_latency_ms` the plan's prediction for the
    candidate (0: none), so the monitor keeps latency per region and scores the predictions.
    A failure's rate-limit state comes from its ErrorInfo metadata (`remaining_requests`,
    `remaining_tokens`) and its retry delay; a success's from the adapter's `done` event.
    """
    finished = timestamp_pb2.Timestamp()
    set_now(finished)
    total_ms = max(0, round(total_s * 1000))
    result = health_pb2.AttemptOutcome(
        provider=provider,
        model=model,
        request_id=request_id,
        finished_at=finished,
        success=error is None,
        error_reason=error.reason.value if error is not None else "",
        time_to_first_token_ms=max(0, round(first_token_s * 1000)) if first_token_s is not None else 0,
        total_latency_ms=total_ms,
        region=region,
        predicted_latency_ms=max(0, predicted_latency_ms),
    )
    if usage is not None:
        result.input_tokens = max(0, usage.input_tokens)
        result.output_tokens = max(0, usage.output_tokens)
        generating_s = total_s - (first_token_s or 0.0)
        if usage.output_tokens > 0 and generating_s > 0:
            result.output_tokens_per_second = usage.output_tokens / generating_s
    if headroom is not None and headroom.ByteSize():
        result.headroom.CopyFrom(headroom)
    elif error is not None:
        _headroom_from_error(error.metadata, error.retry_after_s, result.headroom)
    if result.HasField("headroom"):
        result.headroom.observed_at.CopyFrom(finished)
    return result


def _headroom_from_error(
    metadata: Mapping[str, str], retry_after_s: float | None, headroom: common_pb2.RateLimitHeadroom
) -> None:
    for key in ("remaining_requests", "remaining_tokens"):
        value = metadata.get(key, "")
        if value.lstrip("-").isdigit():
            setattr(headroom, key, int(value))
    if retry_after_s:
        headroom.retry_after_ms = max(1, round(retry_after_s * 1000))


class OutcomeReporter:
    """Buffers attempt outcomes and sends them to the health monitor in batches."""

    def __init__(
        self,
        health: HealthReports,
        reporter_id: str,
        *,
        interval_s: float,
        call_timeout_s: float,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        self._health = health
        self._reporter_id = reporter_id
        self._interval_s = interval_s
        self._call_timeout_s = call_timeout_s
        self._buffer: deque[health_pb2.AttemptOutcome] = deque(maxlen=max_buffered)
        self._task: asyncio.Task[None] | None = None
        self._failures = 0
        self.dropped = 0
        self.sent = 0

    def add(self, item: health_pb2.AttemptOutcome) -> None:
        """Queue one outcome; never blocks. The oldest is dropped when the buffer is full."""
        if len(self._buffer) == self._buffer.maxlen:
            self.dropped += 1
        self._buffer.append(item)

    @property
    def pending(self) -> int:
        """Outcomes waiting to be sent."""
        return len(self._buffer)

    def start(self) -> None:
        """Start the sender task."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="outcome-reporter")

    async def aclose(self) -> None:
        """Stop the sender after one last attempt to send what is buffered."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            await self.flush()
        except Exception as exc:  # the last try: what is left is lost with the process
            log.warning("health_report_unsent", pending=len(self._buffer), error=type(exc).__name__)

    async def flush(self) -> int:
        """Send everything buffered now, in batches; how many were accepted. Raises the
        monitor's error, leaving the unsent outcomes buffered."""
        accepted = 0
        while self._buffer:
            batch = [self._buffer.popleft() for _ in range(min(MAX_BATCH, len(self._buffer)))]
            try:
                reply = await self._health.Report(
                    health_pb2.ReportRequest(outcomes=batch, reporter_id=self._reporter_id),
                    timeout=self._call_timeout_s,
                )
            except BaseException:
                room = (self._buffer.maxlen or MAX_BUFFERED) - len(self._buffer)
                keep = batch[-room:] if room > 0 else []
                self.dropped += len(batch) - len(keep)
                self._buffer.extendleft(reversed(keep))
                raise
            accepted += reply.accepted
            self.sent += len(batch)
        return accepted

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s * min(2**self._failures, RETRY_CAP_S / self._interval_s))
            try:
                await self.flush()
            except Exception as exc:  # the monitor down, a closed channel: keep buffering, retry
                self._failures = min(self._failures + 1, 16)
                if self._failures == 1:
                    if isinstance(exc, grpc.aio.AioRpcError):
                        code = exc.code().name
                    else:
                        code = "DEADLINE" if isinstance(exc, TimeoutError) else type(exc).__name__
                    log.warning("health_report_failed", status=code, pending=len(self._buffer))
            else:
                if self._failures:
                    log.info("health_report_resumed", dropped=self.dropped)
                self._failures = 0
