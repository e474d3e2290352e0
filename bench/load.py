"""The load generator: a separate process that drives one path at a time and times every call.

It runs in its own process (multiprocessing, spawn), pinned to its own core when the
machine has one to spare, and talks to the orchestrator over a pipe: one `Phase` in, one
`PhaseResult` out. It keeps one HTTP client session and one gRPC channel for its whole
life, so every phase reuses warm keep-alive connections. Everything is loopback only and
every phase is bounded both in time (`duration_s`) and in count (`max_requests`).

Paths:
  * ``direct``: the OpenAI wire format straight to the simulator, with one
    `aiohttp.ClientSession` (the baseline client for every direct figure);
  * ``edge``: the gateway's edge by `grpc.aio` stubs over one channel;
  * ``envoy``: the same stubs through Envoy's ingress listener (gRPC);
  * ``envoy_http``: the OpenAI wire format (what the official `openai` SDK sends: the same JSON
    body and SSE as the direct path, with the gateway's API key) through Envoy to the edge's
    OpenAI-compatible HTTP front, with one `aiohttp.ClientSession`;
  * ``litellm``: the same OpenAI wire format to a LiteLLM proxy in front of the same simulator.
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

import aiohttp
import grpc
import orjson

from switchyard.common.settings import LOCAL_DEV_KEY
from switchyard.v1 import common_pb2, gateway_pb2_grpc

# The LiteLLM proxy's master key in the benchmark (harness.LiteLLM configures it).
LITELLM_KEY = "sk-bench-litellm-master-key-0123456789abcdef"

PathName = Literal["direct", "edge", "envoy", "envoy_http", "litellm"]
# "cached": the direct path is a plain completion; the edge path asks one deterministic
# question again and again, so after the first call every answer is a cache hit.
# "idle": `concurrency` streams opened at once against a vendor that has not answered yet, held
# open for the phase's duration (the orchestrator reads the mesh's memory meanwhile), then cancelled.
Mode = Literal["unary", "stream", "cached", "idle"]

PROMPT = "Benchmark: say something short."
UPSTREAM_MODEL = "gpt-4o-mini"
EDGE_MODEL = "openai/gpt-4o-mini"
CALL_TIMEOUT_S = 30.0
HTTP_CLIENT = f"aiohttp {aiohttp.__version__} (one ClientSession, keep-alive connection pool)"
GRPC_CLIENT = f"grpc.aio {grpc.__version__} (one insecure channel, HTTP/2)"


@dataclass(frozen=True)
class LoadConfig:
    """Where the load goes: the simulator's root URL, its API key, the edge's gRPC target and
    Envoy's ingress (`host:port`)."""

    sim_root: str
    sim_api_key: str
    edge_target: str
    core: int | None
    envoy_target: str
    litellm_root: str | None = None


@dataclass(frozen=True)
class Phase:
    """One bounded measurement: `concurrency` workers calling `path` in `mode` back to back."""

    path: PathName
    mode: Mode
    concurrency: int
    duration_s: float
    max_requests: int


@dataclass
class PhaseResult:
    """Raw timings of one phase, in nanoseconds, plus the client's own CPU use."""

    phase: Phase
    # Unary: whole-call latency. Streaming: time to the first token of text.
    latencies_ns: list[int] = field(default_factory=list)
    # Streaming only: time until the stream ended.
    totals_ns: list[int] = field(default_factory=list)
    errors: int = 0
    first_error: str = ""
    # Idle streams only: how many were still open when the phase ended.
    open_at_end: int = 0
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0


