"""Extensions that steer a task (not in Novita's API; additive, the official SDKs never see them).

- ``POST /v3/async/task-cancel`` ``{"task_id"}``: the owner cancels a task. A QUEUED one ends FAILED at once and
  never runs; a PROCESSING one is flagged and its worker stops at the next sampler step. Either way the task ends
  ``TASK_STATUS_FAILED`` with reason ``cancelled by the client``, and its webhook fires once.
- ``Idempotency-Key`` on submit: ``api/idempotency.py``.
- The queue position and eta of a queued task on task-result: ``QueueEta``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from underpaint.api.auth import Caller
from underpaint.api.context import ApiContext
from underpaint.api.submit import parse_json
from underpaint.tasks.lifecycle import notify_terminal
from underpaint.tasks.types import CancelOutcome, TaskRecord, TaskStatus, TaskStore
from underpaint.wire.errors import invalid_request, task_not_cancellable, task_not_found

CANCEL_PATH = "/v3/async/task-cancel"


def cancel_task(ctx: ApiContext, caller: Caller, raw: bytes) -> dict[str, str]:
    data = parse_json(raw)
    task_id = data.get("task_id") if isinstance(data, dict) else None
    if not isinstance(task_id, str) or not task_id.strip():
        raise invalid_request('task_id: is required (POST /v3/async/task-cancel {"task_id": "<id>"})', field="task_id")
    task_id = task_id.strip()
    if len(task_id) > 64:
        raise task_not_found(task_id[:64])
    store = ctx.services.store
    outcome = store.request_cancel(task_id, caller.owner)
    if outcome is CancelOutcome.NOT_FOUND:
        raise task_not_found(task_id)
    if outcome is CancelOutcome.FINISHED:
        record = store.get(task_id, caller.owner)
        raise task_not_cancellable(task_id, record.status.value if record is not None else "ended")
    if outcome is CancelOutcome.CANCELLED:
        # It never reached a worker: this request ended it, so this request announces it (webhook).
        notify_terminal(store, [task_id], ctx.services.on_terminal)
    return {"task_id": task_id}


# --- queue position and eta -----------------------------------------------------------------------------------


class QueueEta:
    """Queue position and eta of a QUEUED task, for task-result.

    Position: 1 + the QUEUED tasks the claim takes before it (priority, then age), counted in its own lane when
    lanes are separate queues (Celery), across all lanes in embedded mode (one worker claims them all): one
    indexed COUNT. Eta: ``position`` times the mean run time (start to finish) of the last 50 successful tasks, read
    at most every ``refresh`` seconds; it assumes one worker per lane and counts the running task as a whole
    run. Before any task has finished there is nothing to estimate from, and the eta stays 0.
    """

    def __init__(
        self,
        store: TaskStore,
        per_lane: bool,
        *,
        refresh: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.per_lane = per_lane
        self.refresh = refresh
        self.clock = clock
        self._lock = threading.Lock()
        self._mean: float | None = None
        self._read_at: float | None = None

    def position(self, task: TaskRecord) -> int:
        if task.status is not TaskStatus.QUEUED:
            return 0
        return self.store.queue_position(task, (task.lane,) if self.per_lane else None)

    def eta(self, position: int) -> int | None:
        """Seconds until a task at ``position`` ends; None when no run time is known yet."""
        mean = self._mean_run_seconds()
        return None if mean is None or position <= 0 else round(position * mean)

    def _mean_run_seconds(self) -> float | None:
        now = self.clock()
        with self._lock:
            if self._read_at is not None and now - self._read_at < self.refresh:
                return self._mean
            self._read_at = now
        mean = self.store.recent_run_seconds()
        with self._lock:
            self._mean = mean
        return mean
