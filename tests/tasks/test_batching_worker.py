"""Cross-request batching and model-aware claiming in the worker, against a real SQLite store (no torch work)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.support.clock import Clock
from tests.support.requests import img2img, new_task

from underpaint.config import Settings
from underpaint.engine.job import JobCancelled, JobError, Progress
from underpaint.tasks.batching import model_key
from underpaint.tasks.contract import Img2ImgRequest, TaskRequest
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import BatchPolicy, Claimer, ProgressReporter, Worker, process_task

SETTINGS = Settings(lease_seconds=60, max_attempts=3)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", lease_seconds=60, max_attempts=3, clock=clock)
    yield s
    s.close()


def payload(model: str = "a.safetensors", **kw: Any) -> Img2ImgRequest:
    return img2img(model_name=model, **kw)


def add(store: SqlTaskStore, clock: Clock | None = None, lane: str = "sd15", **kw: Any) -> str:
    tid = uuid.uuid4().hex
    store.create(new_task(tid, request=payload(**kw), lane=lane))
    if clock is not None:
        clock.now += 0.001  # distinct creation times: claim order is by age
    return tid


def images_for(task: TaskRecord) -> list[ImageRecord]:
    return [ImageRecord(key=f"{task.task_id}/{task.attempts}_0.png", image_type="png")]


Outcome = list[ImageRecord] | BaseException


class BatchRunner:
    """Records each call's task ids; ``fail``/``cancel`` name tasks that end that way."""

    def __init__(self, fail: Sequence[str] = (), cancel: Sequence[str] = ()) -> None:
        self.batches: list[list[str]] = []
        self.fail = set(fail)
        self.cancel = set(cancel)

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        outcome = self.run_batch([(task, request, report)])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def run_batch(self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]) -> list[Outcome]:
        self.batches.append([t.task_id for t, _, _ in items])
        out: list[Outcome] = []
        for i, (task, _, report) in enumerate(items):
            report(Progress(0.1 * (i + 1), i))  # each task's own progress
            if task.task_id in self.fail:
                out.append(JobError(f"bad input image in {task.task_id}"))
            elif task.task_id in self.cancel:
                out.append(JobCancelled())
            else:
                out.append(images_for(task))
        return out


def status(store: SqlTaskStore, tid: str) -> TaskStatus:
    record = store.get(tid)
    assert record is not None
    return record.status


# -- store ------------------------------------------------------------------------------------------------------


def test_claim_batch_takes_queued_mates_only_within_lanes(store: SqlTaskStore, clock: Clock) -> None:
    lead = add(store, clock)
    mates = [add(store, clock) for _ in range(3)]
    other_lane = add(store, clock, lane="enterprise.acme")
    other_key = add(store, clock, steps=30)
    task = store.claim(None, "w1", ("sd15",))
    assert task is not None
    assert task.task_id == lead
    assert task.batch_key is not None
    got = store.claim_batch(task.batch_key, "w1", 2, ("sd15",))
    assert [t.task_id for t in got] == mates[:2]
    assert all(t.status is TaskStatus.PROCESSING and t.worker_id == "w1" for t in got)
    # Another worker gets what is left, never what w1 holds.
    rest = store.claim_batch(task.batch_key, "w2", 10, ("sd15",))
    assert [t.task_id for t in rest] == [mates[2]]
    assert store.claim_batch(task.batch_key, "w2", 10, ("sd15",)) == []
    assert status(store, other_lane) is TaskStatus.QUEUED
    assert status(store, other_key) is TaskStatus.QUEUED
    # Without a lane filter (the embedded worker) the other lane's compatible task is a mate too.
    assert [t.task_id for t in store.claim_batch(task.batch_key, "w2", 10, None)] == [other_lane]


def test_affinity_prefers_the_loaded_model_until_a_task_waited_too_long(store: SqlTaskStore, clock: Clock) -> None:
    old_b = add(store, clock, model="b.safetensors")
    a1 = add(store, clock)
    prefer = model_key(payload())
    got = store.claim(None, "w", prefer_model=prefer, max_wait_s=10)
    assert got is not None
    assert got.task_id == a1
    clock.now += 11  # old_b has now waited longer than 10 s
    a2 = add(store, clock)
    got = store.claim(None, "w", prefer_model=prefer, max_wait_s=10)
    assert got is not None
    assert got.task_id == old_b
    got = store.claim(None, "w", prefer_model=prefer, max_wait_s=10)
    assert got is not None
    assert got.task_id == a2


