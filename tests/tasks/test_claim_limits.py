"""``claim_batch`` never hands out more than ``limit`` tasks, on SQLite and PostgreSQL, under concurrent claimers.

PostgreSQL may plan ``UPDATE ... WHERE task_id IN (SELECT ... LIMIT n FOR UPDATE SKIP LOCKED)`` as a nested loop
that re-runs the LIMIT subquery for every outer row: with other workers locking rows in between, each re-run skips
different rows and the union overshoots (batches of 9 to 14 with ``max_batch = 4`` were seen in a cluster).
"""

from __future__ import annotations

import threading
from collections import Counter

from tests.support.clock import Clock
from tests.support.requests import img2img, new_task

from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskStatus


def _add(store: SqlTaskStore, n: int) -> None:
    request = img2img()  # every task the same: one batch key
    for _ in range(n):
        store.create(new_task(request=request, lane="sd15"))


def test_claim_batch_never_exceeds_its_limit_with_concurrent_claimers(db_url: str) -> None:
    clock = Clock()
    store = SqlTaskStore(db_url, lease_seconds=60, clock=clock)
    try:
        _add(store, 240)
        lead = store.claim(None, "w-lead")
        assert lead is not None
        assert lead.batch_key is not None
        key = lead.batch_key
        limit = 3
        sizes: list[int] = []
        claimed: Counter[str] = Counter()
        lock = threading.Lock()
        start = threading.Barrier(6)

        def claimer(n: int) -> None:
            start.wait()
            while True:
                got = store.claim_batch(key, f"w{n}", limit, ("sd15",))
                with lock:
                    sizes.append(len(got))
                    claimed.update(t.task_id for t in got)
                if not got:
                    return

        threads = [threading.Thread(target=claimer, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert max(sizes) <= limit, f"a claim_batch returned {max(sizes)} tasks with limit {limit}"
        assert sum(claimed.values()) == 239
        assert max(claimed.values()) == 1
        counts = store.count_by_status()
        assert counts[TaskStatus.QUEUED] == 0
        assert counts[TaskStatus.PROCESSING] == 240
    finally:
        store.close()
