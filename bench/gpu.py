"""The engine against bare diffusers on a CUDA GPU, in one process, interleaved (issue #11).

Sections, in order (each is skipped, and says so, once the time budget ``--budget-s`` is spent):

1. speed: SD 1.5 at 512² and SDXL at 1024², 20 steps, strength 0.75 (15 UNet steps), Euler, CFG 7, image_num 1 and
   4. The engine (``DiffusersExecutor.generate``) and bare diffusers (``StableDiffusion[XL]Img2ImgPipeline.__call__``
   on the same loaded modules, ``EulerDiscreteScheduler``) alternate run by run, both fp16 weights with SDPA
   attention (diffusers' default processor, which both use). it/s = 15 / wall seconds of the whole call (prompt
   encoding, VAE encode and decode included on both sides); s/image = wall / image_num; peak VRAM =
   ``max_memory_allocated`` during the call (weights included: both sides use the same resident modules).
2. model switch: two SD 1.5 checkpoints both in the model cache; a task on B right after a task on A, against a task
   on B right after B (the switch costs the difference). The first, cold, load of B is reported too.
3. HTTP: SD 1.5 512², image_num 1: a live ``underpaint serve`` (fp16, embedded worker process) timed from submit to a
   task-result poll (every 10 ms) that says SUCCEED plus the image download, against a direct engine call plus PNG
   encoding in this process, alternating.
4. model tiers (``bench/model_switching.py``'s ``measure`` on CUDA): a switch between two SD 1.5 checkpoints held in
   the RAM tier (pinned) against ``load_file`` + ``copy_`` into the resident tensors; the first switch from disk
   against ``load_file`` + cast to the device; peak allocated VRAM during a switch; a queue alternating the two with
   prefetch against the same queue on one checkpoint (issue #23).
5. compile: the engine with ``compile = true`` (inductor) for SD 1.5 512²: the first call's time (the warm-up a
   user pays once per shape bucket) and the steady it/s against bare diffusers.

Targets (issue #11): engine >= 0.95x diffusers it/s; with compile >= 1.2x; HTTP <= 1.05x direct at SD 1.5 512²;
peak VRAM within 10 % of diffusers. The script prints one table and ``PASS``/``FAIL`` per target, and writes JSON.

Models: ``--models DIR`` with ``checkpoint/real-sd15.safetensors``, ``real-sd15-b.safetensors`` and
``real-sdxl.safetensors`` (random weights at the real shapes: ``underpaint.demo.real_shapes``). ``--dry-run`` runs
every section on CPU with the tiny demo models at 128² and 4 steps: it checks the code, not the speed.

    python bench/gpu.py --models /tmp/underpaint-realshape --out gpu-bench.json
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # bench.model_switching

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from underpaint.config import Settings  # noqa: E402
from underpaint.engine.executor import DiffusersExecutor  # noqa: E402
from underpaint.engine.job import GenerationJob  # noqa: E402
from underpaint.registry import ModelRegistry  # noqa: E402
from underpaint.vocabulary import SamplerName  # noqa: E402

PROMPT = "a lighthouse on a cliff at dusk, oil painting, detailed"
NEGATIVE = "blurry, low quality"
KEY = "bench-key"


@dataclass
class Case:
    name: str
    checkpoint: str
    size: int
    image_num: int
    steps: int
    strength: float = 0.75


@dataclass
class Result:
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def init_image(size: int) -> Image.Image:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    arr = np.stack([xx * 255 // (size - 1), yy * 255 // (size - 1), (xx + yy) % 256], axis=-1)
    return Image.fromarray((arr + rng.integers(0, 32, arr.shape)).clip(0, 255).astype("uint8"))


def job_for(case: Case, seed: int = 1) -> GenerationJob:
    return GenerationJob(
        checkpoint=case.checkpoint,
        init_image=init_image(case.size),
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        width=case.size,
        height=case.size,
        image_num=case.image_num,
        steps=case.steps,
        guidance_scale=7.0,
        sampler_name=SamplerName("Euler"),
        seed=seed,
        strength=case.strength,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Callable[[], Any]) -> tuple[float, int]:
    """Wall seconds and peak allocated bytes of ``fn()``."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return seconds, peak


def diffusers_call(executor: DiffusersExecutor, case: Case) -> Callable[[], Any]:
    from diffusers import EulerDiscreteScheduler

    loaded = executor.cache.get(executor.registry.resolve("checkpoint", case.checkpoint))  # type: ignore[arg-type]
    pipe = loaded.pipe
    if not isinstance(pipe.scheduler, EulerDiscreteScheduler):
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)  # type: ignore[no-untyped-call]
    image = init_image(case.size)

    def run() -> Any:
        generator = torch.Generator("cpu").manual_seed(1)
        return pipe(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            image=image,
            strength=case.strength,
            num_inference_steps=case.steps,
            guidance_scale=7.0,
            num_images_per_prompt=case.image_num,
            generator=generator,
            output_type="pil",
        ).images

    return run


