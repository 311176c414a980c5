"""Prometheus metrics.

Two kinds of numbers, from two kinds of processes:

- cluster state, read from the shared store and the broker at scrape time by any API node (``/metrics``): queue
  depth per queue, tasks by status, webhook deliveries by status, live workers and their model loads (from the
  heartbeat rows);
- what happens inside the process that generates (a worker, or the embedded server): the generation-seconds
  histogram, model loads and tasks run, in the process's default registry. Workers serve it on
  ``--metrics-port``; the embedded server's ``/metrics`` includes it.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from fastapi import FastAPI
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, column, func, select, table
from sqlalchemy.exc import DBAPIError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from underpaint.engine.model_tiers import TIERS, ModelCacheReport
from underpaint.scale.heartbeat import list_workers, worker_stale_after
from underpaint.services import Services
from underpaint.tasks.contract import TaskRequest
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import (
    BatchTaskRunner,
    ClaimGate,
    Prefetcher,
    ProgressReporter,
    TaskRunner,
    claim_gate_of,
)

if TYPE_CHECKING:
    from underpaint.scale.broker import BrokerProbe  # imports celery: only Celery-mode processes load it

log = logging.getLogger("underpaint.scale")

# What a generating process reports. A registry of its own, so that a server whose worker is a child process
# exports the child's numbers (through prometheus_client's multiprocess files) and not its own empty ones.
WORKER_REGISTRY = CollectorRegistry()
GENERATION_SECONDS = Histogram(
    "underpaint_generation_seconds",
    "Wall time of one task's generation (model load, sampling, encoding, upload)",
    ["base_model", "outcome"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf")),
    registry=WORKER_REGISTRY,
)
TASKS_RUN = Counter(
    "underpaint_worker_tasks_run", "Generations run by this process", ["outcome"], registry=WORKER_REGISTRY
)
MODEL_LOADS = Counter(
    "underpaint_model_loads", "Checkpoints loaded from disk by this process", registry=WORKER_REGISTRY
)
BATCH_SIZE = Histogram(
    "underpaint_batch_size",
    "Tasks run together in one sampler call (1 = alone)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, float("inf")),
    registry=WORKER_REGISTRY,
)
MODEL_SWITCHES = Counter(
    "underpaint_model_switches",
    "Times this process ran a task for another checkpoint or LoRA set than the task before it "
    "(per hour: rate(underpaint_model_switches_total[1h]) * 3600)",
    registry=WORKER_REGISTRY,
)
QUEUE_WAIT_SECONDS = Histogram(
    "underpaint_queue_wait_seconds",
    "Time from submit to the claim that started the task's attempt",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, float("inf")),
    registry=WORKER_REGISTRY,
)
CHECKPOINT_REQUESTS = Counter(
    "underpaint_checkpoint_requests",
    "Checkpoints a task needed, by the tier that served them (device: resident; ram: copied from the RAM tier; "
    "disk: read from the file)",
    ["tier"],
    registry=WORKER_REGISTRY,
)
CHECKPOINT_TIER_BYTES = Gauge(
    "underpaint_checkpoint_tier_bytes",
    "Bytes of checkpoints held in each tier (device: resident modules; ram: converted CPU state dicts)",
    ["tier"],
    multiprocess_mode="livemax",
    registry=WORKER_REGISTRY,
)
CHECKPOINT_LOAD_SECONDS = Counter(
    "underpaint_checkpoint_load_seconds",
    "Time spent making checkpoints resident (from the RAM tier or the disk)",
    registry=WORKER_REGISTRY,
)
TASKS_FROM_STORE = Counter(
    "underpaint_tasks_claimed_from_store",
    "Tasks a Celery worker claimed straight from the store because no queue message brought them within "
    "queue_poll_seconds (lost in a broker restart, or never sent while the broker was down)",
    registry=WORKER_REGISTRY,
)
UPLOAD_RETRIES = Counter(
    "underpaint_storage_upload_retries",
    "Image uploads tried again after a transient storage failure (the S3 endpoint unreachable, 5xx)",
    registry=WORKER_REGISTRY,
)
STORAGE_CLAIMS_PAUSED = Gauge(
    "underpaint_storage_claims_paused",
    "Runners of this process claiming no task because a storage outage outlasted storage_retry_seconds (they "
    "probe the storage and resume when it answers; the queue waits meanwhile)",
    multiprocess_mode="livesum",
    registry=WORKER_REGISTRY,
)
SPOOL_LEFTOVERS_REMOVED = Counter(
    "underpaint_spool_leftovers_removed",
    "Images a dead worker process left in the upload spool, deleted (from the storage, then the disk) by this one",
    registry=WORKER_REGISTRY,
)
# Counted by the process that runs the retention sweeper (API nodes, the embedded server): its default registry.
ORPHANS_REMOVED = Counter(
    "underpaint_orphan_images_removed",
    "Images deleted from the service's storage because no task references them (an attempt that died between "
    "upload and completion)",
)
# Set for the embedded worker's child process: prometheus_client then keeps its values in files there.
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_webhook_table = table("webhook_deliveries", column("status"))


# The environment the embedded worker child starts with (its multiprocess metrics folder).
WorkerEnv = dict[str, str]


class LoadCountingRunner(TaskRunner, Protocol):
    @property
    def checkpoint_loads(self) -> int: ...


@runtime_checkable
class CacheReporting(Protocol):
    def cache_report(self) -> ModelCacheReport: ...


class InstrumentedRunner:
    """Wraps a ``TaskRunner``: times each run into ``underpaint_generation_seconds`` and records batch sizes,
    queue waits, model switches and the model cache's tiers (requests served, bytes held, load time)."""

    def __init__(self, runner: LoadCountingRunner) -> None:
        self.runner = runner
        self._last_model: str | None = None
        self._last_report = ModelCacheReport()

    @property
    def checkpoint_loads(self) -> int:
        return self.runner.checkpoint_loads

    @property
    def claim_gate(self) -> ClaimGate | None:
        return claim_gate_of(self.runner)

    def prefetch(self, checkpoints: Sequence[str]) -> None:
        if isinstance(self.runner, Prefetcher):
            self.runner.prefetch(checkpoints)

    def _record_cache(self) -> None:
        if not isinstance(self.runner, CacheReporting):
            return
        report, last = self.runner.cache_report(), self._last_report
        for tier in TIERS:
            gained = report.hits.get(tier, 0) - last.hits.get(tier, 0)
            if gained > 0:
                CHECKPOINT_REQUESTS.labels(tier).inc(gained)
        for tier, held in report.bytes.items():
            CHECKPOINT_TIER_BYTES.labels(tier).set(held)
        if report.load_seconds > last.load_seconds:
            CHECKPOINT_LOAD_SECONDS.inc(report.load_seconds - last.load_seconds)
        self._last_report = report

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        self._started([task])
        start = time.perf_counter()
        loads = self.runner.checkpoint_loads
        outcome = "error"
        try:
            images = self.runner.run(task, request, report)
            outcome = "ok"
            return images
        finally:
            GENERATION_SECONDS.labels(_base(task), outcome).observe(time.perf_counter() - start)
            TASKS_RUN.labels(outcome).inc()
            MODEL_LOADS.inc(max(0, self.runner.checkpoint_loads - loads))
            self._record_cache()

    def run_batch(
        self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]
    ) -> list[list[ImageRecord] | BaseException]:
        if not isinstance(self.runner, BatchTaskRunner):  # a runner that cannot batch: one after the other
            outcomes: list[list[ImageRecord] | BaseException] = []
            for task, request, report in items:
                try:
                    outcomes.append(self.run(task, request, report))
                except Exception as exc:
                    outcomes.append(exc)
            return outcomes
        tasks = [t for t, _, _ in items]
        self._started(tasks)
        start = time.perf_counter()
        loads = self.runner.checkpoint_loads
        results: list[list[ImageRecord] | BaseException] = [RuntimeError("batch failed")] * len(items)
        try:
            results = self.runner.run_batch(items)
            return results
        finally:
            elapsed = time.perf_counter() - start
            for task, result in zip(tasks, results, strict=True):
                outcome = "error" if isinstance(result, BaseException) else "ok"
                GENERATION_SECONDS.labels(_base(task), outcome).observe(elapsed)
                TASKS_RUN.labels(outcome).inc()
            MODEL_LOADS.inc(max(0, self.runner.checkpoint_loads - loads))
            self._record_cache()

    def _started(self, tasks: Sequence[TaskRecord]) -> None:
        BATCH_SIZE.observe(len(tasks))
        for t in tasks:
            if t.started_at is not None:
                QUEUE_WAIT_SECONDS.observe(max(0.0, t.started_at - t.created_at))
        model = tasks[0].model_key if tasks else None
        if model is not None:
            if self._last_model is not None and model != self._last_model:
                MODEL_SWITCHES.inc()
            self._last_model = model


