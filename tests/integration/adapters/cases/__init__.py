"""The vendor rows of the adapter test table.

Each module in this package describes one vendor as `CASE = VendorCase(...)`: the model the
table asks for, and how the vendor legitimately differs (which error statuses it uses, what
its ids look like, what it cannot do). The table itself (`test_adapter_table.py`) drives
every vendor's simulator with the same vendor-neutral knobs and asserts the same unified
behaviour. Adding a vendor to the table is one module here.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any

import grpc

from switchyard.common.errors import Reason

ErrorRow = tuple[dict[str, Any], grpc.StatusCode, Reason]

# The HTTP statuses every vendor's simulator can be told to answer, and what each means.
# A vendor that answers differently overrides the row in `VendorCase.status_overrides`.
SHARED_STATUSES: dict[int, tuple[grpc.StatusCode, Reason]] = {
    400: (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST),
    403: (grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED),
    404: (grpc.StatusCode.NOT_FOUND, Reason.NOT_FOUND),
    500: (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
    502: (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE),
    503: (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED),
    504: (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT),
}


@dataclass(frozen=True)
class VendorCase:
    """One vendor in the table."""

    vendor: str
    """The catalog vendor, the adapter's `--vendor` and the simulator's name."""
    model: str
    """The upstream model the table asks for."""
    reasoning_model: str
    """An upstream model that reports reasoning tokens (may equal `model`)."""
    context_too_long: dict[str, Any]
    """Knobs that make the simulator refuse the prompt as longer than the context window."""
    provider_options: dict[str, Any] = field(default_factory=dict)
    """`options` of every provider of this vendor in the table's catalog."""
    base_url_suffix: str = ""
    """Appended to the simulator's base URL (for a vendor whose base URL carries a path)."""
    request_id_prefix: str = ""
    """What `vendor_request_id` starts with; empty when the vendor sends none."""
    tool_call_id_prefix: str = ""
    """What a tool call's id starts with; empty when the vendor's calls carry no id."""
    min_tool_fragments: int = 1
    """A tool call streamed with `chunks=5` arrives in at least this many fragments."""
    status_overrides: dict[int, tuple[grpc.StatusCode, Reason]] = field(default_factory=dict)
    """Where the vendor's meaning of an HTTP status differs from `SHARED_STATUSES`."""
    extra_errors: tuple[ErrorRow, ...] = ()
    """Vendor-only error rows: knobs, expected gRPC status and reason."""
    rate_limit_code: str = ""
    """The `vendor_code` of the vendor's 429 (empty when its 429 body carries none)."""
    auth_failed_status: int = 401
    """The HTTP status the vendor answers a wrong key with."""
    json_object: bool = True
    """The vendor has a "any JSON object" mode (otherwise the table expects a refusal)."""
    json_schema: bool = True
    """The vendor constrains output to a JSON schema (otherwise a refusal)."""
    reports_cached: bool = True
    """Usage carries cached prompt tokens."""
    reports_reasoning: bool = True
    """Usage carries reasoning tokens."""
    headroom: bool = True
    """The vendor sends rate-limit headers on success."""
    in_stream_rate_limit: bool = True
    """The vendor can report a rate limit inside a started stream."""

    def statuses(self) -> list[tuple[int, grpc.StatusCode, Reason]]:
        merged = {**SHARED_STATUSES, **self.status_overrides}
        return [(status, code, reason) for status, (code, reason) in sorted(merged.items())]


def load_cases() -> list[VendorCase]:
    """Every `CASE` in this package, in module-name order."""
    cases: list[VendorCase] = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        cases.append(module.CASE)
    return cases


CASES = load_cases()
