"""The one place a SQLAlchemy engine for Underpaint's database is made: SQLite (embedded) or PostgreSQL.

Every process that opens the database (API node, worker, the webhook outbox on its own) gets the same settings,
so two engines on one SQLite file never disagree about WAL or transaction control.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_S = 30  # how long a statement waits for another connection's lock before "database is locked"


def _enable_wal(cur: Any, attempts: int = 100) -> None:
    """Switch to WAL, retrying: the switch needs an exclusive lock and answers "database is locked" at once,
    without the busy handler, while another process opens the same new database file."""
    for attempt in range(attempts):
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def sqlite_engine(url: str) -> Engine:
    """SQLite for several threads and processes: WAL (readers never wait for writers), a 30 s busy timeout,
    ``synchronous=NORMAL``, and our own BEGIN so that ``underpaint_tx="immediate"`` takes the write lock up front
    (``"autocommit"``: no transaction, each statement its own snapshot)."""
    parsed = make_url(url)
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:"):
        raise ValueError("in-memory SQLite cannot be shared between threads; give the database a file path")
    Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the sqlite3 module so that BEGIN IMMEDIATE below is ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
        _enable_wal(cur)  # readers (task polling) never wait for the worker's writes
        cur.execute("PRAGMA synchronous=NORMAL")  # durable across process kills; WAL keeps it consistent
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("underpaint_tx")
        if mode == "immediate":
            # Write lock up front: a deferred transaction that reads and then writes can fail with
            # "database is locked" without waiting for busy_timeout.
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        elif mode != "autocommit":
            conn.exec_driver_sql("BEGIN")

    return engine


def sqlite_reader(database: str) -> sqlite3.Connection:
    """A read-only ``sqlite3`` connection to an existing database file, for point reads that skip SQLAlchemy
    (the task store's fast path). The same busy timeout and ``synchronous`` as ``sqlite_engine``, no transaction
    control by the ``sqlite3`` module (each statement its own snapshot, like ``underpaint_tx="autocommit"``),
    and ``check_same_thread=False`` so that another thread may close it. It cannot switch the file to WAL (that
    takes a write): open the database with ``sqlite_engine`` first, which does."""
    uri = Path(database).expanduser().resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=SQLITE_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def open_engine(url: str) -> Engine:
    """An engine for ``sqlite:///path`` or ``postgresql[+psycopg]://...``; ``ValueError`` for anything else.
    It does not touch the schema: ``migrations.migrate`` does."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return sqlite_engine(url)
    if backend == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver we ship, not psycopg2
        # A server that vanishes without closing its connections (a network partition, a host that died) must
        # not hang a worker forever on a query: libpq gives up on unacknowledged data after tcp_user_timeout and
        # probes idle connections with keepalives; connecting gives up after connect_timeout.
        timeouts = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
                    "keepalives_count": 3, "tcp_user_timeout": 30_000}  # fmt: skip
        defaults = {k: v for k, v in timeouts.items() if k not in parsed.query}  # the URL's own values win
        return create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20, connect_args=defaults)
    raise ValueError(f"unsupported database URL {url.split(':', 1)[0]!r}: use sqlite:/// or postgresql+psycopg://")
