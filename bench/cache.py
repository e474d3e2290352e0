"""Response cache lookup speed: `python -m bench.cache [--lookups N] [--sizes 1000,100000] [--redis-url URL]`.

Fills a store with `size` entries, written with `store.put` directly: keys from `cache_key` on
varied requests (four tenants, four models including `auto`, a system message and a
~200-character user prompt at temperature 0), each holding a ~1 KB serialized `CachedAnswer`
kept as streamed (deltas of a few tokens). Then times `CacheServicer.Lookup` in process (key
hashing, the store read, the response build) one call at a time with `time.perf_counter_ns`
after a warm-up, for an exact hit and a miss, on:

* `MemoryStore`;
* `TieredStore(LruCache, RedisStore)` ("L1 + Redis"): a hit served from L1, and a miss (L1, then
  Redis);
* the same with an L1 of 0 entries ("Redis, L1 off"): a hit served from Redis (L2).

Hits cycle over up to 1,000 stored requests spread over the store, misses over 1,000 requests
never stored; the warm-up reads every one of them at least once (so the L1 holds the hot set).
Redis is `--redis-url`, else `REDIS_URL`, else redis://127.0.0.1:6379/0; its rows are skipped,
with a note, when it does not answer. Each run writes under a key prefix of its own and deletes
every key under it at the end. The Redis fill grows one store from size to size (sizes run
smallest first) with `asyncio.gather` over chunks of 500 puts; the memory store is filled anew
for each size. Everything runs in one event loop: uvloop's when installed (as `switchyard serve`
runs), else asyncio's. Semantic lookup is not measured: it was not built when this was written,
and the output says whether it exists now. Prints a markdown table, how long each fill took,
and a machine reference line. No targets: exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import RedisError

from bench.plan import fixed_work, measure, percentiles
from switchyard.cache.embed import load_local_embedder, unavailable_reason
from switchyard.cache.keys import cache_key
from switchyard.cache.semantic import SemanticIndex
from switchyard.cache.service import CacheServicer
from switchyard.cache.store import CacheEntry, CacheStore, LruCache, MemoryStore, RedisStore, TieredStore
from switchyard.common.redis_client import RedisOptions, open_redis
from switchyard.common.settings import SettingsError
from switchyard.v1 import cache_pb2, common_pb2

DEFAULT_REDIS_URL: Final = "redis://127.0.0.1:6379/0"
TENANTS: Final = ("bench-a", "bench-b", "bench-c", "bench-d")
MODELS: Final = ("v0/m0", "v1/m1", "v2/m2", "auto")
# Large enough that no fill evicts anything (every put is checked to be admitted).
MAX_BYTES: Final = 1 << 30
# SWITCHYARD_CACHE_L1_ENTRIES' default.
L1_ENTRIES: Final = 10_000
HOT: Final = 1_000
MISS_BASE: Final = 1_000_000_000
FILL_CHUNK: Final = 500
TTL_S: Final = 3_600.0
PROMPT_CHARS: Final = 200
ANSWER_CHARS: Final = 900
DELTA_CHARS: Final = 24
BODY_VARIANTS: Final = 64
DELETE_BATCH: Final = 500
# Production's pool, with patient timeouts: the fill queues hundreds of puts on 64 connections
# and the machine may be busy. Timeouts only matter when a call fails; they do not change a
# successful call's latency.
REDIS_OPTIONS: Final = RedisOptions(connect_timeout_s=1.0, socket_timeout_s=10.0, pool_timeout_s=30.0)
SYSTEM_PROMPT: Final = "You are the support assistant of an online shop. Answer briefly and precisely."
WORDS: Final = (
    "order", "refund", "shipping", "invoice", "account", "password", "delivery", "warranty",
    "return", "address", "payment", "discount", "coupon", "tracking", "parcel", "damaged",
    "exchange", "subscription", "cancel", "upgrade", "billing", "receipt", "customs", "courier",
    "weekend", "express", "missing", "label", "store", "credit", "card", "balance",
    "please", "explain", "why", "how", "when", "my", "the", "was",
)  # fmt: skip
MEMORY: Final = "memory"
TIERED: Final = "L1 + Redis"
L2_ONLY: Final = "Redis, L1 off"
HIT: Final = "exact hit"
HIT_L1: Final = "exact hit (L1)"
HIT_L2: Final = "exact hit (L2)"
MISS: Final = "exact miss"
_HIT: Final = common_pb2.CACHE_STATUS_HIT_EXACT
_MISS: Final = common_pb2.CACHE_STATUS_MISS

_T = TypeVar("_T")


@dataclass(slots=True)
class Report:
    """What a run measured: one row per (entries, store, lookup), the fills, and notes."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    fills: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    semantic: str = ""


