"""``underpaint worker``: a Celery worker process that runs generations (one process per GPU).

Each Celery message names a task; the body claims it in the shared store and runs it with ``process_task``.
Celery provides the delivery guarantees (late ack, prefetch 1, redelivery of unacknowledged messages); the store
provides the rest: a redelivered message for a task that is running elsewhere or done does nothing, and only
the lease holder can record a result, so a task never completes twice. Besides the consumer, every worker runs:

- a lease sweeper: tasks whose worker stopped heartbeating (killed mid-task) are requeued and announced again
  on their queue, or end FAILED once they used ``max_attempts`` (a task that keeps killing workers);
- a heartbeat row in the store (liveness for ``/health/workers`` and metrics);
- the webhook sender (the outbox is shared; each delivery is sent by one process).

``concurrency`` runs that many generations at once, each with its own executor and model cache (so memory
grows with it); on a GPU machine run one worker per GPU with ``--device cuda:N`` and concurrency 1. Concurrency 1
uses Celery's solo pool (everything on one thread); more uses the threads pool, where acknowledgements come from
pool threads: fine on Redis, while on RabbitMQ prefer several processes of concurrency 1.
"""

from __future__ import annotations

import logging
import os
import queue as queue_mod
import socket
import threading
from collections.abc import Sequence
from typing import Any

from celery import Celery
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from underpaint.config import Settings
from underpaint.delivery.webhooks import WebhookDispatcher
from underpaint.scale.celery_app import TASK_NAME, create_celery_app
from underpaint.scale.celery_queue import CeleryQueue
from underpaint.scale.heartbeat import Heartbeat, default_interval
from underpaint.scale.json_logs import task_context
from underpaint.scale.metrics import LoadCountingRunner, model_loads, serving_registry
from underpaint.services import Services
from underpaint.tasks.lanes import parse_queues
from underpaint.tasks.lifecycle import TerminalHook, sweep_expired
from underpaint.tasks.types import TaskRecord
from underpaint.worker.loop import default_worker_id, process_task

log = logging.getLogger("underpaint.scale")

RETRY_DELAY = 5.0  # seconds before a message whose task could not be read (store down) is tried again


class WorkerContext:
    """Everything a worker process shares between its Celery task bodies."""

    def __init__(
        self,
        services: Services,
        engine: Engine,
        runners: Sequence[LoadCountingRunner],
        on_terminal: TerminalHook,
    ) -> None:
        self.services = services
        self.engine = engine  # the shared database: heartbeats live beside the tasks
        self.runners = list(runners)
        self.on_terminal = on_terminal
        self._free: queue_mod.Queue[LoadCountingRunner] = queue_mod.Queue()
        for r in self.runners:
            self._free.put(r)
        self._lock = threading.Lock()
        self.busy = 0
        self.tasks_done = 0
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def handle(self, task_id: str) -> TaskRecord | None:
        """Claim and run ``task_id``; None when there was nothing to do (done, or running under a live lease)."""
        with task_context(task_id):
            runner = self._free.get()
            with self._lock:
                self.busy += 1
            try:
                record = process_task(
                    task_id,
                    self.services.store,
                    runner,
                    worker_id=default_worker_id(),
                    on_terminal=self.on_terminal,
                    storage=self.services.storage,
                    cancel_poll=self.services.settings.cancel_poll_seconds,
                )
            finally:
                with self._lock:
                    self.busy -= 1
                self._free.put(runner)
            if record is None:
                log.info("task %s: not claimable here (finished, or running elsewhere); message dropped", task_id)
                return None
            with self._lock:
                self.tasks_done += 1
            log.info("task %s: %s after %d attempt(s)", task_id, record.status.value, record.attempts)
            return record

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"busy": self.busy, "tasks_done": self.tasks_done, "model_loads": model_loads(self.runners)}

    def sweep(self) -> list[str]:
        return sweep_expired(self.services.store, self.on_terminal, self.services.queue)

    def start_sweeper(self, interval: float) -> None:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception:
                    log.exception("lease sweep failed; retrying in %.0f s", interval)

        self._sweeper = threading.Thread(target=loop, name="underpaint-sweeper", daemon=True)
        self._sweeper.start()

    def stop(self) -> None:
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join(10)


def register_task(app: Celery, ctx: WorkerContext) -> None:
    """Define the Celery task on ``app``: a message names a task, ``ctx`` runs it.

    ``app`` must also be the process's default app (``app.set_default()``): parts of the worker look tasks up
    through it.
    """

    @app.task(  # type: ignore[untyped-decorator]  # celery ships no annotations
        name=TASK_NAME, bind=True, shared=False, lazy=False, ignore_result=True, acks_late=True,
        reject_on_worker_lost=True, max_retries=None,
    )  # fmt: skip
    def process(self: Any, task_id: str) -> None:
        try:
            ctx.handle(task_id)
        except OperationalError as exc:
            # The store is unreachable: the task may still be QUEUED with no other message, so keep this one.
            log.warning("task %s: task store unavailable (%s); retrying in %.0f s", task_id, exc, RETRY_DELAY)
            raise self.retry(exc=exc, countdown=RETRY_DELAY) from exc


def worker_pool(concurrency: int) -> str:
    """``solo`` for one generation at a time: the task runs in the consumer's thread, so every broker operation
    (acks included) stays on one thread, which py-amqp (RabbitMQ) requires. ``threads`` for more."""
    return "solo" if concurrency == 1 else "threads"


def worker_settings(settings: Settings) -> Settings:
    return settings.with_overrides(queue_backend="celery", run_worker=False)


def check_worker_args(queues: str | Sequence[str], concurrency: int) -> tuple[str, ...]:
    """The queue names to consume; ``ValueError`` for bad ``--queues`` or ``--concurrency``."""
    names = parse_queues(queues if isinstance(queues, str) else ",".join(queues))
    if concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    return tuple(names)


def run_worker(
    ctx: WorkerContext, names: tuple[str, ...], webhooks: WebhookDispatcher, *, metrics_port: int | None = None
) -> int:
    """Consume ``names`` until SIGTERM/SIGINT (warm shutdown: running tasks finish first). Returns the exit code."""
    settings = ctx.services.settings
    concurrency = len(ctx.runners)
    queue = ctx.services.queue
    app = queue.app if isinstance(queue, CeleryQueue) else create_celery_app(settings)
    app.set_default()
    register_task(app, ctx)
    if metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=settings.host, registry=serving_registry())
    heartbeat = Heartbeat(ctx.engine, names, concurrency, ctx.stats, interval=default_interval(settings.lease_seconds))
    heartbeat.start()
    ctx.start_sweeper(max(1.0, settings.lease_seconds / 4))
    webhooks.start()
    log.info("worker %s consuming %s (concurrency %d)", heartbeat.worker_id, ",".join(names), concurrency)
    try:
        worker = app.Worker(
            hostname=f"underpaint-{os.getpid()}@{socket.gethostname()}",
            queues=list(names),
            concurrency=concurrency,
            pool=worker_pool(concurrency),
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            quiet=True,
            loglevel=logging.getLevelName(logging.getLogger().level),
        )
        worker.start()
        return int(worker.exitcode or 0)
    finally:
        ctx.stop()
        heartbeat.stop()
        webhooks.stop()
