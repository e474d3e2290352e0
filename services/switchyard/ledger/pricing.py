"""What a request costs: the prices in effect at its time, volume discounts, and estimates.

Prices change on dates the catalog states (`Model.price_changes`), so a request is charged at
the prices in effect when it was made, not at today's. A model's prices may carry volume tiers:
once a tenant's month-to-date tokens on the model, before the request, reach a tier's threshold,
the request costs that tier's percentage less (the highest tier reached). A charge is computed
exactly in `Decimal` (tokens x price / 1M, less the discount) and rounded once, half up, to whole
micro-USD, so a discount never compounds a rounding.

Estimates come before the vendor answers: the prompt is counted (`switchyard.ledger.tokens`),
the output is a heuristic for the expected cost and the request's output cap for the worst case
(what a budget reserves). The worst case is an upper bound on the charge, so a hold never falls
short of it: every prompt token at the dearest input price that can apply (a prompt-cache write
can cost more than plain input), the guessed part of the prompt count raised by
`WORST_CASE_MARGIN`, images of unknown size at the largest the vendor bills, and every output
token at the dearer of the output and reasoning prices. A charge is priced when the request
finishes, so the worst case takes the dearest prices in effect at any moment the request may
still be running (`horizon_s` after the estimate), and no volume discount: the tier reached
at admission is gone if the request finishes in the next month.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from fractions import Fraction
from typing import Final

from switchyard.common.catalog import Capability, Model, Prices
from switchyard.common.money import TOKENS_PER_PRICE_UNIT, TokenCounts, UnitPrices
from switchyard.ledger.tokens import PromptCount, count_prompt_tokens
from switchyard.v1 import common_pb2

__all__ = [
    "DEFAULT_HORIZON_S",
    "EXPECTED_OUTPUT_TOKENS",
    "EXPECTED_REASONING_OUTPUT_TOKENS",
    "FINISH_GRACE_S",
    "WORST_CASE_MARGIN",
    "CostEstimate",
    "charge_micros",
    "discount_percent",
    "estimate_cost",
    "exact_cost_micros",
    "prices_at",
    "prices_between",
]

# Expected output when nothing better is known: a typical chat answer is a few hundred tokens;
# a reasoning model also spends hidden reasoning tokens. Capped by the request's output limit.
EXPECTED_OUTPUT_TOKENS: Final = 256
EXPECTED_REASONING_OUTPUT_TOKENS: Final = 1_024
# Added to the guessed part of a prompt count (`PromptCount.approximate_tokens`) in the worst
# case. On English prose the vendor factors' documented spread is within about 10% of the
# vendor's count (Claude 1.1-1.3x cl100k around 1.2, more for code; SentencePiece models 10-20%
# above cl100k against 1.1), and
# tool, schema and image accounting follow published rules up to the vendor's rendering: 25%
# covers more than twice that. Holding too much only holds it until the commit; holding too
# little lets a hard budget be overrun. Check it against the p95 that `GetEstimateAccuracy`
# reports per model (estimated vs the vendor's prompt tokens).
WORST_CASE_MARGIN: Final = Fraction(1, 4)
# How long after its estimate a request may still finish (and be priced): the default generate
# timeout (`Settings.generate_timeout_s`); the edge passes its own. Plus a grace for the moment
# between the deadline cancelling a stream and its record being dated.
DEFAULT_HORIZON_S: Final = 300.0
FINISH_GRACE_S: Final = 60.0

_HUNDRED: Final = Decimal(100)


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at


def prices_at(model: Model, at: datetime) -> Prices:
    """The prices in effect at `at` (naive means UTC): those of the last change whose
    `effective_from` is at or before `at`, else the model's base prices."""
    moment = _utc(at)
    for change in reversed(model.price_changes):
        if change.effective_from <= moment:
            return change.prices
    return model.prices


