"""Task records and the store/queue seams shared by the API, the embedded worker and Celery workers.

The store is the single source of truth for a task (status, progress, results, its input payload). A queue only
tells a worker *which* task to claim next; claiming is an atomic transition in the store, so a task delivered
twice by a broker still runs to completion at most once.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from underpaint.tasks.contract import TaskExtra, TaskRequest, TaskType


class TaskStatus(enum.StrEnum):
    QUEUED = "TASK_STATUS_QUEUED"
    PROCESSING = "TASK_STATUS_PROCESSING"
    SUCCEED = "TASK_STATUS_SUCCEED"
    FAILED = "TASK_STATUS_FAILED"

    @property
    def terminal(self) -> bool:
        return self in (TaskStatus.SUCCEED, TaskStatus.FAILED)


@dataclass(frozen=True)
class NsfwResult:
    valid: bool
    confidence: float  # 0..100


@dataclass(frozen=True)
class ImageRecord:
    key: str  # storage key (local path relative to the image root, or S3 key)
    image_type: str  # png | webp | jpeg
    nsfw: NsfwResult | None = None
    # Where the image lives: "local", "s3" (default store), or "custom" (user bucket; see ``location``).
    backend: str = "local"
    location: dict[str, str] = field(default_factory=dict)  # e.g. {"bucket":..., "region":...}


@dataclass
class TaskRecord:
    task_id: str
    owner: str  # hash of the API key; raw keys are never stored
    status: TaskStatus
    reason: str = ""
    progress_percent: int = 0
    eta: int = 0
    seed: int = -1
    enable_nsfw_detection: bool = False
    response_image_type: str = "png"
    lane: str = "default"
    priority: int = 0  # higher runs first in the embedded queue
    attempts: int = 0
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    images: list[ImageRecord] = field(default_factory=list)
    # The request's ``extra`` object as accepted (webhook, custom_storage ...), echoed in webhooks.
    extra: TaskExtra = field(default_factory=TaskExtra)
    task_type: TaskType = TaskType.IMG_TO_IMG
    image_num: int = 1
    # Lease: the worker currently running the task and when its lease runs out (PROCESSING only).
    worker_id: str | None = None
    lease_expires_at: float | None = None
    # When the owner asked to cancel it while it was PROCESSING (the worker then stops and ends it FAILED).
    cancel_requested_at: float | None = None
    # See ``tasks.batching``: equal batch keys share a sampler call (None: never batched); the model key names
    # the checkpoint + LoRA set the task loads.
    batch_key: str | None = None
    model_key: str | None = None


# The ``reason`` of a task its owner cancelled (``POST /v3/async/task-cancel``); it ends TASK_STATUS_FAILED.
CANCELLED_REASON = "cancelled by the client"

# How long an ``Idempotency-Key`` is remembered.
IDEMPOTENCY_TTL_SECONDS = 24 * 3600


class CancelOutcome(enum.Enum):
    CANCELLED = "cancelled"  # was QUEUED: now FAILED, it never runs (the caller announces the terminal state)
    REQUESTED = "requested"  # is PROCESSING: its worker stops within a sampler step and ends it FAILED
    NOT_FOUND = "not_found"  # unknown, or another owner's
    FINISHED = "finished"  # already SUCCEED/FAILED: nothing to cancel


@dataclass(frozen=True)
class IdempotencyKey:
    """An ``Idempotency-Key`` header with the hash of the request it came with."""

    key: str
    request_hash: str


class IdempotencyKeyTaken(Exception):
    """``create`` found the owner's key already recorded (by an earlier or a concurrent submit)."""

    def __init__(self, task_id: str, request_hash: str) -> None:
        super().__init__(f"idempotency key already used for task {task_id}")
        self.task_id = task_id
        self.request_hash = request_hash


@dataclass
class NewTask:
    task_id: str
    owner: str
    # The validated request as the worker runs it (``tasks.contract``): model names resolved to registry
    # ``sd_name``s, the seed resolved (never -1), images as the client's base64 text.
    request: TaskRequest
    extra: TaskExtra = field(default_factory=TaskExtra)
    lane: str = "default"
    priority: int = 0

    @property
    def seed(self) -> int:
        return self.request.seed

    @property
    def image_num(self) -> int:
        return self.request.image_num


@dataclass(frozen=True)
class QueueCounts:
    """Unfinished tasks: all owners' and one owner's, by status (``GET /v3/async/queue``)."""

    queued: int = 0
    processing: int = 0
    own_queued: int = 0
    own_processing: int = 0


def owner_of(api_key: str) -> str:
    """The owner hash stored with a task: raw API keys are never stored or logged."""
    return hashlib.sha256(api_key.encode("utf-8")).hexdigest()