def unet_steps(case: Case) -> int:
    return int(case.steps * case.strength)


def section_speed(executor: DiffusersExecutor, cases: list[Case], runs: int, res: Result, deadline: float) -> None:
    device = executor.device
    for case in cases:
        if time.monotonic() > deadline:
            res.skipped.append(f"speed {case.name}: time budget spent")
            continue
        keep = executor.registry.resolve("checkpoint", case.checkpoint)
        if keep is not None and executor.cache.loaded_names() not in ([], [keep.sd_name]):
            executor.cache.clear()  # one checkpoint resident: peak VRAM is this model's only

        def engine(case: Case = case) -> None:
            executor.generate(job_for(case))

        bare = diffusers_call(executor, case)
        engine()  # warm-up: load, cuDNN/SDPA kernel selection
        bare()
        times: dict[str, list[float]] = {"engine": [], "diffusers": []}
        peaks: dict[str, int] = {"engine": 0, "diffusers": 0}
        for _ in range(runs):
            for name, fn in (("engine", engine), ("diffusers", bare)):
                seconds, peak = timed(device, fn)
                times[name].append(seconds)
                peaks[name] = max(peaks[name], peak)
        steps = unet_steps(case)
        row: dict[str, Any] = {"section": "speed", "case": case.name}
        for name in ("engine", "diffusers"):
            med = statistics.median(times[name])
            row[f"{name}_it_s"] = steps / med
            row[f"{name}_s_per_image"] = med / case.image_num
            row[f"{name}_peak_gib"] = peaks[name] / 2**30
        row["ratio_it_s"] = row["engine_it_s"] / row["diffusers_it_s"]
        row["ratio_vram"] = (peaks["engine"] / peaks["diffusers"]) if peaks["diffusers"] else float("nan")
        res.rows.append(row)
        res.checks.append(
            (f"{case.name}: engine it/s >= 0.95x diffusers", row["ratio_it_s"] >= 0.95, f"{row['ratio_it_s']:.3f}")
        )
        if peaks["diffusers"]:
            ok = abs(row["ratio_vram"] - 1) <= 0.10
            res.checks.append((f"{case.name}: peak VRAM within 10 % of diffusers", ok, f"{row['ratio_vram']:.3f}"))


def section_switch(executor: DiffusersExecutor, a: Case, b: Case, runs: int, res: Result, deadline: float) -> None:
    if time.monotonic() > deadline:
        res.skipped.append("model switch: time budget spent")
        return
    device = executor.device
    before = executor.checkpoint_loads
    executor.generate(job_for(a))
    cold, _ = timed(device, lambda: executor.generate(job_for(b)))
    after_a, after_b = [], []
    for _ in range(runs):
        executor.generate(job_for(a))
        after_a.append(timed(device, lambda: executor.generate(job_for(b)))[0])
        after_b.append(timed(device, lambda: executor.generate(job_for(b)))[0])
    loads = executor.checkpoint_loads - before
    res.rows.append(
        {
            "section": "switch",
            "case": f"{a.checkpoint} -> {b.checkpoint}",
            "cold_load_and_task_s": cold,
            "task_after_other_s": statistics.median(after_a),
            "task_after_same_s": statistics.median(after_b),
            "switch_cost_s": statistics.median(after_a) - statistics.median(after_b),
            "checkpoint_loads": loads,
        }
    )
    res.checks.append(("model switch between cached checkpoints reloads nothing", loads == 2, f"{loads} loads"))


def section_tiers(
    models: Path, names: tuple[str, str], device: torch.device, size: int, steps: int, res: Result, deadline: float
) -> None:
    if time.monotonic() > deadline:
        res.skipped.append("model tiers: time budget spent")
        return
    from bench.model_switching import checks, measure

    figures = measure(models, device, size=size, steps=steps, tasks=4, names=names)
    res.rows.append({"section": "tiers", **{k: v for k, v in figures.items() if not isinstance(v, dict)}})
    res.checks.extend(checks(figures))


