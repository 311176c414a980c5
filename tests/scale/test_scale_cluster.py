"""Scale-out mode end to end, with real processes: two API nodes (``serve --no-worker --queue celery``) and two
Celery workers on one PostgreSQL store, one Redis broker and one S3 bucket (moto server).

The tests share one cluster and run in order: 40 tasks exactly once across both nodes; compatible tasks batched
by a worker (their own messages then do nothing); SIGKILL of the worker
holding a task's lease; stop and restart of every process with tasks queued; routing by base model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from sqlalchemy import text
from tests.support.cluster import AUTH, ApiNode, Cluster, WebhookReceiver, WorkerNode, wait_all

from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskRecord, TaskStatus

pytestmark = [pytest.mark.services, pytest.mark.slow]


class Running:
    def __init__(self, cluster: Cluster, store: SqlTaskStore, receiver: WebhookReceiver) -> None:
        self.cluster = cluster
        self.store = store
        self.receiver = receiver
        self.apis: list[ApiNode] = []
        self.workers: list[WorkerNode] = []
        self.s3 = boto3.client("s3", endpoint_url=cluster.s3_endpoint, region_name="us-east-1")

    @property
    def procs(self) -> list[Any]:
        return [*self.apis, *self.workers]

    def start_apis(self, n: int = 2) -> None:
        self.apis = [self.cluster.api(f"api{i}") for i in range(n)]
        for a in self.apis:
            a.spawn()
        for a in self.apis:
            a.start_wait()

    def start_worker(self, name: str, queues: str = "sd15,sdxl") -> WorkerNode:
        w = self.cluster.worker(name, queues).start()
        self.workers.append(w)
        return w

    def stop_all(self) -> None:
        for p in self.procs:
            p.stop()

    def objects(self, task_id: str) -> list[str]:
        listing = self.s3.list_objects_v2(Bucket=self.cluster.s3_bucket)
        # Object keys are "<s3_prefix>/<image key>"; the prefix is Settings.s3_prefix ("underpaint").
        keys = [str(o["Key"]).removeprefix("underpaint/") for o in listing.get("Contents", [])]
        return [k for k in keys if k.startswith(f"{task_id}/")]

    def record(self, task_id: str) -> TaskRecord:
        rec = self.store.get(task_id)
        assert rec is not None
        return rec

    def wait_workers_alive(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for w in self.workers:
                w.check_alive()
            body = httpx.get(self.apis[0].url + "/health/workers", timeout=10).json()
            if body["alive"] >= n:
                return
            time.sleep(0.5)
        raise AssertionError(f"fewer than {n} live workers: {body}")


@pytest.fixture(scope="module")
def running(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, pg_url: str, redis_url: str, s3_endpoint: str
) -> Iterator[Running]:
    import uuid

    bucket = f"underpaint-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    receiver = WebhookReceiver()
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), tiny_models_dir, pg_url, redis_url, s3_endpoint, bucket,
                      extra_env={"UNDERPAINT_WEBHOOK_ALLOW_HOSTS": f"127.0.0.1:{receiver.port}",
                                 # batching on (the default max_batch 4), with a window that gathers what the
                                 # test submits one request at a time
                                 "UNDERPAINT_BATCH_WINDOW_MS": "300"})  # fmt: skip
    run = Running(cluster, SqlTaskStore(pg_url), receiver)
    try:
        run.start_apis(2)
        run.start_worker("w0")
        run.start_worker("w1")
        run.wait_workers_alive(2)
        yield run
    finally:
        run.stop_all()
        run.store.close()
        receiver.close()


def stop_together(procs: list[Any]) -> None:
    for p in procs:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.terminate()
    for p in procs:
        p.stop()


def _assert_exactly_once(run: Running, bodies: dict[str, dict[str, Any]], image_nums: dict[str, int]) -> None:
    keys: list[str] = []
    for task_id, body in bodies.items():
        assert body["task"]["status"] == "TASK_STATUS_SUCCEED", body["task"]
        rec = run.record(task_id)
        assert rec.status is TaskStatus.SUCCEED
        assert len(body["images"]) == image_nums[task_id] == len(rec.images)
        task_keys = [i.key for i in rec.images]
        keys += task_keys
        assert sorted(run.objects(task_id)) == sorted(task_keys)  # no orphan from a second run
    assert len(keys) == len(set(keys))


def _assert_log_lines_carry_task_ids(run: Running, task_ids: set[str]) -> None:
    """Every JSON log line of the workers that is about one of ``task_ids`` has it in its ``task_id`` field."""
    about: dict[str, int] = {}
    for w in run.workers:
        for line in w.log_path.read_text().splitlines():
            if not line.startswith("{"):
                continue  # library warnings printed before logging is configured
            row = json.loads(line)
            named = [t for t in task_ids if t in row["message"]]
            for t in named:
                assert row["task_id"] == t, row
                about[t] = about.get(t, 0) + 1
    assert set(about) == task_ids  # each task was logged (received, finished ...) by some worker


def test_forty_tasks_across_two_api_nodes_run_exactly_once(running: Running) -> None:
    image_nums: dict[str, int] = {}
    for i in range(40):
        api = running.apis[i % 2]
        n = 2 if i % 5 == 0 else 1
        model = "tiny-sdxl.safetensors" if i % 8 == 3 else "tiny-sd15.safetensors"
        image_nums[api.submit(model=model, steps=2, seed=i, image_num=n, webhook=running.receiver.url)] = n
    bodies = wait_all(running.apis[0], list(image_nums), timeout=600, procs=running.procs)
    _assert_exactly_once(running, bodies, image_nums)
    deadline = time.monotonic() + 60
    while len(running.receiver.task_ids()) < len(image_nums) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)  # a duplicate would arrive now
    assert sorted(running.receiver.task_ids()) == sorted(image_nums)  # one webhook per task
    with running.store.engine.connect() as conn:
        rows = conn.execute(text("SELECT task_id, status FROM webhook_deliveries")).all()
    assert sorted(r[0] for r in rows) == sorted(image_nums)
    assert {r[1] for r in rows} == {"delivered"}
    for task_id in image_nums:  # every result is readable, identically, from the other node
        other = running.apis[1].result(task_id)
        assert other["task"] == bodies[task_id]["task"]
        assert [i["image_type"] for i in other["images"]] == [i["image_type"] for i in bodies[task_id]["images"]]
    assert {running.record(t).attempts for t in image_nums} == {1}
    workers_used = {running.record(t).worker_id.split(":")[1] for t in image_nums}  # type: ignore[union-attr]
    assert workers_used == {str(w.pid) for w in running.workers}  # both workers took tasks
    url = bodies[next(iter(bodies))]["images"][0]["image_url"]
    assert httpx.get(url, timeout=30).content[:8] == b"\x89PNG\r\n\x1a\n"
    _assert_log_lines_carry_task_ids(running, set(image_nums))
    metrics = httpx.get(running.apis[1].url + "/metrics", timeout=30).text
    assert 'underpaint_tasks{status="TASK_STATUS_SUCCEED"}' in metrics
    assert "underpaint_queue_depth" in metrics
    health = httpx.get(running.apis[1].url + "/health", timeout=30).json()
    assert health["checks"] == {"store": "ok", "broker": "ok", "storage": "ok"}


def test_compatible_tasks_share_a_sampler_call_and_their_messages_do_nothing_more(running: Running) -> None:
    ids = [running.apis[i % 2].submit(steps=4, seed=300 + i, webhook=running.receiver.url) for i in range(8)]
    bodies = wait_all(running.apis[0], ids, timeout=300, procs=running.procs)
    _assert_exactly_once(running, bodies, dict.fromkeys(ids, 1))
    assert {running.record(t).attempts for t in ids} == {1}  # a mate's own message later found it claimed/done
    sizes: dict[str, int] = {}
    for w in running.workers:
        for line in w.log_path.read_text().splitlines():
            if line.startswith("{") and "(batch of " in (row := json.loads(line))["message"]:
                sizes[row["task_id"]] = int(row["message"].rsplit("(batch of ", 1)[1].rstrip(")"))
    assert set(ids) <= set(sizes)
    assert max(sizes[t] for t in ids) > 1, sizes
    deadline = time.monotonic() + 60
    while not set(ids) <= set(running.receiver.task_ids()) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    hooks = running.receiver.task_ids()
    assert sorted(t for t in hooks if t in ids) == sorted(ids)  # one webhook per task


def test_sigkill_worker_mid_task_completes_on_the_other(running: Running) -> None:
    task_id = running.apis[0].submit(steps=60, size=128, seed=7)
    deadline = time.monotonic() + 120
    while True:
        rec = running.record(task_id)
        if rec.status is TaskStatus.PROCESSING and rec.progress_percent > 0:
            break
        assert time.monotonic() < deadline, f"task never started: {rec}"
        time.sleep(0.1)
    assert rec.worker_id is not None
    holder_pid = int(rec.worker_id.split(":")[1])
    (victim,) = [w for w in running.workers if w.pid == holder_pid]
    victim.kill()
    running.workers.remove(victim)
    body = wait_all(running.apis[1], [task_id], timeout=300, procs=running.procs)[task_id]
    assert body["task"]["status"] == "TASK_STATUS_SUCCEED", body["task"]
    done = running.record(task_id)
    assert done.attempts == 2
    assert done.worker_id is not None
    assert int(done.worker_id.split(":")[1]) == running.workers[0].pid
    assert sorted(running.objects(task_id)) == sorted(i.key for i in done.images)
    assert len(done.images) == 1  # (the next test stops every worker, so the killed one is not replaced)


def test_stop_and_restart_everything_with_tasks_queued_loses_nothing(running: Running) -> None:
    ids = [running.apis[i % 2].submit(steps=8, seed=100 + i) for i in range(4)]
    stop_together(running.workers)  # SIGTERM: a worker finishes what it runs (warm shutdown), then exits
    ids += [running.apis[i % 2].submit(steps=2, seed=200 + i) for i in range(4)]  # queued while no worker runs
    stop_together(running.apis)
    statuses = [running.record(t).status for t in ids]
    assert statuses.count(TaskStatus.QUEUED) >= 4
    assert TaskStatus.PROCESSING not in statuses
    running.workers = []
    running.start_apis(2)
    running.start_worker("w3", queues="sd15")  # (the next test keeps it as its SD 1.5-only worker)
    running.start_worker("w4")
    bodies = wait_all(running.apis[1], ids, timeout=300, procs=running.procs)
    _assert_exactly_once(running, bodies, dict.fromkeys(ids, 1))


def test_sdxl_task_is_never_taken_by_an_sd15_only_worker(running: Running) -> None:
    kept = [w for w in running.workers if w.queues == "sd15"][:1]  # the previous test's, if it ran
    for w in running.workers:
        if w not in kept:
            w.stop()
    running.workers = kept
    sd15_worker = kept[0] if kept else running.start_worker("w-sd15", queues="sd15")
    sdxl_task = running.apis[0].submit(model="tiny-sdxl.safetensors", steps=2, seed=11)
    sd15_task = running.apis[1].submit(model="tiny-sd15.safetensors", steps=2, seed=12)
    wait_all(running.apis[0], [sd15_task], timeout=300, procs=running.procs)
    time.sleep(3)
    rec = running.record(sdxl_task)
    assert rec.status is TaskStatus.QUEUED
    assert rec.attempts == 0
    assert rec.lane == "sdxl"
    assert running.record(sd15_task).worker_id.split(":")[1] == str(sd15_worker.pid)  # type: ignore[union-attr]
    depth = httpx.get(running.apis[0].url + "/metrics", timeout=30).text
    assert 'underpaint_queue_depth{queue="sdxl"} 1.0' in depth
    sdxl_worker = running.start_worker("w-sdxl", queues="sdxl")
    body = wait_all(running.apis[0], [sdxl_task], timeout=300, procs=running.procs)[sdxl_task]
    assert body["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert running.record(sdxl_task).worker_id.split(":")[1] == str(sdxl_worker.pid)  # type: ignore[union-attr]
    assert httpx.get(running.apis[0].url + "/v3/async/task-result", params={"task_id": sdxl_task},
                     headers=AUTH, timeout=30).status_code == 200  # fmt: skip
