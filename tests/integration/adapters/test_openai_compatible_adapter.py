"""Every OpenAI-compatible preset through a real gRPC adapter in front of the simulator.

The shared table (`test_adapter_table.py`) runs one preset (together); here one adapter
serves one provider per preset (`base_url` = the simulator's `/<preset>/v1`, `options`
= `{"preset": ...}`) and the streaming, usage, tool-call, refusal and error checks run
for each: what differs is where each server puts usage, which max-tokens field it
honours, which features it lacks and how its errors look.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import orjson
import pytest

from switchyard.adapters.service import ProviderAdapterServicer, build_adapter
from switchyard.common.catalog import parse_catalog
from switchyard.common.errors import Reason
from switchyard.common.server import SERVER_OPTIONS, ErrorInterceptor
from switchyard.sim.faults import start_simulator
from switchyard.sim.openai_compatible import PRESETS, REASONING_TEXT, preset_base_url
from switchyard.v1 import common_pb2, provider_pb2, provider_pb2_grpc

from .conftest import SIM_KEY, WRONG_KEY, SimHandle
from .support import (
    ANSWER,
    WEATHER,
    assert_clean,
    assert_well_formed,
    collect,
    failure,
    kinds,
    request,
    text_of,
)

# Where each preset reports cached and reasoning tokens (the others report none).
REPORTS_CACHED = {"groq", "xai", "deepseek", "vllm", "generic"}
REPORTS_REASONING = {"groq", "xai", "deepseek", "generic"}
MAX_TOKENS_FIELD = {"groq": "max_completion_tokens", "xai": "max_completion_tokens"}
STREAM_OPTIONS = {"groq": None, "together": None}


def provider(preset: str, suffix: str = "") -> str:
    return f"compat-{preset}{suffix}"


@dataclass
class CompatEnv:
    sim: SimHandle
    stub: provider_pb2_grpc.ProviderAdapterServiceStub
    servicer: ProviderAdapterServicer


def catalog(root: str) -> str:
    providers: dict[str, Any] = {}
    models: list[dict[str, Any]] = []
    timeouts = {"connect_ms": 2000, "first_byte_ms": 5000, "idle_ms": 5000}
    for preset in PRESETS:
        for suffix in ("", "-badkey"):
            name = provider(preset, suffix)
            providers[name] = {
                "vendor": "openai_compatible",
                "base_url": preset_base_url(root, preset),
                "timeouts": timeouts,
                "options": {"preset": preset},
            }
            models.append(
                {
                    "id": f"{name}/model",
                    "provider": name,
                    "upstream_model": f"{preset}-model",
                    "context_window": 32000,
                    "max_output_tokens": 4096,
                    "prices": {"input": "1", "output": "2"},
                }
            )
    return orjson.dumps({"providers": providers, "models": models}).decode()


def keys() -> dict[str, str]:
    environ = {}
    for preset in PRESETS:
        for suffix, key in (("", SIM_KEY), ("-badkey", WRONG_KEY)):
            env_name = provider(preset, suffix).upper().replace("-", "_")
            environ[f"SWITCHYARD_PROVIDER_{env_name}_API_KEY"] = key
    return environ


@pytest.fixture(scope="module")
async def compat_env() -> AsyncIterator[CompatEnv]:
    sim = await start_simulator("openai_compatible", port=0, api_key=SIM_KEY)
    control = httpx.AsyncClient(base_url=sim.root_url, timeout=5.0)
    servicer = build_adapter(parse_catalog(catalog(sim.root_url)), "openai_compatible", keys())
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=SERVER_OPTIONS)
    provider_pb2_grpc.add_ProviderAdapterServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield CompatEnv(
            SimHandle(sim, control), provider_pb2_grpc.ProviderAdapterServiceStub(channel), servicer
        )
    finally:
        await channel.close()
        await server.stop(grace=None)
        await servicer.aclose()
        await control.aclose()
        await sim.close()


@pytest.fixture
async def env(compat_env: CompatEnv) -> CompatEnv:
    await compat_env.sim.reset()
    return compat_env


def ask(preset: str, suffix: str = "", **chat: Any) -> provider_pb2.GenerateRequest:
    return request(provider(preset, suffix), f"{preset}-model", **chat)


# --------------------------------------------------------------------------- #
# success paths
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("preset", PRESETS)
async def test_stream_text_reasoning_and_usage(env: CompatEnv, preset: str) -> None:
    await env.sim.knobs(text=ANSWER, chunks=4, cached_tokens=3, reasoning_tokens=2)
    events = await collect(env.stub, ask(preset))
    assert_well_formed(events)
    assert text_of(events) == ANSWER
    reasoning = "".join(e.delta.reasoning_text for e in events if e.HasField("delta"))
    # The generic server is OpenAI's simulator, which streams no reasoning text.
    assert reasoning == ("" if preset == "generic" else REASONING_TEXT)
    usage = events[-2].usage
    assert not usage.estimated
    assert usage.input_tokens > 3
    assert usage.output_tokens == math.ceil(len(ANSWER) / 4) + 2
    assert usage.cached_input_tokens == (3 if preset in REPORTS_CACHED else 0)
    assert usage.reasoning_tokens == (2 if preset in REPORTS_REASONING else 0)
    done = events[-1].done
    assert done.finish_reason == common_pb2.FINISH_REASON_STOP
    assert done.vendor_model == f"{preset}-model" and done.vendor_request_id
    if preset in ("groq", "generic", "together"):
        assert done.headroom.HasField("remaining_requests")
    else:
        assert not done.HasField("headroom")


@pytest.mark.parametrize("preset", PRESETS)
async def test_request_body_and_output_cap(env: CompatEnv, preset: str) -> None:
    sampling = common_pb2.SamplingParams(max_output_tokens=3, temperature=0.3)
    events = await collect(env.stub, ask(preset, sampling=sampling))
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_LENGTH  # the server honoured the cap
    assert 0 < len(text_of(events)) <= 12
    sent = (await env.sim.stats())["last_request"]
    field = MAX_TOKENS_FIELD.get(preset, "max_tokens")
    assert sent[field] == 3 and {"max_tokens", "max_completion_tokens"} & set(sent) == {field}
    assert sent["stream"] is True
    assert sent.get("stream_options") == STREAM_OPTIONS.get(preset, {"include_usage": True})
    assert sent["temperature"] == 0.3


@pytest.mark.parametrize("preset", PRESETS)
async def test_tool_call(env: CompatEnv, preset: str) -> None:
    await env.sim.knobs(chunks=5, tool_call=True)
    mode = common_pb2.TOOL_CHOICE_MODE_AUTO if preset == "ollama" else common_pb2.TOOL_CHOICE_MODE_REQUIRED
    events = await collect(
        env.stub, ask(preset, tools=[WEATHER], tool_choice=common_pb2.ToolChoice(mode=mode))
    )
    assert_well_formed(events)
    calls = [call for e in events if e.HasField("delta") for call in e.delta.tool_calls]
    assert calls[0].name == "get_weather" and calls[0].id
    assert all(call.index == 0 for call in calls)
    assert all(not call.id and not call.name for call in calls[1:])
    assert len(calls) == (1 if preset == "ollama" else 6)  # Ollama sends a call whole
    assert orjson.loads("".join(call.arguments_fragment for call in calls)) == {"city": "example", "days": 1}
    assert events[-1].done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    sent = (await env.sim.stats())["last_request"]
    assert sent.get("tool_choice") == (None if preset == "ollama" else "required")


@pytest.mark.parametrize("preset", PRESETS)
async def test_probe_lists_models(env: CompatEnv, preset: str) -> None:
    ok = await env.stub.Probe(provider_pb2.ProbeRequest(provider=provider(preset)), timeout=10)
    assert ok.ok and not ok.error_reason
    assert (await env.sim.stats())["requests"] == 0  # GET /models is not a chat request


# --------------------------------------------------------------------------- #
# refusals
# --------------------------------------------------------------------------- #

_IMAGE_URL = common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://example.com/cat.png"))
_USER = common_pb2.ROLE_USER


@pytest.mark.parametrize(
    ("preset", "chat", "field"),
    [
        (
            "groq",
            {"messages": [common_pb2.Message(role=_USER, name="ada", parts=[_IMAGE_URL])]},
            "messages[0].name",
        ),
        (
            "deepseek",
            {"messages": [common_pb2.Message(role=_USER, parts=[_IMAGE_URL])]},
            "messages[0].parts[0].image",
        ),
        (
            "ollama",
            {"messages": [common_pb2.Message(role=_USER, parts=[_IMAGE_URL])]},
            "messages[0].parts[0].image.url",
        ),
        (
            "ollama",
            {
                "tools": [WEATHER],
                "tool_choice": common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED),
            },
            "tool_choice.mode",
        ),
        (
            "llamacpp",
            {
                "tools": [WEATHER],
                "tool_choice": common_pb2.ToolChoice(
                    mode=common_pb2.TOOL_CHOICE_MODE_TOOL, tool_name="get_weather"
                ),
            },
            "tool_choice.mode",
        ),
        ("together", {"metadata": common_pb2.RequestMetadata(end_user="u-1")}, "metadata.end_user"),
        ("vllm", {"metadata": common_pb2.RequestMetadata(end_user="u-1")}, "metadata.end_user"),
        ("deepseek", {"sampling": common_pb2.SamplingParams(seed=7)}, "sampling.seed"),
    ],
)
async def test_unsupported_feature_never_reaches_the_server(
    env: CompatEnv, preset: str, chat: dict[str, Any], field: str
) -> None:
    error, received = await failure(env.stub, ask(preset, **chat))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_REQUEST)
    assert error.metadata["field"] == field and received == []
    assert (await env.sim.stats())["requests"] == 0


async def test_features_a_preset_has_are_sent(env: CompatEnv) -> None:
    # what the refusals above refuse elsewhere reaches these servers and is honoured
    await collect(env.stub, ask("xai", metadata=common_pb2.RequestMetadata(end_user="u-1")))
    assert (await env.sim.stats())["last_request"]["user"] == "u-1"
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(data=b"\x89PNG", mime_type="image/png"))
    events = await collect(env.stub, ask("ollama", messages=[common_pb2.Message(role=_USER, parts=[image])]))
    assert text_of(events)
    await collect(env.stub, ask("groq", sampling=common_pb2.SamplingParams(seed=7)))
    assert (await env.sim.stats())["last_request"]["seed"] == 7


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("preset", PRESETS)
async def test_context_overflow(env: CompatEnv, preset: str) -> None:
    await env.sim.knobs(status=400, error_code="context_length_exceeded")
    error, received = await failure(env.stub, ask(preset))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG)
    assert received == [] and error.metadata["http_status"] == "400"
    assert_clean(error)
    assert "maximum" not in error.message and "context length is" not in str(error.metadata)


@pytest.mark.parametrize("preset", PRESETS)
async def test_wrong_key(env: CompatEnv, preset: str) -> None:
    if preset == "ollama":  # no authentication: the key is not even sent
        assert text_of(await collect(env.stub, ask(preset, "-badkey")))
        return
    error, _ = await failure(env.stub, ask(preset, "-badkey"))
    assert (error.code, error.reason) == (grpc.StatusCode.FAILED_PRECONDITION, Reason.AUTH_FAILED)
    assert error.metadata["http_status"] == ("400" if preset == "xai" else "401")
    assert_clean(error)


@pytest.mark.parametrize("preset", PRESETS)
async def test_rate_limit_and_overload(env: CompatEnv, preset: str) -> None:
    await env.sim.knobs(status=429, retry_after_s=4)
    error, _ = await failure(env.stub, ask(preset))
    assert (error.code, error.reason, error.retry_after_s) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        4.0,
    )
    assert_clean(error)
    await env.sim.knobs(status=503)
    error, _ = await failure(env.stub, ask(preset))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_OVERLOADED)


async def test_vendor_only_statuses(env: CompatEnv) -> None:
    await env.sim.knobs(status=402)
    error, _ = await failure(env.stub, ask("deepseek"))
    assert (error.code, error.reason, error.metadata["quota"]) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        Reason.RATE_LIMITED,
        "exhausted",
    )
    assert error.retry_after_s is None
    await env.sim.knobs(status=498)
    error, _ = await failure(env.stub, ask("groq"))
    assert (error.code, error.reason, error.metadata["vendor_code"]) == (
        grpc.StatusCode.UNAVAILABLE,
        Reason.PROVIDER_OVERLOADED,
        "capacity_exceeded",
    )


@pytest.mark.parametrize("preset", PRESETS)
async def test_mid_stream_errors(env: CompatEnv, preset: str) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, error_after_chunks=3, status=500)
    error, received = await failure(env.stub, ask(preset))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE)
    assert error.metadata["in_stream"] == "true"
    assert set(kinds(received)) <= {"delta"} and ANSWER.startswith(text_of(received))
    assert_clean(error)
    if preset == "ollama":
        return  # Ollama's errors carry no code or status: an in-stream rate limit reads as a failure
    await env.sim.knobs(chunks=6, error_after_chunks=2, status=429)
    error, _ = await failure(env.stub, ask(preset))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, Reason.RATE_LIMITED)
    assert error.metadata["in_stream"] == "true"


async def test_malformed_event(env: CompatEnv) -> None:
    await env.sim.knobs(text=ANSWER, chunks=6, malformed_after_chunks=2)
    error, _ = await failure(env.stub, ask("vllm"))
    assert error.reason == Reason.UPSTREAM_PROTOCOL_ERROR


def test_unknown_option_fails_at_adapter_start() -> None:
    bad = orjson.dumps(
        {
            "providers": {
                "local": {
                    "vendor": "openai_compatible",
                    "base_url": "http://127.0.0.1:1/v1",
                    "options": {"preset": "ollama", "usage_in": "final"},
                }
            },
            "models": [],
        }
    ).decode()
    with pytest.raises(ValueError, match="'local': unknown option\\(s\\) usage_in"):
        build_adapter(parse_catalog(bad), "openai_compatible", {})
