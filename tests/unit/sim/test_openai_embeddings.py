"""OpenAI simulator: ``POST /v1/embeddings``, driven through the official ``openai`` SDK.

The SDK asks for base64 by default and decodes it, so the default path checks the
base64 encoding end to end; ``encoding_format="float"`` checks the JSON lists.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from switchyard.sim.faults import RunningSimulator, start_simulator
from switchyard.sim.openai import (
    EMBEDDING_MAX_INPUT_TOKENS,
    EMBEDDING_MAX_INPUTS,
    EMBEDDING_MODELS,
    embedding_tokens,
    embedding_vector,
)

TEXTS = ["How do I reset my password?", "The weather in Paris is sunny today."]
INVALID_INPUT = "'$.input' is invalid"


def knobs_header(**knobs: Any) -> dict[str, str]:
    return {"x-sim-knobs": json.dumps(knobs)}


def norm(vector: Sequence[float]) -> float:
    return math.sqrt(math.fsum(v * v for v in vector))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    return math.fsum(x * y for x, y in zip(a, b, strict=True)) / (norm(a) * norm(b))


def decode_base64(data: str) -> list[float]:
    raw = base64.b64decode(data)
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    running = await start_simulator("openai", port=0)
    try:
        yield running
    finally:
        await running.close()


@pytest_asyncio.fixture
async def client(sim: RunningSimulator) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test-key", max_retries=0, timeout=10)
    try:
        yield sdk
    finally:
        await sdk.close()


async def embed(client: openai.AsyncOpenAI, texts: Sequence[str], **kwargs: Any) -> list[list[float]]:
    result = await client.embeddings.create(model="text-embedding-3-small", input=list(texts), **kwargs)
    return [item.embedding for item in result.data]


# --------------------------------------------------------------------------- #
# answers
# --------------------------------------------------------------------------- #


async def test_default_request_is_base64_and_the_sdk_decodes_it(
    client: openai.AsyncOpenAI, sim: RunningSimulator
) -> None:
    raw = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=TEXTS)
    sent = sim.control.stats.last_request
    assert isinstance(sent, dict) and sent["encoding_format"] == "base64" and sent["input"] == TEXTS
    wire = json.loads(raw.text)
    assert wire["object"] == "list" and wire["model"] == "text-embedding-3-small"
    assert [item["object"] for item in wire["data"]] == ["embedding", "embedding"]
    assert [item["index"] for item in wire["data"]] == [0, 1]
    assert all(isinstance(item["embedding"], str) for item in wire["data"])
    assert decode_base64(wire["data"][0]["embedding"]) == embedding_vector(TEXTS[0], 1536)

    result = raw.parse()
    assert result.object == "list" and result.model == "text-embedding-3-small"
    assert [item.index for item in result.data] == [0, 1]
    for item, text in zip(result.data, TEXTS, strict=True):
        assert len(item.embedding) == 1536
        assert item.embedding == embedding_vector(text, 1536)
        assert norm(item.embedding) == pytest.approx(1.0, abs=1e-5)
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["content-type"].startswith("application/json")


async def test_float_format_sends_json_numbers_equal_to_base64_ones(client: openai.AsyncOpenAI) -> None:
    raw = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=TEXTS, encoding_format="float"
    )
    wire = json.loads(raw.text)
    assert all(isinstance(item["embedding"], list) for item in wire["data"])
    assert all(isinstance(v, float) for v in wire["data"][0]["embedding"])
    floats = [item.embedding for item in raw.parse().data]
    assert floats == await embed(client, TEXTS)  # the SDK's default (base64, decoded)

    explicit = await client.embeddings.create(
        model="text-embedding-3-small", input=TEXTS, encoding_format="base64"
    )
    # an explicit format is returned as sent: the base64 string, little-endian float32
    encoded = explicit.data[1].embedding
    assert isinstance(encoded, str)
    assert decode_base64(encoded) == floats[1]


async def test_model_sizes_and_dimensions(client: openai.AsyncOpenAI) -> None:
    for model, size in EMBEDDING_MODELS.items():
        result = await client.embeddings.create(model=model, input="switchyards route traffic")
        assert len(result.data[0].embedding) == size, model
        assert result.model == model
    assert EMBEDDING_MODELS["text-embedding-3-large"] == 3072

    for model, dimensions in (("text-embedding-3-small", 256), ("text-embedding-3-large", 1024)):
        result = await client.embeddings.create(model=model, input=TEXTS, dimensions=dimensions)
        for item in result.data:
            assert len(item.embedding) == dimensions
            assert norm(item.embedding) == pytest.approx(1.0, abs=1e-5)
    one = await embed(client, ["a single dimension"], dimensions=1)
    assert one[0] in ([1.0], [-1.0])


async def test_vectors_are_deterministic(client: openai.AsyncOpenAI) -> None:
    text = "Deterministic vectors make tests reproducible."
    first = await embed(client, [text, "something else entirely", text])
    second = await embed(client, [text])
    assert first[0] == first[2] == second[0]
    assert first[0] != first[1]
    assert await embed(client, [text], dimensions=64) == [embedding_vector(text, 64)]


async def test_similar_texts_are_closer_than_unrelated_ones(client: openai.AsyncOpenAI) -> None:
    anchor, similar, reworded, unrelated = await embed(
        client,
        [
            "How do I reset my password?",
            "how do I reset my password",
            "Please help me reset the password of my account",
            "Volcanic glaciers rarely melt during winter.",
        ],
    )
    assert cosine(anchor, similar) > 0.95
    assert 0.3 < cosine(anchor, reworded) < 0.95
    assert abs(cosine(anchor, unrelated)) < 0.2
    assert cosine(anchor, similar) > cosine(anchor, reworded) > cosine(anchor, unrelated)

    # no word in common, only character 3-grams: a little similarity, words dominate
    inflected, base = await embed(client, ["resetting passwords", "reset password"])
    assert 0.05 < cosine(inflected, base) < 0.35


async def test_usage_counts_words_and_punctuation(client: openai.AsyncOpenAI) -> None:
    texts = ["Hello, world!", "one two three four five"]
    assert [embedding_tokens(t) for t in texts] == [4, 5]
    result = await client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert result.usage.prompt_tokens == 9
    assert result.usage.total_tokens == 9
    single = await client.embeddings.create(model="text-embedding-3-small", input="Hello, world!")
    assert single.usage.prompt_tokens == 4 and len(single.data) == 1


async def test_token_array_inputs(client: openai.AsyncOpenAI) -> None:
    one = await client.embeddings.create(model="text-embedding-3-small", input=[9906, 11, 1917, 0])
    assert len(one.data) == 1 and one.usage.prompt_tokens == 4
    assert one.data[0].embedding == embedding_vector("9906 11 1917 0", 1536)

    many = await client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    assert [item.index for item in many.data] == [0, 1]
    assert many.usage.prompt_tokens == 5
    assert many.data[1].embedding == embedding_vector("4 5", 1536)


async def test_headers_and_ratelimit_tokens(client: openai.AsyncOpenAI) -> None:
    texts = ["alpha beta gamma", "delta"]
    first = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=texts)
    second = await client.embeddings.with_raw_response.create(model="text-embedding-3-small", input=texts)
    for raw in (first, second):
        assert raw.headers["x-request-id"].startswith("req_")
        assert raw.headers["openai-version"]
        assert int(raw.headers["x-ratelimit-limit-requests"]) > 0
    assert int(second.headers["x-ratelimit-remaining-requests"]) == (
        int(first.headers["x-ratelimit-remaining-requests"]) - 1
    )
    assert int(second.headers["x-ratelimit-remaining-tokens"]) == (
        int(first.headers["x-ratelimit-remaining-tokens"]) - 4
    )


async def test_models_list_includes_embedding_models(client: openai.AsyncOpenAI) -> None:
    ids = [m.id async for m in client.models.list()]
    assert set(EMBEDDING_MODELS) <= set(ids) and "gpt-4o" in ids
    assert (await client.models.retrieve("text-embedding-3-large")).id == "text-embedding-3-large"


# --------------------------------------------------------------------------- #
# validation
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "bad_input",
    ["", [], ["fine", ""], [[]], [[1, 2], []], [-1], ["text", 5]],
    ids=[
        "empty-string",
        "empty-list",
        "empty-item",
        "empty-token-array",
        "empty-second-array",
        "bad-id",
        "mixed",
    ],
)
async def test_empty_or_malformed_input_is_a_400(client: openai.AsyncOpenAI, bad_input: Any) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="text-embedding-3-small", input=bad_input)
    err = info.value
    assert err.status_code == 400
    assert err.param == "input"
    assert err.type == "invalid_request_error"
    assert INVALID_INPUT in err.message
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}


async def test_parameter_validation(client: openai.AsyncOpenAI) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"dimensions": 0}, "dimensions", "integer_below_min_value"),
        ({"dimensions": 1537}, "dimensions", "integer_above_max_value"),
        ({"input": ["x"] * (EMBEDDING_MAX_INPUTS + 1)}, "input", "array_above_max_length"),
    ]
    for kwargs, param, code in cases:
        with pytest.raises(openai.BadRequestError) as info:
            await client.embeddings.create(**{"model": "text-embedding-3-small", "input": "hi", **kwargs})
        assert (info.value.param, info.value.code) == (param, code), kwargs

    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="text-embedding-ada-002", input="hi", dimensions=256)
    assert info.value.param == "dimensions"
    assert "does not support specifying dimensions" in info.value.message

    too_long = " ".join(["word"] * (EMBEDDING_MAX_INPUT_TOKENS + 1))
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(model="text-embedding-3-small", input=["short", too_long])
    assert info.value.param == "input" and "'input[1]'" in info.value.message
    ok = await client.embeddings.create(
        model="text-embedding-3-small", input=" ".join(["word"] * EMBEDDING_MAX_INPUT_TOKENS)
    )
    assert ok.usage.prompt_tokens == EMBEDDING_MAX_INPUT_TOKENS


async def test_raw_request_validation(sim: RunningSimulator) -> None:
    url = sim.base_url + "/embeddings"
    cases: list[tuple[object, str | None]] = [
        ({"input": "hi"}, "model"),
        ({"model": 5, "input": "hi"}, "model"),
        ({"model": "text-embedding-3-small"}, "input"),
        ({"model": "text-embedding-3-small", "input": 7}, "input"),
        ({"model": "text-embedding-3-small", "input": "hi", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "text-embedding-3-small", "input": "hi", "dimensions": "256"}, "dimensions"),
        ({"model": "text-embedding-3-small", "input": "hi", "dimensions": True}, "dimensions"),
        ({"model": "text-embedding-3-small", "input": "hi", "user": 1}, "user"),
        ([1, 2], None),
    ]
    async with httpx.AsyncClient() as http:
        for body, param in cases:
            resp = await http.post(url, json=body)
            assert resp.status_code == 400, body
            error = resp.json()["error"]
            assert (error["type"], error["param"]) == ("invalid_request_error", param), body
        bad_json = await http.post(url, content=b"{nope", headers={"content-type": "application/json"})
        assert (
            bad_json.status_code == 400 and "could not parse the JSON" in bad_json.json()["error"]["message"]
        )
        fine = await http.post(
            url,
            json={"model": "text-embedding-3-small", "input": "hi", "user": "u-1", "encoding_format": None},
        )
        assert fine.status_code == 200 and isinstance(fine.json()["data"][0]["embedding"], list)
    assert sim.control.stats.errors == len(cases) + 1
    assert sim.control.stats.completed == 1


@pytest.mark.parametrize("model", ["text-embedding-4", "gpt-4o"])
async def test_unknown_model_is_a_404(client: openai.AsyncOpenAI, model: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.embeddings.create(model=model, input="hi")
    assert info.value.code == "model_not_found"
    assert f"`{model}` does not exist" in info.value.message


async def test_api_key_enforced() -> None:
    running = await start_simulator("openai", api_key="sk-right-key-123456")
    wrong = openai.AsyncOpenAI(base_url=running.base_url, api_key="sk-wrong-key-000000", max_retries=0)
    right = openai.AsyncOpenAI(base_url=running.base_url, api_key="sk-right-key-123456", max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await wrong.embeddings.create(model="text-embedding-3-small", input="hi")
        assert info.value.code == "invalid_api_key"
        ok = await right.embeddings.create(model="text-embedding-3-small", input="hi")
        assert len(ok.data[0].embedding) == 1536
    finally:
        await wrong.close()
        await right.close()
        await running.close()


# --------------------------------------------------------------------------- #
# fault knobs
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    ("knobs", "exc_type", "status", "code"),
    [
        ({"status": 503}, openai.InternalServerError, 503, "server_is_overloaded"),
        ({"status": 503, "retry_after_s": 2}, openai.InternalServerError, 503, "server_is_overloaded"),
        ({"status": 500}, openai.InternalServerError, 500, None),
        ({"status": 429, "retry_after_s": 7}, openai.RateLimitError, 429, "rate_limit_exceeded"),
        (
            {"status": 429, "error_code": "insufficient_quota"},
            openai.RateLimitError,
            429,
            "insufficient_quota",
        ),
        ({"status": 401}, openai.AuthenticationError, 401, "invalid_api_key"),
    ],
)
async def test_status_knob_maps_to_sdk_exception(
    client: openai.AsyncOpenAI,
    knobs: dict[str, Any],
    exc_type: type[openai.APIStatusError],
    status: int,
    code: str | None,
) -> None:
    with pytest.raises(exc_type) as info:
        await client.embeddings.create(
            model="text-embedding-3-small", input=TEXTS, extra_headers=knobs_header(**knobs)
        )
    err = info.value
    assert err.status_code == status
    assert err.code == code
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    assert err.request_id and err.request_id.startswith("req_")
    assert err.response.headers["x-ratelimit-limit-requests"]
    if status == 429 and code == "rate_limit_exceeded":
        assert "text-embedding-3-small" in err.message  # the request's model
    if "retry_after_s" in knobs:
        assert err.response.headers["retry-after"] == str(knobs["retry_after_s"])
    else:
        assert "retry-after" not in err.response.headers


async def test_context_length_knob_uses_the_embeddings_wording(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.embeddings.create(
            model="text-embedding-3-small",
            input="one two three",
            extra_headers=knobs_header(status=400, error_code="context_length_exceeded"),
        )
    assert info.value.code == "context_length_exceeded"
    assert "maximum context length is 8192 tokens, however you requested 3 tokens" in info.value.message


async def test_error_message_override(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        await client.embeddings.create(
            model="text-embedding-3-small",
            input="hi",
            extra_headers=knobs_header(status=502, error_code="bad_gateway", error_message="upstream down"),
        )
    assert info.value.status_code == 502 and info.value.code == "bad_gateway"
    assert isinstance(info.value.body, dict) and info.value.body["message"] == "upstream down"


async def test_first_byte_delay(client: openai.AsyncOpenAI) -> None:
    started = time.perf_counter()
    await client.embeddings.create(
        model="text-embedding-3-small", input="hi", extra_headers=knobs_header(first_byte_delay_ms=150)
    )
    assert time.perf_counter() - started >= 0.15


async def test_script_fails_once_then_sdk_retry_succeeds(sim: RunningSimulator) -> None:
    async with httpx.AsyncClient() as http:
        resp = await http.post(sim.root_url + "/_sim/script", json=[{"status": 503, "retry_after_s": 0.05}])
        resp.raise_for_status()
    sdk = openai.AsyncOpenAI(base_url=sim.base_url, api_key="sk-test-key", max_retries=1, timeout=10)
    try:
        result = await sdk.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    finally:
        await sdk.close()
    assert len(result.data) == 2
    stats = sim.control.stats
    assert (stats.requests, stats.errors, stats.completed) == (2, 1, 1)


async def test_drop_knob_closes_the_connection(client: openai.AsyncOpenAI, sim: RunningSimulator) -> None:
    with pytest.raises(openai.APIConnectionError):
        await client.embeddings.create(
            model="text-embedding-3-small", input="hi", extra_headers=knobs_header(drop_after_chunks=0)
        )
    assert sim.control.stats.dropped == 1


# --------------------------------------------------------------------------- #
# the vector function
# --------------------------------------------------------------------------- #


def test_embedding_vector_properties() -> None:
    vector = embedding_vector("Feature hashing of words", 300)
    assert len(vector) == 300 and norm(vector) == pytest.approx(1.0, abs=1e-5)
    assert vector == embedding_vector("feature HASHING of words", 300)  # lower-cased words
    assert vector != embedding_vector("Feature hashing of words", 301)[:300]
    blank = embedding_vector("   ", 16)  # no words: one text-specific axis
    assert sorted(blank)[-1] == 1.0 and sum(abs(v) for v in blank) == 1.0
    assert embedding_tokens("   ") == 1
    with pytest.raises(ValueError):
        embedding_vector("x", 0)
