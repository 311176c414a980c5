"""The samplers A1111 1.6 added and A1111 >= 1.9's schedule types, against k-diffusion driven with A1111's
arguments (``tests/support/samplers.py``): DPM++ 2M SDE (midpoint and Heun), DPM++ 3M SDE, with Uniform, Karras
and Exponential schedules and per-image Brownian trees; Restart (A1111's method over k-diffusion's Karras schedule
and Heun steps, with its restart segments from 20 steps); the eleven schedule types.

Schedules are bit-identical to A1111's (built with the same float32 operations). Latents are compared in float64
(same noise, same model) within 1e-10 relative (1e-5 for DPM fast, whose k-diffusion grid is a float32 linspace):
far inside one 8-bit level of the decoded image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests.support.samplers import (
    SCHEDULE,
    SEEDS,
    CountingModel,
    init_latent,
    reference_img2img,
    reference_schedule,
    rel_err,
    tiny_sdxl_unet_fn,
    tiny_unet_fn,
    toy_model,
)
from torch import Tensor

from underpaint.config import Settings
from underpaint.engine.executor import DiffusersExecutor
from underpaint.engine.job import GenerationJob, batch_key
from underpaint.engine.samplers import DiscreteSchedule, NoiseSource, full_sigmas, img2img_model_evals, sample_img2img
from underpaint.engine.samplers.k_samplers import restart_steps
from underpaint.registry import ModelRegistry
from underpaint.vocabulary import SAMPLER_NAMES, SCHEDULER_NAMES, SamplerName, SchedulerName

NEW_NAMES = [n for n in SAMPLER_NAMES[20:]]
LABELS = [label for label in SCHEDULER_NAMES if label != "Automatic"]


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("steps", [1, 2, 7, 20, 33])
def test_schedule_types_match_a1111(label: str, steps: int) -> None:
    ours = full_sigmas(SamplerName(f"Euler {label}"), SCHEDULE, steps)
    ref = reference_schedule(label, steps)
    assert ours.dtype == torch.float32
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("steps", [7, 11, 25])
def test_align_your_steps_uses_the_sdxl_table_for_sdxl(steps: int) -> None:
    sdxl = DiscreteSchedule.from_betas(is_sdxl=True)
    ours = full_sigmas(SamplerName("Euler Align Your Steps"), sdxl, steps)
    assert torch.equal(ours, reference_schedule("Align Your Steps", steps, is_sdxl=True))
    assert not torch.equal(ours, full_sigmas(SamplerName("Euler Align Your Steps"), SCHEDULE, steps))


def _check(
    name: str,
    model: Callable[[Tensor, Tensor], Tensor],
    init: Tensor,
    steps: int,
    strength: float,
    *,
    prediction_type: str = "epsilon",
    label: str | None = None,
    tol: float = 1e-10,
) -> None:
    engine_name = SamplerName(f"{name} {label}" if label else name)
    counting = CountingModel(model)
    seeds = SEEDS[: init.shape[0]]
    ours_noise, ref_noise = NoiseSource(seeds), NoiseSource(seeds)
    ours = sample_img2img(
        engine_name, counting, SCHEDULE, init, steps, strength, ours_noise, prediction_type=prediction_type
    )
    ref, calls = reference_img2img(
        name, model, init, steps, strength, seeds, prediction_type, noise=ref_noise, label=label
    )
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= tol
    assert counting.calls == calls == img2img_model_evals(engine_name, SCHEDULE, steps, strength)
    for a, b in zip(ours_noise.generators, ref_noise.generators, strict=True):
        assert torch.equal(a.get_state(), b.get_state())  # the same draws from each image's stream


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_samplers_match_kdiffusion_across_strengths(name: str, prediction_type: str) -> None:
    model = toy_model(SCHEDULE, prediction_type)
    for steps, strength in ((12, 1.0), (12, 0.6), (5, 0.3)):
        _check(name, model, init_latent(), steps, strength, prediction_type=prediction_type)


@pytest.mark.parametrize(("steps", "strength"), [(20, 1.0), (30, 0.8), (36, 1.0), (44, 0.9)])
def test_restart_with_restart_segments_matches_a1111_method(steps: int, strength: float) -> None:
    """From 20 sampler steps Restart walks back up: 9 levels once, from 36 steps steps // 4 levels twice."""
    sigmas = full_sigmas(SamplerName("Restart"), SCHEDULE, steps)
    sliced = [float(v) for v in sigmas[steps - int(min(strength, 0.999) * steps) - 1 :]]
    plan = restart_steps(sliced)
    jumps = [i for i in range(1, len(plan)) if plan[i][0] > plan[i - 1][1]]
    n = len(sliced) - 1
    assert len(plan) == n
    assert len(jumps) >= (2 if n >= 36 else 1)
    _check("Restart", toy_model(SCHEDULE), init_latent(), steps, strength)


