"""The one settings loader: environment variables over defaults, plus the catalog.

Every variable starts with `SWITCHYARD_` except the standard ones (`REDIS_URL`,
`DATABASE_URL`, `OTEL_EXPORTER_OTLP_ENDPOINT`). Peers are gRPC targets (`host:port`), so
in a cluster they point at Envoy or at headless Services and locally at loopback ports.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import cached_property
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from switchyard.common.catalog import Catalog, load_catalog

SERVICES: Final = ("edge", "router", "ledger", "health", "cache", "adapter")

# Default local ports (DESIGN.md): adapters from 50061, one per vendor.
DEFAULT_PORTS: Final = {"edge": 50051, "router": 50052, "ledger": 50053, "health": 50054, "cache": 50055}
ADAPTER_PORTS: Final = {
    "openai": 50061,
    "anthropic": 50062,
    "gemini": 50063,
    "mistral": 50064,
    "cohere": 50065,
    "openai_compatible": 50066,
}
EDGE_HTTP_PORT: Final = 8000
# The API key `switchyard run` gives the edge for the `default` tenant, and the one `switchyard
# chat` sends when no other is set. It only opens a local mesh: a cluster never sets it.
LOCAL_DEV_KEY: Final = "sy-localdev-switchyardlocaldevelopmentkey00000000000"


def trace_sample_ratio(environ: Mapping[str, str]) -> float:
    """The share of new traces recorded: OTEL_TRACES_SAMPLER_ARG clamped to [0, 1]; 1 when it is
    unset or not a number (tracing itself is on only with OTEL_EXPORTER_OTLP_ENDPOINT)."""
    raw = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(raw) if raw else 1.0
    except ValueError:
        return 1.0
    return min(1.0, max(0.0, ratio)) if ratio == ratio else 1.0


class SettingsError(Exception):
    """A setting from the environment is unusable; the message names the variable."""


class Settings(BaseModel):
    """Process settings; build with `Settings.from_env()`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    # The port this process listens on; None: the service's default port.
    port: int | None = Field(default=None, ge=0, le=65535)
    # The edge's OpenAI-compatible HTTP front.
    http_port: int = Field(default=EDGE_HTTP_PORT, ge=0, le=65535)
    catalog_path: str | None = None
    router_target: str = f"127.0.0.1:{DEFAULT_PORTS['router']}"
    ledger_target: str = f"127.0.0.1:{DEFAULT_PORTS['ledger']}"
    health_target: str = f"127.0.0.1:{DEFAULT_PORTS['health']}"
    cache_target: str = f"127.0.0.1:{DEFAULT_PORTS['cache']}"
    # Adapter targets by vendor; unset vendors use 127.0.0.1 and the default port.
    adapter_targets: dict[str, str] = Field(default_factory=dict)
    redis_url: str | None = None
    database_url: str | None = None
    otel_endpoint: str | None = None
    log_level: str = "INFO"
    log_json: bool = True
    # Seconds to drain in-flight calls on SIGTERM.
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # Default deadline for unary calls between services.
    call_timeout_s: float = Field(default=5.0, gt=0)
    # Deadline for a whole generation when the caller set none.
    generate_timeout_s: float = Field(default=300.0, gt=0)
    # Edge overload control: concurrent chat requests per replica, the priority queue in front
    # of them, and how long a queued request waits for a slot.
    edge_max_concurrent: int = Field(default=512, gt=0)
    edge_max_queue: int = Field(default=2048, ge=0)
    edge_queue_timeout_s: float = Field(default=5.0, gt=0)
    # Identical in-flight requests of one tenant share one upstream call.
    edge_dedup: bool = True
    # Under concurrency, how long the edge's cache lookups and generation starts may wait for
    # those of requests already on their way, or on a busy edge for the next arrivals, to share
    # a message (switchyard.edge.mux.CompanyHold); 0: never. A lone request never waits.
    edge_frame_linger_s: float = Field(default=0.005, ge=0, le=0.1)
    # The region this edge runs in (for example "us-east"): its outcome reports carry it, and
    # it plans on the latency measured from there. Empty: latency of every region together.
    edge_region: str = ""
    # A clear API key the edge stores (hashed) for the `default` tenant at start: the key
    # `switchyard run` prints. Unset in a cluster, where keys come from `switchyard keys`.
    dev_key: str | None = Field(default=None, repr=False)
    # Seconds between the edge's reloads of the API keys (a revoked key stops within this).
    keys_refresh_s: float = Field(default=5.0, gt=0)
    # Whether the edge holds requests against budget leases and commits usage to the ledger.
    # Off only for an edge deliberately run without a ledger (some tests, the bench's baseline).
    edge_budgets: bool = True
    # Seconds an edge may admit requests against a budget lease (the ledger's grant).
    lease_ttl_s: float = Field(default=30.0, gt=0)
    # Key that signs budget alert webhooks (HMAC-SHA256); unset: alerts go unsigned.
    webhook_secret: str | None = Field(default=None, repr=False)
    # Key that hashes the end user id an erasure is audited under (HMAC-SHA256, at least 16
    # bytes); unset: a random key the ledger's database keeps for itself. The cache files its
    # entries under the same hash of their end user (unset: a key its store keeps).
    ledger_erasure_key: str | None = Field(default=None, repr=False, min_length=16)
    # Seconds between the ledger's sweeps of expired reservations and leases.
    ledger_sweep_s: float = Field(default=1.0, gt=0)
    # Seconds a ledger that has just started frees no expired hold: edges send the commits it
    # could not take while it was down within their outbox's retry cap (30 s), and each draws
    # its cost from its lease's hold.
    ledger_expire_after_start_s: float = Field(default=60.0, ge=0)
    # Health monitor: a (provider, model) breaker opens after this many failures in a row, or
    # when the error rate over the window passes the threshold (with at least min_samples).
    health_failure_threshold: int = Field(default=5, gt=0)
    health_error_rate_threshold: float = Field(default=0.5, gt=0, le=1)
    health_window_s: float = Field(default=60.0, gt=0)
    health_min_samples: int = Field(default=10, gt=0)
    # An open breaker turns half-open after this long and lets this many trials through.
    health_open_s: float = Field(default=60.0, gt=0)
    health_half_open_trials: int = Field(default=3, gt=0)
    # Seconds between active probes of each provider (jittered); 0 turns probing off.
    health_probe_interval_s: float = Field(default=30.0, ge=0)
    # Seconds between the edge's batched outcome reports to the health monitor.
    health_report_interval_s: float = Field(default=0.5, gt=0)
    # Router: seconds between checks of the catalog file for edits (rules, models).
    router_reload_s: float = Field(default=0.5, gt=0)
    # Plan library knobs, pushed to every edge in the routing snapshot.
    router_equal_score_band: float = Field(default=0.1, ge=0, lt=1)
    router_weight_floor: float = Field(default=0.05, ge=0, lt=1)
    router_headroom_reserve: float = Field(default=0.02, ge=0, lt=1)
    # Response cache. The edge looks up and stores cacheable requests (see cache/keys.py):
    # with no cache policy, only those with a temperature at or below this.
    edge_cache: bool = True
    # The edge asks the cache for the keys it holds and answers a lookup sure to miss itself.
    edge_cache_presence: bool = True
    cache_max_temperature: float = Field(default=0.0, ge=0)
    # Seconds the edge waits for a lookup before answering from the provider instead.
    cache_lookup_timeout_s: float = Field(default=0.25, gt=0)
    # The cache's memory bound (payloads and keys) and its in-process tier's entries.
    cache_max_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    cache_l1_entries: int = Field(default=10_000, ge=0)
    # Semantic matching (paraphrases) with the local embedder, when it is installed; the cosine
    # similarity a paraphrase needs when the caller sets none.
    cache_semantic: bool = True
    cache_semantic_threshold: float = Field(default=0.85, gt=0, le=1)
    # Where question vectors come from: "local" (all-MiniLM-L6-v2 in process) or
    # "provider:<provider>/<model>" (a catalog provider's embedding model, through its adapter),
    # and, for a provider, a smaller vector size than the model's own (0: its own).
    cache_embedder: str = Field(default="local", pattern=r"^(local|provider:[^/\s]+/\S+)$")
    cache_embedder_dimensions: int = Field(default=0, ge=0)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: object) -> Settings:
        """Read settings from the environment (or `environ`), then apply `overrides`."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        simple = {
            "SWITCHYARD_HOST": "host",
            "SWITCHYARD_PORT": "port",
            "SWITCHYARD_HTTP_PORT": "http_port",
            "SWITCHYARD_CATALOG": "catalog_path",
            "SWITCHYARD_ROUTER_TARGET": "router_target",
            "SWITCHYARD_LEDGER_TARGET": "ledger_target",
            "SWITCHYARD_HEALTH_TARGET": "health_target",
            "SWITCHYARD_CACHE_TARGET": "cache_target",
            "REDIS_URL": "redis_url",
            "DATABASE_URL": "database_url",
            "OTEL_EXPORTER_OTLP_ENDPOINT": "otel_endpoint",
            "SWITCHYARD_LOG_LEVEL": "log_level",
            "SWITCHYARD_SHUTDOWN_GRACE_S": "shutdown_grace_s",
            "SWITCHYARD_CALL_TIMEOUT_S": "call_timeout_s",
            "SWITCHYARD_GENERATE_TIMEOUT_S": "generate_timeout_s",
            "SWITCHYARD_EDGE_MAX_CONCURRENT": "edge_max_concurrent",
            "SWITCHYARD_EDGE_MAX_QUEUE": "edge_max_queue",
            "SWITCHYARD_EDGE_QUEUE_TIMEOUT_S": "edge_queue_timeout_s",
            "SWITCHYARD_EDGE_DEDUP": "edge_dedup",
            "SWITCHYARD_EDGE_FRAME_LINGER_S": "edge_frame_linger_s",
            "SWITCHYARD_EDGE_REGION": "edge_region",
            "SWITCHYARD_EDGE_CACHE": "edge_cache",
            "SWITCHYARD_EDGE_CACHE_PRESENCE": "edge_cache_presence",
            "SWITCHYARD_CACHE_MAX_TEMPERATURE": "cache_max_temperature",
            "SWITCHYARD_CACHE_LOOKUP_TIMEOUT_S": "cache_lookup_timeout_s",
            "SWITCHYARD_CACHE_MAX_BYTES": "cache_max_bytes",
            "SWITCHYARD_CACHE_L1_ENTRIES": "cache_l1_entries",
            "SWITCHYARD_CACHE_SEMANTIC": "cache_semantic",
            "SWITCHYARD_CACHE_SEMANTIC_THRESHOLD": "cache_semantic_threshold",
            "SWITCHYARD_CACHE_EMBEDDER": "cache_embedder",
            "SWITCHYARD_CACHE_EMBEDDER_DIMENSIONS": "cache_embedder_dimensions",
            "SWITCHYARD_DEV_KEY": "dev_key",
            "SWITCHYARD_KEYS_REFRESH_S": "keys_refresh_s",
            "SWITCHYARD_EDGE_BUDGETS": "edge_budgets",
            "SWITCHYARD_LEASE_TTL_S": "lease_ttl_s",
            "SWITCHYARD_WEBHOOK_SECRET": "webhook_secret",
            "SWITCHYARD_LEDGER_ERASURE_KEY": "ledger_erasure_key",
            "SWITCHYARD_LEDGER_SWEEP_S": "ledger_sweep_s",
            "SWITCHYARD_LEDGER_EXPIRE_AFTER_START_S": "ledger_expire_after_start_s",
            "SWITCHYARD_HEALTH_FAILURE_THRESHOLD": "health_failure_threshold",
            "SWITCHYARD_HEALTH_ERROR_RATE_THRESHOLD": "health_error_rate_threshold",
            "SWITCHYARD_HEALTH_WINDOW_S": "health_window_s",
            "SWITCHYARD_HEALTH_MIN_SAMPLES": "health_min_samples",
            "SWITCHYARD_HEALTH_OPEN_S": "health_open_s",
            "SWITCHYARD_HEALTH_HALF_OPEN_TRIALS": "health_half_open_trials",
            "SWITCHYARD_HEALTH_PROBE_INTERVAL_S": "health_probe_interval_s",
            "SWITCHYARD_HEALTH_REPORT_INTERVAL_S": "health_report_interval_s",
            "SWITCHYARD_ROUTER_RELOAD_S": "router_reload_s",
            "SWITCHYARD_ROUTER_EQUAL_SCORE_BAND": "router_equal_score_band",
            "SWITCHYARD_ROUTER_WEIGHT_FLOOR": "router_weight_floor",
            "SWITCHYARD_ROUTER_HEADROOM_RESERVE": "router_headroom_reserve",
        }
        for var, field in simple.items():
            raw = env.get(var)
            if raw not in (None, ""):
                values[field] = raw
        log_format = env.get("SWITCHYARD_LOG_FORMAT")
        if log_format:
            if log_format not in ("json", "console"):
                raise SettingsError(f"SWITCHYARD_LOG_FORMAT must be 'json' or 'console', not {log_format!r}")
            values["log_json"] = log_format == "json"
        values["adapter_targets"] = {
            vendor: env[f"SWITCHYARD_ADAPTER_{vendor.upper()}_TARGET"]
            for vendor in ADAPTER_PORTS
            if env.get(f"SWITCHYARD_ADAPTER_{vendor.upper()}_TARGET")
        }
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in first["loc"])
            var = next((v for v, f in simple.items() if f == field), field)
            raise SettingsError(f"{var}: {first['msg']}") from None

    def port_for(self, service: str, vendor: str | None = None) -> int:
        """The port `service` listens on: SWITCHYARD_PORT, else its default."""
        if self.port is not None:
            return self.port
        if service == "adapter":
            return ADAPTER_PORTS[vendor or "openai"]
        return DEFAULT_PORTS[service]

    def adapter_target(self, vendor: str) -> str:
        """Where the adapter for `vendor` listens."""
        return self.adapter_targets.get(vendor, f"127.0.0.1:{ADAPTER_PORTS.get(vendor, 50061)}")

    @cached_property
    def catalog(self) -> Catalog:
        """The validated catalog (loaded once; raises CatalogError)."""
        return load_catalog(self.catalog_path)
