"""``underpaint worker``: a Celery worker process that runs generations (one process per GPU).

Each Celery message names a task; the body claims it in the shared store and runs it with ``process_task``,
together with queued tasks that can share its sampler call (claimed straight from the store, within this
worker's queues), after any queued work for the model this worker has loaded (bounded by
``max_affinity_wait_s``). The messages of tasks that ran that way find them claimed or done and do nothing.
Celery provides the delivery guarantees (late ack, prefetch 1, redelivery of unacknowledged messages); the store
provides the rest: a redelivered message for a task that is running elsewhere or done does nothing, and only
the lease holder can record a result, so a task never completes twice. Besides the consumer, every worker runs:

- a lease sweeper: tasks whose worker stopped heartbeating (killed mid-task) are requeued and announced again
  on their queue, or end FAILED once they used ``max_attempts`` (a task that keeps killing workers);
- a store poller: the store, not the broker, is the queue. Every ``queue_poll_seconds`` a free runner claims tasks
  of its queues that have stayed QUEUED that long (their message was lost in a broker restart without
  persistence, or could not be sent), so a lost message delays a task by about twice that, never forever;
- a storage outage that outlasts ``storage_retry_seconds`` pauses claiming (the runner's ``claim_gate``): the
  task in hand fails, and until a probe finds the storage answering, messages are acknowledged without claiming
  their tasks, which stay QUEUED; the store poller claims them once the storage is back;
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
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
from underpaint.scale.metrics import TASKS_FROM_STORE, LoadCountingRunner, model_loads, serving_registry
from underpaint.services import Services
from underpaint.tasks.lanes import parse_queues
from underpaint.tasks.lifecycle import TerminalHook, sweep_expired
from underpaint.tasks.types import TaskRecord
from underpaint.worker.loop import (
    BatchPolicy,
    Claimer,
    claim_gate_of,
    default_worker_id,
    process_task,
    run_claimed_batch,
)

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
        lanes: tuple[str, ...] | None = None,
        policy: BatchPolicy | None = None,
    ) -> None:
        self.services = services
        self.engine = engine  # the shared database: heartbeats live beside the tasks
        self.runners = list(runners)
        self.on_terminal = on_terminal
        # One claimer per runner (each has its own model cache): batching and model affinity within ``lanes``.
        batching = policy or BatchPolicy.from_settings(services.settings)
        self._free: queue_mod.Queue[tuple[LoadCountingRunner, Claimer]] = queue_mod.Queue()
        for r in self.runners:
            self._free.put((r, Claimer(services.store, default_worker_id(), batching, lanes, gate=claim_gate_of(r))))
        self._lock = threading.Lock()
        self.busy = 0
        self.tasks_done = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @contextmanager
    def hold_runner(self, wait: bool = True) -> Iterator[tuple[LoadCountingRunner, Claimer] | None]:
        """A free runner with its claimer, counted busy while held; None (``wait=False``) when all are busy."""
        try:
            pair = self._free.get(block=wait)
        except queue_mod.Empty:
            yield None
            return
        with self._lock:
            self.busy += 1
        try:
            yield pair
        finally:
            with self._lock:
                self.busy -= 1
            self._free.put(pair)

    def handle(self, task_id: str) -> TaskRecord | None:
        """Claim and run ``task_id``; None when there was nothing to do (done, or running under a live lease)."""
        with task_context(task_id), self.hold_runner() as pair:
            assert pair is not None
            runner, claimer = pair
            record = process_task(
                task_id,
                self.services.store,
                runner,
                on_terminal=self.on_terminal,
                storage=self.services.storage,
                claimer=claimer,
                cancel_poll=self.services.settings.cancel_poll_seconds,
            )
            if record is None and claimer.paused:
                log.info(
                    "task %s: not claimed while the storage is out (claiming paused); it stays QUEUED, and the store "
                    "poller claims it once the storage answers", task_id,
                )  # fmt: skip
                return None
            if record is None:
                log.info(
                    "task %s: not claimable here (finished, running elsewhere or in a batch); message dropped", task_id
                )
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

    def poll_store(self) -> int:
        """If a runner is free, run the oldest task of this worker's queues that has been QUEUED for more than
        ``queue_poll_seconds`` (its broker message is lost), with its batch mates. Returns how many tasks it
        claimed (the poller then polls again at once). Their messages, should they still come, find them claimed
        or done. One batch per call: between two, a consumer waiting for the runner gets it."""
        settings = self.services.settings
        with self.hold_runner(wait=False) as pair:
            if pair is None:
                return 0  # every runner is busy: this worker is taking messages, and will poll again
            runner, claimer = pair
            cutoff = time.time() - settings.queue_poll_seconds
            tasks = claimer.next(queued_before=cutoff)
            if not tasks:
                return 0
            late = [t for t in tasks if t.created_at < cutoff]  # the others came along as batch mates
            for t in late:
                log.warning(
                    "task %s: QUEUED for %.0f s without its queue message reaching a worker; claimed from the store "
                    "(attempt %d)",
                    t.task_id,
                    time.time() - t.created_at,
                    t.attempts,
                    extra={"task_id": t.task_id},
                )
            TASKS_FROM_STORE.inc(len(late))
            claimer.ran(tasks)
            with task_context(tasks[0].task_id):
                run_claimed_batch(
                    self.services.store,
                    tasks,
                    claimer.worker_id,
                    runner,
                    on_terminal=self.on_terminal,
                    storage=self.services.storage,
                    cancel_poll=settings.cancel_poll_seconds,
                )
            with self._lock:
                self.tasks_done += len(tasks)
            return len(tasks)

    def start_background(self, sweep_interval: float) -> None:
        """The lease sweeper and the store poller, each on its own thread until ``stop``."""
        self._every(sweep_interval, self.sweep, "lease sweep", "underpaint-sweeper")
        self._every(self.services.settings.queue_poll_seconds, self.poll_store, "store poll", "underpaint-poller")

    def _every(self, interval: float, job: Callable[[], object], what: str, name: str) -> None:
        """Run ``job`` every ``interval`` seconds, and again at once while it returns something truthy."""

        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    while job() and not self._stop.is_set():
                        pass
                except Exception:
                    log.exception("%s failed; retrying in %.0f s", what, interval)

        thread = threading.Thread(target=loop, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)


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
    ctx.start_background(max(1.0, settings.lease_seconds / 4))
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
