"""Tenant routing rules: an ordered list per tenant, first match wins.

A rule (YAML under `tenants.<name>.routing_rules`):

    - name: code-to-claude              # optional
      when:                             # optional: no `when` matches every request
        model: [openai/gpt-4o, auto]    # the model as requested (id, alias or "auto")
        task_type: [code]               # simple_chat, complex_reasoning, code, research,
                                        # creative_writing, data_analysis, summarization,
                                        # translation, vision
        tags: {team: search}            # every one must equal the request's metadata tag
        tier: [pro, expert]
        hours_utc: "09-17"              # [start, end) in UTC hours; may wrap ("22-06")
        weekdays: [mon, tue]
        estimated_cost_above_usd: "0.01"
        estimated_cost_below_usd: "1"
      then:                             # one or more actions
        pin: anthropic/claude-sonnet    # only this model (then `fallbacks`, if given)
        exclude: [openai/gpt-4o]
        prefer: [mistral/mistral-small] # to the front, in this order, where they pass filters
        cap_cost_per_million_usd: "5"   # blended price cap per 1M tokens
        fallbacks: [openai/gpt-4o-mini] # replaces the model's fallback chain

`compile_rules` validates a list when the catalog loads and when an edge receives a
snapshot: unknown keys, models, tiers, task types or weekdays, bad hours or amounts, an
empty `then`, contradictions (a pinned or preferred model that is also excluded, pin with
prefer, an excluded fallback, a cost floor not below its ceiling) and rules that can never
match (after a rule with no conditions, or shadowed by an earlier rule whose conditions are a
subset of theirs) are `RuleError`s naming the rule's index and the key inside it. This module
imports nothing from the catalog (the catalog imports it).
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Final

from switchyard.v1 import common_pb2

__all__ = [
    "Rule",
    "RuleActions",
    "RuleContext",
    "RuleError",
    "compile_rules",
    "first_match",
    "rules_from_json",
    "rules_to_json",
]

AUTO: Final = "auto"
TASK_TYPES: Final = {
    "simple_chat": common_pb2.TASK_TYPE_SIMPLE_CHAT,
    "complex_reasoning": common_pb2.TASK_TYPE_COMPLEX_REASONING,
    "code": common_pb2.TASK_TYPE_CODE,
    "research": common_pb2.TASK_TYPE_RESEARCH,
    "creative_writing": common_pb2.TASK_TYPE_CREATIVE_WRITING,
    "data_analysis": common_pb2.TASK_TYPE_DATA_ANALYSIS,
    "summarization": common_pb2.TASK_TYPE_SUMMARIZATION,
    "translation": common_pb2.TASK_TYPE_TRANSLATION,
    "vision": common_pb2.TASK_TYPE_VISION,
}
WEEKDAYS: Final = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_RULE_KEYS: Final = frozenset({"name", "when", "then"})
_WHEN_KEYS: Final = frozenset(
    {
        "model",
        "task_type",
        "tags",
        "tier",
        "hours_utc",
        "weekdays",
        "estimated_cost_above_usd",
        "estimated_cost_below_usd",
    }
)
_THEN_KEYS: Final = frozenset({"pin", "exclude", "prefer", "cap_cost_per_million_usd", "fallbacks"})
_MICROS: Final = Decimal(1_000_000)


class RuleError(Exception):
    """A routing rule is invalid: `index` (0-based) of the rule, `path` inside it, and why."""

    def __init__(self, index: int, path: tuple[str | int, ...], message: str) -> None:
        super().__init__(f"rule {index + 1}: {'.'.join(str(p) for p in path) or '<rule>'}: {message}")
        self.index = index
        self.path = path
        self.message = message


@dataclass(frozen=True, slots=True)
class RuleContext:
    """What a rule's conditions look at, for one request."""

    requested: str
    resolved: str | None
    task_type: int
    tags: Mapping[str, str]
    tier: str
    now: datetime
    estimated_cost_micros: int


