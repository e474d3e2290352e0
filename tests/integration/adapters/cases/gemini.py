"""The Gemini API in the adapter table.

How Gemini legitimately differs: a wrong key is HTTP 400 INVALID_ARGUMENT (ErrorInfo
reason API_KEY_INVALID), not 401; a prompt over the context window has no code of its
own, only its message (a 400 INVALID_ARGUMENT saying the input token count "exceeds the
maximum number of tokens allowed"); the 429's only code is its canonical status
RESOURCE_EXHAUSTED; there are no rate-limit or request-id headers (the id is the body's
`responseId`, which has no fixed prefix); function calls arrive whole, one fragment each,
and carry no id, so the adapter generates `call_...` ids.
"""

from __future__ import annotations

import grpc

from switchyard.common.errors import Reason

from . import VendorCase

CASE = VendorCase(
    vendor="gemini",
    model="gemini-2.5-flash",
    reasoning_model="gemini-2.5-pro",
    context_too_long={
        "status": 400,
        "error_message": (
            "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576)."
        ),
    },
    tool_call_id_prefix="call_",
    min_tool_fragments=1,
    extra_errors=(
        (
            {"status": 400, "error_code": "API_KEY_INVALID"},
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        (
            {"status": 400, "error_code": "FAILED_PRECONDITION"},
            grpc.StatusCode.FAILED_PRECONDITION,
            Reason.AUTH_FAILED,
        ),
        ({"status": 401}, grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
        ({"status": 408}, grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
    ),
    rate_limit_code="RESOURCE_EXHAUSTED",
    auth_failed_status=400,
    headroom=False,
)
