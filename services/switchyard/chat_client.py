"""`switchyard chat`: a client of the edge built on the generated stubs.

It prints the answer (token by token with `--stream`) on stdout, and the chosen model,
the token counts and the cost on stderr, so the answer can be piped on its own.
"""

from __future__ import annotations

import argparse
import sys

import grpc

from switchyard.common.errors import from_rpc_error
from switchyard.common.money import format_usd
from switchyard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

_FINISH: dict[int, str] = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_ERROR: "error",
}


def build_request(args: argparse.Namespace) -> common_pb2.ChatRequest:
    """The ChatRequest the command line describes."""
    request = common_pb2.ChatRequest(model=args.model)
    if args.system:
        request.messages.add(role=common_pb2.ROLE_SYSTEM, parts=[common_pb2.ContentPart(text=args.system)])
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=args.prompt)])
    if args.max_tokens is not None:
        request.sampling.max_output_tokens = args.max_tokens
    if args.temperature is not None:
        request.sampling.temperature = args.temperature
    return request


async def chat(args: argparse.Namespace) -> int:
    """Send one prompt; 0 on success, 1 on a gateway error, 2 on bad input."""
    if not args.prompt.strip():
        print("switchyard: error: the prompt is empty", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    request = build_request(args)
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        try:
            if args.stream:
                return await _stream(stub, request, metadata, args.timeout)
            response: gateway_pb2.ChatResponse = await stub.Chat(
                request, metadata=metadata, timeout=args.timeout
            )
        except grpc.aio.AioRpcError as exc:
            return _report_error(exc, args.target)
    text = "".join(part.text for part in response.message.parts)
    print(text)
    for call in response.message.tool_calls:
        print(f"[tool call] {call.name}({call.arguments_json})")
    _summary(response.routing, response.usage, response.finish_reason, response.cost_micros)
    return 0


async def _stream(
    stub: gateway_pb2_grpc.GatewayServiceStub,
    request: common_pb2.ChatRequest,
    metadata: tuple[tuple[str, str], ...],
    timeout: float,
) -> int:
    routing = common_pb2.RoutingInfo()
    usage = common_pb2.Usage()
    async for chunk in stub.ChatStream(request, metadata=metadata, timeout=timeout):
        kind = chunk.WhichOneof("event")
        if kind == "delta":
            sys.stdout.write(chunk.delta.text)
            for fragment in chunk.delta.tool_calls:
                sys.stdout.write(
                    f"[tool call {fragment.name}]" if fragment.name else fragment.arguments_fragment
                )
            sys.stdout.flush()
        elif kind == "routing":
            routing = chunk.routing
        elif kind == "usage":
            usage = chunk.usage
        elif kind == "done":
            sys.stdout.write("\n")
            _summary(routing, usage, chunk.done.finish_reason, chunk.done.cost_micros)
    return 0


def _summary(routing: common_pb2.RoutingInfo, usage: common_pb2.Usage, finish: int, cost_micros: int) -> None:
    estimated = " (estimated)" if usage.estimated else ""
    print(
        f"— {routing.model} via {routing.provider} (attempt {routing.attempt}: {routing.reason}); "
        f"{usage.input_tokens} in / {usage.output_tokens} out tokens{estimated}; "
        f"finish {_FINISH.get(finish, 'unknown')}; cost {format_usd(cost_micros)}",
        file=sys.stderr,
    )


def _report_error(exc: grpc.aio.AioRpcError, target: str) -> int:
    error = from_rpc_error(exc)
    if exc.code() is grpc.StatusCode.UNAVAILABLE and not error.metadata:
        print(
            f"switchyard: error: cannot reach the edge at {target}; is `switchyard run` up?", file=sys.stderr
        )
        return 1
    details = ", ".join(f"{k}={v}" for k, v in sorted(error.metadata.items()))
    retry = f"; retry after {error.retry_after_s:.1f}s" if error.retry_after_s is not None else ""
    print(
        f"switchyard: error: {error.code.name} {error.reason.value}: {error.message}"
        + (f" ({details})" if details else "")
        + retry,
        file=sys.stderr,
    )
    return 1
