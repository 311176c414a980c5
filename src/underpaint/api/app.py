"""The FastAPI application: Novita v3 routes, Novita-shaped errors for everything that can go wrong.

Every non-200 reply has the body ``{code, reason, message, metadata}``: ``ApiError`` as raised; request
validation → 400 ``INVALID_REQUEST_BODY`` naming the field; unknown route → 404 ``API_NOT_FOUND``; wrong method
→ 405 ``METHOD_NOT_ALLOWED``; any unexpected exception → 500 (``CREATE_TASK_FAILED`` on submit,
``GET_RESULT_FAILED`` on task-result) with a generic message: the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from underpaint.api.context import ApiContext, error_response, json_ok
from underpaint.api.extensions import QUEUE_PATH, TASKS_PATH, queue_status, recent_tasks, task_limit
from underpaint.api.files import serve_file
from underpaint.api.idempotency import IDEMPOTENCY_HEADER
from underpaint.api.model_pull import install_model_pull
from underpaint.api.models_route import list_models
from underpaint.api.playground import install_playground
from underpaint.api.schemas import validation_error_to_api
from underpaint.api.steer import CANCEL_PATH, QueueEta, cancel_task
from underpaint.api.submit import IMG2IMG, INPAINTING, MAX_BODY_BYTES, TXT2IMG, UPSCALE, Endpoint, submit
from underpaint.services import HealthCheck, Services
from underpaint.tasks.types import TaskRecord, TaskStatus
from underpaint.wire.errors import ApiError, invalid_request, task_not_found
from underpaint.wire.result import task_result_body

logger = logging.getLogger("underpaint.api")

SUBMIT_PATH = "/v3/async/img2img"
TXT2IMG_PATH = "/v3/async/txt2img"
INPAINTING_PATH = "/v3/async/inpainting"
UPSCALE_PATH = "/v3/async/upscale"
RESULT_PATH = "/v3/async/task-result"
_FAILURE_REASONS = {
    SUBMIT_PATH: "CREATE_TASK_FAILED",
    TXT2IMG_PATH: "CREATE_TASK_FAILED",
    INPAINTING_PATH: "CREATE_TASK_FAILED",
    UPSCALE_PATH: "CREATE_TASK_FAILED",
    RESULT_PATH: "GET_RESULT_FAILED",
    CANCEL_PATH: "CANCEL_TASK_FAILED",
}
_FAILURE_MESSAGES = {
    SUBMIT_PATH: "internal error while creating the task; please retry",
    TXT2IMG_PATH: "internal error while creating the task; please retry",
    INPAINTING_PATH: "internal error while creating the task; please retry",
    UPSCALE_PATH: "internal error while creating the task; please retry",
    RESULT_PATH: "internal error while reading the task result; please retry",
    CANCEL_PATH: "internal error while cancelling the task; please retry",
}


class NovitaRoute(APIRoute):
    """Turns exceptions escaping an endpoint into Novita 500s (logged with traceback, never sent)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        reason = _FAILURE_REASONS.get(self.path, "INTERNAL_SERVER_ERROR")
        message = _FAILURE_MESSAGES.get(self.path, "internal server error")

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, StarletteHTTPException, RequestValidationError):
                raise
            except Exception:
                logger.exception("%s %s failed", request.method, self.path)
                return error_response(ApiError(500, reason, message))

        return guarded


