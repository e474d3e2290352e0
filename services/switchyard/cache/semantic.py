"""Semantic matching: a paraphrase of a cached question may be answered by its entry.

A question's *scope* is everything but its wording: the tenant, the catalog model, the earlier
messages (the system prompt and any conversation before the last user message) and every
answer-shaping parameter (tools, tool choice, response format, sampling). Two questions are
compared only within one scope, so a paraphrase never crosses tenants, models, system prompts
or settings. Within a scope, the last user message's text is embedded (cache/embed.py) and
searched in an approximate-nearest-neighbour index (usearch, cosine); the nearest entry
answers when its cosine similarity is at least the threshold (the caller's
`cache.semantic_threshold`, else the tenant's `semantic_threshold` in the catalog, else
`SWITCHYARD_CACHE_SEMANTIC_THRESHOLD`, 0.85).

Questions that differ in a literal, a word with a digit in it (an order number, a year, an
id, "3pm"), are never paraphrases of each other, however close their embeddings: "status of
order 1234" must not be answered by "status of order 5678".

The index lives in each cache replica's memory and follows what the replicas stored
(cache/vectors.py); an entry that has since been evicted is found missing in the store at
lookup and dropped from the index then, and one that expired also when its expiry passes (at
the next question indexed), so the vectors of questions nobody asks again do not pile up. An
end user's questions leave at once when they are erased (`remove_end_user`).
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from switchyard.v1 import common_pb2

if TYPE_CHECKING:
    import numpy
    from numpy.typing import NDArray

    from switchyard.cache.embed import Embedder

__all__ = ["DEFAULT_THRESHOLD", "SemanticIndex", "SemanticMatch", "literals_of", "question_text", "scope_of"]

DEFAULT_THRESHOLD: Final = 0.85
# Questions whose vectors are remembered between a lookup and the store that follows it.
RECENT_VECTORS: Final = 1_024
# HNSW effort when adding and searching: about twice as fast as usearch's defaults (a question
# costs about 0.2 ms to add and 0.4 ms to find among 20,000 in one scope, 2 cores); a
# paraphrase it misses is a cache miss, never a wrong answer.
EXPANSION_ADD: Final = 16
EXPANSION_SEARCH: Final = 32
# Nearest neighbours looked at for one whose literals match.
NEIGHBOURS: Final = 4
_LITERAL: Final = re.compile(r"\w*\d\w*")
# Characters of the question that are embedded (the model reads at most 256 tokens anyway).
MAX_QUESTION_CHARS: Final = 2_000


def question_text(request: common_pb2.ChatRequest) -> str:
    """The text of the last message when it is the user's (images aside); "" otherwise."""
    if not request.messages or request.messages[-1].role != common_pb2.ROLE_USER:
        return ""
    text = " ".join(part.text for part in request.messages[-1].parts if part.text)
    return text.strip()[:MAX_QUESTION_CHARS]


def literals_of(text: str) -> frozenset[str]:
    """The words of `text` with a digit in them, lower-cased."""
    return frozenset(_LITERAL.findall(text.lower()))


def scope_of(tenant_id: str, request: common_pb2.ChatRequest, model: str) -> str:
    """A hash of everything but the last user message's wording (see the module docstring)."""
    shaped = common_pb2.ChatRequest(
        messages=request.messages[:-1],
        tools=request.tools,
        tool_choice=request.tool_choice,
        response_format=request.response_format,
        sampling=request.sampling,
    )
    last = request.messages[-1] if request.messages else None
    if last is not None and any(part.HasField("image") for part in last.parts):
        # A question about an image is not the same question about another image.
        shaped.messages.add().CopyFrom(last)
    digest = hashlib.sha256()
    for part in (tenant_id, model):
        digest.update(part.encode())
        digest.update(b"\x00")
    digest.update(shaped.SerializeToString(deterministic=True))
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class SemanticMatch:
    """The entry key of the nearest cached question and its cosine similarity."""

    key: str
    similarity: float


