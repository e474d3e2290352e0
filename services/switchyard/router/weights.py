"""Load-balancing weights per "provider/model", from what the health monitor measured.

A weight says how much of the traffic among equally scored candidates a (provider, model)
should take: the planner rotates the first position among equals by smooth weighted round
robin on these weights. The formula, for each model-level entry with samples:

    raw = (1 / (ewma_latency_ms + LATENCY_OFFSET_MS)) * (1 - error_rate)² * throughput
    throughput = sqrt(tokens_per_second / mean tokens_per_second of the entries that report it)
                 (1 when this entry or every entry reports no throughput)
    weight = raw / mean(raw)                     (so the measured entries average 1.0)
    weight = max(weight, floor * max(weight))    (no entry is starved)

The offset keeps differences of a few milliseconds between fast providers (noise) from
swinging the shares, while 300 ms against 600 ms still splits about 1.8 : 1.
Entries with no samples get 1.0 (nothing known: an equal share); an OPEN breaker gets 0 (the
planner filters it anyway). Provider-level entries (model "") carry no weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from switchyard.v1 import health_pb2

__all__ = ["UNMEASURED_WEIGHT", "compute_weights", "weight_key"]

UNMEASURED_WEIGHT = 1.0
LATENCY_OFFSET_MS = 50.0


def weight_key(provider: str, model: str) -> str:
    """The key of a (provider, model) in the snapshot's weights map."""
    return f"{provider}/{model}"


def compute_weights(health: Iterable[health_pb2.ModelHealth], *, floor: float) -> dict[str, float]:
    """Weights per "provider/model" for the model-level entries of `health` (see the module doc)."""
    weights: dict[str, float] = {}
    measured: list[tuple[str, health_pb2.ModelHealth]] = []
    for entry in health:
        if not entry.model:
            continue
        key = weight_key(entry.provider, entry.model)
        if entry.breaker == health_pb2.BREAKER_STATE_OPEN:
            weights[key] = 0.0
        elif entry.samples == 0:
            weights[key] = UNMEASURED_WEIGHT
        else:
            measured.append((key, entry))
    if not measured:
        return weights
    rates = [e.output_tokens_per_second for _, e in measured if e.output_tokens_per_second > 0]
    mean_rate = sum(rates) / len(rates) if rates else 0.0
    raw: list[tuple[str, float]] = []
    for key, entry in measured:
        speed = 1.0 / (max(entry.ewma_latency_ms, 0.0) + LATENCY_OFFSET_MS)
        reliability = (1.0 - min(1.0, max(0.0, entry.error_rate))) ** 2
        rate = entry.output_tokens_per_second
        throughput = math.sqrt(rate / mean_rate) if rate > 0 and mean_rate > 0 else 1.0
        raw.append((key, speed * reliability * throughput))
    mean = sum(value for _, value in raw) / len(raw)
    if mean <= 0:
        # Every measured entry failed all the time: nothing to prefer among them.
        weights.update((key, UNMEASURED_WEIGHT) for key, _ in raw)
        return weights
    normalised = {key: value / mean for key, value in raw}
    lowest = max(0.0, floor) * max(normalised.values())
    weights.update((key, max(value, lowest)) for key, value in normalised.items())
    return weights
