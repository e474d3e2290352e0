"""The whole mesh behind a real Envoy, wired as in a cluster: clients reach the edge through the
ingress listener, and the services reach each other only through Envoy's mesh listener.

client ─▶ Envoy :ingress ─▶ edge ─▶ Envoy :mesh ─▶ cache / adapter-openai / ledger / health / router

One request is one trace from Envoy to every service it touches; a service killed while
requests run comes back under the supervisor and traffic recovers without restarting anything.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest

from switchyard.common.errors import Reason, from_rpc_error
from switchyard.common.settings import LOCAL_DEV_KEY
from switchyard.v1 import common_pb2, gateway_pb2_grpc
from tests.conftest import Mesh, SimControl, running_mesh
from tests.support.auth import keyed_channel
from tests.support.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def envoy_mesh(otlp: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Mesh]:
    async with running_mesh(otlp, tmp_path_factory.mktemp("via-envoy"), via_envoy=True) as running:
        assert running.plan.envoy_target is not None
        # Supervise as `switchyard run` does: a child that dies is restarted with backoff.
        supervising = asyncio.create_task(running.supervisor.run())
        try:
            yield running
        finally:
            await running.supervisor.stop(grace_s=5)
            await supervising


@pytest.fixture
async def sim(envoy_mesh: Mesh) -> AsyncIterator[SimControl]:
    control = SimControl(envoy_mesh.plan.simulator_urls["openai"])
    await control.reset()
    try:
        yield control
    finally:
        await control.reset()
        await control.close()


@pytest.fixture
async def ingress(envoy_mesh: Mesh) -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    assert envoy_mesh.plan.envoy_target is not None
    async with keyed_channel(envoy_mesh.plan.envoy_target) as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)


def chat_request(text: str, *, temperature: float | None = None) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model="openai/gpt-4o-mini")
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    if temperature is not None:
        request.sampling.temperature = temperature
    return request


def envoy_access_log(mesh: Mesh) -> list[dict[str, Any]]:
    """Envoy's JSON access log lines, from the supervisor's combined log."""
    entries = []
    for line in mesh.logs().splitlines():
        start = line.find('{"')
        if start < 0 or '"upstream_cluster"' not in line:
            continue
        try:
            entries.append(json.loads(line[start:]))
        except ValueError:
            continue
    return entries


async def until(predicate: Any, *, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if predicate():
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_a_generated_stub_streams_through_the_ingress_and_the_adapter_call_crosses_the_mesh(
    envoy_mesh: Mesh, ingress: gateway_pb2_grpc.GatewayServiceStub, sim: SimControl
) -> None:
    await sim.knobs(chunks=4, text="through both listeners")
    request_id = f"via-envoy-{uuid.uuid4().hex}"
    request = chat_request("Stream through Envoy.")
    request.request_id = request_id
    chunks = [c async for c in ingress.ChatStream(request, timeout=30)]
    assert "".join(c.delta.text for c in chunks if c.HasField("delta")) == "through both listeners"
    assert chunks[-1].done.finish_reason == common_pb2.FINISH_REASON_STOP

    def crossed() -> bool:
        return any(
            e.get("listener") == "ingress" and e.get("path") == "/switchyard.v1.GatewayService/ChatStream"
            for e in envoy_access_log(envoy_mesh)
        )

    await until(crossed, timeout=10, what="Envoy's access log of the ingress call")
    # The generation travels on one of the edge's long-lived streams to the adapter, through
    # the mesh listener (logged when the stream ends): Envoy counts it on the adapter's cluster.
    assert envoy_mesh.plan.envoy_admin is not None
    async with httpx.AsyncClient(base_url=f"http://{envoy_mesh.plan.envoy_admin}", timeout=5) as admin:
        stats = (
            await admin.get("/stats", params={"filter": "^cluster\\.adapter_openai\\.upstream_rq_total$"})
        ).text
    assert int(stats.split(":")[1]) >= 1, stats


async def test_the_openai_sdk_streams_a_chat_through_envoy(envoy_mesh: Mesh, sim: SimControl) -> None:
    await sim.knobs(chunks=3, text="hello from the sdk")
    client = openai.AsyncOpenAI(
        base_url=f"http://{envoy_mesh.plan.envoy_target}/v1", api_key=LOCAL_DEV_KEY, max_retries=0
    )
    try:
        stream = await client.chat.completions.create(
            model="openai/gpt-4o-mini",
            messages=[{"role": "user", "content": "Say hello."}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
    finally:
        await client.close()
    assert "".join(pieces) == "hello from the sdk"
    assert usage is not None and usage.completion_tokens > 0


async def test_a_json_client_reaches_a_transcoded_method(envoy_mesh: Mesh) -> None:
    async with httpx.AsyncClient(base_url=f"http://{envoy_mesh.plan.envoy_target}", timeout=10) as http:
        response = await http.get("/v1/catalog/models", headers={"authorization": f"Bearer {LOCAL_DEV_KEY}"})
        refused = await http.get("/v1/catalog/models")
    assert response.status_code == 200, response.text
    assert any(m["id"] == "openai/gpt-4o-mini" for m in response.json()["models"])
    assert refused.status_code == 401


async def test_one_request_is_one_trace_from_envoy_through_every_service(
    envoy_mesh: Mesh, ingress: gateway_pb2_grpc.GatewayServiceStub, otlp: OtlpReceiver, sim: SimControl
) -> None:
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    # Temperature 0 makes it cacheable: the edge looks it up in the cache (a miss) first.
    request = chat_request(f"Trace me {uuid.uuid4().hex}", temperature=0.0)
    request.request_id = f"trace-{trace_id}"
    await ingress.Chat(request, metadata=(("traceparent", traceparent),), timeout=30)

    wanted = {
        "switchyard-envoy",
        "switchyard-edge",
        "switchyard-cache",
        "switchyard-adapter-openai",
        "switchyard-ledger",
    }

    def in_trace(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        return [s for s in spans if s.trace_id == trace_id]

    def roots(spans: list[ReceivedSpan]) -> list[ReceivedSpan]:
        ids = {s.span_id for s in spans}
        return [s for s in spans if s.parent_span_id not in ids]

    caller_span_id = traceparent.split("-")[2]

    def complete(spans: list[ReceivedSpan]) -> bool:
        mine = in_trace(spans)
        names = {s.name for s in mine}
        # Each span is exported when it ends (Envoy's in batches, once a second): wait for the
        # last ones too, until every span but the first has its parent and the first is the one
        # whose parent is the caller's (Envoy's ingress span ends last, so it may come last).
        found = roots(mine)
        return (
            wanted <= {s.service_name for s in mine}
            and {"switchyard.ledger/commit", "switchyard.v1.GatewayService/Chat"} <= names
            and len(found) == 1
            and found[0].parent_span_id == caller_span_id
        )

    try:
        spans = in_trace(await otlp.wait_for(complete, timeout=30))
    except TimeoutError:
        spans = in_trace(otlp.spans)
        raise AssertionError(
            [(s.service_name, s.kind, s.name, s.span_id, s.parent_span_id) for s in spans]
        ) from None
    by_id = {s.span_id: s for s in spans}
    # One root within the trace: Envoy's ingress span, a child of the caller's own span.
    (root,) = roots(spans)
    assert root.service_name == "switchyard-envoy"
    assert root.parent_span_id == caller_span_id

    def parent(span: ReceivedSpan) -> ReceivedSpan:
        return by_id[span.parent_span_id]

    edge = next(
        s
        for s in spans
        if s.service_name == "switchyard-edge" and s.name == "switchyard.v1.GatewayService/Chat"
    )
    assert parent(edge).service_name == "switchyard-envoy"
    # The generation travels on the edge's long-lived stream to the adapter (through Envoy's
    # mesh listener), carrying the request's trace context: the edge's client span for it ->
    # the adapter's server span.
    server = next(
        s
        for s in spans
        if s.service_name == "switchyard-adapter-openai"
        and s.name == "switchyard.v1.ProviderAdapterService/Generate"
        and s.kind == "SERVER"
    )
    client = parent(server)
    assert (client.service_name, client.kind, client.name) == (
        "switchyard-edge",
        "CLIENT",
        "switchyard.v1.ProviderAdapterService/Generate",
    )
    assert server.attributes["rpc.grpc.status_code"] == 0
    # The lookup travels on the edge's long-lived lookup stream (through Envoy too), carrying
    # the request's trace context: the cache records it as a child of the edge's span.
    lookup = next(
        s for s in spans if s.service_name == "switchyard-cache" and s.name == "switchyard.cache/lookup"
    )
    assert parent(lookup).service_name == "switchyard-edge"
    # The router's part of a request is the plan, made at the edge on the router's snapshot.
    plan = next(s for s in spans if s.name == "switchyard.router/plan")
    assert (plan.service_name, plan.parent_span_id) == ("switchyard-edge", edge.span_id)
    # The ledger's commit travels in a batch, off the request path, and still lands in the trace.
    commit = next(s for s in spans if s.name == "switchyard.ledger/commit")
    assert commit.service_name == "switchyard-ledger"
    assert commit.attributes["switchyard.request_id"] == request.request_id
    assert parent(commit).service_name == "switchyard-edge"
    # Prompts never reach span attributes.
    assert not any("Trace me" in str(s.attributes) for s in spans)


async def chat_outcomes(
    ingress: gateway_pb2_grpc.GatewayServiceStub, stop: asyncio.Event, outcomes: list[tuple[float, str]]
) -> None:
    """Send requests one after another until `stop`; record (time, "ok" or "CODE/REASON").

    Each is cacheable and new, so the edge looks it up in the cache and stores the answer."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        try:
            await ingress.Chat(chat_request(f"keep going {uuid.uuid4().hex}", temperature=0.0), timeout=10)
            outcomes.append((loop.time(), "ok"))
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            outcomes.append((loop.time(), f"{error.code.name}/{error.reason}"))
            await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    ("child", "failures"),
    [
        # The adapter is on every request's path: the edge answers UNAVAILABLE with its reason.
        ("adapter-openai", {f"UNAVAILABLE/{Reason.ALL_ATTEMPTS_FAILED}"}),
        # The edge itself: Envoy answers UNAVAILABLE (no healthy upstream) until it is back.
        ("edge", {f"UNAVAILABLE/{Reason.DEPENDENCY_UNAVAILABLE}"}),
        # Neither the cache nor the ledger is on the path: requests keep succeeding.
        ("cache", set()),
        ("ledger", set()),
    ],
)
async def test_a_killed_service_comes_back_and_traffic_recovers(
    envoy_mesh: Mesh, ingress: gateway_pb2_grpc.GatewayServiceStub, child: str, failures: set[str]
) -> None:
    supervisor = envoy_mesh.supervisor
    before = dict(supervisor.restarts)
    restarts = before[child]
    pid = supervisor.pid(child)
    assert pid is not None
    stop = asyncio.Event()
    outcomes: list[tuple[float, str]] = []
    load = asyncio.create_task(chat_outcomes(ingress, stop, outcomes))
    try:
        await until(lambda: len(outcomes) >= 3, timeout=20, what="requests before the kill")
        assert {o for _, o in outcomes} == {"ok"}, outcomes
        os.kill(pid, signal.SIGKILL)
        killed_at = asyncio.get_running_loop().time()
        await until(
            lambda: supervisor.restarts[child] > restarts and supervisor.pid(child) not in (None, pid),
            timeout=30,
            what=f"the supervisor to restart {child}",
        )
        # Traffic recovers: five answers in a row after the restart, with nothing restarted but it.
        await until(
            lambda: [o for t, o in outcomes if t > killed_at][-5:] == ["ok"] * 5,
            timeout=30,
            what=f"traffic to recover after {child} came back",
        )
    finally:
        stop.set()
        await load
    after = {o for t, o in outcomes if t > killed_at}
    assert after - {"ok"} <= failures, after
    # Nothing else was restarted.
    assert {n: c for n, c in supervisor.restarts.items() if n != child} == {
        n: c for n, c in before.items() if n != child
    }
