"""Planning: candidates, filters, strategies, rules, load balancing and Explain."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import timestamp_pb2

from switchyard.common.catalog import Catalog, parse_catalog
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.router.plan import (
    PANIC_NOTE,
    Explanation,
    Planner,
    RoutePlan,
    ScoredRow,
    plan_response,
    plan_route,
)
from switchyard.router.table import RoutingTable, build_snapshot, default_settings
from switchyard.v1 import common_pb2, health_pb2, router_pb2

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
URL = "http://127.0.0.1:9/v1"

MESH_YAML = f"""
providers:
  alpha: {{vendor: openai, base_url: "{URL}", region: us}}
  beta: {{vendor: anthropic, base_url: "{URL}", region: eu}}
  gamma: {{vendor: mistral, base_url: "{URL}", region: us}}
models:
  - {{id: alpha/small, provider: alpha, upstream_model: a-small, category: small, quality: 70,
     context_window: 8000, max_output_tokens: 1000, prices: {{input: "0.2", output: "0.4"}},
     capabilities: [streaming, tools, json_mode]}}
  - {{id: beta/small, provider: beta, upstream_model: b-small, category: small, quality: 70,
     context_window: 8000, max_output_tokens: 1000, prices: {{input: "0.2", output: "0.4"}},
     capabilities: [streaming, tools, json_mode]}}
  - {{id: gamma/small, provider: gamma, upstream_model: g-small, category: small, quality: 50,
     context_window: 4000, max_output_tokens: 1000, prices: {{input: "0.1", output: "0.2"}},
     capabilities: [streaming]}}
  - {{id: alpha/large, provider: alpha, upstream_model: a-large, category: large, quality: 85,
     context_window: 128000, max_output_tokens: 4000, prices: {{input: "2", output: "8"}},
     capabilities: [streaming, tools, vision, json_mode, json_schema],
     aliases: [smart], fallbacks: [beta/large, alpha/small]}}
  - {{id: beta/large, provider: beta, upstream_model: b-large, category: large, quality: 88,
     context_window: 200000, max_output_tokens: 4000, prices: {{input: "3", output: "15"}},
     capabilities: [streaming, tools, vision, json_schema], fallbacks: [alpha/large]}}
  - {{id: gamma/large, provider: gamma, upstream_model: g-large, category: large, quality: 80,
     context_window: 32000, max_output_tokens: 4000, prices: {{input: "1", output: "3"}},
     capabilities: [streaming, tools]}}
  - {{id: alpha/think, provider: alpha, upstream_model: a-think, category: reasoning, quality: 92,
     context_window: 200000, max_output_tokens: 50000, prices: {{input: "1.1", output: "4.4"}},
     capabilities: [streaming, tools, reasoning]}}
default_model: alpha/small
tenants:
  plain: {{}}
  restricted: {{allowed_models: [alpha/small, gamma/small]}}
  pinned:
    routing_rules: [{{name: pin-gamma, then: {{pin: gamma/large, fallbacks: [alpha/small]}}}}]
  excluder:
    routing_rules: [{{when: {{task_type: [simple_chat]}}, then: {{exclude: [alpha/small]}}}}]
  preferer:
    routing_rules: [{{then: {{prefer: [gamma/small]}}}}]
  capper:
    routing_rules: [{{then: {{cap_cost_per_million_usd: "2"}}}}]
  chainer:
    routing_rules: [{{when: {{model: [alpha/large]}}, then: {{fallbacks: [gamma/large]}}}}]
  autofallback:
    routing_rules: [{{when: {{model: [auto]}}, then: {{fallbacks: [alpha/think]}}}}]
  ordered:
    routing_rules:
      - {{name: team-a, when: {{tags: {{team: a}}}}, then: {{pin: beta/small}}}}
      - {{name: coders, when: {{task_type: [code]}}, then: {{pin: gamma/large}}}}
  tiered:
    tier: free
    routing_rules: [{{when: {{tier: [pro]}}, then: {{pin: gamma/small}}}}]
  spender:
    routing_rules: [{{name: big, when: {{estimated_cost_above_usd: "0.01"}}, then: {{pin: beta/large}}}}]
  office:
    routing_rules: [{{name: day, when: {{hours_utc: "09-17"}}, then: {{pin: gamma/small}}}}]
  nightly:
    routing_rules: [{{name: night, when: {{hours_utc: "22-06"}}, then: {{pin: gamma/small}}}}]
"""
MESH = parse_catalog(MESH_YAML)

TWINS = parse_catalog(
    f"""
providers:
  alpha: {{vendor: openai, base_url: "{URL}", region: us}}
  beta: {{vendor: openai_compatible, base_url: "{URL}", region: us}}
models:
  - {{id: alpha/m, provider: alpha, upstream_model: m, context_window: 8000, max_output_tokens: 500,
     prices: {{input: "0.2", output: "0.4"}}, category: small, quality: 70}}
  - {{id: beta/m, provider: beta, upstream_model: m, context_window: 8000, max_output_tokens: 500,
     prices: {{input: "0.2", output: "0.4"}}, category: small, quality: 70}}
