"""Real ``underpaint`` processes for the scale-out tests: API nodes (``serve --no-worker --queue celery``) and
Celery workers (``worker``), all on one PostgreSQL store, one Redis broker and one S3 bucket."""

from __future__ import annotations

import base64
import io
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tests.support.ports import free_port

SRC = Path(__file__).resolve().parents[2] / "src"
KEY = "key-scale"
AUTH = {"Authorization": f"Bearer {KEY}"}
TERMINAL = ("TASK_STATUS_SUCCEED", "TASK_STATUS_FAILED")


def png_b64(size: tuple[int, int] = (128, 128), seed: int = 0) -> str:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3)).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


class WebhookReceiver:
    """A loopback HTTP server that records every webhook POST body."""

    def __init__(self) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received: list[dict[str, Any]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                with lock:
                    received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.received = received
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def task_ids(self) -> list[str]:
        return [str(b["payload"]["task"]["task_id"]) for b in list(self.received)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Cluster:
    """Shared configuration of every process of one test."""

    root: Path
    models_dir: Path
    database_url: str
    broker_url: str
    s3_endpoint: str
    s3_bucket: str
    lease_seconds: int = 6
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": str(SRC),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "UNDERPAINT_API_KEYS": KEY,
            "UNDERPAINT_URL_SECRET": "scale-test-secret",
            "UNDERPAINT_DATABASE_URL": self.database_url,
            "UNDERPAINT_BROKER_URL": self.broker_url,
            "UNDERPAINT_QUEUE_BACKEND": "celery",
            "UNDERPAINT_STORAGE_BACKEND": "s3",
            "UNDERPAINT_S3_BUCKET": self.s3_bucket,
            "UNDERPAINT_S3_ENDPOINT_URL": self.s3_endpoint,
            "UNDERPAINT_S3_REGION": "us-east-1",
            "UNDERPAINT_LEASE_SECONDS": str(self.lease_seconds),
            "UNDERPAINT_LOG_FORMAT": "json",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            **self.extra_env,
        }

    def api(self, name: str) -> ApiNode:
        return ApiNode(self, name)

    def worker(self, name: str, queues: str = "sd15,sdxl") -> WorkerNode:
        return WorkerNode(self, name, queues)


class _Process:
    def __init__(self, cluster: Cluster, name: str) -> None:
        self.cluster = cluster
        self.name = name
        self.proc: subprocess.Popen[bytes] | None = None
        self.data_dir = cluster.root / name
        self.log_path = cluster.root / f"{name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def spawn(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "underpaint.cli", *self.argv()],
            env=self.cluster.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, n: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-n:] if self.log_path.exists() else ""

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: nothing runs on the way out, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class ApiNode(_Process):
    def __init__(self, cluster: Cluster, name: str) -> None:
        super().__init__(cluster, name)
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        return [
            "serve", "--no-worker", "--queue", "celery", "--broker-url", self.cluster.broker_url,
            "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(self.data_dir),
            "--models-dir", str(self.cluster.models_dir),
        ]  # fmt: skip

    def start(self, timeout: float = 120.0) -> ApiNode:
        self.spawn()
        return self.start_wait(timeout)

    def start_wait(self, timeout: float = 120.0) -> ApiNode:
        """Wait until the spawned node answers ``/health`` with 200."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not become healthy:\n{self.log_tail()}")

    def submit(self, **request: Any) -> str:
        """Submit ``img2img_body(**request)``; the task id (a 200 is asserted)."""
        r = self.post(img2img_body(**request))
        assert r.status_code == 200, r.text
        return str(r.json()["task_id"])

    def post(self, body: dict[str, Any], idempotency_key: str | None = None) -> httpx.Response:
        headers = AUTH | ({"Idempotency-Key": idempotency_key} if idempotency_key else {})
        return httpx.post(self.url + "/v3/async/img2img", json=body, headers=headers, timeout=60)

    def result(self, task_id: str) -> dict[str, Any]:
        r = httpx.get(self.url + "/v3/async/task-result", params={"task_id": task_id}, headers=AUTH, timeout=30)
        assert r.status_code == 200, r.text
        return dict(r.json())


def img2img_body(
    model: str = "tiny-sd15.safetensors",
    steps: int = 2,
    seed: int = 1,
    size: int = 128,
    image_num: int = 1,
    webhook: str | None = None,
) -> dict[str, Any]:
    extra: dict[str, Any] = {"response_image_type": "png"}
    if webhook is not None:
        extra["webhook"] = {"url": webhook}
    return {
        "extra": extra,
        "request": {
            "model_name": model, "image_base64": png_b64(seed=seed), "prompt": "a lighthouse",
            "width": size, "height": size, "image_num": image_num, "steps": steps, "seed": seed,
            "guidance_scale": 7, "sampler_name": "Euler", "strength": 0.9,
        },
    }  # fmt: skip


class WorkerNode(_Process):
    def __init__(self, cluster: Cluster, name: str, queues: str) -> None:
        super().__init__(cluster, name)
        self.queues = queues

    def argv(self) -> list[str]:
        return [
            "worker", "--queues", self.queues, "--concurrency", "1", "--torch-threads", "1", "--device", "cpu",
            "--data-dir", str(self.data_dir), "--models-dir", str(self.cluster.models_dir),
        ]  # fmt: skip

    def start(self) -> WorkerNode:
        self.spawn()
        return self


def wait_all(
    api: ApiNode, task_ids: list[str], timeout: float, procs: list[_Process] | None = None
) -> dict[str, dict[str, Any]]:
    """Poll until every task ended (checking that ``procs`` stay up); returns the task-result bodies."""
    procs = procs or []
    done: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task_id in task_ids:
            if task_id not in done:
                body = api.result(task_id)
                if body["task"]["status"] in TERMINAL:
                    done[task_id] = body
        if len(done) == len(task_ids):
            return done
        for p in procs:
            p.check_alive()
        time.sleep(0.3)
    pending = [t for t in task_ids if t not in done]
    logs = "\n".join(f"--- {p.name}\n{p.log_tail(2000)}" for p in procs)
    raise AssertionError(f"{len(pending)} task(s) did not finish in {timeout}s: {pending[:5]}\n{logs}")
