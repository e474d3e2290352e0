"""OpenAI Chat Completions in the adapter table."""

from __future__ import annotations

from . import VendorCase

CASE = VendorCase(
    vendor="openai",
    model="gpt-4o-mini",
    reasoning_model="o4-mini",
    context_too_long={"status": 400, "error_code": "context_length_exceeded"},
    request_id_prefix="req_",
    tool_call_id_prefix="call_",
    min_tool_fragments=5,
    rate_limit_code="rate_limit_exceeded",
)