def prompt(n: int) -> str:
    """The n-th synthetic user prompt, `PROMPT_CHARS` long and unique to `n`."""
    words = " ".join(WORDS[(n * 7 + k * k) % len(WORDS)] for k in range(60))
    return f"Ticket {n}: {words}"[:PROMPT_CHARS]


def lookup_request(n: int) -> cache_pb2.LookupRequest:
    """The n-th synthetic lookup: its tenant, model and a deterministic chat request."""
    chat = common_pb2.ChatRequest(
        model=MODELS[(n // len(TENANTS)) % len(MODELS)],
        messages=[
            common_pb2.Message(
                role=common_pb2.ROLE_SYSTEM, parts=[common_pb2.ContentPart(text=SYSTEM_PROMPT)]
            ),
            common_pb2.Message(role=common_pb2.ROLE_USER, parts=[common_pb2.ContentPart(text=prompt(n))]),
        ],
        sampling=common_pb2.SamplingParams(temperature=0.0, max_output_tokens=512),
        routing=common_pb2.RoutingHints(task_type=common_pb2.TASK_TYPE_UNSPECIFIED),
    )
    return cache_pb2.LookupRequest(tenant_id=TENANTS[n % len(TENANTS)], request=chat, model=chat.model)


@functools.cache
def _answer_body(variant: int) -> bytes:
    """One of `BODY_VARIANTS` answer texts in deltas of a few tokens, as a serialized `CachedAnswer`."""
    text = " ".join(WORDS[(variant * 11 + k * 3) % len(WORDS)] for k in range(ANSWER_CHARS // 4))
    deltas = [common_pb2.Delta(text=text[i : i + DELTA_CHARS]) for i in range(0, ANSWER_CHARS, DELTA_CHARS)]
    return cache_pb2.CachedAnswer(deltas=deltas).SerializeToString(deterministic=True)


def answer_payload(n: int, model: str) -> bytes:
    """A serialized `CachedAnswer` of about 1 KB, in deltas of a few tokens as a vendor streams.

    A head unique to `n` (the first delta and the other fields) followed by one of
    `BODY_VARIANTS` bodies (the other deltas): protobuf parses concatenated messages as one
    (repeated fields append), so every payload differs without building ~40 messages per entry.
    """
    head = cache_pb2.CachedAnswer(
        deltas=[common_pb2.Delta(text=f"Answer {n}: ")],
        usage=common_pb2.Usage(input_tokens=64, output_tokens=ANSWER_CHARS // 4),
        finish_reason=common_pb2.FINISH_REASON_STOP,
        model=model if model != "auto" else MODELS[n % 3],
        provider=f"p{n % 8}",
        cost_micros=200 + n % 5_000,
    )
    return head.SerializeToString(deterministic=True) + _answer_body(n % BODY_VARIANTS)


def entry(n: int, now: float) -> CacheEntry:
    """The n-th synthetic entry, under the key `Lookup` computes for `lookup_request(n)`."""
    request = lookup_request(n)
    return CacheEntry(
        key=cache_key(request.tenant_id, request.request, request.model),
        tenant_id=request.tenant_id,
        model=request.model,
        payload=answer_payload(n, request.model),
        cost_micros=200 + n % 5_000,
        stored_at=now,
        expires_at=now + TTL_S,
    )


async def fill(store: CacheStore, start: int, stop: int, *, concurrent: bool) -> float:
    """Put entries `start` .. `stop - 1` into `store`; the seconds it took (building them included).

    `concurrent` puts each chunk of `FILL_CHUNK` at once (for Redis); otherwise one at a time.
    """
    began = time.perf_counter()
    now = time.time()
    for low in range(start, stop, FILL_CHUNK):
        entries = [entry(n, now) for n in range(low, min(stop, low + FILL_CHUNK))]
        if concurrent:
            admitted = await asyncio.gather(*(store.put(e) for e in entries))
        else:
            admitted = [await store.put(e) for e in entries]
        if not all(admitted):
            raise RuntimeError(f"the store refused {admitted.count(False)} of the bench entries")
    return time.perf_counter() - began


async def time_lookups(
    servicer: CacheServicer,
    requests: list[cache_pb2.LookupRequest],
    expect: common_pb2.CacheStatus.ValueType,
    lookups: int,
) -> tuple[float, float]:
    """p50 and p99 (µs) of `servicer.Lookup`, each await timed on its own, cycling over
    `requests` after a warm-up that reads every one of them at least once."""
    warmup = max(200, lookups // 10, len(requests))
    for i in range(warmup):
        await servicer.Lookup(requests[i % len(requests)], None)
    clock = time.perf_counter_ns
    samples: list[int] = []
    wrong = 0
    for i in range(lookups):
        request = requests[i % len(requests)]
        start = clock()
        response = await servicer.Lookup(request, None)
        samples.append(clock() - start)
        wrong += response.status != expect
    if wrong:
        expected = common_pb2.CacheStatus.Name(expect)
        raise RuntimeError(f"{wrong} of {lookups} lookups did not answer {expected}")
    return percentiles(samples)


def _row(entries: int, store: str, lookup: str, figures: tuple[float, float]) -> dict[str, Any]:
    return {"entries": entries, "store": store, "lookup": lookup, "p50_us": figures[0], "p99_us": figures[1]}


def hot_set(size: int) -> list[cache_pb2.LookupRequest]:
    """Up to `HOT` stored requests, spread evenly over the `size` entries."""
    count = min(size, HOT)
    return [lookup_request(k * size // count) for k in range(count)]


def miss_set() -> list[cache_pb2.LookupRequest]:
    """`HOT` requests that are never stored."""
    return [lookup_request(MISS_BASE + k) for k in range(HOT)]


def display_url(url: str) -> str:
    """`url` without credentials or query (it may hold a password)."""
    try:
        parts = urlsplit(url)
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparsable URL)"
    return f"{parts.scheme}://{parts.hostname or ''}{port}{parts.path}"


async def _open_redis(url: str, report: Report) -> Redis | None:
    """A client for `url` that answered PING, or None (with a note saying why)."""
    try:
        client = open_redis(url, options=REDIS_OPTIONS, client_name="switchyard-bench-cache")
    except SettingsError as exc:  # a malformed URL
        report.notes.append(f"Redis rows skipped: {exc}")
        return None
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        report.notes.append(
            f"Redis rows skipped: no Redis answered at {display_url(url)} ({type(exc).__name__})"
        )
        return None
    return client


async def _delete_prefix(client: Redis, prefix: str) -> int:
    """Delete every key under `prefix`; how many were deleted."""
    deleted = 0
    batch: list[bytes | str] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=1_000):
        batch.append(key)
        if len(batch) >= DELETE_BATCH:
            deleted += int(await client.unlink(*batch))
            batch = []
    if batch:
        deleted += int(await client.unlink(*batch))
    return deleted


async def _bench(sizes: list[int], lookups: int, redis_url: str | None) -> Report:
    report = Report()
    client = await _open_redis(redis_url, report) if redis_url else None
    prefix = f"switchyard:bench:cache:{uuid.uuid4().hex}:"
    redis_store = RedisStore(client, prefix=prefix, max_bytes=MAX_BYTES) if client is not None else None
    misses = miss_set()
    filled = 0
    try:
        for size in sorted(set(sizes)):
            hits = hot_set(size)
            memory = MemoryStore(MAX_BYTES)
            seconds = await fill(memory, 0, size, concurrent=False)
            report.fills.append({"entries": size, "store": MEMORY, "added": size, "seconds": seconds})
            servicer = CacheServicer(memory)
            report.rows.append(_row(size, MEMORY, HIT, await time_lookups(servicer, hits, _HIT, lookups)))
            report.rows.append(_row(size, MEMORY, MISS, await time_lookups(servicer, misses, _MISS, lookups)))
            await memory.close()
            if redis_store is None:
                continue
            seconds = await fill(redis_store, filled, size, concurrent=True)
            report.fills.append(
                {"entries": size, "store": "Redis", "added": size - filled, "seconds": seconds}
            )
            filled = size
            tiered = CacheServicer(TieredStore(LruCache(L1_ENTRIES), redis_store))
            report.rows.append(_row(size, TIERED, HIT_L1, await time_lookups(tiered, hits, _HIT, lookups)))
            report.rows.append(_row(size, TIERED, MISS, await time_lookups(tiered, misses, _MISS, lookups)))
            l2_only = CacheServicer(TieredStore(LruCache(0), redis_store))
            report.rows.append(_row(size, L2_ONLY, HIT_L2, await time_lookups(l2_only, hits, _HIT, lookups)))
    finally:
        if client is not None:
            deleted = await _delete_prefix(client, prefix)
            await client.aclose()
            report.notes.append(f"Redis: deleted the run's {deleted:,} keys (prefix {prefix}).")
    return report


def _search_next(index: SemanticIndex, queries: Any, picks: Any) -> object:
    return index.search("bench-scope", queries[next(picks) % len(queries)], 0.85)


def semantic_rows(sizes: list[int], lookups: int) -> tuple[list[dict[str, Any]], str]:
    """Semantic lookup is an embedding of the question plus a nearest-neighbour search in its
    scope: both timed here, the search with every entry in one scope (the worst case) and
    random unit vectors standing in for embedded questions (embedding 100,000 real ones would
    take minutes and changes nothing in the search's cost)."""
    import numpy

    embedder = load_local_embedder()
    if embedder is None:
        return [], f"Semantic lookup: not measured ({unavailable_reason()})."
    index = SemanticIndex(embedder)
    questions = [prompt(n) for n in range(64)]
    embeds = max(50, min(lookups, 300))
    counter = iter(range(10**9))

    def embed_one() -> object:
        return index.embed([questions[next(counter) % len(questions)]])

    rows = [_row(0, "local MiniLM", "embed one question", measure(embed_one, embeds, warmup=10))]
    rng = numpy.random.default_rng(7)
    added = 0
    for size in sorted(set(sizes)):
        while added < size:
            vector = rng.standard_normal(embedder.dimensions).astype(numpy.float32)
            index.add("bench-scope", f"k{added}", vector / numpy.linalg.norm(vector))
            added += 1
        queries = rng.standard_normal((256, embedder.dimensions)).astype(numpy.float32)
        queries /= numpy.linalg.norm(queries, axis=1, keepdims=True)
        search = functools.partial(_search_next, index, queries, iter(range(10**9)))

        rows.append(
            _row(size, "usearch, one scope", "nearest-neighbour search", measure(search, lookups, warmup=200))
        )
    note = (
        "Semantic lookup = an exact miss + one embedding + one search (rows above); the embedding "
        "dominates, and runs in a worker thread, off the event loop."
    )
    return rows, note


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed (as `switchyard serve` runs), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def _run_loop(coro: Coroutine[Any, Any, _T]) -> _T:
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(coro)


def loop_name() -> str:
    """The event loop the benchmark runs on."""
    return "asyncio" if _loop_factory() is None else "uvloop"


def run(sizes: list[int], lookups: int, redis_url: str | None = None, *, semantic: bool = True) -> Report:
    """Measure every size (memory, and Redis when `redis_url` is given and answers), in one loop;
    then the parts of a semantic lookup."""
    report = _run_loop(_bench(sizes, lookups, redis_url))
    if semantic:
        rows, report.semantic = semantic_rows(sizes, lookups)
        report.rows.extend(rows)
    return report


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results as a markdown table."""
    lines = ["| entries | store | lookup | p50 (µs) | p99 (µs) |", "|---:|---|---|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['entries']:,} | {row['store']} | {row['lookup']} "
            f"| {row['p50_us']:.1f} | {row['p99_us']:.1f} |"
        )
    return "\n".join(lines)


def fills_text(fills: list[dict[str, Any]]) -> str:
    """One line per fill: how many entries it added and how long it took."""
    lines = []
    for fill_ in fills:
        grown = "" if fill_["added"] == fill_["entries"] else f" (+{fill_['added']:,})"
        lines.append(
            f"Fill to {fill_['entries']:,} entries, {fill_['store']}{grown}: {fill_['seconds']:.2f} s"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the cache lookup benchmark; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m bench.cache", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lookups", type=int, default=5_000, help="timed lookups per case (default 5000)")
    parser.add_argument("--sizes", default="1000,100000", help="entries in the store (default 1000,100000)")
    parser.add_argument(
        "--redis-url",
        default=None,
        help=f"Redis for the tiered rows (default $REDIS_URL, else {DEFAULT_REDIS_URL})",
    )
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",") if size]
    if args.lookups <= 0 or not sizes or min(sizes) <= 0:
        print("bench.cache: --lookups and --sizes must be positive", file=sys.stderr)
        return 2
    redis_url = args.redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    report = run(sizes, args.lookups, redis_url)
    print(markdown(report.rows))
    print()
    print(fills_text(report.fills))
    for note in report.notes:
        print(note)
    print(f"Event loop: {loop_name()}; {args.lookups:,} timed lookups per row.")
    print(report.semantic)
    p50, p99 = measure(fixed_work, args.lookups, warmup=max(200, args.lookups // 10))
    print(
        f"\nMachine reference, a fixed pure-Python workload timed the same way: "
        f"p50 {p50:.1f} µs, p99 {p99:.1f} µs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
