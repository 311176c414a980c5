"""Out of device memory is a task failure, not a broken worker.

The executor (``DiffusersExecutor.generate_batch``) turns a ``torch.cuda.OutOfMemoryError`` that ended a job (a
batch that hit one was already retried job by job) into ``OutOfMemory`` (a ``JobError``, so the worker fails that
task with the message as its reason), drops the per-task state and empties the allocator's cache
(``free_device_memory``). The worker then serves its next task normally.

Every recovery step runs after the ``except`` block that caught the error, and after ``release_frames``: a caught
exception's traceback keeps every frame it passed through alive, with their locals (the failed batch's latents
and activations, gigabytes on a GPU), so retrying or emptying the cache inside the ``except`` block, or while the
exception is still held, frees nothing.
"""

from __future__ import annotations

import gc
import traceback

import torch

from underpaint.engine.job import JobError


class OutOfMemory(JobError):
    """The device ran out of memory for this task (the message says what to try)."""


def oom_message(width: int, height: int, image_num: int) -> str:
    return (
        f"out of GPU memory at {width}x{height}, image_num {image_num}; "
        "try fewer images or a smaller size (or retry when the server is less busy)"
    )


def is_out_of_memory(exc: BaseException) -> bool:
    """``exc`` is ``torch.cuda.OutOfMemoryError``, or was raised from one: a loader that turns a file that does not
    load into a ``JobError`` naming it (``raise JobError(...) from exc``) may have caught an out-of-memory error,
    which is still the executor's to handle."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, torch.cuda.OutOfMemoryError):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release_frames(exc: BaseException) -> None:
    """Drop the local variables of every finished frame in ``exc``'s traceback, and in those of its cause and
    context, so the tensors they held can be freed; the traceback itself stays (it still logs and prints)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__