def _base(task: TaskRecord) -> str:
    return "sdxl" if task.lane.startswith("sdxl") else "sd15" if task.lane.startswith("sd15") else "other"


def count_claims_paused(paused: bool) -> None:
    """``StorageGate.on_change``: one runner more (or less) with claiming paused."""
    if paused:
        STORAGE_CLAIMS_PAUSED.inc()
    else:
        STORAGE_CLAIMS_PAUSED.dec()


def model_loads(runners: Iterable[LoadCountingRunner]) -> int:
    return sum(r.checkpoint_loads for r in runners)


class _Merged(Collector):
    """Several registries as one collector (``start_http_server`` serves a single registry)."""

    def __init__(self, *registries: CollectorRegistry) -> None:
        self.registries = registries

    def collect(self) -> Iterator[Metric]:
        for registry in self.registries:
            yield from registry.collect()


def serving_registry() -> CollectorRegistry:
    """What a generating process serves on its own metrics port: process metrics plus its generation numbers."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(REGISTRY, WORKER_REGISTRY))
    return registry


def worker_metrics_dir(data_dir: Path) -> Path:
    """An empty folder for the embedded worker's multiprocess metric files (emptied at each server start)."""
    folder = data_dir / "worker-metrics"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def webhook_counts(engine: Engine) -> dict[str, int]:
    stmt = select(_webhook_table.c.status, func.count()).group_by(_webhook_table.c.status)
    try:
        with engine.connect() as conn:
            return {str(s): int(n) for s, n in conn.execute(stmt)}
    except DBAPIError:  # no outbox table yet: nothing was ever sent
        return {}


