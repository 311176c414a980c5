"""S3 storage against a real S3-protocol server (moto in server mode on 127.0.0.1), reached over HTTP."""

from __future__ import annotations

import io
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from PIL import Image
from tests.support.ports import free_port
from tests.support.services import moto_endpoint

from underpaint.config import Settings
from underpaint.storage.base import StorageError
from underpaint.storage.custom import CustomBuckets
from underpaint.storage.custom_target import InvalidCustomStorage, custom_target, object_key
from underpaint.storage.s3 import S3Clients, S3Storage
from underpaint.tasks.contract import AwsS3In, TaskExtra
from underpaint.tasks.types import ImageRecord

REGION = "us-east-1"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with moto_endpoint(REGION) as url:
        yield url


@pytest.fixture(scope="module")
def admin(endpoint: str) -> Any:
    """A plain boto3 client to set up buckets and inspect what the code under test wrote."""
    return boto3.client("s3", region_name=REGION, endpoint_url=endpoint)


def _bucket(admin: Any, name: str) -> str:
    admin.create_bucket(Bucket=name)
    return name


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 60)).save(buf, format="PNG")
    return buf.getvalue()


def _download(url: str) -> tuple[bytes, str]:
    with urllib.request.urlopen(url, timeout=10) as response:  # plain GET, no auth header
        return response.read(), response.headers.get("Content-Type", "")


def test_listing_and_probe(endpoint: str, admin: Any) -> None:
    _bucket(admin, "listed")
    storage = S3Storage("listed", "pre", REGION, endpoint)
    assert storage.reachable() == "ok"
    for key in ("b/2.png", "a/1.png", "b/1.png"):
        storage.put(key, b"1", "image/png")
    admin.put_object(Bucket="listed", Key="elsewhere/x.png", Body=b"1")  # outside the prefix: never listed
    keys = [k for k, _ in storage.list_keys()]
    assert keys == ["a/1.png", "b/1.png", "b/2.png"]
    assert [k for k, _ in storage.list_keys(start_after="a/1.png", limit=1)] == ["b/1.png"]
    assert all(abs(t - time.time()) < 300 for _, t in storage.list_keys())


def test_default_store_put_get_url_delete(endpoint: str, admin: Any) -> None:
    _bucket(admin, "default-store")
    settings = Settings(storage_backend="s3", s3_bucket="default-store", s3_prefix="outputs/", s3_endpoint_url=endpoint)
    storage = S3Storage.from_settings(settings)
    assert storage.name == "s3"
    data = _png()
    storage.put("task-1/0.png", data, "image/png")
    # The operator's prefix is applied under the hood; the key the store records stays prefix-free.
    stored = admin.get_object(Bucket="default-store", Key="outputs/task-1/0.png")
    assert stored["Body"].read() == data
    assert stored["ContentType"] == "image/png"
    assert storage.get("task-1/0.png") == data

    url = storage.url("task-1/0.png", ttl=3600, base_url="http://ignored.example")
    assert url.startswith(endpoint + "/default-store/outputs/task-1/0.png?")
    assert "X-Amz-Expires=3600" in url
    assert "X-Amz-Signature=" in url
    body, content_type = _download(url)
    assert body == data
    assert content_type == "image/png"
    assert Image.open(io.BytesIO(body)).size == (16, 8)

    storage.delete("task-1/0.png")
    with pytest.raises(StorageError, match="object not found"):
        storage.get("task-1/0.png")


def test_settings_without_bucket_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="s3_bucket"):
        S3Storage.from_settings(Settings(storage_backend="s3"))


def test_missing_bucket_names_the_bucket(endpoint: str) -> None:
    storage = S3Storage("no-such-bucket-here", "p", REGION, endpoint)
    with pytest.raises(StorageError) as info:
        storage.put("x.png", b"123", "image/png")
    message = str(info.value)
    assert "'no-such-bucket-here'" in message
    assert "does not exist" in message
    assert not info.value.transient  # retrying cannot create the bucket
    assert storage.reachable().startswith("unreachable: ")


