"""One SQLite setup for every opener of the database: the task store and a webhook outbox on its own URL."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from underpaint.config import Settings
from underpaint.db.engine import open_engine
from underpaint.delivery.webhooks import WebhookDispatcher
from underpaint.tasks.store import SqlTaskStore

SRC = Path(__file__).resolve().parents[2] / "src" / "underpaint"


def _store_engine(url: str) -> tuple[Engine, Callable[[], None]]:
    store = SqlTaskStore(url)
    return store.engine, store.close


def _outbox_engine(url: str) -> tuple[Engine, Callable[[], None]]:
    outbox = WebhookDispatcher(url, Settings(), lambda _owner: "whsec_x")
    return outbox.engine, outbox.close


def _plain_engine(url: str) -> tuple[Engine, Callable[[], None]]:
    engine = open_engine(url)
    return engine, engine.dispose


@pytest.mark.parametrize("opener", [_store_engine, _outbox_engine, _plain_engine])
def test_every_opener_gets_the_same_sqlite_settings(
    tmp_path: Path, opener: Callable[[str], tuple[Engine, Callable[[], None]]]
) -> None:
    db = tmp_path / "nested" / "underpaint.db"  # a missing folder is created
    engine, close = opener(f"sqlite:///{db}")
    try:
        with engine.connect() as conn:
            settings = [conn.exec_driver_sql(f"PRAGMA {p}").scalar() for p in ("journal_mode", "busy_timeout")]
            settings.append(conn.exec_driver_sql("PRAGMA synchronous").scalar())
        assert settings == ["wal", 30000, 1]  # synchronous=1 is NORMAL
        # ``underpaint_tx="immediate"`` takes the write lock at BEGIN: a second writer cannot start meanwhile.
        with engine.execution_options(underpaint_tx="immediate").begin() as conn:
            conn.execute(text("SELECT 1"))
            other = sqlite3.connect(db, timeout=0, isolation_level=None)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
    finally:
        close()


def test_in_memory_sqlite_and_unknown_backends_are_refused() -> None:
    with pytest.raises(ValueError, match="in-memory"):
        open_engine("sqlite:///:memory:")
    with pytest.raises(ValueError, match="in-memory"):
        WebhookDispatcher("sqlite://", Settings(), lambda _owner: "whsec_x")
    with pytest.raises(ValueError, match="unsupported"):
        open_engine("mysql://u@h/db")


def test_the_stores_sqlite_reader_gets_the_same_settings_read_only_one_connection_per_thread(tmp_path: Path) -> None:
    store = SqlTaskStore(f"sqlite:///{tmp_path / 'underpaint.db'}")
    reader = store._fast
    assert reader is not None
    try:
        conn = reader._conn()
        assert conn is reader._conn()  # reused by its thread
        settings = [conn.execute(f"PRAGMA {p}").fetchone()[0] for p in ("journal_mode", "busy_timeout", "synchronous")]
        assert settings == ["wal", 30000, 1]
        assert conn.in_transaction is False
        assert conn.isolation_level is None
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            conn.execute("DELETE FROM tasks")
        others: list[sqlite3.Connection] = []
        thread = threading.Thread(target=lambda: others.append(reader._conn()))
        thread.start()
        thread.join()
        assert others[0] is not conn
    finally:
        store.close()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        conn.execute("SELECT 1")


# What opens SQLite or makes an engine anywhere but db/engine.py, bypassing its settings.
_OWN_SETUP = ("create_engine(", "PRAGMA ", "journal_mode", "sqlite3.connect(", "from sqlite3 import")


def test_no_module_but_db_engine_makes_an_engine_or_sets_pragmas() -> None:
    offenders = [
        str(path.relative_to(SRC))
        for path in sorted(SRC.rglob("*.py"))
        if path != SRC / "db" / "engine.py" and any(needle in path.read_text() for needle in _OWN_SETUP)
    ]
    assert offenders == []
    # The needles catch what they are for: the task store's reader once opened SQLite itself.
    raw = "holder = _Conn(sqlite3.connect(self._uri, uri=True, timeout=5.0, check_same_thread=False))"
    assert any(needle in raw for needle in _OWN_SETUP)
