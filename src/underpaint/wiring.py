"""The composition root: one ``Settings`` in, one of three kinds of process out.

- ``build_server``: ``underpaint serve``. An API node (``--no-worker``: HTTP, webhook sender, retention sweeper)
  or the embedded server (the same, plus a worker: a supervised child process by default, a thread with
  ``worker_process = false``).
- ``run_worker_child``: the embedded server's worker child process.
- ``build_celery_worker``: ``underpaint worker``, a Celery worker that generates.

Everything here is assembly; behaviour lives in the modules it wires. The module imports nothing heavy at the
top: an API node must never load torch (``tests/test_wiring.py`` spawns one and checks), so the engine and Celery
are imported only inside the builders of the processes that use them.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING, Protocol

from fastapi import FastAPI

from underpaint.api.app import create_app
from underpaint.api.ratelimit import RateLimiter
from underpaint.config import Settings
from underpaint.delivery.model_pulls import ModelPulls
from underpaint.delivery.signing import make_secret_for
from underpaint.delivery.webhooks import WebhookDispatcher, result_hook
from underpaint.registry import FileHashCache, ModelRegistry
from underpaint.scale.heartbeat import worker_states
from underpaint.scale.metrics import (
    ORPHANS_REMOVED,
    SPOOL_LEFTOVERS_REMOVED,
    UPLOAD_RETRIES,
    InstrumentedRunner,
    WorkerEnv,
    count_claims_paused,
    install_metrics,
)
from underpaint.services import Services, WorkerState
from underpaint.storage.base import ImageStorage, reachability
from underpaint.storage.local import LocalStorage, load_or_create_secret
from underpaint.storage.retry import StorageGate, UploadRetry
from underpaint.storage.spool import Spool
from underpaint.storage.urls import ImageUrls
from underpaint.tasks.lifecycle import OrphanSweeper, RetentionSweeper, TerminalHook, recover_on_start
from underpaint.tasks.queue import LocalQueue, WakeEvent
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageLister, TaskQueue, owner_of
from underpaint.worker.loop import BatchPolicy, TaskRunner, Worker
from underpaint.worker.process import WorkerProcess, new_wake_event

if TYPE_CHECKING:
    from underpaint.scale.celery_worker import WorkerContext
    from underpaint.storage.custom import CustomBuckets
    from underpaint.storage.s3 import S3Clients

log = logging.getLogger(__name__)


class Part(Protocol):
    """A background part of a process: started with it, stopped with it."""

    def start(self) -> None: ...

    def stop(self) -> object: ...


@dataclass(frozen=True)
class Core:
    """What every kind of process holds: the shared services plus the concrete parts it starts and stops."""

    services: Services
    store: SqlTaskStore
    webhooks: WebhookDispatcher
    on_terminal: TerminalHook
    custom_buckets: CustomBuckets  # users' own buckets, on the process's one set of S3 clients
    pulls: ModelPulls  # POST /v3/model/pull jobs; the server runs them (a worker process only holds the object)


def server_secret(settings: Settings) -> bytes:
    if settings.url_secret:
        return settings.url_secret.encode()
    return load_or_create_secret(settings.data_dir)


def webhook_secret_for_key(settings: Settings, api_key: str) -> str:
    """The secret a receiver uses to verify this key's webhook signatures (``whsec_...``)."""
    return make_secret_for(settings, server_secret(settings), owner_of)(owner_of(api_key))


def build_storage(settings: Settings, secret: bytes, s3: S3Clients) -> ImageStorage:
    if settings.storage_backend == "s3":
        from underpaint.storage.s3 import S3Storage

        if not settings.s3_bucket:
            raise ValueError("storage_backend=s3 needs s3_bucket")
        return S3Storage.from_settings(settings, s3)
    return LocalStorage(settings.data_dir / "images", secret)


def build_queue(settings: Settings, wake: WakeEvent | None = None) -> TaskQueue:
    if settings.queue_backend == "celery":
        from underpaint.scale.celery_queue import CeleryQueue

        return CeleryQueue(settings)
    return LocalQueue(wake)


def build_image_urls(settings: Settings, storage: ImageStorage, custom_buckets: CustomBuckets) -> ImageUrls:
    return ImageUrls(storage, settings.image_url_ttl, {"custom": custom_buckets.presign})


