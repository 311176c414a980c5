"""The durable task store: one SQLAlchemy Core implementation for SQLite (embedded) and PostgreSQL (scale-out).

Every state change is a single guarded UPDATE, so concurrent API processes, workers and sweepers never need
to coordinate beyond the database: claiming picks a QUEUED row atomically (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, a write-locked ``UPDATE ... WHERE task_id = (SELECT ...)`` on SQLite) and only the lease holder
can finish a task. Input payloads live in their own table so that polling never reads input images. The tables
are defined in ``db.schema``; opening a store brings the database's schema up to date (``db.migrations``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    Connection,
    Row,
    bindparam,
    case,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.sql.elements import ColumnElement

from underpaint.config import Settings
from underpaint.db.engine import open_engine, sqlite_reader
from underpaint.db.migrations import MIGRATIONS, Migration, migrate
from underpaint.db.schema import idempotency_table, payloads_table, tasks_table
from underpaint.tasks.batching import batch_key, model_key
from underpaint.tasks.contract import TaskRequest, TaskType, dump_extra, dump_request, load_extra, load_request
from underpaint.tasks.types import (
    CANCELLED_REASON,
    IDEMPOTENCY_TTL_SECONDS,
    CancelOutcome,
    IdempotencyKey,
    IdempotencyKeyTaken,
    ImageRecord,
    NewTask,
    NsfwResult,
    QueueCounts,
    TaskRecord,
    TaskStatus,
)

_QUEUED = TaskStatus.QUEUED.value
_PROCESSING = TaskStatus.PROCESSING.value
_SUCCEED = TaskStatus.SUCCEED.value
_FAILED = TaskStatus.FAILED.value
_ENDED = (_SUCCEED, _FAILED)

_t = tasks_table
# Built once: constructing a select per call costs more than running it.
_GET_BY_ID = select(_t).where(_t.c.task_id == bindparam("task_id"))
_GET_BY_OWNER = _GET_BY_ID.where(_t.c.owner == bindparam("owner"))


# --- conversions ----------------------------------------------------------------------------------------------


def _image_to_json(image: ImageRecord) -> dict[str, Any]:
    nsfw = None if image.nsfw is None else {"valid": image.nsfw.valid, "confidence": image.nsfw.confidence}
    return {
        "key": image.key,
        "image_type": image.image_type,
        "nsfw": nsfw,
        "backend": image.backend,
        "location": dict(image.location),
    }


def _image_from_json(data: dict[str, Any]) -> ImageRecord:
    nsfw = data.get("nsfw")
    return ImageRecord(
        key=data["key"],
        image_type=data["image_type"],
        nsfw=None if nsfw is None else NsfwResult(valid=bool(nsfw["valid"]), confidence=float(nsfw["confidence"])),
        backend=data.get("backend", "local"),
        location=dict(data.get("location") or {}),
    )


def _record(row: Row[Any]) -> TaskRecord:
    return _record_from(row._mapping, decode=lambda v: v)  # SQLAlchemy's JSON type has decoded the JSON columns


def _record_from(m: Mapping[Any, Any], decode: Callable[[Any], Any]) -> TaskRecord:
    """A task row as a ``TaskRecord``; ``decode`` turns a JSON column's stored value into Python data."""
    return TaskRecord(
        task_id=m["task_id"],
        owner=m["owner"],
        status=TaskStatus(m["status"]),
        reason=m["reason"],
        progress_percent=m["progress_percent"],
        eta=m["eta"],
        seed=m["seed"],
        enable_nsfw_detection=bool(m["enable_nsfw_detection"]),
        response_image_type=m["response_image_type"],
        lane=m["lane"],
        priority=m["priority"],
        attempts=m["attempts"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        images=[_image_from_json(i) for i in decode(m["images"])],
        extra=load_extra(decode(m["extra"])),
        task_type=TaskType(m["task_type"]),
        image_num=m["image_num"],
        worker_id=m["worker_id"],
        lease_expires_at=m["lease_expires_at"],
        cancel_requested_at=m["cancel_requested_at"],
        batch_key=m["batch_key"],
        model_key=m["model_key"],
    )


_COLUMNS = tuple(c.name for c in tasks_table.columns)
_BY_ID_SQL = f"SELECT {', '.join(_COLUMNS)} FROM tasks WHERE task_id = ?"
_BY_OWNER_SQL = _BY_ID_SQL + " AND owner = ?"
_CANCEL_SQL = "SELECT cancel_requested_at FROM tasks WHERE task_id = ?"
# Tasks claimed before a QUEUED one: the claim order is priority (high first), then age, then task id.
_AHEAD_SQL = (
    "SELECT COUNT(*) FROM tasks WHERE status = ? AND (priority > ? OR (priority = ? AND "
    "(created_at < ? OR (created_at = ? AND task_id < ?))))"
)


class _SqliteReader:
    """Point reads of one task on SQLite straight through ``sqlite3``, one read-only connection per thread
    (``db.engine.sqlite_reader``: the same busy timeout as the store's engine).

    ``GET /v3/async/task-result`` is the hottest path of a polling API. Through SQLAlchemy Core a primary-key read
    costs ~230 µs of Python (statement building, cache key, pool checkout, events); this costs ~20 µs, cheaper
    than handing the read to a thread, so the API can run it on its event loop. The connection is read-only and
    the database is in WAL mode, so a read never waits for the worker's writes.
    """

    def __init__(self, database: str) -> None:
        self._database = database
        self._local = threading.local()
        self._all: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self._closed = False

    def _conn(self) -> sqlite3.Connection:
        holder: _Conn | None = getattr(self._local, "conn", None)
        if holder is None:
            if self._closed:
                raise RuntimeError("the task store is closed")
            # Used only by this thread; check_same_thread=False only lets ``close`` (another thread) close it.
            holder = _Conn(sqlite_reader(self._database))
            self._local.conn = holder
            self._all.add(holder)
        return holder.conn

    def get(self, task_id: str, owner: str | None) -> TaskRecord | None:
        if owner is None:
            row = self._conn().execute(_BY_ID_SQL, (task_id,)).fetchone()
        else:
            row = self._conn().execute(_BY_OWNER_SQL, (task_id, owner)).fetchone()
        return None if row is None else _record_from_sqlite(row)

    def cancel_requested(self, task_id: str) -> bool:
        row = self._conn().execute(_CANCEL_SQL, (task_id,)).fetchone()
        return row is not None and row[0] is not None

    def ahead_of(self, task: TaskRecord, lanes: tuple[str, ...] | None) -> int:
        sql, params = _AHEAD_SQL, [_QUEUED, task.priority, task.priority, task.created_at, task.created_at]
        params.append(task.task_id)
        if lanes is not None:
            sql += f" AND lane IN ({', '.join('?' * len(lanes))})"
            params.extend(lanes)
        return int(self._conn().execute(sql, params).fetchone()[0])

    def close(self) -> None:
        self._closed = True
        for holder in list(self._all):
            holder.conn.close()


class _Conn:
    """A weak-referenceable holder (``sqlite3.Connection`` is not) so closed threads' connections drop out."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn


def _record_from_sqlite(row: tuple[Any, ...]) -> TaskRecord:
    return _record_from(dict(zip(_COLUMNS, row, strict=True)), decode=json.loads)


def _crash_reason(attempts: int) -> str:
    return (
        f"worker crashed repeatedly ({attempts} attempts): the task stopped its worker each time "
        "(out of memory? an input that breaks the model?); try smaller width/height/image_num or other inputs"
    )


class SqlTaskStore:
    """``TaskStore`` on SQLite (``sqlite:///path``) or PostgreSQL (``postgresql+psycopg://...``).

    ``lease_seconds``: how long a claim stays valid without a heartbeat. ``max_attempts``: claims a task may
    use before a crashed attempt ends it FAILED. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = 120.0,
        max_attempts: int = 3,
        clock: Callable[[], float] = time.time,
        migrations: Sequence[Migration] = MIGRATIONS,
    ) -> None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.url = url
        self.lease_seconds = float(lease_seconds)
        self.max_attempts = max_attempts
        self.clock = clock
        self.engine = open_engine(url)
        self._dialect = self.engine.dialect.name
        # Reads are single statements: on SQLite they run without BEGIN (each is its own snapshot).
        self._read = self.engine.execution_options(underpaint_tx="autocommit")
        self._write = self.engine.execution_options(underpaint_tx="immediate")
        self.schema_version = migrate(self.engine, migrations)
        database = make_url(url).database
        self._fast = _SqliteReader(database) if self._dialect == "sqlite" and database else None
        # True when ``get`` is a local point read cheaper than a thread hop: the API may call it on its event loop.
        self.inline_reads = self._fast is not None

    @classmethod
    def from_settings(cls, settings: Settings) -> SqlTaskStore:
        return cls(
            settings.resolved_database_url,
            lease_seconds=settings.lease_seconds,
            max_attempts=settings.max_attempts,
        )

    def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
        self.engine.dispose()

    # --- API side ---

    def create(self, task: NewTask, idempotency: IdempotencyKey | None = None) -> TaskRecord:
        now = self.clock()
        payload = dump_request(task.request)
        values: dict[str, Any] = {
            "task_id": task.task_id,
            "owner": task.owner,
            "status": _QUEUED,
            "reason": "",
            "progress_percent": 0,
            "eta": 0,
            "seed": task.seed,
            "enable_nsfw_detection": task.extra.enable_nsfw_detection,
            "response_image_type": task.extra.response_image_type,
            "lane": task.lane,
            "priority": task.priority,
            "attempts": 0,
            "image_num": task.image_num,
            "worker_id": None,
            "lease_expires_at": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            "images": [],
            "extra": dump_extra(task.extra),
            "batch_key": batch_key(task.request),
            "model_key": model_key(task.request),
            "task_type": TaskType(task.request.task_type).value,
        }
        if idempotency is None:
            with self._write.begin() as conn:
                self._insert(conn, values, payload)
            return _record_from_values(values)
        key = {"owner": task.owner, "idempotency_key": idempotency.key}
        for _ in range(3):
            try:
                # The key row first: a concurrent submit with the same key fails on the primary key (PostgreSQL
                # makes it wait for this transaction) and the transaction that lost creates no task.
                with self._write.begin() as conn:
                    conn.execute(
                        insert(idempotency_table).values(
                            **key, request_hash=idempotency.request_hash, task_id=task.task_id, created_at=now
                        )
                    )
                    self._insert(conn, values, payload)
                return _record_from_values(values)
            except IntegrityError:
                taken = self._idempotency_row(task.owner, idempotency.key)
                if taken is not None and taken[2] >= now - IDEMPOTENCY_TTL_SECONDS:
                    raise IdempotencyKeyTaken(taken[0], taken[1]) from None
                # Expired but not purged yet (or purged meanwhile): forget it and try again.
                with self._write.begin() as conn:
                    conn.execute(
                        delete(idempotency_table).where(
                            idempotency_table.c.owner == task.owner,
                            idempotency_table.c.idempotency_key == idempotency.key,
                            idempotency_table.c.created_at < now - IDEMPOTENCY_TTL_SECONDS,
                        )
                    )
        raise RuntimeError(f"could not record idempotency key {idempotency.key!r}")

    @staticmethod
    def _insert(conn: Connection, values: dict[str, Any], payload: dict[str, Any]) -> None:
        conn.execute(insert(_t).values(**values))
        conn.execute(insert(payloads_table).values(task_id=values["task_id"], payload=payload))

    def _idempotency_row(self, owner: str, key: str) -> tuple[str, str, float] | None:
        c = idempotency_table.c
        stmt = select(c.task_id, c.request_hash, c.created_at).where(c.owner == owner, c.idempotency_key == key)
        with self._read.connect() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else (str(row[0]), str(row[1]), float(row[2]))

    def find_idempotent(self, owner: str, key: str) -> IdempotencyKeyTaken | None:
        row = self._idempotency_row(owner, key)
        if row is None or row[2] < self.clock() - IDEMPOTENCY_TTL_SECONDS:
            return None
        return IdempotencyKeyTaken(row[0], row[1])

    def purge_idempotency_keys(self, older_than: float) -> int:
        with self._write.begin() as conn:
            return int(
                conn.execute(delete(idempotency_table).where(idempotency_table.c.created_at < older_than)).rowcount
            )

    def request_cancel(self, task_id: str, owner: str) -> CancelOutcome:
        now = self.clock()
        pick = select(_t.c.status).where(_t.c.task_id == task_id, _t.c.owner == owner)
        if self._dialect == "postgresql":
            pick = pick.with_for_update()  # the status cannot change under us (a claim, a completion)
        with self._write.begin() as conn:
            status = conn.execute(pick).scalar()
            if status is None:
                return CancelOutcome.NOT_FOUND
            if status == _QUEUED:
                conn.execute(
                    update(_t)
                    .where(_t.c.task_id == task_id)
                    .values(
                        status=_FAILED,
                        reason=CANCELLED_REASON,
                        cancel_requested_at=now,
                        finished_at=now,
                        eta=0,
                        lease_expires_at=None,
                    )
                )
                conn.execute(delete(payloads_table).where(payloads_table.c.task_id == task_id))
                return CancelOutcome.CANCELLED
            if status == _PROCESSING:
                conn.execute(
                    update(_t)
                    .where(_t.c.task_id == task_id)
                    .values(cancel_requested_at=func.coalesce(_t.c.cancel_requested_at, now))
                )
                return CancelOutcome.REQUESTED
            return CancelOutcome.FINISHED

    def cancel_requested(self, task_id: str) -> bool:
        if self._fast is not None:
            return self._fast.cancel_requested(task_id)
        with self._read.connect() as conn:
            value = conn.execute(select(_t.c.cancel_requested_at).where(_t.c.task_id == task_id)).scalar()
        return value is not None

    def queue_position(self, task: TaskRecord, lanes: tuple[str, ...] | None = None) -> int:
        if task.status is not TaskStatus.QUEUED:
            return 0
        if self._fast is not None:
            return 1 + self._fast.ahead_of(task, lanes)
        p, c = task.priority, task.created_at
        ahead = (_t.c.priority > p) | (
            (_t.c.priority == p) & ((_t.c.created_at < c) | ((_t.c.created_at == c) & (_t.c.task_id < task.task_id)))
        )
        stmt = select(func.count()).where(*self._queued_filter(lanes), ahead)
        with self._read.connect() as conn:
            return 1 + int(conn.execute(stmt).scalar_one())

    def recent_run_seconds(self, limit: int = 50) -> float | None:
        recent = (
            select((_t.c.finished_at - _t.c.started_at).label("run"))
            .where(_t.c.status == _SUCCEED, _t.c.started_at.is_not(None))
            .order_by(_t.c.finished_at.desc())
            .limit(limit)
            .subquery()
        )
        with self._read.connect() as conn:
            value = conn.execute(select(func.avg(recent.c.run))).scalar()
        return None if value is None else max(0.0, float(value))

    def get(self, task_id: str, owner: str | None = None) -> TaskRecord | None:
        if self._fast is not None:
            return self._fast.get(task_id, owner)
        params: dict[str, Any] = {"task_id": task_id}
        if owner is not None:
            params["owner"] = owner
        with self._read.connect() as conn:
            row = conn.execute(_GET_BY_ID if owner is None else _GET_BY_OWNER, params).first()
        return None if row is None else _record(row)

    def get_request(self, task_id: str) -> TaskRequest:
        """Raises ``KeyError`` when the input is gone (task ended or purged)."""
        with self._read.connect() as conn:
            payload = conn.execute(select(payloads_table.c.payload).where(payloads_table.c.task_id == task_id)).scalar()
        if payload is None:
            raise KeyError(task_id)
        return load_request(payload)

    def count_unfinished(self, owner: str) -> int:
        stmt = select(func.count()).where(_t.c.owner == owner, _t.c.status.in_((_QUEUED, _PROCESSING)))
        with self._read.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def images_created_since(self, owner: str, since: float) -> int:
        stmt = select(func.coalesce(func.sum(_t.c.image_num), 0)).where(_t.c.owner == owner, _t.c.created_at >= since)
        with self._read.connect() as conn:
            return int(conn.execute(stmt).scalar_one())

    def recent_tasks(self, owner: str, limit: int) -> list[TaskRecord]:
        # Walks ix_tasks_owner_created backwards: cost is ``limit`` rows, whatever the owner's history.
        stmt = (
            select(_t)
            .where(_t.c.owner == owner)
            .order_by(_t.c.created_at.desc(), _t.c.task_id.desc())
            .limit(max(0, int(limit)))
        )
        with self._read.connect() as conn:
            return [_record(r) for r in conn.execute(stmt)]

    def queue_counts(self, owner: str) -> QueueCounts:
        # Only unfinished rows are counted (ix_tasks_claim leads with status), so the cost follows the queue's
        # length, not the table's.
        mine = (_t.c.owner == owner).label("mine")
        stmt = (
            select(_t.c.status, mine, func.count())
            .where(_t.c.status.in_((_QUEUED, _PROCESSING)))
            .group_by(_t.c.status, mine)
        )
        counts = {(_QUEUED, True): 0, (_QUEUED, False): 0, (_PROCESSING, True): 0, (_PROCESSING, False): 0}
        with self._read.connect() as conn:
            for status, is_mine, n in conn.execute(stmt):
                counts[(status, bool(is_mine))] = int(n)
        return QueueCounts(
            queued=counts[(_QUEUED, True)] + counts[(_QUEUED, False)],
            processing=counts[(_PROCESSING, True)] + counts[(_PROCESSING, False)],
            own_queued=counts[(_QUEUED, True)],
            own_processing=counts[(_PROCESSING, True)],
        )

    def list_queued_ids(self, lanes: tuple[str, ...] | None = None) -> list[str]:
        stmt = select(_t.c.task_id).where(*self._queued_filter(lanes)).order_by(*_CLAIM_ORDER)
        with self._read.connect() as conn:
            return list(conn.execute(stmt).scalars())

    def queued_model_keys(self, lanes: tuple[str, ...] | None = None, limit: int = 8) -> list[tuple[str, str | None]]:
        """(task id, model key) of the first ``limit`` queued tasks in claim order: what a worker will load next."""
        stmt = (
            select(_t.c.task_id, _t.c.model_key).where(*self._queued_filter(lanes)).order_by(*_CLAIM_ORDER).limit(limit)
        )
        with self._read.connect() as conn:
            return [(str(task_id), key) for task_id, key in conn.execute(stmt)]

    def count_by_status(self) -> dict[TaskStatus, int]:
        counts = dict.fromkeys(TaskStatus, 0)
        with self._read.connect() as conn:
            for status, n in conn.execute(select(_t.c.status, func.count()).group_by(_t.c.status)):
                counts[TaskStatus(status)] = int(n)
        return counts

    # --- worker side ---

    def claim(
        self,
        task_id: str | None,
        worker_id: str,
        lanes: tuple[str, ...] | None = None,
        *,
        prefer_model: str | None = None,
        max_wait_s: float | None = None,
        queued_before: float | None = None,
    ) -> TaskRecord | None:
        now = self.clock()
        if task_id is None:
            order = _affinity_order(prefer_model, now - max_wait_s if max_wait_s is not None else None)
            conds = self._queued_filter(lanes)
            if queued_before is not None:
                conds.append(_t.c.created_at < queued_before)
            pick = select(_t.c.task_id).where(*conds).order_by(*order).limit(1)
            if self._dialect == "postgresql":
                pick = pick.with_for_update(skip_locked=True)
            target: ColumnElement[bool] = _t.c.task_id == pick.scalar_subquery()
            claimable: ColumnElement[bool] = _t.c.status == _QUEUED
        else:
            # A named task (a broker delivery) may also be taken over from a holder whose lease ran out.
            target = _t.c.task_id == task_id
            claimable = (_t.c.status == _QUEUED) | (
                (_t.c.status == _PROCESSING)
                & (_t.c.lease_expires_at < now)
                & (_t.c.attempts < self.max_attempts)
                & _t.c.cancel_requested_at.is_(None)
            )
            if lanes is not None:
                claimable = claimable & _t.c.lane.in_(lanes)
        stmt = (
            update(_t)
            .where(target, claimable)
            .values(
                status=_PROCESSING,
                worker_id=worker_id,
                lease_expires_at=now + self.lease_seconds,
                attempts=_t.c.attempts + 1,
                started_at=now,
                progress_percent=0,
                eta=0,
            )
            .returning(*_t.c)
        )
        with self._write.begin() as conn:
            row = conn.execute(stmt).first()
        return None if row is None else _record(row)

    def claim_batch(
        self, batch_key: str, worker_id: str, limit: int, lanes: tuple[str, ...] | None = None
    ) -> list[TaskRecord]:
        if limit < 1:
            return []
        now = self.clock()
        pick = (
            select(_t.c.task_id)
            .where(*self._queued_filter(lanes), _t.c.batch_key == batch_key)
            .order_by(*_CLAIM_ORDER)
            .limit(limit)
        )
        if self._dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        # Two statements in one transaction, never ``UPDATE ... WHERE task_id IN (SELECT ... LIMIT n)``: PostgreSQL
        # may re-run that subquery per outer row (a nested loop), and with SKIP LOCKED each run can pick other
        # rows, so the update overshot ``limit`` (batches of 9-14 with max_batch 4). Explicit ids cannot.
        with self._write.begin() as conn:
            ids = list(conn.execute(pick).scalars())
            if not ids:
                return []
            stmt = (
                update(_t)
                .where(_t.c.task_id.in_(ids), _t.c.status == _QUEUED)
                .values(
                    status=_PROCESSING,
                    worker_id=worker_id,
                    lease_expires_at=now + self.lease_seconds,
                    attempts=_t.c.attempts + 1,
                    started_at=now,
                    progress_percent=0,
                    eta=0,
                )
                .returning(*_t.c)
            )
            rows = conn.execute(stmt).all()
        records = [_record(r) for r in rows]
        return sorted(records, key=lambda r: (-r.priority, r.created_at, r.task_id))

    def update_progress(self, task_id: str, worker_id: str, progress_percent: int, eta: int) -> bool:
        percent = min(100, max(0, int(progress_percent)))
        return self._holder_update(
            task_id, worker_id, progress_percent=percent, eta=max(0, int(eta)), lease_expires_at=self._lease_end()
        )

    def renew_lease(self, task_id: str, worker_id: str) -> bool:
        return self._holder_update(task_id, worker_id, lease_expires_at=self._lease_end())

    def complete(self, task_id: str, worker_id: str, images: list[ImageRecord]) -> bool:
        """False also when the owner cancelled the task meanwhile: the worker then fails it (``fail``)."""
        return self._finish(
            task_id,
            _holder(worker_id) & _t.c.cancel_requested_at.is_(None),
            status=_SUCCEED,
            images=[_image_to_json(i) for i in images],
            progress_percent=100,
            eta=0,
        )

    def complete_unleased(self, task_id: str, images: list[ImageRecord]) -> bool:
        return self._finish(
            task_id,
            _t.c.status.in_((_QUEUED, _PROCESSING)),
            status=_SUCCEED,
            images=[_image_to_json(i) for i in images],
            worker_id=None,
            progress_percent=100,
            eta=0,
        )

    def fail(self, task_id: str, worker_id: str | None, reason: str) -> bool:
        guard = _t.c.status.in_((_QUEUED, _PROCESSING)) if worker_id is None else _holder(worker_id)
        return self._finish(task_id, guard, status=_FAILED, reason=reason, eta=0)

    def requeue_expired(self, now: float | None = None) -> list[str]:
        now = self.clock() if now is None else now
        expired = (_t.c.status == _PROCESSING) & (_t.c.lease_expires_at < now)
        changed: list[str] = []
        with self._write.begin() as conn:
            pick = select(_t.c.task_id, _t.c.attempts, _t.c.cancel_requested_at).where(expired)
            rows = conn.execute(self._locking(pick)).all()
            for tid, attempts, cancelled in rows:
                exhausted = cancelled is not None or attempts >= self.max_attempts
                if exhausted:
                    reason = CANCELLED_REASON if cancelled is not None else _crash_reason(attempts)
                    values: dict[str, Any] = {"status": _FAILED, "reason": reason, "finished_at": self.clock()}
                else:
                    # Back in the queue: it has not started (debug_info's execute time is that of the next run).
                    values = {"status": _QUEUED, "worker_id": None, "progress_percent": 0, "started_at": None}
                stmt = update(_t).where(_t.c.task_id == tid, expired).values(lease_expires_at=None, eta=0, **values)
                if conn.execute(stmt).rowcount != 1:
                    continue
                if exhausted:
                    conn.execute(delete(payloads_table).where(payloads_table.c.task_id == tid))
                changed.append(tid)
        return changed

    def image_keys(self, task_ids: Iterable[str]) -> dict[str, tuple[TaskStatus, frozenset[str]]]:
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, tuple[TaskStatus, frozenset[str]]] = {}
        with self._read.connect() as conn:
            for start in range(0, len(ids), 500):
                stmt = select(_t.c.task_id, _t.c.status, _t.c.images).where(_t.c.task_id.in_(ids[start : start + 500]))
                for tid, status, images in conn.execute(stmt):
                    found[tid] = (TaskStatus(status), frozenset(str(i["key"]) for i in images))
        return found

    def purge(self, older_than: float, limit: int = 500) -> list[TaskRecord]:
        pick = (
            select(_t)
            .where(_t.c.status.in_(_ENDED), _t.c.finished_at < older_than)
            .order_by(_t.c.finished_at)
            .limit(limit)
        )
        with self._write.begin() as conn:
            records = [_record(r) for r in conn.execute(self._locking(pick))]
            ids = [r.task_id for r in records]
            if ids:
                conn.execute(delete(payloads_table).where(payloads_table.c.task_id.in_(ids)))
                conn.execute(delete(_t).where(_t.c.task_id.in_(ids)))
        return records

    # --- helpers ---

    def _lease_end(self) -> float:
        return self.clock() + self.lease_seconds

    def _locking(self, stmt: Any) -> Any:
        # SQLite's BEGIN IMMEDIATE already serializes writers; PostgreSQL needs row locks, and two sweepers
        # should split the work rather than wait for each other.
        return stmt.with_for_update(skip_locked=True) if self._dialect == "postgresql" else stmt

    @staticmethod
    def _queued_filter(lanes: tuple[str, ...] | None) -> list[ColumnElement[bool]]:
        conds: list[ColumnElement[bool]] = [_t.c.status == _QUEUED]
        if lanes is not None:
            conds.append(_t.c.lane.in_(lanes))
        return conds

    def _holder_update(self, task_id: str, worker_id: str, **values: Any) -> bool:
        stmt = update(_t).where(_t.c.task_id == task_id, _holder(worker_id)).values(**values)
        with self._write.begin() as conn:
            return conn.execute(stmt).rowcount == 1

    def _finish(self, task_id: str, guard: ColumnElement[bool], **values: Any) -> bool:
        """End a task and drop its input in one transaction; False if ``guard`` no longer holds."""
        stmt = (
            update(_t)
            .where(_t.c.task_id == task_id, guard)
            .values(finished_at=self.clock(), lease_expires_at=None, **values)
        )
        with self._write.begin() as conn:
            if conn.execute(stmt).rowcount != 1:
                return False
            conn.execute(delete(payloads_table).where(payloads_table.c.task_id == task_id))
            return True


