"""Worker, process_task and ProgressReporter against a real SQLite store with fake runners (no torch work)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update
from tests.support.requests import img2img, new_task
from tests.support.storage import RecordingStorage

from underpaint.config import Settings
from underpaint.db.schema import payloads_table, tasks_table
from underpaint.engine.job import JobCancelled, JobError, Progress
from underpaint.engine.prompts import PromptSyntaxError
from underpaint.storage.base import StorageError
from underpaint.storage.custom_target import InvalidCustomStorage
from underpaint.tasks.contract import Img2ImgRequest, TaskRequest
from underpaint.tasks.queue import LocalQueue
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import INTERNAL_REASON, ProgressReporter, Worker, process_task

SETTINGS = Settings(lease_seconds=60, max_attempts=3)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=60, max_attempts=3)
    yield s
    s.close()


def add(store: SqlTaskStore, task_id: str | None = None, **kw: Any) -> str:
    tid = task_id or uuid.uuid4().hex
    store.create(new_task(tid, request=img2img(prompt=f"prompt of {tid}"), **kw))
    return tid


class FnRunner:
    """Runs ``fn`` and records every call."""

    def __init__(self, fn: Callable[[TaskRecord, TaskRequest, ProgressReporter], list[ImageRecord]]) -> None:
        self.fn = fn
        self.calls: list[tuple[TaskRecord, TaskRequest]] = []

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        self.calls.append((task, request))
        return self.fn(task, request, report)


def images_for(task: TaskRecord) -> list[ImageRecord]:
    return [ImageRecord(key=f"{task.task_id}/{task.attempts}_0.png", image_type="png")]


def test_worker_runs_task_records_images_and_progress(store: SqlTaskStore) -> None:
    tid = add(store)
    seen_mid_run: list[TaskRecord | None] = []

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        assert isinstance(request, Img2ImgRequest)
        assert request.prompt == f"prompt of {tid}"
        report(Progress(30 / 100, 9))
        seen_mid_run.append(store.get(task.task_id))
        return images_for(task)

    terminal: list[TaskRecord] = []
    worker = Worker(store, FnRunner(fn), SETTINGS, worker_id="w", on_terminal=terminal.append)
    assert worker.run_once()
    assert not worker.run_once()
    mid = seen_mid_run[0]
    assert mid is not None
    assert mid.status is TaskStatus.PROCESSING
    assert (mid.progress_percent, mid.eta) == (30, 9)
    done = store.get(tid)
    assert done is not None
    assert done.status is TaskStatus.SUCCEED
    assert done.images == [ImageRecord(key=f"{tid}/1_0.png", image_type="png")]
    assert terminal == [done]


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (JobError("checkpoint 'x.safetensors' is not installed"), "checkpoint 'x.safetensors' is not installed"),
        (StorageError("bucket 'b' denied access"), "bucket 'b' denied access"),
        (PromptSyntaxError("invalid attention weight '1.2.3'"), "invalid attention weight '1.2.3'"),
        (InvalidCustomStorage("custom_storage.aws_s3 must be an object"), "custom_storage.aws_s3 must be an object"),
        (JobError(), "JobError"),
    ],
)
def test_user_errors_fail_with_their_message(store: SqlTaskStore, exc: Exception, reason: str) -> None:
    tid = add(store)

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        raise exc

    terminal: list[TaskRecord] = []
    Worker(store, FnRunner(fn), SETTINGS, on_terminal=terminal.append).run_once()
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.reason == reason
    assert [t.task_id for t in terminal] == [tid]


@pytest.mark.parametrize(
    "exc",
    [
        RuntimeError("CUDA error: an illegal memory access at /srv/secret/path"),
        ValueError("too many values to unpack (expected 2)"),  # a plain ValueError is a bug, not the client's fault
        KeyError("latents"),
    ],
)
def test_unexpected_errors_fail_with_a_generic_reason_and_their_traceback_is_logged(
    store: SqlTaskStore, caplog: pytest.LogCaptureFixture, exc: Exception
) -> None:
    tid = add(store)

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        raise exc

    with caplog.at_level(logging.ERROR, logger="underpaint.tasks"):
        Worker(store, FnRunner(fn), SETTINGS).run_once()
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.reason == INTERNAL_REASON
    assert str(exc) not in task.reason
    assert type(exc).__name__ not in task.reason
    (logged,) = [r for r in caplog.records if r.exc_info and tid in r.getMessage()]
    assert logged.exc_info is not None
    assert logged.exc_info[1] is exc


def test_a_stored_input_that_no_longer_loads_fails_with_the_generic_reason_and_a_logged_traceback(
    store: SqlTaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    tid = add(store)
    broken = {"task_type": "IMG_TO_IMG", "prompt": "p", "steps": "many"}  # pydantic's ValidationError, a ValueError
    with store.engine.begin() as conn:
        conn.execute(update(payloads_table).where(payloads_table.c.task_id == tid).values(payload=broken))
    runner = FnRunner(lambda task, request, report: images_for(task))
    terminal: list[TaskRecord] = []
    with caplog.at_level(logging.ERROR, logger="underpaint.tasks"):
        Worker(store, runner, SETTINGS, on_terminal=terminal.append).run_once()
    task = store.get(tid)
    assert task is not None
    assert (task.status, task.reason) == (TaskStatus.FAILED, INTERNAL_REASON)
    assert runner.calls == []
    assert [t.task_id for t in terminal] == [tid]
    (logged,) = [r for r in caplog.records if r.exc_info and tid in r.getMessage()]
    assert logged.exc_info is not None
    assert isinstance(logged.exc_info[1], ValueError)
    assert "steps" in str(logged.exc_info[1])  # the validation message (the server's internals) stays in the log


def test_cancelled_run_leaves_task_alone(store: SqlTaskStore) -> None:
    tid = add(store)

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        raise JobCancelled()

    terminal: list[TaskRecord] = []
    Worker(store, FnRunner(fn), SETTINGS, worker_id="w", on_terminal=terminal.append).run_once()
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.PROCESSING
    assert task.worker_id == "w"
    assert terminal == []


def test_failing_hook_never_fails_the_task(store: SqlTaskStore, caplog: pytest.LogCaptureFixture) -> None:
    tid = add(store)

    def hook(task: TaskRecord) -> None:
        raise OSError("webhook endpoint down")

    with caplog.at_level(logging.ERROR, logger="underpaint.tasks"):
        Worker(store, FnRunner(lambda t, p, r: images_for(t)), SETTINGS, on_terminal=hook).run_once()
    assert store.get(tid).status is TaskStatus.SUCCEED  # type: ignore[union-attr]
    assert any("on_terminal" in r.getMessage() for r in caplog.records)


def test_lost_lease_raises_on_next_report(store: SqlTaskStore) -> None:
    tid = add(store)
    after_report: list[bool] = []

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        # Another worker takes the task over (as after a lease expiry and redelivery).
        assert store.requeue_expired(now=time.time() + 3600) == [tid]
        assert store.claim(tid, "other") is not None
        report(Progress(50 / 100, 1))
        after_report.append(True)
        return images_for(task)

    terminal: list[TaskRecord] = []
    Worker(store, FnRunner(fn), SETTINGS, worker_id="w", on_terminal=terminal.append).run_once()
    assert after_report == []
    assert terminal == []
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.PROCESSING
    assert task.worker_id == "other"


def test_loser_discards_its_images(store: SqlTaskStore) -> None:
    tid = add(store)

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        store.requeue_expired(now=time.time() + 3600)
        winner = store.claim(tid, "winner")
        assert winner is not None
        assert store.complete(tid, "winner", images_for(winner))
        return images_for(task)  # finished too late, without reporting

    storage = RecordingStorage()
    terminal: list[TaskRecord] = []
    Worker(store, FnRunner(fn), SETTINGS, worker_id="w", on_terminal=terminal.append, storage=storage).run_once()
    assert storage.deleted == [f"{tid}/1_0.png"]  # the loser's own image only
    assert store.get(tid).images == [ImageRecord(key=f"{tid}/2_0.png", image_type="png")]  # type: ignore[union-attr]
    assert terminal == []


def test_lease_is_renewed_while_runner_is_silent(tmp_path: Path) -> None:
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'lease.db'}", lease_seconds=0.3, max_attempts=3)
    tid = add(store)
    swept: list[list[str]] = []

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        for _ in range(8):  # 1.2 s without a report: four leases long
            time.sleep(0.15)
            swept.append(store.requeue_expired())
        return images_for(task)

    Worker(store, FnRunner(fn), SETTINGS).run_once()
    assert len(swept) == 8
    assert all(s == [] for s in swept)
    assert store.get(tid).status is TaskStatus.SUCCEED  # type: ignore[union-attr]
    store.close()


def test_progress_reporter_throttles_but_writes_final(store: SqlTaskStore) -> None:
    tid = add(store)
    store.claim(tid, "w")
    now = [0.0]
    writes: list[tuple[int, int]] = []
    real = store.update_progress

    def spy(task_id: str, worker_id: str, progress_percent: int, eta: int) -> bool:
        writes.append((progress_percent, eta))
        return real(task_id, worker_id, progress_percent, eta)

    store.update_progress = spy  # type: ignore[method-assign]
    report = ProgressReporter(store, tid, "w", min_interval=0.25, clock=lambda: now[0])
    for t, pct in [(0.0, 10), (0.1, 20), (0.2, 30), (0.3, 40), (0.35, 50), (0.4, 100)]:
        now[0] = t
        report(Progress(pct / 100, 5))
    assert writes == [(10, 5), (40, 5), (100, 5)]
    assert store.get(tid).progress_percent == 100  # type: ignore[union-attr]
    assert not report.should_cancel()


def test_process_task_runs_exactly_the_named_task_once(store: SqlTaskStore) -> None:
    first = add(store, priority=10)
    named = add(store)
    runner = FnRunner(lambda t, p, r: images_for(t))
    done = process_task(named, store, runner, worker_id="celery-1")
    assert done is not None
    assert done.task_id == named
    assert done.status is TaskStatus.SUCCEED
    assert process_task(named, store, runner) is None  # redelivery after completion
    assert process_task("unknown", store, runner) is None
    assert [c[0].task_id for c in runner.calls] == [named]
    assert store.get(first).status is TaskStatus.QUEUED  # type: ignore[union-attr]


def test_process_task_ignores_delivery_while_another_worker_holds_it(store: SqlTaskStore) -> None:
    tid = add(store)
    store.claim(tid, "busy")
    runner = FnRunner(lambda t, p, r: images_for(t))
    assert process_task(tid, store, runner) is None
    assert runner.calls == []


def test_missing_payload_fails_with_reason(store: SqlTaskStore) -> None:
    tid = add(store)
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM task_payloads")
    runner = FnRunner(lambda t, p, r: images_for(t))
    Worker(store, runner, SETTINGS).run_once()
    task = store.get(tid)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert "input is no longer available" in task.reason
    assert runner.calls == []


def test_background_worker_serves_by_priority_and_stops(store: SqlTaskStore) -> None:
    queue = LocalQueue()
    order: list[str] = []
    low = add(store, priority=0)
    high = add(store, priority=5, lane="enterprise")

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        order.append(task.task_id)
        return images_for(task)

    worker = Worker(store, FnRunner(fn), SETTINGS, queue=queue, poll_interval=30.0)
    worker.start()
    try:
        _wait_for(lambda: order == [high, low])
        late = add(store)
        queue.enqueue(late, "default")  # wakes the worker long before its 30 s poll
        _wait_for(lambda: store.get(late).status is TaskStatus.SUCCEED)  # type: ignore[union-attr]
    finally:
        assert worker.stop(timeout=10)
    assert not worker.running


def test_embedded_worker_takes_a_task_it_was_never_told_about(store: SqlTaskStore) -> None:
    """The embedded queue is only a wake-up: a task written with no signal (its announce lost, or written by
    another process) is claimed from the store within ``poll_interval``."""
    ran: list[str] = []

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        ran.append(task.task_id)
        return images_for(task)

    worker = Worker(store, FnRunner(fn), SETTINGS, queue=LocalQueue(), poll_interval=0.2)
    worker.start()
    try:
        unannounced = add(store)  # no queue.enqueue
        _wait_for(lambda: store.get(unannounced).status is TaskStatus.SUCCEED)  # type: ignore[union-attr]
    finally:
        assert worker.stop(timeout=10)
    assert ran == [unannounced]


def test_worker_sweep_fails_exhausted_tasks_and_notifies(tmp_path: Path) -> None:
    now = [1000.0]
    store = SqlTaskStore(f"sqlite:///{tmp_path / 's.db'}", lease_seconds=10, max_attempts=1, clock=lambda: now[0])
    tid = add(store)
    store.claim(tid, "dead")
    now[0] += 11
    terminal: list[TaskRecord] = []
    worker = Worker(store, FnRunner(lambda t, p, r: []), SETTINGS, on_terminal=terminal.append)
    assert worker.sweep() == [tid]
    assert [t.status for t in terminal] == [TaskStatus.FAILED]
    assert "worker crashed repeatedly (1 attempts)" in terminal[0].reason
    store.close()


def _wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


class PrefetchingRunner(FnRunner):
    """Records what the worker says the queue needs next, and what was queued when each task ran."""

    def __init__(self) -> None:
        super().__init__(lambda t, p, r: images_for(t))
        self.hints: list[list[str]] = []

    def prefetch(self, checkpoints: Sequence[str]) -> None:
        self.hints.append(list(checkpoints))


def test_worker_tells_the_runner_the_next_queued_checkpoint(store: SqlTaskStore) -> None:
    def add_for(checkpoint: str) -> str:
        tid = uuid.uuid4().hex
        store.create(new_task(tid, request=img2img(model_name=checkpoint)))
        return tid

    for checkpoint in ("a.safetensors", "a.safetensors", "b.safetensors", "a.safetensors"):
        add_for(checkpoint)
    runner = PrefetchingRunner()
    worker = Worker(store, runner, SETTINGS.with_overrides(max_batch=1, max_affinity_wait_s=0.0))
    while worker.run_once():
        pass
    # While the first "a" runs, the next "a" needs nothing new: the hint is the first other model, "b"; while "b"
    # runs, the last "a"; nothing is left to read ahead while the last task runs.
    assert runner.hints == [["b.safetensors"], ["b.safetensors"], ["a.safetensors"]]
    assert [r.model_name for _, r in runner.calls] == ["a.safetensors"] * 2 + ["b.safetensors", "a.safetensors"]


def test_one_info_line_per_finished_task(store: SqlTaskStore, caplog: pytest.LogCaptureFixture) -> None:
    """What an operator reads: the task id, its type, how it ended, its images, run and queue seconds."""
    ok, bad = add(store, priority=1), add(store)
    now = time.time()
    with store.engine.begin() as conn:  # both queued 30 s ago
        conn.execute(update(tasks_table).values(created_at=now - 30))

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        if task.task_id == bad:
            raise JobError("checkpoint 'x' is not installed")
        time.sleep(0.2)
        return [*images_for(task), ImageRecord(key=f"{task.task_id}/b.png", image_type="png")]

    with caplog.at_level(logging.INFO, logger="underpaint.tasks"):
        worker = Worker(store, FnRunner(fn), SETTINGS)
        while worker.run_once():
            pass
    finished = {r.task_id: r for r in caplog.records if "finished" in r.getMessage()}  # type: ignore[attr-defined]
    assert set(finished) == {ok, bad}
    line = finished[ok].getMessage()
    assert line.startswith(f"task {ok} finished: IMG_TO_IMG SUCCEED, 2 image(s), ")
    run_s, queued_s = finished[ok].run_seconds, finished[ok].queue_seconds  # type: ignore[attr-defined]
    assert 0.2 <= run_s < 10
    assert 30 <= queued_s < 40
    assert finished[bad].getMessage().startswith(f"task {bad} finished: IMG_TO_IMG FAILED, 0 image(s), ")
    assert finished[bad].getMessage().endswith(" s queued: checkpoint 'x' is not installed")  # the owner's reason
    assert finished[ok].levelno == finished[bad].levelno == logging.INFO
    for task_id in (ok, bad):  # the one line per task once it ran: nothing else at INFO names it as it ends
        ending = [r for r in caplog.records if task_id in r.getMessage() and "attempt" not in r.getMessage()]
        assert ending == [finished[task_id]], [r.getMessage() for r in ending]


def test_cancelled_tasks_and_inputs_that_do_not_load_get_their_finished_line(
    store: SqlTaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Every way a claimed task ends gets the one INFO line: a run its owner cancelled (CANCELED, stored FAILED),
    a stored input that no longer loads, and one that is gone (FAILED, before anything ran)."""
    cancelled, broken, gone = add(store), add(store), add(store)
    with store.engine.begin() as conn:
        conn.execute(update(tasks_table).values(created_at=time.time() - 30))  # all queued 30 s ago
        conn.execute(
            update(payloads_table).where(payloads_table.c.task_id == broken).values(payload={"task_type": "x"})
        )
        conn.execute(payloads_table.delete().where(payloads_table.c.task_id == gone))

    def fn(task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        store.request_cancel(task.task_id, task.owner)
        time.sleep(0.1)
        raise JobCancelled("sampling cancelled")

    runner = FnRunner(fn)
    with caplog.at_level(logging.INFO, logger="underpaint.tasks"):
        worker = Worker(store, runner, SETTINGS)
        while worker.run_once():
            pass
    assert [t.task_id for t, _ in runner.calls] == [cancelled]
    lines = [r for r in caplog.records if " finished: " in r.getMessage()]
    finished = {r.task_id: r for r in lines}  # type: ignore[attr-defined]
    assert len(lines) == len(finished) == 3
    assert {tid: (r.outcome, r.images, r.levelno) for tid, r in finished.items()} == {  # type: ignore[attr-defined]
        cancelled: ("CANCELED", 0, logging.INFO), broken: ("FAILED", 0, logging.INFO), gone: ("FAILED", 0, logging.INFO)
    }  # fmt: skip
    assert finished[cancelled].getMessage().startswith(f"task {cancelled} finished: IMG_TO_IMG CANCELED, 0 image(s), ")
    assert finished[broken].getMessage().startswith(f"task {broken} finished: IMG_TO_IMG FAILED, 0 image(s), ")
    assert 0.1 <= finished[cancelled].run_seconds < 10  # type: ignore[attr-defined]
    assert all(30 <= r.queue_seconds < 40 for r in lines)  # type: ignore[attr-defined]
    for tid in (cancelled, broken, gone):
        task = store.get(tid)
        assert task is not None
        assert task.status is TaskStatus.FAILED
