"""Sampler schedules, img2img slicing, model-evaluation counts, names, batch/seed semantics, progress, cancel."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tests.support.samplers import (
    SCHEDULE,
    CountingModel,
    init_latent,
    kdiffusion,
    reference_sigmas,
    sampler_names,
    toy_model,
)
from torch import Tensor

from underpaint.engine.job import JobCancelled
from underpaint.engine.samplers import (
    SAMPLER_NAMES,
    DiscreteSchedule,
    NoiseSource,
    expected_model_evals,
    full_sigmas,
    img2img_model_evals,
    img2img_sigmas,
    img2img_steps,
    img2img_t_enc,
    img2img_timesteps,
    make_denoiser,
    sample,
    sample_img2img,
)
from underpaint.engine.samplers.timestep_samplers import uniform_timesteps
from underpaint.vocabulary import SamplerName, normalize_sampler_name

SIGMA_NAMES = [n for n in SAMPLER_NAMES if n not in ("DDIM", "PLMS", "UniPC")]

# --- schedule ---------------------------------------------------------------------------------------------------


def test_schedule_is_built_the_ldm_way() -> None:
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    expected = torch.from_numpy(np.cumprod(1.0 - betas)).to(torch.float32)
    assert torch.equal(SCHEDULE.alphas_cumprod, expected)
    assert SCHEDULE.sigma_min == pytest.approx(0.0292, abs=1e-4)
    assert SCHEDULE.sigma_max == pytest.approx(14.6146, abs=1e-4)
    assert bool((SCHEDULE.sigmas[1:] > SCHEDULE.sigmas[:-1]).all())


@pytest.mark.parametrize("name", SIGMA_NAMES)
@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 37])
def test_full_sigmas_equal_kdiffusion_helpers_with_a1111_rules(name: SamplerName, steps: int) -> None:
    ours = full_sigmas(name, SCHEDULE, steps)
    assert torch.equal(ours, reference_sigmas(name, steps))
    assert len(ours) == steps + 1
    assert float(ours[-1]) == 0.0


def test_default_karras_and_discard_schedules_have_the_a1111_shape() -> None:
    default = full_sigmas(SamplerName("Euler"), SCHEDULE, 20)
    assert float(default[0]) == pytest.approx(14.6146, abs=1e-4)
    assert [round(float(s), 4) for s in default[1:3]] == [10.7468, 8.0815]
    karras = full_sigmas(SamplerName("DPM++ 2M Karras"), SCHEDULE, 20)
    assert float(karras[0]) == pytest.approx(SCHEDULE.sigma_max, rel=1e-6)
    assert float(karras[-2]) == pytest.approx(SCHEDULE.sigma_min, rel=1e-6)
    # Discard: built for 21 steps and the penultimate (smallest positive) sigma dropped.
    dpm2 = full_sigmas(SamplerName("DPM2"), SCHEDULE, 20)
    built = SCHEDULE.get_sigmas(21)
    assert torch.equal(dpm2, torch.cat([built[:-2], built[-1:]]))
    assert float(dpm2[-2]) > float(SCHEDULE.get_sigmas(20)[-2])


def test_sigma_to_t_matches_kdiffusion_interpolation() -> None:
    _, external = kdiffusion()
    wrap = external.CompVisDenoiser(type("M", (), {"alphas_cumprod": SCHEDULE.alphas_cumprod})())
    sigmas = torch.tensor([0.01, 0.0292, 0.05, 0.5, 1.0, 3.3, 10.0, 14.6146, 20.0], dtype=torch.float64)
    ref = wrap.sigma_to_t(sigmas)
    ours = torch.tensor([SCHEDULE.sigma_to_t(float(s)) for s in sigmas], dtype=torch.float64)
    # k-diffusion takes the interpolation denominator in float32; agreement to ~1e-7 timesteps.
    assert torch.allclose(ours, ref, rtol=0, atol=1e-5)
    assert ours[0] == 0.0
    assert ours[-1] == 999.0
    for t in (0.0, 1.5, 410.25, 998.75, 999.0):
        assert SCHEDULE.sigma_to_t(SCHEDULE.t_to_sigma(t)) == pytest.approx(t, abs=1e-6)


def test_schedule_rejects_bad_tables() -> None:
    with pytest.raises(ValueError, match="alphas_cumprod must be strictly decreasing"):
        DiscreteSchedule(torch.tensor([0.9, 0.95, 0.5]))
    with pytest.raises(ValueError, match="alphas_cumprod must lie strictly between 0 and 1"):
        DiscreteSchedule(torch.tensor([1.0, 0.5]))
    with pytest.raises(ValueError, match="unsupported beta_schedule 'cosine'"):
        DiscreteSchedule.from_betas(beta_schedule="cosine")
    with pytest.raises(ValueError, match=r"timestep 1000\.0 outside"):
        SCHEDULE.t_to_sigma(1000.0)


# --- img2img slicing --------------------------------------------------------------------------------------------

STRENGTHS = [0.0, 0.01, 0.05, 0.3, 0.5, 0.55, 0.75, 0.999, 1.0]


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 37])
@pytest.mark.parametrize("strength", STRENGTHS)
def test_img2img_sigmas_slice_t_enc_plus_one_steps(steps: int, strength: float) -> None:
    t_enc = int(min(strength, 0.999) * steps)
    for name in sampler_names("Euler a", "DPM2 a Karras", "DPM++ 2M Karras"):
        sched = img2img_sigmas(name, SCHEDULE, steps, strength)
        full = full_sigmas(name, SCHEDULE, steps)
        assert len(sched) == t_enc + 1 + 1
        assert torch.equal(sched, full[len(full) - len(sched) :])
        assert img2img_steps(name, SCHEDULE, steps, strength) == t_enc + 1


def test_img2img_examples_from_the_spec() -> None:
    # N=20, d=0.5: t_enc=10, 11 steps starting at sigmas[9]; d=1.0: 20 steps from sigma_max; d=0.75: 16 steps.
    full = full_sigmas(SamplerName("Euler"), SCHEDULE, 20)
    assert img2img_t_enc(20, 0.5) == 10
    assert torch.equal(img2img_sigmas(SamplerName("Euler"), SCHEDULE, 20, 0.5), full[9:])
    assert torch.equal(img2img_sigmas(SamplerName("Euler"), SCHEDULE, 20, 1.0), full)
    assert len(img2img_sigmas(SamplerName("Euler"), SCHEDULE, 20, 0.75)) - 1 == 16
    assert img2img_t_enc(20, 0.04) == 0
    assert len(img2img_sigmas(SamplerName("Euler"), SCHEDULE, 20, 0.04)) == 2


def test_uniform_timesteps_and_img2img_timesteps() -> None:
    assert uniform_timesteps(20) == list(range(1, 1000, 50))
    assert uniform_timesteps(3) == [1, 334, 667, 999]  # 999 = clip(1000)
    ts, t_noise = img2img_timesteps(SamplerName("DDIM"), 20, 0.75)
    assert ts == list(range(1, 751, 50))
    assert t_noise == 751
    ts, t_noise = img2img_timesteps(SamplerName("PLMS"), 20, 1.0)
    assert len(ts) == 19
    assert t_noise == 951
    assert len(uniform_timesteps(1000)) == 1000
    with pytest.raises(ValueError, match="between 1 and 1000"):
        img2img_timesteps(SamplerName("DDIM"), 1001, 0.5)


@pytest.mark.parametrize("bad", [(0, 0.5, "steps"), (-3, 0.5, "steps"), (10, -0.1, "strength"), (10, 1.5, "strength")])
def test_bad_steps_or_strength_raise_value_error(bad: tuple[int, float, str]) -> None:
    steps, strength, field = bad
    with pytest.raises(ValueError, match=f"^{field} must be"):
        sample_img2img(
            SamplerName("Euler"), toy_model(SCHEDULE), SCHEDULE, init_latent(), steps, strength, NoiseSource([1, 2])
        )


# --- model evaluations per step --------------------------------------------------------------------------------

# Spec table 1a (A1111, N sampler steps): first order N, second order 2N-1; DDIM >= 1.6 makes one step fewer
# than its timesteps, PLMS spends one extra evaluation on its first step, UniPC one per step.
SPEC_NFE = {
    "Euler a": lambda n: n,
    "Euler": lambda n: n,
    "LMS": lambda n: n,
    "Heun": lambda n: 2 * n - 1,
    "DPM2": lambda n: 2 * n - 1,
    "DPM2 a": lambda n: 2 * n - 1,
    "DPM++ 2S a": lambda n: 2 * n - 1,
    "DPM++ 2M": lambda n: n,
    "DPM++ SDE": lambda n: 2 * n - 1,
    "DPM fast": lambda n: n,
    "LMS Karras": lambda n: n,
    "DPM2 Karras": lambda n: 2 * n - 1,
    "DPM2 a Karras": lambda n: 2 * n - 1,
    "DPM++ 2S a Karras": lambda n: 2 * n - 1,
    "DPM++ 2M Karras": lambda n: n,
    "DPM++ SDE Karras": lambda n: 2 * n - 1,
    **{f"DPM++ {m} SDE{v}": (lambda n: n) for m in ("2M", "3M") for v in ("", " Karras", " Exponential")},
    **{f"DPM++ 2M SDE Heun{v}": (lambda n: n) for v in ("", " Karras", " Exponential")},
    "Restart": lambda n: 2 * n - 1,  # restart walks replace schedule steps one for one
}


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_model_evaluations_per_name(name: SamplerName) -> None:
    steps, strength = 20, 0.75  # t_enc = 15: 16 sigma steps, 15 timesteps
    counting = CountingModel(toy_model(SCHEDULE))
    sample_img2img(name, counting, SCHEDULE, init_latent(batch=1), steps, strength, NoiseSource([7]))
    expected = img2img_model_evals(name, SCHEDULE, steps, strength)
    if name == "DPM adaptive":
        assert expected is None
        assert counting.calls > 0
        assert counting.calls % 3 == 0
    elif name in SPEC_NFE:
        assert counting.calls == expected == SPEC_NFE[name](16)
    else:
        assert counting.calls == expected == {"DDIM": 14, "PLMS": 15, "UniPC": 15}[name]


def test_expected_model_evals_for_txt2img_counts_of_the_spec() -> None:
    # Spec section 5, N = 20 txt2img: 20 / 39 / DDIM 19 / PLMS 20 / UniPC 20 (timesteps samplers get 20 timesteps).
    assert expected_model_evals(SamplerName("Euler a"), 20) == 20
    assert expected_model_evals(SamplerName("DPM++ SDE Karras"), 20) == 39
    assert expected_model_evals(SamplerName("DDIM"), 20) == 19
    assert expected_model_evals(SamplerName("PLMS"), 20) == 20
    assert expected_model_evals(SamplerName("UniPC"), 20) == 20
    assert expected_model_evals(SamplerName("DPM adaptive"), 20) is None


# --- names ------------------------------------------------------------------------------------------------------


def test_sampler_names_are_the_twenty_in_spec_order_then_a1111_16s_ten() -> None:
    assert len(SAMPLER_NAMES) == 30
    assert len(set(SAMPLER_NAMES)) == 30
    assert SAMPLER_NAMES[:3] == ("Euler a", "Euler", "LMS")
    assert SAMPLER_NAMES[17:20] == ("DDIM", "PLMS", "UniPC")
    assert SAMPLER_NAMES[20] == "DPM++ 2M SDE"
    assert SAMPLER_NAMES[-1] == "Restart"


def test_normalize_sampler_name() -> None:
    for name in SAMPLER_NAMES:
        assert normalize_sampler_name(name) == name
        assert normalize_sampler_name(f"  {name.upper()} ") == name
    assert normalize_sampler_name("dpm++  2m   karras") == "DPM++ 2M Karras"
    assert normalize_sampler_name("DPM++ Karras") == "DPM++ 2M Karras"
    assert normalize_sampler_name("dpm++ 2m sde karras") == "DPM++ 2M SDE Karras"
    assert normalize_sampler_name("DPM++ SDE exponential") == "DPM++ SDE Exponential"  # A1111 >= 1.9 suffix
    assert normalize_sampler_name("DPM++ 4M SDE") is None
    assert normalize_sampler_name("euler_a") == "Euler a"  # "_" and "-" read as spaces
    assert normalize_sampler_name("") is None
    with pytest.raises(ValueError, match="unknown sampler"):
        sample_img2img(
            SamplerName("Euler b"), toy_model(SCHEDULE), SCHEDULE, init_latent(), 10, 0.5, NoiseSource([1, 2])
        )


def test_bare_dpmpp_2m_is_uniform_and_karras_only_with_suffix() -> None:
    assert torch.equal(full_sigmas(SamplerName("DPM++ 2M"), SCHEDULE, 20), SCHEDULE.get_sigmas(20))
    assert torch.equal(full_sigmas(SamplerName("DPM++ 2M Karras"), SCHEDULE, 20), SCHEDULE.get_sigmas_karras(20))


# --- noise, seeds, batches --------------------------------------------------------------------------------------


def test_initial_noise_is_each_generators_first_draw() -> None:
    seen: list[Tensor] = []

    def record(x: Tensor, t: Tensor) -> Tensor:
        seen.append(x.clone())
        return toy_model(SCHEDULE)(x, t)

    init = init_latent(batch=2)
    sample_img2img(SamplerName("Euler"), record, SCHEDULE, init, 10, 1.0, NoiseSource([11, 12]))
    sigma0 = float(full_sigmas(SamplerName("Euler"), SCHEDULE, 10)[0])
    noise = (seen[0] * math.sqrt(sigma0**2 + 1) - init) / sigma0
    for i, seed in enumerate([11, 12]):
        first = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(seed)).double()
        assert torch.allclose(noise[i], first, atol=1e-9)


def test_noise_source_draws_per_image_float32_on_cpu() -> None:
    x = torch.zeros(2, 4, 3, 3, dtype=torch.float64)
    a = NoiseSource([5, 6]).randn_like(x)
    b = torch.stack([torch.randn((4, 3, 3), generator=torch.Generator().manual_seed(s)) for s in (5, 6)])
    assert a.dtype == torch.float64
    assert torch.equal(a, b.double())
    with pytest.raises(ValueError, match="batch size 2 does not match the 1 seeds"):
        NoiseSource([5]).randn_like(x)
    with pytest.raises(ValueError, match="NoiseSource needs at least one seed"):
        NoiseSource([])
    with pytest.raises(ValueError, match="seeds must be non-negative integers, got -1"):
        NoiseSource([-1])


@pytest.mark.parametrize("name", sampler_names("Euler a", "DPM++ SDE Karras", "DPM2 a", "DPM fast", "DDIM", "UniPC"))
def test_batch_of_four_equals_four_single_runs(name: SamplerName) -> None:
    model = toy_model(SCHEDULE)
    init = init_latent(batch=4)
    seed = 4242
    batch = sample_img2img(name, model, SCHEDULE, init, 8, 0.7, NoiseSource([seed + i for i in range(4)]))
    for i in range(4):
        single = sample_img2img(name, model, SCHEDULE, init[i : i + 1], 8, 0.7, NoiseSource([seed + i]))
        assert torch.allclose(batch[i : i + 1], single, rtol=0, atol=1e-12)
    assert not torch.allclose(batch[0], batch[1])


def test_ancestral_noise_continues_the_image_stream() -> None:
    """Euler a with one step to sigma>0 then to 0 adds exactly the generator's second draw."""
    model = toy_model(SCHEDULE)
    init = init_latent(batch=1)
    sigmas = torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64)
    x = init + NoiseSource([3]).randn_like(init) * 2.0
    out = sample(SamplerName("Euler a"), make_denoiser(model, SCHEDULE), x, sigmas, NoiseSource([3]))
    # Same computation with the noise term removed, then compare the difference with the expected draw.
    gen = torch.Generator().manual_seed(3)
    gen_noise = torch.randn((4, 8, 8), generator=gen)  # what the fresh source's first draw is in `sample`
    denoise = make_denoiser(model, SCHEDULE)
    up = min(1.0, math.sqrt(1.0 * (4.0 - 1.0) / 4.0))
    down = math.sqrt(1.0 - up**2)
    x1 = x + (x - denoise(x, 2.0)) / 2.0 * (down - 2.0) + gen_noise.double() * up
    expected = x1 + (x1 - denoise(x1, 1.0)) / 1.0 * (0.0 - 1.0)
    assert torch.allclose(out, expected, atol=1e-12)


