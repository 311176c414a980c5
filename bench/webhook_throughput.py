"""Does a hanging webhook receiver slow generation down? (issue #5 benchmark: at most 5 % lower throughput)

Two identical worker processes run side by side for a fixed time, each a fake generation loop of fixed CPU work
per task (single-threaded torch matmuls, which like a real UNet step release the GIL). One of them, as the real
worker does, enqueues a result webhook per finished task into its own ``WebhookDispatcher``, whose sender runs in
that process; the receiver (a third process, on 127.0.0.1) hangs ``--hang`` seconds on every call, so with the
production 5 s timeout every attempt times out and is retried with backoff. Running the two side by side means
load from other processes on a shared machine hits both alike; the process roles swap every trial.

Run from the repository root:  PYTHONPATH=src OMP_NUM_THREADS=1 python bench/webhook_throughput.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from underpaint.config import Settings
from underpaint.delivery.signing import derive_secret
from underpaint.delivery.webhooks import WebhookDispatcher

SETTINGS = Settings(webhook_allow_hosts=("127.0.0.1",), webhook_timeout=5.0, webhook_max_retries=5)


def _serve(hang: float, ports: multiprocessing.Queue[int]) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            time.sleep(hang)
            try:
                self.send_response(200)
                self.end_headers()
            except OSError:
                pass  # the sender timed out and hung up

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    ports.put(server.server_address[1])
    server.serve_forever()


def calibrate(task_ms: float) -> int:
    """Matmul iterations per fake task so that one task takes about ``task_ms`` of CPU."""
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    started = time.thread_time()  # CPU time: other processes' load does not skew the calibration
    for _ in range(50):
        torch.tanh(a @ b)
    return max(1, round(task_ms / 1000 / ((time.thread_time() - started) / 50)))


def body(task_id: str) -> dict[str, object]:
    return {
        "extra": {"seed": "1", "enable_nsfw_detection": False},
        "task": {"task_id": task_id, "status": "TASK_STATUS_SUCCEED", "reason": "", "task_type": "IMG_TO_IMG",
                 "eta": 0, "progress_percent": 0},
        "images": [{"image_url": "http://127.0.0.1/x.png", "image_url_ttl": 3600, "image_type": "png",
                    "nsfw_detection_result": None}],
        "videos": [], "audios": [],
    }  # fmt: skip


def secret_for(owner: str) -> str:
    return derive_secret(b"bench", owner)


@dataclass
class Run:
    tasks_per_s: float
    gen_cpu_ms: float  # CPU of the generation thread per task (includes enqueue)
    background_cpu_ms: float  # CPU of all other threads of the process per task (the webhook sender)
    enqueue_cpu_ms: float  # CPU of the generation thread spent in enqueue, per task
    slowest_enqueue_ms: float
    attempts: int  # delivery attempts the sender made (all time out against the hanging receiver)


def worker(iters: int, seconds: float, url: str | None, db: str, go: Event, out: multiprocessing.Queue[Any]) -> None:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    dispatcher = WebhookDispatcher(db, SETTINGS, secret_for) if url else None
    if dispatcher is not None:
        dispatcher.start()
    go.wait()
    tasks, slowest, enqueue_cpu = 0, 0.0, 0.0
    cpu0, thread0, started = time.process_time(), time.thread_time(), time.perf_counter()
    while time.perf_counter() - started < seconds:
        for _ in range(iters):
            torch.tanh(a @ b)
        tasks += 1
        if dispatcher is not None and url is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            dispatcher.enqueue(f"t{tasks}", "bench-owner", url, body(f"t{tasks}"))
            slowest = max(slowest, time.perf_counter() - t0)
            enqueue_cpu += time.thread_time() - c0
    wall = time.perf_counter() - started
    gen_cpu, all_cpu = time.thread_time() - thread0, time.process_time() - cpu0
    attempts = 0
    if dispatcher is not None:
        dispatcher.stop()
        attempts = sum(d.attempts for i in range(1, tasks + 1) for d in dispatcher.deliveries(f"t{i}"))
        dispatcher.close()
    ms = 1000 / tasks
    out.put(
        (
            url is not None,
            asdict(
                Run(tasks / wall, gen_cpu * ms, (all_cpu - gen_cpu) * ms, enqueue_cpu * ms, slowest * 1000, attempts)
            ),
        )
    )


def trial(ctx: Any, iters: int, seconds: float, url: str, tmp: str, n: int) -> tuple[Run, Run]:
    """One side-by-side run; returns (no webhooks, hanging receiver)."""
    go, out = ctx.Event(), ctx.Queue()
    roles = [None, url] if n % 2 == 0 else [url, None]  # alternate which process starts first
    procs = [
        ctx.Process(target=worker, args=(iters, seconds, role, f"sqlite:///{Path(tmp) / f'{n}-{i}.db'}", go, out))
        for i, role in enumerate(roles)
    ]
    for p in procs:
        p.start()
    time.sleep(3.0)  # both imported torch and started their dispatcher
    go.set()
    results = dict(out.get(timeout=seconds + 120) for _ in procs)
    for p in procs:
        p.join(30)
    return Run(**results[False]), Run(**results[True])


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of one side-by-side trial")
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--task-ms", type=float, default=250.0, help="CPU work per fake task")
    parser.add_argument("--hang", type=float, default=5.0, help="seconds the receiver hangs on every call")
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    iters = calibrate(args.task_ms)
    ports: multiprocessing.Queue[int] = ctx.Queue()
    receiver = ctx.Process(target=_serve, args=(args.hang, ports), daemon=True)
    receiver.start()
    url = f"http://127.0.0.1:{ports.get(timeout=30)}/hook"
    pairs: list[tuple[Run, Run]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for n in range(args.trials):
                base, hook = trial(ctx, iters, args.seconds, url, tmp, n)
                pairs.append((base, hook))
                print(
                    f"trial {n}: no webhooks {base.tasks_per_s:.3f} tasks/s, hanging receiver "
                    f"{hook.tasks_per_s:.3f} tasks/s ({hook.attempts} timed-out deliveries)"
                )
    finally:
        receiver.terminate()
        receiver.join(10)

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    ratios = [h.tasks_per_s / b.tasks_per_s for b, h in pairs]
    base_gen, hook_gen = med([b.gen_cpu_ms for b, _ in pairs]), med([h.gen_cpu_ms for _, h in pairs])
    sender_cpu = med([h.background_cpu_ms for _, h in pairs])
    # What webhooks cost per task in CPU: the generation thread's extra (enqueue) plus all of the sender's work.
    overhead_pct = 100 * (hook_gen - base_gen + sender_cpu) / base_gen
    summary = {
        "task_ms": args.task_ms,
        "trial_seconds": args.seconds,
        "trials": args.trials,
        "hang_s": args.hang,
        "median_throughput_ratio": round(statistics.median(ratios), 4),
        "throughput_ratios": [round(r, 3) for r in ratios],
        "cpu_overhead_pct": round(overhead_pct, 2),
        "generation_cpu_ms_per_task": {"no_webhooks": base_gen, "hanging": hook_gen},
        "sender_cpu_ms_per_task": sender_cpu,
        "enqueue_cpu_ms_per_task": med([h.enqueue_cpu_ms for _, h in pairs]),
        "slowest_enqueue_ms": round(max(h.slowest_enqueue_ms for _, h in pairs), 2),
        "timed_out_deliveries": sum(h.attempts for _, h in pairs),
    }
    print(json.dumps(summary, indent=2))
    if statistics.median(ratios) < 0.95:
        raise SystemExit("FAIL: a hanging webhook receiver cost more than 5 % of generation throughput")


if __name__ == "__main__":
    main()
