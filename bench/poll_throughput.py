"""Task-result polling under load (issue #2 benchmark).

Claims: ``GET /v3/async/task-result`` under 50 concurrent pollers on this 2-core machine serves >= 1000 requests/s
with p99 <= 50 ms, and a generation running meanwhile slows down by <= 10 %.

Setup: one live ``underpaint serve`` subprocess (uvicorn with httptools; ``--torch-threads 1`` for its in-process
worker, so a generation takes one core). The pollers are a separate process meant to take the other core:
``--connections`` keep-alive HTTP/1.1 connections on 127.0.0.1, written on bare asyncio streams so that the client
is cheap and not what gets measured. They read finished tasks (full result body with a signed image URL), spread
over ``--targets`` task ids. Two kinds of load:

- closed loop ("saturating"): every poller sends its next GET as soon as the previous answer is read; the rate it
  reaches is the server's capacity;
- open loop ("1000 req/s"): the pollers send on a fixed schedule totalling ``--rate`` requests/s; latency counts
  from the scheduled send time, so a slow server cannot hide its backlog (no coordinated omission).

Each trial runs ``--tasks`` generation tasks (tiny SD1.5, 128x128, ``--steps`` steps, strength 1.0) back to back
under each condition (no pollers, saturating, 1000 req/s); the order rotates between trials so that drift in the
machine's load hits all alike. A task's generation time is the server's own (claim to SUCCEED, read from its task
table). Poll rate and latency are reported for the window where the worker was idle (``--idle-seconds`` before the
first task) and the window where tasks were generating. The server's CPU use (from /proc) is split into its event
loop thread and all other threads (the request thread pool, the generation worker), and the generation thread's
time per task (from its schedstat) into CPU, waiting for a core (run queue) and blocked (neither: in this process
that is waiting for the GIL), to show what dominates.

Run from the repository root:  OMP_NUM_THREADS=1 python bench/poll_throughput.py [--trials 3]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import multiprocessing
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests" / "e2e")]

from tests.support.server import LiveServer, make_png  # noqa: E402

HEADERS = {"Authorization": "Bearer key-a"}
RPS_TARGET, P99_TARGET_MS, SLOWDOWN_TARGET = 1000.0, 50.0, 0.10
CONDITIONS = ("no pollers", "saturating", "1000 req/s")


# -- the load process ------------------------------------------------------------------------------------------
@dataclass
class _Shared:
    stop: bool = False
    errors: int = 0
    done: array[float] = field(default_factory=lambda: array("d"))  # completion times (time.time)
    lat: array[float] = field(default_factory=lambda: array("d"))  # latencies, seconds


async def _poller(port: int, paths: list[str], s: _Shared, go: asyncio.Event, interval: float, phase: float) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    host = f"127.0.0.1:{port}"
    requests = [f"GET {p} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer key-a\r\n\r\n".encode() for p in paths]
    await go.wait()  # every connection is open before the first request
    next_send = time.perf_counter() + phase
    i = 0
    while not s.stop:
        if interval > 0:  # open loop: the clock starts at the scheduled time, not when we got round to sending
            delay = next_send - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            t0, next_send = next_send, next_send + interval
        else:
            t0 = time.perf_counter()
        writer.write(requests[i % len(requests)])
        i += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        s.lat.append(time.perf_counter() - t0)
        s.done.append(time.time())
        if head[9:12] != b"200":
            s.errors += 1
    writer.close()


async def _load(port: int, paths: list[str], n: int, rate: float, ready: Event, stop: Event, cap: int) -> _Shared:
    s, go = _Shared(), asyncio.Event()
    interval = n / rate if rate > 0 else 0.0

    async def watch() -> None:
        await asyncio.sleep(0.3)  # connections open
        go.set()
        ready.set()
        while not stop.is_set() and len(s.done) < cap:
            await asyncio.sleep(0.02)
        s.stop = True

    pollers = (_poller(port, paths, s, go, interval, interval * k / n) for k in range(n))
    await asyncio.gather(watch(), *pollers)
    return s


def load_process(
    port: int, paths: list[str], n: int, rate: float, ready: Event, stop: Event, cap: int, out: Any
) -> None:
    try:  # the client should cost as little CPU as possible: it shares the 2 cores with what it measures
        import uvloop

        s = uvloop.run(_load(port, paths, n, rate, ready, stop, cap))
    except ImportError:
        s = asyncio.run(_load(port, paths, n, rate, ready, stop, cap))
    out.put((s.done.tobytes(), s.lat.tobytes(), s.errors))


# -- measuring the server --------------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(stat_path: str) -> float:
    fields = Path(stat_path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


@dataclass
class Sched:
    """Where the generation thread's time went, per task (seconds)."""

    cpu: float  # on a core
    runq: float  # runnable, waiting for a core (other processes or threads)
    blocked: float  # neither: waiting for the GIL (or, briefly, for the next task)


