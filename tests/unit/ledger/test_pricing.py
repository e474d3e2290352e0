"""Charges and estimates: prices by effective date, volume tiers, one half-up rounding, the
worst case a budget reserves, and the catalog's checks on price changes and tiers."""

from __future__ import annotations

import base64
import itertools
import math
import random
import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from fractions import Fraction

import pytest

from switchyard.common.catalog import CatalogError, Model, PriceChange, Prices, load_catalog, parse_catalog
from switchyard.common.money import TokenCounts, cost_micros
from switchyard.ledger.pricing import (
    DEFAULT_HORIZON_S,
    EXPECTED_OUTPUT_TOKENS,
    EXPECTED_REASONING_OUTPUT_TOKENS,
    FINISH_GRACE_S,
    WORST_CASE_MARGIN,
    charge_micros,
    discount_percent,
    estimate_cost,
    prices_at,
    prices_between,
    worst_output_tokens,
)
from switchyard.ledger.tokens import PromptCount, count_prompt_tokens
from switchyard.v1 import common_pb2

CATALOG = """\
providers:
  openai:
    vendor: openai
    base_url: https://api.openai.com/v1
  anthropic:
    vendor: anthropic
    base_url: https://api.anthropic.com
models:
  - id: openai/gpt-4o-mini
    provider: openai
    upstream_model: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    prices:
      input: "1.00"
      output: "4.00"
      cached_input: "0.50"
      volume_tiers:
        - {above_monthly_tokens: 1000, discount_percent: "10"}
        - {above_monthly_tokens: 5000, discount_percent: 25.5}
    price_changes:
      - effective_from: 2026-12-01
        prices: {input: "2.50", output: "8.00"}
      - effective_from: "2027-01-01T12:00:00+02:00"
        prices:
          input: "5.00"
          output: "20.00"
          volume_tiers: [{above_monthly_tokens: 100, discount_percent: "80"}]
  - id: openai/o4-mini
    provider: openai
    upstream_model: o4-mini
    context_window: 1000
    max_output_tokens: 600
    prices: {input: "1.10", output: "4.40", reasoning: "8.80"}
    capabilities: [reasoning, streaming]
    category: reasoning
  - id: anthropic/claude
    provider: anthropic
    upstream_model: claude-sonnet-4
    context_window: 200000
    max_output_tokens: 64000
    prices: {input: "3", output: "15", cached_input: "0.30", cache_write_input: "3.75"}
"""

CHANGE_1 = datetime(2026, 12, 1, tzinfo=UTC)
CHANGE_2 = datetime(2027, 1, 1, 10, 0, tzinfo=UTC)  # 12:00 at +02:00
BEFORE = datetime(2026, 6, 1, tzinfo=UTC)
TICK = timedelta(microseconds=1)


@pytest.fixture(scope="module")
def mini() -> Model:
    found = parse_catalog(CATALOG).model("openai/gpt-4o-mini")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def claude() -> Model:
    found = parse_catalog(CATALOG).model("anthropic/claude")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def reasoner() -> Model:
    found = parse_catalog(CATALOG).model("openai/o4-mini")
    assert found is not None
    return found


# --------------------------------------------------------------------------- #
# Effective dates
# --------------------------------------------------------------------------- #


def test_changes_are_parsed_as_aware_utc(mini: Model) -> None:
    assert [c.effective_from for c in mini.price_changes] == [CHANGE_1, CHANGE_2]
    assert all(c.effective_from.tzinfo is UTC for c in mini.price_changes)


def test_a_price_change_takes_effect_exactly_at_its_timestamp(mini: Model) -> None:
    assert prices_at(mini, BEFORE).input == 1_000_000
    assert prices_at(mini, CHANGE_1 - TICK).input == 1_000_000
    assert prices_at(mini, CHANGE_1).input == 2_500_000
    assert prices_at(mini, CHANGE_2 - TICK).input == 2_500_000
    assert prices_at(mini, CHANGE_2).input == 5_000_000
    assert prices_at(mini, datetime(2030, 1, 1, tzinfo=UTC)).input == 5_000_000
    # The same instant in another zone, and a naive time taken as UTC.
    assert prices_at(mini, CHANGE_2.astimezone(timezone(timedelta(hours=-5)))).input == 5_000_000
    assert prices_at(mini, datetime(2026, 12, 1)).input == 2_500_000
    assert prices_at(mini, datetime(2026, 11, 30, 23, 59, 59)).input == 1_000_000


def test_charge_uses_the_prices_at_the_request_time(mini: Model) -> None:
    tokens = TokenCounts(input_tokens=1_000, output_tokens=500)
    assert charge_micros(mini, tokens, at=CHANGE_1 - TICK) == 1_000 + 2_000
    assert charge_micros(mini, tokens, at=CHANGE_1) == 2_500 + 4_000


