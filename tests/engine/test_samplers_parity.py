"""Numerical parity of the 20 samplers with independent references on the same model and the same noise.

* 17 sigma samplers: k-diffusion (pip package) with A1111's argument rules, float64. Same order of operations
  gives agreement at rounding level (measured <= 4e-16, asserted <= 1e-10). DPM fast: k-diffusion builds its lambda
  grid with a float32 linspace (and A1111 passes float32 sigma bounds), ours is float64: agreement at float32
  level (measured 4e-7, asserted <= 1e-5). DPM adaptive: k-diffusion keeps atol/rtol as float32 tensors, so its
  accept/reject decisions round at float32 (measured 3e-9 on the toy model and 1.6e-7 on the tiny UNet with
  AVX-512 kernels; asserted <= 1e-6, a few float32 ulps).
* DDIM / PLMS (A1111 >= 1.6 = the ldm samplers without their last step): diffusers DDIMScheduler/PNDMScheduler
  with the ldm config, driven over the same timesteps. diffusers computes its scalar coefficients in float32, so
  agreement is at float32 level (measured ~1e-7; asserted <= 2e-6).
* UniPC: diffusers UniPCMultistepScheduler(order 3, bh1, sigma_min final, linspace). Its timesteps are rounded to
  integers while A1111's continuous grid is fractional, so the step counts 3, 9 and 27 (integer grids,
  999 / N integral) are compared (measured ~1e-7; asserted <= 2e-6). The img2img path (the one the API uses) is
  compared the same way at the (steps, strength) pairs whose grid falls on whole timesteps, with diffusers driven
  over A1111's timestep list.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, UniPCMultistepScheduler
from tests.support.samplers import (
    K_NAMES,
    SCHEDULE,
    SEEDS,
    CountingModel,
    init_latent,
    reference_img2img,
    rel_err,
    sampler_names,
    tiny_unet_fn,
    toy_model,
)
from torch import Tensor

from underpaint.engine.samplers import (
    NoiseSource,
    img2img_model_evals,
    img2img_timesteps,
    make_eps_fn,
    sample_img2img,
)
from underpaint.engine.samplers import timestep_samplers as tsm
from underpaint.vocabulary import SamplerName

pytestmark = pytest.mark.parity


def _tol(name: str) -> float:
    if name == "DPM fast":
        return 1e-5  # reference lambda grid in float32 (see module docstring)
    if name == "DPM adaptive":
        return 1e-6  # reference error tolerances atol/rtol are float32 tensors (a few float32 ulps)
    return 1e-10


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", K_NAMES)
def test_sigma_samplers_match_kdiffusion(name: SamplerName, prediction_type: str) -> None:
    model = toy_model(SCHEDULE, prediction_type)
    init = init_latent()
    counting = CountingModel(model)
    our_noise, ref_noise = NoiseSource(SEEDS), NoiseSource(SEEDS)
    ours = sample_img2img(name, counting, SCHEDULE, init, 10, 0.75, our_noise, prediction_type=prediction_type)
    ref, ref_calls = reference_img2img(name, model, init, 10, 0.75, SEEDS, prediction_type, noise=ref_noise)
    assert torch.isfinite(ours).all()
    assert rel_err(ours, ref) <= _tol(name)
    assert counting.calls == ref_calls
    # Per-image streams end in the same state as A1111's (incl. the unused per-step draws of Euler/Heun/DPM2).
    for ours_gen, ref_gen in zip(our_noise.generators, ref_noise.generators, strict=True):
        assert torch.equal(ours_gen.get_state(), ref_gen.get_state())
    expected = img2img_model_evals(name, SCHEDULE, 10, 0.75)
    if expected is not None:
        assert counting.calls == expected


@pytest.mark.parametrize("strength", [1.0, 0.5, 0.12, 0.01])
@pytest.mark.parametrize("name", sampler_names("Euler a", "DPM2 a Karras", "DPM++ SDE Karras", "DPM fast", "LMS"))
def test_sigma_samplers_match_kdiffusion_across_strengths(name: SamplerName, strength: float) -> None:
    model = toy_model(SCHEDULE)
    init = init_latent(batch=1)
    ours = sample_img2img(name, model, SCHEDULE, init, 8, strength, NoiseSource(SEEDS[:1]))
    if name == "DPM fast" and int(strength * 8) == 0:
        # One sigma step: sigma_min == sigma_max, where k-diffusion raises; we return the noised latent.
        sigma = float(SCHEDULE.get_sigmas(8)[7])
        assert torch.equal(ours, init + NoiseSource(SEEDS[:1]).randn_like(init) * sigma)
        return
    ref, _ = reference_img2img(name, model, init, 8, strength, SEEDS[:1])
    assert rel_err(ours, ref) <= _tol(name)


@pytest.mark.parametrize(
    ("name", "prediction_type"),
    [
        ("Euler a", "epsilon"),
        ("DPM++ 2M Karras", "epsilon"),
        ("DPM++ SDE", "epsilon"),
        ("DPM2 a", "epsilon"),
        ("DPM adaptive", "epsilon"),
        ("DPM++ 2S a", "v_prediction"),
        ("LMS Karras", "v_prediction"),
    ],
)
def test_sigma_samplers_match_kdiffusion_on_tiny_unet(name: SamplerName, prediction_type: str) -> None:
    unet = tiny_unet_fn()
    init = init_latent(batch=1, size=16)
    ours = sample_img2img(name, unet, SCHEDULE, init, 6, 0.8, NoiseSource(SEEDS[:1]), prediction_type=prediction_type)
    ref, _ = reference_img2img(name, unet, init, 6, 0.8, SEEDS[:1], prediction_type)
    assert rel_err(ours, ref) <= _tol(name)


# --- DDIM / PLMS / UniPC ----------------------------------------------------------------------------------------


def _ldm_scheduler_kwargs() -> dict[str, object]:
    return {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


def _use_ldm_alphas(scheduler: Any) -> None:
    # diffusers builds alphas_cumprod in float32 from the start; use the ldm-built table of the schedule.
    scheduler.alphas_cumprod = SCHEDULE.alphas_cumprod.clone()
    scheduler.final_alpha_cumprod = SCHEDULE.alphas_cumprod[0].clone()


def _call(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: int) -> Tensor:
    return model(x, torch.full((x.shape[0],), float(t), dtype=x.dtype))


def _noised(name: SamplerName, steps: int, strength: float) -> tuple[Tensor, list[int]]:
    init = init_latent()
    ts_sched, t_noise = img2img_timesteps(name, steps, strength)
    first = NoiseSource(SEEDS).randn_like(init)
    abar = float(SCHEDULE.alphas_cumprod[t_noise])
    return init * abar**0.5 + first * (1 - abar) ** 0.5, ts_sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("strength", [1.0, 0.75, 0.3])
def test_ddim_matches_diffusers_ldm_config(strength: float, prediction_type: str) -> None:
    model = toy_model(SCHEDULE, prediction_type)
    steps = 12
    ours = sample_img2img(
        SamplerName("DDIM"),
        model,
        SCHEDULE,
        init_latent(),
        steps,
        strength,
        NoiseSource(SEEDS),
        prediction_type=prediction_type,
    )
    x, ts_sched = _noised(SamplerName("DDIM"), steps, strength)
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
    # A1111 >= 1.6 runs timesteps[:t_enc] from the top down to timesteps[1]; diffusers steps t -> t - 1000 // N.
    for t in reversed(ts_sched[1:]):
        x = ref.step(_call(model, x, t), t, x).prev_sample
    assert rel_err(ours, x) <= 2e-6


@pytest.mark.parametrize("strength", [1.0, 0.75, 0.3])
def test_plms_matches_diffusers_ldm_config(strength: float) -> None:
    model = toy_model(SCHEDULE)
    steps = 12
    ours = sample_img2img(SamplerName("PLMS"), model, SCHEDULE, init_latent(), steps, strength, NoiseSource(SEEDS))
    x, ts_sched = _noised(SamplerName("PLMS"), steps, strength)
    ref: Any = PNDMScheduler(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        **_ldm_scheduler_kwargs(),
        timestep_spacing="leading",
        steps_offset=1,
        set_alpha_to_one=False,
        skip_prk_steps=True,
    )
    _use_ldm_alphas(ref)
    ref.set_timesteps(steps)
    desc = list(reversed(ts_sched))
    # PNDM's improved-Euler start evaluates the model twice: at t and at the provisional point t_prev.
    sequence = [desc[0], desc[1], *desc[1:-1]]
    for t in sequence:
        x = ref.step(_call(model, x, t), t, x).prev_sample
    assert rel_err(ours, x) <= 2e-6


@pytest.mark.parametrize("steps", [3, 9, 27])
def test_unipc_matches_diffusers_on_integer_grids(steps: int) -> None:
    model = toy_model(SCHEDULE)
    x_t = NoiseSource(SEEDS).randn_like(init_latent())
    ours = tsm.unipc(make_eps_fn(model, SCHEDULE), x_t, steps, SCHEDULE, lambda _: None)
    ref: Any = UniPCMultistepScheduler(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        **_ldm_scheduler_kwargs(),
        solver_order=3,
        solver_type="bh1",
        final_sigmas_type="sigma_min",
        timestep_spacing="linspace",
        lower_order_final=True,
        predict_x0=True,
    )
    ref.set_timesteps(steps)
    x = x_t.clone()
    for t in ref.timesteps:
        x = ref.step(_call(model, x, int(t)), t, x).prev_sample
    assert rel_err(ours, x) <= 2e-6


def _drive_over(scheduler: Any, timesteps: list[int]) -> None:
    """Point a diffusers multistep scheduler at an explicit descending timestep list (the final sigma: abar[0]'s)."""
    scheduler.set_timesteps(len(timesteps))  # resets the multistep history
    abar = scheduler.alphas_cumprod
    sigmas = [((1 - abar[t]) / abar[t]) ** 0.5 for t in timesteps] + [((1 - abar[0]) / abar[0]) ** 0.5]
    scheduler.timesteps = torch.tensor(timesteps, dtype=torch.int64)
    scheduler.sigmas = torch.tensor([float(v) for v in sigmas], dtype=torch.float32)
    scheduler.num_inference_steps = len(timesteps)


# (steps, strength) where A1111's img2img UniPC grid falls on whole timesteps: it runs t_enc steps, time-uniform,
# from timestep ts[t_enc - 1] down to 0, so ts[t_enc - 1] = (t_enc - 1) * (1000 // steps) + 1 must divide by t_enc.
UNIPC_IMG2IMG = [(4, 0.75), (10, 0.1), (10, 0.3), (10, 0.9), (20, 0.35), (25, 0.52)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize(("steps", "strength"), UNIPC_IMG2IMG)
def test_unipc_img2img_matches_diffusers_over_a1111_timesteps(
    steps: int, strength: float, prediction_type: str
) -> None:
    """The img2img path the API uses, end to end: noised to abar[ts[t_enc]], then UniPC over A1111's grid, against
    diffusers' UniPCMultistepScheduler (order 3, bh1, data prediction, lower order at the end) driven over the same
    whole timesteps."""
    model = toy_model(SCHEDULE, prediction_type)
    counting = CountingModel(model)
    ours = sample_img2img(
        SamplerName("UniPC"),
        counting,
        SCHEDULE,
        init_latent(),
        steps,
        strength,
        NoiseSource(SEEDS),
        prediction_type=prediction_type,
    )
    x, ts_sched = _noised(SamplerName("UniPC"), steps, strength)
    t_enc, top = len(ts_sched), ts_sched[-1]
    assert top % t_enc == 0
    grid = [top - k * (top // t_enc) for k in range(t_enc)]  # A1111's time-uniform grid, without its end (0)
    ref: Any = UniPCMultistepScheduler(  # type: ignore[no-untyped-call]  # diffusers' __init__ is unannotated
        **_ldm_scheduler_kwargs(),
        solver_order=3,
        solver_type="bh1",
        final_sigmas_type="sigma_min",
        lower_order_final=True,
        predict_x0=True,
        prediction_type=prediction_type,
    )
    _use_ldm_alphas(ref)
    _drive_over(ref, grid)
    for t in grid:
        x = ref.step(_call(model, x, t), t, x).prev_sample
    assert counting.calls == t_enc
    assert rel_err(ours, x) <= 2e-6


def test_v_prediction_alpha_follows_unipc_continuous_schedule() -> None:
    """v -> eps needs alpha at UniPC's fractional grid times: log alpha linear between whole timesteps (A1111's
    discrete NoiseScheduleVP), never the alpha of the truncated timestep."""
    from underpaint.engine.samplers.denoiser import vp_alpha_cumprod

    vp = tsm._ContinuousVP(SCHEDULE)
    for t in (0.0, 1.0, 166.99999999997, 250.5, 998.25):
        alpha, _, _ = vp.alpha_sigma_lambda((t + 1) / 1000)
        assert vp_alpha_cumprod(SCHEDULE, t) == pytest.approx(alpha**2, rel=1e-9)
    assert vp_alpha_cumprod(SCHEDULE, 167.0) == SCHEDULE.alpha_cumprod(167)
    assert vp_alpha_cumprod(SCHEDULE, 166.99999999997) == pytest.approx(SCHEDULE.alpha_cumprod(167), rel=1e-9)


def test_unipc_img2img_starts_one_grid_step_below_the_noise_level() -> None:
    """A1111 >= 1.6: noise to abar[ts[t_enc]], start UniPC at continuous t = ts[t_enc - 1] / 1000 + 1/1000."""
    seen: list[float] = []

    def record(x: Tensor, t: Tensor) -> Tensor:
        seen.append(float(t[0]))
        return toy_model(SCHEDULE)(x, t)

    out = sample_img2img(SamplerName("UniPC"), record, SCHEDULE, init_latent(), 20, 0.5, NoiseSource(SEEDS))
    ts_sched, t_noise = img2img_timesteps(SamplerName("UniPC"), 20, 0.5)
    assert (ts_sched[-1], t_noise) == (451, 501)
    assert seen[0] == pytest.approx(451.0, abs=1e-9)
    assert seen[-1] > 0  # no corrector evaluation at the final point t = 1/1000
    assert len(seen) == len(ts_sched) == 10
    assert torch.isfinite(out).all()


def test_ddim_on_tiny_unet_matches_diffusers() -> None:
    unet = tiny_unet_fn()
    init = init_latent(batch=1, size=16)
    ours = sample_img2img(SamplerName("DDIM"), unet, SCHEDULE, init, 6, 0.9, NoiseSource(SEEDS[:1]))
    ts_sched, t_noise = img2img_timesteps(SamplerName("DDIM"), 6, 0.9)
    abar = float(SCHEDULE.alphas_cumprod[t_noise])
    x = init * abar**0.5 + NoiseSource(SEEDS[:1]).randn_like(init) * (1 - abar) ** 0.5
    ref: Any = DDIMScheduler(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        **_ldm_scheduler_kwargs(), timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False, clip_sample=False
    )
    _use_ldm_alphas(ref)
    ref.set_timesteps(6)
    for t in reversed(ts_sched[1:]):
        x = ref.step(_call(unet, x, t), t, x).prev_sample
    assert rel_err(ours, x) <= 2e-6