def build_core(settings: Settings, queue: TaskQueue | None = None) -> Core:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # The files' hashes persist under data_dir and are computed in the background as scans find the files.
    registry = ModelRegistry(
        settings.models_dir, FileHashCache(settings.data_dir / "model_hashes.json"), hash_in_background=True
    )
    registry.ensure_layout()
    secret = server_secret(settings)
    store = SqlTaskStore.from_settings(settings)  # opens the database and brings its schema up to date
    # S3 (boto3) only here, at build time: one set of clients per process, for the default store and users' buckets.
    from underpaint.storage.custom import CustomBuckets
    from underpaint.storage.s3 import S3Clients

    s3 = S3Clients()
    custom_buckets = CustomBuckets(s3, settings)
    storage = build_storage(settings, secret, s3)
    image_urls = build_image_urls(settings, storage, custom_buckets)
    secret_for = make_secret_for(settings, secret, owner_of)
    webhooks = WebhookDispatcher(store.engine, settings, secret_for, store=store, storage=storage)
    hook = result_hook(webhooks, image_urls)
    pulls = ModelPulls.from_settings(store.engine, settings)
    services = Services(
        settings=settings,
        store=store,
        queue=queue if queue is not None else build_queue(settings),
        registry=registry,
        storage=storage,
        image_urls=image_urls,
        webhooks=webhooks,
        rate_limiter=RateLimiter(settings, store),
        on_terminal=hook,
        model_pulls=pulls,
    )
    return Core(services, store, webhooks, hook, custom_buckets, pulls)


# -- the generating side (imports the engine) ---------------------------------------------------------------


def build_runner(core: Core) -> InstrumentedRunner:
    """A task runner on this process's device: executor (model cache, adapters), NSFW detector, image storage;
    timed into the worker metrics."""
    from underpaint.engine.executor import DiffusersExecutor
    from underpaint.safety.nsfw import NsfwDetector
    from underpaint.worker.runner import GenerationRunner

    services = core.services
    executor = DiffusersExecutor(services.settings, services.registry)
    services.registry.scan_and_hash()  # hash the models now, in the background, not on the first task
    settings = services.settings
    retry = UploadRetry(settings.storage_retry_seconds, on_retry=UPLOAD_RETRIES.inc)
    storage = services.storage
    gate = StorageGate(retry, lambda: reachability(storage), on_change=count_claims_paused)
    spool = Spool(settings.resolved_spool_dir, on_removed=SPOOL_LEFTOVERS_REMOVED.inc)
    runner = GenerationRunner(
        settings,
        storage,
        executor,
        NsfwDetector(),
        upload_retry=retry,
        custom_buckets=core.custom_buckets,
        spool=spool,
        claim_gate=gate,
    )
    runner.recover_spool()  # what a killed worker left in the spool
    return InstrumentedRunner(runner)


def batch_policy(settings: Settings) -> BatchPolicy:
    """Batching and model affinity for a worker on this process's device (the batch window defaults by device)."""
    from underpaint.engine.devices import pick_device

    return BatchPolicy.from_settings(settings, pick_device(settings.device).type)


def build_local_worker(core: Core, runner: TaskRunner | None = None) -> Worker:
    queue = core.services.queue
    settings = core.services.settings
    return Worker(
        core.store,
        runner if runner is not None else build_runner(core),
        settings,
        queue=queue if isinstance(queue, LocalQueue) else None,
        on_terminal=core.on_terminal,
        storage=core.services.storage,
        policy=batch_policy(settings),
    )


