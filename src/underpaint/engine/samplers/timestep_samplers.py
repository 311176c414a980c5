"""DDIM, PLMS and UniPC in the VP view with A1111 >= v1.6 semantics.

Timesteps are the ldm "uniform" grid ``clip(range(0, 1000, 1000 // N) + 1, 0, 999)`` (ascending). DDIM (Song et al.
2021, eta = 0) and PLMS (Liu et al. 2022, pseudo linear multistep with an improved-Euler first step) walk the grid
from its last entry down to ``timesteps[0]`` (= 1), i.e. ``len(timesteps) - 1`` steps, ending at abar[1] rather than
at 0. UniPC (Zhao et al. 2023) runs the multistep predictor-corrector with the B(h) = h ("bh1") variant, data
prediction, order 3 with lower orders for the warm-up and the final steps, and no corrector on the last step, on a
time-uniform grid in continuous time t in (0, 1], the model seeing timestep ``(t - 1/1000) * 1000``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from underpaint.engine.samplers.denoiser import EpsFn
from underpaint.engine.samplers.k_samplers import OnStep
from underpaint.engine.samplers.schedule import DiscreteSchedule


def uniform_timesteps(steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """ldm "uniform" DDIM grid, +1 offset, clipped: ascending, starts at 1."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be between 1 and {num_train_timesteps} for DDIM/PLMS/UniPC, got {steps}")
    stride = num_train_timesteps // steps
    return [min(max(t + 1, 0), num_train_timesteps - 1) for t in range(0, num_train_timesteps, stride)]


def _ddim_update(x: Tensor, eps: Tensor, a_t: float, a_prev: float) -> tuple[Tensor, Tensor]:
    """Deterministic DDIM move from abar = a_t to a_prev given the noise prediction; returns (x_prev, x0)."""
    pred_x0 = (x - eps * math.sqrt(1.0 - a_t)) * (1.0 / math.sqrt(a_t))
    return pred_x0 * math.sqrt(a_prev) + eps * math.sqrt(1.0 - a_prev), pred_x0


def ddim(eps_fn: EpsFn, x: Tensor, timesteps: Sequence[int], schedule: DiscreteSchedule, on_step: OnStep) -> Tensor:
    n = len(timesteps) - 1
    for i in range(n):
        idx = n - i
        t, t_prev = timesteps[idx], timesteps[idx - 1]
        e = eps_fn(x, float(t))
        x, _ = _ddim_update(x, e, schedule.alpha_cumprod(t), schedule.alpha_cumprod(t_prev))
        on_step(i + 1)
    return x


def plms(eps_fn: EpsFn, x: Tensor, timesteps: Sequence[int], schedule: DiscreteSchedule, on_step: OnStep) -> Tensor:
    n = len(timesteps) - 1
    old: list[Tensor] = []  # previous noise predictions, oldest first (at most 3)
    for i in range(n):
        idx = n - i
        t, t_prev = timesteps[idx], timesteps[idx - 1]
        a_t, a_prev = schedule.alpha_cumprod(t), schedule.alpha_cumprod(t_prev)
        e = eps_fn(x, float(t))
        if not old:
            # Improved Euler: average with the prediction at the provisional next point.
            x_p, _ = _ddim_update(x, e, a_t, a_prev)
            e_p = (e + eps_fn(x_p, float(t_prev))) / 2
        elif len(old) == 1:
            e_p = (e * 3 - old[-1]) / 2
        elif len(old) == 2:
            e_p = (e * 23 - old[-1] * 16 + old[-2] * 5) / 12
        else:
            e_p = (e * 55 - old[-1] * 59 + old[-2] * 37 - old[-3] * 9) / 24
        x, _ = _ddim_update(x, e_p, a_t, a_prev)
        old.append(e)
        del old[:-3]
        on_step(i + 1)
    return x


