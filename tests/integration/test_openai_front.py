"""The edge's OpenAI-compatible HTTP front, driven by the official `openai` SDK.

openai SDK ─▶ OpenAI front (aiohttp, in this process) ─▶ EdgeGateway (validation, admission,
           rate limits) ─▶ ChatPipeline ─▶ adapter-openai ─▶ OpenAI simulator
           (the session `mesh`: real processes, real gRPC)

and the same through a real Envoy in front. Admission outcomes the mesh cannot produce on
demand (a tenant's 429, a spent budget, a failure inside our own code) come from a scripted
`stream_chat`, the one callable the front is built around.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from switchyard.common import tracing
from switchyard.common.catalog import load_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.money import TokenCounts, cost_micros
from switchyard.common.ports import free_port
from switchyard.common.settings import Settings
from switchyard.edge.admission import AdmissionController
from switchyard.edge.gateway import EdgeGateway, charge_rate_limits
from switchyard.edge.openai_http import (
    Authenticate,
    OpenAIHttpServer,
    build_openai_app,
    start_openai_http,
)
from switchyard.edge.pipeline import Caller, ChatPipeline
from switchyard.edge.ratelimit import MemoryRateLimiter
from switchyard.envoy_config import envoy_argv, render_local_config
from switchyard.v1 import common_pb2
from tests.conftest import Mesh, SimControl
from tests.integration.test_envoy import DESCRIPTOR, wait_until_ready

API_KEY = "sk-switchyard-front-test"
MODEL = "openai/gpt-4o-mini"
CATALOG = load_catalog(None)
USER = [{"role": "user", "content": "Say hello through the OpenAI front."}]


async def key_check(authorization: str | None) -> Caller:
    """A stand-in for the key authenticator: one good key, the default tenant."""
    if authorization != f"Bearer {API_KEY}":
        raise SwitchyardError(
            grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED, "the API key is missing or unknown"
        )
    return Caller(tenant_id="default", tier="master")


def sdk(url: str, *, api_key: str = API_KEY, max_retries: int = 0) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=max_retries, timeout=30)


def expected_cost(model_id: str, usage: Any) -> int:
    model = CATALOG.model(model_id)
    assert model is not None
    tokens = TokenCounts(
        input_tokens=usage.prompt_tokens,
        output_tokens=usage.completion_tokens,
        cached_input_tokens=usage.prompt_tokens_details.cached_tokens,
        reasoning_tokens=usage.completion_tokens_details.reasoning_tokens,
    )
    return cost_micros(tokens, model.prices.unit_prices())


@pytest.fixture(scope="module")
async def front(mesh: Mesh) -> AsyncIterator[OpenAIHttpServer]:
    """The front around the edge's real admission chain and pipeline, pointed at the session mesh."""
    settings = Settings.from_env({}, adapter_targets={"openai": mesh.target("adapter-openai")})
    channels = ChannelPool(default_timeout_s=settings.call_timeout_s)
    gateway = EdgeGateway(
        CATALOG,
        ChatPipeline(settings, CATALOG, channels),
        authenticate=key_check,
        rate_limit=charge_rate_limits(CATALOG, MemoryRateLimiter()),
        admission=AdmissionController(64, max_queue=64, queue_timeout_s=5.0),
        dedup=None,
    )
    app = build_openai_app(stream_chat=gateway.stream_as, authenticate=key_check, catalog=CATALOG)
    server = await start_openai_http(app, "127.0.0.1", 0, grace_s=1.0)
    try:
        yield server
    finally:
        await server.stop()
        await channels.close()


