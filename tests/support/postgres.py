"""A fresh PostgreSQL database per test session, dropped afterwards.

    async with fresh_postgres_database() as url:      # postgresql://.../switchyard_test_1a2b3c...
        db = await open_database(url)

The server is the one named by `SWITCHYARD_TEST_POSTGRES_URL`, else `DATABASE_URL` when it is a
PostgreSQL URL, else 127.0.0.1:5432 (trust auth, database `test`) as user `postgres`, then
`root`. A user who may not create databases gets a fresh schema in that database instead
(the URL then sets `search_path` to it). `PostgresUnavailable` says no server answered: tests
skip on it locally and fail under CI, where a server is part of the machine.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlencode, urlsplit, urlunsplit

import asyncpg
import pytest

__all__ = ["PostgresUnavailable", "candidate_urls", "fresh_postgres_database", "skip_or_fail"]


class PostgresUnavailable(Exception):
    """No PostgreSQL server accepted a connection."""


def candidate_urls() -> list[str]:
    """Admin URLs to try, in order."""
    explicit = os.environ.get("SWITCHYARD_TEST_POSTGRES_URL")
    if explicit:
        return [explicit]
    urls: list[str] = []
    database_url = os.environ.get("DATABASE_URL", "")
    if database_url.startswith(("postgresql://", "postgres://")):
        urls.append(database_url)
    urls += ["postgresql://postgres@127.0.0.1:5432/test", "postgresql://root@127.0.0.1:5432/test"]
    return urls


async def _connect_admin() -> tuple[asyncpg.Connection, str]:
    failures: list[str] = []
    for url in candidate_urls():
        try:
            return await asyncpg.connect(url, timeout=5), url
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            failures.append(
                f"{urlsplit(url).hostname}:{urlsplit(url).port} as {urlsplit(url).username}: {exc}"
            )
    raise PostgresUnavailable("; ".join(failures))


def _with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def _with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&" if parts.query else ""
    # asyncpg passes unknown query parameters on as server settings.
    return urlunsplit(parts._replace(query=query + urlencode({"search_path": schema})))


@asynccontextmanager
async def fresh_postgres_database(prefix: str = "switchyard_test") -> AsyncIterator[str]:
    """Create a uniquely named database (or schema), yield its URL, and drop it at the end."""
    admin, admin_url = await _connect_admin()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    try:
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
            kind = "DATABASE"
            url = _with_database(admin_url, name)
        except asyncpg.InsufficientPrivilegeError:
            await admin.execute(f'CREATE SCHEMA "{name}"')
            kind = "SCHEMA"
            url = _with_search_path(admin_url, name)
        try:
            yield url
        finally:
            if kind == "DATABASE":
                # FORCE: a pool a test forgot to close must not keep the database alive.
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            else:
                await admin.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await admin.close()


def skip_or_fail(reason: str) -> None:
    """Skip when PostgreSQL is missing on a developer's machine; fail under CI, which has one."""
    message = f"PostgreSQL is not reachable: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
