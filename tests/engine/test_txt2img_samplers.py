"""txt2img sampling (A1111 >= 1.6) for every sampler name, against independent references on the same noise.

* 17 sigma samplers: k-diffusion with A1111's txt2img rules (``KDiffusionSampler.sample``): the first draw of each
  per-image generator times ``sigmas[0]``, every step of the full schedule; DPM fast / adaptive between the model's
  own sigma_min and sigma_max with ``n = steps``. Tolerances as the img2img parity tests (float64), but DPM adaptive
  at float32 level (k-diffusion takes the model's bounds as float32 tensors).
* DDIM / PLMS: diffusers' DDIMScheduler / PNDMScheduler with the ldm configuration, driven from the unit-variance
  first draw over A1111's full timestep list (A1111 >= 1.6 stops at timestep 1: one step fewer than ldm's).
* UniPC: diffusers' UniPCMultistepScheduler (order 3, bh1, data prediction) from the first draw, on the step
  counts whose continuous grid falls on whole timesteps.
* The hires fix's second pass (A1111's ``img2img_fix_steps``): k-diffusion over ``int(steps / min(d, 0.999))``
  sigmas with ``t_enc = steps - 1``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler
from tests.engine.test_samplers_parity import _call, _ldm_scheduler_kwargs, _tol, _use_ldm_alphas
from tests.support.samplers import (
    K_NAMES,
    SCHEDULE,
    SEEDS,
    CountingModel,
    init_latent,
    reference_img2img,
    reference_txt2img,
    rel_err,
    sampler_names,
    toy_model,
)

from underpaint.engine.samplers import (
    NoiseSource,
    expected_model_evals,
    hires_schedule,
    sample_img2img,
    sample_txt2img,
    txt2img_steps,
)
from underpaint.engine.samplers import timestep_samplers as tsm
from underpaint.vocabulary import SAMPLER_NAMES, SamplerName

SHAPE = (2, 4, 8, 8)


@pytest.mark.parity
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", K_NAMES)
def test_sigma_samplers_txt2img_match_kdiffusion(name: SamplerName, prediction_type: str) -> None:
    model = CountingModel(toy_model(SCHEDULE, prediction_type))
    steps = 7
    progress: list[tuple[int, int]] = []
    ours = sample_txt2img(
        name,
        model,
        SCHEDULE,
        SHAPE,
        steps,
        NoiseSource(SEEDS),
        prediction_type=prediction_type,
        callback=lambda done, total: progress.append((done, total)),
        dtype=torch.float64,
    )
    ref, ref_calls = reference_txt2img(name, toy_model(SCHEDULE, prediction_type), SHAPE, steps, SEEDS, prediction_type)
    assert model.calls == ref_calls
    if name != "DPM adaptive":
        assert model.calls == expected_model_evals(name, steps)
    # txt2img hands DPM adaptive the model's bounds, which k-diffusion turns into float32 tensors (``torch.tensor``
    # of A1111's Python floats): agreement at float32 level there (measured 1.1e-6), as for DPM fast.
    tol = 1e-5 if name == "DPM adaptive" else _tol(name)
    assert rel_err(ours, ref) <= tol
    assert progress[-1] == (txt2img_steps(name, steps), txt2img_steps(name, steps))


@pytest.mark.parametrize("name", sampler_names("Euler a", "DPM++ SDE Karras", "DPM fast", "DPM2 a"))
def test_image_i_of_a_txt2img_batch_is_the_single_run_with_seed_plus_i(name: SamplerName) -> None:
    model = toy_model(SCHEDULE)
    batch = sample_txt2img(name, model, SCHEDULE, SHAPE, 5, NoiseSource(SEEDS), dtype=torch.float64)
    for i, seed in enumerate(SEEDS):
        alone = sample_txt2img(name, model, SCHEDULE, (1, *SHAPE[1:]), 5, NoiseSource([seed]), dtype=torch.float64)
        assert rel_err(batch[i : i + 1], alone) <= 1e-12


def _first_draw() -> torch.Tensor:
    return NoiseSource(SEEDS).randn_like(torch.empty(SHAPE, dtype=torch.float64))


@pytest.mark.parity
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_txt2img_matches_diffusers_ldm_config(prediction_type: str) -> None:
    model = toy_model(SCHEDULE, prediction_type)
    steps = 12
    counting = CountingModel(model)
    ours = sample_txt2img(
        SamplerName("DDIM"),
        counting,
        SCHEDULE,
        SHAPE,
        steps,
        NoiseSource(SEEDS),
        prediction_type=prediction_type,
        dtype=torch.float64,
    )
    ref: Any = DDIMScheduler(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        **_ldm_scheduler_kwargs(),
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        clip_sample=False,
        prediction_type=prediction_type,
    )
    _use_ldm_alphas(ref)
    ref.set_timesteps(steps)
    timesteps = tsm.uniform_timesteps(steps)
    x = _first_draw()  # unit-variance noise, not scaled by any sigma
    for t in reversed(timesteps[1:]):
        x = ref.step(_call(model, x, t), t, x).prev_sample
    assert counting.calls == len(timesteps) - 1  # A1111's grid: 13 timesteps for 12 steps, 12 DDIM steps
    assert rel_err(ours, x) <= 2e-6


@pytest.mark.parity
def test_plms_txt2img_matches_diffusers_ldm_config() -> None:
    model = toy_model(SCHEDULE)
    steps = 12
    ours = sample_txt2img(SamplerName("PLMS"), model, SCHEDULE, SHAPE, steps, NoiseSource(SEEDS), dtype=torch.float64)
    ref: Any = PNDMScheduler(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        **_ldm_scheduler_kwargs(),
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    _use_ldm_alphas(ref)
    ref.set_timesteps(steps)
    desc = list(reversed(tsm.uniform_timesteps(steps)))
    x = _first_draw()
    for t in [desc[0], desc[1], *desc[1:-1]]:  # improved-Euler start: two evaluations
        x = ref.step(_call(model, x, t), t, x).prev_sample
    assert rel_err(ours, x) <= 2e-6


@pytest.mark.parametrize("steps", [3, 12, 20, 26])
def test_unipc_txt2img_takes_one_step_per_a1111_timestep(steps: int) -> None:
    """A1111 >= 1.6 hands UniPC ``len(timesteps)`` steps: 4 for 3 steps, 13 for 12, 20 for 20, 27 for 26."""
    counting = CountingModel(toy_model(SCHEDULE))
    sample_txt2img(SamplerName("UniPC"), counting, SCHEDULE, SHAPE, steps, NoiseSource(SEEDS))
    assert counting.calls == len(tsm.uniform_timesteps(steps)) == txt2img_steps(SamplerName("UniPC"), steps)


@pytest.mark.parity
def test_unipc_txt2img_matches_diffusers_on_an_integer_grid() -> None:
    """26 steps: A1111's 27 UniPC steps from t = 1 to 1/1000 fall on whole timesteps (999 / 27 = 37), where
    diffusers' integer timesteps coincide with the continuous grid."""
    model = toy_model(SCHEDULE)
    ours = sample_txt2img(SamplerName("UniPC"), model, SCHEDULE, SHAPE, 26, NoiseSource(SEEDS), dtype=torch.float64)
    ref: Any = UniPCMultistepScheduler(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        **_ldm_scheduler_kwargs(),
        solver_order=3,
        solver_type="bh1",
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        lower_order_final=True,
        predict_x0=True,
    )
    _use_ldm_alphas(ref)
    ref.set_timesteps(27)
    x = _first_draw()
    for t in ref.timesteps:
        x = ref.step(_call(model, x, int(t)), t, x).prev_sample
    assert rel_err(ours, x) <= 2e-6


