"""The response cache's TTL classifier: how long an answer may be served again, by kind of question."""

from __future__ import annotations

import dataclasses
import re
import time

import pytest

from switchyard.cache.ttl import (
    DEFAULT_TTL_S,
    FACTUAL,
    GENERAL,
    MAX_CHARS,
    TIME_SENSITIVE,
    TtlDecision,
    classify_ttl,
)
from switchyard.v1 import common_pb2

THIS_YEAR = time.gmtime().tm_year


def ask(
    *users: str, system: str | None = None, assistant: str = "Sure.", ttl: int = 0
) -> common_pb2.ChatRequest:
    """A request with an optional system prompt, then the user messages, an assistant answer
    between each two of them."""
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
    if system is not None:
        request.messages.add(role=common_pb2.ROLE_SYSTEM).parts.add(text=system)
    for index, text in enumerate(users):
        if index:
            request.messages.add(role=common_pb2.ROLE_ASSISTANT).parts.add(text=assistant)
        request.messages.add(role=common_pb2.ROLE_USER).parts.add(text=text)
    request.cache.ttl_seconds = ttl
    return request


TIME_SENSITIVE_PROMPTS = [
    "What's the weather like in Paris today?",
    "Who won the game last night?",
    "What is the current price of Bitcoin?",
    "Any news about the election results?",
    "How is the Apple stock price doing?",
    "What's the USD to EUR exchange rate?",
    "What time is it in Tokyo?",
    "Is it going to rain in Seattle?",
    "What are the latest developments in the peace talks?",
    "How bad is the traffic on the I-405 bridge?",
    "What's the score of the Lakers game?",
    "Summarize the top headlines for me",
    "Where can I watch the Champions League final live stream?",
    "What are mortgage rates like these days?",
    "Which movies are showing in cinemas this weekend?",
    f"Is the new Zelda game coming out in {THIS_YEAR}?",
    f"What events are planned for {THIS_YEAR}-12-03 in Berlin?",
    "Which pharmacies near me are open now?",
    "How much did the S&P 500 move yesterday?",
    "Is GitHub having an outage?",
    "Who is the current prime minister of the UK?",
    "What's the forecast for the weekend in Denver?",
    # Time words still count on another world: only weather words are cancelled there.
    "What is the weather on Mars today?",
    # Creative writing that needs live data: the poem is about the news.
    "Write a limerick about today's news",
    "what is the latest version of python",
    "What's new in the Kubernetes world?",
]

FACTUAL_PROMPTS = [
    "What is the capital of Australia?",
    "Who wrote Pride and Prejudice?",
    "How many legs does a spider have?",
    "Convert 5 miles to kilometers",
    "Define 'ephemeral'.",
    "Explain what a black hole is",
    # Weather on another world is planetary science, not a forecast.
    "What is the weather like on Mars?",
    "When did the Berlin Wall fall?",
    "What is the square root of 144?",
    "What is 17 * 23?",
    "How does photosynthesis turn sunlight into sugar?",
    "What is the boiling point of water at sea level in Fahrenheit?",
    "How do I write a list comprehension in Python?",
    "What's the syntax for a match expression in Rust?",
    "Who was the first emperor of Rome?",
    "Which is the longest river in Africa?",
    "How many teaspoons are in a tablespoon?",
    "What does DNA stand for?",
    # "current" inside a science phrase is no time word.
    "What is an electric current?",
    # An earlier year after "the" is history.
    "Who won the 1966 World Cup?",
    "What is the speed of light in a vacuum?",
    # "live" outside a live-data phrase is no time word.
    "Which animals live in the Sahara desert?",
    "What's the difference between a virus and a bacterium?",
    "What is 98.6 degrees Fahrenheit in Celsius?",
    # The longest phrase wins: "temperature in celsius" is a conversion, "temperature in" a forecast.
    "What is normal body temperature in Celsius?",
    "What time zone is Chicago in?",
]

