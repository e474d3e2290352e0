"""The routing table: a routing snapshot compiled for fast planning.

The router builds a `RoutingSnapshot` proto (`build_snapshot`) from the catalog and the health
monitor's picture and pushes it to every edge; the router and each edge compile it into a
`RoutingTable` (`RoutingTable.from_snapshot`) and plan on that. `RoutingTable.from_catalog`
goes through the same snapshot, so there is one code path whatever the source.

A table is compiled for a region (an edge's `edge_region`, or a Plan / Explain request's
`region` on the router; empty: every region together): a model's latency is predicted from the
latency model measured from that region once it has `REGION_MIN_SAMPLES` samples, and from the
one of every region together otherwise.

Everything a plan needs that does not depend on the request is computed here, once per
snapshot: per model a slotted `ModelRoute` with its prices, capabilities, breaker state,
rate-limit headroom, latency model and weight; name resolution; models by category; tenants
with their compiled rules.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf import timestamp_pb2

from switchyard.common.catalog import Capability, Catalog, Model
from switchyard.ledger.pricing import EXPECTED_OUTPUT_TOKENS, EXPECTED_REASONING_OUTPUT_TOKENS, prices_at
from switchyard.router.rules import Rule, compile_rules, rules_from_json, rules_to_json
from switchyard.router.weights import UNMEASURED_WEIGHT, compute_weights, weight_key
from switchyard.v1 import common_pb2, health_pb2, router_pb2

__all__ = [
    "BREAKER_CLOSED",
    "BREAKER_HALF_OPEN",
    "BREAKER_OPEN",
    "CATEGORIES",
    "DEFAULT_LATENCY_MS",
    "PROVIDER_DOWN",
    "QUALITY_FLOOR",
    "REGION_MIN_SAMPLES",
    "STRATEGY_WEIGHTS",
    "TIER_STEP",
    "ModelRoute",
    "RoutingTable",
    "TenantRoute",
    "build_snapshot",
    "default_settings",
]

CATEGORIES: Final = ("small", "large", "reasoning")
# Predicted latency for a model nothing is known about yet, by category.
DEFAULT_LATENCY_MS: Final = {"small": 800.0, "large": 2_000.0, "reasoning": 8_000.0}
DEFAULT_CONFIDENCE: Final = 0.2
# Samples after which a latency prediction is fully trusted (before its measured error).
CONFIDENT_SAMPLES: Final = 50
# An EWMA ignores prompt and answer size, so it is trusted less than a fitted model.
EWMA_CONFIDENCE: Final = 0.6
# Samples a region's own latency model needs before it replaces the global one there.
REGION_MIN_SAMPLES: Final = 10
# When a provider gives no reset time, a rate-limit observation holds this long.
DEFAULT_RESET_S: Final = 60.0
# A context-window check assumes this many output tokens when the request sets no limit.
DEFAULT_OUTPUT_ALLOWANCE: Final = 1_024

DEFAULT_MAX_CANDIDATES: Final = 3
DEFAULT_EQUAL_SCORE_BAND: Final = 0.1
DEFAULT_WEIGHT_FLOOR: Final = 0.05
DEFAULT_HEADROOM_RESERVE: Final = 0.02

# Scoring (see switchyard.router.plan): (cost, latency, quality, health) weights per strategy.
STRATEGY_WEIGHTS: Final[Mapping[int, tuple[float, float, float, float]]] = {
    common_pb2.ROUTING_PREFERENCE_COST: (0.7, 0.1, 0.1, 0.1),
    common_pb2.ROUTING_PREFERENCE_LATENCY: (0.1, 0.7, 0.1, 0.1),
    common_pb2.ROUTING_PREFERENCE_QUALITY: (0.1, 0.1, 0.7, 0.1),
    common_pb2.ROUTING_PREFERENCE_BALANCED: (0.3, 0.25, 0.3, 0.15),
}
# The COST strategy prefers models at or above this quality (relaxed when none is).
QUALITY_FLOOR: Final = 60
# Rank tiers are multiples of this, far above any score, so one float orders tier then score.
TIER_STEP: Final = 10.0
_PREFERENCES: Final = range(max(STRATEGY_WEIGHTS) + 1)

# `ModelRoute.breaker`: what the breakers say about a model.
BREAKER_CLOSED: Final = 0
BREAKER_OPEN: Final = 1
PROVIDER_DOWN: Final = 2
BREAKER_HALF_OPEN: Final = 3

_CAPABILITY_ENUM: Final = {cap: common_pb2.Capability.Value(f"CAPABILITY_{cap.name}") for cap in Capability}
_CATEGORY_ENUM: Final = {
    name: common_pb2.ModelCategory.Value(f"MODEL_CATEGORY_{name.upper()}") for name in CATEGORIES
}
_CATEGORY_NAME: Final = {value: name for name, value in _CATEGORY_ENUM.items()}


def default_settings() -> router_pb2.RoutingSettings:
    """The plan library's knobs when the router sets none."""
    return router_pb2.RoutingSettings(
        max_candidates=DEFAULT_MAX_CANDIDATES,
        equal_score_band=DEFAULT_EQUAL_SCORE_BAND,
        weight_floor=DEFAULT_WEIGHT_FLOOR,
        headroom_reserve=DEFAULT_HEADROOM_RESERVE,
    )


