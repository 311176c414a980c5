"""The A1111 sampler names and the img2img entry point used by the pipeline.

Name semantics follow A1111 v1.6 - v1.8 (before samplers and schedule types were split in v1.9): a bare name
uses A1111's *default* (uniform-in-t) sigma schedule and only a " Karras" / " Exponential" suffix selects another
(Restart walks a Karras schedule). So "DPM++ 2M" is uniform and "DPM++ 2M Karras" is Karras. A1111 >= 1.9's
"Schedule type" reaches the engine folded into the name ("DPM++ 2M" + Automatic = "DPM++ 2M Karras", "Euler a" +
SGM Uniform = "Euler a SGM Uniform": ``vocabulary.resolve_sampler``; the schedules are in ``sigma_schedules``).
Other fixed choices, matching A1111 defaults of that era:

* eta = 1 for every ancestral and SDE sampler and for DPM fast / DPM adaptive, s_noise = 1, s_churn = 0,
  eta-noise-seed-delta 0, no sigma quantization, fp32 alphas_cumprod (post-#14071 behaviour).
* DPM2, DPM2 a and DPM++ 3M SDE (any schedule) discard the penultimate sigma (schedule built for steps + 1).
* img2img: ``t_enc = int(min(strength, 0.999) * steps)``; the sampler runs ``sigmas[steps - t_enc - 1:]``
  (t_enc + 1 steps) from ``x = init_latent + noise * sigma_sched[0]``. DPM fast/adaptive integrate from
  ``sigma_sched[0]`` down to ``sigma_sched[-2]`` (they cannot reach sigma 0) with ``n = len(sigma_sched) - 1``.
* DPM++ SDE, DPM++ 2M SDE (midpoint or Heun) and DPM++ 3M SDE draw their noise from per-image Brownian trees
  seeded with the image seeds over [smallest positive sigma, largest sigma] of the full (un-sliced) schedule.
* Restart (A1111 >= 1.6): Heun steps; from 20 steps a shorter Karras schedule with restart segments that jump
  back up from sigma ~0.1 to ~2 with fresh noise from the per-image streams (``k_samplers.restart_steps``).
* DDIM / PLMS / UniPC follow A1111 >= v1.6 ("timesteps" samplers): grid ``clip(range(0,1000,1000//N)+1, 0, 999)``,
  img2img noises to ``abar[timesteps[t_enc]]`` and runs ``timesteps[:t_enc]``; DDIM and PLMS therefore make
  ``t_enc - 1`` steps and stop at abar[1]; UniPC (bh1, order 3, lower-order final, data prediction, time-uniform)
  starts at continuous time ``timesteps[t_enc - 1] / 1000 + 1/1000`` as A1111 does. Their output is the VP latent,
  which A1111 decodes as is. They ignore the schedule type, as in A1111.
* Euler/Heun/DPM2 (churn 0) and DDIM (eta 0) draw a noise tensor every step in A1111 and never use it. Nothing
  in the step depends on those draws, so instead of drawing per step the generators are advanced by the same count
  after sampling: the per-image streams end in A1111's state without per-step cost.

* Noise uses A1111's CPU randn source (per-image CPU generators, see ``noise``), not its default GPU source.
* DPM adaptive measures its error over the whole batch (as A1111), so its images depend on their batch mates.

Where A1111 raises, this module degrades gracefully instead: UniPC with fewer steps than its order uses
order = steps; UniPC with t_enc = 0 and DPM fast/adaptive with a single sigma step (strength < 1/steps) return the
noised init latent (DDIM/PLMS with t_enc <= 1 do the same, as in A1111).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from underpaint.engine.samplers import k_samplers, timestep_samplers
from underpaint.engine.samplers.denoiser import (
    PREDICTION_TYPES,
    Denoiser,
    LatentBlend,
    ModelFn,
    guard_cancel,
    make_denoiser,
    make_eps_fn,
)
from underpaint.engine.samplers.noise import BrownianNoise, NoiseSource
from underpaint.engine.samplers.schedule import DiscreteSchedule
from underpaint.engine.samplers.sigma_schedules import build_sigmas
from underpaint.vocabulary import SAMPLER_NAMES, SamplerName, resolve_sampler

# (steps done, steps in all): the sampler's own step count; the pipeline turns it into ``job.Progress``.
StepCallback = Callable[[int, int], None]


SigmaSampler = Callable[[Denoiser, Tensor, Sequence[float], k_samplers.NoiseFn, k_samplers.OnStep], Tensor]


@dataclass(frozen=True)
class _Spec:
    kind: str  # "sigmas" | "dpm_fast" | "dpm_adaptive" | "ddim" | "plms" | "unipc"
    fn: SigmaSampler | None = None
    discard_penultimate: bool = False
    noise: str = "none"  # "none" | "ancestral" | "brownian"
    second_order: bool = False
    unused_draws: bool = False  # A1111 draws (and ignores) one noise tensor per step
    # Brownian samplers: the (sigma, sigma_next) noise queries a sigma list makes, in order (for prefetching).
    noise_queries: Callable[[Sequence[float]], list[tuple[float, float]]] | None = None


def _sde(fn: SigmaSampler, *, discard_penultimate: bool = False) -> _Spec:
    """DPM++ 2M / 3M SDE: Brownian-tree noise, one query per step."""
    return _Spec(
        "sigmas",
        fn,
        discard_penultimate=discard_penultimate,
        noise="brownian",
        noise_queries=k_samplers.sde_noise_queries,
    )


_SPECS: dict[str, _Spec] = {  # keyed by every sampler algorithm of ``vocabulary.SAMPLER_SCHEDULES``
    "Euler a": _Spec("sigmas", k_samplers.euler_ancestral, noise="ancestral"),
    "Euler": _Spec("sigmas", k_samplers.euler, unused_draws=True),
    "LMS": _Spec("sigmas", k_samplers.lms),
    "Heun": _Spec("sigmas", k_samplers.heun, second_order=True, unused_draws=True),
    "DPM2": _Spec("sigmas", k_samplers.dpm2, discard_penultimate=True, second_order=True, unused_draws=True),
    "DPM2 a": _Spec(
        "sigmas", k_samplers.dpm2_ancestral, discard_penultimate=True, noise="ancestral", second_order=True
    ),
    "DPM++ 2S a": _Spec("sigmas", k_samplers.dpmpp_2s_ancestral, noise="ancestral", second_order=True),
    "DPM++ 2M": _Spec("sigmas", k_samplers.dpmpp_2m),
    "DPM++ SDE": _Spec(
        "sigmas",
        k_samplers.dpmpp_sde,
        noise="brownian",
        second_order=True,
        noise_queries=k_samplers.dpmpp_sde_noise_queries,
    ),
    "DPM++ 2M SDE": _sde(k_samplers.dpmpp_2m_sde),
    "DPM++ 2M SDE Heun": _sde(functools.partial(k_samplers.dpmpp_2m_sde, solver_type="heun")),
    "DPM++ 3M SDE": _sde(k_samplers.dpmpp_3m_sde, discard_penultimate=True),
    "DPM fast": _Spec("dpm_fast", noise="ancestral"),
    "DPM adaptive": _Spec("dpm_adaptive", noise="ancestral"),
    "Restart": _Spec("sigmas", k_samplers.restart, noise="ancestral", second_order=True),
    "DDIM": _Spec("ddim", unused_draws=True),
    "PLMS": _Spec("plms"),
    "UniPC": _Spec("unipc"),
}

_TIMESTEP_KINDS = ("ddim", "plms", "unipc")


def _spec(name: SamplerName) -> tuple[SamplerName, _Spec]:
    """The sampler ``name`` names (already canonical: normalised once, where the request entered; a name may end
    in a schedule label, "DPM++ 2M SGM Uniform", see ``vocabulary.resolve_sampler``)."""
    try:
        base, _ = resolve_sampler(name, None)
    except ValueError:
        base = name
    spec = _SPECS.get(base)
    if spec is None:
        raise ValueError(f"unknown sampler {name!r}; expected one of: {', '.join(SAMPLER_NAMES)}")
    return name, spec


def _check_steps_strength(steps: int, strength: float) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be within [0, 1], got {strength!r}")


def img2img_t_enc(steps: int, strength: float) -> int:
    """A1111's number of encoding steps: ``int(min(strength, 0.999) * steps)``."""
    _check_steps_strength(steps, strength)
    return int(min(strength, 0.999) * steps)


