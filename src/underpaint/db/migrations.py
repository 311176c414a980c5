"""The one versioned migration chain for every table of the database (``schema``), SQLite and PostgreSQL alike.

Whoever opens the database runs ``migrate`` (the task store does on construction; so does a webhook outbox that
opens its own URL). Each migration runs exactly once per database, in order, inside one transaction that holds
the database's write lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: an advisory transaction lock), so processes
starting together on a new database wait for each other instead of racing. ``schema_version`` holds the count.

A schema change is a new function appended to ``MIGRATIONS`` that also updates the definitions in ``schema``.
A migration may create a table from its live definition only while that table is unchanged since; the migration
that first changes it must first freeze the earlier ones that create it (as ``_v1_metadata`` froze the v1
tables). The test that migrates an empty database and compares it with ``schema`` catches a slip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    select,
    text,
    update,
)

from underpaint.db.schema import deliveries_table, heartbeats_table, idempotency_table, model_pulls_table

Migration = Callable[[Connection], None]

schema_version_table = Table("schema_version", MetaData(), Column("version", Integer, nullable=False))


def _v1_metadata() -> MetaData:
    """The tables as migration 1 created them (frozen: later migrations changed the live definitions)."""
    v1 = MetaData()
    t = Table(
        "tasks",
        v1,
        Column("task_id", String(64), primary_key=True),
        Column("owner", String(64), nullable=False),
        Column("status", String(32), nullable=False),
        Column("reason", Text, nullable=False, default=""),
        Column("progress_percent", Integer, nullable=False, default=0),
        Column("eta", Integer, nullable=False, default=0),
        Column("seed", BigInteger, nullable=False),
        Column("enable_nsfw_detection", Boolean, nullable=False),
        Column("response_image_type", String(16), nullable=False),
        Column("lane", String(64), nullable=False),
        Column("priority", Integer, nullable=False),
        Column("attempts", Integer, nullable=False, default=0),
        Column("image_num", Integer, nullable=False),
        Column("worker_id", String(255)),
        Column("lease_expires_at", Float),
        Column("created_at", Float, nullable=False),
        Column("started_at", Float),
        Column("finished_at", Float),
        Column("images", JSON, nullable=False),
        Column("extra", JSON, nullable=False),
    )
    Index("ix_tasks_claim", t.c.status, t.c.priority.desc(), t.c.created_at)
    Index("ix_tasks_owner_created", t.c.owner, t.c.created_at)
    Index("ix_tasks_owner_status", t.c.owner, t.c.status)
    Index("ix_tasks_status_lease", t.c.status, t.c.lease_expires_at)
    Index("ix_tasks_status_finished", t.c.status, t.c.finished_at)
    Table(
        "task_payloads",
        v1,
        Column("task_id", String(64), primary_key=True),
        Column("payload", JSON, nullable=False),
    )
    return v1


def _m001_initial(conn: Connection) -> None:
    _v1_metadata().create_all(conn)


def _m002_payload_uncompressed(conn: Connection) -> None:
    # Payloads are mostly base64 image data, which does not compress: PostgreSQL's attempt to compress every
    # payload (TOAST) costs about 0.8 ms per submit for nothing. SQLite has no such setting.
    if conn.dialect.name == "postgresql":
        conn.execute(text("ALTER TABLE task_payloads ALTER COLUMN payload SET STORAGE EXTERNAL"))


def _m003_cancel_and_idempotency(conn: Connection) -> None:
    # Cancellation by the client, and Idempotency-Key records of submits.
    conn.execute(text("ALTER TABLE tasks ADD COLUMN cancel_requested_at FLOAT"))
    idempotency_table.create(conn)


def _m004_batch_keys(conn: Connection) -> None:
    # Tasks queued before this migration keep NULL keys: they run alone and carry no model preference.
    conn.execute(text("ALTER TABLE tasks ADD COLUMN batch_key VARCHAR(64)"))
    conn.execute(text("ALTER TABLE tasks ADD COLUMN model_key VARCHAR(64)"))
    conn.execute(text("CREATE INDEX ix_tasks_status_batch ON tasks (status, batch_key)"))
    conn.execute(text("CREATE INDEX ix_tasks_status_model ON tasks (status, model_key)"))


def _m005_task_type(conn: Connection) -> None:
    # Every task before this migration was img2img; their stored requests have no ``task_type`` and load as
    # img2img too (``tasks.contract.load_request``).
    conn.execute(text("ALTER TABLE tasks ADD COLUMN task_type VARCHAR(32) NOT NULL DEFAULT 'IMG_TO_IMG'"))


def _create_if_missing(conn: Connection, table: Table) -> None:
    table.create(conn, checkfirst=True)
    for index in table.indexes:
        index.create(conn, checkfirst=True)


def _m006_webhook_outbox(conn: Connection) -> None:
    # Before this migration the outbox created its table itself on first use, with this same definition: a
    # database that has it keeps it and its pending deliveries.
    _create_if_missing(conn, deliveries_table)


def _m007_worker_heartbeats(conn: Connection) -> None:
    # Likewise created by the first Celery worker or API node that looked, before this migration.
    _create_if_missing(conn, heartbeats_table)


def _m008_model_pulls(conn: Connection) -> None:
    # ``POST /v3/model/pull`` jobs, kept in the API process's memory before this migration.
    model_pulls_table.create(conn)


MIGRATIONS: list[Migration] = [
    _m001_initial,
    _m002_payload_uncompressed,
    _m003_cancel_and_idempotency,
    _m004_batch_keys,
    _m005_task_type,
    _m006_webhook_outbox,
    _m007_worker_heartbeats,
    _m008_model_pulls,
]

# Any constant works; it only has to be the same in every process that migrates this database.
_PG_MIGRATION_LOCK = 0x756E6465727061


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the schema up to ``len(migrations)``; safe when several processes start at once. Returns it.

    ``RuntimeError`` when the database is newer than this code (an older release must not run on it)."""
    with engine.execution_options(underpaint_tx="immediate").begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        schema_version_table.create(conn, checkfirst=True)
        current = conn.execute(select(func.max(schema_version_table.c.version))).scalar()
        if current is None:
            conn.execute(insert(schema_version_table).values(version=0))
            current = 0
        if current > len(migrations):
            raise RuntimeError(
                f"database schema version {current} is newer than this Underpaint ({len(migrations)}); upgrade it"
            )
        for migration in migrations[current:]:
            migration(conn)
        conn.execute(update(schema_version_table).values(version=len(migrations)))
        return len(migrations)


__all__ = ["MIGRATIONS", "Migration", "migrate", "schema_version_table"]
