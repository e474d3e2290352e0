"""Errors travel as google.rpc.Status with ErrorInfo and RetryInfo, and come back intact."""

from __future__ import annotations

import grpc
import pytest

from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error, invalid
from switchyard.common.server import ServiceBinding, build_server
from switchyard.v1 import common_pb2


def test_reason_catalogue_mirrors_the_proto_enum() -> None:
    proto_names = {name.removeprefix("ERROR_REASON_") for name in common_pb2.ErrorReason.keys()} - {
        "UNSPECIFIED"
    }
    assert proto_names == {r.value for r in Reason}


class _Fails(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, error: Exception) -> None:
        self.error = error

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            raise self.error

        async def stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
            yield b"first"
            raise self.error

        if details.method.endswith("Stream"):
            return grpc.unary_stream_rpc_method_handler(stream)
        return grpc.unary_unary_rpc_method_handler(unary)


async def _call(error: Exception, method: str) -> grpc.aio.AioRpcError:
    running = await build_server(
        [ServiceBinding("test.Fails", lambda server: server.add_generic_rpc_handlers((_Fails(error),)))]
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                if method == "Stream":
                    async for _ in channel.unary_stream("/test.Fails/Stream")(b"", timeout=5):
                        pass
                else:
                    await channel.unary_unary("/test.Fails/Unary")(b"", timeout=5)
            return caught.value
    finally:
        await running.stop(0)


@pytest.mark.parametrize("method", ["Unary", "Stream"])
async def test_switchyard_error_round_trips_with_details(method: str) -> None:
    sent = SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        "slow down",
        metadata={"limit": "10/min"},
        retry_after_s=1.25,
    )
    received = from_rpc_error(await _call(sent, method))
    assert received.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert received.reason is Reason.RATE_LIMITED
    assert received.message == "slow down"
    assert received.metadata == {"limit": "10/min"}
    assert received.retry_after_s == pytest.approx(1.25)
    assert received.retryable


@pytest.mark.parametrize("method", ["Unary", "Stream"])
async def test_unexpected_exception_is_internal_without_leaking_its_text(method: str) -> None:
    error = await _call(RuntimeError("secret prompt text sk-abc"), method)
    received = from_rpc_error(error)
    assert (received.code, received.reason) == (grpc.StatusCode.INTERNAL, Reason.INTERNAL)
    assert "secret" not in received.message and "sk-abc" not in (error.details() or "")


def test_invalid_names_the_field() -> None:
    error = invalid("bad", "messages[0].role")
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and error.metadata == {"field": "messages[0].role"}
    assert not error.retryable


async def test_bare_status_without_details_maps_by_code() -> None:
    async with grpc.aio.insecure_channel("127.0.0.1:1") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await channel.unary_unary("/x.Y/Z")(b"", timeout=2)
    received = from_rpc_error(caught.value)
    assert received.reason is Reason.DEPENDENCY_UNAVAILABLE and received.retryable