@pytest.fixture
async def client(front: OpenAIHttpServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with sdk(front.url) as sdk_client:
        yield sdk_client


# -- through the real pipeline ------------------------------------------------------------------


async def test_whole_answer_with_usage_headers_and_cost(
    client: openai.AsyncOpenAI, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(text="A whole answer from the front.", cached_tokens=3, reasoning_tokens=2)
    request_id = f"front-{uuid.uuid4().hex}"
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=USER, extra_headers={"x-request-id": request_id}
    )
    completion = raw.parse()
    choice = completion.choices[0]
    assert choice.message.content == "A whole answer from the front."
    assert (choice.message.role, choice.finish_reason, choice.message.tool_calls) == (
        "assistant",
        "stop",
        None,
    )
    assert (completion.id, completion.object, completion.model) == (
        f"chatcmpl-{request_id}",
        "chat.completion",
        MODEL,
    )
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 3
    assert (
        usage.completion_tokens_details is not None and usage.completion_tokens_details.reasoning_tokens == 2
    )
    headers = raw.headers
    assert headers["x-request-id"] == request_id
    assert (headers["x-switchyard-model"], headers["x-switchyard-provider"]) == (MODEL, "openai")
    assert int(headers["x-switchyard-cost-micros"]) == expected_cost(MODEL, usage) > 0
    assert headers["x-switchyard-cache-status"] == "bypass"
    assert (completion.model_extra or {})["switchyard"]["cost_micros"] == expected_cost(MODEL, usage)


async def test_stream_with_include_usage(client: openai.AsyncOpenAI, openai_sim: SimControl) -> None:
    await openai_sim.knobs(chunks=4, text="streamed through the OpenAI front", cached_tokens=2)
    stream = await client.chat.completions.create(
        model="fast", messages=USER, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == "streamed through the OpenAI front" and len(pieces) >= 2
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.total_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    assert (
        last.usage.prompt_tokens_details is not None and last.usage.prompt_tokens_details.cached_tokens == 2
    )
    extension = (last.model_extra or {})["switchyard"]
    assert extension["cost_micros"] == expected_cost(MODEL, last.usage) > 0
    assert (extension["model"], extension["provider"], extension["usage_estimated"]) == (
        MODEL,
        "openai",
        False,
    )
    assert {c.id for c in chunks} == {f"chatcmpl-{extension['request_id']}"}
    assert {c.model for c in chunks} == {MODEL}, "the alias resolves to the model that answered"


async def test_stream_without_usage_ends_with_the_finish_chunk(
    client: openai.AsyncOpenAI, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(chunks=3, text="no usage chunk here")
    stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert (chunks[-1].model_extra or {})["switchyard"]["cost_micros"] > 0


async def test_sse_wire_format(front: OpenAIHttpServer, openai_sim: SimControl) -> None:
    await openai_sim.knobs(chunks=2, text="wire")
    body = {"model": MODEL, "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    async with (
        httpx.AsyncClient(base_url=front.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {API_KEY}"}
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-switchyard-model"] == MODEL and response.headers["x-request-id"]
        assert "x-switchyard-cost-micros" not in response.headers, "a stream's cost comes in its last chunk"
        text = (await response.aread()).decode()
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: {") for event in events[:-2])
    assert [p["object"] for p in payloads] == ["chat.completion.chunk"] * len(payloads)
    assert payloads[-1]["choices"] == [] and "switchyard" in payloads[-1]


class GetWeather(BaseModel):
    city: str


async def test_tool_call_reassembled_by_the_stream_helper(
    client: openai.AsyncOpenAI, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(tool_call=True, chunks=3)
    kinds: list[str] = []
    async with client.chat.completions.stream(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
        tools=[openai.pydantic_function_tool(GetWeather)],
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name == "GetWeather"
    assert json.loads(call.function.arguments) == {"city": "example"}
    assert call.function.parsed_arguments == GetWeather(city="example")
    assert kinds.count("tool_calls.function.arguments.delta") >= 2
    assert "tool_calls.function.arguments.done" in kinds


async def test_tool_result_round_trip(client: openai.AsyncOpenAI, openai_sim: SimControl) -> None:
    await openai_sim.knobs(text="It is sunny in Oslo.")
    tool = openai.pydantic_function_tool(GetWeather)
    completion = await client.chat.completions.create(
        model=MODEL,
        tools=[tool],
        messages=[
            {"role": "developer", "content": "Use the tools."},
            {"role": "user", "content": "What is the weather in Oslo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "GetWeather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
        ],
    )
    assert completion.choices[0].message.content == "It is sunny in Oslo."


class Forecast(BaseModel):
    city: str
    celsius: int


async def test_json_schema_answer_parses_into_the_model(
    client: openai.AsyncOpenAI, openai_sim: SimControl
) -> None:
    completion = await client.chat.completions.parse(model=MODEL, messages=USER, response_format=Forecast)
    assert completion.choices[0].message.parsed == Forecast(city="example", celsius=1)


async def test_json_object_mode(client: openai.AsyncOpenAI, openai_sim: SimControl) -> None:
    completion = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Answer in JSON."}],
        response_format={"type": "json_object"},
    )
    content = completion.choices[0].message.content
    assert content is not None and isinstance(json.loads(content)["answer"], str)


@pytest.mark.parametrize(
    ("kwargs", "param", "code"),
    [
        ({"temperature": 5}, "temperature", "invalid_value"),
        ({"n": 2}, "n", "unsupported_value"),
        ({"extra_body": {"best_of": 3}}, "best_of", "unknown_parameter"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "ftp://x"}}]}
                ]
            },
            "messages[0].content[0].image_url.url",
            "invalid_value",
        ),
    ],
    ids=["pipeline-validation", "n", "unknown", "image-url"],
)
async def test_invalid_request_is_a_bad_request_naming_the_param(
    client: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str, code: str
) -> None:
    arguments: dict[str, Any] = {"model": MODEL, "messages": USER, **kwargs}
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(**arguments)
    assert (caught.value.status_code, caught.value.param, caught.value.code) == (400, param, code)
    assert caught.value.type == "invalid_request_error"


async def test_unknown_model_is_not_found(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="openai/gpt-9", messages=USER)
    assert (caught.value.code, caught.value.param) == ("model_not_found", "model")


async def test_failure_after_the_first_token_raises_in_the_sdk(
    client: openai.AsyncOpenAI, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(
        chunks=6, text="this answer breaks off halfway through", error_after_chunks=3, status=500
    )
    stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
    received: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
    assert received, "the text before the failure arrived"
    assert "this answer breaks off halfway through".startswith("".join(received))
    assert caught.value.code == "stream_interrupted"
    assert (
        isinstance(caught.value.body, dict)
        and caught.value.body["switchyard"]["reason"] == "STREAM_INTERRUPTED"
    )


async def test_models_list_and_retrieve(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    assert [m.id for m in page.data] == [m.id for m in CATALOG.models]
    assert {m.object for m in page.data} == {"model"}
    model = await client.models.retrieve(MODEL)
    assert (model.id, model.owned_by) == (MODEL, "openai")
    assert (await client.models.retrieve("fast")).id == MODEL, "an alias resolves to its model"
    with pytest.raises(openai.NotFoundError) as caught:
        await client.models.retrieve("openai/gpt-9")
    assert caught.value.code == "model_not_found"


async def test_client_disconnect_stops_the_upstream_call(
    front: OpenAIHttpServer, openai_sim: SimControl
) -> None:
    await openai_sim.knobs(chunks=40, chunk_delay_ms=100, text="a long answer " * 10)
    body = {"model": MODEL, "messages": USER, "stream": True}
    async with (
        httpx.AsyncClient(base_url=front.url, timeout=30) as http,
        http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {API_KEY}"}
        ) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
    # The client is gone: the simulator must see its request abandoned, not completed.
    stats: dict[str, Any] = {}
    for _ in range(200):
        stats = await openai_sim.stats()
        if stats["disconnects"]:
            break
        await asyncio.sleep(0.05)
    assert (stats["disconnects"], stats["completed"]) == (1, 0), stats


# -- admission outcomes, from a scripted stream_chat --------------------------------------------

Outcome = Sequence[common_pb2.ChatChunk | BaseException | asyncio.Event]


class ScriptedChat:
    """Stands in for the admission chain: each call plays the next scripted outcome.

    An outcome is chunks to yield, an exception to raise, or an Event to wait for.
    """

    def __init__(self, *outcomes: Outcome) -> None:
        self._outcomes = list(outcomes)
        self.requests: list[common_pb2.ChatRequest] = []
        self.callers: list[Caller] = []
        self.timeouts: list[float | None] = []
        self.closed = asyncio.Event()

    async def __call__(
        self, request: common_pb2.ChatRequest, caller: Caller, *, timeout_s: float | None
    ) -> AsyncIterator[common_pb2.ChatChunk]:
        self.requests.append(request)
        self.callers.append(caller)
        self.timeouts.append(timeout_s)
        try:
            for item in self._outcomes.pop(0):
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, asyncio.Event):
                    await item.wait()
                    continue
                yield item
        finally:
            self.closed.set()


def answer(text: str, model: str = MODEL) -> list[common_pb2.ChatChunk]:
    return [
        common_pb2.ChatChunk(routing=common_pb2.RoutingInfo(model=model, provider="openai", attempt=1)),
        common_pb2.ChatChunk(delta=common_pb2.Delta(text=text)),
        common_pb2.ChatChunk(usage=common_pb2.Usage(input_tokens=5, output_tokens=2)),
        common_pb2.ChatChunk(
            done=common_pb2.Done(finish_reason=common_pb2.FINISH_REASON_STOP, cost_micros=9)
        ),
    ]


@contextlib.asynccontextmanager
async def scripted_front(chat: ScriptedChat, authenticate: Authenticate = key_check) -> AsyncIterator[str]:
    app = build_openai_app(stream_chat=chat, authenticate=authenticate, catalog=CATALOG)
    server = await start_openai_http(app, "127.0.0.1", 0, grace_s=1.0)
    try:
        yield server.url
    finally:
        await server.stop()


def rate_limited(retry_after_s: float) -> SwitchyardError:
    return SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        "the tenant's rate limit is reached",
        retry_after_s=retry_after_s,
    )


async def test_rate_limit_is_a_429_with_retry_after() -> None:
    chat = ScriptedChat([rate_limited(1.5)])
    async with scripted_front(chat) as url, sdk(url) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=USER)
    error = caught.value
    assert (error.status_code, error.code, error.type) == (429, "rate_limit_exceeded", "requests")
    assert (error.response.headers["retry-after"], error.response.headers["retry-after-ms"]) == ("2", "1500")
    assert len(chat.requests) == 1, "max_retries=0: the SDK did not retry"


async def test_sdk_retries_after_a_429_with_the_same_request_id() -> None:
    chat = ScriptedChat([rate_limited(0.05)], answer("second time lucky"))
    async with scripted_front(chat) as url, sdk(url, max_retries=2) as client:
        completion = await client.chat.completions.create(
            model=MODEL, messages=USER, extra_headers={"x-request-id": "idem-42"}
        )
    assert completion.choices[0].message.content == "second time lucky"
    assert [r.request_id for r in chat.requests] == ["idem-42", "idem-42"], "a retry is charged once"


async def test_spent_budget_is_not_retried() -> None:
    budget = SwitchyardError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.BUDGET_EXCEEDED, "the monthly budget is spent"
    )
    chat = ScriptedChat([budget], answer("never reached"))
    async with scripted_front(chat) as url, sdk(url, max_retries=2) as client:
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=USER)
    assert caught.value.code == "insufficient_quota"
    assert len(chat.requests) == 1, "x-should-retry: false stops the SDK's retries"


