"""The three process kinds import what they need and no more: an API node never loads torch."""

from __future__ import annotations

import base64
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
from tests.support.api import write_models
from tests.support.server import LiveServer, make_png

HEAVY = ("torch", "diffusers", "transformers", "safetensors.torch", "celery", "onnxruntime", "cv2")
RSS_LIMIT_MB = 200


def _body() -> dict[str, object]:
    image = base64.b64encode(make_png()).decode()
    unit = {"model_name": "control_v11p_sd15_canny", "image_base64": image, "preprocessor": "canny"}
    return {"request": {"model_name": "dreamshaper_8.safetensors", "image_base64": image, "prompt": "p",
                        "controlnet": {"units": [unit]}}}  # fmt: skip


def _mapped_libraries(pid: int) -> set[str]:
    return {line.split()[-1] for line in Path(f"/proc/{pid}/maps").read_text().splitlines() if ".so" in line}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_api_node_process_never_loads_torch_and_stays_small(tmp_path: Path) -> None:
    models = write_models(tmp_path / "models")
    server = LiveServer(tmp_path / "data", models, keys="k", args=("--no-worker",)).start()
    try:
        headers = {"Authorization": "Bearer k"}
        r = httpx.post(server.url + "/v3/async/img2img", json=_body(), headers=headers, timeout=30)
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        for _ in range(20):  # the polling path, many times
            got = httpx.get(server.url + "/v3/async/task-result", params={"task_id": task_id}, headers=headers)
            assert got.json()["task"]["status"] == "TASK_STATUS_QUEUED"
        assert httpx.get(server.url + "/v3/model", headers=headers).json()["models"]
        assert server.proc is not None
        time.sleep(0.5)
        libraries = _mapped_libraries(server.proc.pid)
        assert not [lib for lib in libraries if "torch" in lib or "cudnn" in lib or "onnxruntime" in lib]
        assert _rss_mb(server.proc.pid) < RSS_LIMIT_MB
    finally:
        server.stop()


def test_api_side_imports_with_the_heavy_packages_blocked(tmp_path: Path) -> None:
    """vLLM's lazy-import check: with torch & co. made unimportable, an API node still builds and serves."""
    models = write_models(tmp_path / "models")
    script = textwrap.dedent(
        f"""
        import sys
        for name in {HEAVY!r}:
            sys.modules[name] = None  # any import of these now raises ImportError
        from pathlib import Path
        from fastapi.testclient import TestClient
        from underpaint.config import Settings
        from underpaint.wiring import build_server

        settings = Settings(run_worker=False, api_keys=("k",), data_dir=Path({str(tmp_path / "data")!r}),
                            models_dir=Path({str(models)!r}))
        server = build_server(settings)
        with TestClient(server.app) as client:
            r = client.post("/v3/async/img2img", json={_body()!r}, headers={{"Authorization": "k"}})
            assert r.status_code == 200, r.text
            got = client.get("/v3/async/task-result", params={{"task_id": r.json()["task_id"]}},
                             headers={{"Authorization": "k"}})
            assert got.status_code == 200, got.text
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
