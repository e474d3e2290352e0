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
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import grpc
from google.protobuf import timestamp_pb2

from switchyard.common import answer_events, tracing
from switchyard.common.catalog import Catalog
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.logging import get_logger
from switchyard.common.money import TokenCounts
from switchyard.common.multiplex import FrameHold
from switchyard.common.settings import Settings
from switchyard.common.timestamps import set_now
from switchyard.edge.budget import NO_HOLD, BudgetHold, LeaseBook
from switchyard.edge.generations import GenerationStreams
from switchyard.edge.reporter import outcome as attempt_outcome
from switchyard.ledger.pricing import charge_micros, estimate_cost, worst_output_tokens
from switchyard.ledger.tokens import PromptCount, count_prompt_tokens
from switchyard.router.plan import Planner
from switchyard.router.table import RoutingTable
from switchyard.v1 import (
    common_pb2,
    gateway_pb2,
    health_pb2,
    ledger_pb2,
    provider_pb2,
    provider_pb2_grpc,
    router_pb2,
)

log = get_logger(__name__)
_PLAN_TRACER = tracing.get_tracer("switchyard.router")

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
    # The plan's predicted latency for the candidate (0: none), reported with the outcome.
    predicted_latency_ms: int = 0
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


Record = Callable[[ledger_pb2.CommitRequest], None]
"""Takes a finished request's commit for the ledger (the edge's outbox); never blocks."""
Report = Callable[[health_pb2.AttemptOutcome], None]
"""Takes one attempt's outcome for the health monitor (the edge's reporter); never blocks."""