"""
)


def settings(
    *, band: float = 0.0, max_candidates: int = 3, floor: float = 0.05
) -> router_pb2.RoutingSettings:
    value = default_settings()
    value.equal_score_band, value.max_candidates, value.weight_floor = band, max_candidates, floor
    return value


def table(
    catalog: Catalog = MESH,
    *,
    health: Iterable[health_pb2.ModelHealth] = (),
    weights: Mapping[str, float] | None = None,
    version: int = 1,
    band: float = 0.0,
    max_candidates: int = 3,
    floor: float = 0.05,
) -> RoutingTable:
    snapshot = build_snapshot(
        catalog,
        version=version,
        health=health,
        weights=weights,
        settings=settings(band=band, max_candidates=max_candidates, floor=floor),
        now=NOW,
    )
    return RoutingTable.from_snapshot(snapshot)


def planner(catalog: Catalog = MESH, **options: object) -> Planner:
    return Planner(table(catalog, **options))  # type: ignore[arg-type]


def ask(
    model: str = "auto",
    text: str = "hello there",
    *,
    task: int = common_pb2.TASK_TYPE_UNSPECIFIED,
    preference: int = common_pb2.ROUTING_PREFERENCE_UNSPECIFIED,
    tools: bool = False,
    image: bool = False,
    fmt: int = common_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED,
    max_output: int | None = None,
    region: str = "",
    region_required: bool = False,
    cap_micros: int = 0,
    tags: Mapping[str, str] | None = None,
) -> common_pb2.ChatRequest:
    parts = [common_pb2.ContentPart(text=text)]
    if image:
        parts.append(common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://x.test/cat.png")))
    request = common_pb2.ChatRequest(
        model=model,
        messages=[common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts)],
        routing=common_pb2.RoutingHints(
            task_type=task,  # type: ignore[arg-type]
            preference=preference,  # type: ignore[arg-type]
            region=region,
            region_required=region_required,
            max_cost_per_million_tokens_micros=cap_micros,
        ),
        response_format=common_pb2.ResponseFormat(type=fmt),  # type: ignore[arg-type]
        metadata=common_pb2.RequestMetadata(tags=dict(tags or {})),
    )
    if tools:
        request.tools.add(name="lookup", parameters_json_schema='{"type": "object"}')
    if max_output is not None:
        request.sampling.max_output_tokens = max_output
    return request


def ids(plan: RoutePlan) -> list[str]:
    return [c.model for c in plan.candidates]


def stamp(at: datetime) -> timestamp_pb2.Timestamp:
    value = timestamp_pb2.Timestamp()
    value.FromDatetime(at)
    return value


def rows_by_model(explained: Explanation) -> dict[str, ScoredRow]:
    return {row.candidate.model: row for row in explained.rows}


CHAT = common_pb2.TASK_TYPE_SIMPLE_CHAT
CODE = common_pb2.TASK_TYPE_CODE
REASONING = common_pb2.TASK_TYPE_COMPLEX_REASONING


# --- explicit models -------------------------------------------------------------------------


def test_explicit_model_then_its_chain_then_same_category_models_of_other_providers() -> None:
    plan = planner(max_candidates=5).plan(ask("alpha/large"), now=NOW)
    assert ids(plan) == ["alpha/large", "beta/large", "alpha/small", "gamma/large"]
    assert [c.reason for c in plan.candidates] == [
        "requested model",
        "fallback of alpha/large",
        "fallback of alpha/large",
        "same category (large) from another provider",
    ]
    first = plan.candidates[0]
    assert (first.provider, first.vendor, first.upstream_model) == ("alpha", "openai", "a-large")
    assert (plan.version, plan.category, plan.matched_rule) == (1, "large", "")


def test_plans_are_capped_at_max_candidates() -> None:
    assert ids(planner().plan(ask("alpha/large"), now=NOW)) == ["alpha/large", "beta/large", "alpha/small"]


def test_alias_names_the_model_it_resolves_to() -> None:
    plan = planner().plan(ask("smart"), now=NOW)
    assert plan.candidates[0].model == "alpha/large" and plan.candidates[0].reason == "alias 'smart'"


def test_a_fallback_cycle_does_not_repeat_a_model() -> None:
    plan = planner(max_candidates=6).plan(ask("beta/large"), now=NOW)
    assert ids(plan) == ["beta/large", "alpha/large", "gamma/large"]


def test_the_tail_is_ranked_and_the_requested_model_stays_first() -> None:
    # gamma/small scores above the requested alpha/small (cheaper), yet the caller asked for alpha/small.
    assert ids(planner().plan(ask("alpha/small"), now=NOW)) == ["alpha/small", "gamma/small", "beta/small"]
    # Under COST, gamma/small (quality 50) falls below the quality floor and after beta/small.
    cost = planner().plan(ask("alpha/small", preference=common_pb2.ROUTING_PREFERENCE_COST), now=NOW)
    assert ids(cost) == ["alpha/small", "beta/small", "gamma/small"]


def test_when_the_requested_model_cannot_serve_its_chain_does() -> None:
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/large", breaker=health_pb2.BREAKER_STATE_OPEN)
    ]
    plan = planner(health=health).plan(ask("alpha/large"), now=NOW)
    assert ids(plan)[0] == "beta/large" and plan.candidates[0].reason == "fallback of alpha/large"


def test_unknown_model_is_invalid_argument_on_the_model_field() -> None:
    with pytest.raises(SwitchyardError) as caught:
        planner().plan(ask("z/unknown"), now=NOW)
    assert caught.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.metadata == {"field": "model", "model": "z/unknown"}


# --- predictions ---------------------------------------------------------------------------------


def test_predicted_cost_is_exact_integer_micros_rounded_up() -> None:
    plan = planner().plan(ask("alpha/small"), input_tokens=1_000, now=NOW)
    # 1,000 x 0.2 USD/1M + 256 expected output x 0.4 USD/1M = 302.4 micro-USD -> 303.
    assert plan.candidates[0].predicted_cost_micros == 303
    capped = planner().plan(ask("alpha/small", max_output=100), input_tokens=1_000, now=NOW)
    assert capped.candidates[0].predicted_cost_micros == 240  # 200 + 100 x 0.4


def test_reasoning_models_expect_more_output() -> None:
    plan = planner().plan(ask("alpha/think"), input_tokens=0, now=NOW)
    assert plan.candidates[0].predicted_cost_micros == 4_506  # 1,024 x 4.4 = 4,505.6


def test_predicted_latency_from_the_fit_then_the_ewma_then_the_category_default() -> None:
    health = [
        health_pb2.ModelHealth(
            provider="alpha",
            model="alpha/small",
            latency_base_ms=100,
            latency_ms_per_input_token=0.5,
            latency_ms_per_output_token=2,
            latency_fit_samples=50,
            latency_prediction_error=0.25,
        ),
        health_pb2.ModelHealth(provider="gamma", model="gamma/small", ewma_latency_ms=640, samples=10),
    ]
    plan = planner(health=health, max_candidates=3).plan(ask("alpha/small"), input_tokens=1_000, now=NOW)
    by_model = {c.model: c for c in plan.candidates}
    assert by_model["alpha/small"].predicted_latency_ms == 1_112  # 100 + 500 + 2 x 256
    assert by_model["alpha/small"].confidence == pytest.approx(0.75)
    assert by_model["gamma/small"].predicted_latency_ms == 640
    assert by_model["gamma/small"].confidence == pytest.approx(10 / 50 * 0.6)
    assert by_model["beta/small"].predicted_latency_ms == 800
    assert by_model["beta/small"].confidence == pytest.approx(0.2)


def test_outputs_longer_than_the_fit_has_seen_are_predicted_at_its_reach() -> None:
    # A slope measured on outputs of 10 to 30 tokens, where noise decides it, says little about
    # 256: the prediction holds the output at what the fit has seen.
    fit = health_pb2.ModelHealth(
        provider="alpha",
        model="alpha/small",
        latency_base_ms=2,
        latency_ms_per_input_token=0.0,
        latency_ms_per_output_token=0.5,
        latency_fit_samples=50,
        latency_fit_output_reach=30,
    )
    chooser = planner(health=[fit], max_candidates=3)
    unlimited = chooser.plan(ask("alpha/small"), input_tokens=10, now=NOW).candidates[0]
    assert unlimited.predicted_latency_ms == 17  # 2 + 0.5 x 30, not 2 + 0.5 x 256
    short = chooser.plan(ask("alpha/small", max_output=10), input_tokens=10, now=NOW).candidates[0]
    assert short.predicted_latency_ms == 7  # within the reach: 2 + 0.5 x 10
    fit.latency_fit_output_reach = 0  # no reach known: the slope goes all the way
    unknown = planner(health=[fit]).plan(ask("alpha/small"), input_tokens=10, now=NOW).candidates[0]
    assert unknown.predicted_latency_ms == 130  # 2 + 0.5 x 256


# --- auto ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("task", "category", "models"),
    [
        (CHAT, "small", {"alpha/small", "beta/small", "gamma/small"}),
        (CODE, "large", {"alpha/large", "beta/large", "gamma/large"}),
        (REASONING, "reasoning", {"alpha/think"}),
    ],
)
def test_auto_plans_on_the_classified_category(task: int, category: str, models: set[str]) -> None:
    plan = planner().plan(ask(task=task), now=NOW)
    assert set(ids(plan)) == models
    assert (plan.category, plan.task_type) == (category, task)
    name = common_pb2.TaskType.Name(task).removeprefix("TASK_TYPE_").lower()  # type: ignore[arg-type]
    assert plan.candidates[0].reason.startswith(f"auto: {name}, complexity ")
    assert plan.candidates[0].reason.endswith(f" → {category}, balanced")


def test_an_empty_model_is_the_catalog_default_or_auto_without_one() -> None:
    plan = planner().plan(ask("", task=CODE), now=NOW)
    assert plan.candidates[0].model == "alpha/small"
    assert plan.candidates[0].reason == "requested model"
    no_default = parse_catalog(MESH_YAML.replace("default_model: alpha/small\n", ""))
    plan = planner(no_default).plan(ask("", task=CODE), now=NOW)
    assert plan.category == "large" and plan.candidates[0].reason.startswith("auto: code")


def test_auto_widens_when_nothing_in_the_category_can_serve() -> None:
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/think", breaker=health_pb2.BREAKER_STATE_OPEN)
    ]
    plan = planner(health=health).plan(ask(task=REASONING), now=NOW)
    assert plan.category == "large" and set(ids(plan)) == {"alpha/large", "beta/large", "gamma/large"}
    assert ", widened to large, balanced" in plan.candidates[0].reason
    # A small task needing JSON schema (no small model has it) widens to large.
    schema = planner().plan(ask(task=CHAT, fmt=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA), now=NOW)
    assert schema.category == "large" and set(ids(schema)) == {"alpha/large", "beta/large"}


# --- filters (each with the reason Explain shows) --------------------------------------------


def test_tools_filter() -> None:
    rows = rows_by_model(planner().explain(ask(task=CHAT, tools=True), now=NOW))
    assert rows["gamma/small"].filtered and rows["gamma/small"].filter_reason == "no tools"
    assert not rows["alpha/small"].filtered


def test_vision_filter() -> None:
    rows = rows_by_model(planner().explain(ask(task=CODE, image=True), now=NOW))
    assert rows["gamma/large"].filter_reason == "no vision"
    assert not rows["alpha/large"].filtered and not rows["beta/large"].filtered


def test_json_schema_and_json_mode_filters() -> None:
    schema = rows_by_model(
        planner().explain(ask(task=CODE, fmt=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA), now=NOW)
    )
    assert schema["gamma/large"].filter_reason == "no json_schema"
    json_mode = rows_by_model(
        planner().explain(ask(task=CODE, fmt=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT), now=NOW)
    )
    assert json_mode["beta/large"].filter_reason == "no json_mode"
    assert json_mode["gamma/large"].filter_reason == "no json_mode"
    assert not json_mode["alpha/large"].filtered


def test_context_window_filter_counts_the_output_allowance() -> None:
    rows = rows_by_model(planner().explain(ask("alpha/small"), input_tokens=7_500, now=NOW))
    assert rows["alpha/small"].filter_reason == "context window 8000 < 8500 tokens needed"
    plan = planner().plan(ask("alpha/small", max_output=100), input_tokens=7_500, now=NOW)
    assert ids(plan)[0] == "alpha/small"


def test_the_context_filter_counts_what_the_prompt_fills_of_the_window_not_what_is_billed() -> None:
    # Images a model bills at a multiple (gpt-4o-mini's tiles) fill only their standard size
    # of the window: 20,000 billed tokens that fill 2,000 fit in alpha/small's 8,000.
    rows = rows_by_model(
        planner().explain(ask("alpha/small"), input_tokens=20_000, context_tokens=2_000, now=NOW)
    )
    assert not rows["alpha/small"].filtered
    plan = planner().plan(ask("alpha/small"), input_tokens=20_000, context_tokens=2_000, now=NOW)
    assert ids(plan)[0] == "alpha/small"
    # The billed count still prices the candidate: 18,000 input tokens more than a 2,000 one.
    small = planner().plan(ask("alpha/small"), input_tokens=2_000, now=NOW).candidates[0]
    billed = plan.candidates[0]
    assert billed.predicted_cost_micros > small.predicted_cost_micros
    rows = rows_by_model(
        planner().explain(ask("alpha/small"), input_tokens=2_000, context_tokens=7_900, now=NOW)
    )
    assert rows["alpha/small"].filter_reason == "context window 8000 < 8900 tokens needed"


def test_tenant_and_caller_allowed_models() -> None:
    rows = rows_by_model(
        planner().explain(
            ask(task=CHAT),
            tenant_id="restricted",
            allowed_models=frozenset({"alpha/small", "beta/small"}),
            now=NOW,
        )
    )
    assert rows["beta/small"].filter_reason == "not allowed for tenant"
    assert rows["gamma/small"].filter_reason == "not allowed for caller"
    assert not rows["alpha/small"].filtered


def test_required_region_filters_other_regions() -> None:
    explained = planner().explain(ask(task=CHAT, region="eu", region_required=True), now=NOW)
    rows = rows_by_model(explained)
    assert rows["alpha/small"].filter_reason == "region eu required"
    assert explained.plan is not None and ids(explained.plan) == ["beta/small"]


def test_preferred_region_goes_first_among_equals() -> None:
    twins = frozenset({"alpha/small", "beta/small"})  # equal but for their region

    def firsts(region: str) -> set[str]:
        chooser = planner(band=0.1)
        request = ask(task=CHAT, region=region)
        return {chooser.plan(request, allowed_models=twins, now=NOW).candidates[0].model for _ in range(10)}

    assert firsts("eu") == {"beta/small"}
    assert firsts("us") == {"alpha/small"}
    assert firsts("") == {"alpha/small", "beta/small"}  # no region: the equals share the first place


def test_request_cost_cap_filters_on_the_blended_price() -> None:
    explained = planner().explain(ask(task=CHAT, cap_micros=250_000), now=NOW)
    rows = rows_by_model(explained)
    assert rows["alpha/small"].filter_reason == (
        "blended price 300000 above request cap 250000 micro-USD per 1M tokens"
    )
    assert explained.plan is not None and ids(explained.plan) == ["gamma/small"]


def test_open_breaker_and_down_provider_filters() -> None:
    health = [
        health_pb2.ModelHealth(
            provider="alpha",
            model="alpha/small",
            breaker=health_pb2.BREAKER_STATE_OPEN,
            reason="5 failures in a row",
        ),
        health_pb2.ModelHealth(provider="gamma", status=health_pb2.HEALTH_STATUS_DOWN, reason="probe failed"),
    ]
    explained = planner(health=health).explain(ask(task=CHAT), now=NOW)
    rows = rows_by_model(explained)
    assert rows["alpha/small"].filter_reason == "breaker open (5 failures in a row)"
    assert rows["gamma/small"].filter_reason == "provider gamma down: probe failed"
    assert explained.plan is not None and ids(explained.plan) == ["beta/small"]


def half_open(model: str, *, trials: int = 2, error_rate: float = 0.0) -> health_pb2.ModelHealth:
    return health_pb2.ModelHealth(
        provider=model.split("/")[0],
        model=model,
        breaker=health_pb2.BREAKER_STATE_HALF_OPEN,
        status=health_pb2.HEALTH_STATUS_DEGRADED,
        half_open_trials=trials,
        error_rate=error_rate,
    )


def breaker(model: str, state: health_pb2.BreakerState.ValueType) -> health_pb2.ModelHealth:
    return health_pb2.ModelHealth(provider=model.split("/")[0], model=model, breaker=state)


def test_half_open_breaker_allows_its_trials_once_per_half_open_episode() -> None:
    health = [half_open("beta/small")]
    trials = planner(health=health)
    for _ in range(2):
        plan = trials.plan(ask(task=CHAT), now=NOW)
        # A trial goes first among the ranked candidates, so the breaker can close.
        assert plan.candidates[0].model == "beta/small"
        assert plan.candidates[0].reason.endswith("(half-open trial)")
    # Explain does not spend trials, and shows why the next plan leaves beta out.
    rows = rows_by_model(trials.explain(ask(task=CHAT), now=NOW))
    assert rows["beta/small"].filter_reason == "breaker half-open, trials used (2)"
    assert "beta/small" not in ids(trials.plan(ask(task=CHAT), now=NOW))
    # Statistics alone make new versions (the same breaker, other numbers): the episode goes on.
    for version, rate in ((2, 0.0), (3, 0.25), (4, 0.5)):
        trials.swap(table(health=[half_open("beta/small", error_rate=rate)], version=version))
        assert "beta/small" not in ids(trials.plan(ask(task=CHAT), now=NOW))
    # A failed trial opened it again; half-open once more is a new episode with new trials.
    trials.swap(table(health=[breaker("beta/small", health_pb2.BREAKER_STATE_OPEN)], version=5))
    assert "beta/small" not in ids(trials.plan(ask(task=CHAT), now=NOW))
    trials.swap(table(health=health, version=6))
    for _ in range(2):
        assert trials.plan(ask(task=CHAT), now=NOW).candidates[0].model == "beta/small"
    assert "beta/small" not in ids(trials.plan(ask(task=CHAT), now=NOW))


def test_a_breaker_that_closes_ends_only_its_own_episode() -> None:
    both = [half_open("beta/small", trials=1), half_open("gamma/small", trials=1)]
    trials = planner(health=both)
    firsts = [trials.plan(ask(task=CHAT), now=NOW).candidates[0].model for _ in range(3)]
    assert sorted(firsts[:2]) == ["beta/small", "gamma/small"] and firsts[2] == "alpha/small"
    # gamma's trial succeeded (closed) while beta's is still out.
    closed = breaker("gamma/small", health_pb2.BREAKER_STATE_CLOSED)
    trials.swap(table(health=[both[0], closed], version=2))
    trials.swap(table(health=both, version=3))  # gamma tripped and half-opened again
    firsts = [trials.plan(ask(task=CHAT), now=NOW).candidates[0].model for _ in range(2)]
    assert firsts == ["gamma/small", "alpha/small"]


def test_a_trial_is_counted_only_when_the_half_open_model_leads_the_plan() -> None:
    trials = planner(health=[half_open("beta/small", trials=1)])
    for _ in range(3):
        # Behind the requested model, beta is tried only if alpha fails: no trial spent.
        plan = trials.plan(ask("alpha/small"), now=NOW)
        assert ids(plan)[:2] == ["alpha/small", "beta/small"]
    assert trials.plan(ask(task=CHAT), now=NOW).candidates[0].model == "beta/small"
    assert "beta/small" not in ids(trials.plan(ask("alpha/small"), now=NOW))


def test_low_request_headroom_is_avoided_before_a_429_until_the_reset() -> None:
    headroom = common_pb2.RateLimitHeadroom(
        limit_requests=1_000,
        remaining_requests=15,  # below the 2 % reserve, not yet zero
        requests_reset_at=stamp(NOW + timedelta(seconds=30)),
        observed_at=stamp(NOW),
    )
    health = [health_pb2.ModelHealth(provider="alpha", model="alpha/small", headroom=headroom)]
    steering = planner(health=health)
    explained = steering.explain(ask("alpha/small"), now=NOW)
    row = rows_by_model(explained)["alpha/small"]
    assert row.filter_reason == "rate-limit headroom: 15 of 1000 requests left until reset"
    assert explained.plan is not None and ids(explained.plan)[0] != "alpha/small"
    after_reset = steering.plan(ask("alpha/small"), now=NOW + timedelta(seconds=31))
    assert ids(after_reset)[0] == "alpha/small"
    plenty = headroom.__deepcopy__()
    plenty.remaining_requests = 500
    healthy = [health_pb2.ModelHealth(provider="alpha", model="alpha/small", headroom=plenty)]
    assert ids(planner(health=healthy).plan(ask("alpha/small"), now=NOW))[0] == "alpha/small"


def test_token_headroom_must_cover_the_request() -> None:
    headroom = common_pb2.RateLimitHeadroom(
        limit_tokens=10_000,
        remaining_tokens=600,
        tokens_reset_at=stamp(NOW + timedelta(seconds=20)),
        observed_at=stamp(NOW),
    )
    health = [health_pb2.ModelHealth(provider="alpha", headroom=headroom)]  # provider-wide
    tokens = planner(health=health)
    rows = rows_by_model(tokens.explain(ask("alpha/small"), input_tokens=400, now=NOW))
    assert rows["alpha/small"].filter_reason == "rate-limit headroom: 600 tokens left, 656 needed"
    assert ids(tokens.plan(ask("alpha/small"), input_tokens=300, now=NOW))[0] == "alpha/small"


# --- strategies ------------------------------------------------------------------------------------

STRATEGIES = parse_catalog(
    f"""
