"""One img2img task that uses every adapter kind at once, and a service stack to run it through HTTP.

Shared by the half-precision CPU tier (tests/e2e/test_half_precision.py) and the CUDA tier (tests/cuda).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fastapi.testclient import TestClient
from PIL import Image

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.engine.devices import parse_dtype
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.pipeline import VaePrecision
from underpaint.wiring import build_core, build_local_worker
from underpaint.worker.loop import Worker
from underpaint.worker.runner import GenerationRunner

KEY = "key-a"
HEADERS = {"Authorization": f"Bearer {KEY}"}


def png_b64(size: int, seed: int) -> str:
    """A deterministic colourful picture (gradients plus noise), base64 PNG."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) % 256], axis=-1)
    arr = (arr + rng.integers(0, 32, arr.shape)).clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def adapter_request(model: str, size: int = 128) -> dict[str, Any]:
    """A LoRA, an embedding, sd_vae, a ControlNet unit with the canny preprocessor and an IP-Adapter, on the tiny
    demo models of ``model`` ("sd15" or "sdxl")."""
    if model == "sd15":
        names = {
            "model_name": "tiny-sd15.safetensors",
            "lora": "tiny-detail-sd15",
            "embedding": "tiny-subject-sd15",
            "controlnet": "control_v11p_sd15_canny",
            "ip": "ip-adapter_sd15.bin",
            "prompt": "a photo of tiny-subject-sd15, red house",
        }
    else:
        names = {
            "model_name": "tiny-sdxl.safetensors",
            "lora": "tiny-detail-sdxl",
            "embedding": "tiny-negative-sdxl",
            "controlnet": "controlnet-canny-sdxl-1.0",
            "ip": "ip-adapter_sdxl.bin",
            "prompt": "a red house",
        }
    unit = {
        "model_name": names["controlnet"],
        "image_base64": png_b64(size, 2),
        "strength": 0.9,
        "preprocessor": "canny",
    }
    return {
        "model_name": names["model_name"],
        "image_base64": png_b64(size, 1),
        "prompt": names["prompt"],
        "negative_prompt": "blurry",
        "width": size,
        "height": size,
        "image_num": 2,
        "steps": 4,
        "seed": 123,
        "guidance_scale": 6.0,
        "sampler_name": "DPM++ 2M Karras",
        "strength": 0.8,
        "sd_vae": "tiny-vae.safetensors",
        "loras": [{"model_name": names["lora"], "strength": 0.8}],
        "embeddings": [{"model_name": names["embedding"]}],
        "controlnet": {"units": [unit]},
        "ip_adapters": [{"model_name": names["ip"], "image_base64": png_b64(64, 3), "strength": 0.7}],
    }


class RecordingVaePrecision(VaePrecision):
    """The executor's VAE precision, recording the dtype each VAE encode and decode ran in (first try) and how many
    NaN fallbacks to float32 there were.

    ``cpu_float16_channels_last``: a VAE about to run in float16 on the CPU is first put in the channels-last memory
    layout. On the CI machine's CPU (AVX-512 without FP16) torch's float16 convolution in the default layout is the
    slow reference kernel: the tiny VAE's encode took 4.1 s and each decode 7.8 s, against 0.11 s and 0.19 s in
    channels-last (bench/README.md, "Suite time"). The layout changes which kernel runs, not the dtypes that meet
    (a float32 input to a float16 convolution raises either way), nor the calls the engine makes."""

    def __init__(self, forced: torch.dtype | None, cpu_float16_channels_last: bool = False) -> None:
        super().__init__(forced)
        self.chosen: list[torch.dtype] = []
        self.upcasts = 0
        self.cpu_float16_channels_last = cpu_float16_channels_last

    def dtype(self, vae: Any, model_dtype: torch.dtype) -> torch.dtype:
        chosen = super().dtype(vae, model_dtype)
        self.chosen.append(chosen)
        if self.cpu_float16_channels_last and chosen == torch.float16:
            vae.to(memory_format=torch.channels_last)
        return chosen

    def upcast(self, vae: Any) -> None:
        self.upcasts += 1
        super().upcast(vae)


class Service:
    """The API in-process over ASGI, and the worker driven one task at a time, with its executor (and the VAE
    precision it was given) at hand."""

    def __init__(
        self, client: TestClient, worker: Worker, executor: DiffusersExecutor, vae: RecordingVaePrecision
    ) -> None:
        self.client, self.worker, self.executor, self.vae = client, worker, executor, vae

    def run(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
        body = {"extra": {"response_image_type": "png"}, "request": request}
        r = self.client.post("/v3/async/img2img", json=body, headers=HEADERS)
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        assert self.worker.run_once()
        result = self.client.get("/v3/async/task-result", params={"task_id": task_id}, headers=HEADERS).json()
        images = []
        for img in result.get("images") or []:
            data = self.client.get(img["image_url"]).content
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16))
        return result, images


def service(data_dir: Path, models: Path, dtype: str, device: str = "cpu") -> Iterator[Service]:
    settings = Settings(
        data_dir=data_dir,
        models_dir=models,
        api_keys=(KEY,),
        torch_threads=1,
        run_worker=False,
        public_base_url="http://testserver",
        device=device,
        dtype=dtype,
    )
    core = build_core(settings)
    vae = RecordingVaePrecision(parse_dtype(settings.vae_dtype), cpu_float16_channels_last=device == "cpu")
    executor = DiffusersExecutor(settings, core.services.registry, vae_precision=vae)
    worker = build_local_worker(core, GenerationRunner(settings, core.services.storage, executor))
    with TestClient(create_app(core.services)) as client:
        yield Service(client, worker, executor, vae)
