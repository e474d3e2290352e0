"""`ProviderClient`'s transport against small loopback servers: how request paths join the
base URL, the connect and pool deadlines, undecodable bodies, connection reuse and the
HTTP/2 (httpx) transport. The vendor behaviour itself is covered by the adapter tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.base import ProviderClient, _AiohttpTransport, _HttpxTransport, env_proxy, join_url
from switchyard.adapters.vendors import load_translator
from switchyard.common.catalog import Provider, Timeouts
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.sim.faults import start_simulator
from switchyard.v1 import common_pb2, provider_pb2

KEY = "sk-provider-client-test"
MODEL = "gpt-4o-mini"


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }
    return b"data: " + orjson.dumps(body) + b"\n\n"


FIRST_EVENT = chunk({"role": "assistant", "content": "Hello"})
STREAM = (
    FIRST_EVENT
    + chunk({}, "stop")
    + chunk({}, None, choices=[], usage={"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4})
    + b"data: [DONE]\n\n"
)
SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"

Reply = Callable[[str, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]]


class RawServer:
    """A loopback HTTP/1.1 server: `reply(target, reader, writer)` answers each request and
    says whether the connection stays open. Counts connections, records request targets and
    notes when a connection ends."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.targets: list[str] = []
        self.connections = 0
        self.disconnected = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
                lines = head.split("\r\n")
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        await reader.readexactly(int(value))
                self.targets.append(lines[0].split(" ")[1])
                if not await self.reply(self.targets[-1], reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.disconnected.set()
            writer.close()
            self._tasks.discard(task)


@contextlib.asynccontextmanager
async def raw_server(reply: Reply) -> AsyncIterator[tuple[RawServer, str]]:
    server = RawServer(reply)
    url = await server.start()
    try:
        yield server, url
    finally:
        await server.close()


def provider_client(
    base_url: str, vendor: str = "openai", *, max_connections: int = 10, http2: bool = False, **timeouts: int
) -> ProviderClient:
    provider = Provider(
        vendor=vendor,
        base_url=base_url,
        max_connections=max_connections,
        http2=http2,
        timeouts=Timeouts(**{"connect_ms": 2000, "first_byte_ms": 5000, "idle_ms": 5000, **timeouts}),
    )
    translator = load_translator(vendor)("test", provider, KEY)
    return ProviderClient("test", provider, translator, base_url=base_url)


def ask(model: str = MODEL) -> provider_pb2.GenerateRequest:
    message = common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text="Hi")])
    return provider_pb2.GenerateRequest(
        request=common_pb2.ChatRequest(messages=[message]), provider="test", upstream_model=model
    )


async def collect(client: ProviderClient) -> list[provider_pb2.GenerateResponse]:
    return [event async for event in client.generate(ask())]


async def failure(client: ProviderClient) -> SwitchyardError:
    with pytest.raises(SwitchyardError) as caught:
        await collect(client)
    return caught.value


async def write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


def chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --------------------------------------------------------------------------- #
# URL joining
# --------------------------------------------------------------------------- #

BASES = (
    "http://127.0.0.1:8080/v1",
    "http://127.0.0.1:8080/v1/",
    "http://127.0.0.1:8080",
    "https://generativelanguage.googleapis.com/v1beta",
    "http://127.0.0.1:8080/generic/v1/../../together/v1",
    "http://127.0.0.1:8080/a b/%7Euser/v1",
)
PATHS = (
    "/chat/completions",
    "chat/completions",
    "/models?pageSize=1",
    "/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
    "/tunedModels/my-model.v2:streamGenerateContent?alt=sse",
    "/a/./b/../c?x=1/2:3@4&y=a b",
)


@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("path", PATHS)
def test_join_url_is_httpx_base_url_joining(base: str, path: str) -> None:
    expected = httpx.Client(base_url=base).build_request("GET", path).url
    assert join_url(base, path) == str(expected)


def test_join_url_keeps_the_prefix_and_the_query() -> None:
    joined = join_url("http://h:1/prefix/v1beta", "/models/gemini-2.5-flash:streamGenerateContent?alt=sse")
    assert joined == "http://h:1/prefix/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert join_url("http://h:1/generic/v1/../../together/v1", "/chat/completions") == (
        "http://h:1/together/v1/chat/completions"
    )


