"""Client-side interceptors that send an API key with every call, as a real client does."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from switchyard.common.settings import LOCAL_DEV_KEY


def _with_key(details: grpc.aio.ClientCallDetails, header: tuple[str, str]) -> grpc.aio.ClientCallDetails:
    metadata = list(details.metadata or ())
    if not any(key == "authorization" for key, _ in metadata):
        metadata.append(header)
    return grpc.aio.ClientCallDetails(
        details.method,
        details.timeout,
        grpc.aio.Metadata(*metadata),
        details.credentials,
        details.wait_for_ready,
    )


# grpc.aio files an interceptor under its first matching kind only, so each kind is its own class.
class _UnaryKey(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_unary(self, proceed: Callable[..., Any], details: Any, request: Any) -> Any:
        return await proceed(_with_key(details, self._header), request)


class _StreamKey(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    def __init__(self, header: tuple[str, str]) -> None:
        self._header = header

    async def intercept_unary_stream(self, proceed: Callable[..., Any], details: Any, request: Any) -> Any:
        return await proceed(_with_key(details, self._header), request)


def keyed_channel(target: str, key: str = LOCAL_DEV_KEY) -> grpc.aio.Channel:
    """An insecure channel to `target` whose calls carry `authorization: Bearer <key>`."""
    header = ("authorization", f"Bearer {key}")
    return grpc.aio.insecure_channel(target, interceptors=[_UnaryKey(header), _StreamKey(header)])