def sched_of(pid: int, tid: int) -> tuple[float, float]:
    """(CPU seconds, run-queue wait seconds) of one thread, from /proc/<pid>/task/<tid>/schedstat."""
    cpu_ns, wait_ns, _ = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()
    return int(cpu_ns) / 1e9, int(wait_ns) / 1e9


def thread_cpu(pid: int) -> dict[int, float]:
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # the thread ended meanwhile
            out[int(tid)] = _cpu_seconds(f"/proc/{pid}/task/{tid}/stat")
    return out


@dataclass
class CpuSnap:
    at: float
    process: float  # all threads of the server, including finished ones
    loop: float  # the main thread: uvicorn's event loop
    machine_busy: float  # all cores, seconds

    @classmethod
    def take(cls, pid: int) -> CpuSnap:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(cpu) - cpu[3] - cpu[4]) / _TICK  # minus idle and iowait
        return cls(time.time(), _cpu_seconds(f"/proc/{pid}/stat"), _cpu_seconds(f"/proc/{pid}/task/{pid}/stat"), busy)


@dataclass
class Window:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    loop_pct: float  # server event-loop thread, % of one core
    other_pct: float  # other server threads (request thread pool, generation worker), % of one core
    machine_pct: float  # whole machine, % of one core (200 = both cores busy)


