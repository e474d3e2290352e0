"""API keys: how they look, how they are stored, and how the edge checks one per request.

A key is `sy-<public id>-<secret>`: `sy-` marks it as a Switchyard key, the public id is 8
lowercase letters and digits, the secret 40 letters and digits from `secrets` (about 238 bits).
The *prefix* `sy-<public id>` names the key in listings, logs and `keys revoke`; the secret is
shown once, when the key is created, and never stored.

Storage keeps the SHA-256 of the whole key, not the key. A slow password hash (bcrypt,
argon2) protects low-entropy secrets from guessing; a 238-bit random secret cannot be
guessed, so a fast hash loses nothing, and it lets the edge check a key in microseconds
per request. (Each key row also keeps the prefix for listing, the tenant and the scopes.)

Tenants are configured in the catalog (tier, allowed models). A key belongs to one tenant
id; `switchyard keys create` refuses tenants the catalog does not name, and the edge should
give the authenticator the catalog's tenant ids (`known_tenants`) so a key whose tenant was
removed from the catalog stops working.

Scopes narrow what a key may do, never widen it: `allowed_models` (empty: whatever the
tenant may use), `max_tier` (the key gets the lower of its tenant's tier and this one), and
`admin` (may call admin methods, for the admin API that later issues add).

`KeyAuthenticator` serves the data plane: it holds every active key's hash in memory,
reloads them every `refresh_s` seconds (a revoked key stops working within about that
long), looks up a key it does not know once in SQL (so a key created a second ago works at
once), remembers misses for a while (a negative cache), and limits those SQL look-ups per
second, so a flood of wrong keys cannot hammer the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import string
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import grpc

from switchyard.common.catalog import Tier
from switchyard.common.errors import Reason, SwitchyardError, invalid
from switchyard.common.logging import get_logger
from switchyard.common.sql import Database, DatabaseError, Migration, Row, now_ms

__all__ = [
    "ApiKeyRecord",
    "AuthStats",
    "CreatedKey",
    "KeyAuthenticator",
    "KeyScopes",
    "KeyStore",
    "Principal",
    "Revocation",
    "authorization_from_metadata",
    "effective_tier",
    "ensure_dev_key",
    "generate_key",
    "hash_key",
    "key_prefix",
    "parse_authorization",
]

log = get_logger(__name__)

KEY_MARK: Final = "sy"
PUBLIC_ID_LENGTH: Final = 8
SECRET_LENGTH: Final = 40
_PUBLIC_ALPHABET: Final = string.ascii_lowercase + string.digits
_SECRET_ALPHABET: Final = string.ascii_letters + string.digits
_KEY_RE: Final = re.compile(rf"^{KEY_MARK}-([a-z0-9]{{{PUBLIC_ID_LENGTH}}})-[A-Za-z0-9]{{{SECRET_LENGTH}}}$")
_PREFIX_RE: Final = re.compile(rf"^(?:{KEY_MARK}|dev)-[a-z0-9]{{{PUBLIC_ID_LENGTH}}}$")
_TENANT_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# A dev key given by hand (SWITCHYARD_DEV_KEY) need not look like a generated one, but must not be trivial.
MIN_DEV_KEY_LENGTH: Final = 16
MAX_LABEL_LENGTH: Final = 200
MAX_KEY_LENGTH: Final = 512
AUTHORIZATION: Final = "authorization"

COMPONENT: Final = "keys"
MIGRATIONS: Final = (
    Migration(
        1,
        "create_api_keys",
        sql=(
            """CREATE TABLE api_keys (
                prefix TEXT PRIMARY KEY,
                key_hash TEXT NOT NULL UNIQUE,
                tenant_id TEXT NOT NULL,
                label TEXT NOT NULL DEFAULT '',
                allowed_models TEXT NOT NULL DEFAULT '[]',
                max_tier TEXT,
                admin BOOLEAN NOT NULL DEFAULT FALSE,
                created_at_ms BIGINT NOT NULL,
                revoked_at_ms BIGINT
            )""",
            "CREATE INDEX api_keys_tenant_idx ON api_keys (tenant_id)",
        ),
    ),
)


# --- the key itself -------------------------------------------------------------------------


def generate_key() -> str:
    """A new random key, `sy-<8 public chars>-<40 secret chars>`."""
    public = "".join(secrets.choice(_PUBLIC_ALPHABET) for _ in range(PUBLIC_ID_LENGTH))
    secret = "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(SECRET_LENGTH))
    return f"{KEY_MARK}-{public}-{secret}"


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 of its UTF-8 bytes, hex (fast on purpose: see the module doc)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_prefix(key: str) -> str | None:
    """`sy-<public id>` of a generated key, or None when `key` is not in that format."""
    match = _KEY_RE.match(key)
    return f"{KEY_MARK}-{match.group(1)}" if match else None


def normalize_prefix(prefix: str) -> str:
    """Accept `sy-ab12cd34`, `ab12cd34` or a whole key, and return the prefix `sy-ab12cd34`."""
    text = prefix.strip()
    whole = key_prefix(text)
    if whole is not None:
        return whole
    if re.fullmatch(rf"[a-z0-9]{{{PUBLIC_ID_LENGTH}}}", text):
        return f"{KEY_MARK}-{text}"
    return text


def _looks_like_key(token: str) -> bool:
    return _KEY_RE.match(token) is not None


# --- records --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyScopes:
    """What a key may do, within what its tenant may do."""

    # Canonical model ids; empty: every model the tenant may use.
    allowed_models: tuple[str, ...] = ()
    # A tier name: the key gets the lower of this and its tenant's tier. None: the tenant's.
    max_tier: str | None = None
    admin: bool = False


@dataclass(frozen=True, slots=True)
class ApiKeyRecord:
    """A stored key as listings show it: never the key, never its hash."""

    prefix: str
    tenant_id: str
    label: str
    scopes: KeyScopes
    created_at_ms: int
    revoked_at_ms: int | None

    @property
    def revoked(self) -> bool:
        return self.revoked_at_ms is not None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for `keys list --json` and admin APIs."""
        return {
            "prefix": self.prefix,
            "tenant": self.tenant_id,
            "label": self.label,
            "allowed_models": list(self.scopes.allowed_models),
            "max_tier": self.scopes.max_tier,
            "admin": self.scopes.admin,
            "created_at_ms": self.created_at_ms,
            "revoked_at_ms": self.revoked_at_ms,
        }