class ClusterCollector(Collector):
    """Scrape-time view of the shared state; each part that cannot be read is left out (and logged)."""

    def __init__(
        self, services: Services, engine: Engine, queue_depths: Callable[[], dict[str, int]] | None = None
    ) -> None:
        self.services = services
        self.engine = engine
        self.queue_depths = queue_depths

    def collect(self) -> Iterator[Metric]:
        yield from self._guard("tasks", self._tasks)
        yield from self._guard("webhooks", self._webhooks)
        if self.queue_depths is not None:
            yield from self._guard("queues", self._queues)
            yield from self._guard("workers", self._workers)

    def _guard(self, name: str, part: Callable[[], Iterator[Metric]]) -> Iterator[Metric]:
        try:
            yield from list(part())
        except Exception as exc:
            log.warning("metrics: could not read %s: %r", name, exc)

    def _tasks(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("underpaint_tasks", "Tasks in the store by status", labels=["status"])
        counts: dict[TaskStatus, int] = self.services.store.count_by_status()
        for status, n in counts.items():
            g.add_metric([status.value], n)
        yield g

    def _webhooks(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("underpaint_webhook_deliveries", "Webhook deliveries by status", labels=["status"])
        for status, n in sorted(webhook_counts(self.engine).items()):
            g.add_metric([status], n)
        yield g

    def _queues(self) -> Iterator[Metric]:
        assert self.queue_depths is not None
        g = GaugeMetricFamily("underpaint_queue_depth", "Messages waiting in each broker queue", labels=["queue"])
        for queue, n in sorted(self.queue_depths().items()):
            g.add_metric([queue], n)
        yield g

    def _workers(self) -> Iterator[Metric]:
        now = time.time()
        stale = worker_stale_after(self.services.settings.lease_seconds)
        alive = [w for w in list_workers(self.engine) if w.alive(now, stale)]
        g = GaugeMetricFamily("underpaint_workers_alive", "Workers whose heartbeat is recent", labels=["queue"])
        per_queue: dict[str, int] = {}
        for w in alive:
            for q in w.queues:
                per_queue[q] = per_queue.get(q, 0) + 1
        for q, n in sorted(per_queue.items()):
            g.add_metric([q], n)
        yield g
        busy = GaugeMetricFamily("underpaint_worker_busy", "Tasks running on each live worker", labels=["worker"])
        loads = CounterMetricFamily(
            "underpaint_worker_model_loads", "Checkpoint loads per live worker", labels=["worker"]
        )
        for w in alive:
            busy.add_metric([w.worker_id], w.busy)
            loads.add_metric([w.worker_id], w.model_loads)
        yield busy
        yield loads


def install_metrics(app: FastAPI, services: Services, engine: Engine, probe: BrokerProbe | None) -> WorkerEnv:
    """Add ``GET /metrics`` (and, with a broker ``probe`` (Celery mode), ``GET /health/workers``).

    ``/metrics`` = this process's default registry + the cluster view + the generation numbers of the worker this
    process runs: in-process for a thread worker, read from the worker child's multiprocess files otherwise.
    Returns the environment the embedded worker child must start with.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(services, engine, probe.queue_depths if probe is not None else None))
    settings = services.settings
    worker_env: WorkerEnv = {}
    if settings.run_worker and settings.queue_backend == "local":
        if settings.worker_process:  # the worker child writes its values to files; read them at scrape time
            from prometheus_client.multiprocess import MultiProcessCollector

            folder = worker_metrics_dir(settings.data_dir)
            worker_env[MULTIPROC_ENV] = str(folder)
            MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
        else:
            registry.register(_Merged(WORKER_REGISTRY))

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY) + generate_latest(registry), media_type=CONTENT_TYPE)

    if probe is not None:

        @app.get("/health/workers", include_in_schema=False)
        def workers(request: Request) -> Response:
            return JSONResponse(workers_body(services, engine))

    return worker_env


def workers_body(services: Services, engine: Engine) -> dict[str, Any]:
    now = time.time()
    stale = worker_stale_after(services.settings.lease_seconds)
    rows = list_workers(engine)
    return {
        "alive": sum(1 for w in rows if w.alive(now, stale)),
        "workers": [
            {
                "worker_id": w.worker_id,
                "hostname": w.hostname,
                "pid": w.pid,
                "queues": list(w.queues),
                "concurrency": w.concurrency,
                "busy": w.busy,
                "tasks_done": w.tasks_done,
                "model_loads": w.model_loads,
                "last_seen_seconds_ago": round(now - w.last_seen, 1),
                "alive": w.alive(now, stale),
            }
            for w in rows
        ],
    }
