"""Running tasks: claim from the store, run, record the outcome. Only the lease holder may record it.

``process_task`` runs one named task in the calling thread (a Celery task calls it with the delivered id);
``Worker`` is the embedded loop that claims the next task by priority/age (one GPU). Both take, with a task,
queued tasks that can share its sampler call (``Claimer``, ``tasks.batching``), and prefer tasks for the model
the runner has loaded, never making the oldest task wait more than ``max_affinity_wait_s``.

A runner whose storage outage outlasted ``storage_retry_seconds`` (``storage.retry.StorageGate``, the runner's
``claim_gate``) claims nothing until the storage answers again: its ``Claimer`` returns no task, so the queue
waits, QUEUED, instead of being generated and failed at upload.

Double delivery is harmless: claiming is atomic and ``complete``/``fail`` only succeed for the current lease
holder, so a worker that lost its lease discards its results and never fires ``on_terminal`` (webhooks).

Cancellation by the owner is a flag on the task row: a watcher thread beside the run reads it every
``cancel_poll`` seconds for each task of the batch, and ``ProgressReporter.should_cancel`` (checked by the sampler
before every model call) only reads an in-memory event, so a cancelled task drops out of its batch at the next
sampler step without a query per step and without disturbing its mates. The lease holder then ends it FAILED
with ``CANCELLED_REASON`` and fires ``on_terminal`` once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from underpaint.config import Settings
from underpaint.engine.job import JobCancelled, JobError, Progress
from underpaint.storage.base import ImageStorage, StorageError
from underpaint.tasks.contract import TaskRequest
from underpaint.tasks.lifecycle import TerminalHook, delete_images, notify_terminal, sweep_expired
from underpaint.tasks.queue import LocalQueue
from underpaint.tasks.types import CANCELLED_REASON, ImageRecord, TaskRecord, TaskStatus, TaskStore

log = logging.getLogger("underpaint.tasks")

_MAX_REASON = 1000

# How a task ended, as its finished line says: a cancelled task is stored FAILED but logged CANCELED.
Finished = Literal["SUCCEED", "FAILED", "CANCELED"]


class ProgressReporter:
    """Passed to the runner as the executor's progress callback: ``report(Progress)`` writes progress to the store.

    Writes are throttled to one per ``min_interval`` seconds, except 100 % which is always written. When the
    store says this worker no longer holds the task, or its owner cancelled it, the call raises ``JobCancelled``;
    ``should_cancel`` is the same signal for ``Executor.generate(should_cancel=...)`` (in-memory: the store is
    read by the watcher thread of ``run_claimed``, not per call).
    """

    def __init__(
        self,
        store: TaskStore,
        task_id: str,
        worker_id: str,
        *,
        min_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.task_id = task_id
        self.worker_id = worker_id
        self.min_interval = min_interval
        self.clock = clock
        self._last_write: float | None = None
        self._lost = threading.Event()
        self._cancelled = threading.Event()

    def mark_lost(self) -> None:
        self._lost.set()

    def mark_cancelled(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        """The owner cancelled the task (as far as the watcher has seen)."""
        return self._cancelled.is_set()

    def should_cancel(self) -> bool:
        return self._lost.is_set() or self._cancelled.is_set()

    def __call__(self, progress: Progress) -> None:
        if self._cancelled.is_set():
            raise JobCancelled(f"task {self.task_id}: {CANCELLED_REASON}")
        progress_percent = min(100, max(0, int(progress.fraction * 100)))
        eta_seconds = max(0, round(progress.eta_seconds))
        if self._lost.is_set():
            raise JobCancelled(f"task {self.task_id}: this worker lost its lease")
        now = self.clock()
        due = self._last_write is None or now - self._last_write >= self.min_interval
        if not (due or progress_percent >= 100):
            return
        self._last_write = now
        try:
            held = self.store.update_progress(self.task_id, self.worker_id, int(progress_percent), int(eta_seconds))
        except Exception as exc:
            # The database blinked: progress is only informative, and the lease outlives a short outage.
            log.warning(
                "task %s: progress not recorded (%r); generation goes on", self.task_id, exc,
                extra={"task_id": self.task_id},
            )  # fmt: skip
            return
        if not held:
            self._lost.set()
            raise JobCancelled(f"task {self.task_id}: this worker lost its lease")


class TaskRunner(Protocol):
    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        """Generate and store the images of ``task``. Image keys must be unique per attempt (``task.attempts``)
        so that a run that lost its lease can delete its own images without touching the winner's."""
        ...


