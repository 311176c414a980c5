"""Read-only extension routes (not in Novita's API) that the playground and dashboards use.

* ``GET /v3/async/tasks?limit=N``: the calling key's most recent tasks, newest first (default 20, at most 100).
* ``GET /v3/async/queue``: queued/processing counts overall and the caller's own, and the workers
  (``Services.workers``: the Celery workers' heartbeat rows in scale-out mode, the embedded worker otherwise).

Both are authenticated like every API route, see only the caller's tasks (the overall counts are numbers, never
other keys' tasks), and cost one or two indexed reads.
"""

from __future__ import annotations

from starlette.datastructures import QueryParams

from underpaint.api.responses import (
    QueueCountsOut,
    QueueStatusResponse,
    TaskListResponse,
    TaskSummary,
    WorkerOut,
)
from underpaint.services import Services
from underpaint.tasks.types import TaskRecord
from underpaint.wire.errors import invalid_request

TASKS_PATH = "/v3/async/tasks"
QUEUE_PATH = "/v3/async/queue"
DEFAULT_TASK_LIMIT = 20
MAX_TASK_LIMIT = 100


def task_limit(params: QueryParams) -> int:
    raw = params.get("limit", "").strip()
    if not raw:
        return DEFAULT_TASK_LIMIT
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_TASK_LIMIT:
        raise invalid_request(f"limit: must be an integer between 1 and {MAX_TASK_LIMIT} (got {raw!r})", field="limit")
    return int(raw)


def recent_tasks(services: Services, owner: str, limit: int) -> TaskListResponse:
    return TaskListResponse(tasks=[_summary(t) for t in services.store.recent_tasks(owner, limit)])


def _summary(task: TaskRecord) -> TaskSummary:
    return TaskSummary(
        task_id=task.task_id,
        status=task.status.value,
        reason=task.reason,
        progress_percent=min(100, max(0, int(task.progress_percent))),
        eta=max(0, int(task.eta)),
        image_num=task.image_num,
        created_time_ms=int(task.created_at * 1000),
        finished_time_ms=int(task.finished_at * 1000) if task.finished_at else 0,
    )


def queue_status(services: Services, owner: str) -> QueueStatusResponse:
    counts = services.store.queue_counts(owner)
    states = services.workers() if services.workers is not None else []
    workers = [
        WorkerOut(
            worker_id=w.worker_id,
            kind=w.kind,
            alive=w.alive,
            # The embedded worker runs one task at a time: busy when anything runs.
            busy=w.busy if w.busy is not None else min(1, counts.processing),
            concurrency=max(1, w.concurrency),
            queues=list(w.queues),
            last_seen_seconds_ago=w.last_seen_seconds_ago,
        )
        for w in states
    ]
    return QueueStatusResponse(
        mode="celery" if services.settings.queue_backend == "celery" else "embedded",
        queue=QueueCountsOut(queued=counts.queued, processing=counts.processing),
        mine=QueueCountsOut(queued=counts.own_queued, processing=counts.own_processing),
        workers_alive=sum(1 for w in workers if w.alive),
        workers=workers,
    )
