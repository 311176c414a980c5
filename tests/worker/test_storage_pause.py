"""The embedded worker through a storage outage longer than ``storage_retry_seconds``: the task in hand fails, the
worker then claims nothing (the tasks behind it stay QUEUED, none is generated, none FAILED) while it probes the
storage, and runs them all once the storage answers again."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tests.support.requests import new_task, txt2img
from tests.worker.test_upload_spool import Bucket, SolidExecutor

from underpaint.config import Settings
from underpaint.storage.base import reachability
from underpaint.storage.retry import StorageGate, UploadRetry
from underpaint.storage.spool import Spool
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskStatus
from underpaint.worker.loop import BatchPolicy, Worker
from underpaint.worker.runner import GenerationRunner

BUDGET_S = 0.5


class S3Down(Bucket):
    """An S3-like storage that answers nothing while ``down`` (transient errors, as an unreachable endpoint), with
    the ``reachable()`` probe ``/health`` uses."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.probes = 0
        self.tried: set[str] = set()  # tasks whose upload was tried

    def _down(self) -> bool:
        return self.down

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.tried.add(key.split("/", 1)[0])  # a task generated: its images reach the upload
        super().put(key, data, content_type)

    def reachable(self) -> str:
        self.probes += 1
        return "unreachable: cannot reach the S3 endpoint" if self.down else "ok"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=30)
    yield s
    s.close()


def worker_for(tmp_path: Path, store: SqlTaskStore, bucket: S3Down, changes: list[bool]) -> Worker:
    settings = Settings(data_dir=tmp_path)
    retry = UploadRetry(BUDGET_S, first_delay=0.05, max_delay=0.1)  # (the setting is whole seconds)
    gate = StorageGate(
        retry, lambda: reachability(bucket), first_interval=0.05, max_interval=0.2, on_change=changes.append
    )
    runner = GenerationRunner(
        settings, bucket, SolidExecutor(), upload_retry=retry, spool=Spool(settings.resolved_spool_dir), claim_gate=gate
    )
    return Worker(store, runner, settings, storage=bucket, poll_interval=0.05, policy=BatchPolicy(max_batch=1))


def submit(store: SqlTaskStore, n: int) -> list[str]:
    ids = []
    for i in range(n):
        tid = uuid.uuid4().hex
        store.create(new_task(tid, request=txt2img(width=32, height=32, image_num=1, seed=i + 1)))
        ids.append(tid)
        time.sleep(0.01)  # claimed oldest first
    return ids


def status(store: SqlTaskStore, tid: str) -> TaskStatus:
    rec = store.get(tid)
    assert rec is not None
    return rec.status


def wait_for(what: str, cond: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s"
        time.sleep(0.02)


def test_a_long_storage_outage_fails_the_task_in_hand_and_leaves_the_rest_queued_until_it_ends(
    tmp_path: Path, store: SqlTaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    bucket, changes = S3Down(), list[bool]()
    worker = worker_for(tmp_path, store, bucket, changes)
    first, *rest = submit(store, 4)
    bucket.down = True
    with caplog.at_level(logging.WARNING, logger="underpaint.storage"):
        worker.start()
        try:
            wait_for("the first task failing", lambda: status(store, first) is TaskStatus.FAILED)
            probes = bucket.probes
            time.sleep(6 * BUDGET_S)  # six times the budget in which each task used to be claimed and failed
            assert [status(store, t) for t in rest] == [TaskStatus.QUEUED] * 3
            assert bucket.tried == {first}  # nothing generated only to be thrown away
            assert changes == [True]
            assert bucket.probes > probes  # the storage is probed meanwhile ...
            assert bucket.probes - probes < 6 * BUDGET_S / 0.05  # ... at its own pace, not at every poll
            bucket.down = False
            wait_for("the queue done", lambda: all(status(store, t) is TaskStatus.SUCCEED for t in rest))
        finally:
            assert worker.stop(10)
    assert changes == [True, False]
    assert bucket.tried == {first, *rest}
    rec = store.get(first)
    assert rec is not None
    assert "cannot reach the S3 endpoint" in rec.reason
    images = [i.key for t in rest for i in store.get(t).images]  # type: ignore[union-attr]
    assert sorted(bucket.objects) == sorted(images)
    assert len(images) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("claims no task until the storage answers" in w for w in warnings) == 1
    assert sum("claiming tasks again" in w for w in warnings) == 1


def test_a_worker_paused_by_a_storage_outage_stops_at_once(tmp_path: Path, store: SqlTaskStore) -> None:
    bucket, changes = S3Down(), list[bool]()
    worker = worker_for(tmp_path, store, bucket, changes)
    first, second = submit(store, 2)
    bucket.down = True
    worker.start()
    try:
        wait_for("claiming paused", lambda: changes == [True])
    finally:
        started = time.monotonic()
        assert worker.stop(5)
    assert time.monotonic() - started < 1.0
    assert status(store, first) is TaskStatus.FAILED
    assert status(store, second) is TaskStatus.QUEUED  # left for the next start
