"""Issue #5's features through the real path: API submit -> worker -> runner -> storage / NSFW -> terminal hook
-> webhook sender, on tiny models (128 px, 3 steps)."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from tests.support.delivery import REGION, Stack, moto_endpoint, open_stack, split_url
from tests.support.webhook_receiver import Receiver, running_receiver, signature_ok, wait_for

from underpaint.config import KeyPolicy
from underpaint.delivery.webhooks import DELIVERED
from underpaint.wiring import webhook_secret_for_key

SUCCEED, FAILED, QUEUED = "TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED", "TASK_STATUS_QUEUED"
HEX_PNG = r"[0-9a-f]{32}\.png"
KEY_B_SECRET = base64.b64encode(b"key-b's own webhook signing key").decode()  # configured bare, no whsec_


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    with moto_endpoint() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def admin(s3_endpoint: str) -> Any:
    """A plain boto3 client to create buckets and read what the service wrote."""
    return boto3.client("s3", region_name=REGION, endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Path:
    """A private copy of the tiny models: tests here add and remove checkpoints in it."""
    dest = tmp_path_factory.mktemp("delivery-models") / "models"
    shutil.copytree(tiny_models_dir, dest)
    return dest


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    with running_receiver() as state:
        yield state


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path, s3_endpoint: str) -> Iterator[Stack]:
    with open_stack(
        tmp_path_factory.mktemp("delivery-data"),
        models_dir,
        webhook_allow_hosts=("127.0.0.1",),
        webhook_timeout=2.0,
        s3_endpoint_url=s3_endpoint,  # custom buckets are looked up on moto
        key_policies={"key-b": KeyPolicy(dedicated_lane="vip", webhook_secret=KEY_B_SECRET)},
    ) as s:
        yield s


def _objects(admin: Any, bucket: str) -> list[str]:
    return sorted(o["Key"] for o in admin.list_objects_v2(Bucket=bucket).get("Contents", []))


def _webhook_event(stack: Stack, receiver: Receiver, task_id: str) -> tuple[dict[str, Any], Any]:
    """Wait for the one delivery of ``task_id``; return the event and the raw request."""
    webhooks = stack.webhooks
    assert wait_for(lambda: [d.status for d in webhooks.deliveries(task_id)] == [DELIVERED]), webhooks.deliveries(
        task_id
    )
    mine = [r for r in receiver.received() if json.loads(r.body)["payload"]["task"]["task_id"] == task_id]
    assert len(mine) == 1, [r.body[:200] for r in mine]
    return json.loads(mine[0].body), mine[0]


# ------------------------------------------------------------------------------------------------ 1. webhooks


def test_webhook_of_a_real_generation_equals_the_polled_result(stack: Stack, receiver: Receiver) -> None:
    task_id = stack.submit(extra={"webhook": {"url": receiver.url}}, image_num=2)
    polled = stack.run(task_id)
    assert polled["task"]["status"] == SUCCEED, polled["task"]
    event, request = _webhook_event(stack, receiver, task_id)

    assert request.path == "/hook"
    assert request.headers["content-type"] == "application/json"
    assert signature_ok(request.body, request.headers, webhook_secret_for_key(stack.settings, "key-a"))
    assert not signature_ok(request.body, request.headers, webhook_secret_for_key(stack.settings, "key-b"))
    assert event["event_type"] == "ASYNC_TASK_RESULT"
    payload = event["payload"]
    assert payload["extra"].pop("webhook") == {"url": receiver.url}
    # Image URLs are signed per request: identical but for the signature/expiry values.
    sent_images, polled_images = payload.pop("images"), polled.pop("images")
    assert len(sent_images) == len(polled_images) == 2
    for sent, got in zip(sent_images, polled_images, strict=True):
        sent_url = sent.pop("image_url")
        assert split_url(sent_url) == split_url(got.pop("image_url"))
        assert sent == got
        # The URL in the webhook downloads the image (signed URL, no Authorization header).
        download = stack.client.get(sent_url)
        assert download.status_code == 200
        assert download.content.startswith(b"\x89PNG")
    assert payload == polled


def test_failed_task_sends_a_failed_webhook_with_the_reason(stack: Stack, receiver: Receiver, models_dir: Path) -> None:
    checkpoints = models_dir / "checkpoint"
    doomed = checkpoints / "doomed.safetensors"
    shutil.copy(checkpoints / "tiny-sd15.safetensors", doomed)
    shutil.copytree(checkpoints / "tiny-sd15.config", checkpoints / "doomed.config")
    task_id = stack.submit(extra={"webhook": {"url": receiver.url}}, model_name="doomed.safetensors")
    doomed.unlink()
    shutil.rmtree(checkpoints / "doomed.config")

    polled = stack.run(task_id)
    assert polled["task"]["status"] == FAILED
    assert "doomed" in polled["task"]["reason"]
    event, request = _webhook_event(stack, receiver, task_id)
    assert signature_ok(request.body, request.headers, webhook_secret_for_key(stack.settings, "key-a"))
    payload = event["payload"]
    assert payload["task"]["status"] == FAILED
    assert payload["task"]["reason"] == polled["task"]["reason"]
    assert payload["images"] == []
    assert payload["extra"].pop("webhook") == {"url": receiver.url}
    assert payload == polled


def test_webhook_signed_with_the_keys_configured_secret(stack: Stack, receiver: Receiver) -> None:
    task_id = stack.submit(key="key-b", extra={"webhook": {"url": receiver.url}})
    assert stack.run(task_id, key="key-b")["task"]["status"] == SUCCEED
    _event, request = _webhook_event(stack, receiver, task_id)
    secret = webhook_secret_for_key(stack.settings, "key-b")
    assert secret == "whsec_" + KEY_B_SECRET
    assert signature_ok(request.body, request.headers, secret)
    assert signature_ok(request.body, request.headers, KEY_B_SECRET)  # the value as configured verifies too
    assert not signature_ok(request.body, request.headers, webhook_secret_for_key(stack.settings, "key-a"))


def test_no_webhook_without_a_url(stack: Stack, receiver: Receiver) -> None:
    task_id = stack.submit()
    assert stack.run(task_id)["task"]["status"] == SUCCEED
    webhooks = stack.webhooks
    assert webhooks.deliveries(task_id) == []


# ------------------------------------------------------------------------------------------------ 2. NSFW


def test_nsfw_detection_runs_in_the_pipeline(stack: Stack) -> None:
    checked = stack.run(stack.submit(extra={"enable_nsfw_detection": True, "nsfw_detection_level": 2}, image_num=2))
    assert checked["task"]["status"] == SUCCEED, checked["task"]
    assert checked["extra"]["enable_nsfw_detection"] is True
    assert len(checked["images"]) == 2
    for image in checked["images"]:
        verdict = image["nsfw_detection_result"]
        assert set(verdict) == {"valid", "confidence"}
        assert verdict["valid"] is True
        assert isinstance(verdict["confidence"], int | float)
        assert 0 <= verdict["confidence"] <= 100

    plain = stack.run(stack.submit(image_num=2))
    assert plain["extra"]["enable_nsfw_detection"] is False
    assert [i["nsfw_detection_result"] for i in plain["images"]] == [None, None]


# ------------------------------------------------------------------------------------------------ 3. custom S3


@pytest.mark.parametrize("direct", [True, False])
def test_custom_bucket_layout_and_presigned_url(stack: Stack, admin: Any, receiver: Receiver, direct: bool) -> None:
    bucket = f"user-out-{str(direct).lower()}"
    admin.create_bucket(Bucket=bucket)
    aws_s3 = {"region": REGION, "bucket": bucket, "path": "/renders/run1/", "save_to_path_directly": direct}
    extra = {"custom_storage": {"aws_s3": aws_s3}, "webhook": {"url": receiver.url}}
    task_id = stack.submit(extra=extra, image_num=2)
    result = stack.run(task_id)
    assert result["task"]["status"] == SUCCEED, result["task"]

    keys = _objects(admin, bucket)
    folder = "renders/run1/" if direct else f"renders/run1/{task_id}/"
    assert len(keys) == 2, keys
    assert all(re.fullmatch(re.escape(folder) + HEX_PNG, k) for k in keys), keys
    by_key = {k: admin.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}
    for image in result["images"]:
        url = image["image_url"]
        assert url.startswith(f"{stack.settings.s3_endpoint_url}/{bucket}/{folder}")
        assert "X-Amz-Signature=" in url
        key = url.split(f"/{bucket}/", 1)[1].split("?", 1)[0]
        download = httpx.get(url, trust_env=False)  # plain GET, no credentials
        assert download.status_code == 200
        assert download.content == by_key[key]
        assert download.content.startswith(b"\x89PNG")
    # Nothing went to the server's own image store.
    assert not (stack.settings.data_dir / "images" / task_id).exists()
    # The webhook carries presigned URLs of the same objects.
    event, _request = _webhook_event(stack, receiver, task_id)
    sent = [split_url(i["image_url"]) for i in event["payload"]["images"]]
    assert sent == [split_url(i["image_url"]) for i in result["images"]]


def test_missing_custom_bucket_fails_the_task_naming_it(stack: Stack) -> None:
    aws_s3 = {"region": REGION, "bucket": "no-such-bucket-here", "path": "x"}
    result = stack.run(stack.submit(extra={"custom_storage": {"aws_s3": aws_s3}}))
    assert result["task"]["status"] == FAILED
    assert "no-such-bucket-here" in result["task"]["reason"]
    assert result["images"] == []


def test_upload_failing_midway_leaves_nothing_in_the_users_bucket(
    stack: Stack, admin: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from underpaint.storage.base import StorageError

    bucket = "user-out-partial"
    admin.create_bucket(Bucket=bucket)
    buckets = stack.core.custom_buckets  # the process's users' buckets, which the worker's runner was given
    real_put = buckets.put
    calls: list[str] = []

    def second_fails(target: Any, key: str, data: bytes, content_type: str) -> dict[str, str]:
        calls.append(key)
        if len(calls) == 2:
            raise StorageError(f"bucket {bucket!r}: connection reset while uploading")
        return real_put(target, key, data, content_type)

    monkeypatch.setattr(buckets, "put", second_fails)
    aws_s3 = {"region": REGION, "bucket": bucket, "path": "out"}
    result = stack.run(stack.submit(extra={"custom_storage": {"aws_s3": aws_s3}}, image_num=2))
    assert result["task"]["status"] == FAILED
    assert bucket in result["task"]["reason"]
    assert len(calls) == 2  # the first image was uploaded ...
    assert _objects(admin, bucket) == []  # ... and removed when the second failed


def test_invalid_custom_bucket_name_is_refused_at_submit(stack: Stack) -> None:
    aws_s3 = {"region": REGION, "bucket": "Bad_Bucket", "path": "x"}
    r = stack.post(extra={"custom_storage": {"aws_s3": aws_s3}})
    assert r.status_code == 400
    assert r.json()["reason"] == "INVALID_CUSTOM_OUTPUT_PATH"
    assert "Bad_Bucket" in r.json()["message"]
    assert not stack.worker.run_once()  # nothing was queued


# ------------------------------------------------------------------------------------------------ 4. S3 default store


def test_s3_as_the_default_store(tmp_path: Path, models_dir: Path, s3_endpoint: str, admin: Any) -> None:
    admin.create_bucket(Bucket="server-images")
    with open_stack(
        tmp_path / "data", models_dir, storage_backend="s3", s3_bucket="server-images", s3_prefix="outputs",
        s3_endpoint_url=s3_endpoint,
    ) as s3_stack:  # fmt: skip
        task_id = s3_stack.submit()
        result = s3_stack.run(task_id)
    assert result["task"]["status"] == SUCCEED, result["task"]
    [key] = _objects(admin, "server-images")
    assert re.fullmatch(f"outputs/{task_id}/{HEX_PNG}", key), key
    [image] = result["images"]
    assert image["image_url"].startswith(f"{s3_endpoint}/server-images/{key}?")
    download = httpx.get(image["image_url"], trust_env=False)
    assert download.status_code == 200
    assert download.content == admin.get_object(Bucket="server-images", Key=key)["Body"].read()
    assert not (tmp_path / "data" / "images" / task_id).exists()


# ------------------------------------------------------------------------------------------------ 5. rate limits


def test_images_per_minute_through_the_api(tmp_path: Path, models_dir: Path) -> None:
    with open_stack(tmp_path, models_dir, key_policies={"key-a": KeyPolicy(images_per_minute=10)}) as s:
        for _ in range(10):
            assert s.post().status_code == 200
        refused = s.post()
        assert refused.status_code == 429
        assert refused.json()["reason"] == "RATE_LIMIT_EXCEEDED"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert s.post(key="key-b").status_code == 200  # other keys are unaffected
        assert s.post(key="key-b", image_num=4).status_code == 200


def test_max_queued_tasks_through_the_api(tmp_path: Path, models_dir: Path) -> None:
    with open_stack(tmp_path, models_dir, key_policies={"key-a": KeyPolicy(max_queued_tasks=2)}) as s:
        first = s.submit()
        s.submit()
        refused = s.post()
        assert refused.status_code == 429
        assert refused.json()["reason"] == "RATE_LIMIT_EXCEEDED"
        assert "Retry-After" in refused.headers
        assert s.post(key="key-b").status_code == 200
        assert s.run(first)["task"]["status"] == SUCCEED  # one finished: room for one more
        assert s.post().status_code == 200
        assert s.post().status_code == 429


# ------------------------------------------------------------------------------------------------ 6. enterprise plan


def test_enterprise_plan_runs_a_dedicated_key_first(stack: Stack) -> None:
    enterprise = {"enterprise_plan": {"enabled": True}}
    a1, a2 = stack.submit(), stack.submit()
    vip = stack.submit(key="key-b", extra=enterprise)
    record = stack.services.store.get(vip)
    assert record is not None
    assert record.lane == "enterprise.vip"

    assert stack.worker.run_once()
    assert stack.status(vip, "key-b") == SUCCEED
    assert [stack.status(a1), stack.status(a2)] == [QUEUED, QUEUED]

    # key-a has no dedicated lane: the flag is accepted and ignored.
    a3 = stack.submit(extra=enterprise)
    record = stack.services.store.get(a3)
    assert record is not None
    assert record.lane == "sd15"
    for expected in (a1, a2, a3):
        assert stack.worker.run_once()
        assert stack.status(expected) == SUCCEED
    assert not stack.worker.run_once()
