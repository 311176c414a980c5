"""Every table of Underpaint's database, as the code uses it today (the live definitions).

The schema a database actually has is made by ``migrations`` (the one versioned chain); a change here is always a
new migration too, and ``tests/db/test_migrations.py`` fails when the migrated schema and these definitions differ.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

# --- the task store (``tasks.store``) ---------------------------------------------------------------------------

tasks_table = Table(
    "tasks",
    metadata,
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
    # Set when the owner asked to cancel a PROCESSING task; the worker holding it stops and ends it FAILED.
    Column("cancel_requested_at", Float),
    # Batching (``tasks.batching``): tasks with equal batch keys share a sampler call; NULL never batches.
    Column("batch_key", String(64)),
    # Checkpoint + LoRA set: workers prefer tasks for the model they have loaded.
    Column("model_key", String(64)),
    # The endpoint (``tasks.contract.TaskType``): task-result reports it without reading the request.
    Column("task_type", String(32), nullable=False),
)
_t = tasks_table
Index("ix_tasks_claim", _t.c.status, _t.c.priority.desc(), _t.c.created_at)
Index("ix_tasks_owner_created", _t.c.owner, _t.c.created_at)
Index("ix_tasks_owner_status", _t.c.owner, _t.c.status)
Index("ix_tasks_status_lease", _t.c.status, _t.c.lease_expires_at)
Index("ix_tasks_status_finished", _t.c.status, _t.c.finished_at)
Index("ix_tasks_status_batch", _t.c.status, _t.c.batch_key)
Index("ix_tasks_status_model", _t.c.status, _t.c.model_key)

# A task's input, apart so that polling never reads input images; deleted when the task ends.
payloads_table = Table(
    "task_payloads",
    metadata,
    Column("task_id", String(64), primary_key=True),
    Column("payload", JSON, nullable=False),
)

# ``Idempotency-Key`` of a submit, per owner: the unique (owner, key) pair makes two concurrent submits with one
# key create one task, whatever the backend. Purged with the retention sweeper once older than their TTL.
idempotency_table = Table(
    "idempotency_keys",
    metadata,
    Column("owner", String(64), primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("task_id", String(64), nullable=False),
    Column("created_at", Float, nullable=False),
)
Index("ix_idempotency_created", idempotency_table.c.created_at)

# --- the webhook outbox (``delivery.webhooks``) -----------------------------------------------------------------

deliveries_table = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),  # also the Standard Webhooks ``webhook-id``
    Column("task_id", String(64), nullable=False),
    Column("event", String(64), nullable=False),
    Column("owner", String(64), nullable=False),
    Column("url", Text, nullable=False),
    Column("body", JSON, nullable=False),  # the payload (task-result body)
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", Float, nullable=False),
    Column("lease_until", Float),  # set while one sender owns an attempt
    Column("status", String(16), nullable=False),
    Column("last_error", Text, nullable=False, default=""),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    # One event per task: a task finished twice (broker redelivery) never produces two webhooks.
    UniqueConstraint("task_id", "event", name="uq_webhook_deliveries_task_event"),
)
Index("ix_webhook_deliveries_due", deliveries_table.c.status, deliveries_table.c.next_attempt_at)

# --- worker liveness (``scale.heartbeat``) ----------------------------------------------------------------------

heartbeats_table = Table(
    "worker_heartbeats",
    metadata,
    Column("worker_id", String(255), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("queues", String(1000), nullable=False),
    Column("concurrency", Integer, nullable=False),
    Column("busy", Integer, nullable=False),
    Column("tasks_done", Integer, nullable=False),
    Column("model_loads", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

# --- model pulls (``delivery.model_pulls``) ---------------------------------------------------------------------

model_pulls_table = Table(
    "model_pulls",
    metadata,
    Column("pull_id", String(64), primary_key=True),
    Column("source", Text, nullable=False),
    # What the admin asked for (None: told by the download).
    Column("want_kind", String(32)),
    Column("want_name", Text),
    Column("want_sha256", String(64)),
    Column("status", String(16), nullable=False),  # queued | downloading | succeeded | failed
    Column("bytes_done", BigInteger, nullable=False, default=0),
    Column("bytes_total", BigInteger),
    # The outcome: where the file landed, its folder and sha256; or why it failed.
    Column("path", Text),
    Column("kind", String(32)),
    Column("sha256", String(64)),
    Column("reason", Text),
    Column("attempts", Integer, nullable=False, default=0),  # times a runner took it
    Column("runner", String(255)),  # the runner holding it while downloading
    Column("lease_expires_at", Float),
    # The partial file's name while the pull is queued or downloading, NULL once it ended: one active pull per URL.
    Column("active_key", String(64)),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float),
    UniqueConstraint("active_key", name="uq_model_pulls_active_key"),  # NULLs never collide (SQLite, PostgreSQL)
)
Index("ix_model_pulls_status_created", model_pulls_table.c.status, model_pulls_table.c.created_at)

__all__ = [
    "deliveries_table",
    "heartbeats_table",
    "idempotency_table",
    "metadata",
    "model_pulls_table",
    "payloads_table",
    "tasks_table",
]
