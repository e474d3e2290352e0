"""Validation names the field path of the first problem, and accepts good requests."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from switchyard.common.errors import SwitchyardError
from switchyard.edge.validate import validate_chat_request
from switchyard.v1 import common_pb2


def good() -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
    request.messages.add(role=common_pb2.ROLE_SYSTEM, parts=[common_pb2.ContentPart(text="Be brief.")])
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Hi")])
    return request


def with_tool(
    schema: str = '{"type":"object","properties":{}}', name: str = "lookup"
) -> Callable[[common_pb2.ChatRequest], None]:
    def mutate(request: common_pb2.ChatRequest) -> None:
        request.tools.add(name=name, parameters_json_schema=schema)

    return mutate


def test_good_request_passes() -> None:
    request = good()
    with_tool()(request)
    request.tool_choice.mode = common_pb2.TOOL_CHOICE_MODE_TOOL
    request.tool_choice.tool_name = "lookup"
    request.messages.add(
        role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(id="c1", name="lookup")]
    )
    request.messages.add(
        role=common_pb2.ROLE_TOOL, tool_call_id="c1", parts=[common_pb2.ContentPart(text="{}")]
    )
    validate_chat_request(request)


def _image_without_source(r: common_pb2.ChatRequest) -> None:
    r.messages[1].parts.add(image=common_pb2.ImagePart(mime_type="image/png"))


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("messages"), "messages"),
        (lambda r: setattr(r.messages[1], "role", 0), "messages[1].role"),
        (lambda r: r.messages[1].ClearField("parts"), "messages[1].parts"),
        (_image_without_source, "messages[1].parts[1].image"),
        (
            lambda r: r.messages.add(role=common_pb2.ROLE_TOOL, parts=[common_pb2.ContentPart(text="x")]),
            "messages[2].tool_call_id",
        ),
        # Stored with the request's ledger row: no NUL (PostgreSQL text cannot hold one), bounded.
        (lambda r: setattr(r, "request_id", "req\x00"), "request_id"),
        (lambda r: setattr(r, "request_id", "r" * 257), "request_id"),
        (lambda r: setattr(r.metadata, "end_user", "bob\x00"), "metadata.end_user"),
        (lambda r: setattr(r.metadata, "conversation_id", "c" * 257), "metadata.conversation_id"),
        (lambda r: r.metadata.tags.update({"team": "a\x00"}), "metadata.tags"),
        (lambda r: setattr(r.sampling, "top_p", 0.0), "sampling.top_p"),
        (lambda r: setattr(r.sampling, "max_output_tokens", 0), "sampling.max_output_tokens"),
        (lambda r: r.sampling.stop_sequences.extend(["a", "b", "c", "d", "e"]), "sampling.stop_sequences"),
        (with_tool(name="has space"), "tools[0].name"),
        (with_tool(schema="{not json"), "tools[0].parameters_json_schema"),
        (with_tool(schema='{"type":"array"}'), "tools[0].parameters_json_schema"),
        (lambda r: setattr(r.tool_choice, "mode", common_pb2.TOOL_CHOICE_MODE_REQUIRED), "tool_choice.mode"),
    ],
)
def test_each_problem_names_its_field(mutate: Callable[[common_pb2.ChatRequest], None], field: str) -> None:
    request = good()
    mutate(request)
    with pytest.raises(SwitchyardError) as caught:
        validate_chat_request(request)
    assert caught.value.metadata["field"] == field
    assert "Hi" not in caught.value.message