def full_sigmas(name: SamplerName, schedule: DiscreteSchedule, steps: int) -> Tensor:
    """The sigma schedule A1111 builds for ``steps`` (incl. the final 0; KL Optimal ends at sigma_min), with the
    schedule type the name carries (``vocabulary.resolve_sampler``) and the discard rule."""
    _, spec = _spec(name)
    if spec.kind in _TIMESTEP_KINDS:
        raise ValueError(f"{name} is a timesteps sampler and has no sigma schedule")
    _check_steps_strength(steps, 1.0)
    n = steps + 1 if spec.discard_penultimate else steps
    sigmas = build_sigmas(resolve_sampler(name, None)[1], schedule, n, is_sdxl=schedule.is_sdxl)
    if spec.discard_penultimate:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def img2img_sigmas(name: SamplerName, schedule: DiscreteSchedule, steps: int, strength: float) -> Tensor:
    """The sigmas the sampler walks for img2img: ``full[steps - t_enc - 1:]`` (t_enc + 1 steps)."""
    sigmas = full_sigmas(name, schedule, steps)
    return sigmas[steps - img2img_t_enc(steps, strength) - 1 :]


def img2img_timesteps(name: SamplerName, steps: int, strength: float) -> tuple[list[int], int]:
    """For DDIM/PLMS/UniPC: (timesteps handed to the sampler, timestep the init latent is noised to)."""
    _, spec = _spec(name)
    if spec.kind not in _TIMESTEP_KINDS:
        raise ValueError(f"{name} is a sigma sampler; use img2img_sigmas")
    t_enc = img2img_t_enc(steps, strength)
    timesteps = timestep_samplers.uniform_timesteps(steps)
    return timesteps[:t_enc], timesteps[t_enc]


