"""Envoy's routes for the mesh's gRPC services: every streaming method runs without a route
timeout (a long-lived stream cut after the unary timeout would be a silent, periodic outage)."""

from __future__ import annotations

from google.protobuf.descriptor import ServiceDescriptor

from switchyard.envoy_config import CONTROL_UPSTREAMS, EDGE_UPSTREAM, adapter_upstream
from switchyard.v1 import cache_pb2, gateway_pb2, health_pb2, ledger_pb2, provider_pb2, router_pb2


def _services() -> dict[str, ServiceDescriptor]:
    found: dict[str, ServiceDescriptor] = {}
    for module in (cache_pb2, gateway_pb2, health_pb2, ledger_pb2, provider_pb2, router_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return found


def test_every_streaming_method_has_no_route_timeout() -> None:
    services = _services()
    upstreams = [EDGE_UPSTREAM, *CONTROL_UPSTREAMS, adapter_upstream("openai")]
    assert {u.service for u in upstreams} == set(services)
    for upstream in upstreams:
        methods = services[upstream.service].methods_by_name
        streaming = {
            name for name, method in methods.items() if method.client_streaming or method.server_streaming
        }
        assert streaming <= set(upstream.no_timeout), (upstream.service, streaming - set(upstream.no_timeout))
        assert set(upstream.no_timeout) <= set(methods) and set(upstream.retryable) <= set(methods)
