"""``GenerationRunner`` through a storage outage: the task's encoded images wait on disk in the spool (not in
memory), are uploaded from there once the storage answers, and the spool is empty afterwards; a task the outage
outlasts fails with nothing left behind; what a killed worker left in the spool is cleared by the next one."""

from __future__ import annotations

import io
import logging
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from PIL import Image
from tests.storage.test_spool import killed_worker
from tests.support.requests import new_task, txt2img

from underpaint.config import Settings
from underpaint.engine.job import GeneratedImage, GenerationJob, JobOutcome, ProgressCallback, UpscaleJob
from underpaint.engine.model_tiers import ModelCacheReport
from underpaint.storage.base import StorageError
from underpaint.storage.retry import UploadRetry
from underpaint.storage.spool import Spool
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskRecord, TaskStatus
from underpaint.worker.loop import process_task
from underpaint.worker.runner import GenerationRunner


class SolidExecutor:
    """Makes ``image_num`` solid images of the job's size, a colour per image (no model)."""

    checkpoint_loads = 0

    def generate(
        self,
        job: GenerationJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> list[GeneratedImage]:
        return [
            GeneratedImage(Image.new("RGB", (job.width, job.height), (40 * i, 90, 200)), job.seed + i, "infotext")
            for i in range(job.image_num)
        ]

    def generate_batch(
        self,
        jobs: Sequence[GenerationJob],
        on_progress: Sequence[ProgressCallback | None] | None = None,
        should_cancel: Sequence[Callable[[], bool] | None] | None = None,
    ) -> list[JobOutcome]:
        return [self.generate(j) for j in jobs]

    def upscale(
        self,
        job: UpscaleJob,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
    ) -> GeneratedImage:
        raise NotImplementedError

    def prefetch(self, checkpoints: Sequence[str]) -> None:
        pass

    def cache_report(self) -> ModelCacheReport:
        return ModelCacheReport()


class Bucket:
    """An S3-like storage that is down (transient errors) for its next ``failures`` calls; ``during_outage`` is
    called at each failed upload, so the test can look at the spool meanwhile."""

    name = "s3"

    def __init__(self, failures: int = 0, during_outage: Callable[[], None] = lambda: None) -> None:
        self.failures = failures
        self.during_outage = during_outage
        self.objects: dict[str, bytes] = {}
        self.deleted: list[str] = []

    def _down(self) -> bool:
        if self.failures <= 0:
            return False
        self.failures -= 1
        return True

    def put(self, key: str, data: bytes, content_type: str) -> None:
        if self._down():
            self.during_outage()
            raise StorageError("S3 upload failed: cannot reach the S3 endpoint", transient=True)
        self.objects[key] = data

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def url(self, key: str, ttl: int, base_url: str) -> str:
        raise NotImplementedError

    def delete(self, key: str) -> None:
        if self._down():
            raise StorageError("S3 delete failed: cannot reach the S3 endpoint", transient=True)
        self.deleted.append(key)
        self.objects.pop(key, None)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=30)
    yield s
    s.close()


def runner_for(tmp_path: Path, bucket: Bucket, budget_s: float = 30.0, spool: Spool | None = None) -> GenerationRunner:
    settings = Settings(data_dir=tmp_path)
    retry = UploadRetry(budget_s, first_delay=0.01, max_delay=0.05)
    spool = spool or Spool(settings.resolved_spool_dir)
    return GenerationRunner(settings, bucket, SolidExecutor(), upload_retry=retry, spool=spool)


def submit(store: SqlTaskStore, image_num: int = 2) -> str:
    tid = uuid.uuid4().hex
    store.create(new_task(tid, request=txt2img(width=64, height=48, image_num=image_num)))
    return tid


def done(store: SqlTaskStore, tid: str) -> TaskRecord:
    rec = store.get(tid)
    assert rec is not None
    return rec


