"""Wall-clock seconds (floats, as `time.time()` gives them) to and from protobuf Timestamps."""

from __future__ import annotations

import math
import time

from google.protobuf import timestamp_pb2


def timestamp_of(seconds: float) -> timestamp_pb2.Timestamp:
    """The Timestamp of `seconds` since the epoch (nanoseconds rounded, never 1e9)."""
    whole = math.floor(seconds)
    nanos = min(999_999_999, int(round((seconds - whole) * 1e9)))
    return timestamp_pb2.Timestamp(seconds=whole, nanos=nanos)


def seconds_of(stamp: timestamp_pb2.Timestamp) -> float:
    """Seconds since the epoch of `stamp` (0.0 for an unset one)."""
    return stamp.seconds + stamp.nanos / 1e9


def set_now(stamp: timestamp_pb2.Timestamp) -> None:
    """Set `stamp` to the current time (what `GetCurrentTime` does, without its datetime
    round trip: this runs several times per request)."""
    stamp.seconds, stamp.nanos = divmod(time.time_ns(), 1_000_000_000)
