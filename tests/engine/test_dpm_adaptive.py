"""DPM adaptive on the tiny SD 1.5 demo checkpoint, at the settings where a difference was reported (128 x 128, 20
steps, strength 0.75, CFG 7, seed 1), against k-diffusion's ``sample_dpm_adaptive`` driven with A1111's img2img
arguments through our own model function: ``sigma_min`` = the last non-zero sigma of the img2img schedule,
``sigma_max`` = its first, eta 1, and the per-image noise stream continued after the initial noise.

Both take the same 33 model evaluations and decode to the same image within 1 level (float32; the float64 parity
is in test_samplers_parity.py). The sampler is very sensitive to those arguments (docs/compatibility.md), which
the last test shows: a reference that differs by more than a level is not running A1111's arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from PIL import Image
from tests.support.pipeline_run import build_model_fn
from tests.support.samplers import (
    SCHEDULE,
    _ApplyModel,
    _HijackedTorch,
    kdiffusion,
    reference_img2img,
    reference_sigmas,
)
from torch import Tensor

from underpaint.engine import pipeline as pl
from underpaint.engine.conditioning import TextEncoderBundle
from underpaint.engine.loader import load_checkpoint
from underpaint.engine.samplers import DiscreteSchedule, NoiseSource, sample_img2img
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SamplerName

SIZE, STEPS, STRENGTH, CFG, SEED = 128, 20, 0.75, 7.0, 1
DPM_ADAPTIVE = SamplerName("DPM adaptive")


class Setup:
    def __init__(self, models: Path) -> None:
        entry = ModelRegistry(models).resolve("checkpoint", "tiny-sd15")
        assert entry is not None
        loaded = load_checkpoint(entry, torch.device("cpu"), torch.float32)
        bundle = TextEncoderBundle(list(loaded.tokenizers), cast(Any, list(loaded.text_encoders)), False)
        self.c = pl.Components(
            unet=loaded.unet,
            vae=loaded.vae,
            bundle=bundle,
            schedule=DiscreteSchedule.from_betas(*loaded.betas),
            prediction_type=loaded.prediction_type,
            vae_scaling_factor=loaded.vae_scaling_factor,
            is_sdxl=False,
            device=torch.device("cpu"),
            dtype=torch.float32,
            vae_precision=pl.VaePrecision(),
        )
        assert torch.equal(self.c.schedule.alphas_cumprod, SCHEDULE.alphas_cumprod)  # the reference's schedule
        init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
        inputs = pl.PipelineInputs(
            init_image=init,
            prompt="a photo of a cat",
            negative_prompt="",
            width=SIZE,
            height=SIZE,
            seeds=[SEED],
            steps=STEPS,
            guidance_scale=CFG,
            sampler_name=DPM_ADAPTIVE,
            strength=STRENGTH,
        )
        self.init_latent = pl.prepare_init_latents(self.c, init, SIZE, SIZE, 1)
        self.model_fn = build_model_fn(self.c, inputs)
        self.calls = 0

    def counted(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.model_fn(x, t)

    def pixels(self, latent: Tensor) -> np.ndarray:
        return np.asarray(pl.decode_latents(self.c, latent.float())[0]).astype(np.int16)


@pytest.fixture(scope="module")
def setup(tiny_models_dir: Path) -> Setup:
    return Setup(tiny_models_dir)


@pytest.fixture(scope="module")
def ours(setup: Setup) -> tuple[np.ndarray, int]:
    setup.calls = 0
    with torch.no_grad():
        out = sample_img2img(
            DPM_ADAPTIVE, setup.counted, setup.c.schedule, setup.init_latent, STEPS, STRENGTH, NoiseSource([SEED])
        )
    return setup.pixels(out), setup.calls


@pytest.mark.parity
def test_dpm_adaptive_equals_kdiffusion_with_a1111_arguments(setup: Setup, ours: tuple[np.ndarray, int]) -> None:
    setup.calls = 0
    with torch.no_grad():
        ref, _ = reference_img2img("DPM adaptive", setup.counted, setup.init_latent, STEPS, STRENGTH, [SEED])
    mine, evals = ours
    assert evals == setup.calls == 33
    diff = np.abs(setup.pixels(ref) - mine)
    assert int(diff.max()) <= 1
    assert float(diff.mean()) < 0.01


def _kdiffusion_variant(setup: Setup, eta: float, noise: Any, lowest: Callable[[Tensor], Tensor]) -> np.ndarray:
    sampling, external = kdiffusion()
    denoiser = external.CompVisDenoiser(_ApplyModel(setup.model_fn, SCHEDULE.alphas_cumprod))
    sigmas = reference_sigmas("DPM adaptive", STEPS)
    sched = sigmas[STEPS - int(STRENGTH * STEPS) - 1 :]
    x = setup.init_latent + noise.randn_like(setup.init_latent) * sched[0]
    original = sampling.torch
    sampling.torch = _HijackedTorch(noise)
    try:
        with torch.no_grad():
            out = sampling.sample_dpm_adaptive(denoiser, x, lowest(sched), sched[0], disable=True, eta=eta)
    finally:
        sampling.torch = original
    return setup.pixels(out)


def test_other_arguments_change_the_image_far_more(setup: Setup, ours: tuple[np.ndarray, int]) -> None:
    """What the sampler is sensitive to: eta (k-diffusion's default is 0, A1111 passes 1) and the lowest sigma."""
    mine, _ = ours
    eta0 = _kdiffusion_variant(setup, 0.0, NoiseSource([SEED]), lambda s: s[-2])
    lower = _kdiffusion_variant(setup, 1.0, NoiseSource([SEED]), lambda s: s[-3])
    assert np.abs(eta0 - mine).max() > 50
    assert np.abs(lower - mine).max() > 2
