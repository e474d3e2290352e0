"""Tests for switchyard.supervisor, the process supervisor behind ``switchyard run``.

The children are tiny Python programs under ``supervisor_children/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from switchyard.supervisor import ChildSpec, ReadinessCheck, Supervisor, SupervisorError, _probe_http

CHILDREN = Path(__file__).parent / "supervisor_children"
PY = sys.executable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child(name: str, *args: str, readiness: ReadinessCheck | None = None, **kw: Any) -> ChildSpec:
    return ChildSpec(name=name, argv=(PY, str(CHILDREN / "child.py"), *args), readiness=readiness, **kw)


def health_child(name: str, port: int, delay_s: float = 0.2) -> ChildSpec:
    return ChildSpec(
        name=name,
        argv=(PY, str(CHILDREN / "health_server.py"), str(port), str(delay_s)),
        readiness=ReadinessCheck.grpc_health(f"127.0.0.1:{port}"),
    )


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def started_pids(out: io.StringIO) -> dict[str, list[int]]:
    pids: dict[str, list[int]] = {}
    for match in re.finditer(r"\| (\S+) (?:re)?started \(pid (\d+)\)", out.getvalue()):
        pids.setdefault(match.group(1), []).append(int(match.group(2)))
    return pids


def assert_all_gone(out: io.StringIO) -> None:
    pids = [pid for group in started_pids(out).values() for pid in group]
    assert pids, "no child was started"
    assert [pid for pid in pids if alive(pid)] == []
    leftover = [
        task
        for task in asyncio.all_tasks() - _TASKS_BEFORE
        if task.get_name().startswith("supervisor-") and not task.done()
    ]
    assert leftover == []


# Tasks that existed before the test (a session-wide mesh may be running in the same loop).
_TASKS_BEFORE: set[asyncio.Task[object]] = set()


@pytest.fixture(autouse=True)
async def _snapshot_tasks() -> None:
    _TASKS_BEFORE.clear()
    _TASKS_BEFORE.update(asyncio.all_tasks())


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def supervised(specs: Iterable[ChildSpec], **kw: Any) -> AsyncIterator[tuple[Supervisor, io.StringIO]]:
    out = io.StringIO()
    kw.setdefault("color", False)
    sup = Supervisor(list(specs), out=out, **kw)
    try:
        yield sup, out
    finally:
        await sup.stop(grace_s=2.0)


@pytest.mark.asyncio
async def test_two_children_become_ready_and_output_is_prefixed() -> None:
    port = free_port()
    specs = [
        health_child("health", port, delay_s=0.3),
        child("web", "listen", readiness=ReadinessCheck.stdout_line(r"listening http://")),
    ]
    async with supervised(specs) as (sup, out):
        await sup.start()
        await sup.wait_ready(10.0)
        health_pid, web_pid = sup.pid("health"), sup.pid("web")
        assert health_pid and web_pid and alive(health_pid) and alive(web_pid)
        lines = out.getvalue().splitlines()
        width = len("supervisor")  # longest label
        assert f"{'web'.ljust(width)} | listening http://127.0.0.1:0" in lines
        assert f"{'web'.ljust(width)} | error: this goes to stderr" in lines  # stderr is merged
        assert f"{'health'.ljust(width)} | health server on 127.0.0.1:{port}, warming up" in lines
        assert sup.restarts == {"health": 0, "web": 0}
        await sup.stop()
        assert sup.pid("health") is None and sup.pid("web") is None
        assert_all_gone(out)


@pytest.mark.asyncio
async def test_killed_child_is_restarted_and_becomes_ready_again() -> None:
    port = free_port()
    async with supervised([health_child("health", port, delay_s=0.1)], backoff_initial_s=0.1) as (sup, out):
        await sup.start()
        await sup.wait_ready(10.0)
        runner = asyncio.create_task(sup.run())
        first = sup.pid("health")
        assert first is not None
        os.kill(first, signal.SIGKILL)
        await eventually(lambda: sup.restarts["health"] == 1 and sup.pid("health") not in (None, first))
        await sup.wait_ready(10.0)
        assert "health exited with code -9 (SIGKILL), restarting in 0.1 s" in out.getvalue()
        assert not alive(first)
        await sup.stop()
        assert await asyncio.wait_for(runner, 5.0) == 0
        assert started_pids(out)["health"][0] == first
        assert len(started_pids(out)["health"]) == 2
        assert_all_gone(out)


@pytest.mark.asyncio
async def test_child_that_never_becomes_ready_is_reported_with_its_last_lines() -> None:
    specs = [
        child("slow", "chatty", "25", readiness=ReadinessCheck.stdout_line("never printed")),
        child("deaf", "listen", readiness=ReadinessCheck.grpc_health(f"127.0.0.1:{free_port()}")),
        child("fine", "listen", readiness=ReadinessCheck.stdout_line("listening")),
    ]
    async with supervised(specs) as (sup, _out):
        await sup.start()
        t0 = time.monotonic()
        with pytest.raises(SupervisorError) as err:
            await sup.wait_ready(1.0)
        assert 0.9 <= time.monotonic() - t0 < 3.0
    message = str(err.value)
    assert message.startswith("not ready after 1 s: slow, deaf\n")
    assert "slow (waiting for an output line matching /never printed/)" in message
    assert "deaf (waiting for gRPC health 127.0.0.1:" in message
    assert "    line 25" in message and "    line 6\n" in message
    assert "    line 5\n" not in message  # only the last 20 lines
    assert "    listening http://127.0.0.1:0" in message  # deaf's output
    assert "fine" not in message.split("\n", 1)[0]


@pytest.mark.asyncio
async def test_child_exiting_at_start_fails_fast() -> None:
    specs = [
        child("ok", "listen", readiness=ReadinessCheck.stdout_line("listening")),
        child("broken", "exit", "3", readiness=ReadinessCheck.stdout_line("never")),
    ]
    async with supervised(specs) as (sup, out):
        await sup.start()
        t0 = time.monotonic()
        with pytest.raises(SupervisorError) as err:
            await sup.wait_ready(10.0)
        assert time.monotonic() - t0 < 3.0
    assert str(err.value) == "broken exited with code 3 while starting; last output:\n    fatal: bad config"
    assert_all_gone(out)


@pytest.mark.asyncio
async def test_missing_executable_is_a_clear_error_and_stops_the_others() -> None:
    specs = [
        child("first", "listen"),
        ChildSpec(name="ghost", argv=("/nonexistent/switchyard-ghost", "--flag"), env={}, readiness=None),
    ]
    async with supervised(specs) as (sup, out):
        with pytest.raises(
            SupervisorError, match=r"cannot start ghost: executable '/nonexistent/switchyard-ghost' not found"
        ):
            await sup.start()
        assert sup.stopping
        assert_all_gone(out)


@pytest.mark.asyncio
async def test_stop_is_prompt_idempotent_and_leaves_nothing_running() -> None:
    port = free_port()
    specs = [health_child("health", port), child("chatty", "chatty", "3")]
    async with supervised(specs) as (sup, out):
        await sup.start()
        await sup.wait_ready(10.0)
        pids = [sup.pid("health"), sup.pid("chatty")]
        t0 = time.monotonic()
        await asyncio.gather(sup.stop(grace_s=10.0), sup.stop(grace_s=10.0))
        assert time.monotonic() - t0 < 3.0
        assert all(pid is not None and not alive(pid) for pid in pids)
        t1 = time.monotonic()
        await sup.stop()
        assert time.monotonic() - t1 < 0.1
        text = out.getvalue()
        assert "got SIGTERM, shutting down" in text  # the gRPC child shut down gracefully
        assert "SIGKILL" not in text
        assert_all_gone(out)
        with pytest.raises(SupervisorError):
            await sup.wait_ready(1.0)


@pytest.mark.asyncio
async def test_child_ignoring_sigterm_is_killed_after_grace() -> None:
    specs = [child("stubborn", "ignore-term", readiness=ReadinessCheck.stdout_line("^ready$"))]
    async with supervised(specs) as (sup, out):
        await sup.start()
        await sup.wait_ready(10.0)
        pid = sup.pid("stubborn")
        assert pid is not None
        t0 = time.monotonic()
        await sup.stop(grace_s=0.5)
        assert 0.45 <= time.monotonic() - t0 < 3.0
        assert not alive(pid)
        assert "stubborn did not exit within 0.5 s, sending SIGKILL" in out.getvalue()
        assert_all_gone(out)


@pytest.mark.asyncio
async def test_http_readiness() -> None:
    port = free_port()
    specs = [
        child("api", "http", str(port), readiness=ReadinessCheck.http_get(f"http://127.0.0.1:{port}/healthz"))
    ]
    async with supervised(specs) as (sup, out):
        await sup.start()
        await sup.wait_ready(10.0)
        assert await _probe_http(f"http://127.0.0.1:{port}/healthz", 0.5) is True
        assert await _probe_http(f"http://127.0.0.1:{port}/missing", 0.5) is False
        assert await _probe_http(f"http://127.0.0.1:{free_port()}/", 0.5) is False
    assert_all_gone(out)


@pytest.mark.asyncio
async def test_crash_loop_backs_off_exponentially_up_to_the_cap() -> None:
    specs = [child("flappy", "exit", "1")]
    async with supervised(specs, backoff_initial_s=0.05, backoff_max_s=0.2) as (sup, out):
        runner = asyncio.create_task(sup.run())
        await eventually(lambda: sup.restarts["flappy"] >= 4, timeout_s=8.0)
        await sup.stop()
        assert await asyncio.wait_for(runner, 5.0) == 0
    delays = re.findall(r"flappy exited with code 1, restarting in (\S+) s", out.getvalue())
    assert delays[:5] == ["0.05", "0.1", "0.2", "0.2", "0.2"][: len(delays[:5])]
    assert len(delays) >= 4
    assert_all_gone(out)


@pytest.mark.asyncio
async def test_backoff_resets_once_a_child_was_stable() -> None:
    specs = [child("flappy", "exit", "1")]
    async with supervised(specs, backoff_initial_s=0.05, backoff_max_s=1.0, stable_after_s=0.0) as (sup, out):
        runner = asyncio.create_task(sup.run())
        await eventually(lambda: sup.restarts["flappy"] >= 3, timeout_s=8.0)
        await sup.stop()
        assert await asyncio.wait_for(runner, 5.0) == 0
    delays = re.findall(r"flappy exited with code 1, restarting in (\S+) s", out.getvalue())
    assert len(delays) >= 3 and set(delays) == {"0.05"}


@pytest.mark.asyncio
async def test_run_returns_when_all_one_shot_children_have_exited() -> None:
    async with supervised([child("job", "partial", restart=False)]) as (sup, out):
        assert await asyncio.wait_for(sup.run(), 10.0) == 0
    assert "job        | no newline at the end" in out.getvalue().splitlines()
    assert "job exited with code 0 (not restarting)" in out.getvalue()
    async with supervised([child("job", "exit", "3", restart=False)]) as (sup, out):
        assert await asyncio.wait_for(sup.run(), 10.0) == 1


@pytest.mark.asyncio
async def test_env_is_merged_and_prefixes_are_colored_when_asked() -> None:
    specs = [
        child(
            "envy",
            "env",
            "SWITCHYARD_SUPERVISOR_TEST",
            env={"SWITCHYARD_SUPERVISOR_TEST": "hello"},
            readiness=ReadinessCheck.stdout_line("SWITCHYARD_SUPERVISOR_TEST=hello"),
        )
    ]
    async with supervised(specs, color=True) as (sup, out):
        await sup.start()
        await sup.wait_ready(10.0)
    assert re.search(r"\x1b\[\d+menvy\s+\|\x1b\[0m SWITCHYARD_SUPERVISOR_TEST=hello", out.getvalue())


@pytest.mark.asyncio
async def test_signals_stop_cleanly_and_second_ctrl_c_kills_at_once() -> None:
    specs = [child("stubborn", "ignore-term", readiness=ReadinessCheck.stdout_line("^ready$"))]
    async with supervised(specs) as (sup, out):
        sup.install_signal_handlers()
        await sup.start()
        await sup.wait_ready(10.0)
        pid = sup.pid("stubborn")
        assert pid is not None
        runner = asyncio.create_task(sup.run())
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        os.kill(os.getpid(), signal.SIGINT)
        await asyncio.sleep(0.3)
        assert not runner.done() and alive(pid)  # inside the 10 s grace period
        os.kill(os.getpid(), signal.SIGINT)
        assert await asyncio.wait_for(runner, 5.0) == 0
        assert time.monotonic() - t0 < 3.0
        assert not alive(pid)
        text = out.getvalue()
        assert "received SIGINT, stopping" in text and "received SIGINT again, killing" in text
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers removed again
    assert_all_gone(out)
