"""Webhook signatures following the Standard Webhooks convention (https://www.standardwebhooks.com).

Each delivery carries three headers:

* ``webhook-id``: unique per message, the same on every retry (receivers use it to drop duplicates);
* ``webhook-timestamp``: unix seconds of this attempt (receivers reject old ones to stop replays);
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``.

Secrets follow the spec: ``whsec_`` followed by the base64 of the key bytes; the HMAC key is those decoded bytes.
A secret without the prefix is the same base64 text (the reference library, ``standardwebhooks.Webhook``, reads
both forms alike), so an operator's ``KeyPolicy.webhook_secret`` may be written either way; it must be base64
(padding optional), and anything else is refused when the server starts rather than used in some other way.
One secret per API key: the configured one, else one derived from the server secret and the key's owner hash, so
nothing has to be stored. An operator tells a user their secret with ``underpaint webhook-secret --key K``
(always printed as ``whsec_...``); any Standard Webhooks library checks deliveries with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable

from underpaint.config import Settings

_PREFIX = "whsec_"


def derive_secret(server_secret: bytes, owner: str) -> str:
    """The default per-key secret: HMAC(server_secret, owner), as ``whsec_<base64>``."""
    digest = hmac.new(server_secret, b"underpaint-webhook-secret:" + owner.encode("utf-8"), hashlib.sha256).digest()
    return _PREFIX + base64.b64encode(digest).decode("ascii")


def normalize_secret(secret: str) -> str:
    """A configured secret (``whsec_<base64>`` or bare ``<base64>``) as canonical ``whsec_<base64>``."""
    return _PREFIX + base64.b64encode(_key(secret)).decode("ascii")


def _key(secret: str) -> bytes:
    """The HMAC key: the base64 text after the optional ``whsec_`` prefix, decoded (padding optional)."""
    text = secret.strip().removeprefix(_PREFIX)
    try:
        key = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(
            "a webhook secret must be base64, optionally prefixed 'whsec_' (Standard Webhooks); generate one with "
            "python -c \"import base64, os; print('whsec_' + base64.b64encode(os.urandom(32)).decode())\""
        ) from None
    if not key:
        raise ValueError("a webhook secret must not be empty")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signature_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body)}


def make_secret_for(settings: Settings, server_secret: bytes, owner_of: Callable[[str], str]) -> Callable[[str], str]:
    """``secret_for(owner)`` for a dispatcher: the configured ``KeyPolicy.webhook_secret`` of the key whose owner
    hash is ``owner`` (``settings.key_policies`` is keyed by API key), else ``derive_secret``."""
    configured = {
        owner_of(api_key): normalize_secret(policy.webhook_secret)
        for api_key, policy in settings.key_policies.items()
        if policy.webhook_secret
    }

    def secret_for(owner: str) -> str:
        return configured.get(owner) or derive_secret(server_secret, owner)

    return secret_for