providers:
  p: {{vendor: openai, base_url: "{URL}"}}
models:
  - {{id: p/cheap, provider: p, upstream_model: cheap, context_window: 9000, max_output_tokens: 500,
     prices: {{input: "0.5", output: "1"}}, category: large, quality: 65}}
  - {{id: p/fast, provider: p, upstream_model: fast, context_window: 9000, max_output_tokens: 500,
     prices: {{input: "2", output: "6"}}, category: large, quality: 75}}
  - {{id: p/premium, provider: p, upstream_model: premium, context_window: 9000, max_output_tokens: 500,
     prices: {{input: "10", output: "30"}}, category: large, quality: 95}}
  - {{id: p/junk, provider: p, upstream_model: junk, context_window: 9000, max_output_tokens: 500,
     prices: {{input: "0.1", output: "0.2"}}, category: large, quality: 40}}
  - {{id: p/meh, provider: p, upstream_model: meh, context_window: 9000, max_output_tokens: 500,
     prices: {{input: "0.3", output: "0.6"}}, category: large, quality: 45}}
"""
)
STRATEGY_HEALTH = [
    health_pb2.ModelHealth(provider="p", model=f"p/{name}", latency_base_ms=ms, latency_fit_samples=100)
    for name, ms in (("cheap", 3_000), ("fast", 200), ("premium", 4_000), ("junk", 2_500), ("meh", 2_500))
]


def strategy_plan(preference: int, **options: object) -> RoutePlan:
    chooser = planner(STRATEGIES, health=STRATEGY_HEALTH, max_candidates=5)
    return chooser.plan(ask(task=CODE, preference=preference), now=NOW, **options)  # type: ignore[arg-type]


def test_cost_strategy_takes_the_cheapest_above_the_quality_floor() -> None:
    plan = strategy_plan(common_pb2.ROUTING_PREFERENCE_COST)
    assert ids(plan)[0] == "p/cheap"
    assert ids(plan)[-2:] == ["p/junk", "p/meh"]  # below the floor: after every model above it


def test_cost_strategy_relaxes_the_floor_when_nothing_reaches_it() -> None:
    plan = strategy_plan(common_pb2.ROUTING_PREFERENCE_COST, allowed_models=frozenset({"p/junk", "p/meh"}))
    assert ids(plan) == ["p/junk", "p/meh"]


def test_latency_strategy_takes_the_fastest() -> None:
    assert ids(strategy_plan(common_pb2.ROUTING_PREFERENCE_LATENCY))[0] == "p/fast"


def test_quality_strategy_takes_the_best() -> None:
    assert ids(strategy_plan(common_pb2.ROUTING_PREFERENCE_QUALITY))[0] == "p/premium"


def test_balanced_is_the_default_and_trades_everything_off() -> None:
    balanced = strategy_plan(common_pb2.ROUTING_PREFERENCE_BALANCED)
    assert ids(strategy_plan(common_pb2.ROUTING_PREFERENCE_UNSPECIFIED)) == ids(balanced)
    assert balanced.preference == common_pb2.ROUTING_PREFERENCE_BALANCED
    # Neither the priciest nor the poorest model leads a balanced plan.
    assert ids(balanced)[0] not in ("p/premium", "p/junk")
    scores = [c.score for c in balanced.candidates]
    assert scores == sorted(scores, reverse=True)


FREE = parse_catalog(
    f"""
