"""The whole stack in one process for end-to-end tests: the app under a ``TestClient`` and a worker the test drives
one task at a time (``worker.run_once()``), over the real SQLite store and local storage."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi.testclient import TestClient

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.services import Services
from underpaint.wiring import build_core, build_local_worker
from underpaint.worker.loop import Worker

KEYS = ("key-a", "key-b")


@dataclass(frozen=True)
class InProcess:
    client: TestClient
    worker: Worker
    services: Services


@contextmanager
def in_process(data_dir: Path, models_dir: Path) -> Iterator[InProcess]:
    """API keys ``key-a`` and ``key-b``; image URLs on ``http://testserver`` (the client's own host)."""
    settings = Settings(
        data_dir=data_dir,
        models_dir=models_dir,
        api_keys=KEYS,
        torch_threads=1,
        run_worker=False,
        public_base_url="http://testserver",
    )
    core = build_core(settings)
    worker = build_local_worker(core)
    with TestClient(create_app(core.services)) as client:
        yield InProcess(client, worker, core.services)