class ChatPipeline:
    """Runs chat requests end to end; shared by every method that answers a chat.

    With a lease book, each attempt first holds its candidate's worst-case cost against the
    budgets that apply (locally; BUDGET_EXCEEDED when they cannot cover it), and settles the
    actual cost when the answer is complete. Every request that reached a vendor is handed to
    `record` (the commit outbox) exactly once, whatever way it ends. `frame_hold` lets a frame of
    generation starts wait for company (`switchyard.edge.mux.CompanyHold`).
    """

    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        channels: ChannelPool,
        *,
        budgets: LeaseBook | None = None,
        record: Record | None = None,
        planner: Planner | None = None,
        report: Report | None = None,
        frame_hold: FrameHold | None = None,
    ) -> None:
        self._settings = settings
        self._frame_hold = frame_hold
        self._catalog = catalog
        self._channels = channels
        self._budgets = budgets
        self._record = record
        self._report = report
        self.planner = planner or Planner(RoutingTable.from_catalog(catalog))
        # (tenant, model) -> tokens this UTC month (`_month`, year * 12 + month - 1): the volume
        # a discount tier counts, started afresh when the month turns, as the ledger's does.
        self._month_tokens: dict[tuple[str, str], int] = {}
        self._month = _month_of(datetime.now(UTC))
        # Adapter target -> the generation streams to it.
        self._adapters: dict[str, GenerationStreams] = {}

    def observe_commit(self, commit: ledger_pb2.CommitRequest, result: ledger_pb2.CommitResponse) -> None:
        """Learn the tenant's month-to-date tokens on a model from the ledger's answer, so the
        cost this edge reports carries the same volume discount the ledger charges."""
        record = commit.record
        month = _month_of(record.finished_at.ToDatetime(UTC)) if record.HasField("finished_at") else None
        if month != self._month_now():
            return  # priced in a month that is over (or undated): its volume no longer counts
        key = (record.scope.tenant_id, record.model)
        self._month_tokens[key] = max(self._month_tokens.get(key, 0), result.month_tokens)

    def _month_now(self, now: datetime | None = None) -> int:
        """This UTC month; when it has turned since the last call, the volumes start afresh."""
        month = _month_of(now if now is not None else datetime.now(UTC))
        if month != self._month:
            self._month = month
            self._month_tokens.clear()
        return month

    def plan(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        input_tokens: int = 0,
        context_tokens: int | None = None,
    ) -> list[router_pb2.Candidate]:
        """The candidates to try, planned here with the router's own plan library.

        Planning costs no network hop: the planner runs on the newest routing snapshot the
        router pushed (health, breakers, weights, tenant rules), or on this edge's catalog
        until one arrives. The caller's allowed models (its key's scope within its tenant's)
        filter the plan. When tracing is on, the plan is a span of the request's trace: the
        router's part in a request happens here, not in the router's process.
        """
        if not tracing.tracing_enabled():
            return self._plan(request, caller, input_tokens, context_tokens)
        with _PLAN_TRACER.start_as_current_span("switchyard.router/plan") as span:
            candidates = self._plan(request, caller, input_tokens, context_tokens)
            span.set_attribute("switchyard.candidates", len(candidates))
            if candidates:
                span.set_attribute("gen_ai.request.model", candidates[0].model)
            return candidates

    def _plan(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        input_tokens: int,
        context_tokens: int | None,
    ) -> list[router_pb2.Candidate]:
        plan = self.planner.plan(
            request,
            tenant_id=caller.tenant_id,
            input_tokens=input_tokens,
            allowed_models=caller.allowed_models,
            tier=caller.tier,
            context_tokens=context_tokens,
        )
        return list(plan.candidates)

    async def stream(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        *,
        timeout_s: float | None,
        prompt: PromptCount | None = None,
        cache_status: common_pb2.CacheStatus.ValueType = common_pb2.CACHE_STATUS_BYPASS,
        on_start: Callable[[], None] | None = None,
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The answer as chunks: routing, deltas, usage, done. Raises SwitchyardError.

        `cache_status` is what the cache made of the request (BYPASS, MISS or REFRESHED); the
        done chunk and the ledger record carry it. `on_start` is called just before each
        attempt's generation start is queued.

        The request has been validated by the caller (`edge.gateway`). At most three attempts
        walk the plan; a retryable failure before the first token moves to the next
        candidate, and once every candidate has been tried, a failed one is tried again
        after an exponential backoff with jitter, or after the vendor's `retry-after` when
        that fits the deadline.
        """
        if not request.request_id:
            request.request_id = uuid.uuid4().hex
        started = time.monotonic()
        deadline = started + min(
            timeout_s or self._settings.generate_timeout_s, self._settings.generate_timeout_s
        )
        queue = (
            self.plan(request, caller, prompt.tokens, prompt.window_tokens)
            if prompt is not None
            else self.plan(request, caller)
        )
        # The plan's predicted cost of each candidate is the expected cost the ledger row keeps
        # (to track its error), unless the plan priced no prompt (none was counted yet).
        priced = prompt is not None
        attempts: list[_Attempt] = []
        refusals: list[SwitchyardError] = []
        retries: dict[tuple[str, str], int] = {}
        counted = prompt
        last: _Outcome | None = None
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
            if counted is None:
                counted = count_prompt_tokens(request, self._catalog.model(candidate.model))
            try:
                hold = await self._hold(request, caller, candidate, counted)
            except SwitchyardError as exc:
                if exc.reason is not Reason.BUDGET_EXCEEDED:
                    raise
                refusals.append(exc)  # another candidate may fall under other budgets
                continue
            number = len(attempts) + 1
            attempt = _Attempt(number, candidate.model, candidate.provider, candidate.predicted_latency_ms)
            first_token: float | None = None
            headroom: common_pb2.RateLimitHeadroom | None = None
            attempts.append(attempt)
            sent_chars = 0
            usage: common_pb2.Usage | None = None
            finish = common_pb2.FINISH_REASON_UNSPECIFIED
            outcome = last = _Outcome(
                request,
                caller,
                candidate,
                counted,
                started,
                attempts,
                hold,
                cache_status,
                estimated_cost_micros=candidate.predicted_cost_micros if priced else 0,
            )
            if on_start is not None:
                on_start()
            call = self._generations(candidate.vendor).generate(
                provider_pb2.GenerateRequest(
                    request=request, provider=candidate.provider, upstream_model=candidate.upstream_model
                ),
                timeout_s=remaining,
            )
            try:
                yield common_pb2.ChatChunk(
                    routing=common_pb2.RoutingInfo(
                        model=candidate.model,
                        provider=candidate.provider,
                        attempt=number,
                        reason=candidate.reason,
                    )
                )
                try:
                    async for message in call:
                        for event in answer_events.unpack(message):
                            kind = event.WhichOneof("event")
                            if kind == "delta":
                                if first_token is None:
                                    first_token = time.monotonic()
                                delta = event.delta
                                sent_chars += len(delta.text)
                                if delta.tool_calls:
                                    sent_chars += sum(len(t.arguments_fragment) for t in delta.tool_calls)
                                yield common_pb2.ChatChunk(delta=event.delta)
                            elif kind == "usage":
                                usage = event.usage
                            elif kind == "done":
                                finish = event.done.finish_reason
                                headroom = event.done.headroom
                except SwitchyardError as exc:  # how the generation failed
                    attempt.error = exc
                    self._observe(attempt, request, first_token, None, None)
                    log.info(
                        "attempt_failed",
                        request_id=request.request_id,
                        model=candidate.model,
                        provider=candidate.provider,
                        attempt=number,
                        reason=attempt.error.reason.value,
                        after_first_token=sent_chars > 0,
                    )
                    if sent_chars:
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
                    final_failure = not (attempt.error.retryable or attempt.error.reason in _FAILOVER_REASONS)
                    self._finish(
                        outcome, None, status=attempt.error.reason.value, charge=False, record=final_failure
                    )
                    if final_failure:
                        raise attempt.error from None
                    if attempt.error.retryable:
                        queue.append(candidate)  # tried again once the others have had their turn
                    continue
                final = usage or common_pb2.Usage(estimated=True)
                self._observe(attempt, request, first_token, final, headroom)
                cost = self._finish(outcome, final, status="ok", charge=True)
                yield common_pb2.ChatChunk(usage=final)
                yield common_pb2.ChatChunk(
                    done=common_pb2.Done(
                        finish_reason=finish,
                        cost_micros=cost,
                        cache_status=cache_status,
                        request_id=request.request_id,
                        attempts=[a.summary() for a in attempts],
                    )
                )
                return
            finally:
                call.cancel()
                if not outcome.finished:
                    # Ended early (the caller left, or the stream broke after text was sent):
                    # charge what the vendor will bill as far as we can tell, estimated.
                    # Never past the output the hold covered (text may run over 4 chars a token).
                    output = -(-sent_chars // 4)
                    model = self._catalog.model(candidate.model)
                    if model is not None:
                        output = min(output, worst_output_tokens(request, model, counted))
                    partial = common_pb2.Usage(
                        input_tokens=counted.tokens, output_tokens=output, estimated=True
                    )
                    status = Reason.STREAM_INTERRUPTED.value if attempt.error else "CANCELLED"
                    self._finish(
                        outcome, partial if sent_chars else None, status=status, charge=bool(sent_chars)
                    )
        if not attempts and refusals:
            raise refusals[0]
        failure = _all_failed(attempts)
        if last is not None:
            self._commit(last, None, 0, failure.reason.value, [])
        raise failure

    def _observe(
        self,
        attempt: _Attempt,
        request: common_pb2.ChatRequest,
        first_token: float | None,
        usage: common_pb2.Usage | None,
        headroom: common_pb2.RateLimitHeadroom | None,
    ) -> None:
        """Hand the attempt's outcome to the health monitor's reporter (no I/O here)."""
        if self._report is None:
            return
        self._report(
            attempt_outcome(
                provider=attempt.provider,
                model=attempt.model,
                request_id=request.request_id,
                error=attempt.error,
                first_token_s=None if first_token is None else first_token - attempt.started,
                total_s=time.monotonic() - attempt.started,
                usage=usage,
                headroom=headroom,
                region=self._settings.edge_region,
                predicted_latency_ms=attempt.predicted_latency_ms,
            )
        )

    async def _hold(
        self,
        request: common_pb2.ChatRequest,
        caller: Caller,
        candidate: router_pb2.Candidate,
        prompt: PromptCount,
    ) -> BudgetHold:
        """Hold the candidate's worst-case cost against the budgets on this request."""
        if self._budgets is None:
            return NO_HOLD
        model = self._catalog.model(candidate.model)
        if model is None:
            return NO_HOLD

        def worst() -> int:
            return estimate_cost(
                request,
                model,
                at=datetime.now(UTC),
                month_tokens=self._month_tokens.get((caller.tenant_id, model.id), 0),
                prompt=prompt,
                horizon_s=self._settings.generate_timeout_s,
            ).worst_case_cost_micros

        return await self._budgets.hold(_scope(request, caller, candidate), worst)

    def _finish(
        self,
        outcome: _Outcome,
        usage: common_pb2.Usage | None,
        *,
        status: str,
        charge: bool,
        record: bool = True,
    ) -> int:
        """Settle the attempt's hold (once) and, when `record`, hand the request's commit to
        the outbox; returns the cost. A failed attempt that another one follows is not
        recorded: the request has one row, for how it finally ended."""
        if outcome.finished:
            return 0
        outcome.finished = True
        cost = self._cost(outcome.caller.tenant_id, outcome.candidate.model, usage) if charge else 0
        lease_ids: list[str] = []
        if self._budgets is not None and outcome.hold is not NO_HOLD:
            lease_ids = self._budgets.settle(outcome.hold, cost)
        if record:
            self._commit(outcome, usage, cost, status, lease_ids)
        return cost

    def _commit(
        self, outcome: _Outcome, usage: common_pb2.Usage | None, cost: int, status: str, lease_ids: list[str]
    ) -> None:
        if self._record is not None:
            self._record(
                ledger_pb2.CommitRequest(
                    record=outcome.record(usage, cost, status),
                    lease_ids=lease_ids,
                    traceparent=tracing.current_traceparent(),
                )
            )

    def _generations(self, vendor: str) -> GenerationStreams:
        target = self._settings.adapter_target(vendor)
        generations = self._adapters.get(target)
        if generations is None:
            stub = provider_pb2_grpc.ProviderAdapterServiceStub(self._channels.get(target))
            generations = self._adapters[target] = GenerationStreams(stub, hold=self._frame_hold)
        return generations

    def close(self) -> None:
        """End the streams to the adapters (generations still running fail)."""
        adapters, self._adapters = self._adapters, {}
        for generations in adapters.values():
            generations.close()

    def _cost(self, tenant_id: str, model_id: str, usage: common_pb2.Usage | None) -> int:
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
        now = datetime.now(UTC)
        self._month_now(now)
        key = (tenant_id, model_id)
        before = self._month_tokens.get(key, 0)
        self._month_tokens[key] = before + usage.input_tokens + usage.output_tokens
        return charge_micros(model, tokens, at=now, month_tokens=before)


def _month_of(moment: datetime) -> int:
    return moment.year * 12 + moment.month - 1


def _scope(
    request: common_pb2.ChatRequest, caller: Caller, candidate: router_pb2.Candidate
) -> ledger_pb2.BudgetScope:
    return ledger_pb2.BudgetScope(
        tenant_id=caller.tenant_id,
        end_user=request.metadata.end_user,
        api_key_id=caller.key_prefix,
        model=candidate.model,
        provider=candidate.provider,
    )


@dataclass(slots=True)
class _Outcome:
    """One attempt's facts, to settle its hold and build its ledger record once."""

    request: common_pb2.ChatRequest
    caller: Caller
    candidate: router_pb2.Candidate
    prompt: PromptCount
    started: float
    attempts: list[_Attempt]
    hold: BudgetHold
    cache_status: common_pb2.CacheStatus.ValueType
    # The expected cost the plan predicted for this candidate (0: none).
    estimated_cost_micros: int = 0
    finished: bool = False

    def record(self, usage: common_pb2.Usage | None, cost: int, status: str) -> ledger_pb2.UsageRecord:
        finished_at = timestamp_pb2.Timestamp()
        set_now(finished_at)
        return ledger_pb2.UsageRecord(
            request_id=self.request.request_id,
            scope=_scope(self.request, self.caller, self.candidate),
            model=self.candidate.model,
            provider=self.candidate.provider,
            usage=usage,
            cost_micros=cost,
            cache_status=self.cache_status,
            latency_ms=int((time.monotonic() - self.started) * 1000),
            status=status,
            attempts=len(self.attempts),
            finished_at=finished_at,
            estimated_input_tokens=self.prompt.tokens,
            estimated_cost_micros=self.estimated_cost_micros,
        )


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
