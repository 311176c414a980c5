"""``GET /v3/files/{key}``: output images of the local storage, behind signed expiring URLs (no auth header)."""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from underpaint.api.context import ApiContext, error_response
from underpaint.storage.base import StorageError
from underpaint.storage.local import LocalStorage, content_type_for
from underpaint.wire.errors import ApiError


def serve_file(ctx: ApiContext, request: Request, key: str) -> Response:
    """Only the local storage's files are served here (S3 images are fetched from S3 with presigned URLs)."""
    storage = ctx.services.storage
    if not isinstance(storage, LocalStorage):
        return error_response(_not_found())
    expires = request.query_params.get("expires", "")
    sig = request.query_params.get("sig", "")
    if expires.isdigit() and int(expires) < time.time():
        return error_response(ApiError(403, "URL_EXPIRED", "this image URL has expired; fetch the task result again"))
    if not storage.verify(key, expires, sig):
        return error_response(ApiError(403, "INVALID_SIGNATURE", "invalid or missing image URL signature"))
    try:
        path = storage.path_for(key)
    except StorageError:
        return error_response(_not_found())
    if not path.is_file():
        return error_response(_not_found())
    max_age = max(0, int(expires) - int(time.time()))
    return FileResponse(
        path, media_type=content_type_for(key), headers={"Cache-Control": f"private, max-age={max_age}"}
    )


def _not_found() -> ApiError:
    return ApiError(404, "FILE_NOT_FOUND", "image not found (it may have been deleted after the retention period)")
