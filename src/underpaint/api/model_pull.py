"""``POST /v3/model/pull`` and ``GET /v3/model/pull/{pull_id}`` (extension, admin keys only): ``underpaint pull``
as a durable background job (``delivery/model_pulls.py``), with progress to poll on any API node.

Only keys listed in ``admin_api_keys`` may call them (any other key, or none configured: 403). The download runs
through the SSRF-guarded transport (``delivery/ssrf.py``): public internet hosts (the hubs and their CDNs, every
redirect checked again) are allowed; loopback, private, link-local and metadata addresses are refused unless
listed in ``model_pull_allow_hosts``. The file lands in the ``models_dir`` of the node that runs the pull: every
node must share the models folder (docs/deploy.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from underpaint.api.context import ApiContext, json_ok
from underpaint.config import Settings
from underpaint.delivery.model_download import PullError
from underpaint.delivery.model_pulls import PullInProgress
from underpaint.services import ModelPullJobs
from underpaint.wire.errors import ApiError, invalid_request, missing_api_key

PULL_PATH = "/v3/model/pull"
PULL_STATUS_PATH = "/v3/model/pull/{pull_id}"


class PullBody(BaseModel):
    """What to pull: ``source`` as ``underpaint pull`` takes it; ``type`` (the models folder) when the file's
    tensors do not tell; ``name`` to file it under; ``sha256`` to check it against."""

    model_config = ConfigDict(extra="forbid")

    source: str
    type: str | None = None
    name: str | None = None
    sha256: str | None = None


class PullStatus(BaseModel):
    pull_id: str
    source: str
    status: str  # queued | downloading | succeeded | failed
    bytes_done: int
    bytes_total: int | None
    path: str | None
    kind: str | None
    sha256: str | None
    reason: str | None
    attempts: int  # times a runner took it: more than 1 when a node stopped during the download and another resumed


def _admin_only(settings: Settings, request: Request) -> None:
    header = (request.headers.get("authorization") or "").strip()
    key = header[7:].strip() if header.lower().startswith("bearer ") else header
    if not key:
        raise missing_api_key()
    digest = hashlib.sha256(key.encode()).digest()
    allowed = False
    for admin in settings.admin_api_keys:
        allowed |= hmac.compare_digest(digest, hashlib.sha256(admin.encode()).digest())
    if not allowed:
        raise ApiError(403, "ADMIN_KEY_REQUIRED", "this route needs an admin API key (settings.admin_api_keys)")


def install_model_pull(app: FastAPI, ctx: ApiContext) -> None:
    settings = ctx.services.settings
    pulls = ctx.services.model_pulls

    def jobs() -> ModelPullJobs:
        if pulls is None:
            raise ApiError(503, "MODEL_PULL_UNAVAILABLE", "this server runs no model pulls")
        return pulls

    @app.post(PULL_PATH)
    async def start_pull(request: Request) -> Response:
        _admin_only(settings, request)
        try:
            body = PullBody.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, ValidationError) as exc:
            raise invalid_request(f"request body: {str(exc).splitlines()[0]}", field="body") from None
        try:
            job = await run_in_threadpool(jobs().submit, body.source, body.type, body.name, body.sha256)
        except PullError as exc:
            raise invalid_request(str(exc), field=exc.field) from None
        except PullInProgress as exc:
            raise ApiError(409, "PULL_IN_PROGRESS", str(exc), {"pull_id": exc.pull_id}) from None
        return json_ok(PullStatus.model_validate(job).model_dump(mode="json"))

    @app.get(PULL_STATUS_PATH)
    def pull_status(request: Request, pull_id: str) -> Response:
        _admin_only(settings, request)
        job = jobs().status(pull_id)
        if job is None:
            raise ApiError(404, "PULL_NOT_FOUND", f"pull {pull_id!r} not found", {"pull_id": pull_id})
        return json_ok(PullStatus.model_validate(job).model_dump(mode="json"))
