"""The vendor table: one translator per vendor wire format.

Adding a vendor is one module in this package (a `Translator` subclass, see
`switchyard.adapters.base`) and one row here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from switchyard.adapters.base import Translator
from switchyard.adapters.vendors.openai import OpenAITranslator
from switchyard.common.catalog import Provider

TranslatorFactory = Callable[[str, Provider, str | None], Translator]
"""Builds a translator from (provider name, provider config, API key)."""

TRANSLATORS: Final[dict[str, TranslatorFactory]] = {
    "openai": OpenAITranslator,
}
