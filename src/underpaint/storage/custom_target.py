"""The user's own bucket, ``extra.custom_storage.aws_s3 {region, bucket, path, save_to_path_directly}``: its
checks and object keys, without boto3 (the API checks it at submit; ``storage.custom`` does the S3 work).

Object keys (``path`` is stripped of leading/trailing ``/``; an empty path means the bucket root):

* ``save_to_path_directly = true``  -> ``<path>/<filename>``
* ``save_to_path_directly = false`` (default) -> ``<path>/<task_id>/<filename>`` (the "additional directory")

Syntax is checked at submit (``INVALID_CUSTOM_OUTPUT_PATH``); a bucket that does not exist or denies access
can only be seen at upload, and fails the task with a reason naming the bucket.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from underpaint.config import Settings
from underpaint.storage.base import StorageError
from underpaint.tasks.contract import AwsS3In

# AWS general purpose bucket naming rules.
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_BUCKET_BAD_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_BAD_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
# us-east-1, eu-central-1, ap-southeast-2, us-gov-west-1, cn-north-1, us-isob-east-1 ...
_REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d{1,2}$")
# Leave room under S3's 1024-byte key limit for "/<task_id>/<task_id>_<n>.<ext>".
_MAX_PATH_BYTES = 900


class InvalidCustomStorage(StorageError, ValueError):
    """``extra.custom_storage`` that cannot be used; ``str(exc)`` is written for the client."""

    def __init__(self, message: str, **metadata: object) -> None:
        super().__init__(message)
        self.metadata = metadata


@dataclass(frozen=True)
class CustomS3Target:
    region: str
    bucket: str
    path: str  # normalized: no leading/trailing "/", "" = bucket root
    save_to_path_directly: bool = False
    endpoint_url: str | None = None  # the server's s3_endpoint_url, if any


def _bucket_problem(bucket: str) -> str | None:
    if not _BUCKET_RE.match(bucket):
        return "must be 3-63 characters of lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "must not contain '..', '.-' or '-.'"
    if _IP_RE.match(bucket):
        return "must not be formatted as an IP address"
    if bucket.startswith(_BUCKET_BAD_PREFIXES) or bucket.endswith(_BUCKET_BAD_SUFFIXES):
        return "uses a prefix or suffix reserved by AWS"
    return None


def _normalize_path(path: str) -> str:
    normalized = path.strip("/")
    if not normalized:
        return ""
    if len(normalized.encode()) > _MAX_PATH_BYTES:
        raise InvalidCustomStorage(f"custom_storage.aws_s3.path is longer than {_MAX_PATH_BYTES} bytes")
    if "\\" in normalized or any(ord(c) < 32 or ord(c) == 127 for c in normalized):
        raise InvalidCustomStorage(
            "custom_storage.aws_s3.path must not contain backslashes or control characters", path=path
        )
    for segment in normalized.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidCustomStorage(
                "custom_storage.aws_s3.path must not contain empty, '.' or '..' segments", path=path
            )
    return normalized


def endpoint_for(settings: Settings | None) -> str | None:
    """The S3-compatible endpoint custom buckets are looked up on (None: AWS)."""
    return settings.s3_endpoint_url if settings is not None else None


def custom_target(aws_s3: AwsS3In, settings: Settings | None = None) -> CustomS3Target:
    """The bucket of ``extra.custom_storage.aws_s3``, its shape already checked by the task contract (``AwsS3In``):
    here the rules S3 sets on the values (region and bucket names, the path's segments). Raises
    ``InvalidCustomStorage`` (the API answers 400 ``INVALID_CUSTOM_OUTPUT_PATH``). ``settings`` supplies the
    server's ``s3_endpoint_url`` (None: AWS)."""
    region, bucket = aws_s3.region, aws_s3.bucket
    if not _REGION_RE.match(region):
        raise InvalidCustomStorage(f"custom_storage.aws_s3.region {region!r} is not an AWS region name", region=region)
    problem = _bucket_problem(bucket)
    if problem:
        raise InvalidCustomStorage(f"custom_storage.aws_s3.bucket {bucket!r} {problem}", bucket=bucket)
    path = _normalize_path(aws_s3.path)
    return CustomS3Target(region, bucket, path, aws_s3.save_to_path_directly, endpoint_for(settings))


def object_key(target: CustomS3Target, task_id: str, filename: str, save_to_path_directly: bool | None = None) -> str:
    """The object key for one output; ``save_to_path_directly=None`` takes the target's own setting."""
    direct = target.save_to_path_directly if save_to_path_directly is None else save_to_path_directly
    parts = [target.path] if target.path else []
    if not direct:
        parts.append(task_id)
    parts.append(filename)
    return "/".join(parts)
