"""SqlTaskStore on real SQLite files and on the PostgreSQL server of this machine (fresh schema per test)."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError
from tests.support import requests
from tests.support.clock import Clock
from tests.support.requests import img2img, stored_img2img

from underpaint.db.migrations import MIGRATIONS
from underpaint.tasks.contract import TaskType
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, NewTask, NsfwResult, QueueCounts, TaskStatus, owner_of

StoreFactory = Callable[..., SqlTaskStore]


@pytest.fixture
def make_store(db_url: str) -> Iterator[StoreFactory]:
    stores: list[SqlTaskStore] = []

    def make(**kwargs: object) -> SqlTaskStore:
        store = SqlTaskStore(db_url, **kwargs)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(make_store: StoreFactory, clock: Clock) -> SqlTaskStore:
    return make_store(lease_seconds=60, max_attempts=3, clock=clock)


def new_task(
    task_id: str | None = None,
    owner: str = "owner-a",
    seed: int = 42,
    image_num: int = 1,
    enable_nsfw_detection: bool = True,
    lane: str = "default",
    priority: int = 0,
) -> NewTask:
    extra = {
        "enable_nsfw_detection": enable_nsfw_detection,
        "response_image_type": "webp",
        "webhook": {"url": "https://example.com/hook"},
    }
    request = img2img(prompt="a cat", image_base64="QUJD" * 100, seed=seed, image_num=image_num)
    return requests.new_task(task_id, owner, request, extra, lane=lane, priority=priority)


IMAGES = [
    ImageRecord(key="t/1_0.webp", image_type="webp", nsfw=NsfwResult(valid=False, confidence=87.5)),
    ImageRecord(key="u/x.webp", image_type="webp", backend="custom", location={"bucket": "b", "region": "r"}),
]


def test_create_get_roundtrip_and_owner_isolation(store: SqlTaskStore, clock: Clock) -> None:
    created = store.create(new_task("t1", seed=7, image_num=3, lane="ent", priority=5))
    assert created.status is TaskStatus.QUEUED
    assert created.created_at == clock.now
    got = store.get("t1", "owner-a")
    assert got == created
    assert got.extra.webhook_url == "https://example.com/hook"
    assert got.task_type is TaskType.IMG_TO_IMG
    assert (got.seed, got.image_num, got.lane, got.priority, got.attempts) == (7, 3, "ent", 5, 0)
    assert store.get("t1") == created  # workers read without an owner
    assert store.get("t1", "owner-b") is None
    assert store.get("nope", "owner-a") is None
    assert stored_img2img(store, "t1").prompt == "a cat"


def test_sqlite_point_read_equals_the_sqlalchemy_read(tmp_path: Path, clock: Clock) -> None:
    """The API's task read on SQLite bypasses SQLAlchemy (``inline_reads``); it must return the same record."""
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}", clock=clock)
    assert store.inline_reads
    store.create(new_task("t1", seed=2**40, enable_nsfw_detection=False))
    store.claim("t1", "w1")
    store.update_progress("t1", "w1", 40, 3)
    fast_running = store.get("t1", "owner-a")
    assert fast_running is not None
    assert fast_running.progress_percent == 40
    store.complete("t1", "w1", IMAGES)
    fast = store.get("t1", "owner-a")
    store._fast = None  # the SQLAlchemy Core path (the one PostgreSQL uses)
    assert store.get("t1", "owner-a") == fast
    assert fast is not None
    assert fast.images == IMAGES
    assert fast.enable_nsfw_detection is False
    assert fast.seed == 2**40
    assert fast.status is TaskStatus.SUCCEED
    store.close()


def test_owner_of_hashes_keys() -> None:
    assert owner_of("key-1") == owner_of("key-1")
    assert owner_of("key-1") != owner_of("key-2")
    assert "key-1" not in owner_of("key-1")
    assert len(owner_of("key-1")) == 64


def test_duplicate_task_id_is_rejected(store: SqlTaskStore) -> None:
    store.create(new_task("dup"))
    with pytest.raises(IntegrityError):  # SQLAlchemy wraps each driver's own IntegrityError
        store.create(new_task("dup"))
    assert stored_img2img(store, "dup").prompt == "a cat"


def test_claim_order_is_priority_then_age(store: SqlTaskStore, clock: Clock) -> None:
    for tid, prio in [("old-low", 0), ("old-high", 10), ("new-low", 0), ("new-high", 10)]:
        store.create(new_task(tid, priority=prio))
        clock.advance(1)
    assert store.list_queued_ids() == ["old-high", "new-high", "old-low", "new-low"]
    order = [store.claim(None, "w").task_id for _ in range(4)]  # type: ignore[union-attr]
    assert order == ["old-high", "new-high", "old-low", "new-low"]
    assert store.claim(None, "w") is None


