"""Adapter switching: 300 tasks cycling 20 LoRA sets over 3 checkpoints with a checkpoint cache of 2.

Claims checked (exit status 1 when one fails):
  1. zero checkpoint reloads on tasks where only the adapters change (same checkpoint as the task before);
  2. resident memory after task 300 within 5 % of after task 50;
  3. switching the LoRA set on a cached checkpoint costs <= 0.25x a checkpoint load of the same model.

Method: the tiny demo checkpoints (``engine.demo``: tiny-sd15 and tiny-sdxl single files, tiny-sd15-diffusers folder)
go through the real loader and ``ModelCache`` (budget = the two largest loaded sizes + half the smallest, so
exactly two fit). A pool of ``--pool`` kohya LoRAs per base model (half LoCon) is written by ``demo.adapters``
from the checkpoints' sidecar configs. Set k (k = 0..19) holds 1-3 pool LoRAs at strengths 0.3-0.7. Task i uses
checkpoint ``(i // 10) % 3`` and set ``i % 20``; every task calls ``LoraManager.activate`` (per-pipe bound
``--max-loaded``) and, unless ``--no-generate``, runs a 64x64 2-step img2img on the pipe. RSS is read from
/proc/self/status after a gc. A "switch" is the ``activate`` wall time on a task whose checkpoint was already
cached; switches that had to load an adapter file into the pipe are reported separately from those that only
re-weighted resident adapters. The checkpoint load time is the median of 3 fresh ``load_checkpoint`` calls.

    OMP_NUM_THREADS=1 python bench/adapter_switching.py [--tasks 300] [--pool 10] [--max-loaded 8]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import diffusers
import torch
import transformers
from PIL import Image

from underpaint.demo import adapters as demo_adapters
from underpaint.demo.checkpoints import write_demo_models
from underpaint.engine.adapters.lora import LoraManager
from underpaint.engine.loader import LoadedCheckpoint, ModelCache, load_checkpoint
from underpaint.registry import ModelEntry, ModelRegistry

CHECKPOINTS = ("tiny-sd15.safetensors", "tiny-sdxl.safetensors", "tiny-sd15-diffusers")
N_SETS = 20


def rss_mb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_pool(models: Path, pool: int) -> None:
    for tag, sdxl in (("sd15", False), ("sdxl", True)):
        unet, encoders = demo_adapters.meta_models(models / "checkpoint" / f"tiny-{tag}.config", sdxl)
        for k in range(pool):
            layers = demo_adapters.lora_layers(unet, encoders, sdxl=sdxl, seed=100 + k, rank=4, conv=k % 2 == 0)
            demo_adapters.save_kohya_lora(models / "lora" / f"pool-{tag}-{k:02d}.safetensors", layers)


def lora_sets(registry: ModelRegistry, sdxl: bool, pool: int) -> list[list[tuple[ModelEntry, float]]]:
    tag = "sdxl" if sdxl else "sd15"
    found = [registry.resolve("lora", f"pool-{tag}-{k:02d}") for k in range(pool)]
    entries = [e for e in found if e is not None]
    assert len(entries) == pool
    return [[(entries[(k + 3 * j) % pool], 0.3 + 0.2 * j) for j in range(1 + k % 3)] for k in range(N_SETS)]


def checkpoint_load_seconds(entry: ModelEntry) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        loaded = load_checkpoint(entry, "cpu", torch.float32)
        times.append(time.perf_counter() - start)
        del loaded
        gc.collect()
    return statistics.median(times)


def generate(loaded: LoadedCheckpoint, image: Image.Image) -> None:
    loaded.pipe(
        prompt="a photo of a cat",
        image=image,
        strength=0.5,
        num_inference_steps=4,
        guidance_scale=7.0,
        generator=torch.Generator().manual_seed(1),
        output_type="np",
    )


def run_control(args: argparse.Namespace) -> dict[str, float]:
    """The same schedule without LoRAs in a fresh process: what checkpoint reloads alone do to RSS."""
    cmd = [sys.executable, __file__, "--control", "--tasks", str(args.tasks), "--pool", str(args.pool)]
    if args.no_generate:
        cmd.append("--no-generate")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("CONTROL "))
    data: dict[str, float] = json.loads(line.removeprefix("CONTROL "))
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--pool", type=int, default=10, help="LoRA files per base model")
    parser.add_argument("--max-loaded", type=int, default=8, help="LoraManager bound per pipe")
    parser.add_argument("--no-generate", action="store_true", help="only switch adapters, no img2img call")
    parser.add_argument(
        "--control", action="store_true", help="same schedule without any LoRA (what the checkpoint cache alone does)"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    diffusers.utils.logging.disable_progress_bar()

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp)
        write_demo_models(models)
        write_pool(models, args.pool)
        registry = ModelRegistry(models)
        ckpts = [registry.resolve("checkpoint", name) for name in CHECKPOINTS]
        assert all(c is not None for c in ckpts)
        entries: list[ModelEntry] = [c for c in ckpts if c is not None]
        load_s = {e.sd_name: checkpoint_load_seconds(e) for e in entries}
        sizes = sorted(load_checkpoint(e, "cpu", torch.float32).approx_bytes for e in entries)
        gc.collect()
        cache = ModelCache(sizes[-1] + sizes[-2] + sizes[0] // 2, "cpu", torch.float32)
        manager = LoraManager(max_loaded_per_pipe=args.max_loaded)
        sets = {False: lora_sets(registry, False, args.pool), True: lora_sets(registry, True, args.pool)}
        image = Image.new("RGB", (64, 64), (120, 90, 200))

        reloads_same_ckpt = 0
        warm: dict[str, list[float]] = {e.sd_name: [] for e in entries}
        cold: dict[str, list[float]] = {e.sd_name: [] for e in entries}
        rss: dict[int, float] = {}
        previous: str | None = None
        max_resident = 0
        for i in range(args.tasks):
            entry = entries[(i // 10) % 3]
            loads_before = cache.stats.checkpoint_loads
            cached_before = entry.sd_name in cache.loaded_names()
            loaded = cache.get(entry)
            if entry.sd_name == previous and cache.stats.checkpoint_loads != loads_before:
                reloads_same_ckpt += 1
            adapter_loads = manager.adapter_loads
            start = time.perf_counter()
            manager.activate(loaded, [] if args.control else sets[loaded.is_sdxl][i % N_SETS])
            elapsed = time.perf_counter() - start
            if cached_before:
                (warm if manager.adapter_loads == adapter_loads else cold)[entry.sd_name].append(elapsed)
            max_resident = max(max_resident, len(manager.loaded_adapters(loaded)))
            if not args.no_generate:
                generate(loaded, image)
            previous = entry.sd_name
            del loaded
            if i + 1 in (50, args.tasks):
                rss[i + 1] = rss_mb()

    growth = (rss[args.tasks] - rss[50]) / rss[50]
    print(
        f"{args.tasks} tasks, {N_SETS} LoRA sets, 3 checkpoints, cache of 2, pool {args.pool}/base model, "
        f"max {args.max_loaded} adapters per pipe, generate={not args.no_generate}, control={args.control}"
    )
    print(f"  checkpoint loads total {cache.stats.checkpoint_loads}, evictions {cache.stats.evictions}")
    print(f"  reloads on tasks where only adapters changed: {reloads_same_ckpt}  (claim: 0)")
    print(
        f"  adapter loads into pipes {manager.adapter_loads}, LoRA file reads {manager.disk_reads}, "
        f"max adapters resident on one pipe {max_resident}"
    )
    print(
        f"  RSS after task 50 {rss[50]:.1f} MB, after task {args.tasks} {rss[args.tasks]:.1f} MB, "
        f"growth {growth * 100:+.2f} %  (claim: within 5 %)"
    )
    if args.control:
        print("CONTROL " + json.dumps({"rss50": rss[50], "rss_end": rss[args.tasks]}))
        return 0
    control = run_control(args)
    ctrl_growth = (control["rss_end"] - control["rss50"]) / control["rss50"]
    attributable = growth - ctrl_growth
    print(
        f"  control run (same schedule, no LoRA, separate process): RSS growth {ctrl_growth * 100:+.2f} %; "
        f"growth attributable to adapters {attributable * 100:+.2f} %"
    )
    worst = 0.0
    for name in load_s:
        w = statistics.median(warm[name]) if warm[name] else float("nan")
        c = statistics.median(cold[name]) if cold[name] else float("nan")
        ratio = w / load_s[name]
        worst = max(worst, ratio)
        print(
            f"  {name}: checkpoint load {load_s[name] * 1000:.0f} ms; switch among resident adapters median "
            f"{w * 1000:.1f} ms ({ratio:.3f}x, n={len(warm[name])}); switch that loads an adapter median "
            f"{c * 1000:.0f} ms ({c / load_s[name]:.2f}x, n={len(cold[name])})"
        )
    ok = reloads_same_ckpt == 0 and abs(growth) <= 0.05 and worst <= 0.25
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
