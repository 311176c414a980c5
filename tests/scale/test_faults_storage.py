"""Storage faults in scale-out mode, with real processes (``tests/support/fault_cluster.py``): S3 cut behind a TCP
proxy while tasks run, and a worker SIGKILLed while its uploads wait out such a cut.

During the cut the worker keeps the tasks' encoded images on local disk (its upload spool), not in memory, and
retries their uploads; once S3 answers, every accepted task SUCCEED with exactly its images in the bucket and the
spool is empty. A worker killed meanwhile leaves spool files behind: the restarted worker deletes them (and any
object they may have reached), and the tasks run again after their lease, so no task is lost and nothing is
orphaned on disk or in the bucket."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from tests.support.fault_cluster import Faulty

from underpaint.tasks.types import TaskStatus

pytestmark = [pytest.mark.services, pytest.mark.slow]

OUTAGE_S = 4.0  # several upload retries (0.5 s doubling), far inside storage_retry_seconds (60 s)
RETRIED = "failed (S3 upload failed"  # the WARNING logged for each retry, naming the task


def test_s3_down_keeps_the_images_on_disk_and_fails_nothing(faulty: Faulty) -> None:
    faulty.s3.cut()
    cut_at = time.monotonic()
    faulty.submit(3, seed=50)
    health = httpx.get(faulty.api.url + "/health", timeout=10)
    assert health.status_code == 200  # degraded, not down: the node keeps accepting tasks
    assert health.json()["status"] == "degraded"
    assert health.json()["checks"]["storage"].startswith("unreachable")
    faulty.wait_for("an upload retried", lambda: RETRIED in faulty.log())
    waiting = faulty.spool_files()  # ... while its images wait on disk
    assert waiting
    assert all(p.stat().st_size > 100 for p in waiting)  # the encoded images themselves
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - cut_at)))
    assert faulty.store.count_by_status()[TaskStatus.FAILED] == 0
    faulty.s3.restore()
    recovered = time.monotonic()
    faulty.wait_done()  # ... and the spool is empty
    assert not any(p.exists() for p in waiting)
    faulty.assert_api_recovers(recovered)


def test_a_worker_killed_while_its_uploads_wait_loses_no_task_and_leaves_no_spool_file(faulty: Faulty) -> None:
    faulty.s3.cut()
    retried = faulty.log().count(RETRIED)
    faulty.submit(2, seed=70)
    faulty.wait_for("an upload retried", lambda: faulty.log().count(RETRIED) > retried)
    leftovers = faulty.spool_files()
    assert leftovers
    spooled = {json.loads(p.read_bytes().split(b"\n", 1)[0])["task_id"] for p in leftovers}
    faulty.worker.kill()
    faulty.s3.restore()
    faulty.start_worker()  # its runner clears what the killed one left
    faulty.wait_for("the killed worker's spool cleared", lambda: not leftovers[0].parent.exists())
    faulty.wait_done()  # the tasks ran again after their lease: SUCCEED, no orphan object, spool empty
    folders = list(faulty.spool_root.iterdir())
    assert len(folders) == 1  # the live worker's own
    assert folders[0].name.startswith("w-")
    for task_id in spooled:  # the killed attempt's task ran again
        rec = faulty.store.get(task_id)
        assert rec is not None
        assert rec.attempts >= 2
    assert "not uploaded; removed" in faulty.log()