@dataclass(frozen=True, slots=True)
class CreatedKey:
    """A key just created: the only time the clear key exists outside its owner's hands."""

    key: str = field(repr=False)
    record: ApiKeyRecord


@dataclass(frozen=True, slots=True)
class Revocation:
    """What `KeyStore.revoke` did."""

    record: ApiKeyRecord
    already_revoked: bool


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant and what its key may do. Carries no key material."""

    tenant_id: str
    key_prefix: str
    # None: the tenant's allowed models apply unchanged.
    allowed_models: frozenset[str] | None
    admin: bool = False
    max_tier: str | None = None

    def may_use(self, model_id: str, tenant_allowed: Collection[str] = ()) -> bool:
        """Whether this key may call `model_id` (a canonical id); `tenant_allowed` empty: every model."""
        if self.allowed_models is not None and model_id not in self.allowed_models:
            return False
        return not tenant_allowed or model_id in tenant_allowed

    def require_model(self, model_id: str, tenant_allowed: Collection[str] = ()) -> None:
        """Raise PERMISSION_DENIED unless this key may call `model_id`."""
        if not self.may_use(model_id, tenant_allowed):
            raise SwitchyardError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.PERMISSION_DENIED,
                f"this API key may not use model {model_id!r}",
                metadata={"model": model_id},
            )


def effective_tier(principal: Principal, tenant_tier: str, tiers: Mapping[str, Tier]) -> str:
    """The tier a request runs at: the tenant's, lowered to the key's `max_tier` when that is smaller.

    Tiers are ordered by requests per minute; a `max_tier` the catalog no longer names is ignored
    (the CLI refuses unknown tiers when the key is created).
    """
    cap = principal.max_tier
    if cap is None or cap not in tiers or tenant_tier not in tiers:
        return tenant_tier
    return cap if tiers[cap].requests_per_minute < tiers[tenant_tier].requests_per_minute else tenant_tier


def _record_from_row(row: Row) -> ApiKeyRecord:
    return ApiKeyRecord(
        prefix=str(row["prefix"]),
        tenant_id=str(row["tenant_id"]),
        label=str(row["label"]),
        scopes=_scopes_from_row(row),
        created_at_ms=int(row["created_at_ms"]),
        revoked_at_ms=None if row["revoked_at_ms"] is None else int(row["revoked_at_ms"]),
    )


def _scopes_from_row(row: Row) -> KeyScopes:
    models = json.loads(str(row["allowed_models"]))
    return KeyScopes(
        allowed_models=tuple(str(m) for m in models),
        max_tier=None if row["max_tier"] is None else str(row["max_tier"]),
        admin=bool(row["admin"]),
    )


def _principal_from_row(row: Row) -> Principal:
    scopes = _scopes_from_row(row)
    return Principal(
        tenant_id=str(row["tenant_id"]),
        key_prefix=str(row["prefix"]),
        allowed_models=frozenset(scopes.allowed_models) or None,
        admin=scopes.admin,
        max_tier=scopes.max_tier,
    )


def _check_new_key(tenant_id: str, label: str, scopes: KeyScopes) -> None:
    if not _TENANT_RE.match(tenant_id):
        raise invalid(
            "tenant must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            "tenant",
        )
    if len(label) > MAX_LABEL_LENGTH or any(ch in label for ch in "\r\n\t"):
        raise invalid(f"label must be one line of at most {MAX_LABEL_LENGTH} characters", "label")
    for index, model in enumerate(scopes.allowed_models):
        if not model or model != model.strip():
            raise invalid("allowed model ids must be non-empty", f"allowed_models[{index}]")
    if scopes.max_tier is not None and not scopes.max_tier:
        raise invalid("max tier must be a tier name", "max_tier")


# --- the store ------------------------------------------------------------------------------

_COLUMNS: Final = "prefix, tenant_id, label, allowed_models, max_tier, admin, created_at_ms, revoked_at_ms"


class KeyStore:
    """API keys in SQL. Open with `await KeyStore.open(database)`, which migrates the schema."""

    def __init__(self, database: Database) -> None:
        self.database = database

    @classmethod
    async def open(cls, database: Database) -> KeyStore:
        """A store on `database`, its tables created or upgraded."""
        await database.migrate(COMPONENT, MIGRATIONS)
        return cls(database)

    async def create(self, tenant_id: str, *, label: str = "", scopes: KeyScopes | None = None) -> CreatedKey:
        """Make a new key for `tenant_id`; the returned clear key is not kept anywhere."""
        scopes = scopes or KeyScopes()
        _check_new_key(tenant_id, label, scopes)
        # A public id collision (one in about 2.8e12 per pair) just draws again.
        for _ in range(5):
            key = generate_key()
            prefix = key_prefix(key)
            assert prefix is not None
            record = await self._insert(key, prefix, tenant_id, label, scopes)
            if record is not None:
                return CreatedKey(key=key, record=record)
        raise DatabaseError("could not draw an unused key prefix")

    async def put_key(
        self, key: str, tenant_id: str, *, label: str = "", scopes: KeyScopes | None = None
    ) -> ApiKeyRecord:
        """Store a key chosen by the caller (a dev key); idempotent: an existing one is returned as is.

        A key stored earlier keeps its tenant, scopes and revocation (a revoked dev key stays revoked).
        """
        scopes = scopes or KeyScopes()
        if len(key) < MIN_DEV_KEY_LENGTH or len(key) > MAX_KEY_LENGTH or any(ch.isspace() for ch in key):
            raise invalid(
                f"a key must be {MIN_DEV_KEY_LENGTH}-{MAX_KEY_LENGTH} characters without spaces", "key"
            )
        _check_new_key(tenant_id, label, scopes)
        key_hash = hash_key(key)
        existing = await self._by_hash(key_hash)
        if existing is not None:
            return existing
        prefix = key_prefix(key) or f"dev-{key_hash[:PUBLIC_ID_LENGTH]}"
        inserted = await self._insert(key, prefix, tenant_id, label, scopes)
        if inserted is not None:
            return inserted
        # Another process stored the same key meanwhile.
        raced = await self._by_hash(key_hash)
        if raced is None:
            raise DatabaseError(f"key prefix {prefix} is taken by another key")
        return raced

    async def _insert(
        self, key: str, prefix: str, tenant_id: str, label: str, scopes: KeyScopes
    ) -> ApiKeyRecord | None:
        created = now_ms()
        changed = await self.database.execute(
            f"INSERT INTO api_keys (key_hash, {_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL)"
            " ON CONFLICT DO NOTHING",
            (
                hash_key(key),
                prefix,
                tenant_id,
                label,
                json.dumps(list(scopes.allowed_models)),
                scopes.max_tier,
                scopes.admin,
                created,
            ),
        )
        if changed != 1:
            return None
        return ApiKeyRecord(prefix, tenant_id, label, scopes, created, None)

    async def _by_hash(self, key_hash: str) -> ApiKeyRecord | None:
        row = await self.database.fetch_one(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ?", (key_hash,)
        )
        return None if row is None else _record_from_row(row)

    async def get(self, prefix: str) -> ApiKeyRecord | None:
        """The key named by `prefix` (see `normalize_prefix`), revoked or not."""
        row = await self.database.fetch_one(
            f"SELECT {_COLUMNS} FROM api_keys WHERE prefix = ?", (normalize_prefix(prefix),)
        )
        return None if row is None else _record_from_row(row)

    async def list_keys(
        self, tenant_id: str | None = None, *, include_revoked: bool = True
    ) -> list[ApiKeyRecord]:
        """Keys oldest first, of one tenant or all; records never hold the key or its hash."""
        clauses: list[str] = []
        params: list[object] = []
        if tenant_id is not None:
            clauses.append("tenant_id = ?")
            params.append(tenant_id)
        if not include_revoked:
            clauses.append("revoked_at_ms IS NULL")
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        rows = await self.database.fetch_all(
            f"SELECT {_COLUMNS} FROM api_keys{where} ORDER BY created_at_ms, prefix", params
        )
        return [_record_from_row(row) for row in rows]

    async def revoke(self, prefix: str) -> Revocation | None:
        """Revoke the key named by `prefix`; None when there is no such key. Revoking twice is harmless."""
        name = normalize_prefix(prefix)
        changed = await self.database.execute(
            "UPDATE api_keys SET revoked_at_ms = ? WHERE prefix = ? AND revoked_at_ms IS NULL",
            (now_ms(), name),
        )
        record = await self.get(name)
        if record is None:
            return None
        return Revocation(record=record, already_revoked=changed == 0)

    async def principal_for_hash(self, key_hash: str) -> Principal | None:
        """The caller an active key's hash stands for; None for an unknown or revoked key."""
        row = await self.database.fetch_one(
            f"SELECT {_COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked_at_ms IS NULL", (key_hash,)
        )
        return None if row is None else _principal_from_row(row)

    async def active_principals(self) -> dict[str, Principal]:
        """Every active key, by hash: what the authenticator holds in memory."""
        rows = await self.database.fetch_all(
            f"SELECT key_hash, {_COLUMNS} FROM api_keys WHERE revoked_at_ms IS NULL"
        )
        return {str(row["key_hash"]): _principal_from_row(row) for row in rows}