def build_snapshot(
    catalog: Catalog,
    *,
    version: int,
    health: Iterable[health_pb2.ModelHealth] = (),
    weights: Mapping[str, float] | None = None,
    settings: router_pb2.RoutingSettings | None = None,
    now: datetime | None = None,
) -> router_pb2.RoutingSnapshot:
    """Everything an edge needs to plan, from the catalog and the health monitor's entries.

    Prices are those in effect at `now` (default: the current time). Weights default to those
    `compute_weights` derives from `health` (1.0 for every model without health data).
    """
    moment = now or datetime.now(UTC)
    routing = settings if settings is not None else default_settings()
    entries = list(health)
    generated_at = timestamp_pb2.Timestamp()
    generated_at.FromDatetime(moment.astimezone(UTC))
    snapshot = router_pb2.RoutingSnapshot(version=version, generated_at=generated_at, settings=routing)
    for name, provider in catalog.providers.items():
        snapshot.providers.add(
            name=name,
            vendor=provider.vendor,
            region=provider.region,
            free_tier=provider.free_tier,
            adapter_target=provider.adapter or "",
        )
    for model in catalog.models:
        snapshot.models.append(_model_info(catalog, model, moment))
        if model.fallbacks:
            snapshot.fallbacks.add(model=model.id, fallbacks=model.fallbacks)
    # Catalog aliases first: they win over a model's own alias of the same name (as in Catalog.resolve).
    for alias, target in catalog.aliases.items():
        snapshot.aliases.add(alias=alias, models=[target])
    for model in catalog.models:
        for alias in model.aliases:
            snapshot.aliases.add(alias=alias, models=[model.id])
    for tenant_id, tenant in catalog.tenants.items():
        snapshot.tenants.add(
            tenant_id=tenant_id,
            tier=tenant.tier,
            allowed_models=tenant.allowed_models,
            rules_json=rules_to_json(tenant.routing_rules) if tenant.routing_rules else "",
        )
    snapshot.health.extend(entries)
    all_weights = {weight_key(m.provider, m.id): UNMEASURED_WEIGHT for m in catalog.models}
    if weights is not None:
        all_weights.update(weights)
    elif entries:
        all_weights.update(compute_weights(entries, floor=routing.weight_floor))
    snapshot.weights.update(all_weights)
    for entry in entries:
        if entry.model and entry.latency_fit_samples > 0:
            snapshot.latency_models.add(
                model=entry.model,
                provider=entry.provider,
                base_ms=entry.latency_base_ms,
                ms_per_input_token=entry.latency_ms_per_input_token,
                ms_per_output_token=entry.latency_ms_per_output_token,
                samples=entry.latency_fit_samples,
                prediction_error=entry.latency_prediction_error,
                output_reach=entry.latency_fit_output_reach,
            )
            for measured in entry.regions:
                if measured.samples > 0:
                    snapshot.latency_models.add(
                        model=entry.model,
                        provider=entry.provider,
                        base_ms=measured.latency_base_ms,
                        ms_per_input_token=measured.latency_ms_per_input_token,
                        ms_per_output_token=measured.latency_ms_per_output_token,
                        samples=measured.samples,
                        prediction_error=measured.latency_prediction_error,
                        output_reach=measured.latency_fit_output_reach,
                        region=measured.region,
                    )
    if catalog.default_model is not None:
        default = catalog.resolve(catalog.default_model)
        snapshot.default_model = default.id if default is not None else ""
    return snapshot


