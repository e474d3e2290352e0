"""A small async SQL layer for the state that must outlive a process: API keys now, the ledger later.

`open_database(url)` takes `DATABASE_URL` and returns a `Database` with one of two backends:

- SQLite (the default): the standard `sqlite3` module, one connection driven by one worker
  thread so the event loop never blocks, in WAL mode so other processes (the CLI, another
  service) read and write the same file safely. URLs follow the common convention:
  `sqlite:///relative/path.db`, `sqlite:////absolute/path.db`, `sqlite://` or
  `sqlite:///:memory:` (a private in-memory database, for tests).
- PostgreSQL (a cluster): `asyncpg` with a connection pool; `postgresql://` or `postgres://`.

With no `DATABASE_URL` the database is `switchyard.db` in the state directory:
`$SWITCHYARD_STATE_DIR`, else `$XDG_STATE_HOME/switchyard`, else `~/.local/state/switchyard`
(created on first open), so `make run` works on a clean machine and keeps its keys across runs.

SQL is written once, with `?` placeholders; the PostgreSQL backend rewrites them to `$1, $2, ...`
(outside quotes and comments). Keep to the dialect both share: TEXT, BIGINT, BOOLEAN (pass
Python `bool`), `INSERT ... ON CONFLICT`, `RETURNING`. Times are integer milliseconds since the
epoch and money is integer micros, so no type needs converting on the way in or out.

Schema changes are versioned per component (`db.migrate("keys", MIGRATIONS)`): each component
numbers its own migrations from 1, the `schema_migrations` table records what ran, and
migrating twice (or from two processes at once) applies each migration exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import asyncpg.pool

from switchyard.common.settings import SettingsError

__all__ = [
    "Backend",
    "Database",
    "DatabaseError",
    "IntegrityError",
    "Migration",
    "Row",
    "Statements",
    "default_database_url",
    "default_state_dir",
    "open_database",
    "redact_url",
]

Row = dict[str, Any]
Params = Sequence[object]
_T = TypeVar("_T")

DATABASE_FILE: Final = "switchyard.db"
# Seconds a SQLite writer waits for another process's write lock before failing.
SQLITE_BUSY_TIMEOUT_S: Final = 10.0
# One PostgreSQL advisory lock serialises migrations across every process of the mesh.
_PG_MIGRATION_LOCK: Final = 0x5357_4D49_4752  # "SWMIGR"

_MIGRATIONS_TABLE: Final = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component TEXT NOT NULL,
    version INTEGER NOT NULL,
    name TEXT NOT NULL,
    applied_at_ms BIGINT NOT NULL,
    PRIMARY KEY (component, version)
)"""


class Backend(StrEnum):
    """Which engine a `Database` talks to."""

    SQLITE = "sqlite"
    POSTGRESQL = "postgresql"


class DatabaseError(Exception):
    """A statement or connection failed; the message never holds the URL's password."""


class IntegrityError(DatabaseError):
    """A constraint (unique, not null, foreign key, check) refused the change."""


@dataclass(frozen=True)
class Migration:
    """One schema step of a component: statements for every backend, or per backend where they differ.

    `sql` runs on both backends unless `sqlite` or `postgresql` overrides it for that one.
    Each statement is run on its own (no script splitting), inside the migration's transaction.
    """

    version: int
    name: str
    sql: tuple[str, ...] = ()
    sqlite: tuple[str, ...] | None = None
    postgresql: tuple[str, ...] | None = None

    def statements(self, backend: Backend) -> tuple[str, ...]:
        """The statements to run on `backend`."""
        override = self.sqlite if backend is Backend.SQLITE else self.postgresql
        return self.sql if override is None else override


class Statements(Protocol):
    """What runs SQL: a `Database` (each call on its own) or a transaction from `Database.transaction()`."""

    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the number of rows it changed."""
        ...

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement once per parameter row."""
        ...

    async def fetch_all(self, sql: str, params: Params = ()) -> list[Row]:
        """Run a query (or a statement with RETURNING); rows as dicts by column name."""
        ...

    async def fetch_one(self, sql: str, params: Params = ()) -> Row | None:
        """The first row of a query, or None."""
        ...


