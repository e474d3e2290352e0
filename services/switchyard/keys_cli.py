"""`switchyard keys`: create, list and revoke API keys in the database named by `DATABASE_URL`.

    switchyard keys create --tenant acme [--label ci] [--models openai/gpt-4o-mini,fast]
                           [--max-tier pro] [--admin] [--json]
    switchyard keys list [--tenant acme] [--active] [--json]
    switchyard keys revoke sy-ab12cd34

`create` prints the new key alone on stdout (so `KEY=$(switchyard keys create --tenant acme)`
works) and what it made on stderr; the key is shown this once and cannot be recovered. Tenants,
models (aliases resolve to their model ids) and tiers are checked against the catalog
(`SWITCHYARD_CATALOG`, as the services read it). `list` shows prefixes, never keys or hashes.
Expected failures print one line on stderr: exit 2 for bad input or configuration, 1 for an
unknown key or an unreachable database.

Also runnable as `python -m switchyard.keys_cli ...`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING

# The database drivers, grpc and pydantic load only when a keys command runs, so that
# registering `keys` costs the other `switchyard` commands nothing.
if TYPE_CHECKING:
    from switchyard.common.catalog import Catalog
    from switchyard.common.settings import Settings
    from switchyard.edge.keys import ApiKeyRecord, KeyScopes, KeyStore

PROG = "switchyard keys"
DESCRIPTION = "Create, list and revoke API keys in the database named by DATABASE_URL."


class KeysUsageError(Exception):
    """The command names a tenant, model or tier the catalog does not allow."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `keys` to the `switchyard` command's subparsers; its handler is `run`."""
    keys = commands.add_parser("keys", help="create, list and revoke API keys", description=DESCRIPTION)
    add_commands(keys)
    keys.set_defaults(handler=run)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m switchyard.keys_cli ...`: the same as `switchyard keys ...`."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    add_commands(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the parsed `keys` subcommand; returns the exit status."""
    from switchyard.common.catalog import CatalogError
    from switchyard.common.errors import SwitchyardError
    from switchyard.common.settings import Settings, SettingsError
    from switchyard.common.sql import DatabaseError

    try:
        settings = Settings.from_env()
        result: int = asyncio.run(args.keys_handler(args, settings))
        return result
    except (CatalogError, SettingsError, KeysUsageError) as exc:
        return _fail(str(exc), 2)
    except SwitchyardError as exc:
        return _fail(exc.message, 2)
    except DatabaseError as exc:
        return _fail(f"database: {exc}", 1)
    except KeyboardInterrupt:
        return 130


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The `create`, `list` and `revoke` subcommands under `parser`."""
    commands = parser.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    create = commands.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True, help="a tenant named in the catalog")
    create.add_argument("--label", default="", help="what the key is for (shown in listings)")
    create.add_argument(
        "--models",
        default="",
        help="comma-separated models or aliases the key may use (default: the tenant's)",
    )
    create.add_argument("--max-tier", help="cap the key at this tier (default: the tenant's tier)")
    create.add_argument("--admin", action="store_true", help="allow admin methods")
    create.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    create.set_defaults(keys_handler=_create)

    listing = commands.add_parser("list", help="list keys by prefix (never the keys themselves)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    listing.add_argument("--active", action="store_true", help="leave out revoked keys")
    listing.add_argument("--json", action="store_true", help="print JSON lines, one key each")
    listing.set_defaults(keys_handler=_list)

    revoke = commands.add_parser("revoke", help="revoke a key by its prefix")
    revoke.add_argument("prefix", help="the key's prefix, sy-xxxxxxxx, as `keys list` shows it")
    revoke.set_defaults(keys_handler=_revoke)


def _fail(message: str, status: int) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


async def _open_store(settings: Settings) -> KeyStore:
    from switchyard.common.sql import open_database
    from switchyard.edge.keys import KeyStore

    database = await open_database(settings.database_url)
    try:
        return await KeyStore.open(database)
    except BaseException:
        await database.close()
        raise


def _scopes(args: argparse.Namespace, catalog: Catalog) -> KeyScopes:
    from switchyard.edge.keys import KeyScopes

    if args.tenant not in catalog.tenants:
        known = ", ".join(sorted(catalog.tenants)) or "none"
        raise KeysUsageError(f"unknown tenant {args.tenant!r}: the catalog names {known}")
    allowed = catalog.tenants[args.tenant].allowed_models
    models: list[str] = []
    for name in (part.strip() for part in args.models.split(",")):
        if not name:
            continue
        model = catalog.resolve(name)
        if model is None:
            raise KeysUsageError(f"unknown model {name!r}")
        if allowed and model.id not in allowed:
            raise KeysUsageError(
                f"tenant {args.tenant!r} may not use {model.id!r}, so its keys cannot either"
            )
        if model.id not in models:
            models.append(model.id)
    if args.max_tier is not None and args.max_tier not in catalog.tiers:
        raise KeysUsageError(f"unknown tier {args.max_tier!r}: the catalog names {', '.join(catalog.tiers)}")
    return KeyScopes(allowed_models=tuple(models), max_tier=args.max_tier, admin=args.admin)


async def _create(args: argparse.Namespace, settings: Settings) -> int:
    scopes = _scopes(args, settings.catalog)
    store = await _open_store(settings)
    try:
        created = await store.create(args.tenant, label=args.label, scopes=scopes)
    finally:
        await store.database.close()
    if args.json:
        print(json.dumps({"key": created.key, **created.record.to_json()}))
    else:
        print(created.key)
    print(
        f"created {created.record.prefix} for tenant {created.record.tenant_id}; "
        "this is the only time the key is shown",
        file=sys.stderr,
    )
    return 0


async def _list(args: argparse.Namespace, settings: Settings) -> int:
    store = await _open_store(settings)
    try:
        records = await store.list_keys(args.tenant, include_revoked=not args.active)
    finally:
        await store.database.close()
    if args.json:
        for record in records:
            print(json.dumps(record.to_json()))
        return 0
    rows = [("PREFIX", "TENANT", "LABEL", "MODELS", "MAX TIER", "ADMIN", "CREATED", "REVOKED")]
    rows.extend(_row(record) for record in records)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _row(record: ApiKeyRecord) -> tuple[str, str, str, str, str, str, str, str]:
    return (
        record.prefix,
        record.tenant_id,
        record.label or "-",
        ",".join(record.scopes.allowed_models) or "(tenant's)",
        record.scopes.max_tier or "-",
        "yes" if record.scopes.admin else "no",
        _when(record.created_at_ms),
        _when(record.revoked_at_ms) if record.revoked_at_ms is not None else "-",
    )


def _when(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _revoke(args: argparse.Namespace, settings: Settings) -> int:
    store = await _open_store(settings)
    try:
        outcome = await store.revoke(args.prefix)
    finally:
        await store.database.close()
    if outcome is None:
        return _fail("no key has that prefix (see `switchyard keys list`)", 1)
    record = outcome.record
    state = "was already revoked" if outcome.already_revoked else "revoked"
    print(f"{record.prefix} (tenant {record.tenant_id}) {state}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