@dataclass(frozen=True, slots=True)
class RuleActions:
    """What a matching rule does to the plan."""

    pin: str | None = None
    exclude: frozenset[str] = frozenset()
    prefer: tuple[str, ...] = ()
    cap_cost_per_million_micros: int | None = None
    fallbacks: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class _Conditions:
    models: frozenset[str] | None = None
    task_types: frozenset[int] | None = None
    tags: tuple[tuple[str, str], ...] = ()
    tiers: frozenset[str] | None = None
    hours: frozenset[int] | None = None
    weekdays: frozenset[int] | None = None
    cost_above: int | None = None
    cost_below: int | None = None

    def empty(self) -> bool:
        return self == _Conditions()

    def implied_by(self, other: _Conditions) -> bool:
        """Whether every request matching `other` also matches these conditions."""

        def within(mine: frozenset[Any] | None, theirs: frozenset[Any] | None) -> bool:
            return mine is None or (theirs is not None and theirs <= mine)

        return (
            within(self.models, other.models)
            and within(self.task_types, other.task_types)
            and set(self.tags) <= set(other.tags)
            and within(self.tiers, other.tiers)
            and within(self.hours, other.hours)
            and within(self.weekdays, other.weekdays)
            and (
                self.cost_above is None
                or (other.cost_above is not None and other.cost_above >= self.cost_above)
            )
            and (
                self.cost_below is None
                or (other.cost_below is not None and other.cost_below <= self.cost_below)
            )
        )


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    position: int
    name: str
    actions: RuleActions
    conditions: _Conditions

    @property
    def label(self) -> str:
        """How plans and errors name the rule: "rule 2" or "rule 2 (code-to-claude)"."""
        return f"rule {self.position} ({self.name})" if self.name else f"rule {self.position}"

    def matches(self, ctx: RuleContext) -> bool:
        """Whether the request described by `ctx` meets every condition."""
        c = self.conditions
        if c.models is not None and ctx.requested not in c.models and (ctx.resolved not in c.models):
            return False
        if c.task_types is not None and ctx.task_type not in c.task_types:
            return False
        if any(ctx.tags.get(key) != value for key, value in c.tags):
            return False
        if c.tiers is not None and ctx.tier not in c.tiers:
            return False
        if c.hours is not None and ctx.now.hour not in c.hours:
            return False
        if c.weekdays is not None and ctx.now.weekday() not in c.weekdays:
            return False
        if c.cost_above is not None and ctx.estimated_cost_micros <= c.cost_above:
            return False
        return c.cost_below is None or ctx.estimated_cost_micros < c.cost_below


def first_match(rules: Sequence[Rule], ctx: RuleContext) -> Rule | None:
    """The first rule that matches, or None."""
    for rule in rules:
        if rule.matches(ctx):
            return rule
    return None


def rules_to_json(raw: Sequence[Mapping[str, Any]]) -> str:
    """The rules as canonical JSON (sorted keys), as routing snapshots carry them."""
    return json.dumps([dict(rule) for rule in raw], sort_keys=True, separators=(",", ":"), default=str)


def rules_from_json(text: str) -> list[dict[str, Any]]:
    """Rules from `rules_to_json`'s JSON; empty text is no rules."""
    if not text:
        return []
    loaded = json.loads(text)
    if not isinstance(loaded, list) or not all(isinstance(rule, dict) for rule in loaded):
        raise ValueError("routing rules JSON must be a list of objects")
    return loaded


def compile_rules(
    raw: Sequence[Mapping[str, Any]],
    *,
    model_ids: Collection[str],
    tiers: Collection[str],
    aliases: Collection[str] = (),
) -> tuple[Rule, ...]:
    """Validate and compile `raw` (see the module docstring); raises RuleError."""
    known_models = set(model_ids)
    requestable = known_models | set(aliases) | {AUTO}
    compiled: list[Rule] = []
    for index, rule in enumerate(raw):
        if not isinstance(rule, Mapping):
            raise RuleError(index, (), "a rule must be a mapping with 'then' (and optionally 'when', 'name')")
        _no_unknown(index, (), rule, _RULE_KEYS)
        name = rule.get("name", "")
        if not isinstance(name, str):
            raise RuleError(index, ("name",), "name must be a string")
        when = rule.get("when") or {}
        if not isinstance(when, Mapping):
            raise RuleError(index, ("when",), "when must be a mapping of conditions")
        then = rule.get("then")
        if not isinstance(then, Mapping) or not then:
            raise RuleError(index, ("then",), "then must name at least one action")
        conditions = _conditions(index, when, requestable, set(tiers))
        actions = _actions(index, then, known_models)
        for earlier in compiled:
            if earlier.conditions.empty():
                raise RuleError(
                    index,
                    (),
                    f"rule {index + 1} can never match: {earlier.label} has no conditions and matches first",
                )
            if earlier.conditions.implied_by(conditions):
                raise RuleError(
                    index,
                    ("when",),
                    f"rule {index + 1} can never match: every request it matches is matched first"
                    f" by {earlier.label}",
                )
        compiled.append(Rule(index + 1, name, actions, conditions))
    return tuple(compiled)


def _no_unknown(
    index: int, path: tuple[str | int, ...], data: Mapping[str, Any], known: frozenset[str]
) -> None:
    for key in data:
        if key not in known:
            raise RuleError(
                index, (*path, str(key)), f"unknown key {key!r}; expected one of {', '.join(sorted(known))}"
            )


def _names(index: int, path: tuple[str | int, ...], value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(item, str) and item for item in items):
        raise RuleError(index, path, "must be a name or a non-empty list of names")
    return items