@runtime_checkable
class BatchTaskRunner(TaskRunner, Protocol):
    def run_batch(
        self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]
    ) -> list[list[ImageRecord] | BaseException]:
        """Run compatible tasks together; one outcome per task, in order: its images, or why it has none
        (``JobCancelled`` when it was abandoned). A task's failure never fails the others."""
        ...


@runtime_checkable
class Prefetcher(Protocol):
    def prefetch(self, checkpoints: Sequence[str]) -> None:
        """The checkpoints (``model_name``) queued tasks will need next, soonest first: read them ahead."""
        ...


@runtime_checkable
class QueuePeek(Protocol):
    def queued_model_keys(self, lanes: tuple[str, ...] | None = None, limit: int = 8) -> list[tuple[str, str | None]]:
        """(task id, model key) of the first queued tasks in claim order."""
        ...


@runtime_checkable
class ClaimGate(Protocol):
    @property
    def paused(self) -> bool:
        """Claiming is paused (as of the last ``open()``)."""
        ...

    def open(self) -> bool:
        """Whether the runner may claim work now (False while its storage is out, past the retry budget)."""
        ...


@runtime_checkable
class GatedRunner(Protocol):
    @property
    def claim_gate(self) -> ClaimGate | None:
        """What says whether this runner may claim work now; None: always."""
        ...


def claim_gate_of(runner: TaskRunner) -> ClaimGate | None:
    return runner.claim_gate if isinstance(runner, GatedRunner) else None


def prefetch_next(
    store: TaskStore, runner: TaskRunner, lanes: tuple[str, ...] | None, running: Sequence[TaskRecord], peek: int = 8
) -> str | None:
    """Tell ``runner`` which checkpoint the head of the queue needs after ``running`` (the first queued task of
    another model), so it reads it while ``running`` samples; the checkpoint named, or None."""
    if not isinstance(runner, Prefetcher) or not isinstance(store, QueuePeek):
        return None
    now = {t.model_key for t in running}
    try:
        for task_id, key in store.queued_model_keys(lanes, peek):
            if key is None or key in now:
                continue
            name = store.get_request(task_id).model_name
            if name:
                runner.prefetch([name])
                return name
    except Exception:  # a hint only: the task itself reads its checkpoint
        log.warning("could not look at the head of the queue for prefetching", exc_info=True)
    return None


class _LeaseKeeper:
    """Beside a run: renews the leases every ``interval`` seconds while the runner is busy without reporting
    progress (a long model load, say), and every ``cancel_poll`` seconds reads whether an owner cancelled."""

    def __init__(
        self, store: TaskStore, reporters: Sequence[ProgressReporter], interval: float, cancel_poll: float = 0.5
    ) -> None:
        self.store = store
        self.reporters = list(reporters)
        self.interval = interval
        self.cancel_poll = min(cancel_poll, interval)
        self._done = threading.Event()
        name = f"lease-{self.reporters[0].task_id}" if self.reporters else "lease"
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def __enter__(self) -> _LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _loop(self) -> None:
        next_renewal = time.monotonic() + self.interval
        while True:
            renew = time.monotonic() >= next_renewal
            if renew:
                next_renewal = time.monotonic() + self.interval
            for r in self.reporters:
                if r.should_cancel():
                    continue  # stopped already (cancelled or lost): nothing more to keep
                try:
                    if self.store.cancel_requested(r.task_id):
                        log.info(
                            "task %s: cancel requested by the client; stopping at the next step",
                            r.task_id,
                            extra={"task_id": r.task_id},
                        )
                        r.mark_cancelled()
                    elif renew and not self.store.renew_lease(r.task_id, r.worker_id):
                        r.mark_lost()
                except Exception:
                    # A database hiccup: keep trying; the lease is long enough to survive a few misses.
                    log.exception(
                        "lease renewal or cancel check failed for task %s", r.task_id, extra={"task_id": r.task_id}
                    )
            if self._done.wait(self.cancel_poll):
                return


def default_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _short(text: str) -> str:
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 3] + "..."


# The error taxonomy: the failures a client can act on are these types (a missing or unusable model, a bad
# prompt, an out-of-memory size, a storage target it configured); their message becomes the task's reason.
# Anything else (a plain ValueError included) is the server's fault: its traceback is logged under the task id
# and the client gets a generic reason that leaks nothing of the internals.
CLIENT_ERRORS: tuple[type[Exception], ...] = (JobError, StorageError)
INTERNAL_REASON = (
    "internal error: the server failed while running this task. Nothing was wrong with the request as far as the "
    "server can tell; retry it, and report the task id to the operator if it keeps failing"
)


