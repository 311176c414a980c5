"""Cancel in scale-out mode, with real processes: an API node and a Celery worker on PostgreSQL, Redis and S3.

The cancel request reaches the worker only through the task row (another process, another machine): the running
task stops within a sampler step of the worker reading the flag, ends FAILED with ``cancelled by the client``,
leaves no images, and its webhook fires once; a queued task is never run; the worker then runs the next task.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from tests.support.cluster import AUTH, ApiNode, Cluster, WebhookReceiver, WorkerNode, png_b64, wait_all
from tests.support.services import postgres_schema_url

from underpaint.tasks.types import CANCELLED_REASON

pytestmark = [pytest.mark.services, pytest.mark.slow]

POLL = 0.1  # UNDERPAINT_CANCEL_POLL_SECONDS of the worker
STEPS = 100


class Running:
    def __init__(self, cluster: Cluster, api: ApiNode, worker: WorkerNode, receiver: WebhookReceiver) -> None:
        self.cluster = cluster
        self.api = api
        self.worker = worker
        self.receiver = receiver

    def submit(self, steps: int, size: int, image_num: int = 1) -> str:
        body = {
            "extra": {"response_image_type": "png", "webhook": {"url": self.receiver.url}},
            "request": {
                "model_name": "tiny-sd15.safetensors", "image_base64": png_b64(seed=3), "prompt": "a lighthouse",
                "width": size, "height": size, "image_num": image_num, "steps": steps, "seed": 3,
                "sampler_name": "Euler", "strength": 1.0,
            },
        }  # fmt: skip
        r = httpx.post(self.api.url + "/v3/async/img2img", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def cancel(self, task_id: str) -> httpx.Response:
        return httpx.post(self.api.url + "/v3/async/task-cancel", json={"task_id": task_id}, headers=AUTH, timeout=30)

    def objects(self, task_id: str) -> list[str]:
        s3 = boto3.client("s3", endpoint_url=self.cluster.s3_endpoint, region_name="us-east-1")
        listing = s3.list_objects_v2(Bucket=self.cluster.s3_bucket)
        return [str(o["Key"]) for o in listing.get("Contents", []) if f"/{task_id}/" in f"/{o['Key']}"]

    def hooks_for(self, task_id: str) -> list[dict[str, Any]]:
        return [b for b in list(self.receiver.received) if b["payload"]["task"]["task_id"] == task_id]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path, redis_url: str, s3_endpoint: str) -> Iterator[Running]:  # fmt: skip
    bucket = f"underpaint-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    receiver = WebhookReceiver()
    with postgres_schema_url("cancel_") as database_url:
        env = {
            "UNDERPAINT_WEBHOOK_ALLOW_HOSTS": f"127.0.0.1:{receiver.port}",
            "UNDERPAINT_CANCEL_POLL_SECONDS": str(POLL),
        }
        cluster = Cluster(tmp_path_factory.mktemp("cancel"), tiny_models_dir, database_url, redis_url, s3_endpoint,
                          bucket, extra_env=env)  # fmt: skip
        api = cluster.api("api").start()
        worker = cluster.worker("worker").start()
        try:
            yield Running(cluster, api, worker, receiver)
        finally:
            worker.stop()
            api.stop()
            receiver.close()


def wait_progress(run: Running, task_id: str, at_least: int, timeout: float = 240) -> tuple[dict[str, Any], float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run.worker.check_alive()
        body = run.api.result(task_id)
        if body["task"]["status"] == "TASK_STATUS_PROCESSING" and body["task"]["progress_percent"] >= at_least:
            return body, time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never reached {at_least} %:\n{run.worker.log_tail()}")


def test_worker_stops_a_running_task_within_a_step(running: Running) -> None:
    run = running
    task_id = run.submit(steps=STEPS, size=256)
    queued = run.submit(steps=2, size=128)  # one worker, busy: this one waits in the queue

    # Measure how long one sampler step takes here, from the task's own progress.
    first, t_first = wait_progress(run, task_id, 5)
    assert run.api.result(queued)["task"]["queue_position"] == 1  # the running task is no longer ahead
    second, t_second = wait_progress(run, task_id, first["task"]["progress_percent"] + 10)
    steps_done = (second["task"]["progress_percent"] - first["task"]["progress_percent"]) * STEPS / 100
    step_seconds = (t_second - t_first) / steps_done

    assert run.cancel(queued).status_code == 200  # QUEUED: ends at once, never runs
    queued_body = run.api.result(queued)
    assert (queued_body["task"]["status"], queued_body["task"]["reason"]) == ("TASK_STATUS_FAILED", CANCELLED_REASON)

    asked = time.monotonic()
    r = run.cancel(task_id)
    assert r.status_code == 200, r.text
    assert r.json() == {"task_id": task_id}
    body = wait_all(run.api, [task_id], timeout=60, procs=[run.api, run.worker])[task_id]
    stopped_after = time.monotonic() - asked
    print(f"one step {step_seconds:.3f} s; stopped {stopped_after:.2f} s after the cancel request")
    assert (body["task"]["status"], body["task"]["reason"]) == ("TASK_STATUS_FAILED", CANCELLED_REASON)
    assert body["images"] == []
    assert body["task"]["progress_percent"] < 100
    # Within a step of seeing the flag: the poll, the step in progress, one more step and the API's poll latency.
    assert stopped_after < POLL + 2 * step_seconds + 1.5, (stopped_after, step_seconds)
    assert step_seconds * STEPS > 4 * stopped_after, "the task would have had much longer to run"
    assert run.objects(task_id) == []

    # The worker is free again, and the cancelled queued task never ran (its message was dropped).
    after = run.submit(steps=2, size=128)
    done = wait_all(run.api, [after], timeout=120, procs=[run.api, run.worker])[after]
    assert done["task"]["status"] == "TASK_STATUS_SUCCEED"
    assert run.api.result(queued)["extra"]["debug_info"]["execute_time_ms"] == 0
    assert f"{CANCELLED_REASON}" in run.worker.log_tail(20000)

    # Each webhook fires exactly once (give a duplicate time to show up).
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (run.hooks_for(task_id) and run.hooks_for(queued)):
        time.sleep(0.2)
    time.sleep(2)
    for tid in (task_id, queued):
        hooks = run.hooks_for(tid)
        assert len(hooks) == 1, (tid, hooks)
        assert hooks[0]["payload"]["task"]["reason"] == CANCELLED_REASON


def test_cancel_errors_across_processes(running: Running) -> None:
    run = running
    done_id = run.submit(steps=2, size=128)
    wait_all(run.api, [done_id], timeout=120, procs=[run.api, run.worker])
    finished = run.cancel(done_id)
    assert (finished.status_code, finished.json()["reason"]) == (400, "TASK_NOT_CANCELLABLE")
    unknown = run.cancel("no-such-task")
    assert (unknown.status_code, unknown.json()["reason"]) == (404, "TASK_NOT_FOUND")
