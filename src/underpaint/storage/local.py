"""Output images as local files, served by the API under signed, expiring URLs.

Keys look like ``<task_id>/<uuid4 hex>.<ext>``. A download URL is
``{base_url}/v3/files/{key}?expires=<unix>&sig=<hex HMAC-SHA256(secret, key + "\\n" + expires)>``: no
Authorization header is needed (the SDKs download with a plain GET), and the URL cannot be guessed (random key,
secret signature) or extended (the expiry is signed).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import math
import os
import re
import secrets
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import quote

from underpaint.storage.base import StorageError

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "jpg": "image/jpeg", "webp": "image/webp"}
_KEY_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
# URLs expire on a minute boundary, so repeated polls within a minute get the same URL (cache friendly).
_EXPIRY_GRANULARITY = 60


def image_key(task_id: str, ext: str) -> str:
    """A fresh, unguessable key for one output image of ``task_id``."""
    return f"{task_id}/{uuid.uuid4().hex}.{ext}"


def valid_key(key: str) -> bool:
    """Relative, '/'-separated, no empty/dot segments, no odd characters: cannot escape the root."""
    if not key or len(key) > 512:
        return False
    return all(_KEY_PART.match(part) and part not in (".", "..") for part in key.split("/"))


def content_type_for(key: str) -> str:
    return CONTENT_TYPES.get(key.rsplit(".", 1)[-1].lower(), "application/octet-stream")


def load_or_create_secret(data_dir: Path) -> bytes:
    """The URL-signing secret persisted in ``data_dir/url_secret``; created once, shared by all processes."""
    path = Path(data_dir) / "url_secret"
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_hex(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process won the race: use its secret
        return _read_secret(path)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    return value.encode()


def _read_secret(path: Path) -> bytes:
    for _ in range(50):
        value = path.read_text().strip()
        if value:
            return value.encode()
        time.sleep(0.01)  # created but not yet written by a concurrent process
    raise StorageError(f"{path} is empty; delete it to generate a new URL secret")


def url_secret(settings_secret: str | None, data_dir: Path) -> bytes:
    return settings_secret.encode() if settings_secret else load_or_create_secret(data_dir)


class LocalStorage:
    name = "local"

    def __init__(self, root: Path, secret: bytes) -> None:
        if not secret:
            raise ValueError("LocalStorage needs a non-empty URL secret")
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self._mac = hmac.new(secret, digestmod=hashlib.sha256)  # keyed once, copied per signature

    # -- ImageStorage ---------------------------------------------------------------------------------------

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers see the whole file or nothing
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, key: str) -> bytes:
        try:
            return self.path_for(key).read_bytes()
        except FileNotFoundError:
            raise StorageError(f"image {key!r} not found") from None

    def url(self, key: str, ttl: int, base_url: str) -> str:
        expires = math.ceil((time.time() + ttl) / _EXPIRY_GRANULARITY) * _EXPIRY_GRANULARITY
        return f"{base_url.rstrip('/')}/v3/files/{quote(key)}?expires={expires}&sig={self.sign(key, expires)}"

    def delete(self, key: str) -> None:
        path = self.path_for(key)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()  # the per-task folder, once empty

    def list_keys(self, start_after: str = "", limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` image keys after ``start_after`` in key order, with their last-modified Unix times."""
        first_folder = start_after.split("/", 1)[0]
        keys: list[tuple[str, float]] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            if folder.name < first_folder:
                continue
            for f in sorted(folder.iterdir()):
                key = f"{folder.name}/{f.name}"
                if key <= start_after or f.name.startswith(".tmp-") or not f.is_file():
                    continue
                keys.append((key, f.stat().st_mtime))
                if len(keys) >= limit:
                    return keys
        return keys

    def reachable(self) -> str:
        """For ``/health``: ``"ok"`` when the image folder is a writable directory."""
        return "ok" if self.root.is_dir() and os.access(self.root, os.W_OK) else f"unwritable: {self.root}"

    # -- serving --------------------------------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        if not valid_key(key):
            raise StorageError(f"invalid storage key {key!r}")
        path = self.root / key
        if not path.resolve().is_relative_to(self.root):  # a symlink planted under root
            raise StorageError(f"invalid storage key {key!r}")
        return path

    def sign(self, key: str, expires: int) -> str:
        mac = self._mac.copy()
        mac.update(f"{key}\n{expires}".encode())
        return mac.hexdigest()

    def verify(self, key: str, expires: str, sig: str, now: float | None = None) -> bool:
        """True if ``sig`` signs (key, expires) and ``expires`` is still in the future."""
        if not expires.isdigit() or len(expires) > 12 or not valid_key(key):
            return False
        if int(expires) < (time.time() if now is None else now):
            return False
        return hmac.compare_digest(self.sign(key, int(expires)).encode(), sig.encode("utf-8", "replace"))
