"""Fixtures for adapter integration tests: a vendor's simulator in-process and its adapter
as a real `grpc.aio` server on a free loopback port, called through a channel.

`vendor_env` runs once per row of the vendor table (`cases/`); `openai_env` is the OpenAI
row alone, for the tests of OpenAI's own wire details. Function-scoped wrappers hand each
test a simulator with default knobs, an empty script and zeroed stats.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.service import ProviderAdapterServicer, build_adapter
from switchyard.common.catalog import parse_catalog
from switchyard.common.ports import free_port
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.sim.faults import RunningSimulator, start_simulator
from switchyard.v1 import provider_pb2_grpc

from .cases import CASES, VendorCase

SIM_KEY = "sk-sim-adapter-test-key"
WRONG_KEY = "sk-wrong-adapter-test-key"

# Provider-name suffix -> (timeouts, options) on top of the vendor's own options. The
# plain provider is the one most tests use; "-slow" has short first-byte and idle
# deadlines; "-probe" probes with a 1-token completion; "-badkey" sends a wrong key;
# "-dead" points at a closed port.
_PROVIDERS: dict[str, tuple[dict[str, int], dict[str, Any]]] = {
    "": ({"connect_ms": 2000, "first_byte_ms": 5000, "idle_ms": 5000}, {}),
    "-slow": ({"connect_ms": 2000, "first_byte_ms": 800, "idle_ms": 500}, {}),
    "-probe": ({"connect_ms": 2000, "first_byte_ms": 5000, "idle_ms": 5000}, {"probe": "completion"}),
    "-badkey": ({"connect_ms": 2000, "first_byte_ms": 5000, "idle_ms": 5000}, {}),
    "-dead": ({"connect_ms": 1000, "first_byte_ms": 2000, "idle_ms": 2000}, {}),
}
_MODEL_PREFIX = {"": "main", "-slow": "slow", "-probe": "probe", "-badkey": "badkey", "-dead": "dead"}


def table_catalog(case: VendorCase, base_url: str, dead_port: int) -> str:
    """A catalog with the five table providers of `case.vendor` and one model on each
    (plus the reasoning model on the plain provider), and an unrelated vendor's provider."""
    providers: dict[str, Any] = {}
    models: list[dict[str, Any]] = []
    for suffix, (timeouts, options) in _PROVIDERS.items():
        name = f"{case.vendor}{suffix}".replace("_", "-")
        # The dead provider keeps the path (the vendor's API prefix) on a closed port.
        url = (
            base_url.replace(base_url.split("/")[2], f"127.0.0.1:{dead_port}", 1)
            if suffix == "-dead"
            else base_url
        )
        providers[name] = {
            "vendor": case.vendor,
            "base_url": url,
            "region": "us",
            "timeouts": timeouts,
            "options": {**case.provider_options, **options},
        }
        models.append(
            {
                "id": f"{_MODEL_PREFIX[suffix]}/{case.model}",
                "provider": name,
                "upstream_model": case.model,
                "context_window": 128000,
                "max_output_tokens": 8192,
                "prices": {"input": "1", "output": "2", "cached_input": "0.5"},
                "capabilities": ["tools", "json_mode", "json_schema", "streaming"],
            }
        )
    main = case.vendor.replace("_", "-")
    models.append(
        {
            "id": f"reasoning/{case.reasoning_model}",
            "provider": main,
            "upstream_model": case.reasoning_model,
            "context_window": 200000,
            "max_output_tokens": 32000,
            "prices": {"input": "1", "output": "4"},
            "capabilities": ["tools", "reasoning", "streaming"],
            "category": "reasoning",
        }
    )
    other = "anthropic" if case.vendor != "anthropic" else "openai"
    providers[f"other-{other}"] = {"vendor": other, "base_url": f"http://127.0.0.1:{dead_port}"}
    return orjson.dumps({"providers": providers, "models": models}).decode()


def provider_name(case: VendorCase, suffix: str = "") -> str:
    """The table's provider for `case` with `suffix` ("", "-slow", "-probe", ...)."""
    return f"{case.vendor}{suffix}".replace("_", "-")


def key_env(case: VendorCase) -> dict[str, str]:
    environ = {}
    for suffix in _PROVIDERS:
        env_name = provider_name(case, suffix).upper().replace("-", "_")
        environ[f"SWITCHYARD_PROVIDER_{env_name}_API_KEY"] = WRONG_KEY if suffix == "-badkey" else SIM_KEY
    return environ


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

    async def reset(self) -> None:
        """Default knobs, an empty script and zeroed stats."""
        (await self.control.delete("/_sim/knobs")).raise_for_status()
        (await self.control.post("/_sim/stats/reset")).raise_for_status()


@dataclass
class AdapterHandle:
    """The adapter server, its servicer and a stub on a real channel."""

    stub: provider_pb2_grpc.ProviderAdapterServiceStub
    servicer: ProviderAdapterServicer
    port: int


@dataclass
class VendorEnv:
    """One vendor's simulator and adapter, and the table row that describes them."""

    case: VendorCase
    sim: SimHandle
    adapter: AdapterHandle

    def provider(self, suffix: str = "") -> str:
        return provider_name(self.case, suffix)


async def start_vendor_env(case: VendorCase) -> AsyncIterator[VendorEnv]:
    """Start `case`'s simulator and a real gRPC adapter in front of it; yields them, then stops both."""
    sim = await start_simulator(case.vendor, port=0, knobs=None, api_key=SIM_KEY)
    control = httpx.AsyncClient(base_url=sim.root_url, timeout=5.0)
    catalog = parse_catalog(table_catalog(case, sim.base_url + case.base_url_suffix, free_port()))
    servicer = build_adapter(catalog, case.vendor, key_env(case))
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        adapter = AdapterHandle(provider_pb2_grpc.ProviderAdapterServiceStub(channel), servicer, port)
        yield VendorEnv(case, SimHandle(sim, control), adapter)
    finally:
        await channel.close()
        await server.stop(grace=None)
        await servicer.aclose()
        await control.aclose()
        await sim.close()


@pytest.fixture(scope="module", params=CASES, ids=lambda case: case.vendor)
async def vendor_env(request: pytest.FixtureRequest) -> AsyncIterator[VendorEnv]:
    async for env in start_vendor_env(request.param):
        yield env


@pytest.fixture
async def env(vendor_env: VendorEnv) -> VendorEnv:
    """The current vendor's environment, its simulator freshly reset."""
    await vendor_env.sim.reset()
    return vendor_env


@pytest.fixture(scope="module")
async def openai_env() -> AsyncIterator[VendorEnv]:
    case = next(case for case in CASES if case.vendor == "openai")
    async for env in start_vendor_env(case):
        yield env


@pytest.fixture
async def openai_sim(openai_env: VendorEnv) -> SimHandle:
    await openai_env.sim.reset()
    return openai_env.sim


@pytest.fixture
async def adapter(openai_env: VendorEnv, openai_sim: SimHandle) -> AdapterHandle:
    return openai_env.adapter
