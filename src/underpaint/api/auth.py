"""API-key authentication: ``Authorization: Bearer <key>`` (docs, Python SDK) or the bare key (JS SDK).

Keys are compared as SHA-256 digests with ``hmac.compare_digest`` against every configured key, so the time
taken does not depend on which key (or which prefix) matched. Keys are never logged; tasks store only
``underpaint.tasks.types.owner_of(key)``.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from underpaint.config import KeyPolicy, Settings
from underpaint.wire.errors import invalid_api_key, missing_api_key


@dataclass(frozen=True)
class Caller:
    api_key: str
    owner: str
    policy: KeyPolicy


class KeyAuth:
    def __init__(self, settings: Settings) -> None:
        self._digests = [hashlib.sha256(k.encode("utf-8")).digest() for k in settings.api_keys if k]
        # Policies may be keyed by the raw key or by its owner hash (config files should not hold raw keys).
        self._policies = settings.key_policies
        self._default = KeyPolicy()

    def authenticate(self, header: str | None) -> Caller:
        key = _key_from_header(header)
        if not key:
            raise missing_api_key()
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(digest, known)
        if not matched:
            raise invalid_api_key()
        owner = digest.hex()  # == owner_of(key), without hashing twice
        policy = self._policies.get(key) or self._policies.get(owner) or self._default
        return Caller(api_key=key, owner=owner, policy=policy)


def _key_from_header(header: str | None) -> str:
    if not header:
        return ""
    value = header.strip()
    scheme, _, rest = value.partition(" ")
    if scheme.lower() == "bearer":
        value = rest.strip()
    return value
