"""Catalog models as `ModelInfo`: prices in micros, enums, provider fields, aliases."""

from __future__ import annotations

from switchyard.common.catalog import parse_catalog
from switchyard.common.catalog_proto import model_info
from switchyard.v1 import common_pb2

CATALOG = """
providers:
  groq: {vendor: openai_compatible, base_url: "https://api.groq.com/openai/v1", region: eu, free_tier: true}
models:
  - id: groq/llama
    provider: groq
    upstream_model: llama-3.1-8b
    context_window: 131072
    max_output_tokens: 8192
    prices: {input: "0.05", output: "0.08"}
    capabilities: [tools, json_mode, streaming]
    category: small
    quality: 60
    aliases: [cheap]
aliases: {llama: groq/llama}
"""


def test_model_info() -> None:
    catalog = parse_catalog(CATALOG)
    info = model_info(catalog.models[0], catalog)
    assert info.id == "groq/llama"
    assert (info.provider, info.vendor, info.upstream_model) == ("groq", "openai_compatible", "llama-3.1-8b")
    assert (info.context_window_tokens, info.max_output_tokens, info.quality_score) == (131072, 8192, 60)
    assert list(info.capabilities) == [
        common_pb2.CAPABILITY_TOOLS,
        common_pb2.CAPABILITY_JSON_MODE,
        common_pb2.CAPABILITY_STREAMING,
    ]
    assert info.category == common_pb2.MODEL_CATEGORY_SMALL
    assert info.pricing.input_micros_per_million == 50_000
    assert info.pricing.output_micros_per_million == 80_000
    # Unpriced kinds fall back: cached and cache-write at input, reasoning at output.
    assert info.pricing.cached_input_micros_per_million == 50_000
    assert info.pricing.cache_write_input_micros_per_million == 50_000
    assert info.pricing.reasoning_micros_per_million == 80_000
    assert list(info.aliases) == ["cheap", "llama"]
    assert (info.region, info.free_tier) == ("eu", True)