def test_rejected_credentials_are_reported(endpoint: str, admin: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _bucket(admin, "creds")
    shared = S3Clients()  # a process's clients: made once, with the credentials of that moment
    S3Storage("creds", "", REGION, endpoint, clients=shared).put("before.png", b"1", "image/png")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
    with pytest.raises(StorageError, match=r"'creds'.*credentials"):
        S3Storage("creds", "", REGION, endpoint, clients=S3Clients()).put("x.png", b"1", "image/png")
    # Every store and custom bucket on the shared clients reuses the client made before the change.
    S3Storage("creds", "", REGION, endpoint, clients=shared).put("after.png", b"1", "image/png")
    target = custom_target(AwsS3In(region=REGION, bucket="creds", path="u"), Settings(s3_endpoint_url=endpoint))
    CustomBuckets(shared).put(target, "u/custom.png", b"1", "image/png")
    listed = sorted(o["Key"] for o in admin.list_objects_v2(Bucket="creds")["Contents"])
    assert listed == ["after.png", "before.png", "u/custom.png"]


def test_wiring_gives_the_default_store_and_users_buckets_one_set_of_clients(
    endpoint: str, admin: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from underpaint.wiring import build_core

    _bucket(admin, "wired")
    settings = Settings(
        storage_backend="s3", s3_bucket="wired", s3_prefix="out", s3_region=REGION, s3_endpoint_url=endpoint,
        data_dir=tmp_path / "data", models_dir=tmp_path / "models",
    )  # fmt: skip
    core = build_core(settings)  # the default store makes its client now, with the credentials of this moment
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "")
        core.services.storage.put("a.png", b"1", "image/png")
        target = custom_target(AwsS3In(region=REGION, bucket="wired", path="u"), settings)
        core.custom_buckets.put(target, "u/b.png", b"1", "image/png")  # a new client would have no credentials
        url = core.services.image_urls.resolver("")(
            ImageRecord(
                key="u/b.png", image_type="png", backend="custom", location={"bucket": "wired", "region": REGION}
            )
        )
    finally:
        core.store.close()
    assert _download(url)[0] == b"1"
    listed = sorted(o["Key"] for o in admin.list_objects_v2(Bucket="wired")["Contents"])
    assert listed == [f"{settings.s3_prefix}/a.png", "u/b.png"]


def test_unreachable_endpoint_is_reported() -> None:
    storage = S3Storage("some-bucket", "", REGION, f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StorageError, match=r"'some-bucket'.*cannot reach the S3 endpoint") as info:
        storage.put("x.png", b"1", "image/png")
    assert info.value.transient  # the endpoint may come back: the worker retries the upload
    assert "cannot reach the S3 endpoint" in storage.reachable()


@pytest.mark.parametrize(
    ("direct", "expected"),
    [(True, "renders/2026/task-9_0.png"), (False, "renders/2026/task-9/task-9_0.png")],
)
def test_custom_bucket_keys_and_presigned_url(endpoint: str, admin: Any, direct: bool, expected: str) -> None:
    bucket = _bucket(admin, f"user-bucket-{str(direct).lower()}")
    extra = {
        "custom_storage": {
            "aws_s3": {"region": REGION, "bucket": bucket, "path": "/renders/2026/", "save_to_path_directly": direct}
        }
    }
    custom = TaskExtra.model_validate(extra).custom_s3  # as the contract reads the body's extra
    assert custom is not None
    settings = Settings(s3_endpoint_url=endpoint)
    target = custom_target(custom, settings)
    assert target.endpoint_url == endpoint
    key = object_key(target, "task-9", "task-9_0.png")
    assert key == expected
    assert object_key(target, "task-9", "task-9_0.png", direct) == expected
    data = _png()
    buckets = CustomBuckets(S3Clients(), settings)
    location = buckets.put(target, key, data, "image/png")
    assert location == {"bucket": bucket, "region": REGION}
    listed = [o["Key"] for o in admin.list_objects_v2(Bucket=bucket)["Contents"]]
    assert listed == [expected]

    record = ImageRecord(key=key, image_type="png", backend="custom", location=location)
    url = buckets.presign(record, ttl=600)
    assert "X-Amz-Expires=600" in url
    assert _download(url) == (data, "image/png")


def test_custom_bucket_default_is_extra_directory_and_root_path(endpoint: str) -> None:
    target = custom_target(AwsS3In(region="eu-west-1", bucket="b-1", path="/"))
    assert target.save_to_path_directly is False
    assert target.path == ""
    assert object_key(target, "t1", "a.webp") == "t1/a.webp"
    assert object_key(target, "t1", "a.webp", save_to_path_directly=True) == "a.webp"
    assert target.endpoint_url is None  # no server endpoint: AWS


def test_custom_missing_bucket_fails_with_its_name(endpoint: str) -> None:
    target = custom_target(AwsS3In(region=REGION, bucket="ghost-bucket", path="x"), Settings(s3_endpoint_url=endpoint))
    with pytest.raises(StorageError, match=r"'ghost-bucket'.*does not exist"):
        CustomBuckets(S3Clients()).put(target, object_key(target, "t", "t_0.png"), b"1", "image/png")


@pytest.mark.parametrize(
    ("aws_s3", "fragment"),
    [
        ({"region": REGION, "bucket": "Upper-Case", "path": "p"}, "bucket 'Upper-Case'"),
        ({"region": REGION, "bucket": "ab", "path": "p"}, "3-63 characters"),
        ({"region": REGION, "bucket": "a" * 64, "path": "p"}, "3-63 characters"),
        ({"region": REGION, "bucket": "under_score", "path": "p"}, "bucket"),
        ({"region": REGION, "bucket": "-dash-first", "path": "p"}, "bucket"),
        ({"region": REGION, "bucket": "two..dots", "path": "p"}, "'..'"),
        ({"region": REGION, "bucket": "192.168.1.10", "path": "p"}, "IP address"),
        ({"region": REGION, "bucket": "xn--bucket", "path": "p"}, "reserved"),
        ({"region": REGION, "bucket": "mine-s3alias", "path": "p"}, "reserved"),
        ({"region": "Mars North", "bucket": "ok-bucket", "path": "p"}, "region"),
        ({"region": REGION, "bucket": "ok-bucket", "path": "a/../b"}, "'..'"),
        ({"region": REGION, "bucket": "ok-bucket", "path": "a//b"}, "empty"),
        ({"region": REGION, "bucket": "ok-bucket", "path": "./a"}, "'.'"),
        ({"region": REGION, "bucket": "ok-bucket", "path": "a\\b"}, "backslash"),
        ({"region": REGION, "bucket": "ok-bucket", "path": "a\nb"}, "control"),
        ({"region": REGION, "bucket": "ok-bucket", "path": "x" * 901}, "longer than"),
    ],
)
def test_invalid_custom_storage_is_rejected_at_submit(aws_s3: dict[str, Any], fragment: str) -> None:
    """The values S3 refuses; the shape (fields, types) is the task contract's (``AwsS3In``)."""
    with pytest.raises(InvalidCustomStorage) as info:
        custom_target(AwsS3In.model_validate(aws_s3))
    assert fragment in str(info.value)


def test_valid_custom_storage_values() -> None:
    target = custom_target(AwsS3In(region="us-gov-west-1", bucket="my.bucket-1", path="a/b c/ü"))
    assert (target.region, target.bucket, target.path) == ("us-gov-west-1", "my.bucket-1", "a/b c/ü")


@pytest.mark.parametrize(
    ("code", "status", "fragment"),
    [
        ("AccessDenied", 403, "access denied"),
        ("InvalidAccessKeyId", 403, "access key was rejected"),
        ("SignatureDoesNotMatch", 403, "secret key was rejected"),
        ("PermanentRedirect", 301, "another region"),
        ("", 403, "access denied"),  # HEAD-style errors carry only the status
        ("SlowDown", 503, "SlowDown: please slow down"),
    ],
)
def test_client_errors_are_described(code: str, status: int, fragment: str) -> None:
    from botocore.exceptions import ClientError

    from underpaint.storage.s3 import storage_error

    exc = ClientError(
        {"Error": {"Code": code, "Message": "please slow down"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )
    error = storage_error(exc, "upload", "their-bucket", "out/a.png")
    assert str(error).startswith("S3 upload failed (bucket 'their-bucket', key 'out/a.png'): ")
    assert fragment in str(error)
    assert error.transient is (status >= 500)  # throttling is worth a retry, a refusal is not


def test_aws_urls_are_regional_virtual_hosted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    url = S3Storage("my-bucket", "p", "eu-west-1").url("a.png", ttl=60)  # signing is local: no request is made
    assert url.startswith("https://my-bucket.s3.eu-west-1.amazonaws.com/p/a.png?X-Amz-Algorithm=AWS4-HMAC-SHA256")
