"""Request-shaping pieces several vendor translators share.

Most vendors speak some variant of OpenAI's Chat Completions request (Mistral, Cohere and
the OpenAI-compatible servers), and all of them validate tools, tool choices, images and
JSON schemas the same way. What one vendor does differently is an explicit parameter
here (the vendor's name in an error, a default `parameters` schema, whether `strict` is
sent), so each caller still sends exactly what its vendor expects.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import orjson

from switchyard.common.errors import invalid
from switchyard.v1 import common_pb2

IMAGE_DETAIL: Final[Mapping[common_pb2.ImageDetail.ValueType, str]] = {
    common_pb2.IMAGE_DETAIL_LOW: "low",
    common_pb2.IMAGE_DETAIL_HIGH: "high",
    common_pb2.IMAGE_DETAIL_AUTO: "auto",
}
"""The `detail` of an OpenAI-style `image_url`; unset detail sends none."""

SCHEMA_NAME: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""OpenAI's rule for `json_schema.name`."""


# --------------------------------------------------------------------------- #
# JSON
# --------------------------------------------------------------------------- #


def json_object(text: str, where: str) -> dict[str, Any]:
    """`text` parsed as a JSON object; INVALID_ARGUMENT naming `where` otherwise."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise invalid("not valid JSON", where) from None
    if not isinstance(value, dict):
        raise invalid("must be a JSON object", where)
    return value


def json_schema_of(response_format: common_pb2.ResponseFormat) -> dict[str, Any]:
    """The schema of a JSON_SCHEMA response format, which must be there and be an object."""
    if not response_format.json_schema:
        raise invalid("a JSON schema response format needs its schema", "response_format.json_schema")
    return json_object(response_format.json_schema, "response_format.json_schema")


# --------------------------------------------------------------------------- #
# OpenAI-shaped message content
# --------------------------------------------------------------------------- #


def text_parts(message: common_pb2.Message, where: str, role: str, vendor: str) -> list[str]:
    """The texts of a message that may hold no images (`vendor` names who refuses them)."""
    texts: list[str] = []
    for i, part in enumerate(message.parts):
        if part.HasField("image"):
            raise invalid(f"{vendor} {role} messages cannot hold images", f"{where}.parts[{i}].image")
        texts.append(part.text)
    return texts


def text_content(
    message: common_pb2.Message, where: str, role: str, vendor: str
) -> str | list[dict[str, str]]:
    """Content of a text-only message: a string, or text parts when there are several."""
    texts = text_parts(message, where, role, vendor)
    if len(texts) == 1:
        return texts[0]
    if not texts:
        return ""
    return [{"type": "text", "text": text} for text in texts]


def image_source_url(image: common_pb2.ImagePart, where: str) -> str:
    """The image's URL, or its inline bytes as a base64 `data:` URL."""
    if image.url and image.data:
        raise invalid("an image has either a URL or inline data, not both", f"{where}.data")
    if image.data:
        if not image.mime_type:
            raise invalid("inline image data needs its MIME type", f"{where}.mime_type")
        return f"data:{image.mime_type};base64,{base64.b64encode(image.data).decode('ascii')}"
    if image.url:
        return image.url
    raise invalid("an image needs a URL or inline data", f"{where}.url")


def image_url(image: common_pb2.ImagePart, where: str) -> dict[str, str]:
    """OpenAI's `image_url` object: `{url}`, with `detail` when one is set."""
    out = {"url": image_source_url(image, where)}
    detail = IMAGE_DETAIL.get(image.detail)
    if detail is not None:
        out["detail"] = detail
    return out


ImageUrl = Callable[[common_pb2.ImagePart, str], str | dict[str, str]]
"""Shapes one image as the value of an `image_url` content part."""


def user_content(
    message: common_pb2.Message, where: str, shape_image: ImageUrl = image_url
) -> str | list[dict[str, Any]]:
    """A user message's content: one string for a single text part, else `text` and
    `image_url` parts (images shaped by `shape_image`)."""
    parts = message.parts
    if len(parts) == 1 and not parts[0].HasField("image"):
        return parts[0].text
    if not parts:
        return ""
    content: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        if part.HasField("image"):
            content.append(
                {"type": "image_url", "image_url": shape_image(part.image, f"{where}.parts[{i}].image")}
            )
        else:
            content.append({"type": "text", "text": part.text})
    return content


# --------------------------------------------------------------------------- #
# OpenAI-shaped tools
# --------------------------------------------------------------------------- #


def function_tool_call(call: common_pb2.ToolCall, where: str) -> dict[str, Any]:
    """An assistant's tool call as `{id, type: function, function: {name, arguments}}`."""
    if not call.id:
        raise invalid("a tool call needs its id", f"{where}.id")
    if not call.name:
        raise invalid("a tool call needs its name", f"{where}.name")
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json or "{}"},
    }


