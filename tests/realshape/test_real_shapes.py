"""Real SD 1.5 / SDXL shapes with random weights, through the HTTP service on this CPU (bfloat16 weights).

Deselected unless ``UNDERPAINT_REALSHAPE=1`` (tests/conftest.py): the files take 4 GB (SD 1.5 set) and 7 GB (SDXL)
on disk and minutes to write once (cached under ~/.cache/underpaint-test/realshape-*). One model in memory at a time.
Timings on the 2-core CI machine are in README ('Test tiers').

The checkpoints are A1111 single files with no sidecar: the loader must recognise SD 1.5 vs SDXL and configure
everything from the keys alone. The LoRA (kohya), ControlNet (lllyasviel ``control_model.*``) and IP-Adapter
(``ip-adapter_sd15.bin`` + ViT-H/14 encoder folder) are in the published layouts.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.engine.executor import DiffusersExecutor
from underpaint.wiring import build_core, build_local_worker
from underpaint.worker.runner import GenerationRunner

pytestmark = [pytest.mark.realshape, pytest.mark.slow]

A = {"Authorization": "Bearer key-a"}


def _png(size: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) % 256], axis=-1)
    arr = (arr + rng.integers(0, 32, arr.shape)).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _cache_dir(tag: str) -> Path:
    import underpaint.demo.ldm_convert as convert
    import underpaint.demo.real_shapes as real

    digest = hashlib.sha256()
    for module in (real, convert):
        digest.update(Path(str(module.__file__)).read_bytes())
    root = Path(os.environ.get("UNDERPAINT_TEST_CACHE", Path.home() / ".cache" / "underpaint-test"))
    return root / f"realshape-{tag}-{digest.hexdigest()[:12]}"


def _cached(tag: str, write: Any) -> Path:
    final = _cache_dir(tag)
    if (final / ".complete").exists():
        return final
    staging = final.with_name(f".staging-{uuid.uuid4().hex}")
    write(staging)
    (staging / ".complete").write_text("ok")
    try:
        staging.rename(final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def _service(models: Path, tmp: Path) -> Iterator[tuple[TestClient, Any, DiffusersExecutor]]:
    settings = Settings(
        data_dir=tmp,
        models_dir=models,
        api_keys=("key-a",),
        run_worker=False,
        public_base_url="http://testserver",
        dtype="bfloat16",
        torch_threads=int(os.environ.get("UNDERPAINT_REALSHAPE_THREADS", "2")),
    )
    core = build_core(settings)
    executor = DiffusersExecutor(settings, core.services.registry)
    worker = build_local_worker(core, GenerationRunner(settings, core.services.storage, executor))
    with TestClient(create_app(core.services)) as client:
        yield client, worker, executor


def _run(client: TestClient, worker: Any, request: dict[str, Any]) -> list[np.ndarray]:
    body = {"extra": {"response_image_type": "png"}, "request": request}
    r = client.post("/v3/async/img2img", json=body, headers=A)
    assert r.status_code == 200, r.text
    task_id = r.json()["task_id"]
    assert worker.run_once()
    result = client.get("/v3/async/task-result", params={"task_id": task_id}, headers=A).json()
    assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
    return [
        np.asarray(Image.open(io.BytesIO(client.get(i["image_url"]).content)).convert("RGB")).astype(np.int16)
        for i in result["images"]
    ]


def _models_listed(client: TestClient, kind: str) -> dict[str, bool]:
    r = client.get("/v3/model", params={"filter.types": kind}, headers=A)
    return {m["sd_name"]: bool(m["is_sdxl"]) for m in r.json()["models"]}


def test_real_sd15_with_lora_controlnet_and_ip_adapter(tmp_path: Path) -> None:
    from underpaint.demo.real_shapes import write_real_models

    models = _cached("sd15", lambda d: write_real_models(d, sdxl=False, adapters=True))
    assert not list((models / "checkpoint").glob("*.config")), "no sidecar: configured from the keys alone"
    for client, worker, executor in _service(models, tmp_path):
        assert _models_listed(client, "checkpoint") == {"real-sd15.safetensors": False}
        request = {
            "model_name": "real-sd15.safetensors",
            "image_base64": _png(128, 1),
            "prompt": "a red house",
            "negative_prompt": "blurry",
            "width": 128,
            "height": 128,
            "image_num": 1,
            "steps": 4,
            "seed": 7,
            "guidance_scale": 7.0,
            "sampler_name": "Euler a",
            "strength": 0.5,
            "loras": [{"model_name": "real-lora-sd15", "strength": 0.8}],
            "controlnet": {
                "units": [
                    {
                        "model_name": "control_v11p_sd15_canny",
                        "image_base64": _png(128, 2),
                        "strength": 1.0,
                        "preprocessor": "canny",
                    }
                ]
            },
            "ip_adapters": [{"model_name": "ip-adapter_sd15.bin", "image_base64": _png(128, 3), "strength": 0.6}],
        }
        (image,) = _run(client, worker, request)
        assert image.shape == (128, 128, 3)
        assert image.std() > 1, "constant image"
        (slot,) = executor.cache._slots.values()
        assert not slot.value.is_sdxl
        assert {p.dtype for p in slot.value.unet.parameters()} == {torch.bfloat16}
        assert slot.value.unet.config["cross_attention_dim"] == 768


def test_real_sdxl_single_file(tmp_path: Path) -> None:
    from underpaint.demo.real_shapes import write_real_checkpoint

    models = _cached(
        "sdxl", lambda d: write_real_checkpoint(d / "checkpoint" / "real-sdxl.safetensors", sdxl=True, seed=12)
    )
    assert not list((models / "checkpoint").glob("*.config"))
    for client, worker, executor in _service(models, tmp_path):
        assert _models_listed(client, "checkpoint") == {"real-sdxl.safetensors": True}
        request = {
            "model_name": "real-sdxl.safetensors",
            "image_base64": _png(256, 1),
            "prompt": "a red house",
            "width": 256,
            "height": 256,
            "image_num": 1,
            "steps": 2,
            "seed": 7,
            "guidance_scale": 5.0,
            "sampler_name": "Euler",
            "strength": 0.5,
        }
        (image,) = _run(client, worker, request)
        assert image.shape == (256, 256, 3)
        assert image.std() > 1
        (slot,) = executor.cache._slots.values()
        assert slot.value.is_sdxl
        assert slot.value.vae.config["force_upcast"]