async def ensure_dev_key(store: KeyStore, key: str, tenant_id: str = "default") -> ApiKeyRecord:
    """Store `key` for `tenant_id` unless it is stored already (for `make run`'s dev key); idempotent."""
    return await store.put_key(key, tenant_id, label="dev key")


# --- per request ----------------------------------------------------------------------------


def _unauthenticated(message: str) -> SwitchyardError:
    # Never the key, its prefix or the header's value: a caller learns only that it failed.
    return SwitchyardError(
        grpc.StatusCode.UNAUTHENTICATED, Reason.UNAUTHENTICATED, message, metadata={"header": AUTHORIZATION}
    )


MISSING_KEY_MESSAGE: Final = "missing API key: send the metadata 'authorization: Bearer <key>'"
BAD_SCHEME_MESSAGE: Final = "unsupported authorization: send the metadata 'authorization: Bearer <key>'"
INVALID_KEY_MESSAGE: Final = "invalid or revoked API key"


def parse_authorization(value: str | None) -> str:
    """The key in an `authorization` value: `Bearer <key>` (any case) or the bare key.

    Raises UNAUTHENTICATED when it is missing or uses another scheme.
    """
    text = (value or "").strip()
    if not text:
        raise _unauthenticated(MISSING_KEY_MESSAGE)
    parts = text.split(None, 1)
    if len(parts) == 1:
        if parts[0].lower() == "bearer":
            raise _unauthenticated(MISSING_KEY_MESSAGE)
        return parts[0]
    scheme, token = parts
    token = token.strip()
    if scheme.lower() != "bearer" or any(ch.isspace() for ch in token):
        raise _unauthenticated(BAD_SCHEME_MESSAGE)
    return token


