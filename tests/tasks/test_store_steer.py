"""Cancel, Idempotency-Key and queue position in SqlTaskStore, on SQLite and on PostgreSQL (fresh schema)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select
from tests.support import requests
from tests.support.clock import Clock
from tests.support.requests import img2img

from underpaint.db.schema import idempotency_table
from underpaint.storage.local import LocalStorage
from underpaint.tasks.lifecycle import RetentionSweeper
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import (
    CANCELLED_REASON,
    IDEMPOTENCY_TTL_SECONDS,
    CancelOutcome,
    IdempotencyKey,
    IdempotencyKeyTaken,
    NewTask,
    TaskStatus,
)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(db_url: str, clock: Clock) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(db_url, lease_seconds=60, max_attempts=3, clock=clock)
    yield s
    s.close()


def new_task(task_id: str | None = None, owner: str = "owner-a", lane: str = "default", priority: int = 0) -> NewTask:
    return requests.new_task(task_id, owner, img2img(prompt="a cat"), lane=lane, priority=priority)


def status_of(store: SqlTaskStore, task_id: str) -> TaskStatus:
    task = store.get(task_id)
    assert task is not None
    return task.status


# --- cancel ------------------------------------------------------------------------------------------------------


def test_cancel_queued_ends_it_failed_and_it_is_never_claimed(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("q"))
    clock.advance(2)
    assert store.request_cancel("q", "owner-a") is CancelOutcome.CANCELLED
    task = store.get("q")
    assert task is not None
    assert (task.status, task.reason) == (TaskStatus.FAILED, CANCELLED_REASON)
    assert task.finished_at == clock.now
    assert task.started_at is None
    assert store.claim(None, "w") is None
    assert store.claim("q", "w") is None  # a broker message still on its way does nothing
    with pytest.raises(KeyError):
        store.get_request("q")  # the input is dropped like that of any ended task
    assert store.request_cancel("q", "owner-a") is CancelOutcome.FINISHED


def test_cancel_processing_flags_it_for_its_worker(store: SqlTaskStore) -> None:
    store.create(new_task("p"))
    assert store.claim(None, "w") is not None
    assert not store.cancel_requested("p")
    assert store.request_cancel("p", "owner-a") is CancelOutcome.REQUESTED
    assert store.cancel_requested("p")
    assert status_of(store, "p") is TaskStatus.PROCESSING
    assert not store.complete("p", "w", [])  # a run that ignores the flag cannot record its result
    assert store.fail("p", "w", CANCELLED_REASON)  # the holder ends it
    assert store.request_cancel("p", "owner-a") is CancelOutcome.FINISHED


def test_cancel_is_owner_only(store: SqlTaskStore) -> None:
    store.create(new_task("mine"))
    assert store.request_cancel("mine", "owner-b") is CancelOutcome.NOT_FOUND
    assert store.request_cancel("nope", "owner-a") is CancelOutcome.NOT_FOUND
    assert status_of(store, "mine") is TaskStatus.QUEUED


def test_cancelled_task_whose_worker_died_ends_failed_not_requeued(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("p"))
    store.claim(None, "w")
    store.request_cancel("p", "owner-a")
    clock.advance(61)
    assert store.claim("p", "w2") is None  # not taken over after the lease ran out
    assert store.requeue_expired() == ["p"]
    task = store.get("p")
    assert task is not None
    assert (task.status, task.reason) == (TaskStatus.FAILED, CANCELLED_REASON)


def test_requeued_task_has_not_started(store: SqlTaskStore, clock: Clock) -> None:
    """debug_info's execute time is that of the run in progress: none while queued again."""
    store.create(new_task("t"))
    store.claim(None, "w")
    clock.advance(61)
    store.requeue_expired()
    task = store.get("t")
    assert task is not None
    assert (task.status, task.started_at) == (TaskStatus.QUEUED, None)


# --- Idempotency-Key -----------------------------------------------------------------------------------------------


def test_idempotency_key_is_per_owner_and_remembers_the_body(store: SqlTaskStore) -> None:
    key = IdempotencyKey("k1", "hash-1")
    store.create(new_task("first"), key)
    with pytest.raises(IdempotencyKeyTaken) as taken:
        store.create(new_task("second"), IdempotencyKey("k1", "hash-2"))
    assert (taken.value.task_id, taken.value.request_hash) == ("first", "hash-1")
    assert store.get("second") is None
    found = store.find_idempotent("owner-a", "k1")
    assert found is not None
    assert (found.task_id, found.request_hash) == ("first", "hash-1")
    assert store.find_idempotent("owner-b", "k1") is None
    store.create(new_task("other-owner", owner="owner-b"), key)  # another key's namespace
    assert store.get("other-owner") is not None


