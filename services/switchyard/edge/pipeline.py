"""The edge's request pipeline: one code path behind every skin (gRPC stream, gRPC unary).

For each request: validate, plan, then walk the plan (at most three candidates) calling the
vendor's adapter. A failure before the first token moves to the next candidate; after it,
the stream ends with STREAM_INTERRUPTED and no text is ever repeated. The last events are
the usage and a `done` carrying the cost in micro-USD.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import grpc

from switchyard.common.catalog import Catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error
from switchyard.common.logging import get_logger
from switchyard.common.money import TokenCounts, cost_micros
from switchyard.common.settings import Settings
from switchyard.router.plan import plan_route
from switchyard.router.service import candidate_proto
from switchyard.v1 import (
    common_pb2,
    gateway_pb2,
    provider_pb2,
    provider_pb2_grpc,
    router_pb2,
)

log = get_logger(__name__)

# Failures worth trying the next candidate for, besides the retryable ones: another
# provider may hold a working key or still serve the model.
_FAILOVER_REASONS = frozenset({Reason.AUTH_FAILED, Reason.NOT_FOUND})


MAX_ATTEMPTS = 3
# Backoff before retrying a candidate that already failed: base * 2^(n-1), capped, with jitter.
BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 2.0
# A vendor's retry-after longer than this is not waited for (the candidate is skipped).
MAX_RETRY_WAIT_S = 5.0
_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is asking, as the edge established it."""

    tenant_id: str
    allowed_models: frozenset[str] | None = None
    tier: str = "free"
    key_prefix: str = ""
    admin: bool = False


def backoff_s(retry: int, rng: random.Random | None = None) -> float:
    """The wait before the `retry`-th retry of one candidate (1-based): exponential, capped,
    with jitter in [50 %, 100 %] so callers that failed together do not retry together."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (retry - 1))
    jitter: float = (rng or _RNG).uniform(0.5, 1.0)
    return ceiling * jitter


@dataclass(slots=True)
class _Attempt:
    number: int
    model: str
    provider: str
    started: float = field(default_factory=time.monotonic)
    error: SwitchyardError | None = None

    def summary(self) -> common_pb2.AttemptSummary:
        return common_pb2.AttemptSummary(
            attempt=self.number,
            model=self.model,
            provider=self.provider,
            error_reason=self.error.reason.value if self.error else "",
            latency_ms=int((time.monotonic() - self.started) * 1000),
        )


class ChatPipeline:
    """Runs chat requests end to end; shared by every method that answers a chat."""

    def __init__(self, settings: Settings, catalog: Catalog, channels: ChannelPool) -> None:
        self._settings = settings
        self._catalog = catalog
        self._channels = channels

    def plan(self, request: common_pb2.ChatRequest, caller: Caller) -> list[router_pb2.Candidate]:
        """The candidates to try, planned here with the router's own plan library.

        Planning costs no network hop: the edge evaluates `plan_route` on the routing state
        it holds (today the catalog it loaded; the router's pushed snapshots with health and
        rules, issue #5). The caller's allowed models (its key's scope within its tenant's)
        filter the plan.
        """
        plan = plan_route(self._catalog, request.model, allowed_models=caller.allowed_models)
        return [candidate_proto(c) for c in plan]

    async def stream(
        self, request: common_pb2.ChatRequest, caller: Caller, *, timeout_s: float | None
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The answer as chunks: routing, deltas, usage, done. Raises SwitchyardError.

        The request has been validated by the caller (`edge.gateway`). At most three attempts
        walk the plan; a retryable failure before the first token moves to the next
        candidate, and once every candidate has been tried, a failed one is tried again
        after an exponential backoff with jitter, or after the vendor's `retry-after` when
        that fits the deadline.
        """
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        deadline = time.monotonic() + min(
            timeout_s or self._settings.generate_timeout_s, self._settings.generate_timeout_s
        )
        queue = self.plan(request, caller)
        attempts: list[_Attempt] = []
        retries: dict[tuple[str, str], int] = {}
        while queue and len(attempts) < MAX_ATTEMPTS:
            candidate = queue.pop(0)
            key = (candidate.model, candidate.provider)
            previous = next((a.error for a in reversed(attempts) if (a.model, a.provider) == key), None)
            if previous is not None:
                retries[key] = retries.get(key, 0) + 1
                wait = max(backoff_s(retries[key]), previous.retry_after_s or 0.0)
                if wait > MAX_RETRY_WAIT_S or time.monotonic() + wait >= deadline:
                    continue
                await asyncio.sleep(wait)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            number = len(attempts) + 1
            attempt = _Attempt(number, candidate.model, candidate.provider)
            attempts.append(attempt)
            yield common_pb2.ChatChunk(
                routing=common_pb2.RoutingInfo(
                    model=candidate.model,
                    provider=candidate.provider,
                    attempt=number,
                    reason=candidate.reason,
                )
            )
            sent_text = False
            usage: common_pb2.Usage | None = None
            finish = common_pb2.FINISH_REASON_UNSPECIFIED
            call = self._adapter(candidate.vendor).Generate(
                provider_pb2.GenerateRequest(
                    request=request, provider=candidate.provider, upstream_model=candidate.upstream_model
                ),
                timeout=remaining,
            )
            try:
                async for event in call:
                    kind = event.WhichOneof("event")
                    if kind == "delta":
                        sent_text = True
                        yield common_pb2.ChatChunk(delta=event.delta)
                    elif kind == "usage":
                        usage = event.usage
                    elif kind == "done":
                        finish = event.done.finish_reason
            except grpc.aio.AioRpcError as exc:
                attempt.error = from_rpc_error(exc)
                log.info(
                    "attempt_failed",
                    request_id=request.request_id,
                    model=candidate.model,
                    provider=candidate.provider,
                    attempt=number,
                    reason=attempt.error.reason.value,
                    after_first_token=sent_text,
                )
                if sent_text:
                    raise SwitchyardError(
                        grpc.StatusCode.UNAVAILABLE,
                        Reason.STREAM_INTERRUPTED,
                        "the provider failed after the answer had started; no text was repeated",
                        metadata={
                            "model": candidate.model,
                            "provider": candidate.provider,
                            "cause": attempt.error.reason.value,
                        },
                    ) from None
                if not (attempt.error.retryable or attempt.error.reason in _FAILOVER_REASONS):
                    raise attempt.error from None
                if attempt.error.retryable:
                    queue.append(candidate)  # tried again once the others have had their turn
                continue
            finally:
                call.cancel()
            yield common_pb2.ChatChunk(usage=usage or common_pb2.Usage(estimated=True))
            yield common_pb2.ChatChunk(
                done=common_pb2.Done(
                    finish_reason=finish,
                    cost_micros=self._cost(candidate.model, usage),
                    cache_status=common_pb2.CACHE_STATUS_BYPASS,
                    request_id=request.request_id,
                    attempts=[a.summary() for a in attempts],
                )
            )
            return
        raise _all_failed(attempts)

    def _adapter(self, vendor: str) -> provider_pb2_grpc.ProviderAdapterServiceStub:
        return provider_pb2_grpc.ProviderAdapterServiceStub(
            self._channels.get(self._settings.adapter_target(vendor))
        )

    def _cost(self, model_id: str, usage: common_pb2.Usage | None) -> int:
        model = self._catalog.model(model_id)
        if model is None or usage is None:
            return 0
        tokens = TokenCounts(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            cache_write_input_tokens=usage.cache_write_input_tokens,
        )
        return cost_micros(tokens, model.prices.unit_prices())


def _all_failed(attempts: list[_Attempt]) -> SwitchyardError:
    """One error that lists every attempt (model, provider, reason)."""
    if len(attempts) == 1 and attempts[0].error is not None:
        return attempts[0].error
    metadata = {
        f"attempt_{a.number}": f"{a.model}@{a.provider}: {a.error.reason.value if a.error else 'TIMEOUT'}"
        for a in attempts
    }
    waits = [a.error.retry_after_s for a in attempts if a.error and a.error.retry_after_s is not None]
    if not attempts:
        return SwitchyardError(
            grpc.StatusCode.DEADLINE_EXCEEDED, Reason.TIMEOUT, "the deadline passed before any attempt"
        )
    return SwitchyardError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.ALL_ATTEMPTS_FAILED,
        f"all {len(attempts)} attempts failed",
        metadata=metadata,
        retry_after_s=min(waits) if waits else None,
    )


