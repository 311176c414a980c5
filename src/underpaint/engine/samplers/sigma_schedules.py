"""The sigma schedules A1111 >= 1.9 offers as "Schedule type", for ``n`` sampler steps of a discrete model.

Each builder returns a descending float32 list of ``n + 1`` sigmas, the last one 0, except where A1111's method
gives another shape: KL Optimal ends at sigma_min (not 0) and DDIM takes every ``1000 // n``-th training sigma,
which is not always ``n`` of them. Built with the float32 operations A1111 uses, so that the lists are
bit-identical to its own. Written from the published methods:

* Uniform: ``n`` timesteps evenly spaced from the last to the first training step, log-sigma interpolated
  (k-diffusion's ``get_sigmas``); Normal: the same from ``t(sigma_max)`` to ``t(sigma_min)``; SGM Uniform:
  ``n + 1`` such timesteps without the last (Stability's sgm discretisation).
* Karras (Karras et al. 2022, eq. 5, rho 7), Exponential (log-linear), Polyexponential (rho 1), between the
  model's sigma_min and sigma_max.
* KL Optimal (Sabour et al. 2024, "Align Your Steps", eq. for the KL-optimal schedule): ``tan`` of the linear
  interpolation between ``atan(sigma_max)`` and ``atan(sigma_min)``.
* Align Your Steps (NVIDIA's published 10-step sigmas for SD 1.5 and SDXL), log-linearly resampled to ``n``.
* Simple: every ``1000 / n``-th training sigma from the top; DDIM: every ``1000 // n``-th from timestep 1 up.
* Beta (Lee et al. 2024, "Beta Sampling is All You Need"): sigma_min + (sigma_max - sigma_min) times the
  Beta(0.6, 0.6) quantiles of ``n`` evenly spaced points, A1111's default alpha and beta.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from underpaint.engine.samplers.schedule import DiscreteSchedule
from underpaint.vocabulary import SchedulerName

# NVIDIA's Align Your Steps sigmas (10 steps), as A1111 ships them.
AYS_SD15 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults (options beta_dist_alpha / beta_dist_beta)


def _with_zero(sigmas: Tensor) -> Tensor:
    return torch.cat([sigmas.float(), sigmas.new_zeros(1, dtype=torch.float32)])


def _from_list(values: list[float]) -> Tensor:
    return torch.tensor([*values, 0.0], dtype=torch.float32)


def _sigma_to_t(s: DiscreteSchedule, sigma: float) -> Tensor:
    """Fractional timestep of ``sigma`` in float32 tensor arithmetic (as A1111 computes its grid's ends)."""
    log_sigma = torch.tensor(sigma).log()
    dists = log_sigma - s.log_sigmas
    low = int(dists.ge(0).cumsum(0).argmax().clamp(max=len(s.log_sigmas) - 2))
    lo, hi = s.log_sigmas[low], s.log_sigmas[low + 1]
    w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def _t_grid(s: DiscreteSchedule, n: int, sgm: bool) -> Tensor:
    start, end = _sigma_to_t(s, s.sigma_max), _sigma_to_t(s, s.sigma_min)
    t = torch.linspace(float(start), float(end), n + 1)[:-1] if sgm else torch.linspace(float(start), float(end), n)
    return _with_zero(s.t_to_sigma_tensor(t))


def exponential(s: DiscreteSchedule, n: int) -> Tensor:
    return _with_zero(torch.linspace(math.log(s.sigma_max), math.log(s.sigma_min), n).exp())


def polyexponential(s: DiscreteSchedule, n: int, rho: float = 1.0) -> Tensor:
    ramp = torch.linspace(1, 0, n) ** rho
    lo, hi = math.log(s.sigma_min), math.log(s.sigma_max)
    return _with_zero(torch.exp(ramp * (hi - lo) + lo))


def kl_optimal(s: DiscreteSchedule, n: int) -> Tensor:
    a_min = torch.arctan(torch.tensor(s.sigma_min))
    a_max = torch.arctan(torch.tensor(s.sigma_max))
    frac = torch.arange(n + 1) / n
    return torch.tan(frac * a_min + (1.0 - frac) * a_max)


def align_your_steps(n: int, is_sdxl: bool) -> Tensor:
    published = AYS_SDXL if is_sdxl else AYS_SD15
    if n == len(published):
        return _from_list(list(published))
    # log-linear interpolation of the published list onto n points
    xs = np.linspace(0, 1, len(published))
    ys = np.log(np.array(published[::-1]))
    resampled = np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]
    return _from_list([float(v) for v in resampled])


def simple(s: DiscreteSchedule, n: int) -> Tensor:
    table = s.sigmas
    stride = len(table) / n
    return _from_list([float(table[-(1 + int(k * stride))]) for k in range(n)])


def ddim(s: DiscreteSchedule, n: int) -> Tensor:
    table = s.sigmas
    stride = max(len(table) // n, 1)
    return _from_list([float(table[t]) for t in range(1, len(table), stride)][::-1])


def beta(s: DiscreteSchedule, n: int) -> Tensor:
    quantiles = [float(stats.beta.ppf(1.0 - float(u), BETA_ALPHA, BETA_BETA)) for u in np.linspace(0, 1, n)]
    return _from_list([s.sigma_min + q * (s.sigma_max - s.sigma_min) for q in quantiles])


_BUILDERS: dict[str, Callable[[DiscreteSchedule, int, bool], Tensor]] = {
    "Uniform": lambda s, n, _: s.get_sigmas(n),
    "Karras": lambda s, n, _: s.get_sigmas_karras(n),
    "Exponential": lambda s, n, _: exponential(s, n),
    "Polyexponential": lambda s, n, _: polyexponential(s, n),
    "SGM Uniform": lambda s, n, _: _t_grid(s, n, sgm=True),
    "KL Optimal": lambda s, n, _: kl_optimal(s, n),
    "Align Your Steps": lambda _, n, is_sdxl: align_your_steps(n, is_sdxl),
    "Simple": lambda s, n, _: simple(s, n),
    "Normal": lambda s, n, _: _t_grid(s, n, sgm=False),
    "DDIM": lambda s, n, _: ddim(s, n),
    "Beta": lambda s, n, _: beta(s, n),
}


def build_sigmas(label: SchedulerName, schedule: DiscreteSchedule, n: int, *, is_sdxl: bool = False) -> Tensor:
    """The ``label`` schedule for ``n`` steps (see the module docstring). "Automatic" is resolved before this
    (``vocabulary.resolve_sampler``)."""
    if n < 1:
        raise ValueError("n must be at least 1")
    builder = _BUILDERS.get(label)
    if builder is None:
        raise ValueError(f"unknown schedule type {label!r}; expected one of: {', '.join(_BUILDERS)}")
    return builder(schedule, n, is_sdxl)
