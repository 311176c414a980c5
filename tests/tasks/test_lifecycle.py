"""Crash recovery, restarts and retention, on real SQLite files; one test SIGKILLs a worker process mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.requests import new_task
from tests.support.storage import RecordingStorage

import underpaint
from underpaint.config import Settings
from underpaint.tasks.contract import TaskRequest
from underpaint.tasks.lifecycle import RetentionSweeper, delete_images, recover_on_start
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import ProgressReporter, Worker

SRC_DIR = Path(underpaint.__file__).resolve().parents[1]


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tasks.db'}"


@pytest.fixture
def store(db_url: str) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(db_url, lease_seconds=600, max_attempts=2)
    yield s
    s.close()


def add(store: SqlTaskStore, task_id: str | None = None) -> str:
    tid = task_id or uuid.uuid4().hex
    store.create(new_task(tid))
    return tid


class OkRunner:
    def __init__(self) -> None:
        self.ran: list[str] = []

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        self.ran.append(task.task_id)
        return [ImageRecord(key=f"{task.task_id}/{task.attempts}_0.png", image_type="png")]


def test_recover_on_start_requeues_interrupted_tasks(store: SqlTaskStore) -> None:
    tid = add(store)
    queued = add(store)
    assert store.claim(tid, "killed-process") is not None  # lease still far from expiry
    assert recover_on_start(store) == [tid]
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.QUEUED
    assert task.attempts == 1
    assert store.get(queued).status is TaskStatus.QUEUED  # type: ignore[union-attr]
    assert recover_on_start(store) == []


def test_recovered_tasks_are_announced_to_the_queue(store: SqlTaskStore) -> None:
    class RecordingQueue:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str]] = []

        def enqueue(self, task_id: str, lane: str) -> None:
            self.sent.append((task_id, lane))

    tid = add(store)
    store.claim(tid, "killed")
    queue = RecordingQueue()
    assert recover_on_start(store, queue=queue) == [tid]
    assert queue.sent == [(tid, "default")]  # a broker lost its message for it: send a new one


def test_recover_on_start_fails_tasks_that_used_their_attempts(store: SqlTaskStore) -> None:
    tid = add(store)
    terminal: list[TaskRecord] = []
    assert store.claim(None, "killed") is not None
    assert recover_on_start(store, on_terminal=terminal.append) == [tid]
    assert terminal == []  # requeued, not ended
    assert store.claim(None, "killed-again") is not None  # max_attempts=2: the second run is killed too
    assert recover_on_start(store, on_terminal=terminal.append) == [tid]
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.reason.startswith("worker crashed repeatedly (2 attempts)")
    assert terminal == [task]


def test_restart_runs_tasks_queued_before_it(db_url: str) -> None:
    before = SqlTaskStore(db_url)
    ids = [add(before) for _ in range(3)]
    before.close()  # the process that accepted them is gone; nothing was in memory

    after = SqlTaskStore(db_url)
    runner = OkRunner()
    worker = Worker(after, runner, Settings())
    while worker.run_once():
        pass
    assert runner.ran == ids
    assert all(after.get(t).status is TaskStatus.SUCCEED for t in ids)  # type: ignore[union-attr]
    after.close()


CRASHING_WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from underpaint.config import Settings
    from underpaint.tasks.store import SqlTaskStore
    from underpaint.engine.job import Progress
    from underpaint.worker.loop import Worker

    url, marker = sys.argv[1], Path(sys.argv[2])

    class SlowRunner:
        def run(self, task, payload, report):
            report(Progress(10 / 100, 60))
            marker.write_text(task.task_id)
            time.sleep(120)  # killed long before this ends
            raise AssertionError("not killed")

    store = SqlTaskStore(url, lease_seconds=600, max_attempts=3)
    Worker(store, SlowRunner(), Settings(), worker_id="doomed").run_once()
    """
)


