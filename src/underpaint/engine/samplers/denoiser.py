"""Adapters from a UNet-style model function to what the samplers consume.

``model_fn(x_in, t) -> eps | v`` is the UNet output for the whole batch with classifier-free guidance already
applied by the caller. CFG is linear in the model output, so applying it to eps (or v) equals A1111's CFG on the
denoised prediction.

* k-diffusion family samplers want a *denoiser* ``D(x, sigma)`` in the VE view (Karras et al. 2022, table 1):
  eps models: ``c_in = 1/sqrt(sigma^2+1)``, ``D = x - sigma * eps(c_in x, t(sigma))``;
  v models:   ``c_skip = 1/(sigma^2+1)``, ``c_out = -sigma/sqrt(sigma^2+1)``, ``D = c_skip x + c_out v(c_in x, t)``.
* DDIM/PLMS/UniPC work in the VP view (``x_vp = c_in x``) and want the noise prediction ``eps(x_vp, t)``;
  v outputs are converted with ``eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_vp``, abar taken at ``int(t)`` as A1111.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from underpaint.engine.job import JobCancelled
from underpaint.engine.samplers.schedule import DiscreteSchedule

ModelFn = Callable[[Tensor, Tensor], Tensor]
Denoiser = Callable[[Tensor, float], Tensor]
EpsFn = Callable[[Tensor, float], Tensor]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def _timestep_tensor(x: Tensor, t: float) -> Tensor:
    # float32 timesteps unless the whole computation is float64 (tests); the UNet embeds them in float32 anyway.
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def guard_cancel(model_fn: ModelFn, should_cancel: Callable[[], bool] | None) -> ModelFn:
    """Wrap ``model_fn`` so that every evaluation first checks ``should_cancel`` and raises ``JobCancelled``."""
    if should_cancel is None:
        return model_fn

    def guarded(x: Tensor, t: Tensor) -> Tensor:
        if should_cancel():
            raise JobCancelled("sampling cancelled")
        return model_fn(x, t)

    return guarded


class LatentBlend:
    """Inpainting's latent blend (A1111 v1.8): ``x * repaint + init * (1 - repaint)``, i.e. the un-noised init
    latent wherever the latent mask keeps the input."""

    def __init__(self, init: Tensor, repaint: Tensor) -> None:
        self.init = init
        self.repaint = repaint.to(init.dtype)
        self.keep = 1.0 - self.repaint

    def __call__(self, x: Tensor) -> Tensor:
        return x * self.repaint + self.init * self.keep

    def after(self, denoise: Denoiser) -> Denoiser:
        """Sigma samplers: blend the denoised estimate (after CFG)."""

        def blended(x: Tensor, sigma: float) -> Tensor:
            return self(denoise(x, sigma))

        return blended

    def before(self, eps_fn: EpsFn) -> EpsFn:
        """Timestep samplers: blend the latent the model sees (the sampler keeps its own)."""

        def blended(x: Tensor, t: float) -> Tensor:
            return eps_fn(self(x), t)

        return blended


def make_denoiser(model_fn: ModelFn, schedule: DiscreteSchedule, prediction_type: str = "epsilon") -> Denoiser:
    """Denoiser ``D(x, sigma) -> x0 estimate`` over the VE latent ``x`` (see module docstring)."""
    _check_prediction_type(prediction_type)
    v_pred = prediction_type == "v_prediction"

    def denoise(x: Tensor, sigma: float) -> Tensor:
        s2p1 = sigma * sigma + 1.0
        c_in = 1.0 / math.sqrt(s2p1)
        out = model_fn(x * c_in, _timestep_tensor(x, schedule.sigma_to_t(sigma)))
        if v_pred:
            return x * (1.0 / s2p1) + out * (-sigma / math.sqrt(s2p1))
        return x - out * sigma

    return denoise


def make_eps_fn(model_fn: ModelFn, schedule: DiscreteSchedule, prediction_type: str = "epsilon") -> EpsFn:
    """Noise prediction ``eps(x_vp, t)`` at a (possibly fractional) training timestep ``t``."""
    _check_prediction_type(prediction_type)
    v_pred = prediction_type == "v_prediction"

    def eps(x: Tensor, t: float) -> Tensor:
        out = model_fn(x, _timestep_tensor(x, t))
        if v_pred:
            abar = vp_alpha_cumprod(schedule, t)
            return out * math.sqrt(abar) + x * math.sqrt(1.0 - abar)
        return out

    return eps


def vp_alpha_cumprod(schedule: DiscreteSchedule, t: float) -> float:
    """alpha_cumprod at a training timestep ``t`` that may be fractional (UniPC's continuous grid): log alpha
    linear between whole timesteps, as A1111's UniPC (its discrete NoiseScheduleVP) interpolates it; the table's
    own value at a whole timestep. (Truncating ``t`` would take a whole step's alpha off when the grid time lands a
    rounding error below a whole timestep, and the wrong alpha between them.)"""
    k = min(max(math.floor(t), 0), schedule.num_timesteps - 2)
    w = t - k
    if w == 0:
        return schedule.alpha_cumprod(k)
    log_abar = (1.0 - w) * math.log(schedule.alpha_cumprod(k)) + w * math.log(schedule.alpha_cumprod(k + 1))
    return math.exp(log_abar)
