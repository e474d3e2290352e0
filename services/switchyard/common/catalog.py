"""The catalog: providers, models and their prices, aliases, fallbacks, tiers and tenants.

One YAML file, validated by pydantic. A bad file fails at start with one `CatalogError`
that names the file, the path of the bad key, its line and why. Prices are written as
decimal strings in USD per 1M tokens and held as integer micro-USD per 1M tokens.
Secrets never live here: a provider's key and base URL may be overridden from the
environment (`SWITCHYARD_PROVIDER_<NAME>_API_KEY` / `_BASE_URL`, then the vendor's usual
variable such as `OPENAI_API_KEY`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    field_validator,
    model_validator,
)

from switchyard.common.money import MICROS_PER_USD, UnitPrices

VENDORS: Final = ("openai", "anthropic", "gemini", "mistral", "cohere", "openai_compatible")

# The vendor's usual environment variables, read when the Switchyard-specific one is unset.
VENDOR_KEY_ENV: Final = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "cohere": "CO_API_KEY",
}


class CatalogError(Exception):
    """The catalog cannot be used; the message names the file, the key path and the reason."""


def _decimal_number(value: Any, name: str, example: str) -> Decimal:
    """A number written in YAML (a string, int or float) as an exact finite Decimal: str()
    first, so a YAML float such as 12.5 becomes exactly Decimal("12.5")."""
    if isinstance(value, bool) or not isinstance(value, str | int | float | Decimal):
        raise ValueError(f"{name} must be a number, for example '{example}'")
    try:
        number = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal number: {value!r}") from exc
    if not number.is_finite():
        raise ValueError(f"{name} must be a finite number")
    return number


def _usd_per_million_to_micros(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, str | int | Decimal):
        raise ValueError("price must be a decimal string of USD per 1M tokens, for example '0.15'")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise ValueError(f"not a decimal number: {value!r}") from exc
    if amount < 0:
        raise ValueError("price must not be negative")
    micros = amount * MICROS_PER_USD
    if micros != micros.to_integral_value():
        raise ValueError("price is finer than one micro-USD per 1M tokens")
    return int(micros)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


PriceMicros = Annotated[int, PlainSerializer(lambda v: str(Decimal(v) / MICROS_PER_USD))]


class VolumeTier(_Strict):
    """A volume discount: once a tenant's month-to-date tokens (input + output) on the model,
    before a request, reach `above_monthly_tokens`, that request costs `discount_percent` less."""

    above_monthly_tokens: int = Field(gt=0)
    discount_percent: Decimal

    @field_validator("discount_percent", mode="before")
    @classmethod
    def _percent(cls, value: Any) -> Decimal:
        percent = _decimal_number(value, "discount_percent", "12.5")
        if not 0 < percent < 100:
            raise ValueError("discount_percent must be above 0 and below 100")
        if percent != percent.quantize(Decimal("0.01")):
            raise ValueError("discount_percent has more than 2 decimal places")
        return percent


class Prices(_Strict):
    """Prices of one model in micro-USD per 1M tokens (written in USD per 1M in YAML), and its
    volume discounts, ascending by threshold."""

    input: PriceMicros
    output: PriceMicros
    cached_input: PriceMicros | None = None
    reasoning: PriceMicros | None = None
    cache_write_input: PriceMicros | None = None
    volume_tiers: tuple[VolumeTier, ...] = ()

    @field_validator("input", "output", "cached_input", "reasoning", "cache_write_input", mode="before")
    @classmethod
    def _to_micros(cls, value: Any) -> int | None:
        return None if value is None else _usd_per_million_to_micros(value)

    @field_validator("volume_tiers")
    @classmethod
    def _tiers_ascending(cls, tiers: tuple[VolumeTier, ...]) -> tuple[VolumeTier, ...]:
        for index in range(1, len(tiers)):
            before, here = tiers[index - 1].above_monthly_tokens, tiers[index].above_monthly_tokens
            if here <= before:
                raise ValueError(
                    f"tiers must be sorted ascending and unique by above_monthly_tokens: "
                    f"tier {index} ({here}) is not above tier {index - 1} ({before})"
                )
        return tiers

    def unit_prices(self) -> UnitPrices:
        """The five prices, with the vendor's fallbacks filled in (cached and cache-write
        input at the input price, reasoning at the output price, where not given)."""
        return UnitPrices(
            input=self.input,
            output=self.output,
            cached_input=self.input if self.cached_input is None else self.cached_input,
            reasoning=self.output if self.reasoning is None else self.reasoning,
            cache_write_input=self.input if self.cache_write_input is None else self.cache_write_input,
        )


class Capability(StrEnum):
    """What a model can do."""

    TOOLS = "tools"
    VISION = "vision"
    JSON_MODE = "json_mode"
    JSON_SCHEMA = "json_schema"
    REASONING = "reasoning"
    AUDIO = "audio"
    STREAMING = "streaming"


class Category(StrEnum):
    """A model's size class, for `auto` routing."""

    SMALL = "small"
    LARGE = "large"
    REASONING = "reasoning"


