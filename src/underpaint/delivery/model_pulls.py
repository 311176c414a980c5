"""``POST /v3/model/pull`` jobs, durable: rows of ``model_pulls`` that any API node reports and runs.

A pull is a row (``queued`` → ``downloading`` → ``succeeded`` | ``failed``), so every node on the database answers
``GET /v3/model/pull/{id}`` and a restart forgets nothing. Each node runs a ``ModelPulls`` runner thread: the node
that accepted a pull wakes its own at once, and every runner also polls, so a pull whose node went away is taken
by another. Taking a pull is a guarded UPDATE that gives the runner a lease, as a worker claims a task. While it
downloads (``model_download.pull``), a heartbeat writes the progress and renews the lease every
``progress_seconds`` (one UPDATE, however fast the bytes come), and the download stops at once if the row is no
longer its own. A pull left ``downloading`` by a process that died is taken again when its lease has run out and
resumes its partial file with an HTTP ``Range`` request; after ``max_attempts`` such takes it fails with the reason.
A runner that is stopped (the server shuts down) puts its pull back in the queue for the next one.

At most one pull per download URL is active: ``active_key`` (the partial file's name) is unique while the pull
runs and NULL once it ended, so two nodes never write one partial file. The same request again while it runs
answers the running pull; another request for the same source is refused (``PullInProgress``).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, Row, and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from underpaint.config import Settings
from underpaint.db.schema import model_pulls_table
from underpaint.delivery.model_download import check_wanted, parse_source, part_key, pull
from underpaint.delivery.ssrf import GuardedTransport

log = logging.getLogger(__name__)

QUEUED, DOWNLOADING, SUCCEEDED, FAILED = "queued", "downloading", "succeeded", "failed"
_p = model_pulls_table


class PullInProgress(Exception):
    """Another pull of the same source is running (``pull_id``); a request that differs from it waits for it."""

    def __init__(self, pull_id: str) -> None:
        super().__init__(f"pull {pull_id} of the same source is running; wait for it to end")
        self.pull_id = pull_id


class _Stop(Exception):
    """The download must stop: the runner is stopping, or the pull is no longer this runner's."""


@dataclass
class _Heartbeat:
    """What the download thread tells the heartbeat (bytes so far) and what the heartbeat tells it (lost)."""

    done: int = 0
    total: int | None = None
    lost: bool = False


def _status(row: Row[Any]) -> dict[str, object]:
    return {
        "pull_id": row.pull_id,
        "source": row.source,
        "status": row.status,
        "bytes_done": row.bytes_done,
        "bytes_total": row.bytes_total,
        "path": row.path,
        "kind": row.kind,
        "sha256": row.sha256,
        "reason": row.reason,
        "attempts": row.attempts,
    }


