"""Mistral AI chat completions in the adapter table.

How Mistral legitimately differs: its request ids (`mistral-correlation-id`) are UUIDs and
its tool-call ids nine bare letters or digits, so neither has a prefix to check (the
vendor test checks their shape); a tool call arrives whole in one delta; usage carries
cached tokens but reasoning tokens are only part of `completion_tokens`; and a failure
inside a stream is a chunk finishing with `error`, which cannot say "rate limited".
Vendor-only rows: an unknown model is a 400 `invalid_model` (NOT_FOUND), a 429
`engine_max_pending_tokens` means the model is out of capacity (PROVIDER_OVERLOADED), and
request-schema errors are 422s.
"""

from __future__ import annotations

import grpc

from switchyard.common.errors import Reason

from . import VendorCase

CASE = VendorCase(
    vendor="mistral",
    model="mistral-small-latest",
    reasoning_model="magistral-medium-latest",
    context_too_long={"status": 400, "error_code": "3051"},
    min_tool_fragments=1,
    extra_errors=(
        ({"status": 400, "error_code": "1500"}, grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
        ({"status": 429, "error_code": "3810"}, grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
        ({"status": 422}, grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
    ),
    rate_limit_code="1300",
    reports_reasoning=False,
    in_stream_rate_limit=False,
)
