"""Where output images live. Two real backends: local files (embedded default) and S3 (or S3-compatible)."""

from __future__ import annotations

from typing import Protocol


class StorageError(Exception):
    """A storage failure a user can act on (bad bucket, access denied ...); ``str(exc)`` becomes the reason.

    ``transient``: the endpoint could not be reached or answered 5xx/throttling, so the same call may succeed
    later (the worker retries an upload for ``storage_retry_seconds``); otherwise retrying cannot help."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class ImageStorage(Protocol):
    name: str  # "local" | "s3"

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes: ...

    def url(self, key: str, ttl: int, base_url: str) -> str:
        """An absolute URL downloadable with a plain GET (no auth header), valid for ``ttl`` seconds."""
        ...

    def delete(self, key: str) -> None: ...


def reachability(storage: object) -> str:
    """For ``/health``: ``"ok"``, or why the storage cannot be used now (S3 endpoint down, folder unwritable).
    A storage without a ``reachable()`` probe counts as reachable."""
    probe = getattr(storage, "reachable", None)
    if probe is None:
        return "ok"
    try:
        return str(probe())
    except Exception as exc:
        return f"unreachable: {type(exc).__name__}: {exc}"
