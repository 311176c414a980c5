"""``Idempotency-Key`` on every ``POST /v3/async/...`` submit (an extension): per API key, kept 24 h.

The same key with the same body on the same endpoint returns the task the first request created (no second task);
the same key with another body, or on another endpoint, is 409 ``IDEMPOTENCY_KEY_REUSED``. The recorded hash
covers the endpoint: img2img, the first endpoint, hashes its body alone (as before there were others), so keys
recorded by earlier versions still replay after an upgrade. The store records the key and creates the task in one
transaction on a unique (owner, key), so two concurrent submits with one key create one task on every backend.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from underpaint.tasks.contract import TaskType
from underpaint.tasks.types import IdempotencyKey, IdempotencyKeyTaken
from underpaint.wire.errors import idempotency_key_reused, invalid_request

IDEMPOTENCY_HEADER = "idempotency-key"
_MAX_KEY = 255


def idempotency_key(header: str | None, data: Any, task_type: TaskType) -> IdempotencyKey | None:
    """The request's ``Idempotency-Key`` with the hash of its endpoint and (parsed) body; None without the header."""
    if header is None:
        return None
    key = header.strip()
    if not key or len(key) > _MAX_KEY or not key.isprintable() or not key.isascii():
        raise invalid_request(
            f"Idempotency-Key header: must be 1 to {_MAX_KEY} printable ASCII characters (a UUID, say)",
            field="Idempotency-Key",
        )
    return IdempotencyKey(key=key, request_hash=request_hash(data, task_type))


def request_hash(data: Any, task_type: TaskType) -> str:
    """The same JSON body (whatever its key order or spacing) to the same endpoint always hashes the same."""
    scoped = data if task_type is TaskType.IMG_TO_IMG else {"endpoint": str(task_type), "body": data}
    canonical = json.dumps(scoped, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def replay(taken: IdempotencyKeyTaken, key: IdempotencyKey) -> dict[str, str]:
    """The answer to a submit whose key is already recorded: the same task, or 409 for another body."""
    if taken.request_hash != key.request_hash:
        raise idempotency_key_reused(key.key, taken.task_id)
    return {"task_id": taken.task_id}
