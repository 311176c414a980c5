"""Wiring: one ``Settings`` in, a running service out.

``build_services`` picks the backends (SQLite or PostgreSQL store, local or S3 images, local or Celery queue),
``Service`` adds the in-process worker, webhook sender and retention sweeper, and ``run_server`` serves the API
with uvicorn. Everything here is assembly; behaviour lives in the modules it wires.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any

from underpaint.config import Settings
from underpaint.engine.registry import ModelRegistry
from underpaint.services import Services
from underpaint.storage.base import ImageStorage
from underpaint.tasks.types import TaskQueue

log = logging.getLogger(__name__)


def build_storage(settings: Settings, secret: bytes) -> ImageStorage:
    if settings.storage_backend == "s3":
        from underpaint.storage.s3 import S3Storage

        if not settings.s3_bucket:
            raise ValueError("storage_backend=s3 needs s3_bucket")
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.s3_region, settings.s3_endpoint_url)
    from underpaint.storage.local import LocalStorage

    return LocalStorage(settings.data_dir / "images", secret)


def build_queue(settings: Settings) -> TaskQueue:
    if settings.queue_backend == "celery":
        from underpaint.scale.celery_queue import CeleryQueue

        return CeleryQueue(settings)
    from underpaint.tasks.queue import LocalQueue

    if settings.run_worker and settings.worker_process:
        from underpaint.worker.process import wake_event

        return LocalQueue(wake_event())
    return LocalQueue()


def server_secret(settings: Settings) -> bytes:
    from underpaint.storage.local import load_or_create_secret

    if settings.url_secret:
        return settings.url_secret.encode()
    return load_or_create_secret(settings.data_dir)


def webhook_secret_for_key(settings: Settings, api_key: str) -> str:
    """The secret a receiver uses to verify this key's webhook signatures (``whsec_...``)."""
    from underpaint.delivery.signing import make_secret_for
    from underpaint.tasks.types import owner_of

    return make_secret_for(settings, server_secret(settings), owner_of)(owner_of(api_key))


def build_services(settings: Settings, queue: TaskQueue | None = None) -> Services:
    from underpaint.api.ratelimit import RateLimiter
    from underpaint.delivery.webhooks import WebhookDispatcher
    from underpaint.storage.custom import presign_custom, validate_custom_storage
    from underpaint.tasks.store import SqlTaskStore

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    registry = ModelRegistry(settings.models_dir)
    registry.ensure_layout()
    secret = server_secret(settings)
    store = SqlTaskStore.from_settings(settings)
    storage = build_storage(settings, secret)
    services = Services(
        settings=settings,
        store=store,
        queue=queue if queue is not None else build_queue(settings),
        registry=registry,
        storage=storage,
    )
    from underpaint.delivery.signing import make_secret_for
    from underpaint.tasks.types import owner_of

    secret_for = make_secret_for(settings, secret, owner_of)
    services.webhooks = WebhookDispatcher(store.engine, settings, secret_for, store=store, storage=storage)
    services.rate_limiter = RateLimiter(settings, store)
    services.extras["validate_custom_storage"] = validate_custom_storage
    services.extras["check_preprocessor"] = lambda name: _preprocessor_problem(name, registry)
    services.extras["url_resolvers"] = {"custom": lambda image, ttl: presign_custom(image, ttl, settings)}
    from underpaint.engine.loader import file_sha256

    services.extras["file_hash"] = lambda entry: file_sha256(entry.path)
    return services


def _preprocessor_problem(name: str | None, registry: ModelRegistry) -> str | None:
    # Imported on first use: API nodes that never see a ControlNet request never import torch.
    from underpaint.engine.preprocessors import submit_check

    return submit_check(name, registry.models_dir / "annotator")


@dataclass
class Service:
    """A whole process: services plus the background parts this process runs."""

    services: Services
    worker: Any = None
    sweeper: Any = None
    background: list[Any] = field(default_factory=list)

    def start(self) -> None:
        from underpaint.tasks.lifecycle import RetentionSweeper, recover_on_start

        s = self.services.settings
        if s.run_worker and s.queue_backend == "local":
            hook = on_terminal_hook(self.services)

            def recover() -> None:
                recover_on_start(self.services.store, on_terminal=hook, queue=self.services.queue)

            recover()
            if s.worker_process:
                from underpaint.tasks.queue import LocalQueue
                from underpaint.worker.process import WorkerProcess

                assert isinstance(self.services.queue, LocalQueue)
                env = self.services.extras.get("worker_env") or {}
                self.worker = WorkerProcess(s, self.services.queue.event, on_child_death=recover, env=env)
            else:
                self.worker = build_local_worker(self.services)
            self.worker.start()
            from underpaint.api.extensions import EMBEDDED_WORKER

            worker = self.worker
            self.services.extras[EMBEDDED_WORKER] = worker.alive if s.worker_process else lambda: worker.running
        self.services.webhooks.start()
        self.sweeper = RetentionSweeper(
            self.services.store, self.services.storage, s.retention_seconds, also_purge=[self.services.webhooks.purge]
        )
        self.sweeper.start()

    def stop(self) -> None:
        for part in (self.worker, self.sweeper, self.services.webhooks):
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("error while stopping %s", type(part).__name__)


def build_runner(services: Services) -> Any:
    from underpaint.engine.executor import DiffusersExecutor
    from underpaint.safety.nsfw import NsfwDetector
    from underpaint.worker.runner import GenerationRunner

    executor = DiffusersExecutor(services.settings, services.registry)
    return GenerationRunner(services, executor, NsfwDetector())


def on_terminal_hook(services: Services) -> Any:
    """After SUCCEED/FAILED: queue the webhook (if any) with the same body task-result returns."""
    from underpaint.api.serialize import task_result_body, url_resolver

    def hook(task: Any) -> None:
        url = ((task.extra or {}).get("webhook") or {}).get("url")
        if not url or services.webhooks is None:
            return
        base_url = task.extra.get("_base_url", "")
        body = task_result_body(task, url_resolver(services, base_url), services.settings.image_url_ttl)
        services.webhooks.enqueue(task.task_id, task.owner, url, body)

    return hook


def build_local_worker(services: Services) -> Any:
    from underpaint.scale.metrics import InstrumentedRunner
    from underpaint.tasks.queue import LocalQueue
    from underpaint.worker.loop import Worker

    runner = InstrumentedRunner(build_runner(services))  # generation seconds and model loads for /metrics
    services.extras["runners"] = [runner]
    queue = services.queue
    return Worker(
        services.store,
        runner,
        services.settings,
        queue=queue if isinstance(queue, LocalQueue) else None,
        on_terminal=on_terminal_hook(services),
        storage=services.storage,
    )


def create_service(settings: Settings) -> tuple[Service, Any]:
    from underpaint.api.app import create_app
    from underpaint.scale.metrics import install_metrics

    service = Service(build_services(settings))
    app = create_app(service.services)
    install_metrics(app, service.services)
    app.router.on_startup.append(service.start)
    app.router.on_shutdown.append(service.stop)
    return service, app


def run_server(settings: Settings) -> None:
    import uvicorn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _, app = create_service(settings)
    # With JSON logs, uvicorn's own loggers go through the root handler too (log_config=None).
    log_config: Any = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False, log_config=log_config)