def _failure_reason(exc: Exception) -> str:
    if isinstance(exc, CLIENT_ERRORS):
        return _short(str(exc) or type(exc).__name__)
    return INTERNAL_REASON


def run_claimed(
    store: TaskStore,
    task: TaskRecord,
    worker_id: str,
    runner: TaskRunner,
    *,
    on_terminal: TerminalHook | None = None,
    storage: ImageStorage | None = None,
    cancel_poll: float = 0.5,
) -> None:
    """Run a task this worker has just claimed and record its outcome (if it still holds the lease).

    ``cancel_poll``: seconds between two reads of the task's cancel flag while it runs."""
    run_claimed_batch(
        store, [task], worker_id, runner, on_terminal=on_terminal, storage=storage, cancel_poll=cancel_poll
    )


def run_claimed_batch(
    store: TaskStore,
    tasks: Sequence[TaskRecord],
    worker_id: str,
    runner: TaskRunner,
    *,
    on_terminal: TerminalHook | None = None,
    storage: ImageStorage | None = None,
    cancel_poll: float = 0.5,
) -> None:
    """Run tasks this worker has just claimed, together when the runner batches, and record each outcome on its
    own (if this worker still holds that task's lease)."""
    items: list[tuple[TaskRecord, TaskRequest, ProgressReporter]] = []
    for task in tasks:
        try:
            request = store.get_request(task.task_id)
        except KeyError:
            reason = "the task's input is no longer available; submit the task again"
        except ValueError:
            # The input was validated at submit and stored by this server: one that no longer loads is the
            # server's fault (a bad migration, a contract change), never the client's; its message stays here.
            log.exception("task %s: its stored input does not load", task.task_id, extra={"task_id": task.task_id})
            reason = INTERNAL_REASON
        else:
            items.append((task, request, ProgressReporter(store, task.task_id, worker_id)))
            continue
        if store.fail(task.task_id, worker_id, reason):
            log_finished(task, "FAILED", 0, reason)
            notify_terminal(store, [task.task_id], on_terminal)
    if not items:
        return
    for task, _, _ in items:
        log.info(
            "task %s: attempt %d on %s (batch of %d)",
            task.task_id,
            task.attempts,
            worker_id,
            len(items),
            extra={"task_id": task.task_id},
        )
    with _LeaseKeeper(store, [r for _, _, r in items], interval=store.lease_seconds / 3, cancel_poll=cancel_poll):
        outcomes = _run(runner, items)
    for (task, _, reporter), outcome in zip(items, outcomes, strict=True):
        _record(store, task, worker_id, reporter, outcome, on_terminal=on_terminal, storage=storage)


def _run(
    runner: TaskRunner, items: list[tuple[TaskRecord, TaskRequest, ProgressReporter]]
) -> list[list[ImageRecord] | BaseException]:
    if len(items) > 1 and isinstance(runner, BatchTaskRunner):
        try:
            return runner.run_batch(items)
        except Exception as exc:
            log.exception("a batch of %d tasks failed as a whole", len(items))
            return [exc] * len(items)
    outcomes: list[list[ImageRecord] | BaseException] = []
    for task, request, reporter in items:
        try:
            outcomes.append(runner.run(task, request, reporter))
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def _record(
    store: TaskStore,
    task: TaskRecord,
    worker_id: str,
    reporter: ProgressReporter,
    outcome: list[ImageRecord] | BaseException,
    *,
    on_terminal: TerminalHook | None,
    storage: ImageStorage | None,
) -> None:
    # Named explicitly: in a batch, the code around may run under another task's log context.
    about = {"task_id": task.task_id}
    if isinstance(outcome, JobCancelled):
        if reporter.cancelled or store.cancel_requested(task.task_id):
            _end_cancelled(store, task, worker_id, on_terminal)
        else:
            log.warning("task %s: run abandoned (lease lost); its result is not recorded", task.task_id, extra=about)
        return
    if isinstance(outcome, BaseException):
        # A client error's reason is in the finished line below; anything else also gets its traceback here.
        if not isinstance(outcome, CLIENT_ERRORS):
            log.error("task %s failed with an unexpected error", task.task_id, exc_info=outcome, extra=about)
        reason = _failure_reason(outcome) if isinstance(outcome, Exception) else INTERNAL_REASON
        if store.fail(task.task_id, worker_id, reason):
            log_finished(task, "FAILED", 0, reason)
            notify_terminal(store, [task.task_id], on_terminal)
        return
    recorded = _complete_through_outage(store, task, worker_id, outcome)
    if recorded:
        log_finished(task, "SUCCEED", len(outcome))
        notify_terminal(store, [task.task_id], on_terminal)
        return
    # Not recorded: the images go (a store outage that outlasted the lease was logged already; the lease gives
    # the task another attempt).
    if recorded is False:
        if store.cancel_requested(task.task_id) and _end_cancelled(store, task, worker_id, on_terminal):
            log.info(
                "task %s: cancelled after its last step; discarding %d image(s)",
                task.task_id,
                len(outcome),
                extra=about,
            )
        else:
            log.warning(
                "task %s: lease lost before completion; discarding %d image(s)", task.task_id, len(outcome), extra=about
            )
    if storage is not None:
        delete_images(storage, outcome)


