"""Does a hanging webhook receiver slow generation down? (issue #5 benchmark: at most 5% lower throughput)

A fake generation loop runs N tasks of fixed CPU work (single-threaded torch matmuls, which like a real UNet step
release the GIL) and, as the real worker does, enqueues one result webhook per finished task. The receiver on
127.0.0.1 hangs ``--hang`` seconds on every call, so with the production 5 s timeout every attempt times out and
is retried with backoff while the loop keeps running. Rounds alternate between "no webhooks" and "hanging
receiver" so that load from other processes hits both alike; the medians are compared.

Run from the repository root:  PYTHONPATH=src OMP_NUM_THREADS=1 python bench/webhook_throughput.py
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from sqlalchemy import func, select

from underpaint.config import Settings
from underpaint.delivery.signing import derive_secret
from underpaint.delivery.webhooks import WebhookDispatcher, deliveries_table


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


@contextmanager
def hanging_receiver(hang: float) -> Iterator[str]:
    """The receiver runs in its own process, like a real remote endpoint: its threads cost us no CPU or GIL."""
    ports: multiprocessing.Queue[int] = multiprocessing.Queue()
    process = multiprocessing.Process(target=_serve, args=(hang, ports), daemon=True)
    process.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=30)}/hook"
    finally:
        process.terminate()
        process.join(10)


def make_work(task_ms: float) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Operands and an iteration count so that one fake task takes about ``task_ms`` of CPU."""
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    started = time.thread_time()  # CPU time: other processes' load does not skew the calibration
    for _ in range(50):
        torch.tanh(a @ b)
    per_iter = (time.thread_time() - started) / 50
    return max(1, round(task_ms / 1000 / per_iter)), a, b


def body(task_id: str) -> dict[str, object]:
    return {
        "extra": {"seed": "1", "enable_nsfw_detection": False},
        "task": {"task_id": task_id, "status": "TASK_STATUS_SUCCEED", "reason": "", "task_type": "IMG_TO_IMG",
                 "eta": 0, "progress_percent": 0},
        "images": [{"image_url": "http://127.0.0.1/x.png", "image_url_ttl": 3600, "image_type": "png",
                    "nsfw_detection_result": None}],
        "videos": [], "audios": [],
    }  # fmt: skip


@dataclass
class Round:
    tasks_per_s: float
    gen_cpu_ms: float  # CPU of the generation thread per task (includes enqueue)
    background_cpu_ms: float  # CPU of every other thread of the process per task (the webhook sender)
    slowest_enqueue_ms: float
    enqueue_cpu_ms: float  # CPU of the generation thread spent in enqueue, per task


def run_round(
    tag: str, tasks: int, work: tuple[int, torch.Tensor, torch.Tensor], dispatcher: WebhookDispatcher | None, url: str
) -> Round:
    iters, a, b = work
    slowest = enqueue_cpu = 0.0
    cpu0, thread0, started = time.process_time(), time.thread_time(), time.perf_counter()
    for i in range(tasks):
        for _ in range(iters):
            torch.tanh(a @ b)
        if dispatcher is not None:
            t0, c0 = time.perf_counter(), time.thread_time()
            dispatcher.enqueue(f"{tag}-{i}", "bench-owner", url, body(f"{tag}-{i}"))
            slowest = max(slowest, time.perf_counter() - t0)
            enqueue_cpu += time.thread_time() - c0
    wall = time.perf_counter() - started
    gen_cpu, all_cpu = time.thread_time() - thread0, time.process_time() - cpu0
    return Round(
        tasks / wall,
        gen_cpu / tasks * 1000,
        (all_cpu - gen_cpu) / tasks * 1000,
        slowest * 1000,
        enqueue_cpu / tasks * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12, help="tasks per round")
    parser.add_argument("--task-ms", type=float, default=250.0, help="CPU work per fake task")
    parser.add_argument("--rounds", type=int, default=10, help="pairs of rounds (baseline, hanging)")
    parser.add_argument("--hang", type=float, default=5.0, help="seconds the receiver hangs on every call")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = make_work(args.task_ms)
    settings = Settings(webhook_allow_hosts=("127.0.0.1",), webhook_timeout=5.0, webhook_max_retries=5)
    ratios: list[float] = []
    base_rounds: list[Round] = []
    hook_rounds: list[Round] = []
    with tempfile.TemporaryDirectory() as tmp, hanging_receiver(args.hang) as url:
        # One dispatcher for the whole run, like a server: its outbox fills up with retrying deliveries.
        dispatcher = WebhookDispatcher(f"sqlite:///{Path(tmp) / 'bench.db'}", settings, secret_for)
        dispatcher.start()
        for r in range(args.rounds):
            # Alternate which mode goes first so that drifting load from other processes cancels out.
            order = [False, True] if r % 2 == 0 else [True, False]
            results = {
                hooked: run_round(f"r{r}", args.tasks, work, dispatcher if hooked else None, url) for hooked in order
            }
            base, hook = results[False], results[True]
            base_rounds.append(base)
            hook_rounds.append(hook)
            ratios.append(hook.tasks_per_s / base.tasks_per_s)
            print(
                f"pair {r}: no webhooks {base.tasks_per_s:.2f} tasks/s, hanging receiver {hook.tasks_per_s:.2f} tasks/s"
            )
        with dispatcher.engine.connect() as conn:
            attempts = conn.execute(select(func.sum(deliveries_table.c.attempts))).scalar_one()
        pending = dispatcher.count_pending()
        dispatcher.close()

    def med(rounds: list[Round], name: str) -> float:
        return round(statistics.median(getattr(x, name) for x in rounds), 3)

    print(
        json.dumps(
            {
                "tasks_per_round": args.tasks,
                "task_ms": args.task_ms,
                "pairs": args.rounds,
                "hang_s": args.hang,
                "median_throughput_ratio": round(statistics.median(ratios), 4),
                "throughput_ratios": [round(x, 3) for x in ratios],
                "generation_cpu_ms_per_task": {
                    "no_webhooks": med(base_rounds, "gen_cpu_ms"),
                    "hanging": med(hook_rounds, "gen_cpu_ms"),
                },
                "background_cpu_ms_per_task": {
                    "no_webhooks": med(base_rounds, "background_cpu_ms"),
                    "hanging": med(hook_rounds, "background_cpu_ms"),
                },
                "enqueue_cpu_ms_per_task": med(hook_rounds, "enqueue_cpu_ms"),
                "slowest_enqueue_ms": round(max(x.slowest_enqueue_ms for x in hook_rounds), 2),
                "deliveries_pending_at_end": pending,
                "delivery_attempts_made": attempts,
            },
            indent=2,
        )
    )


def secret_for(owner: str) -> str:
    return derive_secret(b"bench", owner)


if __name__ == "__main__":
    main()