class SemanticIndex:
    """One usearch index per scope, of the embedded questions the replicas stored."""

    def __init__(
        self, embedder: Embedder, *, max_scopes: int = 100_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.embedder = embedder
        self._max_scopes = max_scopes
        self._clock = clock
        self._indexes: dict[str, object] = {}
        self._keys: dict[int, str] = {}
        self._labels: dict[str, tuple[str, int]] = {}
        self._literals: dict[int, frozenset[str]] = {}
        # The keys of each end user's questions (by their keyed hash), and each key's end user.
        self._by_end_user: dict[str, set[str]] = {}
        self._end_users: dict[str, str] = {}
        # (expires_at, label) of the questions with a known expiry; labels removed since stay
        # until they come up (or a compaction).
        self._expiries: list[tuple[float, int]] = []
        self._recent: dict[str, NDArray[numpy.float32]] = {}
        self._next_label = 1

    def __len__(self) -> int:
        return len(self._labels)

    def embed(self, texts: Sequence[str]) -> NDArray[numpy.float32]:
        """Unit vectors of `texts` (CPU-bound: call it in a worker thread)."""
        return self.embedder.embed(texts)

    async def vector_of(self, text: str) -> NDArray[numpy.float32]:
        """The unit vector of one question, remembered for a while: a lookup that misses is
        usually followed by the store of the answer to the same question. A local embedder
        runs in a worker thread (CPU-bound), a provider's is awaited (raises SwitchyardError)."""
        vector = self._recent.pop(text, None)
        if vector is None:
            aembed = getattr(self.embedder, "aembed", None)
            if aembed is not None:
                rows: NDArray[numpy.float32] = await aembed([text])
            else:
                rows = await asyncio.to_thread(self.embedder.embed, [text])
            vector = rows[0]
        self._recent[text] = vector
        while len(self._recent) > RECENT_VECTORS:
            del self._recent[next(iter(self._recent))]
        return vector

    def add(
        self,
        scope: str,
        key: str,
        vector: NDArray[numpy.float32],
        literals: frozenset[str] = frozenset(),
        *,
        expires_at: float = 0.0,
        end_user_hash: str = "",
    ) -> None:
        """Index `key`'s question (its vector and literals) under `scope`, replacing an earlier
        one; it leaves when `expires_at` (wall seconds; 0: never) passes, or its end user
        (`end_user_hash`, "" for none) is erased. Questions that have expired leave first."""
        from usearch.index import Index

        self.remove(key)
        self.drop_expired()
        index = self._indexes.get(scope)
        if index is None:
            if len(self._indexes) >= self._max_scopes:
                self._drop_scope(next(iter(self._indexes)))
            index = self._indexes[scope] = Index(
                ndim=self.embedder.dimensions,
                metric="cos",
                dtype="f32",
                expansion_add=EXPANSION_ADD,
                expansion_search=EXPANSION_SEARCH,
            )
        label = self._next_label
        self._next_label += 1
        index.add(label, vector)  # type: ignore[attr-defined]
        self._keys[label] = key
        self._labels[key] = (scope, label)
        self._literals[label] = literals
        if end_user_hash:
            self._end_users[key] = end_user_hash
            self._by_end_user.setdefault(end_user_hash, set()).add(key)
        if expires_at:
            heapq.heappush(self._expiries, (expires_at, label))

    def search(
        self,
        scope: str,
        vector: NDArray[numpy.float32],
        threshold: float,
        literals: frozenset[str] = frozenset(),
    ) -> SemanticMatch | None:
        """The nearest question of `scope` with the same literals, at or above `threshold`."""
        index = self._indexes.get(scope)
        if index is None or len(index) == 0:  # type: ignore[arg-type]
            return None
        matches = index.search(vector, NEIGHBOURS)  # type: ignore[attr-defined]
        for label, distance in zip(matches.keys, matches.distances, strict=True):
            similarity = 1.0 - float(distance)
            if similarity < threshold:
                return None  # the rest are further away
            key = self._keys.get(int(label))
            if key is not None and self._literals.get(int(label)) == literals:
                return SemanticMatch(key, min(1.0, similarity))
        return None

    def remove(self, key: str) -> None:
        """Forget `key` (its entry expired, was evicted or invalidated)."""
        found = self._labels.pop(key, None)
        if found is None:
            return
        scope, label = found
        self._keys.pop(label, None)
        self._literals.pop(label, None)
        end_user_hash = self._end_users.pop(key, None)
        if end_user_hash is not None:
            keys = self._by_end_user[end_user_hash]
            keys.discard(key)
            if not keys:
                del self._by_end_user[end_user_hash]
        index = self._indexes.get(scope)
        if index is not None:
            index.remove(label)  # type: ignore[attr-defined]
            if len(index) == 0:  # type: ignore[arg-type]
                del self._indexes[scope]

    def remove_end_user(self, end_user_hash: str) -> int:
        """Forget every question of the end user with this keyed hash; how many went."""
        gone = list(self._by_end_user.get(end_user_hash, ()))
        for key in gone:
            self.remove(key)
        return len(gone)

    def drop_expired(self) -> int:
        """Forget the questions whose expiry has passed; how many went."""
        now = self._clock()
        gone = 0
        while self._expiries and self._expiries[0][0] <= now:
            _, label = heapq.heappop(self._expiries)
            key = self._keys.get(label)
            if key is not None:
                self.remove(key)
                gone += 1
        if len(self._expiries) > 2 * len(self._keys) + 1_024:  # mostly labels removed since
            self._expiries = [(at, label) for at, label in self._expiries if label in self._keys]
            heapq.heapify(self._expiries)
        return gone

    def remove_where(self, drop: Callable[[str], bool]) -> int:
        """Forget every key for which `drop(key)` is true; how many went."""
        gone = [key for key in self._labels if drop(key)]
        for key in gone:
            self.remove(key)
        return len(gone)

    def _drop_scope(self, scope: str) -> None:
        for key, (where, _) in list(self._labels.items()):
            if where == scope:
                self.remove(key)
        self._indexes.pop(scope, None)
