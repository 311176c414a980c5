"""The one migration chain: a new database gets exactly the live schema, an older one upgrades keeping its rows."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import Engine, inspect, text
from sqlalchemy.types import TypeEngine

from underpaint.config import Settings
from underpaint.db.engine import open_engine
from underpaint.db.migrations import MIGRATIONS, migrate
from underpaint.db.schema import metadata
from underpaint.delivery.webhooks import PENDING, WebhookDispatcher
from underpaint.scale.heartbeat import Heartbeat, list_workers
from underpaint.tasks.store import SqlTaskStore
from underpaint.tasks.types import TaskStatus

# What releases before the one migration chain ran: migrations 1-5 for the task tables, then the webhook outbox
# and the first heartbeat created their tables on first use, with exactly this DDL (SQLAlchemy's, for both
# SQLite and PostgreSQL, copied from a database the previous release made).
_FIRST_ADHOC = 5
_OLD_ADHOC_DDL = [
    """CREATE TABLE webhook_deliveries (
        id VARCHAR(64) NOT NULL, task_id VARCHAR(64) NOT NULL, event VARCHAR(64) NOT NULL,
        owner VARCHAR(64) NOT NULL, url TEXT NOT NULL, body JSON NOT NULL, attempts INTEGER NOT NULL,
        next_attempt_at FLOAT NOT NULL, lease_until FLOAT, status VARCHAR(16) NOT NULL, last_error TEXT NOT NULL,
        created_at FLOAT NOT NULL, updated_at FLOAT NOT NULL, PRIMARY KEY (id),
        CONSTRAINT uq_webhook_deliveries_task_event UNIQUE (task_id, event))""",
    "CREATE INDEX ix_webhook_deliveries_due ON webhook_deliveries (status, next_attempt_at)",
    """CREATE TABLE worker_heartbeats (
        worker_id VARCHAR(255) NOT NULL, hostname VARCHAR(255) NOT NULL, pid INTEGER NOT NULL,
        queues VARCHAR(1000) NOT NULL, concurrency INTEGER NOT NULL, busy INTEGER NOT NULL,
        tasks_done INTEGER NOT NULL, model_loads INTEGER NOT NULL, started_at FLOAT NOT NULL,
        last_seen FLOAT NOT NULL, PRIMARY KEY (worker_id))""",
]


def _settings() -> Settings:
    return Settings(webhook_allow_hosts=("127.0.0.1",))


def _type_family(t: TypeEngine[Any]) -> str:
    """A type as both backends report it back (``VARCHAR(64)`` and ``String(64)`` alike); PostgreSQL stores a
    plain FLOAT as DOUBLE PRECISION (53 bits)."""
    return repr(t.as_generic()).replace("Double(precision=53)", "Float()").replace("Double()", "Float()")


def _shape(engine: Engine) -> dict[str, Any]:
    """Tables, columns (type family, nullability), primary keys, indexes and unique constraints of a database."""
    found = inspect(engine)
    shape: dict[str, Any] = {}
    for table in sorted(set(found.get_table_names()) - {"schema_version"}):
        shape[table] = {
            "columns": {c["name"]: (_type_family(c["type"]), c["nullable"]) for c in found.get_columns(table)},
            "pk": found.get_pk_constraint(table)["constrained_columns"],
            "indexes": {
                i["name"]: tuple(i["column_names"])
                for i in found.get_indexes(table)
                if not i.get("duplicates_constraint")  # PostgreSQL's index behind a unique constraint
            },
            "unique": {u["name"]: tuple(u["column_names"]) for u in found.get_unique_constraints(table)},
        }
    return shape


def _live_shape() -> dict[str, Any]:
    shape: dict[str, Any] = {}
    for table in metadata.sorted_tables:
        shape[table.name] = {
            "columns": {c.name: (_type_family(c.type), c.nullable) for c in table.columns},
            "pk": [c.name for c in table.primary_key.columns],
            "indexes": {
                i.name: tuple(getattr(e, "name", None) or e.element.name for e in i.expressions)  # type: ignore[union-attr]
                for i in table.indexes
            },
            "unique": {
                c.name: tuple(col.name for col in c.columns)  # type: ignore[attr-defined]
                for c in table.constraints
                if type(c).__name__ == "UniqueConstraint"
            },
        }
    return dict(sorted(shape.items()))


def test_a_new_database_gets_every_table_exactly_as_the_code_defines_it(any_db_url: str) -> None:
    engine = open_engine(any_db_url)
    try:
        assert migrate(engine) == len(MIGRATIONS)
        assert _shape(engine) == _live_shape()
    finally:
        engine.dispose()


def test_a_database_of_the_previous_release_upgrades_and_keeps_its_rows(any_db_url: str) -> None:
    engine = open_engine(any_db_url)
    try:
        migrate(engine, MIGRATIONS[:_FIRST_ADHOC])
        with engine.begin() as conn:
            for ddl in _OLD_ADHOC_DDL:
                conn.execute(text(ddl))
            conn.execute(
                text(
                    "INSERT INTO webhook_deliveries VALUES ('msg_old', 't-old', 'ASYNC_TASK_RESULT', 'o', "
                    "'http://127.0.0.1:9/hook', '{\"task\": {}}', 2, 1.0, NULL, 'pending', 'HTTP 500', 1.0, 1.0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO worker_heartbeats VALUES "
                    "('oldhost:7', 'oldhost', 7, 'sd15,sdxl', 2, 1, 40, 3, 10.0, :now)"
                ),
                {"now": time.time()},
            )
    finally:
        engine.dispose()

    store = SqlTaskStore(any_db_url)  # the new release opens it: migrates 6 and 7 over the existing tables
    try:
        assert store.schema_version == len(MIGRATIONS)
        with store.engine.connect() as conn:
            version = conn.execute(text("SELECT version FROM schema_version")).scalar_one()
        assert version == len(MIGRATIONS)
        assert _shape(store.engine) == _live_shape()
        outbox = WebhookDispatcher(store.engine, _settings(), lambda _owner: "whsec_x")
        (old,) = outbox.deliveries("t-old")
        assert (old.id, old.status, old.attempts, old.last_error, old.body) == (
            "msg_old", PENDING, 2, "HTTP 500", {"task": {}}
        )  # fmt: skip
        outbox.enqueue("t-old", "o", "http://127.0.0.1:9/hook", {"task": {}})  # the unique key still holds
        outbox.enqueue("t-new", "o", "http://127.0.0.1:9/hook", {"task": {}})
        assert outbox.count_pending() == 2
        (worker,) = list_workers(store.engine)
        assert (worker.worker_id, worker.queues, worker.tasks_done) == ("oldhost:7", ("sd15", "sdxl"), 40)
        assert store.count_by_status()[TaskStatus.QUEUED] == 0
    finally:
        store.close()


def test_whoever_opens_the_database_first_creates_the_outbox_and_heartbeat_tables(any_db_url: str) -> None:
    # A Celery worker's heartbeat and an API node's worker list need no table set-up of their own any more.
    outbox = WebhookDispatcher(any_db_url, _settings(), lambda _owner: "whsec_x")  # opened by the outbox alone
    try:
        beat = Heartbeat(outbox.engine, ("sd15",), 1, lambda: {"busy": 0, "tasks_done": 0, "model_loads": 0})
        beat.beat()
        assert [w.worker_id for w in list_workers(outbox.engine)] == [beat.worker_id]
        store = SqlTaskStore(any_db_url)  # a second opener finds the schema current and changes nothing
        try:
            assert store.schema_version == len(MIGRATIONS)
            assert [w.worker_id for w in list_workers(store.engine)] == [beat.worker_id]
        finally:
            store.close()
    finally:
        outbox.close()


def test_processes_opening_a_new_database_together_all_end_up_on_one_schema(any_db_url: str) -> None:
    def outbox(url: str) -> WebhookDispatcher:
        return WebhookDispatcher(url, _settings(), lambda _owner: "whsec_x")

    openers: list[Callable[[str], SqlTaskStore | WebhookDispatcher]] = [SqlTaskStore, outbox, SqlTaskStore, outbox]
    barrier = threading.Barrier(len(openers))

    def open_together(opener: Callable[[str], SqlTaskStore | WebhookDispatcher]) -> SqlTaskStore | WebhookDispatcher:
        barrier.wait(30)
        return opener(any_db_url)

    with ThreadPoolExecutor(len(openers)) as pool:
        futures = [pool.submit(open_together, opener) for opener in openers]
    try:
        opened = [f.result() for f in futures]  # raises what an opener raised
        assert _shape(opened[0].engine) == _live_shape()
    finally:
        for f in futures:
            if f.exception() is None:
                f.result().close()