class ModelPulls:
    """The pull jobs of one database, and this process's runner of them (a part: ``start``/``stop``)."""

    def __init__(
        self,
        engine: Engine,
        models_dir: Path,
        client_factory: Callable[[], httpx.Client],
        *,
        lease_seconds: float = 30.0,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.models_dir = models_dir
        self.client_factory = client_factory
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.progress_seconds = min(1.0, lease_seconds / 3)
        self.poll_seconds = lease_seconds / 3
        self.clock = clock
        self.runner_id = f"{socket.gethostname()}:{uuid.uuid4().hex[:12]}"
        self._read = engine.execution_options(underpaint_tx="autocommit")
        self._write = engine.execution_options(underpaint_tx="immediate")
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_settings(cls, engine: Engine, settings: Settings) -> ModelPulls:
        """Pulls into ``models_dir`` through the SSRF guard (private hosts only when in ``model_pull_allow_hosts``)."""

        def client() -> httpx.Client:
            transport = GuardedTransport(settings.model_pull_allow_hosts)
            return httpx.Client(transport=transport, timeout=httpx.Timeout(30.0, read=120.0))

        return cls(engine, settings.models_dir, client, lease_seconds=settings.model_pull_lease_seconds)

    # --- the API's side ----------------------------------------------------------------------------------------

    def submit(self, source: str, kind: str | None, name: str | None, sha256: str | None) -> dict[str, object]:
        """Queue a pull (``PullError`` for a source, kind or sha256 that is not one) and wake this node's runner; the same
        request while it runs answers that pull, another request for its source raises ``PullInProgress``."""
        check_wanted(kind, sha256)
        key = part_key(parse_source(source).url)
        wanted = {"source": source, "want_kind": kind, "want_name": name, "want_sha256": sha256}
        for _ in range(3):  # the running pull may end between the refused insert and the read
            now = self.clock()
            row = {**wanted, "pull_id": uuid.uuid4().hex, "status": QUEUED, "active_key": key, "bytes_done": 0,
                   "attempts": 0, "created_at": now, "updated_at": now}  # fmt: skip
            try:
                with self._write.begin() as conn:
                    conn.execute(insert(_p).values(**row))
            except IntegrityError:
                with self._read.connect() as conn:
                    running = conn.execute(select(_p).where(_p.c.active_key == key)).first()
                if running is None:
                    continue
                if any(getattr(running, column) != value for column, value in wanted.items()):
                    raise PullInProgress(running.pull_id) from None
                return _status(running)
            self.start()
            self._wake.set()
            found = self.status(str(row["pull_id"]))
            assert found is not None
            return found
        raise PullInProgress("?")

    def status(self, pull_id: str) -> dict[str, object] | None:
        with self._read.connect() as conn:
            row = conn.execute(select(_p).where(_p.c.pull_id == pull_id)).first()
        return _status(row) if row is not None else None

    def purge(self, older_than: float) -> int:
        """Delete ended pulls that ended before ``older_than`` (the retention sweeper calls it)."""
        with self._write.begin() as conn:
            ended = and_(_p.c.status.in_((SUCCEEDED, FAILED)), _p.c.finished_at < older_than)
            return int(conn.execute(delete(_p).where(ended)).rowcount or 0)

    # --- the runner ----------------------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._loop, name="model-pulls", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the runner; a pull it was downloading goes back to the queue, its partial file kept."""
        self._stopping.set()
        self._wake.set()
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                busy = self.run_once()
            except Exception:  # a database outage: try again at the next poll
                log.exception("model pulls: the runner failed; retrying in %.0f s", self.poll_seconds)
                busy = False
            if not busy:
                self._wake.wait(self.poll_seconds)
                self._wake.clear()

    def run_once(self) -> bool:
        """Take the oldest pull that is queued or whose runner's lease ran out, and run it to its end; False when
        there was none."""
        row = self._take()
        if row is None:
            return False
        if row.status == FAILED:
            return True  # given up on (too many interrupted attempts): nothing to run
        self._run(row)
        return True

    def _take(self) -> Row[Any] | None:
        now = self.clock()
        abandoned = and_(_p.c.status == DOWNLOADING, _p.c.lease_expires_at < now)
        with self._write.begin() as conn:
            row = conn.execute(
                select(_p).where(or_(_p.c.status == QUEUED, abandoned)).order_by(_p.c.created_at).limit(1)
            ).first()
            if row is None:
                return None
            guard = and_(_p.c.pull_id == row.pull_id, _p.c.attempts == row.attempts, _p.c.status == row.status)
            if row.status == DOWNLOADING and row.attempts >= self.max_attempts:
                reason = (
                    f"the download was interrupted {row.attempts} times (the process running it stopped each time); "
                    "its partial file is kept: pull the same source again to resume it"
                )
                conn.execute(update(_p).where(guard).values(**self._ended(FAILED, now), reason=reason))
                log.warning("model pull %s failed: %s", row.pull_id, reason)
                return conn.execute(select(_p).where(_p.c.pull_id == row.pull_id)).first()
            if row.status == DOWNLOADING:
                log.info("model pull %s: its runner %s stopped; resuming it", row.pull_id, row.runner)
            taken = conn.execute(
                update(_p)
                .where(guard)
                .values(
                    status=DOWNLOADING,
                    runner=self.runner_id,
                    lease_expires_at=now + self.lease_seconds,
                    attempts=row.attempts + 1,
                    updated_at=now,
                )
            )
            if taken.rowcount != 1:
                return None
            return conn.execute(select(_p).where(_p.c.pull_id == row.pull_id)).first()

    def _ended(self, status: str, now: float) -> dict[str, object]:
        return {"status": status, "active_key": None, "lease_expires_at": None, "finished_at": now, "updated_at": now}

    def _mine(self, pull_id: str) -> Any:
        return and_(_p.c.pull_id == pull_id, _p.c.runner == self.runner_id, _p.c.status == DOWNLOADING)

    def _run(self, row: Row[Any]) -> None:
        beat = _Heartbeat()
        done = threading.Event()
        heart = threading.Thread(target=self._beat, args=(row.pull_id, beat, done), name="model-pull-beat", daemon=True)
        heart.start()

        def progress(received: int, total: int | None) -> None:
            beat.done, beat.total = received, total
            if beat.lost or self._stopping.is_set():
                raise _Stop

        try:
            with self.client_factory() as client:
                result = pull(
                    row.source, self.models_dir, kind=row.want_kind, name=row.want_name, sha256=row.want_sha256,
                    client=client, on_progress=progress,
                )  # fmt: skip
        except _Stop:
            done.set()
            heart.join()
            if not beat.lost:
                self._requeue(row.pull_id)
            return
        except Exception as exc:
            done.set()
            heart.join()
            self._finish(row.pull_id, FAILED, reason=str(exc) or type(exc).__name__, bytes_done=beat.done)
            return
        done.set()
        heart.join()
        log.info("model pull %s: %s (%d bytes, resumed at %d)", row.pull_id, result.path, result.size,
                 result.resumed_from)  # fmt: skip
        self._finish(
            row.pull_id, SUCCEEDED, path=str(result.path), kind=result.kind, sha256=result.sha256,
            bytes_done=result.size, bytes_total=result.size,
        )  # fmt: skip

    def _beat(self, pull_id: str, beat: _Heartbeat, done: threading.Event) -> None:
        """Write the progress and renew the lease every ``progress_seconds`` until ``done``."""
        while not done.wait(self.progress_seconds):
            now = self.clock()
            try:
                with self._write.begin() as conn:
                    renewed = conn.execute(
                        update(_p)
                        .where(self._mine(pull_id))
                        .values(
                            bytes_done=beat.done,
                            bytes_total=beat.total,
                            updated_at=now,
                            lease_expires_at=now + self.lease_seconds,
                        )
                    )
            except Exception:  # the lease outlives a short database outage; a long one loses it
                log.warning("model pull %s: could not write its progress", pull_id, exc_info=True)
                continue
            if renewed.rowcount != 1:
                log.warning("model pull %s is no longer this runner's; stopping its download", pull_id)
                beat.lost = True
                return

    def _requeue(self, pull_id: str) -> None:
        now = self.clock()
        with self._write.begin() as conn:
            conn.execute(
                update(_p)
                .where(self._mine(pull_id))
                .values(status=QUEUED, runner=None, lease_expires_at=None, attempts=_p.c.attempts - 1, updated_at=now)
            )
        log.info("model pull %s: back in the queue (this runner stops)", pull_id)

    def _finish(self, pull_id: str, status: str, **values: object) -> None:
        now = self.clock()
        with self._write.begin() as conn:
            conn.execute(update(_p).where(self._mine(pull_id)).values(**self._ended(status, now), **values))
        if status == FAILED:
            log.warning("model pull %s failed: %s", pull_id, values.get("reason"))


__all__ = ["DOWNLOADING", "FAILED", "QUEUED", "SUCCEEDED", "ModelPulls", "PullInProgress"]
