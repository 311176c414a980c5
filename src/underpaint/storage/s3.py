"""S3 (or any S3-compatible endpoint: MinIO, moto, R2 ...) as an ``ImageStorage``.

Credentials come from boto3's standard chain on the server (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE`` and ``~/.aws`` files, container/instance roles); nothing is configured in Underpaint itself.
``url`` returns a presigned GET (SigV4), so a client downloads an image with a plain GET and no auth header.

Every botocore failure is turned into a ``StorageError`` whose message names the bucket (and key) and the
cause, because that message becomes the task's ``reason``.
"""

from __future__ import annotations

import threading
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from underpaint.config import Settings
from underpaint.storage.base import StorageError

_CONFIG = Config(
    signature_version="s3v4",
    connect_timeout=5,
    read_timeout=60,
    retries={"mode": "standard", "max_attempts": 3},
)


class S3Clients:
    """A process's boto3 S3 clients, one per (region, endpoint), each made on first use and then shared by every
    S3 user of the process (the default store, users' own buckets). Clients are thread-safe; creating them is not.

    ``wiring`` makes one per process and hands it to those users; anything else that needs fresh clients (new
    credentials in the environment, say) makes its own."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str | None, str | None], Any] = {}
        self._lock = threading.Lock()

    def client(self, region: str | None, endpoint_url: str | None) -> Any:
        with self._lock:
            client = self._clients.get((region, endpoint_url))
            if client is None:
                # On AWS, virtual-hosted regional URLs (bucket.s3.<region>.amazonaws.com): a presigned URL on the
                # global endpoint is redirected for buckets outside us-east-1, which breaks the signature.
                # S3-compatible servers (MinIO, moto) are usually addressed by path.
                style = "path" if endpoint_url else "virtual"
                config = _CONFIG.merge(Config(s3={"addressing_style": style}))
                session = boto3.session.Session()
                client = session.client("s3", region_name=region, endpoint_url=endpoint_url, config=config)
                self._clients[(region, endpoint_url)] = client
            return client


_CAUSES = {
    "NoSuchBucket": "bucket does not exist",
    "AccessDenied": "access denied (check the server's AWS credentials and the bucket policy)",
    "AllAccessDisabled": "access denied (all access to this bucket is disabled)",
    "InvalidAccessKeyId": "the server's AWS access key was rejected (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": "the server's AWS secret key was rejected (SignatureDoesNotMatch)",
    "ExpiredToken": "the server's AWS session token has expired",
    "InvalidBucketName": "invalid bucket name",
    "PermanentRedirect": "the bucket is in another region than the one configured",
    "AuthorizationHeaderMalformed": "the bucket is in another region than the one configured",
    "NoSuchKey": "object not found",
}
_STATUS_CAUSES = {403: _CAUSES["AccessDenied"], 404: "not found"}
# Answers that mean "not now" rather than "never": worth another try after a pause.
_TRANSIENT_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
# The health probe must answer quickly whatever the endpoint does: one try, short timeouts.
_PROBE_CONFIG = Config(connect_timeout=2, read_timeout=2, retries={"mode": "standard", "max_attempts": 1})


def storage_error(exc: Exception, op: str, bucket: str, key: str | None = None) -> StorageError:
    """Describe a boto3/botocore failure for the task's ``reason``: what, where, why."""
    where = f"bucket {bucket!r}" + (f", key {key!r}" if key is not None else "")
    transient = isinstance(exc, BotoConnectionError | HTTPClientError)
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        cause = _CAUSES.get(code) or _STATUS_CAUSES.get(status) or f"{code or status}: {error.get('Message', '')}"
        transient = code in _TRANSIENT_CODES or (isinstance(status, int) and status >= 500)
    elif isinstance(exc, NoCredentialsError | PartialCredentialsError):
        cause = "no usable AWS credentials configured on the server"
    elif isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        cause = f"cannot reach the S3 endpoint ({exc})"
    else:
        cause = str(exc)
    return StorageError(f"S3 {op} failed ({where}): {cause}", transient=transient)


class S3Storage:
    """Objects live at ``<prefix>/<key>`` in ``bucket``; ``key`` is what the task store records."""

    name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        region: str | None = None,
        endpoint_url: str | None = None,
        *,
        clients: S3Clients | None = None,
    ) -> None:
        """``clients``: the process's shared clients (``wiring`` passes them); without, this store's own."""
        if not bucket:
            raise ValueError("S3 storage needs a bucket (setting s3_bucket)")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.region = region
        self.endpoint_url = endpoint_url
        self._client = (clients if clients is not None else S3Clients()).client(region, endpoint_url)
        self._probe: Any = None

    @classmethod
    def from_settings(cls, settings: Settings, clients: S3Clients | None = None) -> S3Storage:
        """The operator's default store (``storage_backend = "s3"``)."""
        if not settings.s3_bucket:
            raise ValueError("storage_backend 's3' needs s3_bucket")
        return cls(
            settings.s3_bucket, settings.s3_prefix, settings.s3_region, settings.s3_endpoint_url, clients=clients
        )

    def object_key(self, key: str) -> str:
        key = key.lstrip("/")
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        full = self.object_key(key)
        try:
            self._client.put_object(Bucket=self.bucket, Key=full, Body=data, ContentType=content_type)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "upload", self.bucket, full) from exc

    def get(self, key: str) -> bytes:
        full = self.object_key(key)
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=full)
            body: bytes = response["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "download", self.bucket, full) from exc
        return body

    def url(self, key: str, ttl: int, base_url: str = "") -> str:
        """Presigned GET valid for ``ttl`` seconds; ``base_url`` is unused (the URL points at S3)."""
        full = self.object_key(key)
        try:
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": full}, ExpiresIn=int(ttl)
            )
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "presign", self.bucket, full) from exc
        return url

    def delete(self, key: str) -> None:
        full = self.object_key(key)
        try:
            self._client.delete_object(Bucket=self.bucket, Key=full)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "delete", self.bucket, full) from exc

    def reachable(self) -> str:
        """For ``/health``: ``"ok"`` when the bucket answers a HEAD within about 2 s, else why not."""
        if self._probe is None:
            style = "path" if self.endpoint_url else "virtual"
            config = _CONFIG.merge(_PROBE_CONFIG).merge(Config(s3={"addressing_style": style}))
            self._probe = boto3.session.Session().client(
                "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        try:
            self._probe.head_bucket(Bucket=self.bucket)
            return "ok"
        except (ClientError, BotoCoreError) as exc:
            return f"unreachable: {storage_error(exc, 'probe', self.bucket)}"

    def list_keys(self, start_after: str = "", limit: int = 1000) -> list[tuple[str, float]]:
        """Up to ``limit`` image keys after ``start_after`` in key order, with their last-modified Unix times."""
        prefix = self.object_key("")
        params: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "MaxKeys": max(1, min(1000, limit))}
        if start_after:
            params["StartAfter"] = self.object_key(start_after)
        try:
            listing = self._client.list_objects_v2(**params)
        except (ClientError, BotoCoreError) as exc:
            raise storage_error(exc, "list", self.bucket) from exc
        return [(str(o["Key"])[len(prefix) :], o["LastModified"].timestamp()) for o in listing.get("Contents", [])]