def _model_info(catalog: Catalog, model: Model, moment: datetime) -> common_pb2.ModelInfo:
    provider = catalog.providers[model.provider]
    unit = prices_at(model, moment).unit_prices()
    pricing = common_pb2.Pricing(
        input_micros_per_million=unit.input,
        output_micros_per_million=unit.output,
        cached_input_micros_per_million=unit.cached_input,
        reasoning_micros_per_million=unit.reasoning,
        cache_write_input_micros_per_million=unit.cache_write_input,
    )
    in_effect = [change for change in model.price_changes if change.effective_from <= moment]
    if in_effect:
        pricing.effective_from.FromDatetime(in_effect[-1].effective_from)
    return common_pb2.ModelInfo(
        id=model.id,
        provider=model.provider,
        vendor=provider.vendor,
        upstream_model=model.upstream_model,
        context_window_tokens=model.context_window,
        max_output_tokens=model.max_output_tokens,
        capabilities=[_CAPABILITY_ENUM[cap] for cap in model.capabilities],
        category=_CATEGORY_ENUM[model.category.value],
        quality_score=model.quality,
        pricing=pricing,
        aliases=model.aliases,
        region=provider.region,
        free_tier=provider.free_tier,
    )


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """One model as planning sees it: the catalog's facts and the health monitor's verdicts.

    Prices are micro-USD per 1M tokens; `output_price` is what expected output costs (the
    reasoning price for a reasoning model when that is dearer). `blended2` is input + output
    price, twice the blended price, so a cost cap compares in exact integers. Times are epoch
    seconds; `blocked_until` 0 means no rate-limit block, `tokens_until` 0 means no token
    headroom to check. Latency is predicted as `lat_base + lat_in·input + lat_out·output` ms,
    the output held at `lat_reach` (what the fit has data for; infinite without a fit).

    For a request that sets no output limit: `room` is the prompt that still fits the context
    window, `default_expected` the expected output, and `out_cost` / `out_latency` its cost
    (micro-USD x 1M) and latency (ms, with the base). `statics` and `tiers`, indexed by
    `RoutingPreference`, hold the request-independent part of the score (quality and health)
    and the rank tier (free tier first; under COST, the quality floor next).
    """

    id: str
    provider: str
    vendor: str
    upstream_model: str
    key: str
    context_window: int
    max_output: int
    default_output: int
    expected_output: int
    capabilities: frozenset[int]
    category: str
    quality: int
    input_price: int
    output_price: int
    blended2: int
    region: str
    free_tier: bool
    fallbacks: tuple[str, ...]
    breaker: int
    breaker_detail: str
    trial_key: str
    half_open_trials: int
    health_score: float
    blocked_until: float
    blocked_detail: str
    tokens_remaining: int
    tokens_until: float
    lat_base: float
    lat_in: float
    lat_out: float
    lat_reach: float
    confidence: float
    weight: float
    # Whether any breaker or rate-limit check applies (False lets planning skip them all).
    gated: bool
    room: int
    default_expected: int
    out_cost: int
    out_latency: float
    statics: tuple[float, ...]
    tiers: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class CategorySplit:
    """A category's routes split for the planner's fast path."""

    ungated: tuple[ModelRoute, ...]
    min_room: int
    gated: tuple[ModelRoute, ...]

    @classmethod
    def of(cls, routes: Sequence[ModelRoute]) -> CategorySplit:
        ungated = tuple(r for r in routes if not r.gated)
        return cls(
            ungated,
            min((r.room for r in ungated), default=0),
            tuple(r for r in routes if r.gated),
        )


@dataclass(frozen=True, slots=True)
class TenantRoute:
    """A tenant's tier, allowed models (None: all) and compiled routing rules;
    `needs_task_type` when a rule matches on the task type (planning must classify)."""

    tenant_id: str
    tier: str
    allowed: frozenset[str] | None
    rules: tuple[Rule, ...]
    needs_task_type: bool


