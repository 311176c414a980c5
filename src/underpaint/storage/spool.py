"""The upload spool: a task's encoded images wait on local disk, not in memory, until they are uploaded.

The runner writes each encoded image to a file of its process's spool folder, uploads from that file (retrying
through a storage outage, ``storage.retry``) and deletes the file once the upload succeeded, or when the task
fails. So a worker waiting out an S3 outage holds its images on disk and its memory does not grow with them.

Each process owns one folder ``<spool_dir>/w-<random>/``, holding an exclusive ``flock`` on ``.lock`` inside for
as long as it lives (the kernel drops it when the process dies, SIGKILL included), so several workers may share
a data dir. A starting runner looks at the other folders: one whose lock it can take belongs to a dead process.
Its files are images whose upload had not finished (or had just finished when the process died, before the file
was deleted): their task's completion was never recorded by that attempt, so each object that may have reached
the storage is deleted there (a missing key is fine), and then the file. The task itself runs again once its
lease expires, making images of its own under new keys. A leftover whose object cannot be deleted now (the
storage is down) stays for the next pass, so nothing is orphaned and the pass is bounded by what the dead
process had in hand (one batch per runner).

A spool file is one JSON header line (task id, object key, backend, custom bucket and region) followed by the
image bytes; it is written under a temporary name and renamed, so a file that exists is complete.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

log = logging.getLogger("underpaint.storage")

_LOCK = ".lock"
_OWNED = "w-"
_SUFFIX = ".img"


@dataclass(frozen=True)
class Spooled:
    """One image in the spool: where its bytes are and where they go."""

    path: Path
    task_id: str
    key: str
    backend: str  # the storage's name ("local", "s3") or "custom" (the user's bucket)
    bucket: str = ""  # custom only
    region: str = ""  # custom only


class Spool:
    """This process's spool folder under ``root`` (created, and locked, at construction). ``on_removed(n)`` is
    told how many leftovers of dead processes each ``recover`` deleted (a metric)."""

    def __init__(self, root: Path, on_removed: Callable[[int], None] | None = None) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.on_removed = on_removed
        # Locked before it gets the name other processes look at, so a live folder is never taken for a dead one.
        fresh = Path(tempfile.mkdtemp(prefix=".new-", dir=root))
        self._lock: IO[bytes] = (fresh / _LOCK).open("wb")  # held for the spool's life: the process's, in a worker
        fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self.dir = root / f"{_OWNED}{fresh.name.removeprefix('.new-')}"
        fresh.rename(self.dir)

    def write(self, task_id: str, key: str, data: bytes, backend: str, bucket: str = "", region: str = "") -> Spooled:
        """Put ``data`` on disk (complete or not at all); raises ``OSError`` (disk full, unwritable)."""
        path = self.dir / f"{uuid.uuid4().hex}{_SUFFIX}"
        header = {"task_id": task_id, "key": key, "backend": backend, "bucket": bucket, "region": region}
        part = path.with_suffix(".part")
        try:
            with part.open("wb") as f:
                f.write(json.dumps(header).encode() + b"\n")
                f.write(data)
            part.rename(path)
        except OSError:
            part.unlink(missing_ok=True)
            raise
        return Spooled(path, task_id, key, backend, bucket, region)

    @staticmethod
    def read(item: Spooled) -> bytes:
        with item.path.open("rb") as f:
            f.readline()
            return f.read()

    @staticmethod
    def remove(item: Spooled) -> None:
        with contextlib.suppress(OSError):
            item.path.unlink(missing_ok=True)

    def pending(self) -> list[Path]:
        """This process's spool files (images not uploaded yet)."""
        return sorted(self.dir.glob(f"*{_SUFFIX}"))

    def recover(self, delete: Callable[[Spooled], None]) -> int:
        """Clear the folders of dead processes: ``delete`` each leftover's object from its storage (it must not
        fail for a missing key), then the file and the folder. Returns how many leftovers are still there (their
        ``delete`` failed; tried again by the next call). Never raises."""
        left, removed = 0, 0
        for folder in sorted(self.root.glob(f"{_OWNED}*")):
            if folder == self.dir or not folder.is_dir():
                continue
            try:
                kept, gone = self._recover_folder(folder, delete, give_up=left > 0)
            except OSError as exc:
                log.warning("spool: could not clear %s (%s)", folder, exc)
                kept, gone = 1, 0
            left, removed = left + kept, removed + gone
        if removed and self.on_removed is not None:
            self.on_removed(removed)
        return left

    def _recover_folder(self, folder: Path, delete: Callable[[Spooled], None], give_up: bool) -> tuple[int, int]:
        """How many leftovers stay, and how many were deleted. ``give_up``: a delete failed already in this pass
        (the storage is down): keep the rest for later rather than wait for each to fail."""
        with (folder / _LOCK).open("ab") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return 0, 0  # its process lives
            left, removed, tasks = 0, 0, set[str]()
            for path in sorted(folder.glob(f"*{_SUFFIX}")):
                item = _parse(path)
                if item is not None:
                    if give_up:
                        left += 1
                        continue
                    try:
                        delete(item)
                    except Exception as exc:
                        log.warning(
                            "spool: leftover image %s of task %s (%s) could not be deleted from the storage (%s); "
                            "trying again after the next successful upload", item.key, item.task_id, item.backend,
                            exc, extra={"task_id": item.task_id},
                        )  # fmt: skip
                        left, give_up = left + 1, True
                        continue
                    tasks.add(item.task_id)
                    removed += 1
                path.unlink()
            if tasks:
                log.warning(
                    "spool: a stopped worker left images of task(s) %s not uploaded; removed (the tasks run again "
                    "when their lease expires)", ", ".join(sorted(tasks)),
                )  # fmt: skip
            if left == 0:
                shutil.rmtree(folder)  # partial writes (.part) and the lock file with it
            return left, removed


def _parse(path: Path) -> Spooled | None:
    """The leftover's header; None for a file that cannot be read as one (it was never uploaded)."""
    try:
        with path.open("rb") as f:
            header = json.loads(f.readline())
        return Spooled(
            path, str(header["task_id"]), str(header["key"]), str(header["backend"]),
            str(header.get("bucket", "")), str(header.get("region", "")),
        )  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError):
        return None
