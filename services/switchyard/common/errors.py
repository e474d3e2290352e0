"""One error type for the whole mesh, and its mapping to and from gRPC statuses.

Every error a Switchyard service returns is a gRPC status whose `google.rpc.Status`
details hold an `ErrorInfo` (domain `switchyard.v1`, a reason from `Reason`, string
metadata) and, where waiting helps, a `RetryInfo`. `SwitchyardError` is raised by domain
code; the server bootstrap turns it into that status, and `from_rpc_error` reads it back on
the client side so a caller can always tell what went wrong and whether to retry.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import StrEnum
from typing import Final

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

DOMAIN: Final = "switchyard.v1"
_DETAILS_KEY: Final = "grpc-status-details-bin"
# ErrorInfo metadata `cause` of a refusal by a replica that is shutting down (`shutting_down`).
SHUTTING_DOWN_CAUSE: Final = "shutting_down"


class Reason(StrEnum):
    """The `ErrorInfo.reason` catalogue; mirrors `switchyard.v1.ErrorReason` without its prefix."""

    INVALID_REQUEST = "INVALID_REQUEST"
    CONTEXT_TOO_LONG = "CONTEXT_TOO_LONG"
    BUDGET_EXCEEDED = "BUDGET_EXCEEDED"
    RATE_LIMITED = "RATE_LIMITED"
    NO_ROUTE = "NO_ROUTE"
    PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
    PROVIDER_OVERLOADED = "PROVIDER_OVERLOADED"
    AUTH_FAILED = "AUTH_FAILED"
    CONTENT_FILTERED = "CONTENT_FILTERED"
    TIMEOUT = "TIMEOUT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    OVERLOADED = "OVERLOADED"
    ALL_ATTEMPTS_FAILED = "ALL_ATTEMPTS_FAILED"
    UPSTREAM_PROTOCOL_ERROR = "UPSTREAM_PROTOCOL_ERROR"
    STREAM_INTERRUPTED = "STREAM_INTERRUPTED"
    NOT_IMPLEMENTED = "NOT_IMPLEMENTED"
    NOT_FOUND = "NOT_FOUND"
    DEPENDENCY_UNAVAILABLE = "DEPENDENCY_UNAVAILABLE"
    INTERNAL = "INTERNAL"


# Reasons worth another attempt, possibly on another candidate (AIP-194: never after
# INVALID_ARGUMENT-class errors, and the edge never retries after the first token).
RETRYABLE_REASONS: Final = frozenset(
    {
        Reason.RATE_LIMITED,
        Reason.PROVIDER_UNAVAILABLE,
        Reason.PROVIDER_OVERLOADED,
        Reason.TIMEOUT,
        Reason.UPSTREAM_PROTOCOL_ERROR,
        Reason.DEPENDENCY_UNAVAILABLE,
        Reason.OVERLOADED,
    }
)


class SwitchyardError(Exception):
    """A failure with a gRPC status code, a reason from the catalogue and safe metadata.

    `message` and `metadata` reach the caller: they must never hold prompts, completions
    or secrets.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        reason: Reason,
        message: str,
        *,
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason
        self.message = message
        self.metadata: dict[str, str] = dict(metadata or {})
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """Whether another attempt (here or on another candidate) may succeed."""
        return self.reason in RETRYABLE_REASONS

    def __repr__(self) -> str:
        return f"SwitchyardError({self.code.name}, {self.reason.value}, {self.message!r})"

    def to_status_proto(self) -> status_pb2.Status:
        """The `google.rpc.Status` with ErrorInfo (and RetryInfo) details."""
        info = error_details_pb2.ErrorInfo(reason=self.reason.value, domain=DOMAIN, metadata=self.metadata)
        details = [_pack(info)]
        if self.retry_after_s is not None:
            delay = max(0.0, self.retry_after_s)
            seconds = math.floor(delay)
            retry = error_details_pb2.RetryInfo(
                retry_delay=duration_pb2.Duration(seconds=seconds, nanos=int(round((delay - seconds) * 1e9)))
            )
            details.append(_pack(retry))
        code_value: int = self.code.value[0]
        return status_pb2.Status(code=code_value, message=self.message, details=details)

    def trailing_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        """The trailers that carry the rich status (what `grpcio-status` sends)."""
        return ((_DETAILS_KEY, self.to_status_proto().SerializeToString()),)


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


