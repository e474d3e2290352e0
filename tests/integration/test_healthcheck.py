"""`switchyard healthcheck` (the image's HEALTHCHECK) against a real gRPC server on a free port.

The server is `build_server`'s: a `grpc.aio` server with the standard health servicer, SERVING
for "" once started. The check is a blocking client, so in-process calls run in a thread while
the server's event loop keeps serving; one case runs `python -m switchyard.healthcheck` as a
subprocess with `SWITCHYARD_PORT` set, as the image runs it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from grpc_health.v1 import health_pb2

from switchyard import healthcheck
from switchyard.common.ports import free_port
from switchyard.common.server import RunningServer, build_server

GATEWAY = "switchyard.v1.GatewayService"


@pytest.fixture
async def server() -> AsyncIterator[RunningServer]:
    running = await build_server([], host="127.0.0.1", port=free_port())
    try:
        yield running
    finally:
        await running.server.stop(0)


async def run_check(*argv: str) -> int:
    return await asyncio.to_thread(healthcheck.main, list(argv))


async def test_serving_server_exits_0(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert await run_check("--target", f"127.0.0.1:{server.port}") == 0
    out, err = capsys.readouterr()
    assert out.startswith("SERVING") and f"127.0.0.1:{server.port}" in out
    assert out.count("\n") == 1 and err == ""


async def test_named_service_serving_exits_0(server: RunningServer) -> None:
    await server.health.set(GATEWAY, health_pb2.HealthCheckResponse.SERVING)
    assert await run_check("--target", f"127.0.0.1:{server.port}", "--service", GATEWAY) == 0


async def test_not_serving_exits_1(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert await run_check("--target", f"127.0.0.1:{server.port}") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert "NOT_SERVING" in err and f"127.0.0.1:{server.port}" in err
    assert err.count("\n") == 1 and "Traceback" not in err


async def test_graceful_shutdown_exits_1(server: RunningServer) -> None:
    await server.health.enter_graceful_shutdown()
    assert await run_check("--target", f"127.0.0.1:{server.port}") == 1


async def test_unknown_service_exits_1(server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    code = await run_check("--target", f"127.0.0.1:{server.port}", "--service", "switchyard.v1.Nope")
    assert code == 1
    err = capsys.readouterr().err
    assert "NOT_FOUND" in err and "switchyard.v1.Nope" in err and "Traceback" not in err


async def test_nothing_listening_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{free_port()}"
    assert await run_check("--target", target, "--timeout", "2") == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("switchyard healthcheck: UNAVAILABLE") and target in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A TCP port that accepts connections and never speaks HTTP/2: a hung server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


async def test_timeout_exits_1(silent_listener: int, capsys: pytest.CaptureFixture[str]) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await run_check("--target", f"127.0.0.1:{silent_listener}", "--timeout", "0.5") == 1
    assert loop.time() - started < 5
    err = capsys.readouterr().err
    assert err.startswith("switchyard healthcheck: DEADLINE_EXCEEDED") and "Traceback" not in err


def test_bad_switchyard_port_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SWITCHYARD_PORT", "not-a-port")
    assert healthcheck.main([]) == 1
    assert "SWITCHYARD_PORT" in capsys.readouterr().err


def test_default_target() -> None:
    assert healthcheck.default_target({}) == "127.0.0.1:50051"
    assert healthcheck.default_target({"SWITCHYARD_PORT": ""}) == "127.0.0.1:50051"
    assert healthcheck.default_target({"SWITCHYARD_PORT": "50055"}) == "127.0.0.1:50055"


async def run_module(env: dict[str, str], *argv: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchyard.healthcheck",
        *argv,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_module_uses_switchyard_port(server: RunningServer) -> None:
    env = {**os.environ, "SWITCHYARD_PORT": str(server.port)}
    code, out, err = await run_module(env)
    assert (code, err) == (0, "")
    assert out.startswith("SERVING") and f"127.0.0.1:{server.port}" in out

    await server.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    code, out, err = await run_module(env)
    assert code == 1 and out == ""
    assert "NOT_SERVING" in err and "Traceback" not in err


async def test_module_nothing_listening() -> None:
    env = {**os.environ, "SWITCHYARD_PORT": str(free_port())}
    code, out, err = await run_module(env, "--timeout", "2")
    assert code == 1 and out == ""
    assert "UNAVAILABLE" in err and "Traceback" not in err