# --------------------------------------------------------------------------- #
# Exact money
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("tokens", "month_tokens", "at", "expected"),
    [
        # Base prices: $1/M input, $4/M output, $0.50/M cached input; tiers 10% at 1,000, 25.5% at 5,000.
        (TokenCounts(input_tokens=1_000, output_tokens=250), 0, BEFORE, 2_000),
        (TokenCounts(input_tokens=1_000, cached_input_tokens=600), 0, BEFORE, 700),  # 400 + 300
        (TokenCounts(input_tokens=1, cached_input_tokens=1), 0, BEFORE, 1),  # 0.5 rounds half up
        (TokenCounts(input_tokens=3, cached_input_tokens=3), 0, BEFORE, 2),  # 1.5 -> 2
        (TokenCounts(input_tokens=2, cached_input_tokens=2), 0, BEFORE, 1),  # exactly 1
        # 10% off: 5 micros -> 4.5 -> 5 and 15 -> 13.5 -> 14 (half up after the discount).
        (TokenCounts(input_tokens=5), 1_000, BEFORE, 5),
        (TokenCounts(input_tokens=15), 1_000, BEFORE, 14),
        # Rounded once: 1.5 x 0.9 = 1.35 -> 1 (rounding before the discount would give 2 x 0.9 -> 2).
        (TokenCounts(input_tokens=3, cached_input_tokens=3), 1_000, BEFORE, 1),
        # 25.5% off: 1M input tokens = 745,000 exactly; 1 output token = 4 x 0.745 = 2.98 -> 3.
        (TokenCounts(input_tokens=1_000_000), 5_000, BEFORE, 745_000),
        (TokenCounts(output_tokens=1), 5_000, BEFORE, 3),
        # From CHANGE_1: $2.50/M and no tiers; 1 token is 2.5 micros -> 3, volume or not.
        (TokenCounts(input_tokens=1), 0, CHANGE_1, 3),
        (TokenCounts(input_tokens=1), 10**9, CHANGE_1, 3),
        # From CHANGE_2: $5/M in, $20/M out, 80% off from 100 tokens: 5 x 0.2 + 20 x 0.2 = 5.
        (TokenCounts(input_tokens=1, output_tokens=1), 100, CHANGE_2, 5),
        (TokenCounts(input_tokens=1, output_tokens=1), 99, CHANGE_2, 25),
    ],
)
def test_charge_micros_exact(
    mini: Model, tokens: TokenCounts, month_tokens: int, at: datetime, expected: int
) -> None:
    assert charge_micros(mini, tokens, at=at, month_tokens=month_tokens) == expected


def test_without_discount_the_charge_is_money_cost_micros(mini: Model) -> None:
    rng = random.Random(7)
    unit = mini.prices.unit_prices()
    for _ in range(500):
        input_tokens = rng.randrange(0, 200_000)
        output_tokens = rng.randrange(0, 20_000)
        tokens = TokenCounts(
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=rng.randrange(0, input_tokens + 1),
            reasoning_tokens=rng.randrange(0, output_tokens + 1),
        )
        assert charge_micros(mini, tokens, at=BEFORE) == cost_micros(tokens, unit)


# --------------------------------------------------------------------------- #
# Volume tiers
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("month_tokens", "percent"),
    [(0, "0"), (999, "0"), (1_000, "10"), (4_999, "10"), (5_000, "25.5"), (10**12, "25.5")],
)
def test_tier_boundaries(mini: Model, month_tokens: int, percent: str) -> None:
    assert discount_percent(mini.prices, month_tokens) == Decimal(percent)
    expected = {"0": 1_000_000, "10": 900_000, "25.5": 745_000}[percent]
    assert (
        charge_micros(mini, TokenCounts(input_tokens=1_000_000), at=BEFORE, month_tokens=month_tokens)
        == expected
    )


def test_tiers_belong_to_the_prices_in_effect(mini: Model) -> None:
    assert discount_percent(prices_at(mini, CHANGE_1), 10**9) == 0  # that change has no tiers
    assert discount_percent(prices_at(mini, CHANGE_2), 100) == Decimal(80)


def test_negative_month_tokens_are_refused(mini: Model) -> None:
    with pytest.raises(ValueError, match="month_tokens"):
        charge_micros(mini, TokenCounts(input_tokens=1), at=BEFORE, month_tokens=-1)


def test_tiers_keep_unit_prices_working(mini: Model) -> None:
    unit = mini.prices.unit_prices()
    assert (unit.input, unit.output, unit.cached_input, unit.reasoning) == (
        1_000_000,
        4_000_000,
        500_000,
        4_000_000,
    )
    assert [t.discount_percent for t in mini.prices.volume_tiers] == [Decimal("10"), Decimal("25.5")]


# --------------------------------------------------------------------------- #
# Estimates
# --------------------------------------------------------------------------- #


def request(max_output_tokens: int | None = None) -> common_pb2.ChatRequest:
    sampling = common_pb2.SamplingParams()
    if max_output_tokens is not None:
        sampling.max_output_tokens = max_output_tokens
    message = common_pb2.Message(
        role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Hello there.")]
    )
    return common_pb2.ChatRequest(model="m", messages=[message], sampling=sampling)


def test_estimate_from_a_counted_prompt(mini: Model) -> None:
    prompt = PromptCount(tokens=1_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(2_000), mini, at=BEFORE, prompt=prompt)
    assert estimate.model == "openai/gpt-4o-mini"
    assert (estimate.input_tokens, estimate.max_output_tokens) == (1_000, 2_000)
    assert estimate.expected_output_tokens == EXPECTED_OUTPUT_TOKENS == 256
    # 1,000 x $1/M + 256 x $4/M = 1,000 + 1,024; worst: 1,000 + 2,000 x 4 = 9,000.
    assert estimate.expected_cost_micros == 2_024
    assert estimate.worst_case_cost_micros == 9_000
    assert (estimate.encoding, estimate.approximate) == ("o200k_base", False)


