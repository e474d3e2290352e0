"""Route planning: the ordered candidates for a request, computed from the catalog.

This is a plain library (no gRPC) so the router's `Plan` RPC and, later, the edge's local
planning on a pushed snapshot run the same code. For now a plan is the requested model
(an id or an alias; `auto` takes the catalog's default model), then its configured
fallback chain, at most `max_candidates` long.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from switchyard.common.catalog import Catalog, Model
from switchyard.common.errors import Reason, SwitchyardError, invalid

AUTO = "auto"
MAX_CANDIDATES = 3


@dataclass(frozen=True, slots=True)
class PlannedCandidate:
    """One model-and-provider to try, and why it is in the plan."""

    model: Model
    provider: str
    vendor: str
    reason: str


def resolve_requested(catalog: Catalog, requested: str) -> tuple[Model, str]:
    """The model a request names (id, alias, `auto` or empty for the default) and why."""
    name = requested.strip()
    if name in ("", AUTO):
        if catalog.default_model is None:
            raise invalid("no model given and the catalog has no default_model", "model")
        default = catalog.resolve(catalog.default_model)
        if default is None:  # the catalog validator already checked this
            raise invalid("the catalog's default_model is unknown", "model")
        return default, "default model" if not name else "auto: default model"
    model = catalog.resolve(name)
    if model is None:
        raise invalid(f"unknown model or alias {name!r}", "model", model=name)
    return model, "requested model" if model.id == name else f"alias {name!r}"


def plan_route(
    catalog: Catalog,
    requested: str,
    *,
    allowed_models: frozenset[str] | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> list[PlannedCandidate]:
    """The ordered candidates for a request naming `requested`.

    Raises INVALID_ARGUMENT for an unknown model and NO_ROUTE when nothing may serve it.
    """
    first, why = resolve_requested(catalog, requested)
    chain: list[tuple[Model, str]] = [(first, why)]
    for fallback_id in first.fallbacks:
        fallback = catalog.model(fallback_id)
        if fallback is not None:
            chain.append((fallback, f"fallback of {first.id}"))
    seen: set[str] = set()
    plan: list[PlannedCandidate] = []
    for model, reason in chain:
        if model.id in seen or (allowed_models is not None and model.id not in allowed_models):
            continue
        seen.add(model.id)
        provider = catalog.providers[model.provider]
        plan.append(
            PlannedCandidate(model=model, provider=model.provider, vendor=provider.vendor, reason=reason)
        )
        if len(plan) == max_candidates:
            break
    if not plan:
        raise SwitchyardError(
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.NO_ROUTE,
            f"no allowed model can serve {first.id}",
            metadata={"model": first.id},
        )
    return plan
