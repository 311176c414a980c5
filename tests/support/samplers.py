"""Shared helpers for the sampler tests: the k-diffusion test reference, toy models, a tiny UNet.

k-diffusion (pip package, installed --no-deps) is used as an independent reference implementation. Its package
``__init__`` pulls in torchvision/wandb, so a stub package is registered and only ``sampling``/``external`` are
imported (field notes 8). The reference is driven with A1111's argument rules.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import itertools
import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from underpaint.engine.samplers import DiscreteSchedule, NoiseSource
from underpaint.vocabulary import SamplerName

SEEDS = [1234, 1235]


def kdiffusion() -> tuple[Any, Any]:
    """(k_diffusion.sampling, k_diffusion.external) imported through a stub package."""
    if "k_diffusion.sampling" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("the k-diffusion package (test reference) is not installed")
        pkg = types.ModuleType("k_diffusion")
        pkg.__path__ = list(spec.submodule_search_locations)
        utils = types.ModuleType("k_diffusion.utils")

        def append_dims(x: Tensor, target_dims: int) -> Tensor:
            return x[(...,) + (None,) * (target_dims - x.ndim)]

        utils.append_dims = append_dims  # type: ignore[attr-defined]
        pkg.utils = utils  # type: ignore[attr-defined]
        sys.modules["k_diffusion"] = pkg
        sys.modules["k_diffusion.utils"] = utils
        importlib.import_module("k_diffusion.sampling")
        importlib.import_module("k_diffusion.external")
    return sys.modules["k_diffusion.sampling"], sys.modules["k_diffusion.external"]


SCHEDULE = DiscreteSchedule.from_betas()


def toy_model(schedule: DiscreteSchedule, prediction_type: str = "epsilon") -> Callable[[Tensor, Tensor], Tensor]:
    """Analytic model of (x_in, fractional t): exact denoiser of N(mu, 0.6^2) data plus a small nonlinearity.

    Accepts fractional timesteps (sigma from log-sigma interpolation); outputs eps, or the equivalent v.
    """
    log_sigmas = schedule.log_sigmas.to(torch.float64)

    def fn(x_in: Tensor, t: Tensor) -> Tensor:
        t64 = t.to(torch.float64)
        low = t64.floor().long().clamp(0, 998)
        w = t64 - low
        sigma = ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp().to(x_in.dtype)[:, None, None, None]
        c_in = 1 / (sigma**2 + 1) ** 0.5
        x = x_in / c_in
        mu = 0.3 * torch.sin(torch.arange(x.shape[-1], dtype=x.dtype, device=x.device))
        s0 = 0.6
        denoised = (s0**2 * x + sigma**2 * mu) / (s0**2 + sigma**2)
        eps = (x - denoised) / sigma + 0.05 * torch.tanh(x_in) * (1 - c_in**2) ** 0.5
        if prediction_type == "v_prediction":
            return (eps - sigma * c_in * x_in) / c_in
        return eps

    return fn


@functools.cache
def tiny_unet_fn(dtype: torch.dtype = torch.float64) -> Callable[[Tensor, Tensor], Tensor]:
    """A seeded, randomly initialised tiny UNet2DConditionModel as (x_in, t) -> output."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet_cls: Any = UNet2DConditionModel
    unet = unet_cls(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).to(dtype)
    unet.eval()
    # One prompt embedding shared by every image, so that a batch equals its single runs.
    ctx = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(1)).to(dtype)

    @torch.no_grad()
    def fn(x_in: Tensor, t: Tensor) -> Tensor:
        hidden = ctx.expand(x_in.shape[0], -1, -1)
        out: Tensor = unet(x_in, t, encoder_hidden_states=hidden).sample
        return out

    return fn


