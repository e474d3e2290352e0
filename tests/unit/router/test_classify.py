"""Task classification, complexity and category for `auto` routing."""

from __future__ import annotations

import pytest

from switchyard.router.classify import (
    LARGE,
    REASONING,
    SMALL,
    category_for,
    classify,
    complexity_of,
)
from switchyard.v1 import common_pb2


def ask(
    text: str, *, image: bool = False, task: int = 0, role: int = common_pb2.ROLE_USER
) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model="auto")
    message = request.messages.add(role=role)
    message.parts.add(text=text)
    if image:
        message.parts.add(image=common_pb2.ImagePart(url="https://example.com/cat.png"))
    request.routing.task_type = task  # type: ignore[assignment]
    return request


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("hi, how are you today?", common_pb2.TASK_TYPE_SIMPLE_CHAT),
        ("Fix this bug:\n```python\ndef add(a, b):\n    return a - b\n```", common_pb2.TASK_TYPE_CODE),
        ("Translate 'good morning' into French", common_pb2.TASK_TYPE_TRANSLATION),
        ("Summarize the key points of this memo in a few sentences", common_pb2.TASK_TYPE_SUMMARIZATION),
        ("Write a poem about the sea", common_pb2.TASK_TYPE_CREATIVE_WRITING),
        (
            "Prove that the square root of 2 is irrational, step by step",
            common_pb2.TASK_TYPE_COMPLEX_REASONING,
        ),
        (
            "Analyze the data: what is the average and the correlation of sales and ads?",
            common_pb2.TASK_TYPE_DATA_ANALYSIS,
        ),
        ("Find research papers and cite sources on battery chemistry", common_pb2.TASK_TYPE_RESEARCH),
    ],
)
def test_task_types_from_the_text(text: str, task: int) -> None:
    found = classify(ask(text))
    assert found.task_type == task and not found.given


def test_an_image_is_vision_and_the_caller_given_type_wins() -> None:
    assert classify(ask("what is this?", image=True)).task_type == common_pb2.TASK_TYPE_VISION
    assert classify(ask("what is this?", image=True)).category == LARGE
    given = classify(ask("write a poem", task=common_pb2.TASK_TYPE_CODE))
    assert (given.task_type, given.given) == (common_pb2.TASK_TYPE_CODE, True)


def test_assistant_text_is_not_read() -> None:
    request = ask("thanks!")
    request.messages.add(role=common_pb2.ROLE_ASSISTANT).parts.add(text="```python\ndef f(): pass\n```")
    assert classify(request).task_type == common_pb2.TASK_TYPE_SIMPLE_CHAT


def test_complexity_grows_with_length_structure_reasoning_and_questions() -> None:
    assert complexity_of("hi") < 0.01
    long_text = "word " * 1_200  # 6,000 characters: the whole length part
    assert complexity_of(long_text) == pytest.approx(0.35)
    structured = "\n".join(f"- point {i}" for i in range(8))
    assert complexity_of(structured) == pytest.approx(0.2, abs=0.01)
    assert complexity_of("prove it step by step") == pytest.approx(0.3, abs=0.01)
    assert complexity_of("a? b? c? d? e?") == pytest.approx(0.15, abs=0.01)
    assert complexity_of(long_text + structured + " prove step by step ? ? ? ? ?") <= 1.0


def test_categories_follow_task_and_complexity() -> None:
    assert category_for(common_pb2.TASK_TYPE_SIMPLE_CHAT, 0.1) == SMALL
    assert category_for(common_pb2.TASK_TYPE_SIMPLE_CHAT, 0.5) == LARGE
    assert category_for(common_pb2.TASK_TYPE_CODE, 0.1) == LARGE
    assert category_for(common_pb2.TASK_TYPE_COMPLEX_REASONING, 0.0) == REASONING
    assert category_for(common_pb2.TASK_TYPE_TRANSLATION, 0.9) == REASONING
    assert classify(ask("hello there")).category == SMALL