# --- progress, cancel, dtype ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sampler_names("Euler a", "Heun", "DPM fast", "DPM adaptive", "DDIM", "PLMS", "UniPC"))
def test_progress_callback_counts_sampler_steps(name: SamplerName) -> None:
    calls: list[tuple[int, int]] = []
    sample_img2img(
        name,
        toy_model(SCHEDULE),
        SCHEDULE,
        init_latent(batch=1),
        12,
        0.6,
        NoiseSource([1]),
        callback=lambda c, t: calls.append((c, t)),
    )
    total = img2img_steps(name, SCHEDULE, 12, 0.6)
    assert calls[-1] == (total, total)
    assert all(t == total for _, t in calls)
    done = [c for c, _ in calls]
    assert done == sorted(set(done))
    if name not in ("DPM fast", "DPM adaptive"):
        assert done == list(range(1, total + 1))


@pytest.mark.parametrize("name", sampler_names("Euler a", "DPM++ SDE", "DPM adaptive", "PLMS", "UniPC"))
def test_cancellation_is_checked_before_every_model_evaluation(name: SamplerName) -> None:
    counting = CountingModel(toy_model(SCHEDULE))

    def cancel() -> bool:
        return counting.calls >= 3

    with pytest.raises(JobCancelled):
        sample_img2img(name, counting, SCHEDULE, init_latent(batch=1), 20, 1.0, NoiseSource([1]), should_cancel=cancel)
    assert counting.calls == 3