def test_claim_respects_lanes(store: SqlTaskStore) -> None:
    store.create(new_task("d", lane="default"))
    store.create(new_task("e", lane="enterprise"))
    assert store.list_queued_ids(("enterprise",)) == ["e"]
    assert store.claim(None, "w", ("enterprise",)).task_id == "e"  # type: ignore[union-attr]
    assert store.claim(None, "w", ("enterprise",)) is None
    assert store.claim("d", "w", ("enterprise",)) is None
    assert store.claim(None, "w", ("default", "other")).task_id == "d"  # type: ignore[union-attr]


def test_claim_sets_lease_and_counts_attempts(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("t"))
    task = store.claim(None, "w1")
    assert task is not None
    assert task.status is TaskStatus.PROCESSING
    assert task.worker_id == "w1"
    assert task.attempts == 1
    assert task.started_at == clock.now
    assert task.lease_expires_at == clock.now + 60
    assert store.get("t") == task
    assert store.claim("t", "w2") is None  # live lease: a second delivery does nothing


def test_concurrent_claimers_never_share_a_task(make_store: StoreFactory) -> None:
    first = make_store()
    second = make_store()  # its own engine: separate connections, like another process
    ids = {f"c{i:03d}" for i in range(40)}
    for tid in sorted(ids):
        first.create(new_task(tid))
    claimed: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6)

    def claimer(s: SqlTaskStore, name: str) -> None:
        start.wait()
        while (task := s.claim(None, name)) is not None:
            with lock:
                claimed.append(task.task_id)

    threads = [threading.Thread(target=claimer, args=(s, f"w{i}")) for i, s in enumerate([first, second] * 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(claimed) == sorted(ids)  # each exactly once
    assert first.count_by_status()[TaskStatus.PROCESSING] == 40


def test_lease_expiry_requeues_then_fails_after_max_attempts(make_store: StoreFactory, clock: Clock) -> None:
    store = make_store(lease_seconds=10, max_attempts=2, clock=clock)
    store.create(new_task("t"))
    assert store.claim(None, "w1") is not None
    clock.advance(9)
    assert store.requeue_expired() == []  # lease still valid
    clock.advance(2)
    assert store.requeue_expired() == ["t"]
    task = store.get("t")
    assert task is not None
    assert task.status is TaskStatus.QUEUED
    assert task.worker_id is None
    assert task.attempts == 1
    assert not store.complete("t", "w1", IMAGES)  # the crashed holder cannot finish any more

    assert store.claim(None, "w2").attempts == 2  # type: ignore[union-attr]
    clock.advance(11)
    assert store.requeue_expired() == ["t"]
    task = store.get("t")
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.reason.startswith("worker crashed repeatedly (2 attempts)")
    assert task.finished_at == clock.now
    with pytest.raises(KeyError):
        store.get_request("t")
    assert store.requeue_expired() == []


def test_named_claim_takes_over_an_expired_lease(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("t"))
    assert store.claim("t", "w1") is not None
    clock.advance(61)
    taken = store.claim("t", "w2")
    assert taken is not None
    assert taken.worker_id == "w2"
    assert taken.attempts == 2
    assert not store.update_progress("t", "w1", 50, 1)
    assert not store.complete("t", "w1", IMAGES[:1])
    assert store.get("t").images == []  # type: ignore[union-attr]
    assert store.complete("t", "w2", IMAGES)
    assert store.get("t").images == IMAGES  # type: ignore[union-attr]


def test_named_claim_does_not_exceed_max_attempts(make_store: StoreFactory, clock: Clock) -> None:
    store = make_store(lease_seconds=10, max_attempts=1, clock=clock)
    store.create(new_task("t"))
    assert store.claim("t", "w1") is not None
    clock.advance(11)
    assert store.claim("t", "w2") is None
    assert store.requeue_expired() == ["t"]
    assert store.get("t").status is TaskStatus.FAILED  # type: ignore[union-attr]


def test_complete_only_for_the_lease_holder(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("t"))
    assert not store.complete("t", "w1", IMAGES)  # not claimed yet
    store.claim(None, "w1")
    assert not store.complete("t", "intruder", IMAGES)
    assert not store.fail("t", "intruder", "nope")
    assert store.get("t").status is TaskStatus.PROCESSING  # type: ignore[union-attr]
    clock.advance(5)
    assert store.complete("t", "w1", IMAGES)
    done = store.get("t", "owner-a")
    assert done is not None
    assert done.status is TaskStatus.SUCCEED
    assert done.images == IMAGES
    assert done.finished_at == clock.now
    assert done.progress_percent == 100
    assert done.lease_expires_at is None
    assert not store.complete("t", "w1", IMAGES[:1])  # a second completion changes nothing
    assert not store.fail("t", None, "late")
    assert store.get("t") == done


def test_fail_paths_and_payload_removal(store: SqlTaskStore) -> None:
    store.create(new_task("queued"))
    assert store.fail("queued", None, "cancelled by the operator")
    failed = store.get("queued")
    assert failed is not None
    assert failed.status is TaskStatus.FAILED
    assert failed.reason == "cancelled by the operator"
    with pytest.raises(KeyError):
        store.get_request("queued")

    store.create(new_task("running"))
    store.claim("running", "w")
    assert store.fail("running", "w", "checkpoint missing")
    assert store.get("running").reason == "checkpoint missing"  # type: ignore[union-attr]
    with pytest.raises(KeyError):
        store.get_request("running")

    store.create(new_task("ok"))
    store.claim("ok", "w")
    assert stored_img2img(store, "ok").prompt == "a cat"
    store.complete("ok", "w", [])
    with pytest.raises(KeyError):
        store.get_request("ok")


def test_progress_updates_renew_the_lease(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("t"))
    store.claim(None, "w")
    clock.advance(50)
    assert store.update_progress("t", "w", 40, 12)
    task = store.get("t")
    assert task is not None
    assert (task.progress_percent, task.eta) == (40, 12)
    assert task.lease_expires_at == clock.now + 60
    clock.advance(50)
    assert store.renew_lease("t", "w")
    clock.advance(50)
    assert store.requeue_expired() == []  # renewed 50 s ago, 60 s lease
    assert store.update_progress("t", "w", 250, -3)
    assert (store.get("t").progress_percent, store.get("t").eta) == (100, 0)  # type: ignore[union-attr]
    assert not store.update_progress("t", "other", 10, 1)
    assert not store.renew_lease("t", "other")


def test_purge_deletes_only_old_ended_tasks(store: SqlTaskStore, clock: Clock) -> None:
    for tid in ["old-ok", "old-failed", "old-queued", "old-running"]:
        store.create(new_task(tid))
    store.claim("old-ok", "w")
    store.complete("old-ok", "w", IMAGES)
    store.fail("old-failed", None, "x")
    store.claim("old-running", "w")
    clock.advance(100)
    store.create(new_task("new-ok"))
    store.claim("new-ok", "w")
    store.complete("new-ok", "w", [])

    purged = store.purge(older_than=clock.now - 50)
    assert sorted(r.task_id for r in purged) == ["old-failed", "old-ok"]
    assert next(r for r in purged if r.task_id == "old-ok").images == IMAGES
    assert store.get("old-ok") is None
    assert store.get("old-failed") is None
    assert {t for t in ["old-queued", "old-running", "new-ok"] if store.get(t)} == {
        "old-queued",
        "old-running",
        "new-ok",
    }
    assert stored_img2img(store, "old-queued").prompt == "a cat"
    assert store.purge(older_than=clock.now - 50) == []


def test_purge_respects_limit(store: SqlTaskStore, clock: Clock) -> None:
    for i in range(5):
        store.create(new_task(f"t{i}"))
        store.fail(f"t{i}", None, "x")
    clock.advance(10)
    assert len(store.purge(clock.now, limit=3)) == 3
    assert len(store.purge(clock.now, limit=3)) == 2


def test_counters(store: SqlTaskStore, clock: Clock) -> None:
    store.create(new_task("a1", image_num=2))
    store.create(new_task("a2", image_num=3))
    store.create(new_task("b1", owner="owner-b", image_num=4))
    clock.advance(30)
    store.create(new_task("a3", image_num=1))
    store.claim("a1", "w")
    store.claim("a2", "w")
    store.complete("a2", "w", [])
    assert store.count_unfinished("owner-a") == 2  # a1 processing, a3 queued
    assert store.count_unfinished("owner-b") == 1
    assert store.images_created_since("owner-a", clock.now - 60) == 6
    assert store.images_created_since("owner-a", clock.now) == 1
    assert store.images_created_since("nobody", 0) == 0
    assert store.count_by_status() == {
        TaskStatus.QUEUED: 2,
        TaskStatus.PROCESSING: 1,
        TaskStatus.SUCCEED: 1,
        TaskStatus.FAILED: 0,
    }


def test_recent_tasks_newest_first_per_owner(store: SqlTaskStore, clock: Clock) -> None:
    for i in range(5):
        store.create(new_task(f"a{i}", image_num=i + 1))
        store.create(new_task(f"b{i}", owner="owner-b"))
        clock.advance(1)
    store.claim("a4", "w")
    store.complete("a4", "w", IMAGES)
    recent = store.recent_tasks("owner-a", 3)
    assert [t.task_id for t in recent] == ["a4", "a3", "a2"]
    assert recent[0].status is TaskStatus.SUCCEED
    assert recent[0].images == IMAGES
    assert [t.image_num for t in recent] == [5, 4, 3]
    assert [t.task_id for t in store.recent_tasks("owner-a", 100)] == ["a4", "a3", "a2", "a1", "a0"]
    assert all(t.owner == "owner-b" for t in store.recent_tasks("owner-b", 100))
    assert store.recent_tasks("nobody", 10) == []


def test_recent_tasks_break_ties_by_id(store: SqlTaskStore) -> None:
    for task_id in ("m", "z", "a"):  # one clock tick: the same created_at
        store.create(new_task(task_id))
    assert [t.task_id for t in store.recent_tasks("owner-a", 10)] == ["z", "m", "a"]


def test_queue_counts_overall_and_own(store: SqlTaskStore) -> None:
    assert store.queue_counts("owner-a") == QueueCounts()
    for task_id in ("a1", "a2", "a3"):
        store.create(new_task(task_id))
    for task_id in ("b1", "b2"):
        store.create(new_task(task_id, owner="owner-b"))
    store.claim("a1", "w")
    store.claim("b1", "w")
    store.claim("a2", "w")
    store.complete("a2", "w", [])  # ended tasks count nowhere
    assert store.queue_counts("owner-a") == QueueCounts(queued=2, processing=2, own_queued=1, own_processing=1)
    assert store.queue_counts("owner-b") == QueueCounts(queued=2, processing=2, own_queued=1, own_processing=1)
    assert store.queue_counts("nobody") == QueueCounts(queued=2, processing=2, own_queued=0, own_processing=0)


def test_requeue_everything_processing_with_infinite_now(store: SqlTaskStore) -> None:
    store.create(new_task("t"))
    store.claim(None, "w")
    assert store.requeue_expired(now=math.inf) == ["t"]
    assert store.get("t").status is TaskStatus.QUEUED  # type: ignore[union-attr]


def test_migrations_are_idempotent_and_keep_data(make_store: StoreFactory, db_url: str) -> None:
    first = make_store()
    first.create(new_task("kept"))
    assert first.schema_version == len(MIGRATIONS)
    again = make_store()
    assert again.schema_version == len(MIGRATIONS)
    assert again.get("kept") is not None

    calls: list[int] = []

    def add_probe(conn: Connection) -> None:
        calls.append(1)
        conn.execute(text("CREATE TABLE probe (n INTEGER)"))

    upgraded = make_store(migrations=[*MIGRATIONS, add_probe])
    make_store(migrations=[*MIGRATIONS, add_probe])
    assert upgraded.schema_version == len(MIGRATIONS) + 1
    assert calls == [1]
    with pytest.raises(RuntimeError, match="newer"):
        SqlTaskStore(db_url)  # an older release must not run on a newer schema


def test_concurrent_first_start_migrates_once(db_url: str) -> None:
    calls: list[int] = []
    lock = threading.Lock()

    def count_calls(conn: Connection) -> None:
        with lock:
            calls.append(1)
        conn.execute(text("CREATE TABLE probe (n INTEGER)"))  # a second run would fail here

    stores: list[SqlTaskStore] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def start() -> None:
        barrier.wait()
        try:
            stores.append(SqlTaskStore(db_url, migrations=[*MIGRATIONS, count_calls]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert calls == [1]
        assert len(stores) == 3
    finally:
        for s in stores:
            s.close()


def test_plain_postgresql_url_uses_psycopg3(db_url: str) -> None:
    plain = SqlTaskStore(db_url.replace("postgresql+psycopg://", "postgresql://"))
    try:
        assert plain.engine.dialect.driver in ("psycopg", "pysqlite")
        assert plain.count_by_status()[TaskStatus.QUEUED] == 0
    finally:
        plain.close()


def test_bad_urls_are_rejected() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        SqlTaskStore("sqlite:///:memory:")
    with pytest.raises(ValueError, match="unsupported"):
        SqlTaskStore("mysql://u@h/db")
    with pytest.raises(ValueError, match="lease_seconds"):
        SqlTaskStore("sqlite:////tmp/x.db", lease_seconds=0)