def test_an_overdue_backlog_is_drained_model_by_model(store: SqlTaskStore, clock: Clock) -> None:
    """Everything waited too long (a burst bigger than the bound): the loaded model's overdue tasks go first, then
    the other model's, oldest first, instead of alternating A, B, A, B (one checkpoint load per task)."""
    ids = [add(store, clock, model=m) for m in ("a.safetensors", "b.safetensors") * 3]
    clock.now += 100
    prefer = model_key(payload(model="b.safetensors"))
    order = []
    for _ in ids:
        got = store.claim(None, "w", prefer_model=prefer, max_wait_s=10)
        assert got is not None
        order.append(got.task_id)
        assert got.model_key is not None
        prefer = got.model_key
    assert order == [ids[1], ids[3], ids[5], ids[0], ids[2], ids[4]]


# -- the embedded worker ----------------------------------------------------------------------------------------


def worker(store: SqlTaskStore, runner: Any, max_batch: int = 4, affinity: float = 30.0, **kw: Any) -> Worker:
    policy = BatchPolicy(max_batch=max_batch, window_s=0.0, max_affinity_wait_s=affinity)
    return Worker(store, runner, SETTINGS, worker_id="w", policy=policy, **kw)


def test_worker_runs_compatible_tasks_as_one_batch(store: SqlTaskStore, clock: Clock) -> None:
    c = [add(store, clock) for _ in range(2)]
    x = add(store, clock, steps=30)
    c += [add(store, clock) for _ in range(3)]
    runner = BatchRunner()
    terminal: list[str] = []
    w = worker(store, runner, on_terminal=lambda r: terminal.append(r.task_id))
    while w.run_once():
        pass
    assert runner.batches == [c[:4], [x], [c[4]]]
    for tid in [*c, x]:
        record = store.get(tid)
        assert record is not None
        assert record.status is TaskStatus.SUCCEED
        assert record.images == [ImageRecord(key=f"{tid}/1_0.png", image_type="png")]  # its own images
    assert sorted(terminal) == sorted([*c, x])  # one webhook per task


def test_max_batch_one_runs_tasks_alone(store: SqlTaskStore, clock: Clock) -> None:
    ids = [add(store, clock) for _ in range(3)]
    runner = BatchRunner()
    w = worker(store, runner, max_batch=1)
    while w.run_once():
        pass
    assert runner.batches == [[i] for i in ids]


def test_one_failing_task_never_fails_its_batch_mates(store: SqlTaskStore, clock: Clock) -> None:
    ids = [add(store, clock) for _ in range(4)]
    runner = BatchRunner(fail=[ids[1]], cancel=[ids[3]])
    w = worker(store, runner)
    assert w.run_once()
    assert runner.batches == [ids]
    bad = store.get(ids[1])
    assert bad is not None
    assert bad.status is TaskStatus.FAILED
    assert "bad input image" in bad.reason
    assert status(store, ids[0]) is TaskStatus.SUCCEED
    assert status(store, ids[2]) is TaskStatus.SUCCEED
    # A task that was abandoned (cancelled, lease lost) records nothing: its lease decides what happens next.
    assert status(store, ids[3]) is TaskStatus.PROCESSING


def test_each_task_of_a_batch_reports_its_own_progress(store: SqlTaskStore, clock: Clock) -> None:
    ids = [add(store, clock) for _ in range(3)]
    seen: dict[str, tuple[int, int]] = {}

    class Peek(BatchRunner):
        def run_batch(self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]) -> list[Outcome]:
            for i, (_, _, report) in enumerate(items):
                report(Progress((20 + i) / 100, 5 - i))
            for tid in ids:
                r = store.get(tid)
                assert r is not None
                seen[tid] = (r.progress_percent, r.eta)
            return [images_for(t) for t, _, _ in items]

    worker(store, Peek()).run_once()
    assert seen == {ids[0]: (20, 5), ids[1]: (21, 4), ids[2]: (22, 3)}


def test_a_task_whose_lease_was_lost_is_discarded_alone(store: SqlTaskStore, clock: Clock) -> None:
    ids = [add(store, clock) for _ in range(3)]

    class Steal(BatchRunner):
        def run_batch(self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]) -> list[Outcome]:
            # Another worker takes ids[1] over (its lease expired there): it must not be completed here.
            with store._write.begin() as conn:
                from sqlalchemy import update

                from underpaint.db.schema import tasks_table

                conn.execute(update(tasks_table).where(tasks_table.c.task_id == ids[1]).values(worker_id="other"))
            return [images_for(t) for t, _, _ in items]

    worker(store, Steal()).run_once()
    assert status(store, ids[0]) is TaskStatus.SUCCEED
    assert status(store, ids[2]) is TaskStatus.SUCCEED
    stolen = store.get(ids[1])
    assert stolen is not None
    assert stolen.status is TaskStatus.PROCESSING
    assert stolen.worker_id == "other"


