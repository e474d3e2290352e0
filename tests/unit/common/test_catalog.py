"""The catalog: the embedded default is valid, and a bad file fails with file, key path and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from switchyard.common.catalog import (
    CatalogError,
    load_catalog,
    parse_catalog,
    provider_api_key,
    provider_base_url,
)

GOOD = """\
providers:
  openai:
    vendor: openai
    base_url: https://api.openai.com/v1/
models:
  - id: openai/gpt-4o-mini
    provider: openai
    upstream_model: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    prices: {input: "0.15", output: "0.60"}
    aliases: [fast]
aliases:
  cheap: openai/gpt-4o-mini
"""


def test_embedded_default_catalog_is_valid() -> None:
    catalog = load_catalog(None)
    assert catalog.default_model is not None and catalog.resolve(catalog.default_model) is not None
    for model in catalog.models:
        assert model.provider in catalog.providers
        assert model.prices.input > 0 and model.prices.output > 0


def test_prices_become_integer_micros_per_million() -> None:
    model = parse_catalog(GOOD).models[0]
    assert model.prices.input == 150_000 and model.prices.output == 600_000
    prices = model.prices.unit_prices()
    assert prices.cached_input == 150_000 and prices.reasoning == 600_000


def test_resolve_by_id_model_alias_and_catalog_alias() -> None:
    catalog = parse_catalog(GOOD)
    assert catalog.resolve("openai/gpt-4o-mini") is catalog.resolve("fast") is catalog.resolve("cheap")
    assert catalog.resolve("nope") is None


def test_base_url_trailing_slash_is_dropped_and_env_overrides() -> None:
    catalog = parse_catalog(GOOD)
    provider = catalog.providers["openai"]
    assert provider_base_url("openai", provider, {}) == "https://api.openai.com/v1"
    env = {"SWITCHYARD_PROVIDER_OPENAI_BASE_URL": "http://127.0.0.1:9/v1/"}
    assert provider_base_url("openai", provider, env) == "http://127.0.0.1:9/v1"


def test_api_key_comes_from_env_switchyard_first_then_vendor_variable() -> None:
    provider = parse_catalog(GOOD).providers["openai"]
    assert provider_api_key("openai", provider, {}) is None
    assert provider_api_key("openai", provider, {"OPENAI_API_KEY": "a"}) == "a"
    both = {"OPENAI_API_KEY": "a", "SWITCHYARD_PROVIDER_OPENAI_API_KEY": "b"}
    assert provider_api_key("openai", provider, both) == "b"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('input: "0.15"', 'input: "cheap"', r":11: models\.0\.prices\.input: not a decimal number"),
        ('input: "0.15"', 'input: "-1"', r":11: models\.0\.prices\.input: price must not be negative"),
        ("vendor: openai", "vendor: openia", r":3: providers\.openai\.vendor: unknown vendor 'openia'"),
        ("provider: openai", "provider: azure", r":7: models\.0\.provider: unknown provider 'azure'"),
        (
            "context_window: 128000",
            "context_window: -5",
            r":9: models\.0\.context_window: Input should be greater",
        ),
        (
            "cheap: openai/gpt-4o-mini",
            "cheap: openai/gpt-5",
            r":14: aliases\.cheap: alias 'cheap' points to unknown",
        ),
        (
            "    aliases: [fast]",
            "    aliases: [fast]\n    colour: blue",
            r":13: models\.0\.colour: Extra inputs",
        ),
        (
            "id: openai/gpt-4o-mini",
            "id: gpt-4o-mini",
            r":6: models\.0\.id: model id must look like 'vendor/model'",
        ),
    ],
)
def test_bad_catalog_names_file_line_path_and_reason(
    tmp_path: Path, old: str, new: str, expected: str
) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(GOOD.replace(old, new))
    with pytest.raises(CatalogError, match=rf"^{path}{expected}"):
        load_catalog(path)


def test_broken_yaml_and_missing_file_are_clear(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text("providers: [\n")
    with pytest.raises(CatalogError, match=r"catalog\.yaml:\d+: not valid YAML"):
        load_catalog(path)
    with pytest.raises(CatalogError, match=r"missing\.yaml: cannot read the catalog"):
        load_catalog(tmp_path / "missing.yaml")


def test_a_tenants_semantic_threshold_is_a_similarity() -> None:
    base = "providers: {p: {vendor: openai, base_url: 'http://127.0.0.1:9/v1'}}\nmodels: []\n"
    catalog = parse_catalog(base + "tenants: {acme: {semantic_threshold: 0.9}, other: {}}\n")
    assert catalog.tenants["acme"].semantic_threshold == 0.9
    assert catalog.tenants["other"].semantic_threshold is None
    with pytest.raises(CatalogError, match="semantic_threshold"):
        parse_catalog(base + "tenants: {acme: {semantic_threshold: 1.5}}\n")
