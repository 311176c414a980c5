"""Storage outages are transient: an upload that fails with a ``StorageError`` marked ``transient`` (the endpoint
unreachable, 5xx, throttling) is retried with exponential backoff instead of failing the task.

The budget (``storage_retry_seconds``) is per outage, not per call: it starts at the first failure and is shared by
every upload of the runner (all the tasks of a batch, and the tasks after them) until an upload succeeds, so a
long outage costs one budget and then fails tasks at once rather than one budget per image (an upload tried after
a pause longer than the budget starts a new one). Meanwhile the images
stay in the worker's memory and the task keeps its lease (the worker renews it beside the run).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

from underpaint.storage.base import StorageError

log = logging.getLogger("underpaint.storage")

T = TypeVar("T")


class UploadRetry:
    """``run(op, task_id, what)`` calls ``op`` until it succeeds, a failure is not transient, ``should_stop()``
    says so, or the current outage has lasted ``budget_s`` seconds; then the last error is raised.

    ``on_retry`` is called once per retry (a metric). ``sleep`` and ``clock`` are injectable for tests."""

    def __init__(
        self,
        budget_s: float,
        *,
        first_delay: float = 0.5,
        max_delay: float = 10.0,
        on_retry: Callable[[], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_s = max(0.0, budget_s)
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.on_retry = on_retry
        self._sleep = sleep
        self._clock = clock
        self._lock = threading.Lock()
        self._outage_since: float | None = None
        self._last_failure = 0.0

    def run(self, op: Callable[[], T], task_id: str, what: str, should_stop: Callable[[], bool] = bool) -> T:
        delay = self.first_delay
        tries = 0
        while True:
            try:
                result = op()
            except StorageError as exc:
                if not exc.transient:
                    raise
                left = self._left()
                if left <= 0 or should_stop():
                    log.error(
                        "task %s: %s still failing after %d retries (storage_retry_seconds %.0f): %s",
                        task_id, what, tries, self.budget_s, exc, extra={"task_id": task_id},
                    )  # fmt: skip
                    raise
                tries += 1
                pause = min(delay, left)
                log.warning(
                    "task %s: %s failed (%s); retry %d in %.1f s, giving up in %.0f s",
                    task_id, what, exc, tries, pause, left, extra={"task_id": task_id},
                )  # fmt: skip
                if self.on_retry is not None:
                    self.on_retry()
                self._sleep(pause)
                delay = min(self.max_delay, delay * 2)
                continue
            with self._lock:
                self._outage_since = None
            return result

    def _left(self) -> float:
        """Seconds left in the budget of the outage under way: one starts now if none was, or if nothing was
        tried for longer than the budget (the outage that spent it may be long over)."""
        now = self._clock()
        with self._lock:
            if self._outage_since is None or now - self._last_failure > self.budget_s:
                self._outage_since = now
            self._last_failure = now
            return self.budget_s - (now - self._outage_since)
