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
import logging
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from typing import Any

from underpaint.config import Settings

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux/glibc: the ppid check below still catches most cases
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def child_main(settings: Settings, wake: Any, parent_pid: int, log_level: int) -> None:
    """Entry point of the worker process: build the services, run the worker until SIGTERM."""
    _die_with_parent(parent_pid)
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    from underpaint.tasks.queue import LocalQueue
    from underpaint.wiring import build_local_worker, build_services

    services = build_services(settings, queue=LocalQueue(wake))
    worker = build_local_worker(services)
    if settings.worker_metrics_port is not None:
        from prometheus_client import start_http_server

        from underpaint.scale.metrics import serving_registry

        start_http_server(settings.worker_metrics_port, addr=settings.host, registry=serving_registry())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the whole group; the parent decides
    worker.start()
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            break
    worker.stop()  # finishes the task in hand; a killed child leaves it to recover_on_start


class WorkerProcess:
    """Starts the child, watches it, restarts it if it dies, stops it with the server."""

    def __init__(
        self, settings: Settings, wake: Any, on_child_death: Any = None, env: dict[str, str] | None = None
    ) -> None:
        self.settings = settings
        self.env = dict(env or {})  # extra environment for the child (set before it imports anything)
        self.wake = wake
        self.on_child_death = on_child_death
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: SpawnProcess | None = None
        self._stopping = threading.Event()
        self._watch: threading.Thread | None = None
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _spawn(self) -> None:
        level = logging.getLogger().getEffectiveLevel()
        proc = self._ctx.Process(
            target=child_main,
            args=(self.settings, self.wake, os.getpid(), level),
            name="underpaint-worker",
            daemon=False,
        )
        with _environ(self.env):
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


_environ_lock = threading.Lock()


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    """``extra`` in os.environ while a child is spawned (it inherits the environment), then as before."""
    with _environ_lock:
        saved = {k: os.environ.get(k) for k in extra}
        os.environ.update(extra)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def wake_event() -> Any:
    """An Event both processes share (created before the child is spawned)."""
    return multiprocessing.get_context("spawn").Event()
