"""LocalStorage: keys, atomic writes, traversal safety, URL signing; the URL secret helper."""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path

import pytest

from underpaint.storage.base import StorageError
from underpaint.storage.local import LocalStorage, image_key, load_or_create_secret, url_secret, valid_key


def test_put_get_delete_roundtrip(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "img", b"s")
    key = image_key("task-1", "webp")
    assert re.fullmatch(r"task-1/[0-9a-f]{32}\.webp", key)
    storage.put(key, b"data", "image/webp")
    assert storage.get(key) == b"data"
    assert [p.name for p in (tmp_path / "img" / "task-1").iterdir()] == [key.split("/")[1]]  # no temp files left
    storage.delete(key)
    assert not (tmp_path / "img" / "task-1").exists()
    with pytest.raises(StorageError):
        storage.get(key)


def test_put_replaces_atomically(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, b"s")
    key = "t/a.png"
    storage.put(key, b"old", "image/png")
    storage.put(key, b"new" * 1000, "image/png")
    assert storage.get(key) == b"new" * 1000
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["a.png"]


@pytest.mark.parametrize(
    "key", ["../x", "/etc/passwd", "a/../b", "a//b", "", ".", "a/./b", "a\\b", "a/b\0", ".hidden", "a/" + "b" * 300]
)
def test_invalid_keys_refused(tmp_path: Path, key: str) -> None:
    storage = LocalStorage(tmp_path, b"s")
    assert not valid_key(key)
    with pytest.raises(StorageError):
        storage.put(key, b"x", "image/png")
    assert not storage.verify(key, "9999999999", storage.sign(key, 9999999999))


def test_symlink_escape_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    storage = LocalStorage(root, b"s")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "f.png").write_bytes(b"secret")
    os.symlink(tmp_path / "outside", root / "link")
    with pytest.raises(StorageError):
        storage.get("link/f.png")


def test_url_signature(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path, b"secret-1")
    url = storage.url("t/a.png", 3600, "https://h.example/base/")
    m = re.fullmatch(r"https://h\.example/base/v3/files/t/a\.png\?expires=(\d+)&sig=([0-9a-f]{64})", url)
    assert m is not None
    expires, sig = m.group(1), m.group(2)
    assert time.time() + 3600 <= int(expires) <= time.time() + 3660
    assert storage.verify("t/a.png", expires, sig)
    assert not storage.verify("t/b.png", expires, sig)
    assert not storage.verify("t/a.png", str(int(expires) + 1), sig)
    assert not storage.verify("t/a.png", expires, sig.upper()[:-1] + "x")
    assert not storage.verify("t/a.png", expires, "")
    assert not storage.verify("t/a.png", "", sig)
    assert not storage.verify("t/a.png", expires, sig, now=int(expires) + 1)
    assert not LocalStorage(tmp_path, b"secret-2").verify("t/a.png", expires, sig)


def test_secret_created_once_and_reused(tmp_path: Path) -> None:
    first = load_or_create_secret(tmp_path / "data")
    assert len(first) == 64
    assert load_or_create_secret(tmp_path / "data") == first
    assert (tmp_path / "data" / "url_secret").stat().st_mode & 0o777 == 0o600
    assert url_secret("configured", tmp_path / "data") == b"configured"
    assert url_secret(None, tmp_path / "data") == first


def test_secret_race_gives_one_value(tmp_path: Path) -> None:
    results: list[bytes] = []
    threads = [threading.Thread(target=lambda: results.append(load_or_create_secret(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    assert Path(tmp_path / "url_secret").read_bytes() == results[0]


def test_api_imports_stay_light() -> None:
    """Workers import ``api.jobs`` without FastAPI; nothing in ``api`` pulls torch."""
    import subprocess
    import sys

    code = (
        "import sys, underpaint.worker.jobs; assert 'fastapi' not in sys.modules, 'fastapi'; "
        "import underpaint.api.app; assert 'torch' not in sys.modules, 'torch'"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src})
    assert result.returncode == 0, result.stderr
