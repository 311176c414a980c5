"""Infrastructure faults in scale-out mode, with real processes: an API node and a Celery worker on PostgreSQL,
Redis and S3 (moto), where the test owns each fault: a Redis server of its own killed and restarted empty (no
persistence), and TCP proxies in front of PostgreSQL and S3 that it cuts for about 10 s.

After each fault: every accepted task SUCCEED, each with exactly its images in the bucket (no orphan, no
duplicate), and the API answering normally again within 30 s of recovery. The claim_batch overshoot that the
same cluster showed is caught by tests/tasks/test_claim_limits.py.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import psycopg
import pytest
from tests.scale.conftest import PG_ADMIN, PG_BASE
from tests.support.cluster import ApiNode, Cluster, WorkerNode, img2img_body, wait_all
from tests.support.faults import RedisServer, TcpProxy

from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskStatus

pytestmark = [pytest.mark.services, pytest.mark.slow]

OUTAGE_S = 10.0
RECOVERY_S = 30.0


class Faulty:
    def __init__(
        self, cluster: Cluster, store: SqlTaskStore, redis: RedisServer, pg: TcpProxy, s3: TcpProxy, s3_direct: str
    ) -> None:
        self.cluster, self.store, self.redis, self.pg, self.s3 = cluster, store, redis, pg, s3
        self.api: ApiNode = cluster.api("api")
        self.worker: WorkerNode = cluster.worker("worker")
        self.accepted: list[str] = []
        self.bucket = boto3.client("s3", endpoint_url=s3_direct, region_name="us-east-1")

    def submit(self, n: int, seed: int) -> list[str]:
        ids = [self.api.submit(seed=seed + i) for i in range(n)]
        self.accepted += ids
        return ids

    def wait_done(self, timeout: float = 120.0) -> None:
        bodies = wait_all(self.api, self.accepted, timeout, [self.api, self.worker])
        failed = {t: b["task"]["reason"] for t, b in bodies.items() if b["task"]["status"] != "TASK_STATUS_SUCCEED"}
        assert not failed, failed
        self.assert_bucket_matches_tasks()

    def assert_bucket_matches_tasks(self) -> None:
        """Every object in the bucket is an image of exactly one accepted task, and every image is there."""
        listing = self.bucket.list_objects_v2(Bucket=self.cluster.s3_bucket)
        objects = sorted(str(o["Key"]).removeprefix("underpaint/") for o in listing.get("Contents", []))
        images: list[str] = []
        for task_id in self.accepted:
            rec = self.store.get(task_id)
            assert rec is not None
            assert rec.status is TaskStatus.SUCCEED
            assert len(rec.images) == 1
            images += [i.key for i in rec.images]
        assert len(images) == len(set(images))  # no image recorded twice
        assert objects == sorted(images)  # no orphan, nothing missing

    def assert_api_recovers(self, since: float) -> None:
        """Within ``RECOVERY_S`` of ``since`` the API is healthy and accepts and answers requests."""
        deadline = since + RECOVERY_S
        last: Any = None
        while time.monotonic() < deadline:
            try:
                health = httpx.get(self.api.url + "/health", timeout=5)
                last = health.text
                if health.status_code == 200 and health.json()["status"] == "ok":
                    probe = self.api.submit(seed=999)
                    self.accepted.append(probe)
                    assert self.api.result(probe)["task"]["task_id"] == probe
                    return
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"the API did not recover within {RECOVERY_S} s: {last}")

    def processing(self) -> bool:
        return self.store.count_by_status()[TaskStatus.PROCESSING] > 0


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Faulty]:
    from moto.server import ThreadedMotoServer
    from tests.support.ports import free_port

    root = tmp_path_factory.mktemp("faults")
    db = f"underpaint_faults_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    moto_host, moto_port = moto.get_host_and_port()
    redis = RedisServer(root / "redis")
    redis.start()
    pg = TcpProxy("127.0.0.1", 5432)
    s3 = TcpProxy(moto_host, moto_port)
    direct_s3 = f"http://{moto_host}:{moto_port}"
    bucket = f"underpaint-{uuid.uuid4().hex[:12]}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    boto3.client("s3", endpoint_url=direct_s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    proxied_db = f"{PG_BASE.rsplit(':', 1)[0]}:{pg.port}/{db}"
    cluster = Cluster(root, tiny_models_dir, proxied_db, redis.url, f"http://127.0.0.1:{s3.port}", bucket,
                      extra_env={"UNDERPAINT_QUEUE_POLL_SECONDS": "2", "UNDERPAINT_STORAGE_RETRY_SECONDS": "60",
                                 "UNDERPAINT_BATCH_WINDOW_MS": "100"})  # fmt: skip
    store = SqlTaskStore(f"{PG_BASE}/{db}")
    run = Faulty(cluster, store, redis, pg, s3, direct_s3)
    try:
        run.api.start()
        run.worker.start()
        deadline = time.monotonic() + 120
        while httpx.get(run.api.url + "/health/workers", timeout=10).json()["alive"] < 1:
            run.worker.check_alive()
            assert time.monotonic() < deadline, run.worker.log_tail()
            time.sleep(0.5)
        yield run
    finally:
        for p in (run.worker, run.api):
            p.stop()
        store.close()
        redis.kill()
        pg.close()
        s3.close()
        moto.stop()
        with psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def test_a_broker_restart_without_persistence_loses_no_task(faulty: Faulty) -> None:
    worker = faulty.worker.proc
    assert worker is not None
    worker.send_signal(signal.SIGSTOP)  # messages pile up in Redis, unconsumed
    try:
        faulty.submit(4, seed=10)
        faulty.redis.kill()  # ... and die with it
    finally:
        worker.send_signal(signal.SIGCONT)
    faulty.submit(2, seed=20)  # accepted while the broker is down: written to the store
    assert faulty.store.count_by_status()[TaskStatus.FAILED] == 0  # none failed by the outage
    time.sleep(3)
    faulty.redis.start()  # empty
    recovered = time.monotonic()
    faulty.wait_done()
    faulty.assert_api_recovers(recovered)
    assert "claimed from the store" in faulty.worker.log_path.read_text()


def test_postgres_down_for_10_s_mid_run(faulty: Faulty) -> None:
    faulty.submit(4, seed=30)
    deadline = time.monotonic() + 60
    while not faulty.processing():
        assert time.monotonic() < deadline, "no task started"
        time.sleep(0.05)
    faulty.pg.cut()
    body = img2img_body(seed=40)
    refused = faulty.api.post(body, idempotency_key="during-pg-outage")
    assert refused.status_code >= 500  # nothing written: the client retries
    time.sleep(OUTAGE_S)
    faulty.pg.restore()
    recovered = time.monotonic()
    retried = faulty.api.post(body, idempotency_key="during-pg-outage")
    deadline = recovered + RECOVERY_S
    while retried.status_code != 200 and time.monotonic() < deadline:  # the pool reconnects
        time.sleep(0.5)
        retried = faulty.api.post(body, idempotency_key="during-pg-outage")
    assert retried.status_code == 200, retried.text
    faulty.accepted.append(retried.json()["task_id"])
    faulty.wait_done()
    faulty.assert_api_recovers(recovered)


def test_s3_down_for_10_s_delays_uploads_and_fails_nothing(faulty: Faulty) -> None:
    faulty.s3.cut()
    cut_at = time.monotonic()
    faulty.submit(4, seed=50)
    health = httpx.get(faulty.api.url + "/health", timeout=10)
    assert health.status_code == 200  # degraded, not down: the node keeps accepting tasks
    assert health.json()["status"] == "degraded"
    assert health.json()["checks"]["storage"].startswith("unreachable")
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
    assert faulty.store.count_by_status()[TaskStatus.FAILED] == 0
    faulty.s3.restore()
    recovered = time.monotonic()
    faulty.wait_done()
    faulty.assert_api_recovers(recovered)
    assert "failed (S3 upload failed" in faulty.worker.log_path.read_text()  # its retries were logged