def test_float16_latents_keep_their_dtype_and_stay_close_to_float32() -> None:
    model = toy_model(SCHEDULE)
    init = init_latent(batch=1, dtype=torch.float32)
    out32 = sample_img2img(SamplerName("DPM++ 2M Karras"), model, SCHEDULE, init, 10, 0.6, NoiseSource([9]))
    out16 = sample_img2img(SamplerName("DPM++ 2M Karras"), model, SCHEDULE, init.half(), 10, 0.6, NoiseSource([9]))
    assert out16.dtype == torch.float16
    assert float((out16.float() - out32).norm() / out32.norm()) < 1e-2


def test_prediction_type_is_validated() -> None:
    with pytest.raises(ValueError, match="prediction_type"):
        sample_img2img(
            SamplerName("Euler"),
            toy_model(SCHEDULE),
            SCHEDULE,
            init_latent(),
            10,
            0.5,
            NoiseSource([1, 2]),
            prediction_type="x0",
        )


@pytest.mark.parametrize(
    ("name", "draws"), [(SamplerName("DDIM"), 1 + 14), (SamplerName("PLMS"), 1), (SamplerName("UniPC"), 1)]
)
def test_timestep_samplers_consume_a1111_draws(name: SamplerName, draws: int) -> None:
    """A1111 >= 1.6 DDIM calls randn_like once per step even at eta 0; PLMS/UniPC draw only the initial noise."""
    noise = NoiseSource([21])
    sample_img2img(name, toy_model(SCHEDULE), SCHEDULE, init_latent(batch=1), 20, 0.75, noise)
    fresh = torch.Generator().manual_seed(21)
    for _ in range(draws):
        torch.randn((4, 8, 8), generator=fresh)
    assert torch.equal(noise.generators[0].get_state(), fresh.get_state())


