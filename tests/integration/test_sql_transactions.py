"""The `Database` contract for writes, on a SQLite file and a real PostgreSQL server: a
transaction or an `executemany` stores all of its rows or none of them, and a failed one leaves
the connection ready for the next.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from switchyard.common.sql import Backend, Database, DatabaseError, IntegrityError, open_database
from tests.support.postgres import PostgresUnavailable, fresh_postgres_database, skip_or_fail


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    try:
        async with fresh_postgres_database("switchyard_sql_test") as url:
            yield url
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))


@pytest.fixture(params=[Backend.SQLITE, Backend.POSTGRESQL])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param is Backend.SQLITE:
        return f"sqlite:///{tmp_path / 'state' / 'test.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = await open_database(database_url)
    table = f"t_{uuid.uuid4().hex[:12]}"
    await db.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, n INTEGER NOT NULL)")
    db.table = table  # type: ignore[attr-defined]
    try:
        yield db
    finally:
        await db.execute(f"DROP TABLE {table}")
        await db.close()


async def ids(db: Database) -> list[str]:
    rows = await db.fetch_all(f"SELECT id FROM {db.table} ORDER BY id")  # type: ignore[attr-defined]
    return [str(row["id"]) for row in rows]


async def test_executemany_stores_every_row_or_none(database: Database) -> None:
    table = database.table  # type: ignore[attr-defined]
    await database.executemany(f"INSERT INTO {table} (id, n) VALUES (?, ?)", [("a", 1), ("b", 2)])
    assert await ids(database) == ["a", "b"]
    with pytest.raises(IntegrityError):
        # The third row repeats a key: the first two must not stay either.
        await database.executemany(
            f"INSERT INTO {table} (id, n) VALUES (?, ?)", [("c", 3), ("d", 4), ("a", 5)]
        )
    assert await ids(database) == ["a", "b"]
    await database.executemany(f"INSERT INTO {table} (id, n) VALUES (?, ?)", [("c", 3)])
    assert await ids(database) == ["a", "b", "c"]


async def test_a_failed_transaction_keeps_nothing_and_the_next_one_works(database: Database) -> None:
    table = database.table  # type: ignore[attr-defined]
    with pytest.raises(IntegrityError):
        async with database.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} (id, n) VALUES (?, ?)", ("x", 1))
            await tx.execute(f"INSERT INTO {table} (id, n) VALUES (?, ?)", ("x", 2))
    assert await ids(database) == []
    with pytest.raises(DatabaseError):
        async with database.transaction() as tx:
            await tx.execute("INSERT INTO no_such_table (id) VALUES (?)", ("y",))
    async with database.transaction() as tx:
        await tx.execute(f"INSERT INTO {table} (id, n) VALUES (?, ?)", ("y", 1))
        rows = await tx.fetch_all(f"SELECT n FROM {table} WHERE id = ?", ("y",))
        assert [row["n"] for row in rows] == [1]
    assert await ids(database) == ["y"]


async def test_an_exception_in_the_body_rolls_back_and_an_empty_transaction_is_harmless(
    database: Database,
) -> None:
    table = database.table  # type: ignore[attr-defined]
    with pytest.raises(RuntimeError):
        async with database.transaction() as tx:
            await tx.executemany(f"INSERT INTO {table} (id, n) VALUES (?, ?)", [("p", 1), ("q", 2)])
            raise RuntimeError("the caller changed its mind")
    assert await ids(database) == []
    async with database.transaction():
        pass
    with pytest.raises(RuntimeError):
        async with database.transaction():
            raise RuntimeError("before any statement")
    await database.execute(f"INSERT INTO {table} (id, n) VALUES (?, ?)", ("r", 1))
    assert await ids(database) == ["r"]


async def test_a_committed_transaction_is_flushed_to_disk_before_commit_returns(database: Database) -> None:
    """Rows are money here: a commit must survive a power loss, not only a crash. SQLite in WAL
    mode does so only with synchronous=FULL (PostgreSQL's default synchronous_commit is on)."""
    if database.backend is Backend.SQLITE:
        (row,) = await database.fetch_all("PRAGMA synchronous")
        assert list(dict(row).values()) == [2]  # FULL
    else:
        (row,) = await database.fetch_all("SHOW synchronous_commit")
        assert list(dict(row).values()) == ["on"]
