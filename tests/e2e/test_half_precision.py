"""The CPU stand-in for the GPU's half-precision paths: ``dtype = bfloat16`` and ``float16`` (both have CPU kernels
in torch 2.14) through the HTTP API and the worker, with every adapter kind in one task, on SD 1.5 and SDXL.

A dtype mismatch raises on CPU exactly as on CUDA (``F.linear``/``F.conv2d`` refuse mixed dtypes on both), so this
tier catches what CUDA fp16 would: the LoRA hook deltas, ControlNet residuals, IP-Adapter image embeds (and its
image encoder), embeddings, the VAE encode/decode dtype, and the float32 sampler latents meeting the half-precision
UNet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.support.adapter_task import adapter_request, service

pytestmark = pytest.mark.dtype

# Mean absolute pixel difference (0..255) allowed between a half-precision image and the float32 one.
HALF_TOLERANCE = 12


@pytest.fixture(scope="module")
def fp32_images(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> dict[str, list[np.ndarray]]:
    """The same tasks in float32: the reference the half-precision images must stay near."""
    out = {}
    for svc in service(tmp_path_factory.mktemp("fp32"), tiny_models_dir, "float32"):
        for model in ("sd15", "sdxl"):
            result, images = svc.run(adapter_request(model))
            assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
            out[model] = images
    return out


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("model", ["sd15", "sdxl"])
def test_every_adapter_in_half_precision_through_http(
    tmp_path: Path,
    tiny_models_dir: Path,
    fp32_images: dict[str, list[np.ndarray]],
    model: str,
    dtype: str,
) -> None:
    for svc in service(tmp_path, tiny_models_dir, dtype):
        result, images = svc.run(adapter_request(model))
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED", result["task"]
        executor = svc.executor
        want = getattr(torch, dtype)
        assert executor.dtype == want
        (slot,) = executor.cache._slots.values()
        assert {p.dtype for p in slot.value.unet.parameters()} == {want}
        assert executor.loras.active_adapters(slot.value), "the LoRA was not applied"
        assert executor.ip_adapters.adapter_loads == 1
        # The override VAE (sd_vae) has no force_upcast: it runs in the model dtype, encode and two decodes.
        assert svc.vae.chosen == [want] * 3
        assert len(images) == 2
        assert not np.array_equal(images[0], images[1])
        for img, ref in zip(images, fp32_images[model], strict=True):
            assert img.std() > 5, "a constant (black/NaN) image"
            # Half precision changes the bits, not the picture.
            assert np.abs(img - ref).mean() < HALF_TOLERANCE, np.abs(img - ref).mean()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_sdxl_vae_upcasts_under_fp16_only(tmp_path: Path, tiny_models_dir: Path, dtype: str) -> None:
    """SDXL's VAE config asks for force_upcast: float32 for encode and decode under fp16 (img2img's fp16 encoder
    gives black images); bf16 has float32's range and keeps it in bf16."""
    request = adapter_request("sdxl")
    for key in ("sd_vae", "loras", "embeddings", "controlnet", "ip_adapters"):
        request.pop(key)
    request["image_num"] = 1
    for svc in service(tmp_path, tiny_models_dir, dtype):
        result, _ = svc.run(request)  # loads the checkpoint
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED"
        (slot,) = svc.executor.cache._slots.values()
        vae = slot.value.vae
        assert vae.config["force_upcast"]
        seen: list[torch.dtype] = []

        def record(_m: Any, args: tuple[torch.Tensor, ...], seen: list[torch.dtype] = seen) -> None:
            seen.append(args[0].dtype)

        hooks = [m.register_forward_pre_hook(record) for m in (vae.encoder, vae.decoder)]
        try:
            result, (image,) = svc.run(request)
        finally:
            for h in hooks:
                h.remove()
        assert result["task"]["status"] == "TASK_STATUS_SUCCEED"
        expected = torch.float32 if dtype == "float16" else torch.bfloat16
        assert seen == [expected, expected]
        assert image.std() > 5
