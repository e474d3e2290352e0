"""The one channel factory: every call from one service to another goes through here.

Channels are cached per target (HTTP/2 multiplexes every call over one connection), carry
the tracing interceptors when tracing is on, keepalive and message-size limits, and a
default deadline for unary calls so no call can wait forever.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

import grpc

from switchyard.common import tracing
from switchyard.common.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS: Final = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect quickly after a peer restarts (the supervisor brings it back in ~1 s).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2_000),
    ("grpc.enable_retries", 0),
)


class DefaultDeadlineInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Gives every unary call without a timeout the channel's default deadline."""

    def __init__(self, timeout_s: float) -> None:
        self._timeout_s = timeout_s

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        if client_call_details.timeout is None:
            client_call_details = grpc.aio.ClientCallDetails(
                client_call_details.method,
                self._timeout_s,
                client_call_details.metadata,
                client_call_details.credentials,
                client_call_details.wait_for_ready,
            )
        return await continuation(client_call_details, request)


class ChannelPool:
    """Channels by target, created on first use and closed together."""

    def __init__(self, *, default_timeout_s: float = 5.0) -> None:
        self._default_timeout_s = default_timeout_s
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, target: str) -> grpc.aio.Channel:
        """The shared channel to `target` (`host:port`)."""
        channel = self._channels.get(target)
        if channel is None:
            channel = open_channel(target, default_timeout_s=self._default_timeout_s)
            self._channels[target] = channel
        return channel

    async def close(self) -> None:
        """Close every channel (in-flight calls are cancelled)."""
        channels, self._channels = list(self._channels.values()), {}
        for channel in channels:
            await channel.close()


def split_target(target: str) -> tuple[str, str | None]:
    """`authority@host:port` into (`host:port`, authority); a plain `host:port` has none.

    Through Envoy's mesh listener every adapter is one target; the authority (HTTP/2
    `:authority`) names which one, e.g. `adapter-openai@switchyard-mesh:9000`.
    """
    authority, sep, address = target.rpartition("@")
    if not sep:
        return target, None
    if not authority or not address:
        raise ValueError(f"expected [authority@]host:port, got {target!r}")
    return address, authority


def open_channel(target: str, *, default_timeout_s: float = 5.0) -> grpc.aio.Channel:
    """An insecure channel (TLS ends at Envoy) with tracing, keepalive and default deadlines.

    `target` is `host:port`, or `authority@host:port` to send that `:authority` (see `split_target`).
    """
    interceptors: list[grpc.aio.ClientInterceptor] = [DefaultDeadlineInterceptor(default_timeout_s)]
    interceptors.extend(tracing.client_interceptors())
    address, authority = split_target(target)
    options = (
        CHANNEL_OPTIONS if authority is None else (*CHANNEL_OPTIONS, ("grpc.default_authority", authority))
    )
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
