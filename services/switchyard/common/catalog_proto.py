"""Catalog entries as protos: the one conversion of a catalog `Model` to `ModelInfo`,
shared by the adapters' Capabilities and the edge's ListModels."""

from __future__ import annotations

from typing import Final

from switchyard.common.catalog import Capability, Catalog, Category, Model
from switchyard.v1 import common_pb2

CAPABILITIES: Final[dict[Capability, common_pb2.Capability.ValueType]] = {
    Capability.TOOLS: common_pb2.CAPABILITY_TOOLS,
    Capability.VISION: common_pb2.CAPABILITY_VISION,
    Capability.JSON_MODE: common_pb2.CAPABILITY_JSON_MODE,
    Capability.JSON_SCHEMA: common_pb2.CAPABILITY_JSON_SCHEMA,
    Capability.REASONING: common_pb2.CAPABILITY_REASONING,
    Capability.AUDIO: common_pb2.CAPABILITY_AUDIO,
    Capability.STREAMING: common_pb2.CAPABILITY_STREAMING,
}

CATEGORIES: Final[dict[Category, common_pb2.ModelCategory.ValueType]] = {
    Category.SMALL: common_pb2.MODEL_CATEGORY_SMALL,
    Category.LARGE: common_pb2.MODEL_CATEGORY_LARGE,
    Category.REASONING: common_pb2.MODEL_CATEGORY_REASONING,
}


def model_info(model: Model, catalog: Catalog) -> common_pb2.ModelInfo:
    """`model` as a `ModelInfo`: prices in micro-USD per 1M tokens (with the vendor's
    fallbacks filled in: cached and cache-write input at the input price, reasoning at
    the output price), capabilities and category as proto enums, vendor, region and free
    tier from its provider, and every alias that resolves to it (its own and the
    catalog-level ones)."""
    provider = catalog.providers[model.provider]
    prices = model.prices.unit_prices()
    aliases = list(model.aliases)
    aliases.extend(
        alias for alias, target in catalog.aliases.items() if target == model.id and alias not in aliases
    )
    return common_pb2.ModelInfo(
        id=model.id,
        provider=model.provider,
        vendor=provider.vendor,
        upstream_model=model.upstream_model,
        context_window_tokens=model.context_window,
        max_output_tokens=model.max_output_tokens,
        capabilities=[CAPABILITIES[capability] for capability in model.capabilities],
        category=CATEGORIES[model.category],
        quality_score=model.quality,
        pricing=common_pb2.Pricing(
            input_micros_per_million=prices.input,
            output_micros_per_million=prices.output,
            cached_input_micros_per_million=prices.cached_input,
            reasoning_micros_per_million=prices.reasoning,
            cache_write_input_micros_per_million=prices.cache_write_input,
        ),
        aliases=aliases,
        region=provider.region,
        free_tier=provider.free_tier,
    )
