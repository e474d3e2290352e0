"""The edge front door's checks before anything is charged, and the failover backoff."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.common.catalog import load_catalog, parse_catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.settings import Settings
from switchyard.edge.admission import AdmissionController
from switchyard.edge.gateway import EdgeGateway, charge_rate_limits
from switchyard.edge.pipeline import BACKOFF_CAP_S, Caller, ChatPipeline, backoff_s
from switchyard.edge.ratelimit import MODEL_TPM, TIER_TPM, LimitCheck, MemoryRateLimiter
from switchyard.ledger.tokens import count_prompt_tokens
from switchyard.v1 import common_pb2

CATALOG = load_catalog()


async def _caller(authorization: str | None) -> Caller:
    return Caller("t")


async def _no_limit(caller: Caller, model: object, tokens: int) -> None:
    return None


def gateway() -> EdgeGateway:
    settings = Settings.from_env({})
    return EdgeGateway(
        CATALOG,
        ChatPipeline(settings, CATALOG, ChannelPool()),
        authenticate=_caller,
        rate_limit=_no_limit,
        admission=AdmissionController(4, max_queue=4, queue_timeout_s=1),
        dedup=None,
    )


def ask(
    model: str = "openai/gpt-4o-mini", text: str = "hi", max_output: int | None = None
) -> common_pb2.ChatRequest:
    request = common_pb2.ChatRequest(model=model)
    request.messages.add(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=text)])
    if max_output is not None:
        request.sampling.max_output_tokens = max_output
    return request


def refused(request: common_pb2.ChatRequest, caller: Caller) -> SwitchyardError:
    with pytest.raises(SwitchyardError) as caught:
        gateway().check(request, caller)
    return caught.value


def test_valid_requests_pass_with_their_model_and_estimate() -> None:
    request = ask("fast", "The quick brown fox jumps over the lazy dog. " * 10)
    admitted = gateway().check(request, Caller("t"))
    assert admitted.model is not None and admitted.model.id == "openai/gpt-4o-mini"
    # Counted with the model's tokenizer (the same count the ledger and budgets use).
    assert admitted.prompt == count_prompt_tokens(request, admitted.model)
    assert 100 <= admitted.prompt.tokens <= 130
    assert gateway().check(ask("auto"), Caller("t")).model is None


def test_a_model_outside_the_key_scope_is_permission_denied() -> None:
    error = refused(ask("smart"), Caller("t", allowed_models=frozenset({"openai/gpt-4o-mini"})))
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED)
    assert error.metadata["model"] == "openai/gpt-4o"


def test_unknown_model_names_the_field() -> None:
    error = refused(ask("nope/none"), Caller("t"))
    assert (error.reason, error.metadata["field"]) == (Reason.INVALID_REQUEST, "model")


def test_context_window_counts_prompt_and_output() -> None:
    text = "word " * 113_000
    prompt = gateway().check(ask(text=text, max_output=1), Caller("t")).prompt.tokens
    room = 128_000 - prompt
    assert 0 < room <= 16_384
    gateway().check(ask(text=text, max_output=room), Caller("t"))  # exactly the window
    error = refused(ask(text=text, max_output=room + 1), Caller("t"))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, Reason.CONTEXT_TOO_LONG)
    assert (error.metadata["prompt_tokens"], error.metadata["max_output_tokens"]) == (
        str(prompt),
        str(room + 1),
    )


def test_images_a_model_bills_at_a_multiple_fill_only_their_standard_size_of_the_window() -> None:
    # gpt-4o-mini bills an image of unknown size at 2,833 + 4 x 5,667 tokens, but it fills the
    # window as gpt-4o's 765 do: five of them and a long answer fit its 128,000 tokens.
    request = ask(max_output=16_000)
    image = common_pb2.ContentPart(image=common_pb2.ImagePart(url="https://example.com/cat.png"))
    request.messages[0].parts.extend([image] * 5)
    admitted = gateway().check(request, Caller("t"))
    assert admitted.prompt.tokens > 5 * 25_000 > 128_000 - 16_000  # billed: would not fit
    assert admitted.prompt.window_tokens < 5 * 800
    # Past the window by what it holds, the request is refused with that count.
    request.messages[0].parts.add(text="word " * 120_000)
    error = refused(request, Caller("t"))
    assert error.reason == Reason.CONTEXT_TOO_LONG
    window = count_prompt_tokens(request, CATALOG.model("openai/gpt-4o-mini")).window_tokens
    assert error.metadata["prompt_tokens"] == str(window)


def test_backoff_grows_is_capped_and_jittered() -> None:
    rng = random.Random(7)
    waits = [backoff_s(n, rng) for n in range(1, 8)]
    assert 0.05 <= waits[0] <= 0.1
    assert 0.1 <= waits[1] <= 0.2
    assert all(BACKOFF_CAP_S / 2 <= w <= BACKOFF_CAP_S for w in waits[5:])
    assert len({round(backoff_s(3), 9) for _ in range(20)}) > 1


class _AnsweringPipeline(ChatPipeline):
    """The pipeline with the vendor replaced by a fixed answer of known usage."""

    def __init__(self, usage: common_pb2.Usage | None) -> None:
        super().__init__(Settings.from_env({}), TPM_CATALOG, ChannelPool())
        self.usage = usage

    async def stream(  # type: ignore[override]
        self, request: common_pb2.ChatRequest, caller: Caller, **_: object
    ) -> AsyncIterator[common_pb2.ChatChunk]:
        yield common_pb2.ChatChunk(delta=common_pb2.Delta(text="ok"))
        if self.usage is None:
            raise SwitchyardError(grpc.StatusCode.UNAVAILABLE, Reason.PROVIDER_UNAVAILABLE, "down")
        yield common_pb2.ChatChunk(usage=self.usage)
        yield common_pb2.ChatChunk(done=common_pb2.Done(request_id=request.request_id))


TPM_CATALOG = parse_catalog(
    """
