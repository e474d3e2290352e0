"""The keyed hash an end user id is kept under where the id itself must not be.

The ledger audits an erasure under it (`ledger_erasures`) and the response cache files each
entry under it, so an erased end user's entries can be found and removed without the cache
holding the id. HMAC-SHA256 under a secret key: whoever holds the key can tell whether a given
id is the one hashed; nobody can test guesses of ids without it.
"""

from __future__ import annotations

import hashlib
import hmac
import json

__all__ = ["end_user_digest"]


def end_user_digest(key: bytes, tenant_id: str, end_user: str) -> str:
    """HMAC-SHA256 (hex) under `key` of the tenant and end user id (a JSON pair, so no two
    (tenant, end user) pairs share a message)."""
    message = json.dumps([tenant_id, end_user], separators=(",", ":")).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()