providers:
  free: {{vendor: openai_compatible, base_url: "{URL}", free_tier: true}}
  paid: {{vendor: openai, base_url: "{URL}"}}
models:
  - {{id: free/m, provider: free, upstream_model: m, context_window: 8000, max_output_tokens: 500,
     prices: {{input: "0.3", output: "0.6"}}, category: small, quality: 55}}
  - {{id: paid/m, provider: paid, upstream_model: m, context_window: 8000, max_output_tokens: 500,
     prices: {{input: "0.1", output: "0.2"}}, category: small, quality: 90}}
"""
)


@pytest.mark.parametrize(
    "preference",
    [
        common_pb2.ROUTING_PREFERENCE_COST,
        common_pb2.ROUTING_PREFERENCE_LATENCY,
        common_pb2.ROUTING_PREFERENCE_QUALITY,
        common_pb2.ROUTING_PREFERENCE_BALANCED,
    ],
)
def test_free_tier_first_while_it_has_headroom_then_paid(preference: int) -> None:
    request = ask(task=CHAT, preference=preference)
    assert ids(planner(FREE).plan(request, now=NOW)) == ["free/m", "paid/m"]
    exhausted = common_pb2.RateLimitHeadroom(
        limit_requests=100, remaining_requests=1, requests_reset_at=stamp(NOW + timedelta(minutes=1))
    )
    health = [health_pb2.ModelHealth(provider="free", headroom=exhausted)]
    assert ids(planner(FREE, health=health).plan(request, now=NOW)) == ["paid/m"]


# --- rules -----------------------------------------------------------------------------------------


def test_rule_pin_plans_only_the_pinned_model_then_the_rule_fallbacks() -> None:
    plan = planner().plan(ask("alpha/large"), tenant_id="pinned", now=NOW)
    assert ids(plan) == ["gamma/large", "alpha/small"]
    assert [c.reason for c in plan.candidates] == ["rule 1 (pin-gamma): pin", "rule 1 (pin-gamma): fallback"]
    assert plan.matched_rule == "rule 1 (pin-gamma)"


def test_rule_exclude_filters_with_the_rule_named() -> None:
    explained = planner().explain(ask(task=CHAT), tenant_id="excluder", now=NOW)
    assert rows_by_model(explained)["alpha/small"].filter_reason == "excluded by rule 1"
    assert explained.matched_rule == "rule 1"
    # The rule matches simple chat only.
    assert (
        ids(planner().plan(ask("alpha/small", task=CODE), tenant_id="excluder", now=NOW))[0] == "alpha/small"
    )
    assert "alpha/small" not in ids(
        planner().plan(ask("alpha/small", task=CHAT), tenant_id="excluder", now=NOW)
    )


def test_rule_prefer_moves_models_to_the_front() -> None:
    plan = planner().plan(ask("alpha/small"), tenant_id="preferer", now=NOW)
    assert ids(plan)[:2] == ["gamma/small", "alpha/small"]
    assert plan.candidates[0].reason == "rule 1: prefer"


def test_rule_cap_tightens_the_cost_cap() -> None:
    explained = planner().explain(ask(task=CODE), tenant_id="capper", now=NOW)
    rows = rows_by_model(explained)
    assert rows["alpha/large"].filter_reason == (
        "blended price 5000000 above cap of rule 1 2000000 micro-USD per 1M tokens"
    )
    assert explained.plan is not None and ids(explained.plan) == ["gamma/large"]


def test_rule_fallbacks_replace_the_chain() -> None:
    plan = planner(max_candidates=4).plan(ask("alpha/large"), tenant_id="chainer", now=NOW)
    assert ids(plan)[:2] == ["alpha/large", "gamma/large"]
    assert plan.candidates[1].reason == "rule 1: fallback"
    assert ids(plan)[2] == "beta/large"  # now only from the same-category tail


def test_rule_fallbacks_follow_the_first_auto_pick() -> None:
    plan = planner().plan(ask(task=CHAT), tenant_id="autofallback", now=NOW)
    assert ids(plan)[1] == "alpha/think" and plan.candidates[1].reason == "rule 1: fallback"
    assert plan.candidates[0].model in {"alpha/small", "beta/small", "gamma/small"}


def test_the_first_matching_rule_wins() -> None:
    both = planner().plan(ask(task=CODE, tags={"team": "a"}), tenant_id="ordered", now=NOW)
    assert ids(both) == ["beta/small"] and both.matched_rule == "rule 1 (team-a)"
    code = planner().plan(ask(task=CODE, tags={"team": "b"}), tenant_id="ordered", now=NOW)
    assert ids(code) == ["gamma/large"] and code.candidates[0].reason == "rule 2 (coders): pin"
    neither = planner().plan(ask(task=CHAT), tenant_id="ordered", now=NOW)
    assert neither.matched_rule == "" and neither.category == "small"


def test_the_callers_tier_overrides_the_tenants_for_rules() -> None:
    assert planner().plan(ask(task=CHAT), tenant_id="tiered", now=NOW).matched_rule == ""
    assert ids(planner().plan(ask(task=CHAT), tenant_id="tiered", tier="pro", now=NOW)) == ["gamma/small"]


def test_a_rule_on_estimated_cost_sees_the_requests_predicted_cost() -> None:
    # alpha/large costs 2 micro-USD per input token and 8 per output token: 100 output tokens
    # and 4,600 input tokens are exactly $0.01, which is not above the rule's $0.01.
    spender = planner()

    def plan(max_output: int, input_tokens: int) -> RoutePlan:
        request = ask("alpha/large", max_output=max_output)
        return spender.plan(request, tenant_id="spender", input_tokens=input_tokens, now=NOW)

    at_limit = plan(100, 4_600)
    assert at_limit.matched_rule == "" and ids(at_limit)[0] == "alpha/large"
    over = plan(100, 4_601)
    assert over.matched_rule == "rule 1 (big)" and ids(over) == ["beta/large"]
    assert over.candidates[0].reason == "rule 1 (big): pin"
    # The output counted is the smaller of the request's maximum and the expected output (256).
    assert plan(1_000, 3_976).matched_rule == ""
    assert plan(1_000, 3_977).matched_rule == "rule 1 (big)"
    assert ids(plan(1_000, 20_000)) == ["beta/large"]
    small = plan(100, 100)
    assert small.matched_rule == "" and ids(small)[0] == "alpha/large"


def test_a_rule_on_estimated_cost_for_auto_estimates_on_the_default_model() -> None:
    # alpha/small (the default) costs 0.2 and 0.4 micro-USD per input and output token:
    # 49,488 input and 256 output tokens are exactly $0.01; one more input token is above.
    spender = planner()
    for input_tokens, matched in ((49_488, ""), (49_489, "rule 1 (big)"), (100, "")):
        plan = spender.plan(ask(task=CHAT), tenant_id="spender", input_tokens=input_tokens, now=NOW)
        assert plan.matched_rule == matched
        assert (ids(plan) == ["beta/large"]) == bool(matched)


def office_rule(chooser: Planner, tenant: str = "office", at: datetime | None = None) -> str:
    return chooser.plan(ask("alpha/small", task=CHAT), tenant_id=tenant, now=at).matched_rule


def test_a_rule_on_hours_matches_only_inside_them() -> None:
    chooser = planner()
    day = NOW.replace(hour=0)
    inside = [hour for hour in range(24) if office_rule(chooser, at=day.replace(hour=hour))]
    assert inside == list(range(9, 17))
    assert ids(chooser.plan(ask("alpha/small"), tenant_id="office", now=day.replace(hour=9))) == [
        "gamma/small"
    ]
    assert (
        ids(chooser.plan(ask("alpha/small"), tenant_id="office", now=day.replace(hour=17)))[0]
        == "alpha/small"
    )
    # A range over midnight.
    night = [hour for hour in range(24) if office_rule(chooser, "nightly", day.replace(hour=hour))]
    assert night == [0, 1, 2, 3, 4, 5, 22, 23]


def test_rule_hours_are_utc_whatever_zone_the_time_comes_in() -> None:
    chooser = planner()
    minus_five = timezone(timedelta(hours=-5))
    assert (
        office_rule(chooser, at=datetime(2030, 6, 1, 8, 0, tzinfo=minus_five)) == "rule 1 (day)"
    )  # 13:00 UTC
    assert office_rule(chooser, at=datetime(2030, 6, 1, 14, 0, tzinfo=minus_five)) == ""  # 19:00 UTC


def test_without_a_time_rules_see_the_planners_clock() -> None:
    def at(hour: int) -> Callable[[], datetime]:
        return lambda: NOW.replace(hour=hour)

    assert office_rule(Planner(table(), clock=at(10))) == "rule 1 (day)"
    assert office_rule(Planner(table(), clock=at(20))) == ""


# --- load balancing among equals -------------------------------------------------------------------


def first_counts(chooser: Planner, plans: int = 1_000) -> Counter[str]:
    return Counter(chooser.plan(ask(task=CHAT), now=NOW).candidates[0].model for _ in range(plans))


def test_equals_share_the_first_place_by_weight() -> None:
    counts = first_counts(planner(TWINS, band=0.1, weights={"alpha/alpha/m": 3.0, "beta/beta/m": 1.0}))
    assert counts == {"alpha/m": 750, "beta/m": 250}


def test_weights_follow_performance_without_starving_the_slower() -> None:
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/m", ewma_latency_ms=1_000, samples=100),
        health_pb2.ModelHealth(
            provider="beta", model="beta/m", ewma_latency_ms=1_000, samples=100, error_rate=0.5
        ),
    ]
    counts = first_counts(planner(TWINS, band=0.1, health=health, floor=0.3))
    assert counts["alpha/m"] > counts["beta/m"] >= 300
    # A far worse weight still keeps the floor's share.
    starved = first_counts(
        planner(TWINS, band=0.1, weights={"alpha/alpha/m": 100.0, "beta/beta/m": 0.01}, floor=0.1)
    )
    assert starved["beta/m"] >= 100 and starved["alpha/m"] > 800


def test_round_robin_is_deterministic_and_survives_a_table_swap() -> None:
    one, two = planner(TWINS, band=0.1), planner(TWINS, band=0.1)
    assert [ids(one.plan(ask(task=CHAT), now=NOW)) for _ in range(6)] == [
        ids(two.plan(ask(task=CHAT), now=NOW)) for _ in range(6)
    ]
    swapping = planner(TWINS, band=0.1)
    assert swapping.plan(ask(task=CHAT), now=NOW).candidates[0].model == "alpha/m"
    swapping.swap(table(TWINS, band=0.1, version=2))
    assert swapping.table.version == 2
    assert swapping.plan(ask(task=CHAT), now=NOW).candidates[0].model == "beta/m"
    assert planner(TWINS, band=0.1, version=2).plan(ask(task=CHAT), now=NOW).candidates[0].model == "alpha/m"


def test_milliseconds_of_latency_do_not_split_fast_equals() -> None:
    # 3 ms against 9 ms is noise next to what a completion takes: both stay equals and share.
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/m", ewma_latency_ms=3, samples=100),
        health_pb2.ModelHealth(provider="beta", model="beta/m", ewma_latency_ms=9, samples=100),
    ]
    weights = {"alpha/alpha/m": 1.0, "beta/beta/m": 1.0}
    counts = first_counts(planner(TWINS, band=0.1, weights=weights, health=health), plans=100)
    assert counts == {"alpha/m": 50, "beta/m": 50}
    # 300 ms against 900 ms is not.
    slower = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/m", ewma_latency_ms=300, samples=100),
        health_pb2.ModelHealth(provider="beta", model="beta/m", ewma_latency_ms=900, samples=100),
    ]
    chooser = planner(TWINS, band=0.1, weights=weights, health=slower)
    assert first_counts(chooser, plans=100) == {"alpha/m": 100}


def test_scores_outside_the_band_are_not_equals() -> None:
    weights = {"alpha/alpha/m": 1.0, "beta/beta/m": 1.0}
    health = [
        health_pb2.ModelHealth(provider="beta", model="beta/m", status=health_pb2.HEALTH_STATUS_DEGRADED)
    ]
    counts = first_counts(planner(TWINS, band=0.05, weights=weights, health=health), plans=20)
    assert counts == {"alpha/m": 20}


# --- explain, errors, snapshots ------------------------------------------------------------------


def test_explain_lists_every_candidate_with_ranks_components_and_filter_reasons() -> None:
    health = [
        health_pb2.ModelHealth(provider="beta", model="beta/small", breaker=health_pb2.BREAKER_STATE_OPEN)
    ]
    explainer = planner(health=health, max_candidates=1)
    explained = explainer.explain(ask(task=CHAT), now=NOW)
    assert [(row.candidate.model, row.rank, row.filtered) for row in explained.rows] == [
        ("gamma/small", 1, False),
        ("alpha/small", 0, False),  # ranked, beyond the plan's length
        ("beta/small", 0, True),
    ]
    filtered = explained.rows[2]
    assert filtered.filter_reason == "breaker open" and filtered.candidate.predicted_cost_micros == 103
    assert set(explained.rows[0].components) == {
        "cost",
        "latency",
        "quality",
        "health",
        "region",
        "free",
        "weight",
    }
    assert explained.rows[0].components["quality"] == 0.5
    assert explained.plan is not None and ids(explained.plan) == ["gamma/small"]
    # The plan that follows is the one Explain showed.
    assert ids(explainer.plan(ask(task=CHAT), now=NOW)) == ["gamma/small"]
    response = explained.to_proto()
    assert (response.snapshot_version, response.task_type, response.category, response.preference) == (
        1,
        CHAT,
        common_pb2.MODEL_CATEGORY_SMALL,
        common_pb2.ROUTING_PREFERENCE_BALANCED,
    )
    assert response.rows[2].filtered and response.rows[0].rank == 1
    assert response.rows[0].score_components["quality"] == 0.5


def test_explain_does_not_advance_the_round_robin() -> None:
    balancer = planner(TWINS, band=0.1)
    shown = [balancer.explain(ask(task=CHAT), now=NOW).rows[0].candidate.model for _ in range(3)]
    assert shown == ["alpha/m"] * 3
    assert balancer.plan(ask(task=CHAT), now=NOW).candidates[0].model == "alpha/m"
    assert balancer.explain(ask(task=CHAT), now=NOW).rows[0].candidate.model == "beta/m"


def test_explain_when_nothing_can_serve() -> None:
    explained = planner().explain(ask(task=CHAT, region="mars", region_required=True), now=NOW)
    assert explained.plan is None
    assert explained.rows and all(row.filtered and row.rank == 0 for row in explained.rows)


def test_no_route_names_the_model_and_summarises_why() -> None:
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/small", breaker=health_pb2.BREAKER_STATE_OPEN),
    ]
    with pytest.raises(SwitchyardError) as caught:
        planner(health=health).plan(
            ask("alpha/small", tools=True, region="mars", region_required=True), now=NOW
        )
    error = caught.value
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION and error.reason is Reason.NO_ROUTE
    assert error.message == (
        "no candidate can serve 'alpha/small': 3 filtered: region mars required (2), no tools (1)"
    )
    assert error.metadata == {"model": "alpha/small"}
    with pytest.raises(SwitchyardError) as auto:
        planner().plan(ask(task=CHAT, region="mars", region_required=True), now=NOW)
    assert auto.value.message == "no candidate can serve 'auto': 6 filtered: region mars required (6)"


def test_when_health_gates_every_candidate_they_are_tried_anyway_in_the_usual_order() -> None:
    health = [
        health_pb2.ModelHealth(provider=p, model=f"{p}/small", breaker=health_pb2.BREAKER_STATE_OPEN)
        for p in ("alpha", "beta")
    ]
    plan = planner(health=health).plan(ask("alpha/small", tools=True), now=NOW)
    assert [c.model for c in plan.candidates] == ["alpha/small", "beta/small"]
    assert all(c.reason.endswith(PANIC_NOTE) for c in plan.candidates)
    explained = planner(health=health).explain(ask("alpha/small", tools=True), now=NOW)
    rows = {row.candidate.model: row for row in explained.rows}
    assert not rows["alpha/small"].filtered and not rows["beta/small"].filtered
    assert rows["gamma/small"].filtered and rows["gamma/small"].filter_reason == "no tools"
    # One healthy candidate left: the gates hold.
    one_open = health[:1]
    plan = planner(health=one_open).plan(ask("alpha/small", tools=True), now=NOW)
    assert [c.model for c in plan.candidates] == ["beta/small"]
    assert not plan.candidates[0].reason.endswith(PANIC_NOTE)


def test_plan_response_carries_the_plan() -> None:
    plan = planner().plan(ask("alpha/large"), tenant_id="pinned", now=NOW)
    response = plan_response(plan)
    assert list(response.candidates) == list(plan.candidates)
    assert (response.snapshot_version, response.matched_rule) == (1, "rule 1 (pin-gamma)")
    assert response.task_type == plan.task_type


def test_from_catalog_plans_like_a_received_snapshot() -> None:
    health = [
        health_pb2.ModelHealth(provider="alpha", model="alpha/small", ewma_latency_ms=300, samples=40),
        health_pb2.ModelHealth(provider="beta", model="beta/large", breaker=health_pb2.BREAKER_STATE_OPEN),
        health_pb2.ModelHealth(provider="gamma", model="gamma/small", error_rate=0.2, samples=40),
    ]
    direct = Planner(RoutingTable.from_catalog(MESH, version=4, health=health))
    wire = build_snapshot(MESH, version=4, health=health).SerializeToString()
    received = Planner(RoutingTable.from_snapshot(router_pb2.RoutingSnapshot.FromString(wire)))
    requests = [
        (ask(task=CHAT), "plain"),
        (ask(task=CODE), "plain"),
        (ask("alpha/large"), "chainer"),
        (ask(task=REASONING, tools=True), "plain"),
        (ask(task=CODE, tags={"team": "a"}), "ordered"),
        (ask(task=CHAT, region="eu"), "excluder"),
    ]
    for request, tenant in requests * 2:
        assert direct.plan(request, tenant_id=tenant, now=NOW) == received.plan(
            request, tenant_id=tenant, now=NOW
        )


# --- the thin wrapper for older callers ----------------------------------------------------------------


def test_plan_route_wrapper() -> None:
    candidates = plan_route(MESH, "alpha/large")
    assert [c.model for c in candidates] == ["alpha/large", "beta/large", "alpha/small"]
    assert [c.model for c in plan_route(MESH, "alpha/large", max_candidates=1)] == ["alpha/large"]
    allowed = plan_route(MESH, "alpha/large", allowed_models=frozenset({"alpha/large", "gamma/large"}))
    assert [c.model for c in allowed] == ["alpha/large", "gamma/large"]
    with pytest.raises(SwitchyardError) as caught:
        plan_route(MESH, "gamma/small", allowed_models=frozenset({"alpha/large"}))
    assert caught.value.reason is Reason.NO_ROUTE