async def test_bad_key_is_an_authentication_error() -> None:
    chat = ScriptedChat(answer("never reached"))
    async with scripted_front(chat) as url, sdk(url, api_key="sk-wrong") as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=MODEL, messages=USER)
        assert caught.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            await client.models.list()
    assert chat.requests == [], "no chat runs for an unauthenticated caller"


async def test_headers_and_caller_reach_stream_chat() -> None:
    async def restricted(authorization: str | None) -> Caller:
        await key_check(authorization)
        return Caller(tenant_id="acme", allowed_models=frozenset({"openai/gpt-4o"}))

    chat = ScriptedChat(answer("ok"))
    async with scripted_front(chat, restricted) as url, sdk(url) as client:
        await client.chat.completions.create(
            model=MODEL,
            messages=USER,
            extra_headers={"x-switchyard-timeout-ms": "2500", "x-switchyard-priority": "critical"},
            extra_body={"switchyard": {"cache": {"mode": "CACHE_MODE_SKIP"}}},
        )
        assert [m.id for m in (await client.models.list()).data] == ["openai/gpt-4o"]
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve(MODEL)
    (request,) = chat.requests
    assert chat.timeouts == [2.5] and chat.callers[0].tenant_id == "acme"
    assert request.routing.priority == common_pb2.PRIORITY_CRITICAL
    assert request.cache.mode == common_pb2.CACHE_MODE_SKIP


