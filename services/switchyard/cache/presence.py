"""Which exact entries a cache replica holds, pushed to the edges so they skip lookups sure to miss.

A cacheable request costs its edge a lookup hop, and on a cold or varied workload most
lookups miss. An edge that knows every key the replica it asks can answer needs no hop to
learn that a request is not among them: it answers that miss itself. So an edge asks for the
presence on its `LookupFrames` call (`want_presence`), and the replica sends the fingerprints
of every key it holds, then each key as it is admitted, on that same call: the presence an
edge holds is always that of the replica its lookups go to.

* `fingerprint(key)`: the first 8 bytes of the BLAKE2b digest of an entry key, as an int. Keys
  never travel as text; two keys sharing a fingerprint only cost a lookup.
* `KeyPresence`: one replica's view (fingerprint -> expiry) and the calls that asked for it.
  A key it does not know is a key it holds no entry for; a key it knows may be stale (expired,
  evicted or invalidated since), which costs only a lookup, so removals are never sent: a
  call's presence is replaced whole when the call is (edges retire calls by age). It is `off`
  when the replica cannot promise a miss: with semantic matching on (a paraphrase may answer),
  past `MAX_KEYS`, or while its shared store is out of reach; the calls are told, and ask
  every lookup until a complete presence comes again.
* `PresenceFeed`: replicas sharing Redis see each other's entries. The store's put script
  announces each admitted entry on a Redis stream (`<p>present`, in the same atomic step as
  the entry), every replica follows that stream, and loads the keys present from `<p>exp`
  when it starts and whenever it lost the stream for a while (`off` in between).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from switchyard.common.logging import get_logger
from switchyard.common.redis_client import RedisOptions, open_redis, redis_text
from switchyard.common.redis_stream import READ_BLOCK_MS, RedisStreamFeed
from switchyard.common.tasks import cancel_all
from switchyard.v1 import cache_pb2

__all__ = [
    "MAX_KEYS",
    "PRESENT_STREAM_MAXLEN",
    "KeyPresence",
    "PresenceFeed",
    "announcement",
    "build_presence_feed",
    "fingerprint",
]

log = get_logger(__name__)

PRESENT_STREAM_MAXLEN: Final = 100_000
"""About how many announcements the stream keeps (a replica that lost it reloads the keys)."""
MAX_KEYS: Final = 200_000
"""Past this many keys a replica sends no presence (its snapshot would be megabytes)."""
SEMANTIC_ON: Final = "semantic matching is on: a paraphrase may answer"
LOADING: Final = "the keys of the shared store are loading"
UNREACHABLE: Final = "the shared store's announcements are out of reach"
_LOAD_PAGE: Final = 5_000
_OPTIONS: Final = RedisOptions(max_connections=4, socket_timeout_s=READ_BLOCK_MS / 1000 + 2.0)
_RETRY_FIRST_S: Final = 0.1
_RETRY_CAP_S: Final = 5.0


def fingerprint(key: str) -> int:
    """The presence name of an entry key (see the module doc)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest())


class Caller(Protocol):
    """A call that asked for the presence (a `Multiplexer` fits)."""

    ended: bool

    def send(self, response: cache_pb2.LookupStreamResponse) -> None: ...