def function_tool(
    tool: common_pb2.Tool,
    index: int,
    *,
    default_parameters: Mapping[str, Any] | None = None,
    send_strict: bool = True,
) -> dict[str, Any]:
    """A tool as `{type: function, function: {name, description, parameters, strict}}`.

    `default_parameters` is sent (copied) for a tool without a schema, for vendors that
    require `parameters`; None leaves it out. `send_strict` False never sends `strict`
    (a vendor without a per-tool setting)."""
    where = f"tools[{index}]"
    if not tool.name:
        raise invalid("a tool needs a name", f"{where}.name")
    function: dict[str, Any] = {"name": tool.name}
    if tool.description:
        function["description"] = tool.description
    if tool.parameters_json_schema:
        function["parameters"] = json_object(tool.parameters_json_schema, f"{where}.parameters_json_schema")
    elif default_parameters is not None:
        function["parameters"] = dict(default_parameters)
    if send_strict and tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def tool_choice_mode(chat: common_pb2.ChatRequest) -> common_pb2.ToolChoiceMode.ValueType | None:
    """The mode of the request's tool choice, checked against its tools; None when unset.

    A named tool (mode TOOL) must be among the request's tools. An unknown mode is
    returned as it is, for the caller to refuse."""
    choice = chat.tool_choice
    mode = choice.mode
    if mode == common_pb2.TOOL_CHOICE_MODE_UNSPECIFIED:
        if choice.tool_name:
            raise invalid("tool_name needs mode TOOL", "tool_choice.mode")
        return None
    if not chat.tools:
        raise invalid("a tool choice needs tools", "tool_choice")
    if mode == common_pb2.TOOL_CHOICE_MODE_TOOL:
        if not choice.tool_name:
            raise invalid("mode TOOL needs the tool's name", "tool_choice.tool_name")
        if all(tool.name != choice.tool_name for tool in chat.tools):
            raise invalid("the chosen tool is not among the request's tools", "tool_choice.tool_name")
    return mode


def function_tool_choice(
    chat: common_pb2.ChatRequest, names: Mapping[common_pb2.ToolChoiceMode.ValueType, str]
) -> str | dict[str, Any] | None:
    """OpenAI's `tool_choice`: a mode's name from `names`, or `{type: function, function:
    {name}}` for a named tool; None when the request sets none."""
    mode = tool_choice_mode(chat)
    if mode is None:
        return None
    if mode == common_pb2.TOOL_CHOICE_MODE_TOOL:
        return {"type": "function", "function": {"name": chat.tool_choice.tool_name}}
    named = names.get(mode)
    if named is None:
        raise invalid("unknown tool choice mode", "tool_choice.mode")
    return named


def chat_response_format(
    response_format: common_pb2.ResponseFormat, *, check_schema_name: bool = True
) -> dict[str, Any] | None:
    """OpenAI's `response_format`: `text`, `json_object` or `json_schema {name, schema,
    strict}`; None when unset. `check_schema_name` refuses a name OpenAI would refuse."""
    kind = response_format.type
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_UNSPECIFIED:
        return None
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_TEXT:
        return {"type": "text"}
    if kind == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return {"type": "json_object"}
    if kind != common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        raise invalid("unknown response format type", "response_format.type")
    if not response_format.json_schema:
        raise invalid("a JSON schema response format needs its schema", "response_format.json_schema")
    name = response_format.schema_name or "response"
    if check_schema_name and not SCHEMA_NAME.match(name):
        raise invalid(
            "the schema name must be 1-64 letters, digits, '_' or '-'", "response_format.schema_name"
        )
    spec: dict[str, Any] = {"name": name, "schema": json_schema_of(response_format)}
    if response_format.strict:
        spec["strict"] = True
    return {"type": "json_schema", "json_schema": spec}


# --------------------------------------------------------------------------- #
# sampling
# --------------------------------------------------------------------------- #


@dataclass(frozen=True, slots=True)
class SamplingFields:
    """The body fields a vendor names the sampling parameters with."""

    temperature: str = "temperature"
    top_p: str = "top_p"
    max_output_tokens: str = "max_tokens"
    stop_sequences: str = "stop"
    seed: str = "seed"
    presence_penalty: str = "presence_penalty"
    frequency_penalty: str = "frequency_penalty"


def put_sampling(
    sampling: common_pb2.SamplingParams,
    body: dict[str, Any],
    fields: SamplingFields,
    *,
    vendor: str,
    max_stop_sequences: int | None = None,
    check_seed: Callable[[int], None] | None = None,
) -> None:
    """The sampling parameters that are set, into `body` under `fields`' names (in this
    order: temperature, top-p, output cap, stops, seed, penalties). More than
    `max_stop_sequences` stops are refused naming `vendor`; `check_seed` may refuse a seed."""
    if sampling.HasField("temperature"):
        body[fields.temperature] = sampling.temperature
    if sampling.HasField("top_p"):
        body[fields.top_p] = sampling.top_p
    if sampling.HasField("max_output_tokens"):
        body[fields.max_output_tokens] = sampling.max_output_tokens
    if sampling.stop_sequences:
        if max_stop_sequences is not None and len(sampling.stop_sequences) > max_stop_sequences:
            raise invalid(
                f"{vendor} accepts at most {max_stop_sequences} stop sequences", "sampling.stop_sequences"
            )
        body[fields.stop_sequences] = list(sampling.stop_sequences)
    if sampling.HasField("seed"):
        if check_seed is not None:
            check_seed(sampling.seed)
        body[fields.seed] = sampling.seed
    if sampling.HasField("presence_penalty"):
        body[fields.presence_penalty] = sampling.presence_penalty
    if sampling.HasField("frequency_penalty"):
        body[fields.frequency_penalty] = sampling.frequency_penalty
