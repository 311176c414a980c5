"""``Idempotency-Key`` on ``POST /v3/async/img2img`` (an extension): per API key, kept 24 h.

The same key with the same body returns the task the first request created (no second task); the same key with
another body is 409 ``IDEMPOTENCY_KEY_REUSED``. The store records the key and creates the task in one
transaction on a unique (owner, key), so two concurrent submits with one key create one task on every backend.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from underpaint.tasks.types import IdempotencyKey, IdempotencyKeyTaken
from underpaint.wire.errors import idempotency_key_reused, invalid_request

IDEMPOTENCY_HEADER = "idempotency-key"
_MAX_KEY = 255


def idempotency_key(header: str | None, data: Any) -> IdempotencyKey | None:
    """The request's ``Idempotency-Key`` with the hash of its (parsed) body; None without the header."""
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > _MAX_KEY or not key.isprintable() or not key.isascii():
        raise invalid_request(
            f"Idempotency-Key header: must be 1 to {_MAX_KEY} printable ASCII characters (a UUID, say)",
            field="Idempotency-Key",
        )
    return IdempotencyKey(key=key, request_hash=request_hash(data))


def request_hash(data: Any) -> str:
    """The same JSON body (whatever its key order or spacing) always hashes the same."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def replay(taken: IdempotencyKeyTaken, key: IdempotencyKey) -> dict[str, str]:
    """The answer to a submit whose key is already recorded: the same task, or 409 for another body."""
    if taken.request_hash != key.request_hash:
        raise idempotency_key_reused(key.key, taken.task_id)
    return {"task_id": taken.task_id}
