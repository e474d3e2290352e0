"""Request validation at the edge: every request is checked before it costs anything.

Each problem is an INVALID_ARGUMENT with reason INVALID_REQUEST and the field path in
`ErrorInfo.metadata["field"]` (for example `messages[2].parts`). Messages never quote the
prompt.
"""

from __future__ import annotations

import re
from typing import Final

import grpc
import orjson

from switchyard.common.catalog import Model
from switchyard.common.errors import Reason, SwitchyardError, check_text, invalid
from switchyard.v1 import common_pb2

MAX_MESSAGES: Final = 1_000
MAX_TEXT_CHARS: Final = 2_000_000
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


MAX_TAG_CHARS: Final = 512


def validate_chat_request(request: common_pb2.ChatRequest) -> None:
    """Raise INVALID_ARGUMENT naming the first bad field of `request`."""
    # What is stored with the request's ledger row and traces: bounded, and no NUL.
    check_text(request.request_id, "request_id")
    check_text(request.metadata.end_user, "metadata.end_user")
    check_text(request.metadata.conversation_id, "metadata.conversation_id")
    for key, value in request.metadata.tags.items():
        check_text(key, "metadata.tags", max_chars=MAX_TAG_CHARS)
        check_text(value, "metadata.tags", max_chars=MAX_TAG_CHARS)
    if not request.messages:
        raise invalid("a chat request needs at least one message", "messages")
    if len(request.messages) > MAX_MESSAGES:
        raise invalid(f"too many messages: {len(request.messages)} > {MAX_MESSAGES}", "messages")
    total_chars = 0
    for index, message in enumerate(request.messages):
        path = f"messages[{index}]"
        if message.role == common_pb2.ROLE_UNSPECIFIED:
            raise invalid("role is required", f"{path}.role")
        has_content = False
        for part_index, part in enumerate(message.parts):
            kind = part.WhichOneof("part")
            if kind == "text":
                total_chars += len(part.text)
                has_content = has_content or bool(part.text.strip())
            elif kind == "image":
                if not part.image.url and not part.image.data:
                    raise invalid("an image needs a url or data", f"{path}.parts[{part_index}].image")
                has_content = True
            else:
                raise invalid("a content part must be text or image", f"{path}.parts[{part_index}]")
        if message.role == common_pb2.ROLE_ASSISTANT and message.tool_calls:
            has_content = True
        if not has_content:
            raise invalid("message content is empty", f"{path}.parts")
        if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
            raise invalid("a tool message needs tool_call_id", f"{path}.tool_call_id")
    if total_chars > MAX_TEXT_CHARS:
        raise invalid(f"prompt too large: {total_chars} characters > {MAX_TEXT_CHARS}", "messages")
    _validate_sampling(request.sampling)
    _validate_tools(request)


def _validate_sampling(sampling: common_pb2.SamplingParams) -> None:
    if sampling.HasField("temperature") and not 0.0 <= sampling.temperature <= 2.0:
        raise invalid("temperature must be between 0 and 2", "sampling.temperature")
    if sampling.HasField("top_p") and not 0.0 < sampling.top_p <= 1.0:
        raise invalid("top_p must be in (0, 1]", "sampling.top_p")
    if sampling.HasField("max_output_tokens") and sampling.max_output_tokens == 0:
        raise invalid("max_output_tokens must be positive", "sampling.max_output_tokens")
    if len(sampling.stop_sequences) > 4:
        raise invalid("at most 4 stop sequences", "sampling.stop_sequences")


def _validate_tools(request: common_pb2.ChatRequest) -> None:
    names: set[str] = set()
    for index, tool in enumerate(request.tools):
        path = f"tools[{index}]"
        if not _TOOL_NAME.match(tool.name):
            raise invalid("tool name must be 1-64 letters, digits, '_' or '-'", f"{path}.name")
        if tool.name in names:
            raise invalid(f"duplicate tool name {tool.name!r}", f"{path}.name")
        names.add(tool.name)
        if tool.parameters_json_schema:
            try:
                schema = orjson.loads(tool.parameters_json_schema)
            except orjson.JSONDecodeError:
                raise invalid(
                    "parameters_json_schema is not valid JSON", f"{path}.parameters_json_schema"
                ) from None
            if not isinstance(schema, dict) or schema.get("type", "object") != "object":
                raise invalid(
                    "parameters_json_schema must be an object schema", f"{path}.parameters_json_schema"
                )
    choice = request.tool_choice
    if choice.mode == common_pb2.TOOL_CHOICE_MODE_TOOL and choice.tool_name not in names:
        raise invalid("tool_choice names a tool that is not in tools", "tool_choice.tool_name")
    if choice.mode == common_pb2.TOOL_CHOICE_MODE_REQUIRED and not names:
        raise invalid("tool_choice is required but no tools were given", "tool_choice.mode")


def validate_for_model(request: common_pb2.ChatRequest, model: Model, prompt_tokens: int) -> None:
    """Limits of the model a request names: its output cap and its context window.

    `prompt_tokens` is the edge's estimate of the prompt (see `edge.gateway`); a request whose
    prompt plus requested output cannot fit is refused with CONTEXT_TOO_LONG and both numbers.
    """
    sampling = request.sampling
    max_output = sampling.max_output_tokens if sampling.HasField("max_output_tokens") else 0
    if max_output > model.max_output_tokens:
        raise invalid(
            f"max_output_tokens {max_output} is above the limit of {model.id} ({model.max_output_tokens})",
            "sampling.max_output_tokens",
            model=model.id,
            limit=str(model.max_output_tokens),
        )
    if prompt_tokens + max_output > model.context_window:
        raise SwitchyardError(
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
            f"the prompt (about {prompt_tokens} tokens) plus max_output_tokens ({max_output}) exceeds "
            f"the context window of {model.id} ({model.context_window} tokens)",
            metadata={
                "field": "messages",
                "model": model.id,
                "prompt_tokens": str(prompt_tokens),
                "max_output_tokens": str(max_output),
                "context_window": str(model.context_window),
            },
        )
