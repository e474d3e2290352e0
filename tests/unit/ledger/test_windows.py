"""Budget windows are UTC calendar days and months: their keys and bounds where the calendar
turns (a year's end, February in a leap year and not), whatever zone the moment is given in."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from switchyard.ledger.service import window_bounds
from switchyard.v1 import ledger_pb2

DAILY = ledger_pb2.BUDGET_WINDOW_DAILY
MONTHLY = ledger_pb2.BUDGET_WINDOW_MONTHLY
TICK = timedelta(microseconds=1)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[arg-type, misc]


@pytest.mark.parametrize(
    ("window", "at", "key", "start", "end"),
    [
        # The year turns: the last instant of Dec 31 and the first of Jan 1 are in different windows.
        (DAILY, utc(2026, 12, 31, 23, 59, 59, 999_999), "2026-12-31", utc(2026, 12, 31), utc(2027, 1, 1)),
        (DAILY, utc(2027, 1, 1), "2027-01-01", utc(2027, 1, 1), utc(2027, 1, 2)),
        (MONTHLY, utc(2026, 12, 31, 23, 59, 59, 999_999), "2026-12", utc(2026, 12, 1), utc(2027, 1, 1)),
        (MONTHLY, utc(2027, 1, 1), "2027-01", utc(2027, 1, 1), utc(2027, 2, 1)),
        # A leap year: Feb 28 is followed by Feb 29, and February ends on Mar 1.
        (DAILY, utc(2028, 2, 28, 23, 59, 59, 999_999), "2028-02-28", utc(2028, 2, 28), utc(2028, 2, 29)),
        (DAILY, utc(2028, 2, 29, 12), "2028-02-29", utc(2028, 2, 29), utc(2028, 3, 1)),
        (DAILY, utc(2028, 3, 1), "2028-03-01", utc(2028, 3, 1), utc(2028, 3, 2)),
        (MONTHLY, utc(2028, 2, 29, 23, 59, 59, 999_999), "2028-02", utc(2028, 2, 1), utc(2028, 3, 1)),
        (MONTHLY, utc(2028, 3, 1), "2028-03", utc(2028, 3, 1), utc(2028, 4, 1)),
        # Not a leap year: Feb 28 runs straight into Mar 1.
        (DAILY, utc(2027, 2, 28, 23, 59), "2027-02-28", utc(2027, 2, 28), utc(2027, 3, 1)),
        (MONTHLY, utc(2027, 2, 28, 23, 59), "2027-02", utc(2027, 2, 1), utc(2027, 3, 1)),
    ],
)
def test_window_bounds_where_the_calendar_turns(
    window: ledger_pb2.BudgetWindow.ValueType, at: datetime, key: str, start: datetime, end: datetime
) -> None:
    assert window_bounds(window, at) == (key, start, end)
    # Half open: the end is the next window's start, and its last instant is still this one.
    assert window_bounds(window, end - TICK)[0] == key
    assert window_bounds(window, end)[0] != key
    assert window_bounds(window, end)[1] == end


def test_a_moment_in_another_zone_is_placed_by_its_utc_time() -> None:
    # 20:00 on Dec 31 in New York (UTC-5) is already Jan 1 in UTC.
    new_york = datetime(2026, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert window_bounds(DAILY, new_york) == ("2027-01-01", utc(2027, 1, 1), utc(2027, 1, 2))
    assert window_bounds(MONTHLY, new_york) == ("2027-01", utc(2027, 1, 1), utc(2027, 2, 1))
    # 00:30 on Mar 1 2028 at UTC+1 is still Feb 29 in UTC.
    paris = datetime(2028, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=1)))
    assert window_bounds(DAILY, paris) == ("2028-02-29", utc(2028, 2, 29), utc(2028, 3, 1))
    assert window_bounds(MONTHLY, paris) == ("2028-02", utc(2028, 2, 1), utc(2028, 3, 1))
