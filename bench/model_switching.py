"""Model switching on real-shape SD 1.5 checkpoints: the RAM tier, in-place copies, release before load, prefetch.

Method (one process, one run, ratios from figures measured in that run):
- Two random-weight SD 1.5 checkpoints at the real shape (``demo/real_shapes.py``, fp16 files, 2.13 GB each).
- A ``ModelCache`` whose device tier holds one model and whose RAM tier holds both files (the worker's setup when
  the device fits one checkpoint): load A (cold), switch to B (first switch: file read, conversion, in-place copy),
  then A, B, A, B (RAM tier: copies only). Peak RSS during each switch: ``VmHWM`` after resetting it
  (``/proc/self/clear_refs``), minus the process's RSS before any model was loaded.
- Baselines, after the cache is dropped: ``load_file`` + ``copy_`` of every tensor into the resident modules' tensors
  (the least a switch can do), and ``load_file`` + a cast of every tensor into new memory (the least a load can do).
- Prefetch: the same short img2img task queued 6 times alternating A/B, the worker's prefetch hint given before
  each task (what ``worker/loop.py`` does from the head of the queue), against 6 tasks on A alone; both from a
  fresh executor with the same budgets.

Acceptance (issue 23): RAM-tier switch <= 1.5x the copy baseline; first switch from disk <= 1.3x ``load_file`` +
cast; peak RSS during a switch <= 1.1x (one model + the RAM tier's budget); the alternating queue <= 1.1x the
single-checkpoint queue.

    .venv/bin/python bench/model_switching.py [--device cpu] [--work /tmp/switching-bench] [--size 256 --steps 8]

``bench/gpu.py`` runs ``measure`` on CUDA when a device is lent. Results: bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import numpy as np  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from underpaint.config import Settings  # noqa: E402
from underpaint.demo.real_shapes import write_real_checkpoint  # noqa: E402
from underpaint.engine.devices import pick_dtype  # noqa: E402
from underpaint.engine.executor import DiffusersExecutor  # noqa: E402
from underpaint.engine.job import GenerationJob  # noqa: E402
from underpaint.engine.loader import LoadedCheckpoint, ModelCache, _copy_plan, convert_checkpoint  # noqa: E402
from underpaint.registry import ModelEntry, ModelRegistry  # noqa: E402
from underpaint.vocabulary import SamplerName  # noqa: E402

A, B = "switch-a.safetensors", "switch-b.safetensors"


def _status(field: str) -> int:
    """A ``/proc/self/status`` figure in bytes (``VmRSS``, ``VmHWM``)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak(device: torch.device) -> int:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else _status("VmHWM")


def _timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, int]:
    """Seconds and peak memory (CPU: RSS high-water mark; CUDA: allocated) of ``fn()``."""
    gc.collect()
    _reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start, _peak(device)


def write_models(work: Path) -> Path:
    ckpt = work / "models" / "checkpoint"
    ckpt.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate((A, B)):
        if not (ckpt / name).exists():
            write_real_checkpoint(ckpt / name, sdxl=False, seed=seed + 1)
    return work / "models"


def _entry(registry: ModelRegistry, name: str) -> ModelEntry:
    found = registry.resolve("checkpoint", name)
    assert found is not None, name
    return found


def _job(checkpoint: str, size: int, steps: int) -> GenerationJob:
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8))
    return GenerationJob(
        checkpoint=checkpoint,
        init_image=picture,
        prompt="a lighthouse on a cliff",
        negative_prompt="",
        width=size,
        height=size,
        image_num=1,
        steps=steps,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler a"),
        seed=1,
        strength=0.5,
    )


def _queue(executor: DiffusersExecutor, names: list[str], size: int, steps: int) -> float:
    """Run one task per name, telling the executor before each which other checkpoint comes next."""
    start = time.perf_counter()
    for i, name in enumerate(names):
        after = [n for n in names[i + 1 :] if n != name][:1]
        executor.prefetch(after)
        executor.generate(_job(name, size, steps))
    _sync(executor.device)
    return time.perf_counter() - start


class _Figures(dict[str, Any]):
    """The results, each printed as it is measured (a run cut short still leaves its figures in the log)."""

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        print(f"{key}: {value}", file=sys.stderr, flush=True)


