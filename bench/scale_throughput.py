"""Scale-out benchmarks: worker throughput (1 vs 2 workers) and API submit latency (Celery mode vs embedded).

Needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379); S3 is a moto server started here.
Every process runs with one torch thread. Usage (from the repository root):

    OMP_NUM_THREADS=1 python bench/scale_throughput.py [--trials 3] [--tasks 16] [--steps 20] [--submits 60]

Throughput: one API node, then 1 and 2 workers; all tasks are queued before the clock starts and completion is
read from the database. Submit latency: sequential submits to an API node with no worker running, in Celery
mode (PostgreSQL store, Redis broker) and in embedded mode (``serve --no-worker``: SQLite, local queue), so that
only the API path is compared. Each is measured ``--trials`` times (at least 3; the order of the 1- and 2-worker
runs alternates between trials) and every reported figure is the median over the trials.

Exits non-zero when the median over trials of (2-worker / 1-worker tasks per minute) is below 1.6x, or when the
median over trials of (Celery-mode submit p50 / embedded-mode p50) exceeds 2x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import boto3
import httpx
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.support
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tests.support.cluster import AUTH, ApiNode, Cluster, png_b64, wait_all
from tests.support.ports import free_port

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _fresh_database() -> tuple[str, str]:
    name = f"underpaint_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


def _drop_database(name: str) -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _free_redis_db() -> int:
    marker = uuid.uuid4().hex
    for db in range(14, 0, -1):
        client = redis.Redis(host="127.0.0.1", port=6379, db=db)
        if client.dbsize() == 0 and client.set("underpaint:test-owner", marker, nx=True, ex=3600):
            return db
    raise SystemExit("no free Redis database number")


def wait_done(db_url: str, ids: list[str], timeout: float) -> None:
    """Wait until every task ended, asking the database twice a second (HTTP polling of many tasks would load
    the API node, which shares the machine with the workers being measured)."""
    dsn = db_url.replace("postgresql+psycopg://", "postgresql://")
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            rows = conn.execute("SELECT status, reason FROM tasks WHERE task_id = ANY(%s)", (ids,)).fetchall()
            ended = [r for r in rows if r[0] in ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED")]
            failed = [r for r in ended if r[0] == "TASK_STATUS_FAILED"]
            if failed:
                raise SystemExit(f"{len(failed)} task(s) failed: {failed[0][1]}")
            if len(ended) == len(ids):
                return
            time.sleep(0.5)
    raise SystemExit(f"tasks did not finish in {timeout} s")


def throughput(cluster: Cluster, api: ApiNode, n_workers: int, tasks: int, steps: int) -> float:
    """Tasks per minute with ``n_workers`` workers, after two warm-up tasks per worker (model load)."""
    workers = [cluster.worker(f"bench-w{n_workers}-{i}").start() for i in range(n_workers)]
    try:
        warm = [api.submit(steps=steps, seed=i) for i in range(2 * n_workers)]
        wait_all(api, warm, timeout=600, procs=[api, *workers])
        ids = [api.submit(steps=steps, seed=1000 + i) for i in range(tasks)]  # all queued before the clock starts
        start = time.perf_counter()
        wait_done(cluster.database_url, ids, timeout=1800)
        return tasks * 60.0 / (time.perf_counter() - start)
    finally:
        for w in workers:
            w.stop()


def submit_latencies(url: str, n: int, steps: int) -> list[float]:
    body = {
        "request": {
            "model_name": "tiny-sd15.safetensors", "image_base64": png_b64(), "prompt": "a lighthouse",
            "width": 128, "height": 128, "image_num": 1, "steps": steps, "seed": 1, "sampler_name": "Euler",
            "guidance_scale": 7, "strength": 0.9,
        }
    }  # fmt: skip
    out: list[float] = []
    with httpx.Client(timeout=60) as client:
        for _ in range(n):
            t0 = time.perf_counter()
            r = client.post(url + "/v3/async/img2img", json=body, headers=AUTH)
            out.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
    return out


def embedded_submit_latencies(root: Path, models: Path, n: int, steps: int, trials: int) -> list[list[float]]:
    import subprocess

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNDERPAINT_API_KEYS": "key-scale",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}  # fmt: skip
    log = (root / "embedded.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "underpaint.cli", "serve", "--no-worker", "--port", str(port), "--data-dir",
         str(root / "embedded"), "--models-dir", str(models), "--torch-threads", "1"],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        submit_latencies(url, 5, steps)  # warm-up
        return [submit_latencies(url, n, steps) for _ in range(trials)]
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=3, help="repetitions of every measurement (medians are reported)")
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--submits", type=int, default=60)
    args = ap.parse_args()
    if args.trials < 3:
        ap.error("--trials must be at least 3 (every figure is a median over trials)")

    from moto.server import ThreadedMotoServer

    from underpaint.demo.checkpoints import write_demo_models

    root = Path(tempfile.mkdtemp(prefix="underpaint-bench-"))
    models = root / "models"
    write_demo_models(models)
    db_name, db_url = _fresh_database()
    redis_db = _free_redis_db()
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{s3_port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket="bench")  # fmt: skip
    cluster = Cluster(root, models, db_url, f"redis://127.0.0.1:6379/{redis_db}", endpoint, "bench", lease_seconds=60)
    api = cluster.api("bench-api").start()
    ones: list[float] = []
    twos: list[float] = []
    celery_p50: list[float] = []
    celery_p90: list[float] = []
    try:
        for trial in range(args.trials):
            for n in (1, 2) if trial % 2 == 0 else (2, 1):
                (ones if n == 1 else twos).append(throughput(cluster, api, n, args.tasks, args.steps))
            lat = submit_latencies(api.url, args.submits, args.steps)  # the API node alone, no worker running
            celery_p50.append(statistics.median(lat))
            celery_p90.append(_p90(lat))
            print(f"trial {trial}: 1 worker {ones[-1]:6.1f}, 2 workers {twos[-1]:6.1f} tasks/min "
                  f"({twos[-1] / ones[-1]:.2f}x); celery submit p50 {celery_p50[-1] * 1000:.1f} ms")  # fmt: skip
    finally:
        api.stop()
        s3.stop()
        _drop_database(db_name)
        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()
    embedded = embedded_submit_latencies(root, models, args.submits, args.steps, args.trials)
    embedded_p50 = [statistics.median(lat) for lat in embedded]
    embedded_p90 = [_p90(lat) for lat in embedded]

    ratio = statistics.median(t / o for t, o in zip(twos, ones, strict=True))
    p50_ratio = statistics.median(c / e for c, e in zip(celery_p50, embedded_p50, strict=True))
    med = statistics.median
    print(f"throughput, tiny SD1.5 model, 128x128, {args.steps} steps, {args.tasks} tasks, 1 torch thread per worker, "
          f"medians of {args.trials} trials")  # fmt: skip
    print(f"  machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end")
    print(f"  1 worker   {med(ones):7.1f} tasks/min   (trials {', '.join(f'{x:.1f}' for x in ones)})")
    print(f"  2 workers  {med(twos):7.1f} tasks/min   (trials {', '.join(f'{x:.1f}' for x in twos)})")
    print(f"  scaling    {ratio:.2f}x (median of per-trial ratios; target >= 1.6x)")
    print(f"submit latency over {args.submits} sequential submits (128x128 PNG input), medians of {args.trials} trials")
    print(
        f"  celery mode (PostgreSQL + Redis)  p50 {med(celery_p50) * 1000:6.1f} ms   p90 {med(celery_p90) * 1000:6.1f} ms"
    )
    print(
        f"  embedded mode (SQLite)            p50 {med(embedded_p50) * 1000:6.1f} ms   p90 {med(embedded_p90) * 1000:6.1f} ms"
    )
    print(f"  ratio p50 {p50_ratio:.2f}x (median of per-trial ratios; target <= 2x)")
    ok = ratio >= 1.6 and p50_ratio <= 2
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


if __name__ == "__main__":
    raise SystemExit(main())
