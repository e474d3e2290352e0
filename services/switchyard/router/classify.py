"""What kind of work a request is, how hard it looks, and which size of model it needs.

Runs on the edge for every `auto` request, so it is cheap: it reads only the system and user
text (the last `MAX_CHARS` characters of it) in one pass over its lower-cased words, looking
up keyword phrases in a table (about 10 µs for a short prompt, under 1 ms for `MAX_CHARS`);
regular expressions only look for structure (lists, paragraphs, code, CSV rows).

Task type. A caller-given `routing.task_type` wins. Otherwise an image makes it VISION, and
each other type scores its keyword hits (plus code structure for CODE and CSV rows for
DATA_ANALYSIS); the highest score wins, ties going to
the type listed first in `_ORDER` (code before reasoning before analysis, ...), and no hit at
all is SIMPLE_CHAT.

Complexity, 0 to 1, the capped sum of four parts:
- length: 0.35 · min(1, characters / 6,000);
- structure: 0.2 · min(1, (list items + code blocks + paragraphs beyond the first) / 8);
- reasoning words ("prove", "step by step", "trade-offs", ...): 0.15 each, at most 0.3;
- questions: 0.05 per question mark beyond the first, at most 0.15.

Category: VISION needs a large model; COMPLEX_REASONING or complexity ≥ `REASONING_AT` a
reasoning model; complexity < `SMALL_BELOW` on simple chat, translation or summarisation a
small one; everything else a large one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from switchyard.v1 import common_pb2

MAX_CHARS: Final = 8_000
SMALL_BELOW: Final = 0.35
REASONING_AT: Final = 0.7

SMALL: Final = "small"
LARGE: Final = "large"
REASONING: Final = "reasoning"

# Keywords and phrases per task type, written as the text reads once lower-cased and split into
# words (on anything but letters, digits, "+" and "#": "step-by-step" reads "step by step").
_KEYWORDS: Final = {
    common_pb2.TASK_TYPE_CODE: "function|functions|traceback|stack trace|exception|exceptions|compile"
    "|compiler|compilers|compiles|bug|bugs|refactor|refactoring|refactored|unit test|unit tests|regex|sql"
    "|python|javascript|typescript|rust|golang|java|c++|api endpoint",
    common_pb2.TASK_TYPE_COMPLEX_REASONING: "prove|proof|step by step|why does|derive|theorem|logic puzzle"
    "|logical puzzle|equation|solve|probability|trade off|trade offs|tradeoff|tradeoffs|reason about"
    "|reasoning about",
    common_pb2.TASK_TYPE_DATA_ANALYSIS: "analyze the data|analyse the data|analyze this data"
    "|analyse this data|dataset|csv|spreadsheet|average|median|correlation|regression|statistic"
    "|statistics|statistical|trend|trends",
    common_pb2.TASK_TYPE_RESEARCH: "source|sources|citation|citations|cite|literature|research"
    "|state of the art|paper|papers|compare studies|compare the studies|compare approaches"
    "|compare the approaches|compare findings|compare the findings",
    common_pb2.TASK_TYPE_CREATIVE_WRITING: "poem|short story|creative|fiction|lyrics|haiku|limerick|"
    + "|".join(
        f"{verb} {me}{article} {work}"
        for verb in ("write", "compose")
        for me in ("", "me ")
        for article in ("a", "an")
        for work in ("poem", "story", "song", "novel", "script")
    ),
    common_pb2.TASK_TYPE_SUMMARIZATION: "summary|summarise|summarize|summarization|summarisation|tl dr|tldr"
    "|key points|in one sentence|in a few sentences|condense|shorten",
    common_pb2.TASK_TYPE_TRANSLATION: "translate|translation|"
    + "|".join(
        f"{preposition} {language}"
        for preposition in ("in", "into", "to")
        for language in (
            "english french german spanish italian portuguese japanese chinese korean russian arabic dutch"
            " hindi"
        ).split()
    ),
}
# Words that make a request look harder, for the complexity score.
_REASONING_PHRASES: Final = (
    "prove|step by step|trade off|trade offs|tradeoff|tradeoffs|derive|justify|edge case|edge cases"
    "|compare and contrast|in depth|thoroughly|explain why"
)
# Code structure no keyword list catches; looked for only when the text has its first word.
_CODE_STRUCTURE: Final = re.compile(r"\bdef \w+\(|\bclass \w+|\bimport \w+")
_CSV_LINE: Final = re.compile(r"^\s*\w+(,\s*\w+){3,}\s*$", re.MULTILINE)
_WORD: Final = re.compile(r"[a-z0-9+#]+")
# Tie order: the first listed wins an equal score.
_ORDER: Final = tuple(_KEYWORDS)
# What each phrase (a tuple of words) counts for: a task type (0 for none) and whether it is a
# reasoning phrase; and, per word that starts a phrase, the most words a phrase from it has.
_PHRASES: Final[dict[tuple[str, ...], tuple[int, bool]]] = {}
_LONGEST: Final[dict[str, int]] = {}


def _index_phrases() -> None:
    reasoning = set(_REASONING_PHRASES.split("|"))
    spelled: list[tuple[str, int]] = [
        (phrase, task) for task, text in _KEYWORDS.items() for phrase in text.split("|")
    ]
    spelled += [(phrase, 0) for phrase in sorted(reasoning - {phrase for phrase, _ in spelled})]
    for phrase, task in spelled:
        words = tuple(phrase.split())
        _PHRASES[words] = (task, phrase in reasoning)
        _LONGEST[words[0]] = max(_LONGEST.get(words[0], 0), len(words))


_index_phrases()
_LIST_ITEM: Final = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+", re.MULTILINE)
_PARAGRAPH: Final = re.compile(r"\n\s*\n")
_SMALL_TASKS: Final = frozenset(
    {common_pb2.TASK_TYPE_SIMPLE_CHAT, common_pb2.TASK_TYPE_TRANSLATION, common_pb2.TASK_TYPE_SUMMARIZATION}
)
_READ_ROLES: Final = frozenset({common_pb2.ROLE_USER, common_pb2.ROLE_SYSTEM})


@dataclass(frozen=True, slots=True)
class Classification:
    """A request's task type (never UNSPECIFIED), complexity (0 to 1) and model category."""

    task_type: int
    complexity: float
    category: str
    given: bool


