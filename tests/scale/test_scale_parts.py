"""Scale-out parts against real services, without the diffusion engine: routing, the Celery queue on Redis and
RabbitMQ, queue depth, a Celery worker honouring its queues, double delivery, crash recovery via the lease
sweeper, heartbeats, metrics and JSON logs."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from sqlalchemy import text
from tests.support.requests import img2img, new_task

from underpaint.config import KeyPolicy, Settings
from underpaint.engine.job import Progress
from underpaint.engine.model_tiers import ModelCacheReport
from underpaint.registry import ModelEntry, ModelRegistry
from underpaint.scale.broker import BrokerProbe
from underpaint.scale.celery_app import TASK_NAME, celery_config, create_celery_app
from underpaint.scale.celery_queue import CeleryQueue
from underpaint.scale.celery_worker import WorkerContext, register_task, worker_pool
from underpaint.scale.heartbeat import Heartbeat, list_workers
from underpaint.scale.json_logs import JsonFormatter, TaskIdFilter, task_context
from underpaint.scale.metrics import ClusterCollector, InstrumentedRunner, count_claims_paused
from underpaint.services import Services
from underpaint.storage.base import StorageError
from underpaint.storage.retry import StorageGate, UploadRetry
from underpaint.storage.urls import ImageUrls
from underpaint.tasks.contract import TaskRequest
from underpaint.tasks.lanes import known_queues, parse_queues, task_lane
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import ImageRecord, TaskRecord, TaskStatus
from underpaint.worker.loop import ProgressReporter

pytestmark = pytest.mark.services


def _entry(name: str, sdxl: bool) -> ModelEntry:
    return ModelEntry(kind="checkpoint", sd_name=name, path=Path(name), is_sdxl=sdxl, size=1, mtime=0.0)


# --- routing ----------------------------------------------------------------------------------------------------


def test_lane_by_base_model_checkpoint_and_enterprise() -> None:
    s = Settings(checkpoint_queues=("DreamShaper 8.safetensors",))
    assert task_lane(s, _entry("tiny-sd15.safetensors", False)) == "sd15"
    assert task_lane(s, _entry("tiny-sdxl.safetensors", True)) == "sdxl"
    assert task_lane(s, _entry("DreamShaper 8.safetensors", False)) == "sd15.dreamshaper-8"
    assert task_lane(s, _entry("tiny-sdxl.safetensors", True), dedicated_lane="Acme") == "enterprise.acme"
    s2 = s.with_overrides(key_policies={"k": KeyPolicy(dedicated_lane="acme")})
    assert known_queues(s2, [_entry("DreamShaper 8.safetensors", False)]) == [
        "sd15", "sdxl", "sd15.dreamshaper-8", "enterprise.acme"
    ]  # fmt: skip


def test_parse_queues_rejects_bad_names() -> None:
    assert parse_queues(" sd15, sdxl ,sd15") == ("sd15", "sdxl")
    with pytest.raises(ValueError, match="no queue"):
        parse_queues(" , ")
    with pytest.raises(ValueError, match="invalid queue name"):
        parse_queues("sd15,SDXL queue")


def test_celery_config_is_durable_and_rejects_unknown_brokers() -> None:
    conf = celery_config(Settings(broker_visibility_timeout=77))
    assert conf["task_acks_late"]
    assert conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_transport_options"]["visibility_timeout"] == 77
    assert conf["task_serializer"] == "json"
    assert conf["accept_content"] == ["json"]
    assert conf["broker_heartbeat"] == 0
    with pytest.raises(ValueError, match="unsupported broker URL"):
        celery_config(Settings(broker_url="kafka://x"))


# --- JSON logs --------------------------------------------------------------------------------------------------


def test_json_logs_carry_the_task_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TaskIdFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("underpaint.test.jsonlog")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        logger.warning("outside")
        with task_context("t-123"):
            logger.info("inside %s", "x", extra={"attempt": 2})
            logging.getLogger("underpaint.test.jsonlog.child").error("child")
        celery_like = logging.getLogger("celery.test.jsonlog")
        celery_like.addHandler(handler)
        celery_like.propagate = False
        celery_like.warning("Task %(name)s[%(id)s] received", {"name": "n", "id": "t-456"})
        celery_like.removeHandler(handler)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [x["task_id"] for x in lines] == [None, "t-123", "t-123", "t-456"]
    assert lines[1]["message"] == "inside x"
    assert lines[1]["attempt"] == 2
    assert lines[1]["level"] == "INFO"


# --- shared fixtures --------------------------------------------------------------------------------------------


class FakeStorage:
    name = "s3"

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str) -> None:
        self.objects[key] = data

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def url(self, key: str, ttl: int, base_url: str) -> str:
        return f"s3://{key}"

    def delete(self, key: str) -> None:
        self.objects.pop(key, None)


class FakeRunner:
    """Stands in for the diffusion runner: reports progress, optionally blocks, stores one object."""

    checkpoint_loads = 0

    def __init__(self, storage: FakeStorage, gate: threading.Event | None = None) -> None:
        self.storage = storage
        self.gate = gate
        self.runs: list[str] = []
        self.started = threading.Event()

    def run(self, task: TaskRecord, request: TaskRequest, report: Any) -> list[ImageRecord]:
        self.runs.append(task.task_id)
        self.started.set()
        report(Progress(50 / 100, 1))
        if self.gate is not None:
            assert self.gate.wait(30)
        key = f"{task.task_id}/{task.attempts}.png"
        self.storage.put(key, b"png", "image/png")
        return [ImageRecord(key=key, image_type="png", backend="s3")]


@pytest.fixture
def store(pg_url: str) -> Iterator[SqlTaskStore]:
    s = SqlTaskStore(pg_url, lease_seconds=2, max_attempts=2)
    with s.engine.begin() as conn:
        conn.execute(text("DELETE FROM task_payloads"))
        conn.execute(text("DELETE FROM tasks"))
    yield s
    s.close()


def _services(store: SqlTaskStore, redis_url: str, tmp_path: Path) -> Services:
    settings = Settings(broker_url=redis_url, queue_backend="celery", lease_seconds=2, max_attempts=2,
                        data_dir=tmp_path, models_dir=tmp_path / "models")  # fmt: skip
    return _make(settings, store, CeleryQueue(settings), tmp_path)


def _make(settings: Settings, store: SqlTaskStore, queue: CeleryQueue, tmp_path: Path) -> Services:
    storage = FakeStorage()
    return Services(settings=settings, store=store, queue=queue, registry=ModelRegistry(tmp_path),
                    storage=storage, image_urls=ImageUrls(storage, settings.image_url_ttl))  # fmt: skip


def _new(store: SqlTaskStore, lane: str) -> str:
    task_id = str(uuid.uuid4())
    # A checkpoint of its own: these tests count tasks run one by one, so none may join another's batch.
    store.create(new_task(task_id, request=img2img(model_name=f"{lane}-{task_id}.safetensors"), lane=lane))
    return task_id


def _flush(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    for key in client.keys("*"):
        if key != b"underpaint:test-owner":
            client.delete(key)


# --- queue depth and routing on the brokers ---------------------------------------------------------------------


def test_celery_queue_routes_to_lane_on_redis(store: SqlTaskStore, redis_url: str, tmp_path: Path) -> None:
    _flush(redis_url)
    services = _services(store, redis_url, tmp_path)
    probe = BrokerProbe(services, store.engine)
    assert probe.queue_depths() == {"sd15": 0, "sdxl": 0}
    services.queue.enqueue("a", "sdxl")
    services.queue.enqueue("b", "sdxl")
    services.queue.enqueue("c", "sd15")
    assert probe.queue_depths() == {"sd15": 1, "sdxl": 2}
    assert probe.health() == {"store": "ok", "broker": "ok", "storage": "ok"}
    down = BrokerProbe(
        services,
        store.engine,
        app=create_celery_app(services.settings.with_overrides(broker_url="redis://127.0.0.1:1/0")),
    )
    assert down.health()["broker"] == "unreachable"
    _flush(redis_url)


def test_celery_queue_on_rabbitmq(amqp_url: str, tmp_path: Path, store: SqlTaskStore) -> None:
    lane = f"test{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=amqp_url, queue_backend="celery", key_policies={"k": KeyPolicy(dedicated_lane=lane)})
    queue = CeleryQueue(settings)
    services = _make(settings, store, queue, tmp_path)
    probe = BrokerProbe(services, store.engine)
    try:
        queue.enqueue("t1", f"enterprise.{lane}")
        queue.enqueue("t2", f"enterprise.{lane}")
        depths = probe.queue_depths()
        assert depths[f"enterprise.{lane}"] == 2
        assert probe.health()["broker"] == "ok"
        with queue.app.connection_for_write() as conn:
            msg = conn.SimpleQueue(f"enterprise.{lane}").get(timeout=5)
            assert msg.headers["task"] == TASK_NAME
            assert msg.payload[0] == ["t1"]
            msg.ack()
    finally:
        with queue.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(f"enterprise.{lane}")


# --- a real Celery worker consuming from Redis ---------------------------------------------------------------------


class _CeleryThread:
    """A Celery worker consuming in a thread of the test process, with the pool ``run_worker`` uses for
    concurrency 1."""

    def __init__(self, app: Any, queues: list[str]) -> None:
        self.controller = app.WorkController(
            pool_cls=worker_pool(1), concurrency=1, queues=queues, without_gossip=True, without_mingle=True,
            without_heartbeat=True, hostname=f"test-{uuid.uuid4().hex[:6]}@localhost", loglevel="WARNING",
        )  # fmt: skip
        app.set_default()  # as ``run_worker`` does: worker parts look tasks up through the default app
        self.thread = threading.Thread(target=self.controller.start, daemon=True)

    def __enter__(self) -> _CeleryThread:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        # Ask the consumer loop to stop itself, on its own thread (as a signal does in a worker process):
        # closing its broker connection from this thread can hang py-amqp.
        from celery.worker import state

        state.should_stop = 0
        try:
            self.thread.join(60)
        finally:
            state.should_stop = None
        assert not self.thread.is_alive(), "the Celery worker thread did not stop"


def _wait_status(store: SqlTaskStore, task_id: str, status: TaskStatus, timeout: float = 30) -> TaskRecord:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = store.get(task_id)
        if rec is not None and rec.status is status:
            return rec
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} not {status}: {store.get(task_id)}")


def test_worker_only_takes_its_queues_and_runs_each_task_once(
    store: SqlTaskStore, redis_url: str, tmp_path: Path
) -> None:
    _flush(redis_url)
    services = _services(store, redis_url, tmp_path)
    runner = FakeRunner(services.storage)  # type: ignore[arg-type]
    terminal: list[str] = []
    ctx = WorkerContext(services, store.engine, [InstrumentedRunner(runner)], lambda rec: terminal.append(rec.task_id))
    app = services.queue.app  # type: ignore[attr-defined]
    register_task(app, ctx)
    sd15, sdxl = _new(store, "sd15"), _new(store, "sdxl")
    services.queue.enqueue(sd15, "sd15")
    services.queue.enqueue(sdxl, "sdxl")
    services.queue.enqueue(sd15, "sd15")  # delivered twice
    with _CeleryThread(app, ["sd15"]):
        done = _wait_status(store, sd15, TaskStatus.SUCCEED)
        deadline = time.monotonic() + 10
        while BrokerProbe(services, store.engine).queue_depths()["sd15"] and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
    assert runner.runs == [sd15]  # the duplicate message did nothing; the SDXL task was never taken
    assert terminal == [sd15]
    assert done.attempts == 1
    assert len(done.images) == 1
    assert store.get(sdxl).status is TaskStatus.QUEUED  # type: ignore[union-attr]
    assert BrokerProbe(services, store.engine).queue_depths() == {"sd15": 0, "sdxl": 1}
    _flush(redis_url)


def test_dead_worker_task_is_swept_and_rerun_then_fails_after_max_attempts(
    store: SqlTaskStore, redis_url: str, tmp_path: Path
) -> None:
    _flush(redis_url)
    services = _services(store, redis_url, tmp_path)
    runner = FakeRunner(services.storage)  # type: ignore[arg-type]
    ctx = WorkerContext(services, store.engine, [runner], lambda rec: None)
    app = services.queue.app  # type: ignore[attr-defined]
    register_task(app, ctx)
    task_id = _new(store, "sd15")
    assert store.claim(task_id, "deadhost:1:x") is not None  # a worker took it, then died (no heartbeat)
    assert ctx.sweep() == []  # lease still valid
    time.sleep(2.2)
    assert ctx.sweep() == [task_id]  # requeued and announced on its queue again
    assert BrokerProbe(services, store.engine).queue_depths()["sd15"] == 1
    with _CeleryThread(app, ["sd15"]):
        rec = _wait_status(store, task_id, TaskStatus.SUCCEED)
    assert rec.attempts == 2
    assert runner.runs == [task_id]
    assert list(services.storage.objects) == [f"{task_id}/2.png"]  # type: ignore[attr-defined]

    # A task that keeps killing its workers: after max_attempts (2) it ends FAILED with a reason.
    killer = _new(store, "sd15")
    for n in range(2):
        assert store.claim(killer, f"deadhost:{n}:x") is not None
        time.sleep(2.2)
        ctx.sweep()
    rec2 = store.get(killer)
    assert rec2 is not None
    assert rec2.status is TaskStatus.FAILED
    assert "2 attempts" in rec2.reason
    _flush(redis_url)


# --- heartbeats and metrics -------------------------------------------------------------------------------------


def test_heartbeat_rows_and_cluster_metrics(store: SqlTaskStore, redis_url: str, tmp_path: Path) -> None:
    _flush(redis_url)
    services = _services(store, redis_url, tmp_path)
    hb = Heartbeat(store.engine, ("sd15",), 1, lambda: {"busy": 1, "tasks_done": 3, "model_loads": 2}, interval=0.2)
    hb.start()
    try:
        time.sleep(0.5)
        (info,) = [w for w in list_workers(store.engine) if w.worker_id == hb.worker_id]
        assert info.queues == ("sd15",)
        assert info.tasks_done == 3
        assert time.time() - info.last_seen < 1.0
        for lane in ("sd15", "sd15", "sdxl"):
            services.queue.enqueue(_new(store, lane), lane)
        store.claim(None, "w:1:x")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ClusterCollector(services, store.engine, BrokerProbe(services, store.engine).queue_depths))
        out = generate_latest(registry).decode()
    finally:
        hb.stop()
    assert 'underpaint_queue_depth{queue="sd15"} 2.0' in out
    assert 'underpaint_queue_depth{queue="sdxl"} 1.0' in out
    assert 'underpaint_tasks{status="TASK_STATUS_QUEUED"} 2.0' in out
    assert 'underpaint_tasks{status="TASK_STATUS_PROCESSING"} 1.0' in out
    assert 'underpaint_workers_alive{queue="sd15"} 1.0' in out
    assert f'underpaint_worker_model_loads_total{{worker="{hb.worker_id}"}} 2.0' in out
    assert [w for w in list_workers(store.engine) if w.worker_id == hb.worker_id] == []  # removed on stop
    _flush(redis_url)


def test_instrumented_runner_observes_generation_seconds(tmp_path: Path) -> None:
    from underpaint.scale.metrics import WORKER_REGISTRY as REGISTRY

    runner = InstrumentedRunner(FakeRunner(FakeStorage()))
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")  # the progress reporter writes to a real store
    rec = store.claim(_new(store, "sdxl"), "w")
    assert rec is not None
    assert (rec.status, rec.lane, rec.attempts) == (TaskStatus.PROCESSING, "sdxl", 1)
    before = REGISTRY.get_sample_value("underpaint_generation_seconds_count", {"base_model": "sdxl", "outcome": "ok"})
    runner.run(rec, img2img(), ProgressReporter(store, rec.task_id, "w"))
    store.close()
    after = REGISTRY.get_sample_value("underpaint_generation_seconds_count", {"base_model": "sdxl", "outcome": "ok"})
    assert (after or 0) - (before or 0) == 1


class TieredRunner(FakeRunner):
    """A runner whose executor served each run from the next tier in ``tiers`` and forwards prefetch hints."""

    def __init__(self, storage: FakeStorage, tiers: list[str]) -> None:
        super().__init__(storage)
        self.tiers = tiers
        self.hits = {"device": 0, "ram": 0, "disk": 0}
        self.hints: list[list[str]] = []

    def run(self, task: TaskRecord, request: TaskRequest, report: Any) -> list[ImageRecord]:
        self.hits[self.tiers.pop(0)] += 1
        return super().run(task, request, report)

    def prefetch(self, checkpoints: Sequence[str]) -> None:
        self.hints.append(list(checkpoints))

    def cache_report(self) -> ModelCacheReport:
        return ModelCacheReport(hits=dict(self.hits), bytes={"device": 5, "ram": 7}, load_seconds=1.5)


def test_instrumented_runner_counts_checkpoint_tiers_and_forwards_prefetch(tmp_path: Path) -> None:
    from underpaint.scale.metrics import WORKER_REGISTRY as REGISTRY

    def requests(tier: str) -> float:
        return REGISTRY.get_sample_value("underpaint_checkpoint_requests_total", {"tier": tier}) or 0.0

    inner = TieredRunner(FakeStorage(), ["disk", "ram", "device"])
    runner = InstrumentedRunner(inner)
    runner.prefetch(["b.safetensors"])
    assert inner.hints == [["b.safetensors"]]
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'tasks.db'}")
    before = {tier: requests(tier) for tier in ("device", "ram", "disk")}
    for _ in range(3):
        rec = store.claim(_new(store, "sd15"), "w")
        assert rec is not None
        runner.run(rec, img2img(), ProgressReporter(store, rec.task_id, "w"))
    store.close()
    assert {tier: requests(tier) - before[tier] for tier in before} == {"device": 1, "ram": 1, "disk": 1}
    assert REGISTRY.get_sample_value("underpaint_checkpoint_tier_bytes", {"tier": "ram"}) == 7
    assert REGISTRY.get_sample_value("underpaint_checkpoint_tier_bytes", {"tier": "device"}) == 5


def test_worker_on_rabbitmq_runs_a_task_once(store: SqlTaskStore, amqp_url: str, tmp_path: Path) -> None:
    lane = f"enterprise.t{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=amqp_url, queue_backend="celery", lease_seconds=2, data_dir=tmp_path)
    queue = CeleryQueue(settings)
    services = _make(settings, store, queue, tmp_path)
    runner = FakeRunner(services.storage)  # type: ignore[arg-type]
    register_task(queue.app, WorkerContext(services, store.engine, [runner], lambda rec: None))
    task_id = _new(store, lane)
    queue.enqueue(task_id, lane)
    queue.enqueue(task_id, lane)  # a duplicate delivery
    try:
        with _CeleryThread(queue.app, [lane]):
            rec = _wait_status(store, task_id, TaskStatus.SUCCEED)
            deadline = time.monotonic() + 10
            probe = BrokerProbe(services, store.engine)
            while time.monotonic() < deadline and probe.queue_depths().get(lane, 0):
                time.sleep(0.1)
        assert runner.runs == [task_id]
        assert rec.attempts == 1
    finally:
        with queue.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(lane)


def test_a_workers_metrics_port_serves_generation_and_process_metrics() -> None:
    import socket

    from prometheus_client import start_http_server

    from underpaint.scale.metrics import serving_registry

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server, thread = start_http_server(port, addr="127.0.0.1", registry=serving_registry())
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        server.shutdown()
        thread.join(5)
    for family in ("underpaint_generation_seconds", "underpaint_model_loads", "process_cpu_seconds"):
        assert f"# TYPE {family}" in text, family


# --- a task whose broker message is lost ------------------------------------------------------------------------


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_an_idle_worker_claims_tasks_whose_message_never_came(
    store: SqlTaskStore, broker: str, request: pytest.FixtureRequest, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = request.getfixturevalue("redis_url" if broker == "redis" else "amqp_url")
    settings = Settings(broker_url=url, queue_backend="celery", lease_seconds=2, queue_poll_seconds=0.5,
                        data_dir=tmp_path, models_dir=tmp_path / "models")  # fmt: skip
    services = _make(settings, store, CeleryQueue(settings), tmp_path)
    runner = FakeRunner(services.storage)  # type: ignore[arg-type]
    ctx = WorkerContext(services, store.engine, [runner], lambda rec: None, lanes=("sd15",))
    lost = _new(store, "sd15")  # written, but its message was never sent (or died with the broker)
    other_queue = _new(store, "sdxl")
    time.sleep(0.6)
    fresh = _new(store, "sd15")  # its message may still be on the way: left to it
    before = _sample("underpaint_tasks_claimed_from_store_total")
    with caplog.at_level(logging.WARNING, logger="underpaint.scale"):
        assert ctx.poll_store() == 1
    assert runner.runs == [lost]
    assert _status(store, lost) is TaskStatus.SUCCEED
    assert _status(store, other_queue) is TaskStatus.QUEUED  # not this worker's queue
    assert _status(store, fresh) is TaskStatus.QUEUED
    assert any(lost in r.getMessage() and "claimed from the store" in r.getMessage() for r in caplog.records)
    assert _sample("underpaint_tasks_claimed_from_store_total") - before == 1
    with ctx.hold_runner() as busy:  # every runner busy: the poller leaves the work to the consumer
        assert busy is not None
        time.sleep(0.6)
        assert ctx.poll_store() == 0
    assert ctx.poll_store() == 1
    assert runner.runs == [lost, fresh]


def _status(store: SqlTaskStore, task_id: str) -> TaskStatus:
    rec = store.get(task_id)
    assert rec is not None
    return rec.status


def _sample(name: str) -> float:
    from underpaint.scale.metrics import WORKER_REGISTRY

    return WORKER_REGISTRY.get_sample_value(name) or 0.0


def test_a_consuming_worker_on_rabbitmq_runs_a_task_that_has_no_message(
    store: SqlTaskStore, amqp_url: str, tmp_path: Path
) -> None:
    """The store poller beside a live consumer: a task whose message never reached RabbitMQ still runs."""
    lane = f"enterprise.t{uuid.uuid4().hex[:8]}"
    settings = Settings(broker_url=amqp_url, queue_backend="celery", lease_seconds=2, queue_poll_seconds=0.3,
                        data_dir=tmp_path)  # fmt: skip
    queue = CeleryQueue(settings)
    services = _make(settings, store, queue, tmp_path)
    runner = FakeRunner(services.storage)  # type: ignore[arg-type]
    ctx = WorkerContext(services, store.engine, [runner], lambda rec: None, lanes=(lane,))
    register_task(queue.app, ctx)
    task_id = _new(store, lane)  # no queue.enqueue: the publish failed, or the broker lost it
    ctx.start_background(sweep_interval=1.0)
    try:
        with _CeleryThread(queue.app, [lane]):
            rec = _wait_status(store, task_id, TaskStatus.SUCCEED)
    finally:
        ctx.stop()
        with queue.app.connection_for_write() as conn:
            conn.default_channel.queue_delete(lane)
    assert runner.runs == [task_id]
    assert rec.attempts == 1


# --- a storage outage past storage_retry_seconds ------------------------------------------------------------------


class _StorageOut(FakeRunner):
    """A runner whose uploads met a storage outage that spent the retry budget: its ``claim_gate`` stays closed
    while ``storage_up`` is False (the probe)."""

    def __init__(self, storage: FakeStorage) -> None:
        super().__init__(storage)
        self.storage_up = False
        retry = UploadRetry(0)
        with pytest.raises(StorageError):
            retry.run(_unreachable, "t-before", "upload")
        self.claim_gate = StorageGate(
            retry, lambda: "ok" if self.storage_up else "unreachable: down", first_interval=0.05, max_interval=0.1,
            on_change=count_claims_paused,
        )  # fmt: skip


def _unreachable() -> None:
    raise StorageError("S3 upload failed: cannot reach the S3 endpoint", transient=True)


def test_a_worker_whose_storage_is_out_leaves_its_tasks_queued_and_runs_them_once_it_is_back(
    store: SqlTaskStore, redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Messages that arrive while claiming is paused are acknowledged without claiming; their tasks stay QUEUED
    (not FAILED), and the store poller claims them once the storage answers."""
    _flush(redis_url)
    settings = Settings(broker_url=redis_url, queue_backend="celery", lease_seconds=2, queue_poll_seconds=0.3,
                        data_dir=tmp_path, models_dir=tmp_path / "models")  # fmt: skip
    services = _make(settings, store, CeleryQueue(settings), tmp_path)
    runner = _StorageOut(services.storage)  # type: ignore[arg-type]
    ctx = WorkerContext(services, store.engine, [InstrumentedRunner(runner)], lambda rec: None, lanes=("sd15",))
    app = services.queue.app  # type: ignore[attr-defined]
    register_task(app, ctx)
    ids = [_new(store, "sd15") for _ in range(3)]
    for task_id in ids:
        services.queue.enqueue(task_id, "sd15")
    paused_before = _sample("underpaint_storage_claims_paused")
    ctx.start_background(sweep_interval=1.0)
    try:
        with caplog.at_level(logging.INFO, logger="underpaint.scale"), _CeleryThread(app, ["sd15"]):
            probe = BrokerProbe(services, store.engine)
            deadline = time.monotonic() + 20
            while probe.queue_depths()["sd15"] and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1.0)  # the poller's turn came three times meanwhile
            assert probe.queue_depths()["sd15"] == 0  # every message taken ...
            assert [_status(store, t) for t in ids] == [TaskStatus.QUEUED] * 3  # ... and no task claimed or failed
            assert runner.runs == []
            assert _sample("underpaint_storage_claims_paused") - paused_before == 1
            runner.storage_up = True
            for task_id in ids:
                _wait_status(store, task_id, TaskStatus.SUCCEED)
    finally:
        ctx.stop()
    assert sorted(runner.runs) == sorted(ids)
    assert _sample("underpaint_storage_claims_paused") == paused_before
    dropped = [r.getMessage() for r in caplog.records if "not claimed while the storage is out" in r.getMessage()]
    assert len(dropped) == 3
    _flush(redis_url)
