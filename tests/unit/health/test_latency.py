"""The online latency model: recovering known coefficients, the mean below MIN_FIT_SAMPLES, zero slopes
for columns without variation, forgetting, non-negative predictions and the singular-system fallback."""

from __future__ import annotations

import math
import random

import pytest

from switchyard.health.latency import (
    DEFAULT_FORGETTING,
    MIN_FIT_SAMPLES,
    OnlineLatencyModel,
    _gaussian_elimination,
)


def linear(base: float, per_input: float, per_output: float, input_tokens: int, output_tokens: int) -> float:
    return base + per_input * input_tokens + per_output * output_tokens


def test_a_new_model_is_empty() -> None:
    model = OnlineLatencyModel()
    assert model.samples == 0
    assert model.coefficients == (0.0, 0.0, 0.0)
    assert model.predict(1000, 1000) == 0.0


@pytest.mark.parametrize("forgetting", [0.0, -0.5, 1.0001, 2.0])
def test_forgetting_must_be_in_zero_one(forgetting: float) -> None:
    with pytest.raises(ValueError, match="forgetting"):
        OnlineLatencyModel(forgetting)


def test_forgetting_of_one_is_allowed() -> None:
    model = OnlineLatencyModel(1.0)
    model.update(1, 1, 10.0)
    assert model.samples == 1


def test_constants() -> None:
    assert MIN_FIT_SAMPLES == 3
    assert DEFAULT_FORGETTING == 0.98


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovers_known_coefficients(seed: int) -> None:
    model = OnlineLatencyModel()
    rng = random.Random(seed)
    for _ in range(60):
        input_tokens, output_tokens = rng.randint(10, 4000), rng.randint(1, 800)
        model.update(input_tokens, output_tokens, linear(100, 0.5, 20, input_tokens, output_tokens))
    base, per_input, per_output = model.coefficients
    assert base == pytest.approx(100.0, abs=0.1)
    assert per_input == pytest.approx(0.5, abs=1e-4)
    assert per_output == pytest.approx(20.0, abs=1e-4)
    assert model.samples == 60
    assert model.predict(1000, 100) == pytest.approx(2600.0, rel=1e-5)


def test_recovers_coefficients_from_noisy_observations() -> None:
    model = OnlineLatencyModel()
    rng = random.Random(11)
    for _ in range(400):
        input_tokens, output_tokens = rng.randint(10, 4000), rng.randint(1, 800)
        noise = rng.gauss(0.0, 5.0)
        model.update(input_tokens, output_tokens, linear(250, 0.2, 8, input_tokens, output_tokens) + noise)
    base, per_input, per_output = model.coefficients
    assert base == pytest.approx(250.0, abs=10.0)
    assert per_input == pytest.approx(0.2, abs=0.01)
    assert per_output == pytest.approx(8.0, abs=0.05)


def test_three_samples_are_fitted_exactly() -> None:
    model = OnlineLatencyModel()
    for input_tokens, output_tokens in ((100, 10), (2000, 50), (500, 400)):
        model.update(input_tokens, output_tokens, linear(40, 0.25, 12, input_tokens, output_tokens))
    assert model.samples == MIN_FIT_SAMPLES
    base, per_input, per_output = model.coefficients
    assert base == pytest.approx(40.0, abs=0.01)
    assert per_input == pytest.approx(0.25, abs=1e-5)
    assert per_output == pytest.approx(12.0, abs=1e-4)


def test_below_min_fit_samples_the_model_is_the_weighted_mean() -> None:
    model = OnlineLatencyModel()
    model.update(100, 10, 100.0)
    assert model.coefficients == (100.0, 0.0, 0.0)
    assert model.predict(5000, 5000) == 100.0
    model.update(2000, 500, 200.0)
    base, per_input, per_output = model.coefficients
    # The older observation weighs DEFAULT_FORGETTING, the newer 1.
    assert base == pytest.approx((0.98 * 100 + 200) / 1.98)
    assert (per_input, per_output) == (0.0, 0.0)


def test_without_forgetting_the_mean_is_plain() -> None:
    model = OnlineLatencyModel(1.0)
    model.update(0, 0, 100.0)
    model.update(0, 0, 300.0)
    assert model.coefficients == (200.0, 0.0, 0.0)


