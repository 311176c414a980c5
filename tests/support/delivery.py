"""Helpers for the delivery e2e tests: an in-process stack, a loopback webhook receiver, a moto S3 server.

A module with its own name (not conftest) so the test file imports these unambiguously.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi.testclient import TestClient
from tests.support import services as service_fixtures
from tests.support.server import make_png

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.wiring import Core, build_core, build_local_worker
from underpaint.worker.loop import Worker

REGION = "us-east-1"
MODEL = "tiny-sd15.safetensors"


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def img2img_body(extra: dict[str, Any] | None = None, **request: Any) -> dict[str, Any]:
    """A small, fast img2img request (128 px, 3 steps) with ``request`` fields overriding the defaults."""
    return {
        "extra": extra or {},
        "request": {
            "model_name": MODEL,
            "image_base64": base64.b64encode(make_png()).decode(),
            "prompt": "a red house",
            "width": 128, "height": 128, "image_num": 1, "steps": 3, "seed": 11,
            "guidance_scale": 6.0, "sampler_name": "Euler", "strength": 0.7,
            **request,
        },
    }  # fmt: skip


class Stack:
    """API in-process (TestClient), worker driven step by step, webhook sender running."""

    def __init__(self, client: TestClient, worker: Worker, core: Core) -> None:
        self.client = client
        self.worker = worker
        self.core = core
        self.services = core.services
        self.webhooks = core.webhooks

    @property
    def settings(self) -> Settings:
        return self.services.settings

    def post(self, key: str = "key-a", extra: dict[str, Any] | None = None, **request: Any) -> Any:
        return self.client.post("/v3/async/img2img", json=img2img_body(extra, **request), headers=auth(key))

    def submit(self, key: str = "key-a", extra: dict[str, Any] | None = None, **request: Any) -> str:
        r = self.post(key, extra, **request)
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def result(self, task_id: str, key: str = "key-a") -> dict[str, Any]:
        r = self.client.get("/v3/async/task-result", params={"task_id": task_id}, headers=auth(key))
        assert r.status_code == 200, r.text
        return dict(r.json())

    def status(self, task_id: str, key: str = "key-a") -> str:
        return str(self.result(task_id, key)["task"]["status"])

    def run(self, task_id: str, key: str = "key-a") -> dict[str, Any]:
        """Run the next queued task (it must be ``task_id``) and return its task-result body."""
        assert self.worker.run_once()
        result = self.result(task_id, key)
        assert result["task"]["status"] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"), result["task"]
        return result


@contextmanager
def open_stack(data_dir: Path, models_dir: Path, **settings: Any) -> Iterator[Stack]:
    # max_batch 1: these tests drive the worker one task per ``run_once`` (queue limits and lanes are checked
    # between tasks); cross-request batching has its own tests.
    base: dict[str, Any] = {
        "data_dir": data_dir, "models_dir": models_dir, "api_keys": ("key-a", "key-b"), "torch_threads": 1,
        "run_worker": False, "public_base_url": "http://testserver", "max_batch": 1,
    }  # fmt: skip
    core = build_core(Settings(**{**base, **settings}))
    webhooks = core.webhooks
    # Fast sender for tests: look at the outbox often, retry after a few tens of milliseconds.
    webhooks.poll_interval = 0.05
    webhooks.backoff_base = 0.05
    webhooks.start()
    worker = build_local_worker(core)
    try:
        with TestClient(create_app(core.services)) as client:
            yield Stack(client, worker, core)
    finally:
        webhooks.stop()
        core.store.close()


# ------------------------------------------------------------------------------------------------ webhooks


def split_url(url: str) -> tuple[str, str, str, list[str]]:
    """(scheme, host, path, sorted query parameter names): an image URL without its signature/expiry values."""
    parts = urlsplit(url)
    return parts.scheme, parts.netloc, parts.path, sorted(parse_qs(parts.query))


# ------------------------------------------------------------------------------------------------ S3 (moto)


@contextmanager
def moto_endpoint() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 with dummy credentials. Raises if it cannot run."""
    with service_fixtures.moto_endpoint(REGION) as url:
        yield url
