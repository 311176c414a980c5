"""Sizes that are not multiples of 64: the UNet resizes its upsampled feature maps to the skip connections' sizes
the way A1111 does.

Reference, written from A1111's published behaviour (``modules/sd_hijack_unet.py``, "TorchHijackForUnet"): the
UNet upsamples x2 (nearest) and convolves as at any size; where a concatenation in the up path meets a skip
connection of another size, the upsampled map is first resized to the skip's size (nearest). The reference runs
the same diffusers weights with that concatenation rule in ``unet_2d_blocks`` and without diffusers' own
``output_size`` (which interpolates straight to the skip size *before* the convolution).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.unets import unet_2d_blocks
from PIL import Image

from underpaint.config import Settings
from underpaint.demo.checkpoints import tiny_sd15_components, tiny_sdxl_components
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob
from underpaint.engine.unet_resize import use_a1111_skip_resize
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SamplerName


class _A1111Cat:
    """``torch`` as A1111's UNet sees it: ``cat`` of two maps of different sizes first resizes the first one."""

    def cat(self, tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(tensors) == 2:
            a, b = tensors
            if a.shape[-2:] != b.shape[-2:]:
                a = F.interpolate(a, b.shape[-2:], mode="nearest")
            tensors = (a, b)
        return torch.cat(tensors, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


def _inputs(unet: Any, h: int, w: int, sdxl: bool) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 4, h, w, generator=g, dtype=torch.float64)
    t = torch.tensor([500.0, 120.5], dtype=torch.float64)
    ctx = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g, dtype=torch.float64)
    kwargs: dict[str, Any] = {"encoder_hidden_states": ctx}
    if sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2, 64, generator=g, dtype=torch.float64),
            "time_ids": torch.tensor([[h * 8.0, w * 8.0, 0, 0, h * 8.0, w * 8.0]] * 2, dtype=torch.float64),
        }
    return x, t, kwargs


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize(("width", "height"), [(200, 152), (200, 150), (136, 264), (256, 192)])
def test_unet_matches_a1111s_resize(model: str, width: int, height: int) -> None:
    parts = tiny_sdxl_components() if model == "sdxl" else tiny_sd15_components()
    ours: Any = parts["unet"].to(torch.float64)
    diffusers_own = copy.deepcopy(ours)
    reference = copy.deepcopy(ours)
    assert use_a1111_skip_resize(ours) == len(ours.up_blocks) - 1
    assert use_a1111_skip_resize(ours) == len(ours.up_blocks) - 1  # once only
    h, w = height // 8, width // 8
    x, t, kwargs = _inputs(ours, h, w, model == "sdxl")
    with torch.no_grad():
        out = ours(x, t, **kwargs).sample
        plain = diffusers_own(x, t, **kwargs).sample
        reference.num_upsamplers = 0  # diffusers then never forwards a size: x2, then A1111's resize at the concat
        mp = pytest.MonkeyPatch()
        mp.setattr(unet_2d_blocks, "torch", _A1111Cat())
        try:
            ref = reference(x, t, **kwargs).sample
        finally:
            mp.undo()
    assert out.shape == ref.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    if (w % 8, h % 8) == (0, 0):
        assert torch.equal(out, plain)  # multiples of 64: nothing to resize
    else:
        assert (out - plain).abs().max() > 1e-3  # diffusers' own order differs


def test_loaded_checkpoints_carry_the_resize_and_odd_sizes_render(tiny_models_dir: Path) -> None:
    executor = DiffusersExecutor(Settings(models_dir=tiny_models_dir, torch_threads=1), ModelRegistry(tiny_models_dir))
    rng = np.random.default_rng(1)
    job = GenerationJob(
        checkpoint="tiny-sd15.safetensors",
        init_image=Image.fromarray(rng.integers(0, 255, (152, 200, 3), dtype=np.uint8)),
        prompt="a red house",
        negative_prompt="",
        width=200,
        height=152,
        image_num=1,
        steps=3,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler"),
        seed=3,
        strength=0.6,
    )
    (image,) = executor.generate(job)
    assert image.image.size == (200, 152)
    loaded = executor.cache.get(executor._entry("checkpoint", job.checkpoint))
    assert use_a1111_skip_resize(loaded.unet) == len(loaded.unet.up_blocks) - 1
    assert all(
        getattr(m, "_a1111_skip_resize", False) for m in loaded.unet.modules() if type(m).__name__ == "Upsample2D"
    )