class Database(ABC):
    """An open database. Use it directly for single statements (each commits on its own) and
    `transaction()` for several that must commit together. Close it with `close()` or `async with`.

    Inside a transaction, run statements through the transaction object only: the database
    itself is busy with it (on SQLite a direct call would wait for the transaction to end).
    """

    backend: Backend

    def __init__(self, display_url: str) -> None:
        self.display_url = display_url

    @abstractmethod
    async def execute(self, sql: str, params: Params = ()) -> int:
        """Run one statement; returns the number of rows it changed."""

    @abstractmethod
    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        """Run one statement once per parameter row, in one transaction."""

    @abstractmethod
    async def fetch_all(self, sql: str, params: Params = ()) -> list[Row]:
        """Run a query (or a statement with RETURNING); rows as dicts by column name."""

    async def fetch_one(self, sql: str, params: Params = ()) -> Row | None:
        """The first row of a query, or None."""
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None

    @abstractmethod
    def transaction(self) -> AbstractAsyncContextManager[Statements]:
        """`async with db.transaction() as tx:` commits when the block ends, rolls back if it raises."""

    @abstractmethod
    def _migration_transaction(self) -> AbstractAsyncContextManager[Statements]:
        """A transaction that holds the mesh-wide migration lock."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection(s); the database is unusable afterwards."""

    async def __aenter__(self) -> Database:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def migrate(self, component: str, migrations: Sequence[Migration]) -> list[int]:
        """Apply `component`'s migrations that have not run yet; returns the versions applied now.

        Versions must count 1, 2, 3, ... in order. A recorded version whose name differs from
        the code's is refused (two branches numbered different migrations the same), rather
        than silently skipped. Versions recorded beyond the code's are left alone, so an older
        release still runs against a schema that a newer one extended.
        """
        _check_migrations(component, migrations)
        applied_now: list[int] = []
        async with self._migration_transaction() as tx:
            await tx.execute(_MIGRATIONS_TABLE)
            rows = await tx.fetch_all(
                "SELECT version, name FROM schema_migrations WHERE component = ?", (component,)
            )
            recorded = {int(row["version"]): str(row["name"]) for row in rows}
            for migration in migrations:
                if migration.version in recorded:
                    if recorded[migration.version] != migration.name:
                        raise DatabaseError(
                            f"migration {component} v{migration.version} is recorded as "
                            f"{recorded[migration.version]!r} but this release calls it {migration.name!r}"
                        )
                    continue
                for statement in migration.statements(self.backend):
                    await tx.execute(statement)
                await tx.execute(
                    "INSERT INTO schema_migrations (component, version, name, applied_at_ms)"
                    " VALUES (?, ?, ?, ?)",
                    (component, migration.version, migration.name, now_ms()),
                )
                applied_now.append(migration.version)
        return applied_now


def now_ms() -> int:
    """Wall-clock milliseconds since the epoch: the one time format stored in SQL."""
    return time.time_ns() // 1_000_000


def _check_migrations(component: str, migrations: Sequence[Migration]) -> None:
    if not component:
        raise ValueError("a migration component needs a name")
    for expected, migration in enumerate(migrations, start=1):
        if migration.version != expected:
            raise ValueError(
                f"{component} migrations must be numbered 1, 2, 3, ...: found {migration.version}"
            )
        if not migration.name:
            raise ValueError(f"{component} migration {migration.version} needs a name")


# --- URLs -----------------------------------------------------------------------------------


