"""An online latency model per (provider, model): least squares with exponential forgetting.

    latency_ms ≈ base + a · input_tokens + b · output_tokens

Each update folds one observation into weighted normal-equation sums (XᵀWX, a 3x3 matrix,
and XᵀWy), older observations weighing `forgetting`ⁿ so the fit follows a provider that
slows down or speeds up. Solving is Gaussian elimination with partial pivoting plus a small
ridge on the two slopes, so a column with no variation (every probe has 0 tokens, or every
prompt has the same length) drives its slope to 0 instead of blowing up. Fewer than
`MIN_FIT_SAMPLES` observations, or a system that still cannot be solved, fall back to the
weighted mean latency with zero slopes.
"""

from __future__ import annotations

import math
from typing import Final

# Weight kept by an observation per newer one: about the last 50 observations count.
DEFAULT_FORGETTING: Final = 0.98
# Below this many observations the model is the mean latency.
MIN_FIT_SAMPLES: Final = 3
# Ridge on the slopes, relative to their diagonal term, plus an absolute floor.
_RIDGE_RELATIVE: Final = 1e-9
_RIDGE_ABSOLUTE: Final = 1e-9


class OnlineLatencyModel:
    """Recursive least squares of total latency on input and output tokens (pure Python)."""

    def __init__(self, forgetting: float = DEFAULT_FORGETTING) -> None:
        if not 0.0 < forgetting <= 1.0:
            raise ValueError("forgetting must be in (0, 1]")
        self._forgetting = forgetting
        # Weighted sums: _xx = Σ w·x·xᵀ and _xy = Σ w·x·y with x = (1, input, output).
        self._xx = [[0.0] * 3 for _ in range(3)]
        self._xy = [0.0] * 3
        self._samples = 0
        self._coefficients = (0.0, 0.0, 0.0)

    @property
    def samples(self) -> int:
        """Observations learned from so far."""
        return self._samples

    @property
    def coefficients(self) -> tuple[float, float, float]:
        """(base ms, ms per input token, ms per output token) of the current fit."""
        return self._coefficients

    @property
    def output_reach(self) -> float:
        """Output tokens the fit has seen in practice: weighted mean plus two weighted standard
        deviations of the observations' outputs (0 before the first)."""
        weight = self._xx[0][0]
        if weight <= 0:
            return 0.0
        mean = self._xx[0][2] / weight
        variance = max(0.0, self._xx[2][2] / weight - mean * mean)
        return mean + 2.0 * math.sqrt(variance)

    def update(self, input_tokens: int, output_tokens: int, latency_ms: float) -> None:
        """Learn from one observation."""
        x = (1.0, float(input_tokens), float(output_tokens))
        keep = self._forgetting
        for i in range(3):
            self._xy[i] = keep * self._xy[i] + x[i] * latency_ms
            row = self._xx[i]
            for j in range(3):
                row[j] = keep * row[j] + x[i] * x[j]
        self._samples += 1
        self._coefficients = self._solve()

    def predict(self, input_tokens: int, output_tokens: int) -> float:
        """Expected total latency in ms for a request of this size (never negative)."""
        base, per_input, per_output = self._coefficients
        return max(0.0, base + per_input * input_tokens + per_output * output_tokens)

    def _mean(self) -> tuple[float, float, float]:
        weight = self._xx[0][0]
        return (self._xy[0] / weight if weight > 0 else 0.0, 0.0, 0.0)

    def _solve(self) -> tuple[float, float, float]:
        if self._samples < MIN_FIT_SAMPLES:
            return self._mean()
        matrix = [row[:] + [rhs] for row, rhs in zip(self._xx, self._xy, strict=True)]
        for i in (1, 2):
            matrix[i][i] += _RIDGE_RELATIVE * matrix[i][i] + _RIDGE_ABSOLUTE
        solution = _gaussian_elimination(matrix)
        if solution is None:
            return self._mean()
        base, per_input, per_output = solution
        return (base, per_input, per_output)


def _gaussian_elimination(augmented: list[list[float]]) -> list[float] | None:
    """Solve an n×(n+1) augmented system in place; None when it is singular or not finite."""
    n = len(augmented)
    scale = max((abs(value) for row in augmented for value in row[:n]), default=0.0)
    if scale == 0.0:
        return None
    for col in range(n):
        pivot_row = max(range(col, n), key=lambda r: abs(augmented[r][col]))
        pivot = augmented[pivot_row][col]
        if abs(pivot) <= scale * 1e-15:
            return None
        augmented[col], augmented[pivot_row] = augmented[pivot_row], augmented[col]
        for r in range(col + 1, n):
            factor = augmented[r][col] / pivot
            if factor:
                for c in range(col, n + 1):
                    augmented[r][c] -= factor * augmented[col][c]
    solution = [0.0] * n
    for r in range(n - 1, -1, -1):
        total = augmented[r][n] - sum(augmented[r][c] * solution[c] for c in range(r + 1, n))
        solution[r] = total / augmented[r][r]
    if not all(math.isfinite(value) for value in solution):
        return None
    return solution