class Timeouts(_Strict):
    """Per-provider HTTP timeouts, in milliseconds."""

    connect_ms: int = Field(default=5_000, gt=0)
    first_byte_ms: int = Field(default=60_000, gt=0)
    idle_ms: int = Field(default=30_000, gt=0)


class Provider(_Strict):
    """An account at a vendor, served by that vendor's adapter."""

    vendor: str
    base_url: str
    region: str = ""
    free_tier: bool = False
    # Name of the environment variable holding the key; default by convention.
    api_key_env: str | None = None
    # gRPC target of the adapter; default from settings for the vendor.
    adapter: str | None = None
    timeouts: Timeouts = Timeouts()
    max_connections: int = Field(default=100, gt=0)
    http2: bool = False
    # Options for the OpenAI-compatible adapter (where usage arrives, which parameters exist).
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("vendor")
    @classmethod
    def _known_vendor(cls, value: str) -> str:
        if value not in VENDORS:
            raise ValueError(f"unknown vendor {value!r}; expected one of {', '.join(VENDORS)}")
        return value

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("base_url must start with http:// or https://")
        return value.rstrip("/")


def _utc_timestamp(value: Any) -> datetime:
    """A YAML date (`2026-12-01`), timestamp or ISO string as an aware UTC datetime; naive is UTC."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"not an ISO date or timestamp: {value!r}") from exc
    elif isinstance(value, date) and not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    if not isinstance(value, datetime):
        raise ValueError("effective_from must be a date (2026-12-01) or an ISO timestamp")
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class PriceChange(_Strict):
    """New prices for a model from `effective_from` (aware, UTC) on."""

    effective_from: datetime
    prices: Prices

    @field_validator("effective_from", mode="before")
    @classmethod
    def _to_utc(cls, value: Any) -> datetime:
        return _utc_timestamp(value)


# Encodings a catalog may name as a model's exact tokenizer (see switchyard.ledger.tokens).
Tokenizer = Literal["o200k_base", "cl100k_base"]


class ImageTokens(_Strict):
    """How a model bills an image in prompt tokens, where it differs from its vendor's usual rule
    (`switchyard.ledger.tokens` applies it). Exactly one of OpenAI's two documented rules:

    * tiles, `base` and `tile`: fit in 2048x2048, scale the short side down to 768, then `base`
      plus `tile` per 512x512 tile; low detail costs `base` alone. gpt-4o and gpt-4.1 bill
      85 + 170 (the rule when this is unset); gpt-4o-mini 2833 + 5667.
    * patches, `patch_multiplier`: one per 32x32 patch, at most 1536, times the multiplier,
      whatever the detail. gpt-4.1-mini 1.62, gpt-4.1-nano 2.46, o4-mini 1.72.
    """

    base: int | None = Field(default=None, ge=0)
    tile: int | None = Field(default=None, ge=0)
    patch_multiplier: Decimal | None = None

    @field_validator("patch_multiplier", mode="before")
    @classmethod
    def _multiplier(cls, value: Any) -> Decimal | None:
        if value is None:
            return None
        multiplier = _decimal_number(value, "patch_multiplier", "1.62")
        if multiplier <= 0:
            raise ValueError("patch_multiplier must be above 0")
        return multiplier

    @model_validator(mode="after")
    def _one_rule(self) -> ImageTokens:
        tiles = (self.base is not None, self.tile is not None)
        if self.patch_multiplier is not None:
            if any(tiles):
                raise ValueError("give base and tile (tiles) or patch_multiplier (patches), not both")
        elif not all(tiles):
            raise ValueError("give both base and tile (tiles), or patch_multiplier (patches)")
        return self


class Model(_Strict):
    """A model in the catalog, by its `vendor/model` id.

    `prices` apply until the first of `price_changes` (ascending by `effective_from`).
    `tokenizer` names the model's exact tokenizer where the id does not reveal it (an OpenAI
    model behind an OpenAI-compatible provider); unset, it follows from the id's vendor part.
    `image_tokens` is how the model bills images where its vendor's usual rule is wrong for it
    (OpenAI's mini models); unset, the vendor's rule.
    """

    id: str
    provider: str
    upstream_model: str
    context_window: int = Field(gt=0)
    max_output_tokens: int = Field(gt=0)
    prices: Prices
    capabilities: tuple[Capability, ...] = (Capability.STREAMING,)
    category: Category = Category.LARGE
    quality: int = Field(default=50, ge=0, le=100)
    aliases: tuple[str, ...] = ()
    fallbacks: tuple[str, ...] = ()
    # Per-tenant limits on this model, on top of the tenant's tier limits.
    requests_per_minute: int | None = Field(default=None, gt=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)
    price_changes: tuple[PriceChange, ...] = ()
    tokenizer: Tokenizer | None = None
    image_tokens: ImageTokens | None = None

    @field_validator("id")
    @classmethod
    def _vendor_slash_model(cls, value: str) -> str:
        left, sep, right = value.partition("/")
        if not sep or not left or not right:
            raise ValueError("model id must look like 'vendor/model'")
        return value

    @field_validator("price_changes")
    @classmethod
    def _changes_ascending(cls, changes: tuple[PriceChange, ...]) -> tuple[PriceChange, ...]:
        for index in range(1, len(changes)):
            before, here = changes[index - 1].effective_from, changes[index].effective_from
            if here <= before:
                raise ValueError(
                    f"changes must be sorted ascending and unique by effective_from: "
                    f"change {index} ({here.isoformat()}) is not after change {index - 1} "
                    f"({before.isoformat()})"
                )
        return changes


class Tier(_Strict):
    """Rate limits of a tenant tier."""

    requests_per_minute: int = Field(gt=0)
    lockout_seconds: int = Field(default=0, ge=0)
    tokens_per_minute: int | None = Field(default=None, gt=0)


class Tenant(_Strict):
    """A tenant: its tier, the models it may use (empty: all), its routing rules and the cosine
    similarity a paraphrase needs to be answered from its cache (unset: the service default).

    `routing_rules` is an ordered list (first match wins) validated by
    `switchyard.router.rules.compile_rules` when the catalog loads.
    """

    tier: str = "free"
    allowed_models: tuple[str, ...] = ()
    routing_rules: tuple[dict[str, Any], ...] = ()
    semantic_threshold: float | None = Field(default=None, gt=0, le=1)


DEFAULT_TIERS: Final = {
    "free": Tier(requests_per_minute=10, lockout_seconds=300),
    "pro": Tier(requests_per_minute=50, lockout_seconds=60),
    "expert": Tier(requests_per_minute=200, lockout_seconds=30),
    "master": Tier(requests_per_minute=1000, lockout_seconds=0),
}


class Catalog(_Strict):
    """The whole catalog, cross-checked: every reference names something that exists."""

    providers: dict[str, Provider]
    models: tuple[Model, ...]
    aliases: dict[str, str] = Field(default_factory=dict)
    default_model: str | None = None
    tiers: dict[str, Tier] = Field(default_factory=lambda: dict(DEFAULT_TIERS))
    tenants: dict[str, Tenant] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> Catalog:
        ids = [m.id for m in self.models]
        seen: set[str] = set()
        for index, model_id in enumerate(ids):
            if model_id in seen:
                raise _at(("models", index, "id"), f"duplicate model id {model_id!r}")
            seen.add(model_id)
        for index, model in enumerate(self.models):
            if model.provider not in self.providers:
                raise _at(("models", index, "provider"), f"unknown provider {model.provider!r}")
            for fb_index, fallback in enumerate(model.fallbacks):
                if fallback not in seen:
                    raise _at(("models", index, "fallbacks", fb_index), f"unknown model {fallback!r}")
            for alias in model.aliases:
                if alias in seen:
                    raise _at(("models", index, "aliases"), f"alias {alias!r} is also a model id")
        for alias, target in self.aliases.items():
            if target not in seen:
                raise _at(("aliases", alias), f"alias {alias!r} points to unknown model {target!r}")
        if self.default_model is not None and self.resolve(self.default_model) is None:
            raise _at(("default_model",), f"unknown model {self.default_model!r}")
        for name, tenant in self.tenants.items():
            if tenant.tier not in self.tiers:
                raise _at(("tenants", name, "tier"), f"unknown tier {tenant.tier!r}")
            for m_index, model_id in enumerate(tenant.allowed_models):
                if model_id not in seen:
                    raise _at(("tenants", name, "allowed_models", m_index), f"unknown model {model_id!r}")
            if tenant.routing_rules:
                self._check_rules(name, tenant)
        return self

    def _check_rules(self, name: str, tenant: Tenant) -> None:
        # Imported here: the rules module is the router's, and it imports nothing from the catalog.
        from switchyard.router.rules import RuleError, compile_rules

        try:
            compile_rules(tenant.routing_rules, model_ids=set(self._by_id), tiers=set(self.tiers))
        except RuleError as exc:
            raise _at(("tenants", name, "routing_rules", exc.index, *exc.path), exc.message) from None

    def model(self, model_id: str) -> Model | None:
        """The model with this exact id."""
        return self._by_id.get(model_id)

    def resolve(self, name: str) -> Model | None:
        """A model id or an alias (catalog-level or a model's own) to its model."""
        found = self._by_id.get(name)
        if found is not None:
            return found
        target = self.aliases.get(name)
        if target is not None:
            return self._by_id.get(target)
        return self._by_alias.get(name)

    @property
    def _by_id(self) -> Mapping[str, Model]:
        cached: Mapping[str, Model] | None = self.__dict__.get("_by_id_cache")
        if cached is None:
            cached = {m.id: m for m in self.models}
            object.__setattr__(self, "_by_id_cache", cached)
        return cached

    @property
    def _by_alias(self) -> Mapping[str, Model]:
        cached: Mapping[str, Model] | None = self.__dict__.get("_by_alias_cache")
        if cached is None:
            cached = {alias: m for m in self.models for alias in m.aliases}
            object.__setattr__(self, "_by_alias_cache", cached)
        return cached


class _LocatedError(ValueError):
    def __init__(self, loc: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.loc = loc


def _at(loc: tuple[str | int, ...], message: str) -> _LocatedError:
    return _LocatedError(loc, message)


DEFAULT_CATALOG: Final = "default_catalog.yaml"


def load_catalog(path: str | Path | None = None) -> Catalog:
    """Load and validate a catalog file; `None` loads the embedded default catalog."""
    if path is None:
        text = resources.files("switchyard.common").joinpath(DEFAULT_CATALOG).read_text(encoding="utf-8")
        return parse_catalog(text, source=f"<embedded {DEFAULT_CATALOG}>")
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise CatalogError(f"{file}: cannot read the catalog: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CatalogError(f"{file}: the catalog is not UTF-8 (byte {exc.start})") from None
    return parse_catalog(text, source=str(file))


def parse_catalog(text: str, *, source: str = "<catalog>") -> Catalog:
    """Validate catalog YAML text; errors name `source`, the key path and its line."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise CatalogError(f"{source}{where}: not valid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CatalogError(f"{source}: the catalog must be a mapping with 'providers' and 'models'")
    try:
        return Catalog.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        loc = tuple(first["loc"])
        message = str(first["msg"])
        ctx_error = (first.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _LocatedError):
            loc, message = ctx_error.loc, str(ctx_error)
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        raise CatalogError(_describe(source, node, loc, message, len(exc.errors()))) from None


def _describe(source: str, node: yaml.Node | None, loc: Sequence[str | int], message: str, count: int) -> str:
    path = ".".join(str(part) for part in loc) or "<root>"
    line = _line_of(node, loc)
    where = f"{source}:{line}" if line else source
    more = f" (and {count - 1} more problem{'s' if count > 2 else ''})" if count > 1 else ""
    return f"{where}: {path}: {message}{more}"


def _line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """The 1-based line of the YAML node at `loc`, or of its nearest existing parent."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
            key = next((k for k, _ in node.value if getattr(k, "value", None) == str(part)), None)
            if child is None or key is None:
                return line
            line, node = key.start_mark.line + 1, child
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def provider_api_key(name: str, provider: Provider, environ: Mapping[str, str] | None = None) -> str | None:
    """The provider's key from the environment, never from the catalog file."""
    env = os.environ if environ is None else environ
    specific = env.get(f"SWITCHYARD_PROVIDER_{_env_name(name)}_API_KEY")
    if specific:
        return specific
    fallback = provider.api_key_env or VENDOR_KEY_ENV.get(name) or VENDOR_KEY_ENV.get(provider.vendor)
    return env.get(fallback) if fallback else None


def provider_base_url(name: str, provider: Provider, environ: Mapping[str, str] | None = None) -> str:
    """The provider's base URL, overridable by `SWITCHYARD_PROVIDER_<NAME>_BASE_URL`."""
    env = os.environ if environ is None else environ
    return env.get(f"SWITCHYARD_PROVIDER_{_env_name(name)}_BASE_URL", provider.base_url).rstrip("/")


def _env_name(name: str) -> str:
    return name.upper().replace("-", "_").replace(".", "_")