def _text_and_images(request: common_pb2.ChatRequest) -> tuple[str, bool]:
    parts: list[str] = []
    size = 0
    image = False
    for message in reversed(request.messages):
        if message.role not in _READ_ROLES:
            continue
        for part in reversed(message.parts):
            if part.HasField("image"):
                image = True
            elif size < MAX_CHARS:
                parts.append(part.text)
                size += len(part.text)
    text = "\n\n".join(reversed(parts))
    return text[-MAX_CHARS:], image


@dataclass(slots=True)
class _Scan:
    """What one pass over the words found: keyword hits per task type, reasoning phrases."""

    hits: dict[int, int]
    reasoning: int


def _scan(text: str) -> _Scan:
    """Count the keyword and reasoning phrases in the lower-cased words of `text`: at each word
    that starts a phrase, the longest phrase found there counts and its words are used up."""
    words = _WORD.findall(text.lower())
    longest = _LONGEST
    count = len(words)
    hits: dict[int, int] = {}
    reasoning = 0
    used_up_to = 0
    for index in [i for i, word in enumerate(words) if word in longest]:
        if index < used_up_to:
            continue
        for size in range(min(longest[words[index]], count - index), 0, -1):
            found = _PHRASES.get(tuple(words[index : index + size]))
            if found is not None:
                task, reasons = found
                if task:
                    hits[task] = hits.get(task, 0) + 1
                reasoning += reasons
                used_up_to = index + size
                break
    return _Scan(hits, reasoning)


def _complexity(text: str, reasoning_hits: int) -> float:
    length = 0.35 * min(1.0, len(text) / 6_000)
    blocks = text.count("```") // 2
    structure_hits = blocks + len(_LIST_ITEM.findall(text))
    if "\n" in text:
        structure_hits += len(_PARAGRAPH.findall(text))
    structure = 0.2 * min(1.0, structure_hits / 8)
    reasoning = min(0.3, 0.15 * reasoning_hits)
    questions = min(0.15, 0.05 * max(0, text.count("?") - 1))
    return round(min(1.0, length + structure + reasoning + questions), 4)


def complexity_of(text: str) -> float:
    """The complexity score of `text` (see the module docstring)."""
    return _complexity(text, _scan(text).reasoning)


def _code_structure_hits(text: str) -> int:
    hits = text.count("```") // 2
    if "def " in text or "class " in text or "import " in text:
        hits += len(_CODE_STRUCTURE.findall(text))
    return hits


def _csv_lines(text: str) -> int:
    return len(_CSV_LINE.findall(text)) if text.count(",") >= 3 else 0


def category_for(task_type: int, complexity: float) -> str:
    """The model category a task of this type and complexity needs."""
    if task_type == common_pb2.TASK_TYPE_VISION:
        return LARGE
    if task_type == common_pb2.TASK_TYPE_COMPLEX_REASONING or complexity >= REASONING_AT:
        return REASONING
    if complexity < SMALL_BELOW and task_type in _SMALL_TASKS:
        return SMALL
    return LARGE


def classify(request: common_pb2.ChatRequest) -> Classification:
    """Classify `request` (see the module docstring)."""
    text, image = _text_and_images(request)
    scan = _scan(text)
    complexity = _complexity(text, scan.reasoning)
    given = request.routing.task_type != common_pb2.TASK_TYPE_UNSPECIFIED
    if given:
        task_type = int(request.routing.task_type)
    elif image:
        task_type = common_pb2.TASK_TYPE_VISION
    else:
        hits = scan.hits
        structure = _code_structure_hits(text)
        if structure:
            hits[common_pb2.TASK_TYPE_CODE] = hits.get(common_pb2.TASK_TYPE_CODE, 0) + structure
        rows = _csv_lines(text)
        if rows:
            hits[common_pb2.TASK_TYPE_DATA_ANALYSIS] = hits.get(common_pb2.TASK_TYPE_DATA_ANALYSIS, 0) + rows
        task_type = common_pb2.TASK_TYPE_SIMPLE_CHAT
        best = 0
        for candidate in _ORDER:
            found = hits.get(candidate, 0)
            if found > best:
                task_type, best = candidate, found
    return Classification(task_type, complexity, category_for(task_type, complexity), given)
