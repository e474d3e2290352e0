"""`switchyard run`: the whole mesh on one machine, as separate processes.

Vendor simulators first (for every provider without a key in the environment), then one
adapter per vendor in the catalog, the control planes, and the edge last. Each child is
`switchyard serve ...` with its peers' addresses in its environment; the supervisor waits
for every gRPC health check to say SERVING, prefixes their logs, restarts a crashed child
with backoff and stops them all on Ctrl-C.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import switchyard.v1
from switchyard.common.catalog import Catalog, provider_api_key
from switchyard.common.ports import free_port
from switchyard.common.settings import (
    ADAPTER_PORTS,
    DEFAULT_PORTS,
    EDGE_HTTP_PORT,
    LOCAL_DEV_KEY,
    Settings,
    trace_sample_ratio,
)
from switchyard.envoy_config import (
    DEFAULT_ADMIN_PORT,
    DEFAULT_LISTEN_PORT,
    DEFAULT_MESH_PORT,
    adapter_authority,
    envoy_child_spec,
    render_local_config,
)
from switchyard.sim.faults import SIMULATORS, load_simulator
from switchyard.supervisor import ChildSpec, ReadinessCheck, Supervisor, SupervisorError

CONTROL_PLANES = ("router", "ledger", "health", "cache")
SIM_API_KEY = "sim-key-not-a-secret"


@dataclass(frozen=True)
class MeshPlan:
    """What `run` starts: the children in start order, and facts for the banner."""

    children: tuple[ChildSpec, ...]
    edge_target: str
    simulated: tuple[str, ...]
    real: tuple[str, ...]
    # Simulated provider name -> the simulator's root URL (its control routes live under /_sim/).
    simulator_urls: Mapping[str, str]
    # The Envoy ingress ("127.0.0.1:8080"), or None when Envoy is not part of the plan.
    envoy_target: str | None = None
    # The edge's OpenAI-compatible HTTP front ("127.0.0.1:8000").
    edge_http_target: str = ""
    # Envoy's admin interface ("127.0.0.1:9901": stats, clusters), or None without Envoy.
    envoy_admin: str | None = None


def plan_mesh(
    catalog: Catalog,
    *,
    free_ports: bool,
    simulate: bool,
    environ: Mapping[str, str] | None = None,
    envoy_config_dir: Path | None = None,
    via_envoy: bool = False,
) -> MeshPlan:
    """Decide ports, simulators and environments for every child of the local mesh.

    With `envoy_config_dir`, Envoy is started last, in front of everything, with its
    config rendered into that directory. With `via_envoy` too, the services call each other
    through Envoy's mesh listener, as in a cluster, and Envoy starts before them.
    """
    if via_envoy and envoy_config_dir is None:
        raise ValueError("via_envoy needs envoy_config_dir")
    env = dict(os.environ if environ is None else environ)
    ports = {name: (free_port() if free_ports else port) for name, port in DEFAULT_PORTS.items()}
    http_port = free_port() if free_ports else EDGE_HTTP_PORT
    vendors = sorted({p.vendor for p in catalog.providers.values()})
    adapter_ports = {v: (free_port() if free_ports else ADAPTER_PORTS[v]) for v in vendors}
    mesh_port = free_port() if free_ports else DEFAULT_MESH_PORT
    mesh = f"127.0.0.1:{mesh_port}"
    common_env = {
        "SWITCHYARD_HOST": "127.0.0.1",
        "SWITCHYARD_LOG_FORMAT": env.get("SWITCHYARD_LOG_FORMAT", "console"),
        "SWITCHYARD_DEV_KEY": env.get("SWITCHYARD_DEV_KEY", LOCAL_DEV_KEY),
        **{
            f"SWITCHYARD_{name.upper()}_TARGET": mesh if via_envoy else f"127.0.0.1:{ports[name]}"
            for name in CONTROL_PLANES
        },
        **{
            f"SWITCHYARD_ADAPTER_{v.upper()}_TARGET": f"{adapter_authority(v)}@{mesh}"
            if via_envoy
            else f"127.0.0.1:{p}"
            for v, p in adapter_ports.items()
        },
    }
    exe = (sys.executable, "-m", "switchyard.cli")
    children: list[ChildSpec] = []
    simulated: list[str] = []
    real: list[str] = []
    simulator_urls: dict[str, str] = {}
    for name, provider in sorted(catalog.providers.items()):
        has_key = provider_api_key(name, provider, env) is not None
        if has_key and not simulate:
            real.append(name)
            continue
        if provider.vendor not in SIMULATORS:
            continue  # neither a key nor a simulator: its adapter will answer AUTH_FAILED
        sim_port = free_port()
        children.append(
            ChildSpec(
                name=f"sim-{name}",
                argv=(*exe, "sim", provider.vendor, "--port", str(sim_port)),
                env={},
                readiness=ReadinessCheck.stdout_line(r"^listening http://"),
            )
        )
        prefix = f"SWITCHYARD_PROVIDER_{name.upper().replace('-', '_')}"
        module = load_simulator(provider.vendor)
        root = f"http://127.0.0.1:{sim_port}"
        # A simulator serving several dialects says which base URL a provider's options pick.
        custom = getattr(module, "provider_base_url", None)
        common_env[f"{prefix}_BASE_URL"] = (
            custom(root, provider.options) if custom else root + module.API_PREFIX
        )
        common_env[f"{prefix}_API_KEY"] = SIM_API_KEY
        simulated.append(name)
        simulator_urls[name] = f"http://127.0.0.1:{sim_port}"
    for vendor in vendors:
        port = adapter_ports[vendor]
        children.append(_service(f"adapter-{vendor}", ("adapter", "--vendor", vendor), port, common_env, exe))
    for name in CONTROL_PLANES:
        children.append(_service(name, (name,), ports[name], common_env, exe))
    edge_env = {**common_env, "SWITCHYARD_HTTP_PORT": str(http_port)}
    children.append(_service("edge", ("edge",), ports["edge"], edge_env, exe))
    envoy_target = envoy_admin = None
    if envoy_config_dir is not None:
        listen_port = free_port() if free_ports else DEFAULT_LISTEN_PORT
        admin_port = free_port() if free_ports else DEFAULT_ADMIN_PORT
        config = envoy_config_dir / "envoy.yaml"
        config.write_text(
            render_local_config(
                listen_port=listen_port,
                admin_port=admin_port,
                mesh_port=mesh_port,
                edge_target=f"127.0.0.1:{ports['edge']}",
                edge_http_target=f"127.0.0.1:{http_port}",
                service_targets={
                    **{name: f"127.0.0.1:{ports[name]}" for name in CONTROL_PLANES},
                    **{f"adapter-{v}": f"127.0.0.1:{p}" for v, p in adapter_ports.items()},
                },
                descriptor_path=str(
                    Path(switchyard.v1.__file__).resolve().parents[2] / "switchyard.protoset"
                ),
                otlp_endpoint=env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
                sample_ratio=trace_sample_ratio(env),
            )
        )
        envoy = envoy_child_spec(config, admin_port=admin_port)
        # Through the mesh the services need Envoy from the start; Envoy's first health checks
        # fail fast while they come up, and it routes to them as soon as they answer.
        if via_envoy:
            children.insert(0, envoy)
        else:
            children.append(envoy)
        envoy_target = f"127.0.0.1:{listen_port}"
        envoy_admin = f"127.0.0.1:{admin_port}"
    return MeshPlan(
        children=tuple(children),
        edge_target=f"127.0.0.1:{ports['edge']}",
        simulated=tuple(simulated),
        real=tuple(real),
        simulator_urls=simulator_urls,
        envoy_target=envoy_target,
        edge_http_target=f"127.0.0.1:{http_port}",
        envoy_admin=envoy_admin,
    )


def _service(
    name: str, args: tuple[str, ...], port: int, env: Mapping[str, str], exe: tuple[str, ...]
) -> ChildSpec:
    return ChildSpec(
        name=name,
        argv=(*exe, "serve", *args),
        env={**env, "SWITCHYARD_PORT": str(port)},
        readiness=ReadinessCheck.grpc_health(f"127.0.0.1:{port}"),
    )


def banner(plan: MeshPlan) -> str:
    """What the operator reads once the mesh is up."""
    lines = ["", "Switchyard is up."]
    if plan.envoy_target:
        lines.append(f"  Ingress:     {plan.envoy_target}   (Envoy: gRPC, gRPC-Web, REST/JSON)")
    lines.append(f"  gRPC edge:   {plan.edge_target}   (switchyard.v1.GatewayService, direct)")
    lines.append(
        f"  OpenAI HTTP: http://{plan.envoy_target or plan.edge_http_target}/v1   (chat/completions, models)"
    )
    if plan.simulated:
        lines.append(
            "  Vendors:     SIMULATED: answers come from local vendor simulators, not real models "
            f"({', '.join(plan.simulated)}). Set a provider key (e.g. OPENAI_API_KEY) to use the real vendor."
        )
    if plan.real:
        lines.append(f"  Vendors:     real: {', '.join(plan.real)}")
    lines.append(f"  API key:     {LOCAL_DEV_KEY}   (tenant 'default'; `switchyard chat` sends it)")
    lines.append(
        f'  Try:         switchyard chat "hello" --stream --target {plan.envoy_target or plan.edge_target}'
    )
    lines.append("  Stop:        Ctrl-C")
    return "\n".join(lines) + "\n"


async def run_mesh(*, free_ports: bool, simulate: bool, via_envoy: bool, ready_timeout_s: float) -> int:
    """Start the mesh, wait until it is ready, print the banner and supervise until Ctrl-C."""
    settings = Settings.from_env()
    with tempfile.TemporaryDirectory(prefix="switchyard-run-") as config_dir:
        plan = plan_mesh(
            settings.catalog,
            free_ports=free_ports,
            simulate=simulate,
            envoy_config_dir=Path(config_dir),
            via_envoy=via_envoy,
        )
        return await _supervise(plan, ready_timeout_s)


async def _supervise(plan: MeshPlan, ready_timeout_s: float) -> int:
    supervisor = Supervisor(plan.children)
    supervisor.install_signal_handlers()
    try:
        await supervisor.start()
        await supervisor.wait_ready(ready_timeout_s)
    except SupervisorError as exc:
        print(f"switchyard: error: the mesh did not start: {exc}", file=sys.stderr)
        await supervisor.stop()
        return 1
    print(banner(plan), flush=True)
    return await supervisor.run()