def prices_between(model: Model, start: datetime, end: datetime) -> tuple[Prices, ...]:
    """Every set of prices in effect at some moment from `start` to `end` (naive means UTC):
    those at `start`, then those of each change up to `end`."""
    first, last = _utc(start), _utc(end)
    found = [prices_at(model, first)]
    found.extend(c.prices for c in model.price_changes if first < c.effective_from <= last)
    return tuple(found)


def discount_percent(prices: Prices, month_tokens: int) -> Decimal:
    """The volume discount for a tenant with `month_tokens` tokens on the model this month before
    the request: the highest tier whose threshold is reached (at or above), else 0."""
    if month_tokens < 0:
        raise ValueError("month_tokens must not be negative")
    percent = Decimal(0)
    for tier in prices.volume_tiers:
        if month_tokens < tier.above_monthly_tokens:
            break
        percent = tier.discount_percent
    return percent


def exact_cost_micros(tokens: TokenCounts, prices: UnitPrices) -> Decimal:
    """The un-rounded cost in micro-USD, by the same rule as `money.cost_micros` (which is this,
    rounded half up): uncached input, cached input, cache writes, visible output, reasoning."""
    uncached = max(0, tokens.input_tokens - tokens.cached_input_tokens - tokens.cache_write_input_tokens)
    visible_output = max(0, tokens.output_tokens - tokens.reasoning_tokens)
    total = (
        uncached * prices.input
        + tokens.cached_input_tokens * prices.cached_input
        + tokens.cache_write_input_tokens * prices.cache_write_input
        + visible_output * prices.output
        + tokens.reasoning_tokens * prices.reasoning
    )
    return Decimal(total) / TOKENS_PER_PRICE_UNIT


def charge_micros(model: Model, tokens: TokenCounts, *, at: datetime, month_tokens: int = 0) -> int:
    """What `tokens` on `model` cost at time `at`, in whole micro-USD: the exact cost at the
    prices then in effect, less the volume discount for `month_tokens`, rounded once half up."""
    prices = prices_at(model, at)
    exact = exact_cost_micros(tokens, prices.unit_prices())
    percent = discount_percent(prices, month_tokens)
    if percent:
        exact = exact * (_HUNDRED - percent) / _HUNDRED
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class CostEstimate:
    """A request's cost before it is sent.

    `expected_cost_micros` prices the prompt at the input price plus `expected_output_tokens`
    (at the reasoning price when a reasoning model's is dearer). `worst_case_cost_micros` is an
    upper bound on the charge: the prompt, its guessed part raised by `WORST_CASE_MARGIN`, all
    at the dearest input price (plain, cached or cache-write), plus the output cap at the
    dearer of the output and reasoning prices; an approximate prompt may leave the model more
    room than `max_output_tokens` (its count may run high), so the cap there is bounded by the
    room the exactly counted part leaves; images of unknown size count at the largest the vendor
    bills (`PromptCount.headroom_tokens`). The expected cost is at the prices in effect at the
    estimate, less the volume tier already reached; the worst case at the dearest prices in
    effect until the request must have finished, with no volume discount.
    """

    model: str
    input_tokens: int
    expected_output_tokens: int
    max_output_tokens: int
    expected_cost_micros: int
    worst_case_cost_micros: int
    encoding: str
    approximate: bool


def output_cap(request: common_pb2.ChatRequest, model: Model) -> int:
    """The most output tokens `request` may be billed on `model`: its `max_output_tokens` (0
    counts as unset), never above the model's own cap."""
    sampling = request.sampling
    requested = sampling.max_output_tokens if sampling.HasField("max_output_tokens") else 0
    return min(requested, model.max_output_tokens) if requested > 0 else model.max_output_tokens


def worst_output_tokens(request: common_pb2.ChatRequest, model: Model, prompt: PromptCount) -> int:
    """The most output tokens the worst case of `request` on `model` covers: its output cap,
    within the room the prompt leaves of the context window counting only its measured part (a
    guessed part may turn out smaller than guessed, leaving more room)."""
    measured = max(0, prompt.window_tokens - _guessed_tokens(prompt))
    return max(0, min(output_cap(request, model), model.context_window - measured))