async def test_a_bug_mid_stream_is_an_in_stream_internal_error_without_details() -> None:
    chat = ScriptedChat([*answer("partial")[:2], RuntimeError("secret internals")])
    async with scripted_front(chat) as url, sdk(url) as client:
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        with pytest.raises(openai.APIError) as caught:
            [chunk async for chunk in stream]
    assert caught.value.code == "internal" and "secret" not in caught.value.message


async def test_client_disconnect_cancels_stream_chat_at_once() -> None:
    never = asyncio.Event()
    chat = ScriptedChat([*answer("first")[:2], never])
    body = {"model": MODEL, "messages": USER, "stream": True}
    async with scripted_front(chat) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        async with http.stream(
            "POST", "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {API_KEY}"}
        ) as response:
            async for line in response.aiter_lines():
                if '"content":"first"' in line:
                    break
        await asyncio.wait_for(chat.closed.wait(), timeout=10)
    assert not never.is_set()


async def test_request_span_continues_the_callers_trace() -> None:
    exporter = InMemorySpanExporter()
    assert tracing.configure_tracing("edge", exporter=exporter)
    try:
        chat = ScriptedChat(answer("traced"))
        trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
        async with scripted_front(chat) as url, sdk(url) as client:
            await client.chat.completions.create(
                model="fast", messages=USER, extra_headers={"traceparent": f"00-{trace_id}-{parent_id}-01"}
            )
        assert tracing.force_flush()
    finally:
        tracing.shutdown_tracing()
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "POST /v1/chat/completions"]
    assert span.context is not None and format(span.context.trace_id, "032x") == trace_id
    assert span.parent is not None and format(span.parent.span_id, "016x") == parent_id
    attributes = dict(span.attributes or {})
    assert attributes["gen_ai.request.model"] == "fast" and attributes["gen_ai.response.model"] == MODEL
    assert (attributes["gen_ai.usage.input_tokens"], attributes["http.response.status_code"]) == (5, 200)


