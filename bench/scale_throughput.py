"""Scale-out benchmarks: worker throughput (1 vs 2 workers) and API submit latency (Celery mode vs embedded).

Needs PostgreSQL (127.0.0.1:5432, user postgres) and Redis (127.0.0.1:6379); S3 is a moto server started here.
Every process runs with one torch thread. Usage (from the repository root):

    OMP_NUM_THREADS=1 python bench/scale_throughput.py [--tasks 24] [--steps 4] [--submits 60]

Exits non-zero when 2 workers give less than 1.6x the tasks per minute of one, or when the Celery-mode submit
p50 is more than 2x the embedded mode's.
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "scale"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _cluster import AUTH, ApiNode, Cluster, free_port, png_b64, wait_all  # noqa: E402

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


def throughput(cluster: Cluster, api: ApiNode, n_workers: int, tasks: int, steps: int) -> float:
    """Tasks per minute with ``n_workers`` workers, after one warm-up task per worker (model load)."""
    workers = [cluster.worker(f"bench-w{n_workers}-{i}").start() for i in range(n_workers)]
    try:
        warm = [api.submit(steps=steps, seed=i) for i in range(2 * n_workers)]
        wait_all(api, warm, timeout=600, procs=[api, *workers])
        start = time.perf_counter()
        ids = [api.submit(steps=steps, seed=1000 + i) for i in range(tasks)]
        bodies = wait_all(api, ids, timeout=1800, procs=[api, *workers])
        elapsed = time.perf_counter() - start
        failed = [t for t, b in bodies.items() if b["task"]["status"] != "TASK_STATUS_SUCCEED"]
        if failed:
            raise SystemExit(f"{len(failed)} task(s) failed: {bodies[failed[0]]['task']}")
        return tasks * 60.0 / elapsed
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


def embedded_submit_latencies(root: Path, models: Path, n: int, steps: int) -> list[float]:
    import os
    import subprocess

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "UNDERPAINT_API_KEYS": "key-scale",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}  # fmt: skip
    log = (root / "embedded.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "underpaint.cli", "serve", "--port", str(port), "--data-dir", str(root / "embedded"),
         "--models-dir", str(models), "--torch-threads", "1"],
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
        return submit_latencies(url, n, steps)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=24)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--submits", type=int, default=60)
    args = ap.parse_args()

    from moto.server import ThreadedMotoServer

    from underpaint.engine.demo import write_demo_models

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
    try:
        one = throughput(cluster, api, 1, args.tasks, args.steps)
        two = throughput(cluster, api, 2, args.tasks, args.steps)
        # As in embedded mode, a worker generates while the API takes submits (there it shares the process).
        worker = cluster.worker("bench-latency").start()
        try:
            celery_lat = submit_latencies(api.url, args.submits, args.steps)
        finally:
            worker.stop()
    finally:
        api.stop()
        s3.stop()
        _drop_database(db_name)
        redis.Redis(host="127.0.0.1", port=6379, db=redis_db).flushdb()
    embedded_lat = embedded_submit_latencies(root, models, args.submits, args.steps)

    ratio = two / one
    p50_c, p50_e = statistics.median(celery_lat), statistics.median(embedded_lat)
    print(f"throughput, tiny SD1.5 model, 128x128, {args.steps} steps, {args.tasks} tasks, 1 torch thread per worker")
    print(f"  1 worker   {one:7.1f} tasks/min")
    print(f"  2 workers  {two:7.1f} tasks/min   ({ratio:.2f}x; target >= 1.6x)")
    print(f"submit latency over {args.submits} sequential submits (128x128 PNG input)")
    print(f"  celery mode (PostgreSQL + Redis)  p50 {p50_c * 1000:6.1f} ms   p90 {_p90(celery_lat) * 1000:6.1f} ms")
    print(f"  embedded mode (SQLite)            p50 {p50_e * 1000:6.1f} ms   p90 {_p90(embedded_lat) * 1000:6.1f} ms")
    print(f"  ratio p50 {p50_c / p50_e:.2f}x (target <= 2x)")
    return 0 if ratio >= 1.6 and p50_c <= 2 * p50_e else 1


def _p90(values: list[float]) -> float:
    return sorted(values)[int(0.9 * (len(values) - 1))]


if __name__ == "__main__":
    raise SystemExit(main())
