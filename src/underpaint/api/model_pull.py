"""``POST /v3/model/pull`` and ``GET /v3/model/pull/{pull_id}`` (extension, admin keys only): ``underpaint pull``
as a background job of the API process, with progress to poll.

Only keys listed in ``admin_api_keys`` may call them (any other key, or none configured: 403). The download runs
through the SSRF-guarded transport (``delivery/ssrf.py``): public internet hosts (the hubs and their CDNs, every
redirect checked again) are allowed; loopback, private, link-local and metadata addresses are refused unless
listed in ``model_pull_allow_hosts``. The file lands in this process's ``models_dir`` (share it with the workers).
Jobs live in memory: a restart forgets them, and pulling the same source again resumes its partial file.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import httpx
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from underpaint.api.context import ApiContext, json_ok
from underpaint.config import Settings
from underpaint.delivery.model_download import PullError, PullJobs, parse_source
from underpaint.delivery.ssrf import GuardedTransport
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


def pull_jobs(settings: Settings) -> PullJobs:
    def client() -> httpx.Client:
        transport = GuardedTransport(settings.model_pull_allow_hosts)
        return httpx.Client(transport=transport, timeout=httpx.Timeout(30.0, read=120.0))

    return PullJobs(settings.models_dir, client)


def install_model_pull(app: FastAPI, ctx: ApiContext) -> PullJobs:
    settings = ctx.services.settings
    jobs = pull_jobs(settings)

    @app.post(PULL_PATH)
    async def start_pull(request: Request) -> Response:
        _admin_only(settings, request)
        try:
            body = PullBody.model_validate(json.loads(await request.body() or b"null"))
        except (ValueError, ValidationError) as exc:
            raise invalid_request(f"request body: {str(exc).splitlines()[0]}", field="body") from None
        try:
            parse_source(body.source)
        except PullError as exc:
            raise invalid_request(str(exc), field="source") from None
        job = jobs.start(body.source, body.type, body.name, body.sha256)
        return json_ok(PullStatus.model_validate(job.as_dict()).model_dump(mode="json"))

    @app.get(PULL_STATUS_PATH)
    def pull_status(request: Request, pull_id: str) -> Response:
        _admin_only(settings, request)
        job = jobs.get(pull_id)
        if job is None:
            raise ApiError(404, "PULL_NOT_FOUND", f"pull {pull_id!r} not found", {"pull_id": pull_id})
        return json_ok(PullStatus.model_validate(job.as_dict()).model_dump(mode="json"))

    return jobs
