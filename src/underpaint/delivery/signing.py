"""Webhook signatures following the Standard Webhooks convention (https://www.standardwebhooks.com).

Each delivery carries three headers:

* ``webhook-id``: unique per message, the same on every retry (receivers use it to drop duplicates);
* ``webhook-timestamp``: unix seconds of this attempt (receivers reject old ones to stop replays);
* ``webhook-signature``: ``v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>``.

Secrets are strings ``whsec_<base64 key>``, one per API key: ``KeyPolicy.webhook_secret`` when the operator sets
one, else derived from the server secret and the key's owner hash, so nothing has to be stored. An operator
tells a user their secret with ``secret_for(owner_of(api_key))`` (the ``underpaint webhook-secret`` CLI wraps
it); any Standard Webhooks library (or ``verify`` below) checks deliveries with it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping

from underpaint.config import Settings

_PREFIX = "whsec_"


def derive_secret(server_secret: bytes, owner: str) -> str:
    """The default per-key secret: HMAC(server_secret, owner), as ``whsec_<base64>``."""
    digest = hmac.new(server_secret, b"underpaint-webhook-secret:" + owner.encode("utf-8"), hashlib.sha256).digest()
    return _PREFIX + base64.b64encode(digest).decode("ascii")


def normalize_secret(secret: str) -> str:
    """An operator-configured secret as ``whsec_<base64>``; a value without the prefix is taken as raw text."""
    if secret.startswith(_PREFIX):
        _key(secret)  # fail early on a malformed configured secret
        return secret
    return _PREFIX + base64.b64encode(secret.encode("utf-8")).decode("ascii")


def _key(secret: str) -> bytes:
    """The HMAC key: base64 after ``whsec_``; a secret without the prefix is raw text (as ``normalize_secret``)."""
    if not secret.startswith(_PREFIX):
        return secret.encode("utf-8")
    try:
        return base64.b64decode(secret[len(_PREFIX) :], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError("webhook secret must be 'whsec_' followed by base64") from exc


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    mac = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def signature_headers(secret: str, msg_id: str, body: bytes, timestamp: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if timestamp is None else timestamp
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(secret, msg_id, ts, body)}


def verify(
    body: bytes, headers: Mapping[str, str], secret: str, tolerance: int = 300, now: float | None = None
) -> bool:
    """True if ``headers`` carry a valid v1 signature of ``body`` made within ``tolerance`` seconds of ``now``."""
    lowered = {k.lower(): v for k, v in headers.items()}
    msg_id = lowered.get("webhook-id")
    ts_text = lowered.get("webhook-timestamp")
    signatures = lowered.get("webhook-signature")
    if not msg_id or not ts_text or not signatures:
        return False
    try:
        timestamp = int(ts_text)
        expected = sign(secret, msg_id, timestamp, body)
    except ValueError:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance:
        return False
    # The header may list several space-separated signatures (key rotation); any valid v1 one is enough.
    return any(hmac.compare_digest(candidate, expected) for candidate in signatures.split())


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
