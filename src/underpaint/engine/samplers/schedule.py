"""The discrete noise schedule of an SD-style (DDPM-trained) model, seen in the "sigma" (VE) view.

A model trained on 1000 discrete timesteps with cumulative alphas ``abar_t`` is, in Karras et al. (2022) terms, a
denoiser over noise levels ``sigma_t = sqrt((1 - abar_t) / abar_t)``. Samplers work with continuous sigmas; the UNet
is called with a *fractional* timestep obtained by linear interpolation in ``log sigma`` between the two
neighbouring training timesteps (not quantized to an integer), as A1111 does by default.

All schedule lists are built in float32 from float32 ``alphas_cumprod`` (what A1111 runs on), and scalar look-ups
are done in Python floats so that samplers need no tensor/device round-trips per step.
"""

from __future__ import annotations

import bisect
import math

import torch
from torch import Tensor


class DiscreteSchedule:
    """Sigma table of a discrete-time diffusion model. ``sigmas`` is ascending (index = training timestep)."""

    def __init__(self, alphas_cumprod: Tensor, *, is_sdxl: bool = False) -> None:
        # The model family, for the schedules published per family (Align Your Steps); SD 1.5 and SDXL share
        # their training schedule.
        self.is_sdxl = is_sdxl
        if alphas_cumprod.ndim != 1 or alphas_cumprod.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D tensor with at least 2 entries")
        ac = alphas_cumprod.detach().to(device="cpu", dtype=torch.float32)
        if not bool(((ac > 0) & (ac < 1)).all()):
            raise ValueError("alphas_cumprod must lie strictly between 0 and 1")
        self.alphas_cumprod: Tensor = ac
        self.sigmas: Tensor = ((1 - ac) / ac) ** 0.5
        if not bool((self.sigmas[1:] > self.sigmas[:-1]).all()):
            raise ValueError("alphas_cumprod must be strictly decreasing")
        self.log_sigmas: Tensor = self.sigmas.log()
        # Python copies for per-call scalar look-ups (no tensor ops on the hot path).
        self._log_sigmas: list[float] = [float(v) for v in self.log_sigmas.tolist()]
        self._alphas_cumprod: list[float] = [float(v) for v in ac.tolist()]

    @classmethod
    def from_betas(
        cls,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "scaled_linear",
        *,
        is_sdxl: bool = False,
    ) -> DiscreteSchedule:
        """Training schedule built the ldm way: float64 betas and cumprod, then float32."""
        if num_train_timesteps < 2:
            raise ValueError("num_train_timesteps must be at least 2")
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r} (expected 'scaled_linear' or 'linear')")
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        return cls(alphas_cumprod.to(torch.float32), is_sdxl=is_sdxl)

    @property
    def num_timesteps(self) -> int:
        return len(self._log_sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def alpha_cumprod(self, t: int) -> float:
        return self._alphas_cumprod[t]

    def sigma_to_t(self, sigma: float) -> float:
        """Fractional training timestep of a noise level (log-sigma interpolation, clamped to the table)."""
        log_sigma = math.log(sigma)
        ls = self._log_sigmas
        low = min(max(bisect.bisect_right(ls, log_sigma) - 1, 0), len(ls) - 2)
        lo, hi = ls[low], ls[low + 1]
        w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
        return (1.0 - w) * low + w * (low + 1)

    def t_to_sigma(self, t: float) -> float:
        """Noise level of a (fractional) timestep: linear interpolation of log sigma."""
        if not 0.0 <= t <= self.num_timesteps - 1:
            raise ValueError(f"timestep {t} outside [0, {self.num_timesteps - 1}]")
        low = math.floor(t)
        high = math.ceil(t)
        w = t - low
        return math.exp((1.0 - w) * self._log_sigmas[low] + w * self._log_sigmas[high])

    def t_to_sigma_tensor(self, t: Tensor) -> Tensor:
        """``t_to_sigma`` elementwise in float32 (k-diffusion's arithmetic)."""
        t = t.float()
        low = t.floor().long()
        high = t.ceil().long()
        w = t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> Tensor:
        """A1111/k-diffusion default schedule: ``n`` sigmas at uniformly spaced t from max to 0, then 0."""
        if n < 1:
            raise ValueError("n must be at least 1")
        t = torch.linspace(self.num_timesteps - 1, 0, n)
        return torch.cat([self.t_to_sigma_tensor(t), t.new_zeros(1)])

    def get_sigmas_karras(self, n: int, rho: float = 7.0) -> Tensor:
        """Karras et al. (2022) eq. 5 between the model's sigma_min and sigma_max, then 0."""
        if n < 1:
            raise ValueError("n must be at least 1")
        ramp = torch.linspace(0, 1, n)
        min_inv_rho = self.sigma_min ** (1 / rho)
        max_inv_rho = self.sigma_max ** (1 / rho)
        sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
        return torch.cat([sigmas, sigmas.new_zeros(1)])
