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
from underpaint.storage.s3 import S3Storage
from underpaint.tasks.types import ImageRecord


def _storage(bucket: str, region: str | None, endpoint_url: str | None) -> S3Storage:
    return S3Storage(bucket, prefix="", region=region, endpoint_url=endpoint_url)


def put_custom(target: CustomS3Target, key: str, data: bytes, content_type: str) -> dict[str, str]:
    """Upload to the user's bucket; returns ``ImageRecord.location`` for ``backend="custom"``.

    Raises ``StorageError`` (bucket missing, access denied ...) whose message names the bucket.
    """
    _storage(target.bucket, target.region, target.endpoint_url).put(key, data, content_type)
    return {"bucket": target.bucket, "region": target.region}


def delete_custom(image: ImageRecord, settings: Settings | None = None) -> None:
    """Remove an image this service wrote to a user's bucket (a run whose results are discarded)."""
    loc = image.location
    if "bucket" not in loc:
        raise ValueError(f"image {image.key!r} has no custom bucket in its location")
    _storage(loc["bucket"], loc.get("region"), endpoint_for(settings)).delete(image.key)


def presign_custom(image: ImageRecord, ttl: int, settings: Settings | None = None) -> str:
    """``image_url`` for an image stored with ``backend="custom"`` (endpoint: ``settings.s3_endpoint_url``)."""
    loc = image.location
    if "bucket" not in loc:
        raise ValueError(f"image {image.key!r} has no custom bucket in its location")
    return _storage(loc["bucket"], loc.get("region"), endpoint_for(settings)).url(image.key, ttl)
