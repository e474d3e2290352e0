"""The orchestrator: start the mesh, pin processes, drive the load generator, read /proc.

The mesh is exactly what `switchyard run` starts (its plan, simulated vendors, free ports),
under the same supervisor, with its logs in a temporary file. On a machine with two or more
cores the orchestrator (the mesh's supervisor) pins itself to one core for the whole run, so
every mesh process (and each of its threads) inherits that core, and the load generator is
spawned on and pins itself to another. CPU time is read from /proc/<pid>/stat of every child
around each measured window.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from bench.load import LITELLM_KEY, LoadConfig, Mode, PathName, Phase, PhaseResult, serve
from switchyard.common.catalog import DEFAULT_CATALOG, DEFAULT_TIERS, load_catalog
from switchyard.common.ports import free_port
from switchyard.local_mesh import SIM_API_KEY, MeshPlan, plan_mesh
from switchyard.supervisor import Supervisor
from switchyard.v1 import ledger_pb2, ledger_pb2_grpc

SIM_CHILD = "sim-openai"
# One fixed answer for every path and mode: 40 words, so 20 chunks carry 2 words each.
ANSWER = " ".join(f"word{i}" for i in range(40))
# Fastest: no delays, one content chunk (the gateway streams from the vendor even for unary calls).
UNARY_KNOBS: dict[str, Any] = {"first_byte_delay_ms": 0, "chunk_delay_ms": 0, "chunks": 1, "text": ANSWER}
STREAM_KNOBS: dict[str, Any] = {"first_byte_delay_ms": 0, "chunk_delay_ms": 5, "chunks": 20, "text": ANSWER}
# Idle streams: the vendor takes its time to answer, so every stream stays open and waiting.
IDLE_KNOBS: dict[str, Any] = {
    "first_byte_delay_ms": 120_000,
    "chunk_delay_ms": 0,
    "chunks": 1,
    "text": ANSWER,
}
IDLE_STREAMS = 1_000
# Tracing as a production mesh would run it: one trace in ten recorded, exported over OTLP.
TRACE_SAMPLE_RATIO = 0.1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PATHS: tuple[PathName, ...] = ("direct", "edge")
# Through Envoy's ingress too, for the unary and streaming modes (cache hits: the edge only).
ENVOY_PATHS: tuple[PathName, ...] = ("envoy", "envoy_http")


@dataclass(frozen=True)
class Placement:
    """Which cores the mesh and the load generator were allowed to run on."""

    pinned: bool
    mesh_cores: tuple[int, ...]
    loadgen_cores: tuple[int, ...]
    online_cores: int


def plan_placement() -> tuple[int | None, int | None]:
    """(mesh core, load generator core), or (None, None) when there is no core to spare."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None
    return cores[0], cores[-1]


def proc_cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def machine_cpu_s() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine so far, from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks[:8]
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def own_cpu_s() -> float:
    """CPU seconds of this process (the orchestrator and supervisor), all threads."""
    times = os.times()
    return times.user + times.system


