"""One batch of four images vs four single runs (issue #3 benchmark: batch <= 0.75x the time).

Direct ``DiffusersExecutor.generate`` calls on the tiny SD1.5 demo checkpoint, warm (checkpoint cached, one run of
each kind first), 1 torch thread: an ``image_num=4`` job (seeds s..s+3 in one UNet batch) against four
``image_num=1`` jobs with the same seeds one after another. The two kinds alternate run by run (and which one goes
first alternates too) so that drift in the load of a shared machine hits both alike. Reported: the median of
each, their ratio, and the median of the per-pair ratios.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/batch_vs_single.py [--runs 7]
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "e2e")]

from tests.support.server import make_png  # noqa: E402

TARGET = 0.75


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs of each kind")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--strength", type=float, default=0.75)
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]
    import torch

    from underpaint.config import Settings
    from underpaint.demo.checkpoints import write_demo_models
    from underpaint.engine.executor import DiffusersExecutor
    from underpaint.registry import ModelRegistry
    from underpaint.tasks.contract import load_request
    from underpaint.worker.jobs import job_from_request

    torch.set_num_threads(1)  # one intra-op thread, as the service's worker runs
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_demo_models(models)
        executor = DiffusersExecutor(Settings(models_dir=models, torch_threads=1), ModelRegistry(models))
        png_b64 = base64.b64encode(make_png((args.size, args.size))).decode()
        single = job_from_request(load_request({
            "model_name": "tiny-sd15.safetensors", "image_base64": png_b64, "prompt": "a red house, oil painting",
            "negative_prompt": "blurry", "width": args.size, "height": args.size, "image_num": 1, "steps": args.steps,
            "guidance_scale": 7.0, "sampler_name": "Euler a", "strength": args.strength, "seed": 4000,
        }))  # fmt: skip
        batch = replace(single, image_num=args.batch)
        singles = [replace(single, seed=single.seed + i) for i in range(args.batch)]

        def run_batch() -> float:
            t0 = time.perf_counter()
            images = executor.generate(batch)
            assert len(images) == args.batch
            return time.perf_counter() - t0

        def run_singles() -> float:
            t0 = time.perf_counter()
            for job in singles:
                executor.generate(job)
            return time.perf_counter() - t0

        run_batch()  # warm-up: checkpoint load, first-call allocations
        run_singles()
        batched: list[float] = []
        separate: list[float] = []
        for i in range(args.runs):
            if i % 2 == 0:
                batched.append(run_batch())
                separate.append(run_singles())
            else:
                separate.append(run_singles())
                batched.append(run_batch())
            print(f"run {i}: batch of {args.batch} {batched[-1] * 1000:7.0f} ms   {args.batch} singles "
                  f"{separate[-1] * 1000:7.0f} ms   ratio {batched[-1] / separate[-1]:.3f}", flush=True)  # fmt: skip

    med_b, med_s = statistics.median(batched), statistics.median(separate)
    ratio = med_b / med_s
    pair = statistics.median(b / s for b, s in zip(batched, separate, strict=True))
    print(f"\n{args.size}x{args.size}, {args.steps} steps (strength {args.strength}), Euler a, tiny SD1.5, 1 torch thread, "
          f"{args.runs} runs each, load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"  {'':<22}{'median':>10}{'min':>10}{'max':>10}")
    for name, xs in ((f"image_num={args.batch}", batched), (f"{args.batch} x image_num=1", separate)):
        print(f"  {name:<22}{statistics.median(xs) * 1000:>8.0f}ms{min(xs) * 1000:>8.0f}ms{max(xs) * 1000:>8.0f}ms")
    print(f"  ratio of medians      {ratio:.3f}   (median of per-pair ratios {pair:.3f}; target <= {TARGET})")
    if ratio > TARGET:
        print("FAIL")
        raise SystemExit(1)
    print("PASS")


if __name__ == "__main__":
    main()
