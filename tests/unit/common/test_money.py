"""Money is exact: integer micro-USD, one rounding, never floats."""

from __future__ import annotations

import pytest

from switchyard.common.money import TokenCounts, UnitPrices, cost_micros, format_usd

PRICES = UnitPrices(
    input=150_000, output=600_000, cached_input=75_000, reasoning=600_000, cache_write_input=187_500
)


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        (TokenCounts(), 0),
        (TokenCounts(input_tokens=1_000_000), 150_000),
        (TokenCounts(input_tokens=1_000, output_tokens=500), 450),  # 150 + 300
        (TokenCounts(input_tokens=1, output_tokens=1), 1),  # 0.75 micros rounds half up to 1
        (TokenCounts(input_tokens=3), 0),  # 0.45 micros rounds to 0
        (TokenCounts(input_tokens=1_000, cached_input_tokens=400), 120),  # 600*0.15 + 400*0.075
        (TokenCounts(output_tokens=1_000, reasoning_tokens=1_000), 600),
        (TokenCounts(input_tokens=1_000, cache_write_input_tokens=1_000), 188),  # 187.5 half up
    ],
)
def test_cost_micros(tokens: TokenCounts, expected: int) -> None:
    assert cost_micros(tokens, PRICES) == expected


def test_cost_is_an_int_for_huge_counts() -> None:
    value = cost_micros(TokenCounts(input_tokens=10**12, output_tokens=10**12), PRICES)
    assert isinstance(value, int) and value == 750_000_000_000


@pytest.mark.parametrize(
    ("micros", "text"), [(0, "$0.000000"), (150, "$0.000150"), (12_345_678, "$12.345678"), (-5, "-$0.000005")]
)
def test_format_usd(micros: int, text: str) -> None:
    assert format_usd(micros) == text
