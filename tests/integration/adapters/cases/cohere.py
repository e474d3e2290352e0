"""Cohere Chat API v2 in the adapter table.

Cohere's differences: its errors carry no code (a prompt over the context window is a 400
whose message starts "too many tokens", selected in the simulator by the `too_many_tokens`
knob), 402 means the billing limit is reached and 498 an invalid token; the request id is
the `x-debug-trace-id` header (32 hex digits, no prefix); tool-call ids are the tool's name
and a random suffix; usage has cached tokens but no reasoning-token count; the only
rate-limit headers are the per-minute call limit and remainder; and a failure inside a
stream is a `message-end` with finish reason ERROR and free text, so a rate limit cannot be
told apart there.
"""

from __future__ import annotations

import grpc

from switchyard.common.errors import Reason

from . import VendorCase

CASE = VendorCase(
    vendor="cohere",
    model="command-a-03-2025",
    reasoning_model="command-a-reasoning-08-2025",
    context_too_long={"status": 400, "error_code": "too_many_tokens"},
    tool_call_id_prefix="get_weather_",
    min_tool_fragments=5,
    extra_errors=(
        ({"status": 402}, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
        ({"status": 422}, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
        ({"status": 498}, grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
        ({"status": 499}, grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
        ({"status": 429, "error_code": "trial_key"}, grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED),
    ),
    reports_reasoning=False,
    in_stream_rate_limit=False,
)
