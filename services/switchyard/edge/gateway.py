"""The edge's front door: one code path for every skin (gRPC stream, gRPC unary, OpenAI HTTP).

For each chat request, in this order, each step local to the edge process:

1. authenticate the API key (`authorization: Bearer ...`) to a `Caller` (tenant, scopes);
2. validate the request's shape, then against the model it names: the key's model scope
   (PERMISSION_DENIED), the output cap and the context window (CONTEXT_TOO_LONG);
3. take a slot from the admission controller (priority under overload, OVERLOADED);
4. charge the rate limits (RATE_LIMITED with the exact wait);
5. join an identical request already in flight, or start the pipeline (plan, failover,
   stream) -- `edge.pipeline.ChatPipeline`.

Nothing is charged before the request is known to be valid and admitted.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final

import grpc

from switchyard.common import tracing
from switchyard.common.catalog import Catalog, Model
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.timestamps import set_now
from switchyard.edge.admission import AdmissionController, rank
from switchyard.edge.cache import AnswerRecorder, EdgeCache, replay
from switchyard.edge.dedup import Dedup, request_key
from switchyard.edge.keys import KeyAuthenticator, Principal, effective_tier
from switchyard.edge.mux import Arrival, Arrivals
from switchyard.edge.pipeline import Caller, ChatPipeline, Record
from switchyard.edge.ratelimit import (
    MODEL_TPM,
    TIER_TPM,
    ModelLimits,
    RateLimiter,
    rate_limited_error,
    request_checks,
)
from switchyard.edge.validate import validate_chat_request, validate_for_model
from switchyard.ledger.tokens import PromptCount, count_prompt_tokens
from switchyard.router.plan import AUTO
from switchyard.v1 import cache_pb2, common_pb2, ledger_pb2

log = get_logger(__name__)

TOKEN_LIMITS: Final = frozenset({TIER_TPM, MODEL_TPM})

Authenticate = Callable[[str | None], Awaitable[Caller]]
"""Raw `authorization` value (None when absent) -> the caller; raises UNAUTHENTICATED."""

TokenSettle = Callable[[int], Coroutine[Any, Any, None]]
"""(tokens the answer actually used) -> correct the token limits charged with the estimate."""
RateLimit = Callable[[Caller, Model | None, int], Awaitable[TokenSettle | None]]
"""(caller, requested model or None for `auto`, estimated tokens) -> charge the limits or
raise RATE_LIMITED; returns how to settle the token limits once usage is known (None when no
token limit applies)."""


# Callers derived from principals, so a request costs one dict lookup after the key check.
_MAX_CACHED_CALLERS = 10_000


def key_authentication(catalog: Catalog, authenticator: KeyAuthenticator) -> Authenticate:
    """The `Authenticate` step: the API key to its principal, then the caller the rest of the
    edge sees -- the tenant's tier lowered to the key's cap, and the models both the tenant
    and the key allow (a key can narrow its tenant's models, never widen them)."""
    callers: dict[Principal, Caller] = {}

    def caller_for(principal: Principal) -> Caller:
        tenant = catalog.tenants.get(principal.tenant_id)
        tenant_tier = tenant.tier if tenant is not None else "free"
        allowed = principal.allowed_models
        if tenant is not None and tenant.allowed_models:
            tenant_models = frozenset(tenant.allowed_models)
            allowed = tenant_models if allowed is None else allowed & tenant_models
        return Caller(
            tenant_id=principal.tenant_id,
            allowed_models=allowed,
            tier=effective_tier(principal, tenant_tier, catalog.tiers),
            key_prefix=principal.key_prefix,
            admin=principal.admin,
        )

    async def authenticate(authorization: str | None) -> Caller:
        principal = await authenticator.authenticate(authorization)
        caller = callers.get(principal)
        if caller is None:
            if len(callers) >= _MAX_CACHED_CALLERS:
                callers.clear()
            caller = callers[principal] = caller_for(principal)
        return caller

    return authenticate


def charge_rate_limits(catalog: Catalog, limiter: RateLimiter) -> RateLimit:
    """The `RateLimit` step: the caller's tier limits (requests and tokens per minute, lockout)
    and the requested model's per-tenant limits, charged atomically by `limiter`."""
    fallback_tier = catalog.tiers.get("free") or next(iter(catalog.tiers.values()))

    async def charge(caller: Caller, model: Model | None, tokens: int) -> TokenSettle | None:
        tier = catalog.tiers.get(caller.tier, fallback_tier)
        limits = ModelLimits(model.requests_per_minute, model.tokens_per_minute) if model else None
        model_id = model.id if model else None
        checks = request_checks(
            caller.tenant_id, tier, model=model_id, estimated_tokens=tokens, model_limits=limits
        )
        decision = await limiter.acquire(checks)
        if not decision.allowed:
            raise rate_limited_error(decision, tenant=caller.tenant_id, model=model_id)
        token_checks = [check for check in checks if check.name in TOKEN_LIMITS]
        if not token_checks:
            return None

        async def settle(used: int) -> None:
            await limiter.adjust(token_checks, [max(0, used) - check.cost for check in token_checks])

        return settle

    return charge


@dataclass(frozen=True, slots=True)
class Admitted:
    """What the front door established about a request before it reaches the pipeline."""

    caller: Caller
    model: Model | None
    prompt: PromptCount


class EdgeGateway:
    """Admission and the pipeline behind it, shared by every public method."""

    def __init__(
        self,
        catalog: Catalog,
        pipeline: ChatPipeline,
        *,
        authenticate: Authenticate,
        rate_limit: RateLimit,
        admission: AdmissionController,
        dedup: Dedup | None,
        record: Record | None = None,
        cache: EdgeCache | None = None,
        arrivals: Arrivals | None = None,
    ) -> None:
        self.catalog = catalog
        self.arrivals = arrivals or Arrivals()
        """Admitted requests that may still queue a cache lookup or a generation start."""
        self.pipeline = pipeline
        self.authenticate = authenticate
        self.admission = admission
        self.dedup = dedup
        self.cache = cache
        self._rate_limit = rate_limit
        self._record = record
        self._background: set[asyncio.Task[None]] = set()

    def check(self, request: common_pb2.ChatRequest, caller: Caller) -> Admitted:
        """Validate `request` for `caller` (shape, scope, model limits); raise on the first problem."""
        validate_chat_request(request)
        model = self.resolve_model(request, caller)
        prompt = count_prompt_tokens(request, model)
        if model is not None:
            validate_for_model(request, model, prompt.window_tokens)
        return Admitted(caller, model, prompt)

    def resolve_model(self, request: common_pb2.ChatRequest, caller: Caller) -> Model | None:
        """The catalog model `request` names (None for `auto`), within the caller's scope."""
        model: Model | None = None
        name = request.model.strip()
        if not name and self.catalog.default_model:
            name = self.catalog.default_model  # no model named: the catalog's default
        if name not in ("", AUTO):
            model = self.catalog.resolve(name)
            if model is None:
                raise SwitchyardError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    Reason.INVALID_REQUEST,
                    f"unknown model or alias {name!r}",
                    metadata={"field": "model", "model": name},
                )
            if caller.allowed_models is not None and model.id not in caller.allowed_models:
                raise SwitchyardError(
                    grpc.StatusCode.PERMISSION_DENIED,
                    Reason.PERMISSION_DENIED,
                    f"this key may not use {model.id}",
                    metadata={"field": "model", "model": model.id, "tenant": caller.tenant_id},
                )
        return model

    def stream(
        self, request: common_pb2.ChatRequest, authorization: str | None, *, timeout_s: float | None
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The answer to `request` as chunks, after authentication and admission."""
        return self._chat(request, None, authorization, timeout_s)

    def stream_as(
        self, request: common_pb2.ChatRequest, caller: Caller, *, timeout_s: float | None
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """`stream` for an already authenticated caller (the OpenAI HTTP front uses this)."""
        return self._chat(request, caller, None, timeout_s)

    async def _chat(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller | None,
        authorization: str | None,
        timeout_s: float | None,
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The whole request, and the one pass over its chunks on their way out: every chunk of
        every answer passes here, so the request's bookkeeping (the rate limits' actual tokens,
        a free answer's ledger row, the cache's copy) is done in this one loop rather than in
        a generator layer each."""
        if caller is None:
            caller = await self.authenticate(authorization)
        admitted = self.check(request, caller)
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        request_rank = rank(request.routing.priority, caller.tier)
        async with self.admission.slot(request_rank, timeout_s):
            max_output = (
                request.sampling.max_output_tokens if request.sampling.HasField("max_output_tokens") else 0
            )
            arrival = self.arrivals.arrive()  # it may queue a lookup and a start: frames wait for it
            chunks: AsyncGenerator[common_pb2.ChatChunk, None] | None = None
            settle = None
            seen = AnswerRecorder(keep_deltas=False)
            try:
                settle = await self._rate_limit(caller, admitted.model, admitted.prompt.tokens + max_output)
                hit, status, store_as = await self._look_up(request, caller, admitted, arrival)
                if hit is not None:
                    chunks = replay(hit, request.request_id)
                else:
                    if store_as is not None:
                        seen = AnswerRecorder()  # its deltas too: the answer is offered to the cache
                    chunks = self._provider_answer(
                        request, caller, timeout_s, admitted.prompt, arrival, status
                    )
                answering = False
                async for chunk in chunks:
                    if not answering:  # (a hit, a joiner): it queues nothing more
                        answering = True
                        arrival.started()
                    if seen.see(chunk) == "done":
                        self._record_answered(request, caller, admitted.prompt, hit, seen)
                    yield chunk
                if store_as is not None and self.cache is not None:
                    answer = seen.answer()
                    if answer is not None:
                        self.cache.offer(caller.tenant_id, request, store_as, answer)
            finally:
                arrival.left()
                if chunks is not None:
                    await chunks.aclose()
                if settle is not None:
                    usage = seen.usage  # none: the vendor served nothing we can count
                    self._in_background(settle(usage.input_tokens + usage.output_tokens if usage else 0))

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` off the caller's path (its failure is logged, never raised)."""
        task = asyncio.create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("background_step_failed", error=type(task.exception()).__name__)

    async def _look_up(
        self, request: common_pb2.ChatRequest, caller: Caller, admitted: Admitted, arrival: Arrival
    ) -> tuple[cache_pb2.LookupResponse | None, common_pb2.CacheStatus.ValueType, str | None]:
        """(the cached answer to serve, what the cache made of the request, the model to offer
        the providers' answer under): a hit when the cache may serve this request and has one;
        BYPASS when the cache has no part in it, else MISS (REFRESHED when asked to refresh);
        the model (or `auto`) when the cache may keep the answer, else None. `arrival` is told
        the request has passed its lookup."""
        cache = self.cache
        decision = cache.decide(request) if cache is not None else None
        arrival.looked_up()  # the lookup, if any, is queued next, with no wait in between
        if cache is None or decision is None or not (decision.lookup or decision.store):
            return None, common_pb2.CACHE_STATUS_BYPASS, None
        model = admitted.model.id if admitted.model is not None else AUTO
        if decision.lookup:
            # Alone, a sure miss (by the cache's presence) is answered here; under concurrency
            # it is asked anyway: see `EdgeCache.lookup`.
            alone = self.admission.in_flight <= 1
            hit = await cache.lookup(caller.tenant_id, request, model, alone=alone)
            if hit is not None:
                return hit, hit.status, None
        status = (
            common_pb2.CACHE_STATUS_REFRESHED
            if request.cache.mode == common_pb2.CACHE_MODE_REFRESH
            else common_pb2.CACHE_STATUS_MISS
        )
        return None, status, model if decision.store else None

    def _provider_answer(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        timeout_s: float | None,
        prompt: PromptCount,
        arrival: Arrival,
        cache_status: common_pb2.CacheStatus.ValueType,
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The providers' answer (shared with identical requests in flight when dedup is on)."""

        def source() -> AsyncGenerator[common_pb2.ChatChunk, None]:
            return self.pipeline.stream(
                request,
                caller,
                timeout_s=timeout_s,
                prompt=prompt,
                cache_status=cache_status,
                on_start=arrival.started,
            )

        if self.dedup is None:
            return source()
        return self.dedup.stream(request_key(caller.tenant_id, request), request.request_id, source)

    def _record_answered(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        prompt: PromptCount,
        hit: cache_pb2.LookupResponse | None,
        seen: AnswerRecorder,
    ) -> None:
        """At the answer's `done`: the ledger row of an answer nobody paid a provider for. A
        cache hit's names the model that made the answer; a request that joined another's
        flight (cache status DEDUPLICATED) gets its own, the shared cost as its saving: the
        upstream cost is recorded once, on the request that made the call (by the pipeline)."""
        done = seen.done
        assert done is not None
        if hit is not None:
            answer = hit.answer
            self._record_without_cost(
                request, caller, prompt, answer.model, answer.provider, answer.usage, done
            )
        elif done.cache_status == common_pb2.CACHE_STATUS_DEDUPLICATED:
            routing = seen.routing
            model = routing.model if routing is not None else ""
            provider = routing.provider if routing is not None else ""
            self._record_without_cost(request, caller, prompt, model, provider, seen.usage, done)

    def _record_without_cost(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        prompt: PromptCount,
        model: str,
        provider: str,
        usage: common_pb2.Usage | None,
        done: common_pb2.Done,
    ) -> None:
        """The ledger row of an answer nobody paid a provider for (a shared flight, a cache hit):
        cost 0, its cache status and what it saved."""
        if self._record is None:
            return
        record = ledger_pb2.UsageRecord(
            request_id=done.request_id,
            scope=ledger_pb2.BudgetScope(
                tenant_id=caller.tenant_id,
                end_user=request.metadata.end_user,
                api_key_id=caller.key_prefix,
                model=model,
                provider=provider,
            ),
            model=model,
            provider=provider,
            usage=usage,
            cost_micros=0,
            cache_status=done.cache_status,
            cache_saved_micros=done.saved_micros,
            status="ok",
            attempts=len(done.attempts),
            estimated_input_tokens=prompt.tokens,
        )
        set_now(record.finished_at)
        self._record(ledger_pb2.CommitRequest(record=record, traceparent=tracing.current_traceparent()))