class Mesh:
    """A running mesh: its plan, its supervisor and the pids of its children."""

    def __init__(self, plan: MeshPlan, supervisor: Supervisor) -> None:
        self.plan = plan
        self.supervisor = supervisor
        self.names = tuple(child.name for child in plan.children)
        self.pids = self._current_pids()
        # The LiteLLM proxy, when this run compares against one (not a mesh child).
        self.litellm: LiteLLM | None = None

    def _current_pids(self) -> dict[str, int]:
        pids = {name: self.supervisor.pid(name) for name in self.names}
        missing = [name for name, pid in pids.items() if pid is None]
        if missing:
            raise RuntimeError(f"mesh children not running: {', '.join(missing)}")
        return {name: pid for name, pid in pids.items() if pid is not None}

    def check_unchanged(self) -> None:
        """Fail loudly if a child restarted: its CPU and memory figures would be wrong."""
        if self._current_pids() != self.pids or any(self.supervisor.restarts.values()):
            raise RuntimeError(f"a mesh child restarted during the run: {dict(self.supervisor.restarts)}")

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by every child (and by LiteLLM's processes, as "litellm")."""
        used = {name: proc_cpu_s(pid) for name, pid in self.pids.items()}
        if self.litellm is not None:
            used[LITELLM_CHILD] = self.litellm.cpu_s()
        return used

    def rss_kib(self) -> dict[str, int]:
        """Resident memory of every child (and of LiteLLM's processes, as "litellm")."""
        rss = {name: proc_rss_kib(pid) for name, pid in self.pids.items()}
        if self.litellm is not None:
            rss[LITELLM_CHILD] = self.litellm.rss_kib()
        return rss

    def cores(self) -> tuple[int, ...]:
        """Union of the cores the children may run on."""
        return tuple(sorted(set().union(*(os.sched_getaffinity(pid) for pid in self.pids.values()))))


@contextmanager
def pinned_to(core: int | None) -> Iterator[None]:
    """Pin this process to `core` while children are spawned (they inherit it), then restore."""
    before = os.sched_getaffinity(0)
    if core is not None:
        os.sched_setaffinity(0, {core})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


REPO = Path(__file__).resolve().parents[1]
# `make bench-litellm` installs the LiteLLM proxy here (bench/litellm/requirements.txt).
LITELLM_BIN = REPO / "bench" / ".litellm-venv" / "bin" / "litellm"
LITELLM_MODEL = "gpt-4o-mini"
LITELLM_CHILD = "litellm"


def tree_pids(pid: int) -> list[int]:
    """`pid` and every descendant (LiteLLM's workers), from /proc/<pid>/task/*/children."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                queue.extend(int(child) for child in (task / "children").read_text().split())
    return found


class LiteLLM:
    """A LiteLLM proxy on the same simulator (one model, no database, telemetry off), with as
    many workers as the mesh has cores; it inherits the orchestrator's (the mesh's) core."""

    def __init__(self, sim_root: str, workers: int, log: Any) -> None:
        self.port = free_port()
        self.workers = workers
        self._dir = Path(tempfile.mkdtemp(prefix="switchyard-bench-litellm-"))
        config = {
            "model_list": [
                {
                    "model_name": LITELLM_MODEL,
                    "litellm_params": {
                        "model": f"openai/{LITELLM_MODEL}",
                        "api_base": f"{sim_root}/v1",
                        "api_key": SIM_API_KEY,
                    },
                }
            ],
            "litellm_settings": {"telemetry": False},
            "general_settings": {"master_key": LITELLM_KEY},
        }
        (self._dir / "config.yaml").write_text(yaml.safe_dump(config))
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "DATABASE_URL"}
        env.update(
            {"LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
        )
        self._process = subprocess.Popen(
            [
                str(LITELLM_BIN),
                "--config",
                str(self._dir / "config.yaml"),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--num_workers",
                str(workers),
            ],
            cwd=self._dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def ready(self, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient(timeout=2) as http:
            while True:
                if self._process.poll() is not None:
                    raise RuntimeError(f"the LiteLLM proxy exited with {self._process.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get(f"{self.root}/health/liveliness")).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the LiteLLM proxy did not answer within {timeout_s} s")
                await asyncio.sleep(0.5)

    def cpu_s(self) -> float:
        total = 0.0
        for pid in tree_pids(self._process.pid):
            with contextlib.suppress(OSError):
                total += proc_cpu_s(pid)
        return total

    def rss_kib(self) -> int:
        total = 0
        for pid in tree_pids(self._process.pid):
            with contextlib.suppress(OSError):
                total += proc_rss_kib(pid)
        return total

    def stop(self) -> None:
        if self._process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(5)
        shutil.rmtree(self._dir, ignore_errors=True)


# The benchmark's tenant may send as fast as it can: rate limits are measured, not hit.
BENCH_TIER = {"requests_per_minute": 100_000_000, "lockout_seconds": 0}


def _bench_catalog() -> Path:
    """The embedded catalog with the `default` tenant on an unlimited tier, as a file."""
    text = resources.files("switchyard.common").joinpath(DEFAULT_CATALOG).read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    data["tiers"] = {**{k: v.model_dump() for k, v in DEFAULT_TIERS.items()}, "bench": BENCH_TIER}
    data["tenants"] = {**data.get("tenants", {}), "default": {"tier": "bench"}}
    # One upstream connection per idle stream (the vendor has not answered any of them yet).
    for provider in data["providers"].values():
        provider["max_connections"] = 2 * IDLE_STREAMS
    path = Path(tempfile.mkdtemp(prefix="switchyard-bench-")) / "catalog.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    """Where the mesh's spans go: an OTLP/gRPC trace service that counts them and keeps nothing."""

    def __init__(self) -> None:
        self.spans = 0
        self._server = grpc.aio.server()
        # The OTLP package's generated gRPC module carries no types.
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)  # type: ignore[no-untyped-call]
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        await self._server.start()

    async def stop(self) -> None:
        await self._server.stop(1)

    async def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.spans += sum(len(scope.spans) for rs in request.resource_spans for scope in rs.scope_spans)
        return trace_service_pb2.ExportTraceServiceResponse()