async def test_requests_reach_the_joined_path_with_its_query() -> None:
    async def reply(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await write(writer, b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        return True

    async with raw_server(reply) as (server, url):
        for http2 in (False, True):
            client = provider_client(f"{url}/prefix/v1beta", "gemini", http2=http2)
            try:
                error = await failure(client)
                assert error.reason == Reason.NOT_FOUND
                assert (await client.probe()).ok is False
            finally:
                await client.aclose()
        assert server.targets == 2 * [
            "/prefix/v1beta/models/gpt-4o-mini:streamGenerateContent?alt=sse",
            "/prefix/v1beta/models?pageSize=1",
        ]


# --------------------------------------------------------------------------- #
# Lifecycle, keep-alive and closing
# --------------------------------------------------------------------------- #


def test_built_outside_an_event_loop() -> None:
    client = provider_client("http://127.0.0.1:9/v1")
    assert isinstance(client._http, _AiohttpTransport)
    assert isinstance(provider_client("http://127.0.0.1:9/v1", http2=True)._http, _HttpxTransport)


async def test_aclose_without_a_request() -> None:
    client = provider_client("http://127.0.0.1:9/v1")
    await client.aclose()
    await client.aclose()


async def test_a_finished_stream_returns_its_connection_to_the_pool() -> None:
    async def reply(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await write(writer, SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(STREAM) + b"0\r\n\r\n")
        return True

    async with raw_server(reply) as (server, url):
        client = provider_client(f"{url}/v1")
        try:
            for _ in range(3):
                events = await collect(client)
                assert [e.WhichOneof("event") for e in events] == ["delta", "usage", "done"]
        finally:
            await client.aclose()
        assert server.connections == 1
        assert server.targets == 3 * ["/v1/chat/completions"]


async def test_pool_exhaustion_is_overloaded_and_closing_frees_the_connection() -> None:
    async def reply(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        if len(server.targets) == 1:  # the first stream starts, then stalls
            await write(writer, SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(FIRST_EVENT))
            await reader.read()  # until the client closes the connection
            return False
        await write(writer, SSE_HEAD + b"content-length: %d\r\n\r\n" % len(STREAM) + STREAM)
        return True

    async with raw_server(reply) as (server, url):
        client = provider_client(f"{url}/v1", max_connections=1, connect_ms=200)
        try:
            first = client.generate(ask())
            assert (await anext(first)).delta.text == "Hello"
            started = time.monotonic()
            error = await failure(client)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.OVERLOADED)
            assert error.metadata["phase"] == "first_byte"
            assert 0.15 < time.monotonic() - started < 1.5
            # The caller goes away: the upstream connection closes at once, and the pool
            # has room again.
            await first.aclose()
            await asyncio.wait_for(server.disconnected.wait(), 1.0)
            assert [e.WhichOneof("event") for e in await collect(client)] == ["delta", "usage", "done"]
        finally:
            await client.aclose()
        assert server.connections == 2


@contextlib.contextmanager
def unanswered_listener() -> Iterator[int]:
    """A port whose accept queue is full, so a new connection hangs in its handshake."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.05)
        probe = socket.socket()
        probe.settimeout(0.3)
        try:
            probe.connect(("127.0.0.1", port))
        except TimeoutError:
            pass
        else:
            pytest.skip("this kernel completes handshakes beyond the listen backlog")
        finally:
            probe.close()
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_connect_timeout(http2: bool) -> None:
    with unanswered_listener() as port:
        client = provider_client(f"http://127.0.0.1:{port}/v1", http2=http2, connect_ms=200)
        try:
            started = time.monotonic()
            error = await failure(client)
        finally:
            await client.aclose()
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT)
    assert error.metadata["phase"] == "connect"
    assert time.monotonic() - started < 1.5


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_connection_refused(http2: bool) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = provider_client(f"http://127.0.0.1:{port}/v1", http2=http2)
    try:
        error = await failure(client)
        probe = await client.probe()
    finally:
        await client.aclose()
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["phase"] == "connect"
    assert str(port) not in error.message
    assert (probe.ok, probe.error_reason) == (False, Reason.PROVIDER_UNAVAILABLE.value)


# --------------------------------------------------------------------------- #
# Undecodable and broken bodies
# --------------------------------------------------------------------------- #


def gzip_prefix(data: bytes) -> bytes:
    """A gzip stream of `data`, flushed so it decodes so far, but not finished."""
    compressor = zlib.compressobj(wbits=31)
    return compressor.compress(data) + compressor.flush(zlib.Z_SYNC_FLUSH)


# content type, body parts (sent 50 ms apart), the phase the failure is seen in
BAD_BODIES = {
    "stream_not_gzip": (b"text/event-stream", [b"this is not gzip at all"], "first_byte"),
    "json_not_gzip": (b"application/json", [b"this is not gzip at all"], "first_byte"),
    "stream_corrupt_after_first_event": (
        b"text/event-stream",
        [gzip_prefix(FIRST_EVENT), b"\xff" * 64],
        "stream",
    ),
}


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_undecodable_body_is_a_protocol_error(case: str, http2: bool) -> None:
    content_type, parts, phase = BAD_BODIES[case]

    async def reply(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = b"HTTP/1.1 200 OK\r\ncontent-type: %s\r\ncontent-encoding: gzip\r\n" % content_type
        await write(writer, head + b"transfer-encoding: chunked\r\n\r\n")
        for part in parts:
            await write(writer, chunked(part))
            await asyncio.sleep(0.05)
        await reader.read()  # never finish the body
        return False

    async with raw_server(reply) as (_, url):
        client = provider_client(f"{url}/v1", http2=http2)
        try:
            received: list[provider_pb2.GenerateResponse] = []
            with pytest.raises(SwitchyardError) as caught:
                async for event in client.generate(ask()):
                    received.append(event)
        finally:
            await client.aclose()
    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.UPSTREAM_PROTOCOL_ERROR)
    assert error.metadata["phase"] == phase
    assert [event.delta.text for event in received] == (["Hello"] if phase == "stream" else [])


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_connection_lost_mid_stream(http2: bool) -> None:
    async def reply(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        await write(writer, SSE_HEAD + b"transfer-encoding: chunked\r\n\r\n" + chunked(FIRST_EVENT))
        await asyncio.sleep(0.05)
        return False

    async with raw_server(reply) as (_, url):
        client = provider_client(f"{url}/v1", http2=http2)
        try:
            error = await failure(client)
        finally:
            await client.aclose()
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.message.endswith("the connection was lost")
    assert error.metadata["phase"] == "stream"


async def test_oversized_error_body_is_read_only_up_to_the_cap() -> None:
    async def reply(target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        head = b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: application/json\r\n"
        await write(writer, head + b"content-length: 100000000\r\n\r\n" + b"x" * 200_000)
        await reader.read()  # never finish the body
        return False

    async with raw_server(reply) as (server, url):
        client = provider_client(f"{url}/v1", first_byte_ms=2000)
        try:
            started = time.monotonic()
            error = await failure(client)
            await asyncio.wait_for(server.disconnected.wait(), 1.0)
        finally:
            await client.aclose()
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert time.monotonic() - started < 1.5


# --------------------------------------------------------------------------- #
# HTTP/2 providers (httpx) speak to the simulator like the default transport
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("http2", [False, True], ids=["aiohttp", "httpx"])
async def test_both_transports_stream_from_the_simulator(http2: bool) -> None:
    sim = await start_simulator("openai", port=0, api_key=KEY)
    client = provider_client(sim.base_url, http2=http2)
    try:
        events = await collect(client)
        assert [e.WhichOneof("event") for e in events][-2:] == ["usage", "done"]
        assert events[-1].done.headroom.HasField("remaining_requests")
        assert (await client.probe()).ok
        embedded = await client.embed(
            provider_pb2.EmbedRequest(provider="test", upstream_model="text-embedding-3-small", inputs=["a"])
        )
        assert len(embedded.embeddings) == 1
    finally:
        await client.aclose()
        await sim.close()


@pytest.mark.parametrize(
    ("base_url", "environ", "expected"),
    [
        ("https://api.openai.com/v1", {}, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://proxy:3128"}, "http://proxy:3128"),
        (
            "https://api.openai.com/v1",
            {"https_proxy": "http://p:1", "HTTPS_PROXY": "http://q:2"},
            "http://p:1",
        ),
        ("http://10.0.0.5:8000/v1", {"HTTPS_PROXY": "http://proxy:3128"}, None),
        ("http://10.0.0.5:8000/v1", {"ALL_PROXY": "http://proxy:3128"}, "http://proxy:3128"),
        (
            "https://api.openai.com/v1",
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "localhost,.openai.com"},
            None,
        ),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p:1", "no_proxy": "*"}, None),
        ("https://api.openai.com/v1", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "openai.co"}, "http://p:1"),
    ],
)
def test_the_environments_proxy_is_read_once_as_httpx_reads_it(
    base_url: str, environ: dict[str, str], expected: str | None
) -> None:
    assert env_proxy(base_url, environ) == expected
