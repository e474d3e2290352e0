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
from collections.abc import Mapping
from dataclasses import dataclass

from switchyard.common.catalog import Catalog, provider_api_key
from switchyard.common.ports import free_port
from switchyard.common.settings import ADAPTER_PORTS, DEFAULT_PORTS, Settings
from switchyard.sim.faults import SIMULATORS
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


def plan_mesh(
    catalog: Catalog, *, free_ports: bool, simulate: bool, environ: Mapping[str, str] | None = None
) -> MeshPlan:
    """Decide ports, simulators and environments for every child of the local mesh."""
    env = dict(os.environ if environ is None else environ)
    ports = {name: (free_port() if free_ports else port) for name, port in DEFAULT_PORTS.items()}
    vendors = sorted({p.vendor for p in catalog.providers.values()})
    adapter_ports = {v: (free_port() if free_ports else ADAPTER_PORTS[v]) for v in vendors}
    common_env = {
        "SWITCHYARD_HOST": "127.0.0.1",
        "SWITCHYARD_LOG_FORMAT": env.get("SWITCHYARD_LOG_FORMAT", "console"),
        **{f"SWITCHYARD_{name.upper()}_TARGET": f"127.0.0.1:{ports[name]}" for name in CONTROL_PLANES},
        **{f"SWITCHYARD_ADAPTER_{v.upper()}_TARGET": f"127.0.0.1:{p}" for v, p in adapter_ports.items()},
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
        common_env[f"{prefix}_BASE_URL"] = f"http://127.0.0.1:{sim_port}/v1"
        common_env[f"{prefix}_API_KEY"] = SIM_API_KEY
        simulated.append(name)
        simulator_urls[name] = f"http://127.0.0.1:{sim_port}"
    for vendor in vendors:
        port = adapter_ports[vendor]
        children.append(_service(f"adapter-{vendor}", ("adapter", "--vendor", vendor), port, common_env, exe))
    for name in CONTROL_PLANES:
        children.append(_service(name, (name,), ports[name], common_env, exe))
    children.append(_service("edge", ("edge",), ports["edge"], common_env, exe))
    return MeshPlan(
        children=tuple(children),
        edge_target=f"127.0.0.1:{ports['edge']}",
        simulated=tuple(simulated),
        real=tuple(real),
        simulator_urls=simulator_urls,
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
    lines = ["", "Switchyard is up.", f"  gRPC edge:   {plan.edge_target}   (switchyard.v1.GatewayService)"]
    if plan.simulated:
        lines.append(
            "  Vendors:     SIMULATED: answers come from local vendor simulators, not real models "
            f"({', '.join(plan.simulated)}). Set a provider key (e.g. OPENAI_API_KEY) to use the real vendor."
        )
    if plan.real:
        lines.append(f"  Vendors:     real: {', '.join(plan.real)}")
    lines.append(f'  Try:         switchyard chat "hello" --stream --target {plan.edge_target}')
    lines.append("  Stop:        Ctrl-C")
    return "\n".join(lines) + "\n"


async def run_mesh(*, free_ports: bool, simulate: bool, ready_timeout_s: float) -> int:
    """Start the mesh, wait until it is ready, print the banner and supervise until Ctrl-C."""
    settings = Settings.from_env()
    plan = plan_mesh(settings.catalog, free_ports=free_ports, simulate=simulate)
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
