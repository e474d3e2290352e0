"""Route planning: the ordered candidates for a request, computed on a routing table.

This is a plain library (no gRPC): the router's `Plan` and `Explain` RPCs and every edge (on
the snapshot the router pushed) run the same code, on a table compiled for the edge's region or
the request's `region`. A `Planner` holds the table and the little state planning keeps between
requests: the weighted round-robin position among equals, and the half-open trials this planner
has handed out in each breaker's current half-open episode.

How a plan is made (deterministic given the table and that state):

1. The requested model: an id, an alias, or `auto` / empty. Unknown names are INVALID_ARGUMENT.
2. Classification (task type, complexity, category) for `auto`, and whenever the tenant has
   rules (they may match on the task type); otherwise the caller's task type is reported as is.
3. The tenant's first matching rule: `pin` (only that model, then the rule's fallbacks),
   `exclude`, `prefer` (to the front, in order), `cap_cost_per_million` (tightens the cost cap)
   and `fallbacks` (replace the model's chain; for `auto` they follow the first pick).
4. Candidates: an explicit model, its fallback chain, then same-category models of other
   providers (ranked); `auto`: every model of the classified category (ranked), widened to
   other categories when none passes the filters.
5. Filters, each with a reason Explain shows: allowed models, rule excludes, capabilities,
   context window, required region, cost cap, breakers (open; half-open after its trials),
   rate-limit headroom.
6. Ranking by a strategy (the request's preference): components normalised 0..1 over the
   candidates (cost and latency as best / this; latency with `LATENCY_OFFSET_MS` added to both,
   so milliseconds of noise between fast models do not split them), mixed by
   `STRATEGY_WEIGHTS`, plus a region bonus (a tiebreak: the predicted latency already is what
   was measured from the table's region, see `table.py`). Free-tier models with headroom come
   first in every strategy, and the COST strategy puts models of quality >= `QUALITY_FLOOR`
   before the others.
7. Among the leading equals (same rank tier and region match, scores within `equal_score_band`
   of the best) the first position rotates by smooth weighted round robin on the table's
   weights, each member keeping at least `weight_floor` of the share. A half-open model with
   trials left goes first among the ranked ones, so its breaker can close again; a plan it
   leads counts one of its trials, until the breaker leaves half-open.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final

import grpc

from switchyard.common.catalog import Catalog
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.router.classify import classify
from switchyard.router.rules import Rule, RuleContext, first_match
from switchyard.router.table import (
    BREAKER_HALF_OPEN,
    BREAKER_OPEN,
    PROVIDER_DOWN,
    QUALITY_FLOOR,
    STRATEGY_WEIGHTS,
    ModelRoute,
    RoutingTable,
    default_settings,
)
from switchyard.router.weights import LATENCY_OFFSET_MS
from switchyard.v1 import common_pb2, router_pb2

__all__ = [
    "AUTO",
    "MAX_CANDIDATES",
    "QUALITY_FLOOR",
    "STRATEGY_WEIGHTS",
    "Explanation",
    "Planner",
    "RoutePlan",
    "ScoredRow",
    "plan_response",
    "plan_route",
]

AUTO = "auto"
MAX_CANDIDATES = 3
# Added to the score of a model in the requested region (half of it elsewhere).
REGION_BONUS: Final = 0.1
# `auto` widens to these categories, in order, when none of the classified one passes the filters.
WIDENING: Final[Mapping[str, tuple[str, ...]]] = {
    "reasoning": ("reasoning", "large", "small"),
    "large": ("large", "reasoning", "small"),
    "small": ("small", "large"),
}
# Round-robin groups remembered at most (one per distinct set of equals).
_MAX_GROUPS: Final = 4_096
_NO_CAP: Final = 1 << 62
_MAX_LATENCY_MS: Final = 2**32 - 1

_TASK_NAMES: Final[Mapping[int, str]] = {
    value: name.removeprefix("TASK_TYPE_").lower() for name, value in common_pb2.TaskType.items()
}
_PREFERENCE_NAMES: Final[Mapping[int, str]] = {
    value: name.removeprefix("ROUTING_PREFERENCE_").lower()
    for name, value in common_pb2.RoutingPreference.items()
}
_CATEGORY_ENUM: Final = {
    "small": common_pb2.MODEL_CATEGORY_SMALL,
    "large": common_pb2.MODEL_CATEGORY_LARGE,
    "reasoning": common_pb2.MODEL_CATEGORY_REASONING,
}
_CAPABILITY_NAMES: Final[Mapping[int, str]] = {
    common_pb2.CAPABILITY_TOOLS: "tools",
    common_pb2.CAPABILITY_VISION: "vision",
    common_pb2.CAPABILITY_JSON_MODE: "json_mode",
    common_pb2.CAPABILITY_JSON_SCHEMA: "json_schema",
}

# Filter kinds: the short reasons a NO_ROUTE summary counts (Explain shows the details).
NOT_ALLOWED_TENANT: Final = "not allowed for tenant"
NOT_ALLOWED_CALLER: Final = "not allowed for caller"
CONTEXT_TOO_SMALL: Final = "context window too small"
OVER_COST_CAP: Final = "over cost cap"
BREAKER_IS_OPEN: Final = "breaker open"
PROVIDER_IS_DOWN: Final = "provider down"
TRIALS_USED: Final = "breaker half-open, trials used"
NO_HEADROOM: Final = "rate-limit headroom"
# Filter kinds that come from the health picture rather than from the request.
HEALTH_KINDS: Final = frozenset({BREAKER_IS_OPEN, PROVIDER_IS_DOWN, TRIALS_USED, NO_HEADROOM})
PANIC_NOTE: Final = " (every candidate gated by health: trying anyway)"


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """The candidates to try, in order, and what the plan was based on."""

    candidates: tuple[router_pb2.Candidate, ...]
    version: int
    task_type: int
    matched_rule: str
    complexity: float
    category: str
    preference: int


@dataclass(frozen=True, slots=True)
class ScoredRow:
    """One row of Explain: a candidate considered, whether a filter removed it, its score parts
    and its 1-based position in the plan (0 when filtered or beyond the plan's length)."""

    candidate: router_pb2.Candidate
    filtered: bool
    filter_reason: str
    components: Mapping[str, float]
    rank: int


@dataclass(frozen=True, slots=True)
class Explanation:
    """The whole scoring table for a request. `plan` is None when nothing can serve it; the
    remaining fields say what the plan was (or would have been) based on."""

    plan: RoutePlan | None
    rows: tuple[ScoredRow, ...]
    version: int = 0
    task_type: int = 0
    matched_rule: str = ""
    complexity: float = 0.0
    category: str = ""
    preference: int = 0

    def to_proto(self) -> router_pb2.ExplainResponse:
        """The `ExplainResponse` message."""
        return router_pb2.ExplainResponse(
            rows=[
                router_pb2.ScoredCandidate(
                    candidate=row.candidate,
                    filtered=row.filtered,
                    filter_reason=row.filter_reason,
                    score_components=dict(row.components),
                    rank=row.rank,
                )
                for row in self.rows
            ],
            snapshot_version=self.version,
            task_type=self.task_type,  # type: ignore[arg-type]
            complexity=self.complexity,
            category=_CATEGORY_ENUM.get(self.category, common_pb2.MODEL_CATEGORY_UNSPECIFIED),
            matched_rule=self.matched_rule,
            preference=self.preference,  # type: ignore[arg-type]
        )


def _utc_now() -> datetime:
    return datetime.now(UTC)


def plan_response(plan: RoutePlan) -> router_pb2.PlanResponse:
    """The `PlanResponse` message for a plan."""
    return router_pb2.PlanResponse(
        candidates=plan.candidates,
        snapshot_version=plan.version,
        task_type=plan.task_type,  # type: ignore[arg-type]
        matched_rule=plan.matched_rule,
    )


class _Need:
    """What one request asks of a model, flattened for the filter loop."""

    __slots__ = (
        "allowed_caller",
        "allowed_tenant",
        "cap2",
        "cap_source",
        "caps",
        "context_tokens",
        "exclude_kind",
        "excluded",
        "half_open",
        "input_tokens",
        "now_s",
        "panic",
        "region",
        "region_kind",
        "region_required",
        "req_max",
        "simple",
        "trials",
    )

    def __init__(
        self,
        request: common_pb2.ChatRequest,
        input_tokens: int,
        now_s: float,
        trials: Mapping[str, int],
        context_tokens: int | None = None,
    ) -> None:
        self.input_tokens = max(0, input_tokens)
        # What the prompt fills of a context window (images a model bills at a multiple count
        # at their standard size); the input tokens otherwise.
        self.context_tokens = self.input_tokens if context_tokens is None else max(0, context_tokens)
        self.now_s = now_s
        self.trials = trials
        sampling = request.sampling
        self.req_max = sampling.max_output_tokens if sampling.HasField("max_output_tokens") else 0
        self.caps = _needed_capabilities(request)
        routing = request.routing
        self.region = routing.region
        self.region_required = bool(routing.region) and routing.region_required
        self.region_kind = f"region {routing.region} required" if self.region_required else ""
        cap = routing.max_cost_per_million_tokens_micros
        self.cap2 = 2 * cap if cap > 0 else _NO_CAP
        self.cap_source = "request cap"
        self.allowed_tenant: frozenset[str] | None = None
        self.allowed_caller: frozenset[str] | None = None
        self.excluded: frozenset[str] = frozenset()
        self.exclude_kind = ""
        self.simple = False
        # Set when a half-open model passed the filters (it goes first, as a trial).
        self.half_open = False
        # Set when every candidate was gated by health: the health gates are ignored.
        self.panic = False

    def finish(self) -> None:
        """Note whether only the context window and breaker/headroom checks can reject a model."""
        self.simple = (
            self.allowed_tenant is None
            and self.allowed_caller is None
            and not self.excluded
            and not self.caps
            and not self.region_required
            and self.cap2 == _NO_CAP
        )

    def apply_rule(self, rule: Rule) -> None:
        """Fold the rule's excludes and cost cap in."""
        actions = rule.actions
        if actions.exclude:
            self.excluded = actions.exclude
            self.exclude_kind = f"excluded by {rule.label}"
        cap = actions.cap_cost_per_million_micros
        if cap is not None and 2 * cap < self.cap2:
            self.cap2 = 2 * cap
            self.cap_source = f"cap of {rule.label}"

    def output_tokens(self, route: ModelRoute) -> int:
        """Expected output tokens on `route` (for cost, latency and token headroom)."""
        limit = self.req_max or route.max_output
        return route.expected_output if route.expected_output < limit else limit

    def reject(self, r: ModelRoute) -> str | None:
        """Why `r` cannot serve this request (a filter kind), or None."""
        if self.allowed_tenant is not None and r.id not in self.allowed_tenant:
            return NOT_ALLOWED_TENANT
        if self.allowed_caller is not None and r.id not in self.allowed_caller:
            return NOT_ALLOWED_CALLER
        if r.id in self.excluded:
            return self.exclude_kind
        if self.caps and not self.caps <= r.capabilities:
            return "no " + ", ".join(_CAPABILITY_NAMES[c] for c in sorted(self.caps - r.capabilities))
        if r.context_window < self.context_tokens + (self.req_max or r.default_output):
            return CONTEXT_TOO_SMALL
        if self.region_required and r.region != self.region:
            return self.region_kind
        if r.blended2 > self.cap2:
            return OVER_COST_CAP
        if r.gated and not self.panic:
            if r.breaker == PROVIDER_DOWN:
                return PROVIDER_IS_DOWN
            if r.breaker == BREAKER_OPEN:
                return BREAKER_IS_OPEN
            if r.breaker == BREAKER_HALF_OPEN and self.trials.get(r.trial_key, 0) >= r.half_open_trials:
                return TRIALS_USED
            now = self.now_s
            if r.blocked_until > now:
                return NO_HEADROOM
            if r.tokens_until > now and r.tokens_remaining < self.input_tokens + self.output_tokens(r):
                return NO_HEADROOM
        return None

    def detail(self, r: ModelRoute, kind: str) -> str:
        """The Explain text for a filter kind."""
        if kind == CONTEXT_TOO_SMALL:
            needed = self.context_tokens + (self.req_max or r.default_output)
            return f"context window {r.context_window} < {needed} tokens needed"
        if kind == OVER_COST_CAP:
            return (
                f"blended price {_half(r.blended2)} above {self.cap_source} {_half(self.cap2)}"
                " micro-USD per 1M tokens"
            )
        if kind in (BREAKER_IS_OPEN, PROVIDER_IS_DOWN):
            return r.breaker_detail or kind
        if kind == TRIALS_USED:
            return f"breaker half-open, trials used ({r.half_open_trials})"
        if kind == NO_HEADROOM:
            if r.blocked_until > self.now_s:
                return r.blocked_detail
            needed = self.input_tokens + self.output_tokens(r)
            return f"rate-limit headroom: {r.tokens_remaining} tokens left, {needed} needed"
        return kind


def _half(doubled: int) -> str:
    return str(doubled // 2) if doubled % 2 == 0 else f"{doubled // 2}.5"


def _needed_capabilities(request: common_pb2.ChatRequest) -> frozenset[int]:
    needed: set[int] = set()
    if request.tools:
        needed.add(common_pb2.CAPABILITY_TOOLS)
    fmt = request.response_format.type
    if fmt == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        needed.add(common_pb2.CAPABILITY_JSON_SCHEMA)
    elif fmt == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        needed.add(common_pb2.CAPABILITY_JSON_MODE)
    for message in request.messages:
        for part in message.parts:
            if part.HasField("image"):
                needed.add(common_pb2.CAPABILITY_VISION)
                return frozenset(needed)
    return frozenset(needed)


class _Entry:
    """A candidate in the plan (or an Explain row): its predictions, score and reason."""

    __slots__ = ("cost", "latency", "parts", "reason", "route", "score")

    def __init__(self, route: ModelRoute, reason: str, cost: int, latency: float, score: float = 0.0) -> None:
        self.route = route
        self.reason = reason
        self.cost = cost
        self.latency = latency
        self.score = score
        self.parts: dict[str, float] | None = None


# A model that passed the filters: (route, reason, predicted cost micros, predicted latency ms).
_Kept = tuple[ModelRoute, str, int, float]
_COST: Final = operator.itemgetter(2)
_LATENCY: Final = operator.itemgetter(3)


@dataclass(slots=True)
class _Evaluation:
    """Everything one evaluation found; `plan` and `explain` read what they need."""

    version: int
    task_type: int
    complexity: float
    category: str
    preference: int
    matched_rule: str
    requested: str
    need: _Need
    scores: _Scores | None = None
    chosen: list[_Entry] = field(default_factory=list)
    ranked_rest: list[_Entry] = field(default_factory=list)
    filtered: list[tuple[ModelRoute, str, str]] = field(default_factory=list)

    def route_plan(self, candidates: tuple[router_pb2.Candidate, ...]) -> RoutePlan:
        """The plan of these candidates, with what this evaluation found."""
        return RoutePlan(
            candidates=candidates,
            version=self.version,
            task_type=self.task_type,
            matched_rule=self.matched_rule,
            complexity=self.complexity,
            category=self.category,
            preference=self.preference,
        )


def _gather(
    routes: Iterable[ModelRoute],
    reason: str,
    need: _Need,
    seen: set[str],
    kept: list[_Kept],
    filtered: list[tuple[ModelRoute, str, str]],
) -> None:
    """Filter `routes` (skipping those already considered) and predict cost and latency of the
    rest. The hot loop of planning: everything is inlined and read into locals."""
    inp = need.input_tokens
    ctx = need.context_tokens  # what the context window holds of the prompt (<= inp)
    req_max = need.req_max
    # Most requests restrict nothing a route carries: only the context window and the
    # breaker/headroom checks (routes flagged `gated`) can reject a model then.
    simple = need.simple
    reject = need.reject
    add_seen = seen.add
    keep = kept.append
    if req_max:
        for r in routes:
            model_id = r.id
            if model_id in seen:
                continue
            add_seen(model_id)
            if not simple or r.gated or r.context_window < ctx + req_max:
                kind = reject(r)
                if kind is not None:
                    filtered.append((r, reason, kind))
                    continue
                if r.breaker == BREAKER_HALF_OPEN:
                    need.half_open = True
            out = r.expected_output if r.expected_output < req_max else req_max
            keep(
                (
                    r,
                    reason,
                    -(-(inp * r.input_price + out * r.output_price) // 1_000_000),
                    r.lat_base + r.lat_in * inp + r.lat_out * (out if out < r.lat_reach else r.lat_reach),
                )
            )
        return
    # No max_output_tokens asked for: the route's precomputed default output (cost, latency).
    for r in routes:
        model_id = r.id
        if model_id in seen:
            continue
        add_seen(model_id)
        if not simple or r.gated or r.room < ctx:
            kind = reject(r)
            if kind is not None:
                filtered.append((r, reason, kind))
                continue
            if r.breaker == BREAKER_HALF_OPEN:
                need.half_open = True
        keep((r, reason, -(-(inp * r.input_price + r.out_cost) // 1_000_000), r.out_latency + r.lat_in * inp))


def _gather_category(
    table: RoutingTable,
    category: str,
    reason: str,
    need: _Need,
    seen: set[str],
    kept: list[_Kept],
    filtered: list[tuple[ModelRoute, str, str]],
) -> None:
    """`_gather` over a category; for a simple request that fits every ungated route's context,
    those are kept without a check each (the common case), and only the gated ones are checked."""
    split = table.category_split.get(category)
    if split is None:
        return
    inp = need.input_tokens
    if not need.simple or need.req_max or need.panic or need.context_tokens > split.min_room:
        _gather(table.by_category[category], reason, need, seen, kept, filtered)
        return
    ungated = [r for r in split.ungated if r.id not in seen] if seen else split.ungated
    seen.update([r.id for r in ungated])
    kept.extend(
        [
            (r, reason, -(-(inp * r.input_price + r.out_cost) // 1_000_000), r.out_latency + r.lat_in * inp)
            for r in ungated
        ]
    )
    _gather(split.gated, reason, need, seen, kept, filtered)


class _Scores:
    """Scores of the kept models, normalised over them (cost and latency as best / this)."""

    __slots__ = ("keys", "locals", "min_cost", "min_latency", "region", "scores", "tiers", "weights")

    def __init__(self, kept: Sequence[_Kept], preference: int, region: str) -> None:
        w_cost, w_latency, w_quality, w_health = self.weights = STRATEGY_WEIGHTS[preference]
        self.region = region
        self.min_cost = min_cost = min(map(_COST, kept))
        self.min_latency = min_latency = min(map(_LATENCY, kept))
        cost_top = w_cost * (min_cost + 1)
        offset = LATENCY_OFFSET_MS
        latency_top = w_latency * (min_latency + offset)
        # The quality, health and free-tier parts per preference are precomputed in the table.
        p = preference
        if not region:
            scores = [
                cost_top / (cost + 1) + latency_top / (latency + offset) + r.statics[p] + REGION_BONUS
                for r, _, cost, latency in kept
            ]
            local = [True] * len(kept)
        else:
            half = REGION_BONUS / 2
            local = [r.region == region for r, _, _, _ in kept]
            scores = [
                cost_top / (cost + 1)
                + latency_top / (latency + offset)
                + r.statics[p]
                + (REGION_BONUS if in_region else half)
                for (r, _, cost, latency), in_region in zip(kept, local, strict=True)
            ]
        tiers = [r.tiers[p] for r, _, _, _ in kept]
        keys = list(map(operator.sub, tiers, scores))
        self.scores = scores
        self.tiers = tiers
        self.keys = keys
        self.locals = local

    def parts(self, route: ModelRoute, cost: int, latency: float) -> dict[str, float]:
        """The named components of a score, for Explain."""
        return {
            "cost": min(1.0, (self.min_cost + 1) / (cost + 1)),
            "latency": min(1.0, (self.min_latency + LATENCY_OFFSET_MS) / (latency + LATENCY_OFFSET_MS)),
            "quality": route.quality / 100,
            "health": route.health_score,
            "region": 1.0 if not self.region or route.region == self.region else 0.5,
            "free": 1.0 if route.free_tier else 0.0,
            "weight": route.weight,
        }

    def score_of(self, route: ModelRoute, cost: int, latency: float) -> float:
        """The score of a model that was not kept (a filtered Explain row)."""
        parts = self.parts(route, cost, latency)
        w_cost, w_latency, w_quality, w_health = self.weights
        return (
            w_cost * parts["cost"]
            + w_latency * parts["latency"]
            + w_quality * parts["quality"]
            + w_health * parts["health"]
            + REGION_BONUS * parts["region"]
        )


class Planner:
    """Plans requests on a routing table; keeps the round-robin and half-open trial state.

    `clock` is the time tenant rules see (hours, weekdays) when a call passes no `now`.
    """

    def __init__(self, table: RoutingTable, *, clock: Callable[[], datetime] = _utc_now) -> None:
        self._table = table
        # Smooth weighted round robin: current weights per group of equals (keys sorted).
        self._rr: dict[tuple[str, ...], list[int]] = {}
        # The integer round-robin weights of each group on the current table (its weights and floor).
        self._rr_weights: dict[tuple[str, ...], list[int]] = {}
        # Half-open trials handed out while each breaker has been half-open, by trial key.
        self._trials: dict[str, int] = {}
        self._clock = clock

    @property
    def table(self) -> RoutingTable:
        """The table plans are made on."""
        return self._table

    def swap(self, table: RoutingTable) -> None:
        """Plan on `table` from now on; round-robin positions carry over, and so do the trials
        of a breaker that is still half-open. Statistics alone make a new snapshot up to once
        a second, so a count reset per version would let a half-open model take a few trials
        per edge per second instead of a few per episode. Between two episodes a breaker
        leaves half-open (closed by a trial's success, or open again for `open_s` after a
        failure), and the snapshot that shows it so ends the count."""
        self._rr_weights = {}
        trials = self._trials
        if trials:
            half_open = {r.trial_key for r in table.models.values() if r.breaker == BREAKER_HALF_OPEN}
            for key in [key for key in trials if key not in half_open]:
                del trials[key]
        self._table = table

    def plan(
        self,
        request: common_pb2.ChatRequest,
        *,
        tenant_id: str = "",
        input_tokens: int = 0,
        allowed_models: frozenset[str] | None = None,
        tier: str | None = None,
        now: datetime | None = None,
        context_tokens: int | None = None,
    ) -> RoutePlan:
        """The candidates for `request`, best first, at most the table's `max_candidates`.

        Raises INVALID_ARGUMENT (field "model") for an unknown model and FAILED_PRECONDITION /
        NO_ROUTE when no candidate passes the filters. Advances the round robin and counts
        half-open trials.
        """
        ev = self._evaluate(
            request, tenant_id, input_tokens, allowed_models, tier, now, context_tokens, explain=False
        )
        if not ev.chosen:
            raise _no_route(ev)
        return ev.route_plan(tuple(_candidate(e) for e in ev.chosen))

    def explain(
        self,
        request: common_pb2.ChatRequest,
        *,
        tenant_id: str = "",
        input_tokens: int = 0,
        allowed_models: frozenset[str] | None = None,
        tier: str | None = None,
        now: datetime | None = None,
        context_tokens: int | None = None,
    ) -> Explanation:
        """Every candidate considered, filtered ones included, with score components and the
        rank each has in the plan `plan` would return now. Changes no planner state."""
        ev = self._evaluate(
            request, tenant_id, input_tokens, allowed_models, tier, now, context_tokens, explain=True
        )
        rows: list[ScoredRow] = []
        for rank, entry in enumerate(ev.chosen, start=1):
            rows.append(ScoredRow(_candidate(entry), False, "", entry.parts or {}, rank))
        for entry in ev.ranked_rest:
            rows.append(ScoredRow(_candidate(entry), False, "", entry.parts or {}, 0))
        need = ev.need
        predicted = [
            (r, reason, *_predict(r, need.input_tokens, need.output_tokens(r)))
            for r, reason, _ in ev.filtered
        ]
        scores = ev.scores
        if scores is None and predicted:
            # Nothing passed the filters: normalise over the filtered ones.
            scores = _Scores(predicted, ev.preference, need.region)
        for (route, reason, kind), (_, _, cost, latency) in zip(ev.filtered, predicted, strict=True):
            assert scores is not None
            entry = _Entry(route, reason, cost, latency, scores.score_of(route, cost, latency))
            parts = scores.parts(route, cost, latency)
            rows.append(ScoredRow(_candidate(entry), True, need.detail(route, kind), parts, 0))
        plan = ev.route_plan(tuple(row.candidate for row in rows[: len(ev.chosen)])) if ev.chosen else None
        return Explanation(
            plan=plan,
            rows=tuple(rows),
            version=ev.version,
            task_type=ev.task_type,
            matched_rule=ev.matched_rule,
            complexity=ev.complexity,
            category=ev.category,
            preference=ev.preference,
        )

    def _evaluate(
        self,
        request: common_pb2.ChatRequest,
        tenant_id: str,
        input_tokens: int,
        allowed_models: frozenset[str] | None,
        tier: str | None,
        now: datetime | None,
        context_tokens: int | None,
        *,
        explain: bool,
    ) -> _Evaluation:
        table = self._table
        name = request.model.strip()
        if not name and table.default_model is not None:
            # No model named: the catalog's default, as if it had been asked for.
            name = table.default_model.id
        auto = name in ("", AUTO)
        requested: ModelRoute | None = None
        if not auto:
            requested = table.names.get(name)
            if requested is None:
                raise invalid(f"unknown model or alias {name!r}", "model", model=name)
        moment = now if now is not None else self._clock()
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        elif moment.tzinfo is not UTC:
            # Rules name UTC hours and weekdays: an aware time in another zone is converted.
            moment = moment.astimezone(UTC)
        need = _Need(request, input_tokens, moment.timestamp(), self._trials, context_tokens)
        tenant = table.tenants.get(tenant_id)
        rules: Sequence[Rule] = ()
        if tenant is not None:
            rules = tenant.rules
            need.allowed_tenant = tenant.allowed
        need.allowed_caller = allowed_models

        routing = request.routing
        preference = routing.preference or common_pb2.ROUTING_PREFERENCE_BALANCED
        if preference not in STRATEGY_WEIGHTS:
            preference = common_pb2.ROUTING_PREFERENCE_BALANCED
        if auto or (tenant is not None and tenant.needs_task_type):
            classified = classify(request)
            task_type, complexity, category = classified.task_type, classified.complexity, classified.category
        else:
            assert requested is not None
            task_type, complexity, category = routing.task_type, 0.0, requested.category

        rule: Rule | None = None
        if rules:
            estimate_on = requested if requested is not None else table.default_model
            estimate = 0
            if estimate_on is not None:
                estimate = _predict(estimate_on, need.input_tokens, need.output_tokens(estimate_on))[0]
            context = RuleContext(
                requested=name if not auto else AUTO,
                resolved=requested.id if requested is not None else None,
                task_type=task_type,
                tags=request.metadata.tags,
                tier=tier if tier is not None else (tenant.tier if tenant is not None else ""),
                now=moment,
                estimated_cost_micros=estimate,
            )
            rule = first_match(rules, context)
            if rule is not None:
                need.apply_rule(rule)
        need.finish()

        ev = _Evaluation(
            version=table.version,
            task_type=task_type,
            complexity=complexity,
            category=category,
            preference=preference,
            matched_rule=rule.label if rule is not None else "",
            requested=name or AUTO,
            need=need,
        )
        names = table.names
        actions = rule.actions if rule is not None else None
        label = rule.label if rule is not None else ""
        rule_fallbacks: list[ModelRoute] = []
        if actions is not None and actions.fallbacks is not None:
            rule_fallbacks = [r for r in (names.get(m) for m in actions.fallbacks) if r is not None]

        def collect() -> tuple[list[_Kept], list[_Kept], list[_Kept], list[_Kept]]:
            """(preferred, fixed, ranked, extra) after the filters."""
            seen: set[str] = set()
            filtered = ev.filtered
            preferred: list[_Kept] = []
            fixed: list[_Kept] = []
            ranked: list[_Kept] = []
            extra: list[_Kept] = []  # auto: the rule's fallbacks outside the ranked category
            if actions is not None and actions.prefer:
                wanted = [r for r in (names.get(m) for m in actions.prefer) if r is not None]
                _gather(wanted, f"{label}: prefer", need, seen, preferred, filtered)

            if actions is not None and actions.pin is not None:
                pinned = names.get(actions.pin)
                if pinned is not None:
                    _gather((pinned,), f"{label}: pin", need, seen, fixed, filtered)
                    ev.category = pinned.category
                _gather(rule_fallbacks, f"{label}: fallback", need, seen, fixed, filtered)
            elif requested is not None:
                why = "requested model" if requested.id == name else f"alias {name!r}"
                _gather((requested,), why, need, seen, fixed, filtered)
                if actions is not None and actions.fallbacks is not None:
                    _gather(rule_fallbacks, f"{label}: fallback", need, seen, fixed, filtered)
                else:
                    chain = [r for r in (table.models.get(m) for m in requested.fallbacks) if r is not None]
                    _gather(chain, f"fallback of {requested.id}", need, seen, fixed, filtered)
                # The requested model's provider is already represented; the tail spreads the risk.
                seen.update(
                    r.id for r in table.by_provider_category.get((requested.provider, requested.category), ())
                )
                why = f"same category ({requested.category}) from another provider"
                _gather_category(table, requested.category, why, need, seen, ranked, filtered)
            else:
                task = _TASK_NAMES.get(task_type, "unknown")
                pref = _PREFERENCE_NAMES[preference]
                for used in WIDENING.get(category, (category,)):
                    why = f"auto: {task}, complexity {complexity:.2f} → {category}, "
                    why += f"{pref}" if used == category else f"widened to {used}, {pref}"
                    _gather_category(table, used, why, need, seen, ranked, filtered)
                    if ranked:
                        ev.category = used
                        break
                if actions is not None and actions.pin is None and rule_fallbacks:
                    _gather(rule_fallbacks, f"{label}: fallback", need, seen, extra, filtered)
            return preferred, fixed, ranked, extra

        preferred, fixed, ranked, extra = collect()
        if not (preferred or fixed or ranked or extra) and any(
            kind in HEALTH_KINDS for *_, kind in ev.filtered
        ):
            # A stale or pessimistic health picture must not refuse what could be served: with
            # every candidate gated by health, they are tried anyway, in the usual order.
            need.panic = True
            ev.filtered.clear()
            preferred, fixed, ranked, extra = (_noted(part, PANIC_NOTE) for part in collect())
        kept = preferred + fixed + ranked + extra
        if not kept:
            return ev
        scores = _Scores(kept, preference, need.region)
        ev.scores = scores
        base = len(preferred) + len(fixed)
        order = sorted(range(base, base + len(ranked)), key=scores.keys.__getitem__)
        reasons: dict[int, str] = {}
        if len(order) > 1:
            self._rotate(order, kept, scores, table, commit=not explain)
        if need.half_open:
            for position, index in enumerate(order):
                if kept[index][0].breaker == BREAKER_HALF_OPEN:
                    # A half-open model's trials go first, so its breaker can close again.
                    order.insert(0, order.pop(position))
                    reasons[index] = kept[index][1] + " (half-open trial)"
                    break
        if rule_fallbacks and requested is None and order:
            order = _splice_fallbacks(order, kept, base + len(ranked), rule_fallbacks, label, reasons)
        sequence = [*range(base), *order]
        limit = table.max_candidates
        scored = scores.scores

        def entry(index: int) -> _Entry:
            route, reason, cost, latency = kept[index]
            made = _Entry(route, reasons.get(index, reason), cost, latency, scored[index])
            if explain:
                made.parts = scores.parts(route, cost, latency)
            return made

        ev.chosen = [entry(i) for i in sequence[:limit]]
        if explain:
            ev.ranked_rest = [entry(i) for i in sequence[limit:]]
        elif ev.chosen and (lead := ev.chosen[0].route).breaker == BREAKER_HALF_OPEN:
            # Only the lead is surely tried. A trial counted for a model listed further down
            # (tried only if those before it fail) would be spent without an outcome, and the
            # count lasts the episode: the breaker could stay half-open with no trial left.
            self._trials[lead.trial_key] = self._trials.get(lead.trial_key, 0) + 1
        return ev

    def _rotate(
        self, order: list[int], kept: Sequence[_Kept], scores: _Scores, table: RoutingTable, *, commit: bool
    ) -> None:
        """Put the round robin's pick among the leading equals first: same rank tier and region
        match as the best, score within `equal_score_band` of it."""
        values, tiers, local = scores.scores, scores.tiers, scores.locals
        best = order[0]
        best_score, best_tier, best_local = values[best], tiers[best], local[best]
        floor = best_score * (1.0 - table.equal_score_band) if best_score > 0 else best_score
        group = [best]
        for index in order[1:]:
            if tiers[index] != best_tier or values[index] < floor:
                break
            if local[index] == best_local:
                group.append(index)
        if len(group) < 2:
            return
        picked = group[self._round_robin([kept[i][0] for i in group], table.weight_floor, commit=commit)]
        if picked != best:
            order.remove(picked)
            order.insert(0, picked)

    def _round_robin(self, group: list[ModelRoute], weight_floor: float, *, commit: bool) -> int:
        """Smooth weighted round robin (nginx): the index in `group` that goes first now."""
        members = sorted(range(len(group)), key=lambda i: group[i].key)
        keys = tuple(group[i].key for i in members)
        weights = self._rr_weights.get(keys)
        if weights is None:
            shares = _floored_shares([group[i].weight for i in members], weight_floor)
            weights = [max(1, round(share * 10_000)) for share in shares]
            if len(self._rr_weights) >= _MAX_GROUPS:
                self._rr_weights.clear()
            self._rr_weights[keys] = weights
        state = self._rr.get(keys)
        current = list(state) if state is not None else [0] * len(keys)
        total = sum(weights)
        best = 0
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= total
        if commit:
            if state is None and len(self._rr) >= _MAX_GROUPS:
                self._rr.clear()
            self._rr[keys] = current
        return members[best]


def _floored_shares(weights: list[float], floor: float) -> list[float]:
    """Shares proportional to `weights`, each at least `floor` (all equal when n·floor >= 1)."""
    n = len(weights)
    if n * floor >= 1.0:
        return [1.0 / n] * n
    pinned: set[int] = set()
    while True:
        free = [i for i in range(n) if i not in pinned]
        mass = sum(weights[i] for i in free)
        budget = 1.0 - floor * len(pinned)
        shares = [floor] * n
        for i in free:
            shares[i] = budget * weights[i] / mass if mass > 0 else budget / len(free)
        low = {i for i in free if shares[i] < floor}
        if not low:
            return shares
        pinned |= low


def _splice_fallbacks(
    order: list[int],
    kept: Sequence[_Kept],
    extra_from: int,
    fallbacks: list[ModelRoute],
    label: str,
    reasons: dict[int, str],
) -> list[int]:
    """`auto` with a rule's fallbacks: the first pick, then the fallbacks that passed the
    filters (in the rule's order, from the ranking or outside it), then the rest."""
    head, rest = order[0], order[1:]
    pool = {kept[i][0].id: i for i in (*rest, *range(extra_from, len(kept)))}
    middle: list[int] = []
    for route in fallbacks:
        index = pool.pop(route.id, None)
        if index is not None:
            reasons[index] = f"{label}: fallback"
            middle.append(index)
    taken = set(middle)
    return [head, *middle, *(i for i in rest if i not in taken)]


def _predict(route: ModelRoute, input_tokens: int, output_tokens: int) -> tuple[int, float]:
    """(expected cost in micro-USD, rounded up; predicted latency in ms)."""
    micros = input_tokens * route.input_price + output_tokens * route.output_price
    reach = min(output_tokens, route.lat_reach)
    return -(-micros // 1_000_000), route.lat_base + route.lat_in * input_tokens + route.lat_out * reach


def _candidate(entry: _Entry) -> router_pb2.Candidate:
    route = entry.route
    latency = entry.latency
    return router_pb2.Candidate(
        model=route.id,
        provider=route.provider,
        vendor=route.vendor,
        upstream_model=route.upstream_model,
        reason=entry.reason,
        predicted_cost_micros=entry.cost,
        predicted_latency_ms=min(_MAX_LATENCY_MS, int(latency + 0.5)) if math.isfinite(latency) else 0,
        confidence=route.confidence,
        score=entry.score,
    )


def _noted(kept: list[_Kept], note: str) -> list[_Kept]:
    return [(route, reason + note, cost, latency) for route, reason, cost, latency in kept]


def _no_route(ev: _Evaluation) -> SwitchyardError:
    counts: dict[str, int] = {}
    for _, _, kind in ev.filtered:
        counts[kind] = counts.get(kind, 0) + 1
    summary = ", ".join(f"{kind} ({n})" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    what = f"{len(ev.filtered)} filtered: {summary}" if ev.filtered else "no model to consider"
    return SwitchyardError(
        grpc.StatusCode.FAILED_PRECONDITION,
        Reason.NO_ROUTE,
        f"no candidate can serve {ev.requested!r}: {what}",
        metadata={"model": ev.requested},
    )


def plan_route(
    catalog: Catalog,
    requested: str,
    *,
    allowed_models: frozenset[str] | None = None,
    max_candidates: int = MAX_CANDIDATES,
) -> list[router_pb2.Candidate]:
    """The candidates for a one-message request naming `requested`, on a fresh table of
    `catalog` (no health). Kept for older callers; new code holds a `Planner`."""
    settings = default_settings()
    settings.max_candidates = max_candidates
    planner = Planner(RoutingTable.from_catalog(catalog, settings=settings))
    request = common_pb2.ChatRequest(
        model=requested,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="")])],
    )
    return list(planner.plan(request, allowed_models=allowed_models).candidates)
