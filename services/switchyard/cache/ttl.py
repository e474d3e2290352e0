"""How long a cached answer may be served again, chosen by the kind of question.

Runs on every cacheable store, so it is cheap: one pass over the lower-cased words of the last
user message (its last `MAX_CHARS` characters), split on anything but letters, digits, "+" and
"#" ("last-night" reads "last night", "what's" reads "what s"), looking up keywords and short
phrases in one table; at each word the longest phrase starting there counts and uses its words
up, so "electric current" (a science phrase) is not read as "current". About 12 µs for a
200-character prompt, 160 µs for `MAX_CHARS`.

Kinds and their default TTLs (`DEFAULT_TTL_S`; operators replace them per kind with `overrides`):
- time-sensitive, 300 s: live data (news, headlines, weather, forecasts, prices, stock and crypto
  quotes, exchange and interest rates, scores, standings, traffic, outages, "live score", ...)
  and time words (today, tonight, tomorrow, yesterday, now, current, latest, recent, "this week",
  "last night", "ago", "what time is it", "what day is it", ...), and a year within one of the
  current one (a date like 2026-12-03 reads as its year, "in 2025" as the year);
- factual, 86,400 s: stable facts (definitions, history, maths, science, geography, "capital of",
  "who wrote", "how many", unit conversions, programming languages and their syntax) and
  arithmetic such as "17 * 23", and an earlier year after "in", "of", "the", "since", ... ("in
  1492", "the 1966 World Cup": a bare number such as a budget of 1500 is no year);
- general, 1,800 s: everything else (advice, creative writing, opinions, chit-chat).

Precedence, first match wins:
1. The caller's `cache.ttl_seconds` > 0: kind "caller", that TTL.
2. Creative writing (poem, haiku, song lyrics, "story about", joke, ...) is general even when it
   names a time word or a fact: "write a poem about today" is general, since a poem does not go
   stale. Live data still wins over it: "write a limerick about today's news" is time-sensitive,
   the poem needs the news.
3. Time-sensitive beats factual: "what is the latest version of python" is time-sensitive, "who
   won the 1966 world cup" factual.
4. Weather words on another world are science, not a forecast: "what is the weather like on
   Mars" is factual (a planet or the moon cancels weather words; it does not cancel time words,
   so "what is the weather on Mars today" stays time-sensitive).
5. "now" as the message's first word is a discourse marker ("Now make it shorter"), not a time.
6. Only when the user message matched no kind and is not creative, the system prompt (its first
   `MAX_CHARS` characters) is a weak signal: naming a live-data domain ("you are a news
   assistant", "stock market", "sports", "weather", ...) makes the request time-sensitive. It
   never counts time words, since many system prompts state today's date.

Ambiguous words are read conservatively, toward the shorter TTL: a stale answer served for a day
costs more than a few extra vendor calls. "live" only counts in phrases ("live score", "live
stream", ...) since "where do penguins live" is not live data, and "stock" only in market phrases.

The reason names the kind and at most the one keyword that decided it (a phrase of the vocabulary,
its words joined by spaces, or a year), never any other text of the prompt: prompts are not to be
logged.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from switchyard.v1 import common_pb2

TIME_SENSITIVE: Final = "time_sensitive"
GENERAL: Final = "general"
FACTUAL: Final = "factual"
# The kind of a decision the caller's own TTL made.
CALLER: Final = "caller"
TtlClass: TypeAlias = Literal["time_sensitive", "general", "factual"]

DEFAULT_TTL_S: Final[Mapping[str, int]] = {TIME_SENSITIVE: 300, GENERAL: 1_800, FACTUAL: 86_400}
MAX_CHARS: Final = 4_000

# The vocabulary, one group a line, written as the text reads once lower-cased and split into words.
# Live data: time-sensitive, even in creative writing.
_LIVE: Final = (
    "news|headline|headlines|breaking news|price|prices|stocks|stock price|stock prices|stock market"
    "|stock quote|stock quotes|stock ticker|in stock|share price|share prices|ticker|nasdaq|nyse"
    "|dow jones|s p 500|sp500|ftse|nikkei|crypto|cryptocurrency|cryptocurrencies|bitcoin|btc|ethereum"
    "|dogecoin|exchange rate|exchange rates|forex|usd|eur|gbp|jpy|euro|euros|yen|interest rate"
    "|interest rates|mortgage rate|mortgage rates|inflation rate|unemployment rate|score|scores"
    "|final score|box score|standings|fixtures|election results|polls|traffic|road closures|outage"
    "|outages|trending|live score|live scores|live stream|livestream|live updates|live results"
    "|live coverage|live feed|live blog|live data|live price|live prices|live game|live match|is live"
    "|going live|box office"
)
# Weather: time-sensitive, unless the text names another world.
_WEATHER: Final = (
    "weather|forecast|forecasts|will it rain|is it raining|going to rain|will it snow|is it snowing"
    "|temperature in|temperature outside|humidity|uv index|air quality|pollen count"
)
# Time words: time-sensitive, except in creative writing.
_TIME: Final = (
    "today|tonight|tomorrow|yesterday|now|right now|current|currently|latest|newest|recent|recently"
    "|lately|nowadays|upcoming|this week|this weekend|this month|this year|this morning|this afternoon"
    "|this evening|this season|next week|next weekend|next month|next year|last night|last week"
    "|last weekend|last month|last year|last season|ago|so far|at the moment|these days|up to date"
    "|real time|realtime|what time is it|what time|what day is it|what s the date|what is the date"
    "|what date is it|time now|local time|what s new|what is new"
)
# Stable facts.
_FACTUAL: Final = (
    "define|definition|meaning|meaning of|synonym|synonyms|antonym|etymology|spell|spelling|pronounce"
    "|stand for|stands for|acronym|abbreviation|explain what|what is meant by|difference between"
    "|capital of|capital city|who wrote|who invented|who discovered|who painted|who composed"
    "|who founded|who was|when was|when did|what year|which year|was born|invented|discovered"
    "|founded|how many|how far|how tall|how deep|how old is the|history|historical|century"
    "|centuries|ancient|medieval|empire|dynasty|world war|civil war|battle of|revolution|pharaoh"
    "|square root|derivative|integral|prime number|prime numbers|theorem|equation|factorial"
    "|calculate|logarithm|algebra|geometry|calculus|trigonometry|pythagorean|percent of"
    "|divided by|multiplied by|physics|chemistry|biology|atom|atoms|molecule|molecules|element"
    "|periodic table|photosynthesis|gravity|speed of light|boiling point|melting point|dna|cells"
    "|evolution|species|mammal|mammals|electron|proton|neutron|atomic number|relativity"
    "|quantum|thousand years ago|million years ago|billion years ago|electric current"
    "|alternating current|direct current|price elasticity|country"
    "|countries|continent|continents|ocean|oceans|river|rivers|mountain|mountains|desert|island"
    "|equator|latitude|longitude|population of|largest|tallest|longest|highest|convert|conversion"
    "|km|kilometers|kilometres|miles|meters|metres|feet|inches|cm|mm|kg|kilograms|grams|pounds"
    "|lbs|ounces|oz|celsius|fahrenheit|kelvin|liters|litres|gallons|tablespoons|teaspoons|mph"
    "|temperature in celsius|temperature in fahrenheit|temperature in kelvin|what time zone"
    "|syntax|python|javascript|typescript|java|rust|golang|c++|c#|ruby|php|sql|bash|haskell"
    "|kotlin|swift|regex|list comprehension|lambda|decorator|loop|loops"
)
# Other worlds: factual, and they cancel weather words.
_WORLDS: Final = (
    "mars|venus|jupiter|saturn|neptune|uranus|pluto|mercury|moon|exoplanet|exoplanets|planet|planets"
)
# Creative writing: general, and it cancels time words and facts (not live data).
_CREATIVE: Final = (
    "poem|poems|poetry|haiku|haikus|limerick|sonnet|ode to|lyrics|song lyrics|rhyme|rhyming"
    "|short story|story about|bedtime story|tell me a story|write a song|song about|joke|jokes"
    "|fan fiction|screenplay"
)
# Phrases that only use their words up, so that they count for nothing: "credit score" is no score.
_NEUTRAL: Final = "credit score|test score|test scores|z score|chicken stock|beef stock|vegetable stock"
# What the system prompt can say, as its weak signal: a live-data domain.
_SYSTEM_LIVE: Final = (
    "news|headlines|weather|forecast|forecasts|stocks|stock market|markets|trading|trader|crypto"
    "|cryptocurrency|sports|scores|traffic|real time|realtime|current events|exchange rates"
)

# The groups a phrase can belong to.
_G_LIVE: Final = 1
_G_WEATHER: Final = 2
_G_TIME: Final = 3
_G_FACTUAL: Final = 4
_G_WORLD: Final = 5
_G_CREATIVE: Final = 6
_G_NEUTRAL: Final = 7


@dataclass(frozen=True, slots=True)
class _Table:
    """A vocabulary, indexed for one pass: one-word phrases, and longer ones by their first two words."""

    words: dict[str, int]  # one-word phrase: its group
    starts: frozenset[str]  # the first word of every phrase
    longest: dict[tuple[str, str], int]  # first two words of a longer phrase: the most words it has
    phrases: dict[tuple[str, ...], int]  # longer phrase: its group


def _table(groups: Mapping[int, str]) -> _Table:
    words: dict[str, int] = {}
    longest: dict[tuple[str, str], int] = {}
    phrases: dict[tuple[str, ...], int] = {}
    for group, spelled in groups.items():
        for phrase in spelled.split("|"):
            split = tuple(phrase.split())
            if split in phrases or phrase in words:
                raise AssertionError(f"{phrase!r} is listed twice")
            if len(split) == 1:
                words[phrase] = group
            else:
                phrases[split] = group
                pair = (split[0], split[1])
                longest[pair] = max(longest.get(pair, 0), len(split))
    starts = frozenset(words) | frozenset(pair[0] for pair in longest)
    return _Table(words, starts, longest, phrases)


_USER_TABLE: Final = _table(
    {
        _G_LIVE: _LIVE,
        _G_WEATHER: _WEATHER,
        _G_TIME: _TIME,
        _G_FACTUAL: _FACTUAL,
        _G_WORLD: _WORLDS,
        _G_CREATIVE: _CREATIVE,
        _G_NEUTRAL: _NEUTRAL,
    }
)
_SYSTEM_TABLE: Final = _table({_G_LIVE: _SYSTEM_LIVE})
# A word: letters, digits, "+" and "#" ("_" is no letter: it is made a space first).
_WORD: Final = re.compile(r"[\w+#]+")
_DIGIT: Final = re.compile(r"\d")
# Arithmetic on numbers: "17 * 23", "2+2", "x^2 = 9". Looked for only when the text has a number.
_ARITHMETIC: Final = re.compile(r"\d\s*[+*/^×÷=]\s*\d")
# Words after which an earlier year is history: "in 1492", "the 1966 World Cup".
_BEFORE_YEAR: Final = frozenset({"in", "of", "the", "since", "during", "from", "until", "before", "after"})
# A first word that is no time but a discourse marker.
_OPENERS: Final = frozenset({"now"})
_KINDS: Final = frozenset(DEFAULT_TTL_S)


@dataclass(frozen=True, slots=True)
class TtlDecision:
    """The kind of a request (time_sensitive, general, factual, or caller when the caller set its
    TTL), the TTL its answer gets, and why: the kind and at most the one keyword that decided it."""

    kind: str
    ttl_s: int
    reason: str


def _scan(text: str, table: _Table, *, years: bool) -> tuple[dict[int, str], bool]:
    """The first keyword found per group in `text` (lower-cased), and whether it has a number.

    At each word that starts a phrase, the longest phrase found there counts and uses its words
    up. With `years`, a four-digit word within one year of the current year counts as a time word."""
    if "_" in text:
        text = text.replace("_", " ")
    words = _WORD.findall(text)
    count = len(words)
    starts, longest, phrases, single = table.starts, table.longest, table.phrases, table.words
    found: dict[int, str] = {}
    used_up_to = 0
    for index in [index for index, word in enumerate(words) if word in starts]:
        if index < used_up_to:
            continue
        word = words[index]
        if index == 0 and word in _OPENERS:
            continue
        group: int | None = None
        if index + 1 < count:
            most = longest.get((word, words[index + 1]))
            if most is not None:
                for size in range(min(most, count - index), 1, -1):
                    phrase = tuple(words[index : index + size])
                    group = phrases.get(phrase)
                    if group is not None:
                        used_up_to = index + size
                        if group not in found:
                            found[group] = " ".join(phrase)
                        break
        if group is None:
            group = single.get(word)
            if group is not None and group not in found:
                found[group] = word
    numbers = _DIGIT.search(text) is not None
    if numbers and years:
        now = time.gmtime().tm_year
        previous = ""
        for word in words:
            if len(word) == 4 and word.isdigit():
                year = int(word)
                if abs(year - now) <= 1:
                    found.setdefault(_G_TIME, word)
                elif 1000 <= year < now and previous in _BEFORE_YEAR:
                    found.setdefault(_G_FACTUAL, word)
            previous = word
    return found, numbers


@functools.lru_cache(maxsize=256)
def _system_domain(system: str) -> str | None:
    """The live-data domain a system prompt names, if any; remembered, since a deployment sends
    the same few system prompts again and again."""
    return _scan(system.lower(), _SYSTEM_TABLE, years=False)[0].get(_G_LIVE)


def _user_text(request: common_pb2.ChatRequest) -> str | None:
    for message in reversed(request.messages):
        if message.role == common_pb2.ROLE_USER:
            parts = message.parts
            text = parts[0].text if len(parts) == 1 else "\n".join([part.text for part in parts if part.text])
            return text[-MAX_CHARS:]
    return None


def _system_text(request: common_pb2.ChatRequest) -> str:
    parts: list[str] = []
    size = 0
    for message in request.messages:
        if message.role == common_pb2.ROLE_SYSTEM:
            for part in message.parts:
                if part.text and size < MAX_CHARS:
                    parts.append(part.text)
                    size += len(part.text) + 1
    return "\n".join(parts)[:MAX_CHARS]


def _ttls(overrides: Mapping[str, int] | None) -> Mapping[str, int]:
    if not overrides:
        return DEFAULT_TTL_S
    unknown = set(overrides) - _KINDS
    if unknown:
        raise ValueError(f"unknown TTL kinds {sorted(unknown)}; known: {sorted(_KINDS)}")
    for kind, ttl in overrides.items():
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl <= 0:
            raise ValueError(f"the TTL for {kind} must be a whole number of seconds > 0, not {ttl!r}")
    return {**DEFAULT_TTL_S, **overrides}


def _kind_and_reason(request: common_pb2.ChatRequest) -> tuple[str, str]:
    text = _user_text(request)
    if text is None:
        return GENERAL, "general: no user message"
    found, numbers = _scan(text.lower(), _USER_TABLE, years=True)
    if found:
        creative = found.get(_G_CREATIVE)
        live = found.get(_G_LIVE)
        if live is None and _G_WORLD not in found:
            live = found.get(_G_WEATHER)
        if live is None and creative is None:
            live = found.get(_G_TIME)
        if live is not None:
            return TIME_SENSITIVE, f'time-sensitive: "{live}"'
        if creative is not None:
            return GENERAL, f'general: creative "{creative}"'
        fact = found.get(_G_FACTUAL) or found.get(_G_WORLD)
        if fact is not None:
            return FACTUAL, f'factual: "{fact}"'
    if numbers and _ARITHMETIC.search(text):
        return FACTUAL, "factual: arithmetic"
    # Nothing but neutral phrases matched: the system prompt may say what the assistant is for.
    system = _system_text(request)
    domain = _system_domain(system) if system else None
    if domain is not None:
        return TIME_SENSITIVE, f'time-sensitive: system prompt "{domain}"'
    return GENERAL, "general: no keyword"


def classify_ttl(
    request: common_pb2.ChatRequest, *, overrides: Mapping[str, int] | None = None
) -> TtlDecision:
    """How long the answer to `request` may be served from the cache (see the module docstring).

    `overrides` replaces the default TTL of some kinds; an unknown kind or a TTL that is not a
    whole number of seconds > 0 raises ValueError."""
    ttls = _ttls(overrides)
    caller = request.cache.ttl_seconds
    if caller > 0:
        return TtlDecision(CALLER, caller, "caller's ttl")
    kind, reason = _kind_and_reason(request)
    return TtlDecision(kind, ttls[kind], reason)