def _serve(models: Path, data: Path, device: str, dtype: str, port: int) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "UNDERPAINT_API_KEYS": KEY,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
    }
    cmd = [sys.executable, "-m", "underpaint.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--data-dir", str(data), "--models-dir", str(models), "--device", device, "--dtype", dtype]
    log = (data / "server.log").open("ab")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def _http_task(client: httpx.Client, case: Case) -> float:
    buf = io.BytesIO()
    init_image(case.size).save(buf, format="PNG")
    body = {
        "extra": {"response_image_type": "png"},
        "request": {
            "model_name": case.checkpoint, "image_base64": base64.b64encode(buf.getvalue()).decode(),
            "prompt": PROMPT, "negative_prompt": NEGATIVE, "width": case.size, "height": case.size,
            "image_num": case.image_num, "steps": case.steps, "seed": 1, "guidance_scale": 7.0,
            "sampler_name": "Euler", "strength": case.strength,
        },
    }  # fmt: skip
    start = time.perf_counter()
    r = client.post("/v3/async/img2img", json=body)
    r.raise_for_status()
    task_id = r.json()["task_id"]
    while True:
        out = client.get("/v3/async/task-result", params={"task_id": task_id}).json()
        status = out["task"]["status"]
        if status == "TASK_STATUS_SUCCEED":
            for img in out["images"]:
                client.get(img["image_url"]).raise_for_status()
            return time.perf_counter() - start
        if status == "TASK_STATUS_FAILED":
            raise RuntimeError(f"HTTP task failed: {out['task']['reason']}")
        time.sleep(0.01)


def section_http(
    executor: DiffusersExecutor, models: Path, case: Case, runs: int, res: Result, deadline: float, dtype: str
) -> None:
    if time.monotonic() > deadline:
        res.skipped.append("HTTP: time budget spent")
        return
    from underpaint.engine.metadata import encode_image

    device = executor.device
    with tempfile.TemporaryDirectory() as tmp:
        port = 18000 + os.getpid() % 1000
        proc = _serve(models, Path(tmp), str(device), dtype, port)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {KEY}"})
            start = time.monotonic()
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() - start > 180:
                    raise RuntimeError("server did not start:\n" + (Path(tmp) / "server.log").read_text()[-3000:])
                time.sleep(0.2)

            def direct() -> None:
                for g in executor.generate(job_for(case)):
                    encode_image(g.image, "png", g.infotext)

            _http_task(client, case)  # warm-up: the server's worker loads the model
            direct()
            http_s, direct_s = [], []
            for _ in range(runs):
                http_s.append(_http_task(client, case))
                direct_s.append(timed(device, direct)[0])
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    ratio = statistics.median(http_s) / statistics.median(direct_s)
    res.rows.append(
        {
            "section": "http",
            "case": case.name,
            "http_s": statistics.median(http_s),
            "direct_s": statistics.median(direct_s),
            "ratio": ratio,
        }
    )
    res.checks.append((f"{case.name}: HTTP end to end <= 1.05x a direct engine call", ratio <= 1.05, f"{ratio:.3f}"))


def section_compile(
    settings: Settings, models: Path, case: Case, runs: int, res: Result, deadline: float, backend: str
) -> None:
    if time.monotonic() > deadline:
        res.skipped.append("compile: time budget spent")
        return
    compiled = DiffusersExecutor(settings.with_overrides(compile=True), ModelRegistry(models), compile_backend=backend)
    device = compiled.device
    first, _ = timed(device, lambda: compiled.generate(job_for(case)))
    # Bare diffusers on an eager copy of the model (the compiled executor's modules are compiled in place).
    eager = DiffusersExecutor(settings, ModelRegistry(models))
    bare = diffusers_call(eager, case)
    bare()
    times: dict[str, list[float]] = {"compiled": [], "diffusers": []}
    for _ in range(runs):
        times["compiled"].append(timed(device, lambda: compiled.generate(job_for(case)))[0])
        times["diffusers"].append(timed(device, bare)[0])
    steps = unet_steps(case)
    c_its = steps / statistics.median(times["compiled"])
    d_eager = steps / statistics.median(times["diffusers"])
    res.rows.append(
        {
            "section": "compile",
            "case": case.name,
            "first_call_s": first,
            "compiled_it_s": c_its,
            "diffusers_eager_it_s": d_eager,
            "ratio_it_s": c_its / d_eager,
        }
    )
    res.checks.append(
        (f"{case.name}: compiled engine >= 1.2x diffusers it/s", c_its / d_eager >= 1.2, f"{c_its / d_eager:.3f}")
    )
    compiled.release()
    eager.release()


