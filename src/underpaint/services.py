"""The objects one process shares between its layers, built once from one ``Settings`` by ``wiring.py``.

Frozen and typed: every collaborator a caller uses is a named field with a protocol type, so tests build a
``Services`` with fakes by keyword, and nothing reaches past a protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from underpaint.config import Settings
from underpaint.registry import ModelRegistry
from underpaint.storage.base import ImageStorage
from underpaint.storage.urls import ImageUrls
from underpaint.tasks.contract import TaskExtra
from underpaint.tasks.types import TaskQueue, TaskRecord, TaskStatus, TaskStore


@dataclass(frozen=True)
class WorkerState:
    """A worker serving this server's queue, as ``GET /v3/async/queue`` shows it."""

    worker_id: str
    kind: Literal["process", "thread", "celery"]  # the embedded worker's two forms, or a Celery worker
    alive: bool
    concurrency: int
    queues: tuple[str, ...]  # ("*",): every lane (the embedded worker)
    busy: int | None = None  # tasks it runs now; None: it does not say (the store's count of running tasks does)
    last_seen_seconds_ago: float | None = None  # since its last heartbeat (Celery workers)


# The workers serving the queue now: the Celery workers' heartbeat rows, or the embedded worker.
WorkerList = Callable[[], Sequence[WorkerState]]

# The readiness checks of ``GET /health``: each value is ``True``/``"ok"`` or a reason it is not ready.
HealthCheck = Callable[[], Mapping[str, object]]


class WebhookOutbox(Protocol):
    """What the submit path and the terminal hook use of the webhook sender (``delivery.webhooks``)."""

    def validate_url(self, url: str) -> None:
        """Raise ``delivery.ssrf.InvalidWebhookUrl`` for a URL this server will not call."""

    def enqueue(self, task_id: str, owner: str, url: str, body: dict[str, Any]) -> None: ...

    def submit_test_event(self, task_id: str, owner: str, status: TaskStatus | str, extra: TaskExtra) -> None: ...


class Admission(Protocol):
    """Per-key limits at submit (``api.ratelimit.RateLimiter``): raise a 429 ``ApiError`` when over a limit."""

    def check(self, api_key: str, owner: str, image_num: int) -> None: ...

    def admit(self, api_key: str, owner: str, image_num: int) -> AbstractContextManager[None]: ...


class ModelPullJobs(Protocol):
    """``POST /v3/model/pull`` jobs (``delivery.model_pulls.ModelPulls``): each a mapping of ``api.model_pull.
    PullStatus``'s fields."""

    def submit(self, source: str, kind: str | None, name: str | None, sha256: str | None) -> Mapping[str, object]:
        """Raise ``delivery.model_download.PullError`` for a bad request, ``delivery.model_pulls.PullInProgress``
        when another pull of the source runs."""

    def status(self, pull_id: str) -> Mapping[str, object] | None: ...


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: TaskStore
    queue: TaskQueue
    registry: ModelRegistry
    storage: ImageStorage
    image_urls: ImageUrls
    webhooks: WebhookOutbox | None = None
    rate_limiter: Admission | None = None
    health: HealthCheck | None = None
    # Called once when a task ends outside a worker (a queued task cancelled by its owner): queues its webhook.
    on_terminal: Callable[[TaskRecord], None] | None = None
    workers: WorkerList | None = None
    model_pulls: ModelPullJobs | None = None  # None: the pull routes answer 503