class KeyPresence:
    """The fingerprints of the keys one replica can answer, each with its expiry (wall
    seconds), and the calls following them (see the module doc). `off` is a standing reason
    to send none (semantic matching on); `down` one that may pass (set by the feed)."""

    def __init__(
        self,
        *,
        off: str = "",
        down: str = "",
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._expiry: dict[int, float] = {}
        self._callers: list[Caller] = []
        self._off = off
        self._down = down
        self._max_keys = max_keys
        self._clock = clock
        self._prune_at = 1_024

    def __len__(self) -> int:
        """Keys known (expired ones included until pruned)."""
        return len(self._expiry)

    @property
    def off(self) -> str:
        """Why no presence is sent now ("" when it is)."""
        return self._off or self._down

    def follow(self, caller: Caller) -> None:
        """Send `caller` the presence now (or why not), and every key added from now on."""
        self._callers = [c for c in self._callers if not c.ended]
        self._callers.append(caller)
        caller.send(cache_pb2.LookupStreamResponse(presence=self._whole()))

    def add(self, keys: Iterable[tuple[int, float]]) -> None:
        """Entries admitted (fingerprint, expiry): the calls hear of the keys new to them."""
        if self._off:
            return
        now = self._clock()
        known = self._expiry
        new: list[int] = []
        for key, expires_at in keys:
            was = known.get(key)
            if was is None or was <= now:  # unknown, or pruned from what calls were last sent
                new.append(key)
            if was is None or was < expires_at:
                known[key] = expires_at
        if len(known) > self._prune_at:
            self._prune(now)
        if new and not self.off:
            self._tell(cache_pb2.KeyPresence(keys=new))

    def load(self, keys: Iterable[tuple[int, float]]) -> None:
        """The keys of the shared store, read whole: merged in, and every call sent the lot."""
        self._down = ""
        if self._off:
            return
        known = self._expiry
        for key, expires_at in keys:
            if known.get(key, 0.0) < expires_at:
                known[key] = expires_at
        self._tell(self._whole())

    def lost(self, why: str) -> None:
        """The replica may now miss keys its peers admit: the calls ask every lookup until `load`."""
        if not self._down:
            self._down = why
            self._tell(cache_pb2.KeyPresence(off=self.off))

    def _whole(self) -> cache_pb2.KeyPresence:
        """Every live key, or why not."""
        if not self.off:
            self._prune(self._clock())
        if self.off:
            return cache_pb2.KeyPresence(off=self.off)
        return cache_pb2.KeyPresence(complete=True, keys=list(self._expiry))

    def _prune(self, now: float) -> None:
        """Drop expired keys; past `max_keys` live ones, turn off for good."""
        self._expiry = {k: e for k, e in self._expiry.items() if e > now}
        self._prune_at = max(1_024, 2 * len(self._expiry))
        if len(self._expiry) > self._max_keys and not self._off:
            self._off = f"more than {self._max_keys} keys"
            self._expiry = {}
            log.warning("cache_presence_off", reason="too many keys", max_keys=self._max_keys)
            self._tell(cache_pb2.KeyPresence(off=self._off))

    def _tell(self, presence: cache_pb2.KeyPresence) -> None:
        """Send `presence` to every call still following."""
        message = cache_pb2.LookupStreamResponse(presence=presence)
        live: list[Caller] = []
        for caller in self._callers:
            if not caller.ended:
                caller.send(message)
                live.append(caller)
        self._callers = live


def announcement(key: str, expires_ms: int) -> bytes:
    """What the store's put script adds to the presence stream for an admitted entry."""
    return f"{expires_ms}:{key}".encode()


def _announced(data: bytes) -> tuple[str, int]:
    expires_ms, _, key = data.partition(b":")
    return key.decode(), int(expires_ms)


class PresenceFeed:
    """What the replicas sharing one Redis store admit (see the module doc)."""

    def __init__(self, client: Redis, *, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self._presence: KeyPresence | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._feed: RedisStreamFeed[tuple[str, int]] = RedisStreamFeed(
            client,
            stream=f"{prefix}present",
            maxlen=PRESENT_STREAM_MAXLEN,
            encode=lambda item: announcement(item[0], item[1]),
            decode=_announced,
            name="cache presence",
            outage=self._outage,
        )

    async def start(self, presence: KeyPresence) -> None:
        """Load the keys present into `presence` (one try, so a replica that reaches Redis
        serves a complete presence from its first call), then follow the announcements in a
        task until `close` (retrying the load first, with backoff, if that try failed)."""
        self._presence = presence
        loaded = await self._load(presence, pin=True)
        self._tasks.append(asyncio.create_task(self._follow(presence, loaded), name="cache-presence"))

    async def _follow(self, presence: KeyPresence, loaded: bool) -> None:
        if not loaded:
            await self._load_until_done(presence, pin=True)
        async for key, expires_ms in self._feed.subscribe():
            presence.add(((fingerprint(key), expires_ms / 1000),))

    async def _load_until_done(self, presence: KeyPresence, *, pin: bool) -> None:
        delay = _RETRY_FIRST_S
        while not await self._load(presence, pin=pin):
            await asyncio.sleep(delay)
            delay = min(2 * delay, _RETRY_CAP_S)

    async def _load(self, presence: KeyPresence, *, pin: bool) -> bool:
        """Read the keys whole into `presence` (`pin`: first mark where following the
        announcements starts); False when Redis did not answer."""
        try:
            if pin:
                await self._feed.start_here()
            presence.load(await self.keys())
        except (RedisError, OSError) as exc:
            log.warning("cache_presence_load_failed", error=type(exc).__name__)
            return False
        log.info("cache_presence_loaded", keys=len(presence))
        return True

    async def keys(self) -> list[tuple[int, float]]:
        """Every live key of the store with its expiry (from `<p>exp`)."""
        now_ms = time.time() * 1000
        found: list[tuple[int, float]] = []
        # ZSCAN, not pages by rank: every member present from start to end is seen even while
        # entries come and go (a page by rank would skip one when another before it goes).
        async for member, score in self._client.zscan_iter(f"{self._prefix}exp", count=_LOAD_PAGE):
            if score > now_ms:
                found.append((fingerprint(redis_text(member)), float(score) / 1000))
        return found

    def _outage(self, began: bool) -> None:
        presence = self._presence
        if presence is None:
            return
        if began:
            presence.lost(UNREACHABLE)
        else:  # announcements made meanwhile may be gone: read the keys whole again
            self._tasks = [t for t in self._tasks if not t.done()]
            reload = self._load_until_done(presence, pin=False)
            self._tasks.append(asyncio.create_task(reload, name="cache-presence-reload"))

    async def close(self) -> None:
        """Stop following and close the client."""
        await cancel_all(self._tasks)
        await self._feed.close()


def build_presence_feed(redis_url: str | None, prefix: str) -> PresenceFeed | None:
    """The announcements of the replicas sharing the store at `redis_url` (None without Redis)."""
    if not redis_url:
        return None
    return PresenceFeed(
        open_redis(redis_url, options=_OPTIONS, client_name="switchyard-cache-presence"), prefix=prefix
    )