class RoutingTable:
    """A routing snapshot compiled for planning; immutable once built."""

    __slots__ = (
        "by_category",
        "by_provider_category",
        "category_split",
        "default_model",
        "equal_score_band",
        "generated_at",
        "headroom_reserve",
        "max_candidates",
        "models",
        "names",
        "providers",
        "region",
        "tenants",
        "version",
        "weight_floor",
        "weights",
    )

    version: int
    generated_at: float
    models: Mapping[str, ModelRoute]
    names: Mapping[str, ModelRoute]
    by_category: Mapping[str, tuple[ModelRoute, ...]]
    by_provider_category: Mapping[tuple[str, str], tuple[ModelRoute, ...]]
    # Per category: its ungated routes, the smallest context room among them, its gated routes;
    # planning keeps every ungated route a simple request fits without checking each.
    category_split: Mapping[str, CategorySplit]
    providers: Mapping[str, router_pb2.ProviderInfo]
    default_model: ModelRoute | None
    tenants: Mapping[str, TenantRoute]
    weights: Mapping[str, float]
    max_candidates: int
    equal_score_band: float
    weight_floor: float
    headroom_reserve: float
    # The region whose measured latency predictions use ("": every region together).
    region: str

    def __init__(self, snapshot: router_pb2.RoutingSnapshot, *, region: str = "") -> None:
        settings = snapshot.settings if snapshot.HasField("settings") else default_settings()
        self.version = snapshot.version
        self.region = region
        self.generated_at = _seconds(snapshot.generated_at) or 0.0
        self.max_candidates = settings.max_candidates or DEFAULT_MAX_CANDIDATES
        self.equal_score_band = max(0.0, settings.equal_score_band)
        self.weight_floor = min(1.0, max(0.0, settings.weight_floor))
        self.headroom_reserve = max(0.0, settings.headroom_reserve)
        self.providers = {p.name: p for p in snapshot.providers}
        self.weights = dict(snapshot.weights)

        model_health: dict[tuple[str, str], health_pb2.ModelHealth] = {}
        provider_health: dict[str, health_pb2.ModelHealth] = {}
        for entry in snapshot.health:
            if entry.model:
                model_health[(entry.provider, entry.model)] = entry
            else:
                provider_health[entry.provider] = entry
        fits = {
            (lm.provider, lm.model): lm for lm in snapshot.latency_models if lm.samples > 0 and not lm.region
        }
        if region:
            # Measured from here, once there is enough of it: another region's latency (or all
            # regions mixed) misleads where network distance differs.
            fits.update(
                ((lm.provider, lm.model), lm)
                for lm in snapshot.latency_models
                if lm.region == region and lm.samples >= REGION_MIN_SAMPLES
            )
        chains = {chain.model: tuple(chain.fallbacks) for chain in snapshot.fallbacks}

        models: dict[str, ModelRoute] = {}
        for info in snapshot.models:
            models[info.id] = self._route(
                info,
                chains.get(info.id, ()),
                model_health.get((info.provider, info.id)),
                provider_health.get(info.provider),
                fits.get((info.provider, info.id)),
            )
        self.models = models

        names: dict[str, ModelRoute] = {}
        for alias in snapshot.aliases:
            target = next((models[m] for m in alias.models if m in models), None)
            if target is not None:
                names.setdefault(alias.alias, target)
        names.update(models)
        self.names = names

        grouped: dict[str, list[ModelRoute]] = {name: [] for name in CATEGORIES}
        for route in models.values():
            grouped.setdefault(route.category, []).append(route)
        self.by_category = {name: tuple(sorted(routes, key=_by_id)) for name, routes in grouped.items()}
        self.category_split = {name: CategorySplit.of(routes) for name, routes in self.by_category.items()}
        by_provider: dict[tuple[str, str], list[ModelRoute]] = {}
        for routes in self.by_category.values():
            for route in routes:
                by_provider.setdefault((route.provider, route.category), []).append(route)
        self.by_provider_category = {key: tuple(routes) for key, routes in by_provider.items()}
        self.default_model = models.get(snapshot.default_model)

        model_ids = set(models)
        alias_names = {alias.alias for alias in snapshot.aliases}
        tenants: dict[str, TenantRoute] = {}
        for tenant in snapshot.tenants:
            rules: tuple[Rule, ...] = ()
            if tenant.rules_json:
                raw = rules_from_json(tenant.rules_json)
                # The snapshot carries no tier list; the catalog validated the rules' tiers already.
                tiers = {tenant.tier, *_rule_tiers(raw)}
                rules = compile_rules(raw, model_ids=model_ids, tiers=tiers, aliases=alias_names)
            allowed = frozenset(tenant.allowed_models) if tenant.allowed_models else None
            needs_task_type = any(rule.conditions.task_types is not None for rule in rules)
            tenants[tenant.tenant_id] = TenantRoute(
                tenant.tenant_id, tenant.tier, allowed, rules, needs_task_type
            )
        self.tenants = tenants

    def _route(
        self,
        info: common_pb2.ModelInfo,
        fallbacks: tuple[str, ...],
        entry: health_pb2.ModelHealth | None,
        provider_entry: health_pb2.ModelHealth | None,
        fit: router_pb2.LatencyModel | None,
    ) -> ModelRoute:
        provider = self.providers.get(info.provider)
        category = _CATEGORY_NAME.get(info.category, "large")
        capabilities = frozenset(info.capabilities)
        reasoning = common_pb2.CAPABILITY_REASONING in capabilities
        pricing = info.pricing
        output_price = pricing.output_micros_per_million
        if reasoning and pricing.reasoning_micros_per_million > output_price:
            output_price = pricing.reasoning_micros_per_million
        key = weight_key(info.provider, info.id)

        breaker, breaker_detail, trial_key, trials = _breaker(info, entry, provider_entry)
        # The provider's error rate aggregates all its models' traffic: one failing model must not
        # weigh on the others, so the provider's entry counts by its (probe-driven) status only.
        health_score = _health_score(entry) * (
            _health_score(provider_entry, error_rate=False) if provider_entry else 1.0
        )
        blocked_until, blocked_detail, tokens_remaining, tokens_until = 0.0, "", 0, 0.0
        for source in (entry, provider_entry):
            if source is not None and source.HasField("headroom"):
                block = _headroom(source.headroom, self.headroom_reserve)
                if block.blocked_until > blocked_until:
                    blocked_until, blocked_detail = block.blocked_until, block.detail
                if block.tokens_until > 0 and (
                    tokens_until == 0 or block.tokens_remaining < tokens_remaining
                ):
                    tokens_remaining, tokens_until = block.tokens_remaining, block.tokens_until

        lat_reach = math.inf
        if fit is not None:
            lat_base, lat_in, lat_out = fit.base_ms, fit.ms_per_input_token, fit.ms_per_output_token
            if fit.output_reach > 0:
                lat_reach = fit.output_reach
            confidence = min(1.0, fit.samples / CONFIDENT_SAMPLES) * (1.0 - min(1.0, fit.prediction_error))
        elif entry is not None and entry.samples > 0 and entry.ewma_latency_ms > 0:
            lat_base, lat_in, lat_out = entry.ewma_latency_ms, 0.0, 0.0
            confidence = min(1.0, entry.samples / CONFIDENT_SAMPLES) * EWMA_CONFIDENCE
        else:
            lat_base, lat_in, lat_out = DEFAULT_LATENCY_MS.get(category, 2_000.0), 0.0, 0.0
            confidence = DEFAULT_CONFIDENCE
        default_output = min(info.max_output_tokens, DEFAULT_OUTPUT_ALLOWANCE)
        expected = EXPECTED_REASONING_OUTPUT_TOKENS if reasoning else EXPECTED_OUTPUT_TOKENS
        default_expected = min(expected, info.max_output_tokens)
        lat_base, lat_in, lat_out = max(0.0, lat_base), max(0.0, lat_in), max(0.0, lat_out)
        statics, tiers = _static_scores(
            info.quality_score, health_score, info.free_tier or bool(provider and provider.free_tier)
        )
        return ModelRoute(
            id=info.id,
            provider=info.provider,
            vendor=info.vendor or (provider.vendor if provider is not None else ""),
            upstream_model=info.upstream_model,
            key=key,
            context_window=info.context_window_tokens,
            max_output=info.max_output_tokens,
            default_output=default_output,
            expected_output=expected,
            capabilities=capabilities,
            category=category,
            quality=info.quality_score,
            input_price=pricing.input_micros_per_million,
            output_price=output_price,
            blended2=pricing.input_micros_per_million + pricing.output_micros_per_million,
            region=info.region or (provider.region if provider is not None else ""),
            free_tier=info.free_tier or (provider.free_tier if provider is not None else False),
            fallbacks=fallbacks,
            breaker=breaker,
            breaker_detail=breaker_detail,
            trial_key=trial_key,
            half_open_trials=trials,
            health_score=health_score,
            blocked_until=blocked_until,
            blocked_detail=blocked_detail,
            tokens_remaining=tokens_remaining,
            tokens_until=tokens_until,
            lat_base=lat_base,
            lat_in=lat_in,
            lat_out=lat_out,
            lat_reach=lat_reach,
            confidence=max(0.0, confidence),
            weight=max(0.0, self.weights.get(key, UNMEASURED_WEIGHT)),
            gated=breaker != BREAKER_CLOSED or blocked_until > 0 or tokens_until > 0,
            room=info.context_window_tokens - default_output,
            default_expected=default_expected,
            out_cost=default_expected * output_price,
            out_latency=lat_base + lat_out * min(default_expected, lat_reach),
            statics=statics,
            tiers=tiers,
        )

    @classmethod
    def from_snapshot(cls, snapshot: router_pb2.RoutingSnapshot, *, region: str = "") -> RoutingTable:
        """Compile a routing snapshot (the router's own or one pushed to an edge), predicting
        latency as measured from `region` where it has been."""
        return cls(snapshot, region=region)

    @classmethod
    def from_catalog(
        cls,
        catalog: Catalog,
        *,
        version: int = 0,
        health: Iterable[health_pb2.ModelHealth] = (),
        settings: router_pb2.RoutingSettings | None = None,
        region: str = "",
    ) -> RoutingTable:
        """The table of `build_snapshot(catalog, ...)`: the same path a pushed snapshot takes."""
        return cls(build_snapshot(catalog, version=version, health=health, settings=settings), region=region)

    def resolve(self, name: str) -> ModelRoute | None:
        """A model id or alias to its model."""
        return self.names.get(name)


