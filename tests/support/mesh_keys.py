"""API keys for tests on a running mesh, made by the real `switchyard keys` CLI on the mesh's
own database (the edge's environment)."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tests.conftest import Mesh


async def keys_cli(mesh: Mesh, *args: str) -> str:
    edge = next(c for c in mesh.plan.children if c.name == "edge")
    env = {**edge.env, "PATH": "/usr/bin:/bin"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchyard.cli",
        "keys",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return out.decode()


async def create_key(mesh: Mesh, tenant: str, *extra: str) -> str:
    record = json.loads(await keys_cli(mesh, "create", "--tenant", tenant, "--json", *extra))
    key: str = record["key"]
    return key
