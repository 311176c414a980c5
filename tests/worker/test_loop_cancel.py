"""Cancelling a running task in the embedded worker: the run stops within one sampler step, ends FAILED with
``cancelled by the client``, keeps no images and announces itself once. Real SQLite store, fake runners that
step like a sampler (``should_cancel`` before every model call)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.support.requests import img2img, new_task
from tests.support.storage import RecordingStorage

from underpaint.config import Settings
from underpaint.engine.job import JobCancelled, Progress
from underpaint.tasks.contract import TaskRequest
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import CANCELLED_REASON, CancelOutcome, ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import BatchPolicy, ProgressReporter, Worker

POLL = 0.02  # the worker reads the cancel flag this often
STEP = 0.25  # one fake sampler step: much longer than the poll, so "within one step" is measurable
SETTINGS = Settings(lease_seconds=60, cancel_poll_seconds=POLL)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=60)
    yield s
    s.close()


def add(store: SqlTaskStore) -> str:
    tid = uuid.uuid4().hex
    store.create(new_task(tid))
    return tid


class SteppingRunner:
    """A sampler loop: ``should_cancel`` is checked before each model call, as ``guard_cancel`` does."""

    def __init__(self, steps: int = 40) -> None:
        self.steps = steps
        self.started: list[float] = []  # when each model call began
        self.running = threading.Event()

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        for i in range(self.steps):
            if report.should_cancel():
                raise JobCancelled("sampling cancelled")
            self.started.append(time.monotonic())
            self.running.set()
            time.sleep(STEP)
            report(Progress(fraction=(i + 1) / self.steps, eta_seconds=1.0))
        return [ImageRecord(key=f"{task.task_id}/0.png", image_type="png")]


def test_running_task_stops_within_one_step(store: SqlTaskStore) -> None:
    tid = add(store)
    runner = SteppingRunner()
    terminal: list[TaskRecord] = []
    worker = Worker(store, runner, SETTINGS, worker_id="w", on_terminal=terminal.append)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert runner.running.wait(10)
    time.sleep(STEP * 2.5)  # mid-way through the third step
    asked = time.monotonic()
    assert store.request_cancel(tid, "o") is CancelOutcome.REQUESTED
    thread.join(10)
    assert not thread.is_alive()
    # The step in progress when the request came finishes; no other starts after the worker saw the flag.
    after = [t for t in runner.started if t > asked]
    assert len(after) <= 1, f"{len(after)} model calls after the cancel request"
    assert len(runner.started) < runner.steps
    task = store.get(tid)
    assert task is not None
    assert (task.status, task.reason) == (TaskStatus.FAILED, CANCELLED_REASON)
    assert task.progress_percent < 100
    assert [t.task_id for t in terminal] == [tid]  # announced (webhook) exactly once


def test_cancel_after_the_last_step_still_wins(store: SqlTaskStore) -> None:
    """The flag arrives while the images are being encoded/stored: the result is discarded, not recorded."""
    tid = add(store)
    storage = RecordingStorage()

    class LateCancel:
        def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
            store.request_cancel(task.task_id, "o")
            return [ImageRecord(key=f"{task.task_id}/0.png", image_type="png")]

    terminal: list[TaskRecord] = []
    Worker(store, LateCancel(), SETTINGS, on_terminal=terminal.append, storage=storage).run_once()
    task = store.get(tid)
    assert task is not None
    assert (task.status, task.reason, task.images) == (TaskStatus.FAILED, CANCELLED_REASON, [])
    assert storage.deleted == [f"{tid}/0.png"]
    assert [t.task_id for t in terminal] == [tid]


def test_cancelled_queued_task_never_reaches_the_runner(store: SqlTaskStore) -> None:
    first, second = add(store), add(store)
    assert store.request_cancel(first, "o") is CancelOutcome.CANCELLED
    ran: list[str] = []

    class Record:
        def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
            ran.append(task.task_id)
            return []

    worker = Worker(store, Record(), SETTINGS)
    while worker.run_once():
        pass
    assert ran == [second]


def test_other_tasks_are_not_cancelled(store: SqlTaskStore) -> None:
    """Cancellation is per task: the flag of one task never stops another's run."""
    victim, other = add(store), add(store)
    store.claim(victim, "elsewhere")
    store.request_cancel(victim, "o")
    runner = SteppingRunner(steps=3)
    Worker(store, runner, SETTINGS).run_once()
    done = store.get(other)
    assert done is not None
    assert done.status is TaskStatus.SUCCEED
    assert len(runner.started) == 3


class SteppingBatchRunner:
    """One sampler loop for a whole batch, as the executor runs it: before each model call every member still
    running is asked ``should_cancel``; a member that says yes drops out, the others go on."""

    def __init__(self, steps: int = 12) -> None:
        self.steps = steps
        self.batches: list[list[str]] = []
        self.running = threading.Event()

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        raise AssertionError("compatible tasks must run as one batch")

    def run_batch(
        self, items: list[tuple[TaskRecord, TaskRequest, ProgressReporter]]
    ) -> list[list[ImageRecord] | BaseException]:
        self.batches.append([task.task_id for task, _, _ in items])
        outcomes: list[list[ImageRecord] | BaseException | None] = [None] * len(items)
        for i in range(self.steps):
            for k, (_, _, report) in enumerate(items):
                if outcomes[k] is None and report.should_cancel():
                    outcomes[k] = JobCancelled("sampling cancelled")
            self.running.set()
            time.sleep(STEP)
            for k, (_, _, report) in enumerate(items):
                if outcomes[k] is None:
                    try:  # as the pipeline does: a member whose report raises (cancelled, lease lost) stops alone
                        report(Progress(fraction=(i + 1) / self.steps, eta_seconds=1.0))
                    except JobCancelled as exc:
                        outcomes[k] = exc
        return [
            o if o is not None else [ImageRecord(key=f"{task.task_id}/0.png", image_type="png")]
            for o, (task, _, _) in zip(outcomes, items, strict=True)
        ]


def test_a_batched_task_is_cancelled_alone(store: SqlTaskStore) -> None:
    request = img2img(width=128, height=128, steps=12)
    ids = [uuid.uuid4().hex for _ in range(2)]
    for tid in ids:
        store.create(new_task(tid, request=request))
    runner = SteppingBatchRunner()
    terminal: list[TaskRecord] = []
    policy = BatchPolicy(max_batch=4, window_s=0.0, max_affinity_wait_s=0.0)
    worker = Worker(store, runner, SETTINGS, worker_id="w", on_terminal=terminal.append, policy=policy)
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    assert runner.running.wait(10)
    time.sleep(STEP * 2.5)
    cancelled, mate = ids
    assert store.request_cancel(cancelled, "o") is CancelOutcome.REQUESTED
    thread.join(30)
    assert not thread.is_alive()
    assert runner.batches == [ids]  # one sampler call for both
    gone, kept = store.get(cancelled), store.get(mate)
    assert gone is not None
    assert kept is not None
    assert (gone.status, gone.reason) == (TaskStatus.FAILED, CANCELLED_REASON)
    assert gone.images == []
    assert kept.status is TaskStatus.SUCCEED
    assert kept.images == [ImageRecord(key=f"{mate}/0.png", image_type="png")]
    assert sorted(t.task_id for t in terminal) == sorted(ids)  # each announced once
