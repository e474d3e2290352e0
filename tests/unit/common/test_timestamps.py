"""Timestamps: `set_now` stamps the current wall-clock time, as `GetCurrentTime` would."""

from __future__ import annotations

import time

from google.protobuf import timestamp_pb2

from switchyard.common.timestamps import seconds_of, set_now, timestamp_of


def test_set_now_stamps_the_current_time() -> None:
    stamp = timestamp_pb2.Timestamp()
    before = time.time_ns()
    set_now(stamp)
    after = time.time_ns()
    assert before <= stamp.ToNanoseconds() <= after
    assert 0 <= stamp.nanos < 1_000_000_000


def test_seconds_round_trip() -> None:
    assert abs(seconds_of(timestamp_of(1_700_000_000.25)) - 1_700_000_000.25) < 1e-6
