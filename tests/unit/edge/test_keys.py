"""API keys: format, bearer parsing, and the per-request authenticator over a real (in-memory) SQLite store.

The same store runs against a SQLite file and PostgreSQL in tests/integration/test_keys_sql.py;
here the authenticator's own behaviour is pinned down with a clock the test moves.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import string
from collections.abc import AsyncIterator

import grpc
import pytest

from switchyard.common.catalog import DEFAULT_TIERS
from switchyard.common.errors import Reason, SwitchyardError
from switchyard.common.sql import open_database
from switchyard.edge.keys import (
    KeyAuthenticator,
    KeyScopes,
    KeyStore,
    Principal,
    authorization_from_metadata,
    effective_tier,
    ensure_dev_key,
    generate_key,
    hash_key,
    key_prefix,
    parse_authorization,
)


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def store() -> AsyncIterator[KeyStore]:
    database = await open_database("sqlite://")
    try:
        yield await KeyStore.open(database)
    finally:
        await database.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def authenticator(store: KeyStore, clock: FakeClock, **options: object) -> KeyAuthenticator:
    return KeyAuthenticator(store, clock=clock, **options)  # type: ignore[arg-type]


def fake_key() -> str:
    """A well-formed key nobody created."""
    public = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    secret = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    return f"sy-{public}-{secret}"


def assert_unauthenticated(error: SwitchyardError, *secrets_: str) -> None:
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert error.reason == Reason.UNAUTHENTICATED
    shown = error.message + repr(error.metadata) + repr(error)
    for secret in secrets_:
        assert secret not in shown


# --- the key --------------------------------------------------------------------------------


def test_generated_keys_are_well_formed_unique_and_named_by_their_prefix() -> None:
    keys = [generate_key() for _ in range(200)]
    assert len(set(keys)) == len(keys)
    for key in keys:
        assert re.fullmatch(r"sy-[a-z0-9]{8}-[A-Za-z0-9]{40}", key)
        assert key_prefix(key) == key[:11]
    assert key_prefix("sk-not-ours") is None


def test_keys_are_stored_as_sha256_hex() -> None:
    key = generate_key()
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert hash_key(key) != hash_key(key + "x")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Bearer sy-abc", "sy-abc"),
        ("bearer sy-abc", "sy-abc"),
        ("BEARER   sy-abc  ", "sy-abc"),
        ("sy-abc", "sy-abc"),
        ("  raw-key-value ", "raw-key-value"),
    ],
)
def test_authorization_value_yields_the_key(value: str, expected: str) -> None:
    assert parse_authorization(value) == expected


@pytest.mark.parametrize("value", [None, "", "   ", "Bearer", "bearer   "])
def test_missing_key_is_unauthenticated(value: str | None) -> None:
    with pytest.raises(SwitchyardError) as caught:
        parse_authorization(value)
    assert_unauthenticated(caught.value)
    assert "missing API key" in caught.value.message


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Token abc", "Bearer two words"])
def test_other_schemes_are_unauthenticated_without_echoing_them(value: str) -> None:
    with pytest.raises(SwitchyardError) as caught:
        parse_authorization(value)
    assert_unauthenticated(caught.value, value.split()[-1])


def test_authorization_is_found_in_grpc_metadata() -> None:
    metadata = (("x-request-id", "r1"), ("Authorization", b"Bearer k1"), ("authorization", "Bearer k2"))
    assert authorization_from_metadata(metadata) == "Bearer k1"
    assert authorization_from_metadata((("x-request-id", "r1"),)) is None
    assert authorization_from_metadata(None) is None


# --- store and authenticator ----------------------------------------------------------------


async def test_a_created_key_authenticates_as_its_tenant_with_its_scopes(
    store: KeyStore, clock: FakeClock
) -> None:
    created = await store.create(
        "acme",
        label="ci",
        scopes=KeyScopes(allowed_models=("openai/gpt-4o-mini",), max_tier="pro", admin=True),
    )
    auth = authenticator(store, clock)
    await auth.refresh()

    principal = await auth.authenticate(f"Bearer {created.key}")

    assert principal == Principal(
        tenant_id="acme",
        key_prefix=created.record.prefix,
        allowed_models=frozenset({"openai/gpt-4o-mini"}),
        admin=True,
        max_tier="pro",
    )
    assert auth.stats.hits == 1
    assert auth.stats.db_lookups == 0


async def test_created_key_is_printable_only_on_purpose(store: KeyStore) -> None:
    created = await store.create("acme")
    assert created.key not in repr(created)
    assert hash_key(created.key) not in repr(created)
    assert created.key.startswith(created.record.prefix + "-")


async def test_a_wrong_key_is_unauthenticated_and_the_error_holds_no_key_material(
    store: KeyStore, clock: FakeClock
) -> None:
    real = await store.create("acme")
    auth = authenticator(store, clock)
    await auth.refresh()
    wrong = real.key[:-1] + ("a" if real.key[-1] != "a" else "b")

    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate(f"Bearer {wrong}")

    assert_unauthenticated(caught.value, wrong, wrong[12:], real.record.prefix, hash_key(wrong))


async def test_a_revoked_key_is_refused_after_the_next_refresh(store: KeyStore, clock: FakeClock) -> None:
    created = await store.create("acme")
    auth = authenticator(store, clock)
    await auth.refresh()
    await auth.authenticate(created.key)

    revocation = await store.revoke(created.record.prefix)
    await auth.refresh()

    assert revocation is not None and not revocation.already_revoked
    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate(created.key)
    assert_unauthenticated(caught.value, created.key)


async def test_a_key_created_after_the_last_refresh_works_at_once_with_one_lookup(
    store: KeyStore, clock: FakeClock
) -> None:
    auth = authenticator(store, clock)
    await auth.refresh()
    created = await store.create("acme")

    first = await auth.authenticate(created.key)
    second = await auth.authenticate(created.key)

    assert first == second and first.tenant_id == "acme"
    assert auth.stats.db_lookups == 1
    assert auth.stats.hits == 1


async def test_concurrent_requests_with_an_unknown_key_share_one_lookup(
    store: KeyStore, clock: FakeClock
) -> None:
    auth = authenticator(store, clock)
    await auth.refresh()
    created = await store.create("acme")

    principals = await asyncio.gather(*(auth.authenticate(created.key) for _ in range(10)))

    assert {p.tenant_id for p in principals} == {"acme"}
    assert auth.stats.db_lookups == 1


async def test_a_missed_key_is_refused_from_memory_until_the_negative_entry_expires(
    store: KeyStore, clock: FakeClock
) -> None:
    auth = authenticator(store, clock, refresh_s=5.0, negative_ttl_s=30.0)
    await auth.refresh()
    bad = fake_key()

    for _ in range(3):
        with pytest.raises(SwitchyardError):
            await auth.authenticate(bad)
    assert auth.stats.db_lookups == 1
    assert auth.stats.negative_hits == 2

    clock.advance(31.0)
    with pytest.raises(SwitchyardError):
        await auth.authenticate(bad)
    assert auth.stats.db_lookups == 2


async def test_a_key_of_no_known_shape_is_refused_without_a_lookup(store: KeyStore, clock: FakeClock) -> None:
    auth = authenticator(store, clock)
    await auth.refresh()

    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate("Bearer sk-definitely-not-ours")

    assert_unauthenticated(caught.value, "sk-definitely-not-ours")
    assert auth.stats.db_lookups == 0
    assert auth.stats.malformed == 1


async def test_a_flood_of_distinct_wrong_keys_is_capped_in_lookups_and_valid_keys_still_pass(
    store: KeyStore, clock: FakeClock
) -> None:
    good = await store.create("acme")
    auth = authenticator(store, clock, miss_lookups_per_s=3.0)
    await auth.refresh()

    for _ in range(20):
        with pytest.raises(SwitchyardError) as caught:
            await auth.authenticate(fake_key())
        assert_unauthenticated(caught.value)
    assert auth.stats.db_lookups == 3
    assert auth.stats.throttled == 17
    assert (await auth.authenticate(good.key)).tenant_id == "acme"

    clock.advance(1.0)
    with pytest.raises(SwitchyardError):
        await auth.authenticate(fake_key())
    assert auth.stats.db_lookups == 4


async def test_a_key_whose_tenant_is_not_configured_is_permission_denied(
    store: KeyStore, clock: FakeClock
) -> None:
    created = await store.create("gone")
    auth = authenticator(store, clock, known_tenants={"acme"})
    await auth.refresh()

    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate(created.key)

    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == Reason.PERMISSION_DENIED
    auth.known_tenants = {"acme", "gone"}
    assert (await auth.authenticate(created.key)).tenant_id == "gone"


async def test_an_unreachable_database_is_unavailable_not_unauthenticated(
    store: KeyStore, clock: FakeClock
) -> None:
    known = await store.create("acme")
    auth = authenticator(store, clock)
    await auth.refresh()
    await store.database.close()

    with pytest.raises(SwitchyardError) as caught:
        await auth.authenticate(fake_key())

    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.retryable
    # Keys already in memory keep working while the database is away.
    assert (await auth.authenticate(known.key)).tenant_id == "acme"


async def test_the_background_refresh_drops_a_revoked_key(store: KeyStore) -> None:
    created = await store.create("acme")
    auth = KeyAuthenticator(store, refresh_s=0.02)
    await auth.start()
    try:
        await auth.authenticate(created.key)
        await store.revoke(created.record.prefix)
        refreshes = auth.stats.refreshes
        deadline = asyncio.get_running_loop().time() + 10.0
        while auth.stats.refreshes < refreshes + 2:
            assert asyncio.get_running_loop().time() < deadline, "the background refresh never ran"
            await asyncio.sleep(0.01)
        with pytest.raises(SwitchyardError) as caught:
            await auth.authenticate(created.key)
        assert_unauthenticated(caught.value, created.key)
    finally:
        await auth.close()


# --- scopes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key_models", "tenant_models", "model", "allowed"),
    [
        (None, (), "openai/gpt-4o", True),
        (None, ("openai/gpt-4o-mini",), "openai/gpt-4o", False),
        (frozenset({"openai/gpt-4o-mini"}), (), "openai/gpt-4o-mini", True),
        (frozenset({"openai/gpt-4o-mini"}), (), "openai/gpt-4o", False),
        # A key never widens its tenant's list.
        (frozenset({"openai/gpt-4o"}), ("openai/gpt-4o-mini",), "openai/gpt-4o", False),
    ],
)
def test_a_model_outside_the_scope_is_permission_denied(
    key_models: frozenset[str] | None, tenant_models: tuple[str, ...], model: str, allowed: bool
) -> None:
    principal = Principal(tenant_id="acme", key_prefix="sy-abcdefgh", allowed_models=key_models)
    assert principal.may_use(model, tenant_models) is allowed
    if allowed:
        principal.require_model(model, tenant_models)
        return
    with pytest.raises(SwitchyardError) as caught:
        principal.require_model(model, tenant_models)
    assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.reason == Reason.PERMISSION_DENIED
    assert caught.value.metadata == {"model": model}


@pytest.mark.parametrize(
    ("max_tier", "tenant_tier", "expected"),
    [
        (None, "master", "master"),
        ("pro", "master", "pro"),
        ("master", "free", "free"),
        ("nope", "pro", "pro"),
    ],
)
def test_a_key_tier_only_lowers_the_tenant_tier(
    max_tier: str | None, tenant_tier: str, expected: str
) -> None:
    principal = Principal(tenant_id="acme", key_prefix="sy-abcdefgh", allowed_models=None, max_tier=max_tier)
    assert effective_tier(principal, tenant_tier, DEFAULT_TIERS) == expected


# --- dev key and validation -----------------------------------------------------------------


async def test_the_dev_key_is_stored_once_and_authenticates(store: KeyStore, clock: FakeClock) -> None:
    dev_key = "local-dev-key-for-make-run"
    first = await ensure_dev_key(store, dev_key)
    second = await ensure_dev_key(store, dev_key)
    auth = authenticator(store, clock)
    await auth.refresh()

    assert first == second
    assert first.tenant_id == "default"
    assert first.prefix.startswith("dev-") and dev_key not in first.prefix
    assert [r.prefix for r in await store.list_keys()] == [first.prefix]
    assert (await auth.authenticate(f"Bearer {dev_key}")).tenant_id == "default"


async def test_a_generated_dev_key_keeps_its_own_prefix(store: KeyStore) -> None:
    key = generate_key()
    record = await ensure_dev_key(store, key)
    assert record.prefix == key_prefix(key)


@pytest.mark.parametrize(
    ("tenant", "label", "field"),
    [
        ("", "", "tenant"),
        ("has space", "", "tenant"),
        ("acme", "two\nlines", "label"),
        ("acme", "x" * 201, "label"),
    ],
)
async def test_bad_key_fields_are_invalid_argument(
    store: KeyStore, tenant: str, label: str, field: str
) -> None:
    with pytest.raises(SwitchyardError) as caught:
        await store.create(tenant, label=label)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.metadata["field"] == field
    assert await store.list_keys() == []


async def test_a_trivial_dev_key_is_refused(store: KeyStore) -> None:
    with pytest.raises(SwitchyardError) as caught:
        await ensure_dev_key(store, "short")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "short" not in caught.value.message