def test_during_an_outage_the_images_wait_on_disk_and_are_uploaded_from_there(
    tmp_path: Path, store: SqlTaskStore
) -> None:
    seen: list[dict[str, bytes]] = []
    bucket = Bucket(failures=4)
    runner = runner_for(tmp_path, bucket)
    assert runner.spool is not None
    spool = runner.spool
    bucket.during_outage = lambda: seen.append({p.name: p.read_bytes() for p in spool.pending()})
    tid = submit(store, image_num=2)
    process_task(tid, store, runner, storage=bucket)
    rec = done(store, tid)
    assert rec.status is TaskStatus.SUCCEED, rec.reason
    # Every failed try found both encoded images on disk, whole.
    assert len(seen) == 4
    assert all(len(files) == 2 for files in seen)
    on_disk = sorted(f.split(b"\n", 1)[1] for f in seen[-1].values())  # after the header line
    # What reached the bucket is what waited in the spool: the encoded PNGs of the task, one per image.
    keys = sorted(i.key for i in rec.images)
    assert sorted(bucket.objects) == keys
    assert all(k.startswith(f"{tid}/") for k in keys)
    uploaded = sorted(bucket.objects.values())
    assert on_disk == uploaded
    sizes = {Image.open(io.BytesIO(b)).size for b in uploaded}
    assert sizes == {(64, 48)}
    assert spool.pending() == []  # nothing left on disk once uploaded


def test_an_outage_longer_than_the_budget_fails_the_task_and_leaves_nothing(
    tmp_path: Path, store: SqlTaskStore
) -> None:
    bucket = Bucket()
    runner = runner_for(tmp_path, bucket, budget_s=0.2)
    real_put = bucket.put

    def first_only(key: str, data: bytes, content_type: str) -> None:
        if bucket.objects:  # the first image went up; then the storage goes down for good
            raise StorageError("S3 upload failed: cannot reach the S3 endpoint", transient=True)
        real_put(key, data, content_type)

    bucket.put = first_only  # type: ignore[method-assign]
    tid = submit(store, image_num=2)
    process_task(tid, store, runner, storage=bucket)
    rec = done(store, tid)
    assert rec.status is TaskStatus.FAILED
    assert "cannot reach the S3 endpoint" in rec.reason
    assert bucket.objects == {}  # the image that did go up is deleted again
    assert len(bucket.deleted) == 1
    assert runner.spool is not None
    assert runner.spool.pending() == []


def test_without_a_writable_spool_the_images_wait_in_memory(
    tmp_path: Path, store: SqlTaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    bucket = Bucket(failures=2)
    runner = runner_for(tmp_path, bucket)
    assert runner.spool is not None
    shutil.rmtree(runner.spool.dir)  # the disk under it is gone
    tid = submit(store, image_num=1)
    with caplog.at_level(logging.WARNING, logger="underpaint.worker.runner"):
        process_task(tid, store, runner, storage=bucket)
    rec = done(store, tid)
    assert rec.status is TaskStatus.SUCCEED, rec.reason
    assert sorted(bucket.objects) == [i.key for i in rec.images]
    assert any("not spooled to disk" in r.getMessage() and tid in r.getMessage() for r in caplog.records)


def test_a_killed_workers_leftovers_are_deleted_from_the_bucket_by_the_next_runner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Settings(data_dir=tmp_path).resolved_spool_dir
    dead = killed_worker(root)  # left t1/a.png for our bucket, one image for a user's bucket
    bucket = Bucket()
    bucket.objects["t1/a.png"] = b"uploaded just before the kill"
    deleted_custom: list[tuple[str, dict[str, str]]] = []
    runner = runner_for(tmp_path, bucket, spool=Spool(root))
    monkeypatch.setattr(
        runner.custom_buckets, "delete", lambda image: deleted_custom.append((image.key, image.location))
    )
    assert runner.recover_spool() == 0
    assert bucket.deleted == ["t1/a.png"]
    assert bucket.objects == {}
    assert deleted_custom == [("bucket-path/t2/b.png", {"bucket": "user-bucket", "region": "eu-west-1"})]
    assert not dead.exists()


def test_leftovers_that_meet_a_storage_outage_are_cleared_after_the_next_upload(
    tmp_path: Path, store: SqlTaskStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = Settings(data_dir=tmp_path).resolved_spool_dir
    dead = killed_worker(root)
    bucket = Bucket(failures=1)  # still down when the worker starts; the user's bucket is on the same endpoint
    runner = runner_for(tmp_path, bucket, spool=Spool(root))
    monkeypatch.setattr(runner.custom_buckets, "delete", lambda image: bucket.delete(image.key))
    assert runner.recover_spool() == 2
    assert len(list(dead.glob("*.img"))) == 2
    tid = submit(store, image_num=1)
    process_task(tid, store, runner, storage=bucket)
    assert done(store, tid).status is TaskStatus.SUCCEED
    assert sorted(bucket.deleted) == ["bucket-path/t2/b.png", "t1/a.png"]
    assert not dead.exists()
