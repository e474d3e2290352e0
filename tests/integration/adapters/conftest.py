"""Fixtures for adapter integration tests: the OpenAI simulator in-process and the
adapter as a real `grpc.aio` server on a free loopback port, called through a channel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest

from switchyard.adapters.service import ProviderAdapterServicer, build_adapter
from switchyard.common.catalog import parse_catalog
from switchyard.common.ports import free_port
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.sim.openai import RunningSimulator, start_simulator
from switchyard.v1 import provider_pb2_grpc

SIM_KEY = "sk-sim-adapter-test-key"
WRONG_KEY = "sk-wrong-adapter-test-key"

CATALOG = """
providers:
  openai:
    vendor: openai
    base_url: {base}
    region: us
    timeouts: {{connect_ms: 2000, first_byte_ms: 5000, idle_ms: 5000}}
  openai-slow:
    vendor: openai
    base_url: {base}
    timeouts: {{connect_ms: 2000, first_byte_ms: 300, idle_ms: 300}}
  openai-probe:
    vendor: openai
    base_url: {base}
    options: {{probe: completion}}
  openai-badkey:
    vendor: openai
    base_url: {base}
  openai-dead:
    vendor: openai
    base_url: http://127.0.0.1:{dead_port}/v1
    timeouts: {{connect_ms: 1000, first_byte_ms: 2000, idle_ms: 2000}}
  anthropic:
    vendor: anthropic
    base_url: http://127.0.0.1:{dead_port}
models:
  - id: openai/gpt-4o-mini
    provider: openai
    upstream_model: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    prices: {{input: "0.15", output: "0.60", cached_input: "0.075"}}
    capabilities: [tools, vision, json_mode, json_schema, streaming]
    category: small
    quality: 70
  - id: openai/o4-mini
    provider: openai
    upstream_model: o4-mini
    context_window: 200000
    max_output_tokens: 100000
    prices: {{input: "1.10", output: "4.40"}}
    capabilities: [tools, reasoning, streaming]
    category: reasoning
    aliases: [thinker]
  - id: slow/gpt-4o-mini
    provider: openai-slow
    upstream_model: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    prices: {{input: "0.15", output: "0.60"}}
  - id: probe/gpt-4o-mini
    provider: openai-probe
    upstream_model: gpt-4o-mini
    context_window: 128000
    max_output_tokens: 16384
    prices: {{input: "0.15", output: "0.60"}}
  - id: anthropic/claude
    provider: anthropic
    upstream_model: claude-x
    context_window: 200000
    max_output_tokens: 8192
    prices: {{input: "3", output: "15"}}
aliases: {{mini: openai/gpt-4o-mini}}
"""


@dataclass
class SimHandle:
    """The running simulator and an HTTP client for its `/_sim/*` control endpoints."""

    sim: RunningSimulator
    control: httpx.AsyncClient

    async def knobs(self, **knobs: Any) -> None:
        """Replace the server-wide knobs (unnamed ones take their defaults)."""
        response = await self.control.post("/_sim/knobs", json=knobs)
        response.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self.control.get("/_sim/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats


@dataclass
class AdapterHandle:
    """The adapter server, its servicer and a stub on a real channel."""

    stub: provider_pb2_grpc.ProviderAdapterServiceStub
    servicer: ProviderAdapterServicer
    port: int


@pytest.fixture(scope="module")
async def openai_sim() -> AsyncIterator[SimHandle]:
    sim = await start_simulator("openai", port=0, knobs=None, api_key=SIM_KEY)
    control = httpx.AsyncClient(base_url=sim.root_url, timeout=5.0)
    try:
        yield SimHandle(sim, control)
    finally:
        await control.aclose()
        await sim.close()


@pytest.fixture(autouse=True)
async def _fresh_sim(openai_sim: SimHandle) -> None:
    """Every test starts from default knobs, an empty script and zeroed stats."""
    (await openai_sim.control.delete("/_sim/knobs")).raise_for_status()
    (await openai_sim.control.post("/_sim/stats/reset")).raise_for_status()


@pytest.fixture(scope="module")
async def adapter(openai_sim: SimHandle) -> AsyncIterator[AdapterHandle]:
    catalog = parse_catalog(CATALOG.format(base=openai_sim.sim.base_url, dead_port=free_port()))
    environ = {
        "SWITCHYARD_PROVIDER_OPENAI_API_KEY": SIM_KEY,
        "SWITCHYARD_PROVIDER_OPENAI_SLOW_API_KEY": SIM_KEY,
        "SWITCHYARD_PROVIDER_OPENAI_PROBE_API_KEY": SIM_KEY,
        "SWITCHYARD_PROVIDER_OPENAI_BADKEY_API_KEY": WRONG_KEY,
        "SWITCHYARD_PROVIDER_OPENAI_DEAD_API_KEY": SIM_KEY,
    }
    servicer = build_adapter(catalog, "openai", environ)
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield AdapterHandle(provider_pb2_grpc.ProviderAdapterServiceStub(channel), servicer, port)
    finally:
        await channel.close()
        await server.stop(grace=None)
        await servicer.aclose()