# -- through Envoy ------------------------------------------------------------------------------


def test_envoy_routes_for_the_openai_front() -> None:
    config = yaml.safe_load(
        render_local_config(
            listen_port=1,
            admin_port=2,
            edge_target="127.0.0.1:3",
            edge_http_target="127.0.0.1:8000",
            service_targets={
                k: "127.0.0.1:4" for k in ("router", "ledger", "health", "cache", "adapter-openai")
            },
            descriptor_path="d",
            otlp_endpoint=None,
        )
    )
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = {r["name"]: r for r in hcm["route_config"]["virtual_hosts"][0]["routes"]}
    chat = routes["edge_http.chat_completions"]
    assert chat["match"] == {"path": "/v1/chat/completions"}
    assert chat["route"] == {"cluster": "edge_http", "timeout": "0s"}, (
        "no timeout and no retries on completions"
    )
    for name in ("edge_http.models", "edge_http.model"):
        assert routes[name]["route"]["retry_policy"]["retry_on"] == "connect-failure,reset"
    assert not any(f["name"] == "envoy.filters.http.buffer" for f in hcm["http_filters"]), "no buffering"
    (cluster,) = [c for c in config["static_resources"]["clusters"] if c["name"] == "edge_http"]
    assert "http_protocol_options" in str(cluster), "the front speaks HTTP/1.1"


