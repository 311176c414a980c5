"""Task-result polling under load (issue #2 benchmark).

Claims: ``GET /v3/async/task-result`` under 50 concurrent pollers on this 2-core machine serves >= 1000 requests/s
with p99 <= 50 ms, and a generation running meanwhile slows down by <= 10 %.

Setup: one live ``underpaint serve`` subprocess (uvicorn; ``--torch-threads 1`` for its in-process worker, so the
generation takes one core). The pollers are a separate process (the other core): ``--connections`` keep-alive
HTTP/1.1 connections on 127.0.0.1, written on asyncio streams (a minimal client, so that the client is not what
is measured), each sending the next GET as soon as the previous answer is read. They poll finished tasks (full
result body with a signed image URL), spread over ``--targets`` task ids.

Each trial runs ``--tasks`` generation tasks (tiny SD1.5, 128x128, ``--steps`` steps, strength 1.0) back to back
twice: once with no pollers and once with the poll load on; the order alternates between trials so that drift in
the machine's load hits both alike. The generation time of a task is the server's own (claim to SUCCEED, read
from its task table). The poll rate and latency are reported separately for the window where the worker was idle
(before the first task) and the window where tasks were generating.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/poll_throughput.py [--trials 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from array import array
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "e2e")]

from _server import LiveServer, make_png  # noqa: E402

HEADERS = {"Authorization": "Bearer key-a"}
RPS_TARGET, P99_TARGET_MS, SLOWDOWN_TARGET = 1000.0, 50.0, 0.10


# -- the load process ------------------------------------------------------------------------------------------
async def _poller(
    port: int, paths: list[str], stop: list[bool], done: array[float], lat: array[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    requests = [
        f"GET {p} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer key-a\r\n\r\n".encode() for p in paths
    ]
    i = 0
    while not stop[0]:
        t0 = time.perf_counter()
        writer.write(requests[i % len(requests)])
        i += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        lat.append(time.perf_counter() - t0)
        done.append(time.time())
        if head[9:12] != b"200":
            errors[0] += 1
    writer.close()


async def _load(port: int, paths: list[str], connections: int, stop_event: Event, max_requests: int) -> tuple[Any, ...]:
    stop, errors = [False], [0]
    done, lat = array("d"), array("d")

    async def watch() -> None:
        while not stop_event.is_set() and len(done) < max_requests:
            await asyncio.sleep(0.02)
        stop[0] = True

    await asyncio.gather(watch(), *(_poller(port, paths, stop, done, lat, errors) for _ in range(connections)))
    return done, lat, errors[0]


def load_process(port: int, paths: list[str], connections: int, stop_event: Event, max_requests: int, out: Any) -> None:
    done, lat, errors = asyncio.run(_load(port, paths, connections, stop_event, max_requests))
    out.put((done.tobytes(), lat.tobytes(), errors))


# -- the generation side ---------------------------------------------------------------------------------------
def submit(client: httpx.Client, png_b64: str, steps: int, seed: int) -> str:
    body = {"extra": {}, "request": {
        "model_name": "tiny-sd15.safetensors", "image_base64": png_b64, "prompt": "a red house", "width": 128,
        "height": 128, "image_num": 1, "steps": steps, "seed": seed, "guidance_scale": 7.0, "sampler_name": "Euler a",
        "strength": 1.0}}  # fmt: skip
    r = client.post("/v3/async/img2img", json=body, headers=HEADERS)
    r.raise_for_status()
    return str(r.json()["task_id"])


def wait_done(db: sqlite3.Connection, task_id: str) -> tuple[float, float]:
    """(started_at, finished_at) of the task, watched in the server's database (no HTTP polling of our own)."""
    while True:
        status, started, finished = db.execute(
            "SELECT status, started_at, finished_at FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
        if status == "TASK_STATUS_SUCCEED":
            return float(started), float(finished)
        if status == "TASK_STATUS_FAILED":
            raise RuntimeError(f"task {task_id} failed")
        time.sleep(0.01)


def run_tasks(
    client: httpx.Client, db: sqlite3.Connection, png_b64: str, steps: int, n: int
) -> list[tuple[float, float]]:
    """``n`` tasks one after another; returns each one's server-side (started_at, finished_at)."""
    return [wait_done(db, submit(client, png_b64, steps, seed=100 + i)) for i in range(n)]


def window(done: list[float], lat: list[float], start: float, end: float) -> tuple[float, float, float, int]:
    """Requests completed in [start, end): (requests/s, p50 ms, p99 ms, count)."""
    sel = sorted(latency for t, latency in zip(done, lat, strict=True) if start <= t < end)
    if not sel or end <= start:
        return 0.0, float("nan"), float("nan"), 0
    return (
        len(sel) / (end - start),
        sel[len(sel) // 2] * 1000,
        sel[min(len(sel) - 1, int(len(sel) * 0.99))] * 1000,
        len(sel),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4, help="generation tasks per trial and condition")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--connections", type=int, default=50, help="concurrent pollers")
    parser.add_argument("--targets", type=int, default=10, help="distinct finished task ids the pollers read")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="poll load before the first task")
    parser.add_argument("--max-requests", type=int, default=300_000, help="hard bound on requests per trial")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    ctx = multiprocessing.get_context("spawn")
    from underpaint.engine.demo import write_demo_models

    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_demo_models(models)
        png_b64 = base64.b64encode(make_png((128, 128))).decode()
        server = LiveServer(Path(tmp) / "data", models).start()
        base: list[float] = []
        loaded: list[float] = []
        idle_win: list[tuple[float, float, float, int]] = []
        gen_win: list[tuple[float, float, float, int]] = []
        errors = 0
        try:
            with httpx.Client(base_url=server.url, timeout=60.0) as client, \
                    sqlite3.connect(Path(tmp) / "data" / "underpaint.db") as db:  # fmt: skip
                targets = [submit(client, png_b64, 1, seed=i) for i in range(args.targets)]
                for t in targets:
                    wait_done(db, t)  # also warms the worker up
                run_tasks(client, db, png_b64, args.steps, 1)
                paths = [f"/v3/async/task-result?task_id={t}" for t in targets]
                for trial in range(args.trials):
                    for with_load in (False, True) if trial % 2 == 0 else (True, False):
                        if not with_load:
                            spans = run_tasks(client, db, png_b64, args.steps, args.tasks)
                            base += [f - s for s, f in spans]
                            print(f"trial {trial}: no pollers  generation "
                                  + " ".join(f"{(f - s) * 1000:.0f}" for s, f in spans) + " ms")  # fmt: skip
                            continue
                        stop, out = ctx.Event(), ctx.Queue()
                        proc = ctx.Process(target=load_process,
                                           args=(server.port, paths, args.connections, stop, args.max_requests, out))  # fmt: skip
                        proc.start()
                        time.sleep(1.0)  # the load process imports and connects
                        idle_start = time.time()
                        time.sleep(args.idle_seconds)
                        idle_end = time.time()
                        spans = run_tasks(client, db, png_b64, args.steps, args.tasks)
                        stop.set()
                        raw_done, raw_lat, errs = out.get(timeout=120)
                        proc.join(30)
                        done, lat = array("d"), array("d")
                        done.frombytes(raw_done)
                        lat.frombytes(raw_lat)
                        errors += errs
                        loaded += [f - s for s, f in spans]
                        idle_win.append(window(list(done), list(lat), idle_start, idle_end))
                        gen_win.append(window(list(done), list(lat), spans[0][0], spans[-1][1]))
                        i, g = idle_win[-1], gen_win[-1]
                        print(f"trial {trial}: 50 pollers  generation "
                              + " ".join(f"{(f - s) * 1000:.0f}" for s, f in spans) + " ms;"
                              f" polls idle {i[0]:.0f}/s p99 {i[2]:.1f} ms, during generation {g[0]:.0f}/s p99 {g[2]:.1f} ms"
                              f" ({len(done)} requests)")  # fmt: skip
        finally:
            server.stop()

    def row(name: str, w: list[tuple[float, float, float, int]]) -> str:
        rps = statistics.median(x[0] for x in w)
        return (f"  {name:<30}{rps:>9.0f}{statistics.median(x[1] for x in w):>9.1f}"
                f"{statistics.median(x[2] for x in w):>9.1f}{max(x[2] for x in w):>9.1f}")  # fmt: skip

    slowdown = statistics.median(loaded) / statistics.median(base) - 1
    rps, p99 = statistics.median(x[0] for x in gen_win), statistics.median(x[2] for x in gen_win)
    print(f"\n{args.connections} pollers on GET /v3/async/task-result ({args.targets} finished tasks), {args.trials} trials, "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}, non-200 answers {errors}")  # fmt: skip
    print(f"  {'poll window':<30}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'worst p99':>9}")
    print(row("worker idle", idle_win))
    print(row("during generation", gen_win))
    print(f"  generation 128x128 {args.steps} steps: median {statistics.median(base) * 1000:.0f} ms without pollers, "
          f"{statistics.median(loaded) * 1000:.0f} ms with ({slowdown * 100:+.1f} %)")  # fmt: skip
    verdicts = {
        f"req/s during generation >= {RPS_TARGET:.0f}": rps >= RPS_TARGET,
        f"p99 during generation <= {P99_TARGET_MS:.0f} ms": p99 <= P99_TARGET_MS,
        f"generation slowdown <= {SLOWDOWN_TARGET:.0%}": slowdown <= SLOWDOWN_TARGET,
        "no errors": errors == 0,
    }
    for claim, ok in verdicts.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {claim}")
    if not all(verdicts.values()):
        print("FAIL")
        raise SystemExit(1)
    print("PASS")


if __name__ == "__main__":
    main()
