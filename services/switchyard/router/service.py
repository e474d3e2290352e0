"""The RouterService servicer: proto in, plan library call, proto out."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from switchyard.common.catalog import Catalog
from switchyard.common.errors import unimplemented
from switchyard.common.server import ServiceBinding, ServiceParts
from switchyard.common.settings import Settings
from switchyard.router.plan import PlannedCandidate, plan_route
from switchyard.v1 import router_pb2, router_pb2_grpc

SERVICE_NAME = router_pb2.DESCRIPTOR.services_by_name["RouterService"].full_name


def candidate_proto(candidate: PlannedCandidate) -> router_pb2.Candidate:
    """A planned candidate as the `Candidate` message callers and edges receive."""
    return router_pb2.Candidate(
        model=candidate.model.id,
        provider=candidate.provider,
        vendor=candidate.vendor,
        upstream_model=candidate.model.upstream_model,
        reason=candidate.reason,
    )


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    """Plans routes from the catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    async def Plan(
        self, request: router_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.PlanResponse:
        """The ordered candidates for a request."""
        tenant = self._catalog.tenants.get(request.tenant_id)
        allowed = frozenset(tenant.allowed_models) if tenant and tenant.allowed_models else None
        plan = plan_route(self._catalog, request.request.model, allowed_models=allowed)
        return router_pb2.PlanResponse(candidates=[candidate_proto(c) for c in plan])

    async def Explain(
        self, request: router_pb2.ExplainRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.ExplainResponse:
        """The full scoring table (issue #5)."""
        raise unimplemented("RouterService.Explain", "#5")

    async def WatchRoutes(
        self, request: router_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[router_pb2.WatchRoutesResponse]:
        """Routing snapshots for edges (issue #5)."""
        raise unimplemented("RouterService.WatchRoutes", "#5")
        yield  # an async generator, as gRPC expects of a server stream


def build(settings: Settings) -> ServiceParts:
    """The router's bindings for the server bootstrap."""
    servicer = RouterServicer(settings.catalog)
    return ServiceParts(
        [
            ServiceBinding(
                SERVICE_NAME,
                lambda server: router_pb2_grpc.add_RouterServiceServicer_to_server(servicer, server),
            )
        ]
    )
