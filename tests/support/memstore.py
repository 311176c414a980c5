"""An in-memory ``TaskStore`` + ``TaskQueue`` for fast API tests (same semantics as the SQL store's basics)."""

from __future__ import annotations

import copy
import threading
import time
from typing import Any

from underpaint.tasks.types import (
    CANCELLED_REASON,
    CancelOutcome,
    IdempotencyKey,
    IdempotencyKeyTaken,
    ImageRecord,
    NewTask,
    QueueCounts,
    TaskRecord,
    TaskStatus,
)


class MemStore:
    inline_reads = True
    lease_seconds = 120.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.tasks: dict[str, TaskRecord] = {}
        self.payloads: dict[str, dict[str, Any]] = {}
        self.image_nums: dict[str, int] = {}
        self.keys: dict[tuple[str, str], IdempotencyKeyTaken] = {}

    def create(self, task: NewTask, idempotency: IdempotencyKey | None = None) -> TaskRecord:
        if idempotency is not None:
            with self._lock:
                taken = self.keys.get((task.owner, idempotency.key))
                if taken is not None:
                    raise taken
                self.keys[(task.owner, idempotency.key)] = IdempotencyKeyTaken(task.task_id, idempotency.request_hash)
        record = TaskRecord(
            task_id=task.task_id,
            owner=task.owner,
            status=TaskStatus.QUEUED,
            seed=task.seed,
            enable_nsfw_detection=task.enable_nsfw_detection,
            response_image_type=task.response_image_type,
            lane=task.lane,
            priority=task.priority,
            created_at=time.time(),
            extra=copy.deepcopy(task.extra),
            image_num=task.image_num,
        )
        with self._lock:
            if task.task_id in self.tasks:
                raise ValueError(f"duplicate task id {task.task_id}")
            self.tasks[task.task_id] = record
            self.payloads[task.task_id] = copy.deepcopy(task.payload)
            self.image_nums[task.task_id] = task.image_num
        return copy.deepcopy(record)

    def get(self, task_id: str, owner: str | None = None) -> TaskRecord | None:
        with self._lock:
            record = self.tasks.get(task_id)
            if record is None or (owner is not None and record.owner != owner):
                return None
            return copy.deepcopy(record)

    def get_payload(self, task_id: str) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self.payloads[task_id])

    def claim(self, task_id: str | None, worker_id: str, lanes: tuple[str, ...] | None = None) -> TaskRecord | None:
        with self._lock:
            queued = [
                t for t in self.tasks.values()
                if t.status is TaskStatus.QUEUED and (task_id is None or t.task_id == task_id)
                and (lanes is None or t.lane in lanes)
            ]  # fmt: skip
            if not queued:
                return None
            record = min(queued, key=lambda t: (-t.priority, t.created_at))
            record.status = TaskStatus.PROCESSING
            record.started_at = time.time()
            record.attempts += 1
            return copy.deepcopy(record)

    def update_progress(self, task_id: str, worker_id: str, progress_percent: int, eta: int) -> bool:
        with self._lock:
            record = self.tasks[task_id]
            if record.status is not TaskStatus.PROCESSING:
                return False
            record.progress_percent, record.eta = progress_percent, eta
            return True

    def complete(self, task_id: str, worker_id: str, images: list[ImageRecord]) -> bool:
        with self._lock:
            record = self.tasks[task_id]
            if record.status is not TaskStatus.PROCESSING:
                return False
            record.status, record.images, record.finished_at = TaskStatus.SUCCEED, list(images), time.time()
            record.progress_percent, record.eta = 100, 0
            return True

    def fail(self, task_id: str, worker_id: str | None, reason: str) -> bool:
        with self._lock:
            record = self.tasks[task_id]
            if record.status.terminal:
                return False
            record.status, record.reason, record.finished_at = TaskStatus.FAILED, reason, time.time()
            return True

    def find_idempotent(self, owner: str, key: str) -> IdempotencyKeyTaken | None:
        with self._lock:
            return self.keys.get((owner, key))

    def request_cancel(self, task_id: str, owner: str) -> CancelOutcome:
        with self._lock:
            record = self.tasks.get(task_id)
            if record is None or record.owner != owner:
                return CancelOutcome.NOT_FOUND
            if record.status is TaskStatus.QUEUED:
                record.status, record.reason, record.finished_at = TaskStatus.FAILED, CANCELLED_REASON, time.time()
                return CancelOutcome.CANCELLED
            if record.status is TaskStatus.PROCESSING:
                record.cancel_requested_at = record.cancel_requested_at or time.time()
                return CancelOutcome.REQUESTED
            return CancelOutcome.FINISHED

    def cancel_requested(self, task_id: str) -> bool:
        with self._lock:
            return self.tasks[task_id].cancel_requested_at is not None

    def queue_position(self, task: TaskRecord, lanes: tuple[str, ...] | None = None) -> int:
        if task.status is not TaskStatus.QUEUED:
            return 0
        key = (-task.priority, task.created_at, task.task_id)
        with self._lock:
            return 1 + sum(
                1 for t in self.tasks.values()
                if t.status is TaskStatus.QUEUED and (lanes is None or t.lane in lanes)
                and (-t.priority, t.created_at, t.task_id) < key
            )  # fmt: skip

    def recent_run_seconds(self, limit: int = 50) -> float | None:
        return None

    def count_unfinished(self, owner: str) -> int:
        with self._lock:
            return sum(1 for t in self.tasks.values() if t.owner == owner and not t.status.terminal)

    def images_created_since(self, owner: str, since: float) -> int:
        with self._lock:
            return sum(
                self.image_nums[t.task_id] for t in self.tasks.values() if t.owner == owner and t.created_at >= since
            )

    def recent_tasks(self, owner: str, limit: int) -> list[TaskRecord]:
        with self._lock:
            mine = [t for t in self.tasks.values() if t.owner == owner]
            mine.sort(key=lambda t: (t.created_at, t.task_id), reverse=True)
            return [copy.deepcopy(t) for t in mine[:limit]]

    def queue_counts(self, owner: str) -> QueueCounts:
        with self._lock:
            tasks = list(self.tasks.values())

        def n(status: TaskStatus, only_mine: bool) -> int:
            return sum(1 for t in tasks if t.status is status and (not only_mine or t.owner == owner))

        return QueueCounts(
            queued=n(TaskStatus.QUEUED, False),
            processing=n(TaskStatus.PROCESSING, False),
            own_queued=n(TaskStatus.QUEUED, True),
            own_processing=n(TaskStatus.PROCESSING, True),
        )


class ListQueue:
    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def enqueue(self, task_id: str, lane: str) -> None:
        self.items.append((task_id, lane))