def test_a_runner_without_run_batch_runs_the_batch_one_by_one(store: SqlTaskStore, clock: Clock) -> None:
    ids = [add(store, clock) for _ in range(3)]
    calls: list[str] = []

    class Solo:
        def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
            calls.append(task.task_id)
            if task.task_id == ids[0]:
                raise JobError("nope")
            return images_for(task)

    worker(store, Solo()).run_once()
    assert calls == ids
    assert [status(store, i) for i in ids] == [TaskStatus.FAILED, TaskStatus.SUCCEED, TaskStatus.SUCCEED]


def test_affinity_never_starves_a_task_for_another_model(store: SqlTaskStore, clock: Clock) -> None:
    """A steady stream of tasks for the loaded model: the other model's task still runs once it has waited
    ``max_affinity_wait_s``, and not before."""
    runner = BatchRunner()
    w = worker(store, runner, max_batch=1, affinity=5.0)
    add(store, clock)
    assert w.run_once()  # model a is loaded now
    b = add(store, clock, model="b.safetensors")
    waited_until = None
    for _ in range(20):
        add(store, clock)
        clock.now += 1.0  # each task takes a second
        w.run_once()
        if status(store, b) is TaskStatus.SUCCEED:
            record = store.get(b)
            assert record is not None
            assert record.started_at is not None
            waited_until = record.started_at - record.created_at
            break
    assert waited_until is not None, "the other model's task starved"
    assert 5.0 < waited_until <= 6.1


def test_without_affinity_the_order_is_plain_age(store: SqlTaskStore, clock: Clock) -> None:
    ids = [add(store, clock, model=m) for m in ("a.safetensors", "b.safetensors", "a.safetensors", "b.safetensors")]
    runner = BatchRunner()
    w = worker(store, runner, max_batch=1, affinity=0.0)
    while w.run_once():
        pass
    assert runner.batches == [[i] for i in ids]
    runner = BatchRunner()
    ids = [add(store, clock, model=m) for m in ("a.safetensors", "b.safetensors", "a.safetensors", "b.safetensors")]
    w = worker(store, runner, max_batch=1, affinity=30.0)
    while w.run_once():
        pass
    assert runner.batches == [[ids[0]], [ids[2]], [ids[1]], [ids[3]]]


# -- process_task (the Celery entry point) ----------------------------------------------------------------------


def claimer(store: SqlTaskStore, wid: str, max_batch: int = 4, affinity: float = 30.0) -> Claimer:
    return Claimer(store, wid, BatchPolicy(max_batch=max_batch, max_affinity_wait_s=affinity), ("sd15",))


def test_process_task_runs_the_delivered_task_with_its_mates_and_later_messages_are_no_ops(
    store: SqlTaskStore, clock: Clock
) -> None:
    ids = [add(store, clock) for _ in range(3)]
    runner = BatchRunner()
    cl = claimer(store, "w1")
    record = process_task(ids[1], store, runner, claimer=cl)
    assert record is not None
    assert record.status is TaskStatus.SUCCEED
    assert runner.batches == [[ids[1], ids[0], ids[2]]]  # the delivered task leads; mates by age
    for tid in (ids[0], ids[2]):  # their messages arrive later, here or at another worker
        assert process_task(tid, store, runner, claimer=cl) is None
        assert process_task(tid, store, runner, claimer=claimer(store, "w2")) is None
    assert runner.batches == [[ids[1], ids[0], ids[2]]]


def test_two_workers_with_different_models_loaded_each_take_their_own_first(store: SqlTaskStore, clock: Clock) -> None:
    """Deliveries cross over (worker A gets the messages of B tasks and the reverse); each still runs its own."""
    w_a, w_b = claimer(store, "wa", max_batch=1), claimer(store, "wb", max_batch=1)
    w_a.loaded_model = model_key(payload())
    w_b.loaded_model = model_key(payload(model="b.safetensors"))
    ids = {m: [add(store, clock, model=f"{m}.safetensors") for _ in range(2)] for m in "ab"}

    class Slow(BatchRunner):
        def run_batch(self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]) -> list[Outcome]:
            time.sleep(0.3)
            return super().run_batch(items)

    runners = {"a": Slow(), "b": Slow()}
    start = threading.Barrier(2)

    def consume(runner: BatchRunner, cl: Claimer, messages: list[str]) -> None:
        start.wait()
        for tid in messages:
            process_task(tid, store, runner, claimer=cl)

    threads = [
        threading.Thread(target=consume, args=(runners["a"], w_a, [ids["b"][0], ids["a"][1]])),
        threading.Thread(target=consume, args=(runners["b"], w_b, [ids["a"][0], ids["b"][1]])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for tid in [*ids["a"], *ids["b"]]:
        assert status(store, tid) is TaskStatus.SUCCEED
    assert runners["a"].batches == [[ids["a"][0]], [ids["a"][1]]]
    assert runners["b"].batches == [[ids["b"][0]], [ids["b"][1]]]
