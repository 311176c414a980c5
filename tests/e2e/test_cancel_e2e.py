"""Cancel in embedded mode, end to end: ``underpaint serve`` with its worker process and the real engine.

The cancel request reaches the worker process through the task row; the sampler stops within a step of the
worker reading it (every ``UNDERPAINT_CANCEL_POLL_SECONDS``), the task ends FAILED with ``cancelled by the
client`` and no images, a queued task never runs, and the worker goes on with the next task.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.support.server import LiveServer, make_png

from underpaint.tasks.types import CANCELLED_REASON

AUTH = {"Authorization": "Bearer key-a"}
POLL = 0.1
STEPS = 100


@pytest.fixture
def server(tmp_path: Path, tiny_models_dir: Path) -> Iterator[LiveServer]:
    live = LiveServer(tmp_path / "data", tiny_models_dir, extra_env={"UNDERPAINT_CANCEL_POLL_SECONDS": str(POLL)})
    live.start(timeout=300)  # a loaded machine can take minutes to import torch
    try:
        yield live
    finally:
        live.stop()


def submit(server: LiveServer, steps: int, size: int) -> str:
    request = {
        "model_name": "tiny-sd15.safetensors", "image_base64": base64.b64encode(make_png()).decode(),
        "prompt": "a lighthouse", "width": size, "height": size, "steps": steps, "seed": 5,
        "sampler_name": "Euler", "strength": 1.0,
    }  # fmt: skip
    r = httpx.post(server.url + "/v3/async/img2img", json={"request": request}, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def result(server: LiveServer, task_id: str) -> dict[str, Any]:
    r = httpx.get(server.url + "/v3/async/task-result", params={"task_id": task_id}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait(server: LiveServer, task_id: str, done: Any, timeout: float = 240) -> tuple[dict[str, Any], float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = result(server, task_id)
        if done(body["task"]):
            return body, time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"task {task_id}: condition not reached; last {body['task']}")


def test_embedded_worker_stops_a_running_task_within_a_step(server: LiveServer) -> None:
    task_id = submit(server, STEPS, 256)
    queued = submit(server, 2, 128)
    first, t_first = wait(server, task_id, lambda t: t["status"] == "TASK_STATUS_PROCESSING" and t["progress_percent"] >= 5)  # fmt: skip
    p0 = first["task"]["progress_percent"]
    second, t_second = wait(server, task_id, lambda t: t["progress_percent"] >= p0 + 10)
    step_seconds = (t_second - t_first) / ((second["task"]["progress_percent"] - p0) * STEPS / 100)
    assert result(server, queued)["task"]["queue_position"] == 1

    r = httpx.post(server.url + "/v3/async/task-cancel", json={"task_id": queued}, headers=AUTH, timeout=30)
    assert r.status_code == 200
    asked = time.monotonic()
    r = httpx.post(server.url + "/v3/async/task-cancel", json={"task_id": task_id}, headers=AUTH, timeout=30)
    assert r.status_code == 200
    body, ended = wait(server, task_id, lambda t: t["status"] != "TASK_STATUS_PROCESSING", timeout=60)
    stopped_after = ended - asked
    print(f"one step {step_seconds:.3f} s; stopped {stopped_after:.2f} s after the cancel request")
    assert (body["task"]["status"], body["task"]["reason"]) == ("TASK_STATUS_FAILED", CANCELLED_REASON)
    assert body["images"] == []
    assert body["task"]["progress_percent"] < 100
    assert stopped_after < POLL + 2 * step_seconds + 1.0, (stopped_after, step_seconds)
    assert step_seconds * STEPS > 4 * stopped_after, "the task would have had much longer to run"
    assert not list((server.data_dir / "images").glob(f"{task_id}*/**/*.png"))

    after = submit(server, 2, 128)
    done, _ = wait(server, after, lambda t: t["status"] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"))
    assert done["task"]["status"] == "TASK_STATUS_SUCCEED"
    never = result(server, queued)
    assert (never["task"]["reason"], never["extra"]["debug_info"]["execute_time_ms"]) == (CANCELLED_REASON, 0)