class _ContinuousVP:
    """Piecewise-linear log alpha over continuous t_k = (k + 1) / N, extrapolated linearly at the ends."""

    def __init__(self, schedule: DiscreteSchedule) -> None:
        n = schedule.num_timesteps
        self.total_n = n
        self.t_grid = [(k + 1) / n for k in range(n)]
        self.log_alpha = [0.5 * math.log(schedule.alpha_cumprod(k)) for k in range(n)]

    def log_mean(self, t: float) -> float:
        k = min(max(bisect.bisect_left(self.t_grid, t) - 1, 0), self.total_n - 2)
        t0, t1 = self.t_grid[k], self.t_grid[k + 1]
        y0, y1 = self.log_alpha[k], self.log_alpha[k + 1]
        return y0 + (t - t0) * (y1 - y0) / (t1 - t0)

    def alpha_sigma_lambda(self, t: float) -> tuple[float, float, float]:
        la = self.log_mean(t)
        sigma = math.sqrt(1.0 - math.exp(2.0 * la))
        return math.exp(la), sigma, la - math.log(sigma)


def _bh1_coefficients(rks: Sequence[float], hh: float, order: int) -> tuple[list[float], list[float]]:
    """UniPC B(h)=h weights: (predictor rhos for the order-1 history differences, corrector rhos)."""
    r = np.array([*list(rks), 1.0], dtype=np.float64)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial = 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi_k * factorial / hh)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    mat = np.stack(rows)
    vec = np.array(b)
    if order == 1:
        rhos_p: list[float] = []
    elif order == 2:
        rhos_p = [0.5]
    else:
        rhos_p = [float(v) for v in np.linalg.solve(mat[:-1, :-1], vec[:-1])]
    rhos_c = [0.5] if order == 1 else [float(v) for v in np.linalg.solve(mat, vec)]
    return rhos_p, rhos_c


def unipc(
    eps_fn: EpsFn,
    x: Tensor,
    steps: int,
    schedule: DiscreteSchedule,
    on_step: OnStep,
    *,
    t_start: float = 1.0,
    order: int = 3,
) -> Tensor:
    """UniPC-bh1 multistep (data prediction) from continuous time ``t_start`` to 1/N over ``steps`` steps."""
    if steps < 1:
        raise ValueError("UniPC needs at least one step")
    order = min(order, steps)
    vp = _ContinuousVP(schedule)
    t_end = 1.0 / vp.total_n
    ts = [t_start + (t_end - t_start) * k / steps for k in range(steps + 1)]
    coef = [vp.alpha_sigma_lambda(t) for t in ts]

    def data_pred(x_: Tensor, k: int) -> Tensor:
        alpha, sigma, _ = coef[k]
        e = eps_fn(x_, (ts[k] - t_end) * vp.total_n)
        return (x_ - e * sigma) * (1.0 / alpha)

    hist_x0: list[Tensor] = [data_pred(x, 0)]
    hist_k: list[int] = [0]
    for step in range(1, steps + 1):
        step_order = min(step, order, steps + 1 - step)
        use_corrector = step < steps
        k0 = hist_k[-1]
        m0 = hist_x0[-1]
        alpha_t, sigma_t, lam_t = coef[step]
        _, sigma_0, lam_0 = coef[k0]
        h = lam_t - lam_0
        rks, d1s = [], []
        for i in range(1, step_order):
            rk = (coef[hist_k[-(i + 1)]][2] - lam_0) / h
            rks.append(rk)
            d1s.append((hist_x0[-(i + 1)] - m0) * (1.0 / rk))
        hh = -h
        rhos_p, rhos_c = _bh1_coefficients(rks, hh, step_order)
        x_base = x * (sigma_t / sigma_0) - m0 * (alpha_t * math.expm1(hh))
        scale = alpha_t * hh
        x_t = x_base
        for rho, d in zip(rhos_p, d1s, strict=True):
            x_t = x_t - d * (scale * rho)
        if use_corrector:
            m_t = data_pred(x_t, step)
            corr = (m_t - m0) * rhos_c[-1]
            for rho, d in zip(rhos_c[:-1], d1s, strict=True):
                corr = corr + d * rho
            x_t = x_base - corr * scale
            hist_x0.append(m_t)
            hist_k.append(step)
            del hist_x0[:-order], hist_k[:-order]
        x = x_t
        on_step(step)
    return x
