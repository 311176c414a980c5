"""Sigma-space ("k-diffusion family") samplers, written from the published methods.

References: Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models" (Euler/Heun
ODE steps, Algorithm 2; the DPM2 variant uses a DPM-Solver-2 midpoint in log sigma); Song et al. 2021 / Ho et al.
2020 for the ancestral split of a step into a deterministic part and fresh noise; Lu et al. 2022,
"DPM-Solver" (fast and adaptive solvers, in lambda = -log sigma) and "DPM-Solver++" (data-prediction 2S, 2M and
the stochastic variant). LMS is the linear multistep method on the ODE dx/dsigma = (x - D(x, sigma)) / sigma.

Every function takes a denoiser ``D(x, sigma)``, the latent, a descending sigma list of Python floats, a noise
function ``noise(sigma, sigma_next) -> Tensor`` and a progress hook called with the number of completed steps.
Scalars are Python floats (float64) so a step costs only the tensor ops on the latent (no device syncs).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import torch
from scipy import integrate
from torch import Tensor

from underpaint.engine.samplers.denoiser import Denoiser

NoiseFn = Callable[[float, float], Tensor]
OnStep = Callable[[int], None]


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic step to ``sigma_down`` plus noise of std ``sigma_up``."""
    if not eta or sigma_next == 0.0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = math.sqrt(sigma_next**2 - up**2)
    return down, up


def _d(x: Tensor, sigma: float, denoised: Tensor) -> Tensor:
    """ODE derivative dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def euler(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        x = x + _d(x, s, denoise(x, s)) * (s_next - s)
        on_step(i + 1)
    return x


def euler_ancestral(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        down, up = ancestral_step(s, s_next)
        x = x + _d(x, s, denoise(x, s)) * (down - s)
        if s_next > 0:
            x = x + noise(s, s_next) * up
        on_step(i + 1)
    return x


def heun(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _d(x, s, denoise(x, s))
        dt = s_next - s
        if s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _d(x_2, s_next, denoise(x_2, s_next))
            x = x + (d + d_2) * (dt / 2)
        on_step(i + 1)
    return x


def _dpm2_step(denoise: Denoiser, x: Tensor, s: float, target: float, d: Tensor) -> Tensor:
    """Second-order step s -> target through the log-sigma midpoint."""
    s_mid = math.exp(0.5 * (math.log(s) + math.log(target)))
    x_2 = x + d * (s_mid - s)
    d_2 = _d(x_2, s_mid, denoise(x_2, s_mid))
    return x + d_2 * (target - s)


def dpm2(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _d(x, s, denoise(x, s))
        x = x + d * (s_next - s) if s_next == 0 else _dpm2_step(denoise, x, s, s_next, d)
        on_step(i + 1)
    return x


def dpm2_ancestral(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = _d(x, s, denoise(x, s))
        down, up = ancestral_step(s, s_next)
        if down == 0:
            x = x + d * (down - s)
        else:
            x = _dpm2_step(denoise, x, s, down, d)
            x = x + noise(s, s_next) * up
        on_step(i + 1)
    return x


def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for step i: integrals of the Lagrange basis over [sigma_i, sigma_{i+1}].

    Weight j belongs to the derivative taken at sigma_{i-j}.
    """

    def basis(j: int) -> Callable[[float], float]:
        def fn(tau: float) -> float:
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
            return prod

        return fn

    return [integrate.quad(basis(j), sigmas[i], sigmas[i + 1], epsrel=1e-4)[0] for j in range(order)]


def lms(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep, order: int = 4
) -> Tensor:
    n = len(sigmas) - 1
    coeffs = [lms_coefficients(sigmas, i, min(i + 1, order)) for i in range(n)]
    history: list[Tensor] = []  # most recent first
    for i in range(n):
        s = sigmas[i]
        history.insert(0, _d(x, s, denoise(x, s)))
        del history[order:]
        step = history[0] * coeffs[i][0]
        for c, d in zip(coeffs[i][1:], history[1:], strict=False):
            step = step + d * c
        x = x + step
        on_step(i + 1)
    return x


def _lam(sigma: float) -> float:
    return -math.log(sigma)


