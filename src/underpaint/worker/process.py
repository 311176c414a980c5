"""The embedded worker in its own process (the default for ``underpaint serve``).

Generation is a long run of small torch calls, each of which needs the GIL to dispatch; HTTP handling in the same
process takes the GIL between them. Measured with the tiny models: 50 pollers slowed a generation in a worker
thread by 150 %. In a child process the API and the engine never share a GIL (vLLM runs its engine core the same
way). The child talks to the API process only through the task store and one wake-up ``Event``, exactly as a
Celery worker talks to an API node.

The child dies with its parent (``PR_SET_PDEATHSIG``): a killed server must not leave a worker running tasks
that the next start recovers. If the child dies, the parent requeues its task and starts a new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Mapping
from multiprocessing.context import SpawnProcess

from underpaint.config import Settings
from underpaint.tasks.queue import WakeEvent

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    WorkerProcess._parent_pid = parent_pid
    # Not Linux/glibc: the ppid check below still catches most cases.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _child(
    entry: str, settings: Settings, wake: WakeEvent, parent_pid: int, log_level: int, env: dict[str, str]
) -> None:
    """The child process: its environment first (prometheus_client reads its multiprocess folder at import), then
    the entry point, named ``"module:function"`` so that nothing it imports is loaded before that. Ctrl-C reaches
    the whole process group: the child ignores SIGINT from the start (the parent stops it with SIGTERM)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent_pid)
    os.environ.update(env)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    module, _, name = entry.partition(":")
    run: Callable[[Settings, WakeEvent], None] = getattr(importlib.import_module(module), name)
    run(settings, wake)


class WorkerProcess:
    """Starts the child, watches it, restarts it if it dies, stops it with the server."""

    _parent_pid: int | None = None

    def __init__(
        self,
        entry: str,
        settings: Settings,
        wake: WakeEvent,
        on_child_death: Callable[[], None] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.entry = entry
        self.settings = settings
        self.env = dict(env or {})  # extra environment for the child (set before it imports anything)
        self.wake = wake
        self.on_child_death = on_child_death
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: SpawnProcess | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self.restarts = 0

    @staticmethod
    def parent_alive() -> bool:
        """In the child: whether the server that started it still runs."""
        return WorkerProcess._parent_pid is None or os.getppid() == WorkerProcess._parent_pid

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _spawn(self) -> None:
        level = logging.getLogger().getEffectiveLevel()
        proc = self._ctx.Process(
            target=_child,
            args=(self.entry, self.settings, self.wake, os.getpid(), level, self.env),
            name="underpaint-worker",
            daemon=False,
        )
        proc.start()
        self._proc = proc
        log.info("worker process %s started", proc.pid)

    def start(self) -> None:
        self._spawn()
        self._watch = threading.Thread(target=self._watch_loop, name="underpaint-worker-watch", daemon=True)
        self._watch.start()

    def _watch_loop(self) -> None:
        backoff = 1.0
        while not self._stopping.is_set():
            proc = self._proc
            if proc is not None:
                proc.join(timeout=1.0)
                if proc.is_alive() or self._stopping.is_set():
                    continue
                log.error("worker process %s exited with %s; restarting it", proc.pid, proc.exitcode)
                if self.on_child_death is not None:
                    try:
                        self.on_child_death()
                    except Exception:
                        log.exception("recovering after the worker process died failed")
                self.restarts += 1
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, 30.0)
                self._spawn()

    def stop(self, timeout: float = 60.0) -> None:
        self._stopping.set()
        proc = self._proc
        if proc is not None and proc.is_alive():
            proc.terminate()  # SIGTERM: the child finishes its task, then exits
            proc.join(timeout)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        if self._watch is not None:
            self._watch.join(5)
            self._watch = None


def new_wake_event() -> WakeEvent:
    """An Event both processes share (created before the child is spawned)."""
    return multiprocessing.get_context("spawn").Event()