def expected_model_evals(name: SamplerName, n_sigma_steps: int) -> int | None:
    """Model evaluations for one run. ``n_sigma_steps`` = ``len(sigmas) - 1`` for sigma samplers and
    ``len(timesteps)`` for DDIM/PLMS/UniPC. None for DPM adaptive (step count chosen at run time)."""
    _, spec = _spec(name)
    n = n_sigma_steps
    if n < 0:
        raise ValueError("n_sigma_steps must be non-negative")
    if spec.kind == "dpm_adaptive":
        return 0 if n <= 1 else None
    if spec.kind == "dpm_fast":
        return 0 if n <= 1 else n
    if spec.kind == "ddim":
        return max(n - 1, 0)
    if spec.kind == "plms":
        return n if n >= 2 else 0
    if spec.second_order:
        return max(2 * n - 1, 0)
    return n


def img2img_steps(name: SamplerName, schedule: DiscreteSchedule, steps: int, strength: float) -> int:
    """Sampler steps an img2img run reports through its progress callback."""
    _, spec = _spec(name)
    if spec.kind in ("ddim", "plms"):
        return max(len(img2img_timesteps(name, steps, strength)[0]) - 1, 0)
    if spec.kind == "unipc":
        return len(img2img_timesteps(name, steps, strength)[0])
    return len(img2img_sigmas(name, schedule, steps, strength)) - 1


def img2img_model_evals(name: SamplerName, schedule: DiscreteSchedule, steps: int, strength: float) -> int | None:
    """Model evaluations of an img2img run (None for DPM adaptive)."""
    _, spec = _spec(name)
    if spec.kind in _TIMESTEP_KINDS:
        return expected_model_evals(name, len(img2img_timesteps(name, steps, strength)[0]))
    sigmas = [float(v) for v in img2img_sigmas(name, schedule, steps, strength)]
    if spec.second_order and spec.kind == "sigmas":
        # Every step but one that lands on sigma 0 (a first-order step) evaluates the model twice; KL Optimal's
        # schedule ends at sigma_min, so its last step is second order too.
        pairs = k_samplers.restart_steps(sigmas) if spec.fn is k_samplers.restart else itertools.pairwise(sigmas)
        return sum(1 if s_next == 0 else 2 for _, s_next in pairs)
    return expected_model_evals(name, len(sigmas) - 1)


