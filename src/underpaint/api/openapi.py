"""``GET /openapi.json``: the API as OpenAPI 3.1, built from the pydantic models that validate requests
(``api/schemas.py``) and describe responses (``api/responses.py``), so the document cannot drift from the code
without ``tests/api/test_openapi.py`` noticing.

Only routes this app really serves are published: an extension that is not installed (``task-cancel`` and the
``Idempotency-Key`` header come with the "steer a task" work) is left out rather than documented wrongly.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from underpaint import __version__
from underpaint.api import responses as r
from underpaint.api.extensions import DEFAULT_TASK_LIMIT, MAX_TASK_LIMIT, QUEUE_PATH, TASKS_PATH
from underpaint.api.model_pull import PULL_PATH, PULL_STATUS_PATH, PullBody, PullStatus
from underpaint.api.schemas import Img2ImgBody, InpaintingBody, Txt2ImgBody, UpscaleBody

SUBMIT_PATH = "/v3/async/img2img"
TXT2IMG_PATH = "/v3/async/txt2img"
INPAINTING_PATH = "/v3/async/inpainting"
UPSCALE_PATH = "/v3/async/upscale"
RESULT_PATH = "/v3/async/task-result"
CANCEL_PATH = "/v3/async/task-cancel"
MODELS_PATH = "/v3/model"
FILES_PATH = "/v3/files/{key}"
HEALTH_PATH = "/health"

_REF = "#/components/schemas/{model}"
_REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    Img2ImgBody,
    Txt2ImgBody,
    InpaintingBody,
    UpscaleBody,
    r.CancelRequest,
    PullBody,
)
_RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    PullStatus,
    r.ErrorBody,
    r.SubmitResponse,
    r.TaskResultResponse,
    r.CancelResponse,
    r.ModelListResponse,
    r.TaskListResponse,
    r.QueueStatusResponse,
    r.HealthResponse,
)

DESCRIPTION = """\
Underpaint speaks Novita AI's v3 async image API: submit with `POST /v3/async/img2img`,
`POST /v3/async/txt2img` (hires fix, SDXL refiner) or `POST /v3/async/upscale` (an upscaler model, no diffusion),
poll `GET /v3/async/task-result` until the task is `TASK_STATUS_SUCCEED` or `TASK_STATUS_FAILED`, then download the
images from their signed URLs. `GET /v3/model` lists the models this server has.