class TaskStore(Protocol):
    # How long a claim stays valid without a heartbeat; workers renew well within it.
    lease_seconds: float
    # True when ``get`` is a local point read cheaper than a thread hop (SQLite): the API may call it on its
    # event loop. False for a networked database.
    inline_reads: bool

    def create(self, task: NewTask, idempotency: IdempotencyKey | None = None) -> TaskRecord:
        """With ``idempotency``: raises ``IdempotencyKeyTaken`` (and creates nothing) when the owner's key is
        already recorded and younger than ``IDEMPOTENCY_TTL_SECONDS``."""
        ...

    def find_idempotent(self, owner: str, key: str) -> IdempotencyKeyTaken | None:
        """The live record of ``owner``'s ``key`` (as the exception ``create`` would raise), or None."""
        ...

    def purge_idempotency_keys(self, older_than: float) -> int:
        """Forget keys recorded before ``older_than``; returns how many."""
        ...

    def request_cancel(self, task_id: str, owner: str) -> CancelOutcome:
        """Owner's cancel: a QUEUED task ends FAILED at once, a PROCESSING one is flagged for its worker."""
        ...

    def cancel_requested(self, task_id: str) -> bool:
        """True when the owner asked to cancel ``task_id`` (a cheap point read, polled by its worker)."""
        ...

    def queue_position(self, task: TaskRecord, lanes: tuple[str, ...] | None = None) -> int:
        """For a QUEUED task: 1 + the QUEUED tasks (in ``lanes``, all when None) claimed before it; else 0."""
        ...

    def recent_run_seconds(self, limit: int = 50) -> float | None:
        """Mean run time (start to finish) of the last ``limit`` successful tasks; None before the first."""
        ...

    def get(self, task_id: str, owner: str | None = None) -> TaskRecord | None:
        """``owner=None`` is for workers; the API always passes the caller's owner hash."""
        ...

    def get_request(self, task_id: str) -> TaskRequest:
        """The task's typed request. Raises ``KeyError`` when the input is gone (task ended or purged)."""
        ...

    def claim(
        self,
        task_id: str | None,
        worker_id: str,
        lanes: tuple[str, ...] | None = None,
        *,
        prefer_model: str | None = None,
        max_wait_s: float | None = None,
        queued_before: float | None = None,
    ) -> TaskRecord | None:
        """Atomically move a QUEUED task (the given one, or the next by priority/age) to PROCESSING.

        Also reclaims a PROCESSING task whose lease expired. Returns None if nothing can be claimed. For the next
        task, ``prefer_model`` (a model key) puts tasks for that model first within a priority, except that tasks
        queued for more than ``max_wait_s`` go before them, so nothing starves (``store._affinity_order``);
        ``queued_before`` (a store clock time) only considers tasks created before it.
        """
        ...

    def claim_batch(
        self, batch_key: str, worker_id: str, limit: int, lanes: tuple[str, ...] | None = None
    ) -> list[TaskRecord]:
        """Atomically claim up to ``limit`` QUEUED tasks with this batch key (priority/age order)."""
        ...

    def update_progress(self, task_id: str, worker_id: str, progress_percent: int, eta: int) -> bool:
        """Also renews the lease. Returns False if this worker no longer owns the task."""
        ...

    def renew_lease(self, task_id: str, worker_id: str) -> bool:
        """Heartbeat without progress (model loading ...). Returns False if this worker no longer owns the task."""
        ...

    def complete(self, task_id: str, worker_id: str, images: list[ImageRecord]) -> bool:
        """PROCESSING -> SUCCEED, only for the lease holder. False means: discard your results."""
        ...

    def complete_unleased(self, task_id: str, images: list[ImageRecord]) -> bool:
        """Unfinished -> SUCCEED without a lease (webhook test mode, which runs no generation). False if ended."""
        ...

    def fail(self, task_id: str, worker_id: str | None, reason: str) -> bool:
        """-> FAILED. With a worker_id only for the lease holder; ``None`` fails any unfinished task."""
        ...

    def requeue_expired(self, now: float | None = None) -> list[str]:
        """PROCESSING tasks whose lease ran out before ``now`` go back to QUEUED, or to FAILED once they used
        up their attempts. Returns the ids this call changed (check ``status`` to tell the two apart)."""
        ...

    def image_keys(self, task_ids: Iterable[str]) -> dict[str, tuple[TaskStatus, frozenset[str]]]:
        """For each of ``task_ids`` that exists: its status and the keys of the images it records."""
        ...

    def purge(self, older_than: float, limit: int = 500) -> list[TaskRecord]:
        """Delete up to ``limit`` ended tasks (and inputs) finished before ``older_than``; returns them."""
        ...

    def list_queued_ids(self, lanes: tuple[str, ...] | None = None) -> list[str]:
        """QUEUED task ids in claim order (priority, then age)."""
        ...

    def count_by_status(self) -> dict[TaskStatus, int]: ...

    def count_unfinished(self, owner: str) -> int: ...

    def images_created_since(self, owner: str, since: float) -> int:
        """Images requested (image_num summed) by ``owner`` in tasks created at or after ``since``."""
        ...

    def recent_tasks(self, owner: str, limit: int) -> list[TaskRecord]:
        """``owner``'s ``limit`` most recently created tasks, newest first."""
        ...

    def queue_counts(self, owner: str) -> QueueCounts:
        """QUEUED and PROCESSING tasks overall and ``owner``'s own, in one read."""
        ...


class ImageDeleter(Protocol):
    """What the task lifecycle needs of an image store (``storage.base.ImageStorage`` is one): its backend name
    (an image records which backend holds it) and deletion."""

    name: str

    def delete(self, key: str) -> None: ...


@runtime_checkable
class ImageLister(ImageDeleter, Protocol):
    """An image store that can list what it holds (for the orphan sweep): keys in order, with modified times."""

    def list_keys(self, start_after: str = "", limit: int = 1000) -> list[tuple[str, float]]: ...


class TaskQueue(Protocol):
    """Tells workers that a task is ready. The embedded queue wakes the in-process worker; Celery sends a message."""

    def enqueue(self, task_id: str, lane: str) -> None: ...