async def collect(chunks: AsyncIterator[common_pb2.ChatChunk]) -> gateway_pb2.ChatResponse:
    """Fold a chunk stream into one ChatResponse (text joined, tool calls reassembled)."""
    response = gateway_pb2.ChatResponse()
    text: list[str] = []
    calls: dict[int, common_pb2.ToolCall] = {}
    arguments: dict[int, list[str]] = {}
    async for chunk in chunks:
        kind = chunk.WhichOneof("event")
        if kind == "routing":
            response.routing.CopyFrom(chunk.routing)
        elif kind == "delta":
            text.append(chunk.delta.text)
            for fragment in chunk.delta.tool_calls:
                call = calls.setdefault(fragment.index, common_pb2.ToolCall())
                if fragment.id:
                    call.id = fragment.id
                if fragment.name:
                    call.name = fragment.name
                arguments.setdefault(fragment.index, []).append(fragment.arguments_fragment)
        elif kind == "usage":
            response.usage.CopyFrom(chunk.usage)
        elif kind == "done":
            done = chunk.done
            response.request_id = done.request_id
            response.finish_reason = done.finish_reason
            response.cost_micros = done.cost_micros
            response.cache_status = done.cache_status
            response.saved_micros = done.saved_micros
            response.cache_similarity = done.cache_similarity
            response.attempts.extend(done.attempts)
    message = response.message
    message.role = common_pb2.ROLE_ASSISTANT
    joined = "".join(text)
    if joined:
        message.parts.add(text=joined)
    for index in sorted(calls):
        call = calls[index]
        call.arguments_json = "".join(arguments.get(index, []))
        message.tool_calls.append(call)
    return response
