"""An image storage that records what it was asked to delete (and can refuse some keys)."""

from __future__ import annotations


class RecordingStorage:
    def __init__(self, name: str = "local", broken: set[str] | None = None) -> None:
        self.name = name
        self.deleted: list[str] = []
        self.broken = broken or set()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        raise NotImplementedError

    def get(self, key: str) -> bytes:
        raise NotImplementedError

    def url(self, key: str, ttl: int, base_url: str) -> str:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        if key in self.broken:
            raise OSError("disk error")
        self.deleted.append(key)
