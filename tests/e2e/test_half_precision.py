"""The CPU stand-in for the GPU's half-precision paths: ``dtype = bfloat16`` and ``float16`` (both have CPU kernels
in torch 2.14) through the HTTP API and the worker, with every adapter kind in one task, on SD 1.5 and SDXL.

A dtype mismatch raises on CPU exactly as on CUDA (``F.linear``/``F.conv2d`` refuse mixed dtypes on both), so this
tier catches what CUDA fp16 would: the LoRA hook deltas, ControlNet residuals, IP-Adapter image embeds, embeddings,
the VAE encode/decode dtype, and the float32 sampler latents meeting the half-precision UNet.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _server import make_png
from fastapi.testclient import TestClient
from PIL import Image

from underpaint.api.app import create_app
from underpaint.config import Settings
from underpaint.wiring import build_local_worker, build_services

pytestmark = pytest.mark.dtype

A = {"Authorization": "Bearer key-a"}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _request(model: str) -> dict[str, Any]:
    """One task with a LoRA, an embedding, sd_vae, a ControlNet unit with the canny preprocessor and an IP-Adapter."""
    init = _b64(make_png((128, 128), seed=1))
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
    return {
        "model_name": names["model_name"],
        "image_base64": init,
        "prompt": names["prompt"],
        "negative_prompt": "blurry",
        "width": 128,
        "height": 128,
        "image_num": 2,
        "steps": 4,
        "seed": 123,
        "guidance_scale": 6.0,
        "sampler_name": "DPM++ 2M Karras",
        "strength": 0.8,
        "sd_vae": "tiny-vae.safetensors",
        "loras": [{"model_name": names["lora"], "strength": 0.8}],
        "embeddings": [{"model_name": names["embedding"]}],
        "controlnet": {
            "units": [
                {
                    "model_name": names["controlnet"],
                    "image_base64": _b64(make_png((128, 128), seed=2)),
                    "strength": 0.9,
                    "preprocessor": "canny",
                }
            ]
        },
        "ip_adapters": [{"model_name": names["ip"], "image_base64": _b64(make_png((64, 64), seed=3)), "strength": 0.7}],
    }


class Service:
    def __init__(self, client: TestClient, worker: Any, services: Any) -> None:
        self.client, self.worker, self.services = client, worker, services

    def run(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[np.ndarray]]:
        r = self.client.post("/v3/async/img2img", json={"extra": {"response_image_type": "png"}, "request": request}, headers=A)
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        assert self.worker.run_once()
        result = self.client.get("/v3/async/task-result", params={"task_id": task_id}, headers=A).json()
        images = []
        for img in result.get("images") or []:
            data = self.client.get(img["image_url"]).content
            images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16))
        return result, images


def _service(tmp: Path, models: Path, dtype: str) -> Iterator[Service]:
    settings = Settings(
        data_dir=tmp,
        models_dir=models,
        api_keys=("key-a",),
        torch_threads=1,
        run_worker=False,
        public_base_url="http://testserver",
        dtype=dtype,  # type: ignore[arg-type]  # a str from the parametrisation
    )
    services = build_services(settings)
    worker = build_local_worker(services)
    with TestClient(create_app(services)) as client:
        yield Service(client, worker, services)


@pytest.fixture(scope="module")
def fp32_images(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> dict[str, list[np.ndarray]]:
    """The same tasks in float32: the reference the half-precision images must stay near."""
    out = {}
    for service in _service(tmp_path_factory.mktemp("fp32"), tiny_models_dir, "float32"):
        for model in ("sd15", "sdxl"):
            result, images = service.run(_request(model))
            assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
            out[model] = images
    return out


def _executor(service: Service) -> Any:
    return service.worker.runner.executor


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_every_adapter_in_half_precision_through_http(
    tmp_path: Path,
    tiny_models_dir: Path,
    fp32_images: dict[str, list[np.ndarray]],
    model: str,
    dtype: str,
) -> None:
    for service in _service(tmp_path, tiny_models_dir, dtype):
        vae_inputs: list[torch.dtype] = []
        from underpaint.engine import pipeline

        original = pipeline._with_fp32_retry

        def spy(c: Any, what: str, run: Any) -> torch.Tensor:
            vae_inputs.append(pipeline._vae_dtype(c))
            return original(c, what, run)

        pipeline._with_fp32_retry = spy  # type: ignore[assignment]
        try:
            result, images = service.run(_request(model))
        finally:
            pipeline._with_fp32_retry = original  # type: ignore[assignment]
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
        executor = _executor(service)
        want = getattr(torch, dtype)
        assert executor.dtype == want
        (loaded,) = executor.cache._slots.values()
        assert {p.dtype for p in loaded.value.unet.parameters()} == {want}
        assert executor.loras.active_adapters(loaded.value), "the LoRA was not applied"
        assert executor.ip_adapters.adapter_loads == 1
        # The override VAE (sd_vae) has no force_upcast: it runs in the model dtype, encode and decode.
        assert vae_inputs == [want] * 3
        assert len(images) == 2
        for img, ref in zip(images, fp32_images[model], strict=True):
            assert img.std() > 5, "a constant (black/NaN) image"
            assert not np.array_equal(images[0], images[1])
            # Half precision changes the bits, not the picture.
            assert np.abs(img - ref).mean() < 12, np.abs(img - ref).mean()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sdxl_vae_upcasts_under_fp16_only(tmp_path: Path, tiny_models_dir: Path, dtype: str) -> None:
    """SDXL's VAE config asks for force_upcast: float32 for encode and decode under fp16 (img2img's fp16 encoder
    gives black images); bf16 has float32's range and keeps it in bf16."""
    for service in _service(tmp_path, tiny_models_dir, dtype):
        seen: list[torch.dtype] = []
        executor = _executor(service)
        request = _request("sdxl")
        for key in ("sd_vae", "loras", "embeddings", "controlnet", "ip_adapters"):
            request.pop(key)
        request["image_num"] = 1
        result, (image,) = service.run(request)  # loads the checkpoint
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED"
        (slot,) = executor.cache._slots.values()
        vae = slot.value.vae
        assert vae.config.force_upcast
        hooks = [
            m.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype)) for m in (vae.encoder, vae.decoder)
        ]
        try:
            result, (image,) = service.run(request)
        finally:
            for h in hooks:
                h.remove()
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED"
        expected = torch.float32 if dtype == "float16" else torch.bfloat16
        assert seen == [expected, expected]
        assert image.std() > 5