@pytest.mark.parametrize("name", sampler_names("DDIM", "PLMS", "UniPC", "DPM fast", "DPM adaptive"))
def test_tiny_strength_returns_the_noised_latent_without_model_calls(name: SamplerName) -> None:
    counting = CountingModel(toy_model(SCHEDULE))
    init = init_latent(batch=1)
    steps, strength = 20, 0.06  # t_enc = 1
    if name in ("DPM fast", "DPM adaptive"):
        strength = 0.04  # t_enc = 0: a single sigma step
    out = sample_img2img(name, counting, SCHEDULE, init, steps, strength, NoiseSource([5]))
    first = NoiseSource([5]).randn_like(init)
    if name in ("DPM fast", "DPM adaptive"):
        expected = init + first * float(img2img_sigmas(name, SCHEDULE, steps, strength)[0])
    elif name == "UniPC":
        # t_enc = 1: one UniPC step from the noised latent, one evaluation.
        assert counting.calls == 1
        assert img2img_model_evals(name, SCHEDULE, steps, strength) == 1
        return
    else:
        _, t_noise = img2img_timesteps(name, steps, strength)
        abar = float(SCHEDULE.alphas_cumprod[t_noise])
        expected = init * abar**0.5 + first * (1 - abar) ** 0.5
    assert counting.calls == 0 == img2img_model_evals(name, SCHEDULE, steps, strength)
    assert torch.allclose(out, expected, atol=1e-12)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_prefetch_list_is_exactly_what_the_sampler_queries(karras: bool) -> None:
    from underpaint.engine.samplers import k_samplers

    sigmas = full_sigmas(SamplerName("DPM++ SDE Karras" if karras else "DPM++ SDE"), SCHEDULE, 9).tolist()[3:]
    asked: list[tuple[float, float]] = []

    def record(s: float, s_next: float) -> Tensor:
        asked.append((s, s_next))
        return torch.zeros(1, 4, 8, 8, dtype=torch.float64)

    denoise = make_denoiser(toy_model(SCHEDULE), SCHEDULE)
    k_samplers.dpmpp_sde(denoise, init_latent(batch=1), sigmas, record, lambda _: None)
    assert asked == k_samplers.dpmpp_sde_noise_queries(sigmas)
    assert len(asked) == 2 * (len(sigmas) - 2)


def test_brownian_noise_prefetch_gives_the_same_values_as_inline_queries() -> None:
    from underpaint.engine.samplers import BrownianNoise

    x = torch.zeros(2, 4, 8, 8)
    queries = [(14.0, 9.0), (14.0, 5.0), (5.0, 2.0), (5.0, 1.0), (1.0, 0.5)]
    inline = BrownianNoise(x, [3, 4], 0.1, 14.6)
    expected = [inline(*q) for q in queries]
    inline.close()
    pre = BrownianNoise(x, [3, 4], 0.1, 14.6)
    pre.prefetch(queries)
    got = [pre(*q) for q in queries]
    pre.close()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(expected[0][0], expected[0][1])  # per-image trees differ


def test_dpm_adaptive_stops_on_non_finite_model_output() -> None:
    def nan_model(x: Tensor, t: Tensor) -> Tensor:
        return torch.full_like(x, float("nan"))

    with pytest.raises(FloatingPointError):
        sample_img2img(
            SamplerName("DPM adaptive"), nan_model, SCHEDULE, init_latent(batch=1), 10, 0.5, NoiseSource([1])
        )
