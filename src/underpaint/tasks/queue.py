"""The embedded queue: the store's QUEUED rows *are* the queue, this only wakes the in-process worker.

Because nothing lives in memory, a restart loses nothing: the worker simply claims whatever is still QUEUED,
by priority then age, across all lanes.
"""

from __future__ import annotations

import threading
from typing import Protocol


class WakeEvent(Protocol):
    """``threading.Event`` or a ``multiprocessing`` Event shared with the worker process."""

    def set(self) -> None: ...

    def clear(self) -> None: ...

    def wait(self, timeout: float | None = None) -> bool: ...


class LocalQueue:
    """``TaskQueue`` for embedded mode (one machine, one worker).

    ``event`` may be a ``multiprocessing`` Event shared with the worker process (``worker/process.py``).
    """

    def __init__(self, event: WakeEvent | None = None) -> None:
        self._ready: WakeEvent = event if event is not None else threading.Event()

    @property
    def event(self) -> WakeEvent:
        """The wake-up event (share it with a worker process)."""
        return self._ready

    def enqueue(self, task_id: str, lane: str) -> None:
        self._ready.set()

    def wake(self) -> None:
        """Wake a waiting worker without a new task (shutdown)."""
        self._ready.set()

    def wait(self, timeout: float) -> bool:
        """Block until something was enqueued (or ``wake``) or ``timeout`` passed; consumes the signal.

        The worker claims after every wait until nothing is left, so clearing here never loses a task: a task
        enqueued after the clear is either claimed by that loop or sets the signal again.
        """
        woke = self._ready.wait(timeout)
        self._ready.clear()
        return woke