def test_idempotency_key_expires_after_24_hours_and_is_purged(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("old"), IdempotencyKey("k", "h"))
    clock.advance(IDEMPOTENCY_TTL_SECONDS + 1)
    assert store.find_idempotent("owner-a", "k") is None
    store.create(new_task("new"), IdempotencyKey("k", "h2"))  # an expired record does not block the key
    found = store.find_idempotent("owner-a", "k")
    assert found is not None
    assert found.task_id == "new"
    store.create(new_task("x"), IdempotencyKey("k-old", "h"))
    clock.advance(IDEMPOTENCY_TTL_SECONDS + 1)
    store.create(new_task("y"), IdempotencyKey("k-fresh", "h"))
    assert store.purge_idempotency_keys(clock.now - IDEMPOTENCY_TTL_SECONDS) == 2  # "k" and "k-old"
    assert store.find_idempotent("owner-a", "k-fresh") is not None


def test_concurrent_submits_with_one_key_create_one_task(db_url: str) -> None:
    """Separate stores (own engines and connections, like separate API processes) racing on one key."""
    stores = [SqlTaskStore(db_url) for _ in range(4)]
    created: list[str] = []
    taken: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def submit(s: SqlTaskStore, n: int) -> None:
        start.wait()
        try:
            s.create(new_task(f"t{n}"), IdempotencyKey("retry-me", "same-body"))
            with lock:
                created.append(f"t{n}")
        except IdempotencyKeyTaken as exc:
            with lock:
                taken.append(exc.task_id)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(stores[n % 4], n)) for n in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert len(created) == 1
        assert taken == created * 11  # every loser learns the winner's task id
        assert sum(stores[0].count_by_status().values()) == 1
    finally:
        for s in stores:
            s.close()


# --- queue position ------------------------------------------------------------------------------------------------


def test_queue_position_follows_the_claim_order(store: SqlTaskStore, clock: Clock) -> None:
    plan = [("a", 0, "sd15"), ("b", 10, "enterprise.gold"), ("c", 0, "sdxl"), ("d", 10, "sd15"), ("e", 0, "sd15")]
    for tid, priority, lane in plan:
        store.create(new_task(tid, priority=priority, lane=lane))
        clock.advance(1)
    store.create(new_task("tie-2"))  # same created_at as the next (the clock stands still): the id breaks the tie
    store.create(new_task("tie-1"))

    def position(tid: str, lanes: tuple[str, ...] | None = None) -> int:
        task = store.get(tid)
        assert task is not None
        return int(store.queue_position(task, lanes))

    order = store.list_queued_ids()
    assert order == ["b", "d", "a", "c", "e", "tie-1", "tie-2"]
    assert [position(t) for t in order] == [1, 2, 3, 4, 5, 6, 7]
    # Per lane (Celery: each lane is its own queue): only the tasks of that lane are ahead.
    assert [position(t, ("sd15",)) for t in ("d", "a", "e")] == [1, 2, 3]
    assert position("c", ("sdxl",)) == 1
    # Claiming moves everyone up; a running or ended task has no position.
    first = store.claim(None, "w")
    assert first is not None
    assert first.task_id == "b"
    assert store.queue_position(first) == 0
    assert [position(t) for t in ("d", "a", "tie-2")] == [1, 2, 6]
    store.request_cancel("a", "owner-a")
    assert position("a") == 0
    assert position("c") == 2


def test_recent_run_seconds_is_the_mean_of_successful_runs(store: SqlTaskStore, clock: Clock) -> None:
    assert store.recent_run_seconds() is None
    for tid, seconds in [("t1", 4.0), ("t2", 8.0)]:
        store.create(new_task(tid))
        store.claim(tid, "w")
        clock.advance(seconds)
        store.complete(tid, "w", [])
    store.create(new_task("failed"))
    store.claim("failed", "w")
    clock.advance(100)
    store.fail("failed", "w", "boom")  # failures do not count
    assert store.recent_run_seconds() == pytest.approx(6.0)
    assert store.recent_run_seconds(limit=1) == pytest.approx(8.0)


def test_retention_sweeper_forgets_idempotency_keys_after_24_hours(store: SqlTaskStore, clock: Clock) -> None:
    def recorded() -> int:
        with store.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(idempotency_table)).scalar_one())

    store.create(new_task("a"), IdempotencyKey("k", "h"))
    sweeper = RetentionSweeper(
        store, LocalStorage(Path("/nonexistent"), b"s"), 30 * 24 * 3600, clock=clock,
        purge_idempotency=store.purge_idempotency_keys,
    )  # fmt: skip
    clock.advance(IDEMPOTENCY_TTL_SECONDS - 1)
    sweeper.run_once()
    assert recorded() == 1
    clock.advance(2)
    sweeper.run_once()
    assert recorded() == 0
    assert store.get("a") is not None  # the task itself stays for the retention period