def _micros(index: int, path: tuple[str | int, ...], value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise RuleError(index, path, "must be a decimal amount of USD, for example '0.5'")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise RuleError(index, path, f"not a decimal number: {value!r}") from None
    if not amount.is_finite() or amount < 0:
        raise RuleError(index, path, "must be a non-negative amount")
    return int(amount * _MICROS)


def _hours(index: int, value: Any) -> frozenset[int]:
    path = ("when", "hours_utc")
    if not isinstance(value, str) or value.count("-") != 1:
        raise RuleError(index, path, "must look like '09-17' (start and end hour, UTC)")
    start_text, end_text = value.split("-")
    if not (start_text.strip().isdigit() and end_text.strip().isdigit()):
        raise RuleError(index, path, "must look like '09-17' (start and end hour, UTC)")
    start, end = int(start_text), int(end_text)
    if not (0 <= start <= 23 and 0 <= end <= 24) or start == end % 24:
        raise RuleError(index, path, "hours must be 0-23 (end up to 24) and the range not empty")
    if start < end:
        return frozenset(range(start, end))
    return frozenset(range(start, 24)) | frozenset(range(0, end))


def _conditions(index: int, when: Mapping[str, Any], requestable: set[str], tiers: set[str]) -> _Conditions:
    _no_unknown(index, ("when",), when, _WHEN_KEYS)
    models = task_types = tier_set = hours = weekdays = None
    tags: tuple[tuple[str, str], ...] = ()
    above = below = None
    if "model" in when:
        names = _names(index, ("when", "model"), when["model"])
        for position, model in enumerate(names):
            if model not in requestable:
                raise RuleError(index, ("when", "model", position), f"unknown model or alias {model!r}")
        models = frozenset(names)
    if "task_type" in when:
        names = _names(index, ("when", "task_type"), when["task_type"])
        for position, task in enumerate(names):
            if task not in TASK_TYPES:
                raise RuleError(
                    index,
                    ("when", "task_type", position),
                    f"unknown task type {task!r}; expected one of {', '.join(TASK_TYPES)}",
                )
        task_types = frozenset(TASK_TYPES[task] for task in names)
    if "tags" in when:
        raw_tags = when["tags"]
        if not isinstance(raw_tags, Mapping) or not raw_tags:
            raise RuleError(index, ("when", "tags"), "must be a non-empty mapping of tag to value")
        for key, value in raw_tags.items():
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise RuleError(index, ("when", "tags", str(key)), "a tag value must be a string")
        tags = tuple(sorted((str(key), str(value)) for key, value in raw_tags.items()))
    if "tier" in when:
        names = _names(index, ("when", "tier"), when["tier"])
        for position, tier in enumerate(names):
            if tier not in tiers:
                raise RuleError(index, ("when", "tier", position), f"unknown tier {tier!r}")
        tier_set = frozenset(names)
    if "hours_utc" in when:
        hours = _hours(index, when["hours_utc"])
    if "weekdays" in when:
        names = _names(index, ("when", "weekdays"), when["weekdays"])
        for position, day in enumerate(names):
            if day not in WEEKDAYS:
                raise RuleError(
                    index,
                    ("when", "weekdays", position),
                    f"unknown weekday {day!r}; expected one of {WEEKDAYS}",
                )
        weekdays = frozenset(WEEKDAYS.index(day) for day in names)
    if "estimated_cost_above_usd" in when:
        above = _micros(index, ("when", "estimated_cost_above_usd"), when["estimated_cost_above_usd"])
    if "estimated_cost_below_usd" in when:
        below = _micros(index, ("when", "estimated_cost_below_usd"), when["estimated_cost_below_usd"])
    if above is not None and below is not None and above >= below:
        raise RuleError(
            index,
            ("when", "estimated_cost_above_usd"),
            "the cost floor must be below estimated_cost_below_usd",
        )
    return _Conditions(models, task_types, tags, tier_set, hours, weekdays, above, below)


def _actions(index: int, then: Mapping[str, Any], models: set[str]) -> RuleActions:
    _no_unknown(index, ("then",), then, _THEN_KEYS)

    def model_list(key: str) -> list[str]:
        names = _names(index, ("then", key), then[key])
        for position, model in enumerate(names):
            if model not in models:
                raise RuleError(index, ("then", key, position), f"unknown model {model!r}")
        return names

    pin = None
    if "pin" in then:
        if not isinstance(then["pin"], str):
            raise RuleError(index, ("then", "pin"), "pin names one model")
        pin = model_list("pin")[0]
    exclude = frozenset(model_list("exclude")) if "exclude" in then else frozenset()
    prefer = tuple(model_list("prefer")) if "prefer" in then else ()
    fallbacks = tuple(model_list("fallbacks")) if "fallbacks" in then else None
    cap = (
        _micros(index, ("then", "cap_cost_per_million_usd"), then["cap_cost_per_million_usd"])
        if ("cap_cost_per_million_usd" in then)
        else None
    )
    if pin is not None and pin in exclude:
        raise RuleError(index, ("then", "pin"), f"{pin} is pinned and excluded by the same rule")
    if pin is not None and prefer:
        raise RuleError(
            index, ("then", "prefer"), "pin and prefer contradict: a pinned plan has nothing to prefer"
        )
    for position, model in enumerate(prefer):
        if model in exclude:
            raise RuleError(
                index, ("then", "prefer", position), f"{model} is preferred and excluded by the same rule"
            )
    for position, model in enumerate(fallbacks or ()):
        if model in exclude:
            raise RuleError(index, ("then", "fallbacks", position), f"{model} is a fallback and excluded")
    return RuleActions(pin, exclude, prefer, cap, fallbacks)
