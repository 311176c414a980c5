"""A worker across a task-store outage (the database restarting): its finished work is recorded once the store is
back, or, if the outage outlasts its lease, its images are deleted and the next attempt makes the task's images.
Never a task FAILED by the outage, never an image that no task references."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError
from tests.support.requests import new_task
from tests.support.storage import RecordingStorage

from underpaint.engine.job import Progress
from underpaint.tasks.contract import TaskRequest
from underpaint.tasks.lifecycle import sweep_expired
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import ProgressReporter, process_task


class BlinkingStore(SqlTaskStore):
    """Raises like a dropped database connection while ``down`` is set; ``lose_commit`` makes the next
    ``complete`` commit and then raise, as when the connection drops before the answer arrives."""

    down = False
    lose_commit = False

    def _check(self) -> None:
        if self.down:
            raise OperationalError("UPDATE tasks ...", {}, ConnectionRefusedError("connection refused"))

    def complete(self, task_id: str, worker_id: str, images: list[ImageRecord]) -> bool:
        self._check()
        done = super().complete(task_id, worker_id, images)
        if self.lose_commit:
            self.lose_commit = False
            raise OperationalError("COMMIT", {}, ConnectionResetError("connection reset"))
        return done

    def update_progress(self, task_id: str, worker_id: str, progress_percent: int, eta: int) -> bool:
        self._check()
        return super().update_progress(task_id, worker_id, progress_percent, eta)


class Storage(RecordingStorage):
    def __init__(self) -> None:
        super().__init__()
        self.objects: set[str] = set()

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.objects.add(key)

    def delete(self, key: str) -> None:
        super().delete(key)
        self.objects.discard(key)


class UploadThenOutage:
    """Uploads one image per attempt; the store goes down for ``outage_s`` as the run ends (first attempt only)."""

    def __init__(self, store: BlinkingStore, storage: Storage, outage_s: float) -> None:
        self.store, self.storage, self.outage_s = store, storage, outage_s

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        key = f"{task.task_id}/{task.attempts}.png"
        self.storage.put(key, b"png", "image/png")
        if task.attempts == 1 and self.outage_s > 0:
            self.store.down = True
            threading.Timer(self.outage_s, lambda: setattr(self.store, "down", False)).start()
            report(Progress(1.0, 0))  # a progress write during the outage does not fail the task
        return [ImageRecord(key=key, image_type="png")]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BlinkingStore]:
    s = BlinkingStore(f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=2, max_attempts=3)
    yield s
    s.close()


def _add(store: SqlTaskStore) -> str:
    tid = uuid.uuid4().hex
    store.create(new_task(tid))
    return tid


def _record(store: SqlTaskStore, tid: str) -> TaskRecord:
    rec = store.get(tid)
    assert rec is not None
    return rec


def test_a_short_outage_delays_the_completion_and_loses_nothing(store: BlinkingStore) -> None:
    storage = Storage()
    tid = _add(store)
    ended: list[str] = []
    process_task(tid, store, UploadThenOutage(store, storage, outage_s=0.5), storage=storage,
                 on_terminal=lambda r: ended.append(r.task_id))  # fmt: skip
    rec = _record(store, tid)
    assert rec.status is TaskStatus.SUCCEED
    assert [i.key for i in rec.images] == [f"{tid}/1.png"]
    assert storage.objects == {f"{tid}/1.png"}
    assert storage.deleted == []
    assert ended == [tid]


def test_a_completion_committed_before_the_connection_dropped_keeps_its_images(store: BlinkingStore) -> None:
    storage = Storage()
    tid = _add(store)
    store.lose_commit = True
    process_task(tid, store, UploadThenOutage(store, storage, outage_s=0), storage=storage)
    rec = _record(store, tid)
    assert rec.status is TaskStatus.SUCCEED
    assert [i.key for i in rec.images] == [f"{tid}/1.png"]
    assert storage.deleted == []  # adopted: these are the task's images


def test_an_outage_longer_than_the_lease_leaves_no_orphan_and_the_next_attempt_succeeds(store: BlinkingStore) -> None:
    storage = Storage()
    tid = _add(store)
    runner = UploadThenOutage(store, storage, outage_s=1.6)  # more than 60 % of the 2 s lease
    process_task(tid, store, runner, storage=storage)
    assert storage.deleted == [f"{tid}/1.png"]  # the first attempt's image is not left behind
    assert _record(store, tid).status is TaskStatus.PROCESSING  # not FAILED by the outage
    store.clock = lambda: 10**10  # the lease ran out
    assert sweep_expired(store) == [tid]
    store.clock = time.time
    process_task(tid, store, runner, storage=storage)
    rec = _record(store, tid)
    assert rec.status is TaskStatus.SUCCEED
    assert [i.key for i in rec.images] == [f"{tid}/2.png"]
    assert storage.objects == {f"{tid}/2.png"}
