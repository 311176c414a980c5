"""Where output images live. Two real backends: local files (embedded default) and S3 (or S3-compatible)."""

from __future__ import annotations

from typing import Protocol


class StorageError(Exception):
    """A storage failure a user can act on (bad bucket, access denied ...); ``str(exc)`` becomes the reason."""


class ImageStorage(Protocol):
    name: str  # "local" | "s3"

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def url(self, key: str, ttl: int, base_url: str) -> str:
        """An absolute URL downloadable with a plain GET (no auth header), valid for ``ttl`` seconds."""
        ...

    def delete(self, key: str) -> None: ...