class CountingModel:
    """Wraps a model function and counts its calls."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.fn = fn
        self.calls = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        return self.fn(x, t)


def init_latent(batch: int = 2, size: int = 8, dtype: torch.dtype = torch.float64) -> Tensor:
    g = torch.Generator().manual_seed(99)
    return (torch.randn(batch, 4, size, size, generator=g) * 0.8).to(dtype)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class _HijackedTorch:
    """Stands in for ``k_diffusion.sampling.torch``: ``randn_like`` continues the per-image streams (A1111's
    TorchHijack); everything else is the real torch."""

    def __init__(self, noise: NoiseSource) -> None:
        self._noise = noise

    def randn_like(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return self._noise.randn_like(x)

    def __getattr__(self, item: str) -> Any:
        return getattr(torch, item)


class _ApplyModel:
    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], alphas_cumprod: Tensor) -> None:
        self.fn = fn
        self.alphas_cumprod = alphas_cumprod

    def apply_model(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.fn(x, t)


# name -> (k-diffusion function, A1111 <= 1.8 schedule of the name, discard penultimate sigma, extra kwargs)
_REF_FUNCS: dict[str, tuple[str, str, bool, dict[str, Any]]] = {
    "Euler a": ("sample_euler_ancestral", "Uniform", False, {}),
    "Euler": ("sample_euler", "Uniform", False, {}),
    "LMS": ("sample_lms", "Uniform", False, {}),
    "Heun": ("sample_heun", "Uniform", False, {}),
    "DPM2": ("sample_dpm_2", "Uniform", True, {}),
    "DPM2 a": ("sample_dpm_2_ancestral", "Uniform", True, {}),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", "Uniform", False, {}),
    "DPM++ 2M": ("sample_dpmpp_2m", "Uniform", False, {}),
    "DPM++ SDE": ("sample_dpmpp_sde", "Uniform", False, {}),
    "DPM fast": ("sample_dpm_fast", "Uniform", False, {}),
    "DPM adaptive": ("sample_dpm_adaptive", "Uniform", False, {}),
    "LMS Karras": ("sample_lms", "Karras", False, {}),
    "DPM2 Karras": ("sample_dpm_2", "Karras", True, {}),
    "DPM2 a Karras": ("sample_dpm_2_ancestral", "Karras", True, {}),
    "DPM++ 2S a Karras": ("sample_dpmpp_2s_ancestral", "Karras", False, {}),
    "DPM++ 2M Karras": ("sample_dpmpp_2m", "Karras", False, {}),
    "DPM++ SDE Karras": ("sample_dpmpp_sde", "Karras", False, {}),
    # A1111 1.6's additions (modules/sd_samplers_kdiffusion.py of v1.6.0; Restart: modules/sd_samplers_extra.py)
    "DPM++ 2M SDE": ("sample_dpmpp_2m_sde", "Uniform", False, {}),
    "DPM++ 2M SDE Karras": ("sample_dpmpp_2m_sde", "Karras", False, {}),
    "DPM++ 2M SDE Exponential": ("sample_dpmpp_2m_sde", "Exponential", False, {}),
    "DPM++ 2M SDE Heun": ("sample_dpmpp_2m_sde", "Uniform", False, {"solver_type": "heun"}),
    "DPM++ 2M SDE Heun Karras": ("sample_dpmpp_2m_sde", "Karras", False, {"solver_type": "heun"}),
    "DPM++ 2M SDE Heun Exponential": ("sample_dpmpp_2m_sde", "Exponential", False, {"solver_type": "heun"}),
    "DPM++ 3M SDE": ("sample_dpmpp_3m_sde", "Uniform", True, {}),
    "DPM++ 3M SDE Karras": ("sample_dpmpp_3m_sde", "Karras", True, {}),
    "DPM++ 3M SDE Exponential": ("sample_dpmpp_3m_sde", "Exponential", True, {}),
    "Restart": ("restart", "Karras", False, {}),
}
K_NAMES = [SamplerName(n) for n in _REF_FUNCS]
_BROWNIAN = ("sample_dpmpp_sde", "sample_dpmpp_2m_sde", "sample_dpmpp_3m_sde")


def sampler_names(*names: str) -> list[SamplerName]:
    """Literal sampler names as the engine's ``SamplerName`` (test inputs are already canonical)."""
    return [SamplerName(n) for n in names]