def test_the_worst_output_is_the_cap_within_the_room_the_measured_prompt_leaves(mini: Model) -> None:
    """What a worst-case hold covers of output, and so the most an answer cut short is charged."""
    window = mini.context_window
    counted = PromptCount(tokens=window - 100, encoding="o200k_base", approximate=False)
    assert worst_output_tokens(request(), mini, counted) == 100  # the window, not the model's cap
    assert worst_output_tokens(request(40), mini, counted) == 40
    short = PromptCount(tokens=10, encoding="o200k_base", approximate=False)
    assert worst_output_tokens(request(), mini, short) == mini.max_output_tokens
    # A guessed part may be smaller than guessed: the room counts only the measured part.
    guessed = PromptCount(window - 100, "o200k_base", approximate=False, approximate_tokens=50)
    assert worst_output_tokens(request(), mini, guessed) == 150
    full = PromptCount(tokens=window + 5, encoding="o200k_base", approximate=False)
    assert worst_output_tokens(request(), mini, full) == 0
    # The estimate's worst case is priced with that many output tokens.
    estimate = estimate_cost(request(), mini, at=BEFORE, prompt=counted)
    assert estimate.worst_case_cost_micros == (window - 100) * 1 + 100 * 4


def test_the_expected_cost_takes_the_tier_reached_and_the_worst_case_no_discount(mini: Model) -> None:
    prompt = PromptCount(tokens=1_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(2_000), mini, at=BEFORE, month_tokens=1_000, prompt=prompt)
    assert estimate.expected_cost_micros == 1_822  # 2,024 x 0.9 = 1,821.6
    assert estimate.worst_case_cost_micros == 9_000  # not 8,100 (9,000 less 10%)
    top = estimate_cost(request(2_000), mini, at=BEFORE, month_tokens=10**9, prompt=prompt)
    assert top.worst_case_cost_micros == 9_000


def test_a_request_finishing_in_the_next_month_loses_its_tier_and_the_hold_covers_it(mini: Model) -> None:
    # Admitted seconds before the month ends at the 25.5% tier; it finishes in the new month,
    # where the tenant's volume starts again from 0: charged the undiscounted price.
    admitted = datetime(2026, 6, 30, 23, 59, 50, tzinfo=UTC)
    prompt = PromptCount(tokens=1_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(2_000), mini, at=admitted, month_tokens=5_000, prompt=prompt)
    usage = TokenCounts(input_tokens=1_000, output_tokens=2_000)
    finished = admitted + timedelta(seconds=30)
    assert charge_micros(mini, usage, at=finished, month_tokens=0) == 9_000
    assert charge_micros(mini, usage, at=finished, month_tokens=0) <= estimate.worst_case_cost_micros


def test_estimate_uses_the_prices_at_its_time(mini: Model) -> None:
    prompt = PromptCount(tokens=1_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(100), mini, at=CHANGE_1, prompt=prompt)
    assert estimate.worst_case_cost_micros == 2_500 + 800  # $2.50/M in, $8/M out


def test_prices_between_lists_every_price_in_effect_in_the_span(mini: Model) -> None:
    inputs = [p.input for p in prices_between(mini, CHANGE_1 - TICK, CHANGE_2)]
    assert inputs == [1_000_000, 2_500_000, 5_000_000]
    assert [p.input for p in prices_between(mini, CHANGE_1, CHANGE_2 - TICK)] == [2_500_000]
    assert [p.input for p in prices_between(mini, BEFORE, BEFORE)] == [1_000_000]
    assert [p.input for p in prices_between(mini, datetime(2026, 11, 30), datetime(2026, 12, 2))] == [
        1_000_000,
        2_500_000,
    ]


def test_worst_case_holds_a_price_rise_before_the_request_must_finish(mini: Model) -> None:
    # Admitted a minute before the price rises from $1/$4 to $2.50/$8 per 1M; charges are priced
    # when the request finishes, so one that runs past the change costs the new price.
    prompt = PromptCount(tokens=1_000, encoding="o200k_base", approximate=False)
    admitted = CHANGE_1 - timedelta(minutes=1)
    estimate = estimate_cost(request(2_000), mini, at=admitted, prompt=prompt)
    at_the_bound = TokenCounts(input_tokens=1_000, output_tokens=2_000)
    charged = charge_micros(mini, at_the_bound, at=admitted + timedelta(seconds=DEFAULT_HORIZON_S))
    assert charged == 2_500 + 16_000
    assert estimate.worst_case_cost_micros == charged
    # The expected cost stays at the prices of the moment.
    assert estimate.expected_cost_micros == 1_000 + EXPECTED_OUTPUT_TOKENS * 4


def test_a_price_change_beyond_the_horizon_is_not_held(mini: Model) -> None:
    prompt = PromptCount(tokens=1_000, encoding="o200k_base", approximate=False)
    reach = timedelta(seconds=DEFAULT_HORIZON_S + FINISH_GRACE_S)
    too_early = estimate_cost(request(2_000), mini, at=CHANGE_1 - reach - TICK, prompt=prompt)
    assert too_early.worst_case_cost_micros == 9_000
    just_in = estimate_cost(request(2_000), mini, at=CHANGE_1 - reach, prompt=prompt)
    assert just_in.worst_case_cost_micros == 18_500
    # The caller's horizon (its generate timeout) decides how far ahead to look.
    half_hour = CHANGE_1 - timedelta(minutes=30)
    long = estimate_cost(request(2_000), mini, at=half_hour, prompt=prompt, horizon_s=3_600)
    short = estimate_cost(request(2_000), mini, at=half_hour, prompt=prompt, horizon_s=60)
    assert (long.worst_case_cost_micros, short.worst_case_cost_micros) == (18_500, 9_000)


def test_worst_case_keeps_the_dearer_price_when_prices_fall(claude: Model) -> None:
    cheaper = claude.model_copy(
        update={
            "price_changes": (
                PriceChange(
                    effective_from=BEFORE + timedelta(seconds=10),
                    prices=Prices(input="1", output="5"),  # type: ignore[arg-type]
                ),
            )
        }
    )
    prompt = PromptCount(tokens=10_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(2_000), cheaper, at=BEFORE, prompt=prompt)
    assert estimate.worst_case_cost_micros == 37_500 + 30_000  # today's cache-write and output