class _Progress:
    def __init__(self, callback: StepCallback | None, total: int) -> None:
        self.callback = callback
        self.total = total
        self.done = 0

    def step(self, completed: int) -> None:
        completed = min(completed, self.total)
        if self.callback is not None and completed > self.done:
            self.callback(completed, self.total)
        self.done = max(self.done, completed)

    def fraction(self, frac: float) -> None:
        # Adaptive solver: report whole steps of the nominal count, never "done" before the end.
        self.step(min(int(frac * self.total), self.total - 1))

    def finish(self) -> None:
        self.step(self.total)


def sample(
    name: SamplerName,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor | Sequence[float],
    noise: NoiseSource,
    *,
    brownian_range: tuple[float, float] | None = None,
    dpm_range: tuple[float, float] | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Run a sigma sampler over an explicit descending sigma list (ending in 0, or KL Optimal's sigma_min) from ``x``.

    DPM fast / adaptive integrate from ``sigmas[0]`` to ``sigmas[-2]`` with ``n = len(sigmas) - 1`` (A1111's img2img
    rule), or over ``dpm_range`` = (sigma_min, sigma_max) when given (txt2img: the model's own bounds).
    ``brownian_range`` = (sigma_min, sigma_max) of the Brownian tree for DPM++ SDE; by default the smallest
    positive and the largest sigma of ``sigmas``.
    """
    canonical, spec = _spec(name)
    if spec.kind in _TIMESTEP_KINDS:
        raise ValueError(f"{canonical} is a timesteps sampler; use sample_img2img")
    sig = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if len(sig) < 2 or sig[-1] < 0.0 or any(b >= a for a, b in itertools.pairwise(sig)):
        raise ValueError("sigmas must be strictly decreasing and end at 0 or above")
    n = len(sig) - 1
    progress = _Progress(callback, n)

    def ancestral(_s: float, _s_next: float) -> Tensor:
        return noise.randn_like(x)

    lo_dpm, hi_dpm = dpm_range if dpm_range is not None else (sig[-2], sig[0])
    if spec.kind in ("dpm_fast", "dpm_adaptive") and lo_dpm >= hi_dpm:
        # A single img2img sigma step (strength < 1/steps) gives sigma_min == sigma_max: nothing to integrate
        # (A1111's k-diffusion call raises here). Return the noised latent unchanged.
        progress.finish()
        return x
    if spec.kind == "dpm_fast":
        out = k_samplers.dpm_fast(denoiser, x, lo_dpm, hi_dpm, n, ancestral, progress.step)
    elif spec.kind == "dpm_adaptive":
        out = k_samplers.dpm_adaptive(denoiser, x, lo_dpm, hi_dpm, ancestral, progress.fraction)
    elif spec.noise == "brownian":
        assert spec.fn is not None
        lo, hi = brownian_range if brownian_range is not None else (min(s for s in sig if s > 0), max(sig))
        brownian = BrownianNoise(x, noise.seeds, lo, hi)
        try:
            if spec.noise_queries is not None:
                brownian.prefetch(spec.noise_queries(sig))
            out = spec.fn(denoiser, x, sig, brownian, progress.step)
        finally:
            brownian.close()
    else:
        assert spec.fn is not None
        out = spec.fn(denoiser, x, sig, ancestral, progress.step)
        if spec.unused_draws:
            noise.advance(x, n)
    progress.finish()
    return out


def _check_latents(latent: Tensor, noise: NoiseSource, prediction_type: str) -> None:
    if latent.ndim != 4:
        raise ValueError(f"latents must be [B, C, h, w], got shape {tuple(latent.shape)}")
    if latent.shape[0] != len(noise):
        raise ValueError(f"batch size {latent.shape[0]} does not match the {len(noise)} seeds")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _sample_timesteps(
    name: SamplerName,
    spec: _Spec,
    model_fn: ModelFn,
    schedule: DiscreteSchedule,
    x: Tensor,
    timesteps: list[int],
    noise: NoiseSource,
    prediction_type: str,
    callback: StepCallback | None,
    *,
    unipc_start: float,
    blend: LatentBlend | None = None,
) -> Tensor:
    """DDIM / PLMS / UniPC from the VP latent ``x`` over ``timesteps`` (ascending; DDIM and PLMS end at its first
    entry, UniPC walks ``len(timesteps)`` steps of continuous time from ``unipc_start``). ``blend`` (inpainting)
    blends the latent the model sees before each call, and the result."""
    if schedule.num_timesteps != 1000:
        raise ValueError(f"{name} follows A1111's 1000-timestep grid; this model has {schedule.num_timesteps}")
    eps_fn = make_eps_fn(model_fn, schedule, prediction_type)
    if blend is not None:
        eps_fn = blend.before(eps_fn)
    progress = _Progress(callback, len(timesteps) if spec.kind == "unipc" else max(len(timesteps) - 1, 0))
    if spec.kind == "unipc":
        if timesteps:
            x = timestep_samplers.unipc(eps_fn, x, len(timesteps), schedule, progress.step, t_start=unipc_start)
    elif spec.kind == "ddim":
        x = timestep_samplers.ddim(eps_fn, x, timesteps, schedule, progress.step)
        noise.advance(x, max(len(timesteps) - 1, 0))
    else:
        x = timestep_samplers.plms(eps_fn, x, timesteps, schedule, progress.step)
    progress.finish()
    return blend(x) if blend is not None else x


def _brownian_range(full: Tensor) -> tuple[float, float]:
    """DPM++ SDE's Brownian tree spans the full schedule's smallest positive and largest sigma."""
    return float(full[full > 0].min()), float(full.max())


def sample_img2img(
    sampler_name: SamplerName,
    model_fn: ModelFn,
    schedule: DiscreteSchedule,
    init_latent: Tensor,
    steps: int,
    strength: float,
    noise: NoiseSource,
    *,
    prediction_type: str = "epsilon",
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    fix_steps: bool = False,
    repaint_mask: Tensor | None = None,
    initial_noise_multiplier: float | Tensor = 1.0,
) -> Tensor:
    """A1111 img2img sampling (see module docstring). ``model_fn(x_in, t) -> eps | v`` with CFG already applied.

    The first draw of every generator in ``noise`` is that image's initial noise, multiplied by
    ``initial_noise_multiplier`` (a float, or one value per row shaped [B, 1, 1, 1]; later draws are not). Returns
    the final latent (still multiplied by the VAE scaling factor). Raises ``JobCancelled`` when ``should_cancel()``
    turns true (checked before every model evaluation) and ``ValueError`` on bad arguments.

    Inpainting (``repaint_mask``, the latent mask: 1 = repaint, 0 = keep, broadcastable to ``init_latent``), as
    A1111 v1.8 blends: sigma samplers replace the denoised estimate (after CFG) by the un-noised ``init_latent``
    where the mask keeps it; timestep samplers (DDIM/PLMS/UniPC) blend the latent the model sees before each model
    call instead; and the final latent is blended once more.

    ``fix_steps`` is A1111's ``img2img_fix_steps`` path (the hires fix's second pass): exactly ``steps`` steps
    over a schedule of ``int(steps / min(strength, 0.999))`` (see ``hires_schedule``).
    """
    canonical, spec = _spec(sampler_name)
    _check_latents(init_latent, noise, prediction_type)
    steps, t_enc = hires_schedule(steps, strength) if fix_steps else (steps, img2img_t_enc(steps, strength))
    model_fn = guard_cancel(model_fn, should_cancel)
    initial_noise = noise.randn_like(init_latent)
    if not (isinstance(initial_noise_multiplier, float | int) and initial_noise_multiplier == 1.0):
        initial_noise = initial_noise * initial_noise_multiplier
    blend = LatentBlend(init_latent, repaint_mask) if repaint_mask is not None else None

    if spec.kind in _TIMESTEP_KINDS:
        timesteps = timestep_samplers.uniform_timesteps(steps)
        ts_sched, t_noise = timesteps[:t_enc], timesteps[t_enc]
        abar = schedule.alpha_cumprod(t_noise)
        x = init_latent * abar**0.5 + initial_noise * (1.0 - abar) ** 0.5
        unipc_start = ts_sched[-1] / 1000 + 1 / 1000 if ts_sched else 1.0
        return _sample_timesteps(
            canonical,
            spec,
            model_fn,
            schedule,
            x,
            ts_sched,
            noise,
            prediction_type,
            callback,
            unipc_start=unipc_start,
            blend=blend,
        )

    full = full_sigmas(canonical, schedule, steps)
    sigma_sched = full[steps - t_enc - 1 :]
    x = init_latent + initial_noise * float(sigma_sched[0])
    denoiser = make_denoiser(model_fn, schedule, prediction_type)
    if blend is not None:
        denoiser = blend.after(denoiser)
    out = sample(canonical, denoiser, x, sigma_sched, noise, brownian_range=_brownian_range(full), callback=callback)
    return blend(out) if blend is not None else out


def hires_schedule(steps: int, strength: float) -> tuple[int, int]:
    """A1111's ``img2img_fix_steps`` path (the hires fix's second pass) as (schedule length, t_enc): the schedule
    is built for ``int(steps / min(strength, 0.999))`` and ``t_enc = steps - 1``, so exactly ``steps`` steps run."""
    _check_steps_strength(steps, strength)
    if strength <= 0.0:
        raise ValueError("the hires fix's second pass needs a denoising strength above 0")
    return int(steps / min(strength, 0.999)), steps - 1


def txt2img_steps(name: SamplerName, steps: int) -> int:
    """Sampler steps a txt2img run reports through its progress callback."""
    _, spec = _spec(name)
    _check_steps_strength(steps, 1.0)
    if spec.kind in ("ddim", "plms"):
        return len(timestep_samplers.uniform_timesteps(steps)) - 1
    if spec.kind == "unipc":
        return len(timestep_samplers.uniform_timesteps(steps))
    return steps


def sample_txt2img(
    sampler_name: SamplerName,
    model_fn: ModelFn,
    schedule: DiscreteSchedule,
    shape: Sequence[int],
    steps: int,
    noise: NoiseSource,
    *,
    prediction_type: str = "epsilon",
    callback: StepCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """A1111 (>= 1.6) txt2img sampling from the per-image noise streams; ``shape`` = [B, C, h, w] of the latents,
    ``dtype`` theirs (float32 in the pipeline; float64 in tests).

    The first draw of every generator is that image's initial noise. k-diffusion names start from
    ``noise * sigmas[0]`` and walk all ``steps`` (DPM fast / adaptive integrate between the *model's* sigma_min and
    sigma_max with ``n = steps``); DDIM / PLMS / UniPC walk the full timestep list from unit-variance noise (UniPC
    takes ``len(timesteps)`` steps, which A1111's grid makes ``steps + 1`` when ``1000 // steps`` leaves room).
    """
    canonical, spec = _spec(sampler_name)
    _check_steps_strength(steps, 1.0)
    template = torch.empty(tuple(shape), dtype=dtype)
    _check_latents(template, noise, prediction_type)
    model_fn = guard_cancel(model_fn, should_cancel)
    initial_noise = noise.randn_like(template)

    if spec.kind in _TIMESTEP_KINDS:
        timesteps = timestep_samplers.uniform_timesteps(steps)
        return _sample_timesteps(
            canonical,
            spec,
            model_fn,
            schedule,
            initial_noise,
            timesteps,
            noise,
            prediction_type,
            callback,
            unipc_start=1.0,
        )

    full = full_sigmas(canonical, schedule, steps)
    x = initial_noise * float(full[0])
    denoiser = make_denoiser(model_fn, schedule, prediction_type)
    dpm_range = (schedule.sigma_min, schedule.sigma_max) if spec.kind in ("dpm_fast", "dpm_adaptive") else None
    return sample(
        canonical,
        denoiser,
        x,
        full,
        noise,
        brownian_range=_brownian_range(full),
        dpm_range=dpm_range,
        callback=callback,
    )