GENERAL_PROMPTS = [
    "How do I ask my boss for a raise?",
    # Creative writing about today does not go stale: a poem is no report.
    "Write a poem about today",
    "Give me a good name for my new puppy",
    "Can you help me write a cover letter for a marketing job?",
    "What do you think about pineapple on pizza?",
    "Hi! How are you doing?",
    "Tell me a story about a dragon who is afraid of the dark",
    "Write a haiku about the first snow this year",
    "Suggest a three-day itinerary for a trip to Lisbon",
    # A leading "now" is a discourse marker.
    "Now make it shorter and punchier.",
    "Should I learn the guitar or the piano first?",
    "Brainstorm ten names for a coffee shop",
    "Rewrite this sentence to sound more polite: send me the file",
    "I feel anxious before presentations, any tips?",
    "How do I stay motivated to live a healthier life?",
    # A credit score is no game score.
    "What's a good credit score to aim for?",
    "Compose a sonnet about the latest autumn leaves",
    "Plan a birthday party for my 8 year old",
    # A bare number is no year.
    "My budget is 1500, what laptop should I buy for college?",
    "Can you make a grocery list for a vegetarian week?",
]


def test_the_labelled_set_is_large_enough() -> None:
    assert min(len(TIME_SENSITIVE_PROMPTS), len(FACTUAL_PROMPTS), len(GENERAL_PROMPTS)) >= 15


@pytest.mark.parametrize(
    ("prompt", "kind"),
    [(prompt, TIME_SENSITIVE) for prompt in TIME_SENSITIVE_PROMPTS]
    + [(prompt, FACTUAL) for prompt in FACTUAL_PROMPTS]
    + [(prompt, GENERAL) for prompt in GENERAL_PROMPTS],
)
def test_each_labelled_prompt_gets_its_kind_and_the_default_ttl(prompt: str, kind: str) -> None:
    decision = classify_ttl(ask(prompt))
    assert (decision.kind, decision.ttl_s) == (kind, DEFAULT_TTL_S[kind]), decision.reason


def test_the_default_ttls() -> None:
    assert DEFAULT_TTL_S == {TIME_SENSITIVE: 300, GENERAL: 1_800, FACTUAL: 86_400}


def test_the_tricky_cases_are_decided_by_the_documented_keyword() -> None:
    assert classify_ttl(ask("What is the weather like on Mars?")).reason == 'factual: "mars"'
    assert classify_ttl(ask("Who won the game last night?")).reason == 'time-sensitive: "last night"'
    assert classify_ttl(ask("Write a poem about today")).reason == 'general: creative "poem"'
    assert classify_ttl(ask("Write a limerick about today's news")).reason == 'time-sensitive: "news"'
    assert classify_ttl(ask("Now make it shorter.")).reason == "general: no keyword"
    assert classify_ttl(ask("Make it shorter now.")).reason == 'time-sensitive: "now"'


def test_time_sensitive_wins_over_factual() -> None:
    decision = classify_ttl(ask("What is the capital of the country with the highest inflation rate today?"))
    assert decision.kind == TIME_SENSITIVE
    assert decision.reason == 'time-sensitive: "inflation rate"'


def test_years_near_now_are_time_sensitive_and_earlier_ones_history() -> None:
    assert classify_ttl(ask(f"Who won the {THIS_YEAR - 1} final?")).kind == TIME_SENSITIVE
    assert classify_ttl(ask(f"Plans for {THIS_YEAR + 1}?")).reason == f'time-sensitive: "{THIS_YEAR + 1}"'
    assert classify_ttl(ask("What happened in 1492?")).reason == 'factual: "1492"'
    assert classify_ttl(ask(f"Who won the {THIS_YEAR - 2} final?")).kind == FACTUAL
    assert classify_ttl(ask("Is 1492 a nice number for a password?")).kind == GENERAL


def test_the_callers_ttl_wins_over_everything() -> None:
    for prompt in ("What's the weather today?", "What is the capital of France?", "hello"):
        decision = classify_ttl(ask(prompt, ttl=42), overrides={TIME_SENSITIVE: 60, FACTUAL: 3_600})
        assert decision == TtlDecision("caller", 42, "caller's ttl")


def test_overrides_replace_the_default_ttl_per_kind() -> None:
    overrides = {FACTUAL: 3_600, TIME_SENSITIVE: 30}
    assert classify_ttl(ask("Who wrote Hamlet?"), overrides=overrides).ttl_s == 3_600
    assert classify_ttl(ask("Any news?"), overrides=overrides).ttl_s == 30
    assert classify_ttl(ask("Cheer me up please"), overrides=overrides).ttl_s == DEFAULT_TTL_S[GENERAL]
    assert classify_ttl(ask("Cheer me up please"), overrides={}).ttl_s == DEFAULT_TTL_S[GENERAL]
    assert overrides == {FACTUAL: 3_600, TIME_SENSITIVE: 30}
    assert DEFAULT_TTL_S[FACTUAL] == 86_400