def _guessed_tokens(prompt: PromptCount) -> int:
    """How many of the prompt's tokens are a guess rather than a count."""
    return prompt.approximate_tokens or (prompt.tokens if prompt.approximate else 0)


def estimate_cost(
    request: common_pb2.ChatRequest,
    model: Model,
    *,
    at: datetime,
    month_tokens: int = 0,
    prompt: PromptCount | None = None,
    horizon_s: float = DEFAULT_HORIZON_S,
) -> CostEstimate:
    """Estimate `request` on `model` at time `at`; pass `prompt` when it is already counted.

    `horizon_s` is the longest the request may run from `at` (its generate timeout): the worst
    case covers a price change up to then (and `FINISH_GRACE_S` after).
    The output cap is the request's `max_output_tokens` (0 counts as unset), else the model's;
    never above the model's own cap nor the room the prompt leaves in the context window (0 when
    there is none: the request cannot fit, which the caller refuses).
    """
    if prompt is None:
        prompt = count_prompt_tokens(request, model)
    input_tokens = prompt.tokens
    # The room left for output is what the prompt leaves of the context window, where images a
    # model bills at a multiple fill only their standard size.
    window = prompt.window_tokens
    limit = output_cap(request, model)
    max_output = max(0, min(limit, model.context_window - window))
    reasoning = Capability.REASONING in model.capabilities
    expected_output = min(
        max_output, EXPECTED_REASONING_OUTPUT_TOKENS if reasoning else EXPECTED_OUTPUT_TOKENS
    )
    guessed = _guessed_tokens(prompt)
    worst_input = input_tokens + math.ceil(guessed * WORST_CASE_MARGIN) + prompt.headroom_tokens
    finished_by = _utc(at) + timedelta(seconds=max(0.0, horizon_s) + FINISH_GRACE_S)
    worst_output = worst_output_tokens(request, model, prompt)
    return CostEstimate(
        model=model.id,
        input_tokens=input_tokens,
        expected_output_tokens=expected_output,
        max_output_tokens=max_output,
        expected_cost_micros=_price_of(model, input_tokens, expected_output, reasoning, at, month_tokens),
        worst_case_cost_micros=max(
            _worst_price_of(prices, worst_input, worst_output)
            for prices in prices_between(model, at, finished_by)
        ),
        encoding=prompt.encoding,
        approximate=prompt.approximate,
    )


def _price_of(
    model: Model, input_tokens: int, output_tokens: int, reasoning: bool, at: datetime, month_tokens: int
) -> int:
    """Input at the full input price; output at the output price, or all of it at the reasoning
    price when the model reasons and that price is higher (we cannot know the split ahead)."""
    unit = prices_at(model, at).unit_prices()
    as_reasoning = reasoning and unit.reasoning > unit.output
    tokens = TokenCounts(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        reasoning_tokens=output_tokens if as_reasoning else 0,
    )
    return charge_micros(model, tokens, at=at, month_tokens=month_tokens)


def _worst_price_of(prices: Prices, input_tokens: int, output_tokens: int) -> int:
    """Every input token at the dearest input price (all of it could be billed as a cache write,
    or, in an odd catalog, as cached) and every output token at the dearer of the output and
    reasoning prices, whether or not the catalog says the model reasons; no volume discount."""
    unit = prices.unit_prices()
    written = cached = 0
    if unit.cache_write_input >= max(unit.input, unit.cached_input):
        written = input_tokens
    elif unit.cached_input > unit.input:
        cached = input_tokens
    tokens = TokenCounts(
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached,
        cache_write_input_tokens=written,
        reasoning_tokens=output_tokens if unit.reasoning > unit.output else 0,
    )
    exact = exact_cost_micros(tokens, unit)
    return int(exact.to_integral_value(rounding=ROUND_HALF_UP))
