"""Response bodies as pydantic models: what ``/openapi.json`` publishes, and what the extension routes build.

The Novita routes build their bodies by hand for speed (``serialize.task_result_body`` is on the polling path);
these models describe exactly those shapes (``extra="forbid"``: a field added to a body and not here fails the
schema test in ``tests/api/test_openapi.py``). The extension routes (``GET /v3/async/tasks``,
``GET /v3/async/queue``) build their bodies from these models directly.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

TaskStatusName = Literal["TASK_STATUS_QUEUED", "TASK_STATUS_PROCESSING", "TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"]


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorBody(_Out):
    """Every non-200 reply: the HTTP status again as ``code``, a stable ``reason``, a message for people."""

    code: int = Field(description="the HTTP status")
    reason: str = Field(description="stable machine-readable reason, e.g. INVALID_REQUEST_BODY")
    message: str
    metadata: dict[str, Any] = Field(description="details, e.g. the offending `field`")


class SubmitResponse(_Out):
    task_id: str


class NsfwResultOut(_Out):
    valid: bool
    confidence: float = Field(ge=0, le=100)


class ImageOut(_Out):
    image_url: str = Field(description="signed download URL, valid for image_url_ttl seconds")
    image_url_ttl: int
    image_type: Literal["png", "webp", "jpeg"]
    nsfw_detection_result: NsfwResultOut | None


class TaskOut(_Out):
    task_id: str
    task_type: Literal["IMG_TO_IMG"]
    status: TaskStatusName
    reason: str = Field(description="why a task failed ('cancelled by the client' after task-cancel); else ''")
    eta: int = Field(ge=0, description="seconds until the task is expected to finish (0 when unknown or ended)")
    progress_percent: int = Field(ge=0, le=100)
    queue_position: int = Field(
        0, ge=0, description="extension: 1 for the next task to run while QUEUED, 0 once it runs or has ended"
    )


class DebugInfo(_Out):
    submit_time_ms: int
    execute_time_ms: int = Field(description="0 until a worker starts the task")
    complete_time_ms: int = Field(description="0 until the task ends")


class ResultExtra(_Out):
    seed: str = Field(description="the seed used (a random one when the request said -1), as a string")
    enable_nsfw_detection: bool
    debug_info: DebugInfo


class TaskResultResponse(_Out):
    task: TaskOut
    extra: ResultExtra
    images: list[ImageOut] = Field(description="only when the task succeeded")
    videos: list[dict[str, Any]] = Field(max_length=0)
    audios: list[dict[str, Any]] = Field(max_length=0)


class CancelRequest(_Out):
    task_id: str


class CancelResponse(_Out):
    task_id: str


class ModelTypeOut(_Out):
    name: Literal["checkpoint", "lora", "vae", "textualinversion", "controlnet", "ipadapter", "upscaler"]
    display_name: str


class ModelOut(_Out):
    id: int
    name: str
    sd_name: str = Field(description="the name to pass as model_name / sd_vae")
    sd_name_in_api: str
    type: ModelTypeOut
    status: int
    hash_sha256: str
    categories: list[str]
    tags: list[str]
    cover_url: str
    source: str
    base_model: str
    base_model_type: Literal["Standard", "Inpainting"]
    download_url: str
    download_url_ttl: int
    is_sdxl: bool
    is_nsfw: bool
    visibility: Literal["public", "private"]


class Pagination(_Out):
    next_cursor: str = Field(description="pass as pagination.cursor for the next page; '' on the last page")


class ModelListResponse(_Out):
    models: list[ModelOut]
    pagination: Pagination


class TaskSummary(_Out):
    task_id: str
    status: TaskStatusName
    reason: str
    progress_percent: int = Field(ge=0, le=100)
    eta: int = Field(ge=0)
    image_num: int = Field(description="images requested")
    created_time_ms: int
    finished_time_ms: int = Field(description="0 while the task runs")


class TaskListResponse(_Out):
    """Extension: the calling key's most recent tasks, newest first."""

    tasks: list[TaskSummary]


class QueueCountsOut(_Out):
    queued: int = Field(ge=0)
    processing: int = Field(ge=0)


class WorkerOut(_Out):
    worker_id: str
    kind: Literal["process", "thread", "celery"]
    alive: bool
    busy: int = Field(ge=0, description="tasks it is running now")
    concurrency: int = Field(ge=1)
    queues: list[str] = Field(description="the lanes it serves; ['*'] for the embedded worker (every lane)")
    last_seen_seconds_ago: float | None = Field(description="since its last heartbeat (Celery workers)")


class QueueStatusResponse(_Out):
    """Extension: the queue (all keys) and the caller's share of it, and the workers serving it."""

    mode: Literal["embedded", "celery"]
    queue: QueueCountsOut
    mine: QueueCountsOut
    workers_alive: int = Field(ge=0)
    workers: list[WorkerOut]


class HealthResponse(BaseModel):
    status: Literal["ok", "degraded", "unavailable"]
    checks: dict[str, Any] | None = None
