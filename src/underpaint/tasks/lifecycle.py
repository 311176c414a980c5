"""What happens to tasks around the work itself: crash recovery, lease sweeps and retention.

- ``recover_on_start``: embedded mode only (one worker per store). Tasks left PROCESSING by a killed process
  cannot be running anywhere else, so they go back to QUEUED at once instead of waiting for their lease.
- ``sweep_expired``: the periodic version for any mode; a task whose worker stopped heartbeating is retried,
  or ends FAILED once it used up its attempts (it keeps killing workers).
- ``RetentionSweeper``: deletes ended tasks, their inputs and their images after the retention period, and
  ``Idempotency-Key`` records after 24 h; with an ``OrphanSweeper`` it also removes images no task references.
- ``OrphanSweeper``: images left behind by an attempt that died between upload and completion (the attempts
  that live delete their own), found by listing the storage a slice per run.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence

from underpaint.tasks.types import (
    IDEMPOTENCY_TTL_SECONDS,
    ImageDeleter,
    ImageLister,
    ImageRecord,
    TaskQueue,
    TaskRecord,
    TaskStatus,
    TaskStore,
)

log = logging.getLogger("underpaint.tasks")

TerminalHook = Callable[[TaskRecord], None]

# Images in these backends belong to the service; "custom" ones sit in the user's own bucket and are never touched.
_OWNED_BACKENDS = ("local", "s3")


def notify_terminal(store: TaskStore, task_ids: Iterable[str], on_terminal: TerminalHook | None) -> None:
    """Call ``on_terminal`` for each of ``task_ids`` that has ended; a failing hook is logged, never raised."""
    if on_terminal is None:
        return
    for task_id in task_ids:
        record = store.get(task_id)
        if record is None or not record.status.terminal:
            continue
        try:
            on_terminal(record)
        except Exception:
            log.exception("on_terminal hook failed for task %s", task_id)


def _after_requeue(
    store: TaskStore, task_ids: list[str], on_terminal: TerminalHook | None, queue: TaskQueue | None
) -> None:
    """Announce requeued tasks to the queue (a broker has no message for them any more) and ended ones to
    ``on_terminal``."""
    notify_terminal(store, task_ids, on_terminal)
    if queue is None:
        return
    for task_id in task_ids:
        record = store.get(task_id)
        if record is not None and record.status is TaskStatus.QUEUED:
            announce(queue, task_id, record.lane)


def announce(queue: TaskQueue, task_id: str, lane: str) -> bool:
    """Send the wake-up message of a QUEUED task. The store row is the task: when the broker is unreachable the
    task stays QUEUED and workers find it in the store anyway (the embedded worker polls it; a Celery worker
    claims tasks left undelivered for ``queue_poll_seconds``), so a failure is logged, not raised."""
    try:
        queue.enqueue(task_id, lane)
        return True
    except Exception as exc:
        log.warning(
            "task %s: could not send its queue message (%r); it stays QUEUED and a worker takes it from the store",
            task_id,
            exc,
            extra={"task_id": task_id},
        )
        return False


def sweep_expired(
    store: TaskStore, on_terminal: TerminalHook | None = None, queue: TaskQueue | None = None
) -> list[str]:
    """Requeue (or fail, after max attempts) PROCESSING tasks whose lease ran out. Returns the changed ids.

    Run it periodically in any mode (the embedded worker does; with Celery, a beat task or the API process).
    """
    changed = store.requeue_expired()
    if changed:
        log.warning("lease expired for %d task(s): %s", len(changed), ", ".join(changed))
    _after_requeue(store, changed, on_terminal, queue)
    return changed


def recover_on_start(
    store: TaskStore, on_terminal: TerminalHook | None = None, queue: TaskQueue | None = None
) -> list[str]:
    """Embedded mode, before the worker starts: every PROCESSING task was interrupted by the last shutdown.

    Only valid when this process runs the store's only worker. Each interrupted run already counted as an
    attempt when it was claimed; a task that used up ``max_attempts`` ends FAILED with a reason instead of
    being queued again. Returns the changed ids.
    """
    changed = store.requeue_expired(now=math.inf)
    if changed:
        log.warning("recovered %d task(s) interrupted by the last shutdown: %s", len(changed), ", ".join(changed))
    _after_requeue(store, changed, on_terminal, queue)
    return changed


def delete_images(storage: ImageDeleter, images: Iterable[ImageRecord]) -> int:
    """Delete the images that live in ``storage``; returns how many. Errors are logged, not raised."""
    deleted = 0
    for image in images:
        if image.backend not in _OWNED_BACKENDS:
            continue
        if image.backend != storage.name:
            log.warning(
                "image %s is in %s storage, but this process uses %s: not deleted",
                image.key,
                image.backend,
                storage.name,
            )
            continue
        try:
            storage.delete(image.key)
            deleted += 1
        except Exception:
            log.exception("could not delete image %s", image.key)
    return deleted


class OrphanSweeper:
    """Deletes images of the service's own storage that no task references: those of a task that ended with other
    images (or none), and those of a task that no longer exists. Keys are ``<task_id>/<file>``; a key whose
    first part is not a task id (``test_data/...`` of webhook test mode) is not this sweeper's.

    Bounded: each ``run_once`` lists at most ``per_run`` keys, continuing where the last run stopped (wrapping
    around), and leaves anything younger than ``min_age_s`` alone (an attempt may be between its upload and its
    completion, or deleting its own images). Queued or running tasks' images are never touched."""

    def __init__(
        self,
        store: TaskStore,
        storage: ImageLister,
        min_age_s: float,
        *,
        per_run: int = 1000,
        on_removed: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.storage = storage
        self.min_age_s = min_age_s
        self.per_run = per_run
        self.on_removed = on_removed
        self.clock = clock
        self._cursor = ""

    def run_once(self) -> int:
        """One slice of the storage; returns how many orphans it deleted."""
        listed = self.storage.list_keys(self._cursor, self.per_run)
        self._cursor = listed[-1][0] if len(listed) >= self.per_run else ""
        cutoff = self.clock() - self.min_age_s
        old = [(key, _task_of(key)) for key, modified in listed if modified < cutoff]
        known = self.store.image_keys({tid for _, tid in old if tid is not None})
        removed: list[str] = []
        for key, tid in old:
            if tid is None:
                continue
            entry = known.get(tid)
            if entry is not None and (not entry[0].terminal or key in entry[1]):
                continue
            try:
                self.storage.delete(key)
                removed.append(key)
            except Exception:
                log.exception("orphan sweep: could not delete image %s", key)
        if removed:
            log.warning(
                "orphan sweep: deleted %d image(s) no task references (%s%s)",
                len(removed),
                ", ".join(removed[:5]),
                ", ..." if len(removed) > 5 else "",
            )
            if self.on_removed is not None:
                self.on_removed(len(removed))
        return len(removed)


def _task_of(key: str) -> str | None:
    """The task id an image key starts with (task ids are UUIDs), or None for keys of another kind."""
    head = key.split("/", 1)[0]
    try:
        uuid.UUID(head)
    except ValueError:
        return None
    return head


class RetentionSweeper:
    """Purges tasks that ended more than ``retention_seconds`` ago, with their inputs and images."""

    def __init__(
        self,
        store: TaskStore,
        storage: ImageDeleter,
        retention_seconds: float,
        *,
        interval: float = 600.0,
        batch: int = 500,
        clock: Callable[[], float] = time.time,
        also_purge: Sequence[Callable[[float], int]] = (),
        purge_idempotency: Callable[[float], int] | None = None,
        orphans: OrphanSweeper | None = None,
    ) -> None:
        if retention_seconds < 0:
            raise ValueError("retention_seconds must not be negative")
        self.store = store
        self.storage = storage
        self.retention_seconds = retention_seconds
        self.interval = interval
        self.batch = batch
        self.clock = clock
        # Other records kept per task (the webhook outbox) that age out with the same cutoff.
        self.also_purge = tuple(also_purge)
        # Idempotency-Key records age out after their own TTL (24 h), not the retention period.
        self.purge_idempotency = purge_idempotency
        self.orphans = orphans
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Purge everything that is due now; returns the number of tasks deleted."""
        cutoff = self.clock() - self.retention_seconds
        total = 0
        while True:
            purged = self.store.purge(cutoff, limit=self.batch)
            for record in purged:
                delete_images(self.storage, record.images)
            total += len(purged)
            if len(purged) < self.batch:
                break
        for purge in self.also_purge:
            purge(cutoff)
        if self.purge_idempotency is not None:
            self.purge_idempotency(self.clock() - IDEMPOTENCY_TTL_SECONDS)
        if total:
            log.info("retention: purged %d task(s) that ended before %.0f", total, cutoff)
        if self.orphans is not None:
            try:
                self.orphans.run_once()
            except Exception:
                log.exception("orphan sweep failed; retrying at the next retention run")
        return total

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("retention sweeper already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="underpaint-retention", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("retention sweep failed; retrying in %.0f s", self.interval)
            self._stop.wait(self.interval)