class Clients:
    """The two clients, built once on the load generator's event loop."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=300, ttl_dns_cache=None)
        self.http = aiohttp.ClientSession(
            base_url=config.sim_root,
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            headers={"Authorization": f"Bearer {config.sim_api_key}", "Content-Type": "application/json"},
        )
        self.channel = grpc.aio.insecure_channel(config.edge_target)
        self.gateway = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.envoy_channel = grpc.aio.insecure_channel(config.envoy_target)
        self.envoy = gateway_pb2_grpc.GatewayServiceStub(self.envoy_channel)
        self.litellm = aiohttp.ClientSession(
            base_url=config.litellm_root or "http://127.0.0.1:9",
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=300, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            headers={"Authorization": f"Bearer {LITELLM_KEY}", "Content-Type": "application/json"},
        )
        self.envoy_http = aiohttp.ClientSession(
            base_url=f"http://{config.envoy_target}",
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=300, ttl_dns_cache=None),
            timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT_S),
            headers={"Authorization": f"Bearer {LOCAL_DEV_KEY}", "Content-Type": "application/json"},
        )
        self.unary_body = orjson.dumps(
            {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": PROMPT}]}
        )
        self.stream_body = orjson.dumps(
            {
                "model": UPSTREAM_MODEL,
                "messages": [{"role": "user", "content": PROMPT}],
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        )
        self.request = common_pb2.ChatRequest(model=EDGE_MODEL)
        self.request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)])
        # Deterministic, so cacheable: every request through the gateway is looked up in the
        # cache (a miss: each prompt is new) and its answer stored.
        self.request.sampling.temperature = 0.0
        self.cached_request = common_pb2.ChatRequest(model=EDGE_MODEL)
        self.cached_request.messages.add(
            role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=PROMPT)]
        )
        self.cached_request.sampling.temperature = 0.0
        self.metadata = (("authorization", f"Bearer {LOCAL_DEV_KEY}"),)
        self._sent = 0

    def _next_request(self) -> common_pb2.ChatRequest:
        """The edge request with a fresh number in its text: distinct prompts, as real traffic
        has, so in-flight dedup does not fold concurrent calls into one."""
        self._sent += 1
        self.request.messages[0].parts[0].text = f"{PROMPT} #{self._sent}"
        return self.request

    async def close(self) -> None:
        """Close the HTTP session and the gRPC channel."""
        await self.http.close()
        await self.envoy_http.close()
        await self.litellm.close()
        await self.channel.close()
        await self.envoy_channel.close()

    async def direct_unary(self) -> int:
        """One JSON chat completion from the simulator; returns its latency."""
        return await self._completion(self.http, self.unary_body, "direct")

    async def edge_unary(self, gateway: gateway_pb2_grpc.GatewayServiceStub | None = None) -> int:
        """One `GatewayService.Chat` call (to the edge, or through `gateway`); returns its latency."""
        start = time.perf_counter_ns()
        response = await (gateway or self.gateway).Chat(
            self._next_request(), metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )
        elapsed = time.perf_counter_ns() - start
        if not response.message.parts or not response.message.parts[0].text:
            raise RuntimeError("edge: empty answer")
        return elapsed

    async def edge_cached(self) -> int:
        """One `GatewayService.Chat` call of the one deterministic question; returns its latency
        (a call the cache did not answer is an error: the phase measures hits)."""
        start = time.perf_counter_ns()
        response = await self.gateway.Chat(
            self.cached_request, metadata=self.metadata, timeout=CALL_TIMEOUT_S
        )
        elapsed = time.perf_counter_ns() - start
        if response.cache_status != common_pb2.CACHE_STATUS_HIT_EXACT:
            raise RuntimeError(f"edge cached: {common_pb2.CacheStatus.Name(response.cache_status)}")
        return elapsed

    async def direct_stream(self) -> tuple[int, int]:
        """One SSE chat completion; returns (time to first text, time to the end)."""
        return await self._sse(self.http, self.stream_body, "direct stream")

    async def edge_stream(
        self, gateway: gateway_pb2_grpc.GatewayServiceStub | None = None
    ) -> tuple[int, int]:
        """One `GatewayService.ChatStream` call (to the edge, or through `gateway`); returns
        (time to first text, time to the end)."""
        start = time.perf_counter_ns()
        first = 0
        async for chunk in (gateway or self.gateway).ChatStream(
            self._next_request(), metadata=self.metadata, timeout=CALL_TIMEOUT_S
        ):
            if not first and chunk.WhichOneof("event") == "delta" and chunk.delta.text:
                first = time.perf_counter_ns() - start
        if not first:
            raise RuntimeError("edge stream: no text")
        return first, time.perf_counter_ns() - start

    async def envoy_unary(self) -> int:
        """One `GatewayService.Chat` call through Envoy's ingress; returns its latency."""
        return await self.edge_unary(self.envoy)

    async def envoy_stream(self) -> tuple[int, int]:
        """One `GatewayService.ChatStream` call through Envoy's ingress."""
        return await self.edge_stream(self.envoy)

    def _openai_body(self, *, stream: bool, model: str = EDGE_MODEL) -> bytes:
        """The OpenAI SDK's JSON for a chat completion, with a fresh prompt (as `_next_request`)."""
        self._sent += 1
        body: dict[str, object] = {
            "model": model,
            "messages": [{"role": "user", "content": f"{PROMPT} #{self._sent}"}],
            "temperature": 0,
        }
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return orjson.dumps(body)

    async def envoy_http_unary(self) -> int:
        """One JSON chat completion through Envoy to the edge's OpenAI front; its latency."""
        return await self._completion(self.envoy_http, self._openai_body(stream=False), "envoy http")

    async def envoy_http_stream(self) -> tuple[int, int]:
        """One SSE chat completion through Envoy to the edge's OpenAI front."""
        return await self._sse(self.envoy_http, self._openai_body(stream=True), "envoy http stream")

    async def litellm_unary(self) -> int:
        """One JSON chat completion through the LiteLLM proxy; its latency."""
        body = self._openai_body(stream=False, model=UPSTREAM_MODEL)
        return await self._completion(self.litellm, body, "litellm")

    async def litellm_stream(self) -> tuple[int, int]:
        """One SSE chat completion through the LiteLLM proxy."""
        body = self._openai_body(stream=True, model=UPSTREAM_MODEL)
        return await self._sse(self.litellm, body, "litellm stream")

    async def _completion(self, session: aiohttp.ClientSession, body: bytes, what: str) -> int:
        """The latency of one JSON chat completion."""
        start = time.perf_counter_ns()
        async with session.post("/v1/chat/completions", data=body) as response:
            answer = await response.read()
            if response.status != 200:
                raise RuntimeError(f"{what}: HTTP {response.status}: {answer[:200]!r}")
        elapsed = time.perf_counter_ns() - start
        if not orjson.loads(answer)["choices"][0]["message"]["content"]:
            raise RuntimeError(f"{what}: empty answer")
        return elapsed

    async def _sse(self, session: aiohttp.ClientSession, body: bytes, what: str) -> tuple[int, int]:
        """(time to first text, time to the end) of one SSE chat completion."""
        start = time.perf_counter_ns()
        first = 0
        async with session.post("/v1/chat/completions", data=body) as response:
            if response.status != 200:
                raise RuntimeError(f"{what}: HTTP {response.status}")
            async for line in response.content:
                if first or not line.startswith(b"data: {"):
                    continue
                choices = orjson.loads(line[6:]).get("choices") or ()
                if choices and choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter_ns() - start
        if not first:
            raise RuntimeError(f"{what}: no text")
        return first, time.perf_counter_ns() - start


