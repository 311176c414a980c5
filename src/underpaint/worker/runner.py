"""The bridge from a claimed task to stored images: typed request -> job -> executor -> encode -> NSFW -> storage.

Encoded images wait in the upload spool on disk (``storage.spool``) until their upload, retried through a storage
outage (``storage.retry``), succeeded. An outage that outlasts the retry budget closes the runner's
``claim_gate`` (``storage.retry.StorageGate``): its worker claims nothing until the storage answers again.

Workers (the embedded thread and Celery workers alike) call ``GenerationRunner.run``, or ``run_batch`` for tasks
that share a sampler call; it knows nothing about how the tasks were delivered.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from PIL import Image

from underpaint.config import Settings
from underpaint.engine.job import Executor, GeneratedImage, GenerationJob
from underpaint.engine.metadata import CONTENT_TYPES, encode_image
from underpaint.engine.model_tiers import ModelCacheReport
from underpaint.storage.base import ImageStorage, reachability
from underpaint.storage.custom import CustomBuckets
from underpaint.storage.custom_target import CustomS3Target, custom_target, object_key
from underpaint.storage.retry import StorageGate, UploadRetry
from underpaint.storage.s3 import S3Clients
from underpaint.storage.spool import Spool, Spooled
from underpaint.tasks.contract import TaskRequest, UpscaleRequest
from underpaint.tasks.types import ImageRecord, NsfwResult, TaskRecord
from underpaint.worker.jobs import job_from_request, upscale_job_from_request
from underpaint.worker.loop import ProgressReporter

log = logging.getLogger(__name__)


class NsfwCheck(Protocol):
    def detect(self, images: list[Image.Image], level: int) -> list[NsfwResult]: ...


@dataclass(frozen=True)
class _Pending:
    """An encoded image on its way to storage: its key, the user's bucket (or None: ours), its bytes (spooled,
    or in memory)."""

    key: str
    target: CustomS3Target | None
    spooled: Spooled | None = None
    data: bytes = b""


class CountingExecutor(Executor, Protocol):
    @property
    def checkpoint_loads(self) -> int: ...

    def prefetch(self, checkpoints: Sequence[str]) -> None: ...

    def cache_report(self) -> ModelCacheReport: ...


class GenerationRunner:
    def __init__(
        self,
        settings: Settings,
        storage: ImageStorage,
        executor: CountingExecutor,
        nsfw: NsfwCheck | None = None,
        *,
        upload_retry: UploadRetry | None = None,
        spool: Spool | None = None,
        custom_buckets: CustomBuckets | None = None,
        claim_gate: StorageGate | None = None,
    ) -> None:
        """``custom_buckets``: users' own buckets through the process's shared S3 clients (``wiring`` passes them;
        without, this runner's own). ``claim_gate``: whether the worker may claim work, given ``upload_retry``
        (without, one that probes ``storage`` as ``/health`` does)."""
        self.settings = settings
        self.storage = storage
        self.executor = executor
        self.nsfw = nsfw
        # A storage outage delays uploads (backoff, within storage_retry_seconds) instead of failing tasks; the
        # encoded images wait in the spool on disk meanwhile (in memory without one).
        self.upload_retry = upload_retry or UploadRetry(settings.storage_retry_seconds)
        # Users' buckets have a budget of their own, and never pause claiming: their outage is theirs, and fails
        # their tasks (at once, after the first has spent the budget), not everyone's.
        self.custom_retry = self.upload_retry.sibling()
        self.claim_gate = claim_gate or StorageGate(self.upload_retry, lambda: reachability(storage))
        self.spool = spool
        self._leftovers = False
        self.custom_buckets = custom_buckets or CustomBuckets(S3Clients(), settings)
        # NSFW detection runs on the CPU (onnxruntime) beside encoding and upload, never on the GPU.
        self._side = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nsfw")

    @property
    def checkpoint_loads(self) -> int:
        return self.executor.checkpoint_loads

    def prefetch(self, checkpoints: Sequence[str]) -> None:
        self.executor.prefetch(checkpoints)

    def cache_report(self) -> ModelCacheReport:
        return self.executor.cache_report()

    def run(self, task: TaskRecord, request: TaskRequest, report: ProgressReporter) -> list[ImageRecord]:
        # The reporter also knows when this worker lost its lease (another worker took the task over).
        if isinstance(request, UpscaleRequest):  # no diffusion: the upscaler alone
            job = upscale_job_from_request(request)
            images = [self.executor.upscale(job, on_progress=report, should_cancel=report.should_cancel)]
        else:
            images = self.executor.generate(
                job_from_request(request), on_progress=report, should_cancel=report.should_cancel
            )
        verdicts = self._detect(task, images)
        records = self._store(task, images, verdicts, report.should_cancel)
        return records

    def run_batch(
        self, items: Sequence[tuple[TaskRecord, TaskRequest, ProgressReporter]]
    ) -> list[list[ImageRecord] | BaseException]:
        """Compatible tasks in one ``Executor.generate_batch`` call; each task's outcome on its own (its images, or
        the exception that ended it: an unusable request, a failed generation, a failed upload)."""
        outcomes: list[list[ImageRecord] | BaseException | None] = [None] * len(items)
        jobs: list[GenerationJob] = []
        ready: list[int] = []
        for i, (task, request, reporter) in enumerate(items):
            try:
                if isinstance(request, UpscaleRequest):  # never batched (no batch key); alone if it comes in one
                    outcomes[i] = self.run(task, request, reporter)
                    continue
                jobs.append(job_from_request(request))
                ready.append(i)
            except Exception as exc:
                outcomes[i] = exc
        reporters = [items[i][2] for i in ready]
        results = (
            self.executor.generate_batch(
                jobs, on_progress=reporters, should_cancel=[r.should_cancel for r in reporters]
            )
            if jobs
            else []
        )
        for i, result in zip(ready, results, strict=True):
            if isinstance(result, BaseException):
                outcomes[i] = result
                continue
            task, _, reporter = items[i]
            try:
                outcomes[i] = self._store(task, result, self._detect(task, result), reporter.should_cancel)
            except Exception as exc:
                outcomes[i] = exc
        return [o if o is not None else RuntimeError("task was not run") for o in outcomes]

    def _detect(self, task: TaskRecord, images: list[GeneratedImage]) -> Future[list[NsfwResult]] | None:
        if not task.enable_nsfw_detection or self.nsfw is None:
            return None
        return self._side.submit(self.nsfw.detect, [g.image for g in images], task.extra.nsfw_detection_level)

    def _store(
        self,
        task: TaskRecord,
        images: list[GeneratedImage],
        verdicts: Future[list[NsfwResult]] | None,
        should_stop: Callable[[], bool],
    ) -> list[ImageRecord]:
        """Encode ``task``'s images into the spool, then upload each from there (retried through a storage
        outage); a spool file goes as soon as its upload succeeded, or when the task fails."""
        fmt = task.response_image_type
        pending: list[_Pending] = []
        records: list[tuple[str, str, dict[str, str]]] = []
        try:
            for g in images:
                pending.append(self._spool(task, encode_image(g.image, fmt, g.infotext), fmt))
            for item in pending:
                records.append(self._upload(task, item, CONTENT_TYPES[fmt], should_stop))
                self._unspool(item)
        except Exception:
            # The task fails: leave none of its images behind, in our storage or in the user's bucket.
            self.discard(
                [ImageRecord(key=k, image_type=fmt, nsfw=None, backend=b, location=loc) for k, b, loc in records]
            )
            raise
        finally:
            for item in pending:
                self._unspool(item)
        if self._leftovers:  # the storage answers again: clear what a dead worker left in the spool
            self.recover_spool()
        results: list[NsfwResult | None] = [None] * len(records)
        if verdicts is not None:
            try:
                results = list(verdicts.result())
            except Exception:  # the detector failing must not lose the images
                log.exception("NSFW detection failed for task %s", task.task_id, extra={"task_id": task.task_id})
                results = [NsfwResult(valid=False, confidence=0.0)] * len(records)
        return [
            ImageRecord(key=key, image_type=fmt, nsfw=verdict, backend=backend, location=location)
            for (key, backend, location), verdict in zip(records, results, strict=True)
        ]

    def _spool(self, task: TaskRecord, data: bytes, fmt: str) -> _Pending:
        """Where one encoded image goes, with its bytes in the spool (in memory without a spool, or when the
        spool cannot be written: the upload is what matters)."""
        filename = f"{uuid.uuid4().hex}.{fmt}"
        custom, target = task.extra.custom_s3, None
        if custom:
            target = custom_target(custom, self.settings)
            key = object_key(target, task.task_id, filename, custom.save_to_path_directly)
            backend, bucket, region = "custom", target.bucket, target.region
        else:
            key, backend, bucket, region = f"{task.task_id}/{filename}", self.storage.name, "", ""
        if self.spool is not None:
            try:
                return _Pending(key, target, spooled=self.spool.write(task.task_id, key, data, backend, bucket, region))
            except OSError as exc:
                log.warning(
                    "task %s: image %s not spooled to disk (%s); it waits for its upload in memory",
                    task.task_id, key, exc, extra={"task_id": task.task_id},
                )  # fmt: skip
        return _Pending(key, target, data=data)

    def _upload(
        self, task: TaskRecord, item: _Pending, content_type: str, should_stop: Callable[[], bool]
    ) -> tuple[str, str, dict[str, str]]:
        """Upload one pending image (retried within ``storage_retry_seconds``); (key, backend, location)."""

        def data() -> bytes:
            return item.data if item.spooled is None else Spool.read(item.spooled)

        if item.target is not None:
            target = item.target
            location = self.custom_retry.run(
                lambda: self.custom_buckets.put(target, item.key, data(), content_type),
                task.task_id,
                f"upload of {item.key} to bucket {target.bucket}",
                should_stop,
            )
            return item.key, "custom", location
        self.upload_retry.run(
            lambda: self.storage.put(item.key, data(), content_type), task.task_id, f"upload of {item.key}", should_stop
        )
        return item.key, self.storage.name, {}

    @staticmethod
    def _unspool(item: _Pending) -> None:
        if item.spooled is not None:
            Spool.remove(item.spooled)

    def recover_spool(self) -> int:
        """Clear the spool folders of dead worker processes (``storage.spool``): delete each leftover's object
        from its storage, then the file. Returns how many are left (the storage is down: tried again after the
        next successful upload)."""
        if self.spool is None:
            return 0
        left = self.spool.recover(self._delete_leftover)
        self._leftovers = left > 0
        return left

    def _delete_leftover(self, item: Spooled) -> None:
        if item.backend == "custom":
            location = {"bucket": item.bucket, "region": item.region}
            self.custom_buckets.delete(ImageRecord(key=item.key, image_type="", backend="custom", location=location))
        elif item.backend == self.storage.name:
            self.storage.delete(item.key)
        else:  # the storage backend changed since: the orphan sweep of that storage is all that can find it
            log.warning("spool: leftover image %s was meant for %s storage, not deleted there", item.key, item.backend)

    def discard(self, records: list[ImageRecord]) -> None:
        """Remove images of a run whose results are dropped: it lost its lease (another worker finished the task)
        or a later upload of the same task failed. Best effort: a failure is logged, never raised."""
        for r in records:
            try:
                if r.backend == self.storage.name:
                    self.storage.delete(r.key)
                elif r.backend == "custom":
                    self.custom_buckets.delete(r)
            except Exception:
                log.warning("could not delete orphan image %s (%s)", r.key, r.backend)
