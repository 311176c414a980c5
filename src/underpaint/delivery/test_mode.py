"""Webhook test mode (``extra.webhook.test_mode``): a canned task-result event, no generation.

Novita documents only that a "simulated mock event" arrives; we send a body of the same shape as a real task
result: SUCCEED with a real downloadable sample image, FAILED with a reason and no images.
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image

from underpaint.api.errors import invalid_request
from underpaint.tasks.types import TaskStatus

FAILED_REASON = "test mode: simulated failure"
TASK_TYPE = "IMG_TO_IMG"


def requested_test_status(extra: dict[str, Any] | None) -> TaskStatus | None:
    """The status a test-mode request asks for, or None when test mode is off. Raises a 400 on bad input."""
    webhook = (extra or {}).get("webhook") or {}
    test_mode = webhook.get("test_mode") if isinstance(webhook, dict) else None
    if not isinstance(test_mode, dict) or not test_mode.get("enabled"):
        return None
    wanted = test_mode.get("return_task_status") or TaskStatus.SUCCEED.value
    if wanted not in (TaskStatus.SUCCEED.value, TaskStatus.FAILED.value):
        raise invalid_request(
            "extra.webhook.test_mode.return_task_status must be TASK_STATUS_SUCCEED or TASK_STATUS_FAILED",
            return_task_status=str(wanted),
        )
    return TaskStatus(wanted)


def sample_png(size: int = 64) -> bytes:
    """A small generated gradient PNG used as the test-mode output image."""
    image = Image.new("RGB", (size, size))
    image.putdata([(x * 255 // size, y * 255 // size, 128) for y in range(size) for x in range(size)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def mock_body(
    task_id: str,
    status: TaskStatus,
    extra: dict[str, Any],
    image_urls: list[str],
    image_url_ttl: int,
    seed: int = -1,
    enable_nsfw_detection: bool = False,
) -> dict[str, Any]:
    """A task-result body (wire contract §3.2) for a test-mode task, echoing the webhook config in ``extra``."""
    failed = status is TaskStatus.FAILED
    return {
        "extra": {
            "seed": str(seed),
            "enable_nsfw_detection": enable_nsfw_detection,
            "debug_info": {"request_info": "", "submit_time_ms": "", "execute_time_ms": "", "complete_time_ms": ""},
            "webhook": dict(extra.get("webhook") or {}),
        },
        "task": {
            "task_id": task_id,
            "status": status.value,
            "reason": FAILED_REASON if failed else "",
            "task_type": TASK_TYPE,
            "eta": 0,
            "progress_percent": 0,
        },
        "images": []
        if failed
        else [
            {"image_url": url, "image_url_ttl": image_url_ttl, "image_type": "png", "nsfw_detection_result": None}
            for url in image_urls
        ],
        "videos": [],
        "audios": [],
    }
