"""``TaskQueue`` for scale-out mode: one Celery message per task, sent to the queue named by the task's lane."""

from __future__ import annotations

from celery import Celery

from underpaint.config import Settings
from underpaint.scale.celery_app import TASK_NAME, create_celery_app
from underpaint.tasks.lanes import parse_queues


class CeleryQueue:
    def __init__(self, settings: Settings, app: Celery | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else create_celery_app(settings)

    def enqueue(self, task_id: str, lane: str) -> None:
        (queue,) = parse_queues(lane)
        # Publishing retries briefly (about 2 s) on a broker hiccup, then raises: the task stays QUEUED without a
        # message and a worker's store poller takes it (``tasks.lifecycle.announce``).
        self.app.send_task(
            TASK_NAME,
            args=[task_id],
            # The message id is the task id, so Celery's own log lines ("Task ...[<id>] received") name the task.
            task_id=task_id,
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 2.0},
        )

    def close(self) -> None:
        self.app.close()
