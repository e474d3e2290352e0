"""API keys, scopes and rate limits at the edge, end to end: keys made by the real CLI on the
mesh's own database, requests through the real edge process."""

from __future__ import annotations

import asyncio

import grpc
import openai
import pytest

from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error
from switchyard.common.settings import LOCAL_DEV_KEY
from switchyard.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, SimControl
from tests.support.auth import keyed_channel
from tests.support.mesh_keys import create_key, keys_cli


def ask(model: str = "openai/gpt-4o-mini", text: str = "Say hello.") -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=model)
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    return request


async def refused(mesh: Mesh, request: common_pb2.ChatRequest, key: str | None) -> SwitchyardError:
    channel = keyed_channel(mesh.edge_target, key) if key else grpc.aio.insecure_channel(mesh.edge_target)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway_pb2_grpc.GatewayServiceStub(channel).Chat(request, timeout=15)
    return from_rpc_error(caught.value)


async def test_missing_and_wrong_keys_are_unauthenticated(mesh: Mesh, openai_sim: SimControl) -> None:
    missing = await refused(mesh, ask(), None)
    assert (missing.code, missing.reason) == (grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED)
    wrong_key = "sy-abcdefgh-" + "x" * 40
    wrong = await refused(mesh, ask(), wrong_key)
    assert wrong.code == grpc.StatusCode.UNAUTHENTICATED
    assert wrong_key not in wrong.message and "abcdefgh" not in str(wrong.metadata)
    assert (await openai_sim.stats())["requests"] == 0


async def test_a_revoked_key_stops_working(mesh: Mesh, openai_sim: SimControl) -> None:
    key = await create_key(mesh, "default", "--label", "short-lived")
    async with keyed_channel(mesh.edge_target, key) as channel:
        response = await gateway_pb2_grpc.GatewayServiceStub(channel).Chat(ask(), timeout=30)
    assert response.finish_reason == common_pb2.FINISH_REASON_STOP
    listing = await keys_cli(mesh, "list", "--tenant", "default")
    assert key not in listing and key[:11] in listing
    await keys_cli(mesh, "revoke", key[:11])
    codes: list[grpc.StatusCode] = []
    async with keyed_channel(mesh.edge_target, key) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        for _ in range(100):  # the edge reloads its keys every few seconds
            try:
                await stub.Chat(ask(), timeout=15)
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code())
                break
            await asyncio.sleep(0.2)
    assert codes == [grpc.StatusCode.UNAUTHENTICATED]


async def test_models_outside_the_scope_are_permission_denied(mesh: Mesh, openai_sim: SimControl) -> None:
    scoped = await create_key(mesh, "default", "--models", "openai/gpt-4o-mini")
    error = await refused(mesh, ask("smart"), scoped)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED)
    trial = await create_key(mesh, "trial")  # the tenant itself only allows the small model
    error = await refused(mesh, ask("openai/gpt-4.1-mini"), trial)
    assert error.code == grpc.StatusCode.PERMISSION_DENIED
    assert (await openai_sim.stats())["requests"] == 0


async def test_free_tier_bursts_then_is_limited_then_locked_out(mesh: Mesh, openai_sim: SimControl) -> None:
    key = await create_key(mesh, "trial")
    async with keyed_channel(mesh.edge_target, key) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        answers = await asyncio.gather(*(stub.Chat(ask(text=f"q{i}"), timeout=30) for i in range(10)))
        assert all(a.finish_reason == common_pb2.FINISH_REASON_STOP for a in answers)
    limited = await refused(mesh, ask(text="one too many"), key)
    assert (limited.code, limited.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    # The free tier's five-minute lockout starts with the first refusal.
    assert limited.retry_after_s == pytest.approx(300, abs=1)
    locked = await refused(mesh, ask(text="still locked"), key)
    assert locked.reason == Reason.RATE_LIMITED and locked.retry_after_s == pytest.approx(300, abs=2)
    assert (await openai_sim.stats())["requests"] == 10


async def test_list_models_shows_only_what_the_key_may_use(mesh: Mesh) -> None:
    trial = await create_key(mesh, "trial")
    async with keyed_channel(mesh.edge_target, trial) as channel:
        listing = await gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), timeout=15
        )
    assert [m.id for m in listing.models] == ["openai/gpt-4o-mini"]


async def test_the_edge_process_serves_openai_http_with_the_same_keys(
    mesh: Mesh, openai_sim: SimControl
) -> None:
    base_url = f"http://{mesh.plan.edge_http_target}/v1"
    client = openai.AsyncOpenAI(base_url=base_url, api_key=LOCAL_DEV_KEY, max_retries=0)
    try:
        answer = await client.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "Hello over HTTP."}]
        )
        assert answer.choices[0].message.content and answer.usage is not None
        stream = await client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "Stream over HTTP."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    finally:
        await client.close()
    trial = await create_key(mesh, "trial")
    scoped = openai.AsyncOpenAI(base_url=base_url, api_key=trial, max_retries=0)
    wrong = openai.AsyncOpenAI(base_url=base_url, api_key="sy-abcdefgh-" + "y" * 40, max_retries=0)
    try:
        assert [m.id async for m in scoped.models.list()] == ["openai/gpt-4o-mini"]
        with pytest.raises(openai.PermissionDeniedError):
            await scoped.chat.completions.create(
                model="smart", messages=[{"role": "user", "content": "Not for trial keys."}]
            )
        with pytest.raises(openai.AuthenticationError):
            await wrong.chat.completions.create(model="fast", messages=[{"role": "user", "content": "hi"}])
    finally:
        await scoped.close()
        await wrong.close()