def measure(
    models: Path,
    device: torch.device,
    size: int = 256,
    steps: int = 8,
    tasks: int = 6,
    names: tuple[str, str] = (A, B),
    disk_repeats: int = 0,
    queue_rounds: int = 1,
) -> dict[str, Any]:
    dtype = pick_dtype(device)
    registry = ModelRegistry(models)
    a, b = _entry(registry, names[0]), _entry(registry, names[1])
    itemsize = torch.empty((), dtype=dtype).element_size()
    one_model = a.size // 2 * itemsize  # fp16 file: 2 bytes a weight
    device_budget = int(one_model * 1.3)
    ram_budget = a.size + b.size + (64 << 20)
    base_rss = _status("VmRSS")
    out: dict[str, Any] = _Figures(device=str(device), dtype=str(dtype), file_bytes=a.size)

    cache = ModelCache(device_budget, device, dtype, ram_budget_bytes=ram_budget)
    out["cold_load_s"], _ = _timed(device, lambda: cache.get(a))
    out["model_bytes"] = cache.loaded_bytes
    out["first_switch_from_disk_s"], disk_peak = _timed(device, lambda: cache.get(b))
    ram_times, ram_peaks = [], []
    for entry in (a, b, a, b):
        seconds, peak = _timed(device, lambda e=entry: cache.get(e))  # type: ignore[misc]
        ram_times.append(seconds)
        ram_peaks.append(peak)
    out["ram_switch_s"] = statistics.median(ram_times)
    out["stats"] = dict(vars(cache.stats))
    out["ram_tier_bytes"] = cache.ram.held_bytes
    out["ram_budget_bytes"] = ram_budget
    if device.type == "cpu":
        out["peak_rss_over_base_bytes"] = max(disk_peak, *ram_peaks) - base_rss
    else:
        out["peak_device_bytes"] = max(disk_peak, *ram_peaks)
    resident: LoadedCheckpoint | None = cache.get(b)
    cache.ram.clear()
    gc.collect()

    def copy_once(into: LoadedCheckpoint | None) -> None:
        assert into is not None
        sd = safetensors.torch.load_file(str(a.path))
        plan = _copy_plan(into, convert_checkpoint(sd, a))
        with torch.no_grad():
            for dest, src in plan:
                dest.copy_(src, non_blocking=True)

    out["baseline_load_file_copy_s"], _ = _timed(device, lambda: copy_once(resident))
    resident = None
    cache.clear()
    gc.collect()

    def cast_once() -> None:
        sd = safetensors.torch.load_file(str(b.path))
        cast = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
        del cast

    out["baseline_load_file_cast_s"], _ = _timed(device, cast_once)
    gc.collect()
    if disk_repeats:
        # The same comparison repeated, interleaved, medians: a disk switch with the RAM tier off (file read,
        # conversion, in-place copy) against load_file + cast of the same file.
        disk = ModelCache(device_budget, device, dtype, ram_budget_bytes=0)
        disk.get(a)
        switches, casts = [], []
        for i in range(disk_repeats):
            target = b if i % 2 == 0 else a
            switches.append(_timed(device, lambda e=target: disk.get(e))[0])  # type: ignore[misc]
            casts.append(_timed(device, cast_once)[0])
        out["disk_switch_median_s"] = statistics.median(switches)
        out["load_file_cast_median_s"] = statistics.median(casts)
        out["ratio_disk_switch_vs_cast_median"] = out["disk_switch_median_s"] / out["load_file_cast_median_s"]
        disk.clear()
        del disk
        gc.collect()

    settings = Settings(
        models_dir=models,
        device=str(device),
        checkpoint_cache_bytes=device_budget,
        checkpoint_ram_cache_bytes=ram_budget,
    )
    first, second = a.sd_name, b.sd_name
    queues: list[tuple[str, list[str]]] = [("one", [first] * tasks), ("alternating", [first, second] * (tasks // 2))]
    if not tasks:
        queues = []
    times: dict[str, list[float]] = {label: [] for label, _ in queues}
    for round_ in range(queue_rounds if queues else 0):
        # Rounds alternate which queue runs first, so a change in the machine's load hits both alike.
        for label, queue in queues if round_ % 2 == 0 else queues[::-1]:
            executor = DiffusersExecutor(settings, ModelRegistry(models))
            executor.generate(_job(first, size, steps))  # A resident: both queues start warm
            times[label].append(_queue(executor, queue, size, steps))
            out[f"queue_{label}_s"] = times[label]
            out[f"queue_{label}_stats"] = dict(vars(executor.cache.stats))
            executor.release()
            del executor
            gc.collect()

    out["ratio_ram_switch_vs_copy"] = out["ram_switch_s"] / out["baseline_load_file_copy_s"]
    out["ratio_disk_switch_vs_cast"] = out["first_switch_from_disk_s"] / out["baseline_load_file_cast_s"]
    if "peak_rss_over_base_bytes" in out:
        out["ratio_peak_rss_vs_model_plus_ram"] = out["peak_rss_over_base_bytes"] / (out["model_bytes"] + ram_budget)
    if tasks:
        ratios = [alt / one for alt, one in zip(times["alternating"], times["one"], strict=True)]
        out["ratio_alternating_vs_one_per_round"] = ratios
        out["ratio_alternating_vs_one"] = statistics.median(ratios)
    return out


def checks(out: dict[str, Any]) -> list[tuple[str, bool, str]]:
    wanted = [
        ("RAM-tier switch <= 1.5x load_file + copy_", "ratio_ram_switch_vs_copy", 1.5),
        ("first switch from disk <= 1.3x load_file + cast", "ratio_disk_switch_vs_cast", 1.3),
        ("disk switch <= 1.3x load_file + cast (medians)", "ratio_disk_switch_vs_cast_median", 1.3),
        ("peak RSS in a switch <= 1.1x (model + RAM budget)", "ratio_peak_rss_vs_model_plus_ram", 1.1),
        ("alternating queue with prefetch <= 1.1x one checkpoint", "ratio_alternating_vs_one", 1.1),
    ]
    return [(name, out[key] <= bound, f"{out[key]:.3f}") for name, key, bound in wanted if key in out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("/tmp/underpaint-switching-bench"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tasks", type=int, default=6)
    parser.add_argument("--disk-repeats", type=int, default=0, help="also: N interleaved disk switches and casts")
    parser.add_argument("--queue-rounds", type=int, default=1, help="queue pairs, alternating which runs first")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    models = write_models(args.work)
    out = measure(
        models,
        torch.device(args.device),
        args.size,
        args.steps,
        args.tasks,
        disk_repeats=args.disk_repeats,
        queue_rounds=args.queue_rounds,
    )
    out["load_average"] = os.getloadavg()
    print(json.dumps(out, indent=2, default=str), flush=True)
    results = checks(out)
    for name, ok, figure in results:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {figure}")
    return 0 if all(ok for _, ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
