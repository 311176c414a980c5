"""Novita-style errors: ``{code, reason, message, metadata}`` with the HTTP status as ``code``.

Anything raised as ``ApiError`` reaches the client in that shape; handlers in ``api/app.py`` map validation
errors and unexpected exceptions to it too, so a client never sees a bare 500 page.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        metadata: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.metadata = metadata or {}
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"code": self.status, "reason": self.reason, "message": self.message, "metadata": self.metadata}


def invalid_request(message: str, **metadata: Any) -> ApiError:
    return ApiError(400, "INVALID_REQUEST_BODY", message, metadata)


def invalid_image_size(message: str, **metadata: Any) -> ApiError:
    return ApiError(400, "INVALID_IMAGE_SIZE", message, metadata)


def invalid_image_format(message: str, **metadata: Any) -> ApiError:
    return ApiError(400, "INVALID_IMAGE_FORMAT", message, metadata)


def image_too_large(message: str, **metadata: Any) -> ApiError:
    return ApiError(400, "IMAGE_FILE_EXCEEDS_MAX_SIZE", message, metadata)


def image_too_many_pixels(message: str, **metadata: Any) -> ApiError:
    return ApiError(400, "IMAGE_EXCEEDS_MAX_RESOLUTION", message, metadata)


def invalid_custom_output_path(message: str, **metadata: Any) -> ApiError:
    return ApiError(400, "INVALID_CUSTOM_OUTPUT_PATH", message, metadata)


def missing_api_key() -> ApiError:
    return ApiError(400, "MISSING_API_KEY", "missing API key: send 'Authorization: Bearer <key>'")


def invalid_api_key() -> ApiError:
    return ApiError(403, "INVALID_API_KEY", "invalid API key")


def task_not_found(task_id: str) -> ApiError:
    return ApiError(404, "TASK_NOT_FOUND", f"task {task_id!r} not found", {"task_id": task_id})


def rate_limited(message: str, retry_after: int, **metadata: Any) -> ApiError:
    return ApiError(429, "RATE_LIMIT_EXCEEDED", message, metadata, headers={"Retry-After": str(max(1, retry_after))})


def task_not_cancellable(task_id: str, status: str) -> ApiError:
    return ApiError(
        400,
        "TASK_NOT_CANCELLABLE",
        f"task {task_id!r} has already ended ({status}); only a queued or processing task can be cancelled",
        {"task_id": task_id, "status": status},
    )


def idempotency_key_reused(key: str, task_id: str) -> ApiError:
    return ApiError(
        409,
        "IDEMPOTENCY_KEY_REUSED",
        f"Idempotency-Key {key!r} was already used with a different request body (task {task_id!r}); "
        "send the same body to get that task again, or use a new key for a new request",
        {"idempotency_key": key, "task_id": task_id},
    )
