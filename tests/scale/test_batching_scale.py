"""Batching and model affinity on PostgreSQL (the scale-out store: ``FOR UPDATE SKIP LOCKED``) and their metrics."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, cast

import pytest
from sqlalchemy import text
from tests.support.requests import img2img, new_task

from underpaint.scale.metrics import WORKER_REGISTRY, InstrumentedRunner
from underpaint.tasks.batching import model_key
from underpaint.tasks.contract import Img2ImgRequest, TaskRequest
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import ProgressReporter

pytestmark = pytest.mark.services


@pytest.fixture
def store(pg_url: str) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(pg_url, lease_seconds=30, max_attempts=2)
    with s.engine.begin() as conn:
        conn.execute(text("DELETE FROM task_payloads"))
        conn.execute(text("DELETE FROM tasks"))
    yield s
    s.close()


def payload(model: str = "a.safetensors", steps: int = 20) -> Img2ImgRequest:
    return img2img(model_name=model, steps=steps)


def add(store: SqlTaskStore, **kw: Any) -> str:
    tid = uuid.uuid4().hex
    store.create(new_task(tid, request=payload(**kw), lane="sd15"))
    return tid


def test_concurrent_batch_claims_never_overlap(store: SqlTaskStore) -> None:
    ids = {add(store) for _ in range(24)}
    key = store.claim(None, "lead", ("sd15",))
    assert key is not None
    assert key.batch_key is not None
    got: dict[str, list[str]] = {}
    start = threading.Barrier(4)

    def grab(worker: str) -> None:
        start.wait()
        mine: list[str] = []
        while batch := store.claim_batch(str(key.batch_key), worker, 3, ("sd15",)):
            mine += [t.task_id for t in batch]
        got[worker] = mine

    threads = [threading.Thread(target=grab, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    claimed = [tid for mine in got.values() for tid in mine]
    assert len(claimed) == len(set(claimed)) == 23
    assert set(claimed) | {key.task_id} == ids
    for worker, mine in got.items():
        for tid in mine:
            rec = store.get(tid)
            assert rec is not None
            assert (rec.status, rec.worker_id, rec.attempts) == (TaskStatus.PROCESSING, worker, 1)


def test_affinity_and_its_bound_on_postgresql(store: SqlTaskStore) -> None:
    old_b = add(store, model="b.safetensors")
    time.sleep(0.6)
    a = add(store)
    prefer = model_key(payload())
    first = store.claim(None, "w", ("sd15",), prefer_model=prefer, max_wait_s=30)
    assert first is not None
    assert first.task_id == a
    add(store)  # fresh, for the loaded model
    overdue = store.claim(None, "w", ("sd15",), prefer_model=prefer, max_wait_s=0.3)
    assert overdue is not None
    assert overdue.task_id == old_b


class Batches:
    checkpoint_loads = 0

    def run(self, task: TaskRecord, request: TaskRequest, report: Any) -> list[ImageRecord]:
        return [ImageRecord(key=f"{task.task_id}/0.png", image_type="png")]

    def run_batch(
        self, items: Sequence[tuple[TaskRecord, TaskRequest, Any]]
    ) -> list[list[ImageRecord] | BaseException]:
        return [self.run(t, p, r) for t, p, r in items]


def _value(name: str, labels: dict[str, str] | None = None) -> float:
    return WORKER_REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_metrics_batch_sizes_queue_waits_and_model_switches() -> None:
    runner = InstrumentedRunner(Batches())

    def task(model: str, waited: float) -> TaskRecord:
        return TaskRecord(
            task_id=uuid.uuid4().hex, owner="o", status=TaskStatus.PROCESSING, lane="sd15", attempts=1,
            created_at=1000.0, started_at=1000.0 + waited, model_key=model,
        )  # fmt: skip

    sizes = _value("underpaint_batch_size_count"), _value("underpaint_batch_size_sum")
    bucket = _value("underpaint_batch_size_bucket", {"le": "3.0"})
    waits = _value("underpaint_queue_wait_seconds_count"), _value("underpaint_queue_wait_seconds_sum")
    switches = _value("underpaint_model_switches_total")
    report = cast(ProgressReporter, object())  # never called by InstrumentedRunner itself
    request = img2img()
    runner.run_batch(
        [(task("a", 1.0), request, report), (task("a", 2.0), request, report), (task("a", 3.0), request, report)]
    )
    runner.run(task("b", 0.5), request, report)  # a switch
    runner.run_batch([(task("b", 0.5), request, report)] * 2)  # same model: no switch
    runner.run(task("a", 0.5), request, report)  # a switch back
    assert _value("underpaint_batch_size_count") - sizes[0] == 4
    assert _value("underpaint_batch_size_sum") - sizes[1] == 3 + 1 + 2 + 1
    assert _value("underpaint_batch_size_bucket", {"le": "3.0"}) - bucket == 4
    assert _value("underpaint_queue_wait_seconds_count") - waits[0] == 7
    assert _value("underpaint_queue_wait_seconds_sum") - waits[1] == pytest.approx(1 + 2 + 3 + 0.5 * 4)
    assert _value("underpaint_model_switches_total") - switches == 2