def _static_scores(quality: int, health: float, free: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per preference (index = enum value; UNSPECIFIED as BALANCED): the quality and health part
    of the score, and the rank tier."""
    statics: list[float] = []
    tiers: list[float] = []
    for preference in _PREFERENCES:
        weights = STRATEGY_WEIGHTS.get(preference, STRATEGY_WEIGHTS[common_pb2.ROUTING_PREFERENCE_BALANCED])
        statics.append(weights[2] * quality / 100 + weights[3] * health)
        tier = 0.0 if free else 2 * TIER_STEP
        if preference == common_pb2.ROUTING_PREFERENCE_COST and quality < QUALITY_FLOOR:
            tier += TIER_STEP
        tiers.append(tier)
    return tuple(statics), tuple(tiers)


def _by_id(route: ModelRoute) -> str:
    return route.id


def _seconds(stamp: timestamp_pb2.Timestamp) -> float | None:
    """Epoch seconds of a timestamp; None when it is unset."""
    if stamp.seconds == 0 and stamp.nanos == 0:
        return None
    return stamp.seconds + stamp.nanos / 1e9


def _health_score(entry: health_pb2.ModelHealth | None, *, error_rate: bool = True) -> float:
    """1 when healthy or unknown, 0.5 when degraded (or half-open), 0.25 when down; scaled down
    by the error rate unless `error_rate` is False."""
    if entry is None:
        return 1.0
    status = entry.status
    if status == health_pb2.HEALTH_STATUS_DEGRADED or entry.breaker == health_pb2.BREAKER_STATE_HALF_OPEN:
        base = 0.5
    elif status == health_pb2.HEALTH_STATUS_DOWN:
        base = 0.25
    else:
        base = 1.0
    if not error_rate:
        return base
    return base * (1.0 - min(1.0, max(0.0, entry.error_rate)))


def _breaker(
    info: common_pb2.ModelInfo,
    entry: health_pb2.ModelHealth | None,
    provider_entry: health_pb2.ModelHealth | None,
) -> tuple[int, str, str, int]:
    """(state, detail, trial key, trials) for a model, from its own and its provider's entry."""
    if provider_entry is not None and (
        provider_entry.status == health_pb2.HEALTH_STATUS_DOWN
        or provider_entry.breaker == health_pb2.BREAKER_STATE_OPEN
    ):
        why = f": {provider_entry.reason}" if provider_entry.reason else ""
        return PROVIDER_DOWN, f"provider {info.provider} down{why}", "", 0
    if entry is not None and entry.breaker == health_pb2.BREAKER_STATE_OPEN:
        why = f" ({entry.reason})" if entry.reason else ""
        return BREAKER_OPEN, f"breaker open{why}", "", 0
    if entry is not None and entry.breaker == health_pb2.BREAKER_STATE_HALF_OPEN:
        return BREAKER_HALF_OPEN, "", weight_key(info.provider, info.id), max(1, entry.half_open_trials)
    if provider_entry is not None and provider_entry.breaker == health_pb2.BREAKER_STATE_HALF_OPEN:
        return BREAKER_HALF_OPEN, "", f"provider:{info.provider}", max(1, provider_entry.half_open_trials)
    return BREAKER_CLOSED, "", "", 0


@dataclass(frozen=True, slots=True)
class _Block:
    blocked_until: float
    detail: str
    tokens_remaining: int
    tokens_until: float


def _headroom(headroom: common_pb2.RateLimitHeadroom, reserve: float) -> _Block:
    """When a provider's rate-limit headroom blocks new requests, and the token headroom left.

    Requests are blocked until the reset when the remaining requests (or tokens) are at or below
    `reserve` of the limit (or zero), and until `observed_at + retry_after` after a retry-after.
    A reset time the provider did not send defaults to `DEFAULT_RESET_S` after the observation;
    without an observation time the block holds until newer data arrives.
    """
    observed = _seconds(headroom.observed_at)
    fallback_reset = observed + DEFAULT_RESET_S if observed is not None else math.inf
    requests_reset = _seconds(headroom.requests_reset_at) or fallback_reset
    tokens_reset = _seconds(headroom.tokens_reset_at) or fallback_reset
    blocked, detail = 0.0, ""
    if headroom.HasField("remaining_requests"):
        remaining = headroom.remaining_requests
        limit = headroom.limit_requests if headroom.HasField("limit_requests") else 0
        if remaining <= 0 or (limit > 0 and remaining <= reserve * limit):
            blocked = requests_reset
            of = f" of {limit}" if limit > 0 else ""
            detail = f"rate-limit headroom: {remaining}{of} requests left until reset"
    tokens_remaining, tokens_until = 0, 0.0
    if headroom.HasField("remaining_tokens"):
        remaining = headroom.remaining_tokens
        limit = headroom.limit_tokens if headroom.HasField("limit_tokens") else 0
        if remaining <= 0 or (limit > 0 and remaining <= reserve * limit):
            if tokens_reset > blocked:
                blocked = tokens_reset
                of = f" of {limit}" if limit > 0 else ""
                detail = f"rate-limit headroom: {remaining}{of} tokens left until reset"
        else:
            tokens_remaining, tokens_until = remaining, tokens_reset
    if headroom.retry_after_ms and observed is not None:
        retry_until = observed + headroom.retry_after_ms / 1000
        if retry_until > blocked:
            blocked = retry_until
            detail = f"rate-limited: retry after {headroom.retry_after_ms} ms"
    return _Block(blocked, detail, tokens_remaining, tokens_until)


def _rule_tiers(raw: Sequence[Mapping[str, Any]]) -> set[str]:
    """The tier names the rules' `when.tier` conditions mention."""
    tiers: set[str] = set()
    for rule in raw:
        when = rule.get("when")
        if not isinstance(when, Mapping):
            continue
        named = when.get("tier")
        if isinstance(named, str):
            tiers.add(named)
        elif isinstance(named, list | tuple):
            tiers.update(str(name) for name in named)
    return tiers
