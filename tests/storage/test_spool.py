"""``Spool``: encoded images on disk until uploaded; the folder of a dead process (SIGKILLed, its lock released by
the kernel) is cleared by the next one, a live process's never."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from underpaint.storage.spool import Spool, Spooled

SRC = Path(__file__).resolve().parents[2] / "src"

# A worker that spools two images, says so, and waits to be killed.
_DYING = """
import sys
from pathlib import Path
from underpaint.storage.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.write("t1", "t1/a.png", b"a-bytes", "s3")
spool.write("t2", "bucket-path/t2/b.png", b"b-bytes", "custom", "user-bucket", "eu-west-1")
print(spool.dir, flush=True)
sys.stdin.read()
"""


def killed_worker(root: Path) -> Path:
    """Run a process that spools two images, SIGKILL it; its spool folder."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _DYING, str(root)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert proc.stdout is not None
    folder = Path(proc.stdout.readline().decode().strip())
    proc.kill()
    proc.wait(10)
    assert len(list(folder.glob("*.img"))) == 2
    return folder


def test_an_image_is_on_disk_until_removed(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    item = spool.write("t1", "t1/x.png", b"\x89PNG-data\nwith newlines\n", "s3")
    assert item.path.parent == spool.dir
    assert spool.pending() == [item.path]
    assert Spool.read(item) == b"\x89PNG-data\nwith newlines\n"
    assert not list(spool.dir.glob("*.part"))  # written whole, then renamed
    Spool.remove(item)
    Spool.remove(item)  # twice is fine
    assert spool.pending() == []


def test_a_dead_workers_leftovers_are_deleted_from_storage_then_from_disk(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    live = Spool(root)
    mine = live.write("t0", "t0/mine.png", b"mine", "s3")
    dead = killed_worker(root)
    deleted: list[Spooled] = []
    restarted = Spool(root)
    assert restarted.recover(deleted.append) == 0
    assert sorted((d.task_id, d.key, d.backend, d.bucket, d.region) for d in deleted) == [
        ("t1", "t1/a.png", "s3", "", ""),
        ("t2", "bucket-path/t2/b.png", "custom", "user-bucket", "eu-west-1"),
    ]
    assert not dead.exists()  # the dead folder is gone, lock file and all
    assert live.pending() == [mine.path]  # a live process's folder is never touched
    assert sorted(p.name for p in root.iterdir()) == sorted([live.dir.name, restarted.dir.name])


def test_a_leftover_whose_object_cannot_be_deleted_stays_for_the_next_pass(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    dead = killed_worker(root)
    removed: list[int] = []
    spool = Spool(root, on_removed=removed.append)
    tried: list[str] = []

    def storage_down(item: Spooled) -> None:
        tried.append(item.key)
        raise OSError("cannot reach the S3 endpoint")

    assert spool.recover(storage_down) == 2
    assert len(tried) == 1  # the first failure ends the pass: no wait for each to fail
    assert len(list(dead.glob("*.img"))) == 2
    assert removed == []  # nothing was removed (the metric counts none)
    deleted: list[str] = []
    assert spool.recover(lambda item: deleted.append(item.key)) == 0
    assert sorted(deleted) == ["bucket-path/t2/b.png", "t1/a.png"]
    assert removed == [2]
    assert spool.recover(lambda item: pytest.fail("nothing is left")) == 0
    assert removed == [2]
    assert not dead.exists()


def test_an_unreadable_leftover_is_dropped_without_a_delete(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    dead = killed_worker(root)
    for path in dead.glob("*.img"):
        path.write_bytes(b"not a header")
    (dead / "half.part").write_bytes(b"{")  # a write the kill interrupted
    deleted: list[Spooled] = []
    assert Spool(root).recover(deleted.append) == 0
    assert deleted == []
    assert not dead.exists()


def test_two_live_spools_in_one_process_do_not_clear_each_other(tmp_path: Path) -> None:
    spools = [Spool(tmp_path), Spool(tmp_path)]
    items = [s.write(f"t{i}", f"t{i}/k.png", b"x", "local") for i, s in enumerate(spools)]
    assert all(s.recover(lambda item: pytest.fail(f"deleted a live image {item.key}")) == 0 for s in spools)
    assert all(i.path.exists() for i in items)
