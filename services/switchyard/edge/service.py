"""The GatewayService servicer: proto in, pipeline call, proto out."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncGenerator
from datetime import UTC, datetime

import grpc

from switchyard.common.catalog import Catalog
from switchyard.common.catalog_proto import model_info
from switchyard.common.channels import ChannelPool
from switchyard.common.errors import Reason, SwitchyardError, from_rpc_error, invalid
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.common.sql import Database, open_database
from switchyard.edge.admission import AdmissionController
from switchyard.edge.budget import LeaseBook
from switchyard.edge.cache import EdgeCache
from switchyard.edge.dedup import build_dedup
from switchyard.edge.gateway import Authenticate, EdgeGateway, charge_rate_limits, key_authentication
from switchyard.edge.keys import KeyAuthenticator, KeyStore, ensure_dev_key
from switchyard.edge.mux import BUSY_GAPS, Arrivals, CompanyHold
from switchyard.edge.openai_http import OpenAIHttpServer, build_openai_app, start_openai_http
from switchyard.edge.outbox import CommitOutbox
from switchyard.edge.pipeline import Caller, ChatPipeline, collect
from switchyard.edge.ratelimit import build_rate_limiter
from switchyard.edge.reporter import OutcomeReporter
from switchyard.edge.routes import RouteWatcher
from switchyard.ledger.pricing import estimate_cost
from switchyard.ledger.tokens import count_prompt_tokens, warm_up
from switchyard.v1 import (
    cache_pb2_grpc,
    common_pb2,
    gateway_pb2,
    gateway_pb2_grpc,
    health_pb2_grpc,
    ledger_pb2,
    ledger_pb2_grpc,
    router_pb2_grpc,
)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1_000


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API."""

    def __init__(
        self, catalog: Catalog, gateway: EdgeGateway, ledger: ledger_pb2_grpc.CostLedgerServiceStub
    ) -> None:
        self._catalog = catalog
        self._gateway = gateway
        self._ledger = ledger

    async def Chat(
        self, request: common_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ChatResponse:
        """One answer, whole."""
        chunks = self._gateway.stream(request, _authorization(context), timeout_s=context.time_remaining())
        return await collect(chunks)

    def ChatStream(
        self, request: common_pb2.ChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncGenerator[common_pb2.ChatChunk, None]:
        """The answer as it is generated: the gateway's own chunks, with no layer of its own
        on each (the server's error wrapper closes them when the call ends)."""
        return self._gateway.stream(request, _authorization(context), timeout_s=context.time_remaining())

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        """The catalog's models the caller may use, paged, optionally filtered by capabilities."""
        caller = await self._gateway.authenticate(_authorization(context))
        if request.page_size < 0:
            raise invalid("page_size must not be negative", "page_size")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = _decode_page_token(request.page_token)
        allowed = caller.allowed_models
        infos = [
            model_info(m, self._catalog) for m in self._catalog.models if allowed is None or m.id in allowed
        ]
        wanted = set(request.capabilities)
        if wanted:
            infos = [i for i in infos if wanted.issubset(set(i.capabilities))]
        page = infos[start : start + size]
        more = start + size < len(infos)
        return gateway_pb2.ListModelsResponse(
            models=page, next_page_token=_encode_page_token(start + size) if more else ""
        )

    async def CountTokens(
        self, request: gateway_pb2.CountTokensRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CountTokensResponse:
        """Prompt tokens of a request for its model, counted here with the ledger's tokenizers."""
        caller = await self._gateway.authenticate(_authorization(context))
        model = self._gateway.resolve_model(request.request, caller)
        count = count_prompt_tokens(request.request, model)
        return gateway_pb2.CountTokensResponse(
            input_tokens=count.tokens,
            encoding=count.encoding,
            approximate=count.approximate,
            model=model.id if model is not None else "",
        )

    async def EstimateCost(
        self, request: gateway_pb2.EstimateCostRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.EstimateCostResponse:
        """Expected and worst-case cost on the model the request names, or for `auto` on the
        first model the plan would try."""
        caller = await self._gateway.authenticate(_authorization(context))
        model = self._gateway.resolve_model(request.request, caller)
        if model is None:
            prompt = count_prompt_tokens(request.request, None).tokens
            plan = self._gateway.pipeline.plan(request.request, caller, prompt)
            model = self._catalog.model(plan[0].model) if plan else None
            if model is None:
                raise SwitchyardError(
                    grpc.StatusCode.FAILED_PRECONDITION, Reason.NO_ROUTE, "no model can serve this request"
                )
        found = estimate_cost(request.request, model, at=datetime.now(UTC))
        return gateway_pb2.EstimateCostResponse(
            model=found.model,
            input_tokens=found.input_tokens,
            expected_output_tokens=found.expected_output_tokens,
            max_output_tokens=found.max_output_tokens,
            expected_cost_micros=found.expected_cost_micros,
            worst_case_cost_micros=found.worst_case_cost_micros,
            approximate=found.approximate,
        )

    async def GetUsage(
        self, request: gateway_pb2.GetUsageRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetUsageResponse:
        """The caller's own tenant's usage (whatever tenant the request names), from the ledger."""
        caller = await self._gateway.authenticate(_authorization(context))
        scoped = gateway_pb2.GetUsageRequest()
        scoped.CopyFrom(request)
        scoped.tenant_id = caller.tenant_id
        try:
            usage: gateway_pb2.GetUsageResponse = await self._ledger.GetUsage(
                scoped, timeout=context.time_remaining() or 10.0
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return usage


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The `authorization` metadata value, if the caller sent one."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode("latin-1")
    return None


def _encode_page_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode()


def _decode_page_token(token: str) -> int:
    if not token:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        offset = int(value)
    except (ValueError, UnicodeDecodeError):
        raise invalid("page_token is not one this server issued", "page_token") from None
    if kind != "o" or offset < 0:
        raise invalid("page_token is not one this server issued", "page_token")
    return offset


def holder_id(settings: Settings) -> str:
    """This edge's name towards the ledger: stable across restarts of the same replica (its
    host and port), so a restarted edge sends what its previous run left in the outbox."""
    return f"edge-{socket.gethostname()}-{settings.port_for('edge')}"


def build(settings: Settings) -> ServiceParts:
    """The edge's bindings; `start` opens the key store and the commit outbox, `close`
    releases what they hold (the outbox sends what it still has first)."""
    catalog = settings.catalog
    channels = ChannelPool(default_timeout_s=settings.call_timeout_s)
    limiter = build_rate_limiter(settings)
    ledger = ledger_pb2_grpc.CostLedgerServiceStub(channels.get(settings.ledger_target))
    holder = holder_id(settings)
    authenticators: list[KeyAuthenticator] = []
    databases: list[Database] = []
    outboxes: list[CommitOutbox] = []
    by_key: list[Authenticate] = []
    budgets = (
        LeaseBook(ledger, holder, call_timeout_s=settings.call_timeout_s) if settings.edge_budgets else None
    )

    async def authenticate(authorization: str | None) -> Caller:
        return await by_key[0](authorization)  # set by `start`, which runs before serving

    def record(commit: ledger_pb2.CommitRequest) -> None:
        if outboxes:
            outboxes[0].add(commit)

    dedup = build_dedup(settings)
    reporter = OutcomeReporter(
        health_pb2_grpc.HealthMonitorServiceStub(channels.get(settings.health_target)),
        holder,
        interval_s=settings.health_report_interval_s,
        call_timeout_s=settings.call_timeout_s,
    )
    admission = AdmissionController(
        settings.edge_max_concurrent,
        max_queue=settings.edge_max_queue,
        queue_timeout_s=settings.edge_queue_timeout_s,
    )
    # Under concurrency, lookups and generation starts wait briefly to share a message: for
    # requests on their way, or on a busy edge for the next arrivals (`CompanyHold`).
    arrivals = Arrivals()
    linger_s = settings.edge_frame_linger_s
    pipeline = ChatPipeline(
        settings,
        catalog,
        channels,
        budgets=budgets,
        record=record if settings.edge_budgets else None,
        report=reporter.add,
        frame_hold=CompanyHold(linger_s, arrivals, "starts", busy_gaps=BUSY_GAPS),
    )
    routes = RouteWatcher(
        router_pb2_grpc.RouterServiceStub(channels.get(settings.router_target)),
        pipeline.planner,
        holder,
        region=settings.edge_region,
    )
    cache = (
        EdgeCache(
            cache_pb2_grpc.CacheServiceStub(channels.get(settings.cache_target)),
            max_temperature=settings.cache_max_temperature,
            lookup_timeout_s=settings.cache_lookup_timeout_s,
            store_timeout_s=settings.call_timeout_s,
            hold=CompanyHold(linger_s, arrivals, "lookups", busy_gaps=BUSY_GAPS),
            presence=settings.edge_cache_presence,
        )
        if settings.edge_cache
        else None
    )
    gateway = EdgeGateway(
        catalog,
        pipeline,
        authenticate=authenticate,
        rate_limit=charge_rate_limits(catalog, limiter),
        admission=admission,
        arrivals=arrivals,
        dedup=dedup,
        record=record if settings.edge_budgets else None,
        cache=cache,
    )
    servicer = GatewayServicer(catalog, gateway, ledger)
    http_app = build_openai_app(stream_chat=gateway.stream_as, authenticate=authenticate, catalog=catalog)
    http_servers: list[OpenAIHttpServer] = []
    binding = ServiceBinding(
        SERVICE_NAME, lambda server: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    )

    async def start() -> None:
        routes.start()
        reporter.start()
        if budgets is not None:
            budgets.start_watching()
        # Every request counts its prompt's tokens: load the encodings before serving (~0.3 s),
        # not on the first request.
        await asyncio.to_thread(warm_up)
        database = await open_database(settings.database_url)
        databases.append(database)
        store = await KeyStore.open(database)
        if settings.dev_key:
            await ensure_dev_key(store, settings.dev_key)
        authenticator = KeyAuthenticator(
            store, refresh_s=settings.keys_refresh_s, known_tenants=catalog.tenants.keys()
        )
        await authenticator.start()
        authenticators.append(authenticator)
        by_key.append(key_authentication(catalog, authenticator))
        if settings.edge_budgets:
            outbox = await CommitOutbox.open(
                database,
                ledger,
                holder,
                call_timeout_s=settings.call_timeout_s,
                on_result=pipeline.observe_commit,
            )
            outbox.start()
            outboxes.append(outbox)
        http_servers.append(
            await start_openai_http(
                http_app, settings.host, settings.http_port, grace_s=settings.shutdown_grace_s
            )
        )

    async def close() -> None:
        for http_server in http_servers:
            await http_server.stop()
        await routes.aclose()
        await reporter.aclose()
        for outbox in outboxes:
            await outbox.aclose()
        if cache is not None:
            await cache.aclose()
        pipeline.close()
        if budgets is not None:
            await budgets.aclose()
        await channels.close()
        await limiter.aclose()
        if dedup is not None:
            await dedup.aclose()
        for authenticator in authenticators:
            await authenticator.close()
        for database in databases:
            await database.close()

    return ServiceParts([binding], close, start)
