"""Out of device memory is a task failure, not a broken worker.

``run_guarded`` wraps one generation (a single job, or a batch of jobs run together): a ``torch.cuda.OutOfMemoryError``
inside it becomes ``OutOfMemory`` (a ``JobError``, so the worker fails that task with the message as its reason),
after the exception's frames, which hold the step's tensors, are gone and ``release`` has dropped per-task state and
the allocator's cache. The worker then serves its next task normally.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import TypeVar

import torch

from underpaint.engine.job import JobError

log = logging.getLogger(__name__)

T = TypeVar("T")


class OutOfMemory(JobError):
    """The device ran out of memory for this task (the message says what to try)."""


def oom_message(width: int, height: int, image_num: int) -> str:
    return (
        f"out of GPU memory at {width}x{height}, image_num {image_num}; "
        "try fewer images or a smaller size (or retry when the server is less busy)"
    )


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_guarded(fn: Callable[[], T], message: str, release: Callable[[], None] | None = None) -> T:
    """``fn()``; an out-of-memory error inside it becomes ``OutOfMemory(message)``, raised after ``release()`` and
    after the allocator's cache is emptied."""
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        pass  # handled below, outside the except block: its traceback holds every frame's tensors until it ends
    log.warning("%s", message)
    if release is not None:
        release()
    free_device_memory()
    raise OutOfMemory(message)
