"""`switchyard erase-end-user`: erase one end user of a tenant (GDPR) from the ledger and the cache.

    switchyard erase-end-user --tenant acme --end-user alice [--actor dpo@acme.example]

An erasure is two calls, in this order:

1. the ledger's `EraseEndUser`: the end user's usage rows anonymised, the budgets scoped to
   them deleted with their audit entries and alerts, the erasure audited (under a keyed hash of
   the id);
2. the cache's `Invalidate` with the tenant and the end user: the answers cached for the end
   user's requests removed, in every tier.

The ledger has no channel to the cache (an erasure must not fail because the cache is down),
so this command makes both calls: the targets are the services' own settings
(`SWITCHYARD_LEDGER_TARGET`, `SWITCHYARD_CACHE_TARGET`), or `--ledger-target` / `--cache-target`.
Both calls are idempotent: after a failure, run the command again.

Prints what each step did on stdout. Exit status: 0 both done; 1 the ledger failed (nothing
was erased, the cache was not called); 3 the ledger erased the end user but the cache did not
answer (a warning on stderr says so; retry); 2 bad input or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from typing import TYPE_CHECKING, Final

# grpc and the stubs load only when the command runs, so that registering it costs the other
# `switchyard` commands nothing.
if TYPE_CHECKING:
    import grpc

__all__ = ["CACHE_NOT_ERASED", "erase_end_user", "register"]

PROG: Final = "switchyard erase-end-user"
CACHE_NOT_ERASED: Final = 3
"""Exit status when the ledger erased the end user and the cache did not answer."""


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `erase-end-user` to the `switchyard` command's subparsers."""
    erase = commands.add_parser(
        "erase-end-user",
        help="erase an end user (GDPR) from the ledger and the cache",
        description="Erase an end user of a tenant: the ledger's EraseEndUser, then the cache's Invalidate.",
    )
    erase.add_argument("--tenant", required=True, help="the tenant the end user belongs to")
    erase.add_argument("--end-user", required=True, help="the end user id, as requests carried it")
    erase.add_argument(
        "--actor", help="who asks, for the ledger's audit (default SWITCHYARD_ACTOR, else cli:<login>)"
    )
    erase.add_argument("--ledger-target", help="the ledger (default SWITCHYARD_LEDGER_TARGET)")
    erase.add_argument("--cache-target", help="the cache (default SWITCHYARD_CACHE_TARGET)")
    erase.add_argument("--timeout", type=float, default=30.0, help="deadline of each call in seconds")
    erase.set_defaults(handler=run)


def _login() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name (a container's numeric user)
        return "cli"


def run(args: argparse.Namespace) -> int:
    """The handler of the parsed command; its exit status."""
    if not args.tenant.strip() or not args.end_user.strip():
        print(f"{PROG}: error: --tenant and --end-user must not be empty", file=sys.stderr)
        return 2
    actor = args.actor if args.actor is not None else os.environ.get("SWITCHYARD_ACTOR") or _login()
    if not actor.strip():
        print(f"{PROG}: error: --actor must not be empty: erasures are audited", file=sys.stderr)
        return 2
    from switchyard.common.settings import Settings

    settings = Settings.from_env()
    return asyncio.run(
        erase_end_user(
            tenant_id=args.tenant,
            end_user=args.end_user,
            actor=actor,
            ledger_target=args.ledger_target or settings.ledger_target,
            cache_target=args.cache_target or settings.cache_target,
            timeout_s=args.timeout,
        )
    )


async def erase_end_user(
    *, tenant_id: str, end_user: str, actor: str, ledger_target: str, cache_target: str, timeout_s: float
) -> int:
    """The ledger's erasure, then the cache's; the exit status (see the module docstring)."""
    import grpc

    from switchyard.common.channels import open_channel
    from switchyard.v1 import cache_pb2, cache_pb2_grpc, ledger_pb2, ledger_pb2_grpc

    channel = open_channel(ledger_target, default_timeout_s=timeout_s)
    try:
        erased = await ledger_pb2_grpc.CostLedgerServiceStub(channel).EraseEndUser(
            ledger_pb2.EraseEndUserRequest(tenant_id=tenant_id, end_user=end_user, actor=actor),
            timeout=timeout_s,
        )
    except grpc.aio.AioRpcError as exc:
        print(
            f"{PROG}: error: the ledger at {ledger_target}: {_describe(exc)}; nothing was erased",
            file=sys.stderr,
        )
        return 1
    finally:
        await channel.close()
    print(
        f"ledger: {erased.rows_anonymised} usage rows anonymised, {erased.budgets_deleted} budgets,"
        f" {erased.audit_entries_deleted} audit entries and {erased.alerts_deleted} alerts deleted"
    )
    channel = open_channel(cache_target, default_timeout_s=timeout_s)
    try:
        invalidated = await cache_pb2_grpc.CacheServiceStub(channel).Invalidate(
            cache_pb2.InvalidateRequest(tenant_id=tenant_id, end_user=end_user), timeout=timeout_s
        )
    except grpc.aio.AioRpcError as exc:
        print(
            f"{PROG}: warning: the ledger erased the end user, but the cache at {cache_target} did not:"
            f" {_describe(exc)}. Their cached answers stay until they expire; run this command again"
            " (both steps are safe to repeat).",
            file=sys.stderr,
        )
        return CACHE_NOT_ERASED
    finally:
        await channel.close()
    print(f"cache: {invalidated.removed} cached answers removed")
    return 0


def _describe(exc: grpc.aio.AioRpcError) -> str:
    import grpc

    from switchyard.common.errors import from_rpc_error

    error = from_rpc_error(exc)
    if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and not error.metadata:
        return f"unreachable ({exc.code().name})"
    return f"{error.code.name} {error.reason.value}: {error.message}"