def test_worst_case_ignores_cached_input_prices(mini: Model) -> None:
    prompt = PromptCount(tokens=10_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(1), mini, at=BEFORE, prompt=prompt)
    assert estimate.worst_case_cost_micros == 10_000 + 4  # input at $1/M, never the $0.50 cached price


# --------------------------------------------------------------------------- #
# The worst case bounds the charge
# --------------------------------------------------------------------------- #


def test_worst_case_covers_all_input_billed_as_cache_writes(claude: Model) -> None:
    prompt = PromptCount(tokens=10_000, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(2_000), claude, at=BEFORE, prompt=prompt)
    # 10,000 x $3.75/M (the cache-write price, above the $3 input price) + 2,000 x $15/M.
    assert estimate.worst_case_cost_micros == 37_500 + 30_000
    # The vendor writes the whole prompt to its cache and answers at the cap: charged exactly that.
    at_the_bound = TokenCounts(input_tokens=10_000, cache_write_input_tokens=10_000, output_tokens=2_000)
    assert charge_micros(claude, at_the_bound, at=BEFORE) == estimate.worst_case_cost_micros
    # The expected cost stays the best guess: plain input, the typical answer.
    assert estimate.expected_cost_micros == 30_000 + EXPECTED_OUTPUT_TOKENS * 15


def image_chat(image: common_pb2.ImagePart, max_output_tokens: int = 1_000) -> common_pb2.ChatRequest:
    chat = request(max_output_tokens)
    chat.messages[0].parts.append(common_pb2.ContentPart(image=image))
    return chat


def png(width: int, height: int) -> bytes:
    header = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR"
    return header + width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"


@pytest.fixture(scope="module")
def default_catalog_models() -> dict[str, Model]:
    return {m.id: m for m in load_catalog().models}


def test_worst_case_holds_an_image_of_unknown_size_at_the_largest_the_vendor_bills(
    default_catalog_models: dict[str, Model],
) -> None:
    gpt4o = default_catalog_models["openai/gpt-4o"]
    high = common_pb2.ImagePart(url="https://example.com/a.png", detail=common_pb2.IMAGE_DETAIL_HIGH)
    url = image_chat(high)
    text_only = count_prompt_tokens(request(1_000), gpt4o)
    counted = count_prompt_tokens(url, gpt4o)
    assert counted.tokens - text_only.tokens == 765  # counted as a typical 1024x1024 image
    estimate = estimate_cost(url, gpt4o, at=BEFORE)
    # The image was 2048x768: 85 + 170 x 8 tiles, on top of the text as the vendor counts it.
    text = text_only.tokens + math.ceil(text_only.approximate_tokens * WORST_CASE_MARGIN)
    usage = TokenCounts(input_tokens=text + 1_445, output_tokens=1_000)
    assert charge_micros(gpt4o, usage, at=BEFORE) <= estimate.worst_case_cost_micros
    # The expected cost keeps the typical image.
    assert estimate.expected_cost_micros == charge_micros(
        gpt4o, TokenCounts(input_tokens=counted.tokens, output_tokens=EXPECTED_OUTPUT_TOKENS), at=BEFORE
    )


def test_worst_case_uses_an_images_size_when_the_header_gives_it(
    default_catalog_models: dict[str, Model],
) -> None:
    gpt4o = default_catalog_models["openai/gpt-4o"]
    unknown = estimate_cost(image_chat(common_pb2.ImagePart(data=b"not an image")), gpt4o, at=BEFORE)
    small = estimate_cost(image_chat(common_pb2.ImagePart(data=png(512, 512))), gpt4o, at=BEFORE)
    low = common_pb2.ImagePart(url="https://example.com/a.png", detail=common_pb2.IMAGE_DETAIL_LOW)
    low_detail = estimate_cost(image_chat(low), gpt4o, at=BEFORE)
    assert low_detail.worst_case_cost_micros < small.worst_case_cost_micros < unknown.worst_case_cost_micros


@pytest.mark.parametrize(
    ("image", "billed"),
    [
        (common_pb2.ImagePart(data=png(512, 512)), 2_833 + 5_667),
        (common_pb2.ImagePart(data=png(2048, 768)), 2_833 + 8 * 5_667),
        (common_pb2.ImagePart(url="https://example.com/a.png"), 2_833 + 8 * 5_667),  # unknown: largest
        (common_pb2.ImagePart(url="https://example.com/a.png", detail=common_pb2.IMAGE_DETAIL_LOW), 2_833),
    ],
)
def test_gpt_4o_mini_images_are_held_at_its_own_token_rates(
    default_catalog_models: dict[str, Model], image: common_pb2.ImagePart, billed: int
) -> None:
    mini = default_catalog_models["openai/gpt-4o-mini"]
    chat = image_chat(image)
    text_only = count_prompt_tokens(request(1_000), mini)
    estimate = estimate_cost(chat, mini, at=BEFORE)
    text = text_only.tokens + math.ceil(text_only.approximate_tokens * WORST_CASE_MARGIN)
    usage = TokenCounts(input_tokens=text + billed, output_tokens=1_000)
    assert charge_micros(mini, usage, at=BEFORE) <= estimate.worst_case_cost_micros