def dpmpp_2s_ancestral(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep
) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        down, up = ancestral_step(s, s_next)
        if down == 0:
            x = x + _d(x, s, den) * (down - s)
        else:
            # DPM-Solver++(2S), data prediction, midpoint r = 1/2 in lambda.
            h = _lam(down) - _lam(s)
            s_mid = math.exp(-(_lam(s) + 0.5 * h))
            x_2 = x * (s_mid / s) - den * math.expm1(-0.5 * h)
            den_2 = denoise(x_2, s_mid)
            x = x * (down / s) - den_2 * math.expm1(-h)
        if s_next > 0:
            x = x + noise(s, s_next) * up
        on_step(i + 1)
    return x


def dpmpp_2m(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    old_den: Tensor | None = None
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = den  # lambda -> infinity: the exponential integrator lands on the data prediction
        else:
            h = _lam(s_next) - _lam(s)
            if old_den is None:
                den_d = den
            else:
                r = (_lam(s) - _lam(sigmas[i - 1])) / h
                den_d = den * (1 + 1 / (2 * r)) - old_den * (1 / (2 * r))
            x = x * (s_next / s) - den_d * math.expm1(-h)
        old_den = den
        on_step(i + 1)
    return x


def _sde_midpoint(s: float, s_next: float, r: float) -> float:
    t = _lam(s)
    return math.exp(-(t + (_lam(s_next) - t) * r))


def dpmpp_sde_noise_queries(sigmas: Sequence[float], r: float = 0.5) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs ``dpmpp_sde`` asks its noise function for, in order (for prefetching)."""
    queries = []
    for s, s_next in itertools.pairwise(sigmas):
        if s_next != 0:
            queries += [(s, _sde_midpoint(s, s_next, r)), (s, s_next)]
    return queries


def dpmpp_sde(
    denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep, r: float = 0.5
) -> Tensor:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = x + _d(x, s, den) * (s_next - s)
        else:
            t = _lam(s)
            s_mid = _sde_midpoint(s, s_next, r)
            # Stage 1: stochastic step to the intermediate level.
            down, up = ancestral_step(s, s_mid)
            x_2 = x * (down / s) - den * math.expm1(t - _lam(down))
            x_2 = x_2 + noise(s, s_mid) * up
            den_2 = denoise(x_2, s_mid)
            # Stage 2: full step with the blended data prediction.
            down, up = ancestral_step(s, s_next)
            fac = 1 / (2 * r)
            den_d = den * (1 - fac) + den_2 * fac
            x = x * (down / s) - den_d * math.expm1(t - _lam(down))
            x = x + noise(s, s_next) * up
        on_step(i + 1)
    return x


def sde_noise_queries(sigmas: Sequence[float]) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) pairs ``dpmpp_2m_sde`` and ``dpmpp_3m_sde`` ask their noise function for."""
    return [(s, s_next) for s, s_next in itertools.pairwise(sigmas) if s_next != 0]


def _sde_noise_scale(s_next: float, h: float) -> float:
    """Std of the fresh noise of an eta = 1 DPM-Solver++ SDE step of length h (in lambda) ending at s_next."""
    return s_next * math.sqrt(-math.expm1(-2 * h))


def dpmpp_2m_sde(
    denoise: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    noise: NoiseFn,
    on_step: OnStep,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, eta = 1): the first-order SDE step in data prediction plus a
    multistep correction from the previous denoised estimate, midpoint or Heun weighted."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    old_den: Tensor | None = None
    h_last = 0.0
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = den
        else:
            h = _lam(s_next) - _lam(s)
            phi = -math.expm1(-2 * h)  # 1 - exp(-h - eta h) with eta = 1
            x = x * (s_next / s * math.exp(-h)) + den * phi
            if old_den is not None:
                r = h_last / h
                weight = (phi / (-2 * h) + 1) / r if solver_type == "heun" else 0.5 * phi / r
                x = x + (den - old_den) * weight
            x = x + noise(s, s_next) * _sde_noise_scale(s_next, h)
            h_last = h
        old_den = den
        on_step(i + 1)
    return x


def dpmpp_3m_sde(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    """DPM-Solver++(3M) SDE (eta = 1): the SDE step with second and third order multistep corrections from the
    two previous denoised estimates."""
    den_1: Tensor | None = None
    den_2: Tensor | None = None
    h_1 = h_2 = 0.0
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        den = denoise(x, s)
        if s_next == 0:
            x = den
        else:
            h = _lam(s_next) - _lam(s)
            h_eta = 2 * h
            x = x * math.exp(-h_eta) + den * -math.expm1(-h_eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if den_2 is not None and den_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - den_1) / r0
                d1_1 = (den_1 - den_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + d1 * phi_2 - d2 * (phi_2 / h_eta - 0.5)
            elif den_1 is not None:
                x = x + (den - den_1) * (phi_2 / (h_1 / h))
            x = x + noise(s, s_next) * _sde_noise_scale(s_next, h)
            h_1, h_2 = h, h_1
        den_1, den_2 = den, den_1
        on_step(i + 1)
    return x


def restart_steps(sigmas: Sequence[float]) -> list[tuple[float, float]]:
    """The (sigma, sigma_next) Heun steps of A1111's Restart sampler for a schedule (Xu et al. 2023, "Restart
    Sampling for Improving Generative Processes", with A1111's automatic restart list).

    Under 20 steps: the schedule as given. From 20: a Karras schedule of ``steps - K * times`` steps between the
    given schedule's ends, where at the step nearest sigma 0.1 the sampler jumps back up to the step nearest
    sigma 2 and walks down again over a Karras schedule of K + 1 levels, ``times`` times (K = 9 once; from 36
    steps K = steps // 4, twice). A step whose start is above the previous step's end begins with fresh noise.
    """
    steps = len(sigmas) - 1
    base = [float(v) for v in sigmas]
    if steps < 20:
        return list(itertools.pairwise(base))
    k, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    karras = _karras(steps - k * times, base[-2], base[0])
    lo = min(range(len(karras)), key=lambda j: abs(karras[j] - 0.1))
    hi = min(range(len(karras)), key=lambda j: abs(karras[j] - 2.0))
    out: list[tuple[float, float]] = []
    for i in range(len(karras) - 1):
        out.append((karras[i], karras[i + 1]))
        if i + 1 == lo and hi < lo:
            walk = _karras(k + 1, karras[lo], karras[hi])[:-1]
            out += list(itertools.pairwise(walk)) * times
    return out


def _karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. (2022) eq. 5 in float32 (as the schedules), then 0."""
    ramp = torch.linspace(0, 1, n)
    sig = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return [*(float(v) for v in sig), 0.0]


def restart(denoise: Denoiser, x: Tensor, sigmas: Sequence[float], noise: NoiseFn, on_step: OnStep) -> Tensor:
    """A1111's Restart sampler: Heun steps over ``restart_steps(sigmas)``; going back up from sigma_lo to a higher
    sigma adds fresh noise of std ``sqrt(sigma^2 - sigma_lo^2)`` (from the per-image streams)."""
    plan = restart_steps(sigmas)
    last: float | None = None
    for i, (s, s_next) in enumerate(plan):
        if last is not None and last < s:
            x = x + noise(last, s) * math.sqrt(s * s - last * last)
        d = _d(x, s, denoise(x, s))
        dt = s_next - s
        if s_next == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            x = x + (d + _d(x_2, s_next, denoise(x_2, s_next))) * (dt / 2)
        last = s_next
        on_step(i + 1)
    return x


# --- DPM-Solver (Lu et al. 2022), noise prediction in lambda = -log sigma --------------------------------------


class _DPMSolver:
    """DPM-Solver-1/2/3 single steps with an eps cache per step, over a sigma-space denoiser."""

    def __init__(self, denoise: Denoiser) -> None:
        self.denoise = denoise
        self.nfe = 0

    def eps(self, cache: dict[float, Tensor], x: Tensor, lam: float) -> Tensor:
        if lam not in cache:
            sigma = math.exp(-lam)
            cache[lam] = (x - self.denoise(x, sigma)) / sigma
            self.nfe += 1
        return cache[lam]

    def step1(self, x: Tensor, lam: float, lam_next: float, cache: dict[float, Tensor]) -> Tensor:
        h = lam_next - lam
        return x - self.eps(cache, x, lam) * (math.exp(-lam_next) * math.expm1(h))

    def step2(self, x: Tensor, lam: float, lam_next: float, cache: dict[float, Tensor], r1: float = 0.5) -> Tensor:
        h = lam_next - lam
        eps = self.eps(cache, x, lam)
        s1 = lam + r1 * h
        u1 = x - eps * (math.exp(-s1) * math.expm1(r1 * h))
        eps_1 = self.eps(cache, u1, s1)
        sig = math.exp(-lam_next)
        return x - eps * (sig * math.expm1(h)) - (eps_1 - eps) * (sig / (2 * r1) * math.expm1(h))

    def step3(self, x: Tensor, lam: float, lam_next: float, cache: dict[float, Tensor]) -> Tensor:
        r1, r2 = 1 / 3, 2 / 3
        h = lam_next - lam
        eps = self.eps(cache, x, lam)
        s1, s2 = lam + r1 * h, lam + r2 * h
        u1 = x - eps * (math.exp(-s1) * math.expm1(r1 * h))
        eps_1 = self.eps(cache, u1, s1)
        sig2 = math.exp(-s2)
        u2 = (
            x
            - eps * (sig2 * math.expm1(r2 * h))
            - (eps_1 - eps) * (sig2 * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1))
        )
        eps_2 = self.eps(cache, u2, s2)
        sig = math.exp(-lam_next)
        return x - eps * (sig * math.expm1(h)) - (eps_2 - eps) * (sig / r2 * (math.expm1(h) / h - 1))

    def ancestral_target(self, lam: float, lam_next: float, lam_end: float) -> tuple[float, float]:
        """Deterministic target (in lambda, capped at lam_end) and noise std of an eta=1 step lam -> lam_next."""
        down, _ = ancestral_step(math.exp(-lam), math.exp(-lam_next))
        target = min(lam_end, _lam(down))
        up = math.sqrt(max(math.exp(-2 * lam_next) - math.exp(-2 * target), 0.0))
        return target, up


def dpm_fast(
    denoise: Denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    n: int,
    noise: NoiseFn,
    on_step: OnStep,
) -> Tensor:
    """DPM-Solver-fast with exactly ``n`` model evaluations (orders 3,..,3 + remainder), eta = 1."""
    if n < 1:
        raise ValueError("DPM fast needs at least one model evaluation")
    solver = _DPMSolver(denoise)
    lam_start, lam_end = _lam(sigma_max), _lam(sigma_min)
    m = n // 3 + 1
    lams = [lam_start + (lam_end - lam_start) * k / m for k in range(m)] + [lam_end]
    orders = [3] * (m - 2) + [2, 1] if n % 3 == 0 else [3] * (m - 1) + [n % 3]
    for i, order in enumerate(orders):
        lam, lam_next = lams[i], lams[i + 1]
        target, up = solver.ancestral_target(lam, lam_next, lam_end)
        cache: dict[float, Tensor] = {}
        if order == 1:
            x = solver.step1(x, lam, target, cache)
        elif order == 2:
            x = solver.step2(x, lam, target, cache)
        else:
            x = solver.step3(x, lam, target, cache)
        x = x + noise(math.exp(-lam), math.exp(-lam_next)) * up
        on_step(solver.nfe)
    return x


def dpm_adaptive(
    denoise: Denoiser,
    x: Tensor,
    sigma_min: float,
    sigma_max: float,
    noise: NoiseFn,
    on_progress: Callable[[float], None],
    *,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    accept_safety: float = 0.81,
) -> Tensor:
    """DPM-Solver-23 with adaptive step size (integral controller), eta = 1.

    The error norm is taken over the whole batch (as A1111 does), so images of a batch share step sizes.
    ``on_progress`` receives the fraction of the lambda interval covered after each accepted step.
    """
    solver = _DPMSolver(denoise)
    lam_start, lam_end = _lam(sigma_max), _lam(sigma_min)
    # Integral controller on the error of the embedded pair; with ancestral noise the effective order is 1.5.
    exponent = 1.0 / 1.5
    h = abs(h_init)
    s = lam_start
    x_prev = x
    numel_sqrt = math.sqrt(x.numel())
    while s < lam_end - 1e-5:
        t = min(lam_end, s + h)
        target, up = solver.ancestral_target(s, t, lam_end)
        cache: dict[float, Tensor] = {}
        x_low = solver.step2(x, s, target, cache, r1=1 / 3)
        x_high = solver.step3(x, s, target, cache)
        delta = (rtol * x_low.abs().maximum(x_prev.abs())).clamp(min=atol)
        # Norm in float32 at least: a half-precision sum of squares can overflow.
        error = float(((x_low - x_high) / delta).to(torch.promote_types(x.dtype, torch.float32)).norm()) / numel_sqrt
        if not math.isfinite(error):
            # A NaN/inf error would never be accepted and the loop would not terminate.
            raise FloatingPointError("DPM adaptive: the model produced non-finite values")
        factor = (1.0 / (error + 1e-8)) ** exponent
        factor = 1 + math.atan(factor - 1)  # soft limiter
        h *= factor
        if factor >= accept_safety:
            x_prev = x_low
            x = x_high + noise(math.exp(-s), math.exp(-t)) * up
            s = t
            on_progress((s - lam_start) / (lam_end - lam_start))
    return x