async def set_bench_budget(ledger_target: str) -> None:
    """A hard daily budget on the benchmark's tenant, far above what a run spends: every
    request holds against the edge's lease and commits against it, as a budgeted tenant's does."""
    async with grpc.aio.insecure_channel(ledger_target) as channel:
        await ledger_pb2_grpc.CostLedgerServiceStub(channel).SetBudget(
            ledger_pb2.SetBudgetRequest(
                budget=ledger_pb2.Budget(
                    budget_id="default:bench:daily",
                    scope=ledger_pb2.BudgetScope(tenant_id="default"),
                    window=ledger_pb2.BUDGET_WINDOW_DAILY,
                    enforcement=ledger_pb2.BUDGET_ENFORCEMENT_HARD,
                    limit_micros=10**12,
                ),
                actor="bench",
            ),
            timeout=10,
        )


async def start_mesh(log: Any, otlp_endpoint: str | None, env: Mapping[str, str] | None = None) -> Mesh:
    """Start the local mesh with simulated vendors on free ports and Envoy in front (as `switchyard
    run` does), with every feature on: tracing at `TRACE_SAMPLE_RATIO` to `otlp_endpoint` and a
    hard budget on the tenant (see `set_bench_budget`); logs to `log`.

    `otlp_endpoint` None turns tracing off (in the services and in Envoy); `env` is added to
    every child's environment (`SWITCHYARD_EDGE_CACHE=false`, say). The children inherit this
    process's CPU affinity.
    """
    environ = {
        k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and not k.startswith("OTEL_")
    }
    # Envoy's config is rendered from these too: it samples at the same ratio.
    tracing = (
        {}
        if otlp_endpoint is None
        else {
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
            "OTEL_TRACES_SAMPLER_ARG": str(TRACE_SAMPLE_RATIO),
        }
    )
    environ.update(tracing)
    catalog_path = _bench_catalog()
    envoy_dir = Path(tempfile.mkdtemp(prefix="switchyard-bench-envoy-"))
    plan = plan_mesh(
        load_catalog(catalog_path),
        free_ports=True,
        simulate=True,
        environ=environ,
        envoy_config_dir=envoy_dir,
    )
    state_dir = tempfile.mkdtemp(prefix="switchyard-bench-state-")
    extra = {
        **tracing,
        # Room for the idle-streams phase: every stream is admitted, none waits in the queue.
        "SWITCHYARD_EDGE_MAX_CONCURRENT": str(2 * IDLE_STREAMS),
        "SWITCHYARD_SHUTDOWN_GRACE_S": "1",
        "SWITCHYARD_CATALOG": str(catalog_path),
        "SWITCHYARD_STATE_DIR": state_dir,
        # Exact lookups: a semantic one embeds every question first, and that embedding (5-15 ms
        # of CPU for a short question on this class of machine) is a cost the tenant chooses;
        # `python -m bench.cache` measures it on its own.
        "SWITCHYARD_CACHE_SEMANTIC": "false",
        **(env or {}),
    }
    children = tuple(dataclasses.replace(c, env={**c.env, **extra}) for c in plan.children)
    plan = dataclasses.replace(plan, children=children)
    supervisor = Supervisor(children, out=log, color=False)
    await supervisor.start()
    try:
        await supervisor.wait_ready(90)
        # Before the first request, so every edge loads it with its budget directory.
        ledger = next(c for c in children if c.name == "ledger")
        await set_bench_budget(f"127.0.0.1:{ledger.env['SWITCHYARD_PORT']}")
    except BaseException:
        await supervisor.stop(grace_s=2)
        raise
    return Mesh(plan, supervisor)


