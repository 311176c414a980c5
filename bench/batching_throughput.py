"""Cross-request batching and model-aware claiming (issue #13 benchmarks), end to end through live servers.

Three measurements, each a ratio of two server configurations measured in the same run (rounds alternate between
the two so that drift in the load of a shared machine hits both alike):

1. throughput: 8 compatible tasks (tiny SD1.5, 128x128, 20 steps, Euler a, different prompts and seeds) POSTed
   at once; time from the first POST until the last task is SUCCEED, ``max_batch=4`` against ``max_batch=1``.
   Target <= 0.75.
2. mixed traffic: 40 tasks alternating between two checkpoints (A, B, A, B ...), with a model cache that holds one
   checkpoint (``checkpoint_cache_bytes=1``, as a GPU that fits one model); checkpoint loads (the worker's
   ``underpaint_model_loads_total``) and total time, model-aware claiming (default ``max_affinity_wait_s``, 30 s) against
   plain FIFO (``0``), both with ``max_batch=1`` so that affinity alone is measured. Targets: loads cut >= 4x,
   time <= 0.7x.
3. latency: a lone task's submit-to-SUCCEED with batching on (``max_batch=4``, default window: 0 ms on CPU)
   against off (``max_batch=1``). Target <= 1.05.

Each server is ``underpaint serve`` (embedded worker process, 1 torch thread) on its own data folder; task end
times are read from its SQLite store (``finished_at``), so polling granularity does not enter the numbers.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/batching_throughput.py [--rounds 3] [--lone 9]
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

from tests.support.server import LiveServer, make_png  # noqa: E402

HEADERS = {"Authorization": "Bearer key-a"}
THROUGHPUT_TARGET, LOADS_TARGET, MIXED_TIME_TARGET, LATENCY_TARGET = 0.75, 4.0, 0.7, 1.05
PROMPTS = ["a red house, oil painting", "a lighthouse at dusk", "portrait of a cat", "a forest in fog"]


def body(png_b64: str, size: int, steps: int, seed: int, model: str = "tiny-sd15.safetensors") -> dict[str, Any]:
    return {
        "extra": {"response_image_type": "png"},
        "request": {
            "model_name": model, "image_base64": png_b64, "prompt": PROMPTS[seed % len(PROMPTS)],
            "negative_prompt": "blurry", "width": size, "height": size, "image_num": 1, "steps": steps, "seed": seed,
            "guidance_scale": 7.0, "sampler_name": "Euler a", "strength": 0.75,
        },
    }  # fmt: skip


class Server:
    def __init__(self, name: str, root: Path, models: Path, env: dict[str, str]) -> None:
        self.name = name
        self.live = LiveServer(root / name, models, extra_env=env)
        self.db = root / name / "underpaint.db"
        self.client = httpx.Client(base_url=self.live.url, headers=HEADERS, timeout=60)

    def start(self) -> Server:
        self.live.start(timeout=900)  # a shared, busy machine can take minutes to import torch
        return self

    def stop(self) -> None:
        self.client.close()
        self.live.stop()

    def submit(self, payload: dict[str, Any]) -> str:
        r = self.client.post("/v3/async/img2img", json=payload)
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def submit_all(self, payloads: list[dict[str, Any]]) -> list[str]:
        """POST concurrently (clients submitting at the same moment)."""
        with ThreadPoolExecutor(max_workers=len(payloads)) as pool:
            return list(pool.map(self.submit, payloads))

    def finished(self, ids: list[str], timeout: float = 1800) -> dict[str, float]:
        """Wait until every task ended; their ``finished_at`` (they must all be SUCCEED)."""
        deadline = time.monotonic() + timeout
        marks = ",".join("?" * len(ids))
        while True:
            with sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10) as conn:
                rows = conn.execute(
                    f"SELECT task_id, status, finished_at, reason FROM tasks WHERE task_id IN ({marks})", ids
                ).fetchall()
            ended = {r[0]: r for r in rows if r[1] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED")}
            if len(ended) == len(ids):
                failed = [r for r in ended.values() if r[1] != "TASK_STATUS_SUCCEED"]
                assert not failed, f"{self.name}: tasks failed: {failed[:3]}"
                return {tid: float(r[2]) for tid, r in ended.items()}
            assert time.monotonic() < deadline, f"{self.name}: tasks did not finish"
            time.sleep(0.01)

    def counter(self, name: str) -> float:
        for line in self.client.get("/metrics").text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


def timed_burst(server: Server, payloads: list[dict[str, Any]]) -> float:
    t0 = time.time()
    ids = server.submit_all(payloads) if len(payloads) <= 16 else [server.submit(p) for p in payloads]
    return max(server.finished(ids).values()) - t0


def models_with_two_checkpoints(dest: Path) -> Path:
    from underpaint.demo.checkpoints import write_demo_models

    write_demo_models(dest)
    ckpt = dest / "checkpoint"
    shutil.copy(ckpt / "tiny-sd15.safetensors", ckpt / "tiny-sd15-b.safetensors")
    shutil.copytree(ckpt / "tiny-sd15.config", ckpt / "tiny-sd15-b.config")
    return dest


def ratio_line(label: str, a: list[float], b: list[float], names: tuple[str, str]) -> float:
    ma, mb = statistics.median(a), statistics.median(b)
    print(f"  {label}: {names[0]} median {ma:.2f} s (min {min(a):.2f}, max {max(a):.2f}); "
          f"{names[1]} median {mb:.2f} s (min {min(b):.2f}, max {max(b):.2f}); ratio {ma / mb:.3f}")  # fmt: skip
    return ma / mb


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="bursts of 8 tasks per configuration")
    parser.add_argument("--lone", type=int, default=9, help="lone tasks per configuration")
    parser.add_argument("--mixed", type=int, default=40, help="tasks of the mixed-traffic run")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: throughput,mixed,latency")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]
    png = base64.b64encode(make_png((args.size, args.size))).decode()
    verdicts: list[bool] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = models_with_two_checkpoints(root / "models")

        if not skip >= {"throughput", "latency"}:
            on = Server("batch4", root, models, {"UNDERPAINT_MAX_BATCH": "4"}).start()
            off = Server("batch1", root, models, {"UNDERPAINT_MAX_BATCH": "1"}).start()
            try:
                for s in (on, off):  # warm-up: checkpoint load, first-call allocations
                    timed_burst(s, [body(png, args.size, args.steps, 1)])
                if "throughput" not in skip:
                    batched: list[float] = []
                    single: list[float] = []
                    for r in range(args.rounds):
                        burst = [body(png, args.size, args.steps, 1000 * r + i) for i in range(8)]
                        order = [(on, batched), (off, single)] if r % 2 == 0 else [(off, single), (on, batched)]
                        for server, out in order:
                            out.append(timed_burst(server, burst))
                        print(f"round {r}: max_batch=4 {batched[-1]:.2f} s   max_batch=1 {single[-1]:.2f} s",
                              flush=True)  # fmt: skip
                    print("\n1. throughput, 8 compatible tasks at once (first POST -> last SUCCEED)")
                    ratio = ratio_line("time", batched, single, ("max_batch=4", "max_batch=1"))
                    verdicts.append(ratio <= THROUGHPUT_TARGET)
                    print(f"  target <= {THROUGHPUT_TARGET}: {'PASS' if verdicts[-1] else 'FAIL'}")
                if "latency" not in skip:
                    lone_on: list[float] = []
                    lone_off: list[float] = []
                    for i in range(args.lone):
                        order = [(on, lone_on), (off, lone_off)] if i % 2 == 0 else [(off, lone_off), (on, lone_on)]
                        for server, out in order:
                            out.append(timed_burst(server, [body(png, args.size, args.steps, 5000 + i)]))
                    print("\n3. latency of a lone task (POST -> SUCCEED)")
                    ratio = ratio_line("time", lone_on, lone_off, ("batching on", "batching off"))
                    pairs = statistics.median(a / b for a, b in zip(lone_on, lone_off, strict=True))
                    print(f"  median of per-pair ratios {pairs:.3f}")
                    verdicts.append(ratio <= LATENCY_TARGET)
                    print(f"  target <= {LATENCY_TARGET}: {'PASS' if verdicts[-1] else 'FAIL'}")
            finally:
                on.stop()
                off.stop()

        if "mixed" not in skip:
            one_model = {"UNDERPAINT_MAX_BATCH": "1", "UNDERPAINT_CHECKPOINT_CACHE_BYTES": "1"}
            results: dict[str, tuple[float, float, float]] = {}
            for name, wait in (("affinity", {}), ("fifo", {"UNDERPAINT_MAX_AFFINITY_WAIT_S": "0"})):
                server = Server(name, root, models, {**one_model, **wait}).start()
                try:
                    timed_burst(server, [body(png, args.size, args.steps, 1)])  # warm-up (loads checkpoint A)
                    loads0 = server.counter("underpaint_model_loads_total")
                    switches0 = server.counter("underpaint_model_switches_total")
                    models_ab = ["tiny-sd15.safetensors", "tiny-sd15-b.safetensors"]
                    payloads = [body(png, args.size, args.steps, 7000 + i, models_ab[i % 2]) for i in range(args.mixed)]
                    seconds = timed_burst(server, payloads)
                    loads = server.counter("underpaint_model_loads_total") - loads0
                    switches = server.counter("underpaint_model_switches_total") - switches0
                    results[name] = (seconds, loads, switches)
                    print(f"{name}: {seconds:.1f} s, {loads:.0f} checkpoint loads, {switches:.0f} model switches",
                          flush=True)  # fmt: skip
                finally:
                    server.stop()
            (t_aff, l_aff, _), (t_fifo, l_fifo, _) = results["affinity"], results["fifo"]
            cut = l_fifo / max(l_aff, 1.0)
            print(f"\n2. mixed traffic, {args.mixed} tasks A,B,A,B..., one checkpoint fits the cache, max_batch=1")
            print(f"  loads: affinity {l_aff:.0f}, FIFO {l_fifo:.0f}: cut {cut:.1f}x (target >= {LOADS_TARGET})")
            print(f"  time: affinity {t_aff:.1f} s, FIFO {t_fifo:.1f} s: ratio {t_aff / t_fifo:.3f} "
                  f"(target <= {MIXED_TIME_TARGET})")  # fmt: skip
            verdicts.append(cut >= LOADS_TARGET and t_aff / t_fifo <= MIXED_TIME_TARGET)
            print(f"  {'PASS' if verdicts[-1] else 'FAIL'}")

    print(f"\n{args.size}x{args.size}, {args.steps} steps, Euler a, tiny SD1.5, 1 torch thread per server; "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}")  # fmt: skip
    if not all(verdicts):
        print("FAIL")
        raise SystemExit(1)
    print("PASS")


if __name__ == "__main__":
    main()