def test_every_sampler_name_runs_txt2img() -> None:
    model = toy_model(SCHEDULE)
    for name in SAMPLER_NAMES:
        out = sample_txt2img(name, model, SCHEDULE, (1, 4, 8, 8), 4, NoiseSource(SEEDS[:1]))
        assert out.shape == (1, 4, 8, 8)
        assert torch.isfinite(out).all(), name


@pytest.mark.parametrize(("steps", "strength", "full"), [(20, 0.5, 40), (20, 0.7, 28), (10, 1.0, 10), (6, 0.3, 20)])
def test_hires_schedule_is_a1111_fix_steps(steps: int, strength: float, full: int) -> None:
    assert hires_schedule(steps, strength) == (full, steps - 1)
    with pytest.raises(ValueError, match="above 0"):
        hires_schedule(steps, 0.0)


@pytest.mark.parity
@pytest.mark.parametrize("name", sampler_names("Euler a", "DPM++ 2M Karras", "DPM2", "DPM++ SDE", "DPM fast"))
@pytest.mark.parametrize("strength", [0.5, 0.3, 1.0])
def test_hires_second_pass_runs_exactly_steps_steps_of_the_longer_schedule(name: SamplerName, strength: float) -> None:
    model = CountingModel(toy_model(SCHEDULE))
    steps = 6
    init = init_latent()
    ours = sample_img2img(name, model, SCHEDULE, init, steps, strength, NoiseSource(SEEDS), fix_steps=True)
    full, t_enc = hires_schedule(steps, strength)
    ref, calls = reference_img2img(name, toy_model(SCHEDULE), init, full, strength, SEEDS, t_enc=t_enc)
    assert model.calls == calls == expected_model_evals(name, steps)
    assert rel_err(ours, ref) <= max(_tol(name), 1e-6)