**Auth:** every `/v3/async/*` and `/v3/model` request carries `Authorization: Bearer <API key>` (the bare key
without `Bearer` is accepted too, as Novita's JS SDK sends it). A key sees only its own tasks and images.

**Errors:** every non-200 answer has the body `{code, reason, message, metadata}`; `code` repeats the HTTP status,
`reason` is a stable name (listed per status below) and `metadata.field` names the offending field when there is
one. Unknown routes answer 404 `API_NOT_FOUND`, wrong methods 405 `METHOD_NOT_ALLOWED`.

**Extensions** (not in Novita's API; their summaries say "extension"): the key's recent tasks, the queue and worker status,
and, where installed, task cancellation, `Idempotency-Key` on submit and `task.queue_position`.

A browser playground is at `/playground`."""


# reason → when, per status; the documented examples of each error response.
_REASONS: dict[int, dict[str, str]] = {
    400: {
        "INVALID_REQUEST_BODY": "a field is missing, of the wrong type or out of range (metadata.field names it)",
        "INVALID_IMAGE_SIZE": "width/height out of range",
        "INVALID_IMAGE_FORMAT": "an image is not valid base64 of a still PNG, JPEG or WebP",
        "IMAGE_FILE_EXCEEDS_MAX_SIZE": "an image is larger than 10 MB (upscale: 30 MB)",
        "IMAGE_EXCEEDS_MAX_RESOLUTION": "an image has more than 16 megapixels (upscale: a side over 2048), or is a "
        "decompression bomb",
        "INVALID_CUSTOM_OUTPUT_PATH": "extra.custom_storage is not usable",
        "MISSING_API_KEY": "no Authorization header",
    },
    403: {"INVALID_API_KEY": "the key is not one of this server's"},
    404: {"TASK_NOT_FOUND": "no such task for this key"},
    405: {"METHOD_NOT_ALLOWED": "wrong HTTP method for the route"},
    429: {"RATE_LIMIT_EXCEEDED": "the key's images-per-minute or queued-task limit; see Retry-After"},
    500: {"CREATE_TASK_FAILED": "internal error on submit", "GET_RESULT_FAILED": "internal error reading a task"},
}


_IDEMPOTENCY_CONFLICT = {"IDEMPOTENCY_KEY_REUSED": "the Idempotency-Key was used before with another body"}


def build_openapi(served: Collection[str]) -> dict[str, Any]:
    """The document for an app serving the paths in ``served`` (route templates, e.g. ``/v3/files/{key}``)."""
    _, defs = models_json_schema(
        [(m, "validation") for m in _REQUEST_MODELS] + [(m, "serialization") for m in _RESPONSE_MODELS],
        ref_template=_REF,
    )
    paths = {path: item for path, item in _paths(CANCEL_PATH in served).items() if path in served}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Underpaint", "version": __version__, "description": DESCRIPTION},
        "servers": [{"url": "/"}],
        "security": [{"bearer": []}],
        "tags": [
            {"name": "img2img", "description": "Novita v3 async Img2Img"},
            {"name": "txt2img", "description": "Novita v3 async Txt2Img"},
            {"name": "inpainting", "description": "Novita v3 async Inpainting"},
            {"name": "upscale", "description": "Novita v3 async Upscale"},
            {"name": "models", "description": "Novita v3 Query Model"},
            {"name": "extensions", "description": "Underpaint additions to the Novita API"},
            {"name": "service", "description": "Files and health"},
        ],
        "paths": paths,
        "components": {
            "schemas": defs.get("$defs", {}),
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"}
            },
            "responses": _error_responses(),
        },
    }


def _schema(name: str) -> dict[str, str]:
    return {"$ref": _REF.format(model=name)}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _schema(name)}}}


def _error_response(status: int, reasons: dict[str, str]) -> dict[str, Any]:
    examples = {
        reason: {"summary": when, "value": {"code": status, "reason": reason, "message": when, "metadata": {}}}
        for reason, when in reasons.items()
    }
    response: dict[str, Any] = {
        "description": "; ".join(f"`{reason}`: {when}" for reason, when in reasons.items()),
        "content": {"application/json": {"schema": _schema("ErrorBody"), "examples": examples}},
    }
    if status == 429:
        response["headers"] = {
            "Retry-After": {"description": "seconds to wait", "schema": {"type": "integer", "minimum": 1}}
        }
    return response


def _error_responses() -> dict[str, Any]:
    return {f"E{status}": _error_response(status, reasons) for status, reasons in _REASONS.items()}


def _errors(*statuses: int, own: dict[int, dict[str, str]] | None = None) -> dict[str, Any]:
    """The shared error responses of ``statuses`` by reference, and a route's ``own`` reasons per status."""
    out: dict[str, Any] = {str(status): {"$ref": f"#/components/responses/E{status}"} for status in statuses}
    for status, reasons in (own or {}).items():
        out[str(status)] = _error_response(status, reasons)
    return out


def _query(name: str, description: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


def _paths(idempotency: bool) -> dict[str, Any]:
    submit_params: list[dict[str, Any]] = []
    if idempotency:
        submit_params.append(
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "extension: a submit repeated with the same key and the same body (same API key, "
                "within 24 h) answers the first one's task_id instead of creating a second task; the same key with "
                "another body is 409 `IDEMPOTENCY_KEY_REUSED`. 1 to 255 printable ASCII characters (a UUID, say).",
                "schema": {"type": "string", "minLength": 1, "maxLength": 255},
            }
        )
    string = {"type": "string"}
    boolean = {"type": "string", "enum": ["true", "false"]}

    def submit(tag: str, summary: str, body: str, description: str = "") -> dict[str, Any]:
        operation: dict[str, Any] = {
            "tags": [tag],
            "operationId": tag,
            "summary": summary,
            "parameters": submit_params,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _schema(body)}}},
            "responses": {
                "200": _json("SubmitResponse", "the task was queued"),
                **_errors(400, 403, 429, 500),
                **(_errors(own={409: _IDEMPOTENCY_CONFLICT}) if idempotency else {}),
            },
        }
        if description:
            operation["description"] = description
        return {"post": operation}

    return {
        SUBMIT_PATH: submit("img2img", "Submit an image-to-image task", "Img2ImgBody"),
        TXT2IMG_PATH: submit(
            "txt2img",
            "Submit a text-to-image task",
            "Txt2ImgBody",
            "A1111 semantics. `hires_fix` upscales the first pass to its target (`Latent` or an upscaler model from "
            "`GET /v3/model?filter.types=upscaler`) and runs a second pass; its target may not be smaller than "
            "`width`/`height`. `refiner` switches to an SDXL refiner at `switch_at`: `refiner.model_name` (an "
            "extension) or the server's `refiner_checkpoint`; a 400 names `request.refiner` when there is none. "
            "`controlnet` and `ip_adapters` are extensions (as in img2img). `restore_faces` and "
            "`enable_transparent_background` are refused with a 400 while no model for them is installed.",
        ),
        INPAINTING_PATH: submit(
            "inpainting",
            "Submit an inpainting task",
            "InpaintingBody",
            "Repaints the white area of `mask_image_base64` (same size as the image; real alpha counts where it has "
            "any, else luminance) with A1111 semantics. No width/height: the output has the image's size, and every "
            "pixel outside the blurred mask is the input's. `inpainting_full_res` and `inpainting_mask_invert` take "
            "booleans or 0/1. `controlnet` and `ip_adapters` are extensions (as in img2img). task-result reports "
            "`task_type` `INPAINTING`.",
        ),
        UPSCALE_PATH: submit(
            "upscale",
            "Submit an upscale task",
            "UpscaleBody",
            "The image (at most 2048 x 2048, 30 MB) through an upscaler of `GET /v3/model?filter.types=upscaler`, "
            "A1111 Extras semantics: each side times `scale_factor` floored to a multiple of 8; the model runs up to "
            "3 times while the image is smaller, then Lanczos. No diffusion, no seed; poll task-result as for "
            "img2img (`task.task_type` `UPSCALE`).",
        ),
        RESULT_PATH: {
            "get": {
                "tags": ["img2img"],
                "operationId": "taskResult",
                "summary": "A task's status, progress and images",
                "parameters": [_query("task_id", "from the submit answer", string, required=True)],
                "responses": {"200": _json("TaskResultResponse", "the task"), **_errors(400, 403, 404, 500)},
            }
        },
        CANCEL_PATH: {
            "post": {
                "tags": ["extensions"],
                "operationId": "taskCancel",
                "summary": "Cancel a queued or running task (extension)",
                "description": "The task ends `TASK_STATUS_FAILED` with reason `cancelled by the client`.",
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _schema("CancelRequest")}},
                },
                "responses": {
                    "200": _json("CancelResponse", "the task is cancelled (or being stopped)"),
                    **_errors(
                        403,
                        404,
                        own={
                            500: {"CANCEL_TASK_FAILED": "internal error while cancelling; retry"},
                            400: {
                                "TASK_NOT_CANCELLABLE": "the task has already ended",
                                "INVALID_REQUEST_BODY": "task_id is missing",
                                "MISSING_API_KEY": "no Authorization header",
                            },
                        },
                    ),
                },
            }
        },
        TASKS_PATH: {
            "get": {
                "tags": ["extensions"],
                "operationId": "listTasks",
                "summary": "The key's most recent tasks, newest first (extension)",
                "parameters": [
                    _query(
                        "limit",
                        f"how many (default {DEFAULT_TASK_LIMIT})",
                        {"type": "integer", "minimum": 1, "maximum": MAX_TASK_LIMIT, "default": DEFAULT_TASK_LIMIT},
                    )
                ],
                "responses": {"200": _json("TaskListResponse", "the tasks"), **_errors(400, 403, 500)},
            }
        },
        PULL_PATH: {
            "post": {
                "tags": ["extensions"],
                "operationId": "pullModel",
                "summary": "Download a model into the models folder in the background (extension, admin keys only)",
                "description": "`source`: an http(s) URL, `hf:<owner>/<repo>/<file>[@revision]` or "
                "`civitai:<model version id>`. Resumes a partial download of the same source, checks the size and "
                "the sha256 (given, or Hugging Face's), renames atomically into `models/<type>/`. Downloads go "
                "through the SSRF guard: public hosts only, private ones when listed in `model_pull_allow_hosts`. "
                "The pull is kept in the database: poll the answer's `pull_id` on any API node; a pull whose node "
                "stops is resumed by another. The same request while its pull runs answers that pull.",
                "requestBody": {"required": True, "content": {"application/json": {"schema": _schema("PullBody")}}},
                "responses": {
                    "200": _json("PullStatus", "the pull, queued"),
                    **_errors(
                        500,
                        own={
                            400: {
                                "INVALID_REQUEST_BODY": "a bad source, type, sha256 or body",
                                "MISSING_API_KEY": "no key",
                            },
                            403: {"ADMIN_KEY_REQUIRED": "the key is not in admin_api_keys"},
                            409: {"PULL_IN_PROGRESS": "another request for this source runs (metadata.pull_id)"},
                            503: {"MODEL_PULL_UNAVAILABLE": "this server runs no model pulls"},
                        },
                    ),
                },
            }
        },
        PULL_STATUS_PATH: {
            "get": {
                "tags": ["extensions"],
                "operationId": "pullStatus",
                "summary": "A model pull's progress and outcome (extension, admin keys only)",
                "parameters": [
                    {
                        "name": "pull_id",
                        "in": "path",
                        "required": True,
                        "schema": string,
                        "description": "from the pull",
                    }
                ],
                "responses": {
                    "200": _json("PullStatus", "queued, downloading, succeeded (with path and sha256) or failed"),
                    **_errors(
                        500,
                        own={
                            400: {"MISSING_API_KEY": "no Authorization header"},
                            403: {"ADMIN_KEY_REQUIRED": "the key is not in admin_api_keys"},
                            404: {"PULL_NOT_FOUND": "no such pull (ended pulls are purged after retention_seconds)"},
                            503: {"MODEL_PULL_UNAVAILABLE": "this server runs no model pulls"},
                        },
                    ),
                },
            }
        },
        QUEUE_PATH: {
            "get": {
                "tags": ["extensions"],
                "operationId": "queueStatus",
                "summary": "Queue and worker status (extension)",
                "responses": {"200": _json("QueueStatusResponse", "the queue"), **_errors(400, 403, 500)},
            }
        },
        MODELS_PATH: {
            "get": {
                "tags": ["models"],
                "operationId": "listModels",
                "summary": "The models on this server",
                "description": "`filter[types]` (bracket) forms are accepted too.",
                "parameters": [
                    _query(
                        "filter.types",
                        "comma-separated: checkpoint, lora, vae, textualinversion, controlnet, ipadapter, upscaler",
                        string,
                    ),
                    _query("filter.visibility", "public (every model here) or private (none)", string),
                    _query("filter.source", "every model here is 'uploading'", string),
                    _query("filter.is_sdxl", "SDXL or SD 1.5 only", boolean),
                    _query("filter.is_inpainting", "inpainting checkpoints only when true", boolean),
                    _query("filter.query", "substring of the name", string),
                    _query(
                        "pagination.limit", "1..100, default 100", {"type": "integer", "minimum": 1, "maximum": 100}
                    ),
                    _query("pagination.cursor", "the previous page's next_cursor", string),
                ],
                "responses": {"200": _json("ModelListResponse", "one page of models"), **_errors(400, 403, 500)},
            }
        },
        FILES_PATH: {
            "get": {
                "tags": ["service"],
                "operationId": "getFile",
                "summary": "An output image, by the signed URL a task result gave",
                "security": [],
                "parameters": [
                    {"name": "key", "in": "path", "required": True, "schema": string},
                    _query("expires", "from the signed URL", string, required=True),
                    _query("sig", "from the signed URL", string, required=True),
                ],
                "responses": {
                    "200": {
                        "description": "the image",
                        "content": {
                            t: {"schema": {"type": "string", "contentMediaType": t}}
                            for t in ("image/png", "image/jpeg", "image/webp")
                        },
                    },
                    **_errors(
                        own={
                            403: {"URL_EXPIRED": "the URL's time ran out", "INVALID_SIGNATURE": "bad or missing sig"},
                            404: {"FILE_NOT_FOUND": "the image is gone (retention) or never existed"},
                        }
                    ),
                },
            }
        },
        HEALTH_PATH: {
            "get": {
                "tags": ["service"],
                "operationId": "health",
                "summary": "Liveness and readiness",
                "security": [],
                "responses": {
                    "200": _json("HealthResponse", "ready"),
                    "503": _json("HealthResponse", "a dependency (broker, store) is not ready"),
                },
            }
        },
    }