_CODES_BY_VALUE: Final = {code.value[0]: code for code in grpc.StatusCode}


def invalid(message: str, field: str, **metadata: str) -> SwitchyardError:
    """`INVALID_ARGUMENT` / `INVALID_REQUEST` naming the field path."""
    return SwitchyardError(
        grpc.StatusCode.INVALID_ARGUMENT,
        Reason.INVALID_REQUEST,
        message,
        metadata={"field": field, **metadata},
    )


MAX_ID_CHARS: Final = 256
"""The longest identifier a caller may give (a request id, an end user, a budget scope's ids)."""


def check_text(value: str, field: str, *, max_chars: int = MAX_ID_CHARS) -> None:
    """INVALID_ARGUMENT unless `value` is at most `max_chars` characters and holds no NUL (which
    PostgreSQL text cannot store: one would fail every row written with it). Never quotes it."""
    if len(value) > max_chars:
        raise invalid(f"{field} is longer than {max_chars} characters", field)
    if "\x00" in value:
        raise invalid(f"{field} must not contain NUL characters", field)


def unimplemented(what: str, issue: str) -> SwitchyardError:
    """`UNIMPLEMENTED` for a method that a later issue builds."""
    return SwitchyardError(
        grpc.StatusCode.UNIMPLEMENTED,
        Reason.NOT_IMPLEMENTED,
        f"{what} is not implemented yet",
        metadata={"issue": issue},
    )


def shutting_down(service: str) -> SwitchyardError:
    """`UNAVAILABLE` / `DEPENDENCY_UNAVAILABLE` for work a draining replica of `service` no
    longer takes: the caller asks again at once (through the proxy, another replica answers)."""
    return SwitchyardError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
        f"the {service} is shutting down",
        metadata={"cause": SHUTTING_DOWN_CAUSE},
    )


def is_shutting_down(error: grpc.aio.AioRpcError | SwitchyardError) -> bool:
    """Whether `error` is a replica's `shutting_down` refusal (a peer going away, not failing)."""
    found = from_rpc_error(error) if isinstance(error, grpc.RpcError) else error
    return found.code is grpc.StatusCode.UNAVAILABLE and found.metadata.get("cause") == SHUTTING_DOWN_CAUSE


def from_rpc_error(error: grpc.aio.AioRpcError | grpc.RpcError) -> SwitchyardError:
    """Read a peer's failure back into a `SwitchyardError`.

    Uses the ErrorInfo and RetryInfo details when present; a status without details
    (for example a connection failure raised by grpcio itself) is mapped by its code.
    """
    code: grpc.StatusCode = error.code()
    message: str = error.details() or code.name
    trailers = error.trailing_metadata() or ()
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return _from_status(code, status)
    return SwitchyardError(code, _reason_for_bare_code(code), message)


def from_status(status: status_pb2.Status) -> SwitchyardError:
    """A `google.rpc.Status` carried in a message (a failed item of a stream) as a `SwitchyardError`."""
    return _from_status(_CODES_BY_VALUE.get(status.code, grpc.StatusCode.UNKNOWN), status)


def _from_status(code: grpc.StatusCode, status: status_pb2.Status) -> SwitchyardError:
    reason = _reason_for_bare_code(code)
    metadata: dict[str, str] = {}
    retry_after_s: float | None = None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            try:
                reason = Reason(info.reason)
            except ValueError:
                reason = Reason.INTERNAL
            metadata = dict(info.metadata)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            retry_after_s = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
    return SwitchyardError(
        _CODES_BY_VALUE.get(status.code, code),
        reason,
        status.message,
        metadata=metadata,
        retry_after_s=retry_after_s,
    )


def _reason_for_bare_code(code: grpc.StatusCode) -> Reason:
    return {
        grpc.StatusCode.UNAVAILABLE: Reason.DEPENDENCY_UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED: Reason.TIMEOUT,
        grpc.StatusCode.UNIMPLEMENTED: Reason.NOT_IMPLEMENTED,
        grpc.StatusCode.INVALID_ARGUMENT: Reason.INVALID_REQUEST,
        grpc.StatusCode.UNAUTHENTICATED: Reason.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED: Reason.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED: Reason.RATE_LIMITED,
        grpc.StatusCode.NOT_FOUND: Reason.NOT_FOUND,
    }.get(code, Reason.INTERNAL)