providers:
  openai: {vendor: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  - {id: openai/m, provider: openai, upstream_model: m, context_window: 8000, max_output_tokens: 1000,
     prices: {input: "1", output: "2"}, tokens_per_minute: 5000}
tiers:
  metered: {requests_per_minute: 100, tokens_per_minute: 1000}
"""
)


@pytest.mark.parametrize(
    ("usage", "used"),
    [(common_pb2.Usage(input_tokens=12, output_tokens=30), 42), (None, 0)],
    ids=["answered", "failed"],
)
async def test_token_limits_are_settled_at_what_the_answer_used(
    usage: common_pb2.Usage | None, used: int
) -> None:
    limiter = MemoryRateLimiter()
    edge = EdgeGateway(
        TPM_CATALOG,
        _AnsweringPipeline(usage),
        authenticate=_caller,
        rate_limit=charge_rate_limits(TPM_CATALOG, limiter),
        admission=AdmissionController(4, max_queue=4, queue_timeout_s=1),
        dedup=None,
    )
    caller = Caller("t", tier="metered")
    request = ask("openai/m", "hello there", max_output=500)

    def remaining(key: str, name: str, rate: int) -> int:
        return limiter.acquire_now([LimitCheck(key=key, name=name, rate=rate, cost=0)]).remaining[name]

    chunks = edge.stream_as(request, caller, timeout_s=5)
    await anext(chunks)
    # While the answer runs, both token limits hold the estimate (prompt + the output cap).
    estimate = edge.check(request, caller).prompt.tokens + 500
    assert remaining("{t}:tpm", TIER_TPM, 1000) == 1000 - estimate
    assert remaining("{t}:model:openai/m:tpm", MODEL_TPM, 5000) == 5000 - estimate
    with contextlib.suppress(SwitchyardError):
        async for _ in chunks:
            pass
    for _ in range(10):
        await asyncio.sleep(0)
    assert remaining("{t}:tpm", TIER_TPM, 1000) == 1000 - used
    assert remaining("{t}:model:openai/m:tpm", MODEL_TPM, 5000) == 5000 - used
