"""The `switchyard` command as a newcomer meets it: clear errors, clean shutdowns, `run` and `chat`."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from switchyard.common.errors import Reason, from_rpc_error
from switchyard.common.ports import free_port
from switchyard.supervisor import ChildSpec, ReadinessCheck, Supervisor
from switchyard.v1 import common_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, SimControl
from tests.support.auth import keyed_channel

SWITCHYARD = (sys.executable, "-m", "switchyard.cli")


async def run_cli(*args: str, env: dict[str, str], timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *SWITCHYARD, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@asynccontextmanager
async def service(name: str, *args: str, env: dict[str, str], tmp_path: Path) -> AsyncIterator[int]:
    """One `switchyard serve` process on a free port, ready; yields its port."""
    port = free_port()
    spec = ChildSpec(
        name=name,
        argv=(*SWITCHYARD, "serve", *args),
        env={**env, "SWITCHYARD_PORT": str(port), "SWITCHYARD_LOG_FORMAT": "json"},
        readiness=ReadinessCheck.grpc_health(f"127.0.0.1:{port}"),
        restart=False,
    )
    with (tmp_path / f"{name}.log").open("w") as out:
        supervisor = Supervisor([spec], out=out, color=False)
        await supervisor.start()
        try:
            await supervisor.wait_ready(30)
            yield port
        finally:
            await supervisor.stop(grace_s=5)


async def test_unknown_service_is_a_clear_error(cli_env: dict[str, str]) -> None:
    code, _, stderr = await run_cli("serve", "billing", env=cli_env)
    assert code == 2
    assert "invalid choice: 'billing'" in stderr and "Traceback" not in stderr


async def test_adapter_needs_a_vendor(cli_env: dict[str, str]) -> None:
    code, _, stderr = await run_cli("serve", "adapter", env=cli_env)
    assert code == 2 and "serve adapter needs --vendor" in stderr


async def test_malformed_catalog_fails_at_start_naming_file_line_and_key(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(
        "providers:\n  openai: {vendor: openai, base_url: 'https://x/v1'}\n"
        "models:\n  - id: openai/m\n    provider: openai\n    upstream_model: m\n"
        "    context_window: 10\n    max_output_tokens: 5\n    prices: {input: 'free', output: '1'}\n"
    )
    code, _, stderr = await run_cli("serve", "router", env={**cli_env, "SWITCHYARD_CATALOG": str(catalog)})
    assert code == 2
    assert (
        stderr.strip()
        == f"switchyard: error: {catalog}:9: models.0.prices.input: not a decimal number: 'free'"
    )


async def test_bad_setting_names_the_variable(cli_env: dict[str, str]) -> None:
    code, _, stderr = await run_cli("serve", "router", env={**cli_env, "SWITCHYARD_PORT": "eighty"})
    assert code == 2 and stderr.startswith("switchyard: error: SWITCHYARD_PORT:")


async def test_port_in_use_is_a_clear_error(cli_env: dict[str, str], tmp_path: Path) -> None:
    async with service("router", "router", env=cli_env, tmp_path=tmp_path) as port:
        code, _, stderr = await run_cli("serve", "router", "--port", str(port), env=cli_env)
    assert code == 1 and "Traceback" not in stderr and f"{port}" in stderr


async def test_chat_with_empty_prompt_or_unreachable_edge(cli_env: dict[str, str]) -> None:
    code, _, stderr = await run_cli("chat", "  ", env=cli_env)
    assert code == 2 and "the prompt is empty" in stderr
    target = f"127.0.0.1:{free_port()}"
    code, _, stderr = await run_cli("chat", "hello", "--target", target, "--timeout", "5", env=cli_env)
    assert code == 1
    assert f"cannot reach the edge at {target}" in stderr and "Traceback" not in stderr


async def test_chat_streams_tokens_and_reports_model_and_cost(
    mesh: Mesh, openai_sim: SimControl, cli_env: dict[str, str]
) -> None:
    await openai_sim.knobs(text="Hello from the simulated vendor.")
    code, stdout, stderr = await run_cli(
        "chat", "hello", "--stream", "--target", mesh.edge_target, env=cli_env
    )
    assert code == 0, stderr
    assert stdout.strip() == "Hello from the simulated vendor."
    assert re.search(
        r"openai/gpt-4o-mini via openai .* \d+ in / \d+ out tokens; finish stop; cost \$0\.\d{6}", stderr
    )


async def test_chat_reports_gateway_errors_with_reason(
    mesh: Mesh, openai_sim: SimControl, cli_env: dict[str, str]
) -> None:
    code, _, stderr = await run_cli(
        "chat", "hello", "--model", "nope/none", "--target", mesh.edge_target, env=cli_env
    )
    assert code == 1
    assert "INVALID_ARGUMENT INVALID_REQUEST: unknown model or alias 'nope/none'" in stderr


async def test_sigterm_drains_and_exits_zero(cli_env: dict[str, str]) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *SWITCHYARD, "serve", "router", "--port", str(port), env=cli_env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        async with keyed_channel(f"127.0.0.1:{port}") as channel:
            while True:
                try:
                    reply = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1
                    )
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.aio.AioRpcError:
                    assert time.monotonic() < deadline, "router never became ready"
                    await asyncio.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_edge_serves_without_the_router(
    mesh: Mesh, openai_sim: SimControl, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **cli_env,
        "SWITCHYARD_ROUTER_TARGET": f"127.0.0.1:{free_port()}",
        "SWITCHYARD_ADAPTER_OPENAI_TARGET": mesh.target("adapter-openai"),
        "SWITCHYARD_LEDGER_TARGET": mesh.target("ledger"),
    }
    async with service("edge-no-router", "edge", env=env, tmp_path=tmp_path) as port:
        async with keyed_channel(f"127.0.0.1:{port}") as channel:
            request = common_pb2.ChatRequest(model="fast")
            request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hi")])
            response = await gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request, timeout=30)
    assert response.routing.model == "openai/gpt-4o-mini"
    assert response.routing.reason == "alias 'fast'"  # planned locally: no hop to the router


async def test_unreachable_adapter_fails_every_attempt_clearly(
    mesh: Mesh, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **cli_env,
        "SWITCHYARD_ROUTER_TARGET": mesh.target("router"),
        "SWITCHYARD_ADAPTER_OPENAI_TARGET": f"127.0.0.1:{free_port()}",
        "SWITCHYARD_LEDGER_TARGET": mesh.target("ledger"),
    }
    async with service("edge-no-adapter", "edge", env=env, tmp_path=tmp_path) as port:
        async with keyed_channel(f"127.0.0.1:{port}") as channel:
            request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
            request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="hi")])
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request, timeout=30)
    error = from_rpc_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.ALL_ATTEMPTS_FAILED)
    assert error.metadata["attempt_1"] == "openai/gpt-4o-mini@openai: DEPENDENCY_UNAVAILABLE"


async def test_run_starts_the_whole_mesh_and_stops_cleanly(cli_env: dict[str, str]) -> None:
    process = await asyncio.create_subprocess_exec(
        *SWITCHYARD, "run", "--free-ports", env=cli_env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            line = (
                await asyncio.wait_for(process.stdout.readline(), max(0.1, deadline - time.monotonic()))
            ).decode()
            assert line, "switchyard run exited early:\n" + "".join(lines)
            lines.append(line)
            if line.strip().startswith("Stop:"):
                break
        banner = "".join(lines)
        match = re.search(r"Ingress:\s+(127\.0\.0\.1:\d+)", banner)
        assert match, banner
        target = match.group(1)
        key = re.search(r"API key:\s+(\S+)", banner)
        assert key, banner
        async with httpx.AsyncClient(headers={"authorization": f"Bearer {key.group(1)}"}) as http:
            models = (await http.get(f"http://{target}/v1/catalog/models", timeout=10)).json()
        assert models["models"][0]["id"] == "openai/gpt-4o-mini"
        assert "SIMULATED" in banner
        pids = [int(p) for p in re.findall(r"pid (\d+)", banner)]
        drain = asyncio.create_task(_drain(process.stdout, lines))
        code, stdout, stderr = await run_cli("chat", "hello", "--target", target, env=cli_env)
        assert code == 0 and stdout.strip(), stderr
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), 30) == 0
        await drain
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()


async def _drain(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode())


async def wait_until_active(sim: SimControl, count: int, timeout_s: float = 10.0) -> None:
    """Poll the simulator until `count` requests are in flight there."""
    deadline = time.monotonic() + timeout_s
    active = 0
    for _ in range(int(timeout_s / 0.02)):
        active = (await sim.stats())["active"]
        if active >= count or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)
    assert active >= count, f"only {active} requests reached the simulator"


async def test_overload_sheds_low_priority_and_queues_high_priority_first(
    mesh: Mesh, openai_sim: SimControl, cli_env: dict[str, str], tmp_path: Path
) -> None:
    env = {
        **cli_env,
        "SWITCHYARD_ADAPTER_OPENAI_TARGET": mesh.target("adapter-openai"),
        "SWITCHYARD_LEDGER_TARGET": mesh.target("ledger"),
        "SWITCHYARD_EDGE_MAX_CONCURRENT": "2",
        "SWITCHYARD_EDGE_QUEUE_TIMEOUT_S": "20",
    }
    await openai_sim.knobs(chunks=4, chunk_delay_ms=250)

    def ask(text: str, priority: common_pb2.Priority.ValueType) -> common_pb2.ChatRequest:
        request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
        request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
        request.routing.priority = priority
        return request

    async with service("edge-small", "edge", env=env, tmp_path=tmp_path) as port:
        async with keyed_channel(f"127.0.0.1:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            finished: list[str] = []

            async def run(name: str, priority: common_pb2.Priority.ValueType) -> None:
                await stub.Chat(ask(name, priority), timeout=30)
                finished.append(name)

            busy = [asyncio.create_task(run(f"busy {i}", common_pb2.PRIORITY_NORMAL)) for i in range(2)]
            await wait_until_active(openai_sim, 2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Chat(ask("low", common_pb2.PRIORITY_LOW), timeout=30)
            error = from_rpc_error(caught.value)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.OVERLOADED)
            assert error.retry_after_s is not None and error.retry_after_s > 0
            normal = asyncio.create_task(run("normal", common_pb2.PRIORITY_NORMAL))
            await asyncio.sleep(0.1)  # queued first, yet the critical request must go ahead of it
            critical = asyncio.create_task(run("critical", common_pb2.PRIORITY_CRITICAL))
            await asyncio.gather(*busy, normal, critical)
    assert finished.index("critical") < finished.index("normal")
    assert (await openai_sim.stats())["requests"] == 4  # the shed request cost nothing