async def run_phase(clients: Clients, phase: Phase) -> PhaseResult:
    """Run `phase` to its time or count bound, whichever comes first."""
    result = PhaseResult(phase=phase)
    unary: dict[PathName, Callable[[], Awaitable[int]]] = {
        "direct": clients.direct_unary,
        "edge": clients.edge_cached if phase.mode == "cached" else clients.edge_unary,
        "envoy": clients.envoy_unary,
        "envoy_http": clients.envoy_http_unary,
        "litellm": clients.litellm_unary,
    }
    stream: dict[PathName, Callable[[], Awaitable[tuple[int, int]]]] = {
        "direct": clients.direct_stream,
        "edge": clients.edge_stream,
        "envoy": clients.envoy_stream,
        "envoy_http": clients.envoy_http_stream,
        "litellm": clients.litellm_stream,
    }
    if phase.mode == "idle":
        return await _idle_streams(clients, phase, result)
    issued = 0
    cpu_before = _own_cpu_s()
    started = time.perf_counter()
    deadline = started + phase.duration_s

    async def worker() -> None:
        nonlocal issued
        while issued < phase.max_requests and time.perf_counter() < deadline:
            issued += 1
            try:
                if phase.mode in ("unary", "cached"):
                    result.latencies_ns.append(await unary[phase.path]())
                else:
                    first, total = await stream[phase.path]()
                    result.latencies_ns.append(first)
                    result.totals_ns.append(total)
            except Exception as exc:  # counted and reported, never silently dropped
                result.errors += 1
                if not result.first_error:
                    result.first_error = f"{type(exc).__name__}: {exc}"[:300]

    await asyncio.gather(*(worker() for _ in range(phase.concurrency)))
    result.elapsed_s = time.perf_counter() - started
    result.client_cpu_s = _own_cpu_s() - cpu_before
    return result


async def _idle_streams(clients: Clients, phase: Phase, result: PhaseResult) -> PhaseResult:
    """Open `phase.concurrency` ChatStream calls to the edge, hold them, then cancel them."""
    started = time.perf_counter()
    open_now = 0

    async def hold() -> None:
        nonlocal open_now
        open_now += 1
        try:
            async for _ in clients.gateway.ChatStream(
                clients._next_request(), metadata=clients.metadata, timeout=phase.duration_s + 60
            ):
                continue
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # counted and reported, never silently dropped
            result.errors += 1
            if not result.first_error:
                result.first_error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            open_now -= 1

    tasks = [asyncio.create_task(hold()) for _ in range(phase.concurrency)]
    await asyncio.sleep(phase.duration_s)
    result.open_at_end = open_now
    # Every stream held, one latency entry each: how long it has been open.
    result.latencies_ns = [int((time.perf_counter() - started) * 1e9)] * open_now
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    result.elapsed_s = time.perf_counter() - started
    return result


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def serve(conn: Connection, config: LoadConfig) -> None:
    """Process entry point: pin, build the clients, then run phases until told to stop (None)."""
    if config.core is not None:
        os.sched_setaffinity(0, {config.core})
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        clients = runner.run(_make_clients(config))
        try:
            conn.send(sorted(os.sched_getaffinity(0)))
            while (phase := conn.recv()) is not None:
                conn.send(runner.run(run_phase(clients, phase)))
        finally:
            runner.run(clients.close())
            conn.close()


async def _make_clients(config: LoadConfig) -> Clients:
    return Clients(config)