def default_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where a local mesh keeps durable state: `$SWITCHYARD_STATE_DIR`, `$XDG_STATE_HOME/switchyard`
    or `~/.local/state/switchyard`."""
    env = os.environ if environ is None else environ
    if env.get("SWITCHYARD_STATE_DIR"):
        return Path(env["SWITCHYARD_STATE_DIR"]).expanduser()
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]).expanduser() / "switchyard"
    return Path.home() / ".local" / "state" / "switchyard"


def default_database_url(environ: Mapping[str, str] | None = None) -> str:
    """`DATABASE_URL` when it is set, else a SQLite file in the state directory."""
    env = os.environ if environ is None else environ
    if env.get("DATABASE_URL"):
        return env["DATABASE_URL"]
    return f"sqlite:///{(default_state_dir(env) / DATABASE_FILE).absolute()}"


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, fit for messages and logs."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable database url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:***@{netloc[1]}"))


async def open_database(
    url: str | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    pool_max_size: int = 10,
    connect_timeout_s: float = 10.0,
) -> Database:
    """Open `url` (default: `default_database_url(environ)`).

    Raises `SettingsError` naming `DATABASE_URL` for a URL it cannot use and `DatabaseError`
    when the database cannot be reached or opened.
    """
    resolved = url or default_database_url(environ)
    display = redact_url(resolved)
    scheme = resolved.split(":", 1)[0].lower() if ":" in resolved else ""
    if scheme == "sqlite":
        path = _sqlite_path(resolved)
        database = _SqliteDatabase(path, display)
        await database.connect()
        return database
    if scheme in ("postgresql", "postgres", "postgresql+asyncpg"):
        dsn = "postgresql" + resolved[len(scheme) :]
        try:
            pool = await asyncpg.create_pool(
                dsn, min_size=1, max_size=pool_max_size, timeout=connect_timeout_s
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            raise DatabaseError(f"cannot connect to {display}: {_describe(exc)}") from None
        return _PostgresDatabase(pool, display)
    raise SettingsError(
        f"DATABASE_URL: unsupported database {display!r}: use sqlite:///path or postgresql://host/db"
    )


def _sqlite_path(url: str) -> str:
    rest = url.split(":", 1)[1]
    if not rest.startswith("//"):
        raise SettingsError(f"DATABASE_URL: {url!r}: a SQLite URL looks like sqlite:///path/to/file.db")
    path = rest[2:].split("?", 1)[0]
    if path in ("", "/", "/:memory:"):
        return ":memory:"
    if not path.startswith("/"):
        raise SettingsError(f"DATABASE_URL: {url!r}: a SQLite URL has no host: sqlite:///path/to/file.db")
    return path[1:]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --- SQLite ---------------------------------------------------------------------------------


def _sqlite_connect(path: str) -> sqlite3.Connection:
    if path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    # Autocommit mode: this module issues BEGIN / COMMIT itself.
    conn = sqlite3.connect(path, isolation_level=None, timeout=SQLITE_BUSY_TIMEOUT_S)
    conn.row_factory = sqlite3.Row
    if path != ":memory:":
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed transaction survives a power loss too, not only a crash (NORMAL
        # can lose the last ones). The ledger's rows and the outbox's commits are money; both
        # write in batches off the request path, and an fsync costs ~0.2 ms here.
        conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def _sqlite_errors(fn: Callable[..., _T]) -> Callable[..., _T]:
    @functools.wraps(fn)
    def wrapper(*args: Any) -> _T:
        try:
            return fn(*args)
        except sqlite3.IntegrityError as exc:
            raise IntegrityError(str(exc)) from None
        except sqlite3.Error as exc:
            raise DatabaseError(_describe(exc)) from None

    return wrapper


@_sqlite_errors
def _sqlite_execute(conn: sqlite3.Connection, sql: str, params: Params) -> int:
    cursor = conn.execute(sql, tuple(params))
    try:
        return max(cursor.rowcount, 0)
    finally:
        cursor.close()


@_sqlite_errors
def _sqlite_executemany(conn: sqlite3.Connection, sql: str, rows: list[tuple[object, ...]]) -> None:
    conn.executemany(sql, rows).close()


@_sqlite_errors
def _sqlite_fetch(conn: sqlite3.Connection, sql: str, params: Params) -> list[Row]:
    cursor = conn.execute(sql, tuple(params))
    try:
        return [dict(row) for row in cursor.fetchall()]
    finally:
        cursor.close()


@_sqlite_errors
def _sqlite_run(conn: sqlite3.Connection, sql: str) -> None:
    conn.execute(sql).close()


def _sqlite_begun(fn: Callable[..., _T]) -> Callable[..., _T]:
    """`fn` preceded by BEGIN IMMEDIATE in the same call: a transaction's first statement costs
    one trip to the connection's thread, not two."""

    def begun(conn: sqlite3.Connection, *args: Any) -> _T:
        _sqlite_run(conn, "BEGIN IMMEDIATE")
        return fn(conn, *args)

    return begun