# A1111 >= 1.9's schedule types (modules/sd_schedulers.py), written here from their published definitions over
# k-diffusion's own discrete-model wrapper (its sigma table, sigma_to_t and t_to_sigma).
_AYS = {
    False: [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
    True: [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029],
}


def reference_schedule(label: str, n: int, is_sdxl: bool = False) -> Tensor:
    """A1111's ``label`` schedule for n steps (float32), built on k-diffusion's helpers."""
    sampling, external = kdiffusion()
    inner = external.CompVisDenoiser(_ApplyModel(lambda x, t: x, SCHEDULE.alphas_cumprod))
    lo, hi = inner.sigmas[0].item(), inner.sigmas[-1].item()
    out: Tensor
    if label == "Uniform":
        out = inner.get_sigmas(n)
    elif label == "Karras":
        out = sampling.get_sigmas_karras(n, lo, hi)
    elif label == "Exponential":
        out = sampling.get_sigmas_exponential(n, lo, hi)
    elif label == "Polyexponential":
        out = sampling.get_sigmas_polyexponential(n, lo, hi, rho=1.0)
    elif label in ("SGM Uniform", "Normal"):
        start, end = inner.sigma_to_t(torch.tensor(hi)), inner.sigma_to_t(torch.tensor(lo))
        ts = torch.linspace(start, end, n + 1)[:-1] if label == "SGM Uniform" else torch.linspace(start, end, n)
        out = torch.FloatTensor([inner.t_to_sigma(t) for t in ts] + [0.0])
    elif label == "KL Optimal":
        a_min, a_max = torch.arctan(torch.tensor(lo)), torch.arctan(torch.tensor(hi))
        idx = torch.arange(n + 1)
        out = torch.tan(idx / n * a_min + (1.0 - idx / n) * a_max)
    elif label == "Align Your Steps":
        table = _AYS[is_sdxl]
        if n == len(table):
            out = torch.FloatTensor([*table, 0.0])
        else:
            xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
            ys_n = np.interp(np.linspace(0, 1, n), xs, ys)
            out = torch.FloatTensor(np.append(np.exp(ys_n)[::-1].copy(), [0.0]))
    elif label == "Simple":
        ss = len(inner.sigmas) / n
        out = torch.FloatTensor([float(inner.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    elif label == "DDIM":
        ss, picked = max(len(inner.sigmas) // n, 1), list[float]()
        x = 1
        while x < len(inner.sigmas):
            picked.append(float(inner.sigmas[x]))
            x += ss
        out = torch.FloatTensor([*picked[::-1], 0.0])
    elif label == "Beta":
        quantiles = [float(stats.beta.ppf(v, 0.6, 0.6)) for v in 1 - np.linspace(0, 1, n)]
        out = torch.FloatTensor([lo + v * (hi - lo) for v in quantiles] + [0.0])
    else:
        raise ValueError(label)
    return out


def reference_sigmas(name: str, steps: int, label: str | None = None, is_sdxl: bool = False) -> Tensor:
    """A1111's schedule for ``name`` (or its algorithm with schedule type ``label``), with its discard rule."""
    _, own, discard, _ = _REF_FUNCS[name]
    n = steps + 1 if discard else steps
    sigmas = reference_schedule(label or own, n, is_sdxl)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


def reference_restart(model: Any, x: Tensor, sigmas: Tensor, noise: NoiseSource) -> Tensor:
    """A1111's Restart sampler (Xu et al. 2023 with A1111's automatic restart list), written from its published
    method over k-diffusion's Karras schedule and ODE derivative: Heun steps; from 20 steps a Karras schedule of
    ``steps - K * times`` steps between the given ends, and at the step nearest sigma 0.1 ``times`` walks back from
    the step nearest sigma 2 over K + 1 Karras levels, each re-noised up to its start."""
    sampling, _ = kdiffusion()
    steps = len(sigmas) - 1
    restarts: dict[int, tuple[int, int]] = {}
    if steps >= 20:
        k, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = sampling.get_sigmas_karras(steps - k * times, sigmas[-2].item(), sigmas[0].item()).to(x.dtype)
        restarts = {int(torch.argmin((sigmas - 0.1).abs())): (k + 1, times)}
    top = int(torch.argmin((sigmas - 2.0).abs()))
    pairs: list[tuple[Tensor, Tensor]] = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts and top < i + 1:
            levels, times = restarts[i + 1]
            walk = sampling.get_sigmas_karras(levels, sigmas[i + 1].item(), sigmas[top].item())[:-1].to(x.dtype)
            pairs += list(itertools.pairwise(walk)) * times
    s_in = x.new_ones([x.shape[0]])
    last: Tensor | None = None
    for s, s_next in pairs:
        if last is not None and last < s:
            x = x + noise.randn_like(x) * (s**2 - last**2) ** 0.5
        d = sampling.to_d(x, s, model(x, s * s_in, cond=None))
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x_2 = x + d * (s_next - s)
            x = x + (d + sampling.to_d(x_2, s_next, model(x_2, s_next * s_in, cond=None))) / 2 * (s_next - s)
        last = s_next
    return x


def reference_img2img(
    name: str,
    model_fn: Callable[[Tensor, Tensor], Tensor],
    init: Tensor,
    steps: int,
    strength: float,
    seeds: list[int],
    prediction_type: str = "epsilon",
    noise: NoiseSource | None = None,
    t_enc: int | None = None,
    label: str | None = None,
    is_sdxl: bool = False,
) -> tuple[Tensor, int]:
    """A1111 img2img through k-diffusion (A-old ``sample_img2img`` rules). Returns (latent, model calls).

    ``noise`` (fresh per-image generators by default) feeds the initial noise and every ``randn_like``. ``t_enc``
    overrides ``int(min(strength, 0.999) * steps)`` (A1111's ``img2img_fix_steps`` path passes its own); ``label``
    replaces the name's schedule type (A1111 >= 1.9)."""
    noise = NoiseSource(seeds) if noise is None else noise
    first = noise.randn_like(init)
    sigmas = reference_sigmas(name, steps, label, is_sdxl).to(init.dtype)
    t_enc = int(min(strength, 0.999) * steps) if t_enc is None else t_enc
    sigma_sched = sigmas[steps - t_enc - 1 :]
    x = init + first * sigma_sched[0]
    # img2img: DPM fast/adaptive integrate the sliced schedule.
    dpm = (sigma_sched[-2], sigma_sched[0], len(sigma_sched) - 1)
    return _run_reference(name, model_fn, x, sigma_sched, sigmas, dpm, seeds, prediction_type, noise)


def reference_txt2img(
    name: str,
    model_fn: Callable[[Tensor, Tensor], Tensor],
    shape: tuple[int, ...],
    steps: int,
    seeds: list[int],
    prediction_type: str = "epsilon",
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, int]:
    """A1111 (>= 1.6) txt2img through k-diffusion (``KDiffusionSampler.sample`` rules): the first draw of each
    per-image generator times ``sigmas[0]``, all ``steps``; DPM fast/adaptive get the model's sigma_min/sigma_max
    (``model_wrap.sigmas[0]``/``[-1]`` as Python floats) and ``n = steps``. Returns (latent, model calls)."""
    _, external = kdiffusion()
    noise = NoiseSource(seeds)
    first = noise.randn_like(torch.empty(shape, dtype=dtype))
    sigmas = reference_sigmas(name, steps).to(dtype)
    wrap = external.CompVisDenoiser(_ApplyModel(lambda x, t: x, SCHEDULE.alphas_cumprod))
    dpm = (wrap.sigmas[0].item(), wrap.sigmas[-1].item(), steps)
    return _run_reference(name, model_fn, first * sigmas[0], sigmas, sigmas, dpm, seeds, prediction_type, noise)


def _run_reference(
    name: str,
    model_fn: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigma_sched: Tensor,
    full_sigmas: Tensor,
    dpm: tuple[Any, Any, int],
    seeds: list[int],
    prediction_type: str,
    noise: NoiseSource,
) -> tuple[Tensor, int]:
    """Call k-diffusion's sampler for ``name`` from ``x`` with A1111's arguments and noise hooks."""
    sampling, external = kdiffusion()
    func_name, _, _, extra = _REF_FUNCS[name]
    counting = CountingModel(model_fn)
    inner = _ApplyModel(counting, SCHEDULE.alphas_cumprod)
    wrap = (external.CompVisVDenoiser if prediction_type == "v_prediction" else external.CompVisDenoiser)(inner)
    kwargs: dict[str, Any] = {"extra_args": {"cond": None}, "disable": True}
    if func_name in ("sample_dpm_fast", "sample_dpm_adaptive"):
        # k-diffusion builds the DPM-fast lambda grid with a float32 linspace; with float64 bounds it misses the
        # float64 end point and its last step takes sqrt(<0) = NaN. A1111 passes float32 sigmas: do the same.
        kwargs.update(sigma_min=dpm[0], sigma_max=dpm[1], eta=1.0)
        if func_name == "sample_dpm_fast":
            kwargs.update(sigma_min=torch.as_tensor(dpm[0]).float(), sigma_max=torch.as_tensor(dpm[1]).float())
            kwargs["n"] = dpm[2]
        args: tuple[Any, ...] = (wrap, x)
    else:
        args = (wrap, x, sigma_sched)
    if func_name == "restart":
        return reference_restart(wrap, x, sigma_sched, noise), counting.calls
    kwargs.update(extra)
    if func_name in _BROWNIAN:
        # A1111 CPU randn source: Brownian increments are float32 CPU normals (trees built on a float32 tensor).
        positive = full_sigmas[full_sigmas > 0]
        tree = sampling.BrownianTreeNoiseSampler(x.float(), positive.min(), full_sigmas.max(), seed=list(seeds))
        kwargs["noise_sampler"] = lambda s, s_next: tree(s, s_next).to(x.dtype)
    original_torch = sampling.torch
    sampling.torch = _HijackedTorch(noise)
    try:
        out = getattr(sampling, func_name)(*args, **kwargs)
    finally:
        sampling.torch = original_torch
    return out, counting.calls


@functools.cache
def tiny_sdxl_unet_fn(dtype: torch.dtype = torch.float64) -> Callable[[Tensor, Tensor], Tensor]:
    """The demo's tiny SDXL UNet (text-time added conditioning) as (x_in, t) -> output, one fixed conditioning."""
    from underpaint.demo.checkpoints import tiny_sdxl_components

    unet: Any = tiny_sdxl_components()["unet"].to(dtype)
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(1, 7, 96, generator=g).to(dtype)
    pooled = torch.randn(1, 64, generator=g).to(dtype)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]], dtype=dtype)

    @torch.no_grad()
    def fn(x_in: Tensor, t: Tensor) -> Tensor:
        n = x_in.shape[0]
        added = {"text_embeds": pooled.expand(n, -1), "time_ids": time_ids.expand(n, -1)}
        out: Tensor = unet(x_in, t, encoder_hidden_states=ctx.expand(n, -1, -1), added_cond_kwargs=added).sample
        return out

    return fn
