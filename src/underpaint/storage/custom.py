"""Per-task output to the user's own bucket: ``extra.custom_storage.aws_s3 {region, bucket, path, save_to_path_directly}``.

The server writes with its own AWS credentials (boto3's standard chain), so the bucket's owner must grant the
server's identity ``s3:PutObject`` and ``s3:GetObject`` on the path. The server setting ``s3_endpoint_url``
applies to custom buckets too: with it set, every custom bucket is looked up on that S3-compatible endpoint
(MinIO, moto in tests) instead of AWS.

Object keys (``path`` is stripped of leading/trailing ``/``; an empty path means the bucket root):

* ``save_to_path_directly = true``  -> ``<path>/<filename>``
* ``save_to_path_directly = false`` (default) -> ``<path>/<task_id>/<filename>`` (the "additional directory")

The worker picks a unique ``filename`` per image, so direct saves of different tasks never overwrite each
other. The image's ``image_url`` is a presigned GET of that object, valid for ``image_url_ttl``; its
``ImageRecord.location`` holds the bucket and region, the endpoint comes from the server's settings.

Syntax is checked at submit (``INVALID_CUSTOM_OUTPUT_PATH``); a bucket that does not exist or denies access
can only be seen at upload, and fails the task with a reason naming the bucket.
"""

from __future__ import annotations

from underpaint.config import Settings
from underpaint.storage.custom_target import CustomS3Target, endpoint_for
from underpaint.storage.s3 import S3Clients, S3Storage
from underpaint.tasks.types import ImageRecord


class CustomBuckets:
    """Users' own buckets, through the process's shared S3 clients (``wiring`` injects one ``S3Clients``).

    ``settings.s3_endpoint_url``, when set, is the endpoint of every custom bucket (see above)."""

    def __init__(self, clients: S3Clients, settings: Settings | None = None) -> None:
        self.clients = clients
        self.settings = settings

    def _storage(self, bucket: str, region: str | None, endpoint_url: str | None) -> S3Storage:
        return S3Storage(bucket, prefix="", region=region, endpoint_url=endpoint_url, clients=self.clients)

    def put(self, target: CustomS3Target, key: str, data: bytes, content_type: str) -> dict[str, str]:
        """Upload to the user's bucket; returns ``ImageRecord.location`` for ``backend="custom"``.

        Raises ``StorageError`` (bucket missing, access denied ...) whose message names the bucket.
        """
        self._storage(target.bucket, target.region, target.endpoint_url).put(key, data, content_type)
        return {"bucket": target.bucket, "region": target.region}

    def delete(self, image: ImageRecord) -> None:
        """Remove an image this service wrote to a user's bucket (a run whose results are discarded)."""
        self._located(image).delete(image.key)

    def presign(self, image: ImageRecord, ttl: int) -> str:
        """``image_url`` for an image stored with ``backend="custom"``."""
        return self._located(image).url(image.key, ttl)

    def _located(self, image: ImageRecord) -> S3Storage:
        loc = image.location
        if "bucket" not in loc:
            raise ValueError(f"image {image.key!r} has no custom bucket in its location")
        return self._storage(loc["bucket"], loc.get("region"), endpoint_for(self.settings))