def log_finished(task: TaskRecord, outcome: Finished, images: int, reason: str | None = None) -> None:
    """The operator's one INFO line per finished task: id, task type, outcome, images, run and queue seconds, and
    for a failed task the reason its owner reads. ``outcome``: a ``TaskStatus`` name, or CANCELED for a task its
    owner cancelled (stored as FAILED)."""
    now = time.time()
    started = task.started_at if task.started_at is not None else now
    run_s, queued_s = max(0.0, now - started), max(0.0, started - task.created_at)
    log.info(
        "task %s finished: %s %s, %d image(s), %.2f s run, %.2f s queued%s",
        task.task_id,
        task.task_type.value,
        outcome,
        images,
        run_s,
        queued_s,
        f": {reason}" if reason else "",
        extra={
            "task_id": task.task_id,
            "task_type": task.task_type.value,
            "outcome": outcome,
            "images": images,
            "run_seconds": round(run_s, 3),
            "queue_seconds": round(queued_s, 3),
        },
    )


def _complete_through_outage(
    store: TaskStore,
    task: TaskRecord,
    worker_id: str,
    images: list[ImageRecord],
    sleep: Callable[[float], None] = time.sleep,
) -> bool | None:
    """``store.complete``, retried with backoff while the store is unreachable (a database restart), for at most
    60 % of the lease: the lease keeper renewed the lease at most a third of it ago, so this worker still holds
    it meanwhile and its images are recorded once the database is back. True when recorded, False when this
    worker no longer holds the task, None when the store stayed unreachable.

    A completion the database committed but whose answer was lost finds the task SUCCEED with these very images
    on the next try: that counts as recorded (the images are the task's, never deleted). After the whole budget
    the caller deletes the images: the lease runs out and the next attempt makes new ones, so none is orphaned."""
    about = {"task_id": task.task_id}
    deadline = time.monotonic() + 0.6 * store.lease_seconds
    delay, failed = 0.25, False
    while True:
        try:
            if store.complete(task.task_id, worker_id, images):
                return True
            if not failed:
                return False
            current = store.get(task.task_id)
            keys = sorted(i.key for i in images)
            return (
                current is not None
                and current.status is TaskStatus.SUCCEED
                and sorted(i.key for i in current.images) == keys
            )
        except Exception as exc:
            failed = True
            left = deadline - time.monotonic()
            if left <= 0:
                log.error(
                    "task %s: completion could not be recorded (task store unreachable: %r); discarding its %d "
                    "image(s), the lease will give the task another attempt", task.task_id, exc, len(images),
                    extra=about,
                )  # fmt: skip
                return None
            log.warning(
                "task %s: completion not recorded (task store unreachable: %r); retrying in %.1f s",
                task.task_id, exc, min(delay, left), extra=about,
            )  # fmt: skip
            sleep(min(delay, left))
            delay = min(5.0, delay * 2)


def _end_cancelled(store: TaskStore, task: TaskRecord, worker_id: str, on_terminal: TerminalHook | None) -> bool:
    """End a task its owner cancelled (only the lease holder can); ``on_terminal`` fires once, here."""
    task_id, about = task.task_id, {"task_id": task.task_id}
    if not store.fail(task_id, worker_id, CANCELLED_REASON):
        log.warning("task %s: cancelled, but this worker no longer holds it", task_id, extra=about)
        return False
    log.info("task %s: %s", task_id, CANCELLED_REASON, extra=about)
    log_finished(task, "CANCELED", 0)
    notify_terminal(store, [task_id], on_terminal)
    return True


