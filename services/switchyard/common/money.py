"""Money: integer micro-USD everywhere, `Decimal` for the arithmetic, never floats.

A price is micro-USD per 1M tokens; a request's cost is the sum over token kinds of
tokens × price / 1M, computed exactly and rounded once, half up, to whole micro-USD.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Final

MICROS_PER_USD: Final = 1_000_000
TOKENS_PER_PRICE_UNIT: Final = 1_000_000


@dataclass(frozen=True, slots=True)
class TokenCounts:
    """Token counts of one request, normalised across vendors.

    `input_tokens` includes `cached_input_tokens`; `output_tokens` includes `reasoning_tokens`.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0
    cache_write_input_tokens: int = 0


@dataclass(frozen=True, slots=True)
class UnitPrices:
    """Prices in micro-USD per 1M tokens."""

    input: int
    output: int
    cached_input: int
    reasoning: int
    cache_write_input: int


def cost_micros(tokens: TokenCounts, prices: UnitPrices) -> int:
    """The exact cost of `tokens` at `prices`, in whole micro-USD (rounded half up once)."""
    uncached = max(0, tokens.input_tokens - tokens.cached_input_tokens - tokens.cache_write_input_tokens)
    visible_output = max(0, tokens.output_tokens - tokens.reasoning_tokens)
    total = (
        uncached * prices.input
        + tokens.cached_input_tokens * prices.cached_input
        + tokens.cache_write_input_tokens * prices.cache_write_input
        + visible_output * prices.output
        + tokens.reasoning_tokens * prices.reasoning
    )
    return int((Decimal(total) / TOKENS_PER_PRICE_UNIT).to_integral_value(rounding=ROUND_HALF_UP))


def format_usd(micros: int) -> str:
    """Micro-USD as a dollar string with six decimals, for people ("$0.000150")."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_USD)
    return f"{sign}${whole}.{frac:06d}"
