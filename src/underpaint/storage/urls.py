"""Image record -> absolute download URL, by the backend that holds the image.

The process's own ``ImageStorage`` signs (local: HMAC) or presigns (S3) its images; images in a user's own bucket
(``extra.custom_storage``) are presigned with that bucket's client. Shared by task-result and webhooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from underpaint.storage.base import ImageStorage
from underpaint.tasks.types import ImageRecord

# (image, ttl seconds) -> URL, for images held by a backend other than the process's own storage.
Presigner = Callable[[ImageRecord, int], str]
UrlFor = Callable[[ImageRecord], str]


class ImageUrls:
    def __init__(self, storage: ImageStorage, ttl: int, others: Mapping[str, Presigner] | None = None) -> None:
        self.storage = storage
        self.ttl = int(ttl)
        self.others = dict(others or {})

    def resolver(self, base_url: str) -> UrlFor:
        """URLs for a reply to a request that reached us at ``base_url`` (local URLs point back at it)."""
        storage, ttl, others = self.storage, self.ttl, self.others

        def url(image: ImageRecord) -> str:
            if image.backend == storage.name:
                return storage.url(image.key, ttl, base_url)
            presign = others.get(image.backend)
            if presign is None:
                raise LookupError(f"no URL resolver for image backend {image.backend!r}")
            return presign(image, ttl)

        return url

    def all_local(self, images: list[ImageRecord]) -> bool:
        """Whether every URL is computed in-process (HMAC signing), so the event loop may compute them."""
        return self.storage.name == "local" and all(image.backend == "local" for image in images)
