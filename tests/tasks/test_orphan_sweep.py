"""The orphan sweep: images in the service's storage that no task references are deleted, a bounded slice per
run, on SQLite and PostgreSQL, with a real ``LocalStorage`` folder."""

from __future__ import annotations

import logging
import os
import time
import uuid
from pathlib import Path

import pytest
from tests.support.requests import new_task

from underpaint.storage.local import LocalStorage
from underpaint.tasks.lifecycle import OrphanSweeper, RetentionSweeper
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord


def _task(store: SqlTaskStore) -> str:
    tid = str(uuid.uuid4())
    store.create(new_task(tid))
    return tid


def _put(storage: LocalStorage, key: str, age_s: float) -> str:
    storage.put(key, b"png", "image/png")
    then = time.time() - age_s
    os.utime(storage.path_for(key), (then, then))
    return key


def test_only_old_unreferenced_images_are_removed(
    db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqlTaskStore(db_url)
    storage = LocalStorage(tmp_path / "images", b"secret")
    try:
        done = _task(store)
        assert store.claim(done, "w") is not None
        kept = _put(storage, f"{done}/kept.png", 3600)
        left_behind = _put(storage, f"{done}/first-attempt.png", 3600)  # an attempt that died before completing
        assert store.complete(done, "w", [ImageRecord(key=kept, image_type="png")])
        running = _task(store)
        assert store.claim(running, "w") is not None
        in_flight = _put(storage, f"{running}/a.png", 3600)  # a live attempt may still record it
        purged = _put(storage, f"{uuid.uuid4()}/x.png", 3600)  # its task is gone
        young = _put(storage, f"{uuid.uuid4()}/y.png", 5)  # may be between upload and completion
        sample = _put(storage, "test_data/sample.png", 3600)  # not a task folder: not the sweeper's
        removed: list[int] = []
        sweeper = OrphanSweeper(store, storage, min_age_s=600, on_removed=removed.append)
        with caplog.at_level(logging.WARNING, logger="underpaint.tasks"):
            assert sweeper.run_once() == 2
        left = {k for k, _ in storage.list_keys()}
        assert left == {kept, in_flight, young, sample}
        assert left_behind not in left
        assert purged not in left
        assert removed == [2]
        assert any("orphan sweep: deleted 2 image(s)" in r.getMessage() for r in caplog.records)
        assert sweeper.run_once() == 0
    finally:
        store.close()


def test_each_run_lists_a_bounded_slice_and_wraps_around(db_url: str, tmp_path: Path) -> None:
    store = SqlTaskStore(db_url)
    storage = LocalStorage(tmp_path / "images", b"secret")
    try:
        orphans = sorted(_put(storage, f"{uuid.uuid4()}/o.png", 3600) for _ in range(5))
        sweeper = OrphanSweeper(store, storage, min_age_s=600, per_run=2)
        assert [sweeper.run_once() for _ in range(3)] == [2, 2, 1]
        assert storage.list_keys() == []
        late = _put(storage, f"{uuid.uuid4()}/late.png", 3600)
        assert sweeper.run_once() == 1  # wrapped around to the start
        assert late not in {k for k, _ in storage.list_keys()}
        assert len(orphans) == 5
        # The retention sweeper runs it, and survives its failures.
        _put(storage, f"{uuid.uuid4()}/again.png", 3600)
        retention = RetentionSweeper(store, storage, retention_seconds=3600, orphans=sweeper)
        retention.run_once()
        assert storage.list_keys() == []
        sweeper.storage = None  # type: ignore[assignment]
        retention.run_once()  # logged, not raised
    finally:
        store.close()
