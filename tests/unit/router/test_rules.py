"""Tenant routing rules: validation with the rule's position, matching, first match wins."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from switchyard.common.catalog import CatalogError, parse_catalog
from switchyard.router.rules import (
    RuleContext,
    RuleError,
    compile_rules,
    first_match,
    rules_from_json,
    rules_to_json,
)
from switchyard.v1 import common_pb2

MODELS = {"a/small", "a/large", "b/small"}
TIERS = {"free", "pro"}
NOON_MONDAY = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def compile_(*rules: dict[str, Any]) -> Any:
    return compile_rules(list(rules), model_ids=MODELS, tiers=TIERS, aliases={"fast"})


def ctx(**overrides: Any) -> RuleContext:
    values: dict[str, Any] = {
        "requested": "auto",
        "resolved": None,
        "task_type": common_pb2.TASK_TYPE_SIMPLE_CHAT,
        "tags": {},
        "tier": "free",
        "now": NOON_MONDAY,
        "estimated_cost_micros": 1_000,
    }
    values.update(overrides)
    return RuleContext(**values)


@pytest.mark.parametrize(
    ("rules", "index", "path", "words"),
    [
        ([{"then": {"pin": "z/none"}}], 0, ("then", "pin", 0), "unknown model"),
        ([{"then": {}}], 0, ("then",), "at least one action"),
        ([{"when": {"colour": "red"}, "then": {"pin": "a/small"}}], 0, ("when", "colour"), "unknown key"),
        ([{"when": {"tier": "gold"}, "then": {"pin": "a/small"}}], 0, ("when", "tier", 0), "unknown tier"),
        (
            [{"when": {"task_type": "chess"}, "then": {"pin": "a/small"}}],
            0,
            ("when", "task_type", 0),
            "task type",
        ),
        ([{"when": {"hours_utc": "9am"}, "then": {"pin": "a/small"}}], 0, ("when", "hours_utc"), "09-17"),
        (
            [{"when": {"weekdays": ["funday"]}, "then": {"pin": "a/small"}}],
            0,
            ("when", "weekdays", 0),
            "weekday",
        ),
        (
            [{"when": {"model": "z/none"}, "then": {"pin": "a/small"}}],
            0,
            ("when", "model", 0),
            "unknown model",
        ),
        (
            [{"then": {"cap_cost_per_million_usd": "lots"}}],
            0,
            ("then", "cap_cost_per_million_usd"),
            "decimal",
        ),
        ([{"then": {"pin": "a/small", "exclude": ["a/small"]}}], 0, ("then", "pin"), "pinned and excluded"),
        ([{"then": {"pin": "a/small", "prefer": ["b/small"]}}], 0, ("then", "prefer"), "contradict"),
        ([{"then": {"prefer": ["b/small"], "exclude": ["b/small"]}}], 0, ("then", "prefer", 0), "excluded"),
        (
            [{"then": {"fallbacks": ["b/small"], "exclude": ["b/small"]}}],
            0,
            ("then", "fallbacks", 0),
            "excluded",
        ),
        (
            [
                {
                    "when": {"estimated_cost_above_usd": "1", "estimated_cost_below_usd": "1"},
                    "then": {"pin": "a/small"},
                }
            ],
            0,
            ("when", "estimated_cost_above_usd"),
            "below",
        ),
        (
            [{"then": {"pin": "a/small"}}, {"when": {"tier": "pro"}, "then": {"pin": "b/small"}}],
            1,
            (),
            "no conditions",
        ),
        (
            [
                {"when": {"tier": "pro"}, "then": {"pin": "a/small"}},
                {"when": {"tier": "pro", "task_type": "code"}, "then": {"pin": "b/small"}},
            ],
            1,
            ("when",),
            "matched first by rule 1",
        ),
    ],
)
def test_invalid_rules_name_the_rule_and_the_key(
    rules: list[dict[str, Any]], index: int, path: tuple[Any, ...], words: str
) -> None:
    with pytest.raises(RuleError) as caught:
        compile_(*rules)
    assert (caught.value.index, caught.value.path) == (index, path)
    assert words in caught.value.message


def test_each_condition_matches_only_what_it_names() -> None:
    (model,) = compile_({"when": {"model": ["fast", "a/large"]}, "then": {"pin": "b/small"}})
    assert model.matches(ctx(requested="fast")) and model.matches(ctx(requested="x", resolved="a/large"))
    assert not model.matches(ctx(requested="auto"))
    (task,) = compile_({"when": {"task_type": ["code"]}, "then": {"pin": "b/small"}})
    assert task.matches(ctx(task_type=common_pb2.TASK_TYPE_CODE)) and not task.matches(ctx())
    (tags,) = compile_({"when": {"tags": {"team": "search"}}, "then": {"pin": "b/small"}})
    assert tags.matches(ctx(tags={"team": "search", "x": "y"})) and not tags.matches(
        ctx(tags={"team": "ads"})
    )
    (tier,) = compile_({"when": {"tier": "pro"}, "then": {"pin": "b/small"}})
    assert tier.matches(ctx(tier="pro")) and not tier.matches(ctx())
    (night,) = compile_({"when": {"hours_utc": "22-06"}, "then": {"pin": "b/small"}})
    assert night.matches(ctx(now=NOON_MONDAY.replace(hour=23))) and night.matches(
        ctx(now=NOON_MONDAY.replace(hour=5))
    )
    assert not night.matches(ctx(now=NOON_MONDAY.replace(hour=6))) and not night.matches(ctx())
    (weekend,) = compile_({"when": {"weekdays": ["sat", "sun"]}, "then": {"pin": "b/small"}})
    assert not weekend.matches(ctx()) and weekend.matches(ctx(now=datetime(2026, 11, 22, 12, tzinfo=UTC)))
    (band,) = compile_(
        {
            "when": {"estimated_cost_above_usd": "0.001", "estimated_cost_below_usd": "0.01"},
            "then": {"pin": "b/small"},
        }
    )
    assert [band.matches(ctx(estimated_cost_micros=c)) for c in (1_000, 1_001, 9_999, 10_000)] == [
        False,
        True,
        True,
        False,
    ]


def test_first_match_wins_and_labels_name_the_rule() -> None:
    rules = compile_(
        {"name": "pro-code", "when": {"tier": "pro", "task_type": "code"}, "then": {"pin": "a/large"}},
        {"when": {"tier": "pro"}, "then": {"exclude": ["a/large"], "cap_cost_per_million_usd": "2.5"}},
    )
    first = first_match(rules, ctx(tier="pro", task_type=common_pb2.TASK_TYPE_CODE))
    assert first is not None and first.label == "rule 1 (pro-code)" and first.actions.pin == "a/large"
    second = first_match(rules, ctx(tier="pro"))
    assert second is not None and second.label == "rule 2"
    assert second.actions.exclude == frozenset({"a/large"})
    assert second.actions.cap_cost_per_million_micros == 2_500_000
    assert first_match(rules, ctx()) is None


def test_rules_round_trip_through_json() -> None:
    raw = [{"when": {"tier": "pro"}, "then": {"prefer": ["b/small"], "fallbacks": ["a/small"]}}]
    assert rules_from_json(rules_to_json(raw)) == raw
    (rule,) = compile_(*rules_from_json(rules_to_json(raw)))
    assert (rule.actions.prefer, rule.actions.fallbacks) == (("b/small",), ("a/small",))
    assert rules_from_json("") == []


def test_a_bad_rule_in_the_catalog_names_its_path_and_line() -> None:
    text = """providers:
  a: {vendor: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  - {id: a/small, provider: a, upstream_model: s, context_window: 100, max_output_tokens: 10,
     prices: {input: "1", output: "1"}}
tenants:
  acme:
    routing_rules:
      - when: {tier: free}
        then: {pin: a/small}
      - then:
          pin: a/none
"""
    with pytest.raises(CatalogError) as caught:
        parse_catalog(text)
    message = str(caught.value)
    assert "tenants.acme.routing_rules.1.then.pin" in message
    assert ":12:" in message and "unknown model 'a/none'" in message