class LoadGenerator:
    """The load generator process and the pipe to it."""

    def __init__(self, config: LoadConfig) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=serve, args=(child_conn, config), name="bench-loadgen", daemon=True
        )
        self._process.start()
        child_conn.close()
        self.cores: tuple[int, ...] = ()

    async def ready(self, timeout_s: float = 60) -> None:
        """Wait for the process to build its clients and report its cores."""
        self.cores = tuple(await self._recv(timeout_s))

    async def run(self, phase: Phase) -> PhaseResult:
        """Run one phase in the load generator and return its raw result."""
        self._conn.send(phase)
        result: PhaseResult = await self._recv(phase.duration_s + 60)
        return result

    async def _recv(self, timeout_s: float) -> Any:
        if not await asyncio.to_thread(self._conn.poll, timeout_s):
            raise TimeoutError("the load generator did not answer in time")
        try:
            return self._conn.recv()
        except EOFError:
            await asyncio.to_thread(self._process.join, 5)
            raise RuntimeError(
                f"the load generator exited (code {self._process.exitcode}); its traceback is above"
            ) from None

    async def close(self) -> None:
        """Ask the process to stop, then make sure it has."""
        try:
            self._conn.send(None)
        except OSError:
            pass
        await asyncio.to_thread(self._process.join, 10)
        if self._process.is_alive():
            self._process.kill()
            await asyncio.to_thread(self._process.join, 5)
        self._conn.close()


@dataclass
class Measured:
    """A phase result with the mesh's CPU use over exactly that window (per child, seconds)."""

    result: PhaseResult
    mesh_cpu_s: dict[str, float]
    # CPU used on the machine by everything that is not this run (other users' processes),
    # and CPU time the hypervisor stole, over the same window: noise indicators.
    other_cpu_s: float = 0.0
    steal_cpu_s: float = 0.0


@dataclass
class RunData:
    """Everything one bench run measured, before it is turned into figures."""

    measured: list[Measured]
    rss_kib: dict[str, int]
    placement: Placement
    mesh_children: tuple[str, ...]
    wall_s: float
    # Idle streams: how many were asked for and still open at the end, and the mesh's
    # memory just before they were opened and while they were held.
    idle_asked: int = 0
    idle_open: int = 0
    idle_errors: str = ""
    idle_rss_before_kib: dict[str, int] = dataclasses.field(default_factory=dict)
    idle_rss_kib: dict[str, int] = dataclasses.field(default_factory=dict)
    # Spans the mesh exported to the run's OTLP sink (tracing at TRACE_SAMPLE_RATIO).
    spans_exported: int = 0


async def set_knobs(sim_root: str, knobs: dict[str, Any]) -> None:
    """Replace the simulator's server-wide knobs and reset its stats."""
    async with httpx.AsyncClient(base_url=sim_root, timeout=5) as http:
        (await http.post("/_sim/knobs", json=knobs)).raise_for_status()
        (await http.post("/_sim/stats/reset")).raise_for_status()


async def measure(load: LoadGenerator, mesh: Mesh, phase: Phase, warmup_s: float) -> Measured:
    """Warm up at the phase's concurrency, then run it with the mesh's CPU read around it."""
    if warmup_s > 0:
        await load.run(dataclasses.replace(phase, duration_s=warmup_s))
    machine_before, own_before, before = machine_cpu_s(), own_cpu_s(), mesh.cpu_s()
    result = await load.run(phase)
    machine_after, own_after, after = machine_cpu_s(), own_cpu_s(), mesh.cpu_s()
    if not result.latencies_ns:
        where = f"{phase.path} {phase.mode} c={phase.concurrency}"
        raise RuntimeError(f"{where}: no call succeeded: {result.first_error}")
    mesh_cpu = {name: after[name] - before[name] for name in after}
    ours = sum(mesh_cpu.values()) + result.client_cpu_s + (own_after - own_before)
    other = (machine_after[0] - machine_before[0]) - ours
    steal = machine_after[1] - machine_before[1]
    return Measured(result, mesh_cpu, other_cpu_s=other, steal_cpu_s=steal)


async def measure_idle_streams(
    load: LoadGenerator, mesh: Mesh, sim_root: str, streams: int, *, hold_s: float
) -> dict[str, Any]:
    """Open `streams` ChatStreams the simulator is slow to answer, read the mesh's memory while
    they are held (three quarters into the hold), then let the load generator cancel them."""
    await set_knobs(sim_root, IDLE_KNOBS)
    before = mesh.rss_kib()
    running = asyncio.create_task(load.run(Phase("edge", "idle", streams, hold_s, streams)))
    await asyncio.sleep(hold_s * 0.75)
    during = mesh.rss_kib()
    result = await running
    await set_knobs(sim_root, UNARY_KNOBS)
    return {
        "idle_asked": streams,
        "idle_open": result.open_at_end,
        "idle_errors": f"{result.errors} failed; first: {result.first_error}" if result.errors else "",
        "idle_rss_before_kib": before,
        "idle_rss_kib": during,
    }


