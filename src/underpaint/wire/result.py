"""A task as the ``GET /v3/async/task-result`` body (also the webhook ``payload``).

Shape per the wire contract: ``task`` always complete with one of the four statuses, ``extra`` always present
(the Python SDK crashes without it) with the seed as a string and int ``debug_info`` timestamps, ``images``
with an int ``image_url_ttl`` and ``nsfw_detection_result`` either null or a full ``{valid, confidence}``
(never ``{}``), and empty ``videos``/``audios``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus

_DEFAULT_FAILURE = "task failed"


def task_result_body(
    task: TaskRecord,
    url_for: Callable[[ImageRecord], str],
    ttl: int,
    *,
    queue_position: int = 0,
    eta: int | None = None,
) -> dict[str, Any]:
    """``queue_position`` (an extension, 0 unless QUEUED) and ``eta`` of a queued task come from the caller
    (``api/steer.py``); ``eta=None`` keeps the stored one (the worker's estimate while PROCESSING)."""
    status = TaskStatus(task.status)
    reason = task.reason or ""
    if status is TaskStatus.FAILED and not reason:
        reason = _DEFAULT_FAILURE
    images = (
        [
            {
                "image_url": url_for(image),
                "image_url_ttl": int(ttl),
                "image_type": image.image_type,
                "nsfw_detection_result": (
                    None
                    if image.nsfw is None
                    else {"valid": bool(image.nsfw.valid), "confidence": float(image.nsfw.confidence)}
                ),
            }
            for image in task.images
        ]
        if status is TaskStatus.SUCCEED
        else []
    )
    return {
        "task": {
            "task_id": task.task_id,
            "task_type": task.task_type.value,
            "status": status.value,
            "reason": reason,
            "eta": max(0, int(task.eta or 0) if eta is None else eta),
            "progress_percent": min(100, max(0, int(task.progress_percent or 0))),
            "queue_position": max(0, int(queue_position)),
        },
        "extra": {
            "seed": str(task.seed),
            "enable_nsfw_detection": bool(task.enable_nsfw_detection),
            "debug_info": {
                "submit_time_ms": _ms(task.created_at),
                "execute_time_ms": _ms(task.started_at),
                "complete_time_ms": _ms(task.finished_at),
            },
        },
        "images": images,
        "videos": [],
        "audios": [],
    }


def _ms(t: float | None) -> int:
    """Unix time in milliseconds; 0 for a phase not reached yet."""
    return int(t * 1000) if t else 0
