"""Broker and database faults in scale-out mode, with real processes (``tests/support/fault_cluster.py``): an API
node and a Celery worker on PostgreSQL, Redis and S3, where the test owns each fault: a Redis server of its own
killed and restarted empty (no persistence), and a TCP proxy in front of PostgreSQL that it cuts.

After each fault: every accepted task SUCCEED, each with exactly its images in the bucket (no orphan, no
duplicate), and the API answering normally again within 30 s of recovery. The storage faults are in
``test_faults_storage.py``, the RabbitMQ restart in ``test_faults_rabbitmq.py`` (one cluster per file, so xdist
runs them side by side). The claim_batch overshoot that the same cluster showed is caught by
tests/tasks/test_claim_limits.py.
"""

from __future__ import annotations

import time

import pytest
from tests.support.cluster import img2img_body
from tests.support.fault_cluster import LEASE_S, RECOVERY_S, Faulty, broker_restart_loses_no_task

pytestmark = [pytest.mark.services, pytest.mark.slow]


def test_a_redis_restart_without_persistence_loses_no_task(faulty: Faulty) -> None:
    broker_restart_loses_no_task(faulty)


def test_postgres_down_longer_than_the_completion_retry_mid_run(faulty: Faulty) -> None:
    faulty.submit(3, seed=30)
    faulty.wait_for("a task starting", faulty.processing)
    faulty.pg.cut()
    body = img2img_body(seed=40)
    refused = faulty.api.post(body, idempotency_key="during-pg-outage")
    assert refused.status_code >= 500  # nothing written: the client retries
    time.sleep(0.6 * LEASE_S + 1)  # past the completion's retry budget: that attempt gives its images up
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
