"""Structured logs: one JSON object per line, carrying the id of the task being handled.

``task_context(task_id)`` sets the id for the code it wraps (a Celery task body); every record logged inside,
by any logger, gets ``task_id``. Threads started inside do not inherit it (contextvars), so lines logged there
name the task in their message instead.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

current_task_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("underpaint_task_id", default=None)

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is copied into the JSON line.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "", None, None))) | {"message", "asctime", "task_id"}


@contextmanager
def task_context(task_id: str) -> Iterator[None]:
    token = current_task_id.set(task_id)
    try:
        yield
    finally:
        current_task_id.reset(token)


class TaskIdFilter(logging.Filter):
    """Adds ``record.task_id`` (from the context unless the call passed one; ``-`` when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "task_id", None) is None:
            record.task_id = current_task_id.get() or _celery_message_id(record) or "-"
        return True


def _celery_message_id(record: logging.LogRecord) -> str | None:
    """Celery logs a message's received/succeeded/failed lines outside our task body, with the message id in a
    dict of arguments; our messages use the task id as message id (``CeleryQueue``)."""
    if record.name.startswith("celery.") and isinstance(record.args, dict):
        value = record.args.get("id")
        return value if isinstance(value, str) else None
    return None


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "task_id": _task_id(record),
            "process": record.process,
            "thread": record.threadName,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def _task_id(record: logging.LogRecord) -> str | None:
    value = getattr(record, "task_id", None)
    if value is None or value == "-":
        return current_task_id.get()
    return str(value)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(task_id)s]: %(message)s"


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Replace the root handlers with one stderr handler in ``fmt`` ("text" or "json")."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be 'text' or 'json', not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(TaskIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