SCHEDULE_CASES = [
    ("DPM++ 2M SDE", "SGM Uniform"),
    ("DPM++ 2M SDE Heun", "Beta"),
    ("DPM++ 3M SDE", "KL Optimal"),
    ("DPM++ SDE", "Normal"),
    ("DPM++ 2M", "Align Your Steps"),
    ("Euler a", "Simple"),
    ("DPM2 a", "DDIM"),
    ("LMS", "Polyexponential"),
    ("Restart", "Exponential"),
    ("DPM fast", "Karras"),
    ("Heun", "KL Optimal"),
]


@pytest.mark.parametrize(("name", "label"), SCHEDULE_CASES)
def test_samplers_with_schedule_types_match_kdiffusion(name: str, label: str) -> None:
    tol = 1e-5 if name == "DPM fast" else 1e-10  # k-diffusion's DPM fast grid is a float32 linspace
    _check(name, toy_model(SCHEDULE), init_latent(), 15, 0.8, label=label, tol=tol)


@pytest.mark.parametrize("model", ["sd15", "sdxl"])
@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_samplers_match_kdiffusion_on_tiny_unets(name: str, model: str) -> None:
    unet = tiny_unet_fn() if model == "sd15" else tiny_sdxl_unet_fn()
    _check(name, unet, init_latent(batch=1, size=16), 6, 0.8)


def test_restart_on_tiny_sdxl_unet_with_restarts() -> None:
    _check("Restart", tiny_sdxl_unet_fn(), init_latent(batch=1, size=16), 20, 1.0)


def test_executor_folds_the_schedule_type_in_and_writes_it_to_infotext(tiny_models_dir: Path) -> None:
    """``DPM++ 2M`` with "Automatic" is A1111 1.9's DPM++ 2M Karras: the same pixels as the legacy name, and the
    infotext reads "Sampler: DPM++ 2M, Schedule type: Karras"."""
    executor = DiffusersExecutor(Settings(models_dir=tiny_models_dir, torch_threads=1), ModelRegistry(tiny_models_dir))
    rng = np.random.default_rng(0)
    job = GenerationJob(
        checkpoint="tiny-sd15.safetensors",
        init_image=Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)),
        prompt="a red house",
        negative_prompt="blurry",
        width=64,
        height=64,
        image_num=1,
        steps=4,
        guidance_scale=7.0,
        sampler_name=SamplerName("DPM++ 2M"),
        seed=3,
        strength=0.75,
    )
    automatic = replace(job, scheduler=SchedulerName("Automatic"))
    assert batch_key(automatic) == batch_key(replace(job, sampler_name=SamplerName("DPM++ 2M Karras")))
    assert batch_key(automatic) != batch_key(job)
    (new,) = executor.generate(automatic)
    (legacy,) = executor.generate(replace(job, sampler_name=SamplerName("DPM++ 2M Karras")))
    (uniform,) = executor.generate(job)
    assert np.array_equal(np.asarray(new.image), np.asarray(legacy.image))
    assert not np.array_equal(np.asarray(new.image), np.asarray(uniform.image))
    assert "Sampler: DPM++ 2M, Schedule type: Karras," in new.infotext
    assert "Sampler: DPM++ 2M Karras," in legacy.infotext
    assert "Schedule type" not in legacy.infotext