def test_gpt_4o_mini_images_leave_the_output_the_room_of_their_standard_size(
    default_catalog_models: dict[str, Model],
) -> None:
    # Five images of unknown size bill 5 x 25,501 tokens on gpt-4o-mini but fill 5 x 765 of its
    # 128,000-token window: the answer may still run to the model's output cap, and the hold
    # covers that, at the billed rates.
    mini = default_catalog_models["openai/gpt-4o-mini"]
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://example.com/a.png"))
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[image] * 5)
    chat = common_pb2.ChatRequest(model=mini.id, messages=[message])
    counted = count_prompt_tokens(chat, mini)
    assert counted.tokens > 5 * 25_000 and counted.window_tokens < 5 * 800
    estimate = estimate_cost(chat, mini, at=BEFORE)
    assert estimate.max_output_tokens == mini.max_output_tokens
    usage = TokenCounts(
        input_tokens=counted.tokens + counted.headroom_tokens, output_tokens=mini.max_output_tokens
    )
    assert charge_micros(mini, usage, at=BEFORE) <= estimate.worst_case_cost_micros


def test_worst_case_adds_the_margin_to_the_guessed_part_of_the_prompt(claude: Model) -> None:
    assert Fraction(1, 4) == WORST_CASE_MARGIN
    # 4,000 of the 10,000 tokens are a guess (images, tools, a vendor factor): 1,000 more.
    prompt = PromptCount(
        tokens=10_000, encoding="cl100k_base~anthropic", approximate=True, approximate_tokens=4_000
    )
    estimate = estimate_cost(request(2_000), claude, at=BEFORE, prompt=prompt)
    assert estimate.input_tokens == 10_000  # reported as counted; the margin is only in the money
    assert estimate.worst_case_cost_micros == 11_000 * 375 // 100 + 30_000
    # The vendor counted the guessed part 25% higher and wrote it all to its cache.
    at_the_bound = TokenCounts(input_tokens=11_000, cache_write_input_tokens=11_000, output_tokens=2_000)
    assert charge_micros(claude, at_the_bound, at=BEFORE) == estimate.worst_case_cost_micros
    assert estimate.expected_cost_micros == 30_000 + EXPECTED_OUTPUT_TOKENS * 15  # no margin
    # A count that says it is approximate but not which part: all of it is taken as a guess.
    whole = PromptCount(tokens=10_000, encoding="cl100k_base~anthropic", approximate=True)
    assert estimate_cost(request(2_000), claude, at=BEFORE, prompt=whole).worst_case_cost_micros == (
        12_500 * 375 // 100 + 30_000
    )


