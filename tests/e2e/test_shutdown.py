"""Stopping ``underpaint serve`` the two usual ways (SIGTERM from a service manager, SIGINT from Ctrl-C) after it
has run a task: a graceful shutdown, the embedded worker child gone, exit status 0, and no "leaked semaphore
objects" warning from multiprocessing's resource tracker (which reports when the server dies before its exit
handlers unlink the worker's wake-up Event)."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest
from tests.support.server import LiveServer

AUTH = {"Authorization": "Bearer key-a"}


def _run_one_task(server: LiveServer, png_b64: str) -> None:
    request = {
        "model_name": "tiny-sd15.safetensors", "image_base64": png_b64, "prompt": "a castle", "width": 128,
        "height": 128, "image_num": 1, "steps": 2, "seed": 1, "guidance_scale": 7, "sampler_name": "Euler",
        "strength": 0.5,
    }  # fmt: skip
    r = httpx.post(server.url + "/v3/async/img2img", json={"request": request}, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        task = httpx.get(
            server.url + "/v3/async/task-result", params={"task_id": task_id}, headers=AUTH, timeout=30
        ).json()["task"]
        if task["status"] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED"):
            assert task["status"] == "TASK_STATUS_SUCCEED", task
            return
        time.sleep(0.2)
    raise AssertionError("the task did not finish")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_shuts_down_cleanly(tmp_path: Path, tiny_models_dir: Path, png_b64: str, sig: signal.Signals) -> None:
    server = LiveServer(tmp_path / "data", tiny_models_dir).start()
    try:
        _run_one_task(server, png_b64)  # the worker child is up and has served
        assert server.proc is not None
        children = psutil.Process(server.proc.pid).children()
        trackers = [c for c in children if "resource_tracker" in " ".join(c.cmdline())]
        workers = [c for c in children if "spawn_main" in " ".join(c.cmdline())]
        # The tracker watches the named semaphores of the worker's wake-up Event: what would be reported leaked.
        assert (len(trackers), len(workers)) == (1, 1), [c.cmdline() for c in children]
        server.proc.send_signal(sig)
        code = server.proc.wait(timeout=90)
        # The tracker writes its report as it exits, once the server and the worker have closed its pipe.
        _, alive = psutil.wait_procs(trackers + workers, timeout=30)
        assert alive == []
    finally:
        server.stop()
    log = server.log_path.read_text()
    assert "leaked semaphore" not in log, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    assert "Finished server process" in log  # uvicorn's graceful shutdown ran (and with it the worker's stop)
    assert code == 0, log[-3000:]
