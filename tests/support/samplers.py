"""Shared helpers for the sampler tests: the k-diffusion test reference, toy models, a tiny UNet.

k-diffusion (pip package, installed --no-deps) is used as an independent reference implementation. Its package
``__init__`` pulls in torchvision/wandb, so a stub package is registered and only ``sampling``/``external`` are
imported (field notes 8). The reference is driven with A1111's argument rules.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from typing import Any

import torch
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


_REF_FUNCS = {
    "Euler a": ("sample_euler_ancestral", False, False),
    "Euler": ("sample_euler", False, False),
    "LMS": ("sample_lms", False, False),
    "Heun": ("sample_heun", False, False),
    "DPM2": ("sample_dpm_2", False, True),
    "DPM2 a": ("sample_dpm_2_ancestral", False, True),
    "DPM++ 2S a": ("sample_dpmpp_2s_ancestral", False, False),
    "DPM++ 2M": ("sample_dpmpp_2m", False, False),
    "DPM++ SDE": ("sample_dpmpp_sde", False, False),
    "DPM fast": ("sample_dpm_fast", False, False),
    "DPM adaptive": ("sample_dpm_adaptive", False, False),
    "LMS Karras": ("sample_lms", True, False),
    "DPM2 Karras": ("sample_dpm_2", True, True),
    "DPM2 a Karras": ("sample_dpm_2_ancestral", True, True),
    "DPM++ 2S a Karras": ("sample_dpmpp_2s_ancestral", True, False),
    "DPM++ 2M Karras": ("sample_dpmpp_2m", True, False),
    "DPM++ SDE Karras": ("sample_dpmpp_sde", True, False),
}
K_NAMES = [SamplerName(n) for n in _REF_FUNCS]


def sampler_names(*names: str) -> list[SamplerName]:
    """Literal sampler names as the engine's ``SamplerName`` (test inputs are already canonical)."""
    return [SamplerName(n) for n in names]


def reference_sigmas(name: str, steps: int) -> Tensor:
    """A1111's schedule for ``name`` built with k-diffusion's own helpers (float32)."""
    sampling, external = kdiffusion()
    _, karras, discard = _REF_FUNCS[name]
    wrap = external.CompVisDenoiser(_ApplyModel(lambda x, t: x, SCHEDULE.alphas_cumprod))
    n = steps + 1 if discard else steps
    sigmas: Tensor  # k-diffusion is unannotated
    if karras:
        sigmas = sampling.get_sigmas_karras(n, wrap.sigmas[0].item(), wrap.sigmas[-1].item())
    else:
        sigmas = wrap.get_sigmas(n)
    if discard:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


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
) -> tuple[Tensor, int]:
    """A1111 img2img through k-diffusion (A-old ``sample_img2img`` rules). Returns (latent, model calls).

    ``noise`` (fresh per-image generators by default) feeds the initial noise and every ``randn_like``. ``t_enc``
    overrides ``int(min(strength, 0.999) * steps)`` (A1111's ``img2img_fix_steps`` path passes its own)."""
    noise = NoiseSource(seeds) if noise is None else noise
    first = noise.randn_like(init)
    sigmas = reference_sigmas(name, steps).to(init.dtype)
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
    func_name, _, _ = _REF_FUNCS[name]
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
    if func_name == "sample_dpmpp_sde":
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