def test_worst_case_of_a_counted_claude_prompt_covers_a_quarter_more_input(claude: Model) -> None:
    chat = request(100)
    counted = count_prompt_tokens(chat, claude)
    assert counted.approximate and counted.approximate_tokens == counted.tokens  # Claude: all a guess
    estimate = estimate_cost(chat, claude, at=BEFORE)
    vendor_input = counted.tokens + -(-counted.tokens // 4)
    at_the_bound = TokenCounts(
        input_tokens=vendor_input, cache_write_input_tokens=vendor_input, output_tokens=100
    )
    assert charge_micros(claude, at_the_bound, at=BEFORE) == estimate.worst_case_cost_micros


def test_an_overcounted_prompt_near_the_context_edge_still_bounds_the_output(reasoner: Model) -> None:
    # o4-mini here: 1,000-token window, 600 output cap. A prompt counted 700, all a guess, leaves
    # 300 by our count; if the vendor counts fewer tokens it lets the answer run to the cap.
    prompt = PromptCount(
        tokens=700, encoding="cl100k_base~o200k_base", approximate=True, approximate_tokens=700
    )
    estimate = estimate_cost(request(), reasoner, at=BEFORE, prompt=prompt)
    assert estimate.max_output_tokens == 300
    for vendor_input in range(0, 876, 25):
        output = min(600, 1_000 - vendor_input)
        usage = TokenCounts(input_tokens=vendor_input, output_tokens=output, reasoning_tokens=output)
        assert charge_micros(reasoner, usage, at=BEFORE) <= estimate.worst_case_cost_micros, vendor_input
    # 875 input x $1.10/M + 600 reasoning x $8.80/M, rounded half up.
    assert estimate.worst_case_cost_micros == 963 + 5_280


def test_worst_case_bounds_every_charge_at_the_limits_on_random_catalogs() -> None:
    """Random prices (cache writes dearer or cheaper than input, a cached price above input, a
    reasoning price on a model that does not say it reasons), prompts and usage at the limits
    the estimate allows: the charge never exceeds the worst case."""
    rng = random.Random(11)
    for _ in range(200):
        input_price, output_price = rng.randrange(1, 20_000), rng.randrange(1, 80_000)
        prices = {
            "input": f"{input_price / 1000:.3f}",
            "output": f"{output_price / 1000:.3f}",
            "cached_input": f"{rng.randrange(0, 2 * input_price) / 1000:.3f}",
            "cache_write_input": f"{rng.randrange(0, 2 * input_price) / 1000:.3f}",
            "reasoning": f"{rng.randrange(0, 2 * output_price) / 1000:.3f}",
        }
        text = (
            "providers:\n  openai: {vendor: openai, base_url: https://api.openai.com/v1}\nmodels:\n"
            "  - id: openai/m\n    provider: openai\n    upstream_model: m\n"
            f"    context_window: 8000\n    max_output_tokens: 4000\n    prices: {prices}\n"
        ).replace("'", '"')
        chosen = parse_catalog(text).model("openai/m")
        assert chosen is not None
        counted = rng.randrange(1, 8_000)
        guessed = rng.choice([0, rng.randrange(0, counted + 1), counted])
        prompt = PromptCount(counted, "cl100k_base", guessed > 0, approximate_tokens=guessed)
        chat = request(rng.choice([None, rng.randrange(1, 6_000)]))
        worst = estimate_cost(chat, chosen, at=BEFORE, prompt=prompt).worst_case_cost_micros
        limit = chat.sampling.max_output_tokens or 4_000
        highest_input = counted + -(-guessed // 4)
        for vendor_input in {counted - guessed, counted, highest_input}:
            output = max(0, min(limit, 4_000, 8_000 - vendor_input))
            for cached, written in ((0, 0), (vendor_input, 0), (0, vendor_input)):
                for reasoning in (0, output):
                    usage = TokenCounts(
                        input_tokens=vendor_input,
                        output_tokens=output,
                        cached_input_tokens=cached,
                        cache_write_input_tokens=written,
                        reasoning_tokens=reasoning,
                    )
                    assert charge_micros(chosen, usage, at=BEFORE) <= worst, (prices, prompt, usage)


# A catalog for the grid below: OpenAI's image rules (gpt-4o's tiles, gpt-4o-mini's dearer
# tiles, o4-mini's patches), Claude's, a price rise mid-month and a fall after it, volume tiers,
# cache writes dearer than input and a reasoning price above output.
GRID_CATALOG = """\
providers:
  openai: {vendor: openai, base_url: https://api.openai.com/v1}
  anthropic: {vendor: anthropic, base_url: https://api.anthropic.com}
models:
  - id: openai/gpt-4o
    provider: openai
    upstream_model: gpt-4o
    context_window: 128000
    max_output_tokens: 16384
    prices:
      input: "2.50"
      output: "10"
      cached_input: "1.25"
      volume_tiers: [{above_monthly_tokens: 1000, discount_percent: "20"}]
    price_changes:
      - {effective_from: "2026-11-15T12:00:00Z", prices: {input: "3", output: "12"}}
      - {effective_from: "2026-11-15T12:03:00Z", prices: {input: "1", output: "4"}}
  - id: openai/gpt-4o-mini
    provider: openai
    upstream_model: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    image_tokens: {base: 2833, tile: 5667}
    prices:
      input: "0.15"
      output: "0.60"
      cached_input: "0.075"
      volume_tiers:
        - {above_monthly_tokens: 1000, discount_percent: "10"}
        - {above_monthly_tokens: 5000, discount_percent: "30"}
    price_changes:
      - effective_from: "2026-11-15T12:00:00Z"
        prices:
          input: "0.30"
          output: "1.20"
          volume_tiers: [{above_monthly_tokens: 100, discount_percent: "50"}]
  - id: openai/o4-mini
    provider: openai
    upstream_model: o4-mini
    context_window: 200000
    max_output_tokens: 100000
    image_tokens: {patch_multiplier: "1.72"}
    capabilities: [vision, reasoning, streaming]
    prices: {input: "1.10", output: "4.40", reasoning: "6.60", cache_write_input: "1.40"}
    price_changes:
      - {effective_from: "2026-11-15T12:00:00Z", prices: {input: "2.20", output: "8.80"}}
  - id: anthropic/claude
    provider: anthropic
    upstream_model: claude-sonnet-4
    context_window: 200000
    max_output_tokens: 64000
    prices:
      input: "3"
      output: "15"
      cached_input: "0.30"
      cache_write_input: "3.75"
      volume_tiers: [{above_monthly_tokens: 1000, discount_percent: "15"}]
"""

# The vendors' documented image rules, written out here rather than taken from the code under
# test: (kind, base, per tile) for tiles, (kind, multiplier) for patches.
GRID_IMAGE_RULES: dict[str, tuple[str, Fraction, Fraction]] = {
    "openai/gpt-4o": ("tiles", Fraction(85), Fraction(170)),
    "openai/gpt-4o-mini": ("tiles", Fraction(2833), Fraction(5667)),
    "openai/o4-mini": ("patches", Fraction(172, 100), Fraction(0)),
    "anthropic/claude": ("anthropic", Fraction(0), Fraction(0)),
}
# Sizes an image whose header cannot be read might really have.
SOME_SIZES = ((1, 1), (1024, 1024), (768, 2048), (4000, 3000), (100, 5000))


def billed_image_tokens(model_id: str, width: int, height: int, low: bool) -> int:
    """What the vendor bills for a `width` x `height` image, by its published rule."""
    kind, first, second = GRID_IMAGE_RULES[model_id]
    if kind == "tiles":
        if low:
            return int(first)
        w, h = Fraction(width), Fraction(height)
        if max(w, h) > 2048:
            w, h = w * 2048 / max(w, h), h * 2048 / max(w, h)
        if min(w, h) > 768:
            w, h = w * 768 / min(w, h), h * 768 / min(w, h)
        return int(first + second * math.ceil(w / 512) * math.ceil(h / 512))
    if kind == "patches":
        return math.ceil(min(1536, math.ceil(width / 32) * math.ceil(height / 32)) * first)
    scale = min(Fraction(1), Fraction(1568, max(width, height)))
    return min(1600, math.ceil(round(width * scale) * round(height * scale) / 750))


def grid_requests() -> list[tuple[str, common_pb2.ChatRequest, list[list[tuple[int, int]]]]]:
    """(name, request, per image the sizes it may really have)."""
    text = "Summarise the attached figure in two sentences, and say what its axes measure."
    tool = common_pb2.Tool(
        name="lookup",
        description="Look a figure up by name.",
        parameters_json_schema='{"type": "object", "properties": {"name": {"type": "string"}}}',
    )
    url = "https://example.com/figure.png"
    high, low = common_pb2.IMAGE_DETAIL_HIGH, common_pb2.IMAGE_DETAIL_LOW
    unreadable = "data:image/png;base64," + base64.b64encode(b"truncated").decode()
    images: dict[str, tuple[list[common_pb2.ImagePart], list[list[tuple[int, int]]]]] = {
        "text": ([], []),
        "known-png": ([common_pb2.ImagePart(data=png(2048, 768))], [[(2048, 768)]]),
        "known-small": ([common_pb2.ImagePart(data=png(300, 200))], [[(300, 200)]]),
        "url-high": ([common_pb2.ImagePart(url=url, detail=high)], [list(SOME_SIZES)]),
        "url-auto": ([common_pb2.ImagePart(url=url)], [list(SOME_SIZES)]),
        "url-low": ([common_pb2.ImagePart(url=url, detail=low)], [list(SOME_SIZES)]),
        "two-unknown": (
            [common_pb2.ImagePart(data=b"not an image"), common_pb2.ImagePart(url=unreadable)],
            [list(SOME_SIZES), list(SOME_SIZES)],
        ),
    }
    found = []
    for (name, (parts, sizes)), tools in itertools.product(images.items(), (False, True)):
        message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
        message.parts.extend(common_pb2.ContentPart(image=image) for image in parts)
        chat = common_pb2.ChatRequest(model="m", messages=[message], tools=[tool] if tools else [])
        found.append((f"{name}{'+tools' if tools else ''}", chat, sizes))
    return found


def test_worst_case_bounds_every_outcome_on_a_grid_of_requests_models_and_times() -> None:
    """For text, tools, images of known and unknown size, output caps, every model above and
    admission times around a price change and a month's end: whatever the vendor bills within
    the request's limits (the text as counted, its guessed part up to the margin more; each
    image at any size it may have; every input token plain, cached or written to the cache;
    output up to the cap, visible or reasoning), finishing at any moment up to the generate
    timeout (at that moment's prices, the month's volume then, reset in a new month), the
    charge never exceeds the worst case held at admission."""
    catalog = parse_catalog(GRID_CATALOG)
    rise = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    month_end = datetime(2026, 12, 1, tzinfo=UTC)
    admissions = [
        rise - timedelta(minutes=10),  # the rise is past any finish
        rise - timedelta(seconds=DEFAULT_HORIZON_S - 1),  # may finish a second after the rise
        rise - timedelta(seconds=5),
        rise + timedelta(minutes=1),  # may finish after the fall
        month_end - timedelta(seconds=30),  # may finish in the next month
    ]
    checked = 0
    for model, (name, chat, image_sizes), requested in itertools.product(
        catalog.models, grid_requests(), (None, 700)
    ):
        sampling = common_pb2.SamplingParams()
        if requested is not None:
            sampling.max_output_tokens = requested
        chat.sampling.CopyFrom(sampling)
        text_only = common_pb2.ChatRequest()
        text_only.CopyFrom(chat)
        del text_only.messages[0].parts[1:]
        text = count_prompt_tokens(text_only, model)
        text_inputs = {
            text.tokens - text.approximate_tokens,
            text.tokens + math.ceil(text.approximate_tokens * WORST_CASE_MARGIN),
        }
        lows = [part.image.detail == common_pb2.IMAGE_DETAIL_LOW for part in chat.messages[0].parts[1:]]
        image_inputs = {
            sum(billed_image_tokens(model.id, w, h, low) for (w, h), low in zip(sizes, lows, strict=True))
            for sizes in itertools.product(*image_sizes)
        }
        limit = min(requested or model.max_output_tokens, model.max_output_tokens)
        for admitted, month_before in itertools.product(admissions, (0, 6_000)):
            worst = estimate_cost(chat, model, at=admitted, month_tokens=month_before).worst_case_cost_micros
            finishes = [admitted, admitted + timedelta(seconds=DEFAULT_HORIZON_S)]
            for vendor_input, finished in itertools.product(
                {t + i for t in text_inputs for i in image_inputs}, finishes
            ):
                output = max(0, min(limit, model.context_window - vendor_input))
                # Volume only grows within a month (a higher tier only lowers the charge); a
                # request finishing in the next month has none.
                same_month = (finished.year, finished.month) == (admitted.year, admitted.month)
                month_tokens = month_before if same_month else 0
                for (cached, written), reasoning in itertools.product(
                    ((0, 0), (vendor_input, 0), (0, vendor_input)), (0, output)
                ):
                    usage = TokenCounts(
                        input_tokens=vendor_input,
                        output_tokens=output,
                        cached_input_tokens=cached,
                        cache_write_input_tokens=written,
                        reasoning_tokens=reasoning,
                    )
                    charged = charge_micros(model, usage, at=finished, month_tokens=month_tokens)
                    assert charged <= worst, (model.id, name, requested, admitted, finished, usage, worst)
                    checked += 1
    assert checked > 10_000


@pytest.mark.parametrize(
    ("requested", "prompt_tokens", "max_output", "expected_output"),
    [
        (None, 10, 16_384, 256),  # unset: the model's cap
        (0, 10, 16_384, 256),  # 0 counts as unset
        (100, 10, 100, 100),  # expected never above the cap
        (50_000, 10, 16_384, 256),  # never above the model's own cap
        (None, 127_000, 1_000, 256),  # the room left in the context window
        (None, 127_999, 1, 1),  # at least 1 when there is room
        (None, 128_000, 0, 0),  # no room
        (None, 200_000, 0, 0),  # over: the caller refuses it
    ],
)
def test_output_cap(
    mini: Model, requested: int | None, prompt_tokens: int, max_output: int, expected_output: int
) -> None:
    prompt = PromptCount(tokens=prompt_tokens, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(requested), mini, at=BEFORE, prompt=prompt)
    assert (estimate.max_output_tokens, estimate.expected_output_tokens) == (max_output, expected_output)


def test_reasoning_models_price_output_at_the_higher_reasoning_price(reasoner: Model) -> None:
    prompt = PromptCount(tokens=100, encoding="o200k_base", approximate=False)
    estimate = estimate_cost(request(), reasoner, at=BEFORE, prompt=prompt)
    # Cap: min(model 600, context 1,000 - 100 = 900) = 600; expected min(600, 1,024) = 600.
    assert estimate.max_output_tokens == 600
    assert estimate.expected_output_tokens == 600 < EXPECTED_REASONING_OUTPUT_TOKENS
    # 100 x $1.10/M = 110; 600 x $8.80/M = 5,280.
    assert estimate.worst_case_cost_micros == 110 + 5_280
    assert estimate.expected_cost_micros == 110 + 5_280


def test_estimate_counts_the_prompt_when_not_given(mini: Model) -> None:
    chat = request(10)
    estimate = estimate_cost(chat, mini, at=BEFORE)
    counted = count_prompt_tokens(chat, mini)
    assert estimate.input_tokens == counted.tokens > 0
    assert (estimate.encoding, estimate.approximate) == (counted.encoding, counted.approximate)


# --------------------------------------------------------------------------- #
# Catalog checks
# --------------------------------------------------------------------------- #

MODEL_HEAD = """\
providers:
  openai: {vendor: openai, base_url: https://api.openai.com/v1}
models:
  - id: openai/m
    provider: openai
    upstream_model: m
    context_window: 1000
    max_output_tokens: 100
"""


def catalog_error(tail: str) -> str:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(MODEL_HEAD + tail, source="cat.yaml")
    return str(caught.value)


def tiers(*entries: str) -> str:
    body = "".join(f"        - {entry}\n" for entry in entries)
    return '    prices:\n      input: "1"\n      output: "1"\n      volume_tiers:\n' + body


@pytest.mark.parametrize(
    ("tail", "pattern"),
    [
        (
            '    prices: {input: "1", output: "1"}\n    price_changes:\n'
            '      - {effective_from: 2027-01-01, prices: {input: "2", output: "2"}}\n'
            '      - {effective_from: 2026-01-01, prices: {input: "3", output: "3"}}\n',
            r"^cat\.yaml:10: models\.0\.price_changes: .*"
            r"change 1 \(2026-01-01T00:00:00\+00:00\) is not after change 0",
        ),
        (
            '    prices: {input: "1", output: "1"}\n    price_changes:\n'
            '      - {effective_from: "2027-01-01T00:00:00Z", prices: {input: "2", output: "2"}}\n'
            '      - {effective_from: "2027-01-01T01:00:00+01:00", prices: {input: "3", output: "3"}}\n',
            r"models\.0\.price_changes: .*sorted ascending and unique",
        ),
        (
            '    prices: {input: "1", output: "1"}\n    price_changes:\n'
            '      - {effective_from: soon, prices: {input: "2", output: "2"}}\n',
            r"models\.0\.price_changes\.0\.effective_from: not an ISO date or timestamp",
        ),
        (
            '    prices: {input: "1", output: "1"}\n    price_changes:\n'
            '      - {effective_from: 2027-01-01, prices: {input: "-2", output: "2"}}\n',
            r"models\.0\.price_changes\.0\.prices\.input: price must not be negative",
        ),
        (
            tiers(
                '{above_monthly_tokens: 5000, discount_percent: "10"}',
                '{above_monthly_tokens: 1000, discount_percent: "5"}',
            ),
            r"^cat\.yaml:12: models\.0\.prices\.volume_tiers: .*tier 1 \(1000\) is not above tier 0 \(5000\)",
        ),
        (
            tiers(
                '{above_monthly_tokens: 1000, discount_percent: "10"}',
                '{above_monthly_tokens: 1000, discount_percent: "5"}',
            ),
            r"models\.0\.prices\.volume_tiers: .*unique",
        ),
        (
            tiers('{above_monthly_tokens: 1000, discount_percent: "100"}'),
            r"models\.0\.prices\.volume_tiers\.0\.discount_percent: .*above 0 and below 100",
        ),
        (
            tiers("{above_monthly_tokens: 1000, discount_percent: 0}"),
            r"models\.0\.prices\.volume_tiers\.0\.discount_percent: .*above 0 and below 100",
        ),
        (
            tiers('{above_monthly_tokens: 1000, discount_percent: "12.345"}'),
            r"models\.0\.prices\.volume_tiers\.0\.discount_percent: .*more than 2 decimal places",
        ),
        (
            tiers('{above_monthly_tokens: 1000, discount_percent: "lots"}'),
            r"models\.0\.prices\.volume_tiers\.0\.discount_percent: not a decimal number",
        ),
        (
            tiers("{above_monthly_tokens: 1000, discount_percent: true}"),
            r"models\.0\.prices\.volume_tiers\.0\.discount_percent: .*must be a number",
        ),
        (
            tiers('{above_monthly_tokens: 0, discount_percent: "5"}'),
            r"models\.0\.prices\.volume_tiers\.0\.above_monthly_tokens: .*greater than 0",
        ),
        (
            '    prices: {input: "1", output: "1"}\n    tokenizer: gpt2\n',
            r"models\.0\.tokenizer: ",
        ),
    ],
)
def test_catalog_errors_name_the_path(tail: str, pattern: str) -> None:
    message = catalog_error(tail)
    assert re.search(pattern, message), message


def test_discount_written_as_number_or_string_is_exact() -> None:
    text = MODEL_HEAD + tiers(
        "{above_monthly_tokens: 10, discount_percent: 12.5}",
        '{above_monthly_tokens: 20, discount_percent: "33.33"}',
        "{above_monthly_tokens: 30, discount_percent: 40}",
    )
    found = parse_catalog(text).model("openai/m")
    assert found is not None
    assert [t.discount_percent for t in found.prices.volume_tiers] == [
        Decimal("12.5"),
        Decimal("33.33"),
        Decimal("40"),
    ]
