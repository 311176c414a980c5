"""Sampler overhead per model evaluation versus a bare tiny-UNet call (not a test).

For each of the 20 A1111 sampler names, run ``sample_img2img`` (20 steps, strength 0.75, batch 1, 64x64 latent =
512 px) on a tiny random SD1.5-shaped UNet (float32, CPU, one thread) and divide the wall time by the number of
UNet evaluations. The baseline is the same UNet called directly with the same input shapes. Each measurement is the
best of ``--repeats`` runs (the machine is shared; the minimum is the least disturbed run).

Because wall-clock ratios on a shared machine are noisy, the sampler's own cost is also measured directly: the same
run with a trivial model (``x * 0.01``) gives the sampler overhead per evaluation in microseconds, and
``(bare + overhead) / bare`` is a noise-free estimate of the ratio.

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/samplers_overhead.py [--repeats 3] [--size 64] [--names "Euler a" ...]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import Tensor

from underpaint.engine.samplers import SAMPLER_NAMES, DiscreteSchedule, NoiseSource, sample_img2img
from underpaint.vocabulary import SamplerName


def build_unet() -> Any:
    torch.manual_seed(0)
    unet: Any = UNet2DConditionModel(  # type: ignore[no-untyped-call]  # diffusers: register_to_config is untyped
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    return unet.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.75)
    parser.add_argument("--names", nargs="*", default=list(SAMPLER_NAMES), help="sampler names (default: all 20)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    unet = build_unet()
    ctx = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(1))
    schedule = DiscreteSchedule.from_betas()
    init = torch.randn(1, 4, args.size, args.size, generator=torch.Generator().manual_seed(2))

    @torch.no_grad()
    def model_fn(x: Tensor, t: Tensor) -> Tensor:
        out: Tensor = unet(x, t, encoder_hidden_states=ctx).sample
        return out

    t_fixed = torch.full((1,), 500.0)

    def bare(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            model_fn(init, t_fixed)
        return (time.perf_counter() - start) / n

    bare(3)  # warm-up
    print(f"latent 1x4x{args.size}x{args.size}, steps {args.steps}, strength {args.strength}, torch threads 1")
    print(f"{'sampler':20s} {'evals':>5s} {'ms/eval':>8s} {'bare ms':>8s} {'ratio':>6s} {'ovh us':>7s} {'est':>6s}")
    ratios = []
    estimates = []

    def trivial(x: Tensor, t: Tensor) -> Tensor:
        return x * 0.01

    def overhead(name: SamplerName, n_evals: int) -> float:
        best = float("inf")
        for _ in range(max(args.repeats, 5)):
            start = time.perf_counter()
            sample_img2img(name, trivial, schedule, init, args.steps, args.strength, NoiseSource([7]))
            best = min(best, (time.perf_counter() - start) / n_evals)
        return best

    for name in args.names:
        calls = 0

        def counted(x: Tensor, t: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            return model_fn(x, t)

        best = float("inf")
        best_bare = float("inf")
        for _ in range(args.repeats):
            calls = 0
            start = time.perf_counter()
            sample_img2img(name, counted, schedule, init, args.steps, args.strength, NoiseSource([7]))
            best = min(best, (time.perf_counter() - start) / calls)
            # Interleave the baseline so both see the same machine load.
            best_bare = min(best_bare, bare(calls))
        ratio = best / best_bare
        ratios.append(ratio)
        ovh = overhead(name, calls)
        est = (best_bare + ovh) / best_bare
        estimates.append(est)
        print(
            f"{name:20s} {calls:5d} {best * 1e3:8.2f} {best_bare * 1e3:8.2f} {ratio:6.3f} {ovh * 1e6:7.0f} {est:6.3f}"
        )
    print(f"wall-clock ratio: max {max(ratios):.3f}, median {sorted(ratios)[len(ratios) // 2]:.3f}")
    print(f"estimated ratio (bare + overhead) / bare: max {max(estimates):.3f}")


if __name__ == "__main__":
    main()
