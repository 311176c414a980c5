"""Storage outages are transient: an upload that fails with a ``StorageError`` marked ``transient`` (the endpoint
unreachable, 5xx, throttling) is retried with exponential backoff instead of failing the task.

The budget (``storage_retry_seconds``) is per outage, not per call: it starts at the first failure and is shared by
every upload of the runner (all the tasks of a batch, and the tasks after them) until an upload succeeds, so a
long outage costs one budget rather than one budget per image (an upload tried after a pause longer than the
budget starts a new one). Meanwhile the images wait in the spool and the task keeps its lease (the worker renews it
beside the run).

Once an outage has spent the budget (``UploadRetry.exhausted``), the tasks of the batch in hand fail, and the
runner claims nothing more: ``StorageGate`` keeps it from claiming, probing the storage (what ``/health`` asks) at
a growing interval, and ends the outage when the storage answers. So a long outage fails one batch per runner, and
the tasks behind it stay QUEUED until the storage is back.
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
        self._spent = False

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
                if left <= 0:
                    with self._lock:
                        self._spent = True
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
            self.end_outage()
            return result

    def sibling(self) -> UploadRetry:
        """A retry with the same budget, delays and hooks, and an outage of its own (another endpoint's)."""
        return UploadRetry(
            self.budget_s, first_delay=self.first_delay, max_delay=self.max_delay, on_retry=self.on_retry,
            sleep=self._sleep, clock=self._clock,
        )  # fmt: skip

    def exhausted(self) -> bool:
        """An outage is under way and has spent the budget: an upload gave up on it, and neither an upload nor
        ``end_outage`` has succeeded since."""
        with self._lock:
            return self._spent

    def end_outage(self) -> None:
        """The storage answers again (an upload succeeded, or a probe did): the next failure starts a new outage,
        with a fresh budget."""
        with self._lock:
            self._outage_since = None
            self._spent = False

    def _left(self) -> float:
        """Seconds left in the budget of the outage under way: one starts now if none was, or if nothing was
        tried for longer than the budget (the outage that spent it may be long over)."""
        now = self._clock()
        with self._lock:
            if self._outage_since is None or now - self._last_failure > self.budget_s:
                self._outage_since = now
            self._last_failure = now
            return self.budget_s - (now - self._outage_since)


class StorageGate:
    """Whether a runner may claim work: not while the storage outage its uploads met has spent the budget.

    ``open()`` is True while ``retry`` is not exhausted. Once it is, the storage is probed (``probe`` returns
    ``"ok"`` or why not, as ``base.reachability`` does for ``/health``), at most once per interval (``first_interval``
    doubling to ``max_interval``); while the probe fails, ``open()`` is False and the runner claims nothing. When a
    probe succeeds the outage ends (``retry.end_outage``) and claiming resumes. One WARNING when claiming pauses,
    one when it resumes; ``on_change(paused)`` is called at each (a metric)."""

    def __init__(
        self,
        retry: UploadRetry,
        probe: Callable[[], str],
        *,
        first_interval: float = 1.0,
        max_interval: float = 10.0,
        on_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.retry = retry
        self.probe = probe
        self.first_interval = first_interval
        self.max_interval = max_interval
        self.on_change = on_change
        self._clock = clock
        self._lock = threading.Lock()
        self._paused_since: float | None = None
        self._next_probe = 0.0
        self._interval = first_interval

    @property
    def paused(self) -> bool:
        """Claiming is paused (as of the last ``open()``)."""
        return self._paused_since is not None

    def open(self) -> bool:
        with self._lock:
            if not self.retry.exhausted():
                if self._paused_since is not None:  # an upload of the batch in hand succeeded meanwhile
                    self._resume("an upload succeeded")
                return True
            now = self._clock()
            if self._paused_since is not None and now < self._next_probe:
                return False
            answer = self._ask()
            if answer == "ok":
                self.retry.end_outage()
                if self._paused_since is not None:
                    self._resume("the storage answers again")
                return True
            if self._paused_since is None:
                self._paused_since = now
                self._interval = self.first_interval
                log.warning(
                    "storage outage outlasted storage_retry_seconds (%.0f s); this worker claims no task until the "
                    "storage answers (probed every %.0f-%.0f s): queued tasks wait: %s",
                    self.retry.budget_s, self.first_interval, self.max_interval, answer,
                )  # fmt: skip
                if self.on_change is not None:
                    self.on_change(True)
            else:
                self._interval = min(self.max_interval, self._interval * 2)
            self._next_probe = now + self._interval
            return False

    def _ask(self) -> str:
        try:
            return str(self.probe())
        except Exception as exc:  # a probe that cannot tell counts as the storage not answering
            return f"unreachable: {type(exc).__name__}: {exc}"

    def _resume(self, why: str) -> None:
        since = self._paused_since if self._paused_since is not None else self._clock()
        self._paused_since = None
        log.warning("storage outage over (%s) after %.0f s of paused claiming; claiming tasks again", why,
                    self._clock() - since)  # fmt: skip
        if self.on_change is not None:
            self.on_change(False)