async def run(
    *,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    unary_concurrency: Sequence[int],
    stream_concurrency: Sequence[int],
    compare_litellm: bool = False,
    idle_streams: int = IDLE_STREAMS,
) -> RunData:
    """Start everything, measure every phase (direct and edge interleaved), stop everything.

    The mesh's log goes to a temporary file, removed after a successful run and kept (its
    path printed to stderr) after a failed one.
    """
    started = time.perf_counter()
    log_dir = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
    try:
        with (log_dir / "mesh.log").open("w") as log:
            levels = (unary_concurrency, stream_concurrency)
            data = await _run_with_mesh(
                log, duration_s, warmup_s, max_requests, levels, compare_litellm, idle_streams
            )
    except BaseException:
        print(f"bench: the mesh's log is kept in {log_dir / 'mesh.log'}", file=sys.stderr)
        raise
    shutil.rmtree(log_dir, ignore_errors=True)
    data.wall_s = time.perf_counter() - started
    return data


async def _run_with_mesh(
    log: Any,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    levels: tuple[Sequence[int], Sequence[int]],
    compare_litellm: bool,
    idle_streams: int,
) -> RunData:
    mesh_core, load_core = plan_placement()
    # The orchestrator (which is the mesh's supervisor) stays on the mesh's core for the run.
    with pinned_to(mesh_core):
        return await _measure_all(
            log,
            mesh_core,
            load_core,
            duration_s,
            warmup_s,
            max_requests,
            levels,
            compare_litellm,
            idle_streams,
        )


async def _measure_all(
    log: Any,
    mesh_core: int | None,
    load_core: int | None,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    levels: tuple[Sequence[int], Sequence[int]],
    compare_litellm: bool,
    idle_streams: int,
) -> RunData:
    sink = OtlpSink()
    await sink.start()
    try:
        return await _measure_with_sink(
            log,
            sink,
            mesh_core,
            load_core,
            duration_s,
            warmup_s,
            max_requests,
            levels,
            compare_litellm,
            idle_streams,
        )
    finally:
        await sink.stop()


async def _measure_with_sink(
    log: Any,
    sink: OtlpSink,
    mesh_core: int | None,
    load_core: int | None,
    duration_s: float,
    warmup_s: float,
    max_requests: int,
    levels: tuple[Sequence[int], Sequence[int]],
    compare_litellm: bool,
    idle_streams: int,
) -> RunData:
    mesh = await start_mesh(log, sink.endpoint)
    load: LoadGenerator | None = None
    measured: list[Measured] = []
    try:
        sim_root = mesh.plan.simulator_urls["openai"]
        assert mesh.plan.envoy_target is not None
        if compare_litellm:
            # As many workers as the mesh has cores, on those cores (this process's affinity).
            mesh.litellm = LiteLLM(sim_root, workers=len(mesh.cores()), log=log)
            await mesh.litellm.ready()
        config = LoadConfig(
            sim_root,
            SIM_API_KEY,
            mesh.plan.edge_target,
            load_core,
            mesh.plan.envoy_target,
            mesh.litellm.root if mesh.litellm is not None else None,
        )
        with pinned_to(load_core):
            load = LoadGenerator(config)
        await load.ready()
        modes: tuple[tuple[Mode, Sequence[int], dict[str, Any]], ...] = (
            ("unary", levels[0], UNARY_KNOBS),
            ("stream", levels[1], STREAM_KNOBS),
            ("cached", levels[1], UNARY_KNOBS),
        )
        for mode, concurrencies, knobs in modes:
            await set_knobs(sim_root, knobs)
            paths = PATHS if mode == "cached" else PATHS + ENVOY_PATHS
            if mode != "cached" and mesh.litellm is not None:
                paths += ("litellm",)
            for concurrency in concurrencies:
                for path in paths:
                    phase = Phase(path, mode, concurrency, duration_s, max_requests)
                    measured.append(await measure(load, mesh, phase, warmup_s))
        rss_after_phases = mesh.rss_kib()
        idle = await measure_idle_streams(
            load, mesh, sim_root, idle_streams, hold_s=max(3.0, 1.25 * duration_s)
        )
        mesh.check_unchanged()
        placement = Placement(
            pinned=mesh_core is not None,
            mesh_cores=mesh.cores(),
            loadgen_cores=load.cores,
            online_cores=os.cpu_count() or 0,
        )
        return RunData(
            measured, rss_after_phases, placement, mesh.names, 0.0, spans_exported=sink.spans, **idle
        )
    finally:
        if load is not None:
            await load.close()
        if mesh.litellm is not None:
            mesh.litellm.stop()
        await mesh.supervisor.stop(grace_s=2)
