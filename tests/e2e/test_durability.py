"""Kill the server (SIGKILL) while a task runs and another waits; after a restart both complete."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from tests.support.server import LiveServer

AUTH = {"Authorization": "Bearer key-a"}


def _submit(server: LiveServer, png_b64: str, steps: int, seed: int) -> str:
    body = {
        "request": {
            "model_name": "tiny-sd15.safetensors",
            "image_base64": png_b64,
            "prompt": "a castle",
            # The smallest size and a one-evaluation sampler: the killed task is caught at its first step (about 1 %
            # of a 100-step run) and then runs again whole, so its length is the test's time, not its margin.
            "width": 128,
            "height": 128,
            "image_num": 1,
            "steps": steps,
            "seed": seed,
            "guidance_scale": 7,
            "sampler_name": "Euler",
            "strength": 1.0,
        }
    }
    r = httpx.post(server.url + "/v3/async/img2img", json=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return str(r.json()["task_id"])


def _status(server: LiveServer, task_id: str) -> dict[str, Any]:
    r = httpx.get(server.url + "/v3/async/task-result", params={"task_id": task_id}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait(
    server: LiveServer, task_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = _status(server, task_id)
        if predicate(body):
            return body
        time.sleep(0.1)
    raise AssertionError(f"timed out; last status {body['task']}")


def test_kill_while_processing_then_restart_completes(tmp_path: Path, tiny_models_dir: Path, png_b64: str) -> None:
    server = LiveServer(tmp_path / "data", tiny_models_dir).start()
    try:
        running = _submit(server, png_b64, steps=100, seed=1)
        waiting = _submit(server, png_b64, steps=4, seed=2)
        body = _wait(server, running, lambda b: b["task"]["progress_percent"] > 0, timeout=120)
        assert body["task"]["status"] == "TASK_STATUS_PROCESSING"
        assert _status(server, waiting)["task"]["status"] == "TASK_STATUS_QUEUED"
        server.kill()

        server = LiveServer(tmp_path / "data", tiny_models_dir, port=server.port).start()
        for task_id in (running, waiting):
            done = _wait(
                server,
                task_id,
                lambda b: b["task"]["status"] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"),
                timeout=300,
            )
            assert done["task"]["status"] == "TASK_STATUS_SUCCEED", done["task"]
            assert len(done["images"]) == 1
            img = httpx.get(done["images"][0]["image_url"], timeout=30)
            assert img.status_code == 200
            assert img.content[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        server.stop()


def test_worker_process_killed_mid_task_is_restarted_and_the_task_completes(
    tmp_path: Path, tiny_models_dir: Path, png_b64: str
) -> None:
    import psutil

    server = LiveServer(tmp_path / "data", tiny_models_dir).start()
    try:
        task_id = _submit(server, png_b64, steps=100, seed=3)
        _wait(server, task_id, lambda b: b["task"]["progress_percent"] > 0, timeout=120)
        assert server.proc is not None
        children = psutil.Process(server.proc.pid).children()
        workers = [c for c in children if "spawn" in " ".join(c.cmdline())]
        assert len(workers) == 1, [c.cmdline() for c in children]
        workers[0].kill()
        done = _wait(
            server, task_id, lambda b: b["task"]["status"] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"), timeout=300
        )
        assert done["task"]["status"] == "TASK_STATUS_SUCCEED", done["task"]
        assert len(done["images"]) == 1
        assert psutil.Process(server.proc.pid).is_running()  # the API kept serving throughout
        # The server's /metrics carries the worker child's numbers: the killed run never finished, the new one did.
        metrics = httpx.get(server.url + "/metrics", timeout=30).text
        assert 'underpaint_generation_seconds_count{base_model="sd15",outcome="ok"} 1.0' in metrics, metrics
        assert 'underpaint_worker_tasks_run_total{outcome="ok"} 1.0' in metrics
        assert "underpaint_model_loads_total 1.0" in metrics
        assert metrics.count("# TYPE underpaint_generation_seconds histogram") == 1
    finally:
        server.stop()