_CLAIM_ORDER = (_t.c.priority.desc(), _t.c.created_at, _t.c.task_id)


def _affinity_order(prefer_model: str | None, overdue_before: float | None) -> tuple[Any, ...]:
    """Claim order with model affinity, within a priority: tasks that waited past the bound first (those for
    ``prefer_model`` before the others, then by age), then tasks for ``prefer_model``, then the rest by age.

    Overdue tasks of the loaded model go before overdue tasks of other models so that a backlog in which everything
    is overdue is drained model by model instead of alternating (a checkpoint load per task). A task for another
    model therefore waits at most the bound plus the time to run the loaded model's tasks that are overdue too.
    Without a preferred model: plain priority/age.
    """
    if prefer_model is None:
        return _CLAIM_ORDER
    match = _t.c.model_key == prefer_model
    if overdue_before is None:
        return (_t.c.priority.desc(), case((match, 0), else_=1), _t.c.created_at, _t.c.task_id)
    overdue = _t.c.created_at < overdue_before
    rank = case((overdue & match, 0), (overdue, 1), (match, 2), else_=3)
    return (_t.c.priority.desc(), rank, _t.c.created_at, _t.c.task_id)


def _holder(worker_id: str) -> ColumnElement[bool]:
    return (_t.c.status == _PROCESSING) & (_t.c.worker_id == worker_id)


def _record_from_values(values: dict[str, Any]) -> TaskRecord:
    return TaskRecord(
        task_id=values["task_id"],
        owner=values["owner"],
        status=TaskStatus(values["status"]),
        seed=values["seed"],
        enable_nsfw_detection=values["enable_nsfw_detection"],
        response_image_type=values["response_image_type"],
        lane=values["lane"],
        priority=values["priority"],
        created_at=values["created_at"],
        extra=load_extra(values["extra"]),
        task_type=TaskType(values["task_type"]),
        image_num=values["image_num"],
        batch_key=values["batch_key"],
        model_key=values["model_key"],
    )


__all__ = ["SqlTaskStore"]