def test_killed_worker_process_task_runs_again_after_restart(db_url: str, tmp_path: Path) -> None:
    store = SqlTaskStore(db_url, lease_seconds=600, max_attempts=3)
    tid = add(store)
    script = tmp_path / "crashing_worker.py"
    script.write_text(CRASHING_WORKER)
    marker = tmp_path / "started"
    env = {**os.environ, "PYTHONPATH": str(SRC_DIR)}
    proc = subprocess.Popen([sys.executable, str(script), db_url, str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "worker process exited early"
            assert time.monotonic() < deadline, "worker never started the task"
            time.sleep(0.05)
        running = store.get(tid)
        assert running is not None
        assert running.status is TaskStatus.PROCESSING
        assert running.worker_id == "doomed"
        assert running.progress_percent == 10
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    store.close()

    restarted = SqlTaskStore(db_url, lease_seconds=600, max_attempts=3)
    assert recover_on_start(restarted) == [tid]
    runner = OkRunner()
    assert Worker(restarted, runner, Settings()).run_once()
    done = restarted.get(tid)
    assert done is not None
    assert done.status is TaskStatus.SUCCEED
    assert done.attempts == 2
    assert done.images == [ImageRecord(key=f"{tid}/2_0.png", image_type="png")]
    assert runner.ran == [tid]
    restarted.close()


def test_retention_purges_old_tasks_and_their_own_images(db_url: str) -> None:
    now = [10_000.0]
    store = SqlTaskStore(db_url, clock=lambda: now[0])
    old_ok, old_failed, old_queued = add(store), add(store), add(store)
    store.claim(old_ok, "w")
    store.complete(
        old_ok,
        "w",
        [
            ImageRecord(key="a/local.png", image_type="png"),
            ImageRecord(key="a/broken.png", image_type="png"),
            ImageRecord(key="user/x.png", image_type="png", backend="custom", location={"bucket": "theirs"}),
            ImageRecord(key="a/s3.png", image_type="png", backend="s3"),
        ],
    )
    store.fail(old_failed, None, "x")
    now[0] += 3600
    recent = add(store)
    store.claim(recent, "w")
    store.complete(recent, "w", [ImageRecord(key="b/recent.png", image_type="png")])

    storage = RecordingStorage("local", broken={"a/broken.png"})
    sweeper = RetentionSweeper(store, storage, retention_seconds=1800, clock=lambda: now[0], batch=1)
    assert sweeper.run_once() == 2
    assert storage.deleted == ["a/local.png"]  # never the user's bucket, nor another backend's key
    assert store.get(old_ok) is None
    assert store.get(old_failed) is None
    assert store.get(old_queued) is not None
    assert store.get(recent) is not None
    assert sweeper.run_once() == 0
    store.close()


def test_delete_images_in_s3_storage() -> None:
    storage = RecordingStorage("s3")
    images = [
        ImageRecord(key="k1", image_type="png", backend="s3"),
        ImageRecord(key="k2", image_type="png", backend="custom"),
        ImageRecord(key="k3", image_type="png", backend="local"),
    ]
    assert delete_images(storage, images) == 1
    assert storage.deleted == ["k1"]


def test_retention_sweeper_thread(db_url: str) -> None:
    store = SqlTaskStore(db_url)
    tid = add(store)
    store.fail(tid, None, "x")
    sweeper = RetentionSweeper(store, RecordingStorage(), retention_seconds=0, interval=0.05)
    sweeper.start()
    try:
        deadline = time.monotonic() + 10
        while store.get(tid) is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        sweeper.stop()
    store.close()
    with pytest.raises(ValueError, match="retention_seconds must not be negative"):
        RetentionSweeper(store, RecordingStorage(), retention_seconds=-1)


def test_retention_also_purges_attached_records(tmp_path: Path) -> None:
    cutoffs: list[float] = []
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'r.db'}")

    def purge(cutoff: float) -> int:
        cutoffs.append(cutoff)
        return 0

    sweeper = RetentionSweeper(store, RecordingStorage(), 100, clock=lambda: 1000.0, also_purge=[purge])
    sweeper.run_once()
    assert cutoffs == [900.0]