def window(done: list[float], lat: list[float], a: CpuSnap, b: CpuSnap) -> Window:
    span = b.at - a.at
    sel = sorted(latency for t, latency in zip(done, lat, strict=True) if a.at <= t < b.at)
    loop = (b.loop - a.loop) / span * 100
    other = (b.process - a.process) / span * 100 - loop
    machine = (b.machine_busy - a.machine_busy) / span * 100
    if not sel:
        return Window(0.0, float("nan"), float("nan"), 0, loop, other, machine)
    p99 = sel[min(len(sel) - 1, int(len(sel) * 0.99))]
    return Window(len(sel) / span, sel[len(sel) // 2] * 1000, p99 * 1000, len(sel), loop, other, machine)


def generating_pid(server_pid: int) -> int:
    """The process that runs generations: the embedded worker's child process, else the server itself."""
    children = [int(c) for c in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()]
    # the busiest child: multiprocessing may also have started its resource tracker
    return max(children, key=lambda c: _cpu_seconds(f"/proc/{c}/stat")) if children else server_pid


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


def run_tasks(client: httpx.Client, db: sqlite3.Connection, png: str, steps: int, n: int) -> list[float]:
    """``n`` tasks one after another; returns each one's server-side generation time (claim to SUCCEED)."""
    spans = [wait_done(db, submit(client, png, steps, seed=100 + i)) for i in range(n)]
    return [f - s for s, f in spans]


@dataclass
class Trial:
    generation: list[float]
    sched: Sched
    idle: Window | None = None
    busy: Window | None = None
    errors: int = 0


def loaded_trial(ctx: Any, server: LiveServer, paths: list[str], rate: float, run: Any, args: Any) -> Trial:
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=load_process, args=(server.port, paths, args.connections, rate, ready, stop,
                                                  args.max_requests, out))  # fmt: skip
    proc.start()
    try:
        if not ready.wait(60):
            raise RuntimeError("the load process did not start")
        time.sleep(0.5)  # past the first burst on fresh connections
        assert server.proc is not None
        pid = server.proc.pid
        s0 = CpuSnap.take(pid)
        time.sleep(args.idle_seconds)
        s1 = CpuSnap.take(pid)
        generation, sched = run()
        s2 = CpuSnap.take(pid)
        stop.set()
        raw_done, raw_lat, errors = out.get(timeout=120)
    finally:
        stop.set()
        proc.join(30)
    done, lat = array("d"), array("d")
    done.frombytes(raw_done)
    lat.frombytes(raw_lat)
    d, la = list(done), list(lat)
    return Trial(generation, sched, window(d, la, s0, s1), window(d, la, s1, s2), errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4, help="generation tasks per trial and condition")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--connections", type=int, default=50, help="concurrent pollers")
    parser.add_argument("--rate", type=float, default=1000.0, help="total req/s of the open-loop load")
    parser.add_argument("--targets", type=int, default=10, help="distinct finished task ids the pollers read")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="poll load before the first task")
    parser.add_argument("--max-requests", type=int, default=300_000, help="hard bound on requests per load run")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    ctx = multiprocessing.get_context("spawn")
    import torch

    torch.set_num_threads(1)  # only used to write the demo models; the server runs its own 1-thread worker
    from underpaint.demo.checkpoints import write_demo_models

    results: dict[str, list[Trial]] = {c: [] for c in CONDITIONS}
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models"
        write_demo_models(models)
        png = base64.b64encode(make_png((128, 128))).decode()
        server = LiveServer(Path(tmp) / "data", models).start()
        try:
            with httpx.Client(base_url=server.url, timeout=60.0) as client, \
                    sqlite3.connect(Path(tmp) / "data" / "underpaint.db") as db:  # fmt: skip
                targets = [submit(client, png, 1, seed=i) for i in range(args.targets)]
                for t in targets:
                    wait_done(db, t)  # also warms the worker up
                server_pid = server.proc.pid if server.proc else 0
                pid = generating_pid(server_pid)
                before = thread_cpu(pid)
                run_tasks(client, db, png, args.steps, 1)
                after = thread_cpu(pid)
                worker_tid = max(after, key=lambda tid: after[tid] - before.get(tid, 0.0))  # the busiest thread
                paths = [f"/v3/async/task-result?task_id={t}" for t in targets]

                def run() -> tuple[list[float], Sched]:
                    (cpu0, wait0), t0 = sched_of(pid, worker_tid), time.perf_counter()
                    times = run_tasks(client, db, png, args.steps, args.tasks)
                    (cpu1, wait1), wall = sched_of(pid, worker_tid), time.perf_counter() - t0
                    cpu, wait = cpu1 - cpu0, wait1 - wait0
                    return times, Sched(cpu / args.tasks, wait / args.tasks, (wall - cpu - wait) / args.tasks)

                for trial in range(args.trials):
                    order = CONDITIONS[trial % 3 :] + CONDITIONS[: trial % 3]
                    for cond in order:
                        if cond == "no pollers":
                            res = Trial(*run())
                        else:
                            res = loaded_trial(
                                ctx, server, paths, args.rate if cond == "1000 req/s" else 0.0, run, args
                            )
                        results[cond].append(res)
                        line = (f"trial {trial} {cond:<11} generation "
                                + " ".join(f"{g * 1000:.0f}" for g in res.generation)
                                + f" ms (worker thread per task: CPU {res.sched.cpu * 1000:.0f} ms, waiting for a core "
                                f"{res.sched.runq * 1000:.0f} ms, blocked {res.sched.blocked * 1000:.0f} ms)")  # fmt: skip
                        if res.idle and res.busy:
                            line += (f"; polls: worker idle {res.idle.rps:.0f}/s p99 {res.idle.p99_ms:.1f} ms, "
                                     f"generating {res.busy.rps:.0f}/s p99 {res.busy.p99_ms:.1f} ms")  # fmt: skip
                        print(line, flush=True)
        finally:
            server.stop()
    report(results, args, load_before)


