"""Which requests the cache may answer, and the key an answer is stored under.

A request is *cacheable* when serving an earlier answer again is what the caller would get
anyway, or what the caller asked for:

* `cache.mode` SKIP: never (no lookup, no store);
* `cache.mode` USE: always, whatever the sampling;
* `cache.mode` REFRESH: no lookup, but the new answer replaces the entry;
* unset: only deterministic requests, `sampling.temperature` set and at most the configured
  threshold (`SWITCHYARD_CACHE_MAX_TEMPERATURE`, 0 by default). A request with no temperature
  gets the vendor's default (about 1), so its answers vary and it is not cached.

The key is a hash of the tenant's namespace, the catalog model the request names (an alias
resolves to its model; `auto` stays `auto`, with its routing hints, since any model `auto`
picks is an answer to it) and everything else that shapes the answer: messages, tools, tool
choice, response format and sampling. The request id, the cache policy and the metadata (end
user, tags) do not change the answer and are left out, so two end users of one tenant share
entries; two tenants never do.
"""

from __future__ import annotations

import fnmatch
import hashlib
from dataclasses import dataclass
from typing import Final

from switchyard.v1 import common_pb2

__all__ = ["AUTO", "CacheDecision", "cache_decision", "cache_key", "key_matches"]

AUTO: Final = "auto"
_SEPARATOR: Final = b"\x00"


@dataclass(frozen=True, slots=True)
class CacheDecision:
    """Whether to look up a cached answer and whether to offer the new one for storing."""

    lookup: bool
    store: bool
    # Why not, for logs and the answer's cache status ("" when cacheable).
    reason: str = ""


_SKIP: Final = CacheDecision(False, False, "caller said skip")
_REFRESH: Final = CacheDecision(False, True)
_USE: Final = CacheDecision(True, True)


def cache_decision(request: common_pb2.ChatRequest, max_temperature: float) -> CacheDecision:
    """What the cache may do for `request` (see the module docstring)."""
    mode = request.cache.mode
    if mode == common_pb2.CACHE_MODE_SKIP:
        return _SKIP
    if mode == common_pb2.CACHE_MODE_REFRESH:
        return _REFRESH
    if mode == common_pb2.CACHE_MODE_USE:
        return _USE
    sampling = request.sampling
    if not sampling.HasField("temperature"):
        return CacheDecision(False, False, "no temperature: the vendor's default varies the answer")
    if sampling.temperature > max_temperature:
        return CacheDecision(False, False, f"temperature above {max_temperature:g}")
    return _USE


def cache_key(tenant_id: str, request: common_pb2.ChatRequest, model: str) -> str:
    """The entry key: "<tenant>/<model>/<sha256 of what shapes the answer>".

    `model` is the catalog model the request named (resolved from an alias), or "auto". The
    tenant and model lead the key so entries can be listed and invalidated by them; the
    tenant is percent-escaped so no tenant id can forge another's prefix.
    """
    shaped = common_pb2.ChatRequest(
        messages=request.messages,
        tools=request.tools,
        tool_choice=request.tool_choice,
        response_format=request.response_format,
        sampling=request.sampling,
    )
    if model == AUTO:
        shaped.routing.CopyFrom(request.routing)
    digest = hashlib.sha256()
    digest.update(model.encode())
    digest.update(_SEPARATOR)
    digest.update(shaped.SerializeToString(deterministic=True))
    return f"{_escape(tenant_id)}/{_escape(model)}/{digest.hexdigest()}"


def key_matches(key: str, *, tenant_id: str = "", model: str = "", key_pattern: str = "") -> bool:
    """Whether `key` passes every filter given (the tenant and model it leads with, a glob)."""
    tenant_part, _, rest = key.partition("/")
    model_part = rest.partition("/")[0]
    if tenant_id and tenant_part != _escape(tenant_id):
        return False
    if model and model_part != _escape(model):
        return False
    return not key_pattern or fnmatch.fnmatchcase(key, key_pattern)


def _escape(part: str) -> str:
    """`part` with "%" and "/" escaped, so the key splits back into its parts unambiguously."""
    return part.replace("%", "%25").replace("/", "%2F")
