"""Anthropic Messages API in the adapter table."""

from __future__ import annotations

import grpc

from switchyard.common.errors import Reason

from . import VendorCase

CASE = VendorCase(
    vendor="anthropic",
    model="claude-haiku-4-5",
    reasoning_model="claude-sonnet-4-6",
    # A 400 invalid_request_error whose message is "prompt is too long: N tokens > M maximum".
    context_too_long={"status": 400, "error_code": "prompt_too_long"},
    request_id_prefix="req_",
    tool_call_id_prefix="toolu_",
    # The tool_use block opens the call; five input_json_delta fragments follow.
    min_tool_fragments=5,
    extra_errors=(
        # Anthropic's own "overloaded" status.
        ({"status": 529}, grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        # The other documented context-window wording.
        (
            {"status": 400, "error_code": "context_limit_exceeded"},
            grpc.StatusCode.INVALID_ARGUMENT,
            Reason.CONTEXT_TOO_LONG,
        ),
        ({"status": 413}, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        # billing_error: the account cannot pay; waiting does not help, another provider may.
        ({"status": 402}, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
    ),
    # Anthropic's 429 carries no code; its error type names it.
    rate_limit_code="rate_limit_error",
    # No "any JSON object" mode: structured outputs need a schema.
    json_object=False,
)
