"""The CacheService servicer. Issue #7 builds its methods; until then each answers
UNIMPLEMENTED with an ErrorInfo naming the issue."""

from __future__ import annotations

from switchyard.common.server import ServiceParts
from switchyard.common.settings import Settings
from switchyard.common.unimplemented import unimplemented_bindings
from switchyard.v1 import cache_pb2, cache_pb2_grpc


def build(settings: Settings) -> ServiceParts:
    """The service's bindings for the server bootstrap."""
    return ServiceParts(unimplemented_bindings(cache_pb2, cache_pb2_grpc, "CacheService", "#7"))