_SQLITE_BEGUN: dict[Callable[..., Any], Callable[..., Any]] = {}


@_sqlite_errors
def _sqlite_executemany_atomic(conn: sqlite3.Connection, sql: str, rows: list[tuple[object, ...]]) -> None:
    """BEGIN IMMEDIATE, the statement for every row, COMMIT: one transaction in one call."""
    conn.execute("BEGIN IMMEDIATE").close()
    try:
        conn.executemany(sql, rows).close()
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK").close()
        raise
    conn.execute("COMMIT").close()


class _SqliteDatabase(Database):
    backend = Backend.SQLITE

    def __init__(self, path: str, display_url: str) -> None:
        super().__init__(display_url)
        self._path = path
        # One thread owns the connection: statements run in the order they were sent, and a
        # transaction's ROLLBACK always runs after the statement it follows, even on cancel.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="switchyard-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()

    async def connect(self) -> None:
        try:
            self._conn = await self._call(_sqlite_connect, self._path)
        except (sqlite3.Error, OSError) as exc:
            self._worker.shutdown(wait=False)
            raise DatabaseError(f"cannot open {self.display_url}: {_describe(exc)}") from None

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise DatabaseError(f"{self.display_url} is closed")
        return self._conn

    async def execute(self, sql: str, params: Params = ()) -> int:
        async with self._lock:
            return await self._call(_sqlite_execute, self._connection, sql, params)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        # One trip to the connection's thread for the whole transaction.
        batch = [tuple(row) for row in rows]
        async with self._lock:
            await self._call(_sqlite_executemany_atomic, self._connection, sql, batch)

    async def fetch_all(self, sql: str, params: Params = ()) -> list[Row]:
        async with self._lock:
            return await self._call(_sqlite_fetch, self._connection, sql, params)

    def transaction(self) -> AbstractAsyncContextManager[Statements]:
        return self._transaction()

    def _migration_transaction(self) -> AbstractAsyncContextManager[Statements]:
        # BEGIN IMMEDIATE takes the file's write lock: migrations in other processes wait.
        return self._transaction()

    @asynccontextmanager
    async def _transaction(self) -> AsyncIterator[Statements]:
        async with self._lock:
            conn = self._connection
            # BEGIN IMMEDIATE (the write lock now, so two writers never deadlock upgrading a read
            # lock) runs with the transaction's first statement, in the same trip to the thread.
            tx = _SqliteTransaction(self, conn)
            try:
                yield tx
            except BaseException:
                # SQLite may already have rolled back (some errors end the transaction): keep the first error.
                if tx.begun:
                    with contextlib.suppress(DatabaseError):
                        await self._call(_sqlite_run, conn, "ROLLBACK")
                raise
            if tx.begun:
                await self._call(_sqlite_run, conn, "COMMIT")

    async def close(self) -> None:
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is not None:
                await self._call(conn.close)
        self._worker.shutdown(wait=True)