@contextlib.asynccontextmanager
async def envoy_before(mesh: Mesh, edge_http_target: str, workdir: Path) -> AsyncIterator[str]:
    """A real Envoy whose OpenAI routes go to `edge_http_target`; yields its URL."""
    listen_port, admin_port = free_port(), free_port()
    config = render_local_config(
        listen_port=listen_port,
        admin_port=admin_port,
        edge_target=mesh.edge_target,
        edge_http_target=edge_http_target,
        service_targets={
            k: mesh.target(k) for k in ("router", "ledger", "health", "cache", "adapter-openai")
        },
        descriptor_path=str(DESCRIPTOR),
        otlp_endpoint=None,
    )
    config_path, log_path = workdir / "envoy.yaml", workdir / "envoy.log"
    config_path.write_text(config)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *envoy_argv(config_path, base_id=random.randrange(1, 1 << 20)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        await wait_until_ready(proc, admin_port, log_path)
        yield f"http://127.0.0.1:{listen_port}"
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=5)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@pytest.fixture(scope="module")
async def envoy_url(
    mesh: Mesh, front: OpenAIHttpServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[str]:
    async with envoy_before(mesh, f"127.0.0.1:{front.port}", tmp_path_factory.mktemp("envoy-front")) as url:
        yield url


async def test_through_envoy_stream_whole_answer_and_models(envoy_url: str, openai_sim: SimControl) -> None:
    await openai_sim.knobs(chunks=4, text="through the ingress")
    async with sdk(envoy_url) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=USER, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "through the ingress"
        assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0

        raw = await client.chat.completions.with_raw_response.create(model=MODEL, messages=USER)
        completion = raw.parse()
        assert completion.choices[0].message.content == "through the ingress"
        # Envoy gave the request its id; the front used it, so every log line agrees.
        assert completion.id == f"chatcmpl-{raw.headers['x-request-id']}"

        assert [m.id for m in (await client.models.list()).data] == [m.id for m in CATALOG.models]
        assert (await client.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=USER, temperature=9)
        assert caught.value.param == "temperature"


async def test_envoy_passes_each_event_on_without_buffering(
    mesh: Mesh, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # The rest of the answer waits until the client has the first chunk: a buffering proxy
    # would hold that chunk back and the wait below would fail instead of hanging.
    gate = asyncio.Event()
    chat = ScriptedChat([*answer("first")[:2], gate, *answer(" second")[1:]])
    async with (
        scripted_front(chat) as front_url,
        envoy_before(mesh, front_url.removeprefix("http://"), tmp_path_factory.mktemp("envoy-gate")) as url,
        sdk(url) as client,
    ):
        stream = await client.chat.completions.create(model=MODEL, messages=USER, stream=True)
        events = stream.__aiter__()
        role = await asyncio.wait_for(events.__anext__(), timeout=10)
        first = await asyncio.wait_for(events.__anext__(), timeout=10)
        assert (role.choices[0].delta.role, first.choices[0].delta.content) == ("assistant", "first")
        gate.set()
        rest = [chunk async for chunk in events]
    assert [c.choices[0].delta.content for c in rest if c.choices[0].delta.content] == [" second"]
