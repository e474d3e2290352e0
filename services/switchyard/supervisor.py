"""Process supervisor behind ``switchyard run``.

The supervisor starts every child of the local mesh (edge, router, ledger,
health, cache, adapters, vendor simulators, ...) as a separate OS process,
multiplexes their output onto one stream, waits until each one reports ready,
keeps them running, and stops them cleanly.

Spawning
    Children are started in the order given, each in its own session/process
    group (``start_new_session=True``) so that a Ctrl-C typed in the terminal
    reaches only the supervisor, which then shuts the children down in order.
    stdin is ``/dev/null``; stdout and stderr are merged into one pipe that is
    read asynchronously and written to ``out`` line by line as ``name | line``
    (names padded to equal width, coloured per child on a terminal).  The
    environment is ``os.environ`` + ``ChildSpec.env`` + ``PYTHONUNBUFFERED=1``.

Readiness
    :meth:`Supervisor.wait_ready` polls every child about every 50 ms until its
    :class:`ReadinessCheck` passes: a gRPC ``grpc.health.v1.Health/Check``
    answering ``SERVING``, an HTTP ``GET`` answering 2xx, or a line of output
    matching a regular expression.  A child without a check is ready as soon as
    it is running.  If the deadline passes, or a child exits while starting,
    :class:`SupervisorError` is raised naming the child(ren) together with the
    last lines they printed.

Restart policy
    While :meth:`Supervisor.run` is active, a child that exits without being
    asked to (any exit code, including 0, or death by a signal) is logged as
    ``name exited with code N, restarting in X s`` and started again after a
    delay.  The delay starts at ``backoff_initial_s`` and doubles after every
    restart, capped at ``backoff_max_s``.  Once an instance has stayed up for at
    least ``stable_after_s`` seconds, its next crash starts over from
    ``backoff_initial_s``.  If the restart itself fails (e.g. the executable
    vanished), the attempt is retried with the same backoff.  Children with
    ``restart=False`` are not restarted; when every child has ended that way,
    ``run()`` returns (0 if all exited with code 0, else 1).  Leftover members
    of a crashed child's process group are SIGKILLed before the restart so
    that they cannot keep ports or the output pipe busy.

Stopping
    :meth:`Supervisor.stop` (or SIGINT/SIGTERM once
    :meth:`Supervisor.install_signal_handlers` was called) sends SIGTERM to
    every child's process group in reverse start order, waits up to ``grace_s``
    seconds, SIGKILLs whatever is left and waits for all output to be drained.
    A second Ctrl-C during that grace period kills everything immediately.
    As a last-resort safety net, process groups still alive when the Python
    interpreter exits (e.g. ``stop()`` was never reached) are SIGKILLed from
    an ``atexit`` hook.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import re
import signal
import ssl
import sys
import urllib.parse
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, TextIO

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = [
    "ChildSpec",
    "ReadinessCheck",
    "ReadinessKind",
    "Supervisor",
    "SupervisorError",
]

ReadinessKind = Literal["grpc", "http", "stdout"]

#: Label used for the supervisor's own messages in the merged output.
SUPERVISOR_LABEL = "supervisor"
#: Number of output lines remembered per child for error reports.
TAIL_LINES = 20

_POLL_INTERVAL_S = 0.05
_PROBE_TIMEOUT_S = 0.5
_READ_CHUNK = 64 * 1024
_MAX_LINE = 64 * 1024
_DRAIN_TIMEOUT_S = 1.0
_KILL_WAIT_S = 5.0
_GRPC_CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    # Keep reconnect attempts frequent while a child is still starting up;
    # the gRPC defaults (1 s growing to 120 s) would delay readiness.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
    ("grpc.enable_retries", 0),
)
_COLORS: tuple[str, ...] = ("36", "33", "32", "35", "34", "96", "93", "92", "95", "94")
_SUPERVISOR_COLOR = "1"
_RESET = "\x1b[0m"


class SupervisorError(Exception):
    """An expected failure: a child could not start, exited while starting,
    or did not become ready in time.  The message is meant for end users."""


@dataclass(frozen=True)
class ReadinessCheck:
    """How to tell that a child is ready to serve.

    Build one with :meth:`grpc_health`, :meth:`http_get` or
    :meth:`stdout_line` rather than with the constructor.

    * ``kind="grpc"``: ``grpc.health.v1.Health/Check`` against ``target``
      (``"127.0.0.1:PORT"``) for ``service`` (``""`` = overall server health)
      returns ``SERVING``.
    * ``kind="http"``: ``GET target`` (an ``http://`` or ``https://`` URL)
      returns a 2xx status.  TLS certificates are not verified.
    * ``kind="stdout"``: a line of the child's output (stdout or stderr)
      matches the regular expression ``pattern`` (``re.search``).  Only lines
      printed by the current instance of the child count.
    """

    kind: ReadinessKind
    target: str = ""
    service: str = ""
    pattern: str = ""

    def __post_init__(self) -> None:
        if self.kind == "grpc":
            if not self.target:
                raise ValueError("gRPC readiness check needs a target like '127.0.0.1:50051'")
        elif self.kind == "http":
            scheme = urllib.parse.urlsplit(self.target).scheme
            if scheme not in ("http", "https"):
                raise ValueError(f"HTTP readiness check needs an http(s) URL, got {self.target!r}")
        elif self.kind == "stdout":
            try:
                re.compile(self.pattern)
            except re.error as exc:
                raise ValueError(f"invalid readiness pattern {self.pattern!r}: {exc}") from None
        else:
            raise ValueError(f"unknown readiness kind {self.kind!r}")

    @classmethod
    def grpc_health(cls, target: str, service: str = "") -> ReadinessCheck:
        """Ready when the gRPC health service at ``target`` reports SERVING."""
        return cls(kind="grpc", target=target, service=service)

    @classmethod
    def http_get(cls, url: str) -> ReadinessCheck:
        """Ready when ``GET url`` answers with a 2xx status."""
        return cls(kind="http", target=url)

    @classmethod
    def stdout_line(cls, pattern: str) -> ReadinessCheck:
        """Ready once the child prints a line matching ``pattern``."""
        return cls(kind="stdout", pattern=pattern)

    def describe(self) -> str:
        """Human-readable description, used in error messages."""
        if self.kind == "grpc":
            return f"gRPC health {self.target} (service {self.service!r}) to be SERVING"
        if self.kind == "http":
            return f"GET {self.target} to return 2xx"
        return f"an output line matching /{self.pattern}/"


@dataclass(frozen=True)
class ChildSpec:
    """One process to supervise.

    ``name`` is the short label used as output prefix and in messages;
    ``env`` is merged over ``os.environ``; ``readiness`` ``None`` means ready
    as soon as the process runs; ``restart=False`` leaves the child down once
    it exits.
    """

    name: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    readiness: ReadinessCheck | None = None
    restart: bool = True

    def __post_init__(self) -> None:
        if not self.name or any(ch.isspace() for ch in self.name):
            raise ValueError(f"child name must be non-empty without whitespace, got {self.name!r}")
        if not self.argv:
            raise ValueError(f"child {self.name!r} has an empty argv")
        if not isinstance(self.argv, tuple):
            object.__setattr__(self, "argv", tuple(self.argv))


@dataclass(eq=False)
class _Instance:
    """One OS process started for a child (a child has a new one per restart)."""

    proc: asyncio.subprocess.Process
    started_at: float
    pump: asyncio.Task[None] | None = None
    ready: bool = False
    line_matched: bool = False

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    @property
    def finished(self) -> bool:
        """Exited, and its output pipe is fully drained."""
        return self.proc.returncode is not None and self.pump is not None and self.pump.done()


@dataclass(eq=False)
class _Child:
    spec: ChildSpec
    color: str
    backoff_s: float
    regex: re.Pattern[str] | None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=TAIL_LINES))
    current: _Instance | None = None
    final_code: int | None = None
    channel: grpc.aio.Channel | None = None
    stub: Any = None

    @property
    def name(self) -> str:
        return self.spec.name


# Process groups that are alive right now, killed at interpreter exit if a
# supervisor never got to stop them.
_LIVE_GROUPS: set[int] = set()


@atexit.register
def _kill_leftover_groups() -> None:
    for pgid in list(_LIVE_GROUPS):
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    _LIVE_GROUPS.clear()


def _describe_code(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            return f"exited with code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exited with code {code}"
    return f"exited with code {code}"


def _fmt_s(seconds: float) -> str:
    return f"{seconds:.3g} s"


class Supervisor:
    """Starts, watches, restarts and stops a set of child processes.

    Typical use::

        sup = Supervisor(specs)
        sup.install_signal_handlers()
        await sup.start()
        await sup.wait_ready(timeout_s=30)
        print_banner()
        return await sup.run()       # until Ctrl-C / stop()

    Every coroutine must run on the same event loop.  See the module
    docstring for the restart and shutdown policy.
    """

    def __init__(
        self,
        specs: Sequence[ChildSpec],
        *,
        out: TextIO = sys.stdout,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 15.0,
        stable_after_s: float = 30.0,
        color: bool | None = None,
    ) -> None:
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate child names: {', '.join(duplicates)}")
        if backoff_initial_s < 0 or backoff_max_s < backoff_initial_s:
            raise ValueError("need 0 <= backoff_initial_s <= backoff_max_s")
        self._out = out
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._stable_after_s = stable_after_s
        if color is None:
            color = _isatty(out) and "NO_COLOR" not in os.environ
        self._color = color
        self._width = max([len(SUPERVISOR_LABEL), *(len(n) for n in names)])
        self._children: list[_Child] = []
        for index, spec in enumerate(specs):
            regex = None
            if spec.readiness is not None and spec.readiness.kind == "stdout":
                regex = re.compile(spec.readiness.pattern)
            self._children.append(
                _Child(
                    spec=spec,
                    color=_COLORS[index % len(_COLORS)],
                    backoff_s=backoff_initial_s,
                    regex=regex,
                )
            )
        self._by_name = {child.name: child for child in self._children}
        self._restarts: dict[str, int] = {child.name: 0 for child in self._children}
        self._restarts_view: Mapping[str, int] = MappingProxyType(self._restarts)
        self._started = False
        self._running = False
        self._stopping = False
        self._stop_event: asyncio.Event | None = None
        self._force_event: asyncio.Event | None = None
        self._spawn_lock: asyncio.Lock | None = None
        self._stop_task: asyncio.Task[None] | None = None
        self._signal_task: asyncio.Task[None] | None = None
        self._monitors: list[asyncio.Task[None]] = []
        self._signal_loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ public

    @property
    def restarts(self) -> Mapping[str, int]:
        """Read-only view: how many times each child has been restarted."""
        return self._restarts_view

    @property
    def stopping(self) -> bool:
        """True once stop() was requested (directly or by a signal)."""
        return self._stopping

    def pid(self, name: str) -> int | None:
        """PID of the running instance of child ``name``, or None if it is not running."""
        child = self._by_name[name]
        inst = child.current
        if inst is None or not inst.alive:
            return None
        return inst.proc.pid

    async def start(self) -> None:
        """Spawn every child in order and start pumping its output.

        Raises SupervisorError (after stopping the children already started)
        if a child cannot be spawned, e.g. its executable does not exist.
        """
        self._init_loop_state()
        if self._started:
            return
        if self._stopping:
            raise SupervisorError("supervisor has been stopped; it cannot be started again")
        self._started = True
        try:
            for child in self._children:
                await self._spawn(child)
        except BaseException:
            await self.stop()
            raise

    async def wait_ready(self, timeout_s: float) -> None:
        """Wait until every child passes its readiness check.

        Polls about every 50 ms until ``timeout_s`` has elapsed.  Raises
        SupervisorError naming the child(ren) and showing their last output
        lines if the deadline passes or a child exits while starting.  While
        run() is active, a child that is being restarted is waited for instead
        of counting as a failure.
        """
        if not self._started:
            raise SupervisorError("wait_ready() called before start()")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                if self._stopping:
                    raise SupervisorError("interrupted: supervisor is stopping")
                failed: list[_Child] = []
                pending: list[_Child] = []
                probes: list[tuple[_Child, _Instance]] = []
                for child in self._children:
                    inst = child.current
                    if inst is None or not inst.alive:
                        if self._running and child.spec.restart:
                            pending.append(child)  # a restart is on its way
                        elif (
                            inst is not None
                            and not child.spec.restart
                            and child.spec.readiness is None
                            and inst.proc.returncode == 0
                        ):
                            continue  # a one-shot job that completed
                        else:
                            failed.append(child)
                    elif not inst.ready:
                        probes.append((child, inst))
                if failed:
                    await self._settle_output(failed)
                    raise SupervisorError(self._exit_report(failed))
                if probes:
                    probe_timeout = max(0.05, min(_PROBE_TIMEOUT_S, deadline - loop.time()))
                    results = await asyncio.gather(
                        *(self._probe(child, inst, probe_timeout) for child, inst in probes)
                    )
                    for (child, inst), ok in zip(probes, results, strict=True):
                        if ok and inst.alive:
                            inst.ready = True
                        else:
                            pending.append(child)
                if not pending:
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise SupervisorError(self._timeout_report(pending, timeout_s))
                await asyncio.sleep(min(_POLL_INTERVAL_S, remaining))
        finally:
            await self._close_channels()

    async def run(self) -> int:
        """Supervise the children until stop() is called or a signal arrives.

        Starts the children first if start() has not been called.  Crashed
        children are restarted with exponential backoff.  Returns 0 after a
        clean stop; if every child had ``restart=False`` and all of them
        exited, returns 0 when all exited with code 0 and 1 otherwise.
        """
        self._init_loop_state()
        if not self._started:
            await self.start()
        if self._stopping:
            await self.stop()
            return 0
        if self._running:
            raise RuntimeError("Supervisor.run() is already running")
        assert self._stop_event is not None
        self._running = True
        self._monitors = [
            asyncio.create_task(self._monitor(child), name=f"supervisor-monitor-{child.name}")
            for child in self._children
        ]
        monitors = list(self._monitors)
        stop_wait = asyncio.create_task(self._stop_event.wait(), name="supervisor-stop-wait")
        try:
            waiters: set[asyncio.Task[Any]] = {stop_wait, *monitors}
            while monitors and not self._stop_event.is_set():
                done, waiters = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if any(_failed(task) for task in done) or all(task.done() for task in monitors):
                    break
            requested = self._stop_event.is_set()
        finally:
            stop_wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_wait
            await self.stop()
            self._running = False
        for task in monitors:
            exc = task.exception() if _failed(task) else None
            if exc is not None:
                raise exc  # a bug in the supervisor itself, not a child failure
        if requested:
            return 0
        return 0 if all(c.final_code == 0 for c in self._children) else 1

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop every child: SIGTERM in reverse start order, wait up to
        ``grace_s`` seconds, SIGKILL the rest, then drain all output.

        Idempotent: concurrent and later calls wait for the same shutdown.
        """
        self._init_loop_state()
        self._stopping = True
        assert self._stop_event is not None
        self._stop_event.set()
        if self._stop_task is None:
            self._stop_task = asyncio.create_task(self._do_stop(grace_s), name="supervisor-stop")
        await asyncio.shield(self._stop_task)

    def install_signal_handlers(self) -> None:
        """Route SIGINT/SIGTERM to stop(); a second signal kills all children at once.

        Must be called from the main thread with the loop running.  The
        handlers are removed again when stop() completes.
        """
        loop = asyncio.get_running_loop()
        self._init_loop_state()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self._signal_loop = loop

    # ---------------------------------------------------------------- internals

    def _init_loop_state(self) -> None:
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
            self._force_event = asyncio.Event()
            self._spawn_lock = asyncio.Lock()

    def _on_signal(self, sig: signal.Signals) -> None:
        if self._stop_task is None and self._signal_task is None:
            self._log(f"received {sig.name}, stopping (press Ctrl-C again to kill immediately)")
            self._signal_task = asyncio.get_running_loop().create_task(
                self.stop(), name="supervisor-signal-stop"
            )
        else:
            self._log(f"received {sig.name} again, killing all processes")
            self._force_kill()

    def _force_kill(self) -> None:
        assert self._force_event is not None
        self._force_event.set()
        for child in self._children:
            inst = child.current
            if inst is not None and not inst.finished:
                _signal_group(inst, signal.SIGKILL, even_if_exited=True)

    def _remove_signal_handlers(self) -> None:
        loop = self._signal_loop
        if loop is None:
            return
        self._signal_loop = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)

    async def _spawn(self, child: _Child, *, restart: bool = False) -> None:
        assert self._spawn_lock is not None
        async with self._spawn_lock:
            if self._stopping:
                raise SupervisorError(f"not starting {child.name}: supervisor is stopping")
            spec = child.spec
            env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
            try:
                proc = await asyncio.create_subprocess_exec(
                    *spec.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except FileNotFoundError:
                raise SupervisorError(
                    f"cannot start {child.name}: executable {spec.argv[0]!r} not found"
                ) from None
            except PermissionError:
                raise SupervisorError(
                    f"cannot start {child.name}: permission denied executing {spec.argv[0]!r}"
                ) from None
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise SupervisorError(f"cannot start {child.name} ({spec.argv[0]!r}): {reason}") from None
            _LIVE_GROUPS.add(proc.pid)
            inst = _Instance(proc=proc, started_at=asyncio.get_running_loop().time())
            inst.pump = asyncio.create_task(self._pump(child, inst), name=f"supervisor-pump-{child.name}")
            child.current = inst
            if restart:
                self._restarts[child.name] += 1
                self._log(f"{child.name} restarted (pid {proc.pid})")
            else:
                self._log(f"{child.name} started (pid {proc.pid})")

    async def _pump(self, child: _Child, inst: _Instance) -> None:
        stream = inst.proc.stdout
        assert stream is not None
        buf = bytearray()
        try:
            while True:
                chunk = await stream.read(_READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                while (newline := buf.find(b"\n")) >= 0:
                    self._child_line(child, inst, bytes(buf[:newline]))
                    del buf[: newline + 1]
                if len(buf) >= _MAX_LINE:
                    self._child_line(child, inst, bytes(buf))
                    buf.clear()
        finally:
            if buf:
                self._child_line(child, inst, bytes(buf))

    def _child_line(self, child: _Child, inst: _Instance, raw: bytes) -> None:
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        child.tail.append(line)
        if child.regex is not None and not inst.line_matched and child.regex.search(line):
            inst.line_matched = True
        self._write(child.name, child.color, line)

    def _log(self, message: str) -> None:
        self._write(SUPERVISOR_LABEL, _SUPERVISOR_COLOR, message)

    def _write(self, label: str, color: str, line: str) -> None:
        prefix = f"{label.ljust(self._width)} |"
        if self._color:
            prefix = f"\x1b[{color}m{prefix}{_RESET}"
        try:
            self._out.write(f"{prefix} {line}\n")
            self._out.flush()
        except (OSError, ValueError):
            pass  # closed or broken output: keep draining the children anyway

    async def _probe(self, child: _Child, inst: _Instance, timeout_s: float) -> bool:
        check = child.spec.readiness
        if check is None:
            return True
        if check.kind == "stdout":
            return inst.line_matched
        if check.kind == "grpc":
            return await self._probe_grpc(child, check, timeout_s)
        return await _probe_http(check.target, timeout_s)

    async def _probe_grpc(self, child: _Child, check: ReadinessCheck, timeout_s: float) -> bool:
        if child.channel is None:
            child.channel = grpc.aio.insecure_channel(check.target, options=list(_GRPC_CHANNEL_OPTIONS))
            child.stub = health_pb2_grpc.HealthStub(child.channel)
        request = health_pb2.HealthCheckRequest(service=check.service)
        try:
            response = await child.stub.Check(request, timeout=timeout_s)
        except grpc.RpcError:  # UNAVAILABLE while starting, DEADLINE_EXCEEDED, ...
            return False
        return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

    async def _close_channels(self) -> None:
        for child in self._children:
            channel, child.channel, child.stub = child.channel, None, None
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close()

    async def _settle_output(self, children: Sequence[_Child]) -> None:
        """Give pumps of exited children a moment to deliver their last lines."""
        pumps = [
            c.current.pump
            for c in children
            if c.current is not None and c.current.pump is not None and not c.current.pump.done()
        ]
        if pumps:
            await asyncio.wait(pumps, timeout=_DRAIN_TIMEOUT_S)

    def _tail_block(self, child: _Child) -> str:
        if not child.tail:
            return "    (no output)"
        return "\n".join(f"    {line}" for line in child.tail)

    def _exit_report(self, children: Sequence[_Child]) -> str:
        parts = []
        for child in children:
            code = child.current.proc.returncode if child.current is not None else None
            parts.append(
                f"{child.name} {_describe_code(code)} while starting; last output:\n{self._tail_block(child)}"
            )
        return "\n".join(parts)

    def _timeout_report(self, children: Sequence[_Child], timeout_s: float) -> str:
        names = ", ".join(c.name for c in children)
        parts = [f"not ready after {_fmt_s(timeout_s)}: {names}"]
        for child in children:
            check = child.spec.readiness
            inst = child.current
            if inst is None or not inst.alive:
                waiting = "a restart"
            else:
                waiting = check.describe() if check is not None else "the process to run"
            parts.append(f"{child.name} (waiting for {waiting}); last output:\n{self._tail_block(child)}")
        return "\n".join(parts)

    async def _wait_exit(self, inst: _Instance) -> int:
        """Wait for the process to exit (even if its pipe is held open by others)."""
        assert inst.pump is not None
        while (code := inst.proc.returncode) is None:
            if inst.pump.done():
                await asyncio.sleep(_POLL_INTERVAL_S)
            else:
                await asyncio.wait({inst.pump}, timeout=0.25)
        return code

    async def _reap_leftovers(self, inst: _Instance) -> None:
        """After the main process exited: drain output, SIGKILL group members
        that still hold the pipe, and give up on the pipe if that fails."""
        assert inst.pump is not None
        if not inst.pump.done():
            await asyncio.wait({inst.pump}, timeout=_DRAIN_TIMEOUT_S)
        if not inst.pump.done():
            _signal_group(inst, signal.SIGKILL, even_if_exited=True)
            await _give_up_pipe(inst)
        _LIVE_GROUPS.discard(inst.proc.pid)

    async def _sleep_or_stop(self, delay_s: float) -> bool:
        """Sleep ``delay_s``; return True if stop() was requested meanwhile."""
        assert self._stop_event is not None
        if self._stop_event.is_set():
            return True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop_event.wait(), timeout=delay_s)
        return self._stop_event.is_set()

    async def _monitor(self, child: _Child) -> None:
        loop = asyncio.get_running_loop()
        while True:
            inst = child.current
            if inst is None:
                return
            code = await self._wait_exit(inst)
            if self._stopping:
                return
            await self._reap_leftovers(inst)
            if self._stopping:
                return
            uptime = loop.time() - inst.started_at
            if not child.spec.restart:
                child.final_code = code
                self._log(f"{child.name} {_describe_code(code)} (not restarting)")
                return
            if uptime >= self._stable_after_s:
                child.backoff_s = self._backoff_initial_s
            delay = self._next_delay(child)
            self._log(f"{child.name} {_describe_code(code)}, restarting in {_fmt_s(delay)}")
            while True:
                if await self._sleep_or_stop(delay):
                    return
                try:
                    await self._spawn(child, restart=True)
                except SupervisorError as exc:
                    if self._stopping:
                        return
                    delay = self._next_delay(child)
                    self._log(f"{exc}; retrying in {_fmt_s(delay)}")
                    continue
                break

    def _next_delay(self, child: _Child) -> float:
        delay = child.backoff_s
        child.backoff_s = min(max(delay * 2, self._backoff_initial_s), self._backoff_max_s)
        return delay

    async def _wait_finished(
        self,
        instances: Sequence[_Instance],
        timeout_s: float,
        *,
        interruptible: bool,
        drained: bool = True,
    ) -> None:
        """Wait until all instances exited (and, if ``drained``, their output
        pipes reached EOF or stayed open for a second after the exit), the
        timeout passes, or (if ``interruptible``) a forced kill was requested."""
        assert self._force_event is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        exited_at: dict[int, float] = {}

        def waiting_for(inst: _Instance) -> bool:
            if inst.alive:
                return True
            if not drained or inst.finished:
                return False
            since = exited_at.setdefault(id(inst), loop.time())
            return loop.time() - since < _DRAIN_TIMEOUT_S

        while True:
            pending = [inst for inst in instances if waiting_for(inst)]
            remaining = deadline - loop.time()
            if not pending or remaining <= 0:
                return
            if interruptible and self._force_event.is_set():
                return
            pumps = {inst.pump for inst in pending if inst.pump is not None and not inst.pump.done()}
            if pumps:
                await asyncio.wait(pumps, timeout=min(_POLL_INTERVAL_S, remaining))
            else:
                await asyncio.sleep(min(_POLL_INTERVAL_S, remaining))

    async def _do_stop(self, grace_s: float) -> None:
        try:
            monitors, self._monitors = self._monitors, []
            for task in monitors:
                task.cancel()
            await asyncio.gather(*monitors, return_exceptions=True)
            assert self._spawn_lock is not None
            # Let an in-flight spawn register itself before we collect the instances.
            await self._spawn_lock.acquire()
            self._spawn_lock.release()
            instances = [
                child.current
                for child in reversed(self._children)
                if child.current is not None and not child.current.finished
            ]
            if instances:
                self._log(f"stopping {len(instances)} process(es)")
            for inst in instances:
                _signal_group(inst, signal.SIGTERM, even_if_exited=True)
            await self._wait_finished(instances, grace_s, interruptible=True)
            stragglers = [inst for inst in instances if not inst.finished]
            for inst in stragglers:
                name = self._name_of(inst)
                if inst.alive:
                    if self._force_event is not None and self._force_event.is_set():
                        self._log(f"killing {name}")
                    else:
                        self._log(f"{name} did not exit within {_fmt_s(grace_s)}, sending SIGKILL")
                _signal_group(inst, signal.SIGKILL, even_if_exited=True)
            if stragglers:
                await self._wait_finished(stragglers, _KILL_WAIT_S, interruptible=False, drained=False)
            for inst in instances:
                if inst.alive:
                    self._log(f"{self._name_of(inst)} (pid {inst.proc.pid}) could not be killed")
                elif not inst.finished:
                    await _give_up_pipe(inst)
                    _LIVE_GROUPS.discard(inst.proc.pid)
                else:
                    _LIVE_GROUPS.discard(inst.proc.pid)
            for child in self._children:
                pump = child.current.pump if child.current is not None else None
                if pump is not None and not pump.done():
                    pump.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await pump
            await self._close_channels()
            if instances:
                self._log("all processes stopped")
        finally:
            self._remove_signal_handlers()

    def _name_of(self, inst: _Instance) -> str:
        for child in self._children:
            if child.current is inst:
                return child.name
        return "?"


def _failed(task: asyncio.Task[Any]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


def _isatty(out: TextIO) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _signal_group(inst: _Instance, sig: signal.Signals, *, even_if_exited: bool = False) -> None:
    """Send ``sig`` to the child's process group (it is the group leader).

    With ``even_if_exited`` the group is signalled after the leader exited as
    long as the output pipe is still open, i.e. group members likely remain.
    """
    if not inst.alive:
        if not even_if_exited or inst.pump is None or inst.pump.done():
            return
    try:
        os.killpg(inst.proc.pid, sig)
    except ProcessLookupError:
        return  # the group is already gone
    except PermissionError:
        with contextlib.suppress(OSError):
            os.kill(inst.proc.pid, sig)


async def _give_up_pipe(inst: _Instance) -> None:
    """Stop reading an output pipe that somebody outside our reach keeps
    open after the child exited (e.g. a grandchild that escaped into its own
    session): close our end and end the pump."""
    pump = inst.pump
    if pump is None:
        return
    if not pump.done():
        await asyncio.wait({pump}, timeout=_DRAIN_TIMEOUT_S)
    if not pump.done() and inst.proc.returncode is not None:
        # asyncio.subprocess.Process has no public way to close its pipes.
        transport = getattr(inst.proc, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        await asyncio.wait({pump}, timeout=_POLL_INTERVAL_S)
    if not pump.done():
        pump.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await pump


_INSECURE_SSL: ssl.SSLContext | None = None


def _insecure_ssl() -> ssl.SSLContext:
    global _INSECURE_SSL
    if _INSECURE_SSL is None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _INSECURE_SSL = context
    return _INSECURE_SSL


async def _probe_http(url: str, timeout_s: float) -> bool:
    """GET ``url`` over a fresh connection; True on a 2xx status line."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme == "https"
    host = parts.hostname or "127.0.0.1"
    try:
        port = parts.port or (443 if https else 80)
    except ValueError:
        return False
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"

    async def fetch() -> bool:
        reader, writer = await asyncio.open_connection(host, port, ssl=_insecure_ssl() if https else None)
        try:
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                "User-Agent: switchyard-supervisor\r\nConnection: close\r\n\r\n".encode("latin-1")
            )
            await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        fields = status_line.split()
        return (
            len(fields) >= 2
            and fields[0].startswith(b"HTTP/")
            and fields[1].isdigit()
            and 200 <= int(fields[1]) < 300
        )

    try:
        return await asyncio.wait_for(fetch(), timeout=timeout_s)
    except (OSError, TimeoutError, ValueError, UnicodeError):
        return False