def authorization_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The first `authorization` value in gRPC invocation metadata (or HTTP headers as pairs)."""
    for name, value in metadata or ():
        if name.lower() == AUTHORIZATION:
            return value.decode("latin-1") if isinstance(value, bytes) else value
    return None


@dataclass
class AuthStats:
    """Counters for metrics and tests."""

    hits: int = 0
    db_lookups: int = 0
    negative_hits: int = 0
    malformed: int = 0
    throttled: int = 0
    refreshes: int = 0
    refresh_failures: int = 0


class _TokenBucket:
    def __init__(self, rate_per_s: float, now: float) -> None:
        self._rate = rate_per_s
        self._capacity = max(1.0, rate_per_s)
        self._tokens = self._capacity
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._capacity, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


class KeyAuthenticator:
    """Turns an `authorization` value into a `Principal`, from memory on the hot path.

    `start()` loads every active key and refreshes them every `refresh_s` seconds in the
    background (`refresh()` does one reload now); `close()` stops that. A key not in memory is
    looked up in SQL once (concurrent requests with the same key share the look-up), at most
    `miss_lookups_per_s` times per second overall; a key found absent is refused from memory
    for `negative_ttl_s` (default: `refresh_s`). A key format that no generated key has is
    refused without a look-up (a dev key of another shape works once a refresh has loaded it).

    Revocation: a refresh that starts after a key was revoked drops it, so a revoked key stops
    working within about `refresh_s`. `known_tenants`, when given, refuses keys of tenants that
    are not in it (PERMISSION_DENIED); assign it again when the catalog changes.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        refresh_s: float = 5.0,
        negative_ttl_s: float | None = None,
        negative_max_entries: int = 10_000,
        miss_lookups_per_s: float = 50.0,
        known_tenants: Collection[str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if refresh_s <= 0:
            raise ValueError("refresh_s must be positive")
        self._store = store
        self._refresh_s = refresh_s
        self._negative_ttl_s = refresh_s if negative_ttl_s is None else negative_ttl_s
        self._negative_max = max(1, negative_max_entries)
        self._clock = clock
        self.known_tenants: Collection[str] | None = known_tenants
        self.stats = AuthStats()
        self._principals: dict[str, Principal] = {}
        self._negative: dict[str, float] = {}
        self._inflight: dict[str, asyncio.Future[Principal | None]] = {}
        self._bucket = _TokenBucket(miss_lookups_per_s, clock())
        self._generation = 0
        self._loaded_at: float | None = None
        self._refresh_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Load the keys (raises DatabaseError if the database is unreachable), then keep them fresh."""
        await self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._refresh_forever(), name="api-key-refresh")

    async def close(self) -> None:
        """Stop refreshing and drop pending look-ups."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for pending in list(self._inflight.values()):
            pending.cancel()

    async def refresh(self) -> int:
        """Reload every active key from SQL now; returns how many there are."""
        async with self._refresh_lock:
            principals = await self._store.active_principals()
            self._principals = principals
            self._generation += 1
            now = self._clock()
            self._loaded_at = now
            self._negative = {h: until for h, until in self._negative.items() if until > now}
            self.stats.refreshes += 1
            return len(principals)

    def snapshot_age_s(self) -> float | None:
        """Seconds since the keys were last loaded; None before the first load (for health)."""
        return None if self._loaded_at is None else self._clock() - self._loaded_at

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving on the last snapshot; try again next round
                self.stats.refresh_failures += 1
                log.warning("api_keys_refresh_failed", error=type(exc).__name__, detail=str(exc))

    async def authenticate_metadata(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> Principal:
        """`authenticate` on the `authorization` entry of gRPC metadata."""
        return await self.authenticate(authorization_from_metadata(metadata))

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an `authorization` value.

        Raises UNAUTHENTICATED (missing, malformed, unknown or revoked key), PERMISSION_DENIED
        (the key's tenant is not in `known_tenants`), or UNAVAILABLE when a key not in memory
        cannot be looked up because the database is down.
        """
        token = parse_authorization(authorization)
        key_hash = hash_key(token)
        principal = self._principals.get(key_hash)
        if principal is not None:
            self.stats.hits += 1
            return self._admit(principal)
        now = self._clock()
        until = self._negative.get(key_hash)
        if until is not None:
            if until > now:
                self.stats.negative_hits += 1
                raise _unauthenticated(INVALID_KEY_MESSAGE)
            del self._negative[key_hash]
        if not _looks_like_key(token):
            self.stats.malformed += 1
            raise _unauthenticated(INVALID_KEY_MESSAGE)
        principal = await self._look_up(key_hash, now)
        if principal is None:
            raise _unauthenticated(INVALID_KEY_MESSAGE)
        return self._admit(principal)

    def _admit(self, principal: Principal) -> Principal:
        if self.known_tenants is not None and principal.tenant_id not in self.known_tenants:
            raise SwitchyardError(
                grpc.StatusCode.PERMISSION_DENIED,
                Reason.PERMISSION_DENIED,
                "the tenant of this API key is not configured",
                metadata={"tenant": principal.tenant_id},
            )
        return principal

    async def _look_up(self, key_hash: str, now: float) -> Principal | None:
        pending = self._inflight.get(key_hash)
        if pending is None:
            if not self._bucket.take(now):
                self.stats.throttled += 1
                return None
            self.stats.db_lookups += 1
            pending = asyncio.ensure_future(self._fetch(key_hash, self._generation))
            self._inflight[key_hash] = pending
            pending.add_done_callback(lambda done: self._settle(key_hash, done))
        # Shielded: one caller giving up does not cancel the look-up the others wait on.
        return await asyncio.shield(pending)

    async def _fetch(self, key_hash: str, generation: int) -> Principal | None:
        try:
            principal = await self._store.principal_for_hash(key_hash)
        except DatabaseError as exc:
            log.warning("api_key_lookup_failed", error=type(exc).__name__)
            raise SwitchyardError(
                grpc.StatusCode.UNAVAILABLE,
                Reason.DEPENDENCY_UNAVAILABLE,
                "API keys cannot be checked right now",
                retry_after_s=1.0,
            ) from None
        if principal is None:
            self._remember_miss(key_hash)
        elif generation == self._generation:
            # Only when no reload finished meanwhile: a reload may have dropped this key as revoked.
            self._principals[key_hash] = principal
        return principal

    def _settle(self, key_hash: str, done: asyncio.Future[Principal | None]) -> None:
        self._inflight.pop(key_hash, None)
        if not done.cancelled():
            done.exception()  # retrieved here so an unawaited failure is not reported as lost

    def _remember_miss(self, key_hash: str) -> None:
        if len(self._negative) >= self._negative_max:
            # Oldest first: dicts keep insertion order.
            self._negative.pop(next(iter(self._negative)))
        self._negative[key_hash] = self._clock() + self._negative_ttl_s
