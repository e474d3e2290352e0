"""Requests and assertions shared by the adapter integration tests."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from switchyard.common.answer_events import each_event
from switchyard.common.errors import SwitchyardError, from_rpc_error
from switchyard.v1 import common_pb2, provider_pb2, provider_pb2_grpc

from .conftest import SIM_KEY, WRONG_KEY, SimHandle

PROMPT = "Tell me about harbors, please."
ANSWER = "Harbors shelter ships from storms and let cargo move between sea and land."
SCHEMA = (
    '{"type":"object","properties":{"city":{"type":"string"},"days":{"type":"integer"}},'
    '"required":["city","days"]}'
)
WEATHER = common_pb2.Tool(name="get_weather", description="Forecast", parameters_json_schema=SCHEMA)


def request(provider: str, model: str, **chat: Any) -> provider_pb2.GenerateRequest:
    chat.setdefault(
        "messages",
        [common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)])],
    )
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(**chat), provider=provider, upstream_model=model
    )


async def collect(
    stub: provider_pb2_grpc.ProviderAdapterServiceStub, req: provider_pb2.GenerateRequest
) -> list[provider_pb2.GenerateResponse]:
    return [event async for event in each_event(stub.Generate(req, timeout=15))]


async def failure(
    stub: provider_pb2_grpc.ProviderAdapterServiceStub, req: provider_pb2.GenerateRequest
) -> tuple[SwitchyardError, list[provider_pb2.GenerateResponse]]:
    """The error a call ends with, and the events that arrived before it."""
    received: list[provider_pb2.GenerateResponse] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in each_event(stub.Generate(req, timeout=15)):
            received.append(event)
    return from_rpc_error(caught.value), received


def kinds(events: list[provider_pb2.GenerateResponse]) -> list[str]:
    return [str(event.WhichOneof("event")) for event in events]


def text_of(events: list[provider_pb2.GenerateResponse]) -> str:
    return "".join(event.delta.text for event in events if event.HasField("delta"))


def assert_well_formed(events: list[provider_pb2.GenerateResponse]) -> None:
    """Deltas, then exactly one usage, then done -- nothing after."""
    shape = kinds(events)
    assert shape[-2:] == ["usage", "done"]
    assert shape.count("usage") == 1 and shape.count("done") == 1
    assert set(shape[:-2]) <= {"delta"}


def assert_clean(error: SwitchyardError) -> None:
    """No prompt, vendor message or key in what reaches the caller."""
    shown = error.message + " " + " ".join(f"{k}={v}" for k, v in error.metadata.items())
    for leak in (PROMPT, SIM_KEY, WRONG_KEY, "sk-", "Rate limit", "rate limit", "API key", "api key"):
        assert leak not in shown


async def wait_for(predicate: Any, sim: SimHandle, timeout_s: float = 3.0) -> dict[str, Any]:
    """Poll the simulator's stats until `predicate(stats)` holds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = await sim.stats()
        if predicate(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.02)
