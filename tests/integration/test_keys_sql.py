"""API keys and the SQL layer under them, against a SQLite file and a real PostgreSQL server.

Every contract test runs on both backends: the PostgreSQL one gets a fresh database for the
session (tests/support/postgres.py) and each test its own tenant names, so tests never see
each other's keys. The CLI runs as a real subprocess against the same database.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml

from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.settings import SettingsError
from switchyard.common.sql import (
    Backend,
    Database,
    DatabaseError,
    IntegrityError,
    Migration,
    default_database_url,
    open_database,
    redact_url,
    to_postgres_params,
)
from switchyard.edge.keys import (
    COMPONENT,
    MIGRATIONS,
    KeyAuthenticator,
    KeyScopes,
    KeyStore,
    hash_key,
    key_prefix,
)
from switchyard.keys_cli import register as register_keys
from tests.support.postgres import PostgresUnavailable, fresh_postgres_database, skip_or_fail

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CATALOG = REPO / "services" / "switchyard" / "common" / "default_catalog.yaml"


@pytest.fixture(scope="session")
async def postgres_url() -> AsyncIterator[str]:
    try:
        async with fresh_postgres_database() as url:
            yield url
    except PostgresUnavailable as exc:
        skip_or_fail(str(exc))


@pytest.fixture(params=[Backend.SQLITE, Backend.POSTGRESQL])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param is Backend.SQLITE:
        return f"sqlite:///{tmp_path / 'state' / 'switchyard.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    db = await open_database(database_url)
    try:
        yield db
    finally:
        await db.close()


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


# --- keys over both backends ----------------------------------------------------------------


async def test_key_lifecycle_create_authenticate_list_revoke(database: Database) -> None:
    store = await KeyStore.open(database)
    tenant = unique("acme")
    created = await store.create(
        tenant,
        label="ci",
        scopes=KeyScopes(allowed_models=("openai/gpt-4o-mini",), max_tier="pro", admin=True),
    )
    auth = KeyAuthenticator(store)
    await auth.refresh()

    principal = await auth.authenticate(f"Bearer {created.key}")
    assert (principal.tenant_id, principal.key_prefix) == (tenant, created.record.prefix)
    assert principal.allowed_models == frozenset({"openai/gpt-4o-mini"})
    assert principal.admin and principal.max_tier == "pro"

    listed = await store.list_keys(tenant)
    assert listed == [created.record]
    shown = repr(listed) + json.dumps([r.to_json() for r in listed])
    assert created.key not in shown and hash_key(created.key) not in shown
    assert created.key[12:] not in shown

    revocation = await store.revoke(created.record.prefix)
    assert revocation is not None and not revocation.already_revoked
    again = await store.revoke(created.record.prefix)
    assert again is not None and again.already_revoked
    await auth.refresh()
    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate(f"Bearer {created.key}")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.reason == Reason.UNAUTHENTICATED
    assert await store.principal_for_hash(hash_key(created.key)) is None
    [after] = await store.list_keys(tenant)
    assert after.revoked and after.prefix == created.record.prefix
    assert await store.list_keys(tenant, include_revoked=False) == []


async def test_only_hashes_reach_the_database(database: Database) -> None:
    store = await KeyStore.open(database)
    created = await store.create(unique("acme"))
    rows = await database.fetch_all("SELECT * FROM api_keys WHERE prefix = ?", (created.record.prefix,))
    assert len(rows) == 1
    stored = json.dumps(rows, default=str)
    assert created.key not in stored and created.key[12:] not in stored
    assert rows[0]["key_hash"] == hash_key(created.key)


async def test_listing_one_tenant_never_shows_another_tenants_keys(database: Database) -> None:
    store = await KeyStore.open(database)
    acme, globex = unique("acme"), unique("globex")
    mine = [await store.create(acme) for _ in range(2)]
    theirs = await store.create(globex)
    # Listed by creation time, then prefix (two keys made in one millisecond sort by prefix).
    assert sorted(r.prefix for r in await store.list_keys(acme)) == sorted(k.record.prefix for k in mine)
    assert [r.prefix for r in await store.list_keys(globex)] == [theirs.record.prefix]


async def test_the_dev_key_is_stored_once_even_when_two_processes_race(database_url: str) -> None:
    first_db, second_db = await open_database(database_url), await open_database(database_url)
    try:
        first, second = await KeyStore.open(first_db), await KeyStore.open(second_db)
        key = unique("dev-key-for-a-local-mesh")
        records = await asyncio.gather(first.put_key(key, "default"), second.put_key(key, "default"))
        assert records[0] == records[1]
        rows = await first_db.fetch_all("SELECT prefix FROM api_keys WHERE key_hash = ?", (hash_key(key),))
        assert len(rows) == 1
    finally:
        await first_db.close()
        await second_db.close()


# --- the SQL layer over both backends -------------------------------------------------------


async def test_migrations_run_once_however_often_and_from_however_many_processes(database_url: str) -> None:
    component, table = unique("test"), f"t_{uuid.uuid4().hex[:10]}"
    migrations = (
        Migration(1, "create", sql=(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL)",)),
        Migration(
            2,
            "index",
            sqlite=(f"CREATE INDEX {table}_name ON {table} (name)",),
            postgresql=(f"CREATE INDEX {table}_name ON {table} USING btree (name)",),
        ),
    )
    databases = [await open_database(database_url) for _ in range(3)]
    try:
        applied = await asyncio.gather(*(db.migrate(component, migrations) for db in databases))
        assert sorted(v for versions in applied for v in versions) == [1, 2]
        assert await databases[0].migrate(component, migrations) == []
        rows = await databases[0].fetch_all(
            "SELECT version, name FROM schema_migrations WHERE component = ? ORDER BY version", (component,)
        )
        assert [(r["version"], r["name"]) for r in rows] == [(1, "create"), (2, "index")]
        # The keys schema too: opening a store on an existing database changes nothing.
        await KeyStore.open(databases[1])
        assert await databases[2].migrate(COMPONENT, MIGRATIONS) == []
    finally:
        for db in databases:
            await db.close()


async def test_a_migration_renamed_under_the_same_version_is_refused(database: Database) -> None:
    component, table = unique("test"), f"t_{uuid.uuid4().hex[:10]}"
    await database.migrate(component, (Migration(1, "create", sql=(f"CREATE TABLE {table} (id BIGINT)",)),))
    with pytest.raises(DatabaseError, match="recorded as 'create'"):
        await database.migrate(component, (Migration(1, "something_else", sql=("SELECT 1",)),))


async def test_migrations_must_be_numbered_from_one() -> None:
    async with await open_database("sqlite://") as db:
        with pytest.raises(ValueError, match="numbered"):
            await db.migrate("x", (Migration(2, "two", sql=("SELECT 1",)),))


async def test_transactions_commit_together_or_not_at_all(database: Database) -> None:
    table = f"t_{uuid.uuid4().hex[:10]}"
    await database.execute(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT NOT NULL, ok BOOLEAN)")

    async with database.transaction() as tx:
        assert await tx.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (1, "it's?", True)) == 1
        await tx.executemany(f"INSERT INTO {table} VALUES (?, ?, ?)", [(2, "b", False), (3, "c", None)])
    with pytest.raises(RuntimeError):
        async with database.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (4, "d", True))
            raise RuntimeError("abandon")
    with pytest.raises(IntegrityError):
        async with database.transaction() as tx:
            await tx.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (5, "e", True))
            await tx.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (1, "duplicate", True))

    rows = await database.fetch_all(f"SELECT id, name, ok, 'a?b' AS literal FROM {table} ORDER BY id")
    assert [(r["id"], r["name"], r["literal"]) for r in rows] == [
        (1, "it's?", "a?b"),
        (2, "b", "a?b"),
        (3, "c", "a?b"),
    ]
    assert [None if r["ok"] is None else bool(r["ok"]) for r in rows] == [True, False, None]
    assert await database.execute(f"UPDATE {table} SET name = ? WHERE id > ?", ("z", 1)) == 2
    assert await database.fetch_one(f"SELECT name FROM {table} WHERE id = ?", (99,)) is None
    with pytest.raises(IntegrityError):
        await database.execute(f"INSERT INTO {table} VALUES (?, ?, ?)", (2, "again", True))


async def test_a_failed_statement_names_the_problem(database: Database) -> None:
    with pytest.raises(DatabaseError) as caught:
        await database.fetch_all("SELECT * FROM no_such_table_here")
    assert "no_such_table_here" in str(caught.value)


# --- the CLI, as a real process, over both backends -----------------------------------------


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


@dataclass
class CliSetup:
    env: dict[str, str]
    tenant: str
    limited_tenant: str  # may use openai/gpt-4o-mini only


@pytest.fixture
def cli(database_url: str, tmp_path: Path, cli_env: dict[str, str]) -> CliSetup:
    catalog = yaml.safe_load(DEFAULT_CATALOG.read_text())
    tenant, limited = unique("acme"), unique("globex")
    catalog["tenants"] = {
        "default": {"tier": "master"},
        tenant: {"tier": "pro"},
        limited: {"tier": "free", "allowed_models": ["openai/gpt-4o-mini"]},
    }
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog))
    env = {**cli_env, "DATABASE_URL": database_url, "SWITCHYARD_CATALOG": str(path)}
    return CliSetup(env=env, tenant=tenant, limited_tenant=limited)


async def run_cli(env: dict[str, str], *args: str) -> CliResult:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "switchyard.keys_cli",
        *args,
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return CliResult(process.returncode, stdout.decode(), stderr.decode())


async def test_cli_creates_lists_and_revokes_keys_the_edge_accepts(cli: CliSetup, database: Database) -> None:
    created = await run_cli(
        cli.env, "create", "--tenant", cli.tenant, "--label", "ci bot", "--models", "fast"
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    prefix = key_prefix(key)
    assert prefix is not None and created.stdout == key + "\n"
    assert prefix in created.stderr and key not in created.stderr

    store = await KeyStore.open(database)
    auth = KeyAuthenticator(store)
    await auth.refresh()
    principal = await auth.authenticate(f"Bearer {key}")
    assert principal.tenant_id == cli.tenant
    assert principal.allowed_models == frozenset({"openai/gpt-4o-mini"})  # the alias, resolved

    table = await run_cli(cli.env, "list", "--tenant", cli.tenant)
    as_json = await run_cli(cli.env, "list", "--tenant", cli.tenant, "--json")
    for listing in (table, as_json):
        assert listing.returncode == 0, listing.stderr
        assert prefix in listing.stdout
        assert key not in listing.stdout and key[12:] not in listing.stdout
        assert hash_key(key) not in listing.stdout
    [record] = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert record["prefix"] == prefix and record["label"] == "ci bot" and record["revoked_at_ms"] is None

    revoked = await run_cli(cli.env, "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked" in revoked.stdout
    await auth.refresh()
    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate(f"Bearer {key}")
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    active = await run_cli(cli.env, "list", "--tenant", cli.tenant, "--active", "--json")
    assert active.returncode == 0 and active.stdout == ""


async def test_cli_list_by_tenant_shows_only_that_tenant(cli: CliSetup) -> None:
    mine = await run_cli(cli.env, "create", "--tenant", cli.tenant)
    theirs = await run_cli(cli.env, "create", "--tenant", cli.limited_tenant, "--json")
    assert mine.returncode == 0 and theirs.returncode == 0
    their_prefix = json.loads(theirs.stdout)["prefix"]
    listing = await run_cli(cli.env, "list", "--tenant", cli.tenant, "--json")
    prefixes = [json.loads(line)["prefix"] for line in listing.stdout.splitlines()]
    assert prefixes == [key_prefix(mine.stdout.strip())]
    assert their_prefix not in listing.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--tenant", "nobody"), "unknown tenant 'nobody'"),
        (("--models", "no/such-model"), "unknown model 'no/such-model'"),
        (("--max-tier", "platinum"), "unknown tier 'platinum'"),
    ],
)
async def test_cli_refuses_what_the_catalog_does_not_name(
    cli: CliSetup, database: Database, args: tuple[str, ...], message: str
) -> None:
    full = ("create", "--tenant", cli.tenant, *args)
    result = await run_cli(cli.env, *full)
    assert result.returncode == 2
    assert result.stdout == ""
    assert message in result.stderr and "Traceback" not in result.stderr
    store = await KeyStore.open(database)
    assert await store.list_keys(cli.tenant) == []


async def test_cli_refuses_a_model_the_tenant_may_not_use(cli: CliSetup) -> None:
    result = await run_cli(cli.env, "create", "--tenant", cli.limited_tenant, "--models", "openai/gpt-4o")
    assert result.returncode == 2
    assert "may not use 'openai/gpt-4o'" in result.stderr


async def test_cli_revoking_an_unknown_prefix_fails_clearly(cli: CliSetup) -> None:
    result = await run_cli(cli.env, "revoke", "sy-00000000")
    assert result.returncode == 1
    assert "no key has that prefix" in result.stderr and "Traceback" not in result.stderr


async def test_a_revocation_from_the_cli_reaches_a_running_authenticator(
    cli: CliSetup, database: Database
) -> None:
    store = await KeyStore.open(database)
    created = await store.create(cli.tenant)
    auth = KeyAuthenticator(store, refresh_s=0.05)
    await auth.start()
    try:
        await auth.authenticate(created.key)
        result = await run_cli(cli.env, "revoke", created.record.prefix)
        assert result.returncode == 0, result.stderr
        deadline = asyncio.get_running_loop().time() + 10.0
        while True:
            try:
                await auth.authenticate(created.key)
            except SwitchyardError as exc:
                assert exc.code == grpc.StatusCode.UNAUTHENTICATED
                break
            assert asyncio.get_running_loop().time() < deadline, "the revoked key still works"
            await asyncio.sleep(0.02)
    finally:
        await auth.close()


# --- URLs and errors (no server needed) -----------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_cli_with_an_unreachable_database_fails_without_printing_the_password(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, "DATABASE_URL": f"postgresql://switchyard:hunter2secret@127.0.0.1:{_free_port()}/x"}
    result = await run_cli(env, "list")
    assert result.returncode == 1
    assert "cannot connect" in result.stderr and "***" in result.stderr
    assert "hunter2secret" not in result.stderr and "Traceback" not in result.stderr


async def test_sqlite_default_lives_in_the_state_dir_and_is_created(tmp_path: Path) -> None:
    state = tmp_path / "fresh" / "state"
    url = default_database_url({"SWITCHYARD_STATE_DIR": str(state)})
    assert url == f"sqlite:///{state / 'switchyard.db'}"
    async with await open_database(environ={"SWITCHYARD_STATE_DIR": str(state)}) as db:
        await KeyStore.open(db)
    assert (state / "switchyard.db").exists()
    assert default_database_url({"DATABASE_URL": "postgresql://h/db", "SWITCHYARD_STATE_DIR": "/x"}) == (
        "postgresql://h/db"
    )
    assert default_database_url({"XDG_STATE_HOME": "/xdg"}) == "sqlite:////xdg/switchyard/switchyard.db"


@pytest.mark.parametrize("url", ["mysql://h/db", "sqlite:relative.db", "sqlite://host/file.db"])
async def test_an_unusable_database_url_names_the_variable(url: str) -> None:
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        await open_database(url)


def test_redacted_urls_keep_everything_but_the_password() -> None:
    assert redact_url("postgresql://u:pw@h:5432/db?x=1") == "postgresql://u:***@h:5432/db?x=1"
    assert redact_url("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("SELECT a FROM t WHERE b = ? AND c = ?", "SELECT a FROM t WHERE b = $1 AND c = $2"),
        ("SELECT '?', \"q?\" FROM t WHERE x = ?", "SELECT '?', \"q?\" FROM t WHERE x = $1"),
        ("SELECT 'it''s ?' WHERE y = ?", "SELECT 'it''s ?' WHERE y = $1"),
        ("SELECT 1 -- why?\nWHERE z = ?", "SELECT 1 -- why?\nWHERE z = $1"),
        ("SELECT /* ? */ ?", "SELECT /* ? */ $1"),
    ],
)
def test_placeholders_become_numbered_outside_quotes_and_comments(sql: str, expected: str) -> None:
    assert to_postgres_params(sql) == expected


def test_the_postgres_helper_honours_an_explicit_server(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.postgres import candidate_urls

    monkeypatch.setenv("SWITCHYARD_TEST_POSTGRES_URL", "postgresql://me@db.example:6543/x")
    assert candidate_urls() == ["postgresql://me@db.example:6543/x"]
    monkeypatch.delenv("SWITCHYARD_TEST_POSTGRES_URL")
    monkeypatch.setenv("DATABASE_URL", "sqlite:///x.db")
    assert candidate_urls() == [
        "postgresql://postgres@127.0.0.1:5432/test",
        "postgresql://root@127.0.0.1:5432/test",
    ]
    monkeypatch.setenv("DATABASE_URL", "postgresql://ci@127.0.0.1:5432/test")
    assert candidate_urls()[0] == "postgresql://ci@127.0.0.1:5432/test"


def test_keys_registers_under_the_switchyard_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser(prog="switchyard")
    register_keys(parser.add_subparsers(dest="command", required=True))
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'keys.db'}")
    monkeypatch.delenv("SWITCHYARD_CATALOG", raising=False)

    with pytest.raises(SystemExit) as shown_help:
        parser.parse_args(["keys", "--help"])
    assert shown_help.value.code == 0
    assert "revoke" in capsys.readouterr().out

    args = parser.parse_args(["keys", "create", "--tenant", "default", "--admin"])
    assert args.handler(args) == 0
    key = capsys.readouterr().out.strip()
    args = parser.parse_args(["keys", "list", "--json"])
    assert args.handler(args) == 0
    [record] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert record["prefix"] == key_prefix(key) and record["admin"] is True