def table(res: Result) -> str:
    lines = []
    speed_rows = [r for r in res.rows if r["section"] == "speed"]
    if speed_rows:
        lines.append(
            "| case | engine it/s | diffusers it/s | ratio | engine s/img | diffusers s/img | engine peak GiB | diffusers peak GiB |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for r in speed_rows:
            lines.append(
                f"| {r['case']} | {r['engine_it_s']:.2f} | {r['diffusers_it_s']:.2f} | {r['ratio_it_s']:.3f} | "
                f"{r['engine_s_per_image']:.3f} | {r['diffusers_s_per_image']:.3f} | {r['engine_peak_gib']:.2f} | "
                f"{r['diffusers_peak_gib']:.2f} |"
            )
    for r in res.rows:
        if r["section"] == "switch":
            lines.append(
                f"\nmodel switch {r['case']}: cold load + task {r['cold_load_and_task_s']:.2f} s; task after the other "
                f"{r['task_after_other_s']:.3f} s vs after itself {r['task_after_same_s']:.3f} s "
                f"(switch {r['switch_cost_s'] * 1000:+.1f} ms, {r['checkpoint_loads']} loads in all)"
            )
        elif r["section"] == "http":
            lines.append(
                f"HTTP {r['case']}: end to end {r['http_s']:.3f} s vs direct {r['direct_s']:.3f} s = {r['ratio']:.3f}x"
            )
        elif r["section"] == "compile":
            lines.append(
                f"compile {r['case']}: first call {r['first_call_s']:.1f} s (warm-up), then {r['compiled_it_s']:.2f} it/s "
                f"= {r['ratio_it_s']:.3f}x eager diffusers ({r['diffusers_eager_it_s']:.2f} it/s)"
            )
    lines.append("")
    for name, ok, value in res.checks:
        lines.append(f"{'PASS' if ok else 'FAIL'}  {name}: {value}")
    for line in res.skipped:
        lines.append(f"SKIPPED  {line}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="models folder with the real-shape checkpoints")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--budget-s", type=float, default=330.0, help="later sections are skipped past this")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny demo models, 128x128, 2 runs: code check")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    started = time.monotonic()
    res = Result()
    if args.dry_run:
        from underpaint.demo.models import write_all_demo_models

        models = Path(tempfile.mkdtemp(prefix="gpu-bench-dry-")) / "models"
        write_all_demo_models(models)
        import shutil

        ckpt = models / "checkpoint"
        shutil.copy(ckpt / "tiny-sd15.safetensors", ckpt / "tiny-sd15-b.safetensors")
        shutil.copytree(ckpt / "tiny-sd15.config", ckpt / "tiny-sd15-b.config")
        device, dtype, backend = "cpu", "float32", "eager"
        sd15, sd15_b, sdxl, size15, sizexl, steps = (
            "tiny-sd15.safetensors",
            "tiny-sd15-b.safetensors",
            "tiny-sdxl.safetensors",
            128,
            128,
            4,
        )
        runs = min(args.runs, 2)
    else:
        if args.models is None:
            parser.error("--models is required (or --dry-run)")
        if not torch.cuda.is_available():
            print("bench/gpu.py needs CUDA (use --dry-run on CPU)", file=sys.stderr)
            return 2
        models = args.models
        device, dtype, backend = "cuda", "float16", "inductor"
        sd15, sd15_b, sdxl, size15, sizexl, steps = (
            "real-sd15.safetensors",
            "real-sd15-b.safetensors",
            "real-sdxl.safetensors",
            512,
            1024,
            20,
        )
        runs = args.runs
    settings = Settings(models_dir=models, data_dir=models.parent / "bench-data", device=device, dtype=dtype)
    executor = DiffusersExecutor(settings, ModelRegistry(models))
    print(f"# bench/gpu.py  torch {torch.__version__}  python {sys.version.split()[0]}  device {device}", flush=True)
    if device == "cuda":
        print(f"# {torch.cuda.get_device_name(0)}  SDPA  dtype {dtype}", flush=True)
    cases = [
        Case(f"SD1.5 {size15}² n=1", sd15, size15, 1, steps),
        Case(f"SD1.5 {size15}² n=4", sd15, size15, 4, steps),
        Case(f"SDXL {sizexl}² n=1", sdxl, sizexl, 1, steps),
        Case(f"SDXL {sizexl}² n=4", sdxl, sizexl, 4, steps),
    ]
    section_speed(executor, cases, runs, res, deadline)
    executor.cache.clear()
    section_switch(
        executor, Case("a", sd15, size15, 1, steps), Case("b", sd15_b, size15, 1, steps), runs, res, deadline
    )
    section_http(executor, models, cases[0], runs, res, deadline, dtype)
    executor.release()
    section_tiers(models, (sd15, sd15_b), torch.device(device), size15, steps, res, deadline)
    if not args.no_compile:
        section_compile(settings, models, cases[0], runs, res, deadline, backend)
    text = table(res)
    if args.dry_run:
        text += "\n(dry run on CPU with tiny models: the code ran; the PASS/FAIL lines judge nothing)"
    print(text)
    print(f"# total {time.monotonic() - started:.0f} s")
    if args.out:
        args.out.write_text(json.dumps({"rows": res.rows, "checks": res.checks, "skipped": res.skipped}, indent=2))
    return 0 if args.dry_run or all(ok for _, ok, _ in res.checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
