"""One API node and one Celery worker as real processes on PostgreSQL, a broker and S3 (moto), where the test owns
each fault (``tests/support/faults.py``): a broker of its own that it kills and restarts empty, and TCP proxies in
front of PostgreSQL and S3 that it cuts. Used by ``tests/scale/test_faults*.py``, one cluster per file.

After each fault the tests check the same things: every accepted task SUCCEED, each with exactly its images in the
bucket (no orphan, no duplicate), nothing left in the worker's upload spool, and the API answering normally again
within ``RECOVERY_S`` of recovery."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import boto3
import httpx
import psycopg
from tests.support.cluster import ApiNode, Cluster, WorkerNode, wait_all
from tests.support.faults import TcpProxy

from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskStatus

RECOVERY_S = 30.0
# Short enough for a quick suite, long enough for the mechanisms under test: a lost message is claimed from the
# store after QUEUE_POLL_S; a completion is retried for 0.6 x LEASE_S; uploads are retried for 60 s.
QUEUE_POLL_S = 1.0
LEASE_S = 4
CONNECTED = '"Connected to '  # Celery's consumer, on each (re)connection to the broker


class Broker(Protocol):
    @property
    def url(self) -> str: ...

    def start(self) -> None: ...

    def kill(self) -> None: ...


class Faulty:
    def __init__(
        self, cluster: Cluster, store: SqlTaskStore, broker: Broker, pg: TcpProxy, s3: TcpProxy, s3_direct: str
    ) -> None:
        self.cluster, self.store, self.broker, self.pg, self.s3 = cluster, store, broker, pg, s3
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
        assert self.spool_files() == []  # every image went up, and its file with it

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

    def assert_api_recovers(self, since: float) -> str:
        """Within ``RECOVERY_S`` of ``since`` the API is healthy and accepts and answers requests; the probe task's
        id (it is accepted: ``wait_done`` waits for it too)."""
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
                    return probe
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise AssertionError(f"the API did not recover within {RECOVERY_S} s: {last}")

    def processing(self) -> bool:
        return self.store.count_by_status()[TaskStatus.PROCESSING] > 0

    @property
    def spool_root(self) -> Path:
        return self.worker.data_dir / "spool"

    def spool_files(self) -> list[Path]:
        """Images waiting in the worker's upload spool (every worker process's folder)."""
        return sorted(self.spool_root.glob("w-*/*.img"))

    def wait_for(self, what: str, ready: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            self.worker.check_alive()
            assert time.monotonic() < deadline, f"{what} did not happen in {timeout} s:\n{self.worker.log_tail()}"
            time.sleep(0.05)

    def start_worker(self) -> None:
        """Start (or restart) the worker and wait until it heartbeats and its consumer is connected."""
        connected = self.log().count(CONNECTED) if self.worker.log_path.exists() else 0
        self.worker.start()
        self.wait_worker(connected)

    def wait_worker(self, connected: int = 0) -> None:
        self.wait_for(
            "the worker's first heartbeat",
            lambda: httpx.get(self.api.url + "/health/workers", timeout=10).json()["alive"] >= 1,
            timeout=120,
        )
        self.wait_for("the worker's consumer connecting", lambda: self.log().count(CONNECTED) > connected)

    def log(self) -> str:
        return self.worker.log_path.read_text(errors="replace")


@contextlib.contextmanager
def faulty_cluster(root: Path, models_dir: Path, broker: Broker, pg_admin: str, pg_base: str) -> Iterator[Faulty]:
    """Moto, a fresh PostgreSQL database, proxies in front of both, an API node and a worker on ``broker``."""
    from moto.server import ThreadedMotoServer
    from tests.support.ports import free_port

    db = f"underpaint_faults_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as admin:
        admin.execute(f'CREATE DATABASE "{db}"')
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    moto.start()
    moto_host, moto_port = moto.get_host_and_port()
    pg = TcpProxy("127.0.0.1", 5432)
    s3 = TcpProxy(moto_host, moto_port)
    direct_s3 = f"http://{moto_host}:{moto_port}"
    bucket = f"underpaint-{uuid.uuid4().hex[:12]}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    boto3.client("s3", endpoint_url=direct_s3, region_name="us-east-1").create_bucket(Bucket=bucket)
    proxied_db = f"{pg_base.rsplit(':', 1)[0]}:{pg.port}/{db}"
    env = {"UNDERPAINT_QUEUE_POLL_SECONDS": str(QUEUE_POLL_S), "UNDERPAINT_STORAGE_RETRY_SECONDS": "60",
           "UNDERPAINT_BATCH_WINDOW_MS": "100"}  # fmt: skip
    cluster = Cluster(root, models_dir, proxied_db, broker.url, f"http://127.0.0.1:{s3.port}", bucket,
                      lease_seconds=LEASE_S, extra_env=env)  # fmt: skip
    store = SqlTaskStore(f"{pg_base}/{db}")
    run = Faulty(cluster, store, broker, pg, s3, direct_s3)
    try:
        run.api.spawn()  # both start at once: the worker's imports are most of the wait
        run.worker.start()
        run.api.start_wait()
        run.wait_worker()
        yield run
    finally:
        for p in (run.worker, run.api):  # SIGTERM to both first: they shut down side by side
            if p.proc is not None and p.proc.poll() is None:
                p.proc.terminate()
        for p in (run.worker, run.api):
            p.stop()
        store.close()
        pg.close()
        s3.close()
        moto.stop()
        with psycopg.connect(pg_admin, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def broker_restart_loses_no_task(faulty: Faulty, wipe: Any = None) -> None:
    """The broker killed with messages in it, down while tasks are submitted, restarted empty (``wipe`` is called
    between, for a broker that keeps data on disk): every task SUCCEED, the lost ones claimed from the store; the
    worker reconnects and consumes messages again (a task submitted then is run from its message)."""
    worker = faulty.worker.proc
    assert worker is not None
    connected = faulty.log().count(CONNECTED)
    worker.send_signal(signal.SIGSTOP)  # messages pile up in the broker, unconsumed
    try:
        faulty.submit(3, seed=10)
        faulty.broker.kill()  # ... and die with it
    finally:
        worker.send_signal(signal.SIGCONT)
    if wipe is not None:
        wipe()
    faulty.submit(2, seed=20)  # accepted while the broker is down: written to the store
    assert faulty.store.count_by_status()[TaskStatus.FAILED] == 0  # none failed by the outage
    faulty.broker.start()  # empty
    recovered = time.monotonic()
    faulty.wait_for("the worker reconnecting", lambda: faulty.log().count(CONNECTED) > connected, RECOVERY_S)
    probe = faulty.assert_api_recovers(recovered)
    # Its message reaches the worker (whether the consumer or, first, the store poller then runs it).
    faulty.wait_for("the probe's message delivered", lambda: f"process_task[{probe}] received" in faulty.log())
    faulty.wait_done()
    assert "claimed from the store" in faulty.log()