def create_app(services: Services) -> FastAPI:
    ctx = ApiContext.build(services)
    if not services.settings.api_keys:
        logger.warning("no API keys configured (settings.api_keys): every API request will get 403 INVALID_API_KEY")
    app = FastAPI(title="Underpaint", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.route_class = NovitaRoute
    app.state.ctx = ctx
    _install_error_handlers(app)

    def submit_route(path: str, endpoint: Endpoint[Any]) -> None:
        async def create_task(request: Request) -> Response:
            caller = ctx.caller(request)
            raw = await _read_body(request)
            idempotency = request.headers.get(IDEMPOTENCY_HEADER)
            body = await run_in_threadpool(submit, ctx, caller, raw, ctx.base_url(request), endpoint, idempotency)
            return json_ok(body)

        app.post(path, name=path.rsplit("/", 1)[-1])(create_task)

    submit_route(SUBMIT_PATH, IMG2IMG)
    submit_route(TXT2IMG_PATH, TXT2IMG)
    submit_route(INPAINTING_PATH, INPAINTING)
    submit_route(UPSCALE_PATH, UPSCALE)

    @app.post(CANCEL_PATH)
    async def task_cancel(request: Request) -> Response:
        caller = ctx.caller(request)
        raw = await _read_body(request)
        return json_ok(await run_in_threadpool(cancel_task, ctx, caller, raw))

    app.router.routes.append(_task_result_route(ctx))

    @app.get("/v3/model")
    def models(request: Request) -> Response:
        ctx.caller(request)
        return json_ok(list_models(services.registry, request.query_params))

    @app.api_route("/v3/files/{key:path}", methods=["GET", "HEAD"])
    def files(request: Request, key: str) -> Response:
        return serve_file(ctx, request, key)

    @app.get(TASKS_PATH)
    def tasks(request: Request) -> Response:
        caller = ctx.caller(request)
        limit = task_limit(request.query_params)
        return json_ok(recent_tasks(services, caller.owner, limit).model_dump(mode="json"))

    @app.get(QUEUE_PATH)
    def queue(request: Request) -> Response:
        caller = ctx.caller(request)
        return json_ok(queue_status(services, caller.owner).model_dump(mode="json"))

    @app.get("/health")
    def health() -> Response:
        return _health(services.health)

    install_model_pull(app, ctx)
    install_playground(app)
    return app


def _task_result_route(ctx: ApiContext) -> Route:
    """``GET /v3/async/task-result``: the route every client polls, so it is a plain Starlette route (FastAPI's
    per-request dependency solving would be a third of its cost) and reads the task on the event loop when the
    store says a read is a local point read (SQLite, ~20 µs: cheaper than a hop to the thread pool). A networked
    store (PostgreSQL) is read in the pool so that it never blocks the loop."""
    services = ctx.services
    store = services.store
    inline_reads = store.inline_reads
    image_urls = services.image_urls  # HMAC-signed local URLs: CPU only; S3 presigning goes to the pool
    # Celery lanes are separate queues; the embedded worker claims every lane in one order.
    queue = QueueEta(store, per_lane=services.settings.queue_backend == "celery")

    def load(task_id: str, owner: str) -> tuple[TaskRecord | None, int, int | None]:
        """The task, its queue position and, when QUEUED, its eta (an indexed COUNT for queued tasks only)."""
        task = store.get(task_id, owner)
        if task is None or task.status is not TaskStatus.QUEUED:
            return task, 0, None
        position = queue.position(task)
        return task, position, queue.eta(position)

    async def read(request: Request) -> Response:
        caller = ctx.caller(request)
        task_id = request.query_params.get("task_id", "").strip()
        if not task_id:
            raise invalid_request("task_id: is required (GET /v3/async/task-result?task_id=<id>)", field="task_id")
        if len(task_id) > 64:
            raise task_not_found(task_id[:64])
        if inline_reads:
            task, position, eta = load(task_id, caller.owner)
        else:
            task, position, eta = await run_in_threadpool(load, task_id, caller.owner)
        if task is None:
            raise task_not_found(task_id)
        url_for = ctx.url_for(ctx.base_url(request))
        if image_urls.all_local(task.images):
            return json_ok(task_result_body(task, url_for, ctx.ttl, queue_position=position, eta=eta))
        body = await run_in_threadpool(task_result_body, task, url_for, ctx.ttl, queue_position=position, eta=eta)
        return json_ok(body)

    async def endpoint(request: Request) -> Response:
        try:
            return await read(request)
        except ApiError:
            raise
        except Exception:
            logger.exception("GET %s failed", RESULT_PATH)
            return error_response(ApiError(500, _FAILURE_REASONS[RESULT_PATH], _FAILURE_MESSAGES[RESULT_PATH]))

    return Route(RESULT_PATH, endpoint, methods=["GET"])


async def _read_body(request: Request) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _body_too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _body_too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large() -> ApiError:
    return invalid_request(f"request body exceeds {MAX_BODY_BYTES // (1024 * 1024)} MB")


# Checks whose failure leaves the node serving: with the broker down, tasks are still accepted and workers take
# them from the store; with the image storage down, workers hold results and retry (storage_retry_seconds).
_DEGRADABLE = frozenset({"broker", "storage"})


def _health(check: HealthCheck | None) -> Response:
    """200 ``{"status": "ok"}``; with a readiness callable, its checks are included. A failing check that the node
    can serve without (``_DEGRADABLE``) makes it 200 ``"degraded"``; any other makes it 503 ``"unavailable"``."""
    if check is None:
        return JSONResponse({"status": "ok"})
    try:
        checks = dict(check())
    except Exception as exc:  # a failing probe means "not ready", not a crash
        logger.warning("health check failed: %r", exc)
        return JSONResponse({"status": "unavailable", "checks": {"health": f"error: {type(exc).__name__}"}}, 503)
    failing = {name for name, v in checks.items() if not (v is True or v == "ok")}
    if not failing:
        return JSONResponse({"status": "ok", "checks": checks})
    if failing <= _DEGRADABLE:
        return JSONResponse({"status": "degraded", "checks": checks})
    return JSONResponse({"status": "unavailable", "checks": checks}, 503)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(validation_error_to_api(list(exc.errors())))

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 404:
            err = ApiError(404, "API_NOT_FOUND", f"no API at {request.method} {request.url.path}")
        elif exc.status_code == 405:
            err = ApiError(405, "METHOD_NOT_ALLOWED", f"method {request.method} is not allowed on {request.url.path}")
        else:
            err = ApiError(exc.status_code, "HTTP_ERROR", str(exc.detail))
        err.headers = dict(exc.headers or {})
        return error_response(err)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Last resort (errors outside endpoints, e.g. in middleware); endpoint errors are caught by NovitaRoute.
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        reason = _FAILURE_REASONS.get(request.url.path, "INTERNAL_SERVER_ERROR")
        return error_response(ApiError(500, reason, "internal server error"))

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
