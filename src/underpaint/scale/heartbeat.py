"""Worker liveness: each worker process keeps one row in the shared database up to date.

API nodes read the rows (``/health/workers``, ``underpaint_workers_alive``) without talking to the broker. A
row whose ``last_seen`` is older than ``stale_after`` belongs to a worker that stopped or died; a worker that
stops cleanly deletes its row. The table is part of the one schema (``db.migrations``): every engine given here
belongs to a database that whoever opened it (the task store) has migrated.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, insert, select, update

from underpaint.db.schema import heartbeats_table
from underpaint.services import WorkerState

log = logging.getLogger("underpaint.scale")

_h = heartbeats_table


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    hostname: str
    pid: int
    queues: tuple[str, ...]
    concurrency: int
    busy: int
    tasks_done: int
    model_loads: int
    started_at: float
    last_seen: float

    def alive(self, now: float, stale_after: float) -> bool:
        return now - self.last_seen <= stale_after


def list_workers(engine: Engine) -> list[WorkerInfo]:
    with engine.execution_options(underpaint_tx="autocommit").connect() as conn:
        rows = conn.execute(select(_h).order_by(_h.c.worker_id)).all()
    return [
        WorkerInfo(**{**r._mapping, "queues": tuple(q for q in r._mapping["queues"].split(",") if q)}) for r in rows
    ]


def default_interval(lease_seconds: float) -> float:
    return max(1.0, min(10.0, lease_seconds / 3))


def worker_stale_after(lease_seconds: float) -> float:
    return 3 * default_interval(lease_seconds)


def worker_states(engine: Engine, lease_seconds: float, clock: Callable[[], float] = time.time) -> list[WorkerState]:
    """The heartbeat rows as ``GET /v3/async/queue`` shows workers."""
    now = clock()
    stale = worker_stale_after(lease_seconds)
    return [
        WorkerState(
            worker_id=w.worker_id,
            kind="celery",
            alive=w.alive(now, stale),
            concurrency=w.concurrency,
            queues=w.queues,
            busy=w.busy,
            last_seen_seconds_ago=round(max(0.0, now - w.last_seen), 1),
        )
        for w in list_workers(engine)
    ]


class Heartbeat:
    """Writes this worker's row every ``interval`` seconds from a daemon thread; ``stats()`` fills the counters."""

    def __init__(
        self,
        engine: Engine,
        queues: tuple[str, ...],
        concurrency: int,
        stats: Callable[[], dict[str, int]],
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        self.queues = queues
        self.concurrency = concurrency
        self.stats = stats
        self.interval = interval
        self.clock = clock
        self.started_at = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._write = engine.execution_options(underpaint_tx="immediate")

    def beat(self) -> None:
        values: dict[str, Any] = {"last_seen": self.clock(), **self.stats()}
        with self._write.begin() as conn:
            if conn.execute(update(_h).where(_h.c.worker_id == self.worker_id).values(**values)).rowcount == 1:
                return
            conn.execute(
                insert(_h).values(
                    worker_id=self.worker_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    queues=",".join(self.queues),
                    concurrency=self.concurrency,
                    started_at=self.started_at,
                    **values,
                )
            )

    def start(self) -> None:
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="underpaint-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + 5)
        try:
            with self._write.begin() as conn:
                conn.execute(delete(_h).where(_h.c.worker_id == self.worker_id))
        except Exception:
            log.exception("could not remove the heartbeat row of %s", self.worker_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:
                log.exception("heartbeat of %s failed; retrying", self.worker_id)
