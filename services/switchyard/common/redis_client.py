"""The one place a Switchyard service opens a Redis client (`redis.asyncio`).

Redis holds state that sits on the request path (rate-limit buckets, dedup locks, cache
entries), so the client is tuned to fail fast rather than to wait politely: short connect
and read timeouts, one immediate retry on a broken pooled connection and none on a timeout
(a timed-out script may already have run; running it again could charge twice), and a
bounded pool that makes callers wait briefly for a free connection instead of failing at
once under a burst. redis-py's own defaults (5 s timeouts, ten retries with backoff) would
turn a Redis outage into seconds of latency on every request.

The connection is lazy: building a client never touches the network, so a service starts
even while Redis is down and each caller decides how to degrade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from switchyard.common.settings import Settings, SettingsError

_SCHEMES: Final = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True)
class RedisOptions:
    """Pool and timeout settings for a Redis client (seconds)."""

    max_connections: int = 64
    # Waiting for a TCP connect or for a reply; both sit on the request path.
    connect_timeout_s: float = 0.5
    socket_timeout_s: float = 0.5
    # Waiting for a free pooled connection when all `max_connections` are busy.
    pool_timeout_s: float = 0.5
    # PING a connection idle this long before reusing it, so a dead one is found early.
    health_check_interval_s: float = 15.0


DEFAULT_REDIS_OPTIONS: Final = RedisOptions()


def open_redis(
    url: str, *, options: RedisOptions = DEFAULT_REDIS_OPTIONS, client_name: str | None = None
) -> Redis:
    """A `redis.asyncio` client for `url` (`redis://`, `rediss://` or `unix://`); close it with `aclose()`.

    The client owns its connection pool. Raises `SettingsError` naming `REDIS_URL` (never
    echoing the URL, which may hold a password) when the URL is unusable.
    """
    if not url.startswith(_SCHEMES):
        raise SettingsError("REDIS_URL: must start with redis://, rediss:// or unix://")
    try:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=options.max_connections,
            timeout=options.pool_timeout_s,
            socket_timeout=options.socket_timeout_s,
            socket_connect_timeout=options.connect_timeout_s,
            health_check_interval=options.health_check_interval_s,
            # One immediate retry when a pooled connection turns out to be closed; never on timeouts.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name=client_name,
        )
    except ValueError as exc:
        # redis-py's messages quote parts of the URL: keep them out, only the kind of fault.
        raise SettingsError(f"REDIS_URL: not a usable Redis URL ({type(exc).__name__})") from None
    return Redis.from_pool(pool)


def redis_from_settings(
    settings: Settings, *, options: RedisOptions = DEFAULT_REDIS_OPTIONS, client_name: str | None = None
) -> Redis | None:
    """The client for `settings.redis_url`, or None when no Redis is configured (embedded mode)."""
    if not settings.redis_url:
        return None
    return open_redis(settings.redis_url, options=options, client_name=client_name)


def redis_text(value: object) -> str:
    """A Redis reply item as text (bytes decoded as UTF-8)."""
    return value.decode() if isinstance(value, bytes) else str(value)