@pytest.mark.parametrize(
    "overrides",
    [
        {"news": 60},
        {"caller": 60},
        {FACTUAL: 0},
        {GENERAL: -5},
        {TIME_SENSITIVE: True},
        {TIME_SENSITIVE: 1.5},
        {TIME_SENSITIVE: "300"},
    ],
)
def test_invalid_overrides_raise(overrides: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        classify_ttl(ask("Any news?"), overrides=overrides)  # type: ignore[arg-type]
    # Even when the caller's TTL would have decided: configuration errors never hide.
    with pytest.raises(ValueError):
        classify_ttl(ask("Any news?", ttl=10), overrides=overrides)  # type: ignore[arg-type]


def test_only_the_last_user_message_counts() -> None:
    earlier_news = ask("Any breaking news about the election?", "What is the square root of 144?")
    assert classify_ttl(earlier_news).reason == 'factual: "square root"'
    later_news = ask("What is the square root of 144?", "Any breaking news about the election?")
    assert classify_ttl(later_news).kind == TIME_SENSITIVE
    # The assistant's answers never count.
    answered = ask("Tell me a joke", "Another one please", assistant="Here is today's news: ...")
    assert classify_ttl(answered).reason == "general: no keyword"


def test_the_last_user_messages_parts_are_read_together() -> None:
    request = ask("Tell me about")
    request.messages[-1].parts.add(text="the weather in Oslo")
    assert classify_ttl(request).reason == 'time-sensitive: "weather"'


def test_only_the_last_max_chars_of_the_user_message_are_read() -> None:
    question = " who wrote Hamlet?"
    cut_off = "today" + " please" * (MAX_CHARS // 7) + question
    assert len(cut_off) > MAX_CHARS
    assert classify_ttl(ask(cut_off)).kind == FACTUAL
    kept = "today" + " please" * ((MAX_CHARS - 100) // 7) + question
    assert classify_ttl(ask(kept)).kind == TIME_SENSITIVE


def test_no_user_message_is_general() -> None:
    request = ask(system="You are a news assistant.")
    assert classify_ttl(request) == TtlDecision(GENERAL, 1_800, "general: no user message")


def test_the_system_prompt_is_a_weak_signal() -> None:
    news = "You are a news assistant. Keep answers short."
    decision = classify_ttl(ask("What's going on in Ukraine?", system=news))
    assert (decision.kind, decision.reason) == (TIME_SENSITIVE, 'time-sensitive: system prompt "news"')
    assert classify_ttl(ask("What's going on in Ukraine?")).kind == GENERAL
    # The user message's own kind wins over it, creative writing too.
    assert classify_ttl(ask("What is the capital of France?", system=news)).kind == FACTUAL
    assert classify_ttl(ask("Write a poem about spring", system=news)).kind == GENERAL
    # Time words in the system prompt say nothing: many system prompts state today's date.
    dated = f"You are a helpful assistant. Today's date is {THIS_YEAR}-03-01; the time now is 09:00."
    assert classify_ttl(ask("Give me a good name for my puppy", system=dated)).kind == GENERAL


def test_the_reason_holds_nothing_of_the_prompt_but_the_keyword() -> None:
    decision = classify_ttl(ask("My password is hunter2 and my name is Ada Lovelace: what's the forecast?"))
    assert decision.reason == 'time-sensitive: "forecast"'
    assert classify_ttl(ask("My card is 4111 1111 1111 1111, what is 2+2?")).reason == "factual: arithmetic"
    assert classify_ttl(ask("hunter2 is my password, be nice")).reason == "general: no keyword"


_REASON = re.compile(r'(time-sensitive|factual|general): (?:creative |system prompt )?"([^"]+)"')


@pytest.mark.parametrize("prompt", TIME_SENSITIVE_PROMPTS + FACTUAL_PROMPTS + GENERAL_PROMPTS)
def test_every_reason_quotes_a_run_of_the_prompts_own_words(prompt: str) -> None:
    reason = classify_ttl(ask(prompt)).reason
    if reason in ("factual: arithmetic", "general: no keyword"):
        return
    matched = _REASON.fullmatch(reason)
    assert matched is not None, reason
    keyword = matched.group(2).split()
    words = re.findall(r"[a-z0-9+#]+", prompt.lower())
    runs = [words[start : start + len(keyword)] for start in range(len(words))]
    assert keyword in runs, (reason, prompt)


def test_the_decision_is_frozen() -> None:
    decision = classify_ttl(ask("hello"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.ttl_s = 5  # type: ignore[misc]