def test_constant_zero_columns_fall_back_to_the_mean() -> None:
    # Probes: every observation has 0 input and 0 output tokens.
    model = OnlineLatencyModel(1.0)
    latencies = [100.0, 200.0, 300.0, 150.0, 250.0]
    for latency in latencies:
        model.update(0, 0, latency)
    base, per_input, per_output = model.coefficients
    assert base == pytest.approx(sum(latencies) / len(latencies))
    assert per_input == pytest.approx(0.0, abs=1e-9)
    assert per_output == pytest.approx(0.0, abs=1e-9)
    assert model.predict(1000, 1000) == pytest.approx(200.0)


def test_a_constant_nonzero_column_gets_a_zero_slope() -> None:
    # Every prompt has the same length: its slope cannot be told from the base and goes to 0.
    model = OnlineLatencyModel()
    rng = random.Random(5)
    for _ in range(30):
        output_tokens = rng.randint(1, 500)
        model.update(700, output_tokens, linear(100, 0.5, 20, 700, output_tokens))
    base, per_input, per_output = model.coefficients
    assert all(math.isfinite(value) for value in (base, per_input, per_output))
    assert per_input == pytest.approx(0.0, abs=1e-3)
    assert per_output == pytest.approx(20.0, abs=1e-4)
    assert base == pytest.approx(100 + 0.5 * 700, abs=1.0)  # the constant input's share moves to the base
    assert model.predict(700, 10) == pytest.approx(650.0, abs=0.1)


def test_forgetting_follows_a_provider_that_changes() -> None:
    forgetful, rigid = OnlineLatencyModel(), OnlineLatencyModel(1.0)
    rng = random.Random(9)
    for step in range(500):
        input_tokens, output_tokens = rng.randint(10, 4000), rng.randint(1, 800)
        coefficients = (100, 0.5, 20) if step < 200 else (300, 1.0, 10)
        latency = linear(*coefficients, input_tokens, output_tokens)
        forgetful.update(input_tokens, output_tokens, latency)
        rigid.update(input_tokens, output_tokens, latency)
    base, per_input, per_output = forgetful.coefficients
    assert base == pytest.approx(300.0, rel=0.01)
    assert per_input == pytest.approx(1.0, rel=0.01)
    assert per_output == pytest.approx(10.0, rel=0.01)
    # Without forgetting the fit stays between the two regimes.
    assert 0.55 < rigid.coefficients[1] < 0.95
    assert 10.5 < rigid.coefficients[2] < 19.5


def test_output_reach_is_the_mean_plus_two_standard_deviations() -> None:
    model = OnlineLatencyModel(1.0)
    assert model.output_reach == 0.0
    for output_tokens in (10, 20, 30):
        model.update(5, output_tokens, 4.0)
    assert model.output_reach == pytest.approx(20 + 2 * math.sqrt(200 / 3))
    steady = OnlineLatencyModel()
    for _ in range(10):
        steady.update(5, 40, 4.0)
    assert steady.output_reach == pytest.approx(40.0)


def test_predictions_are_never_negative() -> None:
    model = OnlineLatencyModel()
    for output_tokens in (60, 100, 200, 300):
        model.update(0, output_tokens, 10.0 * output_tokens - 500.0)
    base, _, per_output = model.coefficients
    assert base == pytest.approx(-500.0, abs=0.5)
    assert per_output == pytest.approx(10.0, abs=1e-3)
    assert model.predict(0, 0) == 0.0
    assert model.predict(0, 100) == pytest.approx(500.0, abs=0.5)


def test_gaussian_elimination_solves_a_regular_system() -> None:
    solution = _gaussian_elimination([[2.0, 1.0, 5.0], [1.0, 3.0, 10.0]])
    assert solution == pytest.approx([1.0, 3.0])


@pytest.mark.parametrize(
    "augmented",
    [
        [[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]],  # singular
        [[0.0, 0.0, 1.0], [0.0, 0.0, 2.0]],  # all zero
        [[1e-300, 0.0, 1.0], [0.0, 1e-300, 1e300]],  # overflows
    ],
)
def test_gaussian_elimination_gives_none_when_it_cannot_solve(augmented: list[list[float]]) -> None:
    assert _gaussian_elimination(augmented) is None
