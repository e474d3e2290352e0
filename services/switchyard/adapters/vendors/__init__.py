"""The vendor table: one translator per vendor wire format.

Adding a vendor is one module in this package (a `Translator` subclass, see
`switchyard.adapters.base`) and one row here. Rows name the class by import path, so an
adapter process imports only the vendor it serves.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Final, cast

from switchyard.adapters.base import Translator
from switchyard.common.catalog import Provider

TranslatorFactory = Callable[[str, Provider, str | None], Translator]
"""Builds a translator from (provider name, provider config, API key)."""

TRANSLATORS: Final[dict[str, str]] = {
    "openai": "switchyard.adapters.vendors.openai:OpenAITranslator",
    "anthropic": "switchyard.adapters.vendors.anthropic:AnthropicTranslator",
    "gemini": "switchyard.adapters.vendors.gemini:GeminiTranslator",
    "mistral": "switchyard.adapters.vendors.mistral:MistralTranslator",
    "cohere": "switchyard.adapters.vendors.cohere:CohereTranslator",
    "openai_compatible": "switchyard.adapters.vendors.openai_compatible:OpenAICompatibleTranslator",
}
"""Vendor name (as in the catalog's `vendor` field) -> `module:Class` of its translator."""


def load_translator(vendor: str) -> TranslatorFactory:
    """The translator class for `vendor`; ValueError naming the known vendors otherwise."""
    target = TRANSLATORS.get(vendor)
    if target is None:
        raise ValueError(f"no adapter for vendor {vendor!r}; known: {', '.join(sorted(TRANSLATORS))}")
    module_name, _, class_name = target.partition(":")
    factory = getattr(importlib.import_module(module_name), class_name)
    return cast(TranslatorFactory, factory)