class _SqliteTransaction:
    def __init__(self, database: _SqliteDatabase, conn: sqlite3.Connection) -> None:
        self._db = database
        self._conn = conn
        # Whether BEGIN has run (with the first statement); a transaction with no statement
        # never touches the connection.
        self.begun = False

    async def _run(self, fn: Callable[..., _T], *args: Any) -> _T:
        if self.begun:
            return await self._db._call(fn, self._conn, *args)
        first = _SQLITE_BEGUN.get(fn)
        if first is None:
            first = _SQLITE_BEGUN.setdefault(fn, _sqlite_begun(fn))
        # Marked before the call: if BEGIN ran and the statement failed, ROLLBACK must follow.
        self.begun = True
        return await self._db._call(first, self._conn, *args)

    async def execute(self, sql: str, params: Params = ()) -> int:
        return await self._run(_sqlite_execute, sql, params)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        await self._run(_sqlite_executemany, sql, [tuple(row) for row in rows])

    async def fetch_all(self, sql: str, params: Params = ()) -> list[Row]:
        return await self._run(_sqlite_fetch, sql, params)

    async def fetch_one(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None


# --- PostgreSQL -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def to_postgres_params(sql: str) -> str:
    """Rewrite `?` placeholders to `$1, $2, ...`, leaving quoted text and comments alone."""
    out: list[str] = []
    index = 0
    count = 0
    length = len(sql)
    while index < length:
        char = sql[index]
        if char in ("'", '"'):
            end = index + 1
            while end < length:
                if sql[end] == char:
                    if end + 1 < length and sql[end + 1] == char:  # doubled quote inside
                        end += 2
                        continue
                    break
                end += 1
            out.append(sql[index : end + 1])
            index = end + 1
        elif sql.startswith("--", index):
            end = sql.find("\n", index)
            end = length if end < 0 else end
            out.append(sql[index:end])
            index = end
        elif sql.startswith("/*", index):
            end = sql.find("*/", index + 2)
            end = length if end < 0 else end + 2
            out.append(sql[index:end])
            index = end
        elif char == "?":
            count += 1
            out.append(f"${count}")
            index += 1
        else:
            out.append(char)
            index += 1
    return "".join(out)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag: "INSERT 0 1", "UPDATE 3", "DELETE 0", "CREATE TABLE".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


_PG_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _pg_error(exc: BaseException) -> DatabaseError:
    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        return IntegrityError(_describe(exc))
    return DatabaseError(_describe(exc))


class _PostgresStatements:
    """Statements on an asyncpg pool or connection (both have the same query methods)."""

    def __init__(
        self, target: asyncpg.Pool | asyncpg.Connection | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    ) -> None:
        self._target = target

    async def execute(self, sql: str, params: Params = ()) -> int:
        try:
            status = await self._target.execute(to_postgres_params(sql), *params)
        except _PG_ERRORS as exc:
            raise _pg_error(exc) from None
        return _rowcount(status)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        try:
            await self._target.executemany(to_postgres_params(sql), [tuple(row) for row in rows])
        except _PG_ERRORS as exc:
            raise _pg_error(exc) from None

    async def fetch_all(self, sql: str, params: Params = ()) -> list[Row]:
        try:
            records = await self._target.fetch(to_postgres_params(sql), *params)
        except _PG_ERRORS as exc:
            raise _pg_error(exc) from None
        return [dict(record.items()) for record in records]

    async def fetch_one(self, sql: str, params: Params = ()) -> Row | None:
        rows = await self.fetch_all(sql, params)
        return rows[0] if rows else None


class _PostgresDatabase(Database):
    backend = Backend.POSTGRESQL

    def __init__(self, pool: asyncpg.Pool, display_url: str) -> None:
        super().__init__(display_url)
        self._pool = pool
        self._statements = _PostgresStatements(pool)

    async def execute(self, sql: str, params: Params = ()) -> int:
        return await self._statements.execute(sql, params)

    async def executemany(self, sql: str, rows: Iterable[Params]) -> None:
        # asyncpg runs executemany atomically.
        await self._statements.executemany(sql, rows)

    async def fetch_all(self, sql: str, params: Params = ()) -> list[Row]:
        return await self._statements.fetch_all(sql, params)

    def transaction(self) -> AbstractAsyncContextManager[Statements]:
        return self._transaction(lock=False)

    def _migration_transaction(self) -> AbstractAsyncContextManager[Statements]:
        return self._transaction(lock=True)

    @asynccontextmanager
    async def _transaction(self, *, lock: bool) -> AsyncIterator[Statements]:
        try:
            connection = await self._pool.acquire()
        except _PG_ERRORS as exc:
            raise _pg_error(exc) from None
        try:
            transaction = connection.transaction()
            try:
                await transaction.start()
            except _PG_ERRORS as exc:
                raise _pg_error(exc) from None
            statements = _PostgresStatements(connection)
            try:
                if lock:
                    # Held until commit: concurrent migrators queue here, then see what the first applied.
                    await statements.execute("SELECT pg_advisory_xact_lock(?)", (_PG_MIGRATION_LOCK,))
                yield statements
            except BaseException:
                # A broken connection cannot roll back; the server drops its transaction anyway.
                with contextlib.suppress(*_PG_ERRORS):
                    await transaction.rollback()
                raise
            try:
                await transaction.commit()
            except _PG_ERRORS as exc:
                raise _pg_error(exc) from None
        finally:
            await self._pool.release(connection)

    async def close(self) -> None:
        await self._pool.close()
