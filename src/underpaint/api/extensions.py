"""Read-only extension routes (not in Novita's API) that the playground and dashboards use.

* ``GET /v3/async/tasks?limit=N``: the calling key's most recent tasks, newest first (default 20, at most 100).
* ``GET /v3/async/queue``: queued/processing counts overall and the caller's own, and the workers: the Celery
  workers' heartbeat rows in scale-out mode, the embedded worker's state otherwise.

Both are authenticated like every API route, see only the caller's tasks (the overall counts are numbers, never
other keys' tasks), and cost one or two indexed reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal

from starlette.datastructures import QueryParams

from underpaint.api.errors import invalid_request
from underpaint.api.responses import (
    QueueCountsOut,
    QueueStatusResponse,
    TaskListResponse,
    TaskSummary,
    WorkerOut,
)
from underpaint.services import Services
from underpaint.tasks.types import TaskRecord

TASKS_PATH = "/v3/async/tasks"
QUEUE_PATH = "/v3/async/queue"
DEFAULT_TASK_LIMIT = 20
MAX_TASK_LIMIT = 100

# ``services.extras[EMBEDDED_WORKER]``: () -> bool, whether the embedded worker (thread or child process) runs.
EMBEDDED_WORKER = "embedded_worker_alive"


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
    settings = services.settings
    mode: Literal["embedded", "celery"]
    if settings.queue_backend == "celery":
        mode = "celery"
        workers = _celery_workers(services)
    else:
        mode = "embedded"
        alive: Callable[[], bool] | None = services.extras.get(EMBEDDED_WORKER)
        workers = []
        if settings.run_worker and alive is not None:
            workers.append(
                WorkerOut(
                    worker_id="embedded",
                    kind="process" if settings.worker_process else "thread",
                    alive=bool(alive()),
                    busy=min(1, counts.processing),
                    concurrency=1,
                    queues=["*"],
                    last_seen_seconds_ago=None,
                )
            )
    return QueueStatusResponse(
        mode=mode,
        queue=QueueCountsOut(queued=counts.queued, processing=counts.processing),
        mine=QueueCountsOut(queued=counts.own_queued, processing=counts.own_processing),
        workers_alive=sum(1 for w in workers if w.alive),
        workers=workers,
    )


def _celery_workers(services: Services) -> list[WorkerOut]:
    from sqlalchemy import Engine

    from underpaint.scale.heartbeat import list_workers
    from underpaint.scale.metrics import worker_stale_after

    engine = getattr(services.store, "engine", None)
    if not isinstance(engine, Engine):
        return []
    now = time.time()
    stale = worker_stale_after(services.settings.lease_seconds)
    return [
        WorkerOut(
            worker_id=w.worker_id,
            kind="celery",
            alive=w.alive(now, stale),
            busy=w.busy,
            concurrency=max(1, w.concurrency),
            queues=list(w.queues),
            last_seen_seconds_ago=round(max(0.0, now - w.last_seen), 1),
        )
        for w in list_workers(engine)
    ]