@dataclass(frozen=True)
class BatchPolicy:
    """How a worker claims work: batches of up to ``max_batch`` compatible tasks, gathered for up to ``window_s``
    after the first, and model affinity bounded by ``max_affinity_wait_s`` (0: plain priority/age order)."""

    max_batch: int = 1
    window_s: float = 0.0
    max_affinity_wait_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings, device_type: str | None = None) -> BatchPolicy:
        window_ms = settings.batch_window_ms
        if window_ms is None:
            window_ms = 20 if device_type == "cuda" else 0
        return cls(
            max_batch=max(1, settings.max_batch),
            window_s=max(0.0, window_ms / 1000),
            max_affinity_wait_s=max(0.0, settings.max_affinity_wait_s),
        )


class Claimer:
    """Claims work for one runner (one model cache): the next task, preferring the model the runner has loaded,
    plus its batch mates. ``loaded_model`` is the model key of what the runner ran last. While ``gate`` (the
    runner's ``claim_gate``) is closed, it claims nothing."""

    def __init__(
        self,
        store: TaskStore,
        worker_id: str,
        policy: BatchPolicy,
        lanes: tuple[str, ...] | None = None,
        *,
        gate: ClaimGate | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.policy = policy
        self.lanes = lanes
        self.gate = gate
        self.loaded_model: str | None = None
        self._sleep = sleep
        self._clock = clock

    def next(self, queued_before: float | None = None) -> list[TaskRecord]:
        """The next task by priority, age and model affinity (only among tasks created before ``queued_before``,
        if given), with its mates; [] when nothing is queued or claiming is paused."""
        if not self.may_claim():
            return []
        prefer = self.loaded_model if self.policy.max_affinity_wait_s > 0 else None
        task = self.store.claim(
            None,
            self.worker_id,
            self.lanes,
            prefer_model=prefer,
            max_wait_s=self.policy.max_affinity_wait_s,
            queued_before=queued_before,
        )
        return [] if task is None else [task, *self.mates(task)]

    def named(self, task_id: str) -> list[TaskRecord]:
        """``task_id`` (a broker delivery) with its mates; [] when it cannot be claimed here (or claiming is
        paused: it stays QUEUED)."""
        if not self.may_claim():
            return []
        task = self.store.claim(task_id, self.worker_id, self.lanes)
        return [] if task is None else [task, *self.mates(task)]

    def may_claim(self) -> bool:
        """False while the runner's storage is out past the retry budget (``gate``)."""
        return self.gate is None or self.gate.open()

    @property
    def paused(self) -> bool:
        """Claiming was found paused by the last ``next``/``named``."""
        return self.gate is not None and self.gate.paused

    def mates(self, task: TaskRecord) -> list[TaskRecord]:
        """Queued tasks that can share ``task``'s sampler call, claimed within the batch window."""
        want = self.policy.max_batch - 1
        if want < 1 or task.batch_key is None:
            return []
        deadline = self._clock() + self.policy.window_s
        mates: list[TaskRecord] = []
        while True:
            mates += self.store.claim_batch(task.batch_key, self.worker_id, want - len(mates), self.lanes)
            left = deadline - self._clock()
            if len(mates) >= want or left <= 0:
                return mates
            self._sleep(min(0.005, left))

    def ran(self, tasks: Sequence[TaskRecord]) -> None:
        if tasks and tasks[0].model_key is not None:
            self.loaded_model = tasks[0].model_key


def process_task(
    task_id: str,
    store: TaskStore,
    runner: TaskRunner,
    *,
    worker_id: str | None = None,
    on_terminal: TerminalHook | None = None,
    storage: ImageStorage | None = None,
    claimer: Claimer | None = None,
    cancel_poll: float = 0.5,
) -> TaskRecord | None:
    """Claim ``task_id`` and run it in this thread (the entry point for a Celery task).

    Returns the task as recorded afterwards, or None when this call did not run it (finished, running under a
    live lease elsewhere, unknown, or claimed by this worker as another task's batch mate): a redelivered
    message, or the message of a task that already ran in a batch, then simply does nothing. None too while the
    ``claimer``'s gate is closed (a storage outage): the task stays QUEUED for the store poller to claim later. Only a short-lived
    lease-renewal thread is used, joined before returning.

    With a ``claimer`` the task runs together with queued batch mates, and while it is still queued the worker
    first takes queued work for the model it has loaded (``Claimer.next``: bounded by ``max_affinity_wait_s``).
    """
    if claimer is None:
        wid = worker_id or default_worker_id()
        task = store.claim(task_id, wid)
        if task is None:
            return None
        run_claimed(store, task, wid, runner, on_terminal=on_terminal, storage=storage, cancel_poll=cancel_poll)
        return store.get(task_id)
    wid = claimer.worker_id
    ran_it = False
    if claimer.loaded_model is not None and claimer.policy.max_affinity_wait_s > 0:
        while True:
            current = store.get(task_id)
            if current is None or current.status != TaskStatus.QUEUED:
                break
            tasks = claimer.next()
            if not tasks:
                break
            claimer.ran(tasks)
            prefetch_next(store, runner, claimer.lanes, tasks)
            run_claimed_batch(
                store, tasks, wid, runner, on_terminal=on_terminal, storage=storage, cancel_poll=cancel_poll
            )
            ran_it = ran_it or any(t.task_id == task_id for t in tasks)
    if not ran_it:
        tasks = claimer.named(task_id)
        if not tasks:
            return None
        claimer.ran(tasks)
        prefetch_next(store, runner, claimer.lanes, tasks)
        run_claimed_batch(store, tasks, wid, runner, on_terminal=on_terminal, storage=storage, cancel_poll=cancel_poll)
    return store.get(task_id)


class Worker:
    """The embedded worker: one background thread claiming and running tasks one at a time.

    ``queue`` (a ``LocalQueue``) wakes it as soon as a task is enqueued; without one, or for tasks written by
    another process, it polls the store every ``poll_interval`` seconds. Every ``sweep_interval`` seconds it
    requeues tasks whose lease expired. While the runner's storage is out past the retry budget (its
    ``claim_gate``), it claims nothing and waits the same way (the gate probes the storage at its own pace).
    """

    def __init__(
        self,
        store: TaskStore,
        runner: TaskRunner,
        settings: Settings,
        worker_id: str | None = None,
        lanes: tuple[str, ...] | None = None,
        *,
        queue: LocalQueue | None = None,
        on_terminal: TerminalHook | None = None,
        storage: ImageStorage | None = None,
        poll_interval: float = 1.0,
        sweep_interval: float | None = None,
        policy: BatchPolicy | None = None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.worker_id = worker_id or default_worker_id()
        self.lanes = lanes
        self.queue = queue
        self.on_terminal = on_terminal
        self.storage = storage
        self.poll_interval = poll_interval
        self.sweep_interval = sweep_interval if sweep_interval is not None else max(1.0, settings.lease_seconds / 4)
        self.cancel_poll = settings.cancel_poll_seconds
        self.policy = policy or BatchPolicy.from_settings(settings)
        self.claimer = Claimer(store, self.worker_id, self.policy, lanes, gate=claim_gate_of(runner))
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def run_once(self) -> bool:
        """Claim the next task (priority, model affinity, age) with its batch mates and run them. False when
        nothing was queued, or claiming is paused (a storage outage)."""
        tasks = self.claimer.next()
        if not tasks:
            return False
        self.claimer.ran(tasks)
        prefetch_next(self.store, self.runner, self.lanes, tasks)
        run_claimed_batch(
            self.store,
            tasks,
            self.worker_id,
            self.runner,
            on_terminal=self.on_terminal,
            storage=self.storage,
            cancel_poll=self.cancel_poll,
        )
        return True

    def sweep(self) -> list[str]:
        return sweep_expired(self.store, self.on_terminal, self.queue)

    def start(self) -> None:
        if self.running:
            raise RuntimeError("worker already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="underpaint-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> bool:
        """Stop after the current task. Returns False if it was still running after ``timeout``: the process may
        then exit anyway, and ``recover_on_start`` requeues that task on the next start."""
        self._stopping.set()
        if self.queue is not None:
            self.queue.wake()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        stopped = not self._thread.is_alive()
        if stopped:
            self._thread = None
        return stopped

    def _loop(self) -> None:
        next_sweep = 0.0
        while not self._stopping.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + self.sweep_interval
                if self.run_once():
                    continue
            except Exception:
                log.exception("worker %s: store error; retrying in %.1f s", self.worker_id, self.poll_interval)
            self._wait()

    def _wait(self) -> None:
        if self.queue is not None:
            self.queue.wait(self.poll_interval)
        else:
            self._stopping.wait(self.poll_interval)