def run_worker_child(settings: Settings, wake: WakeEvent) -> None:
    """The embedded server's worker child: build the worker, run it until SIGTERM (``WorkerProcess`` calls this
    in the child, after giving it its environment)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    core = build_core(settings, queue=LocalQueue(wake))
    worker = build_local_worker(core)
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        from underpaint.scale.metrics import serving_registry

        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=serving_registry())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # (SIGINT is ignored from the child's start)
    worker.start()
    while not stop.wait(1.0):
        if not WorkerProcess.parent_alive():
            break
    worker.stop()  # finishes the task in hand; a killed child leaves it to recover_on_start


def build_celery_worker(
    settings: Settings, concurrency: int, lanes: tuple[str, ...] | None = None
) -> tuple[WorkerContext, Core]:
    from underpaint.scale.celery_worker import WorkerContext, worker_settings

    core = build_core(worker_settings(settings))
    runners = [build_runner(core) for _ in range(concurrency)]
    policy = batch_policy(core.services.settings)
    return WorkerContext(core.services, core.store.engine, runners, core.on_terminal, lanes, policy), core


def run_celery_worker(settings: Settings, queues: str, concurrency: int, metrics_port: int | None = None) -> int:
    """``underpaint worker``: ``ValueError`` for bad arguments, else consume until SIGTERM; the exit code."""
    from underpaint.scale.celery_worker import check_worker_args, run_worker

    names = check_worker_args(queues, concurrency)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    ctx, core = build_celery_worker(settings, concurrency, names)
    return run_worker(ctx, names, core.webhooks, metrics_port=metrics_port)


# -- the HTTP side --------------------------------------------------------------------------------------------


class Server:
    """``underpaint serve``: the ASGI app plus the background parts this process runs."""

    def __init__(self, core: Core, app: FastAPI, worker_env: WorkerEnv) -> None:
        self.core = core
        self.app = app
        self.worker_env = worker_env
        self.worker: Part | None = None
        self.sweeper: RetentionSweeper | None = None

    def start(self) -> None:
        services, settings = self.core.services, self.core.services.settings
        if settings.run_worker and settings.queue_backend == "local":
            self.recover()
            queue = services.queue
            if settings.worker_process and isinstance(queue, LocalQueue):
                self.worker = WorkerProcess(
                    f"{__name__}:{run_worker_child.__name__}",
                    settings,
                    queue.event,
                    on_child_death=self.recover,
                    env=self.worker_env,
                )
            else:
                self.worker = build_local_worker(self.core)
            self.worker.start()
        self.core.webhooks.start()
        self.core.pulls.start()  # also resumes pulls a stopped node left (docs/deploy.md)
        storage = services.storage
        orphans = None
        if isinstance(storage, ImageLister):
            # Older than any attempt can be between its uploads and its completion (or deleting its own images).
            min_age = 2 * settings.lease_seconds + settings.storage_retry_seconds
            orphans = OrphanSweeper(self.core.store, storage, min_age, on_removed=ORPHANS_REMOVED.inc)
        self.sweeper = RetentionSweeper(
            self.core.store,
            storage,
            settings.retention_seconds,
            also_purge=[self.core.webhooks.purge, self.core.pulls.purge],
            purge_idempotency=self.core.store.purge_idempotency_keys,
            orphans=orphans,
        )
        self.sweeper.start()

    def worker_states(self) -> list[WorkerState]:
        """The embedded worker, for ``GET /v3/async/queue`` (none before ``start`` or on an API-only node)."""
        worker = self.worker
        if isinstance(worker, WorkerProcess):
            return [WorkerState("embedded", "process", worker.alive(), concurrency=1, queues=("*",))]
        if isinstance(worker, Worker):
            return [WorkerState("embedded", "thread", worker.running, concurrency=1, queues=("*",))]
        return []

    def recover(self) -> None:
        recover_on_start(self.core.store, on_terminal=self.core.on_terminal, queue=self.core.services.queue)

    def stop(self) -> None:
        parts: list[Part | None] = [self.worker, self.sweeper, self.core.webhooks, self.core.pulls]
        for part in parts:
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    log.exception("error while stopping %s", type(part).__name__)


def build_server(settings: Settings) -> Server:
    """The API node or the embedded server, as ``settings`` say (``run_worker``, ``queue_backend``)."""
    embedded = settings.run_worker and settings.queue_backend == "local"
    wake = new_wake_event() if embedded and settings.worker_process else None
    core = build_core(settings, queue=build_queue(settings, wake))
    services = core.services
    probe = None
    server: Server | None = None  # built below, once the app exists; the app asks it for the embedded worker

    def embedded_workers() -> list[WorkerState]:
        return server.worker_states() if server is not None else []

    if settings.queue_backend == "celery":
        from underpaint.scale.broker import BrokerProbe

        probe = BrokerProbe(services, core.store.engine)
        engine, lease = core.store.engine, settings.lease_seconds
        services = replace(services, health=probe.health, workers=lambda: worker_states(engine, lease))
    elif embedded:
        storage = services.storage
        services = replace(services, workers=embedded_workers, health=lambda: {"storage": reachability(storage)})
    core = replace(core, services=services)
    app = create_app(services)
    worker_env = install_metrics(app, services, core.store.engine, probe)
    server = Server(core, app, worker_env)
    app.router.on_startup.append(server.start)
    app.router.on_shutdown.append(server.stop)
    return server


def _exit_normally(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM or SIGINT outside uvicorn's own handlers: end the process with a normal exit (status 0)."""
    raise SystemExit(0)


def run_server(settings: Settings) -> None:
    """``underpaint serve`` until SIGTERM or SIGINT, then a graceful shutdown (the worker child finishes its task)
    and exit status 0.

    uvicorn shuts down on either signal and then raises it again for the handler that was installed before it
    started. With Python's default handlers the process would then die by SIGTERM (or raise KeyboardInterrupt),
    skipping ``atexit``, where multiprocessing unlinks the named semaphores of the embedded worker's wake-up
    ``Event``: its resource tracker would report them as leaked. Ours (installed before anything is built) exits
    normally, so every exit handler runs."""
    import uvicorn

    previous = {sig: signal.signal(sig, _exit_normally) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        server = build_server(settings)
        # With JSON logs, uvicorn's own loggers go through the root handler too (log_config=None).
        log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
        uvicorn.run(
            server.app,
            host=settings.host,
            port=settings.port,
            log_level="info",
            access_log=False,
            log_config=log_config,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