def sched_median(trials: list[Trial]) -> str:
    med = statistics.median
    cells = (med(t.sched.cpu for t in trials), med(t.sched.runq for t in trials), med(t.sched.blocked for t in trials))
    return f"{' / '.join(f'{x * 1000:.0f}' for x in cells):>21}"


def report(results: dict[str, list[Trial]], args: Any, load_before: float) -> None:
    med = statistics.median
    base = med(g for t in results["no pollers"] for g in t.generation)
    base_s = sched_median(results["no pollers"])
    errors = sum(t.errors for ts in results.values() for t in ts)
    print(f"\n{args.connections} pollers on GET /v3/async/task-result ({args.targets} finished tasks), {args.trials} trials, "
          f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}, non-200 answers {errors}")  # fmt: skip
    print(f"  {'load':<12}{'worker':<12}{'req/s':>7}{'p50 ms':>8}{'p99 ms':>8}{'worst p99':>10}"
          f"{'loop %':>8}{'other %':>8}{'machine %':>10}{'gen ms':>8}{'slowdown':>9}{'cpu/runq/blocked ms':>21}")  # fmt: skip
    print(f"  {'none':<12}{'generating':<12}{'':>7}{'':>8}{'':>8}{'':>10}{'':>8}{'':>8}{'':>10}{base * 1000:>8.0f}{'':>9}"
          f"{base_s}")  # fmt: skip
    summary: dict[str, tuple[float, float, float]] = {}
    for cond in CONDITIONS[1:]:
        trials = results[cond]
        gen = med(g for t in trials for g in t.generation)
        gen_s = sched_median(trials)
        for label, wins in (("idle", [t.idle for t in trials]), ("generating", [t.busy for t in trials])):
            w = [x for x in wins if x is not None]
            rps, p99 = med(x.rps for x in w), med(x.p99_ms for x in w)
            cells = (f"  {cond:<12}{label:<12}{rps:>7.0f}{med(x.p50_ms for x in w):>8.1f}{p99:>8.1f}"
                     f"{max(x.p99_ms for x in w):>10.1f}{med(x.loop_pct for x in w):>8.0f}{med(x.other_pct for x in w):>8.0f}"
                     f"{med(x.machine_pct for x in w):>10.0f}")  # fmt: skip
            if label == "generating":
                cells += f"{gen * 1000:>8.0f}{(gen / base - 1) * 100:>+8.1f}%{gen_s}"
                summary[cond] = (rps, p99, gen / base - 1)
            print(cells)
    cap_rps = summary["saturating"][0]
    rps, p99, slowdown = summary["1000 req/s"]
    verdicts = {
        f"capacity during generation >= {RPS_TARGET:.0f} req/s (saturating: {cap_rps:.0f})": cap_rps >= RPS_TARGET,
        f"at {args.rate:.0f} req/s offered: served >= {RPS_TARGET * 0.98:.0f} req/s ({rps:.0f})": rps
        >= RPS_TARGET * 0.98,
        f"at {args.rate:.0f} req/s offered: p99 <= {P99_TARGET_MS:.0f} ms ({p99:.1f})": p99 <= P99_TARGET_MS,
        f"at {args.rate:.0f} req/s offered: generation slowdown <= {SLOWDOWN_TARGET:.0%} ({slowdown:+.1%})": slowdown
        <= SLOWDOWN_TARGET,
        f"no errors ({errors})": errors == 0,
    }
    for claim, ok in verdicts.items():
        print(f"  {'PASS' if ok else 'FAIL'}  {claim}")
    if not all(verdicts.values()):
        print("FAIL")
        raise SystemExit(1)
    print("PASS")


if __name__ == "__main__":
    main()
