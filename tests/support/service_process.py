"""One Switchyard service as a real process for a test: `switchyard serve <service>` on a free
port, ready (gRPC health SERVING), stopped with SIGTERM through the supervisor afterwards."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from switchyard.common.ports import free_port
from switchyard.supervisor import ChildSpec, ReadinessCheck, Supervisor

SWITCHYARD = (sys.executable, "-m", "switchyard.cli")


@asynccontextmanager
async def running_service(
    service: str, env: dict[str, str], log_path: Path
) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to `switchyard serve <service>` run with `env`; its output goes to `log_path`."""
    port = free_port()
    spec = ChildSpec(
        name=service,
        argv=(*SWITCHYARD, "serve", service),
        env={**env, "SWITCHYARD_PORT": str(port)},
        readiness=ReadinessCheck.grpc_health(f"127.0.0.1:{port}"),
        restart=False,
    )
    with log_path.open("a") as out:
        supervisor = Supervisor([spec], out=out, color=False)
        await supervisor.start()
        try:
            await supervisor.wait_ready(30)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield channel
        finally:
            await supervisor.stop(grace_s=5)
